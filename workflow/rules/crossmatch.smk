# Truth matching of candidates, labelled folders and injection-recovery plots (the older tool's `checksim`).


rule crossmatch:
    """Match one image's candidates with its injected sources and known variables; tag what each sits on (truth)."""
    input:
        unpack(truth_tables_of),
        candidates="results/{telescope}/sim/detect/{image}.ecsv",
        injected="results/{telescope}/sim/inject/{image}.ecsv",
        catalogues=catalogues_of,
    output:
        table="results/{telescope}/sim/crossmatch/{image}.ecsv",
        compat="results/{telescope}/sim/crossmatch/{image}.dat",
        per_candidate="results/{telescope}/sim/crossmatch/{image}.per_candidate.ecsv",
    log:
        "logs/{telescope}/sim/crossmatch/{image}.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        crossmatch=stage_block("crossmatch"),
    script:
        "../../scripts/crossmatch.py"


# The label folders training/{true,false,unsorted}/ are not declared outputs on purpose: Snakemake
# deletes a job's outputs before it runs, and these folders hold a person's relabelling (moved files).
# labels.ecsv stands for them (it records where every file was put), and it is flagged `update`
# because label_cutouts reads the previous placement to tell a person's move from its own.


rule label:
    """Sort every injected image's cutouts into training/true, false (and unsorted) folders."""
    input:
        unpack(label_inputs),
    output:
        update("results/{telescope}/training/labels.ecsv"),
    log:
        "logs/{telescope}/training/label.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=15,
    script:
        "../../scripts/label.py"


rule checksim_plots:
    """Injection recovery: magnitude histograms, completeness vs magnitude, photometry residuals."""
    input:
        unpack(checksim_inputs),
    output:
        summary="results/{telescope}/plots/checksim/summary.json",
        efficiency=report(
            "results/{telescope}/plots/checksim/efficiency.png",
            caption="../report/checksim_efficiency.rst",
            category="Injection recovery",
        ),
        histogram=report(
            "results/{telescope}/plots/checksim/hist_mag.png",
            caption="../report/checksim_hist.rst",
            category="Injection recovery",
        ),
        bias=report(
            "results/{telescope}/plots/checksim/mag_bias.png",
            caption="../report/checksim_bias.rst",
            category="Injection recovery",
        ),
        snr=report(
            "results/{telescope}/plots/checksim/snr_mag.png",
            caption="../report/checksim_snr.rst",
            category="Injection recovery",
        ),
        table="results/{telescope}/plots/checksim/efficiency.ecsv",
        limits="results/{telescope}/plots/checksim/limits.ecsv",
    log:
        "logs/{telescope}/plots/checksim.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    script:
        "../../scripts/checksim_plots.py"

# Alignment + ZOGY subtraction and candidate detection (the older tool's `run`).


rule subtract:
    """Align the reference to the science frame, PSF-match and subtract (ZOGY or sfft, on `threads` threads): D, S_corr, variance."""
    input:
        unpack(subtract_inputs),
    output:
        "results/{telescope}/{mode}/subtract/{image}.fits",
    log:
        "logs/{telescope}/{mode}/subtract/{image}.log",
    benchmark:
        "benchmarks/{telescope}/{mode}/subtract/{image}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 2
    resources:
        mem_mb=subtract_mem_mb,
        runtime=20,
    params:
        telescope=telescope_block("subtract"),
    script:
        "../../scripts/subtract.py"


rule detect:
    """Detect and measure candidates on the score image of one difference image."""
    input:
        diff="results/{telescope}/{mode}/subtract/{image}.fits",
        psf=sci_psf_of,
    output:
        "results/{telescope}/{mode}/detect/{image}.ecsv",
    log:
        "logs/{telescope}/{mode}/detect/{image}.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        telescope=telescope_block("detect", "cutout"),
    script:
        "../../scripts/detect.py"

# Datacube, CNN training and inference (the older tool's cnn_convert, cnn_train, cnn_infer).


# The datacube reads the label folders training/{true,false}/ next to labels.ecsv (see the label rule
# for why they are not declared); the `relabelled` parameter reruns it when a person moves a file.


rule datacube:
    """Build the normalised datacube (.npz) from the labelled cutout folders true/ and false/."""
    input:
        labels="results/{telescope}/training/labels.ecsv",
    output:
        "results/{telescope}/training/datacube.npz",
    log:
        "logs/{telescope}/training/datacube.log",
    benchmark:
        "benchmarks/{telescope}/training/datacube.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        convert=config["convert"],
        seed=config["seed"],
        relabelled=relabel_digest,
    script:
        "../../scripts/datacube.py"


# Resume state (results/{telescope}/checkpoints/) is a param, not an output: Snakemake deletes a job's
# outputs before it runs and after it fails, and a killed training resumes from it.


rule train_model:
    """Train the CNN (grouped-by-frame split, augmentation, early stopping, calibration)."""
    input:
        "results/{telescope}/training/datacube.npz",
    output:
        model="results/{telescope}/model/model.pt",
        meta="results/{telescope}/model/model.json",
        onnx="results/{telescope}/model/model.onnx",
        history="results/{telescope}/model/history.ecsv",
        metrics="results/{telescope}/model/metrics.json",
        ood="results/{telescope}/model/model.ood",
        plot=report(
            "results/{telescope}/model/training.png",
            caption="../report/training.rst",
            category="Training",
            labels={"telescope": "{telescope}", "figure": "learning curves"},
        ),
    log:
        "logs/{telescope}/model/train.log",
    benchmark:
        "benchmarks/{telescope}/model/train.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 2
    resources:
        mem_mb=8000,
        runtime=120,
    params:
        train=config["train"],
        seed=config["seed"],
        checkpoint_dir="results/{telescope}/checkpoints",
    script:
        "../../scripts/train_model.py"


rule infer_image:
    """P(real) of every candidate of one observed image; the candidates kept at the threshold."""
    input:
        cutouts="results/{telescope}/{mode}/cutouts/{image}",
        model="results/{telescope}/model/model.pt",
        meta="results/{telescope}/model/model.json",  # read by rbflow.infer next to model.pt
        ood="results/{telescope}/model/model.ood",  # the OOD reference (npz), read next to model.pt
    output:
        table="results/{telescope}/{mode}/infer/{image}.ecsv",
        compat="results/{telescope}/{mode}/infer/{image}.dat",
        kept="results/{telescope}/{mode}/infer/{image}_kept.ecsv",
    log:
        "logs/{telescope}/{mode}/infer/{image}.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        threshold=config["infer"]["threshold"],
    script:
        "../../scripts/infer_image.py"


rule checkinfer_plots:
    """Threshold diagnostics of the model on its held-out test frames (ROC, DET, error rates, galleries, per truth kind)."""
    input:
        unpack(checkinfer_inputs),
        unpack(checkinfer_sources),
    output:
        summary="results/{telescope}/plots/checkinfer/summary.json",
        predictions="results/{telescope}/plots/checkinfer/test_predictions.ecsv",
        p_real=report(
            "results/{telescope}/plots/checkinfer/p_real_hist.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        roc=report(
            "results/{telescope}/plots/checkinfer/roc.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        det=report(
            "results/{telescope}/plots/checkinfer/det.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        rates=report(
            "results/{telescope}/plots/checkinfer/error_rates.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        metrics=report(
            "results/{telescope}/plots/checkinfer/metrics_vs_threshold.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        efficiency=report(
            "results/{telescope}/plots/checkinfer/efficiency_mag.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        reliability=report(
            "results/{telescope}/plots/checkinfer/reliability.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        confusion=report(
            "results/{telescope}/plots/checkinfer/confusion.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        worst_fp=report(
            "results/{telescope}/plots/checkinfer/worst_false_positives.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        worst_fn=report(
            "results/{telescope}/plots/checkinfer/worst_false_negatives.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        fwhm_ratio=report(
            "results/{telescope}/plots/checkinfer/fwhm_ratio.png",
            caption="../report/checkinfer.rst",
            category="Threshold choice",
        ),
        kinds=report(
            "results/{telescope}/plots/checkinfer/kinds.png",
            caption="../report/checkinfer_kinds.rst",
            category="Artefact kinds",
        ),
        kinds_gallery=report(
            "results/{telescope}/plots/checkinfer/kinds_gallery.png",
            caption="../report/checkinfer_kinds.rst",
            category="Artefact kinds",
        ),
        kinds_html=report(
            "results/{telescope}/plots/checkinfer/kinds.html",
            caption="../report/checkinfer_kinds.rst",
            category="Artefact kinds",
        ),
        kinds_table="results/{telescope}/plots/checkinfer/kinds.ecsv",
    log:
        "logs/{telescope}/plots/checkinfer.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 2
    resources:
        mem_mb=4000,
        runtime=20,
    params:
        threshold=config["infer"]["threshold"],
        thresholds=config["checkinfer"]["thresholds"],
        seed=config["seed"],
    script:
        "../../scripts/checkinfer_plots.py"


rule apply_summary:
    """Apply-path summary: candidates before/after the threshold per frame, known reals detected and kept."""
    input:
        unpack(apply_inputs),
    output:
        summary="results/{telescope}/plots/apply/summary.json",
        plot=report(
            "results/{telescope}/plots/apply/candidates.png",
            caption="../report/apply.rst",
            category="Apply path",
            labels={"telescope": "{telescope}", "figure": "candidates kept"},
        ),
    log:
        "logs/{telescope}/plots/apply.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        radius_arcsec=match_radius_arcsec,
        radius_px=match_radius_px,
    script:
        "../../scripts/apply_summary.py"

# Named targets, one per command of the older tool (see README), plus `all` and `apply`.


rule sim:
    """gmadet-sim: PSF models of every frame and injected point sources (all realizations)."""
    input:
        lambda wildcards: [
            path
            for p in (
                "results/{telescope}/sim/inject/{image}.fits",
                "results/{telescope}/sim/inject/{image}.ecsv",
            )
            for path in per_image(p, "sim")
        ],


rule run:
    """gmadet-run: subtraction and detection of every injected and observed image."""
    input:
        lambda wildcards: per_image("results/{telescope}/{mode}/detect/{image}.ecsv", "sim"),
        lambda wildcards: per_image("results/{telescope}/{mode}/detect/{image}.ecsv", "obs"),


rule cutouts:
    """gmadet-cutouts: stamps of every candidate, injected and observed images."""
    input:
        lambda wildcards: per_image("results/{telescope}/{mode}/cutouts/{image}", "sim"),
        lambda wildcards: per_image("results/{telescope}/{mode}/cutouts/{image}", "obs"),


rule checksim:
    """gmadet-checksim: crossmatch with the injected sources, labelled folders, recovery plots."""
    input:
        expand("results/{telescope}/training/labels.ecsv", telescope=TELESCOPES),
        expand("results/{telescope}/plots/checksim/summary.json", telescope=TELESCOPES),


rule convert:
    """gmadet-cnn_convert: the datacube of labelled stamps."""
    input:
        expand("results/{telescope}/training/datacube.npz", telescope=TELESCOPES),


rule train:
    """gmadet-cnn_train: the trained CNN with its diagnostics."""
    input:
        expand("results/{telescope}/model/model.pt", telescope=TELESCOPES),


rule infer:
    """gmadet-cnn_infer: P(real) for every candidate of every observed image."""
    input:
        lambda wildcards: per_image("results/{telescope}/{mode}/infer/{image}.ecsv", "obs"),


rule apply:
    """The apply path only: subtract, detect, cut out and classify the observed frames with the trained model."""
    input:
        rules.infer.input,
        expand("results/{telescope}/plots/apply/summary.json", telescope=TELESCOPES),


rule checkinfer:
    """gmadet-cnn_checkinfer: threshold diagnostics of the model on its held-out test frames."""
    input:
        expand("results/{telescope}/plots/checkinfer/summary.json", telescope=TELESCOPES),


rule validate:
    """Pre-flight check of every frame: results/{telescope}/bad_frames.ecsv lists the bad ones and why."""
    input:
        expand("results/{telescope}/bad_frames.ecsv", telescope=TELESCOPES),

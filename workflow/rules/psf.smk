# PSF model of every frame (science and reference): an ePSF per sub-image, varying across the frame.


rule psf:
    """Estimate the PSF of one frame (ePSF grid over sub-images) and draw it."""
    input:
        frame=frame_path,
    output:
        psf="results/{telescope}/psf/{frame}.fits",
        png=report(
            "results/{telescope}/psf/{frame}.png",
            caption="../report/psf.rst",
            category="PSF models",
            labels={"telescope": "{telescope}", "frame": "{frame}"},
        ),
    log:
        "logs/{telescope}/psf/{frame}.log",
    benchmark:
        "benchmarks/{telescope}/psf/{frame}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=15,
    params:
        telescope=telescope_block("psf"),
    script:
        "../../scripts/psf.py"

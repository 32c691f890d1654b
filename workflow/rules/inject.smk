# Injection of simulated point sources (the older tool's `sim`), one job per frame and realization.


rule inject:
    """Inject point sources of known magnitude with the frame's PSF model (one realization)."""
    input:
        frame=frame_path,
        psf="results/{telescope}/psf/{frame}.fits",
        reference=reference_of,
    output:
        fits="results/{telescope}/sim/inject/{frame}_sim{realization}.fits",
        table="results/{telescope}/sim/inject/{frame}_sim{realization}.ecsv",
        compat="results/{telescope}/sim/inject/{frame}_sim{realization}.list",
    log:
        "logs/{telescope}/inject/{frame}_sim{realization}.log",
    benchmark:
        "benchmarks/{telescope}/inject/{frame}_sim{realization}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        telescope=telescope_block("inject", "cutout"),
        seed=seed_of("inject"),
    script:
        "../../scripts/inject.py"

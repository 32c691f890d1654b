# Astrometric calibration of each delivered frame (telescopes with an `astrometry` block); the other
# rules then read resources/{telescope}/astrometry/{frame}.fits in place of the delivered file.


rule astrometry:
    """Match the frame's stars to a reference catalogue and fit a TAN + SIP WCS (blind solve first if needed)."""
    input:
        frame=astrometry_input,
    output:
        "resources/{telescope}/astrometry/{frame}.fits",
    log:
        "logs/{telescope}/astrometry/{frame}.log",
    benchmark:
        "benchmarks/{telescope}/astrometry/{frame}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    params:
        telescope=telescope_block(),
        settings=stage_block("astrometry"),
        skip_bad=ON_BAD_FRAME == "skip",
    script:
        "../../scripts/astrometry.py"

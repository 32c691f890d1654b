# The embedded synthetic telescope: frames and truth catalogues generated from the `sky` block.


rule sky_frame:
    """Generate one frame of the embedded synthetic sky, with its truth catalogue."""
    output:
        fits="resources/{telescope}/frames/{frame}.fits",
        truth="resources/{telescope}/truth/{frame}.ecsv",
    log:
        "logs/{telescope}/sky/{frame}.log",
    benchmark:
        "benchmarks/{telescope}/sky/{frame}.tsv"
    wildcard_constraints:
        telescope="|".join(SKY_TELESCOPES) or "^$",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=10,
    params:
        telescope=telescope_block("sky"),
        seed=config["seed"],
    script:
        "../../scripts/sky_frame.py"


rule sky_variables:
    """Catalogue of the real (not injected) variables and transients of the synthetic sky."""
    output:
        "resources/{telescope}/catalogues/variables.ecsv",
    log:
        "logs/{telescope}/sky/variables.log",
    wildcard_constraints:
        telescope="|".join(SKY_TELESCOPES) or "^$",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    params:
        telescope=telescope_block("sky"),
        seed=config["seed"],
    script:
        "../../scripts/sky_variables.py"

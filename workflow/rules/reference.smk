# Reference frame stacked from the frames of one epoch (real telescopes whose `frames.reference` is a list).


rule reference:
    """Align, background-match, scale and combine the reference epoch's frames into one reference frame."""
    input:
        frames=reference_inputs,
    output:
        "resources/{telescope}/reference/{frame}.fits",
    log:
        "logs/{telescope}/reference/{frame}.log",
    benchmark:
        "benchmarks/{telescope}/reference/{frame}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=15,
    params:
        telescope=telescope_block(),
        stack=stack_settings,
        skip_bad=ON_BAD_FRAME == "skip",
    script:
        "../../scripts/reference.py"

# Reference frames: stacked from the frames of one epoch (`frames.reference` a list), or made from a
# survey's images for each science frame (`frames.reference: {survey: ...}`).


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


rule survey_reference:
    """Fetch the survey images covering a science frame (cached), reproject and combine them onto its grid."""
    input:
        frame=survey_input,
    output:
        "resources/{telescope}/survey/{frame}.fits",
    log:
        "logs/{telescope}/survey/{frame}.log",
    benchmark:
        "benchmarks/{telescope}/survey/{frame}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=3000,
        runtime=30,
    params:
        telescope=telescope_block(),
        settings=lambda wildcards: TELESCOPES[wildcards.telescope]["frames"]["reference"],
    script:
        "../../scripts/survey_reference.py"

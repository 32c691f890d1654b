# Per-frame checks and the table of bad frames, for `on_bad_frame: skip` (and the `validate` target).
# With `skip`, the aggregate rules (label, checksim, checkinfer, apply summary) and the named targets
# list images through `images_of`, which leaves out the frames of the `bad_frames` checkpoint; with
# `stop` (default) nothing here is in the DAG and a bad frame fails its first job with a clear message.


rule validate_frame:
    """Check one frame before any work: image, facts, saturation, WCS, PSF stars, overlap with its reference."""
    input:
        unpack(validate_inputs),
    output:
        "results/{telescope}/validate/{frame}.json",
    log:
        "logs/{telescope}/validate/{frame}.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1500,
        runtime=5,
    params:
        telescope=telescope_block("psf"),
    script:
        "../../scripts/validate_frame.py"


checkpoint bad_frames:
    """The frames that failed a check (frame, stage, file, message); the aggregate rules skip them."""
    input:
        frame_statuses,
    output:
        "results/{telescope}/bad_frames.ecsv",
    log:
        "logs/{telescope}/validate/bad_frames.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=500,
        runtime=5,
    script:
        "../../scripts/bad_frames.py"

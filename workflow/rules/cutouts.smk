# Stamps of every candidate (the older tool's `cutouts`).


rule cutouts_image:
    """Write SCI/REF/DIFF/SCORR stamps (FITS) and a PNG preview of every candidate of one image."""
    input:
        diff="results/{telescope}/{mode}/subtract/{image}.fits",
        candidates="results/{telescope}/{mode}/detect/{image}.ecsv",
    output:
        directory("results/{telescope}/{mode}/cutouts/{image}"),
    log:
        "logs/{telescope}/{mode}/cutouts/{image}.log",
    benchmark:
        "benchmarks/{telescope}/{mode}/cutouts/{image}.tsv"
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    params:
        cutout=stage_block("cutout"),
    script:
        "../../scripts/cutouts_image.py"

# The scanning page (rbflow scan): labelling candidates by eye through the folder contract.


rule scan:
    """Print (and log) the command that opens the scanning page of each telescope's labelled candidates."""
    input:
        expand("results/{telescope}/training/labels.ecsv", telescope=TELESCOPES),
    log:
        "logs/scan.log",
    localrule: True
    conda:
        "../../envs/rbflow.yaml"
    params:
        text="\n".join(
            f"open the scanning page with:  rbflow scan results/{telescope} --port 8765  "
            "then browse http://127.0.0.1:8765/"
            for telescope in TELESCOPES
        ),
    shell:
        "printf '%s\\n' {params.text:q} | tee {log}"

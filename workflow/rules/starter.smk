# The starter model shipped with rbflow: `snakemake starter --configfile config/starter.yaml` trains
# the run's one telescope (config/telescopes/starter.yaml) and installs the model, with its provenance,
# in the package (src/rbflow/models/starter/ of this checkout, whatever the working directory). The
# input functions are in common.smk.


rule starter:
    """Train the starter model and install it, with its provenance, as the package's starter model."""
    input:
        unpack(starter_inputs),
    output:
        pt=os.path.join(STARTER_DIR, "model.pt"),
        json=os.path.join(STARTER_DIR, "model.json"),
        onnx=os.path.join(STARTER_DIR, "model.onnx"),
        ood=os.path.join(STARTER_DIR, "model.ood"),
    log:
        "logs/starter.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        command=STARTER_COMMAND,
        config=starter_config,
        seed=config["seed"],
        git_commit=starter_git_commit,
        benchmark=lambda wildcards: f"benchmarks/{starter_telescope()}/model/train.tsv",
    script:
        "../../scripts/install_starter.py"

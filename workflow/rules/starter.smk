# The starter model shipped with rbflow: `snakemake --configfile config/starter.yaml starter` trains
# the run's one telescope (config/telescopes/starter.yaml) and installs the model, with its provenance,
# in the package (src/rbflow/models/starter/ of this checkout, whatever the working directory).
import os
import shlex
import sys

STARTER_DIR = os.path.join(workflow.basedir, "src", "rbflow", "models", "starter")


def starter_telescope():
    """The one telescope of the run, whose model becomes the starter."""
    if len(TELESCOPES) != 1:
        raise WorkflowError(
            f"the starter target trains one telescope, the run has {sorted(TELESCOPES)}: "
            "use --configfile config/starter.yaml"
        )
    return next(iter(TELESCOPES))


def starter_inputs(wildcards):
    """The trained model of the starter telescope."""
    model = f"results/{starter_telescope()}/model"
    return {k: f"{model}/model.{k}" for k in ("pt", "json", "onnx")}


def starter_config(wildcards):
    """What the starter model was made from: its telescope file, the convert and train blocks, the seed."""
    telescope = starter_telescope()
    return {
        "telescopes": [telescope],
        "telescope": {k: v for k, v in TELESCOPES[telescope].items() if not k.startswith("_")},
        "convert": config["convert"],
        "train": config["train"],
        "seed": config["seed"],
    }


rule starter:
    """Train the starter model and install it, with its provenance, as the package's starter model."""
    input:
        unpack(starter_inputs),
    output:
        pt=os.path.join(STARTER_DIR, "model.pt"),
        json=os.path.join(STARTER_DIR, "model.json"),
        onnx=os.path.join(STARTER_DIR, "model.onnx"),
    log:
        "logs/starter.log",
    conda:
        "../../envs/rbflow.yaml"
    threads: 1
    resources:
        mem_mb=1000,
        runtime=5,
    params:
        command=shlex.join(["snakemake", *sys.argv[1:]]),
        config=starter_config,
        seed=config["seed"],
        benchmark=lambda wildcards: f"benchmarks/{starter_telescope()}/model/train.tsv",
        repo=workflow.basedir,
    script:
        "../../scripts/install_starter.py"

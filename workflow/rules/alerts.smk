# Scoring survey alert packets (config block `alerts`; rbflow.alerts). Nothing runs unless alerts.folder is set.
import hashlib

ALERTS = config["alerts"]
ALERTS_OUT = ALERTS["output"]


def alerts_model(wildcards):
    """The model applied to the alerts: alerts.model, or the one this run trains for the first telescope."""
    if ALERTS["model"] is not None:
        return ALERTS["model"]
    return f"results/{next(iter(TELESCOPES))}/model/model.pt"


def alerts_listing(wildcards):
    """Digest of the alert folder's listing (names, sizes, times): a packet added in a subfolder reruns the rule."""
    folder = Path(ALERTS["folder"])
    lines = sorted(
        f"{p.relative_to(folder)} {p.stat().st_size} {p.stat().st_mtime_ns}" for p in folder.rglob("*") if p.is_file()
    )
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def alerts_outputs():
    """Outputs of the alerts target: none when no folder is configured."""
    if ALERTS["folder"] is None:
        return []
    return [f"{ALERTS_OUT}/alerts.ecsv"] + ([f"{ALERTS_OUT}/kept"] if ALERTS["keep_packets"] else [])


if ALERTS["folder"] is not None:

    rule alerts_score:
        """P(real) of every alert packet of the configured folder; the kept packets on request."""
        input:
            folder=ALERTS["folder"],
            model=alerts_model,
        output:
            table=f"{ALERTS_OUT}/alerts.ecsv",
            kept=directory(f"{ALERTS_OUT}/kept") if ALERTS["keep_packets"] else [],
        log:
            "logs/alerts/score.log",
        benchmark:
            "benchmarks/alerts/score.tsv"
        conda:
            "../../envs/rbflow.yaml"
        threads: 2
        resources:
            mem_mb=4000,
            runtime=120,
        params:
            alerts=ALERTS,
            listing=alerts_listing,
        script:
            "../../scripts/alerts.py"


rule alerts:
    """Score the alert packets of alerts.folder (nothing when it is not set)."""
    input:
        alerts_outputs(),

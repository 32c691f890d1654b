# Scoring survey alert packets (config block `alerts`; rbflow.alerts). Nothing runs unless alerts.folder is set.
# Helpers (alerts_model, alerts_listing, alerts_outputs) are in common.smk.
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
            "../../scripts/alerts_score.py"


rule alerts:
    """Score the alert packets of alerts.folder (nothing when it is not set)."""
    input:
        alerts_outputs(),

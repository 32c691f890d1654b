"""How a model trained on a synthetic sky transfers to real alerts (prints; not a test).

Usage::

    python bench/transfer.py MODEL_DIR [MODEL_DIR ...] [--packets ../shared/data/ztf-alerts-dev]
        [--bogus-below 0.1] [--real-above 0.99] [--asteroid-within 5]

Scores the real ZTF alert packets under ``--packets`` with each model, zero-shot (no retraining),
through the same path as ``rbflow alerts score``: the 63 x 63 triplets are centre-cropped to the
model's stamp size and normalised as in training. Two sets are graded: positive differences only
(``isdiffpos`` t, as in issue 16's evaluation) and every alert with negative differences flipped
(``rbflow alerts score``'s default policy); the development packets hold few positive bogus. Labels are ZTF's own deep real/bogus score (weak labels:
``drb < --bogus-below`` bogus, ``drb > --real-above`` real, the rest left out). Known asteroids are
the alerts whose ``ssdistnr`` (distance to the nearest known solar-system object) is within
``--asteroid-within`` arcsec: real moving point sources, whatever their ``drb``.

Printed per model: ROC AUC against ZTF's labels, the fraction of ZTF bogus kept at P(real) > 0.5,
the fraction of ZTF bogus kept at the threshold that keeps 95 % of ZTF reals, and the fraction of
known asteroids kept at P(real) > 0.5. With only a few dozen alerts the fractions move by 1/n per
alert; the counts are printed with them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fastavro
import numpy as np

from rbflow.alerts import read_alerts
from rbflow.infer import score_triplets
from rbflow.metrics import roc_auc

DEV = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ztf-alerts-dev"


def asteroid_distance(packets: Path) -> dict[int, float]:
    """``ssdistnr`` (arcsec; NaN when ZTF gives none) of every candid in the Avro files under ``packets``."""
    out: dict[int, float] = {}
    for path in sorted(packets.glob("*.avro")):
        with open(path, "rb") as fh:
            for record in fastavro.reader(fh):
                cand = record["candidate"]
                dist = cand.get("ssdistnr")
                out[int(cand["candid"])] = float(dist) if dist is not None and dist >= 0 else float("nan")
    return out


def grade(p: np.ndarray, y: np.ndarray, asteroid: np.ndarray) -> dict[str, float]:
    """The issue's transfer measures of P(real) ``p`` against labels ``y`` (1 real, 0 bogus, -1 none)."""
    real, bogus = p[y == 1], p[y == 0]
    cut = float(np.quantile(real, 0.05)) if len(real) else float("nan")
    return {
        "n_real": len(real),
        "n_bogus": len(bogus),
        "n_asteroid": int(asteroid.sum()),
        "auc": roc_auc(y[y >= 0], p[y >= 0]) if len(real) and len(bogus) else float("nan"),
        "bogus_kept_05": float(np.mean(bogus > 0.5)) if len(bogus) else float("nan"),
        "threshold_95": cut,
        "bogus_kept_95": float(np.mean(bogus >= cut)) if len(bogus) else float("nan"),
        "asteroid_kept_05": float(np.mean(p[asteroid] > 0.5)) if asteroid.any() else float("nan"),
    }


def main() -> None:
    """Score the packets with each model and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="+", help="model folders (model.pt, model.json) or 'starter'")
    ap.add_argument("--packets", type=Path, default=DEV)
    ap.add_argument("--bogus-below", type=float, default=0.1)
    ap.add_argument("--real-above", type=float, default=0.99)
    ap.add_argument("--asteroid-within", type=float, default=5.0, help="arcsec")
    args = ap.parse_args()

    table, stamps, failures = read_alerts([args.packets], negative="flip")
    drb = np.asarray(table["drb"], dtype=float)
    labels = np.where(drb < args.bogus_below, 0, np.where(drb > args.real_above, 1, -1))
    ss = asteroid_distance(args.packets)
    on_asteroid = np.array([ss.get(int(c), np.nan) <= args.asteroid_within for c in table["candid"]])
    print(f"{len(table)} alerts read from {args.packets} ({len(failures)} skipped)")
    for name, sel in (("positive", np.asarray(table["isdiffpos"]) == "t"), ("all, flipped", np.ones(len(table), bool))):
        y, asteroid = labels[sel], on_asteroid[sel]
        print(
            f"\n{name}: {int(sel.sum())} alerts, {int((y == 1).sum())} real (drb > {args.real_above}), "
            f"{int((y == 0).sum())} bogus (drb < {args.bogus_below}), {int(asteroid.sum())} known asteroids "
            f'(ssdistnr <= {args.asteroid_within}")'
        )
        print(f"{'model':40s}  {'AUC':>6s}  {'bogus>0.5':>9s}  {'bogus@95%real':>13s}  {'asteroids>0.5':>13s}")
        for model in args.models:
            sci, ref, diff = (stamps[sel, c] for c in range(3))
            p = score_triplets(None if model == "starter" else Path(model) / "model.pt", sci, ref, diff)
            g = grade(p, y, asteroid)
            print(
                f"{model[-40:]:40s}  {g['auc']:6.3f}  {g['bogus_kept_05']:9.2f}  "
                f"{g['bogus_kept_95']:13.2f}  {g['asteroid_kept_05']:13.2f}"
            )


if __name__ == "__main__":
    main()

"""The scanning page: label candidates by eye, one key per decision, through the folder contract.

``rbflow scan RESULTS_DIR`` serves a page on 127.0.0.1 (Flask) that shows each candidate of
``RESULTS_DIR/training/{true,false,unsorted}/`` as its SCI, REF, DIFF and SCORR stamps (rendered to
PNG here, with a zscale, min-max or asinh stretch), its numbers, P(real), the MC-dropout spread,
the out-of-distribution score and an explanation map when a model is there, in an order that spends a
person's minutes well (:data:`QUEUES`).

A decision is a move of the candidate's ``{id}.fits`` and ``{id}.png`` between the label folders,
which :func:`rbflow.crossmatch.label_cutouts` keeps on later runs (a person's move wins unless the
candidate behind the name changed). Every decision is

1. appended to ``training/scan_journal.jsonl`` (``begin``, flushed and fsynced) before anything moves;
2. done by ``os.replace`` of the FITS file, then the PNG (each rename is atomic);
3. recorded in ``training/labels.ecsv`` (columns ``label_scan``, ``scanned_by``, ``scanned_at``,
   rewritten atomically from the journal), then closed in the journal (``done``);

all under :func:`rbflow.crossmatch.training_lock`, which ``label_cutouts`` takes too. A server killed
half-way leaves a ``begin`` without ``done``: the next start completes the decision when the FITS
file already moved, and rolls it back otherwise, so every decision is done or not done. The
journal is the record of who decided what and when; ``labels.ecsv``'s scan columns are rebuilt from
it (also after ``label_cutouts`` rewrote the table), for the candidates whose identity (``key``)
and folder still match the decision. ``label_folder`` is left as the labelling wrote it, so
:func:`rbflow.crossmatch.relabel_digest` sees the moves and the workflow rebuilds the datacube.

The page only reads and writes inside ``RESULTS_DIR``: candidate ids are plain names, looked up
among the regular files of the label folders (symbolic links are refused), the server binds
127.0.0.1 and answers only requests addressed to 127.0.0.1 or localhost, and a malformed request
gets a 4xx JSON message.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from rbflow.crossmatch import LABELS, training_lock
from rbflow.errors import InputError
from rbflow.io import made_by, read_table, write_table

__all__ = [
    "JOURNAL",
    "STRETCHES",
    "QUEUES",
    "RequestError",
    "Decision",
    "ScanStore",
    "render_stamp",
    "render_map",
    "load_scores",
    "rank",
    "create_app",
    "serve",
]

log = logging.getLogger(__name__)

#: Decision journal, inside the training folder (JSON lines, append-only).
JOURNAL = "scan_journal.jsonl"
#: Display stretches of the stamps.
STRETCHES = ("zscale", "minmax", "asinh")
#: Orders of the queue: name -> what the page says about it.
QUEUES = {
    "name": "by candidate id",
    "uncertain": "most uncertain first (MC-dropout spread, else P(real) nearest 0.5)",
    "mislabel": "likely label errors first (out-of-fold P(real) against the folder's label)",
    "ood": "out-of-distribution first (distance of its network features to the 10th-nearest training stamp)",
}
#: A candidate id: a plain file stem (no path separator, no leading dot).
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,199}$")
#: Header numbers shown on the page: (field, header key).
_NUMBERS = (("frame", "FRAME"), ("image", "IMAGE"), ("mag", "MAG"), ("mag_err", "MAGERR"), ("snr", "SNR"))
_ZOOM = 6


class RequestError(Exception):
    """A request the page refuses, with the HTTP status to answer (4xx) and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Decision:
    """One journalled decision: candidate ``id`` moved from folder ``src`` to ``dst``.

    Attributes
    ----------
    op : int
        Operation number (order of the journal).
    kind : str
        'label' (a person's decision) or 'undo' (of operation ``undoes``).
    id, key, src, dst, user, time : str
        Candidate, its identity in labels.ecsv, folders, who and when (UTC ISO 8601).
    undoes : int
        Operation an undo reverts (-1 for a label).
    """

    op: int
    kind: str
    id: str
    key: str
    src: str
    dst: str
    user: str
    time: str
    undoes: int = -1


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_id(cid: Any) -> str:
    """Return ``cid`` when it is a plain candidate name, else raise :class:`RequestError` (400)."""
    if not isinstance(cid, str) or not _ID.match(cid):
        raise RequestError(400, f"candidate id {str(cid)[:80]!r} is not a plain name (letters, digits, _.+-)")
    return cid


class ScanStore:
    """The label folders of one results folder, the decision journal and their recovery.

    Parameters
    ----------
    results_dir : path-like
        A results folder holding ``training/{true,false,unsorted}/`` (``results/{telescope}``).
    user : str
        Who makes the decisions (recorded in the journal and labels.ecsv).

    Raises
    ------
    InputError
        No training folder, or one that is a link or lies outside ``results_dir``.
    """

    def __init__(self, results_dir: str | os.PathLike, *, user: str):
        self.results = Path(results_dir).resolve()
        self.training = self.results / "training"
        if self.training.is_symlink() or not self.training.is_dir():
            raise InputError(
                f"'{self.training}' is not a training folder: give the results folder of a run "
                "(results/<telescope>, holding training/true, false, unsorted)"
            )
        for lab in LABELS:
            folder = self.training / lab
            if folder.is_symlink() or (folder.exists() and folder.resolve().parent != self.training):
                raise InputError(f"label folder '{folder}' is a link: the page only works inside '{self.results}'")
            folder.mkdir(exist_ok=True)
        self.user = user
        self.journal = self.training / JOURNAL
        self._mutex = threading.Lock()
        self._headers: dict[tuple[str, int, int], dict[str, Any]] = {}
        with self._mutex, training_lock(self.training):
            self._recover()

    # -- files ---------------------------------------------------------------------------------
    def _file(self, cid: str, folder: str, suffix: str) -> Path:
        return self.training / folder / f"{check_id(cid)}{suffix}"

    def locate(self, cid: str) -> str | None:
        """Label folder holding ``{cid}.fits`` as a regular file (links are refused), or None."""
        for lab in LABELS:
            path = self._file(cid, lab, ".fits")
            if path.is_symlink():
                raise RequestError(403, f"'{lab}/{cid}.fits' is a symbolic link: the page refuses links")
            if path.is_file():
                return lab
        return None

    def cutout(self, cid: str) -> Path:
        """Path of a candidate's FITS file; :class:`RequestError` 404 when it is not in a label folder."""
        where = self.locate(cid)
        if where is None:
            raise RequestError(404, f"no candidate {cid!r} in {', '.join(LABELS)}")
        return self._file(cid, where, ".fits")

    def _header(self, path: Path, st: os.stat_result) -> dict[str, Any]:
        from astropy.io import fits

        key = (path.stem, st.st_ino, st.st_mtime_ns)
        if key not in self._headers:
            try:
                header = fits.getheader(path)
            except Exception as exc:  # a corrupt cutout is listed, with the reason
                self._headers[key] = {"error": f"unreadable ({type(exc).__name__})"}
            else:
                row: dict[str, Any] = {name: header.get(card) for name, card in _NUMBERS}
                row["flags"] = int(header.get("FLAGS", 0) or 0)
                for name in ("mag", "mag_err", "snr"):
                    row[name] = float(row[name]) if isinstance(row[name], (int, float)) else None
                self._headers[key] = row
        return self._headers[key]

    def candidates(self) -> list[dict[str, Any]]:
        """Every candidate of the label folders, with its folder and header numbers (links skipped)."""
        rows = []
        for lab in LABELS:
            with os.scandir(self.training / lab) as it:
                for entry in it:
                    stem = entry.name[:-5]
                    if not entry.name.endswith(".fits") or not _ID.match(stem):
                        continue
                    if entry.is_symlink():
                        log.warning("'%s/%s' is a symbolic link: not shown", lab, entry.name)
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    rows.append({"id": stem, "label": lab, **self._header(Path(entry.path), st)})
        rows.sort(key=lambda r: r["id"])
        return rows

    # -- journal -------------------------------------------------------------------------------
    def _read_journal(self) -> tuple[list[Decision], dict[int, str]]:
        """Decisions begun, in order, and the closing state of each ('done' or 'rolled_back')."""
        begun: list[Decision] = []
        closed: dict[int, str] = {}
        if not self.journal.exists():
            return begun, closed
        for n, line in enumerate(self.journal.read_text(encoding="utf-8").splitlines()):
            try:
                rec = json.loads(line)
                if rec["state"] == "begin":
                    begun.append(Decision(**{k: rec[k] for k in Decision.__dataclass_fields__}))
                else:
                    closed[int(rec["op"])] = str(rec["state"])
            except (ValueError, KeyError, TypeError):
                log.warning("journal '%s' line %d is not a record (torn write?): ignored", self.journal, n + 1)
        return begun, closed

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.journal, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def _repair_tail(self) -> None:
        """Drop a torn last line (a crash during an append), so later records start on a new line."""
        if not self.journal.exists():
            return
        data = self.journal.read_bytes()
        if data and not data.endswith(b"\n"):
            from rbflow.io import atomic_path

            log.warning("journal '%s' ends in a torn record: dropping it", self.journal)
            with atomic_path(self.journal) as tmp:
                tmp.write_bytes(data[: data.rfind(b"\n") + 1])

    def _recover(self) -> None:
        """Complete the decisions whose FITS file moved, roll back the others (under the lock)."""
        self._repair_tail()
        begun, closed = self._read_journal()
        for d in begun:
            if d.op in closed:
                continue
            fits_at = next((lab for lab in LABELS if self._file(d.id, lab, ".fits").is_file()), None)
            if fits_at == d.dst:
                self._move_png(d.id, d.src, d.dst)
                self._append({"op": d.op, "state": "done", "recovered": True})
                log.warning("completed decision %d (%s -> %s) interrupted by a crash", d.op, d.id, d.dst)
            else:
                if fits_at == d.src:
                    self._move_png(d.id, d.dst, d.src)
                self._append({"op": d.op, "state": "rolled_back"})
                log.warning("rolled back decision %d (%s -> %s) interrupted by a crash", d.op, d.id, d.dst)
        self._write_labels()

    def _move_png(self, cid: str, src: str, dst: str) -> None:
        png, target = self._file(cid, src, ".png"), self._file(cid, dst, ".png")
        if png.is_file() and not png.is_symlink() and not target.exists():
            os.replace(png, target)

    def history(self) -> list[Decision]:
        """Label decisions that are done and not undone, oldest first (the undo stack)."""
        begun, closed = self._read_journal()
        stack: list[Decision] = []
        for d in begun:
            if closed.get(d.op) != "done":
                continue
            if d.kind == "undo":
                stack = [s for s in stack if s.op != d.undoes]
            else:
                stack.append(d)
        return stack

    def _keys(self) -> dict[str, str]:
        path = self.training / "labels.ecsv"
        if not path.exists():
            return {}
        table = read_table(path)
        if "key" not in table.colnames:
            return {}
        return dict(zip(np.asarray(table["id"]).astype(str), np.asarray(table["key"]).astype(str)))

    def _write_labels(self) -> None:
        """Rebuild the scan columns of labels.ecsv from the journal (atomic; under the lock)."""
        path = self.training / "labels.ecsv"
        if not path.exists():
            return
        table = read_table(path)
        latest = {d.id: d for d in self.history()}
        ids = np.asarray(table["id"]).astype(str)
        keys = np.asarray(table["key"]).astype(str) if "key" in table.colnames else np.full(len(ids), "")
        cols: dict[str, list[str]] = {"label_scan": [], "scanned_by": [], "scanned_at": []}
        for cid, key in zip(ids, keys):
            d = latest.get(cid)
            valid = d is not None and d.key == key and self._file(cid, d.dst, ".fits").is_file()
            cols["label_scan"].append(d.dst if valid else "")
            cols["scanned_by"].append(d.user if valid else "")
            cols["scanned_at"].append(d.time if valid else "")
        for name, values in cols.items():
            table[name] = np.asarray(values, dtype=str) if values else np.array([], dtype="U1")
        table.meta["scan"] = (
            f"label_scan, scanned_by, scanned_at: a person's decision on the scanning page ({made_by('rbflow.scan')}); "
            f"empty when none; the journal is {JOURNAL}"
        )
        write_table(table, path)

    # -- decisions -----------------------------------------------------------------------------
    def _do(self, d: Decision) -> None:
        self._append({"state": "begin", **d.__dict__})
        if d.src != d.dst:
            target = self._file(d.id, d.dst, ".fits")
            if target.exists() or target.is_symlink():
                self._append({"op": d.op, "state": "rolled_back"})
                raise RequestError(409, f"'{d.dst}/{d.id}.fits' already exists: remove the duplicate by hand")
            os.replace(self._file(d.id, d.src, ".fits"), target)
            self._move_png(d.id, d.src, d.dst)
        self._write_labels()
        self._append({"op": d.op, "state": "done"})

    def _next_op(self) -> int:
        begun, _ = self._read_journal()
        return max((d.op for d in begun), default=0) + 1

    def decide(self, cid: str, label: str) -> Decision:
        """Move a candidate to ``label`` ('true' or 'false') and record who and when.

        Parameters
        ----------
        cid : str
            Candidate id (file stem).
        label : {'true', 'false'}
            The person's decision.

        Returns
        -------
        Decision
            The journalled decision (``src == dst`` when the file already was there: a confirmation).

        Raises
        ------
        RequestError
            Bad id or label (400), unknown candidate (404), a link (403), a duplicate file (409).
        """
        check_id(cid)
        if label not in ("true", "false"):
            raise RequestError(400, f"label {str(label)[:20]!r} must be 'true' or 'false'")
        with self._mutex, training_lock(self.training):
            src = self.locate(cid)
            if src is None:
                raise RequestError(404, f"no candidate {cid!r} in {', '.join(LABELS)}")
            d = Decision(self._next_op(), "label", cid, self._keys().get(cid, ""), src, label, self.user, _now())
            self._do(d)
        log.info("%s: %s -> %s (%s)", cid, src, label, self.user)
        return d

    def undo(self) -> Decision:
        """Revert the last decision that is done and not undone.

        Returns
        -------
        Decision
            The undo (``dst`` is the folder the candidate is back in).

        Raises
        ------
        RequestError
            Nothing to undo, or the file has moved since (409).
        """
        with self._mutex, training_lock(self.training):
            stack = self.history()
            if not stack:
                raise RequestError(409, "nothing to undo")
            last = stack[-1]
            if self.locate(last.id) != last.dst:
                raise RequestError(409, f"candidate {last.id} is no longer in '{last.dst}/': it was moved since")
            d = Decision(self._next_op(), "undo", last.id, last.key, last.dst, last.src, self.user, _now(), last.op)
            self._do(d)
        log.info("undo %d: %s back to %s", last.op, last.id, last.src)
        return d


# -- rendering -----------------------------------------------------------------------------------
def _png(rgb: np.ndarray, zoom: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(rgb, "RGB")
    img = img.resize((rgb.shape[1] * zoom, rgb.shape[0] * zoom), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def render_stamp(stamp: np.ndarray, *, stretch: str, zoom: int = _ZOOM) -> bytes:
    """Render one stamp to a grey PNG (north up: row 0 at the bottom); NaN pixels are dark purple.

    Parameters
    ----------
    stamp : numpy.ndarray
        2-D pixels (NaN = outside the frame).
    stretch : {'zscale', 'minmax', 'asinh'}
        Linear between the zscale limits, linear between min and max, or asinh (a = 0.1) between
        min and max.
    zoom : int, optional
        Screen pixels per stamp pixel.

    Returns
    -------
    bytes
        PNG file content.

    Raises
    ------
    RequestError
        Unknown stretch (400).
    """
    from astropy.visualization import AsinhStretch, ZScaleInterval

    if stretch not in STRETCHES:
        raise RequestError(400, f"stretch {str(stretch)[:20]!r} must be one of {', '.join(STRETCHES)}")
    data = np.asarray(stamp, dtype=np.float64)[::-1]
    good = np.isfinite(data)
    scaled = np.zeros_like(data)
    if good.any():
        values = data[good]
        lo, hi = ZScaleInterval().get_limits(values) if stretch == "zscale" else (values.min(), values.max())
        scaled = np.clip((np.where(good, data, lo) - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
        if stretch == "asinh":
            scaled = AsinhStretch(a=0.1)(scaled)
    grey = (scaled * 255).round().astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[~good] = (60, 0, 60)
    return _png(rgb, zoom)


def render_map(heat: np.ndarray, *, zoom: int = _ZOOM) -> bytes:
    """Render an explanation map in [0, 1] to a PNG (matplotlib's 'inferno' colours, north up)."""
    from matplotlib import colormaps

    rgb = (colormaps["inferno"](np.clip(np.asarray(heat)[::-1], 0, 1))[..., :3] * 255).round().astype(np.uint8)
    return _png(rgb, zoom)


# -- scores and queues ---------------------------------------------------------------------------
_SCORE_COLUMNS = {
    "label1": "p_real",
    "p_real_std": "p_real_std",
    "ood_score": "ood_score",
    "ood_quantile": "ood_quantile",
}


def load_scores(results_dir: str | os.PathLike) -> dict[str, dict[str, float]]:
    """Per-candidate scores found under a results folder.

    Read from ``*/infer/*.ecsv`` (P(real) ``label1``, ``p_real_std``, ``ood_score``,
    ``ood_quantile``) and ``labelrepair/label_issues.ecsv`` of :mod:`rbflow.labelrepair`
    (``p_oof``, ``self_confidence``, ``issue``).

    Parameters
    ----------
    results_dir : path-like
        ``results/{telescope}``.

    Returns
    -------
    dict
        id -> {score name: value}; NaN values are left out.
    """
    results_dir = Path(results_dir)
    scores: dict[str, dict[str, float]] = {}

    def merge(table: Any, columns: dict[str, str]) -> None:
        have = {src: dst for src, dst in columns.items() if src in table.colnames}
        if "id" not in table.colnames or not have:
            return
        ids = np.asarray(table["id"]).astype(str)
        for src, dst in have.items():
            values = np.ma.filled(np.ma.asarray(table[src], dtype=float), np.nan)
            for cid, v in zip(ids, values):
                if np.isfinite(v):
                    scores.setdefault(cid, {})[dst] = float(v)

    for path in sorted(results_dir.glob("*/infer/*.ecsv")):
        if not path.name.endswith("_kept.ecsv") and not path.is_symlink():
            merge(read_table(path), _SCORE_COLUMNS)
    issues = results_dir / "labelrepair" / "label_issues.ecsv"
    if issues.is_file() and not issues.is_symlink():
        merge(read_table(issues), {"p_oof": "p_oof", "self_confidence": "self_confidence", "issue": "issue"})
    return scores


def _score_key(queue: str, row: dict[str, Any]) -> tuple[float, str] | None:
    """Sort key (ascending) and the page's reason, or None when the candidate lacks the score."""
    p, std = row.get("p_real"), row.get("p_real_std")
    if queue == "uncertain":
        if std is not None and p is not None:
            return -std, f"MC-dropout spread ± {std:.3f} around P(real) {p:.2f} (larger spread: less sure)"
        if p is not None:
            return abs(p - 0.5), f"P(real) {p:.2f} is near 0.5"
        return None
    if queue == "mislabel":
        lab = row["label"]
        if lab not in ("true", "false"):
            return None
        if row.get("p_oof") is not None:
            conf = row["p_oof"] if lab == "true" else 1.0 - row["p_oof"]
            flag = " (a confident-learning label issue)" if row.get("issue") else ""
            return conf - (1.0 if row.get("issue") else 0.0), (
                f"out-of-fold P(real) {row['p_oof']:.2f} against label '{lab}'{flag}"
            )
        if p is not None:
            conf = p if lab == "true" else 1.0 - p
            return conf + 1.0, f"P(real) {p:.2f} against label '{lab}' (in-sample; run rbflow label-repair)"
        return None
    if queue == "ood":
        q, s = row.get("ood_quantile"), row.get("ood_score")
        if s is None:
            return None
        return -s, f"OOD score {s:.1f}: farther than {100 * (q or 0):.0f} % of the training stamps"
    return 0.0, ""


def rank(rows: list[dict[str, Any]], queue: str) -> list[dict[str, Any]]:
    """Order candidates for a queue and attach the reason each is where it is (key ``why``).

    Parameters
    ----------
    rows : list of dict
        Candidates with their scores (see :meth:`ScanStore.candidates`, :func:`load_scores`).
    queue : str
        A key of :data:`QUEUES`.

    Returns
    -------
    list of dict
        The candidates with a score first, in the queue's order, then the others by id (``why`` says
        the score is missing).

    Raises
    ------
    RequestError
        Unknown queue (400).
    """
    if queue not in QUEUES:
        raise RequestError(400, f"queue {str(queue)[:20]!r} must be one of {', '.join(QUEUES)}")
    scored, unscored = [], []
    for row in rows:
        key = _score_key(queue, row)
        if key is None:
            unscored.append({**row, "why": "no score for this queue"})
        else:
            scored.append((key[0], row["id"], {**row, "why": key[1]}))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [r for _, _, r in scored] + unscored


# -- web application -----------------------------------------------------------------------------
def _number(args: Any, name: str, kind: type) -> Any:
    text = args.get(name, "")
    if text == "":
        return None
    try:
        value = kind(text)
    except ValueError:
        raise RequestError(400, f"parameter {name}={text[:20]!r} is not a {kind.__name__}") from None
    if isinstance(value, float) and not np.isfinite(value):
        raise RequestError(400, f"parameter {name} must be finite")
    return value


def _filtered(rows: list[dict[str, Any]], args: Any) -> list[dict[str, Any]]:
    frame, label = args.get("frame", ""), args.get("label", "")
    if label and label not in LABELS:
        raise RequestError(400, f"label filter {label[:20]!r} must be one of {', '.join(LABELS)}")
    pmin, pmax, flag = _number(args, "pmin", float), _number(args, "pmax", float), _number(args, "flag", int)
    out = []
    for r in rows:
        p = r.get("p_real")
        if (frame and r.get("frame") != frame) or (label and r["label"] != label):
            continue
        if (pmin is not None or pmax is not None) and p is None:
            continue
        if (pmin is not None and p < pmin) or (pmax is not None and p > pmax):
            continue
        if flag is not None and (r["flags"] != 0 if flag == 0 else not r["flags"] & flag):
            continue
        out.append(r)
    return out


def _model_scores(store: ScanStore, model_path: Path, *, seed: int) -> dict[str, dict[str, float]]:
    """P(real), MC-dropout spread and OOD score of the training candidates with the run's model."""
    from rbflow.datacube import crop_stamps, normalise, read_stamp
    from rbflow.infer import check_compatible, load_model, predict
    from rbflow.uncertainty import mc_dropout, model_reference, network_features, reference_ood

    model, meta = load_model(model_path)
    channels, ids, stamps = list(meta["channels"]), [], []
    for row in store.candidates():
        try:
            stamp, _ = read_stamp(store.cutout(row["id"]), channels, require_finite=False)
            check_compatible(meta, channels, stamp.shape[-1])
        except InputError as exc:
            log.warning("no score for %s: %s", row["id"], exc)
            continue
        ids.append(row["id"])
        stamps.append(crop_stamps(stamp, int(meta["stamp_size"])))
    if not stamps:
        return {}
    X = normalise(np.stack(stamps))
    out = {"p_real": predict(model, meta, X)}
    out["p_real_mc"], out["p_real_std"] = mc_dropout(model, meta, X, passes=20, seed=seed)
    # the reference train stored beside the model; for older models, the run's training cube
    reference = model_reference(model_path, meta)
    cube = store.training / "datacube.npz"
    if reference is None and cube.is_file():
        reference = reference_ood(model, cube, seed=seed)
    if reference is not None:
        out["ood_score"] = reference.score(network_features(model, X))
        out["ood_quantile"] = reference.quantile(out["ood_score"])
    return {cid: {k: float(v[i]) for k, v in out.items()} for i, cid in enumerate(ids)}


def create_app(
    results_dir: str | os.PathLike,
    *,
    user: str,
    model_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> Any:
    """Build the Flask application of the scanning page.

    Parameters
    ----------
    results_dir : path-like
        ``results/{telescope}`` holding ``training/``.
    user : str
        Name recorded with each decision.
    model_path : path-like, optional
        ``model.pt`` for P(real), uncertainty, OOD score (with ``training/datacube.npz``) and the
        explanation maps of the training candidates; default ``RESULTS_DIR/model/model.pt`` when it
        exists. Scores in the infer tables and ``labelrepair/label_issues.ecsv`` are used too.
    seed : int, optional
        Seed of the MC-dropout masks and the OOD reference subsample.

    Returns
    -------
    flask.Flask

    Raises
    ------
    InputError
        No training folder, or unusable model files.
    """
    from flask import Flask, Response, jsonify, request
    from werkzeug.exceptions import HTTPException

    store = ScanStore(results_dir, user=user)
    default_model = store.results / "model" / "model.pt"
    model = Path(model_path) if model_path is not None else (default_model if default_model.is_file() else None)
    scores = load_scores(store.results)
    if model is not None:
        for cid, values in _model_scores(store, model, seed=seed).items():
            scores[cid] = {**values, **scores.get(cid, {})}
    explainer: dict[str, Any] = {}
    app = Flask(__name__)

    @app.errorhandler(RequestError)
    def refused(exc: RequestError) -> Any:
        return jsonify(error=str(exc)), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Any:
        return jsonify(error=f"{exc.name}: {exc.description}"), exc.code

    @app.errorhandler(Exception)
    def failed(exc: Exception) -> Any:
        log.exception("scan page: request failed")
        return jsonify(error=f"internal error ({type(exc).__name__}); see the server log"), 500

    @app.before_request
    def local_only() -> None:
        if request.host.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
            raise RequestError(403, f"host {request.host[:60]!r} refused: the page answers 127.0.0.1 only")

    @app.get("/")
    def page() -> Any:
        from importlib.resources import files

        return Response(files("rbflow").joinpath("scan_page.html").read_text(encoding="utf-8"), mimetype="text/html")

    @app.get("/api/candidates")
    def candidates() -> Any:
        rows = [{**r, **scores.get(r["id"], {})} for r in store.candidates()]
        frames = sorted({str(r.get("frame")) for r in rows if r.get("frame")})
        listed = rank(_filtered(rows, request.args), request.args.get("queue", "name"))
        history = store.history()
        return jsonify(
            candidates=listed,
            frames=frames,
            queues=list(QUEUES.items()),  # a list: JSON objects lose their order
            user=store.user,
            explain=model is not None,
            history=[d.__dict__ for d in history[-10:]],
            undo=len(history),
        )

    @app.get("/api/stamp")
    def stamp() -> Any:
        from rbflow.cutouts import read_cutout

        channel = request.args.get("channel", "DIFF")
        _, stamps = read_cutout(store.cutout(check_id(request.args.get("id"))))
        if channel not in stamps:
            raise RequestError(404, f"channel {channel[:20]!r} is not in the cutout (has {', '.join(stamps)})")
        return Response(
            render_stamp(stamps[channel], stretch=request.args.get("stretch", "zscale")), mimetype="image/png"
        )

    @app.get("/api/explain")
    def explain() -> Any:
        from rbflow.explain import METHODS, explain_cutouts

        if model is None:
            raise RequestError(404, "no model: explanation maps need RESULTS_DIR/model/model.pt")
        method = request.args.get("method", "gradcam")
        if method not in METHODS:
            raise RequestError(400, f"method {method[:20]!r} must be one of {', '.join(METHODS)}")
        path = store.cutout(check_id(request.args.get("id")))
        key = f"{path.stem}:{method}"
        if key not in explainer:
            explainer[key] = explain_cutouts(model, [path], method=method)[0]
        return Response(render_map(explainer[key]), mimetype="image/png")

    def body() -> dict[str, Any]:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise RequestError(400, "the request body must be a JSON object (Content-Type: application/json)")
        return data

    @app.post("/api/decide")
    def decide() -> Any:
        data = body()
        d = store.decide(check_id(data.get("id")), data.get("label"))
        return jsonify(d.__dict__)

    @app.post("/api/undo")
    def undo() -> Any:
        body()
        return jsonify(store.undo().__dict__)

    return app


def serve(
    results_dir: str | os.PathLike,
    *,
    port: int = 8765,
    user: str,
    model_path: str | os.PathLike | None = None,
    seed: int = 0,
) -> None:
    """Serve the scanning page on ``http://127.0.0.1:port/`` until interrupted.

    SIGINT (Ctrl-C) and SIGTERM stop it cleanly, also when it was started with SIGINT ignored (as
    a shell's background job or a process started by one is): the server closes its socket, and
    every decision already written stays written.

    Parameters
    ----------
    results_dir : path-like
        ``results/{telescope}``.
    port : int, optional
        TCP port (0: any free port; the log says which).
    user : str
        Name recorded with each decision.
    model_path : path-like, optional
        See :func:`create_app`.
    seed : int, optional
        See :func:`create_app`.
    """
    import signal
    import threading

    from werkzeug.serving import make_server

    servers: list[Any] = []  # the server once made
    stopping = threading.Event()

    def stop(signum: int, frame: Any) -> None:
        # no exception raised into whatever the main thread runs (a request being parsed): the
        # server is asked to shut down from a thread, and serve_forever returns at its next poll
        log.info("%s received: stopping the scanning page", signal.Signals(signum).name)
        stopping.set()
        if servers:
            threading.Thread(target=servers[0].shutdown, daemon=True).start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stop)
    app = create_app(results_dir, user=user, model_path=model_path, seed=seed)
    server = make_server("127.0.0.1", port, app, threaded=True)
    servers.append(server)
    log.info("scanning page on http://127.0.0.1:%d/ (Ctrl-C to stop)", server.server_port)
    try:
        if not stopping.is_set():  # a signal while the server was being made: do not start serving
            server.serve_forever()
    finally:
        server.server_close()
    log.info("scanning page stopped")

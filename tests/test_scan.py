"""The scanning page (rbflow.scan): decisions through the folder contract, crash safety, security, a real browser.

The results folder is synthetic (tests/helpers.py, results_folder): real cutout files written by rbflow.cutouts and
placed by rbflow.crossmatch.label_cutouts, so the page sees exactly what a run leaves.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SCAN_IMAGE as IMAGE
from helpers import chromium_binary, results_folder

from rbflow.crossmatch import label_cutouts, relabel_digest
from rbflow.datacube import build_datacube, load_datacube
from rbflow.errors import InputError
from rbflow.io import read_table
from rbflow.scan import JOURNAL, ScanStore, create_app, rank

REPO = Path(__file__).resolve().parents[1]
IDS = [f"{IMAGE}_{i}" for i in range(8)]


@pytest.fixture
def results(tmp_path) -> Path:
    return results_folder(tmp_path)[0]


@pytest.fixture
def client(results):
    return create_app(results, user="ada").test_client()


def _where(results: Path, cid: str) -> dict[str, str | None]:
    """Folder of the candidate's FITS and PNG files (None when absent)."""
    out = {}
    for suffix in ("fits", "png"):
        found = [
            lab for lab in ("true", "false", "unsorted") if (results / "training" / lab / f"{cid}.{suffix}").exists()
        ]
        assert len(found) <= 1, (cid, suffix, found)
        out[suffix] = found[0] if found else None
    return out


def _scan_columns(results: Path) -> dict[str, tuple[str, str, str]]:
    table = read_table(results / "training" / "labels.ecsv")
    if "label_scan" not in table.colnames:
        return {}
    # ECSV reads empty strings back as masked values
    cols = [np.ma.filled(np.ma.asarray(table[c]).astype(str), "") for c in ("label_scan", "scanned_by", "scanned_at")]
    return {str(cid): (a, b, c) for cid, a, b, c in zip(table["id"], *cols)}


def test_decisions_move_files_and_record_who_and_when(results, client):
    assert client.post("/api/decide", json={"id": IDS[0], "label": "false"}).status_code == 200
    assert client.post("/api/decide", json={"id": IDS[1], "label": "true"}).status_code == 200
    assert client.post("/api/decide", json={"id": IDS[7], "label": "true"}).status_code == 200  # from unsorted
    undone = client.post("/api/undo", json={}).get_json()
    assert (undone["id"], undone["dst"]) == (IDS[7], "unsorted")
    assert _where(results, IDS[0]) == {"fits": "false", "png": "false"}
    assert _where(results, IDS[1]) == {"fits": "true", "png": "true"}
    assert _where(results, IDS[7]) == {"fits": "unsorted", "png": "unsorted"}
    cols = _scan_columns(results)
    assert cols[IDS[0]][:2] == ("false", "ada") and cols[IDS[1]][:2] == ("true", "ada")
    assert cols[IDS[0]][2].endswith("+00:00")  # UTC ISO 8601
    assert cols[IDS[7]] == ("", "", "") and cols[IDS[2]] == ("", "", "")
    # label_folder stays what the labelling wrote, so the workflow sees the moves and rebuilds the datacube
    assert relabel_digest(results / "training").startswith("moved:")
    listed = client.get("/api/candidates?label=false").get_json()
    assert {c["id"] for c in listed["candidates"]} == {IDS[0], IDS[3], IDS[5]}
    assert listed["undo"] == 2 and listed["history"][-1]["id"] == IDS[1]


def test_a_rerun_of_the_labelling_keeps_the_decisions_and_the_page_restores_who_and_when(results, client, tmp_path):
    client.post("/api/decide", json={"id": IDS[0], "label": "false"})
    # label_cutouts rewrites labels.ecsv without the scan columns; the person's move wins
    label_cutouts([tmp_path / "labels.ecsv"], [results / "sim" / "cutouts" / IMAGE], results / "training")
    assert _where(results, IDS[0])["fits"] == "false"
    assert "label_scan" not in read_table(results / "training" / "labels.ecsv").colnames
    ScanStore(results, user="bob")
    assert _scan_columns(results)[IDS[0]][:2] == ("false", "ada")


def test_a_datacube_built_afterwards_has_the_new_labels(results, client, tmp_path):
    client.post("/api/decide", json={"id": IDS[0], "label": "false"})
    client.post("/api/decide", json={"id": IDS[1], "label": "true"})
    build_datacube(
        results / "training", tmp_path / "cube.npz", channels=["SCI", "REF", "DIFF"], crop=None, frac_true=None, seed=0
    )
    cube = load_datacube(tmp_path / "cube.npz")
    y = dict(zip(cube["ids"].astype(str), cube["y"]))
    assert y[IDS[0]] == 0 and y[IDS[1]] == 1 and y[IDS[2]] == 1 and y[IDS[3]] == 0
    assert IDS[7] not in y  # unsorted


def test_filters_and_queues(results, client):
    assert [c["id"] for c in client.get("/api/candidates?flag=4").get_json()["candidates"]] == [IDS[3]]
    assert len(client.get("/api/candidates?flag=0").get_json()["candidates"]) == 7
    assert client.get(f"/api/candidates?frame={IMAGE[:10]}").get_json()["frames"] == [IMAGE[:10]]
    assert client.get("/api/candidates?frame=nope").get_json()["candidates"] == []
    # no scores in this folder: a score range filters everything out, a queue lists all with the reason
    assert client.get("/api/candidates?pmin=0.5").get_json()["candidates"] == []
    queued = client.get("/api/candidates?queue=uncertain").get_json()["candidates"]
    assert len(queued) == 8 and all(c["why"] == "no score for this queue" for c in queued)
    rows = [
        {"id": "a", "label": "true", "p_real": 0.9, "p_real_std": 0.01, "p_oof": 0.1, "issue": 1.0, "ood_score": 2.0},
        {
            "id": "b",
            "label": "false",
            "p_real": 0.5,
            "p_real_std": 0.3,
            "p_oof": 0.2,
            "ood_score": 9.0,
            "ood_quantile": 0.999,
        },
        {"id": "c", "label": "true", "p_real": 0.6, "p_real_std": 0.1, "p_oof": 0.7, "ood_score": 1.0},
    ]
    assert [r["id"] for r in rank(rows, "uncertain")] == ["b", "c", "a"]
    assert [r["id"] for r in rank(rows, "mislabel")] == ["a", "c", "b"]
    assert "confident-learning label issue" in rank(rows, "mislabel")[0]["why"]
    assert [r["id"] for r in rank(rows, "ood")] == ["b", "a", "c"]
    assert "farther than 100 %" in rank(rows, "ood")[0]["why"]


def test_stamps_render_with_each_stretch(client):
    from PIL import Image

    for stretch in ("zscale", "minmax", "asinh"):
        r = client.get(f"/api/stamp?id={IDS[0]}&channel=DIFF&stretch={stretch}")
        assert r.status_code == 200 and r.mimetype == "image/png"
        img = np.asarray(Image.open(__import__("io").BytesIO(r.data)))
        assert img.shape[:2] == (31 * 6, 31 * 6) and img.std() > 5  # the blob and the noise show


# -- security ------------------------------------------------------------------------------------
def _refused(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.data[:300])
    assert r.is_json and "Traceback" not in r.get_data(as_text=True)
    return r.get_json()["error"]


@pytest.mark.parametrize("bad", ["../labels", "../../etc/passwd", "..", ".lock", "a/b", "x%00y"])
def test_ids_with_parent_folders_are_refused(client, bad):
    assert "not a plain name" in _refused(client.get("/api/stamp", query_string={"id": bad}), 400)
    assert "not a plain name" in _refused(client.post("/api/decide", json={"id": bad, "label": "true"}), 400)


@pytest.mark.parametrize("bad", ["/etc/passwd", "/tmp", "\\\\server\\share"])
def test_absolute_paths_are_refused(client, bad):
    _refused(client.get("/api/stamp", query_string={"id": bad}), 400)
    _refused(client.post("/api/decide", json={"id": bad, "label": "false"}), 400)


def test_paths_in_the_url_are_not_routes(client):
    _refused(client.get("/api/stamp/..%2F..%2Fetc%2Fpasswd"), 404)
    _refused(client.get("/../../etc/passwd"), 404)


def test_symlinks_planted_in_the_folders_are_refused(results, tmp_path):
    secret = tmp_path / "secret.fits"
    secret.write_bytes((results / "training" / "true" / f"{IDS[0]}.fits").read_bytes())
    (results / "training" / "true" / "planted.fits").symlink_to(secret)
    (results / "training" / "false" / "planted2.fits").symlink_to(results / "training" / "true" / f"{IDS[2]}.fits")
    client = create_app(results, user="ada").test_client()
    listed = {c["id"] for c in client.get("/api/candidates").get_json()["candidates"]}
    assert listed == set(IDS)
    assert "symbolic link" in _refused(client.get("/api/stamp?id=planted&channel=SCI"), 403)
    assert "symbolic link" in _refused(client.post("/api/decide", json={"id": "planted", "label": "false"}), 403)
    assert "symbolic link" in _refused(client.post("/api/decide", json={"id": "planted2", "label": "true"}), 403)
    assert secret.exists() and (results / "training" / "true" / "planted.fits").is_symlink()


def test_symlinked_label_folder_is_refused(results, tmp_path):
    outside = tmp_path / "outside"
    (results / "training" / "false").rename(outside)
    (results / "training" / "false").symlink_to(outside)
    with pytest.raises(InputError, match="is a link"):
        ScanStore(results, user="ada")


def test_malformed_requests_get_4xx_messages(client):
    _refused(client.post("/api/decide", data="not json", content_type="application/json"), 400)
    _refused(client.post("/api/decide", data="id=x"), 400)  # a form post (cross-site) is no JSON object
    _refused(client.post("/api/decide", json=[1, 2]), 400)
    assert "'true' or 'false'" in _refused(client.post("/api/decide", json={"id": IDS[0], "label": "maybe"}), 400)
    _refused(client.post("/api/decide", json={"id": 3, "label": "true"}), 400)
    assert "no candidate" in _refused(client.post("/api/decide", json={"id": "nope", "label": "true"}), 404)
    _refused(client.get(f"/api/stamp?id={IDS[0]}&channel=VAR"), 404)
    _refused(client.get(f"/api/stamp?id={IDS[0]}&stretch=log"), 400)
    _refused(client.get("/api/stamp"), 400)
    _refused(client.get("/api/candidates?pmin=nan"), 400)
    _refused(client.get("/api/candidates?flag=x"), 400)
    _refused(client.get("/api/candidates?queue=random"), 400)
    _refused(client.get("/api/candidates?label=maybe"), 400)
    _refused(client.get("/api/explain?id=" + IDS[0]), 404)  # no model in this folder
    _refused(client.put("/api/decide"), 405)
    assert "nothing to undo" in _refused(client.post("/api/undo", json={}), 409)
    assert "127.0.0.1" in _refused(client.get("/", headers={"Host": "evil.example:8765"}), 403)


# -- a real server: 127.0.0.1 only, killed during writes ---------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def _wait_until_listening(proc: subprocess.Popen, port: int, why_exited) -> None:
    """Wait (60 s at most) until the scan server ``proc`` accepts connections on ``port``."""
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None, why_exited()
            assert time.monotonic() < deadline, "the scan server did not start"
            time.sleep(0.2)


@pytest.fixture
def server(results, tmp_path):
    port = _free_port()
    logfile = tmp_path / "server.log"
    with open(logfile, "w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rbflow.cli", "scan", str(results), "--port", str(port), "--user", "ada"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )
    _wait_until_listening(proc, port, lambda: logfile.read_text()[-2000:])
    yield f"http://127.0.0.1:{port}/", port
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)  # generous: a loaded 2-core machine finishes a scoring request first
    except subprocess.TimeoutExpired:
        proc.kill()  # never leave the server running into the next tests
        proc.wait()
        raise


def test_server_stops_on_sigterm_and_on_sigint_even_when_started_with_sigint_ignored(results, tmp_path):
    """A shell's background job starts with SIGINT ignored: the page must still stop on Ctrl-C and SIGTERM."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        port = _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "rbflow.cli", "scan", str(results), "--port", str(port), "--user", "ada"],
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
        _wait_until_listening(proc, port, lambda: "the scan server exited")
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail(f"the scan server ignored {signal.Signals(sig).name}")
        assert proc.returncode == 0 and "scanning page stopped" in err, err[-2000:]


def test_server_listens_on_loopback_only(server):
    _, port = server
    listening = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                listening.append(local.rsplit(":", 1)[0])
    assert listening == ["0100007F"], listening  # 127.0.0.1, little-endian hex; no IPv6, no 0.0.0.0


KILLER = """
import random, sys
from rbflow.scan import ScanStore
store = ScanStore(sys.argv[1], user="crash")
ids = sys.argv[2:]
rng = random.Random(int(sys.argv[0] == "-c"))
print("ready", flush=True)
while True:
    if rng.random() < 0.2:
        try:
            store.undo()
        except Exception:
            pass
    else:
        store.decide(rng.choice(ids), rng.choice(["true", "false"]))
"""


def _consistent(results: Path) -> None:
    """Every candidate's FITS and PNG in one folder, every decision closed, labels.ecsv agreeing."""
    store = ScanStore(results, user="check")  # runs the recovery
    lines = [json.loads(x) for x in (results / "training" / JOURNAL).read_text().splitlines()]
    begun = {r["op"] for r in lines if r["state"] == "begin"}
    closed = {r["op"] for r in lines if r["state"] != "begin"}
    assert begun == closed
    latest = {d.id: d for d in store.history()}
    cols = _scan_columns(results)
    for cid in IDS:
        where = _where(results, cid)
        assert where["fits"] == where["png"] is not None, (cid, where)
        d = latest.get(cid)
        assert cols[cid][0] == (d.dst if d is not None else ""), (cid, cols[cid], d)
        if d is not None:
            assert where["fits"] == d.dst


def test_killing_the_writer_leaves_every_decision_done_or_not_done(results):
    rng = random.Random(5)
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", KILLER, str(results), *IDS], env=_env(), stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        _consistent(results)
    assert len(ScanStore(results, user="x").history()) > 0


def _journal(results: Path, *records: dict) -> None:
    with open(results / "training" / JOURNAL, "a") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")


def _begin(op: int, cid: str, src: str, dst: str) -> dict:
    key = f"{IMAGE}:{40.0 + 40 * (int(cid[-1]) % 4):.1f},{40.0 + 40 * (int(cid[-1]) // 4):.1f}"
    return {"state": "begin", "op": op, "kind": "label", "id": cid, "key": key, "src": src, "dst": dst,
            "user": "ada", "time": "2026-01-01T00:00:00+00:00", "undoes": -1}  # fmt: skip


def test_recovery_completes_a_decision_whose_fits_moved(results):
    t = results / "training"
    _journal(results, _begin(1, IDS[0], "true", "false"))
    os.replace(t / "true" / f"{IDS[0]}.fits", t / "false" / f"{IDS[0]}.fits")  # killed before the PNG moved
    ScanStore(results, user="x")
    assert _where(results, IDS[0]) == {"fits": "false", "png": "false"}
    assert _scan_columns(results)[IDS[0]][:2] == ("false", "ada")
    _consistent(results)


def test_recovery_rolls_back_a_decision_whose_fits_did_not_move(results):
    _journal(results, _begin(1, IDS[1], "false", "true"))  # killed right after the journal line
    ScanStore(results, user="x")
    assert _where(results, IDS[1]) == {"fits": "false", "png": "false"}
    assert _scan_columns(results)[IDS[1]] == ("", "", "")
    _consistent(results)


def test_recovery_drops_a_torn_journal_line(results, caplog):
    with open(results / "training" / JOURNAL, "w") as fh:
        fh.write('{"state": "begin", "op": 1, "kind": "la')  # killed during the append: nothing moved
    store = ScanStore(results, user="x")
    assert "torn" in caplog.text
    store.decide(IDS[2], "false")
    _consistent(results)


def test_the_page_waits_for_the_labelling_lock(results):
    """A decision waits while label_cutouts (or anyone) holds the training folder's lock."""
    store = ScanStore(results, user="ada")
    with open(results / "training" / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from rbflow.scan import ScanStore; ScanStore({str(results)!r}, user='b').decide({IDS[4]!r}, 'false')"],
            env=_env(),
        )  # fmt: skip
        time.sleep(3)
        assert proc.poll() is None and _where(results, IDS[4])["fits"] == "true"
        fcntl.flock(fh, fcntl.LOCK_UN)
    assert proc.wait(timeout=60) == 0
    assert _where(results, IDS[4])["fits"] == "false"
    del store


# -- a real browser ------------------------------------------------------------------------------
class _Chrome:
    """Headless chromium driven through the DevTools protocol over a pipe (``--remote-debugging-pipe``)."""

    def __init__(self, binary: str, profile: Path):
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # the child reads commands on fd 3 and writes answers on fd 4
        a, b = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)

        def fds() -> None:
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--window-size=1300,760", "about:blank"],
            pass_fds=(3, 4), preexec_fn=fds, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for fd in (to_chrome_r, from_chrome_w, a, b):
            os.close(fd)
        self._buf = b""
        self._n = 0
        self.session = None
        target = self.send("Target.createTarget", url="about:blank", session=False)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True, session=False)["sessionId"]
        self.send("Page.enable")

    def send(self, method: str, *, session: bool = True, **params):
        self._n += 1
        msg = {"id": self._n, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._n:
                assert "error" not in reply, reply
                return reply["result"]

    def _read(self) -> dict:
        while b"\0" not in self._buf:
            chunk = os.read(self._r, 1 << 20)
            assert chunk, "chromium closed the pipe"
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def js(self, expression: str):
        return self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)[
            "result"
        ].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while not self.js(expression):
            assert time.monotonic() < deadline, f"timed out waiting for {expression}"
            time.sleep(0.1)

    def key(self, key: str) -> None:
        for kind in ("keyDown", "keyUp"):
            text = key if kind == "keyDown" and len(key) == 1 else ""  # named keys (ArrowLeft) type nothing
            self.send("Input.dispatchKeyEvent", type=kind, key=key, text=text)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._w)
        os.close(self._r)


@pytest.fixture
def chrome(tmp_path):
    browser = _Chrome(chromium_binary(), tmp_path / "profile")
    yield browser
    browser.close()


def test_label_with_the_keyboard_undo_and_reload_in_headless_chromium(server, chrome, results, tmp_path):
    url, _ = server
    chrome.send("Page.navigate", url=url)
    chrome.wait_for(f"document.getElementById('title').textContent.startsWith('{IDS[0]}')")
    chrome.wait_for(
        "[...document.querySelectorAll('#stamps img')].filter(i => i.complete && i.naturalWidth > 0).length === 4"
    )
    for n, key in enumerate(["b", "r", "b", "u"]):  # IDS[0] bogus, IDS[1] real, IDS[2] bogus, undo IDS[2]
        chrome.key(key)
        chrome.wait_for(f"document.getElementById('history').textContent.includes('{(1, 2, 3, 2)[n]} can be undone')")
    chrome.send("Page.reload")
    chrome.wait_for("document.getElementById('history').textContent.includes('2 can be undone')")
    text = chrome.js("document.body.innerText")
    assert f"{IDS[1]}: false → true" in text and f"{IDS[0]}: true → false" in text and f"{IDS[2]}: true" not in text
    assert _where(results, IDS[0]) == {"fits": "false", "png": "false"}
    assert _where(results, IDS[1]) == {"fits": "true", "png": "true"}
    assert _where(results, IDS[2]) == {"fits": "true", "png": "true"}
    cols = _scan_columns(results)
    assert [cols[i][:2] for i in IDS[:3]] == [("false", "ada"), ("true", "ada"), ("", "")]
    shot = base64.b64decode(chrome.send("Page.captureScreenshot", format="png")["data"])
    (tmp_path / "scan.png").write_bytes(shot)
    from matplotlib.image import imread

    pixels = imread(tmp_path / "scan.png")
    assert pixels.shape[0] > 500 and pixels.std() > 0.05  # not blank
    build_datacube(
        results / "training", tmp_path / "cube.npz", channels=["SCI", "REF", "DIFF"], crop=None, frac_true=None, seed=0
    )
    y = dict(zip(*(load_datacube(tmp_path / "cube.npz")[k] for k in ("ids", "y"))))
    assert (y[IDS[0]], y[IDS[1]], y[IDS[2]]) == (0, 1, 1)

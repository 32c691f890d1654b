"""The Snakemake HTML report of the tiny run (`snakemake --report`), opened in a real headless browser.

Every embedded plot is decoded from the report's data URIs; the browser is Debian's ``chromium``
(installed with apt when missing and the tests run as root, as ``tests/cluster/slurm.sh`` does for
SLURM; the browser tests skip otherwise). A copy of the report gets a small probe script that opens the
training plot through the report's own JavaScript app and writes what the page shows into the DOM,
which ``--dump-dom`` returns; a screenshot of the same page must not be blank. (Decoding all 23 plots in
the browser is not done: under ``--virtual-time-budget`` the report's inline Tailwind rescans the 4 MB
page and chromium spins for minutes.)
"""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import SNAKEMAKE, TINY, chromium_binary
from matplotlib.image import imread

pytestmark = pytest.mark.workflow

#: Plots marked for the report, by category, for the tiny telescope (6 frames; plot folders of the rules).
EXPECTED = {
    "PSF models": {
        f"results/tiny/psf/{frame}.png"
        for frame in ["fld00_r_e1", "fld00_r_e2", "fld00_r_ref", "fld01_g_e1", "fld01_g_e2", "fld01_g_ref"]
    },
    "Injection recovery": {
        f"results/tiny/plots/checksim/{name}.png" for name in ["efficiency", "hist_mag", "mag_bias", "snr_mag"]
    },
    "Training": {"results/tiny/model/training.png"},
    "Apply path": {"results/tiny/plots/apply/candidates.png"},
    "Threshold choice": {
        f"results/tiny/plots/checkinfer/{name}.png"
        for name in [
            "p_real_hist",
            "roc",
            "det",
            "error_rates",
            "metrics_vs_threshold",
            "efficiency_mag",
            "reliability",
            "confusion",
            "worst_false_positives",
            "worst_false_negatives",
            "fwhm_ratio",
        ]
    },
    "Artefact kinds": {
        f"results/tiny/plots/checkinfer/{name}" for name in ["kinds.png", "kinds_gallery.png", "kinds.html"]
    },
}
#: Report items that are HTML pages (shown in a frame), not plots.
PAGES = {"results/tiny/plots/checkinfer/kinds.html"}
SHOWN = "results/tiny/model/training.png"

PROBE = """
<script>
window.addEventListener("load", () => setTimeout(() => {
  const out = {categories: categories};
  app.setView({content: "img", contentPath: results["%(shown)s"].data_uri, resultPath: "%(shown)s"});
  setTimeout(() => {
    const shown = [...document.querySelectorAll("#app img")].filter((img) => img.src.startsWith("data:image/png"));
    out.shown = shown.map((img) => [img.naturalWidth, img.naturalHeight, img.getBoundingClientRect().width]);
    out.text = document.querySelector("#app").innerText;
    const pre = document.createElement("pre");
    pre.id = "rbflow-probe";
    pre.hidden = true;
    pre.textContent = JSON.stringify(out);
    document.body.appendChild(pre);
  }, 1000);
}, 500));
</script>
"""


@pytest.fixture(scope="module")
def chromium() -> str:
    """The headless browser (installed on first use when root)."""
    return chromium_binary()


@pytest.fixture(scope="module")
def report(tiny_run, tmp_path_factory) -> Path:
    """The HTML report of the tiny run, built in its working directory with the run's arguments."""
    path = tmp_path_factory.mktemp("report") / "report.html"
    proc = subprocess.run(
        [*SNAKEMAKE, *TINY, "--report", str(path)], cwd=tiny_run, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return path


def _browse(chromium: str, page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Open a local page in headless chromium, let its JavaScript run, and do `args` (dump or screenshot)."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--window-size=1400,1000",
        "--virtual-time-budget=10000",
        *args,
        page.as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def probed(report, tmp_path_factory) -> Path:
    """A copy of the report with the probe script before its closing `</body>` (the last one: the
    embedded JavaScript libraries hold the string too)."""
    text = report.read_text(encoding="utf-8")
    end = text.rfind("</body>")
    assert end > 0, "the report has no </body>: the Snakemake report template changed"
    page = tmp_path_factory.mktemp("probe") / "report_probe.html"
    page.write_text(text[:end] + PROBE % {"shown": SHOWN} + text[end:], encoding="utf-8")
    return page


def test_report_is_self_contained_with_every_plot(report):
    text = report.read_text(encoding="utf-8")
    # no resource is fetched from elsewhere: scripts, styles and plots are all inline
    assert not re.search(r"<(script|link|img|iframe)\b[^>]*\b(src|href)=[\"']?(https?:)?//", text)
    match = re.search(r"^\s*var categories = (\{.*\});\s*$", text, flags=re.MULTILINE)
    assert match, "no `var categories` in the report: the Snakemake report template changed"
    categories = {name: {p for sub in subs.values() for p in sub} for name, subs in json.loads(match[1]).items()}
    assert categories == EXPECTED
    match = re.search(r"^\s*var results = (\{.*\});\s*$", text, flags=re.MULTILINE)
    assert match, "no `var results` in the report: the Snakemake report template changed"
    results = json.loads(match[1])
    assert set(results) == set().union(*EXPECTED.values())
    for path, entry in results.items():
        assert len(entry["caption"]) > 50, path  # a real caption
        if path in PAGES:  # the per-kind table: a page with one row per truth kind and label
            assert entry["mime_type"] == "text/html", path
            page = base64.b64decode(entry["data_uri"].split(",", 1)[1]).decode()
            assert "<table>" in page and page.count("<tr") >= 2, path
            continue
        assert entry["mime_type"] == "image/png", path
        head, data = entry["data_uri"].split(",", 1)
        assert head.startswith("data:image/png") and head.endswith(";base64"), head
        pixels = imread(io.BytesIO(base64.b64decode(data)), format="png")
        # every plot is a matplotlib figure of at least 2 inches at 80 dpi on each side, not blank
        assert min(pixels.shape[:2]) >= 160 and pixels[..., :3].std() > 0.05, (path, pixels.shape)
    assert "rbflow: real/bogus classification of image-subtraction candidates" in text
    assert "Learning curves of the real/bogus CNN on telescope <tt" in text
    assert "System Message" not in text  # every caption is valid reStructuredText once rendered


def test_report_plots_render_in_headless_chromium(chromium, probed, tmp_path):
    dom = _browse(chromium, probed, tmp_path / "profile", "--dump-dom").stdout
    match = re.search(r'<pre id="rbflow-probe" hidden="">(.*?)</pre>', dom, flags=re.DOTALL)
    assert match, "the probe did not finish within the virtual time budget: " + dom[-2000:]
    seen = json.loads(html.unescape(match[1]))
    assert {name: {p for sub in subs.values() for p in sub} for name, subs in seen["categories"].items()} == EXPECTED
    # the report's app decoded the training plot (12 x 3.6 in at 100 dpi) and shows it in its content panel
    assert [shown[:2] for shown in seen["shown"]] == [[1200, 360]]
    assert seen["shown"][0][2] > 300
    for text in [
        "RESULTS",
        "Injection recovery",
        "PSF models",
        "Threshold choice",
        "Training",
        "Apply path",
        "Artefact kinds",
    ]:
        assert text in seen["text"], text


def test_report_screenshot_is_not_blank(chromium, probed, tmp_path):
    shot = tmp_path / "report.png"
    _browse(chromium, probed, tmp_path / "profile", f"--screenshot={shot}")
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (1000, 1400)
    # a blank or loading page is one or two flat colours; the rendered report (navigation panel, menu
    # text and the training plot with lines, ticks and labels) has thousands of distinct colours
    colours = np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 500, len(colours)
    # the training plot's train and validation curves: matplotlib's first two colours (C0 #1f77b4,
    # C1 #ff7f0e), anti-aliased, so match within 0.12 per channel; 3 panels of lines give > 1000 pixels
    for colour in [(0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)]:
        near = np.all(np.abs(pixels - np.array(colour) / 255) < 0.12, axis=-1)
        assert near[:, 260:].sum() > 300, (colour, near.sum())

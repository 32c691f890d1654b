# Helpers shared by the rules: configuration, frame lists, input functions, wildcard constraints.
import hashlib
import os
import shlex
import subprocess
import sys

from rbflow.config import load_config
from rbflow.errors import RbflowError
from rbflow.frames import astrometry_sources, frame_hdu, frames_of, image_name, parse_image

try:
    load_config(config)
except RbflowError as _exc:
    raise WorkflowError(str(_exc)) from None

TELESCOPES = config["_telescopes"]
SKY_TELESCOPES = [name for name, tel in TELESCOPES.items() if "sky" in tel]
FRAMES = {name: {f.name: f for f in frames_of(tel)} for name, tel in TELESCOPES.items()}
ON_BAD_FRAME = config["on_bad_frame"]  # stop | skip (see workflow/rules/validate.smk)

# Keys every stage may need (instrument facts); stage blocks are added per rule, so that editing
# one stage's settings reruns only that stage.
_INSTRUMENT_KEYS = ("name", "pixel_scale", "gain", "read_noise", "saturation", "filters", "zeropoints", "header")

_name = r"[A-Za-z0-9][A-Za-z0-9_-]*"


wildcard_constraints:
    telescope=_name,
    frame=_name,
    image=_name,
    realization=r"\d+",
    mode=r"sim|obs",


def telescope_block(*blocks):
    """Input function factory: the telescope's instrument facts plus the named stage blocks."""

    def block(wildcards):
        tel = TELESCOPES[wildcards.telescope]
        out = {k: tel[k] for k in _INSTRUMENT_KEYS}
        if frame_hdu(tel) is not None:  # where the pixels are in multi-extension frame files
            out["frames"] = {"hdu": frame_hdu(tel)}
        out.update({b: tel[b] for b in blocks})
        return out

    return block


def subtract_mem_mb(wildcards):
    """Memory of a `subtract` job (MB): ZOGY needs ~3 GB for 2k x 2k; sfft ~5 GB per 1024-px tile.

    `auto` may run sfft on real frames, so it reserves sfft's memory there; on the embedded sky (many
    PSF stars per cell by construction) it runs ZOGY.
    """
    tel = TELESCOPES[wildcards.telescope]
    cfg = tel["subtract"]
    if cfg["method"] == "sfft" or (cfg["method"] == "auto" and "sky" not in tel):
        return int(3000 + 5.0e-3 * cfg["sfft"]["tile"] ** 2)
    return 3000


def stage_block(name):
    """Input function factory: one stage block of the telescope file (e.g. `cutout`)."""

    def block(wildcards):
        return TELESCOPES[wildcards.telescope][name]

    return block


def frame_spec(wildcards, frame=None):
    """FrameSpec of `frame` (default: the `frame` wildcard, or the frame of the `image` wildcard)."""
    if frame is None:
        frame = wildcards.frame if "frame" in wildcards.keys() else parse_image(wildcards.image)[0]
    try:
        return FRAMES[wildcards.telescope][frame]
    except KeyError:
        raise WorkflowError(
            f"telescope '{wildcards.telescope}' has no frame '{frame}'; known frames: "
            + ", ".join(sorted(FRAMES[wildcards.telescope]))
        ) from None


def frame_path(wildcards):
    """Path of the frame named by the `frame` wildcard."""
    return frame_spec(wildcards).path


def seed_of(*parts):
    """Input function factory: a seed derived from the global seed, the wildcards and `parts`."""
    from rbflow.seeds import derive

    def seed(wildcards):
        return derive(config["seed"], *(wildcards[k] for k in sorted(wildcards.keys())), *parts)

    return seed


def science_input(wildcards):
    """The frame to subtract: the injected realization (sim) or the frame as observed (obs)."""
    frame, realization = parse_image(wildcards.image)
    if wildcards.mode == "sim":
        if realization is None:
            raise WorkflowError(f"image '{wildcards.image}' in mode sim must be named <frame>_sim<k>")
        return f"results/{wildcards.telescope}/sim/inject/{wildcards.image}.fits"
    return frame_spec(wildcards, frame).path


def reference_of(wildcards):
    """The reference frame the frame named by the `frame` wildcard is subtracted against."""
    spec = frame_spec(wildcards)
    if spec.reference is None:
        raise WorkflowError(f"frame '{spec.name}' is a reference: nothing is injected into it")
    return frame_spec(wildcards, spec.reference).path


def subtract_inputs(wildcards):
    """Science, reference and both PSF models for the `subtract` rule."""
    spec = frame_spec(wildcards)
    if spec.reference is None:
        raise WorkflowError(f"frame '{spec.name}' is a reference: it is not subtracted")
    ref = frame_spec(wildcards, spec.reference)
    return {
        "sci": science_input(wildcards),
        "ref": ref.path,
        "sci_psf": f"results/{wildcards.telescope}/psf/{spec.name}.fits",
        "ref_psf": f"results/{wildcards.telescope}/psf/{ref.name}.fits",
    }


def sci_psf_of(wildcards):
    """PSF model of the science frame behind an image."""
    return f"results/{wildcards.telescope}/psf/{parse_image(wildcards.image)[0]}.fits"


def sim_images(telescope):
    """Every injection realization image of every science frame of a telescope."""
    n = TELESCOPES[telescope]["inject"]["realizations"]
    return [image_name(f.name, k) for f in FRAMES[telescope].values() if f.reference is not None for k in range(n)]


def obs_images(telescope):
    """Every science frame of a telescope, as observed."""
    return [f.name for f in FRAMES[telescope].values() if f.reference is not None]


def bad_frames_of(telescope):
    """Frames to skip: those of the `bad_frames` checkpoint with `on_bad_frame: skip`, none with `stop`.

    Call it from input functions only: with `skip` it waits for the checkpoint.
    """
    if ON_BAD_FRAME != "skip":
        return frozenset()
    from rbflow.validate import read_bad_frames

    return read_bad_frames(checkpoints.bad_frames.get(telescope=telescope).output[0])


def images_of(telescope, mode):
    """Images of a telescope in a mode (sim or obs), without those of bad frames (`on_bad_frame: skip`)."""
    images = sim_images(telescope) if mode == "sim" else obs_images(telescope)
    bad = bad_frames_of(telescope)
    return [image for image in images if parse_image(image)[0] not in bad] if bad else images


def per_image(pattern, mode, telescopes=None):
    """Expand `pattern` (with {telescope}, {mode}, {image}) over telescopes and their images (in input functions)."""
    out = []
    for tel in telescopes or TELESCOPES:
        out += expand(pattern, telescope=tel, mode=mode, image=images_of(tel, mode))
    return out


def catalogues_of(wildcards):
    """Catalogues of known real variables/transients configured for the telescope."""
    return TELESCOPES[wildcards.telescope]["crossmatch"]["catalogues"]


def truth_tables_of(wildcards):
    """Truth tables of the science frame of an image and of its reference frame (synthetic telescopes; none else)."""
    if wildcards.telescope not in SKY_TELESCOPES:
        return {}
    spec = frame_spec(wildcards)
    return {
        "truth": f"resources/{wildcards.telescope}/truth/{spec.name}.ecsv",
        "reference_truth": f"resources/{wildcards.telescope}/truth/{spec.reference}.ecsv",
    }


def label_inputs(wildcards):
    """Per-candidate tables and cutout folders of every injected image of a telescope (same order)."""
    return {
        "per_candidate": per_image(
            "results/{telescope}/sim/crossmatch/{image}.per_candidate.ecsv", "sim", [wildcards.telescope]
        ),
        "cutouts": per_image("results/{telescope}/sim/cutouts/{image}", "sim", [wildcards.telescope]),
    }


def relabel_digest(wildcards):
    """Digest of the moves a person made between training/true and training/false since labelling.

    Snakemake does not see files moved inside folders. This parameter compares the folders with the
    placement recorded in `labels.ecsv` by the label rule: it is 'auto' when nothing moved, and
    changes (so the datacube is rebuilt) whenever a person relabels a cutout by moving it.
    """
    from rbflow.crossmatch import relabel_digest as digest

    return digest(f"results/{wildcards.telescope}/training")


def checksim_inputs(wildcards):
    """Crossmatch tables and subtraction files of every injected image of a telescope (same order)."""
    return {
        "crossmatch": per_image("results/{telescope}/sim/crossmatch/{image}.ecsv", "sim", [wildcards.telescope]),
        "subtract": per_image("results/{telescope}/sim/subtract/{image}.fits", "sim", [wildcards.telescope]),
    }


def checkinfer_inputs(wildcards):
    """Datacube, model and crossmatch tables for the threshold diagnostics."""
    tel = wildcards.telescope
    return {
        "datacube": f"results/{tel}/training/datacube.npz",
        "model": f"results/{tel}/model/model.pt",
        "crossmatch": per_image("results/{telescope}/sim/crossmatch/{image}.ecsv", "sim", [tel]),
    }


def reference_inputs(wildcards):
    """Frames of the epoch stacked into the reference frame `frame` (none: it is not a stack)."""
    inputs = frame_spec(wildcards).inputs
    if not inputs:
        raise WorkflowError(
            f"frame '{wildcards.frame}' of telescope '{wildcards.telescope}' is not a stacked reference; "
            "give 'frames.reference' a list of files to stack"
        )
    return list(inputs)


def stack_settings(wildcards):
    """The `frames.stack` block of a telescope file (how its reference frames are stacked)."""
    return TELESCOPES[wildcards.telescope]["frames"]["stack"]


def apply_inputs(wildcards):
    """Inference tables and kept lists of every observed image (same order) and the catalogues of known reals."""
    return {
        "infer": per_image("results/{telescope}/{mode}/infer/{image}.ecsv", "obs", [wildcards.telescope]),
        "kept": per_image("results/{telescope}/{mode}/infer/{image}_kept.ecsv", "obs", [wildcards.telescope]),
        "catalogues": catalogues_of(wildcards),
    }


def match_radius_arcsec(wildcards):
    """The telescope's crossmatch radius in arcsec (given in pixels); None when the scale is read from each WCS."""
    tel = TELESCOPES[wildcards.telescope]
    return None if tel["pixel_scale"] is None else tel["crossmatch"]["radius"] * tel["pixel_scale"]


def match_radius_px(wildcards):
    """The telescope's crossmatch radius in pixels."""
    return TELESCOPES[wildcards.telescope]["crossmatch"]["radius"]


def validate_inputs(wildcards):
    """The frame to check and, for a science frame, the status of its reference."""
    spec = frame_spec(wildcards)
    inputs = {"frame": spec.path}
    if spec.reference is not None:
        inputs["reference"] = f"results/{wildcards.telescope}/validate/{spec.reference}.json"
    return inputs


def frame_statuses(wildcards):
    """Status files of every frame of a telescope (rule validate_frame)."""
    tel = wildcards.telescope
    return expand("results/{telescope}/validate/{frame}.json", telescope=tel, frame=FRAMES[tel])


def checkinfer_sources(wildcards):
    """Injection truth tables and cutout folders of every injected image of a telescope (FWHMs, gallery stamps)."""
    return {
        "truth": per_image("results/{telescope}/sim/inject/{image}.ecsv", "sim", [wildcards.telescope]),
        "cutouts": per_image("results/{telescope}/sim/cutouts/{image}", "sim", [wildcards.telescope]),
    }


# Alert packets (workflow/rules/alerts.smk, config block `alerts`)
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


ASTROMETRY_SOURCES = {name: astrometry_sources(tel) for name, tel in TELESCOPES.items()}


def astrometry_input(wildcards):
    """The delivered file of the frame the `astrometry` rule calibrates."""
    try:
        return ASTROMETRY_SOURCES[wildcards.telescope][wildcards.frame]
    except KeyError:
        raise WorkflowError(
            f"telescope '{wildcards.telescope}' has no delivered frame '{wildcards.frame}' to calibrate "
            "(astrometry runs only for telescopes with an 'astrometry' block)"
        ) from None


def survey_input(wildcards):
    """The science frame a survey reference is made for (`frames.reference: {survey: ...}`)."""
    spec = frame_spec(wildcards)
    if not isinstance(TELESCOPES[wildcards.telescope]["frames"]["reference"], dict) or not spec.inputs:
        raise WorkflowError(
            f"frame '{wildcards.frame}' of telescope '{wildcards.telescope}' is not a survey reference; "
            "give 'frames.reference' a mapping with 'survey'"
        )
    return spec.inputs[0]


# --- the starter model (workflow/rules/starter.smk) ---------------------------------------------

STARTER_DIR = os.path.join(workflow.basedir, "src", "rbflow", "models", "starter")
STARTER_COMMAND = shlex.join(["snakemake", *sys.argv[1:]])


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
    return {k: f"{model}/model.{k}" for k in ("pt", "json", "onnx", "ood")}


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


def starter_git_commit(wildcards):
    """HEAD of this checkout, with `-dirty` when it has uncommitted changes; `unknown` outside git."""
    git = ["git", "-C", workflow.basedir]
    try:
        head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
        status = subprocess.run(
            [*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")

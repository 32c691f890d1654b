"""rbflow: train and apply a CNN real/bogus classifier for image-subtraction candidates.

Results tree (per telescope `{telescope}`; `{mode}` is `sim` for injected images, `obs` for frames as observed):

    resources/{telescope}/frames/{frame}.fits     input frames (the demo telescope writes its own)
    resources/{telescope}/truth/, catalogues/     demo truth: per frame, and the real variables/transients
    resources/{telescope}/reference/{frame}.fits  reference stacked from one epoch's frames (real telescopes)
    results/{telescope}/validate/{frame}.json, bad_frames.ecsv  frame checks, frames skipped (on_bad_frame: skip; validate)
    results/{telescope}/psf/{frame}.fits|png      PSF model per frame                       (sim)
    results/{telescope}/sim/inject/{image}.*      injected frames + simulated_objects        (sim)
    results/{telescope}/{mode}/subtract/{image}.fits  SCI, REF, DIFF, SCORR, VAR, MASK, PSFD (run)
    results/{telescope}/{mode}/detect/{image}.ecsv    candidates                             (run)
    results/{telescope}/{mode}/cutouts/{image}/       one FITS + PNG per candidate           (cutouts)
    results/{telescope}/sim/crossmatch/{image}.*      per injected source (.ecsv, .dat), per candidate (.per_candidate.ecsv) (checksim)
    results/{telescope}/training/{true,false,unsorted}/, labels.ecsv                         (checksim)
    results/{telescope}/training/datacube.npz                                               (convert)
    results/{telescope}/model/                        model.pt/.json/.onnx, history, metrics (train)
    results/{telescope}/obs/infer/{image}.ecsv        P(real) per candidate, kept list       (infer)
    results/{telescope}/plots/{checksim,checkinfer}/  diagnostics                            (checksim, checkinfer)
    results/alerts/alerts.ecsv, kept/                 P(real) of alert packets (alerts.folder) (alerts)
    src/rbflow/models/starter/                        the starter model shipped with rbflow   (starter, config/starter.yaml)
    logs/, benchmarks/                                one per rule and wildcard set

Editing the rbflow package does not rerun rules: outputs carry `RBFLOWV`/`rbflow_version`;
use `snakemake --forcerun <rule>` after upgrading the package.
"""

from snakemake.utils import min_version

min_version("9.0")


report: "workflow/report/workflow.rst"


configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/sky.smk"
include: "workflow/rules/astrometry.smk"
include: "workflow/rules/reference.smk"
include: "workflow/rules/validate.smk"
include: "workflow/rules/psf.smk"
include: "workflow/rules/inject.smk"
include: "workflow/rules/subtract.smk"
include: "workflow/rules/cutouts.smk"
include: "workflow/rules/crossmatch.smk"
include: "workflow/rules/cnn.smk"
include: "workflow/rules/targets.smk"
include: "workflow/rules/scan.smk"
include: "workflow/rules/alerts.smk"
include: "workflow/rules/starter.smk"


rule all:
    """Everything on the configured telescopes: sky, training path, model, apply path and plots."""
    default_target: True
    input:
        rules.checksim.input,
        rules.train.input,
        rules.apply.input,
        rules.checkinfer.input,

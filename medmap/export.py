"""Shareable models: ``medmap export RUN --out DIR`` writes a self-contained model folder.

An exported folder holds everything :func:`medmap.inference.load_run` needs, and nothing that
points back to the machine it came from::

    DIR/model.safetensors        the selected weights (safetensors only, no pickle)
    DIR/config.yaml              the run config, with the encoder architecture written inline
    DIR/organ.yaml               the organ (task) config: classes, modalities, spacing, ROI, crop
    DIR/text_bank.safetensors    the frozen class-prompt / modality-descriptor embeddings
    DIR/metrics/                 the run's validation (and, if evaluated, test) metrics
    DIR/README.md                a model card
    DIR/export.json              manifest: format version, medmap / torch versions, SHA-256 of every file

``load_run(DIR)`` and ``medmap predict DIR ...`` read it like a run folder. Loading checks the
manifest (:func:`verify_export`): a format version newer than this medmap reads, or a file whose
SHA-256 differs from the manifest (a corrupt or modified copy), is a
:class:`~medmap.errors.CheckpointError`; another medmap or torch version only warns.

Example:
    >>> from medmap.export import export_run
    >>> export_run("runs/liver", "shared/liver_model")              # doctest: +SKIP
    >>> load_run("shared/liver_model").predict({...})                # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

from medmap import __version__
from medmap.config import OrganConfig, load_yaml
from medmap.errors import CheckpointError, ConfigError
from medmap.run_config import finetune_config
from medmap.utils import atomic_write_json, atomic_write_text, sha256_file

EXPORT_FILE = "export.json"
EXPORT_FORMAT = "medmap-export"
#: bump when an exported folder changes in a way an older medmap cannot read
EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
README_FILE = "README.md"

_CONFIG_FILE = "config.yaml"
_ORGAN_FILE = "organ.yaml"
_TEXT_BANK_FILE = "text_bank.safetensors"
_RUN_INFO_FILE = "run_info.json"


def is_export(path: str | Path) -> bool:
    """True when ``path`` is a folder written by :func:`export_run`."""
    return (Path(path) / EXPORT_FILE).is_file()


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def _major_minor(version: Any) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)\.(\d+)", str(version or ""))
    return (int(m.group(1)), int(m.group(2))) if m else None


# --------------------------------------------------------------------------- loading side
def verify_export(export_dir: str | Path) -> dict[str, Any]:
    """Check an exported folder against its manifest; return the manifest.

    Raises:
        CheckpointError: unreadable manifest, a format version newer than this medmap reads,
            or a missing file / a SHA-256 mismatch (corrupt or modified copy).

    Warns:
        UserWarning: the folder was exported with another medmap or torch major.minor version.
    """
    export_dir = Path(export_dir)
    path = export_dir / EXPORT_FILE
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable export manifest ({str(e).splitlines()[0][:120]}); "
                              "copy the exported folder again") from e
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{path} is not a medmap export manifest (no \"format\": \"{EXPORT_FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{path}: bad format_version {version!r}")
    if version > EXPORT_FORMAT_VERSION:
        raise CheckpointError(
            f"{export_dir} is an export in format version {version} (medmap {manifest.get('medmap_version', '?')}); "
            f"this medmap {__version__} reads up to version {EXPORT_FORMAT_VERSION}: upgrade medmap to load it")
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS_FILE not in files:
        raise CheckpointError(f"{path} lists no SHA-256 for {WEIGHTS_FILE}; copy the exported folder again")
    for name, digest in files.items():
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path}: bad file name {name!r} in the manifest")
        f = export_dir / name
        if not f.is_file():
            raise CheckpointError(f"{export_dir} lacks {name}, listed in {EXPORT_FILE}; copy the exported folder again")
        if sha256_file(f) != digest:
            raise CheckpointError(f"{f}: SHA-256 differs from {EXPORT_FILE} (a corrupt or modified copy); "
                                  "copy the exported folder again")
    for lib, theirs, ours in (("medmap", manifest.get("medmap_version"), __version__),
                              ("torch", manifest.get("torch_version"), _torch_version())):
        if _major_minor(theirs) != _major_minor(ours):
            warnings.warn(f"{export_dir} was exported with {lib} {theirs}; this is {lib} {ours}: "
                          "predictions may differ slightly", UserWarning, stacklevel=3)
    return manifest


# --------------------------------------------------------------------------- writing side
def _portable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The run config with the encoder architecture inlined (it may name a YAML file of this machine)."""
    from medmap.models.encoders import load_arch

    out = dict(cfg)
    enc = dict(out.get("encoder") or {})
    if enc.get("arch") is not None and not isinstance(enc["arch"], Mapping):
        try:
            enc["arch"] = load_arch(enc["arch"])
        except (ConfigError, OSError) as e:
            raise ConfigError(f"cannot inline encoder.arch={enc['arch']!r} of the run: {e}") from e
        out["encoder"] = enc
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        d = json.loads(path.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def export_run(run_dir: str | Path, out_dir: str | Path, which: str = "auto") -> dict[str, Any]:
    """Write a self-contained model folder from a fine-tuning run; returns the manifest.

    Args:
        run_dir: a fine-tuning run folder (``medmap finetune``).
        out_dir: the folder to create (must not exist, or be empty).
        which: checkpoint to export: ``auto`` (``best``, else ``last``), ``best`` or ``last``.

    Raises:
        CheckpointError: ``run_dir`` is not a complete fine-tuning run (or is an export already).
        ConfigError: ``out_dir`` exists and is not empty.
    """
    from medmap.inference import _checkpoint_dir, load_run

    run_dir, out = Path(run_dir), Path(out_dir)
    if is_export(run_dir):
        raise CheckpointError(f"{run_dir} is an exported model already; copy the folder to share it")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} already exists and is not empty; export into a new folder")
    predictor = load_run(run_dir, which=which, device="cpu")  # the weights must fit the config before sharing them
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ConfigError(f"--out {out} lies inside the run folder; export to a folder outside it")
    ckpt = _checkpoint_dir(run_dir, which)
    organ = predictor.organ
    cfg = load_yaml(run_dir / _CONFIG_FILE)
    info = _read_json(run_dir / _RUN_INFO_FILE)
    summary = _read_json(run_dir / "metrics" / "finetune_summary.json")
    test = _read_json(run_dir / "metrics" / "test" / "metrics.json")
    val = _read_json(run_dir / "metrics" / "val" / "metrics.json")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        shutil.copyfile(ckpt / WEIGHTS_FILE, tmp / WEIGHTS_FILE)
        atomic_write_text(tmp / _CONFIG_FILE, yaml.safe_dump(_portable_config(cfg), sort_keys=False))
        atomic_write_text(tmp / _ORGAN_FILE, yaml.safe_dump(organ.to_dict(), sort_keys=False))
        if (run_dir / _TEXT_BANK_FILE).is_file():
            shutil.copyfile(run_dir / _TEXT_BANK_FILE, tmp / _TEXT_BANK_FILE)
        for name, d in (("val.json", val), ("test.json", test), ("finetune_summary.json", summary)):
            if d:
                atomic_write_json(tmp / "metrics" / name, d)
        # what loading reads is checked on every load; README.md and metrics/ are documentation
        files = {n: sha256_file(tmp / n) for n in (WEIGHTS_FILE, _CONFIG_FILE, _ORGAN_FILE, _TEXT_BANK_FILE)
                 if (tmp / n).is_file()}
        manifest = {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_FORMAT_VERSION,
            "medmap_version": __version__,
            "torch_version": _torch_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "source_run": run_dir.resolve().name,
            "checkpoint": ckpt.name,
            "organ": organ.name,
            "classes": list(organ.classes),
            "modalities": list(organ.modalities),
            "weights": {"file": WEIGHTS_FILE, "sha256": files[WEIGHTS_FILE]},
            "files": files,
        }
        atomic_write_text(tmp / README_FILE, model_card(organ, cfg, manifest, info, summary, test, out.name))
        atomic_write_json(tmp / EXPORT_FILE, manifest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            verify_export(tmp)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


# --------------------------------------------------------------------------- model card
def _f(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


def _ci(x: Any) -> str:
    return "n/a" if not x else f"[{float(x[0]):.4f}, {float(x[1]):.4f}]"


def model_card(organ: OrganConfig, cfg: Mapping[str, Any], manifest: Mapping[str, Any], info: Mapping[str, Any],
               summary: Mapping[str, Any], test: Mapping[str, Any], folder: str = "MODEL_DIR") -> str:
    """The README.md of an exported model."""
    typed = finetune_config(cfg)
    enc = typed.encoder.arch
    arch = (enc.get("name") or enc.get("type")) if isinstance(enc, Mapping) else Path(str(enc)).stem
    abl = [k for k, on in dataclasses.asdict(typed.ablation).items() if not on]
    lines = [
        f"# MedMAP model: {organ.name} ({', '.join(organ.classes)})",
        "",
        "Exported with `medmap export` from the fine-tuning run "
        f"`{manifest['source_run']}` (checkpoint `{manifest['checkpoint']}`). For research use; not a medical device.",
        "",
        "## Task",
        "",
        f"- Organ / task: **{organ.name}**" + (f" — {organ.description}" if organ.description else ""),
        f"- Classes (label order): {', '.join(f'`{c}`' for c in organ.classes)}",
        "- Output: one probability per class for a study, and a Grad-CAM saliency map on request.",
        "",
        "## Input",
        "",
        f"- MRI sequences (modalities): {', '.join(f'`{m}`' for m in organ.modalities)}; any subset of at least "
        f"{organ.min_modalities} may be given, missing ones are masked.",
        "- Files: one 3D volume per sequence, a NIfTI file or a DICOM series folder"
        + (" (each sequence on its own grid, cut around its own box)." if organ.lesion_level
           else ", all sequences co-registered on one grid."),
        f"- Preprocessing (the same function as in training): crop `{organ.crop}`, model input "
        f"{' x '.join(str(s) for s in organ.roi_size)} voxels"
        + (f" at {' x '.join(f'{s:g}' for s in organ.spacing)} mm spacing" if not organ.lesion_level else "") + ".",
    ]
    if organ.crop == "roi_mask":
        lines.append("- Needs the study's organ mask (`--roi-mask`)"
                     + (", intensities outside it are zeroed" if organ.zero_outside_roi else "") + ".")
    if organ.lesion_level:
        lines.append(f"- Lesion level: each sequence is cut around the lesion box with "
                     f"{' x '.join(f'{m:g}' for m in organ.margin_mm)} mm margin, `{organ.patch_norm}` "
                     "normalisation" + (" (`--lesion-box`)" if organ.crop == "lesion_box" else "") + ".")
    lines += ["", "## Model", "",
              f"- MedMAP stage-2 classifier, encoder `{arch}`"
              + (f"; ablations off: {', '.join(sorted(abl))}" if abl else "") + ".",
              f"- Encoders initialised from stage-1 pre-training: {'yes' if info.get('init') else 'no'}.",
              f"- Training precision: `{typed.training.precision}`.",
              "", "## Training data", ""]
    if info:
        lines.append(f"- {info.get('n_train', '?')} training and {info.get('n_val', '?')} validation studies "
                     "(labelled, split by patient).")
        if info.get("total_steps"):
            lines.append(f"- {info['total_steps']} optimiser steps.")
    else:
        lines.append("- Not recorded (the run folder had no run_info.json).")
    if summary:
        v = summary.get("val") or {}
        epoch = summary.get("best_epoch")
        epoch = epoch + 1 if isinstance(epoch, int) and epoch >= 0 else "?"  # stored 0-based, logged 1-based
        lines.append(f"- Model selection on the validation split by `{summary.get('select_metric')}`: best epoch "
                     f"{epoch}, validation balanced accuracy {_f(v.get('balanced_accuracy'))}, "
                     f"macro AUC {_f(v.get('macro_auc'))}.")
    lines += ["", "## Test metrics", ""]
    if test:
        ci = test.get("ci") or {}
        ctx = test.get("context") or {}
        lines += [f"{test.get('n', '?')} test studies" + (f" (split `{ctx['split']}`)" if ctx.get("split") else "")
                  + (f", 95% CIs: percentile bootstrap, {test['n_bootstrap']} resamples" if test.get("n_bootstrap") else "")
                  + ".", "", "| metric | value | 95% CI |", "| --- | --- | --- |"]
        for key, label in (("accuracy", "Top-1 accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                           ("macro_auc", "Macro AUC"), ("macro_f1", "Macro F1"), ("ece", "ECE")):
            lines.append(f"| {label} | {_f(test.get(key))} | {_ci(ci.get(key))} |")
        lines += ["", "Full metrics: `metrics/test.json`."]
    else:
        lines.append("Not evaluated on the test split before export (`medmap evaluate RUN` writes the numbers "
                     "this section shows).")
    example = " ".join(f"{m}={m}.nii.gz" for m in organ.modalities)
    extra = " --roi-mask mask.nii.gz" if organ.crop == "roi_mask" else (
        " --lesion-box X0,Y0,Z0,X1,Y1,Z1" if organ.crop == "lesion_box" else "")
    lines += ["", "## Use", "", "```bash", f"medmap predict {folder} {example}{extra} --out predictions/", "```", "",
              "```python", "from medmap.inference import load_run", "",
              f"predictor = load_run({folder!r})",
              "pred = predictor.predict({" + ", ".join(f"{m!r}: '{m}.nii.gz'" for m in organ.modalities) + "})",
              "print(pred.predicted_class, pred.probabilities)", "```", "",
              "## Versions", "",
              f"- medmap {manifest['medmap_version']}, torch {manifest['torch_version']}, export format "
              f"{manifest['format_version']}; exported {manifest['created']}.",
              f"- Weights `{WEIGHTS_FILE}` SHA-256: `{manifest['weights']['sha256']}`.",
              f"- Loading checks every file against `{EXPORT_FILE}`; another medmap or torch version only warns.",
              ""]
    return "\n".join(lines)


__all__ = ["EXPORT_FILE", "EXPORT_FORMAT_VERSION", "export_run", "is_export", "model_card", "verify_export"]

"""Evaluate a fine-tuned run on one split: every metric of the protocol, report and plots.

``medmap evaluate RUN_DIR [--split test] [--data STUDY_LIST] [--drop-modality NAME ...]``
runs :func:`evaluate_run`. The test split is meant to be read once, after model selection
on the validation split has finished. Prediction goes through :mod:`medmap.inference`, the
same code path as ``medmap predict``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence


from medmap.data.cache import PreprocessCache, default_cache_root
from medmap.data.validate import preflight_studies
from medmap.data.dataset import StudyDataset, collate_studies
from medmap.data.split import patient_splits
from medmap.data.studylist import SPLITS, read_study_list
from medmap.errors import ConfigError, StudyListError
from medmap.evaluation.report import evaluate_and_report, write_predictions
from medmap.inference import RUN_INFO_FILE, load_run, predict_probabilities


def evaluate_run(
    run_dir: str | Path,
    split: str = "test",
    data: str | Path | None = None,
    which: str = "best",
    n_bootstrap: int = 1000,
    batch_size: int = 4,
    drop_modalities: Sequence[str] = (),
    out_dir: str | Path | None = None,
    device: str = "auto",
    precision: str | None = None,
) -> dict[str, Any]:
    """Predict every labelled study of ``split`` and write metrics, report and plots.

    Args:
        run_dir: a fine-tuning run folder.
        split: ``train``, ``val`` or ``test``.
        data: study list; default: the one the run was trained on.
        which: checkpoint to evaluate (``best`` = selected on validation).
        n_bootstrap: bootstrap resamples for the 95% confidence intervals.
        batch_size: studies per forward pass.
        drop_modalities: treat these modalities as missing in every study (robustness test).
        out_dir: default ``RUN_DIR/metrics/<split>`` (``<split>_without_<m>`` when dropping).
        device: ``auto``, ``cpu``, ``cuda``.
        precision: ``auto|fp32|bf16``; default: the run's training precision.

    Returns:
        The metrics dict (also written to ``out_dir/metrics.json``).
    """
    run_dir = Path(run_dir)
    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    predictor = load_run(run_dir, which=which, device=device, precision=precision)
    organ = predictor.organ
    unknown = [m for m in drop_modalities if m not in organ.modalities]
    if unknown:
        raise ConfigError(f"--drop-modality {unknown}: not modalities of {organ.name} ({', '.join(organ.modalities)})")
    info = json.loads((run_dir / RUN_INFO_FILE).read_text()) if (run_dir / RUN_INFO_FILE).is_file() else {}
    study_list = Path(data or info.get("study_list", ""))
    if not str(study_list) or not study_list.is_file():
        raise StudyListError(f"study list not found ({study_list or 'none recorded in the run'}); pass --data")
    studies = [s for s in read_study_list(study_list, organ=organ.name) if s.label is not None]
    studies = [s for s in patient_splits(studies) if s.split == split]
    if drop_modalities:
        studies = [dataclasses.replace(s, modalities={m: p for m, p in s.modalities.items() if m not in drop_modalities})
                   for s in studies]
        studies = [s for s in studies if s.modalities]
    if not studies:
        raise StudyListError(f"{study_list}: no labelled {organ.name} studies in the {split} split")
    preflight_studies(studies, default_cache_root(study_list) / "preflight.json")
    cache = PreprocessCache(default_cache_root(study_list) / "preprocess")
    ds = StudyDataset(studies, organ, cache=cache)
    batches = [list(range(i, min(len(ds), i + batch_size))) for i in range(0, len(ds), batch_size)]
    from torch.utils.data import DataLoader

    loader = DataLoader(ds, batch_sampler=batches, collate_fn=collate_studies)
    y, p, ids = predict_probabilities(predictor.model, loader, predictor.text_bank, predictor.device, predictor.precision)
    name = split + ("_without_" + "_".join(drop_modalities) if drop_modalities else "")
    out = Path(out_dir) if out_dir is not None else run_dir / "metrics" / name
    context = {"run": str(run_dir), "checkpoint": which, "split": split, "study_list": str(study_list),
               "dropped_modalities": list(drop_modalities), "n_bootstrap": n_bootstrap}
    metrics = evaluate_and_report(y, p, organ.classes, out, title=f"{organ.name}: {name} split", extra=context,
                                  n_bootstrap=n_bootstrap)
    write_predictions(out / "predictions.csv", ids, y, p, organ.classes)
    metrics["output_dir"] = str(out)
    return metrics

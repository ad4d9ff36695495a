"""Write a MedMoM-Synth benchmark: NIfTI volumes, masks and the study list.

Example:
    >>> from medmap.data.synth.generate import generate, load_synth_config
    >>> cfg = load_synth_config("tiny")
    >>> generate("/tmp/synth", organs=["liver"], n=7, seed=0, config=cfg)  # doctest: +SKIP
    PosixPath('/tmp/synth/studies.jsonl')

Layout of the output folder::

    DIR/studies.jsonl
    DIR/<study_id>/<modality>.nii.gz      one per modality (int16 + scl_slope, gzip, RAS affine)
    DIR/<study_id>/organ_mask.nii.gz      brain or liver mask (uint8), meta["organ_mask"] and the
                                          study's "roi_mask" (used by configs with crop: roi_mask)
    DIR/<study_id>/lesion_mask.nii.gz     lesion tissue (uint8), meta["lesion_mask"]

Every liver study's line holds the box of its (largest) lesion on each phase's grid
(``lesion_box``, voxel indices), the input of lesion-level organ configs. With
``liver.phase_grids: true`` each phase is written on its own grid, shifted a few mm
(:mod:`medmap.data.synth.phase_grids`); the masks stay on the generation grid and no
``roi_mask`` is listed then.

Every random draw of a study comes from a generator seeded by ``(seed, organ, index)``, so
the output is byte-identical for a seed and config, whatever the number of workers.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from medmap.config import CONFIG_ROOT, apply_overrides, deep_merge, load_yaml, resolve_config_path
from medmap.data.studylist import LesionBox, Study, write_study_list
from medmap.data.synth.common import study_rng, write_nifti
from medmap.errors import ConfigError

ORGANS = ("brain", "liver")


def load_synth_config(name_or_path: str | Path | None = None, overrides: Sequence[str] | None = None) -> dict[str, Any]:
    """The synth config: built-in ``default`` merged with a named/path config and overrides."""
    cfg = load_yaml(CONFIG_ROOT / "synth" / "default.yaml")
    if name_or_path is not None and str(name_or_path) != "default":
        cfg = deep_merge(cfg, load_yaml(resolve_config_path(name_or_path, "synth")))
    cfg = apply_overrides(cfg, list(overrides or []))
    for organ in ORGANS:
        if organ not in cfg or not isinstance(cfg[organ], dict):
            raise ConfigError(f"synth config needs a '{organ}' section")
    return cfg


def _quota(weights: dict[str, float], n: int) -> list[str]:
    """``n`` names in proportion to ``weights`` (largest remainder), in a fixed order."""
    names = list(weights)
    w = np.array([float(weights[k]) for k in names])
    if (w < 0).any() or w.sum() <= 0:
        raise ConfigError(f"class weights must be non-negative with a positive sum, got {weights}")
    exact = w / w.sum() * n
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return [name for name, c in zip(names, counts) for _ in range(c)]


def assign_labels(organ: str, n: int, seed: int, cfg: dict[str, Any]) -> list[tuple[str, str | None]]:
    """Label (and brain tumour subtype) of each study index, balanced by the config weights.

    Classes are dealt out by quota and shuffled with the run seed, so even a small run holds
    every class with a positive weight once ``n`` is at least the number of classes.
    """
    from medmap.config import load_organ_config

    organ_cfg = load_organ_config(organ)
    ocfg = cfg[organ]
    weights = ocfg.get("class_weights") or {c: 1.0 for c in organ_cfg.classes}
    unknown = set(weights) - set(organ_cfg.classes)
    if unknown:
        raise ConfigError(f"synth config {organ}.class_weights names unknown classes {sorted(unknown)}; "
                          f"the organ config has {organ_cfg.classes}")
    rng = study_rng(seed, organ, 0, stream=2)
    labels = _quota(weights, n)
    labels = [labels[i] for i in rng.permutation(n)]
    out: list[tuple[str, str | None]] = []
    if organ == "brain":
        sub_w = ocfg.get("subtype_weights") or {"high-grade glioma": 1, "low-grade glioma": 1, "metastasis": 1}
        n_t = sum(1 for lab in labels if lab != "normal")
        subs = _quota(sub_w, n_t)
        subs = [subs[i] for i in rng.permutation(n_t)]
        it = iter(subs)
        out = [(lab, None if lab == "normal" else next(it)) for lab in labels]
    else:
        out = [(lab, None) for lab in labels]
    return out


def assign_splits(keys: Sequence[str], seed: int, fractions: dict[str, float], salt: str = "") -> list[str]:
    """Patient-level split stratified by ``keys`` (one key per patient), deterministic.

    Within each stratum the patients are shuffled with the seed; ``val`` and ``test`` get
    their fractions (rounded) and ``train`` the rest.
    """
    fr = {k: float(fractions.get(k, 0.0)) for k in ("train", "val", "test")}
    total = sum(fr.values())
    if total <= 0:
        raise ConfigError(f"split fractions must sum to a positive number, got {fractions}")
    out = [""] * len(keys)
    rng = study_rng(seed, f"split:{salt}", 0)
    for key in sorted(set(keys)):
        idx = [i for i, k in enumerate(keys) if k == key]
        idx = [idx[j] for j in rng.permutation(len(idx))]
        n = len(idx)
        n_test = int(round(n * fr["test"] / total))
        n_val = int(round(n * fr["val"] / total))
        n_train = n - n_val - n_test
        for j, i in enumerate(idx):
            out[i] = "train" if j < n_train else "val" if j < n_train + n_val else "test"
    return out


def _make_study(job: tuple[str, int, int, str, str | None, dict[str, Any], str]) -> dict[str, Any]:
    """Generate and write one study (runs in a worker process)."""
    organ, index, seed, label, subtype, ocfg, out_dir = job
    if organ == "brain":
        from medmap.data.synth.brain import generate_brain_study

        g = generate_brain_study(index, seed, label, subtype, ocfg)
    else:
        from medmap.data.synth.liver import generate_liver_study

        g = generate_liver_study(index, seed, label, ocfg)
    study_id = f"{organ}-{index:04d}"
    folder = Path(out_dir) / study_id
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for mod, vol in g.volumes.items():
        write_nifti(folder / f"{mod}.nii.gz", vol, g.affine_of(mod))
        paths[mod] = f"{study_id}/{mod}.nii.gz"
    write_nifti(folder / "organ_mask.nii.gz", g.organ_mask, g.affine, kind="mask")
    write_nifti(folder / "lesion_mask.nii.gz", g.lesion_mask, g.affine, kind="mask")
    meta = {"generator": "medmom-synth", "seed": seed, "index": index,
            "organ_mask": f"{study_id}/organ_mask.nii.gz", "lesion_mask": f"{study_id}/lesion_mask.nii.gz",
            "spacing_mm": [float(abs(v)) for v in np.diag(g.affine)[:3]],
            "shape": list(next(iter(g.volumes.values())).shape), **g.truth}
    rec = {"study_id": study_id, "patient_id": f"{organ}-P{index:04d}", "organ": organ, "modalities": paths,
           "findings": g.findings, "impression": g.impression, "label": g.label, "meta": meta}
    if g.lesion_boxes:
        rec["lesion_box"] = {"space": "voxel", "boxes": g.lesion_boxes}
    # the masks are on the base grid: an roi_mask crop needs every phase on it too
    rec["roi_mask"] = None if g.affines else meta["organ_mask"]
    return rec


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def generate(
    out: str | Path,
    organs: Iterable[str],
    n: int | Mapping[str, int],
    seed: int = 0,
    config: dict[str, Any] | None = None,
    workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate ``n`` studies per organ into ``out`` and write ``out/studies.jsonl``.

    Args:
        out: output folder (created).
        organs: any of ``brain``, ``liver``.
        n: number of studies per organ, or organ -> number.
        seed: run seed; the same seed and config give byte-identical files.
        config: synth config (:func:`load_synth_config`); default when ``None``.
        workers: worker processes (default: the config's ``workers``); 1 runs in-process.
        progress: show a tqdm progress bar.

    Returns:
        Path of the written study list.
    """
    from tqdm import tqdm

    organs = list(organs)
    bad = [o for o in organs if o not in ORGANS]
    if bad:
        raise ConfigError(f"unknown organ(s) {bad}; choose from {list(ORGANS)} or 'all'")
    counts = {o: int(n[o]) if isinstance(n, Mapping) and o in n else n for o in organs}
    if isinstance(n, Mapping) and set(organs) - set(n):
        raise ConfigError(f"no study count for organ(s) {sorted(set(organs) - set(n))}")
    if any(not isinstance(c, int) or c < 1 for c in counts.values()):
        raise ConfigError(f"--n must be at least 1 per organ, got {n}")
    cfg = config if config is not None else load_synth_config()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    strata: list[str] = []
    for organ in organs:
        for index, (label, subtype) in enumerate(assign_labels(organ, counts[organ], seed, cfg)):
            jobs.append((organ, index, int(seed), label, subtype, cfg[organ], str(out)))
            strata.append(f"{organ}|{label}|{subtype or ''}")
    workers = int(workers if workers is not None else cfg.get("workers", 2))
    workers = max(1, min(workers, len(jobs), os.cpu_count() or 1))
    records: list[dict[str, Any]] = []
    bar = tqdm(total=len(jobs), desc="medmap synth", unit="study", disable=not progress)
    if workers == 1:
        for job in jobs:
            records.append(_make_study(job))
            bar.update(1)
    else:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_init_worker) as pool:
            for rec in pool.imap(_make_study, jobs, chunksize=1):
                records.append(rec)
                bar.update(1)
    bar.close()
    splits = assign_splits(strata, seed, cfg.get("split", {"train": 0.6, "val": 0.2, "test": 0.2}))
    studies = []
    for rec, split in zip(records, splits):
        studies.append(Study(
            study_id=rec["study_id"], patient_id=rec["patient_id"], organ=rec["organ"],
            modalities={m: out / p for m, p in rec["modalities"].items()}, findings=rec["findings"],
            impression=rec["impression"], label=rec["label"], split=split, meta=rec["meta"],
            # the organ's mask, for organ configs with crop: roi_mask (when the phases share its grid)
            roi_mask=None if rec["roi_mask"] is None else out / rec["roi_mask"],
            lesion_box=LesionBox.from_json(rec["lesion_box"], rec["study_id"]) if "lesion_box" in rec else None,
        ))
    return write_study_list(studies, out / "studies.jsonl")

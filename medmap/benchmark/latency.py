"""``latency`` section: how long a user waits for one prediction, from ``.nii.gz`` files to probabilities.

Two studies, each predicted by a freshly initialised run folder of its built-in fine-tuning
config (:func:`~medmap.benchmark.sections.make_run_folder`):

* **brain**: a 4-sequence head study written as 1 mm int16 ``.nii.gz`` (182 x 218 x 182,
  :func:`~medmap.benchmark.sections.write_brain_study`; 2 mm with ``--quick``), through
  ``configs/finetune/brain.yaml`` (organ config ``brain_4mm``: resampled to 4 mm). Target
  :data:`BRAIN_TARGET_S`;
* **liver**: one lesion of the lesion-level synthetic benchmark (``medmap synth --config
  lesion``: 8 phases, each on its own grid, a lesion box per phase), through
  ``configs/finetune/liver.yaml`` (organ config ``liver``, ``crop: lesion_box``). Target
  :data:`LIVER_TARGET_S`.

For each: one cold call, then the median of N warm calls of
``MedMAPPredictor.predict(paths, saliency_dir=None)`` (wall time), and a breakdown into the
stages of the shared preprocessing, each timed on its own with the same functions
(median of the same N): reading and decompressing the files, the volume checks
(:func:`~medmap.data.validate.check_volume` less the decompression), geometry (reorientation
and resampling; for the liver, cutting each phase around its box), foreground mask and
normalisation, and the model. ``other`` is the end-to-end time less the stages.

Usage::

    python -m medmap.benchmark --sections latency [--threads N] [--iters N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from medmap.benchmark.sections import FinetuneSetup, _fmt_s, load_run, make_run_folder, write_brain_study
from medmap.config import OrganConfig
from medmap.data.loading import GZIP_BACKEND, gunzip, map_ordered, read_threads
from medmap.data.studylist import LesionBox

#: Brain (4 sequences, 1 mm input, 4 mm model grid): .nii.gz paths to probabilities.
BRAIN_TARGET_S = 0.300
#: Liver lesion (8 phases, lesion boxes): .nii.gz paths to probabilities.
LIVER_TARGET_S = 0.150

#: Transforms of :func:`medmap.data.preprocess.build_preprocessing` by stage.
_GEOMETRY = {"EnsureChannelFirstd", "Orientationd", "StridedSpacingd", "Spacingd"}


def write_liver_lesion_study(root: Path, seed: int = 0) -> tuple[dict[str, Path], LesionBox]:
    """One lesion-level liver study (8 phases, each on its own grid, a box per phase), as the
    synthetic ``lesion`` benchmark writes it; returns its paths and lesion box."""
    from medmap.data.synth.generate import generate, load_synth_config  # noqa: PLC0415

    listing = generate(root, organs=["liver"], n=1, seed=seed, config=load_synth_config("lesion"), workers=1,
                       progress=False)
    rec = json.loads(Path(listing).read_text().splitlines()[0])
    paths = {m: (root / p if not Path(p).is_absolute() else Path(p)) for m, p in rec["modalities"].items()}
    return paths, LesionBox.from_json(rec["lesion_box"], "lesion_box")


def _median_times(fn: Callable[[], dict[str, float]], n: int) -> dict[str, float]:
    runs: dict[str, list[float]] = defaultdict(list)
    for _ in range(max(1, n)):
        for k, v in fn().items():
            runs[k].append(v)
    return {k: statistics.median(v) for k, v in runs.items()}


def stage_times(paths: Mapping[str, Path], organ: OrganConfig, lesion_box: LesionBox | None = None) -> dict[str, float]:
    """One pass of the preprocessing stages, each timed on its own (seconds).

    The same functions the preprocessing calls, in the same (threaded) way; the stages run
    one after the other here, so their sum is close to, not exactly, the end-to-end time.
    """
    from medmap.data import preprocess as pp  # noqa: PLC0415
    from medmap.data.lesion import cut_lesion_patch  # noqa: PLC0415
    from medmap.data.validate import check_volume  # noqa: PLC0415

    files = [Path(paths[m]) for m in organ.modalities if m in paths]
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    map_ordered(lambda p: gunzip(p.read_bytes()) if p.name.endswith(".gz") else p.read_bytes(), files)
    out["read_decompress_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    imgs = map_ordered(check_volume, files)
    out["checks_s"] = max(0.0, time.perf_counter() - t0 - out["read_decompress_s"])
    if organ.lesion_level:
        assert lesion_box is not None, "a lesion-level organ config needs a lesion box"
        mods = [m for m in organ.modalities if m in paths]
        t0 = time.perf_counter()
        map_ordered(lambda mi: cut_lesion_patch(imgs[mi[0]], lesion_box.for_modality(mi[1]), lesion_box.space,
                                                organ.margin_mm, organ.roi_size, organ.patch_norm),
                    list(enumerate(mods)))
        out["geometry_s"] = time.perf_counter() - t0  # cut around the box, resample and normalise
        out["mask_normalise_s"] = 0.0
        return out
    from monai.data import MetaTensor  # noqa: PLC0415

    data = {}
    for m, img in zip([m for m in organ.modalities if m in paths], imgs):
        voxels = np.asarray(img.get_fdata(dtype=np.float32))
        data[m] = MetaTensor(torch.from_numpy(voxels), affine=torch.from_numpy(np.asarray(img.affine, np.float64)),
                             meta={"filename_or_obj": "", "space": "RAS"})
    geometry = mask = 0.0
    for transform in pp.build_preprocessing(organ).transforms:
        t0 = time.perf_counter()
        data = transform(data)
        dt = time.perf_counter() - t0
        if type(transform).__name__ in _GEOMETRY:
            geometry += dt
        else:
            mask += dt
    out["geometry_s"], out["mask_normalise_s"] = geometry, mask
    return out


def measure_latency(run_dir: Path, paths: Mapping[str, Path], iters: int, target_s: float,
                    lesion_box: LesionBox | None = None) -> dict[str, Any]:
    """End-to-end ``predict`` latency (cold, then median of ``iters`` warm calls) and its stages."""
    t0 = time.perf_counter()
    predictor = load_run(run_dir, device="cpu")
    load_s = time.perf_counter() - t0

    def call() -> tuple[float, Any]:
        t = time.perf_counter()
        pred = predictor.predict(paths, saliency_dir=None, lesion_box=lesion_box)
        return time.perf_counter() - t, pred

    cold_s, cold = call()
    warm = [call() for _ in range(max(1, iters))]
    total = statistics.median(t for t, _ in warm)
    stages = _median_times(lambda: stage_times(paths, predictor.organ, lesion_box), iters)
    stages["model_s"] = statistics.median(p.model_seconds for _, p in warm)
    stages["other_s"] = max(0.0, total - sum(stages.values()))
    return {"load_run_s": load_s, "cold_s": cold_s, "cold_model_s": cold.model_seconds, "total_s": total,
            "min_s": min(t for t, _ in warm), "preprocess_s": statistics.median(p.preprocess_seconds for _, p in warm),
            "n": len(warm), "stages": stages, "target_s": target_s, "meets_target": total <= target_s,
            "precision": predictor.precision}


def _print(name: str, desc: str, r: Mapping[str, Any]) -> None:
    s = r["stages"]
    print(f" {name}: {desc}")
    print(f"  load_run {_fmt_s(r['load_run_s'])}; cold call {_fmt_s(r['cold_s'])} (model {_fmt_s(r['cold_model_s'])})")
    print(f"  median of {r['n']} warm calls: {_fmt_s(r['total_s'])} (min {_fmt_s(r['min_s'])}) = "
          f"read+decompress {_fmt_s(s['read_decompress_s'])} + checks {_fmt_s(s['checks_s'])} + geometry "
          f"{_fmt_s(s['geometry_s'])} + mask+normalise {_fmt_s(s['mask_normalise_s'])} + model {_fmt_s(s['model_s'])} "
          f"+ other {_fmt_s(s['other_s'])}")
    print(f"  target {_fmt_s(r['target_s'])}: {'met' if r['meets_target'] else 'NOT met'}")


def section_latency(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Prediction latency of a brain and a lesion-level liver study (see the module docstring)."""
    quick = bool(getattr(args, "quick", False))
    iters = int(getattr(args, "iters", None) or (2 if quick else 5))
    threads = torch.get_num_threads()
    brain_desc = "4 sequences, " + ("2 mm 99x117x95" if quick else "1 mm 182x218x182") + \
        " int16 .nii.gz, configs/finetune/brain.yaml (brain_4mm)"
    print(f"\n== Prediction latency, .nii.gz files to probabilities (torch threads {threads}, read threads "
          f"{read_threads(8)}, gzip {GZIP_BACKEND}) ==")
    out: dict[str, Any] = {"torch_threads": threads, "read_threads": read_threads(8), "gzip_backend": GZIP_BACKEND,
                           "iters": iters}
    with tempfile.TemporaryDirectory(prefix="medmap-latency-") as tmp:
        work = Path(tmp)
        brain_paths = write_brain_study(work / "brain_study", quick=quick)
        brain_run = make_run_folder(work / "run_brain", FinetuneSetup("brain"))
        out["brain"] = {"input": brain_desc, **measure_latency(brain_run, brain_paths, iters, BRAIN_TARGET_S)}
        _print("brain", brain_desc, out["brain"])
        liver_paths, box = write_liver_lesion_study(work / "liver_study")
        liver_desc = (f"{len(liver_paths)} phases on their own grids (synth lesion config), lesion box per phase, "
                      "configs/finetune/liver.yaml (liver, crop: lesion_box)")
        liver_run = make_run_folder(work / "run_liver", FinetuneSetup("liver"))
        out["liver"] = {"input": liver_desc, **measure_latency(liver_run, liver_paths, iters, LIVER_TARGET_S, box)}
        _print("liver", liver_desc, out["liver"])
    res["latency"] = out

"""Time the preprocessing of one 4-sequence brain study at 1 mm, cold and from the cache.

Writes a synthetic head-like study (182 x 218 x 182 voxels, 1 mm isotropic, LPS-like
affine, float32 .nii.gz: scalp, skull, grey/white matter, ventricles, noise; a different
contrast per sequence) into a temporary folder, then measures with the built-in brain
organ config (2 mm, ROI 80 x 96 x 80):

* ``uncached``: ``preprocess_study(study, "brain")`` (read + check + transforms);
* ``cold``: first call with an empty ``PreprocessCache`` and no memoised file hashes
  (hash files + preprocess + write the entry);
* ``warm``: the same call again (a later epoch: stat files, read one safetensors entry);
* ``warm, new process``: a cache hit after forgetting the in-memory hash memo (as in a new
  data-loader worker; hashes come from the cache's on-disk memo).

Also reports the largest error of the float16 rounding of the output.

Usage:
    python benchmarks/preprocess_timing.py [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medmap.config import load_organ_config
from medmap.data import preprocess as pp
from medmap.data.cache import PreprocessCache, clear_hash_memo
from medmap.data.studylist import Study

SHAPE = (182, 218, 182)
# tissue intensities per sequence: scalp, skull, csf, grey, white
CONTRAST = {
    "t1": (600, 80, 150, 450, 650),
    "t1ce": (620, 80, 160, 470, 660),
    "t2": (400, 60, 900, 550, 350),
    "flair": (450, 60, 120, 520, 380),
}


def head_study(root: Path, seed: int = 0) -> Study:
    rng = np.random.default_rng(seed)
    grid = np.meshgrid(*[np.arange(s, dtype=np.float32) - (s - 1) / 2 for s in SHAPE], indexing="ij")

    def ellipsoid(rx: float, ry: float, rz: float, dx: float = 0.0) -> np.ndarray:
        return ((grid[0] - dx) / rx) ** 2 + (grid[1] / ry) ** 2 + (grid[2] / rz) ** 2 < 1

    scalp, skull, brain = ellipsoid(75, 95, 80), ellipsoid(70, 90, 75), ellipsoid(64, 84, 68)
    white = ellipsoid(45, 65, 48)
    ventricles = ellipsoid(8, 25, 12, dx=-10) | ellipsoid(8, 25, 12, dx=10)
    tissue = np.zeros(SHAPE, np.int8)
    tissue[scalp], tissue[skull], tissue[brain], tissue[white], tissue[ventricles] = 1, 2, 4, 5, 3
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    affine[:3, 3] = [90.0, 126.0, -72.0]
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for m, values in CONTRAST.items():
        lut = np.array((0.0, *values), np.float32)
        x = lut[tissue] + np.abs(rng.normal(0, 15, SHAPE)).astype(np.float32)
        paths[m] = root / f"{m}.nii.gz"
        nib.save(nib.Nifti1Image(x, affine), str(paths[m]))
    return Study("bench-0", "P0", "brain", paths)


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    organ = load_organ_config("brain")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        study = head_study(root / "study")
        print(f"wrote 4 x {SHAPE} float32 .nii.gz in {time.perf_counter() - t:.1f} s "
              f"({sum(p.stat().st_size for p in study.modalities.values()) / 2**20:.0f} MiB)")
        pp.preprocess_study(study, organ)  # warm up imports and allocators

        t_uncached, ref = timed(lambda: pp.preprocess_study(study, organ), args.repeats)

        def cold():
            clear_hash_memo()
            cache = PreprocessCache(Path(tempfile.mkdtemp(dir=root)))
            return pp.preprocess_study(study, organ, cache=cache)

        t_cold, _ = timed(cold, args.repeats)
        cache = PreprocessCache(root / "cache")
        pp.preprocess_study(study, organ, cache=cache)
        t_warm, hit = timed(lambda: pp.preprocess_study(study, organ, cache=cache), args.repeats)

        def warm_new_process():
            clear_hash_memo()
            return pp.preprocess_study(study, organ, cache=cache)

        t_rehash, _ = timed(warm_new_process, args.repeats)
        assert all(torch.equal(hit[k], ref[k]) for k in ("images", "present", "affine"))

        t_load, _ = timed(lambda: [pp.check_volume(p) for p in study.modalities.values()], args.repeats)
        exact = pp._compute(study.modalities, organ, round_float16=False)["images"]
        err = (exact - ref["images"]).abs()
        entry = next((root / "cache").rglob("*.safetensors"))

        print(f"torch threads: {torch.get_num_threads()}; output {tuple(ref['images'].shape)}; median of {args.repeats}")
        print(f"  read+check 4 NIfTI (check_volume) : {t_load:7.3f} s")
        print(f"  uncached preprocess_study         : {t_uncached:7.3f} s")
        print(f"  cold, empty cache (hash+prep+save): {t_cold:7.3f} s")
        print(f"  warm cache (later epoch)          : {t_warm * 1e3:7.1f} ms")
        print(f"  warm cache, new process           : {t_rehash * 1e3:7.1f} ms")
        print(f"  cache entry size                  : {entry.stat().st_size / 2**20:.1f} MiB (float16)")
        fg = exact != 0
        print(f"  float16 rounding: max abs error {float(err.max()):.2e} "
              f"(z range {float(exact[fg].min()):.2f}..{float(exact[fg].max()):.2f}), "
              f"max rel error {float((err[fg] / exact[fg].abs().clamp_min(1e-3)).max()):.2e}")


if __name__ == "__main__":
    main()

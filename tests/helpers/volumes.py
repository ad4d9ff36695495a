"""Tiny synthetic NIfTI studies for the data-layer tests (written into ``tmp_path``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from medmap.config import OrganConfig
from medmap.data.studylist import Study, write_study_list

#: An LPS-like, anisotropic affine: voxel i runs right-to-left, j anterior-to-posterior.
LPS_AFFINE = np.array(
    [[-1.5, 0.0, 0.0, 30.0], [0.0, -1.5, 0.0, 27.0], [0.0, 0.0, 3.0, -30.0], [0.0, 0.0, 0.0, 1.0]]
)
SHAPE = (40, 36, 20)


def toy_organ(**overrides: Any) -> OrganConfig:
    """A small 3-modality organ so tests run in milliseconds."""
    d: dict[str, Any] = dict(
        name="toy",
        modalities=["t1", "t2", "flair"],
        classes=["normal", "tumour"],
        spacing=(2.0, 2.0, 2.0),
        roi_size=(24, 24, 16),
        min_modalities=1,
    )
    d.update(overrides)
    return OrganConfig(**d)


def head_volume(seed: int = 0, scale: float = 100.0, marker: bool = True, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """An ellipsoid 'head' with noise, plus a bright marker at low voxel index i (low j)."""
    rng = np.random.default_rng(seed)
    ii, jj, kk = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij")
    c = [(s - 1) / 2 for s in shape]
    r = [0.4 * s for s in shape]
    body = sum(((g - ci) / ri) ** 2 for g, ci, ri in zip((ii, jj, kk), c, r)) < 1
    x = np.where(body, scale, 0.0).astype(np.float32)
    x += np.abs(rng.normal(0.0, 0.02 * scale, shape)).astype(np.float32)
    if marker:  # inside the ellipsoid, near voxel index i = 0.25 * X
        i0, j0, k0 = int(0.25 * shape[0]), int(0.3 * shape[1]), int(0.5 * shape[2])
        x[i0 - 3 : i0 + 3, j0 - 3 : j0 + 3, k0 - 2 : k0 + 2] = 3 * scale
    return x


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray = LPS_AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def write_raw_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write a .nii whose sform is exactly ``affine``, even when nibabel would refuse it (NaN, singular)."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(data.shape)
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = affine[0], affine[1], affine[2]
    with open(path, "wb") as f:
        hdr.write_to(f)
        f.write(b"\0" * (352 - f.tell()))
        f.write(np.asarray(data, dtype="<f4").tobytes(order="F"))
    return path


def make_study(
    root: Path,
    study_id: str,
    modalities: tuple[str, ...] = ("t1", "t2", "flair"),
    patient_id: str | None = None,
    label: str | None = "normal",
    split: str | None = None,
    organ: str = "toy",
    seed: int = 0,
) -> Study:
    """Write one study's volumes (same grid, different contrasts) and return its Study."""
    paths = {}
    for n, m in enumerate(modalities):
        data = head_volume(seed=seed + n, scale=100.0 * (n + 1))
        paths[m] = write_nifti(root / study_id / f"{m}.nii.gz", data)
    return Study(
        study_id=study_id,
        patient_id=patient_id or f"P-{study_id}",
        organ=organ,
        modalities=paths,
        findings={m: f"{m} findings of {study_id}" for m in modalities},
        impression=f"impression of {study_id}",
        label=label,
        split=split,
    )


def write_list(root: Path, studies: list[Study], name: str = "studies.jsonl") -> Path:
    return write_study_list(studies, root / name)

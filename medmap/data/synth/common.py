"""Building blocks shared by the brain and liver generators of MedMoM-Synth.

Everything here is vectorised (NumPy/SciPy/PyTorch on whole volumes, never Python loops
over voxels) and deterministic given a :class:`numpy.random.Generator`.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from medmap.utils import atomic_write_bytes

#: gzip level for the NIfTI files: noisy int16 data barely compresses better at higher
#: levels, while level 1 is several times faster.
GZIP_LEVEL = 1


def study_rng(seed: int, organ: str, index: int, stream: int = 0) -> np.random.Generator:
    """The random generator of one study, derived from ``(seed, organ, index, stream)``.

    Each study has its own stream, so a study's volumes and texts do not depend on how
    many studies are generated, in which order, or by which worker process. ``stream``
    separates independent uses (0: images, 1: texts).

    Example:
        >>> a = study_rng(0, "brain", 3).random()
        >>> a == study_rng(0, "brain", 3).random()
        True
    """
    organ_code = zlib.crc32(organ.encode("utf-8"))
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, organ_code, int(index), stream]))


def smooth_field(rng: np.random.Generator, shape: tuple[int, int, int], coarse: tuple[int, int, int]) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: white noise on a coarse grid, upsampled.

    Args:
        rng: random generator.
        shape: output shape (voxels).
        coarse: shape of the coarse control grid; smaller means smoother.

    Returns:
        float32 array of ``shape``, roughly zero-mean with standard deviation below one.
    """
    low = torch.from_numpy(rng.standard_normal((1, 1, *coarse)).astype(np.float32))
    up = F.interpolate(low, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=True)
    return up[0, 0].numpy()


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Numerically safe logistic function (float32)."""
    return (0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float32)))).astype(np.float32)


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator, where: np.ndarray | None = None) -> np.ndarray:
    """Magnitude of a complex signal with Gaussian noise in both channels (Rician noise).

    Args:
        signal: noise-free magnitude image.
        sigma: noise standard deviation per channel.
        rng: random generator.
        where: optional boolean mask; noise is added only there (e.g. inside a skull-stripped
            brain), the rest is returned unchanged.
    """
    if where is not None:
        out = signal.astype(np.float32, copy=True)
        out[where] = rician(signal[where], sigma, rng)
        return out
    n1 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    n2 = rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(sigma)
    return np.sqrt((signal + n1) ** 2 + n2**2).astype(np.float32)


def bias_field(rng: np.random.Generator, shape: tuple[int, int, int], strength: float) -> np.ndarray:
    """A smooth multiplicative intensity non-uniformity, ``exp(strength * field)``."""
    return np.exp(np.float32(strength) * smooth_field(rng, shape, (3, 3, 3))).astype(np.float32)


def partial_volume(img: np.ndarray, sigma_vox: float | tuple[float, ...]) -> np.ndarray:
    """Blur by the point-spread function (partial-volume effect)."""
    return ndimage.gaussian_filter(img, sigma=sigma_vox, mode="nearest").astype(np.float32)


def ghosting(img: np.ndarray, num_ghosts: int, axis: int, intensity: float) -> np.ndarray:
    """Periodic ghosting artefact (TorchIO's deterministic :class:`torchio.Ghosting`)."""
    import torchio as tio

    t = tio.Ghosting(num_ghosts=int(num_ghosts), axis=int(axis), intensity=float(intensity), restore=0.02)
    out = t(tio.ScalarImage(tensor=torch.from_numpy(img[None].copy())))
    return np.abs(out.data[0].numpy()).astype(np.float32)


def motion(img: np.ndarray, affine: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Rigid-motion artefact (TorchIO's deterministic :class:`torchio.Motion`, k-space mixing).

    ``strength`` scales the random rotations (degrees) and translations (mm).
    """
    import torchio as tio

    n = int(rng.integers(1, 3))
    degrees = rng.uniform(-1, 1, size=(n, 3)) * strength * 3.0
    translation = rng.uniform(-1, 1, size=(n, 3)) * strength * 3.0
    times = np.sort(rng.uniform(0.55, 0.95, size=n))
    t = tio.Motion(degrees=degrees, translation=translation, times=times, image_interpolation="linear")
    out = t(tio.ScalarImage(tensor=torch.from_numpy(img[None].copy()), affine=affine))
    return np.abs(out.data[0].numpy()).astype(np.float32)


def nifti_bytes(data: np.ndarray, affine: np.ndarray, kind: str = "image") -> bytes:
    """Deterministic gzip-compressed NIfTI-1 bytes.

    Images are stored as int16 with an ``scl_slope`` chosen by nibabel; masks as uint8.
    The gzip header carries no time stamp and no file name (``mtime=0``), so the same array
    always gives the same bytes.
    """
    if kind == "mask":
        arr = np.asarray(data, dtype=np.uint8)
        img = nib.Nifti1Image(arr, affine)
        img.set_data_dtype(np.uint8)
    else:
        arr = np.asarray(data, dtype=np.float32)
        img = nib.Nifti1Image(arr, affine)
        img.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    raw = img.to_bytes()
    return gzip.compress(raw, compresslevel=GZIP_LEVEL, mtime=0)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, kind: str = "image") -> Path:
    """Write :func:`nifti_bytes` atomically to ``path``."""
    return atomic_write_bytes(path, nifti_bytes(data, affine, kind))


@dataclass
class GeneratedStudy:
    """What one organ generator returns for one study, before it is written to disk.

    Attributes:
        volumes: modality -> float32 volume (X, Y, Z).
        affine: voxel -> RAS mm.
        organ_mask: uint8 organ mask (brain or liver).
        lesion_mask: uint8 mask of all lesion tissue (zeros for normal studies).
        label: class name of the organ's task.
        findings: modality -> findings text.
        impression: impression text.
        truth: generator ground truth, stored in the study's ``meta``.
        affines: modality -> its own voxel -> RAS mm matrix, when the modalities lie on
            different grids (``phase_grids``); empty when every volume is on ``affine``.
        lesion_boxes: modality -> inclusive voxel box ``[x0, y0, z0, x1, y1, z1]`` of the
            (largest) lesion on that modality's grid; empty for studies without a lesion.
    """

    volumes: dict[str, np.ndarray]
    affine: np.ndarray
    organ_mask: np.ndarray
    lesion_mask: np.ndarray
    label: str
    findings: dict[str, str]
    impression: str
    truth: dict[str, Any] = field(default_factory=dict)
    affines: dict[str, np.ndarray] = field(default_factory=dict)
    lesion_boxes: dict[str, list[int]] = field(default_factory=dict)

    def affine_of(self, modality: str) -> np.ndarray:
        """The voxel -> RAS mm matrix of one modality's volume."""
        return self.affines.get(modality, self.affine)


def mask_box(mask: np.ndarray) -> list[int] | None:
    """Inclusive voxel box ``[x0, y0, z0, x1, y1, z1]`` of the non-zero voxels, ``None`` if empty.

    >>> m = np.zeros((5, 5, 5), bool); m[1:3, 2, 0:4] = True
    >>> mask_box(m)
    [1, 2, 0, 2, 2, 3]
    """
    idx = np.argwhere(mask)
    if len(idx) == 0:
        return None
    return [int(v) for v in idx.min(axis=0)] + [int(v) for v in idx.max(axis=0)]


def ball_coords(shape: tuple[int, int, int], centre_vox: np.ndarray, radius_vox: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
    """A bounding box around an ellipsoid and the voxel offsets (in voxels) inside it.

    Returns:
        ``(slices, offsets)`` with ``offsets`` of shape ``(3, bx, by, bz)`` holding the
        voxel coordinates relative to ``centre_vox``.
    """
    lo = np.maximum(np.floor(centre_vox - radius_vox).astype(int), 0)
    hi = np.minimum(np.ceil(centre_vox + radius_vox).astype(int) + 1, np.array(shape))
    lo = np.minimum(lo, hi - 1)
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    grids = np.meshgrid(*[np.arange(s.start, s.stop, dtype=np.float32) for s in sl], indexing="ij")
    offsets = np.stack([g - np.float32(c) for g, c in zip(grids, centre_vox)])
    return sl, offsets


def blob(
    rng: np.random.Generator,
    offsets_mm: np.ndarray,
    radii_mm: np.ndarray,
    irregularity: float,
) -> np.ndarray:
    """Normalised radial distance of a randomly shaped blob (1.0 on its boundary).

    The ellipsoid distance is perturbed by a smooth random field, giving lobulated or
    irregular margins for ``irregularity`` about 0.05-0.3.
    """
    d = np.sqrt(np.sum((offsets_mm / radii_mm.reshape(3, 1, 1, 1).astype(np.float32)) ** 2, axis=0))
    if irregularity > 0:
        shp = d.shape
        coarse = tuple(max(2, min(5, s // 2 + 1)) for s in shp)
        d = d * (1.0 + np.float32(irregularity) * smooth_field(rng, shp, coarse))  # type: ignore[arg-type]
    return d.astype(np.float32)


def to_python(obj: Any) -> Any:
    """Convert NumPy scalars/arrays inside nested containers to JSON-ready Python values."""
    if isinstance(obj, dict):
        return {str(k): to_python(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_python(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_python(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return round(float(obj), 4)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj

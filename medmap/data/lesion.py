"""Lesion-level input: cut each modality around its own lesion box into a fixed-size patch.

Real multi-phase liver data (LLD-MMRI, ``../shared/design/REALDATA.md``) comes as one series
per phase, each on its own voxel grid, with a 3D lesion box per series, or as lesion patches
already cut around that box. The model classifies what is in the box. For each modality:

1. the box (voxel indices of that modality's file, or world mm) becomes an axis-aligned box
   in world RAS millimetres, widened by the organ config's context margin (``margin_mm``);
2. that region is sampled on a ``roi_size`` grid of voxel centres (trilinear, after a
   Gaussian anti-aliasing blur where the patch is coarser than the file; zero outside the
   file, as the challenge's own crops are zero-padded). The patch axes are RAS whatever the
   file's orientation, and the box is stretched to the patch: a 10 mm cyst and an 80 mm
   HCC both fill it;
3. the patch is normalised (``patch_norm``): ``context`` divides by the median of the
   *context ring* (patch voxels outside the box, i.e. the tissue around the lesion, mostly
   liver) and subtracts 1, so 0 is "like the surrounding liver", +2 "three times as bright"
   (how radiologists read signal: relative to the parenchyma, per phase); ``zscore`` is a
   robust z-score over the patch.

Modalities need not share a grid: each is cut around its own box. A file that is already a
lesion patch (``crop: patch``) is its own region; its outer ``margin_mm`` shell is the
context ring.

Example:
    >>> import nibabel as nib, numpy as np
    >>> img = nib.Nifti1Image(np.random.default_rng(0).random((40, 40, 20), dtype=np.float32) + 1, np.diag([2, 2, 5, 1.0]))
    >>> cut = cut_lesion_patch(img, (15, 15, 8, 24, 24, 11), "voxel", (8, 8, 10), (16, 16, 8))
    >>> cut.image.shape, round(float(np.median(cut.image[cut.context])), 3)
    ((16, 16, 8), 0.0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import nibabel as nib
import numpy as np
from scipy import ndimage

from medmap.errors import VolumeError

#: Normalisations of a lesion patch (``OrganConfig.patch_norm``).
PATCH_NORMS = ("context", "zscore")
#: Normalised values are clipped to +-this (a cyst on T2 is about +3 in ``context`` units).
PATCH_CLIP = 8.0
#: Tolerance, in voxels, for a box edge lying outside its file.
BOX_TOLERANCE_VOXELS = 0.5


@dataclass
class LesionPatch:
    """One modality cut around its box.

    Attributes:
        image: normalised patch ``roi_size`` (float32).
        affine: patch voxel -> world RAS mm.
        inside: bool, patch voxels inside the box (the lesion region).
        context: bool, the context ring: inside the file and outside the box.
    """

    image: np.ndarray
    affine: np.ndarray
    inside: np.ndarray
    context: np.ndarray


def world_box(box: Sequence[float], space: str, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The axis-aligned world (RAS mm) extent ``(lo, hi)`` of a box.

    A voxel box covers its voxels whole: ``x0 .. x1`` inclusive spans voxel edges
    ``x0 - 0.5 .. x1 + 0.5``; its 8 corners are mapped through the affine.
    """
    b = np.asarray(box, dtype=np.float64)
    if space == "world":
        return np.minimum(b[:3], b[3:]), np.maximum(b[:3], b[3:])
    lo, hi = b[:3] - 0.5, b[3:] + 0.5
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    world = (np.asarray(affine, np.float64) @ corners.T).T[:, :3]
    return world.min(axis=0), world.max(axis=0)


def check_box(box: Sequence[float], space: str, shape: Sequence[int], affine: np.ndarray) -> None:
    """Check that a box has a positive size and lies inside the volume.

    Raises:
        VolumeError: saying what is wrong (the caller prefixes the file or study).
    """
    b = np.asarray(box, dtype=np.float64)
    shape3 = np.asarray(shape[:3], dtype=np.float64)
    if space == "voxel":
        if np.any(b[:3] < -BOX_TOLERANCE_VOXELS) or np.any(b[3:] > shape3 - 1 + BOX_TOLERANCE_VOXELS):
            raise VolumeError(f"lesion box {b.tolist()} (voxel indices) lies outside the volume of shape "
                              f"{tuple(int(s) for s in shape3)}")
        return
    if np.any(b[3:] - b[:3] <= 0):
        raise VolumeError(f"lesion box {b.tolist()} (world mm) has zero size along an axis")
    inv = np.linalg.inv(np.asarray(affine, np.float64))
    lo, hi = b[:3], b[3:]
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    vox = (inv @ corners.T).T[:, :3]
    tol = BOX_TOLERANCE_VOXELS + 0.5
    if np.any(vox < -tol) or np.any(vox > shape3 - 1 + tol):
        raise VolumeError(f"lesion box {b.tolist()} (world mm) lies outside the volume (its corners fall at voxel "
                          f"indices {np.round(vox.min(axis=0), 1).tolist()} .. {np.round(vox.max(axis=0), 1).tolist()} "
                          f"of a volume of shape {tuple(int(s) for s in shape3)})")


def patch_box(shape: Sequence[int], affine: np.ndarray, margin_mm: Sequence[float]) -> tuple[float, ...]:
    """The voxel box of an already-cut patch: the whole file less its ``margin_mm`` shell."""
    spacing = np.linalg.norm(np.asarray(affine, np.float64)[:3, :3], axis=0)
    # the world margin of each RAS axis, on the file axis that runs along it
    axis_of = np.abs(np.asarray(affine, np.float64)[:3, :3]).argmax(axis=0)
    margin_vox = np.array([float(margin_mm[axis_of[k]]) / spacing[k] for k in range(3)])
    last = np.asarray(shape[:3], dtype=np.float64) - 1
    lo = np.minimum(np.floor(margin_vox), np.floor(last / 2))
    hi = np.maximum(last - np.floor(margin_vox), np.ceil(last / 2))
    return (*lo.tolist(), *hi.tolist())


def _sample(data: np.ndarray, coords: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Trilinear samples of ``data`` at voxel ``coords`` [3, N], blurred by ``sigma`` voxels
    first (anti-aliasing), computed on the sub-block the samples touch; 0 outside."""
    pad = np.ceil(3 * sigma).astype(int) + 2
    lo = np.maximum(np.floor(coords.min(axis=1)).astype(int) - pad, 0)
    hi = np.minimum(np.ceil(coords.max(axis=1)).astype(int) + pad + 1, np.asarray(data.shape))
    if np.any(hi <= lo):  # entirely outside the file
        return np.zeros(coords.shape[1], np.float32)
    block = np.asarray(data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], dtype=np.float32)
    if np.any(sigma > 0):
        block = ndimage.gaussian_filter(block, sigma=sigma, mode="nearest")
    local = coords - lo.reshape(3, 1)
    # order 1 with zero padding beyond the file; a half-voxel rim interpolates towards the edge value
    inside = np.all((coords >= -0.5) & (coords <= np.asarray(data.shape).reshape(3, 1) - 0.5), axis=0)
    out = ndimage.map_coordinates(block, np.clip(local, 0, np.asarray(block.shape).reshape(3, 1) - 1), order=1)
    return np.where(inside, out, 0.0).astype(np.float32)


def cut_lesion_patch(
    img: nib.Nifti1Image,
    box: Sequence[float],
    space: str,
    margin_mm: Sequence[float],
    roi_size: Sequence[int],
    norm: str = "context",
) -> LesionPatch:
    """Cut, resample and normalise one modality around its lesion box (see the module docstring).

    Args:
        img: the modality's volume (as returned by :func:`medmap.data.validate.check_volume`).
        box: ``(x0, y0, z0, x1, y1, z1)``.
        space: ``voxel`` or ``world``.
        margin_mm: context kept around the box on each side, per RAS axis.
        roi_size: patch shape in voxels.
        norm: ``context`` or ``zscore``.

    Raises:
        VolumeError: the box lies outside the volume, or the context is empty or not positive
            (``context`` needs magnitude images).
    """
    if norm not in PATCH_NORMS:
        raise VolumeError(f"patch_norm must be one of {', '.join(PATCH_NORMS)}, got {norm!r}")
    affine = np.asarray(img.affine, dtype=np.float64)
    data = np.asarray(img.dataobj, dtype=np.float32).reshape(img.shape[:3])
    check_box(box, space, data.shape, affine)
    lo, hi = world_box(box, space, affine)
    margin = np.asarray(margin_mm, dtype=np.float64)
    r_lo, r_hi = lo - margin, hi + margin
    n = np.asarray(roi_size, dtype=np.int64)
    step = (r_hi - r_lo) / n
    axes = [r_lo[k] + (np.arange(n[k]) + 0.5) * step[k] for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    inv = np.linalg.inv(affine)
    coords = inv[:3, :3] @ grid + inv[:3, 3:4]
    src_spacing = np.linalg.norm(affine[:3, :3], axis=0)
    world_axis = np.abs(affine[:3, :3]).argmax(axis=0)  # the RAS axis each file axis runs along
    sigma = np.maximum(0.0, (step[world_axis] / src_spacing - 1.0) / 2.0)
    values = _sample(data, coords, sigma).reshape(tuple(n))
    in_file = np.all((coords >= -0.5) & (coords <= np.asarray(data.shape).reshape(3, 1) - 0.5), axis=0).reshape(tuple(n))
    inside = np.all((grid >= lo.reshape(3, 1)) & (grid <= hi.reshape(3, 1)), axis=0).reshape(tuple(n))
    context = in_file & ~inside
    patch_affine = np.diag([*step, 1.0])
    patch_affine[:3, 3] = r_lo + step / 2
    image = normalise_patch(values, context, in_file, norm)
    return LesionPatch(image=image, affine=patch_affine, inside=inside, context=context)


def normalise_patch(values: np.ndarray, context: np.ndarray, in_file: np.ndarray, norm: str = "context") -> np.ndarray:
    """Normalise a patch against its context ring (``context``) or over itself (``zscore``).

    >>> v = np.full((4, 4, 4), 100.0, np.float32); v[1:3, 1:3, 1:3] = 300.0
    >>> ring = v < 200
    >>> float(normalise_patch(v, ring, np.ones_like(ring), "context")[1, 1, 1])
    2.0
    """
    if norm == "context":
        ref_voxels = values[context] if context.any() else values[in_file]
        ref = float(np.median(ref_voxels)) if ref_voxels.size else 0.0
        if not ref > 0:
            raise VolumeError(f"the tissue around the lesion box has median intensity {ref:g}; 'context' "
                              "normalisation needs positive (magnitude) images, use patch_norm: zscore")
        out = values / ref - 1.0
    else:
        fg = values[in_file] if in_file.any() else values.ravel()
        lo, hi = np.percentile(fg, [0.5, 99.5])
        core = fg[(fg >= lo) & (fg <= hi)].astype(np.float64)
        std = float(core.std())
        out = (values - float(core.mean())) / (std if std > 1e-8 else 1.0)
    return np.clip(out, -PATCH_CLIP, PATCH_CLIP).astype(np.float32)

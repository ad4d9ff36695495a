"""Unregistered phases: put each phase of a liver study on its own voxel grid.

Real multi-phase liver MRI (LLD-MMRI, ``../shared/design/REALDATA.md``) stores each phase
as its own series, with its own spacing and field of view, and the patient breathes between
series, so the liver sits a few millimetres elsewhere in each (mostly head-to-foot). The
dataset therefore gives the lesion box per series. With ``liver.phase_grids: true`` the
generator reproduces this: each phase gets

* its own grid: in-plane spacing scaled by ``U(1 - j, 1 + j)`` (DWI coarser, by a further
  ``U(1.2, 1.5)``), slice spacing by one of 0.8, 1, 1.2, the same physical field of view,
  and an origin moved by up to half a voxel;
* its own displacement of the anatomy (respiration): ``N(0, shift_mm)`` head-to-foot and
  ``N(0, shift_mm / 3)`` in-plane, clipped at 2.5 standard deviations;

and its lesion box is the lesion's box carried through both. The draws come from a stream
of their own, so switching the option on leaves every other draw of the study unchanged.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from medmap.data.lesion import world_box


def phase_grid(rng: np.random.Generator, shape: tuple[int, ...], spacing: np.ndarray, modality: str,
               jitter: float) -> tuple[tuple[int, int, int], np.ndarray]:
    """A new grid (shape, affine) with the same field of view as ``shape`` x ``spacing``."""
    sp = spacing.astype(np.float64).copy()
    sp[:2] *= rng.uniform(1 - jitter, 1 + jitter)
    if modality == "dwi":
        sp[:2] *= rng.uniform(1.2, 1.5)
    sp[2] *= float(rng.choice([0.8, 1.0, 1.2]))
    fov = np.asarray(shape, np.float64) * spacing
    new_shape = tuple(int(max(4, round(f / s))) for f, s in zip(fov, sp))
    affine = np.diag([*sp, 1.0])
    affine[:3, 3] = -(np.asarray(new_shape) - 1) / 2 * sp + rng.uniform(-0.5, 0.5, 3) * sp
    return new_shape, affine  # type: ignore[return-value]


def resample_displaced(volume: np.ndarray, affine: np.ndarray, shape: tuple[int, ...], new_affine: np.ndarray,
                       shift_mm: np.ndarray) -> np.ndarray:
    """``volume`` (on ``affine``) seen on ``new_affine`` with the anatomy moved by ``shift_mm``."""
    src_sp = np.linalg.norm(affine[:3, :3], axis=0)
    dst_sp = np.linalg.norm(new_affine[:3, :3], axis=0)
    sigma = np.maximum(0.0, (dst_sp / src_sp - 1.0) / 2.0)
    src = ndimage.gaussian_filter(volume, sigma) if np.any(sigma > 0) else volume
    # new voxel -> world -> where that point was before the shift -> old voxel
    m = np.linalg.inv(affine) @ new_affine
    offset = m[:3, 3] - np.linalg.inv(affine)[:3, :3] @ shift_mm
    linear = m[:3, :3]
    if np.allclose(linear, np.diag(np.diag(linear))):  # axis-aligned grids: scipy's much faster zoom-and-shift path
        linear = np.diag(linear)
    out = ndimage.affine_transform(src, linear, offset=offset, output_shape=shape, order=1, mode="nearest")
    return out.astype(np.float32)


def carried_box(box: list[int], affine: np.ndarray, new_affine: np.ndarray, shift_mm: np.ndarray,
                shape: tuple[int, ...]) -> list[int]:
    """The inclusive voxel box on ``new_affine`` of a box on ``affine`` whose content moved by ``shift_mm``."""
    lo, hi = world_box(box, "voxel", affine)
    lo, hi = lo + shift_mm, hi + shift_mm
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    vox = (np.linalg.inv(new_affine) @ corners.T).T[:, :3]
    last = np.asarray(shape, np.float64) - 1
    first = np.clip(np.floor(vox.min(axis=0) + 0.5), 0, last)
    final = np.clip(np.ceil(vox.max(axis=0) - 0.5), first, last)
    return [int(v) for v in first] + [int(v) for v in final]


def place_on_phase_grids(volumes: dict[str, np.ndarray], affine: np.ndarray, box: list[int] | None,
                         rng: np.random.Generator, cfg: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, list[int]], dict[str, list[float]]]:
    """Resample every phase onto its own grid with its own displacement (module docstring).

    Returns:
        ``(volumes, affines, lesion_boxes, shifts_mm)``, each keyed by modality.
    """
    shift_sd = float(cfg.get("phase_shift_mm", 4.0))
    jitter = float(cfg.get("phase_spacing_jitter", 0.15))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    out, affines, boxes, shifts = {}, {}, {}, {}
    for mod, vol in volumes.items():
        shape, new_affine = phase_grid(rng, vol.shape, spacing, mod, jitter)
        sd = np.array([shift_sd / 3, shift_sd / 3, shift_sd])
        shift = np.clip(rng.standard_normal(3) * sd, -2.5 * sd, 2.5 * sd)
        out[mod] = resample_displaced(vol, affine, shape, new_affine, shift)
        affines[mod] = new_affine
        shifts[mod] = [round(float(v), 2) for v in shift]
        if box is not None:
            boxes[mod] = carried_box(box, affine, new_affine, shift, shape)
    return out, affines, boxes, shifts

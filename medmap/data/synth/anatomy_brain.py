"""Brain anatomy for MedMoM-Synth: the MNI ICBM152 2009 templates shipped with nilearn.

The templates (T1, grey- and white-matter probability maps, brain mask; BSD-3) load
offline from the installed package. Each subject is a random smooth deformation of this
anatomy (affine + elastic + ventricle enlargement), applied with one ``grid_sample`` call.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from medmap.data.synth.common import smooth_field


@dataclass(frozen=True)
class BrainTemplate:
    """Tissue maps on the MNI152 2 mm grid, stacked as channels.

    Attributes:
        maps: float32 ``[5, X, Y, Z]``: grey matter, white matter, CSF, brain mask,
            ventricle probability.
        affine: voxel -> MNI mm.
        ventricle_centre: voxel coordinates of the lateral ventricles' centroid.
    """

    maps: np.ndarray
    affine: np.ndarray
    ventricle_centre: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.maps.shape[1:])  # type: ignore[return-value]


CHANNELS = ("gm", "wm", "csf", "mask", "ventricle")


@lru_cache(maxsize=2)
def load_template(spacing: float = 2.0) -> BrainTemplate:
    """Load (once per process) the MNI152 2009 templates from nilearn.

    Args:
        spacing: isotropic voxel size in mm; 2.0 is the templates' own grid, a larger value
            resamples them (linear interpolation) for small, fast test volumes.
    """
    from nilearn import datasets
    from scipy import ndimage

    gm_img = datasets.load_mni152_gm_template(resolution=2)
    wm = datasets.load_mni152_wm_template(resolution=2).get_fdata().astype(np.float32)
    gm = gm_img.get_fdata().astype(np.float32)
    mask = (datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0.5).astype(np.float32)
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    total = gm + wm
    over = total > 1
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.clip(mask - gm - wm, 0, 1)
    affine = gm_img.affine.astype(np.float64)
    if abs(spacing - 2.0) > 1e-6:
        factor = float(spacing) / 2.0
        new_shape = [int(np.floor((n - 1) / factor)) + 1 for n in gm.shape]
        coords = np.meshgrid(*[np.arange(n, dtype=np.float32) * factor for n in new_shape], indexing="ij")
        gm, wm, csf, mask = (ndimage.map_coordinates(v, coords, order=1).astype(np.float32) for v in (gm, wm, csf, mask))
        affine = affine.copy()
        affine[:3, :3] = affine[:3, :3] * factor
    # The lateral ventricles: CSF in a central box of MNI space (|x| < 28, -45 < y < 25, 0 < z < 32 mm).
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in gm.shape], indexing="ij"), axis=-1).astype(np.float32)
    mni = ijk @ affine[:3, :3].T.astype(np.float32) + affine[:3, 3].astype(np.float32)
    box = (np.abs(mni[..., 0]) < 28) & (mni[..., 1] > -45) & (mni[..., 1] < 25) & (mni[..., 2] > 0) & (mni[..., 2] < 32)
    ventricle = (csf * box * (csf > 0.5)).astype(np.float32)
    centre = np.argwhere(ventricle > 0).mean(axis=0) if ventricle.any() else np.array(gm.shape) / 2
    maps = np.stack([gm, wm, csf, mask, ventricle]).astype(np.float32)
    return BrainTemplate(maps=maps, affine=affine, ventricle_centre=centre.astype(np.float32))


def mni_coordinates(affine: np.ndarray, voxel: np.ndarray) -> np.ndarray:
    """Voxel index -> MNI millimetres."""
    return affine[:3, :3] @ np.asarray(voxel, dtype=np.float64) + affine[:3, 3]


def deform_subject(
    rng: np.random.Generator,
    template: BrainTemplate,
    *,
    max_rotation_deg: float = 5.0,
    max_scale: float = 0.05,
    max_translation_vox: float = 2.0,
    elastic_vox: float = 1.5,
    ventricle_enlargement: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Warp the template into one subject.

    Args:
        rng: the subject's generator.
        template: the loaded template.
        max_rotation_deg: bound of the random rotation about each axis.
        max_scale: bound of the relative random scaling per axis.
        max_translation_vox: bound of the random translation.
        elastic_vox: standard deviation of the smooth elastic displacement (voxels).
        ventricle_enlargement: 0 = none; about 0.5 = clearly enlarged ventricles.

    Returns:
        ``(maps, sample_vox)``: warped maps ``[4, X, Y, Z]`` (the first four :data:`CHANNELS`)
        and, for each subject voxel, the template voxel it was sampled from ``[3, X, Y, Z]``
        (to name a subject location in MNI space).
    """
    shape = template.shape
    centre = (np.array(shape, dtype=np.float32) - 1) / 2
    ang = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg, 3))
    cx, cy, cz = np.cos(ang)
    sx, sy, sz = np.sin(ang)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = 1.0 + rng.uniform(-max_scale, max_scale, 3)
    # Sampling map: subject voxel -> template voxel (inverse of the subject's transform).
    a = (rz @ ry @ rx / scale[None, :]).astype(np.float32)
    t = rng.uniform(-max_translation_vox, max_translation_vox, 3).astype(np.float32)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))
    rel = grid - centre.reshape(3, 1, 1, 1)
    sample = np.einsum("ij,jxyz->ixyz", a, rel) + (centre + t).reshape(3, 1, 1, 1)
    if elastic_vox > 0:
        for k in range(3):
            sample[k] += np.float32(elastic_vox) * smooth_field(rng, shape, (5, 6, 5))
    if ventricle_enlargement > 0:
        # Pull sampling points towards the ventricles' centre: their content expands.
        vc = template.ventricle_centre.reshape(3, 1, 1, 1)
        d = sample - vc
        r2 = np.sum((d * np.array([1.0, 0.6, 1.0], dtype=np.float32).reshape(3, 1, 1, 1)) ** 2, axis=0)
        w = np.exp(-r2 / (2 * 12.0**2)).astype(np.float32)
        sample = sample - np.float32(ventricle_enlargement) * w[None] * d
    # grid_sample wants normalised (z, y, x) order for input laid out as (D=X, H=Y, W=Z).
    norm = np.stack([2 * sample[2] / (shape[2] - 1) - 1, 2 * sample[1] / (shape[1] - 1) - 1, 2 * sample[0] / (shape[0] - 1) - 1], axis=-1)
    out = F.grid_sample(
        torch.from_numpy(template.maps[None, :4]),  # the ventricle map only guides the warp
        torch.from_numpy(norm[None].astype(np.float32)),
        mode="bilinear",
        padding_mode="zeros",
        align_corners=True,
    )[0].numpy()
    return out.astype(np.float32), sample.astype(np.float32)


def name_brain_location(mni: np.ndarray) -> dict[str, str]:
    """Hemisphere and lobe of an MNI coordinate (mm), by coarse anatomical rules.

    Example:
        >>> name_brain_location(np.array([40.0, 30.0, 30.0]))["lobe"]
        'frontal'
    """
    x, y, z = (float(v) for v in mni)
    hemisphere = "right" if x >= 0 else "left"
    if z < -25 and y < -45:
        lobe = "cerebellar"
    elif abs(x) < 24 and -32 < y < 18 and -6 < z < 20:
        lobe = "deep grey matter"
    elif y < -68:
        lobe = "occipital"
    elif z < 8 and abs(x) > 26 and y < 12:
        lobe = "temporal"
    elif y < -22:
        lobe = "parietal"
    else:
        lobe = "frontal"
    return {"hemisphere": hemisphere, "lobe": lobe}

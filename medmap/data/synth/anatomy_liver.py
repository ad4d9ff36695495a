"""The procedural abdomen of a synthetic liver study: field of view, body, organs, liver, vessels.

Every function draws from the study's generator in a fixed order (the study's files depend on
it). RAS millimetres: ``x`` to the patient's right, ``y`` anterior, ``z`` superior.

Example:
    >>> rng = np.random.default_rng(0)
    >>> g = make_grid({"shape": [48, 48, 32], "spacing_mm": [8.0, 8.0, 10.0]})
    >>> body = draw_body(rng, g)
    >>> liver = draw_liver(rng, g, body, label="cyst", cfg={})
    >>> liver.mask.dtype, bool(liver.mask.any())
    (dtype('bool'), True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from medmap.data.synth.common import sigmoid, smooth_field


def uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from points ``[3, ...]`` to the segment ``a``-``b``."""
    ab = (b - a).astype(np.float32)
    rel = pts - a.reshape(3, *([1] * (pts.ndim - 1))).astype(np.float32)
    t = np.clip(np.tensordot(ab, rel, axes=(0, 0)) / max(float(ab @ ab), 1e-6), 0, 1)
    closest = rel - t[None] * ab.reshape(3, *([1] * (pts.ndim - 1)))
    return np.sqrt(np.sum(closest**2, axis=0))


def tube(pts: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, width: float) -> np.ndarray:
    """Soft fraction map of a tube of ``radius`` mm from ``a`` to ``b``."""
    return sigmoid((radius - _segment_distance(pts, a, b)) / width)


@dataclass
class Grid:
    """The study's voxel grid in millimetres, and soft shapes drawn on it.

    ``s`` scales physical sizes with the field of view (smaller test grids shrink the anatomy);
    ``w`` is the soft edge width (mm) that gives partial volume at boundaries.
    """

    shape: tuple[int, ...]
    spacing: np.ndarray
    affine: np.ndarray
    s: float
    pts: np.ndarray
    w: np.float32

    @property
    def x(self) -> np.ndarray:
        return self.pts[0]

    @property
    def y(self) -> np.ndarray:
        return self.pts[1]

    @property
    def z(self) -> np.ndarray:
        return self.pts[2]

    def ellipsoid(self, rng: np.random.Generator, c: tuple[float, float, float], r: tuple[float, float, float],
                  noise: float = 0.0, coarse: tuple[int, int, int] = (6, 6, 5)) -> np.ndarray:
        d = np.sqrt(((self.x - c[0]) / r[0]) ** 2 + ((self.y - c[1]) / r[1]) ** 2 + ((self.z - c[2]) / r[2]) ** 2)
        if noise:
            d = d * (1 + np.float32(noise) * smooth_field(rng, self.shape, coarse))
        return sigmoid((1 - d) * np.float32(min(r)) / self.w)

    def cylinder(self, cx: float, cy: float, r: float, z0: float = -1e9, z1: float = 1e9) -> np.ndarray:
        d = np.sqrt((self.x - cx) ** 2 + (self.y - cy) ** 2)
        return sigmoid((r - d) / self.w) * sigmoid((self.z - z0) / self.w) * sigmoid((z1 - self.z) / self.w)


def make_grid(cfg: dict[str, Any]) -> Grid:
    """The grid of the ``liver`` synth config (``shape``, ``spacing_mm``), centred on the origin."""
    shape = tuple(int(s) for s in cfg.get("shape", [96, 96, 64]))
    spacing = np.array(cfg.get("spacing_mm", [4.0, 4.0, 5.0]), dtype=np.float64)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    s = float(np.min(np.array(shape) * spacing / np.array([384.0, 384.0, 320.0])))
    axes = [np.float32(affine[k, 3]) + np.arange(shape[k], dtype=np.float32) * np.float32(spacing[k]) for k in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    return Grid(shape, spacing, affine, s, pts, np.float32(1.2 * s))


@dataclass
class Body:
    """Body outline, fat layer, abdominal cavity and the organs around the liver."""

    body: np.ndarray
    inner_body: np.ndarray
    cavity: np.ndarray
    back: float  #: posterior skin line (mm)
    yc: float
    a_body: float
    organs: dict[str, np.ndarray]  #: csf, bone, aorta, hepatic_vein (IVC), kidney, spleen
    medulla: np.ndarray
    paraspinal: np.ndarray
    ivc: tuple[float, float]


def draw_body(rng: np.random.Generator, g: Grid) -> Body:
    x, y, z, s, w = g.x, g.y, g.z, g.s, g.w
    a_body, b_body = uniform(rng, 140, 175) * s, uniform(rng, 100, 130) * s
    yc = uniform(rng, -15, 0) * s
    e = np.sqrt((x / (a_body * (1 + 0.04 * z / (160 * s)))) ** 2 + ((y - yc) / b_body) ** 2)
    body = sigmoid((1 - e) * b_body / w)
    fat_t = uniform(rng, 10, 35) * s
    e_in = np.sqrt((x / (a_body - fat_t)) ** 2 + ((y - yc) / (b_body - fat_t)) ** 2)
    inner_body = sigmoid((1 - e_in) * (b_body - fat_t) / w)
    e_cav = np.sqrt((x / (a_body - fat_t - 10 * s)) ** 2 + ((y - yc) / (b_body - fat_t - 10 * s)) ** 2)
    cavity = sigmoid((1 - e_cav) * (b_body - fat_t - 10 * s) / w)
    back = yc - b_body
    organs: dict[str, np.ndarray] = {}
    organs["csf"] = g.cylinder(0, back + 45 * s, 7 * s)
    organs["bone"] = np.clip(g.cylinder(0, back + 70 * s, 18 * s) + g.cylinder(0, back + 45 * s, 14 * s) - organs["csf"], 0, 1)
    paraspinal = np.clip(g.ellipsoid(rng, (35 * s, back + 45 * s, 0), (22 * s, 20 * s, 1e4))
                         + g.ellipsoid(rng, (-35 * s, back + 45 * s, 0), (22 * s, 20 * s, 1e4)), 0, 1)
    ao = (-18 * s, back + 100 * s)
    ivc = (22 * s, back + 102 * s)
    organs["aorta"] = g.cylinder(*ao, uniform(rng, 9, 12) * s)
    organs["hepatic_vein"] = g.cylinder(*ivc, uniform(rng, 10, 13) * s)
    zk = uniform(rng, -90, -50) * s
    organs["kidney"] = np.clip(
        g.ellipsoid(rng, (65 * s, back + 75 * s, zk - 15 * s), (27 * s, 24 * s, 52 * s), 0.05)
        + g.ellipsoid(rng, (-65 * s, back + 75 * s, zk), (27 * s, 24 * s, 52 * s), 0.05), 0, 1)
    medulla = np.clip(
        g.ellipsoid(rng, (65 * s, back + 75 * s, zk - 15 * s), (15 * s, 13 * s, 38 * s))
        + g.ellipsoid(rng, (-65 * s, back + 75 * s, zk), (15 * s, 13 * s, 38 * s)), 0, 1)
    organs["spleen"] = g.ellipsoid(rng, (-a_body * 0.62, back + 90 * s, uniform(rng, 20, 60) * s),
                                   (uniform(rng, 20, 30) * s, uniform(rng, 40, 55) * s, uniform(rng, 40, 60) * s), 0.08)
    return Body(body, inner_body, cavity, back, yc, a_body, organs, medulla, paraspinal, ivc)


@dataclass
class Liver:
    """The liver (right and left lobes, caudate; cirrhotic or not) and its extent."""

    env: np.ndarray  #: soft liver fraction
    mask: np.ndarray
    cirrhotic: bool
    right: tuple[float, float, float]
    right_r: tuple[float, float, float]
    left: tuple[float, float, float]
    left_r: tuple[float, float, float]
    lmin: np.ndarray  #: lower corner (mm) of the liver's extent
    lmax: np.ndarray


def draw_liver(rng: np.random.Generator, g: Grid, body: Body, label: str, cfg: dict[str, Any]) -> Liver:
    x, y, z, s, w = g.x, g.y, g.z, g.s, g.w
    cirrhosis_p = cfg.get("p_cirrhosis_hcc", 0.7) if label == "hcc" else cfg.get("p_cirrhosis", 0.12)
    cirrhotic = bool(rng.random() < cirrhosis_p)
    rl = 0.85 if cirrhotic else 1.0
    zl = uniform(rng, 40, 70) * s
    right = (body.a_body * 0.42, body.yc + uniform(rng, -10, 10) * s, zl)
    right_r = (uniform(rng, 65, 80) * s * rl, uniform(rng, 80, 95) * s * rl, uniform(rng, 70, 85) * s * rl)
    left = (uniform(rng, -35, -10) * s, body.yc + uniform(rng, 35, 55) * s, zl + 15 * s)
    left_r = (uniform(rng, 45, 65) * s * (1.15 if cirrhotic else 1.0), uniform(rng, 30, 45) * s, uniform(rng, 30, 45) * s)
    ivc = body.ivc
    dr = np.sqrt(((x - right[0]) / right_r[0]) ** 2 + ((y - right[1]) / right_r[1]) ** 2 + ((z - right[2]) / right_r[2]) ** 2)
    dl = np.sqrt(((x - left[0]) / left_r[0]) ** 2 + ((y - left[1]) / left_r[1]) ** 2 + ((z - left[2]) / left_r[2]) ** 2)
    dc = np.sqrt(((x - ivc[0] + 5 * s) / (25 * s)) ** 2 + ((y - ivc[1] - 20 * s) / (22 * s)) ** 2
                 + ((z - zl - 10 * s) / (40 * s)) ** 2)
    dliv = np.minimum(np.minimum(dr, dl), dc)
    dliv = dliv * (1 + 0.06 * smooth_field(rng, g.shape, (5, 5, 4)))
    if cirrhotic:
        dliv = dliv * (1 + 0.035 * smooth_field(rng, g.shape, (20, 20, 14)))
    env = sigmoid((1 - dliv) * 70 * s / w) * body.cavity * sigmoid((150 * s - z) / w)
    for k in ("kidney", "spleen", "aorta", "bone", "csf"):
        env = env * (1 - body.organs[k])
    env = env * (1 - body.paraspinal)
    mask = env > 0.5
    if mask.sum() < 50:
        raise RuntimeError("liver generation failed: liver too small for the grid")
    return Liver(env, mask, cirrhotic, right, right_r, left, left_r, g.pts[:, mask].min(axis=1), g.pts[:, mask].max(axis=1))


@dataclass
class Vessels:
    """Portal and hepatic veins inside the liver, and the landmarks that name its segments."""

    portal: np.ndarray
    hepatic: np.ndarray
    hilum: np.ndarray
    landmarks: dict[str, float]


def draw_vessels(rng: np.random.Generator, g: Grid, body: Body, liver: Liver) -> Vessels:
    """The portal vein from the hilum and the hepatic veins to the IVC."""
    s, w, ivc = g.s, g.w, body.ivc
    right, right_r, left, left_r, lmin, lmax = liver.right, liver.right_r, liver.left, liver.left_r, liver.lmin, liver.lmax
    portal_z = float(lmin[2] + 0.45 * (lmax[2] - lmin[2]))
    hilum = np.array([ivc[0] + 10 * s, ivc[1] + 25 * s, portal_z], np.float32)
    ivc_top = np.array([ivc[0], ivc[1], float(lmax[2]) - 10 * s], np.float32)
    rhv_x = float(right[0] + 0.2 * right_r[0])
    mhv_x = float(ivc[0] + uniform(rng, 0, 15) * s)
    falciform_x = float(min(left[0] + 0.3 * left_r[0], mhv_x - 25 * s))
    portal = np.zeros(g.shape, np.float32)
    pv = uniform(rng, 5, 7) * s
    tips_p = [
        np.array([ivc[0] - 5 * s, ivc[1] + 35 * s, lmin[2] + 5 * s], np.float32),  # main portal trunk (inflow)
        np.array([rhv_x + 25 * s, right[1] - 20 * s, portal_z + 25 * s], np.float32),
        np.array([rhv_x + 20 * s, right[1] + 10 * s, portal_z - 25 * s], np.float32),
        np.array([mhv_x + 15 * s, right[1] + 45 * s, portal_z + 10 * s], np.float32),
        np.array([left[0] - 0.3 * left_r[0], left[1], portal_z + 12 * s], np.float32),
    ]
    for i, tip in enumerate(tips_p):
        portal = np.maximum(portal, tube(g.pts, hilum, tip, pv if i == 0 else pv * 0.7, w))
    hv = np.zeros(g.shape, np.float32)
    tips_h = [
        np.array([rhv_x + 20 * s, right[1] - 30 * s, portal_z - 10 * s], np.float32),
        np.array([mhv_x, right[1] + 50 * s, portal_z - 15 * s], np.float32),
        np.array([falciform_x - 15 * s, left[1] + 10 * s, portal_z + 10 * s], np.float32),
    ]
    for tip in tips_h:
        hv = np.maximum(hv, tube(g.pts, ivc_top, tip, uniform(rng, 3.5, 5.0) * s, w))
    portal = np.clip(portal * liver.env + (portal * (1 - liver.env) * body.cavity * (g.z > lmin[2] - 40 * s)), 0, 1)
    landmarks = {"ivc_x": float(ivc[0]), "ivc_y": float(ivc[1]), "portal_z": portal_z, "mhv_x": mhv_x,
                 "rhv_x": rhv_x, "falciform_x": falciform_x}
    return Vessels(portal, hv * liver.env, hilum, landmarks)

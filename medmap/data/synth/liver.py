"""Synthetic liver MRI studies: a procedural abdomen imaged in eight sequences/phases.

Anatomy (RAS millimetres, ``x`` to the patient's right, ``y`` anterior, ``z`` superior):
body outline, subcutaneous and visceral fat, abdominal wall muscle, spine with spinal
canal, paraspinal muscles, aorta, inferior vena cava, kidneys (cortex and medulla),
spleen, and a liver made of lobes with portal and hepatic veins, optionally cirrhotic
(nodular surface, reticular fibrosis). Each tissue has a fraction map; each phase is the
fraction-weighted sum of per-tissue signals. Fat and water are tracked apart, so the
opposed-phase image (``t1_out = |water - fat|``) drops where they mix.

Lesion appearance is drawn per study (:func:`draw_appearance`): every textbook feature of a
class occurs with a probability, so no single phase separates the classes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from medmap.data.synth import reports
from medmap.data.synth.phase_grids import place_on_phase_grids
from medmap.data.synth.common import (
    GeneratedStudy,
    ball_coords,
    bias_field,
    blob,
    ghosting,
    motion,
    partial_volume,
    rician,
    mask_box,
    sigmoid,
    smooth_field,
    study_rng,
    to_python,
)

MODALITIES = ("t2wi", "dwi", "t1_in", "t1_out", "pre", "arterial", "venous", "delay")
CLASSES = ("hcc", "icc", "metastasis", "cyst", "hemangioma", "fnh", "abscess")
CONTRAST = ("arterial", "venous", "delay")

# Water signal per tissue for t2wi, dwi, t1 (in/out water part), pre; then the enhancement
# added to ``pre`` in the arterial, venous and delayed phases.
_T = ("t2wi", "dwi", "t1", "pre", "arterial", "venous", "delay")
TISSUE_SIGNAL: dict[str, tuple[float, ...]] = {
    "liver": (0.35, 0.40, 0.95, 1.00, 0.15, 0.70, 0.55),
    "spleen": (0.60, 0.85, 0.70, 0.75, 0.90, 0.80, 0.55),
    "kidney_cortex": (0.55, 0.60, 0.75, 0.80, 1.60, 1.20, 0.80),
    "kidney_medulla": (0.75, 0.65, 0.60, 0.65, 0.30, 1.20, 1.00),
    "aorta": (0.08, 0.05, 0.25, 0.35, 2.80, 1.20, 0.75),
    "hepatic_vein": (0.10, 0.05, 0.25, 0.35, 0.10, 1.30, 0.85),
    "portal_vein": (0.10, 0.05, 0.25, 0.35, 0.60, 1.60, 0.85),
    "muscle": (0.25, 0.25, 0.60, 0.60, 0.10, 0.25, 0.25),
    "viscera": (0.50, 0.35, 0.55, 0.55, 0.30, 0.45, 0.35),
    "bone": (0.40, 0.20, 0.55, 0.55, 0.05, 0.15, 0.15),
    "csf": (1.00, 0.20, 0.15, 0.15, 0.0, 0.0, 0.0),
    "bile": (1.00, 0.25, 0.15, 0.15, 0.0, 0.0, 0.0),
    "fat": (0.10, 0.02, 0.10, 0.10, 0.0, 0.05, 0.05),
}
#: fat signal per phase (t2wi fast spin echo keeps fat bright; dwi and pre are fat-suppressed).
FAT_SIGNAL = {"t2wi": 0.75, "dwi": 0.03, "t1": 1.10, "pre": 0.08, "arterial": 0.08, "venous": 0.08, "delay": 0.08}


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))


def draw_appearance(rng: np.random.Generator, cls: str, difficulty: float = 1.0) -> dict[str, Any]:
    """Draw the appearance of one lesion of class ``cls``.

    Ratios (``t2``, ``dwi``, ``t1``) are relative to the liver in the same sequence; ``enh``
    values are absolute enhancements added to the lesion's pre-contrast signal (the liver
    gains 0.15, 0.70 and 0.55 in the arterial, venous and delayed phases). ``inner`` is the
    centre, ``outer`` the periphery (they differ for targets, rims and fill-in).

    Args:
        rng: the study's generator.
        cls: one of :data:`CLASSES`.
        difficulty: scales the probability of atypical features (0 = always textbook).

    Returns:
        A JSON-ready dict of drawn features and signal parameters.
    """
    p_atyp = min(1.0, 0.25 * difficulty)
    a: dict[str, Any] = {
        "core": 0.55,
        "edge": 0.04,
        "irregularity": 0.08,
        "texture": 0.03,
        "fat_fraction": 0.0,
        "capsule": False,
        "central_scar": False,
        "septa": False,
        "perilesional_enhancement": False,
        "perilesional_oedema": False,
        "capsular_retraction": False,
        "bile_duct_dilatation": False,
        "puddles": False,
        "fill": {"arterial": 0.0, "venous": 0.0, "delay": 0.0},
        "t2_target": False,
        "dwi_target": False,
    }
    if cls == "cyst":
        t2 = _u(rng, 2.8, 4.0)
        t1 = _u(rng, 0.25, 0.45)
        if rng.random() < 0.12 * difficulty:  # proteinaceous/haemorrhagic content
            t2, t1 = _u(rng, 1.5, 2.2), _u(rng, 0.8, 1.2)
            a["complicated_content"] = True
        dwi = _u(rng, 1.1, 1.5) if rng.random() < 0.3 else _u(rng, 0.45, 0.9)
        a.update(t2=(t2, t2), dwi=(dwi, dwi), t1=(t1, t1), edge=0.02, irregularity=0.02,
                 enh={p: (0.0, 0.0) for p in CONTRAST})
    elif cls == "hemangioma":
        t2 = _u(rng, 2.2, 3.2)
        t1 = _u(rng, 0.45, 0.65)
        dwi = _u(rng, 0.9, 1.5)
        u = rng.random()
        if u < 0.15 * difficulty:  # flash-filling: homogeneous arterial enhancement
            a["pattern"] = "flash"
            enh = {"arterial": (1.3, 1.3), "venous": (1.2, 1.2), "delay": (0.9, 0.9)}
        elif u < 0.25 * difficulty:  # slow fill-in, large central area stays dark
            a["pattern"] = "slow"
            a["puddles"] = True
            a["fill"] = {"arterial": 0.25, "venous": _u(rng, 0.3, 0.5), "delay": _u(rng, 0.5, 0.7)}
            enh = {"arterial": (0.02, 2.0), "venous": (0.05, 1.3), "delay": (0.05, 1.0)}
        else:
            a["pattern"] = "nodular"
            a["puddles"] = True
            fv = _u(rng, 0.5, 0.85)
            a["fill"] = {"arterial": 0.25, "venous": fv, "delay": min(1.0, fv + _u(rng, 0.15, 0.4))}
            enh = {"arterial": (0.02, 2.0), "venous": (0.05, 1.3), "delay": (0.05, 1.0)}
        a.update(t2=(t2, t2), dwi=(dwi, dwi), t1=(t1, t1), edge=0.035, irregularity=0.12, enh=enh)
    elif cls == "hcc":
        t2 = _u(rng, 1.2, 1.6)
        dwi = _u(rng, 1.5, 2.3) if rng.random() < 0.8 else _u(rng, 1.05, 1.3)
        t1 = _u(rng, 0.7, 1.05)
        aphe = rng.random() < 1 - 0.8 * p_atyp
        wash = rng.random() < 1 - p_atyp
        art = _u(rng, 0.9, 1.3) if aphe else _u(rng, 0.15, 0.35)
        ven = _u(rng, 0.25, 0.45) if wash else _u(rng, 0.6, 0.75)
        dly = _u(rng, 0.2, 0.4) if wash else _u(rng, 0.45, 0.6)
        a.update(t2=(t2, t2), dwi=(dwi, dwi), t1=(t1, t1), edge=0.04, irregularity=0.08,
                 enh={"arterial": (art, art), "venous": (ven, ven), "delay": (dly, dly)},
                 arterial_hyperenhancement=bool(aphe), washout=bool(wash),
                 capsule=bool(rng.random() < 0.6), texture=0.15 if rng.random() < 0.4 else 0.05)
        if rng.random() < 0.3:
            a["fat_fraction"] = _u(rng, 0.12, 0.3)
    elif cls == "icc":
        target_t2 = rng.random() < 0.5
        target_dwi = rng.random() < 0.6
        rim = rng.random() < 1 - p_atyp
        delayed = rng.random() < 1 - p_atyp
        t2o = _u(rng, 1.4, 1.8)
        dwio = _u(rng, 1.6, 2.2)
        a.update(
            t2=(_u(rng, 1.0, 1.25) if target_t2 else t2o, t2o),
            dwi=(_u(rng, 1.0, 1.3) if target_dwi else dwio, dwio),
            t1=(_u(rng, 0.6, 0.8),) * 2,
            enh={
                "arterial": (0.05, _u(rng, 0.5, 0.8)) if rim else (_u(rng, 0.2, 0.4),) * 2,
                "venous": (_u(rng, 0.35, 0.55), _u(rng, 0.6, 0.8)),
                "delay": (_u(rng, 0.95, 1.25), _u(rng, 0.6, 0.8)) if delayed else (_u(rng, 0.4, 0.55),) * 2,
            },
            t2_target=bool(target_t2), dwi_target=bool(target_dwi), rim_enhancement=bool(rim),
            delayed_central_enhancement=bool(delayed), edge=0.08, irregularity=0.25, texture=0.08,
            capsular_retraction=bool(rng.random() < 0.35), bile_duct_dilatation=bool(rng.random() < 0.45),
        )
    elif cls == "metastasis":
        target_t2 = rng.random() < 0.5
        target_dwi = rng.random() < 0.6
        u = rng.random()
        rim = u < 0.65
        hypervascular = (not rim) and u < 0.65 + 0.15 * difficulty
        t2o = _u(rng, 1.2, 1.5)
        dwio = _u(rng, 1.6, 2.3)
        if rim:
            art = (0.05, _u(rng, 0.6, 0.9))
        elif hypervascular:
            art = (_u(rng, 0.7, 0.9),) * 2
        else:
            art = (_u(rng, 0.05, 0.2),) * 2
        a.update(
            t2=(_u(rng, 1.7, 2.3) if target_t2 else t2o, t2o),
            dwi=(_u(rng, 1.0, 1.4) if target_dwi else dwio, dwio),
            t1=(_u(rng, 0.55, 0.8),) * 2,
            enh={"arterial": art, "venous": (0.2, _u(rng, 0.5, 0.7)), "delay": (0.25, _u(rng, 0.2, 0.5))},
            t2_target=bool(target_t2), dwi_target=bool(target_dwi), rim_enhancement=bool(rim),
            hypervascular=bool(hypervascular), edge=0.05, irregularity=0.1,
        )
    elif cls == "fnh":
        aphe = rng.random() < 1 - 0.4 * p_atyp
        scar = rng.random() < 0.55
        t2 = _u(rng, 1.05, 1.2) if rng.random() < 0.5 else _u(rng, 0.95, 1.05)
        t1 = _u(rng, 0.88, 1.02)
        a.update(
            t2=(t2, t2), dwi=(_u(rng, 1.0, 1.35),) * 2, t1=(t1, t1),
            enh={"arterial": (_u(rng, 1.2, 1.6) if aphe else _u(rng, 0.5, 0.7),) * 2,
                 "venous": (_u(rng, 0.65, 0.8),) * 2, "delay": (_u(rng, 0.5, 0.62),) * 2},
            arterial_hyperenhancement=bool(aphe), central_scar=bool(scar), edge=0.035, irregularity=0.12,
        )
    elif cls == "abscess":
        rim = rng.random() < 0.9
        a.update(
            core=_u(rng, 0.6, 0.8),
            t2=(_u(rng, 2.5, 3.4), _u(rng, 1.3, 1.6)),
            dwi=(_u(rng, 2.5, 3.5), _u(rng, 1.2, 1.5)),
            t1=(_u(rng, 0.35, 0.5), _u(rng, 0.7, 0.85)),
            enh={"arterial": (0.0, _u(rng, 0.8, 1.1) if rim else 0.3), "venous": (0.0, _u(rng, 0.8, 1.0)),
                 "delay": (0.0, _u(rng, 0.7, 0.9))},
            rim_enhancement=bool(rim), septa=bool(rng.random() < 0.5),
            perilesional_enhancement=bool(rng.random() < 0.6), perilesional_oedema=bool(rng.random() < 0.5),
            edge=0.06, irregularity=0.15,
        )
    else:
        raise ValueError(f"unknown liver class '{cls}'")
    return a


def _segment_distance(pts: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance (mm) from points ``[3, ...]`` to the segment ``a``-``b``."""
    ab = (b - a).astype(np.float32)
    rel = pts - a.reshape(3, *([1] * (pts.ndim - 1))).astype(np.float32)
    t = np.clip(np.tensordot(ab, rel, axes=(0, 0)) / max(float(ab @ ab), 1e-6), 0, 1)
    closest = rel - t[None] * ab.reshape(3, *([1] * (pts.ndim - 1)))
    return np.sqrt(np.sum(closest**2, axis=0))


def _tube(pts: np.ndarray, a: np.ndarray, b: np.ndarray, radius: float, width: float) -> np.ndarray:
    return sigmoid((radius - _segment_distance(pts, a, b)) / width)


def couinaud_segment(p: np.ndarray, lm: dict[str, float]) -> str:
    """Couinaud segment of a point (mm), from the subject's vessel landmarks ``lm``."""
    x, y, z = (float(v) for v in p)
    if abs(x - lm["ivc_x"]) < 22 and abs(y - lm["ivc_y"]) < 28 and z > lm["portal_z"] - 10 and x < lm["ivc_x"] + 10:
        return "I"
    if x >= lm["mhv_x"]:
        posterior = x > lm["rhv_x"] or y < lm["ivc_y"]
        superior = z > lm["portal_z"]
        if posterior:
            return "VII" if superior else "VI"
        return "VIII" if superior else "V"
    if x >= lm["falciform_x"]:
        return "IVa" if z > lm["portal_z"] else "IVb"
    return "II" if (z > lm["portal_z"] + 10 or y < lm["ivc_y"] + 40) else "III"


SEGMENT_LOBE = {"I": "caudate", "II": "left", "III": "left", "IVa": "left", "IVb": "left",
                "V": "right", "VI": "right", "VII": "right", "VIII": "right"}


def generate_liver_study(index: int, seed: int, label: str, cfg: dict[str, Any]) -> GeneratedStudy:
    """Generate one liver study in memory.

    Args:
        index: study index (with ``seed`` it determines every random draw).
        seed: run seed.
        label: lesion class, one of :data:`CLASSES`.
        cfg: the ``liver`` section of the synth config (``shape``, ``spacing_mm``, ...).

    Returns:
        The volumes, masks, texts and ground truth of the study.
    """
    rng = study_rng(seed, "liver", index)
    shape = tuple(int(s) for s in cfg.get("shape", [96, 96, 64]))
    spacing = np.array(cfg.get("spacing_mm", [4.0, 4.0, 5.0]), dtype=np.float64)
    difficulty = float(cfg.get("difficulty", 1.0))
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = -(np.array(shape) - 1) / 2 * spacing
    # Physical size of the default field of view, so smaller test grids shrink the anatomy.
    fov_scale = float(np.min(np.array(shape) * spacing / np.array([384.0, 384.0, 320.0])))
    s = fov_scale
    axes = [np.float32(affine[k, 3]) + np.arange(shape[k], dtype=np.float32) * np.float32(spacing[k]) for k in range(3)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij")).astype(np.float32)
    x, y, z = pts
    w = np.float32(1.2 * s)  # soft edge width (mm), gives partial volume at boundaries

    def ellipsoid(c: tuple[float, float, float], r: tuple[float, float, float], noise: float = 0.0, coarse=(6, 6, 5)) -> np.ndarray:
        d = np.sqrt(((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2)
        if noise:
            d = d * (1 + np.float32(noise) * smooth_field(rng, shape, coarse))
        return sigmoid((1 - d) * np.float32(min(r)) / w)

    def cylinder(cx: float, cy: float, r: float, z0: float = -1e9, z1: float = 1e9) -> np.ndarray:
        d = np.sqrt((x - cx) ** 2 + (y - cy) ** 2)
        return sigmoid((r - d) / w) * sigmoid((z - z0) / w) * sigmoid((z1 - z) / w)

    # --- body, fat, wall ---
    a_body, b_body = _u(rng, 140, 175) * s, _u(rng, 100, 130) * s
    yc = _u(rng, -15, 0) * s
    e = np.sqrt((x / (a_body * (1 + 0.04 * z / (160 * s)))) ** 2 + ((y - yc) / b_body) ** 2)
    body = sigmoid((1 - e) * b_body / w)
    fat_t = _u(rng, 10, 35) * s
    e_in = np.sqrt((x / (a_body - fat_t)) ** 2 + ((y - yc) / (b_body - fat_t)) ** 2)
    inner_body = sigmoid((1 - e_in) * (b_body - fat_t) / w)
    e_cav = np.sqrt((x / (a_body - fat_t - 10 * s)) ** 2 + ((y - yc) / (b_body - fat_t - 10 * s)) ** 2)
    cavity = sigmoid((1 - e_cav) * (b_body - fat_t - 10 * s) / w)
    back = yc - b_body  # posterior skin line
    organs: dict[str, np.ndarray] = {}
    organs["csf"] = cylinder(0, back + 45 * s, 7 * s)
    organs["bone"] = np.clip(cylinder(0, back + 70 * s, 18 * s) + cylinder(0, back + 45 * s, 14 * s) - organs["csf"], 0, 1)
    paraspinal = np.clip(ellipsoid((35 * s, back + 45 * s, 0), (22 * s, 20 * s, 1e4)) + ellipsoid((-35 * s, back + 45 * s, 0), (22 * s, 20 * s, 1e4)), 0, 1)
    ao = (-18 * s, back + 100 * s)
    ivc = (22 * s, back + 102 * s)
    organs["aorta"] = cylinder(*ao, _u(rng, 9, 12) * s)
    z_top = 150 * s
    organs["hepatic_vein"] = cylinder(*ivc, _u(rng, 10, 13) * s)
    zk = _u(rng, -90, -50) * s
    organs["kidney"] = np.clip(
        ellipsoid((65 * s, back + 75 * s, zk - 15 * s), (27 * s, 24 * s, 52 * s), 0.05)
        + ellipsoid((-65 * s, back + 75 * s, zk), (27 * s, 24 * s, 52 * s), 0.05), 0, 1)
    medulla = np.clip(
        ellipsoid((65 * s, back + 75 * s, zk - 15 * s), (15 * s, 13 * s, 38 * s))
        + ellipsoid((-65 * s, back + 75 * s, zk), (15 * s, 13 * s, 38 * s)), 0, 1)
    organs["spleen"] = ellipsoid((-a_body * 0.62, back + 90 * s, _u(rng, 20, 60) * s), (_u(rng, 20, 30) * s, _u(rng, 40, 55) * s, _u(rng, 40, 60) * s), 0.08)

    # --- liver: right and left lobes + caudate, optional cirrhotic shape ---
    cirrhosis_p = cfg.get("p_cirrhosis_hcc", 0.7) if label == "hcc" else cfg.get("p_cirrhosis", 0.12)
    cirrhotic = bool(rng.random() < cirrhosis_p)
    rl = 0.85 if cirrhotic else 1.0
    zl = _u(rng, 40, 70) * s
    right = (a_body * 0.42, yc + _u(rng, -10, 10) * s, zl)
    right_r = (_u(rng, 65, 80) * s * rl, _u(rng, 80, 95) * s * rl, _u(rng, 70, 85) * s * rl)
    left = (_u(rng, -35, -10) * s, yc + _u(rng, 35, 55) * s, zl + 15 * s)
    left_r = (_u(rng, 45, 65) * s * (1.15 if cirrhotic else 1.0), _u(rng, 30, 45) * s, _u(rng, 30, 45) * s)
    dr = np.sqrt(((x - right[0]) / right_r[0]) ** 2 + ((y - right[1]) / right_r[1]) ** 2 + ((z - right[2]) / right_r[2]) ** 2)
    dl = np.sqrt(((x - left[0]) / left_r[0]) ** 2 + ((y - left[1]) / left_r[1]) ** 2 + ((z - left[2]) / left_r[2]) ** 2)
    dc = np.sqrt(((x - ivc[0] + 5 * s) / (25 * s)) ** 2 + ((y - ivc[1] - 20 * s) / (22 * s)) ** 2 + ((z - zl - 10 * s) / (40 * s)) ** 2)
    dliv = np.minimum(np.minimum(dr, dl), dc)
    dliv = dliv * (1 + 0.06 * smooth_field(rng, shape, (5, 5, 4)))
    if cirrhotic:
        dliv = dliv * (1 + 0.035 * smooth_field(rng, shape, (20, 20, 14)))
    liver_env = sigmoid((1 - dliv) * 70 * s / w) * cavity * sigmoid((z_top - z) / w)
    for k in ("kidney", "spleen", "aorta", "bone", "csf"):
        liver_env = liver_env * (1 - organs[k])
    liver_env = liver_env * (1 - paraspinal)
    liver_mask = liver_env > 0.5
    if liver_mask.sum() < 50:
        raise RuntimeError("liver generation failed: liver too small for the grid")

    # --- vessels (portal vein from the hilum, hepatic veins to the IVC) ---
    lmin = pts[:, liver_mask].min(axis=1)
    lmax = pts[:, liver_mask].max(axis=1)
    portal_z = float(lmin[2] + 0.45 * (lmax[2] - lmin[2]))
    hilum = np.array([ivc[0] + 10 * s, ivc[1] + 25 * s, portal_z], np.float32)
    ivc_top = np.array([ivc[0], ivc[1], float(lmax[2]) - 10 * s], np.float32)
    rhv_x = float(right[0] + 0.2 * right_r[0])
    mhv_x = float(ivc[0] + _u(rng, 0, 15) * s)
    falciform_x = float(min(left[0] + 0.3 * left_r[0], mhv_x - 25 * s))
    portal = np.zeros(shape, np.float32)
    pv = _u(rng, 5, 7) * s
    tips_p = [
        np.array([ivc[0] - 5 * s, ivc[1] + 35 * s, lmin[2] + 5 * s], np.float32),  # main portal trunk (inflow)
        np.array([rhv_x + 25 * s, right[1] - 20 * s, portal_z + 25 * s], np.float32),
        np.array([rhv_x + 20 * s, right[1] + 10 * s, portal_z - 25 * s], np.float32),
        np.array([mhv_x + 15 * s, right[1] + 45 * s, portal_z + 10 * s], np.float32),
        np.array([left[0] - 0.3 * left_r[0], left[1], portal_z + 12 * s], np.float32),
    ]
    for i, tip in enumerate(tips_p):
        portal = np.maximum(portal, _tube(pts, hilum, tip, pv if i == 0 else pv * 0.7, w))
    hv = np.zeros(shape, np.float32)
    tips_h = [
        np.array([rhv_x + 20 * s, right[1] - 30 * s, portal_z - 10 * s], np.float32),
        np.array([mhv_x, right[1] + 50 * s, portal_z - 15 * s], np.float32),
        np.array([falciform_x - 15 * s, left[1] + 10 * s, portal_z + 10 * s], np.float32),
    ]
    for tip in tips_h:
        hv = np.maximum(hv, _tube(pts, ivc_top, tip, _u(rng, 3.5, 5.0) * s, w))
    portal = np.clip(portal * liver_env + (portal * (1 - liver_env) * cavity * (z > lmin[2] - 40 * s)), 0, 1)
    hv = hv * liver_env
    landmarks = {"ivc_x": float(ivc[0]), "ivc_y": float(ivc[1]), "portal_z": portal_z, "mhv_x": mhv_x,
                 "rhv_x": rhv_x, "falciform_x": falciform_x}

    # --- lesions ---
    vox_mm = spacing.astype(np.float32)
    edt = ndimage.distance_transform_edt(liver_mask, sampling=spacing).astype(np.float32)
    app = draw_appearance(rng, label, difficulty)
    size_lo, size_hi = {"cyst": (8, 60), "hemangioma": (10, 80), "hcc": (15, 80), "icc": (20, 80),
                        "metastasis": (8, 45), "fnh": (10, 60), "abscess": (20, 80)}[label]
    size_lo, size_hi = max(size_lo, cfg.get("size_mm", [8, 80])[0]), min(size_hi, cfg.get("size_mm", [8, 80])[1])
    size_hi = max(size_hi, size_lo)
    n_les = 1
    if label == "metastasis" and rng.random() < 0.6:
        n_les = int(rng.integers(2, 6))
    elif label in ("cyst", "hemangioma") and rng.random() < 0.25:
        n_les = int(rng.integers(2, 4))
    sizes = [float(np.exp(rng.uniform(np.log(size_lo), np.log(size_hi)))) for _ in range(n_les)]
    sizes[0] = max(sizes)
    sizes = [sizes[0]] + sorted(sizes[1:], reverse=True)
    # Physical sizes shrink with the field of view on small test grids.
    sizes_scaled = [sz * s for sz in sizes]
    les_frac = np.zeros(shape, np.float32)
    halo_frac = np.zeros(shape, np.float32)
    les_val = {p: np.zeros(shape, np.float32) for p in _T}
    halo_ratio = {p: 1.0 for p in _T}
    if app["perilesional_enhancement"]:
        halo_ratio["arterial"] = _u(rng, 1.3, 1.5)
    if app["perilesional_oedema"]:
        halo_ratio["t2wi"] = _u(rng, 1.2, 1.4)
    fat_les = np.zeros(shape, np.float32)
    ducts = np.zeros(shape, np.float32)
    retraction = np.zeros(shape, np.float32)
    centres = []
    steat = _u(rng, 0.05, 0.22) if rng.random() < cfg.get("p_steatosis", 0.2) else 0.0
    liver_sig = np.array(TISSUE_SIGNAL["liver"], np.float32)
    for k, (size, size_s) in enumerate(zip(sizes, sizes_scaled)):
        r = size_s / 2
        want = min(r * (0.3 if app["capsular_retraction"] and k == 0 else 0.7), float(edt.max()) * 0.8)
        cand = np.argwhere(liver_mask & (edt >= want) & (edt <= (want + 12 * s if app["capsular_retraction"] and k == 0 else 1e9)))
        if len(cand) == 0:
            cand = np.argwhere(edt >= edt.max() * 0.8)
        c = cand[int(rng.integers(len(cand)))].astype(np.float32)
        centres.append(c)
        radii = (r * rng.uniform(0.85, 1.15, 3)).astype(np.float32)
        halo_f = 1.6 if (app["perilesional_enhancement"] or app["perilesional_oedema"]) else 1.0
        sl, off = ball_coords(shape, c, radii.max() * halo_f * 1.3 / vox_mm + 2)
        offm = off * vox_mm.reshape(3, 1, 1, 1)
        d = blob(rng, offm, radii, app["irregularity"])
        les_body = sigmoid((1 - d) / app["edge"]) * liver_env[sl]
        if k == 0:  # the lesion to classify: the largest one
            box0 = mask_box(les_body > 0.5)
            start = np.array([sl_.start for sl_ in sl])
            if box0 is None:  # smaller than a voxel: its centre voxel
                box0 = [int(round(v)) for v in c] * 2
            else:
                box0 = [int(v) for v in np.concatenate([start + box0[:3], start + box0[3:]])]
        w_out = sigmoid((d - app["core"]) / 0.08)
        tex = 1 + app["texture"] * smooth_field(rng, d.shape, tuple(max(2, n // 2) for n in d.shape))
        vals: dict[str, np.ndarray] = {}
        for p, key in (("t2wi", "t2"), ("dwi", "dwi"), ("t1", "t1")):
            inner, outer = app[key]
            vals[p] = (inner * (1 - w_out) + outer * w_out) * liver_sig[_T.index(p)] * tex
        pre_ratio = np.float32(app["t1"][0]) * (1 - w_out) + np.float32(app["t1"][1]) * w_out
        vals["pre"] = pre_ratio * liver_sig[_T.index("pre")] * tex
        for p in CONTRAST:
            inner, outer = app["enh"][p]
            if app["fill"][p] > 0:  # hemangioma: enhancement fills in from the periphery
                w_fill = sigmoid((d - (1 - app["fill"][p])) / 0.06)
                if p == "arterial":
                    w_fill = w_fill * sigmoid(5 * smooth_field(rng, d.shape, tuple(max(2, n // 2) for n in d.shape)) + 1)
                e = inner * (1 - w_fill) + outer * w_fill
            else:
                e = inner * (1 - w_out) + outer * w_out
            if app["capsule"] and p == "delay":
                e = e + 0.9 * np.exp(-(((d - 0.97) / 0.06) ** 2))
            vals[p] = vals["pre"] + np.float32(1.0) * e * tex
        if app["central_scar"]:
            scar = sigmoid((0.22 - d * (1 + 0.5 * smooth_field(rng, d.shape, (3, 3, 3)))) / 0.05)
            scar_v = {"t2wi": 2.4 * liver_sig[0], "dwi": vals["dwi"], "t1": 0.5 * liver_sig[2], "pre": 0.5 * liver_sig[3]}
            scar_v.update({"arterial": scar_v["pre"] + 0.1, "venous": scar_v["pre"] + 0.6, "delay": scar_v["pre"] + 1.1})
            for p in _T:
                vals[p] = vals[p] * (1 - scar) + scar_v[p] * scar
        if app["septa"]:
            sep = np.zeros(d.shape, np.float32)
            for _ in range(int(rng.integers(1, 4))):
                n = rng.standard_normal(3).astype(np.float32)
                n /= np.linalg.norm(n)
                sep = np.maximum(sep, sigmoid((2.5 * s - np.abs(np.tensordot(n, offm, axes=(0, 0)))) / w))
            sep = sep * (1 - w_out)
            for p, add in (("arterial", 0.7), ("venous", 0.8), ("delay", 0.7)):
                vals[p] = vals[p] + add * sep
            for p, ratio in (("t2wi", 1.4), ("dwi", 1.3)):
                vals[p] = vals[p] * (1 - sep) + ratio * liver_sig[_T.index(p)] * sep
        newer = les_body > les_frac[sl]
        for p in _T:
            les_val[p][sl] = np.where(newer, vals[p], les_val[p][sl])
        les_frac[sl] = np.maximum(les_frac[sl], les_body)
        if app["fat_fraction"] > 0:
            fat_les[sl] = np.maximum(fat_les[sl], les_body * app["fat_fraction"] * (1 + 0.3 * smooth_field(rng, d.shape, (3, 3, 3))))
        if halo_f > 1:
            hal = np.clip(sigmoid((halo_f - d) / 0.12) - sigmoid((1 - d) / app["edge"]), 0, 1) * liver_env[sl]
            halo_frac[sl] = np.maximum(halo_frac[sl], hal)
        if k == 0 and app["bile_duct_dilatation"]:
            # Dilated ducts run from the lesion away from the hilum (upstream).
            cm = (affine[:3, :3] @ c + affine[:3, 3]).astype(np.float32)
            away = cm - hilum
            away /= max(np.linalg.norm(away), 1e-6)
            for _ in range(int(rng.integers(2, 4))):
                dirn = away + 0.5 * rng.standard_normal(3).astype(np.float32)
                dirn /= np.linalg.norm(dirn)
                ducts = np.maximum(ducts, _tube(pts, cm, cm + dirn * (r + _u(rng, 25, 45) * s), _u(rng, 2.5, 3.5) * s, w))
        if k == 0 and app["capsular_retraction"]:
            # Pull the liver surface in over the lesion: replace the nearest rim by fat.
            surf = np.argwhere(liver_mask & (edt <= float(vox_mm.min()) * 1.01))
            if len(surf):
                dist = np.sum((surf - c) ** 2 * (vox_mm**2), axis=1)
                sp = surf[int(np.argmin(dist))].astype(np.float32)
                sp_mm = affine[:3, :3] @ sp + affine[:3, 3]
                dd = np.sqrt(np.sum((pts - sp_mm.reshape(3, 1, 1, 1).astype(np.float32)) ** 2, axis=0))
                retraction = sigmoid((8 * s - dd) / w)
    ducts = ducts * liver_env * (1 - les_frac)
    lesion_mask = (les_frac > 0.5).astype(np.uint8)

    # --- compose tissue fractions (later ones take their share from earlier ones) ---
    liver_env = liver_env * (1 - retraction)
    parench = np.clip(liver_env - portal * liver_env - hv - ducts, 0, 1)
    les_frac = les_frac * (1 - retraction)
    parench_left = np.clip(parench - les_frac, 0, 1)
    halo_frac = np.minimum(halo_frac, parench_left)
    liver_plain = parench_left - halo_frac
    les_frac_eff = parench - parench_left
    ves_l = np.clip(portal * liver_env - les_frac * portal, 0, 1), np.clip(hv - les_frac * hv, 0, 1)
    frac: dict[str, np.ndarray] = {}
    used = liver_env.copy()
    frac["portal_vein"] = np.clip(ves_l[0] + portal * (1 - liver_env), 0, 1)
    frac["hepatic_vein"] = np.clip(ves_l[1] + organs["hepatic_vein"] * (1 - liver_env) * (z < lmax[2]), 0, 1)
    frac["bile"] = ducts
    for k in ("csf", "bone", "aorta", "spleen"):
        frac[k] = organs[k] * (1 - used)
        used = used + frac[k]
    frac["kidney_cortex"] = organs["kidney"] * (1 - medulla) * (1 - used)
    frac["kidney_medulla"] = organs["kidney"] * medulla * (1 - used)
    used = used + organs["kidney"] * (1 - used)
    used = np.clip(used + frac["portal_vein"] * (1 - liver_env) + frac["hepatic_vein"] * (1 - liver_env), 0, 1)
    frac["muscle"] = np.clip((inner_body - cavity) + paraspinal * cavity, 0, 1) * (1 - used)
    used = np.clip(used + frac["muscle"], 0, 1)
    visc = cavity * (1 - used) * (y > back + 20 * s)
    vfat = np.clip(_u(rng, 0.2, 0.45) + 0.35 * smooth_field(rng, shape, (10, 10, 8)), 0, 1)
    frac["viscera"] = visc * (1 - vfat)
    frac["fat"] = np.clip(body - inner_body, 0, 1) + visc * vfat + cavity * (1 - used) * (y <= back + 20 * s)
    for k in frac:
        frac[k] = frac[k] * body

    # Fat fraction: fat tissue, marrow, steatotic liver, fat-containing lesions.
    fat_amount = 0.92 * frac["fat"] + 0.45 * frac["bone"] + steat * (liver_plain + halo_frac) + fat_les * les_frac_eff

    fib = np.zeros(shape, np.float32)
    if cirrhotic:
        fib = 0.6 * np.exp(-(smooth_field(rng, shape, (22, 22, 16)) / 0.1) ** 2) * liver_plain
    paren_tex = 1 + 0.03 * smooth_field(rng, shape, (12, 12, 8))
    jitter = float(cfg.get("intensity_jitter", 0.06))
    subj = {t: np.array(v, np.float32) * (1 + jitter * rng.standard_normal(len(v))).astype(np.float32) for t, v in TISSUE_SIGNAL.items()}
    fib_mod = {"t2wi": 0.35, "dwi": 0.1, "t1": -0.15, "pre": -0.15, "arterial": -0.1, "venous": 0.1, "delay": 0.3}
    water: dict[str, np.ndarray] = {}
    for p in _T:
        i = _T.index(p)
        img = np.zeros(shape, np.float32)
        for t, f in frac.items():
            v = subj[t][i] if i < 4 else subj[t][3] + subj[t][i]
            img += np.float32(v) * f
        lv = subj["liver"][i] if i < 4 else subj["liver"][3] + subj["liver"][i]
        img += np.float32(lv) * paren_tex * (liver_plain * (1 + fib_mod[p] * fib))
        img += np.float32(lv) * halo_ratio[p] * halo_frac
        scale_l = lv / (liver_sig[i] if i < 4 else liver_sig[3] + liver_sig[i])
        img += les_val[p] * np.float32(scale_l) * les_frac_eff
        water[p] = img * (1 - np.clip(fat_amount, 0, 0.95))

    volumes: dict[str, np.ndarray] = {}
    artefacts: dict[str, str] = {}
    noise_lo, noise_hi = cfg.get("noise", [0.015, 0.035])
    blur = float(rng.uniform(0.4, 0.7))
    bias = bias_field(rng, shape, float(rng.uniform(0.1, 0.3)))
    psf = (blur, blur, blur * 0.8)
    fat_blur = partial_volume(fat_amount.astype(np.float32), psf)
    water_blur = {k: partial_volume(v, psf) for k, v in water.items()}
    for mod in MODALITIES:
        key = "t1" if mod in ("t1_in", "t1_out") else mod
        fat_img = np.float32(FAT_SIGNAL[key]) * fat_blur
        wat = water_blur[key]
        img = np.abs(wat - fat_img) if mod == "t1_out" else wat + fat_img
        if mod == "dwi":
            img = partial_volume(img, 0.8)
        img = img * bias
        sigma = float(rng.uniform(noise_lo, noise_hi)) * (2.2 if mod == "dwi" else 1.0)
        img = rician(img, sigma, rng)
        u = rng.random()
        if u < cfg.get("p_motion", 0.04):
            img = motion(img, affine, rng, float(rng.uniform(0.5, 1.2)))
            artefacts[mod] = "motion"
        elif u < cfg.get("p_motion", 0.04) + cfg.get("p_ghosting", 0.12):
            img = ghosting(img, int(rng.integers(2, 5)), 1, float(rng.uniform(0.2, 0.5)))
            artefacts[mod] = "respiratory ghosting"
        volumes[mod] = (img * np.float32(rng.uniform(600, 1400))).astype(np.float32)

    c0 = centres[0]
    c0_mm = affine[:3, :3] @ c0 + affine[:3, 3]
    seg = couinaud_segment(c0_mm, landmarks)
    truth = {
        "class": label,
        "size_mm": sizes[0],
        "lesion_sizes_mm": sizes,
        "n_lesions": n_les,
        "location": {"segment": seg, "lobe": SEGMENT_LOBE[seg]},
        "centre_vox": [int(v) for v in c0],
        "centre_mm": c0_mm.tolist(),
        "lesion_centres_vox": [[int(v) for v in c] for c in centres],
        "cirrhosis": cirrhotic,
        "steatosis": steat > 0,
        "artefacts": artefacts,
        "appearance": app,
    }
    affines: dict[str, np.ndarray] = {}
    boxes = {mod: list(box0) for mod in MODALITIES}
    if cfg.get("phase_grids", False):
        volumes, affines, boxes, shifts = place_on_phase_grids(volumes, affine, box0, study_rng(seed, "liver", index, stream=3), cfg)
        truth["phase_shift_mm"] = shifts
    truth = to_python(truth)
    findings, impression = reports.liver_report(truth, study_rng(seed, "liver", index, stream=1))
    return GeneratedStudy(
        volumes=volumes,
        affine=affine,
        organ_mask=liver_mask.astype(np.uint8),
        lesion_mask=lesion_mask,
        label=label,
        findings=findings,
        impression=impression,
        truth=truth,
        affines=affines,
        lesion_boxes=boxes,
    )

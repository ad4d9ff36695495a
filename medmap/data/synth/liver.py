"""Synthetic liver MRI studies: a procedural abdomen imaged in eight sequences/phases.

Anatomy (:mod:`.anatomy_liver`; RAS millimetres, ``x`` to the patient's right, ``y``
anterior, ``z`` superior): body outline, subcutaneous and visceral fat, abdominal wall muscle, spine with spinal
canal, paraspinal muscles, aorta, inferior vena cava, kidneys (cortex and medulla),
spleen, and a liver made of lobes with portal and hepatic veins, optionally cirrhotic
(nodular surface, reticular fibrosis). Each tissue has a fraction map; each phase is the
fraction-weighted sum of per-tissue signals. Fat and water are tracked apart, so the
opposed-phase image (``t1_out = |water - fat|``) drops where they mix.

Lesion appearance is drawn per study (:func:`draw_appearance`): every textbook feature of a
class occurs with a probability, so no single phase separates the classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from medmap.data.synth import reports
from medmap.data.synth.anatomy_liver import (Body, Grid, Liver, Vessels, draw_body, draw_liver, draw_vessels, make_grid,
                                             tube, uniform)
from medmap.data.synth.common import (
    GeneratedStudy,
    ball_coords,
    bias_field,
    blob,
    ghosting,
    mask_box,
    motion,
    partial_volume,
    rician,
    sigmoid,
    smooth_field,
    study_rng,
    to_python,
)
from medmap.data.synth.phase_grids import place_on_phase_grids

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
    try:
        draw = _CLASS_DRAWERS[cls]
    except KeyError:
        raise ValueError(f"unknown liver class '{cls}'") from None
    draw(rng, a, difficulty, p_atyp)
    return a


def _draw_cyst(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """Simple cysts: very bright on T2, dark on T1, no enhancement; a few proteinaceous."""
    t2 = uniform(rng, 2.8, 4.0)
    t1 = uniform(rng, 0.25, 0.45)
    if rng.random() < 0.12 * difficulty:  # proteinaceous/haemorrhagic content
        t2, t1 = uniform(rng, 1.5, 2.2), uniform(rng, 0.8, 1.2)
        a["complicated_content"] = True
    dwi = uniform(rng, 1.1, 1.5) if rng.random() < 0.3 else uniform(rng, 0.45, 0.9)
    a.update(t2=(t2, t2), dwi=(dwi, dwi), t1=(t1, t1), edge=0.02, irregularity=0.02,
             enh={p: (0.0, 0.0) for p in CONTRAST})


def _draw_hemangioma(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """Haemangiomas: bright on T2; peripheral nodular fill-in (or flash filling, or slow fill)."""
    t2 = uniform(rng, 2.2, 3.2)
    t1 = uniform(rng, 0.45, 0.65)
    dwi = uniform(rng, 0.9, 1.5)
    u = rng.random()
    if u < 0.15 * difficulty:  # flash-filling: homogeneous arterial enhancement
        a["pattern"] = "flash"
        enh = {"arterial": (1.3, 1.3), "venous": (1.2, 1.2), "delay": (0.9, 0.9)}
    elif u < 0.25 * difficulty:  # slow fill-in, large central area stays dark
        a["pattern"] = "slow"
        a["puddles"] = True
        a["fill"] = {"arterial": 0.25, "venous": uniform(rng, 0.3, 0.5), "delay": uniform(rng, 0.5, 0.7)}
        enh = {"arterial": (0.02, 2.0), "venous": (0.05, 1.3), "delay": (0.05, 1.0)}
    else:
        a["pattern"] = "nodular"
        a["puddles"] = True
        fv = uniform(rng, 0.5, 0.85)
        a["fill"] = {"arterial": 0.25, "venous": fv, "delay": min(1.0, fv + uniform(rng, 0.15, 0.4))}
        enh = {"arterial": (0.02, 2.0), "venous": (0.05, 1.3), "delay": (0.05, 1.0)}
    a.update(t2=(t2, t2), dwi=(dwi, dwi), t1=(t1, t1), edge=0.035, irregularity=0.12, enh=enh)


def _draw_hcc(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """HCC: arterial hyperenhancement and washout (each absent in atypical cases), capsule, some fat."""
    t2 = uniform(rng, 1.2, 1.6)
    dwi = uniform(rng, 1.5, 2.3) if rng.random() < 0.8 else uniform(rng, 1.05, 1.3)
    t1 = uniform(rng, 0.7, 1.05)
    aphe = rng.random() < 1 - 0.8 * p_atyp
    wash = rng.random() < 1 - p_atyp
    art = uniform(rng, 0.9, 1.3) if aphe else uniform(rng, 0.15, 0.35)
    ven = uniform(rng, 0.25, 0.45) if wash else uniform(rng, 0.6, 0.75)
    dly = uniform(rng, 0.2, 0.4) if wash else uniform(rng, 0.45, 0.6)
    a.update(t2=(t2, t2), dwi=(dwi, dwi), t1=(t1, t1), edge=0.04, irregularity=0.08,
             enh={"arterial": (art, art), "venous": (ven, ven), "delay": (dly, dly)},
             arterial_hyperenhancement=bool(aphe), washout=bool(wash),
             capsule=bool(rng.random() < 0.6), texture=0.15 if rng.random() < 0.4 else 0.05)
    if rng.random() < 0.3:
        a["fat_fraction"] = uniform(rng, 0.12, 0.3)


def _draw_icc(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """Cholangiocarcinoma: target signs, rim enhancement, delayed central enhancement, retraction."""
    target_t2 = rng.random() < 0.5
    target_dwi = rng.random() < 0.6
    rim = rng.random() < 1 - p_atyp
    delayed = rng.random() < 1 - p_atyp
    t2o = uniform(rng, 1.4, 1.8)
    dwio = uniform(rng, 1.6, 2.2)
    a.update(
        t2=(uniform(rng, 1.0, 1.25) if target_t2 else t2o, t2o),
        dwi=(uniform(rng, 1.0, 1.3) if target_dwi else dwio, dwio),
        t1=(uniform(rng, 0.6, 0.8),) * 2,
        enh={
            "arterial": (0.05, uniform(rng, 0.5, 0.8)) if rim else (uniform(rng, 0.2, 0.4),) * 2,
            "venous": (uniform(rng, 0.35, 0.55), uniform(rng, 0.6, 0.8)),
            "delay": (uniform(rng, 0.95, 1.25), uniform(rng, 0.6, 0.8)) if delayed else (uniform(rng, 0.4, 0.55),) * 2,
        },
        t2_target=bool(target_t2), dwi_target=bool(target_dwi), rim_enhancement=bool(rim),
        delayed_central_enhancement=bool(delayed), edge=0.08, irregularity=0.25, texture=0.08,
        capsular_retraction=bool(rng.random() < 0.35), bile_duct_dilatation=bool(rng.random() < 0.45),
    )


def _draw_metastasis(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """Metastases: target signs, rim (or hypervascular, or hypovascular) enhancement."""
    target_t2 = rng.random() < 0.5
    target_dwi = rng.random() < 0.6
    u = rng.random()
    rim = u < 0.65
    hypervascular = (not rim) and u < 0.65 + 0.15 * difficulty
    t2o = uniform(rng, 1.2, 1.5)
    dwio = uniform(rng, 1.6, 2.3)
    if rim:
        art = (0.05, uniform(rng, 0.6, 0.9))
    elif hypervascular:
        art = (uniform(rng, 0.7, 0.9),) * 2
    else:
        art = (uniform(rng, 0.05, 0.2),) * 2
    a.update(
        t2=(uniform(rng, 1.7, 2.3) if target_t2 else t2o, t2o),
        dwi=(uniform(rng, 1.0, 1.4) if target_dwi else dwio, dwio),
        t1=(uniform(rng, 0.55, 0.8),) * 2,
        enh={"arterial": art, "venous": (0.2, uniform(rng, 0.5, 0.7)), "delay": (0.25, uniform(rng, 0.2, 0.5))},
        t2_target=bool(target_t2), dwi_target=bool(target_dwi), rim_enhancement=bool(rim),
        hypervascular=bool(hypervascular), edge=0.05, irregularity=0.1,
    )


def _draw_fnh(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """FNH: near-liver signal, strong homogeneous arterial enhancement, central scar."""
    aphe = rng.random() < 1 - 0.4 * p_atyp
    scar = rng.random() < 0.55
    t2 = uniform(rng, 1.05, 1.2) if rng.random() < 0.5 else uniform(rng, 0.95, 1.05)
    t1 = uniform(rng, 0.88, 1.02)
    a.update(
        t2=(t2, t2), dwi=(uniform(rng, 1.0, 1.35),) * 2, t1=(t1, t1),
        enh={"arterial": (uniform(rng, 1.2, 1.6) if aphe else uniform(rng, 0.5, 0.7),) * 2,
             "venous": (uniform(rng, 0.65, 0.8),) * 2, "delay": (uniform(rng, 0.5, 0.62),) * 2},
        arterial_hyperenhancement=bool(aphe), central_scar=bool(scar), edge=0.035, irregularity=0.12,
    )


def _draw_abscess(rng: np.random.Generator, a: dict[str, Any], difficulty: float, p_atyp: float) -> None:
    """Abscesses: fluid centre with restricted diffusion, enhancing rim, septa, oedema."""
    rim = rng.random() < 0.9
    a.update(
        core=uniform(rng, 0.6, 0.8),
        t2=(uniform(rng, 2.5, 3.4), uniform(rng, 1.3, 1.6)),
        dwi=(uniform(rng, 2.5, 3.5), uniform(rng, 1.2, 1.5)),
        t1=(uniform(rng, 0.35, 0.5), uniform(rng, 0.7, 0.85)),
        enh={"arterial": (0.0, uniform(rng, 0.8, 1.1) if rim else 0.3), "venous": (0.0, uniform(rng, 0.8, 1.0)),
             "delay": (0.0, uniform(rng, 0.7, 0.9))},
        rim_enhancement=bool(rim), septa=bool(rng.random() < 0.5),
        perilesional_enhancement=bool(rng.random() < 0.6), perilesional_oedema=bool(rng.random() < 0.5),
        edge=0.06, irregularity=0.15,
    )


#: One drawer per class: each adds the class's signal ratios, enhancement and features to ``a``.
_CLASS_DRAWERS = {"cyst": _draw_cyst, "hemangioma": _draw_hemangioma, "hcc": _draw_hcc, "icc": _draw_icc, "metastasis": _draw_metastasis, "fnh": _draw_fnh, "abscess": _draw_abscess}


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
_SIZE_MM = {"cyst": (8, 60), "hemangioma": (10, 80), "hcc": (15, 80), "icc": (20, 80),
            "metastasis": (8, 45), "fnh": (10, 60), "abscess": (20, 80)}


# --------------------------------------------------------------------------- lesions
def draw_lesion_sizes(rng: np.random.Generator, label: str, cfg: dict[str, Any]) -> list[float]:
    """Diameters (mm) of the study's lesions, largest first (the one to classify)."""
    size_lo, size_hi = _SIZE_MM[label]
    size_lo, size_hi = max(size_lo, cfg.get("size_mm", [8, 80])[0]), min(size_hi, cfg.get("size_mm", [8, 80])[1])
    size_hi = max(size_hi, size_lo)
    n_les = 1
    if label == "metastasis" and rng.random() < 0.6:
        n_les = int(rng.integers(2, 6))
    elif label in ("cyst", "hemangioma") and rng.random() < 0.25:
        n_les = int(rng.integers(2, 4))
    sizes = [float(np.exp(rng.uniform(np.log(size_lo), np.log(size_hi)))) for _ in range(n_les)]
    sizes[0] = max(sizes)
    return [sizes[0]] + sorted(sizes[1:], reverse=True)


def lesion_signals(rng: np.random.Generator, app: dict[str, Any], d: np.ndarray, offm: np.ndarray,
                   g: Grid) -> dict[str, np.ndarray]:
    """Per-phase water signal inside one lesion (``d``: normalised distance from its centre)."""
    liver_sig = np.array(TISSUE_SIGNAL["liver"], np.float32)
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
            sep = np.maximum(sep, sigmoid((2.5 * g.s - np.abs(np.tensordot(n, offm, axes=(0, 0)))) / g.w))
        sep = sep * (1 - w_out)
        for p, add in (("arterial", 0.7), ("venous", 0.8), ("delay", 0.7)):
            vals[p] = vals[p] + add * sep
        for p, ratio in (("t2wi", 1.4), ("dwi", 1.3)):
            vals[p] = vals[p] * (1 - sep) + ratio * liver_sig[_T.index(p)] * sep
    return vals


@dataclass
class Lesions:
    """Fraction and signal maps of the study's lesions and what they do to the liver around them."""

    app: dict[str, Any]
    sizes: list[float]
    frac: np.ndarray
    halo_frac: np.ndarray
    halo_ratio: dict[str, float]
    value: dict[str, np.ndarray]  #: per-phase water signal inside the lesions
    fat: np.ndarray
    ducts: np.ndarray
    retraction: np.ndarray
    centres: list[np.ndarray]
    box: list[int]  #: voxel box of the lesion to classify
    steatosis: float

    @property
    def mask(self) -> np.ndarray:
        return (self.frac > 0.5).astype(np.uint8)


def _centre(rng: np.random.Generator, liver: Liver, edt: np.ndarray, r: float, retract: bool, s: float) -> np.ndarray:
    want = min(r * (0.3 if retract else 0.7), float(edt.max()) * 0.8)
    cand = np.argwhere(liver.mask & (edt >= want) & (edt <= (want + 12 * s if retract else 1e9)))
    if len(cand) == 0:
        cand = np.argwhere(edt >= edt.max() * 0.8)
    return cand[int(rng.integers(len(cand)))].astype(np.float32)


def _box(les_body: np.ndarray, sl: tuple[slice, ...], c: np.ndarray) -> list[int]:
    box0 = mask_box(les_body > 0.5)
    start = np.array([sl_.start for sl_ in sl])
    if box0 is None:  # smaller than a voxel: its centre voxel
        return [int(round(v)) for v in c] * 2
    return [int(v) for v in np.concatenate([start + box0[:3], start + box0[3:]])]


def _bile_ducts(rng: np.random.Generator, g: Grid, c: np.ndarray, r: float, hilum: np.ndarray) -> np.ndarray:
    """Dilated ducts from the lesion away from the hilum (upstream)."""
    s, ducts = g.s, np.zeros(g.shape, np.float32)
    cm = (g.affine[:3, :3] @ c + g.affine[:3, 3]).astype(np.float32)
    away = cm - hilum
    away /= max(np.linalg.norm(away), 1e-6)
    for _ in range(int(rng.integers(2, 4))):
        dirn = away + 0.5 * rng.standard_normal(3).astype(np.float32)
        dirn /= np.linalg.norm(dirn)
        ducts = np.maximum(ducts, tube(g.pts, cm, cm + dirn * (r + uniform(rng, 25, 45) * s), uniform(rng, 2.5, 3.5) * s, g.w))
    return ducts


def _retraction(g: Grid, liver: Liver, edt: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Pull the liver surface in over the lesion: the nearest rim becomes fat."""
    vox_mm = g.spacing.astype(np.float32)
    surf = np.argwhere(liver.mask & (edt <= float(vox_mm.min()) * 1.01))
    if not len(surf):
        return np.zeros(g.shape, np.float32)
    dist = np.sum((surf - c) ** 2 * (vox_mm**2), axis=1)
    sp_mm = g.affine[:3, :3] @ surf[int(np.argmin(dist))].astype(np.float32) + g.affine[:3, 3]
    dd = np.sqrt(np.sum((g.pts - sp_mm.reshape(3, 1, 1, 1).astype(np.float32)) ** 2, axis=0))
    return sigmoid((8 * g.s - dd) / g.w)


def draw_lesions(rng: np.random.Generator, g: Grid, liver: Liver, vessels: Vessels, label: str,
                 cfg: dict[str, Any]) -> Lesions:
    """Draw the appearance of the class, then place and paint every lesion in the liver."""
    vox_mm = g.spacing.astype(np.float32)
    edt = ndimage.distance_transform_edt(liver.mask, sampling=g.spacing).astype(np.float32)
    app = draw_appearance(rng, label, float(cfg.get("difficulty", 1.0)))
    sizes = draw_lesion_sizes(rng, label, cfg)
    les = Lesions(app, sizes, np.zeros(g.shape, np.float32), np.zeros(g.shape, np.float32), {p: 1.0 for p in _T},
                  {p: np.zeros(g.shape, np.float32) for p in _T}, np.zeros(g.shape, np.float32),
                  np.zeros(g.shape, np.float32), np.zeros(g.shape, np.float32), [], [], 0.0)
    if app["perilesional_enhancement"]:
        les.halo_ratio["arterial"] = uniform(rng, 1.3, 1.5)
    if app["perilesional_oedema"]:
        les.halo_ratio["t2wi"] = uniform(rng, 1.2, 1.4)
    les.steatosis = uniform(rng, 0.05, 0.22) if rng.random() < cfg.get("p_steatosis", 0.2) else 0.0
    halo_f = 1.6 if (app["perilesional_enhancement"] or app["perilesional_oedema"]) else 1.0
    for k, size in enumerate(sizes):
        r = size * g.s / 2  # physical sizes shrink with the field of view on small test grids
        retract = app["capsular_retraction"] and k == 0
        c = _centre(rng, liver, edt, r, retract, g.s)
        les.centres.append(c)
        radii = (r * rng.uniform(0.85, 1.15, 3)).astype(np.float32)
        sl, off = ball_coords(g.shape, c, radii.max() * halo_f * 1.3 / vox_mm + 2)
        offm = off * vox_mm.reshape(3, 1, 1, 1)
        d = blob(rng, offm, radii, app["irregularity"])
        les_body = sigmoid((1 - d) / app["edge"]) * liver.env[sl]
        if k == 0:  # the lesion to classify: the largest one
            les.box = _box(les_body, sl, c)
        vals = lesion_signals(rng, app, d, offm, g)
        newer = les_body > les.frac[sl]
        for p in _T:
            les.value[p][sl] = np.where(newer, vals[p], les.value[p][sl])
        les.frac[sl] = np.maximum(les.frac[sl], les_body)
        if app["fat_fraction"] > 0:
            les.fat[sl] = np.maximum(les.fat[sl], les_body * app["fat_fraction"] * (1 + 0.3 * smooth_field(rng, d.shape, (3, 3, 3))))
        if halo_f > 1:
            hal = np.clip(sigmoid((halo_f - d) / 0.12) - sigmoid((1 - d) / app["edge"]), 0, 1) * liver.env[sl]
            les.halo_frac[sl] = np.maximum(les.halo_frac[sl], hal)
        if k == 0 and app["bile_duct_dilatation"]:
            les.ducts = np.maximum(les.ducts, _bile_ducts(rng, g, c, r, vessels.hilum))
        if retract:
            les.retraction = _retraction(g, liver, edt, c)
    les.ducts = les.ducts * liver.env * (1 - les.frac)
    return les


# --------------------------------------------------------------------------- tissues and signal
@dataclass
class Tissues:
    """Fraction maps of every tissue, the liver's own share, and the fat fraction."""

    frac: dict[str, np.ndarray]
    liver_plain: np.ndarray
    halo: np.ndarray
    lesion: np.ndarray
    fat_amount: np.ndarray


def compose_tissues(rng: np.random.Generator, g: Grid, body: Body, liver: Liver, vessels: Vessels,
                    les: Lesions) -> Tissues:
    """Tissue fractions; later tissues take their share from earlier ones."""
    y, z, s = g.y, g.z, g.s
    organs = body.organs
    liver_env = liver.env * (1 - les.retraction)
    portal, hv = vessels.portal, vessels.hepatic
    parench = np.clip(liver_env - portal * liver_env - hv - les.ducts, 0, 1)
    les_frac = les.frac * (1 - les.retraction)
    parench_left = np.clip(parench - les_frac, 0, 1)
    halo_frac = np.minimum(les.halo_frac, parench_left)
    liver_plain = parench_left - halo_frac
    les_frac_eff = parench - parench_left
    ves_l = np.clip(portal * liver_env - les_frac * portal, 0, 1), np.clip(hv - les_frac * hv, 0, 1)
    frac: dict[str, np.ndarray] = {}
    used = liver_env.copy()
    frac["portal_vein"] = np.clip(ves_l[0] + portal * (1 - liver_env), 0, 1)
    frac["hepatic_vein"] = np.clip(ves_l[1] + organs["hepatic_vein"] * (1 - liver_env) * (z < liver.lmax[2]), 0, 1)
    frac["bile"] = les.ducts
    for k in ("csf", "bone", "aorta", "spleen"):
        frac[k] = organs[k] * (1 - used)
        used = used + frac[k]
    frac["kidney_cortex"] = organs["kidney"] * (1 - body.medulla) * (1 - used)
    frac["kidney_medulla"] = organs["kidney"] * body.medulla * (1 - used)
    used = used + organs["kidney"] * (1 - used)
    used = np.clip(used + frac["portal_vein"] * (1 - liver_env) + frac["hepatic_vein"] * (1 - liver_env), 0, 1)
    frac["muscle"] = np.clip((body.inner_body - body.cavity) + body.paraspinal * body.cavity, 0, 1) * (1 - used)
    used = np.clip(used + frac["muscle"], 0, 1)
    visc = body.cavity * (1 - used) * (y > body.back + 20 * s)
    vfat = np.clip(uniform(rng, 0.2, 0.45) + 0.35 * smooth_field(rng, g.shape, (10, 10, 8)), 0, 1)
    frac["viscera"] = visc * (1 - vfat)
    frac["fat"] = np.clip(body.body - body.inner_body, 0, 1) + visc * vfat + body.cavity * (1 - used) * (y <= body.back + 20 * s)
    for k in frac:
        frac[k] = frac[k] * body.body
    # fat tissue, marrow, steatotic liver, fat-containing lesions
    fat_amount = (0.92 * frac["fat"] + 0.45 * frac["bone"] + les.steatosis * (liver_plain + halo_frac)
                  + les.fat * les_frac_eff)
    return Tissues(frac, liver_plain, halo_frac, les_frac_eff, fat_amount)


def water_signal(rng: np.random.Generator, g: Grid, liver: Liver, les: Lesions, tissues: Tissues,
                 cfg: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per phase, the water signal: each tissue's fraction times its (per-subject) signal."""
    liver_sig = np.array(TISSUE_SIGNAL["liver"], np.float32)
    fib = np.zeros(g.shape, np.float32)
    if liver.cirrhotic:
        fib = 0.6 * np.exp(-(smooth_field(rng, g.shape, (22, 22, 16)) / 0.1) ** 2) * tissues.liver_plain
    paren_tex = 1 + 0.03 * smooth_field(rng, g.shape, (12, 12, 8))
    jitter = float(cfg.get("intensity_jitter", 0.06))
    subj = {t: np.array(v, np.float32) * (1 + jitter * rng.standard_normal(len(v))).astype(np.float32)
            for t, v in TISSUE_SIGNAL.items()}
    fib_mod = {"t2wi": 0.35, "dwi": 0.1, "t1": -0.15, "pre": -0.15, "arterial": -0.1, "venous": 0.1, "delay": 0.3}
    water: dict[str, np.ndarray] = {}
    for p in _T:
        i = _T.index(p)
        img = np.zeros(g.shape, np.float32)
        for t, f in tissues.frac.items():
            v = subj[t][i] if i < 4 else subj[t][3] + subj[t][i]
            img += np.float32(v) * f
        lv = subj["liver"][i] if i < 4 else subj["liver"][3] + subj["liver"][i]
        img += np.float32(lv) * paren_tex * (tissues.liver_plain * (1 + fib_mod[p] * fib))
        img += np.float32(lv) * les.halo_ratio[p] * tissues.halo
        scale_l = lv / (liver_sig[i] if i < 4 else liver_sig[3] + liver_sig[i])
        img += les.value[p] * np.float32(scale_l) * tissues.lesion
        water[p] = img * (1 - np.clip(tissues.fat_amount, 0, 0.95))
    return water


def acquire(rng: np.random.Generator, g: Grid, water: dict[str, np.ndarray], fat_amount: np.ndarray,
            cfg: dict[str, Any]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The eight images from water and fat: blur, bias field, Rician noise, artefacts, scanner gain."""
    volumes: dict[str, np.ndarray] = {}
    artefacts: dict[str, str] = {}
    noise_lo, noise_hi = cfg.get("noise", [0.015, 0.035])
    blur = float(rng.uniform(0.4, 0.7))
    bias = bias_field(rng, g.shape, float(rng.uniform(0.1, 0.3)))
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
            img = motion(img, g.affine, rng, float(rng.uniform(0.5, 1.2)))
            artefacts[mod] = "motion"
        elif u < cfg.get("p_motion", 0.04) + cfg.get("p_ghosting", 0.12):
            img = ghosting(img, int(rng.integers(2, 5)), 1, float(rng.uniform(0.2, 0.5)))
            artefacts[mod] = "respiratory ghosting"
        volumes[mod] = (img * np.float32(rng.uniform(600, 1400))).astype(np.float32)
    return volumes, artefacts


# --------------------------------------------------------------------------- the study
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
    g = make_grid(cfg)
    body = draw_body(rng, g)
    liver = draw_liver(rng, g, body, label, cfg)
    vessels = draw_vessels(rng, g, body, liver)
    les = draw_lesions(rng, g, liver, vessels, label, cfg)
    tissues = compose_tissues(rng, g, body, liver, vessels, les)
    volumes, artefacts = acquire(rng, g, water_signal(rng, g, liver, les, tissues, cfg), tissues.fat_amount, cfg)
    c0_mm = g.affine[:3, :3] @ les.centres[0] + g.affine[:3, 3]
    seg = couinaud_segment(c0_mm, vessels.landmarks)
    truth = {
        "class": label,
        "size_mm": les.sizes[0],
        "lesion_sizes_mm": les.sizes,
        "n_lesions": len(les.sizes),
        "location": {"segment": seg, "lobe": SEGMENT_LOBE[seg]},
        "centre_vox": [int(v) for v in les.centres[0]],
        "centre_mm": c0_mm.tolist(),
        "lesion_centres_vox": [[int(v) for v in c] for c in les.centres],
        "cirrhosis": liver.cirrhotic,
        "steatosis": les.steatosis > 0,
        "artefacts": artefacts,
        "appearance": les.app,
    }
    affines: dict[str, np.ndarray] = {}
    boxes = {mod: list(les.box) for mod in MODALITIES}
    if cfg.get("phase_grids", False):
        volumes, affines, boxes, shifts = place_on_phase_grids(volumes, g.affine, les.box,
                                                               study_rng(seed, "liver", index, stream=3), cfg)
        truth["phase_shift_mm"] = shifts
    truth = to_python(truth)
    findings, impression = reports.liver_report(truth, study_rng(seed, "liver", index, stream=1))
    return GeneratedStudy(volumes=volumes, affine=g.affine, organ_mask=liver.mask.astype(np.uint8), lesion_mask=les.mask,
                          label=label, findings=findings, impression=impression, truth=truth, affines=affines,
                          lesion_boxes=boxes)

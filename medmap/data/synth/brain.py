"""Synthetic brain MRI studies (t1, t1ce, t2, flair), BraTS-like: skull-stripped, 2 mm MNI grid.

A subject is a random deformation of the MNI152 anatomy (:mod:`.anatomy_brain`). Each
sequence is a weighted mix of tissue fraction maps with tissue intensities drawn per
subject around textbook relative values; a tumour study adds a high-grade glioma,
low-grade glioma or metastases with per-sequence appearance. Normal and tumour studies
share confounders (white-matter hyperintensities, enlarged ventricles, artefacts), so the
task is not "any bright spot".
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medmap.data.synth import reports
from medmap.data.synth.anatomy_brain import deform_subject, load_template, mni_coordinates, name_brain_location
from medmap.data.synth.common import (
    GeneratedStudy,
    ball_coords,
    bias_field,
    blob,
    ghosting,
    motion,
    partial_volume,
    rician,
    sigmoid,
    smooth_field,
    study_rng,
    to_python,
)

MODALITIES = ("t1", "t1ce", "t2", "flair")
SUBTYPES = ("high-grade glioma", "low-grade glioma", "metastasis")

# Textbook relative intensities (WM on T1 is the reference), per sequence t1, t1ce, t2, flair.
TISSUE_SIGNAL: dict[str, tuple[float, float, float, float]] = {
    "gm": (0.62, 0.63, 0.62, 0.62),
    "wm": (0.85, 0.86, 0.47, 0.50),
    "csf": (0.20, 0.21, 1.00, 0.10),
    "necrosis": (0.30, 0.32, 0.95, 0.50),
    "enhancing": (0.56, 1.30, 0.72, 0.80),
    "solid": (0.50, 0.52, 0.84, 0.84),
    "oedema": (0.58, 0.59, 0.78, 0.80),
    "wmh": (0.70, 0.71, 0.78, 0.84),
}
COMPONENTS = ("necrosis", "enhancing", "solid", "oedema", "wmh")


def _log_uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """Log-uniform draw: small lesions are as common per octave as large ones."""
    return float(np.exp(rng.uniform(np.log(lo), np.log(max(hi, lo)))))


def _draw_tumour(rng: np.random.Generator, subtype: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Shape parameters of a tumour (sizes in mm) and which appearance features it has."""
    lo, hi = cfg.get("size_mm", [5, 60])
    if subtype == "high-grade glioma":
        size = _log_uniform(rng, max(lo, 15), hi)
        return {
            "size_mm": size,
            "nodules": [size],
            "necrotic_core": bool(rng.random() < 0.85),
            "core_fraction": float(rng.uniform(0.35, 0.7)),
            "enhancement": "ring" if rng.random() < 0.85 else "patchy",
            "oedema_factor": float(rng.uniform(1.2, 1.8)),
            "irregularity": float(rng.uniform(0.12, 0.3)),
        }
    if subtype == "low-grade glioma":
        size = _log_uniform(rng, max(lo, 10), hi * 0.85)
        return {
            "size_mm": size,
            "nodules": [size],
            "necrotic_core": False,
            "core_fraction": 0.0,
            "enhancement": "faint" if rng.random() < 0.12 else "none",
            "oedema_factor": float(rng.uniform(1.0, 1.25)),
            "irregularity": float(rng.uniform(0.05, 0.18)),
        }
    n = int(rng.choice([1, 1, 2, 3, 4]))
    sizes = sorted((_log_uniform(rng, lo, min(hi, 28)) for _ in range(n)), reverse=True)
    return {
        "size_mm": sizes[0],
        "nodules": sizes,
        "necrotic_core": bool(sizes[0] > 12 and rng.random() < 0.6),
        "core_fraction": float(rng.uniform(0.3, 0.6)),
        "enhancement": "ring" if sizes[0] > 12 and rng.random() < 0.6 else "solid",
        "oedema_factor": float(rng.uniform(2.0, 3.5)),
        "irregularity": float(rng.uniform(0.03, 0.1)),
    }


def _pick_voxel(rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    return candidates[int(rng.integers(len(candidates)))].astype(np.float32)


def generate_brain_study(index: int, seed: int, label: str, subtype: str | None, cfg: dict[str, Any]) -> GeneratedStudy:
    """Generate one brain study in memory.

    Args:
        index: study index (with ``seed`` it determines every random draw).
        seed: run seed.
        label: ``normal`` or ``tumour``.
        subtype: tumour subtype (one of :data:`SUBTYPES`) or ``None`` for normal.
        cfg: the ``brain`` section of the synth config.

    Returns:
        The volumes, masks, texts and ground truth of the study.
    """
    rng = study_rng(seed, "brain", index)
    spacing = float(cfg.get("spacing_mm", 2.0))
    tpl = load_template(spacing)
    vox_mm = spacing
    enlarged = bool(rng.random() < cfg.get("p_enlarged_ventricles", 0.25))
    maps, sample_vox = deform_subject(
        rng,
        tpl,
        elastic_vox=float(cfg.get("elastic_mm", 3.0)) / vox_mm,
        max_translation_vox=4.0 / vox_mm,
        ventricle_enlargement=float(rng.uniform(0.25, 0.55)) if enlarged else 0.0,
    )
    gm, wm, csf, mask_soft = maps
    mask = mask_soft > 0.5
    shape = mask.shape
    affine = tpl.affine
    fractions: dict[str, np.ndarray] = {"gm": gm, "wm": wm, "csf": csf}
    lesion: dict[str, np.ndarray] = {c: np.zeros(shape, np.float32) for c in COMPONENTS}
    truth: dict[str, Any] = {"class": label, "subtype": subtype, "ventricles_enlarged": enlarged}

    # White-matter hyperintensities: a confounder in both classes.
    n_wmh = 0
    if rng.random() < cfg.get("p_wmh", 0.5):
        n_wmh = int(rng.integers(1, 16))
        cand = np.argwhere((wm > 0.85) & mask)
        for _ in range(n_wmh):
            c = _pick_voxel(rng, cand)
            r_mm = float(rng.uniform(1.5, 5.5))
            sl, off = ball_coords(shape, c, np.full(3, r_mm / vox_mm + 1))
            d = blob(rng, off * vox_mm, np.full(3, r_mm, np.float32), 0.2)
            lesion["wmh"][sl] = np.maximum(lesion["wmh"][sl], sigmoid((1 - d) / 0.15))
    truth["wmh_count"] = n_wmh

    lesion_mask = np.zeros(shape, np.uint8)
    if label != "normal":
        assert subtype is not None
        t = _draw_tumour(rng, subtype, cfg)
        if subtype == "metastasis":
            cand = np.argwhere((gm > 0.3) & (gm < 0.7) & (wm > 0.25) & mask)
        else:
            cand = np.argwhere((wm > 0.6) & mask)
        centres = []
        for k, size in enumerate(t["nodules"]):
            c = _pick_voxel(rng, cand)
            centres.append(c)
            r = size / 2.0
            radii = r * rng.uniform(0.8, 1.15, 3).astype(np.float32)
            reach = radii.max() * max(t["oedema_factor"], 1.0) * 1.35 / vox_mm + 2
            sl, off = ball_coords(shape, c, np.full(3, reach))
            d = blob(rng, off * vox_mm, radii, t["irregularity"])
            tumour = sigmoid((1 - d) / 0.07)
            core = sigmoid((t["core_fraction"] - d) / 0.07) if t["necrotic_core"] and size >= 10 else np.zeros_like(d)
            if t["enhancement"] in ("ring", "solid"):
                enh = np.clip(tumour - core, 0, 1)
                solid = np.zeros_like(d)
                if t["enhancement"] == "ring" and not (t["necrotic_core"] and size >= 10):
                    # Ring without necrosis: a non-enhancing solid centre.
                    inner = sigmoid((0.55 - d) / 0.07)
                    enh, solid = np.clip(tumour - inner, 0, 1), inner
            elif t["enhancement"] == "patchy":
                patch = sigmoid(6.0 * smooth_field(rng, d.shape, (4, 4, 4)))
                enh = np.clip(tumour - core, 0, 1) * patch
                solid = np.clip(tumour - core - enh, 0, 1)
            elif t["enhancement"] == "faint":
                enh = 0.35 * np.clip(tumour - core, 0, 1)
                solid = np.clip(tumour - core - enh, 0, 1)
            else:
                enh = np.zeros_like(d)
                solid = np.clip(tumour - core, 0, 1)
            oed = np.clip(sigmoid((1 - d / t["oedema_factor"]) / 0.12) - tumour, 0, 1)
            # Oedema spreads along white matter, not into CSF.
            oed = oed * np.clip(wm[sl] + 0.4 * gm[sl], 0, 1)
            local_mask = mask[sl].astype(np.float32)
            for name, comp in (("necrosis", core), ("enhancing", enh), ("solid", solid), ("oedema", oed)):
                lesion[name][sl] = np.maximum(lesion[name][sl], comp * local_mask)
            lesion_mask[sl] = np.maximum(lesion_mask[sl], ((tumour > 0.5) & mask[sl]).astype(np.uint8))
        c0 = centres[0]
        mni = mni_coordinates(tpl.affine, sample_vox[:, int(c0[0]), int(c0[1]), int(c0[2])])
        truth.update(t)
        truth["location"] = name_brain_location(mni)
        truth["centre_vox"] = [int(v) for v in c0]
        truth["centre_mm"] = (affine[:3, :3] @ c0 + affine[:3, 3]).tolist()
        truth["centre_mni"] = mni.tolist()
        truth["nodule_centres_vox"] = [[int(v) for v in c] for c in centres]
    else:
        truth["size_mm"] = 0.0

    # Lesion tissue replaces normal tissue; oedema and WMH replace parenchyma, not CSF.
    tumour_total = np.clip(lesion["necrosis"] + lesion["enhancing"] + lesion["solid"], 0, 1)
    paren_total = np.clip(lesion["oedema"] + lesion["wmh"], 0, 1 - tumour_total)
    keep = 1 - tumour_total
    paren = np.clip(gm + wm, 1e-6, None)
    take = np.minimum(paren_total, paren * keep)
    f_gm = gm * keep - take * gm / paren
    f_wm = wm * keep - take * wm / paren
    f_csf = csf * keep
    scale_les = np.where(lesion["oedema"] + lesion["wmh"] > 0, take / np.clip(lesion["oedema"] + lesion["wmh"], 1e-6, None), 0)
    fractions = {
        "gm": f_gm,
        "wm": f_wm,
        "csf": f_csf,
        "necrosis": lesion["necrosis"],
        "enhancing": lesion["enhancing"],
        "solid": lesion["solid"],
        "oedema": lesion["oedema"] * scale_les,
        "wmh": lesion["wmh"] * scale_les,
    }

    jitter = float(cfg.get("intensity_jitter", 0.06))
    noise_lo, noise_hi = cfg.get("noise", [0.02, 0.05])
    volumes: dict[str, np.ndarray] = {}
    artefacts: dict[str, str] = {}
    smooth_sigma = float(rng.uniform(0.4, 0.8))
    for m_idx, mod in enumerate(MODALITIES):
        img = np.zeros(shape, np.float32)
        for tissue, frac in fractions.items():
            value = TISSUE_SIGNAL[tissue][m_idx] * (1 + jitter * rng.standard_normal())
            img += np.float32(value) * frac
        img = partial_volume(img, smooth_sigma)
        img *= bias_field(rng, shape, float(rng.uniform(0.03, 0.2)))
        img = rician(img, float(rng.uniform(noise_lo, noise_hi)), rng, where=mask)
        u = rng.random()
        if u < cfg.get("p_motion", 0.06):
            img = motion(img, affine, rng, float(rng.uniform(0.5, 1.5)))
            artefacts[mod] = "motion"
        elif u < cfg.get("p_motion", 0.06) + cfg.get("p_ghosting", 0.08):
            img = ghosting(img, int(rng.integers(2, 6)), int(rng.integers(0, 2)), float(rng.uniform(0.2, 0.6)))
            artefacts[mod] = "ghosting"
        img = img * mask * np.float32(rng.uniform(600, 1400))
        volumes[mod] = img.astype(np.float32)
    truth["artefacts"] = artefacts
    truth["tissue_fraction_lesion_ml"] = float(lesion_mask.sum() * vox_mm**3 / 1000.0)
    truth = to_python(truth)
    findings, impression = reports.brain_report(truth, study_rng(seed, "brain", index, stream=1))
    return GeneratedStudy(
        volumes=volumes,
        affine=affine,
        organ_mask=mask.astype(np.uint8),
        lesion_mask=lesion_mask,
        label=label,
        findings=findings,
        impression=impression,
        truth=truth,
    )

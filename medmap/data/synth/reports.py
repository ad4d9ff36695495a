"""Report writer of MedMoM-Synth: one findings text per modality, plus an impression.

Findings describe what a sequence shows (signal, margin, size, location, enhancement)
from the generator's drawn appearance, with many paraphrases (synonyms, sentence orders,
optional details). Per-modality findings never name the class or a synonym of it (see
:data:`FORBIDDEN_IN_FINDINGS`); only the impression may.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

#: Words that must never occur in per-modality findings (they would leak the label).
FORBIDDEN_IN_FINDINGS = (
    r"\bhcc\b", r"hepatocellular", r"cholangio", r"\bicc\b", r"metasta", r"cyst", r"h(a)?emangioma",
    r"\bfnh\b", r"focal nodular", r"abscess", r"glioma", r"tumou?r", r"neoplas", r"\bmass\b",
    r"malignan", r"\bnormal\b", r"carcinoma", r"hyperplasia", r"\bcancer",
)
_FORBIDDEN_RE = re.compile("|".join(FORBIDDEN_IN_FINDINGS), re.IGNORECASE)


def leaks_label(text: str) -> bool:
    """True when ``text`` names a class or a synonym of one."""
    return bool(_FORBIDDEN_RE.search(text))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _size(rng: np.random.Generator, mm: float) -> str:
    u = rng.random()
    if u < 0.4:
        return f"{mm / 10:.1f} cm"
    if u < 0.8:
        return f"{mm:.0f} mm"
    return f"{mm:.0f} x {mm * rng.uniform(0.75, 0.95):.0f} mm"


def _join(rng: np.random.Generator, first: str, rest: list[str]) -> str:
    """First sentence stays first; the optional ones are shuffled."""
    rest = [r for r in rest if r]
    order = rng.permutation(len(rest)) if rest else []
    sentences = [first] + [rest[i] for i in order]
    return " ".join(s[0].upper() + s[1:] for s in sentences)


# ----------------------------------------------------------------------------- brain
_BRAIN_SIGNAL = {
    # (sequence, component) -> phrases
    ("t1", "tumour"): ["hypointense", "of low signal", "mildly hypointense", "subtly hypointense"],
    ("t2", "tumour"): ["hyperintense", "of high signal", "T2 bright"],
    ("flair", "tumour"): ["hyperintense", "of high FLAIR signal", "bright on FLAIR"],
}
_BRAIN_NORMAL = {
    "t1": ["Grey-white matter differentiation is preserved.", "No focal signal abnormality on T1-weighted images.",
           "The brain parenchyma is unremarkable on T1.", "No focal T1 signal change; midline structures are central.",
           "Unremarkable T1-weighted appearance of the cerebral and cerebellar hemispheres."],
    "t1ce": ["No abnormal enhancement.", "No pathological contrast enhancement is seen.",
             "After contrast there is no focal enhancing lesion.", "No parenchymal or leptomeningeal enhancement.",
             "Post-contrast images show no enhancing focus."],
    "t2": ["No focal T2 signal abnormality.", "The brain parenchyma shows unremarkable T2 signal.",
           "No area of abnormal T2 hyperintensity.", "T2-weighted images are unremarkable.",
           "Preserved T2 signal of grey and white matter."],
    "flair": ["No FLAIR signal abnormality.", "No area of abnormal FLAIR hyperintensity.",
              "FLAIR images are unremarkable.", "No perilesional or white-matter FLAIR change.",
              "Unremarkable FLAIR signal throughout."],
}


def _brain_location(rng: np.random.Generator, loc: dict[str, str]) -> str:
    h, lobe = loc["hemisphere"], loc["lobe"]
    if lobe == "cerebellar":
        return _pick(rng, [f"the {h} cerebellar hemisphere", f"the {h} cerebellum"])
    if lobe == "deep grey matter":
        return _pick(rng, [f"the {h} basal ganglia region", f"the {h} deep grey matter", f"the {h} thalamocapsular region"])
    return _pick(rng, [f"the {h} {lobe} lobe", f"the {lobe} lobe on the {h}", f"the {h} {lobe} region"])


def brain_report(truth: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, str], str]:
    """Findings per brain sequence and an impression, from a brain study's ground truth."""
    findings: dict[str, str] = {}
    extras: list[str] = []
    if truth.get("ventricles_enlarged"):
        extras.append(_pick(rng, ["The ventricles are mildly prominent.", "Mild ventricular enlargement.",
                                  "Prominent lateral ventricles."]))
    wmh = truth.get("wmh_count", 0)
    arte = truth.get("artefacts", {})
    if truth["class"] == "normal":
        for mod in ("t1", "t1ce", "t2", "flair"):
            first = _pick(rng, _BRAIN_NORMAL[mod])
            rest = [_pick(rng, _BRAIN_NORMAL[mod])] if rng.random() < 0.4 else []
            rest += [e for e in extras if rng.random() < 0.8]
            if wmh and mod in ("flair", "t2"):
                rest.append(_pick(rng, [f"A few small punctate foci of {'FLAIR' if mod == 'flair' else 'T2'} hyperintensity in the periventricular white matter.",
                                        "Scattered small white-matter hyperintensities, likely small vessel change.",
                                        "Several tiny nonspecific white-matter hyperintensities."]))
            if mod in arte:
                rest.append(_pick(rng, [f"The {mod} images are degraded by {arte[mod]} artefact.", f"Some {arte[mod]} artefact."]))
            findings[mod] = _join(rng, first, rest)
        impression = _pick(rng, ["No intracranial tumour.", "No evidence of a brain tumour.",
                                 "Normal study without a mass lesion.", "No intracranial mass."])
        if wmh:
            impression += " " + _pick(rng, ["Mild small vessel change.", "Few nonspecific white-matter hyperintensities."])
        return findings, impression

    loc = _brain_location(rng, truth["location"])
    size = _size(rng, truth["size_mm"])
    n = len(truth.get("nodules", [1]))
    lesion = _pick(rng, ["lesion", "focal lesion", "space-occupying lesion", "intra-axial lesion"]) if n == 1 else _pick(rng, [f"{n} lesions", f"{n} focal lesions", "multiple lesions"])
    margin = {"high-grade glioma": ["ill-defined", "irregular", "poorly marginated"],
              "low-grade glioma": ["relatively well-defined", "infiltrative", "homogeneous"],
              "metastasis": ["well-circumscribed", "round", "well-defined"]}[truth["subtype"]]
    of = truth.get("oedema_factor", 1.0)
    oed = ("extensive surrounding oedema" if of > 2.2 else "moderate perilesional oedema" if of > 1.35
           else "little surrounding oedema")
    size_phrase = _pick(rng, [f"measuring {size}", f"of {size}", f"about {size} in diameter"]) if n == 1 else f"the largest {size}"
    where = _pick(rng, [f"in {loc}", f"involving {loc}", f"centred in {loc}"])
    for mod in ("t1", "t1ce", "t2", "flair"):
        if mod in ("t1", "t1ce"):
            sig = _pick(rng, _BRAIN_SIGNAL[("t1", "tumour")])
        else:
            sig = _pick(rng, _BRAIN_SIGNAL[(mod, "tumour")])
        first = _pick(rng, [f"There is a {_pick(rng, margin)} {sig} {lesion} {where}, {size_phrase}.",
                            f"{lesion.capitalize()} {where}, {sig}, {size_phrase}.",
                            f"A {sig} {lesion} {size_phrase} is seen {where}."]) if n == 1 else \
            f"There are {lesion} {where}, {sig}, {size_phrase}."
        rest: list[str] = []
        if mod == "t1ce":
            enh = truth.get("enhancement")
            first = _pick(rng, [f"A {lesion} {where}, {size_phrase}.", f"Post-contrast images show a {lesion} {where}, {size_phrase}."]) if n == 1 else first
            rest.append({"ring": _pick(rng, ["It shows irregular peripheral ring enhancement.", "Thick rim enhancement surrounds a non-enhancing centre.",
                                             "There is ring-like enhancement."]),
                         "patchy": _pick(rng, ["Patchy heterogeneous enhancement.", "Irregular patchy areas of enhancement."]),
                         "solid": _pick(rng, ["Avid solid nodular enhancement.", "The lesions enhance homogeneously.", "Nodular enhancement."]),
                         "faint": _pick(rng, ["Only faint ill-defined enhancement.", "Minimal enhancement."]),
                         "none": _pick(rng, ["No enhancement after contrast.", "It does not enhance.", "No contrast uptake."])}[enh])
        if truth.get("necrotic_core") and mod in ("t2", "t1ce", "t1"):
            rest.append(_pick(rng, ["Central necrosis.", "A central necrotic component.", "The centre is necrotic."]))
        if mod in ("t2", "flair"):
            rest.append(_pick(rng, [f"There is {oed}.", f"{oed[0].upper() + oed[1:]}."]))
            if of > 1.35:
                rest.append(_pick(rng, ["Local effacement of the adjacent sulci.", "Mild local compression of adjacent sulci.", ""]))
        if mod == "t1" and truth["subtype"] == "low-grade glioma":
            rest.append(_pick(rng, ["The abnormality is subtle on T1.", "Only subtle T1 change.", ""]))
        rest += [e for e in extras if rng.random() < 0.5]
        if wmh and mod == "flair" and rng.random() < 0.7:
            rest.append("A few small unrelated white-matter hyperintensities.")
        if mod in arte:
            rest.append(f"Some {arte[mod]} artefact.")
        findings[mod] = _join(rng, first, rest)
    sub = truth["subtype"]
    name = {"high-grade glioma": _pick(rng, ["high-grade glioma", "high-grade glial tumour", "glioblastoma"]),
            "low-grade glioma": _pick(rng, ["low-grade glioma", "low-grade glial tumour"]),
            "metastasis": "metastases" if n > 1 else "metastasis"}[sub]
    impression = _pick(rng, [f"Intracranial tumour in {loc}, most likely {name}.", f"Findings in keeping with {name} in {loc}.",
                             f"Brain tumour ({name}) involving {loc}."])
    return findings, impression


# ----------------------------------------------------------------------------- liver
def _level(ratio: float, kind: str = "signal") -> str:
    """Signal relative to liver in words."""
    if kind == "enh":
        if ratio > 1.3:
            return "hyperenhancing"
        if ratio > 1.08:
            return "mildly hyperenhancing"
        if ratio > 0.92:
            return "isoenhancing"
        if ratio > 0.7:
            return "mildly hypoenhancing"
        return "hypoenhancing"
    if ratio > 2.3:
        return "markedly hyperintense"
    if ratio > 1.3:
        return "hyperintense"
    if ratio > 1.08:
        return "mildly hyperintense"
    if ratio > 0.92:
        return "isointense"
    if ratio > 0.7:
        return "mildly hypointense"
    return "hypointense"


_LIVER_NORMALISE = {"arterial": 1.15, "venous": 1.70, "delay": 1.55}
_PHASE_NAME = {"t2wi": ["T2-weighted", "T2"], "dwi": ["diffusion-weighted", "DWI"], "t1_in": ["in-phase T1", "in-phase"],
               "t1_out": ["opposed-phase T1", "out-of-phase"], "pre": ["pre-contrast T1", "unenhanced T1"],
               "arterial": ["late arterial phase", "arterial phase"], "venous": ["portal venous phase", "venous phase"],
               "delay": ["delayed phase", "equilibrium phase"]}


def _liver_margin(rng: np.random.Generator, app: dict[str, Any]) -> str:
    if app["edge"] <= 0.025:
        return _pick(rng, ["sharply marginated", "well-circumscribed", "smooth, sharply defined", "round, sharply defined"])
    if app["irregularity"] >= 0.2:
        return _pick(rng, ["ill-defined", "irregular", "infiltrative-appearing", "poorly marginated"])
    if app["irregularity"] >= 0.11:
        return _pick(rng, ["lobulated", "lobulated, well-defined", "polylobulated"])
    return _pick(rng, ["well-defined", "round", "oval, well-defined"])


def _enh_sentence(rng: np.random.Generator, phase: str, app: dict[str, Any]) -> str:
    inner, outer = app["enh"][phase]
    pre = float(np.mean(app["t1"]))
    liver = _LIVER_NORMALISE[phase]
    rel_out = (pre + outer) / liver  # inner and outer differ by <= 0.2 past the rim branch
    fill = app["fill"][phase]
    if fill > 0:
        if phase == "arterial":
            return _pick(rng, ["Peripheral discontinuous nodular enhancement.", "Peripheral nodular puddles of enhancement, isodense to the aorta.",
                               "Discontinuous nodular enhancement along the periphery."])
        if fill >= 0.95:
            return _pick(rng, ["Complete fill-in of enhancement.", "The lesion is now uniformly filled in.", "Homogeneous fill-in, following the blood pool."])
        return _pick(rng, [f"Progressive centripetal fill-in of about {int(fill * 100 // 10 * 10)}%.", "Centripetal progression of the peripheral enhancement.",
                           "The enhancement progresses towards the centre, incompletely filled."])
    if max(inner, outer) < 0.03:
        return _pick(rng, ["No internal enhancement.", "It does not enhance.", "No enhancement is seen.", "Non-enhancing."])
    if abs(inner - outer) > 0.2:
        if outer > inner:
            s = _pick(rng, ["Rim enhancement with a non-enhancing centre.", "Peripheral rim-like enhancement.", "Irregular ring enhancement."])
            if phase == "delay" and rel_out < 0.85:
                s += " " + _pick(rng, ["Peripheral washout.", "The rim becomes hypointense."])
            return s
        return _pick(rng, ["Progressive central enhancement.", "Delayed enhancement of the central fibrous component.",
                           "Central enhancement increases on delayed images."])
    lvl = _level(rel_out, "enh")
    if phase == "arterial":
        if rel_out > 1.3:
            return _pick(rng, ["Avid homogeneous arterial hyperenhancement.", "Intense arterial enhancement.", "Marked arterial phase hyperenhancement (non-rim)."])
        return f"{lvl[0].upper() + lvl[1:]} relative to the liver."
    if rel_out < 0.85 and phase in ("venous", "delay"):
        return _pick(rng, ["Washout, hypointense to the surrounding liver.", "Shows washout.", "Becomes hypointense relative to liver (washout)."])
    if 0.92 <= rel_out <= 1.1:
        return _pick(rng, ["Isointense to the surrounding liver.", "It fades to isointensity with the liver.", "Iso-enhancing to the parenchyma."])
    return f"{lvl[0].upper() + lvl[1:]} relative to the liver."


def liver_report(truth: dict[str, Any], rng: np.random.Generator) -> tuple[dict[str, str], str]:
    """Findings per liver phase and an impression, from a liver study's ground truth."""
    app = truth["appearance"]
    loc = truth["location"]
    seg_word = _pick(rng, [f"segment {loc['segment']}", f"hepatic segment {loc['segment']}", f"the {loc['lobe']} lobe (segment {loc['segment']})"])
    if loc["lobe"] == "caudate":
        seg_word = _pick(rng, ["the caudate lobe", "segment I (caudate)"])
    n = truth["n_lesions"]
    size = _size(rng, truth["size_mm"])
    obj = _pick(rng, ["lesion", "focal lesion", "focal liver lesion", "hepatic lesion", "nodule"]) if n == 1 else \
        _pick(rng, [f"{n} lesions", "multiple lesions", f"{n} focal liver lesions"])
    margin = _liver_margin(rng, app)
    background = []
    if truth["cirrhosis"]:
        background.append(_pick(rng, ["Cirrhotic liver morphology with a nodular contour.", "The liver is cirrhotic, with surface nodularity.",
                                      "Nodular liver surface and heterogeneous parenchyma."]))
    if truth["steatosis"]:
        background.append(_pick(rng, ["Diffuse signal drop of the parenchyma on opposed-phase images.", "Hepatic steatosis."]))
    findings: dict[str, str] = {}
    for mod in ("t2wi", "dwi", "t1_in", "t1_out", "pre", "arterial", "venous", "delay"):
        rest: list[str] = []
        pname = _pick(rng, _PHASE_NAME[mod])
        if mod in ("t2wi", "dwi"):
            key = "t2" if mod == "t2wi" else "dwi"
            inner, outer = app[key]
            sig = _level(max(inner, outer))
            if mod == "dwi":
                sig = {"markedly hyperintense": "markedly restricted diffusion", "hyperintense": "restricted diffusion",
                       "mildly hyperintense": "mildly increased diffusion signal"}.get(sig, f"{sig} on diffusion")
            if app.get(f"{key}_target"):
                rest.append(_pick(rng, ["Target appearance.", f"Target-like appearance with a {'brighter' if inner > outer else 'darker'} centre.",
                                        "Concentric target configuration."]))
            elif abs(inner - outer) > 0.5:
                rest.append(_pick(rng, ["The centre is more fluid-like than the wall.", "A markedly bright centre with a thick wall."]))
            if app["central_scar"] and mod == "t2wi":
                rest.append(_pick(rng, ["A central T2-bright scar.", "Central stellate hyperintense scar."]))
            if app["perilesional_oedema"] and mod == "t2wi":
                rest.append("Perilesional T2 hyperintensity.")
            if app["bile_duct_dilatation"] and mod == "t2wi":
                rest.append(_pick(rng, ["Dilated peripheral bile ducts upstream of the lesion.", "Upstream intrahepatic biliary dilatation."]))
            if app["capsular_retraction"] and mod == "t2wi":
                rest.append(_pick(rng, ["Retraction of the overlying liver capsule.", "Capsular retraction."]))
        elif mod in ("t1_in", "t1_out", "pre"):
            sig = _level(float(np.mean(app["t1"])))
            if mod == "t1_out" and app["fat_fraction"] > 0:
                rest.append(_pick(rng, ["Signal drop on opposed-phase images, indicating intralesional fat.", "Loss of signal out of phase (microscopic fat)."]))
            elif mod == "t1_out" and rng.random() < 0.5:
                rest.append(_pick(rng, ["No signal drop out of phase.", "No intralesional fat."]))
        else:
            sig = ""
        if sig:
            first = _pick(rng, [f"A {margin} {obj} in {seg_word}, {size}, {sig} on {pname} images." if n == 1 else
                                f"{obj.capitalize()}, {margin}, the largest in {seg_word} ({size}), {sig} on {pname} images.",
                                f"{pname[0].upper() + pname[1:]}: {sig} {margin} {obj} in {seg_word} measuring {size}.",
                                f"In {seg_word} there is a {sig}, {margin} {obj} of {size}." if n == 1 else
                                f"In {seg_word} and elsewhere, {obj}, {sig}, up to {size}."])
        else:
            first = _pick(rng, [f"{pname[0].upper() + pname[1:]}: the {margin} {obj} in {seg_word} ({size}).",
                                f"The {obj} in {seg_word}, {size}, on the {pname}.",
                                f"On the {pname}, the {obj} in {seg_word} measures {size}."])
            rest.insert(0, _enh_sentence(rng, mod, app))
            if mod == "arterial" and app["perilesional_enhancement"]:
                rest.append(_pick(rng, ["Transient perilesional hyperenhancement.", "Wedge-shaped perilesional arterial enhancement."]))
            if app["septa"] and mod != "arterial":
                rest.append(_pick(rng, ["Enhancing internal septa.", "Thin enhancing septations."]))
            if app["capsule"] and mod == "delay":
                rest.append(_pick(rng, ["An enhancing capsule.", "Peripheral enhancing capsule on delayed images."]))
            if app["central_scar"] and mod == "delay":
                rest.append(_pick(rng, ["The central scar enhances late.", "Delayed enhancement of the central scar."]))
        if mod in ("t2wi", "pre", "venous") and background and rng.random() < 0.7:
            rest += background
        if mod in truth.get("artefacts", {}):
            rest.append(f"Some {truth['artefacts'][mod]} artefact.")
        # Lead sentence first; optional details in random order.
        findings[mod] = _join(rng, first, rest)
    name = {"hcc": ["hepatocellular carcinoma", "HCC"], "icc": ["intrahepatic cholangiocarcinoma", "ICC"],
            "metastasis": ["liver metastases" if n > 1 else "a liver metastasis", "metastatic disease"],
            "cyst": ["simple hepatic cyst" + ("s" if n > 1 else ""), "benign hepatic cyst"],
            "hemangioma": ["hepatic hemangioma", "haemangioma"], "fnh": ["focal nodular hyperplasia", "FNH"],
            "abscess": ["hepatic abscess", "liver abscess"]}[truth["class"]]
    nm = _pick(rng, name)
    impression = _pick(rng, [f"Findings most consistent with {nm} in {seg_word}.",
                             f"{nm[0].upper() + nm[1:]} in {seg_word}.",
                             f"{seg_word[0].upper() + seg_word[1:]}: {nm}."])
    if truth["cirrhosis"]:
        impression += " " + _pick(rng, ["Background cirrhosis.", "Cirrhotic liver."])
    return findings, impression

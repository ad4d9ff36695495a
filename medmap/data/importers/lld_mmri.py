"""LLD-MMRI (multi-phase liver MRI, 7 focal lesion classes) to a MedMAP study list.

Two download forms are read; :func:`detect_layout` tells them apart from the tree.

**Whole volumes** (``layout="volumes"``), one study per lesion::

    ROOT/images/<patient>/<study UID>/<series UID>.nii.gz
    ROOT/labels/Annotation.json

The annotation file is expected to look like this (the release describes it in words only;
key spelling is matched loosely: case, ``_``, ``-`` and spaces are ignored, and a few
synonyms such as ``seriesInstanceUID`` or ``label`` for ``category`` are accepted)::

    {"Annotation_info": {                      # optional wrapper; the patients may be top level
      "MR12345": [                             # patient -> list of series entries
        {"studyUID": "1.2.3", "seriesUID": "1.2.3.4", "phase": "C+A",
         "pixel_spacing": [0.7, 0.7], "slice_thickness": 6.0,        # optional, kept in meta
         "annotation": {"lesion": {
            "0": {"category": "Hepatocellular_carcinoma",            # or 0-6, or -1: unlabelled
                  "bbox": {"3D_box": {"x_min": 41, "y_min": 50, "z_min": 20,
                                      "x_max": 52, "y_max": 61, "z_max": 25}}}}}}
      ]}}

``bbox`` may also be the ``x_min``... object itself or a list ``[x_min, y_min, z_min, x_max,
y_max, z_max]``. A lesion is the lesion index within one study UID; the series of that study
carrying the index give its phases, each with its own box. Phase names: ``T2WI``, ``DWI``,
``In Phase``, ``Out Phase``, ``C-pre``, ``C+A``, ``C+V``, ``C+Delay`` (the project's names
``t2wi`` ... ``delay`` are accepted too). Categories: the long names (``Hepatic_hemangioma``,
``Intrahepatic_cholangiocarcinoma``, ``Hepatic_abscess``, ``Hepatic_metastasis``,
``Hepatic_cyst``, ``FOCAL_NODULAR_HYPERPLASIA``, ``Hepatocellular_carcinoma``), the
integers 0-6 of :data:`LLD_LABELS`, or -1 / ``inaccessible`` for an unlabelled lesion (kept,
with no label). A series entry without a phase or series UID, a box that is not six numbers,
an unknown phase or category, a phase given twice for one lesion, phases of one lesion
disagreeing on its category, or a missing series file is an error naming the patient.

**Pre-cropped patches** (``layout="patches"``), one study per patch folder::

    ROOT/classification_dataset/images/<case>/<phase>.nii.gz    # e.g. "C+A.nii.gz", "In Phase.nii.gz"
    ROOT/classification_dataset/labels/labels.txt               # "<case> <label 0-6>" per line

A case with several lesions has one folder per lesion, ``<case>_<index>``; those share the
patient id ``<case>`` so that patient-level splits keep a patient's lesions together. A
folder absent from ``labels.txt`` is kept unlabelled. Patches carry no box: use an organ
config with ``crop: patch``.

Example:
    >>> from medmap.data.importers.lld_mmri import import_lld_mmri
    >>> result = import_lld_mmri("/data/LLD-MMRI")          # doctest: +SKIP
    >>> result.layout, result.studies[0].lesion_box.space   # doctest: +SKIP
    ('volumes', 'voxel')
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmap.data.importers import ImportResult, nifti_stem
from medmap.data.studylist import LesionBox, Study, parse_box
from medmap.errors import StudyListError

ORGAN = "liver"
LAYOUTS = ("volumes", "patches")
#: LLD-MMRI's integer labels, in its order, as the liver config's class names.
LLD_LABELS = ("hemangioma", "icc", "abscess", "metastasis", "cyst", "fnh", "hcc")
#: Phase names (normalised by :func:`_norm`) -> liver config modality.
PHASES = {
    "t2wi": "t2wi", "t2": "t2wi",
    "dwi": "dwi",
    "inphase": "t1_in", "t1inphase": "t1_in", "t1in": "t1_in",
    "outphase": "t1_out", "t1outphase": "t1_out", "t1out": "t1_out", "opposedphase": "t1_out",
    "cpre": "pre", "pre": "pre", "precontrast": "pre",
    "ca": "arterial", "arterial": "arterial",
    "cv": "venous", "venous": "venous", "portalvenous": "venous",
    "cdelay": "delay", "delay": "delay", "delayed": "delay",
}
#: Category names (normalised) -> liver class; the integers map through LLD_LABELS.
CATEGORIES = {
    "hepatichemangioma": "hemangioma", "hemangioma": "hemangioma",
    "intrahepaticcholangiocarcinoma": "icc", "icc": "icc", "cholangiocarcinoma": "icc",
    "hepaticabscess": "abscess", "abscess": "abscess",
    "hepaticmetastasis": "metastasis", "metastasis": "metastasis",
    "hepaticcyst": "cyst", "cyst": "cyst",
    "focalnodularhyperplasia": "fnh", "fnh": "fnh",
    "hepatocellularcarcinoma": "hcc", "hcc": "hcc",
}
UNLABELLED = {"-1", "-1.0", "inaccessible", "unknown", "none", ""}
_LESION_SUFFIX = re.compile(r"^(.+)_(\d{1,2})$")


def _norm(text: Any) -> str:
    """Lower case, letters and digits only (``"C+Delay"`` -> ``"cdelay"``)."""
    return re.sub(r"[^a-z0-9]", "", str(text).lower())


def _get(obj: dict[str, Any], *names: str) -> Any:
    """The value of the first key of ``obj`` whose normalised form is one of ``names``."""
    keys = {_norm(k): k for k in obj}
    for name in names:
        if name in keys:
            return obj[keys[name]]
    return None


def phase_modality(name: Any, where: str) -> str:
    """The liver modality of an LLD-MMRI phase name.

    >>> phase_modality("C+Delay", "here"), phase_modality("In Phase", "here")
    ('delay', 't1_in')
    """
    modality = PHASES.get(_norm(name))
    if modality is None:
        raise StudyListError(f"{where}: unknown phase {name!r} (expected T2WI, DWI, In Phase, Out Phase, "
                             "C-pre, C+A, C+V or C+Delay)")
    return modality


def category_label(value: Any, where: str) -> str | None:
    """The liver class of an LLD-MMRI category (name or integer 0-6); ``None`` for -1.

    >>> category_label("Hepatocellular_carcinoma", "here"), category_label(5, "here"), category_label(-1, "here")
    ('hcc', 'fnh', None)
    """
    if isinstance(value, bool) or value is None:
        raise StudyListError(f"{where}: missing or invalid category {value!r}")
    text = str(value).strip()
    if text.lower() in UNLABELLED:
        return None
    if re.fullmatch(r"\d+(\.0)?", text):
        index = int(float(text))
        if index < len(LLD_LABELS):
            return LLD_LABELS[index]
    elif _norm(text) in CATEGORIES:
        return CATEGORIES[_norm(text)]
    raise StudyListError(f"{where}: unknown category {value!r} (expected 0-6, -1 or a name such as "
                         "Hepatic_hemangioma or Hepatocellular_carcinoma)")


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """Which LLD-MMRI form ``root`` holds, and the folder to read it from.

    Returns:
        ``("volumes", root)`` when ``root/labels/Annotation.json`` exists; ``("patches", d)``
        when ``d = root/classification_dataset`` holds ``images/``, or ``d = root`` holds
        ``images/`` and ``labels/labels.txt``.

    Raises:
        StudyListError: neither form, or both (then ``layout`` must be given).
    """
    root = Path(root)
    if not root.is_dir():
        raise StudyListError(f"LLD-MMRI folder not found: {root}")
    found = []
    if _annotation_file(root) is not None:
        found.append(("volumes", root))
    patches = root / "classification_dataset"
    if (patches / "images").is_dir():
        found.append(("patches", patches))
    elif (root / "images").is_dir() and (root / "labels" / "labels.txt").is_file():
        found.append(("patches", root))
    if len(found) == 1:
        return found[0]
    if found:
        raise StudyListError(f"{root} holds both LLD-MMRI forms (labels/Annotation.json and a patch dataset); "
                             "choose one with --layout volumes or --layout patches")
    raise StudyListError(f"{root} is not an LLD-MMRI folder: expected images/ with labels/Annotation.json "
                         "(whole volumes) or classification_dataset/images/ with labels/labels.txt (patches)")


def import_lld_mmri(root: str | Path, layout: str | None = None) -> ImportResult:
    """Read an LLD-MMRI download (either form) into liver studies.

    Args:
        root: the dataset folder.
        layout: ``volumes`` or ``patches``; detected from the tree when ``None``.

    Example:
        >>> import_lld_mmri("/data/LLD-MMRI", layout="patches").studies[0].label  # doctest: +SKIP
        'hcc'
    """
    root = Path(root)
    if layout is None:
        layout, folder = detect_layout(root)
    elif layout == "volumes":
        folder = root
    elif layout == "patches":
        folder = root / "classification_dataset" if (root / "classification_dataset").is_dir() else root
    else:
        raise StudyListError(f"unknown LLD-MMRI layout {layout!r} (expected {' or '.join(LAYOUTS)})")
    return import_volumes(folder) if layout == "volumes" else import_patches(folder)


# -- whole volumes with per-series boxes --------------------------------------------------


def _annotation_file(root: Path) -> Path | None:
    labels = root / "labels"
    if not labels.is_dir():
        return None
    return next((p for p in sorted(labels.iterdir()) if p.name.lower() == "annotation.json"), None)


def read_annotation(path: Path) -> dict[str, list[dict[str, Any]]]:
    """Patient -> series entries of an ``Annotation.json`` (the wrapper object removed)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StudyListError(f"{path}: cannot read the annotation file ({e})") from e
    if isinstance(data, dict) and len(data) == 1:
        (key, inner), = data.items()
        if _norm(key) in ("annotationinfo", "annotations", "annotation", "patients") and isinstance(inner, dict):
            data = inner
    if not isinstance(data, dict) or not data:
        raise StudyListError(f"{path}: expected an object of patient -> list of series entries")
    patients = {}
    for patient, entries in data.items():
        if isinstance(entries, dict):  # series UID -> entry
            entries = list(entries.values())
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise StudyListError(f"{path}: patient '{patient}': expected a list of series entries")
        patients[str(patient)] = entries
    return patients


def lld_box(value: Any, where: str) -> tuple[float, ...]:
    """An LLD-MMRI 3D box as ``(x_min, y_min, z_min, x_max, y_max, z_max)``.

    Accepts ``{"3D_box": {...}}``, ``{"x_min": .., ..., "z_max": ..}`` or six numbers.

    >>> lld_box({"3D_box": {"x_min": 1, "y_min": 2, "z_min": 3, "x_max": 4, "y_max": 5, "z_max": 6}}, "here")
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    """
    if isinstance(value, dict):
        inner = _get(value, "3dbox", "box3d", "bbox3d", "3d")
        if inner is not None:
            return lld_box(inner, where)
        corners = [_get(value, f"{axis}{end}") for end in ("min", "max") for axis in "xyz"]
        if any(c is None for c in corners):
            raise StudyListError(f"{where}: box must have x_min, y_min, z_min, x_max, y_max, z_max "
                                 f"(or a 3D_box of them), got keys {sorted(value)}")
        value = corners
    return parse_box(value, f"{where}: box")


@dataclass
class _Lesion:
    """The phases of one lesion gathered from the series entries of one study UID."""

    patient: str
    study_uid: str
    index: str
    modalities: dict[str, Path] = field(default_factory=dict)
    boxes: dict[str, tuple[float, ...]] = field(default_factory=dict)
    series: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, str | None] = field(default_factory=dict)  # modality -> class


def _series_file(root: Path, patient: str, study_uid: str, series_uid: str, where: str) -> Path:
    folder = root / "images" / patient / study_uid
    for suffix in (".nii.gz", ".nii"):
        path = folder / f"{series_uid}{suffix}"
        if path.is_file():
            return path.resolve()
    raise StudyListError(f"{where}: series file not found: {folder / series_uid}.nii.gz")


def _lesion_entries(entry: dict[str, Any], where: str) -> dict[str, Any]:
    """Lesion index -> lesion object of one series entry."""
    annotation = _get(entry, "annotation", "annotations")
    if annotation is None:
        raise StudyListError(f"{where}: the series entry has no 'annotation'")
    lesions = _get(annotation, "lesion", "lesions", "targets") if isinstance(annotation, dict) else None
    if lesions is None and isinstance(annotation, dict):  # lesions given directly: {"0": {...}}
        lesions = {k: v for k, v in annotation.items() if str(k).isdigit()}
    if isinstance(lesions, list):
        lesions = {str(i): v for i, v in enumerate(lesions)}
    if not isinstance(lesions, dict) or not all(isinstance(v, dict) for v in lesions.values()):
        raise StudyListError(f"{where}: 'annotation.lesion' must be an object of lesion index -> "
                             "{category, bbox}")
    return {str(k): v for k, v in lesions.items()}


def _add_series(root: Path, patient: str, entry: dict[str, Any], where: str,
                lesions: dict[tuple[str, str], _Lesion]) -> None:
    study_uid = _get(entry, "studyuid", "studyinstanceuid", "study")
    series_uid = _get(entry, "seriesuid", "seriesinstanceuid", "series")
    phase = _get(entry, "phase", "phasename", "sequence")
    for name, value in (("study UID", study_uid), ("series UID", series_uid), ("phase", phase)):
        if value is None or not str(value).strip():
            raise StudyListError(f"{where}: the series entry has no {name}")
    study_uid, series_uid = str(study_uid), str(series_uid)
    where = f"{where}, series '{series_uid}' ({phase})"
    modality = phase_modality(phase, where)
    found = _lesion_entries(entry, where)
    if not found:
        return
    path = _series_file(root, patient, study_uid, series_uid, where)
    info = {"uid": series_uid, "phase": str(phase)}
    for key, names in (("pixel_spacing", ("pixelspacing", "spacing", "inplanespacing")),
                       ("slice_thickness", ("slicethickness", "thickness"))):
        if _get(entry, *names) is not None:
            info[key] = _get(entry, *names)
    for index, lesion in sorted(found.items()):
        at = f"{where}, lesion '{index}'"
        item = lesions.setdefault((study_uid, index), _Lesion(patient, study_uid, index))
        if modality in item.modalities:
            raise StudyListError(f"{at}: phase '{modality}' is given by two series "
                                 f"({item.series[modality]['uid']} and {series_uid})")
        if _get(lesion, "category", "label", "class") is None:
            raise StudyListError(f"{at}: the lesion has no category")
        bbox = _get(lesion, "bbox", "box", "3dbox", "bbox3d", "box3d")
        if bbox is None:
            raise StudyListError(f"{at}: the lesion has no bbox")
        item.labels[modality] = category_label(_get(lesion, "category", "label", "class"), at)
        # LLD-MMRI boxes are inclusive voxel index ranges (x_max is the last voxel inside) along
        # the series file's array axes, z being the slice; the study list's voxel boxes use the
        # same convention, so the numbers are copied unchanged.
        item.boxes[modality] = lld_box(bbox, at)
        item.modalities[modality] = path
        item.series[modality] = info


def _lesion_study(item: _Lesion, study_id: str, where: str) -> Study:
    labels = {label for label in item.labels.values() if label is not None}
    if len(labels) > 1:
        detail = ", ".join(f"{m}: {lab}" for m, lab in sorted(item.labels.items()))
        raise StudyListError(f"{where}: patient '{item.patient}', lesion '{item.index}': the phases disagree "
                             f"on the category ({detail})")
    return Study(
        study_id=study_id,
        patient_id=item.patient,
        organ=ORGAN,
        modalities=dict(item.modalities),
        label=next(iter(labels), None),
        lesion_box=LesionBox(space="voxel", boxes=dict(item.boxes)),
        meta={"dataset": "LLD-MMRI", "layout": "volumes", "study_uid": item.study_uid,
              "lesion": item.index, "series": dict(item.series)},
    )


def _lesion_key(index: str) -> tuple[int, str]:
    return (int(index), index) if index.isdigit() else (1 << 30, index)


def import_volumes(root: str | Path) -> ImportResult:
    """Whole-volume LLD-MMRI: one study per lesion, each phase with its own voxel box.

    Example:
        >>> s = import_volumes("/data/LLD-MMRI").studies[0]  # doctest: +SKIP
        >>> s.study_id, s.lesion_box.boxes["arterial"]      # doctest: +SKIP
        ('MR12345_0', (41.0, 50.0, 20.0, 52.0, 61.0, 25.0))
    """
    root = Path(root)
    annotation = _annotation_file(root)
    if annotation is None:
        raise StudyListError(f"{root}: labels/Annotation.json not found (whole-volume LLD-MMRI layout)")
    studies: list[Study] = []
    for patient, entries in sorted(read_annotation(annotation).items()):
        lesions: dict[tuple[str, str], _Lesion] = {}
        for k, entry in enumerate(entries):
            _add_series(root, patient, entry, f"{annotation}: patient '{patient}', entry {k}", lesions)
        study_uids = sorted({uid for uid, _ in lesions})
        for (uid, index), item in sorted(lesions.items(), key=lambda kv: (kv[0][0], _lesion_key(kv[0][1]))):
            prefix = patient if len(study_uids) == 1 else f"{patient}_s{study_uids.index(uid)}"
            studies.append(_lesion_study(item, f"{prefix}_{index}", str(annotation)))
    notes = []
    if not studies:
        raise StudyListError(f"{annotation}: no annotated lesion found")
    unlisted = _unlisted_patients(root, {s.patient_id for s in studies})
    if unlisted:
        notes.append(f"{len(unlisted)} patient folder(s) under images/ have no annotated lesion and were "
                     f"skipped (e.g. {unlisted[0]})")
    return ImportResult(studies, "volumes", notes)


def _unlisted_patients(root: Path, patients: set[str]) -> list[str]:
    images = root / "images"
    if not images.is_dir():
        return []
    return sorted(p.name for p in images.iterdir() if p.is_dir() and p.name not in patients)


# -- pre-cropped patches -------------------------------------------------------------------


def patient_of(case: str) -> str:
    """The patient of a patch folder: ``<case>_<index>`` (a lesion of a multi-lesion case) -> ``<case>``.

    Only a one- or two-digit index after the last underscore counts as a lesion index.

    >>> patient_of("MR12345_1"), patient_of("MR12345"), patient_of("MR_2023")
    ('MR12345', 'MR12345', 'MR_2023')
    """
    match = _LESION_SUFFIX.match(case)
    return match.group(1) if match else case


def read_labels(path: Path) -> dict[str, str | None]:
    """Case -> liver class (``None`` for -1) of a ``labels.txt`` with one ``case label`` per line."""
    labels: dict[str, str | None] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise StudyListError(f"{path}: cannot read the labels file ({e})") from e
    for lineno, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = re.split(r"[\s,;]+", line)
        where = f"{path}:{lineno}"
        if len(parts) != 2:
            raise StudyListError(f"{where}: expected 'case label', got {line!r}")
        case, value = parts
        if case in labels:
            raise StudyListError(f"{where}: case '{case}' is listed twice")
        labels[case] = category_label(value, f"{where}: case '{case}'")
    return labels


def _patch_study(folder: Path, labels: dict[str, str | None]) -> Study:
    case = folder.name
    modalities: dict[str, Path] = {}
    for file in sorted(folder.iterdir()):
        stem = nifti_stem(file)
        if stem is None or not file.is_file():
            continue
        modality = phase_modality(stem, f"patch case '{case}': {file.name}")
        if modality in modalities:
            raise StudyListError(f"patch case '{case}': phase '{modality}' is given by two files "
                                 f"({modalities[modality].name} and {file.name})")
        modalities[modality] = file.resolve()
    if not modalities:
        raise StudyListError(f"patch case '{case}': {folder} holds no phase volume (<phase>.nii.gz)")
    label = labels.get(case, labels.get(patient_of(case)))
    return Study(study_id=case, patient_id=patient_of(case), organ=ORGAN, modalities=modalities,
                 label=label, meta={"dataset": "LLD-MMRI", "layout": "patches", "case": case})


def import_patches(root: str | Path) -> ImportResult:
    """Pre-cropped LLD-MMRI patches: one study per case folder, labels from ``labels.txt``.

    Args:
        root: the ``classification_dataset`` folder (holding ``images/`` and ``labels/``).

    Example:
        >>> s = import_patches("/data/classification_dataset").studies[0]  # doctest: +SKIP
        >>> s.study_id, s.patient_id, sorted(s.modalities)[:2]            # doctest: +SKIP
        ('MR12345_1', 'MR12345', ['arterial', 'delay'])
    """
    root = Path(root)
    images = root / "images"
    if not images.is_dir():
        raise StudyListError(f"{root}: images/ not found (LLD-MMRI patch layout: images/<case>/<phase>.nii.gz)")
    labels_file = root / "labels" / "labels.txt"
    labels = read_labels(labels_file) if labels_file.is_file() else {}
    folders = sorted(p for p in images.iterdir() if p.is_dir())
    if not folders:
        raise StudyListError(f"{images}: no case folders found")
    studies = [_patch_study(folder, labels) for folder in folders]
    notes = []
    if not labels_file.is_file():
        notes.append(f"{labels_file} not found: every case is unlabelled")
    cases = {s.study_id for s in studies} | {s.patient_id for s in studies}
    orphans = sorted(set(labels) - cases)
    if orphans:
        notes.append(f"{len(orphans)} case(s) in labels.txt have no folder under images/ (e.g. {orphans[0]})")
    by_patient = defaultdict(list)
    for s in studies:
        by_patient[s.patient_id].append(s.study_id)
    multi = sum(1 for ids in by_patient.values() if len(ids) > 1)
    if multi:
        notes.append(f"{multi} patient(s) have several lesion patches; their patches share one patient_id")
    return ImportResult(studies, "patches", notes)

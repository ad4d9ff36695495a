"""BraTS glioma cases (tumour) and, optionally, IXI healthy volunteers (normal) to brain studies.

Layouts read (``.nii.gz`` or ``.nii``)::

    ROOT/BraTS2021_<id>/BraTS2021_<id>_{t1,t1ce,t2,flair,seg}.nii.gz          # BraTS 2021
    ROOT/BraTS-GLI-<id>-<tp>/BraTS-GLI-<id>-<tp>-{t1n,t1c,t2w,t2f,seg}.nii.gz  # BraTS 2023
    NORMAL/**/IXI<id>-<site>-<id>-{T1,T2,PD}.nii.gz                          # IXI (--normal)

Case folders are looked for in ``ROOT``, its sub-folders and theirs (``ROOT`` may also be a
case folder). Sequences map onto the brain config's ``t1 t1ce t2 flair`` (2023: ``t1n`` ->
``t1``, ``t1c`` -> ``t1ce``, ``t2w`` -> ``t2``, ``t2f`` -> ``flair``); ``seg`` is a tumour
label map, not a sequence, and is left out (the study list's only mask field, ``roi_mask``,
is an organ mask used for cropping). Every BraTS case has a tumour: label ``tumour``. A
case missing a sequence keeps the ones it has (missing sequences are masked); a case with
none is an error naming it. The 2023 name's last number is a time point, so
``BraTS-GLI-00001-000`` and ``BraTS-GLI-00001-001`` share the patient ``BraTS-GLI-00001``.

IXI subjects are grouped from their file names into one ``normal`` study each (patient
``IXI<id>``), with ``T1`` -> ``t1`` and ``T2`` -> ``t2``; ``PD`` (no brain modality), MRA
and DTI are dropped, and a subject with neither T1 nor T2 is skipped (noted). IXI has no
FLAIR or post-contrast T1: those are missing. Note that IXI's T1 and T2 are not on one
voxel grid and are not skull-stripped, unlike BraTS (see ``notes`` of the result).

Example:
    >>> from medmap.data.importers.brats import import_brats
    >>> result = import_brats("/data/BraTS2021", normal_root="/data/IXI")  # doctest: +SKIP
    >>> sorted({s.label for s in result.studies})                            # doctest: +SKIP
    ['normal', 'tumour']
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path

from medmap.data.importers import ImportResult, nifti_stem
from medmap.data.studylist import Study
from medmap.errors import StudyListError

ORGAN = "brain"
#: The brain config's class names (medmap/configs/organs/brain.yaml).
TUMOUR, NORMAL = "tumour", "normal"
#: BraTS sequence suffix (2021 and 2023 names) -> brain modality.
SEQUENCES = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair",
             "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair"}
#: Suffixes of label maps, which are not sequences.
MASKS = ("seg",)
#: IXI contrast -> brain modality; the others (PD, MRA, DTI) have none.
IXI_SEQUENCES = {"T1": "t1", "T2": "t2"}
CASE_2021 = re.compile(r"^BraTS2021_(\d+)$")
CASE_2023 = re.compile(r"^(BraTS-[A-Z]+-\d+)-(\d+)$")
IXI_FILE = re.compile(r"^(IXI\d+)-([A-Za-z]+)-(\d+)-([A-Za-z0-9]+)$")


def case_patient(case: str) -> tuple[str, str] | None:
    """``(release, patient)`` of a BraTS case folder name, or ``None`` if it is not one.

    >>> case_patient("BraTS2021_00012"), case_patient("BraTS-GLI-00012-001")
    (('brats2021', 'BraTS2021_00012'), ('brats2023', 'BraTS-GLI-00012'))
    """
    if CASE_2021.match(case):
        return "brats2021", case
    match = CASE_2023.match(case)
    return ("brats2023", match.group(1)) if match else None


def find_cases(root: str | Path) -> list[Path]:
    """BraTS case folders in ``root`` (or ``root`` itself), its sub-folders and theirs, sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise StudyListError(f"BraTS folder not found: {root}")
    if case_patient(root.name):
        return [root]
    level = [root]
    for _ in range(3):
        subdirs = sorted((d for folder in level for d in folder.iterdir() if d.is_dir()), key=lambda d: d.name)
        cases = [d for d in subdirs if case_patient(d.name)]
        if cases:
            return sorted(cases, key=lambda d: d.name)
        level = subdirs
    raise StudyListError(f"no BraTS case folders (BraTS2021_<id> or BraTS-GLI-<id>-<id>) found in {root} "
                         "or the two folder levels below it")


def _sequence(case: str, stem: str) -> str:
    """The sequence suffix of a case file name (``BraTS2021_00000_t1ce`` -> ``t1ce``)."""
    if stem.startswith(case) and len(stem) > len(case) + 1:
        return stem[len(case) + 1:].lower()
    return re.split(r"[-_]", stem)[-1].lower()


def case_study(folder: Path) -> tuple[Study, list[str]]:
    """One BraTS case folder as a ``tumour`` study, and the names of files it ignored.

    Raises:
        StudyListError: the folder has no sequence, or two files of one sequence.
    """
    case = folder.name
    release, patient = case_patient(case) or ("brats", case)
    modalities: dict[str, Path] = {}
    ignored: list[str] = []
    for file in sorted(folder.iterdir()):
        stem = nifti_stem(file)
        if stem is None or not file.is_file():
            continue
        suffix = _sequence(case, stem)
        if suffix in MASKS:
            continue
        modality = SEQUENCES.get(suffix)
        if modality is None:
            ignored.append(file.name)
            continue
        if modality in modalities:
            raise StudyListError(f"BraTS case '{case}': sequence '{modality}' is given by two files "
                                 f"({modalities[modality].name} and {file.name})")
        modalities[modality] = file.resolve()
    if not modalities:
        raise StudyListError(f"BraTS case '{case}': {folder} holds none of the sequences "
                             "t1, t1ce, t2, flair (2023: t1n, t1c, t2w, t2f)")
    study = Study(study_id=case, patient_id=patient, organ=ORGAN, modalities=modalities, label=TUMOUR,
                  meta={"dataset": release, "case": case})
    return study, ignored


def ixi_studies(root: str | Path) -> tuple[list[Study], list[str]]:
    """IXI subjects under ``root`` (any depth) as ``normal`` studies, and notes on what was dropped.

    Raises:
        StudyListError: ``root`` is missing, holds no IXI T1/T2 file, or one subject has two
            files of one contrast.
    """
    root = Path(root)
    if not root.is_dir():
        raise StudyListError(f"IXI folder not found: {root}")
    subjects: dict[str, dict[str, Path]] = defaultdict(dict)
    patients: dict[str, tuple[str, str]] = {}
    dropped: dict[str, int] = defaultdict(int)
    for file in sorted(root.rglob("IXI*.nii*")):
        stem = nifti_stem(file)
        match = IXI_FILE.match(stem or "")
        if match is None or not file.is_file():
            continue
        patient, site, number, contrast = match.groups()
        subject = f"{patient}-{site}-{number}"
        patients[subject] = (patient, site)
        modality = IXI_SEQUENCES.get(contrast.upper())
        if modality is None:
            dropped[contrast.upper()] += 1
            continue
        if modality in subjects[subject]:
            raise StudyListError(f"IXI subject '{subject}': {contrast} is given by two files "
                                 f"({subjects[subject][modality]} and {file})")
        subjects[subject][modality] = file.resolve()
    studies = [Study(study_id=subject, patient_id=patients[subject][0], organ=ORGAN, modalities=dict(mods),
                     label=NORMAL, meta={"dataset": "ixi", "site": patients[subject][1]})
               for subject, mods in sorted(subjects.items()) if mods]
    if not studies:
        raise StudyListError(f"no IXI T1 or T2 file (IXI<id>-<site>-<id>-T1.nii.gz) found under {root}")
    notes = [f"IXI: dropped {n} {c} file(s) (no brain modality)" for c, n in sorted(dropped.items())]
    skipped = sorted(set(patients) - {s.study_id for s in studies})
    if skipped:
        notes.append(f"IXI: skipped {len(skipped)} subject(s) with neither T1 nor T2 (e.g. {skipped[0]})")
    return studies, notes


def import_brats(root: str | Path, normal_root: str | Path | None = None) -> ImportResult:
    """BraTS 2021 / 2023 cases as ``tumour`` studies, plus IXI subjects as ``normal`` ones.

    Args:
        root: the BraTS folder (case folders inside, or up to two levels below).
        normal_root: an IXI folder for the normal class, or ``None``.

    Example:
        >>> result = import_brats("/data/BraTS2023-GLI")  # doctest: +SKIP
        >>> result.layout, result.studies[0].patient_id   # doctest: +SKIP
        ('brats2023', 'BraTS-GLI-00000')
    """
    studies: list[Study] = []
    ignored: list[str] = []
    for folder in find_cases(root):
        study, skipped = case_study(folder)
        studies.append(study)
        ignored += skipped
    releases = sorted({s.meta["dataset"] for s in studies})
    notes = []
    if ignored:
        notes.append(f"ignored {len(ignored)} file(s) that are not BraTS sequences (e.g. {ignored[0]})")
    layout = "+".join(releases)
    if normal_root is not None:
        normals, ixi_notes = ixi_studies(normal_root)
        studies += normals
        notes += ixi_notes
        notes.append("IXI volumes are not skull-stripped (BraTS are) and IXI's T1 and T2 lie on different "
                      "grids: resample/skull-strip them like BraTS first, or a model may learn the "
                      "preprocessing instead of the tumour (medmap validate flags the grids)")
        layout += "+ixi"
    return ImportResult(studies, layout, notes)

"""The study list: one multi-sequence MRI study per line of a JSON Lines file.

Each line is a JSON object::

    {"study_id": "liver-0007", "patient_id": "P0007", "organ": "liver",
     "modalities": {"t2wi": "liver-0007/t2wi.nii.gz", "arterial": "liver-0007/arterial.nii.gz"},
     "findings": {"t2wi": "A 3.1 cm markedly hyperintense ...", "arterial": "..."},
     "impression": "Simple hepatic cyst in segment VII.",
     "label": "cyst", "split": "train", "meta": {"...": "anything, e.g. ground truth"}}

``study_id``, ``patient_id``, ``organ`` and ``modalities`` are required; ``findings``,
``impression``, ``label``, ``split``, ``roi_mask``, ``lesion_box`` and ``meta`` are optional.
``roi_mask`` is a NIfTI mask on the volumes' grid (non-zero = the organ, e.g. a liver
segmentation); organ configs with ``crop: roi_mask`` crop the field of view to it.
``lesion_box`` is the box around the lesion to classify, either one per modality (each
series on its own voxel grid, as real multi-phase liver data comes) or one for the whole
study, in the voxel indices of each modality's file or in world (RAS) millimetres::

    "lesion_box": {"space": "voxel", "boxes": {"t2wi": [x0, y0, z0, x1, y1, z1], "dwi": [...]}}
    "lesion_box": {"space": "world", "box": [x0, y0, z0, x1, y1, z1]}

A modality's path may also be a folder holding one DICOM series (:mod:`medmap.data.dicom`).
Voxel boxes are inclusive index ranges along the file's array axes (``x1`` is the last
voxel inside the box, as in LLD-MMRI's annotation file); world boxes are corner
coordinates in mm. Organ configs with ``crop: lesion_box`` cut each modality around its own
box (:mod:`medmap.data.lesion`). Relative paths resolve against the folder that holds the
list. Reading checks structure only; ``medmap validate``
(:mod:`medmap.data.validate`) also opens every file.

Example:
    >>> from medmap.data.studylist import read_study_list
    >>> studies = read_study_list("data/synth/studies.jsonl")  # doctest: +SKIP
    >>> studies[0].modalities["t1"]                              # doctest: +SKIP
    PosixPath('/abs/path/data/synth/brain-0000/t1.nii.gz')
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from medmap.errors import StudyListError
from medmap.utils import atomic_write_text

SPLITS = ("train", "val", "test")
REQUIRED_KEYS = ("study_id", "patient_id", "organ", "modalities")
OPTIONAL_KEYS = ("findings", "impression", "label", "split", "roi_mask", "lesion_box", "meta")
#: Coordinate spaces of a lesion box: voxel indices of each modality's file, or world (RAS) mm.
BOX_SPACES = ("voxel", "world")


@dataclass(frozen=True)
class LesionBox:
    """Where the lesion to classify is: one box per modality, or one for the whole study.

    Attributes:
        space: ``voxel`` (inclusive index ranges along each file's array axes) or ``world``
            (corner coordinates in RAS millimetres).
        boxes: modality -> ``(x0, y0, z0, x1, y1, z1)``; empty when ``box`` is given.
        box: one box for every modality, or ``None`` when ``boxes`` is given.

    Example:
        >>> b = LesionBox.from_json({"space": "voxel", "box": [10, 12, 3, 20, 22, 8]}, "here")
        >>> b.for_modality("t2wi")
        (10.0, 12.0, 3.0, 20.0, 22.0, 8.0)
    """

    space: str
    boxes: dict[str, tuple[float, ...]] = field(default_factory=dict)
    box: tuple[float, ...] | None = None

    def for_modality(self, modality: str) -> tuple[float, ...] | None:
        """The box of ``modality`` (the study's box when one box covers all), or ``None``."""
        return self.box if self.box is not None else self.boxes.get(modality)

    def to_json(self) -> dict[str, Any]:
        if self.box is not None:
            return {"space": self.space, "box": _plain(self.box)}
        return {"space": self.space, "boxes": {m: _plain(b) for m, b in self.boxes.items()}}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> "LesionBox":
        """Parse the study-list form; raises :class:`StudyListError` naming ``where``."""
        if not isinstance(obj, dict):
            raise StudyListError(f"{where}: 'lesion_box' must be an object with 'space' and 'box' or 'boxes'")
        unknown = set(obj) - {"space", "box", "boxes"}
        if unknown:
            raise StudyListError(f"{where}: 'lesion_box' has unknown key(s) {', '.join(sorted(unknown))} "
                                 "(expected space, and box or boxes)")
        space = obj.get("space")
        if space not in BOX_SPACES:
            raise StudyListError(f"{where}: 'lesion_box.space' must be one of {', '.join(BOX_SPACES)}, got {space!r}")
        if ("box" in obj) == ("boxes" in obj):
            raise StudyListError(f"{where}: 'lesion_box' needs exactly one of 'box' (whole study) or 'boxes' (per modality)")
        if "box" in obj:
            return cls(space=space, box=parse_box(obj["box"], f"{where}: 'lesion_box.box'"))
        boxes = obj["boxes"]
        if not isinstance(boxes, dict) or not boxes:
            raise StudyListError(f"{where}: 'lesion_box.boxes' must be a non-empty object of modality -> box")
        return cls(space=space, boxes={str(m): parse_box(b, f"{where}: 'lesion_box.boxes.{m}'") for m, b in boxes.items()})


def parse_box(value: Any, where: str) -> tuple[float, ...]:
    """Six finite numbers ``x0, y0, z0, x1, y1, z1`` with ``x0 <= x1`` etc., or a :class:`StudyListError`.

    >>> parse_box("1,2,3,4,5,6", "here")
    (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    """
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    try:
        box = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise StudyListError(f"{where} must be six numbers x0, y0, z0, x1, y1, z1, got {value!r}") from None
    if len(box) != 6 or not all(math.isfinite(v) for v in box):
        raise StudyListError(f"{where} must be six finite numbers x0, y0, z0, x1, y1, z1, got {list(value)!r}")
    if any(box[i] > box[i + 3] for i in range(3)):
        raise StudyListError(f"{where}: each minimum must not exceed its maximum, got {list(box)}")
    return box


def _plain(box: tuple[float, ...]) -> list[float | int]:
    return [int(v) if float(v).is_integer() else float(v) for v in box]


@dataclass
class Study:
    """One imaging study: co-registered volumes of several modalities plus report text.

    Attributes:
        study_id: unique id of the study within its list.
        patient_id: decides splits; a patient never appears in two splits.
        organ: task name, matching an organ config (``brain``, ``liver``, ...).
        modalities: modality name -> absolute path of a 3D NIfTI file, or of a folder
            holding one DICOM series (:mod:`medmap.data.dicom`).
        findings: modality name -> findings text describing that sequence.
        impression: overall impression text.
        label: class name for the organ's task, or ``None`` when unlabelled.
        split: ``train``, ``val``, ``test`` or ``None``.
        meta: free-form extra data (e.g. the synthetic generator's ground truth).
        roi_mask: absolute path of a region-of-interest mask on the volumes' grid (an organ
            segmentation), or ``None``. Used by organ configs with ``crop: roi_mask``.
        lesion_box: the lesion's box (:class:`LesionBox`), or ``None``. Used by organ configs
            with ``crop: lesion_box``.
    """

    study_id: str
    patient_id: str
    organ: str
    modalities: dict[str, Path]
    findings: dict[str, str] = field(default_factory=dict)
    impression: str = ""
    label: str | None = None
    split: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    roi_mask: Path | None = None
    lesion_box: LesionBox | None = None

    def to_json(self, relative_to: Path | None = None) -> dict[str, Any]:
        """A JSON-ready dict; paths are written relative to ``relative_to`` when inside it."""
        def rel(p: Path) -> str:
            p = Path(p)
            if relative_to is not None:
                try:
                    p = p.resolve().relative_to(Path(relative_to).resolve())
                except ValueError:
                    pass
            return p.as_posix()

        mods = {m: rel(p) for m, p in self.modalities.items()}
        d: dict[str, Any] = {
            "study_id": self.study_id,
            "patient_id": self.patient_id,
            "organ": self.organ,
            "modalities": mods,
            "findings": dict(self.findings),
            "impression": self.impression,
        }
        if self.label is not None:
            d["label"] = self.label
        if self.split is not None:
            d["split"] = self.split
        if self.roi_mask is not None:
            d["roi_mask"] = rel(self.roi_mask)
        if self.lesion_box is not None:
            d["lesion_box"] = self.lesion_box.to_json()
        if self.meta:
            d["meta"] = self.meta
        return d


def _parse_line(obj: Any, where: str, base: Path) -> Study:
    if not isinstance(obj, dict):
        raise StudyListError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise StudyListError(f"{where}: missing required key(s) {', '.join(missing)}")
    unknown = set(obj) - set(REQUIRED_KEYS) - set(OPTIONAL_KEYS)
    if unknown:
        raise StudyListError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for k in ("study_id", "patient_id", "organ"):
        if not isinstance(obj[k], str) or not obj[k].strip():
            raise StudyListError(f"{where}: '{k}' must be a non-empty string")
    mods = obj["modalities"]
    if not isinstance(mods, dict) or not mods:
        raise StudyListError(f"{where}: 'modalities' must be a non-empty object of modality -> path")
    def resolve(p: str) -> Path:
        path = Path(os.path.expanduser(p))
        return path if path.is_absolute() else (base / path)

    paths: dict[str, Path] = {}
    for m, p in mods.items():
        if not isinstance(p, str) or not p:
            raise StudyListError(f"{where}: path of modality '{m}' must be a non-empty string")
        paths[str(m)] = resolve(p)
    roi_mask = obj.get("roi_mask")
    if roi_mask is not None and (not isinstance(roi_mask, str) or not roi_mask):
        raise StudyListError(f"{where}: 'roi_mask' must be a non-empty string (a NIfTI mask path) or null")
    lesion_box = obj.get("lesion_box")
    if lesion_box is not None:
        lesion_box = LesionBox.from_json(lesion_box, where)
        unknown_box = sorted(set(lesion_box.boxes) - set(paths))
        if unknown_box:
            raise StudyListError(f"{where}: 'lesion_box.boxes' names modalities the study does not list: {', '.join(unknown_box)}")
    findings = obj.get("findings") or {}
    if not isinstance(findings, dict) or not all(isinstance(v, str) for v in findings.values()):
        raise StudyListError(f"{where}: 'findings' must be an object of modality -> text")
    impression = obj.get("impression") or ""
    if not isinstance(impression, str):
        raise StudyListError(f"{where}: 'impression' must be a string")
    label = obj.get("label")
    if label is not None and not isinstance(label, str):
        raise StudyListError(f"{where}: 'label' must be a string (a class name) or null")
    split = obj.get("split")
    if split is not None and split not in SPLITS:
        raise StudyListError(f"{where}: 'split' must be one of {', '.join(SPLITS)} or null, got {split!r}")
    meta = obj.get("meta") or {}
    if not isinstance(meta, dict):
        raise StudyListError(f"{where}: 'meta' must be an object")
    return Study(
        study_id=obj["study_id"],
        patient_id=obj["patient_id"],
        organ=obj["organ"],
        modalities=paths,
        findings={str(k): v for k, v in findings.items()},
        impression=impression,
        label=label,
        split=split,
        meta=meta,
        roi_mask=None if roi_mask is None else resolve(roi_mask),
        lesion_box=lesion_box,
    )


def iter_study_lines(path: str | Path) -> Iterator[tuple[int, Study | StudyListError]]:
    """Parse a study list line by line without stopping at the first bad line.

    Used by ``medmap validate`` to report every malformed line. Blank lines are skipped;
    duplicate study ids are *not* checked here.

    Yields:
        ``(line_number, Study)`` for a good line, ``(line_number, StudyListError)`` for a
        malformed one (the error message names the file and line).

    Raises:
        StudyListError: the file is missing or not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise StudyListError(f"study list not found: {path}")
    base = path.resolve().parent
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise StudyListError(f"{path}:{lineno}: not UTF-8 text ({e.reason}); save the study list as UTF-8") from e
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, StudyListError(f"{where}: invalid JSON ({e.msg} at column {e.colno})")
            continue
        try:
            yield lineno, _parse_line(obj, where, base)
        except StudyListError as e:
            yield lineno, e


def read_study_list(path: str | Path, organ: str | None = None, split: str | None = None) -> list[Study]:
    """Read and structurally check a study list.

    Args:
        path: the ``.jsonl`` file.
        organ: keep only studies of this organ.
        split: keep only studies of this split.

    Raises:
        StudyListError: the file is missing, empty, not JSON Lines, has a malformed line, or
            repeats a study id. The message names the file and line.
    """
    path = Path(path)
    studies: list[Study] = []
    seen: dict[str, int] = {}
    for lineno, item in iter_study_lines(path):
        if isinstance(item, StudyListError):
            raise item
        if item.study_id in seen:
            raise StudyListError(
                f"{path}:{lineno}: duplicate study_id '{item.study_id}' (first on line {seen[item.study_id]})"
            )
        seen[item.study_id] = lineno
        studies.append(item)
    if not studies:
        raise StudyListError(f"study list {path} contains no studies")
    if organ is not None:
        studies = [s for s in studies if s.organ == organ]
    if split is not None:
        studies = [s for s in studies if s.split == split]
    return studies


def write_study_list(studies: Iterable[Study], path: str | Path) -> Path:
    """Write studies as JSON Lines atomically; paths inside the list's folder become relative."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    lines = [json.dumps(s.to_json(relative_to=base), ensure_ascii=False) + "\n" for s in studies]
    return atomic_write_text(path, "".join(lines))

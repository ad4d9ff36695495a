"""Checks of a study list and of every volume it names (``medmap validate``).

Two reusable pieces live here:

* :func:`check_volume` opens one NIfTI file, or one folder holding a DICOM series
  (:mod:`medmap.data.dicom`), and raises :class:`~medmap.errors.VolumeError` with a specific
  message when it cannot be used. Preprocessing (and so training,
  evaluation and prediction) calls the same function, so bad input gives the same clear
  error everywhere.
* :func:`check_same_grid` enforces the co-registration rule for the modalities of one
  study: **same voxel grid**, i.e. the same shape and affines that agree to within 5% of a
  voxel at every corner of the grid. Preprocessing crops all modalities with one joint
  foreground box, which is only meaningful when they share a grid; resample
  co-registered sequences to a common grid before listing them.

:func:`validate_study_list` runs every check on a list and returns all problems found,
instead of stopping at the first one.

Example:
    >>> from medmap.data.validate import validate_study_list
    >>> for problem in validate_study_list("studies.jsonl"):  # doctest: +SKIP
    ...     print(problem)
    studies.jsonl:3: study 'brain-0002': modality 'flair': file not found: /data/brain-0002/flair.nii.gz
"""

from __future__ import annotations

import functools
import json
import os
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np

from medmap.config import OrganConfig, load_organ_config
from medmap.data.dicom import read_dicom_series, series_stat_key
from medmap.errors import ConfigError, StudyListError, VolumeError
from medmap.data.lesion import check_box
from medmap.data.loading import read_fdata
from medmap.data.studylist import Study, iter_study_lines
from medmap.utils import atomic_write_text, resolved_path

#: Grids of two modalities "coincide" when their voxel corners are this many voxels apart at most.
GRID_TOLERANCE_VOXELS = 0.05


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`validate_study_list`.

    Attributes:
        source: the study list file.
        line: 1-based line number in the list, or ``None`` for list-wide problems.
        study_id: the study concerned, when known.
        message: what is wrong, specific enough to fix it.
    """

    source: str
    line: int | None
    study_id: str | None
    message: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        who = f" study '{self.study_id}':" if self.study_id else ""
        return f"{where}:{who} {self.message}"


def _squeeze_to_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:  # e.g. (X, Y, Z, 1) written by some tools
        shape = shape[:-1]
    return shape


#: Largest volume (voxels) read without an explicit raise: 2^28 voxels, 1 GiB as float32.
#: ``MEDMAP_MAX_VOXELS`` changes it for unusually large acquisitions.
DEFAULT_MAX_VOXELS = 1 << 28


def _max_voxels() -> int:
    return int(os.environ.get("MEDMAP_MAX_VOXELS", DEFAULT_MAX_VOXELS))


def _gzip_size(path: Path, need: int) -> int:
    """Decompressed size of a .gz file, from its trailer when that agrees with ``need``
    (a whole single-member file), otherwise by streaming it (memory stays small)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() >= 18:
            f.seek(-4, os.SEEK_END)
            if int.from_bytes(f.read(4), "little") == need % (1 << 32):
                return need
        f.seek(0)
        d, have = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
        try:
            while chunk := f.read(1 << 20):
                have += len(d.decompress(chunk))
                while d.eof and d.unused_data:  # the next gzip member
                    rest, d = d.unused_data, zlib.decompressobj(16 + zlib.MAX_WBITS)
                    have += len(d.decompress(rest))
        except zlib.error:
            return have
        return have if d.eof else min(have, need - 1)


def _check_header(path: Path, img: nib.Nifti1Image) -> None:
    """Header checks made before any voxel is read: size limit, file size, voxel sizes."""
    hdr = img.header
    n_vox = int(np.prod([int(d) for d in img.shape], dtype=np.int64))
    limit = _max_voxels()
    if n_vox > limit:
        raise VolumeError(f"{path}: the header claims {tuple(int(d) for d in img.shape)} = {n_vox:,} voxels, more than "
                          f"the limit of {limit:,} (set MEDMAP_MAX_VOXELS to raise it); refusing to read it")
    offset = getattr(img.dataobj, "offset", None)  # the loaded header's vox_offset reads 0
    need = int(offset if offset is not None else hdr.get("vox_offset", 0)) + n_vox * np.dtype(hdr.get_data_dtype()).itemsize
    if path.name.endswith(".gz"):
        have = _gzip_size(path, need)
        if have < need:
            raise VolumeError(f"{path}: truncated or corrupt: it decompresses to {have:,} bytes, its header needs {need:,}")
    elif path.stat().st_size < need:
        raise VolumeError(f"{path}: truncated or corrupt: {path.stat().st_size:,} bytes, its header needs {need:,}")
    if int(hdr["qform_code"]) or int(hdr["sform_code"]):
        return
    from nibabel.openers import ImageOpener  # noqa: PLC0415

    with ImageOpener(str(path)) as f:  # nibabel's loader silently turns a zero voxel size into 1 mm
        raw = type(hdr).from_fileobj(f, check=False)
    zooms = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if np.any(~np.isfinite(zooms)) or np.any(zooms <= 0):
        raise VolumeError(f"{path}: the header has voxel sizes {zooms.tolist()} and no sform/qform; "
                          "the voxel grid is unknown")


def _file_key(path: Path) -> Path:
    """The resolved path, or the path itself when it cannot be resolved (a symlink loop)."""
    try:
        return resolved_path(path)
    except (OSError, RuntimeError):
        return path


def _load_nifti(path: Path) -> nib.Nifti1Image:
    """The lazily loaded NIfTI image of a file, after the header checks."""
    try:
        img = nib.load(str(path))
    except Exception as e:  # nibabel raises many kinds for unreadable headers
        raise VolumeError(f"{path}: cannot be read as NIfTI ({type(e).__name__}: {e})") from e
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise VolumeError(f"{path}: not a NIfTI file (nibabel read it as {type(img).__name__})")
    _check_header(path, img)
    return img


def check_volume_header(path: str | Path) -> tuple[nib.Nifti1Image, tuple[int, int, int], np.ndarray]:
    """The checks of :func:`check_volume` that read the header only (cheap; no voxel is read).

    A DICOM series folder has no single header: it is checked and read completely
    (:func:`medmap.data.dicom.read_dicom_series`), and the image returned holds its voxels.

    Returns:
        The (lazily loaded) image, its 3D shape and its affine.

    Raises:
        VolumeError: with a message naming the file and the problem.
    """
    path = Path(path)
    if path.is_symlink() and _file_key(path) == path:
        raise VolumeError(f"{path}: a symlink loop (it never reaches a file)")
    if not path.exists():
        raise VolumeError(f"{path}: file not found")
    if path.is_dir():
        img = read_dicom_series(path, max_voxels=_max_voxels())
    elif not path.is_file():
        raise VolumeError(f"{path}: not a file")
    else:
        img = _load_nifti(path)
    shape = _squeeze_to_3d(img.shape)
    if len(shape) != 3:
        raise VolumeError(f"{path}: not a 3D volume (shape {tuple(img.shape)}); give one 3D volume per modality")
    if min(shape) < 2:
        raise VolumeError(f"{path}: not a 3D volume (shape {tuple(img.shape)} has a single-voxel axis)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise VolumeError(f"{path}: the affine (voxel-to-world matrix) has NaN or infinite entries")
    linear = affine[:3, :3]
    sizes = np.linalg.norm(linear, axis=0)
    if np.any(sizes < 1e-6) or abs(np.linalg.det(linear)) < 1e-9 * float(np.prod(np.maximum(sizes, 1e-6))):
        raise VolumeError(
            f"{path}: the affine is singular (voxel sizes {np.round(sizes, 6).tolist()}); "
            "the header's sform/qform does not define a valid voxel grid"
        )
    return img, shape, affine


def check_volume(path: str | Path, allow_constant: bool = False) -> nib.Nifti1Image:
    """Open a NIfTI volume (or a DICOM series folder) and check that it can be used as one MRI sequence.

    Checks, in order: the file exists; nibabel can read it as NIfTI (a folder: it holds one
    regular DICOM series, :func:`medmap.data.dicom.read_dicom_series`); it is 3D (trailing
    singleton dimensions are dropped) with at least 2 voxels along each axis; the affine is
    finite and not singular; the voxel data can be read completely (catches truncated and
    corrupt files); no voxel is NaN or infinite; the volume is not constant.

    Args:
        path: a ``.nii`` or ``.nii.gz`` file, or a folder holding one DICOM series.
        allow_constant: skip the last check (for masks, see :func:`check_roi_mask`).

    Returns:
        A 3D ``Nifti1Image`` holding the voxel data as float32 in memory and the file's
        affine, ready for preprocessing (the file is not read again).

    Raises:
        VolumeError: with a message naming the file and the problem.

    Example:
        >>> img = check_volume("brain-0000/t1.nii.gz")  # doctest: +SKIP
        >>> img.shape
        (182, 218, 182)
    """
    img, shape, affine = check_volume_header(path)
    path = Path(path)
    try:
        # one-shot decompression (ISA-L when installed); the same voxels as img.get_fdata(dtype=np.float32)
        data = (read_fdata(path, img) if path.is_file() else np.asarray(img.get_fdata(dtype=np.float32))).reshape(shape)
    except (EOFError, OSError, ValueError, zlib.error, MemoryError) as e:
        raise VolumeError(f"{path}: voxel data cannot be read; the file is truncated or corrupt ({e})") from e
    lo, hi = float(data.min()), float(data.max())  # NaN propagates through min/max, +-inf is one of them
    if not (np.isfinite(lo) and np.isfinite(hi)):
        n_bad = int(data.size - np.count_nonzero(np.isfinite(data)))
        raise VolumeError(f"{path}: {n_bad} voxel(s) are NaN or infinite")
    if lo == hi and not allow_constant:
        raise VolumeError(f"{path}: the volume is constant (every voxel is {lo:g}); it holds no image")
    out = nib.Nifti1Image(data, affine)
    return out


def _memo_key(path: Path) -> str:
    """What :func:`preflight_studies` remembers a checked file (or DICOM folder) by."""
    if path.is_dir():
        return f"{_file_key(path)}:dicom:{series_stat_key(path)}"
    st = path.stat()
    return f"{_file_key(path)}:{st.st_size}:{st.st_mtime_ns}"


def preflight_studies(studies: Sequence[Study], memo: str | Path | None = None) -> None:
    """Check every file of ``studies`` before a run's first step: headers only, memoised.

    The header checks of :func:`check_volume` (existence, NIfTI, 3D, size limit, voxel grid)
    for every modality and ROI mask, so a bad validation or test file stops a run at once
    rather than after an epoch. Files that passed are remembered in ``memo`` (a JSON file,
    by path, size and modification time; a DICOM folder by the names, sizes and modification
    times of its files), so later runs skip them. A DICOM folder is read completely.

    Raises:
        VolumeError: one line naming the first bad file, the study and how many are bad.
    """
    memo_path = Path(memo) if memo is not None else None
    seen: dict[str, bool] = {}
    if memo_path is not None and memo_path.is_file():
        try:
            seen = json.loads(memo_path.read_text())
        except (OSError, ValueError):
            seen = {}
    problems: list[str] = []
    new = 0
    for study in studies:
        files = [(m, Path(f)) for m, f in study.modalities.items()]
        if study.roi_mask is not None:
            files.append(("roi_mask", Path(study.roi_mask)))
        for name, f in files:
            try:
                key = _memo_key(f)
            except (OSError, RuntimeError):
                key = None
            if key is not None and seen.get(key):
                continue
            try:
                check_volume_header(f)
            except VolumeError as e:
                problems.append(f"study '{study.study_id}', {name}: {e}")
                continue
            if key is not None:
                seen[key] = True
                new += 1
    if new and memo_path is not None:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(memo_path, json.dumps(seen))
    if problems:
        more = f" ({len(problems) - 1} more; `medmap validate` lists them all)" if len(problems) > 1 else ""
        raise VolumeError(f"{problems[0]}{more}")


def check_roi_mask(path: str | Path) -> nib.Nifti1Image:
    """Open a study's region-of-interest mask (``roi_mask``) and check it can crop the volumes.

    The same file checks as :func:`check_volume`, and at least one voxel must be non-zero.
    A full mask (every voxel inside) is allowed. Whether it lies on the volumes' grid is
    checked with them (:func:`check_same_grid`).

    Raises:
        VolumeError: naming the file, as ``roi_mask <path>: <problem>``.
    """
    try:
        img = check_volume(path, allow_constant=True)
    except VolumeError as e:
        raise VolumeError(f"roi_mask {e}") from e
    if not np.any(np.asarray(img.dataobj)):
        raise VolumeError(f"roi_mask {path}: the mask is empty (no voxel is non-zero); it marks no region to crop to")
    return img


def _corners(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    idx = np.array([[i, j, k, 1.0] for i in (0, shape[0] - 1) for j in (0, shape[1] - 1) for k in (0, shape[2] - 1)])
    return (affine @ idx.T).T[:, :3]


def check_same_grid(grids: Mapping[str, tuple[tuple[int, ...], np.ndarray]]) -> None:
    """Check that the modalities of one study share one voxel grid.

    The rule: identical shapes, and voxel corners that map to world positions no more than
    ``GRID_TOLERANCE_VOXELS`` (5%) of the smallest voxel apart. Because the affine is linear,
    agreeing at the 8 corners bounds the disagreement at every voxel.

    Args:
        grids: modality name -> ``(shape, affine)``; the first entry is the reference.

    Raises:
        VolumeError: naming the two modalities and how their grids differ.
    """
    items = list(grids.items())
    if len(items) < 2:
        return
    ref_name, (ref_shape, ref_aff) = items[0]
    ref_shape = tuple(ref_shape)[:3]
    ref_aff = np.asarray(ref_aff, dtype=np.float64)
    voxel = float(np.linalg.norm(ref_aff[:3, :3], axis=0).min())
    for name, (shape, aff) in items[1:]:
        shape = tuple(shape)[:3]
        if shape != ref_shape:
            raise VolumeError(
                f"modalities '{ref_name}' and '{name}' are not on the same voxel grid "
                f"(shape {ref_shape} vs {shape}); resample co-registered sequences to one grid"
            )
        dist = float(np.linalg.norm(_corners(shape, ref_aff) - _corners(shape, np.asarray(aff, np.float64)), axis=1).max())
        if dist > GRID_TOLERANCE_VOXELS * voxel:
            raise VolumeError(
                f"modalities '{ref_name}' and '{name}' are not on the same voxel grid "
                f"(their affines place grid corners up to {dist:.3g} mm apart); "
                "resample co-registered sequences to one grid"
            )


def _resolve_organ_configs(organ_configs: Iterable[OrganConfig | str | Path] | Mapping[str, OrganConfig] | None) -> dict[str, OrganConfig]:
    if organ_configs is None:
        return {}
    if isinstance(organ_configs, Mapping):
        return {name: load_organ_config(cfg) for name, cfg in organ_configs.items()}
    out: dict[str, OrganConfig] = {}
    for item in organ_configs:
        cfg = load_organ_config(item)
        out[cfg.name] = cfg
    return out


def validate_study_list(
    path: str | Path,
    organ_configs: Iterable[OrganConfig | str | Path] | Mapping[str, OrganConfig] | None = None,
    check_files: bool = True,
) -> list[Problem]:
    """Check a study list and every file it names; return all problems found.

    Checked per line: valid JSON with the study-list structure, unique ``study_id``, a known
    organ, modalities and label known to the organ config, at least ``min_modalities``
    modalities, every volume usable (:func:`check_volume`), a usable ``roi_mask``
    (:func:`check_roi_mask`; required when the organ config has ``crop: roi_mask``), all
    volumes and the mask of the study on one voxel grid (:func:`check_same_grid`; not for
    lesion-level studies, whose modalities are cut around their own boxes), and a lesion box
    for every modality that lies inside its volume with a positive size (required when the
    organ config has ``crop: lesion_box``). Across lines: no patient in two splits.

    Args:
        path: the ``.jsonl`` study list.
        organ_configs: organ configs (objects, built-in names or YAML paths, or a mapping
            name -> config). Organs not given here are looked up among the built-in configs.
        check_files: open every volume (the default); ``False`` checks the list only.

    Returns:
        Problems in line order (list-wide problems last); empty when the list is valid.

    Raises:
        StudyListError: the list file itself is missing or not UTF-8 text.
        ConfigError: a given organ config cannot be loaded.
    """
    path = Path(path)
    source = str(path)
    configs = _resolve_organ_configs(organ_configs)
    unknown_organs: set[str] = set()
    problems: list[Problem] = []
    seen_ids: dict[str, int] = {}
    patient_splits: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    volume_results: dict[Path, tuple[tuple[int, ...], np.ndarray] | VolumeError] = {}
    n_studies = 0

    def organ_config(name: str) -> OrganConfig | None:
        if name not in configs and name not in unknown_organs:
            try:
                cfg = load_organ_config(name)
            except ConfigError:
                cfg = None
            if cfg is not None and cfg.name == name:  # e.g. 'brain_4mm' is a variant of 'brain', not an organ
                configs[name] = cfg
            else:
                unknown_organs.add(name)
        return configs.get(name)

    for lineno, item in iter_study_lines(path):
        if isinstance(item, StudyListError):
            msg = str(item)
            prefix = f"{path}:{lineno}: "
            problems.append(Problem(source, lineno, None, msg[len(prefix):] if msg.startswith(prefix) else msg))
            continue
        study: Study = item
        n_studies += 1

        def report(message: str) -> None:
            problems.append(Problem(source, lineno, study.study_id, message))

        if study.study_id in seen_ids:
            report(f"duplicate study_id (first on line {seen_ids[study.study_id]})")
        else:
            seen_ids[study.study_id] = lineno
        if study.split is not None:
            patient_splits[study.patient_id][study.split].append(study.study_id)

        organ = organ_config(study.organ)
        if organ is None:
            known = sorted(set(configs) | _builtin_organ_names())
            report(f"unknown organ '{study.organ}' (known: {', '.join(known)}; add one with --organ-config)")
        else:
            unknown = [m for m in study.modalities if m not in organ.modalities]
            if unknown:
                report(
                    f"unknown modality {', '.join(repr(m) for m in unknown)} for organ '{organ.name}' "
                    f"(expected some of {', '.join(organ.modalities)})"
                )
            if study.label is not None and study.label not in organ.classes:
                report(f"unknown label '{study.label}' for organ '{organ.name}' (classes: {', '.join(organ.classes)})")
            n_known = len([m for m in study.modalities if m in organ.modalities])
            if n_known < organ.min_modalities:
                report(f"has {n_known} usable modalities; organ '{organ.name}' needs at least {organ.min_modalities}")
            if organ.crop == "roi_mask" and study.roi_mask is None:
                report(f"has no 'roi_mask'; the organ config given for '{organ.name}' crops to one (crop: roi_mask)")
            if organ.crop == "lesion_box" and study.lesion_box is None:
                report(f"has no 'lesion_box'; the organ config given for '{organ.name}' cuts each modality around "
                       "the lesion (crop: lesion_box)")
        if study.lesion_box is not None and study.lesion_box.box is None:
            uncovered = [m for m in study.modalities if m not in study.lesion_box.boxes]
            if uncovered:
                report(f"'lesion_box.boxes' has no box for modality {', '.join(repr(m) for m in uncovered)}; "
                       "give every modality its box (or one 'box' for the whole study)")

        if not check_files:
            continue
        grids: dict[str, tuple[tuple[int, ...], np.ndarray]] = {}
        for modality, file in study.modalities.items():
            key = _file_key(file)
            if key not in volume_results:
                try:
                    img = check_volume(file)
                    volume_results[key] = (tuple(img.shape), np.asarray(img.affine, np.float64))
                except VolumeError as e:
                    volume_results[key] = e
            result = volume_results[key]
            if isinstance(result, VolumeError):
                report(f"modality '{modality}': {result}")
            else:
                grids[modality] = result
                box = study.lesion_box.for_modality(modality) if study.lesion_box is not None else None
                if box is not None:
                    try:
                        check_box(box, study.lesion_box.space, result[0], result[1])
                    except VolumeError as e:
                        report(f"modality '{modality}': {file}: {e}")
        if study.roi_mask is not None:
            try:
                mask = check_roi_mask(study.roi_mask)
                if grids:
                    grids["roi_mask"] = (tuple(mask.shape), np.asarray(mask.affine, np.float64))
            except VolumeError as e:
                report(str(e))
        # lesion-level input cuts each modality around its own box: the grids may differ
        lesion_level = study.lesion_box is not None or (organ is not None and organ.lesion_level)
        try:
            if not lesion_level:
                check_same_grid(grids)
        except VolumeError as e:
            report(str(e))

    for patient, splits in patient_splits.items():
        if len(splits) > 1:
            detail = "; ".join(f"{s}: {', '.join(ids)}" for s, ids in sorted(splits.items()))
            problems.append(Problem(source, None, None, f"patient '{patient}' appears in several splits ({detail})"))
    if n_studies == 0 and not problems:
        problems.append(Problem(source, None, None, "the study list contains no studies"))
    return problems


@functools.lru_cache(maxsize=1)
def _builtin_organ_names() -> frozenset[str]:
    """Organ names of the built-in organ configs (variants such as ``brain_4mm`` share a name)."""
    from medmap.config import CONFIG_ROOT

    return frozenset(load_organ_config(p).name for p in (CONFIG_ROOT / "organs").glob("*.yaml"))


__all__ = [
    "GRID_TOLERANCE_VOXELS",
    "Problem",
    "check_same_grid",
    "check_volume",
    "validate_study_list",
]

"""DICOM series input: a folder holding one DICOM series, read as one 3D volume.

Anywhere a NIfTI path is accepted, a folder holding the slices of one DICOM series may be
given instead. :func:`read_dicom_series` reads it with SimpleITK (GDCM) and returns a
``nib.Nifti1Image`` with the voxels in ``x, y, z`` order (column, row, slice) and a RAS
affine, so the rest of medmap cannot tell it from a NIfTI file.

Before any voxel is read the folder is checked, and each problem is one
:class:`~medmap.errors.VolumeError` naming the folder:

* no DICOM series in the folder, or several (give one series per folder);
* a file that is not part of the series: not a DICOM file the reader can use, or a DICOM
  object without pixel data (a report, a presentation state, a DICOMDIR);
* slices that do not form one regular grid: different orientations or sizes, two slices
  at one position, missing slices (a gap in the slice positions or in the instance
  numbers), uneven slice spacing, or slice positions that do not advance along the slice
  normal (a tilted gantry).

Files whose name starts with ``.`` (e.g. ``.DS_Store``) and sub-folders are ignored.

Example:
    >>> img = read_dicom_series("study-0001/t2_tse_ax")  # doctest: +SKIP
    >>> img.shape, img.affine[:3, :3].round(2).tolist()    # doctest: +SKIP
    ((256, 256, 24), [[-0.9, 0.0, 0.0], [0.0, -0.9, 0.0], [0.0, 0.0, 5.0]])
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import nibabel as nib
import numpy as np

from medmap.errors import VolumeError

if TYPE_CHECKING:
    import SimpleITK as sitk

#: Slice spacings may differ by this fraction of the typical spacing (rounding in the headers).
SPACING_TOLERANCE = 0.01
#: Slices may differ in orientation by this much (direction cosines).
ORIENTATION_TOLERANCE = 1e-4
#: The DICOM Pixel Data tag (7FE0,0010) as stored in little-endian files.
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
#: LPS (DICOM, ITK) to RAS (NIfTI, nibabel): negate the first two world axes.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class _Slice:
    """The header of one file of a series, as SimpleITK reads it (LPS world)."""

    path: Path
    origin: np.ndarray
    direction: np.ndarray
    size: tuple[int, ...]
    instance: int | None


@contextlib.contextmanager
def _itk_warnings_off() -> Iterator[None]:
    """Silence ITK's warnings on stderr (e.g. "No Series were found"); we raise our own errors."""
    import SimpleITK as sitk  # noqa: PLC0415  (0.3 s to import; only DICOM input needs it)

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def _one_line(error: Exception) -> str:
    """A short one-line form of a (usually multi-line) SimpleITK error."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    text = next((ln for ln in lines if "ERROR:" in ln), " ".join(lines))
    text = text.split("ERROR:", 1)[-1].strip()
    return text if len(text) <= 200 else text[:197] + "..."


def folder_files(path: str | Path) -> list[Path]:
    """The regular files of a folder, sorted by name; hidden files (``.name``) are left out."""
    return sorted(p for p in Path(path).iterdir() if p.is_file() and not p.name.startswith("."))


def series_ids(path: str | Path) -> tuple[str, ...]:
    """The Series Instance UIDs of the DICOM series in a folder (not its sub-folders)."""
    import SimpleITK as sitk  # noqa: PLC0415  (0.3 s to import; only DICOM input needs it)

    with _itk_warnings_off():
        return tuple(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(path)))


def is_dicom_series_dir(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding at least one DICOM series."""
    path = Path(path)
    return path.is_dir() and bool(series_ids(path))


def series_stat_key(path: str | Path) -> str:
    """A cheap fingerprint of a folder: its resolved path and the names, sizes and mtimes of its files.

    Changes whenever a file of the folder is added, removed, replaced or edited.
    """
    folder = Path(path).resolve()
    files = []
    for p in folder_files(folder):
        st = p.stat()
        files.append((p.name, st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps([str(folder), files]).encode()).hexdigest()


def _describe_stray(path: Path) -> str:
    """Why a file of the folder is not a slice of the series."""
    with open(path, "rb") as f:
        head = f.read(132)
        is_dicom = head[128:132] == b"DICM"
        has_pixels = is_dicom and _PIXEL_DATA_TAG in head + f.read()
    if not is_dicom:
        return "not a DICOM file the reader can use"
    if not has_pixels:
        return "a DICOM object without pixel data (not an image slice)"
    return "a DICOM file the reader cannot use as a slice of the series"


def _series_files(folder: Path) -> list[Path]:
    """The files of the folder's only series; every other file of the folder is an error."""
    import SimpleITK as sitk  # noqa: PLC0415  (0.3 s to import; only DICOM input needs it)

    ids = series_ids(folder)
    if not ids:
        raise VolumeError(f"{folder}: a folder, but no DICOM series in it (give a NIfTI file or a DICOM series folder)")
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (", ..." if len(ids) > 3 else "")
        raise VolumeError(f"{folder}: holds {len(ids)} DICOM series ({shown}); put each series in its own folder")
    with _itk_warnings_off():
        files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])]
    used = {f.name for f in files}
    stray = [p for p in folder_files(folder) if p.name not in used]
    if stray:
        more = f" ({len(stray) - 1} more such file(s))" if len(stray) > 1 else ""
        raise VolumeError(f"{folder}: {stray[0].name} is {_describe_stray(stray[0])}; the folder must hold "
                          f"the slices of one series only{more}")
    return files


def _read_slice(path: Path) -> _Slice:
    """The header of one file (no pixel data read)."""
    import SimpleITK as sitk  # noqa: PLC0415  (0.3 s to import; only DICOM input needs it)

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise VolumeError(f"{path.parent}: {path.name} cannot be read as a DICOM image ({_one_line(e)})") from e
    instance = reader.GetMetaData("0020|0013").strip() if reader.HasMetaDataKey("0020|0013") else ""
    return _Slice(path, np.asarray(reader.GetOrigin(), np.float64),
                  np.asarray(reader.GetDirection(), np.float64).reshape(3, 3),
                  tuple(int(s) for s in reader.GetSize()), int(instance) if instance.lstrip("-").isdigit() else None)


def _check_alike(folder: Path, slices: Sequence[_Slice]) -> None:
    """Every slice has the first one's size and orientation."""
    first = slices[0]
    for s in slices[1:]:
        if s.size != first.size:
            raise VolumeError(f"{folder}: slices differ in size ({first.path.name}: {first.size[:2]}, "
                              f"{s.path.name}: {s.size[:2]}); not one series")
        if np.abs(s.direction - first.direction).max() > ORIENTATION_TOLERANCE:
            raise VolumeError(f"{folder}: slices have different orientations ({first.path.name}, {s.path.name}); "
                              "not one volume")


def _check_instance_numbers(folder: Path, slices: Sequence[_Slice]) -> None:
    """Instance numbers, when every slice has a distinct one, have no gap."""
    numbers = sorted(s.instance for s in slices if s.instance is not None)
    if len(numbers) != len(slices) or len(set(numbers)) != len(numbers):
        return
    for a, b in zip(numbers, numbers[1:]):
        if b - a > 1:
            raise VolumeError(f"{folder}: missing slice(s): the instance numbers jump from {a} to {b}")


def _check_spacing(folder: Path, slices: Sequence[_Slice], heights: np.ndarray) -> None:
    """Slice positions (along the normal, sorted) are evenly spaced, with no gap and no repeat."""
    steps = np.diff(heights)
    step = float(np.median(steps))
    names = [s.path.name for s in slices]
    for i, d in enumerate(steps):
        if d <= SPACING_TOLERANCE * step:
            raise VolumeError(f"{folder}: two slices at one position ({names[i]}, {names[i + 1]} at "
                              f"{heights[i]:.4g} mm); a repeated slice, or several volumes in one series")
    ratio = steps / step
    bad = np.abs(ratio - 1.0) > SPACING_TOLERANCE
    if not bad.any():
        return
    i = int(np.argmax(np.abs(ratio - 1.0)))
    whole = round(float(ratio[i]))
    if whole >= 2 and abs(ratio[i] - whole) <= SPACING_TOLERANCE * whole:
        raise VolumeError(f"{folder}: missing slice(s): a {steps[i]:.4g} mm gap between {names[i]} and {names[i + 1]} "
                          f"where the slice spacing is {step:.4g} mm ({whole - 1} slice(s) missing)")
    raise VolumeError(f"{folder}: uneven slice spacing ({steps.min():.4g} to {steps.max():.4g} mm between "
                      "neighbouring slices); resample the series to even spacing")


def _sorted_slices(folder: Path, slices: list[_Slice]) -> list[_Slice]:
    """The slices sorted along the slice normal, after checking that they form one regular grid."""
    _check_alike(folder, slices)
    if len(slices) < 2:
        return slices
    normal = slices[0].direction[:, 2]
    heights = np.array([float(s.origin @ normal) for s in slices])
    order = np.argsort(heights, kind="stable")
    slices, heights = [slices[i] for i in order], heights[order]
    _check_spacing(folder, slices, heights)
    _check_instance_numbers(folder, slices)
    travel = slices[-1].origin - slices[0].origin
    off_normal = np.linalg.norm(travel - (travel @ normal) * normal)
    if off_normal > SPACING_TOLERANCE * np.linalg.norm(travel):
        raise VolumeError(f"{folder}: the slice positions do not advance along the slice normal (tilted gantry "
                          "or sheared acquisition); resample the series to a regular grid")
    return slices


def _to_nifti(image: sitk.Image) -> nib.Nifti1Image:
    """A SimpleITK image (LPS world, array z, y, x) as a nibabel image (RAS affine, array x, y, z)."""
    import SimpleITK as sitk  # noqa: PLC0415

    data = np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))
    direction = np.asarray(image.GetDirection(), np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), np.float64)
    return nib.Nifti1Image(data, affine)


def read_dicom_series(path: str | Path, max_voxels: int | None = None) -> nib.Nifti1Image:
    """Read a folder holding one DICOM series as a 3D image with a RAS affine.

    Args:
        path: the series folder.
        max_voxels: refuse a series with more voxels than this before reading it.

    Returns:
        The voxels (the series' stored type with rescale slope and intercept applied) in
        ``x, y, z`` order, slices sorted along the slice normal, and the RAS affine.

    Raises:
        VolumeError: one line naming the folder and the problem (see the module docstring).
    """
    import SimpleITK as sitk  # noqa: PLC0415  (0.3 s to import; only DICOM input needs it)

    folder = Path(path)
    if not folder.is_dir():
        raise VolumeError(f"{folder}: not a folder")
    slices = _sorted_slices(folder, [_read_slice(f) for f in _series_files(folder)])
    n_vox = int(np.prod(slices[0].size, dtype=np.int64)) * len(slices)
    if max_voxels is not None and n_vox > max_voxels:
        raise VolumeError(f"{folder}: the series has {n_vox:,} voxels, more than the limit of {max_voxels:,} "
                          "(set MEDMAP_MAX_VOXELS to raise it); refusing to read it")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(s.path) for s in slices])
    try:
        with _itk_warnings_off():
            image = reader.Execute()
    except RuntimeError as e:
        raise VolumeError(f"{folder}: the DICOM series cannot be read ({_one_line(e)})") from e
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise VolumeError(f"{folder}: not a greyscale series ({image.GetNumberOfComponentsPerPixel()} "
                          "components per voxel)")
    return _to_nifti(image)


__all__ = ["folder_files", "is_dicom_series_dir", "read_dicom_series", "series_ids", "series_stat_key"]

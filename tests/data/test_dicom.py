"""DICOM series folders as input (medmap.data.dicom): geometry, slice order, errors, end to end."""

from __future__ import annotations

import json
import locale
import shutil
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medmap.data.cache import PreprocessCache
from medmap.data.dicom import is_dicom_series_dir, read_dicom_series
from medmap.data.preprocess import preprocess_volumes
from medmap.data.studylist import Study, write_study_list
from medmap.data.validate import check_volume, check_volume_header, preflight_studies, validate_study_list
from medmap.errors import VolumeError

#: An oblique orientation whose direction cosines are exact in the headers' decimal text
#: (rotations by atan(4/3) about z, then about x).
_RZ = np.array([[0.6, -0.8, 0.0], [0.8, 0.6, 0.0], [0.0, 0.0, 1.0]])
_RX = np.array([[1.0, 0.0, 0.0], [0.0, 0.8, -0.6], [0.0, 0.6, 0.8]])
OBLIQUE = _RX @ _RZ
#: A coronal orientation (rows along x, columns along -z, slices along y): not the identity,
#: and exact in float32, so a NIfTI file of it has exactly the DICOM affine. (An oblique
#: NIfTI affine is float32-rounded, about 1e-7 off, and that can move preprocessing's
#: resampled grid by a voxel.)
CORONAL = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])
SPACING = (1.5, 1.25, 2.5)
ORIGIN = (12.0, -30.5, 41.0)
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"


def make_volume(shape: tuple[int, int, int] = (12, 10, 8), seed: int = 0, level: int = 400) -> np.ndarray:
    """An int16 volume (x, y, z): a bright ellipsoid with noise on a dark background."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    inside = (grid ** 2).sum(0) < 0.7
    vol = inside * level + rng.integers(0, 40, shape) + grid[0] * 60
    return vol.astype(np.int16)


def make_image(vol_xyz: np.ndarray, direction: np.ndarray = OBLIQUE) -> sitk.Image:
    img = sitk.GetImageFromArray(np.ascontiguousarray(vol_xyz.transpose(2, 1, 0)))  # SimpleITK arrays are z, y, x
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    img.SetDirection(tuple(float(v) for v in direction.ravel()))
    return img


def _fmt(values: Sequence[float]) -> str:
    return "\\".join(f"{v:.6f}" for v in values)


def write_series(img: sitk.Image, folder: Path, uid: str = "1.2.826.0.1.3680043.8.498.2",
                 names: Sequence[str] | None = None, heights: Sequence[float] | None = None,
                 instances: Sequence[int] | None = None) -> Path:
    """Write ``img`` as one DICOM file per slice, with the usual MR tags.

    ``names`` (file name per slice), ``heights`` (slice positions along the normal, mm) and
    ``instances`` (instance numbers) override the regular defaults.
    """
    saved = locale.setlocale(locale.LC_ALL)  # GDCM's writer sets the process locale to "C"; medmap only reads
    try:
        return _write_slices(img, folder, uid, names, heights, instances)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_slices(img: sitk.Image, folder: Path, uid: str, names: Sequence[str] | None,
                  heights: Sequence[float] | None, instances: Sequence[int] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    spacing = img.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # also for names without .dcm, as scanners write them
    for k in range(img.GetDepth()):
        s = img[:, :, k]
        z = k * spacing[2] if heights is None else heights[k]
        position = np.asarray(img.GetOrigin()) + direction[:, 2] * z
        tags = {
            "0008|0060": "MR", "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{uid}.{k + 1}",
            "0020|000d": STUDY_UID, "0020|000e": uid,
            "0020|0032": _fmt(position), "0020|0037": _fmt([*direction[:, 0], *direction[:, 1]]),
            "0020|0013": str(k + 1 if instances is None else instances[k]),
            "0028|0030": _fmt([spacing[1], spacing[0]]), "0018|0050": f"{spacing[2]:.6f}",
            "0028|1052": "0", "0028|1053": "1",
        }
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / (f"{k:03d}.dcm" if names is None else names[k])))
        writer.Execute(s)
    return folder


def nifti_of(img: sitk.Image, path: Path) -> nib.Nifti1Image:
    """The reference: SimpleITK's own NIfTI of the image, read back with nibabel."""
    sitk.WriteImage(img, str(path))
    return nib.load(str(path))


def test_a_series_reads_as_the_nifti_of_the_same_volume(tmp_path: Path) -> None:
    vol = make_volume()
    img = make_image(vol)
    ref = nifti_of(img, tmp_path / "ref.nii.gz")
    folder = write_series(img, tmp_path / "series")
    assert is_dicom_series_dir(folder) and not is_dicom_series_dir(tmp_path / "ref.nii.gz")
    got = read_dicom_series(folder)
    assert got.shape == vol.shape and got.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asarray(got.dataobj), np.asarray(ref.dataobj))
    np.testing.assert_array_equal(np.asarray(got.dataobj), vol)
    np.testing.assert_allclose(got.affine, ref.affine, atol=1e-4)  # the NIfTI's affine is float32
    exact = np.diag([-1.0, -1.0, 1.0]) @ OBLIQUE @ np.diag(SPACING)  # LPS -> RAS
    np.testing.assert_allclose(got.affine[:3, :3], exact, atol=1e-9)
    np.testing.assert_allclose(got.affine[:3, 3], [-ORIGIN[0], -ORIGIN[1], ORIGIN[2]], atol=1e-9)
    assert nib.aff2axcodes(got.affine) == nib.aff2axcodes(ref.affine)
    # the shared entry point gives the same, as float32
    checked = check_volume(folder)
    np.testing.assert_array_equal(checked.get_fdata(), vol.astype(np.float32))
    np.testing.assert_allclose(checked.affine, ref.affine, atol=1e-4)
    _, shape, affine = check_volume_header(folder)
    assert shape == vol.shape and np.allclose(affine, got.affine)


def test_slices_come_back_in_order_whatever_the_file_order(tmp_path: Path) -> None:
    vol = make_volume(shape=(9, 8, 7), seed=1)
    img = make_image(vol, np.eye(3))
    order = np.random.default_rng(3).permutation(vol.shape[2])
    names = [f"IM{int(p):04d}" for p in order]  # file names sort in another order than the slices
    instances = [int(p) + 1 for p in order]  # and so do the instance numbers
    folder = write_series(img, tmp_path / "shuffled", names=names, instances=instances)
    (folder / ".DS_Store").write_bytes(b"\0\1")  # hidden files are ignored
    got = read_dicom_series(folder)
    np.testing.assert_array_equal(np.asarray(got.dataobj), vol)
    np.testing.assert_allclose(got.affine, nifti_of(img, tmp_path / "ref.nii").affine, atol=1e-4)


def _truncate_before_pixel_data(src: Path, dst: Path) -> None:
    raw = src.read_bytes()
    cut = raw.find(b"\xe0\x7f\x10\x00")  # (7FE0,0010) Pixel Data, explicit little endian
    assert cut > 0
    dst.write_bytes(raw[:cut])


@pytest.mark.parametrize("case", ["two_series", "missing_slice", "missing_instance", "uneven", "no_dicom", "empty",
                                  "no_pixel_data", "not_dicom"])
def test_each_bad_folder_gets_its_own_one_line_error(case: str, tmp_path: Path) -> None:
    img = make_image(make_volume(shape=(8, 8, 6)))
    folder = tmp_path / case
    folder.mkdir()
    if case == "two_series":
        write_series(img, folder, uid="1.2.3.1")
        write_series(img, folder, uid="1.2.3.2", names=[f"b{k}.dcm" for k in range(6)])
        expected = r"holds 2 DICOM series \(1\.2\.3\.1, 1\.2\.3\.2\); put each series in its own folder"
    elif case == "missing_slice":
        write_series(img, folder)
        (folder / "003.dcm").unlink()
        expected = r"missing slice\(s\): a 5 mm gap between 002\.dcm and 004\.dcm where the slice spacing is 2\.5 mm"
    elif case == "missing_instance":
        write_series(img, folder, instances=[1, 2, 3, 5, 6, 7])
        expected = r"missing slice\(s\): the instance numbers jump from 3 to 5"
    elif case == "uneven":
        write_series(img, folder, heights=[0.0, 2.5, 5.0, 8.0, 10.5, 13.0])
        expected = r"uneven slice spacing \(2\.5 to 3 mm between neighbouring slices\)"
    elif case == "no_dicom":
        (folder / "notes.txt").write_text("not an image")
        expected = r"a folder, but no DICOM series in it"
    elif case == "empty":
        expected = r"a folder, but no DICOM series in it"
    elif case == "no_pixel_data":
        write_series(img, folder)
        _truncate_before_pixel_data(folder / "000.dcm", folder / "report.dcm")
        expected = r"report\.dcm is a DICOM object without pixel data \(not an image slice\)"
    else:
        write_series(img, folder)
        (folder / "notes.txt").write_text("acquired on scanner 3")
        expected = r"notes\.txt is not a DICOM file the reader can use"
    with pytest.raises(VolumeError, match=expected) as info:
        check_volume(folder)
    message = str(info.value)
    assert message.startswith(f"{folder}: ") and "\n" not in message


def test_a_file_that_is_not_a_folder_or_nifti_is_still_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeError, match="file not found"):
        check_volume(tmp_path / "nothing")
    with pytest.raises(VolumeError, match="not a folder"):
        read_dicom_series(tmp_path / "nothing")


# --------------------------------------------------------------------------- study lists, cache, prediction
MODS = ("t1", "t2")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """One study as NIfTI files and as DICOM folders (same int16 volumes, coronal grid)."""
    root = tmp_path_factory.mktemp("dicom_study")
    nifti, dicom = {}, {}
    for i, m in enumerate(MODS):
        img = make_image(make_volume(shape=(20, 18, 14), seed=10 + i, level=300 + 100 * i), CORONAL)
        nifti[m] = root / f"{m}.nii.gz"
        sitk.WriteImage(img, str(nifti[m]))
        dicom[m] = write_series(img, root / f"{m}_dicom", uid=f"1.2.826.0.1.3680043.8.498.{10 + i}")
    return {"nifti": nifti, "dicom": dicom}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A freshly initialised tiny brain run folder (``medmap.benchmark.make_run_folder``; no training needed
    to compare two inputs)."""
    import dataclasses

    from medmap import benchmark as perf

    setup = perf.FinetuneSetup("tiny", ["organ=brain"])  # the tests' two-stage 16-wide CNN
    setup.organ = dataclasses.replace(setup.organ, spacing=(2.5, 2.5, 2.5), roi_size=(16, 16, 16))
    setup.model = perf.build_medmap_classifier(setup.organ, setup.cfg, perf.TEXT_DIM).eval()
    return perf.make_run_folder(tmp_path_factory.mktemp("dicom_run") / "run", setup)


def test_validate_and_preflight_accept_dicom_folders(study: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    good = Study("s0", "p0", "brain", dict(study["dicom"]), label="normal", split="train")
    bad_folder = tmp_path / "not_dicom"
    bad_folder.mkdir()
    bad = Study("s1", "p1", "brain", {"t1": study["dicom"]["t1"], "t2": bad_folder}, label="normal", split="train")
    mixed = Study("s2", "p2", "brain", {"t1": study["nifti"]["t1"], "t2": study["dicom"]["t2"]}, split="train")
    path = write_study_list([good, bad, mixed], tmp_path / "studies.jsonl")
    problems = [str(p) for p in validate_study_list(path)]
    assert problems == [f"{path}:2: study 's1': modality 't2': {bad_folder}: a folder, but no DICOM series in it "
                        "(give a NIfTI file or a DICOM series folder)"]
    memo = tmp_path / "preflight.json"
    preflight_studies([good, mixed], memo=memo)
    assert len(json.loads(memo.read_text())) == 3  # two folders and one file
    with pytest.raises(VolumeError, match="study 's1', t2: .*no DICOM series"):
        preflight_studies([bad], memo=memo)


def test_the_cache_keys_a_folder_by_its_files(study: dict[str, dict[str, Path]], tmp_path: Path) -> None:
    folder = tmp_path / "t1"
    shutil.copytree(study["dicom"]["t1"], folder)
    cache = PreprocessCache(tmp_path / "cache")
    files = {"t1": folder}
    key = cache.key(files, {"c": 1})
    assert cache.key({"t1": study["dicom"]["t1"]}, {"c": 1}) == key  # same names and contents
    target = folder / "003.dcm"
    raw = bytearray(target.read_bytes())
    raw[-1] ^= 1  # one voxel changes: same size, new content
    target.write_bytes(bytes(raw))
    assert cache.key(files, {"c": 1}) != key


def test_prediction_from_dicom_folders_equals_prediction_from_nifti(
        study: dict[str, dict[str, Path]], tiny_run: Path, tmp_path: Path) -> None:
    from medmap.cli.main import main
    from medmap.inference import load_run

    predictor = load_run(tiny_run, device="cpu")
    organ = predictor.organ
    a = preprocess_volumes(study["nifti"], organ)
    b = preprocess_volumes(study["dicom"], organ, cache=PreprocessCache(tmp_path / "cache"))
    assert a["present"].tolist() == b["present"].tolist() and a["present"].sum() == 2
    np.testing.assert_allclose(b["images"].numpy(), a["images"].numpy(), atol=1e-5)
    np.testing.assert_allclose(b["affine"].numpy(), a["affine"].numpy(), atol=1e-4)
    from_nifti = predictor.predict(study["nifti"])
    from_dicom = predictor.predict({m: str(p) for m, p in study["dicom"].items()})
    np.testing.assert_allclose(list(from_dicom.probabilities.values()), list(from_nifti.probabilities.values()),
                               atol=1e-5)
    assert from_dicom.modalities_used == ["t1", "t2"]
    out = tmp_path / "pred"
    args = ["predict", str(tiny_run), *(f"{m}={p}" for m, p in study["dicom"].items()), "--no-saliency",
            "--out", str(out), "--device", "cpu"]
    assert main(args) == 0
    cli = json.loads((out / "study_prediction.json").read_text())["probabilities"]
    np.testing.assert_allclose([cli[c] for c in organ.classes], list(from_nifti.probabilities.values()), atol=1e-5)

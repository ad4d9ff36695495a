"""Fast volume reading (medmap.data.loading) and the copy-free resampling (StridedSpacingd):
the same voxels, tensors and errors as the plain nibabel / MONAI path."""

from __future__ import annotations

import gzip
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Spacing

from medmap.data import loading
from medmap.data.preprocess import StridedSpacingd, preprocess_volumes
from medmap.data.validate import check_volume
from medmap.errors import VolumeError
from tests.helpers.volumes import LPS_AFFINE, head_volume, toy_organ, write_nifti


def _scaled_int16(path: Path, data: np.ndarray, affine: np.ndarray = LPS_AFFINE, dtype: str = "<i2") -> Path:
    img = nib.Nifti1Image(np.round(data).astype(dtype), affine)
    img.header.set_slope_inter(0.37, 5.0)
    nib.save(img, str(path))
    return path


@pytest.mark.parametrize("kind", ["int16_slope.nii.gz", "bigendian.nii.gz", "float32.nii", "float32.nii.gz",
                                  "trailing1.nii.gz", "multimember.nii.gz"])
def test_fast_reader_gives_nibabels_voxels_bit_for_bit(tmp_path, kind):
    data = head_volume(3)
    path = tmp_path / kind
    if kind.startswith("int16"):
        _scaled_int16(path, data)
    elif kind.startswith("bigendian"):
        _scaled_int16(path, data, dtype=">i2")
    elif kind.startswith("trailing1"):
        write_nifti(path, data[..., None])
    elif kind.startswith("multimember"):  # gzip files of several members (e.g. written by pigz --independent)
        raw = gzip.decompress(write_nifti(tmp_path / "one.nii.gz", data).read_bytes())
        path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    else:
        write_nifti(path, data)
    img = nib.load(str(path))
    fast = loading.read_fdata(path, img)
    ref = nib.load(str(path)).get_fdata(dtype=np.float32)
    assert fast.dtype == np.float32 and fast.shape == ref.shape
    assert np.array_equal(fast, ref)
    assert np.array_equal(np.asarray(check_volume(path).dataobj), ref.reshape(data.shape))


def test_gunzip_matches_the_standard_library():
    raw = np.random.default_rng(0).integers(0, 50, 100_000).astype(np.uint8).tobytes()
    assert loading.gunzip(gzip.compress(raw)) == raw
    assert loading.gunzip(gzip.compress(raw[:10]) + gzip.compress(raw[10:])) == raw
    assert loading.GZIP_BACKEND in ("isal", "zlib")


def _corrupt_middle(tmp_path: Path) -> Path:
    raw = bytearray(write_nifti(tmp_path / "good.nii.gz", head_volume()).read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)  # damaged deflate data, trailer (and so the size check) intact
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(raw))
    return bad


@pytest.mark.parametrize("damage", ["middle", "truncated"])
def test_unreadable_gzip_gives_the_same_one_line_error_as_nibabels_reader(tmp_path, monkeypatch, damage):
    if damage == "middle":
        bad = _corrupt_middle(tmp_path)
    else:
        raw = write_nifti(tmp_path / "good.nii.gz", head_volume()).read_bytes()
        bad = tmp_path / "bad.nii.gz"
        bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(VolumeError) as fast:
        check_volume(bad)
    # nibabel's own streaming reader only (the fast path disabled)
    monkeypatch.setattr(loading, "read_fdata", lambda path, img: np.asarray(img.get_fdata(dtype=np.float32)))
    monkeypatch.setattr("medmap.data.validate.read_fdata", loading.read_fdata)
    with pytest.raises(VolumeError) as slow:
        check_volume(bad)
    assert str(fast.value) == str(slow.value)
    assert str(fast.value).startswith(f"{bad}: ") and "\n" not in str(fast.value)
    # nibabel stops reading before the gzip trailer, so damaged data with an intact length is read (as
    # before) and only the voxels show it; a short file is refused by size
    assert ("truncated or corrupt" if damage == "truncated" else "NaN or infinite") in str(fast.value)


def test_nan_and_inf_are_still_counted(tmp_path):
    data = head_volume()
    data[1, 2, 3], data[4, 5, 6] = np.nan, np.inf
    with pytest.raises(VolumeError, match=r"2 voxel\(s\) are NaN or infinite"):
        check_volume(write_nifti(tmp_path / "nan.nii.gz", data))


def test_map_ordered_raises_the_first_error_in_item_order_whatever_finishes_first():
    def fn(i: int) -> int:
        if i == 1:
            time.sleep(0.05)  # the earlier item fails last
            raise ValueError("item 1")
        if i == 3:
            raise KeyError("item 3")
        return i * 10

    with pytest.raises(ValueError, match="item 1"):
        loading.map_ordered(fn, [0, 1, 2, 3], threads=4)
    assert loading.map_ordered(lambda i: (i, threading.current_thread().name), [0, 1], threads=1)[0][0] == 0
    assert loading.map_ordered(lambda i: i * 10, range(6), threads=3) == [0, 10, 20, 30, 40, 50]


def test_read_threads_follows_the_environment(monkeypatch):
    monkeypatch.setenv(loading.READ_THREADS_ENV, "3")
    assert loading.read_threads(8) == 3 and loading.read_threads(2) == 2
    monkeypatch.setenv(loading.READ_THREADS_ENV, "1")
    assert loading.read_threads(8) == 1
    monkeypatch.delenv(loading.READ_THREADS_ENV)
    assert 1 <= loading.read_threads(4) <= 4


def _study(tmp_path: Path, affine: np.ndarray = LPS_AFFINE) -> dict[str, Path]:
    return {m: _scaled_int16(tmp_path / f"{m}.nii.gz", head_volume(i, scale=100 * (i + 1)), affine)
            for i, m in enumerate(["t1", "t2", "flair"])}


def test_parallel_reading_gives_the_serial_tensors(tmp_path, monkeypatch):
    paths = _study(tmp_path)
    organ = toy_organ()
    monkeypatch.setenv(loading.READ_THREADS_ENV, "1")
    serial = preprocess_volumes(paths, organ)
    monkeypatch.setenv(loading.READ_THREADS_ENV, "4")
    parallel = preprocess_volumes(paths, organ)
    for k in ("images", "present", "affine"):
        assert torch.equal(serial[k], parallel[k])


@pytest.mark.parametrize("affine", [
    LPS_AFFINE,
    np.diag([1.0, 1.0, 1.0, 1.0]),
    np.array([[0.0, 0.0, 2.5, -20.0], [1.2, 0.0, 0.0, -25.0], [0.0, -1.1, 0.1, 20.0], [0, 0, 0, 1.0]]),  # permuted, oblique
])
def test_strided_spacing_is_monais_spacing_bit_for_bit(affine):
    vol = head_volume(2)
    f_order = np.asfortranarray(vol)  # as nibabel returns a NIfTI volume
    make = lambda arr: MetaTensor(torch.from_numpy(arr)[None], affine=torch.from_numpy(affine))  # noqa: E731
    ours = StridedSpacingd(["x"], pixdim=(2.0, 2.0, 2.0))({"x": make(f_order)})["x"]
    monai = Spacing(pixdim=(2.0, 2.0, 2.0), mode="bilinear", padding_mode="border", dtype=np.float32)(
        make(np.ascontiguousarray(vol)))
    assert not make(f_order).is_contiguous()
    assert ours.shape == monai.shape
    assert torch.equal(ours.as_tensor(), monai.as_tensor())
    assert torch.equal(torch.as_tensor(ours.affine), torch.as_tensor(monai.affine))


def test_output_affine_places_the_crop_in_z_too(tmp_path):
    # a head centred on world (0, 0, 0): its preprocessed foreground must map back there on every axis
    shape = (40, 44, 36)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [-(s - 1) for s in shape]
    paths = {m: write_nifti(tmp_path / f"{m}.nii.gz", head_volume(i, marker=False, shape=shape), affine)
             for i, m in enumerate(["t1", "t2"])}
    out = preprocess_volumes(paths, toy_organ(spacing=(4.0, 4.0, 4.0), roi_size=(24, 24, 16)))
    fg = (out["images"][0] != 0).numpy()
    centre = (out["affine"].numpy() @ np.r_[np.array(np.nonzero(fg)).mean(axis=1), 1.0])[:3]
    np.testing.assert_allclose(centre, 0.0, atol=2.5)

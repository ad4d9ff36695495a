import nibabel as nib
import numpy as np
import pytest
import torch

from medmap.data.preprocess import preprocess_study, preprocess_volumes, preprocessing_signature
from medmap.errors import StudyListError, VolumeError
from tests.helpers.volumes import LPS_AFFINE, SHAPE, head_volume, make_study, toy_organ, write_nifti


def _world(affine: torch.Tensor, ijk) -> np.ndarray:
    return (affine.numpy() @ np.array([*ijk, 1.0]))[:3]


def test_round_trip_lps_anisotropic_to_ras(tmp_path):
    organ = toy_organ()
    study = make_study(tmp_path, "s1")
    out = preprocess_study(study, organ)

    assert out["images"].shape == (3, 24, 24, 16)
    assert out["images"].dtype == torch.float32
    assert out["present"].dtype == torch.bool and out["present"].tolist() == [True, True, True]
    aff = out["affine"]
    assert aff.dtype == torch.float64 and aff.shape == (4, 4)
    # RAS at the organ spacing: a positive diagonal of 2 mm
    np.testing.assert_allclose(np.diag(aff.numpy())[:3], [2.0, 2.0, 2.0], atol=1e-6)
    np.testing.assert_allclose(aff.numpy()[:3, :3] - np.diag(np.diag(aff.numpy())[:3]), 0, atol=1e-6)

    # The marker sits at voxel i = 0.25 X, j = 0.3 Y; the affine flips i and j, so it lies to the
    # right (+x) and anterior (+y) of the head centre, i.e. in the upper half of RAS axes 0 and 1.
    t1 = out["images"][0]
    hot = (t1 >= t1.max() - 1e-3).nonzero().float().mean(0)
    assert hot[0] > 24 / 2 and hot[1] > 24 / 2
    src_marker = LPS_AFFINE @ np.array([0.25 * SHAPE[0], 0.3 * SHAPE[1], 0.5 * SHAPE[2], 1.0])
    src_centre = LPS_AFFINE @ np.array([(SHAPE[0] - 1) / 2, (SHAPE[1] - 1) / 2, (SHAPE[2] - 1) / 2, 1.0])
    got = _world(aff, hot.tolist())
    assert np.sign(got[0] - src_centre[0]) == np.sign(src_marker[0] - src_centre[0]) == 1
    np.testing.assert_allclose(got[:2], src_marker[:2], atol=4.0)  # within two output voxels


def test_intensity_normalisation_is_foreground_z_score(tmp_path):
    organ = toy_organ(roi_size=(40, 40, 40))  # holds the whole head: statistics over all of it
    # a volume with a huge positive outlier: clipping must keep the z-scores sane
    data = head_volume(seed=3, marker=False)
    data[20, 18, 10] = 1e6
    path = write_nifti(tmp_path / "t1.nii.gz", data)
    out = preprocess_volumes({"t1": path}, organ)
    x = out["images"][0]
    fg = x[x != 0]
    assert abs(float(fg.mean())) < 0.1
    assert 0.7 < float(fg.std()) < 1.3
    assert float(x.abs().max()) <= 8.0  # the 1e6 voxel is clipped at z = 8
    # the corners are background -> exactly 0 (not a CT window, not shifted)
    assert float(x[0, 0, 0]) == 0.0


def test_a_small_lesion_keeps_its_contrast(tmp_path):
    """A lesion far smaller than 0.5% of the foreground must not be clipped to normal tissue."""
    organ = toy_organ(roi_size=(40, 40, 40))
    data = head_volume(seed=4, marker=False)
    data[20, 18, 10] = 400.0  # one voxel, 4x the tissue intensity (about 0.01% of the head)
    data[12, 18, 10] = 120.0  # a brighter-than-average normal voxel for comparison
    out = preprocess_volumes({"t1": write_nifti(tmp_path / "t1.nii.gz", data)}, organ)
    x = out["images"][0]
    fg = x[x != 0]
    assert float(x.max()) > float(torch.quantile(fg, 0.995)) + 3.0


def test_missing_modality_is_zero_and_absent(tmp_path):
    organ = toy_organ()
    study = make_study(tmp_path, "s1", modalities=("t1", "flair"))
    out = preprocess_study(study, organ)
    assert out["present"].tolist() == [True, False, True]
    assert torch.count_nonzero(out["images"][1]) == 0
    assert torch.count_nonzero(out["images"][0]) > 0 and torch.count_nonzero(out["images"][2]) > 0


def test_same_case_same_tensor_and_float16_exact(tmp_path):
    organ = toy_organ()
    study = make_study(tmp_path, "s1")
    a, b = preprocess_study(study, organ), preprocess_study(study, organ)
    assert torch.equal(a["images"], b["images"]) and torch.equal(a["affine"], b["affine"])
    assert torch.equal(a["images"], a["images"].half().float())


def test_modalities_share_the_crop(tmp_path):
    """Two identical modalities give identical channels: the crop is joint, not per modality."""
    organ = toy_organ()
    data = head_volume(seed=1)
    paths = {m: write_nifti(tmp_path / f"{m}.nii.gz", data) for m in ("t1", "t2")}
    out = preprocess_volumes(paths, organ)
    assert torch.equal(out["images"][0], out["images"][1])


def test_unknown_and_too_few_modalities(tmp_path):
    organ = toy_organ(min_modalities=2)
    path = write_nifti(tmp_path / "t1.nii.gz", head_volume())
    with pytest.raises(VolumeError, match=r"unknown modality 'dwi' for organ 'toy'"):
        preprocess_volumes({"t1": path, "dwi": path}, organ)
    with pytest.raises(VolumeError, match=r"1 modalities given; organ 'toy' needs at least 2"):
        preprocess_volumes({"t1": path}, organ)


def test_bad_volume_gives_the_check_volume_message(tmp_path):
    organ = toy_organ()
    data = head_volume()
    data[3, 3, 3] = np.nan
    study = make_study(tmp_path, "s1", modalities=("t1",))
    write_nifti(study.modalities["t1"], data)
    with pytest.raises(VolumeError, match=r"study 's1': .*t1\.nii\.gz: 1 voxel\(s\) are NaN or infinite"):
        preprocess_study(study, organ)


def test_grid_mismatch_and_wrong_organ(tmp_path):
    organ = toy_organ()
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 5.0
    paths = {
        "t1": write_nifti(tmp_path / "t1.nii.gz", head_volume()),
        "t2": write_nifti(tmp_path / "t2.nii.gz", head_volume(seed=1), shifted),
    }
    with pytest.raises(VolumeError, match="not on the same voxel grid"):
        preprocess_volumes(paths, organ)
    study = make_study(tmp_path, "s2", organ="brain")
    with pytest.raises(StudyListError, match="is a brain study, not toy"):
        preprocess_study(study, organ)


def test_builtin_brain_shape(tmp_path):
    """The real brain config gives its ROI with 4 channels, even from a small 1 mm volume."""
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    path = write_nifti(tmp_path / "t1.nii.gz", head_volume(shape=(60, 70, 60)), affine)
    out = preprocess_volumes({"t1": path}, "brain")
    assert out["images"].shape == (4, 80, 96, 80)
    assert out["present"].tolist() == [True, False, False, False]
    assert isinstance(nib.load(str(path)), nib.Nifti1Image)


def _roi_case(tmp_path):
    """A head whose marker (at voxel i = 0.25 X, j = 0.3 Y) has an 'organ' mask around it."""
    data = head_volume(seed=2)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    i0, j0, k0 = int(0.25 * SHAPE[0]), int(0.3 * SHAPE[1]), int(0.5 * SHAPE[2])
    mask[i0 - 5 : i0 + 5, j0 - 5 : j0 + 5, k0 - 3 : k0 + 3] = 1
    return write_nifti(tmp_path / "t1.nii.gz", data), write_nifti(tmp_path / "organ.nii.gz", mask)


def test_roi_mask_crop_fills_the_input_with_the_organ(tmp_path):
    """crop: roi_mask crops to the mask's box (plus the margin), so the marked organ fills the input."""
    t1, mask = _roi_case(tmp_path)
    whole = preprocess_volumes({"t1": t1}, toy_organ(roi_size=(40, 40, 40)))["images"][0]
    roi = preprocess_volumes({"t1": t1}, toy_organ(roi_size=(40, 40, 40), crop="roi_mask"), roi_mask=mask)
    x = roi["images"][0]
    # 10 x 10 x 6 source voxels of 1.5 x 1.5 x 3 mm -> about 8 x 8 x 9 voxels of 2 mm (+ 2 margin a side)
    nonzero = (x != 0).nonzero()
    extent = (nonzero.max(0).values - nonzero.min(0).values + 1).tolist()
    assert all(e <= 14 for e in extent), extent
    assert int((whole != 0).sum()) > 5 * int((x != 0).sum())  # 7292 against 1044 voxels
    # the marker is inside the crop, centred, and still the brightest thing in it
    hot = (x >= x.max() - 1e-3).nonzero().float().mean(0)
    assert torch.all((hot - 19.5).abs() < 6)
    # the crop box maps back to the marker's world position
    src_marker = LPS_AFFINE @ np.array([0.25 * SHAPE[0], 0.3 * SHAPE[1], 0.5 * SHAPE[2], 1.0])
    np.testing.assert_allclose(_world(roi["affine"], hot.tolist())[:2], src_marker[:2], atol=4.0)


def test_zero_outside_roi_keeps_only_the_organ(tmp_path):
    """zero_outside_roi: the same crop, but z-scored over the mask and 0 outside it."""
    t1, mask = _roi_case(tmp_path)
    kept = preprocess_volumes({"t1": t1}, toy_organ(roi_size=(40, 40, 40), crop="roi_mask"), roi_mask=mask)
    organ = toy_organ(roi_size=(40, 40, 40), crop="roi_mask", zero_outside_roi=True)
    only = preprocess_volumes({"t1": t1}, organ, roi_mask=mask)
    x, y = only["images"][0], kept["images"][0]
    assert torch.equal(only["affine"], kept["affine"])  # same crop box
    # the 2-voxel margin around the mask is now 0; what is left lies inside the cropped mask
    assert 0 < int((x != 0).sum()) < int((y != 0).sum())
    nonzero = (x != 0).nonzero()
    extent = (nonzero.max(0).values - nonzero.min(0).values + 1).tolist()
    assert all(e <= 10 for e in extent), extent  # the mask's ~8 x 8 x 9 voxels (+1 for partial ones)
    # z-scored over the organ: zero mean, unit spread inside it (before the +-clip), unlike the body's z-score
    inside = x[x != 0]
    assert abs(float(inside.mean())) < 0.2 and 0.7 < float(inside.std()) < 1.3
    # the marker is still the brightest voxel, at the same place
    assert torch.equal((x >= x.max() - 1e-3).nonzero(), (y >= y.max() - 1e-3).nonzero())
    # a different preprocessing, so a different cache entry
    assert preprocessing_signature(organ) != preprocessing_signature(toy_organ(roi_size=(40, 40, 40), crop="roi_mask"))
    assert "zero_outside_roi" not in preprocessing_signature(toy_organ())


def test_roi_mask_is_required_checked_and_only_read_when_configured(tmp_path):
    t1, mask = _roi_case(tmp_path)
    roi_organ = toy_organ(crop="roi_mask")
    with pytest.raises(VolumeError, match=r"crops to a region-of-interest mask \(crop: roi_mask\) and none was given"):
        preprocess_volumes({"t1": t1}, roi_organ)
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(VolumeError, match=r"roi_mask .*empty\.nii\.gz: the mask is empty"):
        preprocess_volumes({"t1": t1}, roi_organ, roi_mask=empty)
    shifted = LPS_AFFINE.copy()
    shifted[0, 3] += 5.0
    moved = write_nifti(tmp_path / "moved.nii.gz", nib.load(str(mask)).get_fdata(), shifted)
    with pytest.raises(VolumeError, match=r"modalities 't1' and 'roi_mask' are not on the same voxel grid"):
        preprocess_volumes({"t1": t1}, roi_organ, roi_mask=moved)
    with pytest.raises(VolumeError, match=r"roi_mask .*nowhere\.nii\.gz: file not found"):
        preprocess_volumes({"t1": t1}, roi_organ, roi_mask=tmp_path / "nowhere.nii.gz")
    # a foreground-crop organ ignores the mask: the same tensor as without it
    a = preprocess_volumes({"t1": t1}, toy_organ(), roi_mask=empty)
    assert torch.equal(a["images"], preprocess_volumes({"t1": t1}, toy_organ())["images"])


def test_roi_mask_is_part_of_the_cache_key(tmp_path):
    """Two masks, two cache entries; each returns exactly what preprocessing computes."""
    from medmap.data.cache import PreprocessCache

    t1, mask = _roi_case(tmp_path)
    other = np.zeros(SHAPE, dtype=np.uint8)
    other[20:30, 20:30, 8:14] = 1
    other = write_nifti(tmp_path / "other.nii.gz", other)
    organ = toy_organ(crop="roi_mask")
    cache = PreprocessCache(tmp_path / "cache")
    a = preprocess_volumes({"t1": t1}, organ, cache=cache, roi_mask=mask)
    b = preprocess_volumes({"t1": t1}, organ, cache=cache, roi_mask=other)
    assert cache.misses == 2 and not torch.equal(a["images"], b["images"])
    again = preprocess_volumes({"t1": t1}, organ, cache=cache, roi_mask=mask)
    assert cache.hits == 1 and torch.equal(again["images"], a["images"])
    assert torch.equal(a["images"], preprocess_volumes({"t1": t1}, organ, roi_mask=mask)["images"])


def test_preprocess_study_uses_the_study_roi_mask(tmp_path):
    study = make_study(tmp_path, "s1", modalities=("t1",))
    organ = toy_organ(crop="roi_mask")
    with pytest.raises(VolumeError, match=r"study 's1': organ config 'toy' crops to a region-of-interest mask"):
        preprocess_study(study, organ)
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[5:15, 5:15, 5:10] = 1
    study.roi_mask = write_nifti(tmp_path / "s1" / "mask.nii.gz", mask)
    out = preprocess_study(study, organ)
    assert torch.equal(out["images"], preprocess_volumes(study.modalities, organ, roi_mask=study.roi_mask)["images"])

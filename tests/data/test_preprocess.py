import nibabel as nib
import numpy as np
import pytest
import torch

from medmap.data.preprocess import preprocess_study, preprocess_volumes
from medmap.errors import StudyListError, VolumeError
from tests.data.helpers import LPS_AFFINE, SHAPE, head_volume, make_study, toy_organ, write_nifti


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

"""Lesion-level input: boxes in the study list, per-modality patches, validation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmap.data.cache import PreprocessCache
from medmap.data.lesion import cut_lesion_patch, world_box
from medmap.data.preprocess import preprocess_study, preprocess_volumes
from medmap.data.studylist import LesionBox, Study, read_study_list
from medmap.data.validate import validate_study_list
from medmap.errors import StudyListError, VolumeError
from tests.helpers.volumes import write_list, write_nifti

LESION_CENTRE_MM = np.array([6.0, -4.0, 10.0])
LESION_RADIUS_MM = 9.0


def organ(**overrides):
    from medmap.config import OrganConfig

    d = dict(name="toyliver", modalities=["t2", "art", "ven"], classes=["cyst", "hcc"], spacing=(2.0, 2.0, 2.0),
             roi_size=(16, 16, 12), crop="lesion_box", margin_mm=(8.0, 8.0, 8.0))
    d.update(overrides)
    return OrganConfig(**d)


def scan(affine: np.ndarray, shape: tuple[int, int, int], lesion: float, liver: float = 100.0, seed: int = 0) -> np.ndarray:
    """A liver-like volume (value ``liver``) with a ball of ``lesion`` at LESION_CENTRE_MM, noise added."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = (affine[:3, :3] @ ijk.T).T + affine[:3, 3]
    ball = (np.linalg.norm(xyz - LESION_CENTRE_MM, axis=1) < LESION_RADIUS_MM).reshape(shape)
    rng = np.random.default_rng(seed)
    return np.where(ball, lesion, liver).astype(np.float32) + rng.normal(0, 1.0, shape).astype(np.float32)


def voxel_box(affine: np.ndarray) -> list[int]:
    """The inclusive voxel box of the lesion ball on a grid."""
    lo, hi = LESION_CENTRE_MM - LESION_RADIUS_MM, LESION_CENTRE_MM + LESION_RADIUS_MM
    corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    vox = (np.linalg.inv(affine) @ corners.T).T[:, :3]
    return [int(v) for v in np.round(vox.min(0))] + [int(v) for v in np.round(vox.max(0))]


# Three grids: RAS 2 mm, LPS 1.5 x 1.5 x 3 mm shifted, and a coarse 3 mm grid.
GRIDS = {
    "t2": (np.diag([2.0, 2.0, 2.0, 1.0]) + np.array([[0, 0, 0, -40], [0, 0, 0, -40], [0, 0, 0, -30], [0, 0, 0, 0]]), (40, 40, 30)),
    "art": (np.array([[-1.5, 0, 0, 45.0], [0, -1.5, 0, 40.0], [0, 0, 3.0, -25.0], [0, 0, 0, 1]]), (60, 56, 20)),
    "ven": (np.diag([3.0, 3.0, 3.0, 1.0]) + np.array([[0, 0, 0, -36], [0, 0, 0, -39], [0, 0, 0, -33], [0, 0, 0, 0]]), (26, 26, 22)),
}
CONTRAST = {"t2": 300.0, "art": 200.0, "ven": 50.0}  # lesion / liver = 3, 2, 0.5


def lesion_study(root: Path, study_id: str = "s1", space: str = "voxel") -> Study:
    paths, boxes = {}, {}
    for m, (affine, shape) in GRIDS.items():
        paths[m] = write_nifti(root / study_id / f"{m}.nii.gz", scan(affine, shape, CONTRAST[m]), affine)
        boxes[m] = voxel_box(affine)
    if space == "world":
        box = LesionBox("world", box=tuple([*(LESION_CENTRE_MM - LESION_RADIUS_MM), *(LESION_CENTRE_MM + LESION_RADIUS_MM)]))
    else:
        box = LesionBox("voxel", boxes={m: tuple(float(v) for v in b) for m, b in boxes.items()})
    return Study(study_id, f"P-{study_id}", "toyliver", paths, label="cyst", lesion_box=box)


def test_each_modality_is_cut_around_its_own_box_on_its_own_grid(tmp_path):
    out = preprocess_study(lesion_study(tmp_path), organ())
    images = out["images"].numpy()
    assert images.shape == (3, 16, 16, 12) and out["present"].all()
    centre = images[:, 6:10, 6:10, 4:8].mean(axis=(1, 2, 3))
    rim = images[:, :2].mean(axis=(1, 2, 3))
    # relative to the tissue around the box: lesion/liver - 1 = +2, +1, -0.5 on every grid
    np.testing.assert_allclose(centre, [2.0, 1.0, -0.5], atol=0.15)
    np.testing.assert_allclose(rim, 0.0, atol=0.05)


def test_world_box_gives_the_same_patch_as_voxel_boxes(tmp_path):
    a = preprocess_study(lesion_study(tmp_path / "v"), organ())["images"].numpy()
    b = preprocess_study(lesion_study(tmp_path / "w", space="world"), organ())["images"].numpy()
    # voxel boxes cover whole voxels, so they are up to half a voxel larger: compare inside the lesion
    np.testing.assert_allclose(a[:, 6:10, 6:10, 5:7], b[:, 6:10, 6:10, 5:7], atol=0.2)


def test_patch_axes_are_ras_whatever_the_file(tmp_path):
    affine, shape = GRIDS["art"]  # LPS file
    data = scan(affine, shape, 200.0)
    marker = LESION_CENTRE_MM + np.array([5.0, 0.0, 0.0])  # 5 mm to the patient's left (+x in RAS)
    ijk = np.round(np.linalg.inv(affine) @ np.append(marker, 1.0))[:3].astype(int)
    data[ijk[0], ijk[1], max(ijk[2] - 1, 0) : ijk[2] + 2] = 1000.0
    cut = cut_lesion_patch(nib.Nifti1Image(data, affine), voxel_box(affine), "voxel", (8, 8, 8), (16, 16, 12))
    hot = np.unravel_index(np.argmax(cut.image), cut.image.shape)
    assert hot[0] > 8  # the upper half of RAS x
    assert np.all(np.diag(cut.affine)[:3] > 0)


def test_already_cut_patches_of_any_size(tmp_path):
    paths = {}
    for m, shape in (("t2", (30, 28, 9)), ("art", (21, 25, 7))):
        affine = np.diag([1.0, 1.0, 4.0, 1.0])
        centre = (np.array(shape) - 1) / 2
        ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
        ball = np.linalg.norm((ijk - centre) * [1, 1, 4], axis=-1) < 5
        paths[m] = write_nifti(tmp_path / f"{m}.nii.gz", np.where(ball, 300.0, 100.0).astype(np.float32), affine)
    out = preprocess_volumes(paths, organ(crop="patch", margin_mm=(6.0, 6.0, 8.0)))
    assert out["present"].tolist() == [True, True, False]
    np.testing.assert_allclose(out["images"][:2, 7:9, 7:9, 5:7].mean(axis=(1, 2, 3)).numpy(), [2.0, 2.0], atol=0.1)


def test_missing_or_bad_boxes_are_specific_errors(tmp_path):
    study = lesion_study(tmp_path)
    with pytest.raises(VolumeError, match="no box was given"):
        preprocess_volumes(study.modalities, organ())
    partial = LesionBox("voxel", boxes={"t2": study.lesion_box.boxes["t2"]})
    with pytest.raises(VolumeError, match=r"art\.nii\.gz: no lesion box for modality 'art'"):
        preprocess_volumes(study.modalities, organ(), lesion_box=partial)
    outside = LesionBox("voxel", box=(0, 0, 0, 80, 10, 10))
    with pytest.raises(VolumeError, match=r"t2\.nii\.gz: lesion box .* lies outside the volume"):
        preprocess_volumes(study.modalities, organ(), lesion_box=outside)


def test_the_box_is_part_of_the_cache_key(tmp_path):
    study = lesion_study(tmp_path)
    cache = PreprocessCache(tmp_path / "cache")
    a = preprocess_study(study, organ(), cache=cache)
    shifted = LesionBox("voxel", boxes={m: (b[0] + 2, b[1], b[2], b[3] + 2, b[4], b[5]) for m, b in study.lesion_box.boxes.items()})
    b = preprocess_volumes(study.modalities, organ(), cache=cache, lesion_box=shifted)
    assert cache.misses == 2 and not np.allclose(a["images"], b["images"])
    again = preprocess_study(study, organ(), cache=cache)
    assert cache.hits == 1 and np.array_equal(again["images"], a["images"])


def test_voxel_box_world_extent_covers_whole_voxels():
    lo, hi = world_box((2, 3, 4, 2, 3, 4), "voxel", np.diag([2.0, 2.0, 3.0, 1.0]))
    np.testing.assert_allclose(lo, [3.0, 5.0, 10.5])
    np.testing.assert_allclose(hi, [5.0, 7.0, 13.5])


@pytest.mark.parametrize(
    "box, message",
    [
        ({"space": "pixel", "box": [0, 0, 0, 1, 1, 1]}, "space' must be one of voxel, world"),
        ({"space": "voxel"}, "exactly one of 'box'"),
        ({"space": "voxel", "box": [0, 0, 0, 1, 1, 1], "boxes": {}}, "exactly one of 'box'"),
        ({"space": "voxel", "box": [0, 0, 0, 1, 1]}, "six finite numbers"),
        ({"space": "voxel", "box": [5, 0, 0, 1, 1, 1]}, "minimum must not exceed"),
        ({"space": "voxel", "boxes": {"flair": [0, 0, 0, 1, 1, 1]}}, "does not list: flair"),
        ({"space": "voxel", "box": [0, 0, 0, 1, 1, 1], "note": 1}, "unknown key"),
    ],
)
def test_malformed_lesion_boxes_name_the_line(tmp_path, box, message):
    line = {"study_id": "s", "patient_id": "p", "organ": "liver", "modalities": {"t2wi": "a.nii.gz"}, "lesion_box": box}
    path = tmp_path / "list.jsonl"
    path.write_text(json.dumps(line) + "\n")
    with pytest.raises(StudyListError, match=message) as err:
        read_study_list(path)
    assert f"{path}:1" in str(err.value)


def test_lesion_box_round_trips_through_the_study_list(tmp_path):
    study = lesion_study(tmp_path)
    path = write_list(tmp_path, [study])
    back = read_study_list(path)[0]
    assert back.lesion_box == study.lesion_box


def test_validate_accepts_different_grids_with_boxes_and_checks_the_boxes(tmp_path):
    good = lesion_study(tmp_path, "good")
    bad = lesion_study(tmp_path, "bad")
    boxes = dict(bad.lesion_box.boxes)
    boxes["art"] = (0.0, 0.0, 0.0, 99.0, 10.0, 10.0)
    bad.lesion_box = LesionBox("voxel", boxes=boxes)
    uncovered = lesion_study(tmp_path, "uncovered")
    uncovered.lesion_box = LesionBox("voxel", boxes={"t2": uncovered.lesion_box.boxes["t2"]})
    nobox = lesion_study(tmp_path, "nobox")
    nobox.lesion_box = None
    path = write_list(tmp_path, [good, bad, uncovered, nobox])
    problems = [str(p) for p in validate_study_list(path, organ_configs=[organ()])]
    assert not [p for p in problems if "'good'" in p]
    assert any("'bad'" in p and "modality 'art'" in p and "lies outside the volume" in p for p in problems)
    assert any("'uncovered'" in p and "no box for modality 'art', 'ven'" in p for p in problems)
    assert any("'nobox'" in p and "has no 'lesion_box'" in p for p in problems)

import json

import numpy as np
import pytest

from medmap.data.validate import check_same_grid, check_volume, validate_study_list
from medmap.errors import VolumeError
from tests.helpers.volumes import LPS_AFFINE, head_volume, make_study, toy_organ, write_list, write_nifti, write_raw_nifti


def test_good_volume_is_returned_as_float32_3d(tmp_path):
    path = write_nifti(tmp_path / "v.nii.gz", head_volume()[..., None])  # (X, Y, Z, 1) is accepted
    img = check_volume(path)
    assert img.shape == (40, 36, 20)
    assert img.get_fdata(dtype=np.float32).dtype == np.float32
    np.testing.assert_allclose(img.affine, LPS_AFFINE)


def _truncated(tmp_path, suffix):
    good = write_nifti(tmp_path / f"good{suffix}", head_volume())
    raw = good.read_bytes()
    bad = tmp_path / f"bad{suffix}"
    bad.write_bytes(raw[: len(raw) // 2])
    return bad


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p / "absent.nii.gz", "file not found"),
        (lambda p: (p / "text.nii").write_text("hello") and p / "text.nii", "cannot be read as NIfTI"),
        (lambda p: _truncated(p, ".nii.gz"), "truncated or corrupt"),
        (lambda p: _truncated(p, ".nii"), "truncated or corrupt"),
        (lambda p: write_nifti(p / "4d.nii.gz", np.stack([head_volume(), head_volume(1)], -1)), "not a 3D volume"),
        (lambda p: write_nifti(p / "2d.nii.gz", head_volume()[:, :, :1]), "single-voxel axis"),
        (lambda p: write_nifti(p / "const.nii.gz", np.full((8, 8, 8), 7.0, np.float32)), "constant (every voxel is 7)"),
        (lambda p: write_raw_nifti(p / "nanaff.nii", head_volume(), np.diag([np.nan, 1.0, 1.0, 1.0])), "NaN or infinite entries"),
        (lambda p: write_raw_nifti(p / "sing.nii", head_volume(), np.diag([0.0, 1.0, 1.0, 1.0])), "affine is singular"),
    ],
)
def test_bad_volumes_have_specific_messages(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(VolumeError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        check_volume(path)
    assert str(path.name) in str(err.value)


def _header_only(path, shape, zooms=(1.0, 1.0, 1.0), codes=(1, 1)):
    import gzip

    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(np.float32)
    hdr.set_zooms(zooms)
    hdr["qform_code"], hdr["sform_code"] = codes
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\0" * 4 + np.zeros(min(int(np.prod(shape)), 1000), "<f4").tobytes()
    path.write_bytes(gzip.compress(raw) if path.name.endswith(".gz") else raw)
    return path


def test_header_size_is_checked_before_reading_voxels(tmp_path, monkeypatch):
    import tracemalloc

    path = _header_only(tmp_path / "huge.nii.gz", (1400, 1400, 1400))
    tracemalloc.start()
    with pytest.raises(VolumeError, match="more than the limit") as err:
        check_volume(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 50e6 and "huge.nii.gz" in str(err.value) and "\n" not in str(err.value)
    monkeypatch.setenv("MEDMAP_MAX_VOXELS", str(10**9))  # the limit is configurable; then the file is too short
    with pytest.raises(VolumeError, match="truncated"):
        check_volume(_header_only(tmp_path / "short.nii", (600, 600, 600)))


def test_zero_voxel_size_without_sform_or_qform_is_rejected(tmp_path):
    path = _header_only(tmp_path / "z.nii", (8, 8, 8), zooms=(0.0, 1.0, 1.0), codes=(0, 0))
    with pytest.raises(VolumeError, match="no sform/qform"):
        check_volume(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_voxels(tmp_path, bad):
    data = head_volume()
    data[1, 2, 3] = bad
    data[4, 5, 6] = bad
    with pytest.raises(VolumeError, match=r"2 voxel\(s\) are NaN or infinite"):
        check_volume(write_nifti(tmp_path / "v.nii.gz", data))


def test_same_grid_rule():
    shape = (10, 10, 10)
    near = LPS_AFFINE.copy()
    near[0, 3] += 0.01  # 0.7% of a 1.5 mm voxel: the same grid
    check_same_grid({"t1": (shape, LPS_AFFINE), "t2": (shape, near)})
    far = LPS_AFFINE.copy()
    far[:3, :3] *= 1.1  # a different voxel size
    with pytest.raises(VolumeError, match="'t1' and 't2' are not on the same voxel grid .*mm apart"):
        check_same_grid({"t1": (shape, LPS_AFFINE), "t2": (shape, far)})
    with pytest.raises(VolumeError, match=r"shape \(10, 10, 10\) vs \(10, 10, 11\)"):
        check_same_grid({"t1": (shape, LPS_AFFINE), "t2": ((10, 10, 11), LPS_AFFINE)})


def test_valid_list_has_no_problems(tmp_path):
    studies = [make_study(tmp_path, f"s{i}", seed=i, split="train") for i in range(2)]
    path = write_list(tmp_path, studies)
    assert validate_study_list(path, [toy_organ()]) == []


def test_every_problem_is_reported_with_its_line(tmp_path):
    organ = toy_organ(min_modalities=2)
    good = make_study(tmp_path, "good", patient_id="P1", split="train")
    one = make_study(tmp_path, "one", modalities=("t1",))
    lines = [
        json.dumps(good.to_json()),  # 1: fine
        "{not json",  # 2
        json.dumps({"study_id": "x", "organ": "toy", "modalities": {"t1": "a.nii"}}),  # 3: no patient_id
        json.dumps({**good.to_json(), "study_id": "liverish", "organ": "kidney"}),  # 4
        json.dumps({**good.to_json(), "study_id": "dwi", "modalities": {**good.to_json()["modalities"], "dwi": "x.nii"}}),  # 5
        json.dumps({**good.to_json(), "study_id": "lab", "label": "cancer"}),  # 6
        json.dumps(one.to_json()),  # 7: 1 < min_modalities 2
        json.dumps(good.to_json()),  # 8: duplicate id
        json.dumps({**good.to_json(), "study_id": "leak", "split": "test"}),  # 9: P1 also in train
        json.dumps({**good.to_json(), "study_id": "gone", "modalities": {"t1": "nope.nii.gz", "t2": good.to_json()["modalities"]["t2"]}}),  # 10
    ]
    # 11: modalities on different grids
    shifted = LPS_AFFINE.copy()
    shifted[2, 3] += 9.0
    write_nifti(tmp_path / "grid" / "t2.nii.gz", head_volume(seed=5), shifted)
    lines.append(json.dumps({**good.to_json(), "study_id": "grid", "modalities": {"t1": str(good.modalities["t1"]), "t2": str(tmp_path / "grid" / "t2.nii.gz")}}))
    # 12: a corrupt file
    raw = good.modalities["t2"].read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(raw[: len(raw) // 3])
    lines.append(json.dumps({**good.to_json(), "study_id": "cut", "modalities": {"t1": str(good.modalities["t1"]), "t2": "cut.nii.gz"}}))
    path = tmp_path / "list.jsonl"
    path.write_text("\n".join(lines) + "\n")

    problems = validate_study_list(path, [organ])
    by_line = {}
    for p in problems:
        by_line.setdefault(p.line, []).append(str(p))
    expect = {
        2: "invalid JSON",
        3: "missing required key(s) patient_id",
        4: "unknown organ 'kidney'",
        5: "unknown modality 'dwi' for organ 'toy'",
        6: "unknown label 'cancer' for organ 'toy'",
        7: "has 1 usable modalities; organ 'toy' needs at least 2",
        8: "duplicate study_id (first on line 1)",
        10: "modality 't1': ",
        11: "not on the same voxel grid",
        12: "truncated or corrupt",
        None: "patient 'P1' appears in several splits (test: leak; train: good, ",
    }
    for line, text in expect.items():
        assert any(text in msg for msg in by_line.get(line, [])), (line, text, by_line.get(line))
    assert 1 not in by_line
    assert any("nope.nii.gz: file not found" in m for m in by_line[10])
    assert all(str(path) in str(p) for p in problems)
    assert "list.jsonl:5: study 'dwi':" in "\n".join(by_line[5])


def test_unknown_organ_without_config_and_builtin_lookup(tmp_path):
    study = make_study(tmp_path, "s1")
    path = write_list(tmp_path, [study])
    problems = validate_study_list(path)  # 'toy' is not built in
    assert len(problems) == 1 and "unknown organ 'toy' (known: brain, liver" in problems[0].message


def test_empty_list(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    assert [p.message for p in validate_study_list(path)] == ["the study list contains no studies"]


def test_non_utf8_study_list_names_the_line(tmp_path):
    from medmap.data.studylist import read_study_list
    from medmap.errors import StudyListError

    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"study_id": "a"}\n{"study_id": "b"}\n{"study_id": "caf\xe9"}\n')
    with pytest.raises(StudyListError, match=r"latin1.jsonl:3: not UTF-8"):
        list(read_study_list(path))


def test_a_builtin_organ_variant_name_is_not_an_organ(tmp_path):
    # brain_4mm.yaml is a CPU-sized variant whose organ is named 'brain'
    study = make_study(tmp_path, "s1", organ="brain_4mm")
    path = write_list(tmp_path, [study])
    problems = validate_study_list(path, check_files=False)
    assert any("unknown organ 'brain_4mm' (known: brain, liver;" in p.message for p in problems)


def test_roi_masks_are_checked(tmp_path):
    """A study's roi_mask is opened, must mark something and lie on the volumes' grid; an organ
    config with crop: roi_mask needs one on every study."""
    from medmap.data.studylist import read_study_list
    from medmap.data.validate import check_roi_mask

    good = make_study(tmp_path, "good", split="train")
    inside = np.zeros((40, 36, 20), dtype=np.uint8)
    inside[5:15, 5:15, 5:10] = 1
    mask = write_nifti(tmp_path / "good" / "mask.nii.gz", inside)
    assert check_roi_mask(mask).shape == (40, 36, 20)
    empty = write_nifti(tmp_path / "empty.nii.gz", np.zeros((40, 36, 20), dtype=np.uint8))
    shifted = LPS_AFFINE.copy()
    shifted[2, 3] += 9.0
    write_nifti(tmp_path / "moved.nii.gz", inside, shifted)  # line 3 names it relative to the list
    row = good.to_json(relative_to=tmp_path)
    lines = [
        {**row, "roi_mask": "good/mask.nii.gz"},  # 1: fine
        {**row, "study_id": "empty", "patient_id": "P2", "roi_mask": str(empty)},  # 2
        {**row, "study_id": "moved", "patient_id": "P3", "roi_mask": "moved.nii.gz"},  # 3
        {**row, "study_id": "none", "patient_id": "P4"},  # 4: no mask, the organ crops to one
        {**row, "study_id": "bad", "patient_id": "P5", "roi_mask": 3},  # 5: not a path
    ]
    path = tmp_path / "list.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    by_line = {}
    for p in validate_study_list(path, [toy_organ(crop="roi_mask")]):
        by_line.setdefault(p.line, []).append(p.message)
    assert 1 not in by_line
    assert any("the mask is empty" in m for m in by_line[2])
    assert any("modalities 't1' and 'roi_mask' are not on the same voxel grid" in m for m in by_line[3])
    assert by_line[4] == ["has no 'roi_mask'; the organ config given for 'toy' crops to one (crop: roi_mask)"]
    assert any("'roi_mask' must be a non-empty string" in m for m in by_line[5])
    lacking = [p for p in validate_study_list(path, [toy_organ(crop="roi_mask")], check_files=False) if p.line == 4]
    assert [p.message for p in lacking] == by_line[4]  # a structural problem: reported without opening files
    # a foreground-crop organ does not need masks
    path.write_text(json.dumps(lines[0]) + "\n" + json.dumps(lines[3]) + "\n")
    assert validate_study_list(path, [toy_organ()]) == []
    # the path resolves against the list's folder and survives a write/read round trip
    study = read_study_list(path)[0]
    assert study.roi_mask == tmp_path / "good" / "mask.nii.gz"
    again = write_list(tmp_path / "copy", [study])
    assert read_study_list(again)[0].roi_mask.resolve() == mask.resolve()


def test_gzip_truncation_is_found_from_the_header_and_multi_member_files_pass(tmp_path):
    import gzip

    from medmap.data.validate import check_volume_header

    good = write_nifti(tmp_path / "good.nii.gz", head_volume())
    raw = gzip.decompress(good.read_bytes())
    two = tmp_path / "two.nii.gz"  # a valid file in two gzip members (as some tools write)
    two.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    check_volume_header(two)
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VolumeError, match="cut.nii.gz: truncated or corrupt"):
        check_volume_header(cut)

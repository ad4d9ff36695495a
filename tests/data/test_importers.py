"""Dataset importers (medmap.data.importers, ``medmap import``) on tiny trees in each layout."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medmap.cli.main import main
from medmap.config import load_organ_config
from medmap.data.importers import detect_layout, import_brats, import_lld_mmri
from medmap.data.importers import brats as brats_mod
from medmap.data.importers import lld_mmri
from medmap.data.studylist import read_study_list, write_study_list
from medmap.data.validate import validate_study_list
from medmap.errors import StudyListError

PHASES = ["T2WI", "DWI", "In Phase", "Out Phase", "C-pre", "C+A", "C+V", "C+Delay"]
LIVER_MODS = ["t2wi", "dwi", "t1_in", "t1_out", "pre", "arterial", "venous", "delay"]


def nifti(path: Path, seed: int = 0, shape: tuple[int, int, int] = (8, 8, 4)) -> Path:
    """A tiny non-constant volume."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(seed).random(shape).astype(np.float32) + 1.0
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(path))
    return path


def series_entry(study: str, series: str, phase: str, lesions: dict) -> dict:
    return {"studyUID": study, "seriesUID": series, "phase": phase, "pixel_spacing": [0.7, 0.7],
            "slice_thickness": 6.0, "annotation": {"num_targets": len(lesions), "lesion": lesions}}


def lesion(category, box=(1, 2, 0, 4, 5, 2)) -> dict:
    keys = ["x_min", "y_min", "z_min", "x_max", "y_max", "z_max"]
    return {"category": category, "bbox": {"2D_box": [], "3D_box": dict(zip(keys, box))}}


def lld_volumes(root: Path, annotation: dict | None = None) -> Path:
    """Two patients: P1 with two lesions on all 8 phases (HCC and unlabelled), P2 with a cyst on 2 phases."""
    p1 = [series_entry("S1", f"s1-{k}", ph, {"0": lesion("Hepatocellular_carcinoma", (1, 2, 0, 4 + k % 2, 5, 2)),
                                             "1": lesion(-1, (0, 0, 1, 7, 7, 3))})
          for k, ph in enumerate(PHASES)]
    p2 = [series_entry("S9", "s9-a", "C+A", {"0": lesion(4)}),
          series_entry("S9", "s9-b", "T2WI", {"0": lesion("Hepatic_cyst", [2, 2, 1, 3, 3, 1])})]
    annotation = annotation or {"Annotation_info": {"P1": p1, "P2": p2}}
    info = annotation.get("Annotation_info", annotation)
    for patient, entries in info.items():
        for k, e in enumerate(entries):
            if "studyUID" in e and "seriesUID" in e:
                nifti(root / "images" / patient / e["studyUID"] / f"{e['seriesUID']}.nii.gz", seed=k)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    (root / "labels" / "Annotation.json").write_text(json.dumps(annotation))
    return root


def lld_patches(root: Path, labels: str = "MR1 6\nMR2_0 4\nMR2_1 0\n") -> Path:
    """MR1 (HCC), MR2 with two lesions, MR3 absent from labels.txt; MR3 lacks two phases."""
    ds = root / "classification_dataset"
    for case in ["MR1", "MR2_0", "MR2_1", "MR3"]:
        for k, ph in enumerate(PHASES if case != "MR3" else PHASES[2:]):
            nifti(ds / "images" / case / f"{ph}.nii.gz", seed=k, shape=(6 + k % 3, 6, 4))
    (ds / "labels").mkdir(parents=True)
    (ds / "labels" / "labels.txt").write_text(labels)
    return root


def brats2021(root: Path, cases=("00000", "00002")) -> Path:
    for cid in cases:
        for k, seq in enumerate(["t1", "t1ce", "t2", "flair", "seg"]):
            nifti(root / f"BraTS2021_{cid}" / f"BraTS2021_{cid}_{seq}.nii.gz", seed=k)
    return root


def brats2023(root: Path) -> Path:
    for case in ["BraTS-GLI-00005-000", "BraTS-GLI-00005-001", "BraTS-GLI-00007-000"]:
        seqs = ["t1n", "t1c", "t2w", "t2f", "seg"] if case != "BraTS-GLI-00007-000" else ["t2f", "seg"]
        for k, seq in enumerate(seqs):
            nifti(root / "TrainingData" / case / f"{case}-{seq}.nii.gz", seed=k)
    return root


def ixi(root: Path) -> Path:
    for subject, contrasts in [("IXI002-Guys-0828", ["T1", "T2", "PD"]), ("IXI012-HH-1211", ["T1"]),
                               ("IXI013-HH-1212", ["PD"])]:
        for k, c in enumerate(contrasts):
            nifti(root / f"IXI-{c}" / f"{subject}-{c}.nii.gz", seed=k)
    return root


# -- LLD-MMRI, whole volumes ----------------------------------------------------------------


def test_lld_volumes_one_study_per_lesion_with_per_phase_boxes(tmp_path):
    root = lld_volumes(tmp_path / "lld")
    assert detect_layout(root) == ("volumes", root)
    result = import_lld_mmri(root)
    by_id = {s.study_id: s for s in result.studies}
    assert sorted(by_id) == ["P1_0", "P1_1", "P2_0"]
    hcc, unlabelled, cyst = by_id["P1_0"], by_id["P1_1"], by_id["P2_0"]
    assert sorted(hcc.modalities) == sorted(LIVER_MODS)
    assert hcc.modalities["arterial"] == (root / "images/P1/S1/s1-5.nii.gz").resolve()
    assert hcc.label == "hcc" and unlabelled.label is None and cyst.label == "cyst"
    assert {s.patient_id for s in result.studies} == {"P1", "P2"}
    # inclusive voxel boxes, copied unchanged, one per phase on that phase's grid
    assert hcc.lesion_box.space == "voxel"
    assert hcc.lesion_box.boxes["t2wi"] == (1, 2, 0, 4, 5, 2) and hcc.lesion_box.boxes["dwi"] == (1, 2, 0, 5, 5, 2)
    assert cyst.lesion_box.boxes == {"arterial": (1, 2, 0, 4, 5, 2), "t2wi": (2, 2, 1, 3, 3, 1)}
    assert hcc.meta["series"]["arterial"] == {"uid": "s1-5", "phase": "C+A", "pixel_spacing": [0.7, 0.7],
                                              "slice_thickness": 6.0}
    organ = load_organ_config("liver")
    assert all(m in organ.modalities for s in result.studies for m in s.modalities)
    assert all(s.label in organ.classes for s in result.studies if s.label)


def test_lld_volumes_list_reads_back_and_validates(tmp_path):
    root = lld_volumes(tmp_path / "lld")
    out = write_study_list(import_lld_mmri(root).studies, root / "studies.jsonl")
    assert '"images/P1/S1/s1-0.nii.gz"' in out.read_text()  # relative to the list's folder
    back = {s.study_id: s for s in read_study_list(out)}
    assert back["P1_0"].lesion_box.boxes["venous"] == (1, 2, 0, 4, 5, 2)
    assert back["P1_0"].modalities["venous"] == (root / "images/P1/S1/s1-6.nii.gz").resolve()
    assert validate_study_list(out, ["liver"]) == []


def test_lld_volumes_lenient_keys_and_list_boxes(tmp_path):
    entries = [{"Study_Instance_UID": "S", "series-uid": "x", "Phase": "c+delay",
                "Annotation": {"0": {"label": "FOCAL_NODULAR_HYPERPLASIA", "bbox": [0, 0, 0, 1, 1, 1]}}}]
    root = lld_volumes(tmp_path / "lld", {"MR7": entries})
    nifti(root / "images/MR7/S/x.nii.gz")
    (study,) = import_lld_mmri(root, layout="volumes").studies
    assert study.label == "fnh" and study.lesion_box.boxes == {"delay": (0, 0, 0, 1, 1, 1)}


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"studyUID": "S", "seriesUID": "x", "annotation": {"lesion": {"0": lesion(1)}}}, "no phase"),
        ({"studyUID": "S", "seriesUID": "x", "phase": "T1 mapping", "annotation": {"lesion": {"0": lesion(1)}}},
         "unknown phase"),
        ({"studyUID": "S", "seriesUID": "x", "phase": "DWI",
          "annotation": {"lesion": {"0": {"category": 1, "bbox": [1, 2, 3, 4, 5]}}}}, "six"),
        ({"studyUID": "S", "seriesUID": "x", "phase": "DWI",
          "annotation": {"lesion": {"0": {"category": 1, "bbox": {"x_min": 1}}}}}, "x_min"),
        ({"studyUID": "S", "seriesUID": "x", "phase": "DWI", "annotation": {"lesion": {"0": lesion("Angioma")}}},
         "unknown category"),
        ({"studyUID": "S", "seriesUID": "x", "phase": "DWI", "annotation": {"lesion": {"0": lesion(7)}}},
         "unknown category"),
        ({"studyUID": "S", "seriesUID": "missing", "phase": "DWI", "annotation": {"lesion": {"0": lesion(1)}}},
         "series file not found"),
    ],
)
def test_lld_volumes_malformed_entries_name_the_patient(tmp_path, entry, message):
    root = lld_volumes(tmp_path / "lld", {"MR42": [dict(entry)]})
    if entry.get("seriesUID") == "missing":
        (root / "images/MR42/S/missing.nii.gz").unlink()
    with pytest.raises(StudyListError, match=message) as err:
        import_lld_mmri(root)
    assert "patient 'MR42'" in str(err.value)


def test_lld_volumes_conflicting_phases_name_the_lesion(tmp_path):
    twice = [series_entry("S", "a", "C+A", {"0": lesion(1)}), series_entry("S", "b", "C+A", {"0": lesion(1)})]
    with pytest.raises(StudyListError, match=r"MR5.*lesion '0'.*two series"):
        import_lld_mmri(lld_volumes(tmp_path / "a", {"MR5": twice}))
    disagree = [series_entry("S", "a", "C+A", {"0": lesion(1)}), series_entry("S", "b", "C+V", {"0": lesion(6)})]
    with pytest.raises(StudyListError, match=r"patient 'MR6', lesion '0'.*disagree"):
        import_lld_mmri(lld_volumes(tmp_path / "b", {"MR6": disagree}))


# -- LLD-MMRI, patches ----------------------------------------------------------------------


def test_lld_patches_group_lesions_by_patient_and_keep_unlabelled(tmp_path):
    root = lld_patches(tmp_path / "lld")
    assert detect_layout(root) == ("patches", root / "classification_dataset")
    result = import_lld_mmri(root)
    by_id = {s.study_id: s for s in result.studies}
    assert sorted(by_id) == ["MR1", "MR2_0", "MR2_1", "MR3"]
    assert {k: s.patient_id for k, s in by_id.items()} == {"MR1": "MR1", "MR2_0": "MR2", "MR2_1": "MR2", "MR3": "MR3"}
    assert {k: s.label for k, s in by_id.items()} == {"MR1": "hcc", "MR2_0": "cyst", "MR2_1": "hemangioma",
                                                      "MR3": None}
    assert sorted(by_id["MR1"].modalities) == sorted(LIVER_MODS)
    assert sorted(by_id["MR3"].modalities) == sorted(LIVER_MODS[2:])
    assert by_id["MR1"].modalities["arterial"].name == "C+A.nii.gz"
    assert all(s.lesion_box is None for s in result.studies)


def test_lld_patches_errors_name_the_case(tmp_path):
    root = lld_patches(tmp_path / "a")
    nifti(root / "classification_dataset/images/MR1/T1 map.nii.gz")
    with pytest.raises(StudyListError, match=r"patch case 'MR1'.*unknown phase"):
        import_lld_mmri(root)
    root = lld_patches(tmp_path / "b")
    (root / "classification_dataset/images/MR9").mkdir()
    with pytest.raises(StudyListError, match=r"patch case 'MR9'.*no phase volume"):
        import_lld_mmri(root)
    root = lld_patches(tmp_path / "c", labels="MR1 6\nMR2_0 twelve\n")
    with pytest.raises(StudyListError, match=r"labels.txt:2: case 'MR2_0': unknown category"):
        import_lld_mmri(root)


def test_lld_layout_not_found(tmp_path):
    with pytest.raises(StudyListError, match="not an LLD-MMRI folder"):
        import_lld_mmri(tmp_path)


# -- BraTS and IXI --------------------------------------------------------------------------


def test_brats_2021_and_2023_naming(tmp_path):
    r21 = import_brats(brats2021(tmp_path / "b21"))
    assert r21.layout == "brats2021"
    s = r21.studies[0]
    assert (s.study_id, s.patient_id, s.label) == ("BraTS2021_00000", "BraTS2021_00000", "tumour")
    assert sorted(s.modalities) == ["flair", "t1", "t1ce", "t2"]  # seg left out
    assert s.modalities["t1ce"].name == "BraTS2021_00000_t1ce.nii.gz"

    r23 = import_brats(brats2023(tmp_path / "b23"))
    by_id = {s.study_id: s for s in r23.studies}
    a = by_id["BraTS-GLI-00005-000"]
    assert {m: p.name.rsplit("-", 1)[1] for m, p in a.modalities.items()} == {
        "t1": "t1n.nii.gz", "t1ce": "t1c.nii.gz", "t2": "t2w.nii.gz", "flair": "t2f.nii.gz"}
    assert a.patient_id == by_id["BraTS-GLI-00005-001"].patient_id == "BraTS-GLI-00005"  # time points
    assert sorted(by_id["BraTS-GLI-00007-000"].modalities) == ["flair"]  # missing sequences kept missing
    brain = load_organ_config("brain")
    assert all(s.label in brain.classes and set(s.modalities) <= set(brain.modalities) for s in r23.studies)


def test_brats_with_ixi_normals(tmp_path):
    result = import_brats(brats2021(tmp_path / "b21", cases=("00000",)), normal_root=ixi(tmp_path / "ixi"))
    normals = {s.study_id: s for s in result.studies if s.label == "normal"}
    assert sorted(normals) == ["IXI002-Guys-0828", "IXI012-HH-1211"]  # the PD-only subject is skipped
    assert sorted(normals["IXI002-Guys-0828"].modalities) == ["t1", "t2"]  # PD dropped
    assert normals["IXI002-Guys-0828"].patient_id == "IXI002"
    assert sorted(normals["IXI012-HH-1211"].modalities) == ["t1"]
    assert any("PD" in n for n in result.notes) and any("IXI013-HH-1212" in n for n in result.notes)


def test_brats_errors_name_the_case(tmp_path):
    root = brats2021(tmp_path / "b", cases=("00000",))
    only_seg = root / "BraTS2021_00009"
    nifti(only_seg / "BraTS2021_00009_seg.nii.gz")
    with pytest.raises(StudyListError, match="BraTS case 'BraTS2021_00009'.*none of the sequences"):
        import_brats(root)
    with pytest.raises(StudyListError, match="no BraTS case folders"):
        import_brats(ixi(tmp_path / "ixi_only"))
    with pytest.raises(StudyListError, match="no IXI T1 or T2"):
        brats_mod.ixi_studies(brats2021(tmp_path / "c"))


def test_category_and_phase_maps_match_the_liver_config():
    organ = load_organ_config("liver")
    assert set(lld_mmri.PHASES.values()) == set(organ.modalities)
    assert set(lld_mmri.CATEGORIES.values()) == set(lld_mmri.LLD_LABELS) == set(organ.classes)
    assert {brats_mod.TUMOUR, brats_mod.NORMAL} == set(load_organ_config("brain").classes)


# -- the command ----------------------------------------------------------------------------


def test_import_cli_writes_lists_with_splits(tmp_path, capsys):
    root = lld_volumes(tmp_path / "lld")
    out = tmp_path / "lists" / "liver.jsonl"
    args = ["import", "lld-mmri", str(root), "--out", str(out), "--split", "train=0.5,val=0.25,test=0.25", "--seed", "3"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "hcc: 1" in text and "cyst: 1" in text and "unlabelled: 1" in text
    assert f"medmap validate {out} --organ-config liver" in text
    studies = read_study_list(out)
    assert all(s.split is not None for s in studies)
    assert len({s.split for s in studies if s.patient_id == "P1"}) == 1
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    bad = ["import", "lld-mmri", str(root), "--out", str(tmp_path / "bad.jsonl"), "--split", "train=0.7,val=0.2"]
    assert main(bad) == 2 and "sum to 1" in capsys.readouterr().err

    out2 = tmp_path / "patches.jsonl"
    assert main(["import", "lld-mmri", str(lld_patches(tmp_path / "p")), "--out", str(out2)]) == 0
    text = capsys.readouterr().out
    assert "crop: patch" in text and "unlabelled: 1" in text
    assert all(s.split is None for s in read_study_list(out2))

    out3 = tmp_path / "brain.jsonl"
    assert main(["import", "brats", str(brats2021(tmp_path / "b")), "--normal", str(ixi(tmp_path / "ixi")),
                 "--out", str(out3)]) == 0
    text = capsys.readouterr().out
    assert "normal: 2" in text and "tumour: 2" in text and f"medmap validate {out3}" in text
    assert len(read_study_list(out3)) == 4

    assert main(["import", "brats", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "BraTS folder not found" in capsys.readouterr().err

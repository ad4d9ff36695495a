import json

import yaml

from medmap.cli.main import main
from tests.helpers.volumes import head_volume, make_study, toy_organ, write_list, write_nifti


def _organ_yaml(tmp_path):
    path = tmp_path / "toy.yaml"
    d = toy_organ().to_dict()
    path.write_text(yaml.safe_dump(d))
    return path


def test_valid_list_exits_0_with_one_line_summary(tmp_path, capsys):
    studies = [make_study(tmp_path, f"s{i}", seed=i) for i in range(2)]
    path = write_list(tmp_path, studies)
    assert main(["validate", str(path), "--organ-config", str(_organ_yaml(tmp_path))]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["OK: 2 studies (toy: 2), 2 patients, 6 volumes (all readable)"]


def test_problems_exit_1_one_line_each(tmp_path, capsys):
    good = make_study(tmp_path, "s0")
    data = head_volume()
    data[0, 0, 0] = float("nan")
    write_nifti(good.modalities["t2"], data)
    path = write_list(tmp_path, [good])
    with open(path, "a") as f:
        f.write("{broken\n")
    assert main(["validate", str(path), "--organ-config", str(_organ_yaml(tmp_path))]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("1 voxel(s) are NaN or infinite") and ":1: study 's0': modality 't2'" in lines[0]
    assert ":2: invalid JSON" in lines[1]
    assert lines[2] == f"2 problem(s) found in {path}"


def test_unknown_organ_without_config_and_missing_list(tmp_path, capsys):
    path = write_list(tmp_path, [make_study(tmp_path, "s0")])
    assert main(["validate", str(path)]) == 1
    assert "unknown organ 'toy'" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "absent.jsonl")]) == 2
    assert "study list not found" in capsys.readouterr().err
    assert main(["validate", str(path), "--organ-config", "nosuchorgan"]) == 2


def test_no_files_mode_skips_volumes(tmp_path, capsys):
    line = {"study_id": "a", "patient_id": "p", "organ": "brain", "modalities": {"t1": "missing.nii.gz"}, "label": "tumour"}
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps(line) + "\n")
    assert main(["validate", str(path), "--no-files"]) == 0
    assert "volumes (not opened)" in capsys.readouterr().out
    assert main(["validate", str(path)]) == 1

from collections import defaultdict

from medmap.cli.main import main
from medmap.data.studylist import Study, read_study_list, write_study_list


def _list(tmp_path, n=40, split_first=None):
    studies = [
        Study(f"s{i}", f"P{i // 2}", "brain", {"t1": tmp_path / f"v{i}.nii.gz"}, label=["normal", "tumour"][i // 2 % 2])
        for i in range(n)
    ]
    if split_first:
        studies[0].split = split_first
    return write_study_list(studies, tmp_path / "in.jsonl")


def test_split_cli_writes_a_patient_level_split(tmp_path, capsys):
    src = _list(tmp_path, split_first="test")
    out = tmp_path / "out.jsonl"
    assert main(["split", str(src), "--out", str(out), "--seed", "1", "--fractions", "0.5", "0.25", "0.25"]) == 0
    studies = read_study_list(out)
    per_patient = defaultdict(set)
    for s in studies:
        per_patient[s.patient_id].add(s.split)
    assert all(len(v) == 1 for v in per_patient.values())
    assert per_patient["P0"] == {"test"}  # the given split is kept for the whole patient
    assert studies[0].modalities["t1"] == tmp_path / "v0.nii.gz"
    text = capsys.readouterr().out
    assert "train:" in text and "val:" in text and "test:" in text and f"wrote {out}" in text

    again = tmp_path / "again.jsonl"
    assert main(["split", str(src), "--out", str(again), "--seed", "1", "--fractions", "0.5", "0.25", "0.25"]) == 0
    assert again.read_text() == out.read_text()  # deterministic


def test_split_cli_refuses_to_overwrite_and_bad_fractions(tmp_path, capsys):
    src = _list(tmp_path)
    out = tmp_path / "out.jsonl"
    out.write_text("x")
    assert main(["split", str(src), "--out", str(out)]) == 2
    assert "use --force" in capsys.readouterr().err
    assert main(["split", str(src), "--out", str(out), "--force", "--fractions", "0.9", "0.2", "0.2"]) == 2
    assert "sum to 1" in capsys.readouterr().err

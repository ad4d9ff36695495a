"""``medmap subgroups``: the table printed and written, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from medmap.cli.main import main
from medmap.evaluation.report import write_predictions
from tests.evaluation.test_subgroups import STUDIES


def _write_run(root: Path, name: str, wrong: set[int]) -> Path:
    run = root / name
    probs = np.array([[0.9, 0.1] if (s.label == "normal") != (i in wrong) else [0.1, 0.9] for i, s in enumerate(STUDIES)])
    y = [0 if s.label == "normal" else 1 for s in STUDIES]
    write_predictions(run / "metrics" / "test" / "predictions.csv", [s.study_id for s in STUDIES], y, probs,
                      ["normal", "tumour"])
    return run


def test_command_prints_and_writes_the_table(tmp_path, capsys):
    data = tmp_path / "studies.jsonl"
    data.write_text("".join(json.dumps(s.to_json()) + "\n" for s in STUDIES))
    a, b = _write_run(tmp_path, "medmap_run", {2, 3}), _write_run(tmp_path, "cnn_run", {3})
    out = tmp_path / "subgroups.md"
    assert main(["subgroups", str(a), str(b / "metrics" / "test" / "predictions.csv"), "--data", str(data),
                 "--by", "meta.subtype", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "medmap_run: errors" in printed and "cnn_run: errors" in printed
    assert "| tumour | metastasis | 2 | 2, 0.00 [0.00, 0.66] | 1, 0.50 [" in printed
    assert out.read_text() in printed


def test_command_errors_are_one_line(tmp_path, capsys):
    data = tmp_path / "studies.jsonl"
    data.write_text("".join(json.dumps(s.to_json()) + "\n" for s in STUDIES))
    a = _write_run(tmp_path, "r", set())
    assert main(["subgroups", str(a), "--data", str(data), "--name", "x", "--name", "y"]) == 2
    assert "--name given 2 times for 1 runs" in capsys.readouterr().err
    assert main(["subgroups", str(a), str(a), "--data", str(data)]) == 2
    assert "share the name 'r'" in capsys.readouterr().err

"""Zero-shot classification with a tiny stage-1 run: same numbers as stage 1, evaluate's outputs, errors."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import pytest

from medmap.cli.main import main
from medmap.config import load_config
from medmap.data.studylist import read_study_list, write_study_list
from medmap.engines.pretrain import run_pretraining
from medmap.engines.zeroshot import zero_shot_classify
from medmap.errors import CheckpointError, ConfigError, StudyListError
from tests.helpers.tiny_studies import make_tiny_brain_data


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("zs"), n=10, n_val=3, n_test=2)


@pytest.fixture(scope="module")
def stage1(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = load_config("tiny", "pretrain", [f"data.organs=[{data.parent / 'brain_tiny.yaml'}]", "training.steps=2"])
    run_pretraining(cfg, data, out)
    return out


def test_zero_shot_equals_what_stage_1_computed_on_its_held_out_split(stage1: Path, data: Path, tmp_path: Path) -> None:
    # stage 1 evaluates once, at its end: the numbers in metrics/pretrain_val.json are the last checkpoint's
    ref = json.loads((stage1 / "metrics" / "pretrain_val.json").read_text())["zero_shot"]["brain"]
    m = zero_shot_classify(stage1, data, "brain", split="val", which="last", n_bootstrap=20, out_dir=tmp_path / "zs")
    assert m["n"] == ref["n"] == 3
    assert m["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-9)
    assert m["balanced_accuracy"] == pytest.approx(ref["balanced_accuracy"], abs=1e-9)
    if ref.get("macro_auc") is not None:
        assert m["macro_auc"] == pytest.approx(ref["macro_auc"], abs=1e-9)
    # evaluate's layout: metrics with CIs, report, plots, one prediction line per study
    for f in ("metrics.json", "report.md", "roc.png", "reliability.png", "confusion_matrix.png", "predictions.csv"):
        assert (tmp_path / "zs" / f).is_file(), f
    saved = json.loads((tmp_path / "zs" / "metrics.json").read_text())
    assert saved["balanced_accuracy"] == m["balanced_accuracy"] and "ci" in saved and saved["n_bootstrap"] == 20
    assert saved["context"]["checkpoint"] == "last" and saved["context"]["organ"] == "brain"
    rows = list(csv.DictReader((tmp_path / "zs" / "predictions.csv").open()))
    val_ids = [s.study_id for s in read_study_list(data) if s.split == "val"]
    assert [r["study_id"] for r in rows] == val_ids
    correct = sum(r["label"] == r["predicted"] for r in rows)
    assert correct / len(rows) == pytest.approx(m["accuracy"])
    for r in rows:
        assert sum(float(r[k]) for k in r if k.startswith("p_")) == pytest.approx(1.0, abs=1e-4)
    assert "zero-shot" in (tmp_path / "zs" / "report.md").read_text()


def test_zeroshot_command_writes_the_report_in_the_run(stage1: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    rc = main(["zeroshot", str(stage1), "--data", str(data), "--organ", "brain", "--bootstrap", "10"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "balanced_accuracy" in out and "(n=2)" in out
    assert (stage1 / "metrics" / "zeroshot_brain_test" / "metrics.json").is_file()


def _one_line_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_clear_errors(stage1: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--data", str(data), "--organ", "brain"]
    assert "not a stage-1" in _one_line_error(["zeroshot", str(tmp_path), *base], capsys)
    fake_ft = tmp_path / "ft"
    fake_ft.mkdir()
    (fake_ft / "config.yaml").write_text("organ: brain\nencoder: {arch: cnn_small}\n")
    (fake_ft / "organ.yaml").write_text("name: brain\n")
    assert "not a stage-1" in _one_line_error(["zeroshot", str(fake_ft), *base], capsys)
    err = _one_line_error(["zeroshot", str(stage1), "--data", str(data), "--organ", "liver"], capsys)
    assert "pre-trained on brain" in err and "liver" in err
    unlabelled = data.parent / "unlabelled_test.jsonl"
    write_study_list([dataclasses.replace(s, label=None) if s.split == "test" else s for s in read_study_list(data)],
                     unlabelled)
    err = _one_line_error(["zeroshot", str(stage1), "--data", str(unlabelled), "--organ", "brain"], capsys)
    assert "no labelled brain studies in the test split" in err
    with pytest.raises(CheckpointError):
        zero_shot_classify(tmp_path, data, "brain")
    with pytest.raises(ConfigError):
        zero_shot_classify(stage1, data, "liver")
    with pytest.raises(StudyListError):
        zero_shot_classify(stage1, unlabelled, "brain")

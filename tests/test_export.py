"""``medmap export``: a copied export predicts like the run on a machine without the run; checks on load."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from medmap import __version__
from medmap.cli.main import main
from medmap.engines.evaluate import evaluate_run
from medmap.errors import CheckpointError, ConfigError
from medmap.export import EXPORT_FORMAT_VERSION, _portable_config, export_run
from medmap.inference import load_run
from medmap.utils import sha256_file
from tests.helpers.tiny_studies import make_tiny_brain_data, tiny_finetune_run

TEST_IDS = ["s9", "s10", "s11"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("exp_data"), n=12, n_val=2, n_test=3)


@pytest.fixture(scope="module")
def ft_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tiny_finetune_run(data, tmp_path_factory.mktemp("exp_run") / "run")
    evaluate_run(out, split="test", n_bootstrap=20)  # the model card shows these numbers
    return out


@pytest.fixture(scope="module")
def exported(ft_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("exp_out") / "brain_model"
    assert main(["export", str(ft_run), "--out", str(out)]) == 0
    return out


def _paths(root: Path, sid: str) -> dict[str, Path]:
    return {m.stem.split(".")[0]: m for m in sorted((root / sid).glob("*.nii.gz"))}


def test_a_copied_export_predicts_like_the_run_without_the_run(ft_run: Path, exported: Path, data: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    reference = load_run(ft_run)
    ref = {sid: reference.predict(_paths(data.parent, sid), sid).probabilities for sid in TEST_IDS}
    other = tmp_path / "other_machine"
    copy = shutil.copytree(exported, other / "model")
    # the run folder and the study list (and the organ yaml its config names) are gone on the other machine
    moved_run, moved_data = ft_run.with_name("run_moved"), data.parent.with_name(data.parent.name + "_moved")
    os.replace(ft_run, moved_run)
    os.replace(data.parent, moved_data)
    try:
        predictor = load_run(copy, device="cpu")
        for sid in TEST_IDS:
            got = predictor.predict(_paths(moved_data, sid), sid).probabilities
            assert got == ref[sid], sid  # bit-identical: same weights, same code path
        study = moved_data / "s11"
        assert main(["predict", str(copy), f"t1={study / 't1.nii.gz'}", f"t2={study / 't2.nii.gz'}",
                     "--study-id", "s11", "--no-saliency", "--out", str(tmp_path / "pred")]) == 0
        pred = json.loads((tmp_path / "pred" / "s11_prediction.json").read_text())
        expect = reference.predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"}).probabilities
        assert pred["probabilities"] == pytest.approx(expect, abs=1e-6)
    finally:
        os.replace(moved_run, ft_run)
        os.replace(moved_data, data.parent)
    capsys.readouterr()


def test_export_folder_contents_and_model_card(ft_run: Path, exported: Path) -> None:
    for f in ("model.safetensors", "config.yaml", "organ.yaml", "text_bank.safetensors", "README.md", "export.json",
              "metrics/test.json", "metrics/val.json"):
        assert (exported / f).is_file(), f
    assert not (exported / "checkpoints").exists()
    manifest = json.loads((exported / "export.json").read_text())
    assert manifest["format_version"] == EXPORT_FORMAT_VERSION
    assert manifest["medmap_version"] == __version__ and manifest["torch_version"] == torch.__version__
    assert manifest["weights"]["sha256"] == sha256_file(ft_run / "checkpoints" / "best" / "model.safetensors")
    assert manifest["classes"] == ["normal", "tumour"] and manifest["checkpoint"] == "best"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same versions: no warning
        load_run(exported)
    # the config names no file of the original machine that loading would read
    assert isinstance(yaml.safe_load((exported / "config.yaml").read_text())["encoder"]["arch"], dict)
    arch = _portable_config({"encoder": {"arch": "cnn_small"}})["encoder"]["arch"]
    assert isinstance(arch, dict) and arch["type"] == "cnn"

    card = (exported / "README.md").read_text()
    info = json.loads((ft_run / "run_info.json").read_text())
    test = json.loads((ft_run / "metrics" / "test" / "metrics.json").read_text())
    assert f"{info['n_train']} training and {info['n_val']} validation studies" in card
    assert f"| Balanced accuracy | {test['balanced_accuracy']:.4f} | [{test['ci']['balanced_accuracy'][0]:.4f}, " in card
    assert f"{test['n']} test studies" in card
    for text in ("`normal`", "`tumour`", "`t1`", "`flair`", "16 x 16 x 16 voxels", "2.5 x 2.5 x 2.5 mm",
                 f"medmap {__version__}", f"torch {torch.__version__}", "medmap predict brain_model t1=t1.nii.gz",
                 manifest["weights"]["sha256"]):
        assert text in card, text


def test_tampered_weights_and_a_future_format_fail_clearly(exported: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    bad = shutil.copytree(exported, tmp_path / "tampered")
    w = bytearray((bad / "model.safetensors").read_bytes())
    w[-5] ^= 0xFF  # a flipped bit in the last tensor: still a loadable file, other weights
    (bad / "model.safetensors").write_bytes(bytes(w))
    with pytest.raises(CheckpointError, match="SHA-256 differs") as e:
        load_run(bad)
    assert "\n" not in str(e.value)
    assert main(["predict", str(bad), f"t1={tmp_path}", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "SHA-256 differs" in err and "\n" not in err

    future = shutil.copytree(exported, tmp_path / "future")
    m = json.loads((future / "export.json").read_text())
    (future / "export.json").write_text(json.dumps({**m, "format_version": EXPORT_FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=f"format version {EXPORT_FORMAT_VERSION + 1}.*upgrade medmap") as e:
        load_run(future)
    assert "\n" not in str(e.value)

    other = shutil.copytree(exported, tmp_path / "other_versions")
    (other / "export.json").write_text(json.dumps({**m, "torch_version": "1.13.1", "medmap_version": "0.0.9"}))
    with pytest.warns(UserWarning) as record:
        load_run(other)  # another torch / medmap minor version: loads, with a warning each
    messages = " ".join(str(r.message) for r in record)
    assert "torch 1.13.1" in messages and "medmap 0.0.9" in messages


def test_export_refuses_bad_input(ft_run: Path, exported: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ConfigError, match="not empty"):
        export_run(ft_run, exported)
    with pytest.raises(CheckpointError, match="exported model already"):
        export_run(exported, tmp_path / "again")
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2  # not a run
    err = capsys.readouterr().err.strip()
    assert "not a fine-tuning run folder" in err and "\n" not in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp-*"))

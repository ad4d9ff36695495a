"""End-to-end stage 2 on tiny NIfTI studies: fine-tune (from stage 1), resume, evaluate, predict."""

from __future__ import annotations

import contextlib
import csv
import json
import math
from pathlib import Path
from typing import Iterator

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medmap.cli.main import main
from medmap.config import load_config
from medmap.engines import finetune as ft
from medmap.engines.evaluate import evaluate_run
from medmap.engines.finetune import run_finetuning
from medmap.engines.pretrain import run_pretraining
from medmap.errors import CheckpointError, ConfigError, VolumeError
from medmap.inference import load_run
from tests.helpers.tiny_studies import make_tiny_brain_data, tiny_finetune_config


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("ft"), n=14, n_val=3, n_test=3)


def _ft_cfg(data: Path, **over: str) -> dict:
    return tiny_finetune_config(data, *(f"{k}={v}" for k, v in over.items()))


@pytest.fixture(scope="module")
def pretrain_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = load_config("tiny", "pretrain", [f"data.organs=[{data.parent / 'brain_tiny.yaml'}]", "training.steps=2"])
    run_pretraining(cfg, data, out)
    return out


@pytest.fixture(scope="module")
def ft_run(data: Path, pretrain_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ftrun") / "run"
    summary = run_finetuning(_ft_cfg(data), data, out, init=pretrain_run)
    assert summary["steps"] == 2 * 4  # 8 train studies, batch 2, 2 epochs
    return out


def test_finetune_writes_a_complete_run(ft_run: Path, pretrain_run: Path) -> None:
    for rel in ("config.yaml", "organ.yaml", "text_bank.safetensors", "run_info.json", "log.csv",
                "checkpoints/best/model.safetensors", "checkpoints/last/state.pt", "metrics/val/metrics.json",
                "metrics/val/report.md", "metrics/val/confusion_matrix.png"):
        assert (ft_run / rel).is_file(), rel
    info = json.loads((ft_run / "run_info.json").read_text())
    assert info["init"].startswith(str(pretrain_run)) and info["loaded"] > 0
    # the encoders really start from stage 1: compare one tensor with the stage-1 checkpoint
    pre = load_file(str(pretrain_run / "checkpoints" / "best" / "model.safetensors"))
    assert any(k.startswith("encoders.") for k in pre)


def test_finetune_refuses_an_existing_run_and_a_mismatched_init(data: Path, ft_run: Path, pretrain_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--resume"):
        run_finetuning(_ft_cfg(data), data, ft_run)
    with pytest.raises(ConfigError, match="encoder.arch"):
        run_finetuning(_ft_cfg(data, **{"encoder.arch": "cnn_small"}), data, tmp_path / "x", init=pretrain_run)
    with pytest.raises(CheckpointError, match="no stage-1 checkpoint"):
        run_finetuning(_ft_cfg(data), data, tmp_path / "y", init=tmp_path)


def test_a_refused_resume_leaves_the_runs_untouched(data: Path, ft_run: Path, pretrain_run: Path) -> None:
    # resuming with another config fails before anything is written: config.yaml still
    # describes the checkpoints, so a resume with the run's own config still works
    for run, resume in ((ft_run, lambda: run_finetuning(_ft_cfg(data, **{"training.lr": 0.5}), data, ft_run, resume=True)),
                        (pretrain_run, lambda: run_pretraining(
                            load_config("tiny", "pretrain", [f"data.organs=[{data.parent / 'brain_tiny.yaml'}]",
                                                             "training.steps=3"]), data, pretrain_run, resume=True))):
        before = (run / "config.yaml").read_bytes()
        with pytest.raises(CheckpointError, match="different config"):
            resume()
        assert (run / "config.yaml").read_bytes() == before


def test_val_every_validates_on_schedule_and_at_the_end(data: Path, tmp_path: Path) -> None:
    import csv

    out = tmp_path / "run"
    run_finetuning(_ft_cfg(data, **{"training.epochs": 3, "training.val_every": 2}), data, out)
    with (out / "log.csv").open() as f:
        epochs = [int(float(r["epoch"])) for r in csv.DictReader(f) if r.get("epoch")]
    assert epochs == [1, 2]  # validated after epochs 2 and 3 (0-based 1, 2), not after epoch 1
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file()


def test_val_every_steps_validates_inside_epochs_once_per_step_with_the_elapsed_time(data: Path, tmp_path: Path) -> None:
    import csv

    out = tmp_path / "run"
    run_finetuning(_ft_cfg(data, **{"training.epochs": 2, "training.val_every_steps": 1}), data, out)
    with (out / "log.csv").open(encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("val_balanced_accuracy")]
    steps = [int(float(r["step"])) for r in rows]
    assert steps == sorted(set(steps)) and len(steps) == json.loads((out / "run_info.json").read_text())["total_steps"]
    elapsed = [float(r["elapsed_s"]) for r in rows]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0  # the run's own clock, for time to accuracy


def test_an_undefined_selection_metric_still_leaves_a_best_checkpoint(data: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = ft.compute_metrics

    def one_class_val(*a, **k):  # noqa: ANN002, ANN003  (AUC is undefined when val holds one class)
        return {**real(*a, **k), "macro_auc": None}

    monkeypatch.setattr(ft, "compute_metrics", one_class_val)
    out = tmp_path / "run"
    summary = run_finetuning(_ft_cfg(data, **{"training.select_metric": "macro_auc", "training.epochs": 1}), data, out)
    assert (out / "checkpoints" / "best" / "model.safetensors").is_file() and summary["best_epoch"] == 0
    evaluate_run(out, split="test", n_bootstrap=0)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_finetuning_trains_in_either_precision(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               precision: str) -> None:
    # whatever this CPU has: auto is float32 on a CPU, bf16 is there to be asked for
    import medmap.engines.trainer as trainer

    seen: list[bool] = []  # was bf16 autocast on inside each training forward pass?
    real = trainer.autocast_context

    @contextlib.contextmanager
    def spy(prec: str, device: torch.device) -> Iterator[None]:
        with real(prec, device):
            seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
            yield

    monkeypatch.setattr(trainer, "autocast_context", spy)
    out = tmp_path / "run"
    summary = run_finetuning(_ft_cfg(data, **{"training.precision": precision, "training.epochs": 1}), data, out)
    assert summary["steps"] == 4 and len(seen) == 4 and set(seen) == {precision == "bf16"}
    losses = [float(r["loss"]) for r in csv.DictReader((out / "log.csv").open()) if r.get("loss")]
    assert losses and all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("ema", [None, 0.9])
def test_interrupted_finetune_resumes_to_the_same_weights(data: Path, ft_run: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, ema: float | None) -> None:
    # augmentation on (the shipped configs' default) and a checkpoint mid-epoch: resume must be bit-identical,
    # with the moving average of the weights (training.ema_decay) too
    aug = "{enabled: true, flip: {prob: 0.5}, affine: {prob: 0.5, degrees: 8, scales: 0.08, translation_mm: 2}, noise: {prob: 0.5, std: 0.05}}"
    over = {"training.ckpt_every_steps": 3, "data.augment": aug, "model.dropout": 0.2}
    if ema is not None:
        over["training.ema_decay"] = ema
    cfg = _ft_cfg(data, **over)
    out = tmp_path / "run"
    import medmap.engines.trainer as trainer

    real = trainer.progress_bar
    calls = {"n": 0}

    def dying_bar(*a, **k):  # noqa: ANN002, ANN003
        bar = real(*a, **k)
        orig = bar.update

        def update(n: int = 1) -> None:
            calls["n"] += 1
            orig(n)
            if calls["n"] == 7:  # in epoch 2 (4 steps per epoch), after its mid-epoch step-6 checkpoint
                raise KeyboardInterrupt

        bar.update = update
        return bar

    monkeypatch.setattr(trainer, "progress_bar", dying_bar)
    with pytest.raises(KeyboardInterrupt):
        run_finetuning(cfg, data, out)
    monkeypatch.setattr(trainer, "progress_bar", real)
    state = torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=True)
    assert state["step"] == 6
    run_finetuning(cfg, data, out, resume=True)
    assert torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=True)["step"] == 8
    # an uninterrupted run with the same config ends with the same weights
    ref = tmp_path / "ref"
    run_finetuning(cfg, data, ref)
    for which in ("last", "best"):
        a = load_file(str(out / "checkpoints" / which / "model.safetensors"))
        b = load_file(str(ref / "checkpoints" / which / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (which, k)
    if ema is not None:  # best holds the averaged weights that were validated, last the weights as trained
        best = load_file(str(ref / "checkpoints" / "best" / "model.safetensors"))
        last = load_file(str(ref / "checkpoints" / "last" / "model.safetensors"))
        assert any(not torch.equal(best[k], last[k]) for k in best)
        assert torch.load(ref / "checkpoints" / "last" / "state.pt", weights_only=True)["extra"]["ema"] is not None


def test_evaluate_writes_every_metric_and_plot(ft_run: Path) -> None:
    m = evaluate_run(ft_run, split="test", n_bootstrap=50)
    assert m["n"] == 3
    for k in ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece", "flattened_onehot_accuracy",
              "per_class", "confusion_matrix"):
        assert k in m, k
    out = ft_run / "metrics" / "test"
    for f in ("metrics.json", "report.md", "roc.png", "reliability.png", "confusion_matrix.png", "predictions.csv"):
        assert (out / f).is_file(), f
    dropped = evaluate_run(ft_run, split="test", n_bootstrap=0, drop_modalities=["flair"])
    assert (ft_run / "metrics" / "test_without_flair" / "metrics.json").is_file()
    assert dropped["n"] == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_predict_round_trip_from_nifti_files(ft_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                             precision: str) -> None:
    # both precisions, whatever this CPU has (auto is float32 on a CPU; bf16 is there to be asked for)
    study = data.parent / "s13"
    rc = main(["predict", str(ft_run), f"t1={study / 't1.nii.gz'}", f"t2={study / 't2.nii.gz'}",
               "--study-id", "s13", "--out", str(tmp_path / "pred"), "--precision", precision])
    assert rc == 0
    pred = json.loads((tmp_path / "pred" / "s13_prediction.json").read_text())
    assert pred["modalities_used"] == ["t1", "t2"] and set(pred["modalities_missing"]) == {"t1ce", "flair"}
    assert abs(sum(pred["probabilities"].values()) - 1) < 1e-5
    assert pred["predicted_class"] == max(pred["probabilities"], key=pred["probabilities"].get)
    sal = nib.load(pred["saliency_nifti"])
    assert sal.shape == (16, 16, 16) and np.isfinite(sal.get_fdata()).all()
    assert Path(pred["saliency_png"]).stat().st_size > 1000
    # the API gives the same probabilities as the command line, with or without a saliency map
    api = load_run(ft_run, precision=precision).predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"})
    assert api.probabilities == pytest.approx(pred["probabilities"], abs=1e-6)
    api_sal = load_run(ft_run, precision=precision).predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"}, saliency_dir=tmp_path / "sal")
    assert api_sal.probabilities == pytest.approx(pred["probabilities"], abs=1e-6)


def test_predict_gives_clear_errors(ft_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study = data.parent / "s13"
    assert main(["predict", str(ft_run), f"t1={tmp_path / 'nope.nii.gz'}", "--out", str(tmp_path)]) == 2
    assert "file not found" in capsys.readouterr().err
    assert main(["predict", str(ft_run), f"dwi={study / 't1.nii.gz'}", "--out", str(tmp_path)]) == 2
    assert "dwi" in capsys.readouterr().err
    predictor = load_run(ft_run)
    with pytest.raises(VolumeError):
        predictor.predict({"t1": tmp_path / "missing.nii.gz"})
    with pytest.raises(CheckpointError):
        load_run(tmp_path)


def test_truncated_text_bank_is_a_one_line_error(ft_run: Path, tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(ft_run, run, ignore=shutil.ignore_patterns("tb", "last"))
    bank = run / "text_bank.safetensors"
    bank.write_bytes(bank.read_bytes()[: bank.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt text bank") as e:
        load_run(run)
    assert str(bank) in str(e.value) and "\n" not in str(e.value)


def test_predict_with_an_roi_mask_crop(ft_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run whose organ config crops to a study's roi_mask predicts with --roi-mask (or the
    --study line's roi_mask), and refuses, clearly, without one."""
    import shutil

    import yaml

    run = tmp_path / "roi_run"
    shutil.copytree(ft_run, run)
    organ = yaml.safe_load((run / "organ.yaml").read_text())
    (run / "organ.yaml").write_text(yaml.safe_dump({**organ, "crop": "roi_mask"}))
    study = data.parent / "s13"
    t1 = nib.load(study / "t1.nii.gz")
    inside = np.zeros(t1.shape, dtype=np.uint8)
    inside[: t1.shape[0] // 2] = 1  # half of the field of view
    mask = tmp_path / "mask.nii.gz"
    nib.save(nib.Nifti1Image(inside, t1.affine), str(mask))
    vols = [f"t1={study / 't1.nii.gz'}", f"t2={study / 't2.nii.gz'}"]
    assert main(["predict", str(run), *vols, "--out", str(tmp_path / "p0"), "--no-saliency"]) == 2
    assert "crops to a region-of-interest mask (crop: roi_mask) and none was given" in capsys.readouterr().err
    assert main(["predict", str(run), *vols, "--roi-mask", str(mask), "--study-id", "s13",
                 "--out", str(tmp_path / "p1"), "--no-saliency"]) == 0
    cli = json.loads((tmp_path / "p1" / "s13_prediction.json").read_text())["probabilities"]
    line = {"study_id": "s13", "modalities": {"t1": str(study / "t1.nii.gz"), "t2": str(study / "t2.nii.gz")},
            "roi_mask": str(mask)}
    (tmp_path / "s13.json").write_text(json.dumps(line))
    assert main(["predict", str(run), "--study", str(tmp_path / "s13.json"), "--out", str(tmp_path / "p2"),
                 "--no-saliency"]) == 0
    assert json.loads((tmp_path / "p2" / "s13_prediction.json").read_text())["probabilities"] == cli
    api = load_run(run).predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"}, roi_mask=mask)
    assert api.probabilities == pytest.approx(cli, abs=1e-5)
    full = load_run(ft_run).predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"})
    assert full.probabilities != pytest.approx(cli, abs=1e-6)  # the crop changed the input


def test_predict_with_a_lesion_box(ft_run: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A lesion-level run (crop: lesion_box) predicts from a box given on the command line (one
    for the study, or one per modality, in voxel indices or world mm), in a --study line or
    through the API, with the same answer; and refuses, clearly, without one."""
    import shutil

    import yaml

    run = tmp_path / "lesion_run"
    shutil.copytree(ft_run, run)
    organ = yaml.safe_load((run / "organ.yaml").read_text())
    (run / "organ.yaml").write_text(yaml.safe_dump({**organ, "crop": "lesion_box", "margin_mm": [4.0, 4.0, 4.0]}))
    study = data.parent / "s13"
    vols = [f"t1={study / 't1.nii.gz'}", f"t2={study / 't2.nii.gz'}"]
    common = ["--study-id", "s13", "--no-saliency"]
    assert main(["predict", str(run), *vols, "--out", str(tmp_path / "p0"), "--no-saliency"]) == 2
    assert "cuts each modality around the lesion (crop: lesion_box) and no box was given" in capsys.readouterr().err

    def probs(out: str) -> dict:
        return json.loads((tmp_path / out / "s13_prediction.json").read_text())["probabilities"]

    assert main(["predict", str(run), *vols, "--lesion-box", "4,5,6,12,13,14", "--out", str(tmp_path / "p1"), *common]) == 0
    assert main(["predict", str(run), *vols, "--lesion-box", "t1=4,5,6,12,13,14", "--lesion-box", "t2=4,5,6,12,13,14",
                 "--out", str(tmp_path / "p2"), *common]) == 0
    # the same box in world mm (the tiny studies are on a 2 mm RAS grid: voxel edges at 2 i -+ 1)
    assert main(["predict", str(run), *vols, "--lesion-box", "7,9,11,25,27,29", "--box-space", "world",
                 "--out", str(tmp_path / "p3"), *common]) == 0
    line = {"study_id": "s13", "modalities": {"t1": str(study / "t1.nii.gz"), "t2": str(study / "t2.nii.gz")},
            "lesion_box": {"space": "voxel", "box": [4, 5, 6, 12, 13, 14]}}
    (tmp_path / "s13.json").write_text(json.dumps(line))
    assert main(["predict", str(run), "--study", str(tmp_path / "s13.json"), "--out", str(tmp_path / "p4"), "--no-saliency"]) == 0
    cli = probs("p1")
    assert probs("p2") == cli and probs("p4") == cli
    assert probs("p3") == pytest.approx(cli, abs=1e-5)
    api = load_run(run).predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"},
                                lesion_box={"space": "voxel", "box": [4, 5, 6, 12, 13, 14]})
    assert api.probabilities == pytest.approx(cli, abs=1e-5)
    moved = load_run(run).predict({"t1": study / "t1.nii.gz", "t2": study / "t2.nii.gz"},
                                  lesion_box={"space": "voxel", "box": [0, 0, 0, 6, 6, 6]})
    assert moved.probabilities != pytest.approx(cli, abs=1e-6)  # the box chooses the input
    assert main(["predict", str(run), *vols, "--lesion-box", "4,5,6,12,13", "--out", str(tmp_path / "p5"), *common]) == 2
    assert "six finite numbers" in capsys.readouterr().err
    assert main(["predict", str(run), *vols, "--lesion-box", "0,0,0,40,5,5", "--out", str(tmp_path / "p6"), *common]) == 2
    assert "lies outside the volume" in capsys.readouterr().err


def test_ema_decay_outside_0_1_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'training.ema_decay' must be between 0 and 1"):
        run_finetuning(_ft_cfg(data, **{"training.ema_decay": 1.0}), data, tmp_path / "run")


def test_inference_does_not_import_the_training_engines() -> None:
    import subprocess
    import sys

    code = "import sys, medmap.inference; print(any(m.startswith('medmap.engines') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_a_bad_validation_file_stops_the_run_before_the_first_step(data: Path, tmp_path: Path, damage: str) -> None:
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data.parent, copy, ignore=shutil.ignore_patterns(".medmap_cache"))
    studies = [json.loads(line) for line in (copy / data.name).read_text().splitlines() if line.strip()]
    val = next(s for s in studies if s.get("split") == "val")
    bad = copy / val["modalities"]["t1"]
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.unlink()
    out = tmp_path / "run"
    with pytest.raises(VolumeError) as e:
        run_finetuning(_ft_cfg(copy / data.name), copy / data.name, out)
    assert bad.name in str(e.value) and val["study_id"] in str(e.value) and "\n" not in str(e.value)
    assert not (out / "checkpoints").exists() and not (out / "log.csv").exists()


def test_stratified_batches_train_on_both_classes_every_step(data: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[int]] = []
    real = ft.OrganBatchSampler

    class Recording(real):  # type: ignore[misc, valid-type]
        def rank_batches(self, epoch: int, skip: int = 0) -> list[list[int]]:
            batches = super().rank_batches(epoch, skip)
            seen.extend([self.labels[i] for i in b] for b in batches)
            return batches

    monkeypatch.setattr(ft, "OrganBatchSampler", Recording)
    run_finetuning(_ft_cfg(data, **{"data.stratified_batches": "true"}), data, tmp_path / "run")
    assert seen and all(sorted(b) == [0, 1] for b in seen)  # 4 + 4 training studies, batches of 2

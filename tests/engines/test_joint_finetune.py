"""Stage 1 with the impression alignment, then stage 2 from its zero-shot classifier, on tiny studies."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from medmap.config import load_config
from medmap.engines.finetune import run_finetuning
from medmap.engines.pretrain import run_pretraining
from medmap.engines.zeroshot import zero_shot_classify
from medmap.errors import ConfigError
from medmap.inference import load_run, load_text_bank
from tests.helpers.tiny_studies import make_tiny_brain_data, tiny_finetune_config

JOINT = ["model.sim_head=joint", "model.joint.embed_dim=16", "model.joint.text_proj=linear"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("joint"), n=14, n_val=3, n_test=3)


@pytest.fixture(scope="module")
def stage1(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "run"
    cfg = load_config("tiny", "pretrain", [f"data.organs=[{data.parent / 'brain_tiny.yaml'}]", "training.steps=3",
                                           "ablation.impression=true"])
    run_pretraining(cfg, data, out)
    return out


def test_stage1_aligns_the_study_with_its_impression(stage1: Path) -> None:
    rows = list(csv.DictReader((stage1 / "log.csv").open()))
    assert all(float(r["loss_impression"]) > 0 for r in rows if r.get("loss_impression"))
    assert any(r.get("loss_impression") for r in rows)
    metrics = json.loads((stage1 / "metrics" / "pretrain_val.json").read_text())
    assert "brain impression" in metrics["retrieval"]  # study-to-impression retrieval, reported apart
    assert metrics["zero_shot"]["brain"]["n"] == 3
    weights = load_file(str(stage1 / "checkpoints" / "last" / "model.safetensors"))
    assert "study_log_temperature" in weights and any(k.startswith("study_proj.t1.") for k in weights)


def test_without_the_impression_alignment_no_study_projection(data: Path, tmp_path: Path) -> None:
    cfg = load_config("tiny", "pretrain", [f"data.organs=[{data.parent / 'brain_tiny.yaml'}]", "training.steps=1"])
    run_pretraining(cfg, data, tmp_path / "plain")
    weights = load_file(str(tmp_path / "plain" / "checkpoints" / "last" / "model.safetensors"))
    assert not any(k.startswith("study_") for k in weights)


def test_stage2_starts_where_zero_shot_is(data: Path, stage1: Path, tmp_path: Path) -> None:
    """Before its first step, the stage-2 model with the joint head predicts what zero-shot does."""
    zs = zero_shot_classify(stage1, data, "brain", split="val", which="last", n_bootstrap=0, out_dir=tmp_path / "zs")
    cfg = tiny_finetune_config(data, *JOINT, "model.prediction=sim", "training.steps=1", "training.lr=0.0",
                               "training.val_at_start=true")
    run_finetuning(cfg, data, tmp_path / "ft", init=stage1 / "checkpoints" / "last")
    info = json.loads((tmp_path / "ft" / "run_info.json").read_text())
    assert info["joint_head_loaded"] > 0
    bank = load_text_bank(tmp_path / "ft")
    assert bank.descriptor_emb is not None and bank.descriptor_emb.shape[:2] == (2, 4)  # the brain prompt set
    pred = load_run(tmp_path / "ft")
    val = [json.loads(x) for x in (data).read_text().splitlines() if json.loads(x)["split"] == "val"]
    zs_rows = {r["study_id"]: r for r in csv.DictReader((tmp_path / "zs" / "predictions.csv").open())}
    for s in val:
        p = pred.predict({m: str(data.parent / v) for m, v in s["modalities"].items()})
        ref = [float(zs_rows[s["study_id"]][f"p_{c}"]) for c in ("normal", "tumour")]
        np.testing.assert_allclose(list(p.probabilities.values()), ref, atol=1e-4)
    assert zs["n"] == 3


def test_joint_head_that_does_not_fit_the_stage1_run_is_refused(data: Path, stage1: Path, tmp_path: Path) -> None:
    cfg = tiny_finetune_config(data, "model.sim_head=joint", "training.steps=1")  # embed_dim 128, mlp: not stage 1's
    with pytest.raises(ConfigError, match="model.joint.embed_dim=16"):
        run_finetuning(cfg, data, tmp_path / "ft", init=stage1)
    assert not (tmp_path / "ft" / "checkpoints").exists()


@pytest.mark.parametrize("mode, frozen_after", [("frozen_encoders", True), ("lp_ft", False), ("last_stages", None)])
def test_few_label_modes(data: Path, stage1: Path, tmp_path: Path, mode: str, frozen_after: bool | None) -> None:
    cfg = tiny_finetune_config(data, *JOINT, f"training.mode={mode}", "training.epochs=2", "training.lp_fraction=0.5",
                               "training.ckpt_every=1")
    out = tmp_path / mode
    run_finetuning(cfg, data, out, init=stage1)
    pre = load_file(str(stage1 / "checkpoints" / "best" / "model.safetensors"))
    after = load_file(str(out / "checkpoints" / "last" / "model.safetensors"))
    first_stage = "encoders.encoders.t1.stages.0.conv.unit0.conv.weight"
    last_stage = "encoders.encoders.t1.stages.1.conv.unit0.conv.weight"
    encoder_keys = [k for k in pre if k.startswith("encoders.")]
    assert first_stage in encoder_keys and last_stage in encoder_keys and all(k in after for k in encoder_keys)
    if frozen_after is True:  # the encoders never moved
        assert all(torch.equal(after[k], pre[k]) for k in encoder_keys)
    elif frozen_after is False:  # lp_ft: the encoders move in the second half
        assert not torch.equal(after[first_stage], pre[first_stage])
    else:  # last_stages (1): the first stage stays, the last one moves
        assert torch.equal(after[first_stage], pre[first_stage]) and not torch.equal(after[last_stage], pre[last_stage])
    assert not torch.equal(after["joint_head.text_proj.weight"], pre["text_proj.weight"])  # the head trains in every mode


def test_bad_mode_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="training.mode must be one of"):
        run_finetuning(tiny_finetune_config(data, "training.mode=probe"), data, tmp_path / "x")

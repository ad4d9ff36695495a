"""The supervised MONAI CNN baseline (medmap.experiments.baselines.run_cnn_baseline)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from medmap.errors import CheckpointError
from medmap.experiments.baselines import run_cnn_baseline
from tests.helpers.tiny_studies import make_tiny_brain_data

NET = {"name": "DenseNet", "init_features": 4, "growth_rate": 4, "block_config": [1, 1], "norm": "instance"}


@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_the_cnn_baseline_keeps_the_weights_it_validated(tmp_path: Path, ema_decay: float | None) -> None:
    data = make_tiny_brain_data(tmp_path / "data", n=10, n_val=3, n_test=3)
    cfg = {"organ": str(data.parent / "brain_tiny.yaml"), "net": NET, "run": {"device": "cpu"},
           "training": {"epochs": 1, "batch_size": 2, "ema_decay": ema_decay, "seed": 0}}
    metrics = run_cnn_baseline(cfg, data, tmp_path / "run", n_bootstrap=0)
    assert metrics["n"] == 3
    best = load_file(tmp_path / "run" / "checkpoints" / "best" / "model.safetensors")
    last = load_file(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors")
    assert best.keys() == last.keys()
    # one epoch, one validation: best holds the weights validated, which are the trained ones
    # (= last) without averaging, and their moving average with it
    same = all(torch.equal(best[k], last[k]) for k in best)
    assert same is (ema_decay is None)
    # a second call resumes the finished run; with another config it is refused, run untouched
    before = (tmp_path / "run" / "config.yaml").read_bytes()
    with pytest.raises(CheckpointError, match="different config"):
        run_cnn_baseline({**cfg, "training": {**cfg["training"], "epochs": 2}}, data, tmp_path / "run", n_bootstrap=0)
    assert (tmp_path / "run" / "config.yaml").read_bytes() == before

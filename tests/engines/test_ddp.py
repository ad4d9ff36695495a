"""Multi-process training: DDP on gloo gives the single-process gradients, and a ``torchrun``
fine-tuning run writes its run folder from rank 0 only."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import time
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from medmap.config import OrganConfig, load_config
from medmap.losses.finetune import build_medmap_loss
from medmap.models.medmap import build_medmap_classifier
from tests.helpers.tiny_studies import make_tiny_brain_data

REPO = Path(__file__).parents[2]
TEXT_DIM = 12
ROI = (16, 16, 16)
PER_RANK = 2  # b; the single-process reference sees 2b studies


def _organ() -> OrganConfig:
    return OrganConfig(name="brain", modalities=["t1", "t1ce", "t2", "flair"], classes=["normal", "tumour"],
                       spacing=(2.5, 2.5, 2.5), roi_size=ROI)


def _cfg() -> dict:
    return load_config("tiny", "finetune")  # dropout 0: deterministic


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, SimpleNamespace]:
    """2b studies with missing modalities; each half holds one study of each class."""
    g = torch.Generator().manual_seed(11)
    organ = _organ()
    images = torch.randn(2 * PER_RANK, 4, *ROI, generator=g)
    present = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0], [1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    images = images * present[:, :, None, None, None]
    labels = torch.tensor([0, 1, 1, 0])
    bank = SimpleNamespace(classes=organ.classes, modalities=organ.modalities,
                           class_emb=torch.randn(2, 2, TEXT_DIM, generator=g),
                           modality_emb=torch.randn(4, TEXT_DIM, generator=g))
    return images, present, labels, bank


def _model_and_loss() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    cfg = _cfg()
    model = build_medmap_classifier(_organ(), cfg, TEXT_DIM)
    # class weights are fixed per run (from the training labels), so rank shards with the same
    # label mix normalise their weighted means identically to the global batch
    loss_fn = build_medmap_loss(cfg, 2, class_weights=torch.tensor([0.7, 1.5]))
    return model, loss_fn


def _step(model: nn.Module, loss_fn: nn.Module, images, present, labels, bank) -> torch.Tensor:
    out = model(images, present, bank)
    loss, _ = loss_fn({k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}, labels)
    loss.backward()
    return loss.detach()


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        images, present, labels, bank = _global_batch()
        model, loss_fn = _model_and_loss()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)  # as the engines do
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        loss = _step(ddp, loss_fn, images[sl], present[sl], labels[sl], bank)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"loss": loss, "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down its connections while a peer finishes a collective
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    images, present, labels, bank = _global_batch()
    model, loss_fn = _model_and_loss()
    ref_loss = _step(model, loss_fn, images, present, labels, bank)
    ref = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert len(ref) > 20  # encoders, CSA, CCT, heads all take part

    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # the mean-reduced loss over 2b studies is the mean of the two ranks' b-study losses
    assert ((r0["loss"] + r1["loss"]) / 2).item() == pytest.approx(ref_loss.item(), rel=1e-5, abs=1e-6)
    assert r0["loss"].item() != pytest.approx(r1["loss"].item())  # the ranks really saw different data
    # DDP averages gradients over ranks: both ranks hold the single-process gradient
    for r in (r0, r1):
        for name, g in ref.items():
            got = r["grads"].get(name, torch.zeros_like(g))  # unused on every rank: None == 0
            torch.testing.assert_close(got, g, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        assert all(not g.any() for n, g in r["grads"].items() if n not in ref)


# A launcher run by torchrun: records, per rank, every call that writes into the run folder
# (the engine's writers are wrapped in place), then runs the real command line.
_RECORDING_LAUNCHER = '''
import atexit, json, os, sys
import medmap.engines.finetune as ft
import medmap.engines.trainer as trainer

rank = int(os.environ["RANK"])
calls = []
def wrap(module, name):
    real = getattr(module, name)
    def recorded(*a, **k):
        calls.append(name)
        return real(*a, **k)
    setattr(module, name, recorded)
for name in ("save_resolved_config", "atomic_write_json", "atomic_write_text", "save_text_bank", "evaluate_and_report"):
    wrap(ft, name)
wrap(trainer, "save_checkpoint")
real_logger = trainer.RunLogger
def logger(*a, **k):
    lg = real_logger(*a, **k)
    calls.append("RunLogger(enabled=%s)" % lg.enabled)
    return lg
trainer.RunLogger = logger
atexit.register(lambda: open(os.path.join(sys.argv[1], "rank%d.json" % rank), "w").write(json.dumps(calls)))
from medmap.cli.main import main
sys.exit(main(sys.argv[2:]))
'''


def test_torchrun_finetune_writes_only_from_rank_zero(tmp_path: Path) -> None:
    data = make_tiny_brain_data(tmp_path / "data", n=10, n_val=3)  # 7 train: 2 steps at 2 ranks x 2 (4 + 3)
    launcher = tmp_path / "launch.py"
    launcher.write_text(_RECORDING_LAUNCHER)
    records, out = tmp_path / "records", tmp_path / "run"
    records.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
           str(records), "finetune", "--data", str(data), "--config", "tiny", "--organ", str(data.parent / "brain_tiny.yaml"),
           "--out", str(out), "--set", "training.epochs=1", "--set", "run.progress=false", "--set", "run.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    rank0, rank1 = (json.loads((records / f"rank{r}.json").read_text()) for r in (0, 1))
    assert "save_checkpoint" in rank0 and "evaluate_and_report" in rank0 and "RunLogger(enabled=True)" in rank0
    assert rank1 == ["RunLogger(enabled=False)"], rank1  # rank 1 trains but writes nothing

    info = json.loads((out / "run_info.json").read_text())
    assert info["world_size"] == 2 and info["steps_per_epoch"] == 2
    with open(out / "log.csv", newline="") as f:
        train_rows = [r for r in csv.DictReader(f) if r.get("loss")]
    assert [int(r["step"]) for r in train_rows] == [1, 2]  # one row per optimizer step, none twice
    assert torch.load(out / "checkpoints" / "last" / "state.pt", weights_only=True)["step"] == 2
    leftovers = [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == [] and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["best", "last"]
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 1

    # the same command again without --resume: every rank refuses at once (none waits at a barrier)
    t0 = time.time()
    again = subprocess.run(cmd, env=env, capture_output=True, encoding="utf-8", errors="replace", timeout=120)
    assert again.returncode != 0 and "already holds a run" in again.stdout + again.stderr
    assert time.time() - t0 < 90

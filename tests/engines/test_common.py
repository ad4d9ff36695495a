"""Shared engine utilities: checkpoints, resume, logging, schedules, precision, distributed."""

from __future__ import annotations

import csv
import os
import random
from pathlib import Path

import pytest
import torch

from medmap.engines import common
from medmap.engines.common import (
    RunLogger,
    clip_gradients,
    config_hash,
    find_checkpoint,
    load_checkpoint,
    save_checkpoint,
    save_resolved_config,
    setup_distributed,
    warmup_cosine_schedule,
)
from medmap.errors import CheckpointError


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = warmup_cosine_schedule(opt, 2, 10)
    return model, opt, sched


def _train(model, opt, sched, n: int) -> None:
    for _ in range(n):
        opt.zero_grad()
        model(torch.ones(2, 3)).pow(2).sum().backward()
        opt.step()
        sched.step()


def test_checkpoint_roundtrip_restores_everything(tmp_path: Path) -> None:
    cfg = {"training": {"lr": 0.1}, "run": {"num_workers": 0}}
    model, opt, sched = _setup()
    _train(model, opt, sched, 3)
    random.seed(5)
    torch.manual_seed(5)
    ckpt = save_checkpoint(tmp_path / "checkpoints" / "last", model, opt, sched, step=3, epoch=1, config=cfg, extra={"k": 1})
    expected_draw = torch.rand(1)
    assert find_checkpoint(tmp_path) == ckpt
    m2, o2, s2 = _setup(seed=1)
    # a volatile key may change on resume
    state = load_checkpoint(ckpt, m2, o2, s2, config={**cfg, "run": {"num_workers": 4}})
    assert state["step"] == 3 and state["epoch"] == 1 and state["extra"] == {"k": 1}
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    assert s2.get_last_lr() == sched.get_last_lr()
    torch.testing.assert_close(torch.rand(1), expected_draw)  # RNG restored
    _train(model, opt, sched, 2)
    _train(m2, o2, s2, 2)
    for a, b in zip(model.state_dict().values(), m2.state_dict().values()):
        torch.testing.assert_close(a, b)
    with pytest.raises(CheckpointError, match="different config"):
        load_checkpoint(ckpt, m2, o2, s2, config={"training": {"lr": 0.2}})


def test_checkpoint_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt, sched = _setup()
    path = tmp_path / "checkpoints" / "last"
    save_checkpoint(path, model, opt, sched, step=1)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(common.torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(path, model, opt, sched, step=2)
    monkeypatch.undo()
    assert torch.load(path / "state.pt", weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last"]  # no temporary leftovers


def test_find_checkpoint_recovers_from_a_kill_between_renames(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    path = save_checkpoint(tmp_path / "checkpoints" / "last", model, opt, sched, step=4)
    path.rename(tmp_path / "checkpoints" / ".last.old-123")  # state after the first rename
    assert find_checkpoint(tmp_path) == path
    assert torch.load(path / "state.pt", weights_only=True)["step"] == 4
    assert find_checkpoint(tmp_path, "best") is None
    (tmp_path / "checkpoints" / "broken").mkdir()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(tmp_path / "checkpoints" / "broken", model)


def test_shared_weights_are_saved(tmp_path: Path) -> None:
    lin = torch.nn.Linear(2, 2)
    model = torch.nn.ModuleDict({"a": lin, "b": lin})
    save_checkpoint(tmp_path / "c", model, step=0)
    m2 = torch.nn.ModuleDict({"a": (l2 := torch.nn.Linear(2, 2)), "b": l2})
    load_checkpoint(tmp_path / "c", m2)
    torch.testing.assert_close(m2["b"].weight, lin.weight)


def test_run_logger_csv_and_resume(tmp_path: Path) -> None:
    log = RunLogger(tmp_path, tensorboard=True)
    for s in range(1, 5):
        log.log(s, {"loss": 1.0 / s})
    log.log(4, {"val_r1": 0.5})  # a new column extends the header
    log.close()
    assert any((tmp_path / "tb").iterdir())
    log = RunLogger(tmp_path, resume_step=2, tensorboard=False)
    log.log(3, {"loss": 0.3})
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3] and "val_r1" in rows[0]
    RunLogger(tmp_path / "other", enabled=False).log(1, {"loss": 1})
    assert not (tmp_path / "other").exists()


def test_warmup_cosine_schedule() -> None:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_cosine_schedule(opt, warmup_steps=3, total_steps=13, min_lr_ratio=0.1)
    lrs = []
    for _ in range(14):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[8] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert lrs[13] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_clip_config_and_single_process_setup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    lin = torch.nn.Linear(4, 4)
    lin(torch.ones(1, 4) * 100).sum().backward()
    before = clip_gradients(lin, 1.0)
    assert before > 1.0 and clip_gradients(lin, None) == pytest.approx(1.0, rel=1e-4)
    assert config_hash({"a": 1, "run": {"progress": True}}) == config_hash({"a": 1, "run": {"progress": False}})
    assert config_hash({"a": 1}) != config_hash({"a": 2})
    save_resolved_config(tmp_path, {"a": {"b": [1, 2]}})
    assert "b:" in (tmp_path / "config.yaml").read_text()
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)


def test_derived_seeds_do_not_collide_across_ranks_and_epochs() -> None:
    from medmap.utils import derive_seed

    seeds = {derive_seed(s, e, r) for s in range(3) for e in range(50) for r in range(64)}
    assert len(seeds) == 3 * 50 * 64  # the old seed*1000 + epoch*10 + rank collided beyond 10 ranks
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) and 0 <= derive_seed(5, 0, 0) < 2**63


def test_run_folder_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medmap.config import resolve_run_config
    from medmap.engines.common import LOCK_FILE, claim_run_dir, setup_distributed
    from medmap.errors import ConfigError

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed("cpu")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "config.yaml.bak").write_text("mine")
    with pytest.raises(ConfigError, match="not empty and is not a MedMAP run folder"):
        with claim_run_dir(other, resume=False, info=info):
            pass
    assert (other / "config.yaml.bak").read_text() == "mine" and not (other / LOCK_FILE).exists()

    run = tmp_path / "run"
    with claim_run_dir(run, resume=False, info=info):
        (run / "config.yaml").write_text("a: 1\n")
        with pytest.raises(ConfigError, match="in use by another run"):  # a second writer, same folder
            (run / LOCK_FILE).write_text("1")  # pid 1 is always alive
            with claim_run_dir(run, resume=True, info=info):
                pass
    (run / LOCK_FILE).write_text("999999999")  # left by a killed process: taken over
    (run / "checkpoints" / ".last.tmp-x").mkdir(parents=True)  # stale temporary checkpoint
    with claim_run_dir(run, resume=True, info=info):
        assert (run / LOCK_FILE).read_text() == str(os.getpid())
    assert not (run / "checkpoints" / ".last.tmp-x").exists() and not (run / LOCK_FILE).exists()
    with pytest.raises(ConfigError, match="--resume: .* holds no run"):
        resolve_run_config("tiny", "finetune", [], tmp_path / "typo", resume=True)


def test_build_adamw_is_fused_and_matches_the_reference_update():
    """The engines' AdamW uses the fused kernel and takes the same steps as PyTorch's default loop."""
    from medmap.engines.common import build_adamw

    torch.manual_seed(0)
    ref_net, net = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    net.load_state_dict(ref_net.state_dict())
    ref = torch.optim.AdamW(ref_net.parameters(), lr=1e-2, weight_decay=0.05)
    opt = build_adamw(net.parameters(), lr=1e-2, weight_decay=0.05)
    assert opt.param_groups[0]["fused"] is True
    x = torch.randn(16, 5)
    for _ in range(5):
        for model, o in ((ref_net, ref), (net, opt)):
            o.zero_grad()
            model(x).pow(2).mean().backward()
            o.step()
    for a, b in zip(ref_net.parameters(), net.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


def test_build_adamw_falls_back_to_foreach(monkeypatch):
    """A device without a fused kernel gets the multi-tensor AdamW instead of an error."""
    from medmap.engines import common

    real = torch.optim.AdamW

    def no_fused(params, **kw):
        if kw.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be on a supported device")
        return real(params, **kw)

    monkeypatch.setattr(common.torch.optim, "AdamW", no_fused)
    opt = common.build_adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    assert opt.param_groups[0]["foreach"] is True and not opt.param_groups[0]["fused"]

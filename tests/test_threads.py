"""``run.threads: auto`` (medmap.threads, configure_threads) and the ``threads`` bench section."""

from __future__ import annotations

import argparse
import time

import pytest
import torch

import medmap.threads
from medmap.benchmark import threads as bench_threads
from medmap.benchmark.sections import FinetuneSetup
from medmap.config import load_config
from medmap.engines.common import configure_threads
from medmap.errors import ConfigError
from medmap.run_config import finetune_config, parse_run_config
from medmap.threads import auto_threads

TINY_CNN = {"type": "cnn", "channels": [4], "subunits": 1, "dim": 8, "stem_patch": 2, "stem_channels": 4}
TINY_VIT = {"type": "vit", "dim": 16, "depth": 1, "heads": 2, "patch_size": 4, "stem_channels": 0}


@pytest.mark.parametrize(("available", "busy", "processes", "expected"), [
    (2, 0.0, 1, 2),     # idle 2-core machine: every core
    (2, 1.0, 1, 1),     # one core busy: the other one (2 threads here made a step 12x slower)
    (2, 0.2, 1, 2),     # background noise below the threshold is not a busy core
    (2, 0.5, 1, 1),     # half a core busy already costs a thread
    (2, 2.0, 1, 1),     # never below one thread
    (16, 0.0, 2, 8),    # two DDP ranks share the cores
    (16, 3.9, 2, 6),    # 4 busy -> 12 free, 2 ranks
    (16, 0.0, 3, 5),    # rank + 2 data workers: floor
    (1.5, 0.0, 1, 1),   # fractional cgroup quota
    (64, 0.0, 1, 64),
])
def test_auto_rule_is_free_cores_over_processes(available: float, busy: float, processes: int, expected: int) -> None:
    assert auto_threads(available, busy, processes) == expected


def test_processes_count_local_ranks_and_data_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert medmap.threads.sharing_processes() == 1
    assert medmap.threads.sharing_processes(num_workers=2) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert medmap.threads.sharing_processes(num_workers=1) == 4


def test_decision_measures_this_machine(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    t0 = time.perf_counter()
    d = medmap.threads.decide_threads(window_s=0.05)
    assert time.perf_counter() - t0 < 2
    assert 1 <= d.threads <= d.available and d.busy >= 0 and d.processes == 1
    assert d.describe().startswith(f"threads: auto -> {d.threads} (")
    # configure_threads applies it and says so once
    monkeypatch.setattr(medmap.threads, "busy_cores", lambda window_s=0.1: (1.0, "/proc/stat"))
    monkeypatch.setattr(medmap.threads, "available_cores", lambda: 2.0)
    before = torch.get_num_threads()
    try:
        assert configure_threads("auto") == 1 == torch.get_num_threads()
        assert capsys.readouterr().out.strip() == "threads: auto -> 1 (2 cores, 1.0 busy)"
        assert configure_threads(None) == 1  # None keeps what is set
        assert configure_threads(2) == 2
    finally:
        torch.set_num_threads(before)


def test_cgroup_quota_caps_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(medmap.threads, "cgroup_cpu_quota", lambda: 1.0)
    assert medmap.threads.available_cores() == 1.0
    monkeypatch.setattr(medmap.threads, "cgroup_cpu_quota", lambda: None)
    assert medmap.threads.available_cores() >= 1


def test_threads_config_accepts_auto_integers_and_null_only() -> None:
    cfg = load_config("liver", "finetune", ["run.threads=auto"])
    assert cfg["run"]["threads"] == "auto" and finetune_config(cfg).run.threads == "auto"
    assert finetune_config(load_config("liver", "finetune")).run.threads == "auto"  # shipped config
    assert parse_run_config({}, "pretrain").run.threads == "auto"  # the default
    assert parse_run_config({"run": {"threads": 2}}, "finetune").run.threads == 2
    assert parse_run_config({"run": {"threads": None}}, "finetune").run.threads is None
    for bad in ("four", "Auto", True, [1]):
        with pytest.raises(ConfigError) as e:
            parse_run_config({"run": {"threads": bad}}, "finetune")
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("config key 'run.threads' must be an integer or 'auto' or null")
    with pytest.raises(ConfigError, match="run.threads"):
        load_config("liver", "finetune", ["run.threads=four"])


def test_experiment_grid_threads_reach_every_job(tmp_path) -> None:
    from medmap.experiments.grid import ExperimentGrid
    from medmap.experiments.schema import load_experiment_config

    cfg = load_experiment_config("tiny")
    for given, expected in (("auto", "auto"), (2, 2), (2.0, 2), (None, None), (0, None)):
        grid = ExperimentGrid({**cfg, "run": {**(cfg.get("run") or {}), "threads": given}}, tmp_path)
        assert grid.threads == expected
        if expected is not None:  # the grid's setting wins over the stage configs' (shipped: auto)
            assert grid.finetune_config(grid.tasks[0], grid.rows[0], 0)["run"]["threads"] == expected
            assert grid.pretrain_config("aware", 0)["run"]["threads"] == expected
    with pytest.raises(ConfigError, match="run.threads"):
        ExperimentGrid({**cfg, "run": {"threads": "four"}}, tmp_path)


def test_threads_bench_section_smoke(monkeypatch: pytest.MonkeyPatch) -> None:
    # tiny model (3 stride-2 stages: 18 tokens per modality, as cnn_patch); 2 threads are timed
    # only where auto picks them: oversubscribed, even this model takes seconds per step
    tiny = ["encoder.arch={type: cnn, channels: [4, 4, 4], subunits: 1, dim: 8}", "training.batch_size=1"]

    def tiny_setup() -> FinetuneSetup:
        return FinetuneSetup("liver", tiny)

    monkeypatch.setattr(bench_threads, "make_setup", tiny_setup)
    monkeypatch.setattr(bench_threads, "THREAD_COUNTS", (1,))
    monkeypatch.setattr(bench_threads, "encoder_cases", lambda: [("cnn", TINY_CNN, (8, 8, 8), 2),
                                                                 ("vit", TINY_VIT, (8, 8, 8), 2)])
    monkeypatch.setattr(bench_threads, "step_cases", lambda: [("cnn", "liver", tiny)])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # PyTorch's default is timed too
    res: dict = {}
    try:
        bench_threads.section_threads(res, argparse.Namespace(iters=1, quick=True, bf16_iters=1))
        assert torch.get_num_threads() == 1  # restored
    finally:
        torch.set_num_threads(before)
    out = res["threads"]
    assert [r["load"] for r in out["rows"]] == ["idle", "busy"]
    for r in out["rows"]:
        assert {1, r["auto"]} <= set(r["step_s"]) and r["fastest"] in r["step_s"]
    assert out["rows"][1]["busy_cores_measured"] >= 0.5  # the spinning subprocess was seen
    assert set(out["precision"]) == {"cnn", "vit"} and set(out["precision_steps"]) == {"cnn"}
    assert out["precision"]["cnn"]["conv_kernels"]["fp32"]  # e.g. aten::mkldnn_convolution (oneDNN)
    step = out["precision_steps"]["cnn"]
    assert step["bf16_speedup"] == pytest.approx(step["fp32_s"] / step["bf16_s"])
    assert out["kernels"]["precision_auto"] == out["precision_auto"] == "float32"  # auto on a CPU
    # the verdict is judged on the whole steps: a kind is flagged where bf16 pays (auto keeps float32)
    assert out["precision_auto_wrong_for"] == (["cnn"] if step["bf16_pays"] else [])

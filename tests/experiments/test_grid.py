"""The experiment runner: the tiny grid end to end (every row kind), resumption, planning, tables."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file, save_file

from medmap.cli.main import main
from medmap.errors import ConfigError
from medmap.experiments.grid import ExperimentGrid
from medmap.experiments.runner import JobClaims, run_grid
from medmap.experiments.schema import load_experiment_config
from medmap.experiments.table import (MetricSummary, RunResult, aggregate, format_cell, render_csv, render_markdown,
                                      summarise_metric)

EXPECTED_ROWS = ["full", "shared_encoder", "no_csa", "cnn", "linear_probe", "intensity", "full_without_arterial"]


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    out = tmp_path_factory.mktemp("grid") / "tiny"
    report = run_grid("tiny", out, fail_fast=True, log=lambda _: None)
    return out, report


# --------------------------------------------------------------------------- end to end
def test_tiny_grid_writes_both_tables_with_every_row(grid: tuple[Path, object]) -> None:
    out, report = grid
    assert not report.failed
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["row"] for r in rows] == EXPECTED_ROWS
    assert {r["task"] for r in rows} == {"liver"}
    for r in rows:
        assert r["n_seeds"] == "1" and r["n_test"] == "3"
        acc = float(r["accuracy_mean"])
        assert 0.0 <= float(r["accuracy_ci_low"]) <= acc <= float(r["accuracy_ci_high"]) <= 1.0
        assert r["accuracy_std"] == ""  # one seed: no standard deviation
    md = (out / "results.md").read_text()
    assert "## liver" in md and "| MedMAP (full), arterial dropped at test | 1 | 3 |" in md
    assert md.count("\n| ") == len(EXPECTED_ROWS) + 1  # header + one line per row
    with (out / "runs.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(EXPECTED_ROWS)


def test_rows_use_the_right_stage1_runs_and_settings(grid: tuple[Path, object]) -> None:
    out, _ = grid
    load = lambda p: yaml.safe_load((out / p).read_text())  # noqa: E731
    assert load("pretrain/aware_seed0/config.yaml")["ablation"]["modality_aware"] is True
    assert load("pretrain/shared_seed0/config.yaml")["ablation"]["modality_aware"] is False
    # the shared-encoder row starts from the shared stage-1 run; the others from the aware one
    info = {r: json.loads((out / f"runs/liver/{r}/seed0/run_info.json").read_text()) for r in ("full", "shared_encoder", "no_csa")}
    assert "/pretrain/shared_seed0/" in info["shared_encoder"]["init"]
    assert "/pretrain/aware_seed0/" in info["full"]["init"] and "/pretrain/aware_seed0/" in info["no_csa"]["init"]
    assert load("runs/liver/shared_encoder/seed0/config.yaml")["ablation"]["modality_aware"] is False
    assert load("runs/liver/no_csa/seed0/config.yaml")["ablation"]["csa"] is False
    # the organ sizes of the grid reach every run
    assert load("runs/liver/full/seed0/organ.yaml")["roi_size"] == [16, 16, 16]
    probe = json.loads((out / "runs/liver/linear_probe/seed0/metrics/test/metrics.json").read_text())["context"]
    assert probe["pretrain_run"].endswith("pretrain/shared_seed0") and probe["C"] in (0.1, 1.0)
    cnn = json.loads((out / "runs/liver/cnn/seed0/metrics/test/metrics.json").read_text())
    assert cnn["context"]["baseline"] == "monai_cnn" and cnn["n"] == 3
    drop = json.loads((out / "runs/liver/full/seed0/metrics/test_without_arterial/metrics.json").read_text())
    assert drop["context"]["dropped_modalities"] == ["arterial"]
    # model selection never reads the test split: the stage-2 summary only has val metrics
    summary = json.loads((out / "runs/liver/full/seed0/metrics/finetune_summary.json").read_text())
    assert "val" in summary and "test" not in summary


def test_rerun_skips_finished_runs_and_redoes_a_missing_one(grid: tuple[Path, object]) -> None:
    out, first = grid
    before = (out / "results.csv").read_text()
    again = run_grid("tiny", out, fail_fast=True, log=lambda _: None)
    assert again.ran == [] and set(again.skipped) == set(first.jobs)
    assert (out / "results.csv").read_text() == before
    (out / "runs/liver/intensity/seed0/metrics/test/metrics.json").unlink()
    third = run_grid("tiny", out, fail_fast=True, log=lambda _: None)
    assert third.ran == ["run:liver:intensity:0"]
    assert (out / "results.csv").read_text() == before  # deterministic baseline, same numbers


def test_two_workers_run_every_job_exactly_once(tmp_path: Path) -> None:
    out = tmp_path / "tiny2"
    assert main(["experiment", "tiny", "--out", str(out), "--workers", "2", "--threads", "1"]) == 0
    with (out / "timings.csv").open() as f:
        ran = [r["job"] for r in csv.DictReader(f)]
    keys = [j.key for j in ExperimentGrid(load_experiment_config("tiny"), out).jobs()]
    assert sorted(ran) == sorted(keys)  # each job once, none lost, none twice
    assert (out / "worker1.log").is_file()
    with (out / "results.csv").open() as f:
        assert [r["row"] for r in csv.DictReader(f)] == EXPECTED_ROWS
    assert not list((out / "claims").iterdir())  # every claim released


def test_job_claims_exclude_live_owners_and_take_over_dead_ones(tmp_path: Path) -> None:
    mine, other = JobClaims(tmp_path), JobClaims(tmp_path)
    other.owner = f"{socket.gethostname()} {os.getppid()}"  # stands for a second worker process
    assert mine.acquire("run:brain:full:0")
    assert not other.acquire("run:brain:full:0")  # held by a live process (this one)
    mine.release("run:brain:full:0")
    assert other.acquire("run:brain:full:0")
    # a claim left by a process of this host that has ended is taken over
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine.path("pretrain:aware:0").write_text(f"{socket.gethostname()} {dead.pid}")
    assert mine.acquire("pretrain:aware:0")
    # a claim from another host is never taken over (its owner cannot be checked)
    mine.path("data").write_text("some-other-host 1")
    assert not mine.acquire("data")
    # release only removes one's own claim
    other.release("pretrain:aware:0")
    assert mine.path("pretrain:aware:0").is_file()


def test_a_job_held_by_another_worker_is_waited_for_not_rerun(grid: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = grid
    marker = out / "runs" / "liver" / "cnn" / "seed0" / "metrics" / "test" / "metrics.json"
    saved = marker.read_bytes()
    marker.unlink()
    holder = JobClaims(out / "claims")
    holder.owner = f"{socket.gethostname()} {os.getppid()}"  # a live process that is not this one
    assert holder.acquire("run:liver:cnn:0")

    def other_worker_finishes() -> None:
        time.sleep(0.5)
        marker.write_bytes(saved)
        holder.release("run:liver:cnn:0")

    t = threading.Thread(target=other_worker_finishes)
    t.start()
    report = run_grid("tiny", out, log=lambda _: None, poll_s=0.1)
    t.join()
    assert report.ran == [] and "run:liver:cnn:0" in report.skipped and not report.failed


def test_dry_run_prints_the_plan_and_writes_nothing(grid: tuple[Path, object], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = grid
    assert main(["experiment", "tiny", "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 10 and all(line.startswith("[done]") for line in lines)
    fresh = tmp_path / "fresh"
    assert main(["experiment", "tiny", "--out", str(fresh), "--dry-run", "--only", "cnn"]) == 0
    assert capsys.readouterr().out.count("[todo]") == 2  # data + the CNN run
    assert not fresh.exists()


def test_stage1_reuses_a_finished_pretrain_run(grid: tuple[Path, object], tmp_path: Path) -> None:
    out, _ = grid
    linked = out / "pretrain" / "aware_seed0"
    cfg = load_experiment_config("tiny")
    mine = tmp_path / "linked"
    assert main(["experiment", "tiny", "--out", str(mine), "--only", "full", "--seeds", "0", "1",
                 "--stage1", str(linked)]) == 0
    assert not (mine / "pretrain").exists()  # no stage 1 trained: both seeds start from the given run
    for seed in (0, 1):
        info = json.loads((mine / f"runs/liver/full/seed{seed}/run_info.json").read_text())
        assert Path(info["init"]).resolve().is_relative_to(linked.resolve())
    assert yaml.safe_load((mine / "experiment.yaml").read_text())["pretrain"]["run"] == str(linked)
    keys = [j.key for j in ExperimentGrid({**cfg, "pretrain": {**cfg["pretrain"], "run": str(linked)}}, mine,
                                          seeds=[0, 1], only=["full", "shared_encoder"]).jobs()]
    assert [k for k in keys if k.startswith("pretrain")] == ["pretrain:aware:0", "pretrain:shared:0", "pretrain:shared:1"]


def test_stage1_runs_that_cannot_stand_in_are_clear_errors(grid: tuple[Path, object], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    out, _ = grid
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((out / "pretrain/aware_seed0/config.yaml").read_text())
    partial = tmp_path / "partial"  # a finished run without the arterial encoder
    shutil.copytree(out / "pretrain/aware_seed0", partial)
    for weights in partial.rglob("model.safetensors"):
        tensors = load_file(weights)
        save_file({k: v for k, v in tensors.items() if ".arterial." not in k}, weights)
    for run, match in [(tmp_path / "nowhere", "not a stage-1 run folder"),
                       (out / "pretrain/shared_seed0", "one shared encoder"),
                       (unfinished, "has not finished"),
                       (partial, "has no stage-1 encoder for liver's arterial")]:
        cfg = load_experiment_config("tiny")
        cfg["pretrain"]["run"] = str(run)
        with pytest.raises(ConfigError, match=match):
            ExperimentGrid(cfg, tmp_path / "x")
    for config, spec, message in [
            ("paper_grid", "runs/s1", "one stage-1 run per task; give TASK=RUN"),
            ("tiny", "liver=runs/s1", "one stage-1 run for all tasks; give RUN alone"),
            ("paper_grid", "lung=runs/s1", "'pretrain.run' names ['lung'], not tasks of this grid")]:
        assert main(["experiment", config, "--out", str(tmp_path / "p"), "--dry-run", "--stage1", spec]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
    cfg = load_experiment_config("tiny")
    cfg["pretrain"]["runs"] = "typo"
    with pytest.raises(ConfigError, match=r"unknown pretrain keys \['runs'\]"):
        ExperimentGrid(cfg, tmp_path / "y")


# --------------------------------------------------------------------------- planning
def test_only_pulls_in_dependencies_and_seeds_multiply_stage1_runs(tmp_path: Path) -> None:
    cfg = load_experiment_config("tiny")
    keys = [j.key for j in ExperimentGrid(cfg, tmp_path, only=["linear_probe"]).jobs()]
    assert keys == ["data", "pretrain:shared:0", "run:liver:linear_probe:0"]
    keys = [j.key for j in ExperimentGrid(cfg, tmp_path, only=["full_without_arterial"]).jobs()]
    assert keys == ["data", "pretrain:aware:0", "run:liver:full:0", "drop:liver:full_without_arterial:0"]
    keys = [j.key for j in ExperimentGrid(cfg, tmp_path, seeds=[0, 1], only=["full", "shared_encoder"]).jobs()]
    assert [k for k in keys if k.startswith("pretrain")] == ["pretrain:aware:0", "pretrain:shared:0",
                                                             "pretrain:aware:1", "pretrain:shared:1"]
    assert sum(k.startswith("run:") for k in keys) == 4
    paper = load_experiment_config("paper_grid")  # one stage-1 run per task and setting, shared by the seeds
    jobs = ExperimentGrid(paper, tmp_path).jobs()
    assert [j.key for j in jobs if j.key.startswith("pretrain")] == [
        "pretrain:brain:aware:0", "pretrain:brain:shared:0", "pretrain:liver:aware:0", "pretrain:liver:shared:0"]


def test_tasks_keep_one_task_of_the_grid(tmp_path: Path) -> None:
    paper = load_experiment_config("paper_grid")
    keys = [j.key for j in ExperimentGrid(paper, tmp_path, tasks=["brain"]).jobs()]
    assert keys[0] == "data" and all(":brain:" in k for k in keys[1:])
    assert any(k.startswith("run:brain:") for k in keys) and any(k.startswith("drop:brain:") for k in keys)
    assert any(k.startswith("run:brain:few:") for k in keys)  # the brain's few-label regime: 20 per class
    liver = [j.key for j in ExperimentGrid(paper, tmp_path, tasks=["liver"]).jobs()]
    assert any(k.startswith("run:liver:low:") for k in liver) and not any(":few:" in k for k in liver)
    everything = [j.key for j in ExperimentGrid(paper, tmp_path).jobs()]
    assert set(keys) == {k for k in everything if k == "data" or ":brain:" in k}
    with pytest.raises(ConfigError, match=r"--tasks \['lung'\]: not tasks of this grid"):
        ExperimentGrid(paper, tmp_path, tasks=["lung"])


@pytest.mark.parametrize("row, match", [
    ({"name": "x", "kind": "svm"}, "kind must be one of"),
    ({"name": "x", "kind": "medmap", "ablation": {"no_such_switch": False}}, "unknown config key 'ablation.no_such_switch'"),
    ({"name": "x", "kind": "drop_modality", "source": "intensity"}, "must name a medmap row"),
    ({"name": "full", "kind": "medmap"}, "two rows are named"),
])
def test_bad_rows_are_clear_config_errors(tmp_path: Path, row: dict, match: str) -> None:
    cfg = load_experiment_config("tiny")
    cfg["rows"] = cfg["rows"] + [row]
    with pytest.raises(ConfigError, match=match):
        ExperimentGrid(cfg, tmp_path)


def test_unknown_only_row_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such rows"):
        ExperimentGrid(load_experiment_config("tiny"), tmp_path, only=["nope"])


# --------------------------------------------------------------------------- aggregation
def _r(row: str, seed: int, acc: float | None, ci: list[float] | None, auc: float | None = None) -> RunResult:
    return RunResult("liver", row, seed, {"n": 40, "accuracy": acc, "macro_auc": auc,
                                          "ci": {"accuracy": ci, "macro_auc": None}}, label=row.upper())


def test_aggregate_mean_std_and_ci_over_seeds() -> None:
    results = [_r("full", 2, 0.70, [0.55, 0.85], 0.9), _r("full", 0, 0.60, [0.45, 0.75], None),
               _r("full", 1, 0.80, [0.65, 0.95], 0.8), _r("cnn", 0, 0.5, [0.4, 0.6])]
    rows = aggregate(results)
    assert [r.row for r in rows] == ["full", "cnn"]
    full = rows[0]
    assert full.seeds == [0, 1, 2] and full.label == "FULL"
    acc = full.summary["accuracy"]
    assert acc.mean == pytest.approx(0.70) and acc.std == pytest.approx(0.10)  # sample SD of 0.6, 0.7, 0.8
    assert (acc.ci_low, acc.ci_high) == (pytest.approx(0.55), pytest.approx(0.85))
    auc = full.summary["macro_auc"]  # undefined in one run: averaged over the two where it is defined
    assert auc.mean == pytest.approx(0.85) and auc.n_values == 2 and auc.ci_low is None
    cnn = rows[1].summary["accuracy"]
    assert cnn.std is None and cnn.n_values == 1
    assert summarise_metric([None, None], [None, None]) == MetricSummary(None, None, None, None, 0)


def test_rendered_tables() -> None:
    rows = aggregate([_r("full", 0, 0.6, [0.45, 0.75]), _r("full", 1, 0.8, [0.65, 0.95])])
    md = render_markdown(rows, title="T")
    assert "| FULL | 2 | 40 | 0.700 ± 0.141 [0.550, 0.850] |" in md
    assert format_cell(MetricSummary(0.5, None, None, None, 1), with_ci=True) == "0.500"
    lines = render_csv(rows).splitlines()
    head = lines[0].split(",")
    vals = dict(zip(head, lines[1].split(",")))
    assert vals["accuracy_mean"] == "0.700000" and vals["accuracy_std"] == "0.141421"
    assert vals["accuracy_ci_low"] == "0.550000" and vals["seeds"] == "0 1" and vals["macro_auc_mean"] == ""


@pytest.mark.parametrize("name", ["paper_grid", "liver_lesion", "brain", "tiny"])
def test_every_built_in_experiment_plans(tmp_path: Path, name: str) -> None:
    cfg = load_experiment_config(name)
    grid = ExperimentGrid(cfg, tmp_path)
    keys = [j.key for j in grid.jobs()]
    assert keys[0] == "data" and any(k.startswith("run:") for k in keys)
    for regime in grid.regimes:  # every medmap row builds its stage-2 config, with its label budget
        for task in cfg["tasks"]:
            for row in grid.rows:
                if row.kind == "medmap" and regime.has(row, task):
                    ft = grid.finetune_config(task, row, 3, regime)
                    assert ft["training"]["seed"] == 3
                    assert (ft.get("data") or {}).get("labels_per_class") == grid.labels_per_class(row, regime)


def test_regimes_and_claims_end_to_end(tmp_path: Path) -> None:
    cfg = load_experiment_config("tiny")
    cfg["rows"] = [r for r in cfg["rows"] if r["name"] in ("full", "no_csa", "intensity", "missing")]
    cfg["regimes"] = [{"name": "all", "label": "all labels"},
                      {"name": "low", "label": "1 per class", "labels_per_class": 1, "rows": ["full", "intensity"],
                       "task_set": {"liver": {"training": {"epochs": 2}}}}]
    cfg["claims"] = [{"name": "csa", "claim": "CSA helps", "a": "full", "b": "no_csa", "paper_points": 4.32},
                     {"name": "vs_intensity", "a": "full", "b": "intensity"}]
    out = tmp_path / "g"
    report = run_grid(cfg, out, fail_fast=True, log=lambda _: None)
    assert not report.failed
    assert sorted(p.parent.name for p in (out / "runs/liver/low").glob("*/seed0")) == ["full", "intensity"]
    low = yaml.safe_load((out / "runs/liver/low/full/seed0/config.yaml").read_text())
    assert low["data"]["labels_per_class"] == 1 and low["training"]["epochs"] == 2
    intensity = json.loads((out / "runs/liver/low/intensity/seed0/metrics/test/metrics.json").read_text())
    assert intensity["context"]["n_train"] == 3  # one per class of the three classes
    for row in ("intensity", "no_csa"):  # every kind of run leaves its per-study predictions
        assert (out / f"runs/liver/all/{row}/seed0/metrics/test/predictions.csv").is_file()
    md = (out / "results.md").read_text()
    assert "## liver: all labels" in md and "## liver: 1 per class" in md
    claims = (out / "claims.md").read_text()
    assert "| CSA helps | full | no_csa | 1 |" in claims and "arterial adds to full" in claims
    assert claims.count("| full | intensity |") == 2  # both regimes
    assert (out / "rows.png").stat().st_size > 10_000


@pytest.mark.parametrize("regimes, match", [
    ([{"name": "low", "rows": ["nope"]}], "not rows of the grid"),
    ([{"name": "low", "epochs": 3}], "unknown keys \\['epochs'\\]"),
    ([{"name": "a"}, {"name": "a"}], "same name"),
])
def test_bad_regimes_are_clear_config_errors(tmp_path: Path, regimes: list, match: str) -> None:
    cfg = load_experiment_config("tiny")
    cfg["regimes"] = regimes
    with pytest.raises(ConfigError, match=match):
        ExperimentGrid(cfg, tmp_path)


def test_the_cnn_rows_follow_the_tasks_batch_stratification(tmp_path: Path) -> None:
    cfg = load_experiment_config("tiny")
    cnn = next(r for r in ExperimentGrid(cfg, tmp_path).rows if r.name == "cnn")
    assert "stratified_batches" not in ExperimentGrid(cfg, tmp_path).cnn_config("liver", cnn, 0)["data"]
    cfg = {**cfg, "finetune": {**cfg["finetune"], "set": {"data": {"stratified_batches": True}}}}
    assert ExperimentGrid(cfg, tmp_path).cnn_config("liver", cnn, 0)["data"]["stratified_batches"] is True

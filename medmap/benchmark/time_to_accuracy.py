"""Time to accuracy: how long a user waits until a fine-tuning run is good enough.

For each task (lesion-level liver, whole brain at 4 mm) the section starts the default
fine-tuning command in a subprocess, as a user would, and reads its ``log.csv`` while it runs:
every validation row carries ``elapsed_s`` (the run's own clock, validation included). The
figure is the wall time from the command's start until the validation balanced accuracy first
reaches the threshold (0.90); the run is then stopped. Next to it the same figure for the MONAI
DenseNet baseline (the paper_grid experiment's network) on the same data and split. A run that
does not get there within the cap is reported with its best validation score.

The preprocessing cache is warmed first (one pass over the studies, timed separately), so the
figures are training time, not file decoding.

Example::

    medmap bench --sections time_to_accuracy --tta-liver runs/lesion3000/studies.jsonl \\
        --tta-liver-init runs/s1_liver --threads 2
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

#: Task -> (fine-tuning config, organ config); the defaults of the "MedMAP must visibly learn" issue.
TASKS = {"liver": ("liver", "liver"), "brain": ("brain", "brain_4mm")}


def paper_grid_densenet() -> dict[str, Any]:
    """The paper grid's DenseNet row (``configs/experiments/paper_grid.yaml``, row ``densenet``):
    its ``net`` and ``training`` (learning rate, weight decay), read from the config, not copied."""
    from medmap.experiments.schema import load_experiment_config

    row = next(r for r in load_experiment_config("paper_grid")["rows"] if r["name"] == "densenet")
    return {"net": dict(row["net"]), "training": dict(row.get("training") or {})}


def first_reaching(log_csv: Path, threshold: float, metric: str = "val_balanced_accuracy") -> dict[str, Any]:
    """The first validation row of ``log_csv`` with ``metric >= threshold``, and the best so far.

    Example:
        >>> first_reaching(Path("missing.csv"), 0.9)["reached"]
        False
    """
    out: dict[str, Any] = {"reached": False, "best": None, "validations": 0}
    if not log_csv.is_file():
        return out
    with log_csv.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if not row.get(metric):
                continue
            score = float(row[metric])
            out["validations"] += 1
            out["best"] = score if out["best"] is None else max(out["best"], score)
            if score >= threshold and not out["reached"]:
                out.update(reached=True, step=int(float(row["step"])), score=score,
                           train_elapsed_s=float(row["elapsed_s"]) if row.get("elapsed_s") else None)
    return out


def watch_run(cmd: list[str], run_dir: Path, threshold: float, cap_s: float, log: Path) -> dict[str, Any]:
    """Run ``cmd`` until its ``run_dir/log.csv`` shows ``threshold``, it exits, or ``cap_s`` passes."""
    t0 = time.perf_counter()
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        try:
            while True:
                time.sleep(1.0)
                state = first_reaching(run_dir / "log.csv", threshold)
                if state["reached"] or proc.poll() is not None or time.perf_counter() - t0 > cap_s:
                    break
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    state = first_reaching(run_dir / "log.csv", threshold)
    state["wall_s"] = time.perf_counter() - t0
    state["exit_code"] = proc.returncode
    if not state["reached"] and proc.returncode not in (0, -9):
        state["error"] = log.read_text(encoding="utf-8", errors="replace")[-2000:]
    return state


def _finetune_cmd(task: str, data: Path, run_dir: Path, init: Path | None, threads: int | None,
                  val_every_steps: int, overrides: Sequence[str] = ()) -> list[str]:
    config, _ = TASKS[task]
    cmd = [sys.executable, "-m", "medmap.cli.main", "finetune", "--data", str(data), "--config", config,
           "--out", str(run_dir), "--set", "run.progress=false", "--set", f"training.val_every_steps={val_every_steps}"]
    for item in overrides:
        cmd += ["--set", item]
    if threads:
        cmd += ["--set", f"run.threads={threads}"]
    if init is not None:
        cmd += ["--init", str(init)]
    else:
        cmd += ["--set", "ablation.pretrained=false"]
    return cmd


def cnn_config(task: str, val_every_steps: int, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The DenseNet baseline's config: the task's stage-2 schedule, augmentation, batch
    stratification and weight averaging (``training.ema_decay``), with ``overrides`` of the
    fine-tuning config applied; the network, learning rate and weight decay of the paper
    grid's DenseNet row (:func:`paper_grid_densenet`)."""
    from medmap.config import load_config
    from medmap.run_config import finetune_config

    ft = finetune_config(load_config(TASKS[task][0], "finetune", list(overrides)))
    t, densenet = ft.training, paper_grid_densenet()
    return {"organ": TASKS[task][1], "net": densenet["net"],
            "training": {"epochs": t.epochs, "batch_size": t.batch_size, **densenet["training"],
                         "warmup_epochs": t.warmup_epochs, "grad_clip": t.grad_clip, "precision": t.precision,
                         "val_every_steps": val_every_steps, "ema_decay": t.ema_decay, "seed": t.seed},
            "data": {"augment": ft.data.augment, "stratified_batches": ft.data.stratified_batches}}


def warm_cache(data: Path, task: str) -> float:
    """Preprocess every labelled study of the task once (the runs then read the cache); seconds."""
    from medmap.config import load_organ_config
    from medmap.data.cache import PreprocessCache, default_cache_root
    from medmap.data.preprocess import preprocess_study
    from medmap.data.studylist import read_study_list

    organ = load_organ_config(TASKS[task][1])
    cache = PreprocessCache(default_cache_root(data) / "preprocess")
    t0 = time.perf_counter()
    for study in read_study_list(data, organ=organ.name):
        if study.label is not None:
            preprocess_study(study, organ, cache=cache)
    return time.perf_counter() - t0


def _row(label: str, r: Mapping[str, Any], threshold: float) -> str:
    if r["reached"]:
        return (f"  {label:<34} {r['wall_s']:7.0f} s to val balanced accuracy {r['score']:.3f} >= {threshold:.2f} "
                f"(step {r['step']}; training clock {r['train_elapsed_s']:.0f} s)")
    best = "none" if r["best"] is None else f"{r['best']:.3f}"
    return f"  {label:<34} not reached in {r['wall_s']:.0f} s (best val balanced accuracy {best}, {r['validations']} validations)"


def section_time_to_accuracy(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Wall time to 0.90 validation balanced accuracy: MedMAP's default fine-tune and the DenseNet."""
    import tempfile

    threshold, cap_s = float(args.tta_threshold), 60.0 * float(args.tta_cap_min)
    overrides = list(getattr(args, "tta_set", None) or [])
    out: dict[str, Any] = {"threshold": threshold, "cap_s": cap_s, "threads": args.threads, "overrides": overrides}
    work = Path(args.tta_work or tempfile.mkdtemp(prefix="medmap-tta-"))
    work.mkdir(parents=True, exist_ok=True)
    for task in ("liver", "brain"):
        data = getattr(args, f"tta_{task}")
        if data is None:
            print(f"\n== Time to accuracy, {task}: skipped (give --tta-{task} STUDY_LIST) ==")
            continue
        data, init = Path(data), getattr(args, f"tta_{task}_init")
        print(f"\n== Time to accuracy, {task} ({data}; cap {cap_s / 60:g} min, threads {args.threads or 'default'}"
              + (f"; {' '.join(overrides)}" if overrides else "") + ") ==")
        warm = warm_cache(data, task)
        print(f"  preprocessing cache warmed in {warm:.0f} s (not counted below)")
        every = int(args.tta_val_every_steps)
        medmap_dir, cnn_dir = work / f"{task}_medmap", work / f"{task}_densenet"
        medmap = watch_run(_finetune_cmd(task, data, medmap_dir, Path(init) if init else None, args.threads, every,
                                         overrides),
                           medmap_dir, threshold, cap_s, work / f"{task}_medmap.log")
        label = f"MedMAP ({'stage-1 init' if init else 'random init'})"
        print(_row(label, medmap, threshold))
        cfg_path = work / f"{task}_densenet.json"
        cfg_path.write_text(json.dumps(cnn_config(task, every, overrides)), encoding="utf-8")
        cnn_cmd = [sys.executable, "-m", "medmap.benchmark.time_to_accuracy", str(cfg_path), str(data), str(cnn_dir)]
        if args.threads:
            cnn_cmd += ["--threads", str(args.threads)]
        cnn = watch_run(cnn_cmd, cnn_dir, threshold, cap_s, work / f"{task}_densenet.log")
        print(_row("MONAI DenseNet baseline", cnn, threshold))
        out[task] = {"data": str(data), "init": init, "cache_warm_s": warm, "medmap": medmap, "densenet": cnn}
    res["time_to_accuracy"] = out


def _cnn_worker(argv: list[str] | None = None) -> int:
    """``python -m medmap.benchmark.time_to_accuracy CONFIG.json STUDIES RUN_DIR``: the DenseNet run."""
    import torch

    from medmap.experiments.baselines import run_cnn_baseline

    p = argparse.ArgumentParser(description=_cnn_worker.__doc__)
    p.add_argument("config", type=Path)
    p.add_argument("data", type=Path)
    p.add_argument("run_dir", type=Path)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    run_cnn_baseline(json.loads(a.config.read_text(encoding="utf-8")), a.data, a.run_dir, n_bootstrap=0)
    return 0


if __name__ == "__main__":
    sys.exit(_cnn_worker())

"""``medmap experiment``: run a grid of ablations and baselines and write one results table.

Example::

    medmap experiment paper_grid --out runs/paper_grid            # run or continue the whole grid
    medmap experiment paper_grid --out runs/paper_grid --dry-run  # the plan, with done / todo
    medmap experiment paper_grid --out runs/paper_grid --only full no_csa --seeds 0
    medmap experiment paper_grid --out runs/paper_grid --tasks brain   # one task's rows only
    medmap experiment paper_grid --out runs/paper_grid --workers 2   # two processes, one core each
    medmap experiment my_grid.yaml --out runs/mine
    medmap experiment liver_lesion --out runs/ll --stage1 runs/s1_liver   # reuse a medmap pretrain run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run an ablation / baseline grid from one config and write the results table",
        description="Run every unfinished job of an experiment grid (data, stage-1 runs, fine-tuning rows, "
        "baselines, missing-modality evaluations) and write DIR/results.md and DIR/results.csv. Rerunning "
        "with the same --out skips finished runs. Test metrics only; model selection uses the val split.",
    )
    p.add_argument("config", help="built-in experiment config (paper_grid, tiny) or a YAML path")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: runs/experiments/<config name>)")
    p.add_argument("--only", nargs="+", default=None, metavar="ROW", help="run only these rows (and what they need)")
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="replace the config's seeds")
    p.add_argument("--tasks", nargs="+", default=None, metavar="TASK", help="run only these tasks' jobs")
    p.add_argument("--stage1", nargs="+", default=None, metavar="[TASK=]RUN",
                   help="finished `medmap pretrain` run(s) to use as the modality-aware stage 1 of every seed "
                   "instead of training it (TASK=RUN for grids with a stage-1 run per task); sets pretrain.run")
    p.add_argument("--dry-run", action="store_true", help="print the jobs and whether each is done; run nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing job")
    p.add_argument("--workers", type=int, default=1,
                   help="run jobs in this many processes at once (they share --out through claim files; "
                   "worker i > 0 logs to OUT/worker<i>.log)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per worker (default: the CPU count divided by --workers)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.errors import ConfigError
    from medmap.experiments.runner import run_grid, write_grid_tables
    from medmap.experiments.schema import load_experiment_config

    cfg = load_experiment_config(args.config)
    if args.stage1:
        link_stage1_runs(cfg, args.stage1)
    out = args.out or Path("runs") / "experiments" / str(cfg["name"])
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    workers = 1 if args.dry_run else args.workers
    threads = args.threads or (max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None)
    if threads:
        cfg.setdefault("run", {})["threads"] = threads
    helpers = _start_helper_workers(args, Path(out), workers - 1, threads) if workers > 1 else []
    try:
        report = run_grid(cfg, out, only=args.only, seeds=args.seeds, dry_run=args.dry_run, fail_fast=args.fail_fast,
                          tasks=args.tasks)
    finally:
        codes = [h.wait() for h in helpers]
    if helpers:  # the helpers may have finished runs after this process wrote the tables
        tables = write_grid_tables(cfg, out, args.seeds)
        print(f"tables: {tables['markdown']} and {tables['csv']}")
    return 1 if report.failed or any(codes) else 0


def link_stage1_runs(cfg: dict, specs: list[str]) -> None:
    """Set ``pretrain.run`` from ``--stage1`` values: ``RUN``, or ``TASK=RUN`` per task."""
    from medmap.errors import ConfigError
    from medmap.experiments.schema import check_pretrain_section

    pre = cfg["pretrain"] = dict(cfg.get("pretrain") or {})
    if isinstance(pre.get("config"), dict):  # a stage-1 run per task
        runs = {}
        for spec in specs:
            task, sep, path = spec.partition("=")
            if not sep:
                raise ConfigError(f"--stage1 {spec}: this grid has one stage-1 run per task; give TASK=RUN")
            runs[task] = path
        pre["run"] = runs
    elif len(specs) == 1 and specs[0].partition("=")[0] not in cfg["tasks"]:
        pre["run"] = specs[0]
    else:
        raise ConfigError(f"--stage1 {' '.join(specs)}: this grid has one stage-1 run for all tasks; give RUN alone")
    check_pretrain_section(cfg)


def _start_helper_workers(args: argparse.Namespace, out: Path, n: int, threads: int | None) -> list[subprocess.Popen]:
    """Start ``n`` more ``medmap experiment`` processes on the same folder (one worker each)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "medmap.cli.main", "experiment", str(args.config), "--out", str(out)]
    if args.only:
        cmd += ["--only", *args.only]
    if args.seeds:
        cmd += ["--seeds", *map(str, args.seeds)]
    if args.tasks:
        cmd += ["--tasks", *args.tasks]
    if args.stage1:
        cmd += ["--stage1", *args.stage1]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads or 1)}
    helpers = []
    for i in range(1, n + 1):
        log = (out / f"worker{i}.log").open("a")
        helpers.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        print(f"worker {i}: pid {helpers[-1].pid}, log {out / f'worker{i}.log'}")
    return helpers

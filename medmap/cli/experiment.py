"""``medmap experiment``: run a grid of ablations and baselines and write one results table.

Example::

    medmap experiment paper_grid --out runs/paper_grid            # run or continue the whole grid
    medmap experiment paper_grid --out runs/paper_grid --dry-run  # the plan, with done / todo
    medmap experiment paper_grid --out runs/paper_grid --only full no_csa --seeds 0
    medmap experiment my_grid.yaml --out runs/mine
"""

from __future__ import annotations

import argparse
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
    p.add_argument("--dry-run", action="store_true", help="print the jobs and whether each is done; run nothing")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failing job")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.experiments.grid import load_experiment_config, run_grid

    cfg = load_experiment_config(args.config)
    out = args.out or Path("runs") / "experiments" / str(cfg["name"])
    report = run_grid(cfg, out, only=args.only, seeds=args.seeds, dry_run=args.dry_run, fail_fast=args.fail_fast)
    return 1 if report.failed else 0

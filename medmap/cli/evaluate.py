"""``medmap evaluate``: metrics, report and plots of a fine-tuned run on one split.

Example::

    medmap evaluate runs/liver                       # test split, best checkpoint
    medmap evaluate runs/liver --drop-modality arterial   # robustness to a missing phase
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Sequence


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="evaluate a fine-tuned run (metrics.json, report.md, plots)",
        description="Top-1 and balanced accuracy, macro AUC and F1, per-class sensitivity/specificity, ECE, "
        "bootstrap 95%% CIs and the paper-style flattened one-hot accuracy, with confusion-matrix, ROC and "
        "calibration plots.",
    )
    p.add_argument("run_dir", type=Path, help="fine-tuning run folder")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--data", type=Path, default=None, help="study list (default: the run's own)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    p.add_argument("--drop-modality", action="append", default=[], metavar="NAME",
                   help="treat this modality as missing in every study (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default RUN_DIR/metrics/<split>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default=None, choices=["auto", "fp32", "bf16"],
                   help="autocast precision of the model (default: the run's training.precision; auto = float32 on CPUs, bf16 on GPUs that have it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.engines.evaluate import evaluate_run

    m = evaluate_run(args.run_dir, split=args.split, data=args.data, which=args.checkpoint, n_bootstrap=args.bootstrap,
                     drop_modalities=args.drop_modality, out_dir=args.out, device=args.device,
                     precision=args.precision)
    print_summary(f"{args.run_dir} on {args.split}", m,
                  ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece", "flattened_onehot_accuracy"))
    return 0


def print_summary(title: str, m: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Print ``metrics.json``-style results: each key with its bootstrap CI, then the report's path."""
    ci = m.get("ci", {})
    print(f"{title} (n={m['n']}):")
    for k in keys:
        v, lo_hi = m.get(k), ci.get(k)
        if v is None:
            print(f"  {k}: n/a")
        else:
            print(f"  {k}: {v:.4f}" + (f" [{lo_hi[0]:.4f}, {lo_hi[1]:.4f}]" if lo_hi else ""))
    print(f"report: {Path(m['output_dir']) / 'report.md'}")

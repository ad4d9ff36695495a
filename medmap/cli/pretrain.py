"""``medmap pretrain``: stage-1 modality-aware contrastive pre-training.

Example::

    medmap pretrain --data data/synth/studies.jsonl --config default --out runs/pretrain
    medmap pretrain --data data/synth/studies.jsonl --config default --out runs/pretrain --resume
    torchrun --nproc_per_node 2 -m medmap.cli.main pretrain --data ... --out ...   # DDP (gloo on CPU)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path



def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "pretrain",
        help="stage 1: modality-aware contrastive pre-training",
        description="Pre-train one 3D vision encoder per MRI modality against a frozen text encoder "
        "(asymmetric contrastive loss), then evaluate retrieval and zero-shot classification.",
    )
    p.add_argument("--data", required=True, type=Path, help="study list (JSON Lines)")
    p.add_argument("--config", default="default", help="built-in pretrain config name or YAML path (default: default)")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last, with RUN_DIR/config.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.epochs=5 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.config import resolve_run_config
    from medmap.engines.pretrain import run_pretraining

    cfg = resolve_run_config(args.config, "pretrain", args.overrides, args.out, args.resume)
    metrics = run_pretraining(cfg, args.data, args.out, resume=args.resume)
    if metrics:
        keys = [k for k in metrics if k.startswith("mean_") and "chance" not in k]
        print(json.dumps({k: round(metrics[k], 4) for k in keys}, indent=1))
        print(f"metrics written to {args.out / 'metrics'}")
    return 0

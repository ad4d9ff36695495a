"""``medmap finetune``: stage-2 fine-tuning (CSA + CCT + KL) with model selection on val.

Example::

    medmap finetune --data data/synth/studies.jsonl --organ liver --init runs/pretrain --out runs/liver
    medmap finetune --data ... --organ brain --config brain --set ablation.csa=false --out runs/brain_no_csa
    medmap finetune --out runs/liver --data ... --organ liver --resume
    torchrun --nproc_per_node 2 -m medmap.cli.main finetune --data ... --organ liver --out ...   # DDP
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medmap.config import load_organ_config, resolve_run_config
from medmap.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="stage 2: fine-tune for abnormality detection (CSA, CCT, KL)",
        description="Fine-tune MedMAP on one organ's labelled studies; the best epoch is selected on the "
        "validation split. The test split is not read (use `medmap evaluate`).",
    )
    p.add_argument("--data", required=True, type=Path, help="study list (JSON Lines)")
    p.add_argument("--organ", default=None, help="organ config name or YAML path (default: the config's 'organ')")
    p.add_argument("--config", default=None, help="built-in finetune config name or YAML path (default: the organ config's task name, "
                   "e.g. liver for liver_8mm_roi)")
    p.add_argument("--init", type=Path, default=None, help="stage-1 run folder (or .safetensors) to initialise the encoders")
    p.add_argument("--out", required=True, type=Path, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set training.epochs=5 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.engines.finetune import run_finetuning

    # default config: the organ's task name, so that a variant (liver_8mm_roi, brain_4mm) picks liver / brain
    name = args.config or (load_organ_config(args.organ).name if args.organ else None)
    if name is None and not args.resume:
        raise ConfigError("give --organ or --config")
    cfg = resolve_run_config(name or "", "finetune", args.overrides, args.out, args.resume)
    if args.organ and not (args.resume and (args.out / "config.yaml").is_file()):
        cfg["organ"] = args.organ
    summary = run_finetuning(cfg, args.data, args.out, resume=args.resume, init=args.init)
    if summary:
        print(json.dumps(summary, indent=1, default=str))
        print(f"validation report: {args.out / 'metrics' / 'val' / 'report.md'}")
    return 0

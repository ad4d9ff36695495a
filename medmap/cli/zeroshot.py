"""``medmap zeroshot``: classify studies with a stage-1 run from class prompts, no fine-tuning.

Example::

    medmap zeroshot runs/pretrain --data data/studies.jsonl --organ liver              # test split
    medmap zeroshot runs/pretrain --data data/studies.jsonl --organ brain --split val --out zs/
    medmap zeroshot runs/pretrain --data data/studies.jsonl --organ liver --prompts my_prompts.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "zeroshot",
        help="zero-shot classification with a stage-1 run (metrics.json, report.md, plots)",
        description="Score each study against the organ's class prompts with a pre-trained (stage-1) model, "
        "without fine-tuning, and write the same metrics, bootstrap 95%% CIs, report, plots and "
        "predictions.csv as 'medmap evaluate'.",
    )
    p.add_argument("run_dir", type=Path, help="stage-1 (pre-training) run folder")
    p.add_argument("--data", required=True, type=Path, help="study list (JSON Lines)")
    p.add_argument("--organ", required=True, help="organ (task) name the run was pre-trained on, e.g. liver")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"],
                   help="auto: checkpoints/best, else checkpoints/last")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default RUN_DIR/metrics/zeroshot_<organ>_<split>)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", default=None,
                   help="prompt set: a built-in name (liver, brain) or a YAML file of class descriptors "
                   "(docs/pretraining.md); default: the run's text.prompts, else the organ's")
    p.add_argument("--study-weight", type=float, default=None,
                   help="weight of the study embedding against impression-style prompts (default: the run's eval.zero_shot.study)")
    p.add_argument("--sequence-weight", type=float, default=None,
                   help="weight of each sequence against its own descriptors (default: the run's eval.zero_shot.sequences)")
    p.add_argument("--negatives", choices=["on", "off"], default=None,
                   help="subtract the negated prompts' similarity from each class's (default: the run's eval.zero_shot.negatives, off)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from medmap.cli.evaluate import print_summary
    from medmap.engines.pretrain import zero_shot_weights
    from medmap.engines.zeroshot import read_stage1_run, zero_shot_classify

    weights = None
    if args.study_weight is not None or args.sequence_weight is not None or args.negatives is not None:
        weights = zero_shot_weights(read_stage1_run(args.run_dir, args.checkpoint).cfg)
        changes = {"study": args.study_weight, "sequences": args.sequence_weight,
                   "negatives": None if args.negatives is None else args.negatives == "on"}
        weights = dataclasses.replace(weights, **{k: v for k, v in changes.items() if v is not None})
    m = zero_shot_classify(args.run_dir, args.data, args.organ, split=args.split, which=args.checkpoint,
                           n_bootstrap=args.bootstrap, batch_size=args.batch_size, out_dir=args.out, device=args.device,
                           prompts=args.prompts, weights=weights)
    print_summary(f"{args.run_dir} zero-shot, {args.organ} on {args.split}", m,
                  ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece"))
    return 0

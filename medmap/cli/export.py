"""``medmap export``: a self-contained, shareable model folder from a fine-tuning run.

Example::

    medmap evaluate runs/liver                        # optional: puts the test metrics in the model card
    medmap export runs/liver --out shared/liver_model
    medmap predict shared/liver_model t2wi=t2.nii.gz arterial=art.nii.gz   # on any machine
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a self-contained model folder (weights, configs, text bank, model card)",
        description="Copy what prediction needs out of a fine-tuning run: safetensors weights, config, organ "
        "config, text bank, a README.md model card (task, input, training data, test metrics, versions) and an "
        "export.json manifest (versions, SHA-256 of the files). 'medmap predict' and load_run() read the folder "
        "on any machine.",
    )
    p.add_argument("run_dir", type=Path, help="fine-tuning run folder")
    p.add_argument("--out", required=True, type=Path, help="folder to create (must be new or empty)")
    p.add_argument("--checkpoint", default="auto", choices=["auto", "best", "last"],
                   help="auto: checkpoints/best, else checkpoints/last")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.export import README_FILE, export_run

    m = export_run(args.run_dir, args.out, which=args.checkpoint)
    print(f"exported {m['organ']} model ({', '.join(m['classes'])}; checkpoint {m['checkpoint']}) to {args.out}")
    print(f"weights sha256 {m['weights']['sha256']}; model card: {Path(args.out) / README_FILE}")
    return 0

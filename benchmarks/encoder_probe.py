"""Can a stage-1 encoder see what the findings texts say? A supervised probe per modality.

Trains the stage-1 encoder architecture of a pre-training config (with its augmentation),
from random weights, plus a linear head on ``z_m``, to predict a ground-truth field of
MedMoM-Synth (``medmap.experiments.probe``), and prints validation accuracy against chance.

Usage::

    python benchmarks/encoder_probe.py runs/synth1000c/studies.jsonl --organ liver_8mm \
        --modalities t2wi,venous --targets location.segment,class \
        --config coarse --set encoder.arch.subunits=2 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from medmap.config import load_config
from medmap.experiments.probe import encoder_probe, probe_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_list")
    ap.add_argument("--organ", required=True, help="organ config, e.g. liver_8mm or brain_4mm")
    ap.add_argument("--modalities", required=True, help="comma-separated sequences to probe")
    ap.add_argument("--targets", default="location.segment", help="comma-separated: label or meta paths")
    ap.add_argument("--config", default="coarse", help="pre-training config giving encoder.arch and data.augment")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config, "pretrain", args.overrides)
    augment = (cfg.get("data") or {}).get("augment")
    augment = augment if augment and augment.get("enabled", True) else None
    results = []
    for modality in args.modalities.split(","):
        for target in args.targets.split(","):
            r = encoder_probe(args.study_list, args.organ, modality, target, cfg["encoder"]["arch"], augment,
                              epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                              log=lambda msg: print(f"[{modality} {target}] {msg}", file=sys.stderr, flush=True))
            results.append(r)
            print(probe_table([r]).splitlines()[-1], flush=True)
    print(probe_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

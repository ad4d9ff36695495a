"""``medmap synth``: generate the MedMoM-Synth benchmark, or preview one.

Examples::

    medmap synth --organ all --n 200 --out data/synth --seed 0
    medmap synth --organ liver --n 20 --out /tmp/tiny --config tiny
    medmap synth --preview data/synth          # PNG montages in data/synth/preview/
"""

from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "synth",
        help="generate the MedMoM-Synth benchmark (NIfTI volumes + studies.jsonl)",
        description="Generate synthetic multi-sequence brain and liver MRI studies with reports and ground truth.",
    )
    p.add_argument("--organ", choices=["brain", "liver", "all"], default="all", help="which task(s) to generate")
    p.add_argument("--n", type=int, default=200, help="number of studies per organ (default 200)")
    p.add_argument("--out", help="output folder (studies.jsonl and one folder per study)")
    p.add_argument("--seed", type=int, default=0, help="run seed; same seed and config give identical files")
    p.add_argument("--config", default=None, help="synth config: built-in name (default, tiny) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set liver.difficulty=0.5 (repeatable)")
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: config, 2)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--preview", metavar="DIR", default=None,
                   help="instead of generating, write PNG montages of the benchmark in DIR to DIR/preview/")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medmap.errors import ConfigError

    if args.preview:
        from medmap.data.synth.preview import write_previews

        for path in write_previews(args.preview):
            print(path)
        return 0
    if not args.out:
        raise ConfigError("medmap synth needs --out DIR (or --preview DIR)")
    from medmap.data.synth.generate import generate, load_synth_config

    cfg = load_synth_config(args.config, args.overrides)
    organs = ["brain", "liver"] if args.organ == "all" else [args.organ]
    t0 = time.perf_counter()
    path = generate(args.out, organs, args.n, seed=args.seed, config=cfg, workers=args.workers,
                    progress=not args.no_progress)
    print(f"wrote {path} ({args.n} studies x {len(organs)} organ(s)) in {time.perf_counter() - t0:.1f} s")
    return 0

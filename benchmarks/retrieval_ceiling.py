"""Stage-1 retrieval on MedMoM-Synth between its two reference points: chance and a ceiling.

The ceiling predicts each findings text's embedding from the generator's ground truth
(``medmap.experiments.ceiling``), so it shows how much of the text is recoverable at all from
what the volume contains. With ``--run``, a stage-1 run's held-out retrieval is printed next
to it, with the share of the way from chance to the ceiling that the run covered.

Usage::

    python benchmarks/retrieval_ceiling.py runs/synth1000c/studies.jsonl
    python benchmarks/retrieval_ceiling.py runs/synth1000c/studies.jsonl --run runs/s1_coarse --json ceiling.json
    python benchmarks/retrieval_ceiling.py runs/synth1000c/studies.jsonl --keys class,subtype,location

Uses the frozen text encoder's embedding cache next to the study list (the one stage 1 wrote),
so it takes about 10 s once a pre-training run has embedded the texts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from medmap.data.studylist import read_study_list  # noqa: E402
from medmap.text.cache import run_text_cache  # noqa: E402
from medmap.run_config import TextSection  # noqa: E402
from medmap.experiments.ceiling import retrieval_ceiling  # noqa: E402

KEYS = ("v2t_R@1", "v2t_R@5", "t2v_R@5", "v2t_R@10")


def _means(per_mod: dict[str, dict], mods: list[str]) -> dict[str, float]:
    return {k: float(np.mean([per_mod[m][k] for m in mods])) for k in KEYS + tuple(k + "_chance" for k in KEYS)}


def format_table(ceiling: dict[str, dict], run: dict[str, dict] | None = None) -> str:
    """Markdown: one row per modality and per organ mean, ``value (chance)`` cells."""
    head = "| organ | modality | " + " | ".join(f"ceiling {k}" for k in KEYS)
    head += (" | " + " | ".join(f"run {k}" for k in ("v2t_R@5", "t2v_R@5")) + " | run share of v2t R@5 |") if run else " |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    of_organ = {o: sorted(m for m, v in ceiling.items() if v["organ"] == o) for o in sorted({v["organ"] for v in ceiling.values()})}
    groups = [(o, m, [m]) for o, mods in of_organ.items() for m in mods]  # (organ, row name, modalities)
    groups += [(o, "mean", mods) for o, mods in of_organ.items()] + [("all", "mean", list(ceiling))]
    for organ, name, mods in groups:
        c = _means(ceiling, mods)
        cells = [f"{c[k]:.3f} ({c[k + '_chance']:.3f})" for k in KEYS]
        if run:
            have = [m for m in mods if m in run]
            if have:
                r = _means(run, have)
                share = (r["v2t_R@5"] - c["v2t_R@5_chance"]) / max(1e-9, c["v2t_R@5"] - c["v2t_R@5_chance"])
                cells += [f"{r['v2t_R@5']:.3f}", f"{r['t2v_R@5']:.3f}", f"{share:.0%}"]
            else:
                cells += ["-", "-", "-"]
        lines.append(f"| {organ} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study_list", type=Path, help="a `medmap synth` studies.jsonl")
    ap.add_argument("--eval-split", default="val", help="held-out split (default: val, as stage 1 evaluates)")
    ap.add_argument("--text-model", default=None, help="text encoder name or path (default: the project default)")
    ap.add_argument("--run", type=Path, default=None, help="a stage-1 run folder to compare (metrics/pretrain_val.json)")
    ap.add_argument("--keys", default=None,
                    help="comma-separated top-level meta keys to keep (e.g. class,subtype,location; 'artefacts' too)")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-modality ceiling here")
    args = ap.parse_args(argv)

    studies = read_study_list(args.study_list)
    cache = run_text_cache(TextSection(model=args.text_model), args.study_list.resolve().parent / ".medmap_cache" / "text")
    keys = None if args.keys is None else {k.strip() for k in args.keys.split(",") if k.strip()}
    ceiling = retrieval_ceiling(studies, cache, eval_split=args.eval_split, keys=keys)
    run = None
    if args.run is not None:
        run = json.loads((args.run / "metrics" / "pretrain_val.json").read_text())["retrieval"]
    print(format_table(ceiling, run))
    if args.json is not None:
        args.json.write_text(json.dumps(ceiling, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

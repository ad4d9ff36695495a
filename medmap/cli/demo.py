"""``medmap demo``: generate MedMoM-Synth, pre-train, fine-tune both organs, evaluate, summarise.

This is what ``make demo`` runs. Every stage is the same public function the individual
sub-commands call, driven by ``medmap/configs/demo/default.yaml``; finished stages are
skipped when the demo is run again with the same ``--out`` (delete the folder to start over).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from medmap.config import load_config


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the whole main job on a small synthetic benchmark",
        description="Generate a small MedMoM-Synth set, pre-train modality-aware encoders, fine-tune the "
        "brain and liver tasks, evaluate on the test split and print a summary.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    p.add_argument("--config", default="default", help="demo config name or YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=run)


def _stage(name: str) -> None:
    print(f"\n=== {name} ===", flush=True)


def run(args: argparse.Namespace) -> int:
    from medmap.data.synth.generate import generate, load_synth_config
    from medmap.data.validate import validate_study_list
    from medmap.engines.evaluate import evaluate_run
    from medmap.engines.finetune import run_finetuning
    from medmap.engines.pretrain import run_pretraining
    from medmap.engines.common import find_checkpoint
    from medmap.errors import MedMAPError

    cfg = load_config(args.config, "demo", args.overrides)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    seed = int(cfg.get("seed", 0))

    _stage("1/5 generate MedMoM-Synth")
    t = time.time()
    data_dir = out / "data"
    study_list = data_dir / "studies.jsonl"
    scfg = cfg["synth"]
    if not study_list.is_file():
        generate(data_dir, scfg["organs"], int(scfg["n"]), seed=seed,
                 config=load_synth_config(scfg.get("config"), scfg.get("overrides") or []))
    else:
        print(f"reusing {study_list}")
    timings["synth"] = time.time() - t

    _stage("2/5 validate the study list")
    problems = validate_study_list(study_list)
    if problems:
        for p in problems:
            print(p)
        raise MedMAPError(f"{len(problems)} problem(s) in {study_list}")
    print(f"{study_list}: OK")

    _stage("3/5 stage 1: modality-aware contrastive pre-training (both organs)")
    t = time.time()
    pre_dir = out / "pretrain"
    pcfg = load_config(cfg["pretrain"]["config"], "pretrain", cfg["pretrain"].get("overrides") or [])
    if find_checkpoint(pre_dir, "best") is None:
        run_pretraining(pcfg, study_list, pre_dir, resume=find_checkpoint(pre_dir, "last") is not None)
    pre_metrics = _read_json(next(iter(sorted((pre_dir / "metrics").glob("pretrain_*.json"))), None))
    timings["pretrain"] = time.time() - t

    rows: list[dict[str, Any]] = []
    for organ in ("brain", "liver"):
        _stage(f"4/5 stage 2: fine-tune {organ} (CSA + CCT + KL), select on val")
        t = time.time()
        fcfg_sec = cfg["finetune"][organ]
        fcfg = load_config(fcfg_sec["config"], "finetune", fcfg_sec.get("overrides") or [])
        run_dir = out / f"finetune_{organ}"
        if find_checkpoint(run_dir, "best") is None or not (run_dir / "metrics" / "finetune_summary.json").is_file():
            run_finetuning(fcfg, study_list, run_dir, resume=find_checkpoint(run_dir, "last") is not None, init=pre_dir)
        timings[f"finetune_{organ}"] = time.time() - t
        _stage(f"5/5 evaluate {organ} on the {cfg['evaluate']['split']} split")
        t = time.time()
        m = evaluate_run(run_dir, split=cfg["evaluate"]["split"], n_bootstrap=int(cfg["evaluate"]["bootstrap"]))
        timings[f"evaluate_{organ}"] = time.time() - t
        rows.append({"organ": organ, "n": m["n"], "classes": len(m["class_names"]), "m": m, "dir": m["output_dir"]})

    print("\n" + summary_table(rows, pre_metrics))
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print("reports and plots:")
    for r in rows:
        print(f"  {r['organ']}: {r['dir']}/report.md  (confusion_matrix.png, roc.png, reliability.png)")
    print(f"  pre-training: {pre_dir / 'metrics'}")
    return 0


def _read_json(path: Path | None) -> dict[str, Any]:
    if path is None or not path.is_file():
        return {}
    return json.loads(path.read_text())


def _fmt(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if v is None:
        return "n/a"
    ci = (m.get("ci") or {}).get(key)
    return f"{v:.3f}" + (f" [{ci[0]:.2f}-{ci[1]:.2f}]" if ci else "")


def summary_table(rows: list[dict[str, Any]], pre: dict[str, Any]) -> str:
    """A Markdown table of the test results (95% bootstrap CIs) and stage-1 retrieval."""
    lines = ["| task | n test | chance | accuracy | balanced acc. | macro AUC | macro F1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["m"]
        lines.append(f"| {r['organ']} ({r['classes']} classes) | {r['n']} | {1 / r['classes']:.3f} | {_fmt(m, 'accuracy')} | "
                     f"{_fmt(m, 'balanced_accuracy')} | {_fmt(m, 'macro_auc')} | {_fmt(m, 'macro_f1')} |")
    if pre:
        r1 = pre.get("mean_v2t_R@1")
        c1 = pre.get("mean_v2t_R@1_chance")
        r5 = pre.get("mean_v2t_R@5")
        c5 = pre.get("mean_v2t_R@5_chance")
        if r1 is not None:
            lines.append("")
            lines.append(f"stage 1, held-out volume-to-text retrieval (mean over modalities): "
                         f"R@1 {r1:.3f} (chance {c1 or 0:.3f}), R@5 {r5:.3f} (chance {c5 or 0:.3f})")
    return "\n".join(lines)

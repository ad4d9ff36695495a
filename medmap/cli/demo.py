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
from medmap.run_config import DemoConfig, DemoEvaluate, DemoTask, finetune_config, parse_run_config


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
    cfg: DemoConfig = parse_run_config(load_config(args.config, "demo", args.overrides), "demo")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    t = time.time()
    study_list = _synthesise(cfg, out / "data")
    timings["synth"] = time.time() - t

    rows: list[dict[str, Any]] = []
    for i, (task, tcfg) in enumerate(cfg.tasks.items(), start=1):
        rows.append(_run_task(task, tcfg, cfg.evaluate, study_list, out, f"{i}/{len(cfg.tasks)}", timings))

    print("\n" + summary_table(rows))
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print("reports and plots:")
    for r in rows:
        print(f"  {r['task']}: {r['dir']}/report.md  (confusion_matrix.png, roc.png, reliability.png)")
        print(f"  {r['task']} stage 1: {r['pretrain_dir'] / 'metrics'}")
    return 0


def _synthesise(cfg: DemoConfig, data_dir: Path) -> Path:
    """Generate the demo's MedMoM-Synth set (once) and validate it."""
    from medmap.data.synth.generate import generate, load_synth_config
    from medmap.data.validate import validate_study_list
    from medmap.errors import MedMAPError

    _stage("generate MedMoM-Synth")
    study_list = data_dir / "studies.jsonl"
    scfg = cfg.synth
    if not study_list.is_file():
        generate(data_dir, scfg.organs, scfg.n, seed=cfg.seed, config=load_synth_config(scfg.config, scfg.overrides))
    else:
        print(f"reusing {study_list}")
    _stage("validate the study list")
    problems = validate_study_list(study_list)
    if problems:
        for p in problems:
            print(p)
        raise MedMAPError(f"{len(problems)} problem(s) in {study_list}")
    print(f"{study_list}: OK")
    return study_list


def _run_task(task: str, tcfg: DemoTask, ecfg: DemoEvaluate, study_list: Path, out: Path,
              step: str, timings: dict[str, float]) -> dict[str, Any]:
    """Stage 1, stage 2 (selected on val), the test split, and the intensity baseline for one task."""
    from medmap.engines.common import find_checkpoint
    from medmap.engines.evaluate import evaluate_run
    from medmap.engines.finetune import run_finetuning
    from medmap.engines.pretrain import run_pretraining
    from medmap.experiments.baselines import run_intensity_baseline

    _stage(f"{step} {task}: stage 1, modality-aware contrastive pre-training")
    t = time.time()
    pre_dir = out / f"pretrain_{task}"
    pcfg = load_config(tcfg.pretrain.config, "pretrain", tcfg.pretrain.overrides)
    if find_checkpoint(pre_dir, "best") is None:
        run_pretraining(pcfg, study_list, pre_dir, resume=find_checkpoint(pre_dir, "last") is not None)
    pre_metrics = _read_json(next(iter(sorted((pre_dir / "metrics").glob("pretrain_*.json"))), None))
    timings[f"pretrain_{task}"] = time.time() - t

    _stage(f"{step} {task}: stage 2, fine-tune (CSA + CCT + KL), select on val")
    t = time.time()
    fcfg = load_config(tcfg.finetune.config, "finetune", tcfg.finetune.overrides)
    run_dir = out / f"finetune_{task}"
    if find_checkpoint(run_dir, "best") is None or not (run_dir / "metrics" / "finetune_summary.json").is_file():
        run_finetuning(fcfg, study_list, run_dir, resume=find_checkpoint(run_dir, "last") is not None, init=pre_dir)
    timings[f"finetune_{task}"] = time.time() - t

    _stage(f"{step} {task}: evaluate on the {ecfg.split} split, with the intensity baseline")
    t = time.time()
    n_boot = ecfg.bootstrap
    m = evaluate_run(run_dir, split=ecfg.split, n_bootstrap=n_boot)
    base = run_intensity_baseline(study_list, run_dir / "organ.yaml", out / f"intensity_{task}",
                                  seed=finetune_config(fcfg).training.seed, n_bootstrap=n_boot)
    timings[f"evaluate_{task}"] = time.time() - t
    return {"task": task, "m": m, "baseline": base, "pre": pre_metrics, "dir": m["output_dir"],
            "pretrain_dir": pre_dir}


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


def summary_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the test results (95% bootstrap CIs) next to chance and the
    intensity-statistics baseline, and each task's stage-1 retrieval against chance."""
    lines = ["| task | n test | chance | MedMAP balanced acc. | intensity baseline | MedMAP macro AUC | MedMAP macro F1 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        m, k = r["m"], len(r["m"]["class_names"])
        lines.append(f"| {r['task']} ({k} classes) | {m['n']} | {1 / k:.3f} | {_fmt(m, 'balanced_accuracy')} | "
                     f"{_fmt(r['baseline'], 'balanced_accuracy')} | {_fmt(m, 'macro_auc')} | {_fmt(m, 'macro_f1')} |")
    for r in rows:
        pre = r.get("pre") or {}
        if pre.get("mean_v2t_R@5") is not None:
            lines.append("")
            lines.append(f"{r['task']} stage 1, held-out volume-to-text retrieval (mean over sequences): "
                         f"R@1 {pre['mean_v2t_R@1']:.3f} (chance {pre.get('mean_v2t_R@1_chance') or 0:.3f}), "
                         f"R@5 {pre['mean_v2t_R@5']:.3f} (chance {pre.get('mean_v2t_R@5_chance') or 0:.3f})")
    return "\n".join(lines)

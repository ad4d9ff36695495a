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

from medmap.config import load_config, load_organ_config
from medmap.run_config import DemoConfig, DemoTask, finetune_config, parse_run_config


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
        rows.append(_run_task(task, tcfg, cfg, study_list, out, f"{i}/{len(cfg.tasks)}", timings))

    print("\n" + summary_table(rows))
    print("\nstage timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print("reports and plots:")
    for r in rows:
        print(f"  {r['task']}: {r['dir']}/report.md  (confusion_matrix.png, roc.png, reliability.png)")
        print(f"  {r['task']} zero-shot: {r['zero_shot']['output_dir']}/report.md")
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


def _run_task(task: str, tcfg: DemoTask, cfg: DemoConfig, study_list: Path, out: Path,
              step: str, timings: dict[str, float]) -> dict[str, Any]:
    """Stage 1 on every report, zero-shot, stage 2 on the task's labels (selected on val), the test
    split, and the baselines on the same labels, for one task."""
    from medmap.engines.common import find_checkpoint
    from medmap.engines.evaluate import evaluate_run
    from medmap.engines.finetune import run_finetuning
    from medmap.engines.pretrain import run_pretraining
    from medmap.engines.zeroshot import zero_shot_classify

    ecfg, per_class = cfg.evaluate, tcfg.labels_per_class
    labels = "every label" if per_class is None else f"{per_class} labelled studies per class"
    _stage(f"{step} {task}: stage 1, modality-aware pre-training on every training report")
    t = time.time()
    pre_dir = out / f"pretrain_{task}"
    pcfg = load_config(tcfg.pretrain.config, "pretrain", tcfg.pretrain.overrides)
    if find_checkpoint(pre_dir, "best") is None:
        run_pretraining(pcfg, study_list, pre_dir, resume=find_checkpoint(pre_dir, "last") is not None)
    pre_metrics = _read_json(next(iter(sorted((pre_dir / "metrics").glob("pretrain_*.json"))), None))
    fcfg = load_config(tcfg.finetune.config, "finetune", tcfg.finetune.overrides)
    organ_name = load_organ_config(finetune_config(fcfg).organ).name
    zs = zero_shot_classify(pre_dir, study_list, organ_name, split=ecfg.split, n_bootstrap=ecfg.bootstrap,
                            out_dir=out / f"zeroshot_{task}")
    timings[f"pretrain_{task}"] = time.time() - t

    _stage(f"{step} {task}: stage 2 from the zero-shot classifier on {labels}, select on val")
    t = time.time()
    if per_class is not None:
        fcfg.setdefault("data", {})["labels_per_class"] = per_class
    run_dir = out / f"finetune_{task}"
    if find_checkpoint(run_dir, "best") is None or not (run_dir / "metrics" / "finetune_summary.json").is_file():
        run_finetuning(fcfg, study_list, run_dir, resume=find_checkpoint(run_dir, "last") is not None, init=pre_dir)
    m = evaluate_run(run_dir, split=ecfg.split, n_bootstrap=ecfg.bootstrap)
    timings[f"finetune_{task}"] = time.time() - t

    _stage(f"{step} {task}: baselines on the same {labels}")
    t = time.time()
    baselines = _baselines(task, tcfg, fcfg, study_list, run_dir, out, ecfg.bootstrap)
    timings[f"baselines_{task}"] = time.time() - t
    return {"task": task, "m": m, "zero_shot": zs, "baselines": baselines, "pre": pre_metrics, "dir": m["output_dir"],
            "pretrain_dir": pre_dir, "labels": labels, "vs_best": _vs_best(m, baselines)}


def _baselines(task: str, tcfg: DemoTask, fcfg: dict[str, Any], study_list: Path, run_dir: Path, out: Path,
               n_boot: int) -> dict[str, dict[str, Any]]:
    """Intensity statistics and (when configured) the early-fusion CNN, on stage 2's labelled studies."""
    from medmap.experiments.baselines import run_cnn_baseline, run_intensity_baseline

    typed = finetune_config(fcfg)
    seed, per_class = typed.training.seed, tcfg.labels_per_class
    found = {"intensity statistics": run_intensity_baseline(study_list, run_dir / "organ.yaml", out / f"intensity_{task}",
                                                            seed=seed, n_bootstrap=n_boot, labels_per_class=per_class)}
    if tcfg.cnn is not None:
        t = typed.training
        ccfg = {"organ": str(run_dir / "organ.yaml"), "net": dict(tcfg.cnn.get("net") or {"name": "EarlyFusionCNN"}),
                "training": {"epochs": t.epochs, "batch_size": t.batch_size, "warmup_epochs": t.warmup_epochs,
                             "grad_clip": t.grad_clip, "seed": seed, **(tcfg.cnn.get("training") or {})},
                "data": {"augment": typed.data.augment, "labels_per_class": per_class}}
        found["early-fusion CNN"] = run_cnn_baseline(ccfg, study_list, out / f"cnn_{task}", n_boot)
    return found


def _vs_best(m: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """MedMAP minus the best baseline (balanced accuracy), with its paired bootstrap 95% CI."""
    from medmap.experiments.claims import paired_difference, read_predictions

    scored = {k: v for k, v in baselines.items() if v.get("balanced_accuracy") is not None}
    if not scored:
        return None
    name = max(scored, key=lambda k: scored[k]["balanced_accuracy"])
    classes = list(m["class_names"])
    _, ours = read_predictions(Path(m["output_dir"]) / "predictions.csv", classes)
    _, theirs = read_predictions(Path(scored[name]["output_dir"]) / "predictions.csv", classes)
    d = paired_difference({"0": ours}, {"0": theirs})
    return {"baseline": name, "difference": d.estimate, "ci": [d.ci_low, d.ci_high]}


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
    """Per task, a Markdown table of the test results (95% bootstrap CIs): zero-shot, MedMAP on the
    task's labels, every baseline on the same labels, chance; then MedMAP minus the best baseline
    (paired bootstrap) and stage 1's held-out retrieval against chance."""
    lines: list[str] = []
    for r in rows:
        m, k = r["m"], len(r["m"]["class_names"])
        lines += [f"{r['task']} ({k} classes, {m['n']} test studies; stage 2 and baselines on {r['labels']}):", "",
                  "| model | balanced acc. [95% CI] | macro AUC |", "|---|---|---|"]
        table = [("MedMAP zero-shot (stage 1, no labels)", r.get("zero_shot") or {}), ("MedMAP", m),
                 *r.get("baselines", {}).items(), ("chance", {"balanced_accuracy": 1 / k, "macro_auc": 0.5})]
        lines += [f"| {name} | {_fmt(x, 'balanced_accuracy')} | {_fmt(x, 'macro_auc')} |" for name, x in table if x]
        vs = r.get("vs_best")
        if vs:
            lines.append(f"\nMedMAP - {vs['baseline']}: {vs['difference']:+.3f} [{vs['ci'][0]:+.3f}, {vs['ci'][1]:+.3f}] "
                         "(paired bootstrap over the test studies)")
        pre = r.get("pre") or {}
        if pre.get("mean_v2t_R@5") is not None:
            lines.append(f"stage 1, held-out volume-to-text retrieval (mean over sequences): "
                         f"R@5 {pre['mean_v2t_R@5']:.3f} (chance {pre.get('mean_v2t_R@5_chance') or 0:.3f})")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"

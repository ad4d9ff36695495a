"""The demo's config names real stage configs, and its summary prints MedMAP next to chance and
the intensity baseline."""

from __future__ import annotations

import numpy as np

from medmap.cli.demo import summary_table
from medmap.config import load_config, load_organ_config


def test_demo_config_resolves_every_stage() -> None:
    cfg = load_config("default", "demo", [])
    assert set(cfg["tasks"]) == {"brain", "liver"}
    for task, tcfg in cfg["tasks"].items():
        pre = load_config(tcfg["pretrain"]["config"], "pretrain", tcfg["pretrain"]["overrides"])
        fine = load_config(tcfg["finetune"]["config"], "finetune", tcfg["finetune"]["overrides"])
        organ = load_organ_config(fine["organ"])
        assert organ.name == task
        # stage 2 initialises from stage 1, so both must build the same encoder
        assert pre["encoder"]["arch"] == fine["encoder"]["arch"]
        assert any(load_organ_config(o).name == task for o in pre["data"]["organs"])
    liver = load_config(cfg["tasks"]["liver"]["finetune"]["config"], "finetune", [])
    assert load_organ_config(liver["organ"]).lesion_level  # the demo's liver task is lesion-level


def test_summary_table_shows_zero_shot_medmap_baselines_and_chance() -> None:
    m = {"n": 45, "class_names": list("abcdefg"), "balanced_accuracy": 0.81, "macro_auc": 0.95,
         "macro_f1": 0.8, "ci": {"balanced_accuracy": [0.7, 0.9]}}
    zs = {"balanced_accuracy": 0.7, "macro_auc": 0.9, "ci": {"balanced_accuracy": [0.6, 0.8]}}
    base = {"intensity statistics": {"balanced_accuracy": 0.62, "ci": {"balanced_accuracy": [0.5, 0.75]}}}
    pre = {"mean_v2t_R@1": 0.05, "mean_v2t_R@1_chance": 0.01, "mean_v2t_R@5": 0.2, "mean_v2t_R@5_chance": 0.05}
    vs = {"baseline": "intensity statistics", "difference": 0.19, "ci": [0.05, 0.31]}
    table = summary_table([{"task": "liver", "m": m, "zero_shot": zs, "baselines": base, "pre": pre,
                            "labels": "5 labelled studies per class", "vs_best": vs}])
    lines = table.splitlines()
    assert lines[0] == "liver (7 classes, 45 test studies; stage 2 and baselines on 5 labelled studies per class):"
    assert "| MedMAP zero-shot (stage 1, no labels) | 0.700 [0.60-0.80] | 0.900 |" in lines
    assert "| MedMAP | 0.810 [0.70-0.90] | 0.950 |" in lines
    assert "| intensity statistics | 0.620 [0.50-0.75] | n/a |" in lines
    assert "| chance | 0.143 | 0.500 |" in lines
    assert "MedMAP - intensity statistics: +0.190 [+0.050, +0.310]" in table
    assert "R@5 0.200 (chance 0.050)" in table


def test_medmap_against_the_best_baseline_is_paired(tmp_path) -> None:
    from medmap.cli.demo import _vs_best
    from medmap.evaluation.report import write_predictions

    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    ours = np.eye(3)[y]  # always right
    theirs = np.eye(3)[[0, 1, 2, 1, 2, 0, 0, 1]]  # 5 of 8 right
    weak = np.eye(3)[[1, 2, 0, 1, 2, 0, 1, 2]]  # never right
    ids = [f"s{i}" for i in range(8)]
    for name, p in (("ours", ours), ("theirs", theirs), ("weak", weak)):
        (tmp_path / name).mkdir()
        write_predictions(tmp_path / name / "predictions.csv", ids, y, p, ["a", "b", "c"])
    m = {"class_names": ["a", "b", "c"], "output_dir": str(tmp_path / "ours")}
    baselines = {"weak": {"balanced_accuracy": 0.0, "output_dir": str(tmp_path / "weak")},
                 "theirs": {"balanced_accuracy": 0.611, "output_dir": str(tmp_path / "theirs")}}
    vs = _vs_best(m, baselines)
    assert vs["baseline"] == "theirs" and vs["difference"] > 0.3 and vs["ci"][0] <= vs["difference"] <= vs["ci"][1]

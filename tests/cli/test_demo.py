"""The demo's config names real stage configs, and its summary prints MedMAP next to chance and
the intensity baseline."""

from __future__ import annotations

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


def test_summary_table_shows_chance_and_baseline() -> None:
    m = {"n": 45, "class_names": list("abcdefg"), "balanced_accuracy": 0.81, "macro_auc": 0.95,
         "macro_f1": 0.8, "ci": {"balanced_accuracy": [0.7, 0.9]}}
    base = {"balanced_accuracy": 0.62, "ci": {"balanced_accuracy": [0.5, 0.75]}}
    pre = {"mean_v2t_R@1": 0.05, "mean_v2t_R@1_chance": 0.01, "mean_v2t_R@5": 0.2, "mean_v2t_R@5_chance": 0.05}
    table = summary_table([{"task": "liver", "m": m, "baseline": base, "pre": pre}])
    row = next(line for line in table.splitlines() if line.startswith("| liver"))
    assert "| 45 | 0.143 | 0.810 [0.70-0.90] | 0.620 [0.50-0.75] | 0.950 |" in row
    assert "R@5 0.200 (chance 0.050)" in table

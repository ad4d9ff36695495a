"""Organ configs: a ``base`` config with some keys replaced (the CPU-sized variants)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from medmap.config import load_config, load_organ_config
from medmap.errors import ConfigError


def test_variant_is_its_base_with_the_given_keys_replaced(tmp_path) -> None:
    brain, small = load_organ_config("brain"), load_organ_config("brain_4mm")
    assert small.spacing == (4.0, 4.0, 4.0) and small.roi_size == (40, 48, 40)
    d = small.to_dict()
    assert {**brain.to_dict(), "spacing": d["spacing"], "roi_size": d["roi_size"]} == d
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"base": "liver_8mm", "roi_size": [32, 32, 32]}))  # a base may have a base
    mine = load_organ_config(path)
    assert mine.name == "liver" and mine.spacing == (8.0, 8.0, 10.0) and mine.roi_size == (32, 32, 32)


def test_base_cycle_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump({"base": str(path)}))
    with pytest.raises(ConfigError, match="base"):
        load_organ_config(path)


def test_crop_is_foreground_unless_set_and_is_checked() -> None:
    from medmap.config import OrganConfig

    assert load_organ_config("liver_8mm").crop == "foreground"
    roi = load_organ_config("liver_8mm_roi")
    assert roi.crop == "roi_mask" and roi.name == "liver" and roi.spacing == (8.0, 8.0, 10.0)
    assert OrganConfig.from_dict(roi.to_dict()) == roi  # saved with a run, read back by medmap predict
    base = load_organ_config("liver").to_dict()
    with pytest.raises(ConfigError, match=r"'crop' must be one of foreground, roi_mask, lesion_box, patch, got 'liver'"):
        OrganConfig.from_dict({**base, "crop": "liver"})
    with pytest.raises(ConfigError, match=r"\['roi_mask'\] cannot name a modality"):
        OrganConfig.from_dict({**base, "modalities": ["t2wi", "roi_mask"], "modality_descriptors": {}})


def test_the_built_in_liver_task_is_lesion_level() -> None:
    from medmap.config import OrganConfig

    liver = load_organ_config("liver")
    assert liver.crop == "lesion_box" and liver.lesion_level and liver.patch_norm == "context"
    assert liver.margin_mm == (10.0, 10.0, 10.0) and liver.roi_size == (24, 24, 16)
    assert OrganConfig.from_dict(liver.to_dict()) == liver
    whole = load_organ_config("liver_whole")
    assert whole.name == "liver" and whole.crop == "foreground" and not whole.lesion_level
    with pytest.raises(ConfigError, match="'patch_norm' must be one of context, zscore"):
        OrganConfig.from_dict({**liver.to_dict(), "patch_norm": "ct_window"})
    with pytest.raises(ConfigError, match="'margin_mm' must be three"):
        OrganConfig.from_dict({**liver.to_dict(), "margin_mm": [1, 2]})


def test_zero_outside_roi_needs_the_roi_mask_crop() -> None:
    from medmap.config import OrganConfig

    masked = load_organ_config("liver_8mm_masked")
    assert masked.zero_outside_roi and masked.crop == "roi_mask" and masked.roi_size == (40, 32, 24)
    assert OrganConfig.from_dict(masked.to_dict()) == masked
    assert not load_organ_config("liver_8mm_roi").zero_outside_roi
    base = load_organ_config("liver").to_dict()
    with pytest.raises(ConfigError, match=r"'zero_outside_roi: true' needs 'crop: roi_mask'"):
        OrganConfig.from_dict({**base, "zero_outside_roi": True})
    with pytest.raises(ConfigError, match=r"'zero_outside_roi' must be true or false, got 'yes'"):
        OrganConfig.from_dict({**base, "crop": "roi_mask", "zero_outside_roi": "yes"})


@pytest.mark.parametrize("kind, override, message", [
    ("finetune", "training.epoch=5", "unknown config key 'training.epoch'; valid keys in 'training': "),
    ("finetune", "run.num_worker=2", "unknown config key 'run.num_worker'"),
    ("finetune", "bogus.x=1", "unknown config key 'bogus'; valid keys at the top level"),
    ("pretrain", "trainig.steps=3", "unknown config key 'trainig'"),
    ("finetune", "training.lr=abc", "config key 'training.lr' must be a number, got 'abc'"),
    ("finetune", "model.cct=3", "config key 'model.cct' is a section"),
])
def test_misspelt_keys_and_wrong_types_are_rejected(kind: str, override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config("tiny", kind, [override])


def test_valid_overrides_pass_and_numbers_parse_like_a_user_types_them() -> None:
    cfg = load_config("liver", "finetune", ["training.lr=1e-3", "run.threads=2", "encoder.arch={type: cnn, channels: [4]}"])
    assert cfg["training"]["lr"] == 1e-3 and cfg["run"]["threads"] == 2


def test_the_engines_check_before_writing_anything(tmp_path: Path) -> None:
    from medmap.engines.finetune import run_finetuning

    cfg = load_config("tiny", "finetune", [])
    cfg["training"]["epoch"] = 5  # as a Python caller might misspell it
    with pytest.raises(ConfigError, match="training.epoch"):
        run_finetuning(cfg, tmp_path / "studies.jsonl", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_retired_key_says_what_to_use_and_old_run_folders_still_load() -> None:
    from medmap.run_config import check_run_config

    with pytest.raises(ConfigError, match=r"'encoder.pretrained' is not read any more: pass the stage-1 run .* --init"):
        check_run_config({"encoder": {"arch": "cnn_patch", "pretrained": "runs/s1"}}, "finetune")
    check_run_config({"encoder": {"arch": "cnn_patch", "pretrained": None}}, "finetune")  # as older runs saved it


def test_a_run_config_with_a_base_holds_only_what_it_changes(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: liver\ntraining: {epochs: 20}\nmodel: {cct: {layers: 1}}\n")
    (tmp_path / "mine2.yaml").write_text("base: mine.yaml\nrun: {threads: 1}\n")  # a path next to this file
    cfg = load_config(tmp_path / "mine2.yaml", "finetune")
    liver = load_config("liver", "finetune")
    assert cfg["training"]["epochs"] == 20 and cfg["model"]["cct"]["layers"] == 1 and cfg["run"]["threads"] == 1
    assert cfg["training"]["lr"] == liver["training"]["lr"] and cfg["model"]["cct"]["self_attention"] is True
    assert "base" not in cfg
    (tmp_path / "typo.yaml").write_text("base: liver\ntraining: {epoch: 20}\n")
    with pytest.raises(ConfigError, match="unknown config key 'training.epoch'"):
        load_config(tmp_path / "typo.yaml", "finetune")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="'base' chain too long"):
        load_config(tmp_path / "a.yaml", "finetune")


def test_modality_aware_has_one_name_and_older_stage1_runs_still_load() -> None:
    from medmap.run_config import check_run_config
    from medmap.models.pretrain import is_modality_aware

    cfg = load_config("tiny", "pretrain", ["ablation.modality_aware=false"])
    assert "modality_aware" not in cfg["encoder"] and is_modality_aware(cfg) is False
    saved = {"encoder": {"arch": "cnn_small", "modality_aware": False}}  # a stage-1 run saved before the move
    check_run_config(saved, "pretrain")
    assert is_modality_aware(saved) is False and is_modality_aware({}) is True
    with pytest.raises(ConfigError, match="disagree"):
        check_run_config({**saved, "ablation": {"modality_aware": True}}, "pretrain")
    with pytest.raises(ConfigError, match="must be true or false"):
        check_run_config({"encoder": {"modality_aware": "yes"}}, "pretrain")

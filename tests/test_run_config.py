"""Typed run configs (medmap.run_config): one place for every default, every key checked."""

from __future__ import annotations

import dataclasses
import re

import pytest

from medmap.config import builtin_names, load_config
from medmap.errors import ConfigError
from medmap.models.medmap import MedMAPModelConfig
from medmap.run_config import RUN_CONFIG_TYPES, finetune_config, parse_run_config, pretrain_config


@pytest.mark.parametrize("kind", ["pretrain", "finetune", "demo"])
def test_every_shipped_config_parses(kind: str) -> None:
    for name in builtin_names(kind):
        typed = parse_run_config(load_config(name, kind), kind)
        assert isinstance(typed, RUN_CONFIG_TYPES[kind])


def test_missing_keys_take_the_one_default_and_given_ones_win() -> None:
    cfg = finetune_config({"organ": "liver", "training": {"epochs": 3}})
    assert cfg.training.epochs == 3 and cfg.training.grad_clip == 1.0 and cfg.training.lr == 3e-4
    assert cfg.model.cct.layers == 2 and cfg.ablation.text and cfg.data.augment is None
    stage1 = pretrain_config({})
    assert stage1.training.betas == [0.9, 0.98] and stage1.eval.ks == [1, 5, 10] and stage1.ablation.modality_aware


def test_the_model_section_defaults_are_the_model_config_defaults() -> None:
    """MedMAPModelConfig (the library's constructor) and the run config's model section agree."""
    assert MedMAPModelConfig.from_run_config({}) == MedMAPModelConfig()


@pytest.mark.parametrize("cfg, message", [
    ({"model": {"cct": {"layer": 1}}}, "unknown config key 'model.cct.layer'; valid keys in 'model.cct': layers, self_attention"),
    ({"training": {"epochs": 2.5}}, "config key 'training.epochs' must be an integer, got 2.5"),
    ({"training": {"betas": [0.9, "x"]}}, "config key 'training.betas' must be a list, got [0.9, 'x']"),
    ({"ablation": {"cct": 1}}, "config key 'ablation.cct' must be true or false, got 1"),
    ({"loss": {"class_weights": 3}}, "config key 'loss.class_weights' must be a string or a list or null, got 3"),
    ({"training": {"optimizer": "sgd"}}, "config key 'training.optimizer' is not read any more: the optimiser is always AdamW"),
    ({"data": []}, "config key 'data' is a section (augment, cache_dir, labels_per_class, stratified_batches), got []"),
])
def test_wrong_keys_and_values_say_what_is_valid(cfg: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        finetune_config(cfg)


def test_numbers_convert_like_a_user_types_them() -> None:
    cfg = finetune_config({"training": {"epochs": 5.0, "lr": 1, "warmup_epochs": 1}})
    assert cfg.training.epochs == 5 and isinstance(cfg.training.epochs, int)
    assert cfg.training.lr == 1.0 and isinstance(cfg.training.lr, float)


def test_older_run_folders_keep_loading() -> None:
    saved = {"encoder": {"arch": "cnn_patch", "pretrained": None}, "training": {"optimizer": "adamw"}}
    assert finetune_config(saved).encoder.arch == "cnn_patch"


def test_demo_tasks_are_typed() -> None:
    cfg = load_config("default", "demo")
    typed = parse_run_config(cfg, "demo")
    assert typed.tasks["liver"].finetune.config == "liver"
    with pytest.raises(ConfigError, match=re.escape("unknown config key 'tasks.brain.pretrain.confg'")):
        load_config("default", "demo", ["tasks.brain.pretrain.confg=x"])


def test_every_section_field_has_a_default() -> None:
    """A partial mapping (a user's ``base:`` file, a test, an older run) always parses."""
    for cls in RUN_CONFIG_TYPES.values():
        for f in dataclasses.fields(cls):
            assert f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING, f.name


def test_eval_batch_size_defaults_to_four_training_batches():
    from medmap.run_config import CNNTraining, FinetuneTraining, eval_batch_size

    assert eval_batch_size(finetune_config({}).training) == 4 * finetune_config({}).training.batch_size
    assert eval_batch_size(finetune_config({"training": {"batch_size": 3, "eval_batch_size": 5}}).training) == 5
    assert eval_batch_size(CNNTraining(batch_size=2)) == 8
    with pytest.raises(ConfigError, match="'training.eval_batch_size' must be at least 1"):
        eval_batch_size(FinetuneTraining(eval_batch_size=0))

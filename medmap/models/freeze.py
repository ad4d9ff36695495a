"""Few-label fine-tuning modes: which encoder weights train at each step of stage 2.

``training.mode`` (docs/method.md, "Few labels"):

* ``full``: every weight trains (the default with many labels);
* ``frozen_encoders``: the stage-1 encoders stay fixed; CSA, CCT and both heads train (a
  linear probe in spirit: what stage 1 learnt is kept, only what sits on top adapts);
* ``lp_ft``: ``frozen_encoders`` for the first ``training.lp_fraction`` of the steps, then
  ``full`` (linear probing then fine-tuning, Kumar et al., ICLR 2022: the heads are trained
  before the encoders move, so early random-head gradients do not distort the features);
* ``last_stages``: only the last ``training.trainable_stages`` stages of each encoder (and
  its token projection) train, the earlier ones stay fixed.

Freezing sets ``requires_grad`` (a frozen encoder costs no backward pass) and depends only on
the step, so ``--resume`` continues exactly.

Example:
    >>> model = torch.nn.Module(); model.encoders = torch.nn.Linear(2, 2); model.head = torch.nn.Linear(2, 2)
    >>> freeze = EncoderFreeze(model, "lp_ft", total_steps=10, lp_fraction=0.5)
    >>> freeze.apply(0); model.encoders.weight.requires_grad, model.head.weight.requires_grad
    (False, True)
    >>> freeze.apply(5); model.encoders.weight.requires_grad
    True
"""

from __future__ import annotations

import re

import torch
from torch import nn

from medmap.errors import ConfigError

FINETUNE_MODES = ("full", "frozen_encoders", "lp_ft", "last_stages")
_STAGE = re.compile(r"(?:^|\.)stages\.(\d+)\.")


def _frozen_names(model: nn.Module, mode: str, trainable_stages: int) -> list[str]:
    """Names (relative to ``model``) of the encoder parameters a mode freezes."""
    names = [f"encoders.{n}" for n, _ in model.encoders.named_parameters()]
    if mode in ("frozen_encoders", "lp_ft"):
        return names
    if mode == "last_stages":
        stages = [int(m.group(1)) for n in names if (m := _STAGE.search(n))]
        if not stages:
            raise ConfigError("training.mode: last_stages needs encoders built of stages (encoder type cnn or densenet)")
        first_trained = max(stages) + 1 - trainable_stages
        return [n for n in names if (m := _STAGE.search(n)) and int(m.group(1)) < first_trained]
    return []


class EncoderFreeze:
    """Applies a fine-tuning mode to ``model.encoders`` step by step (see the module docstring).

    Args:
        model: a model with an ``encoders`` module.
        mode: one of :data:`FINETUNE_MODES`.
        total_steps: the run's optimiser steps (``lp_ft`` switches at ``lp_fraction`` of them).
        lp_fraction: ``lp_ft`` only: the share of steps with frozen encoders.
        trainable_stages: ``last_stages`` only: how many of each encoder's last stages train.
    """

    def __init__(self, model: nn.Module, mode: str = "full", total_steps: int = 0, lp_fraction: float = 0.5,
                 trainable_stages: int = 1) -> None:
        if mode not in FINETUNE_MODES:
            raise ConfigError(f"training.mode must be one of {', '.join(FINETUNE_MODES)}, got {mode!r}")
        if not 0.0 <= lp_fraction <= 1.0:
            raise ConfigError(f"training.lp_fraction must lie in [0, 1], got {lp_fraction}")
        if trainable_stages < 0:
            raise ConfigError(f"training.trainable_stages must be >= 0, got {trainable_stages}")
        self.mode = mode
        self.switch_step = int(round(lp_fraction * total_steps)) if mode == "lp_ft" else None
        params = dict(model.named_parameters())
        self.frozen: list[torch.nn.Parameter] = [params[n] for n in _frozen_names(model, mode, trainable_stages)]

    def frozen_at(self, step: int) -> bool:
        """Whether the mode's parameters are frozen at optimiser step ``step`` (0-based)."""
        if not self.frozen:
            return False
        return self.switch_step is None or step < self.switch_step

    def apply(self, step: int) -> None:
        """Set ``requires_grad`` of the mode's parameters for step ``step``."""
        trainable = not self.frozen_at(step)
        for p in self.frozen:
            p.requires_grad_(trainable)


__all__ = ["EncoderFreeze", "FINETUNE_MODES"]

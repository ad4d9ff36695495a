"""One training loop for stage 1, stage 2 and the CNN baseline.

Each engine builds its model, data and optimiser, then hands :class:`TrainingLoop` a *step
function* (one batch -> loss and the values to log) and, optionally, a *validation function*
(-> score for model selection). The loop is written once:

* the epoch's random state: every epoch is seeded from ``(seed, epoch, rank)``, its data
  iterator created, the augmentation positioned and, for a run resumed mid-epoch, the saved
  RNG state restored (:func:`medmap.engines.common.position_epoch`), so ``--resume`` is
  bit-identical;
* the optimiser step: zero grad, backward, gradient clipping, optimiser and schedule step,
  and with ``ema_decay`` an exponential moving average of the weights (``torch.optim.swa_utils``)
  that validation and ``checkpoints/best`` use instead of the weights as trained;
* logging (every ``log_every`` steps: loss, learning rate, gradient norm, the step's values)
  and the progress bar;
* validation every ``validate_every_steps`` steps (stage 1) or at the end of every
  ``validate_every_epochs`` epochs and of the run (stage 2, the CNN), with the best score
  kept in ``checkpoints/best``;
* ``checkpoints/last`` every ``ckpt_every_steps`` steps and at the end of every
  ``ckpt_every_epochs`` epochs and of the run, written atomically on rank 0 (the others
  wait at a barrier).

Example::

    loop = TrainingLoop(run_dir, cfg, model, optimizer, scheduler, plan, info)
    logger = loop.start(find_checkpoint(run_dir, "last"))
    loop.run(lambda epoch, skip: iter(loader_for(epoch, skip)), step_fn, validate_fn, augment, sampler)
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from medmap.engines.common import (DistInfo, RunLogger, barrier, clip_gradients, load_checkpoint, position_epoch,
                                   progress_bar, save_checkpoint)
from medmap.errors import ConfigError
from medmap.precision import autocast_context
from medmap.utils import derive_seed, seed_everything


@dataclass(frozen=True)
class LoopPlan:
    """How long a run trains and when it logs, validates and checkpoints."""

    total_steps: int
    steps_per_epoch: int
    seed: int
    precision: str = "auto"
    grad_clip: float = 0.0
    log_every: int = 1
    validate_every_steps: int = 0
    validate_every_epochs: int = 0
    ckpt_every_steps: int = 0
    ckpt_every_epochs: int = 0
    select_metric: str = "score"
    ema_decay: float | None = None  # validate and save an exponential moving average of the weights
    validate_at_start: bool = False  # also validate the model before its first step (a stage-1 zero-shot start)

    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)


@dataclass
class StepResult:
    """What one training step returns: the loss to minimise and what to log next to it."""

    loss: Tensor
    logs: Mapping[str, float] = field(default_factory=dict)
    postfix: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Validation:
    """A validation result: the selection score, values to log and a line to print."""

    score: float
    logs: Mapping[str, float] = field(default_factory=dict)
    message: str = ""


class TrainingLoop:
    """The shared loop (see the module docstring).

    Args:
        run_dir: the run folder (``checkpoints/`` goes there).
        cfg: the run's config (its hash is stored with every checkpoint).
        model: the unwrapped model (clipped and checkpointed).
        optimizer / scheduler: built by the engine.
        plan: :class:`LoopPlan`.
        info: the process's place in a (possibly single-process) run.
        progress: show a progress bar (rank 0 only).
        desc: the progress bar's label.
        tensorboard: the run's logger also writes TensorBoard events.
    """

    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: Any, plan: LoopPlan, info: DistInfo, progress: bool = False, desc: str = "train",
                 tensorboard: bool = True) -> None:
        self.run_dir, self.cfg, self.model = Path(run_dir), cfg, model
        self.optimizer, self.scheduler, self.plan, self.info = optimizer, scheduler, plan, info
        self.progress, self.desc, self.tensorboard = progress and info.is_main, desc, tensorboard
        self.step, self.best_score, self.best_epoch = 0, -math.inf, -1  # best_epoch -1: none, or the starting model
        self.has_best = False
        self._started, self._elapsed_before = time.perf_counter(), 0.0
        self._resumed_rng: Mapping[str, Any] | None = None
        self.logger: RunLogger | None = None
        self.ema: AveragedModel | None = None
        if plan.ema_decay is not None:
            if not 0.0 < plan.ema_decay < 1.0:
                raise ConfigError(f"config key 'training.ema_decay' must be between 0 and 1 (exclusive), got {plan.ema_decay}")
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(plan.ema_decay), use_buffers=True)

    def elapsed(self) -> float:
        """Wall seconds of training so far (validation included, across resumptions), logged with
        every validation so that the time to an accuracy can be read from ``log.csv``."""
        return self._elapsed_before + time.perf_counter() - self._started

    def autocast(self) -> contextlib.AbstractContextManager:
        """The run's precision for a forward pass (``training.precision``)."""
        return autocast_context(self.plan.precision, self.info.device)

    def start(self, last: Path | None) -> RunLogger:
        """Start, or continue from a ``checkpoints/last`` folder; opens and returns the run's logger
        (rows an interrupted run logged after its checkpoint are dropped)."""
        if last is not None:
            state = load_checkpoint(last, self.model, self.optimizer, self.scheduler, config=self.cfg, restore_rng=False)
            self._resumed_rng = state.get("rng") if self.info.world_size == 1 else None  # mid-epoch: dropout continues
            self.step = int(state["step"])
            extra = dict(state.get("extra") or {})
            self.best_score = float(extra.get("best_score", -math.inf))
            self.best_epoch = int(extra.get("best_epoch", -1))
            self.has_best = bool(extra.get("has_best", self.best_epoch >= 0))
            self._elapsed_before = float(extra.get("elapsed_s", 0.0))  # time to accuracy spans interruptions
            if self.ema is not None and extra.get("ema") is not None:
                self.ema.load_state_dict(extra["ema"])
        self._started = time.perf_counter()
        self.logger = RunLogger(self.run_dir, enabled=self.info.is_main, resume_step=self.step if last is not None else None,
                                tensorboard=self.tensorboard)
        return self.logger

    # ---------------------------------------------------------------- the loop
    def run(self, epoch_batches: Callable[[int, int], Iterator[Any]], step_fn: Callable[[Any], StepResult],
            validate: Callable[[], Validation | None] | None = None, augment: Any = None, sampler: Any = None) -> None:
        """Train until ``plan.total_steps``.

        Args:
            epoch_batches: ``(epoch, skip) -> iterator`` over this rank's batches of the epoch
                without its first ``skip`` (created right after the epoch is seeded).
            step_fn: one batch -> :class:`StepResult` (the forward pass and the loss).
            validate: runs on rank 0 -> :class:`Validation` (``None``: nothing to validate).
            augment / sampler: positioned for a resumed epoch (augmentation draws continue).
        """
        if self.logger is None:
            raise RuntimeError("TrainingLoop.start() must be called before run()")
        plan = self.plan
        bar = progress_bar(plan.total_steps, initial=self.step, enabled=self.progress, desc=self.desc)
        if plan.validate_at_start and self.step == 0:
            self._validate(validate, -1, bar)  # a model that starts as a classifier competes for best
        while self.step < plan.total_steps:
            epoch, skip = divmod(self.step, plan.steps_per_epoch)
            seed_everything(derive_seed(plan.seed, epoch, self.info.rank))
            batches = epoch_batches(epoch, skip)  # creating the iterator draws from the global RNG
            position_epoch(augment, sampler, epoch, skip, self._resumed_rng)
            self._resumed_rng = None
            self.model.train()
            for batch in batches:
                self._optimise(step_fn(batch), epoch, bar)
                final = self.step >= plan.total_steps
                end = self.step % plan.steps_per_epoch == 0 or final
                validated_at_end = end and (final or _every(plan.validate_every_epochs, epoch))
                if plan.validate_every_steps and self.step % plan.validate_every_steps == 0 and not validated_at_end:
                    self._validate(validate, epoch, bar)
                if plan.ckpt_every_steps and self.step % plan.ckpt_every_steps == 0 and not (end and self._epoch_ckpt(epoch)):
                    self._save_last(epoch)
                if final:
                    break
            if self.step >= plan.total_steps or _every(plan.validate_every_epochs, epoch):
                self._validate(validate, epoch, bar)  # the final model is always validated
            if self._epoch_ckpt(epoch):
                self._save_last(epoch + 1)
        bar.close()

    def _epoch_ckpt(self, epoch: int) -> bool:
        """Whether ``checkpoints/last`` is written at the end of ``epoch``."""
        return self.step >= self.plan.total_steps or _every(self.plan.ckpt_every_epochs, epoch)

    def _optimise(self, out: StepResult, epoch: int, bar: Any) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        grad_norm = clip_gradients(self.model, self.plan.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        self.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{out.loss.item():.4f}", epoch=epoch, **out.postfix)
        if self.step % self.plan.log_every == 0 or self.step == self.plan.total_steps:
            self.logger.log(self.step, {"loss": out.loss.item(), "lr": self.scheduler.get_last_lr()[0],
                                        "grad_norm": grad_norm, **out.logs})

    def _validate(self, validate: Callable[[], Validation | None] | None, epoch: int, bar: Any) -> None:
        if validate is None:
            return
        was_training = self.model.training
        if self.info.is_main:
            with self.averaged_weights():
                result = validate()
                self._record(result, epoch, bar)  # the best checkpoint holds the weights validated
        self.model.train(was_training)  # validation switches to eval mode; the epoch goes on training
        barrier(self.info)

    @contextlib.contextmanager
    def averaged_weights(self) -> Iterator[None]:
        """Inside: the model holds the moving average of its weights (when ``plan.ema_decay``
        is set and at least one step was taken); the trained weights come back after."""
        if self.ema is None or int(self.ema.n_averaged) == 0:
            yield
            return
        live = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.ema.module.state_dict())
        try:
            yield
        finally:
            self.model.load_state_dict(live)

    def _record(self, result: Validation | None, epoch: int, bar: Any) -> None:
        """Log a validation and keep ``checkpoints/best`` when it improved."""
        if result is None:
            return
        self.logger.log(self.step, {"epoch": epoch, **result.logs, "elapsed_s": self.elapsed()})
        improved = result.score > self.best_score or not self.has_best  # an undefined score still leaves a best
        if result.message:
            when = f"epoch {epoch + 1}/{self.plan.epochs()}" if epoch >= 0 else "before training"
            bar.write(f"{when}: {result.message}" + (" (best)" if improved else ""))
        if improved:
            self.best_score, self.best_epoch, self.has_best = result.score, epoch, True
            save_checkpoint(self.run_dir / "checkpoints" / "best", self.model, step=self.step, epoch=max(epoch, 0),
                            config=self.cfg, extra={"best_score": self.best_score, "best_epoch": epoch, "has_best": True,
                                                    "metric": self.plan.select_metric})

    def _save_last(self, epoch: int) -> None:
        if self.info.is_main:
            save_checkpoint(self.run_dir / "checkpoints" / "last", self.model, self.optimizer, self.scheduler,
                            step=self.step, epoch=epoch, config=self.cfg,
                            extra={"best_score": self.best_score, "best_epoch": self.best_epoch, "has_best": self.has_best,
                                   "elapsed_s": self.elapsed(),
                                   "ema": self.ema.state_dict() if self.ema is not None else None})
        barrier(self.info)


def _every(n: int, epoch: int) -> bool:
    return n > 0 and (epoch + 1) % n == 0

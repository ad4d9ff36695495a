"""The shared training loop: training mode after a validation inside an epoch, and a validation
before the first step that competes for the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from medmap.engines.common import DistInfo, find_checkpoint, load_checkpoint
from medmap.engines.trainer import LoopPlan, StepResult, TrainingLoop, Validation


def _loop(tmp_path: Path, **plan: object) -> tuple[TrainingLoop, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    loop = TrainingLoop(tmp_path, {"x": 1}, model, opt, sched, LoopPlan(seed=0, **plan), DistInfo(device=torch.device("cpu")),
                        tensorboard=False)
    loop.start(None)
    return loop, model


def test_training_mode_comes_back_after_a_validation_inside_an_epoch(tmp_path: Path) -> None:
    loop, model = _loop(tmp_path, total_steps=6, steps_per_epoch=6, validate_every_steps=2, validate_every_epochs=1)
    modes: list[bool] = []

    def step(batch: torch.Tensor) -> StepResult:
        modes.append(model.training)
        return StepResult(model(batch).pow(2).mean())

    def validate() -> Validation:
        model.eval()  # as predict_probabilities does
        return Validation(0.0)

    loop.run(lambda epoch, skip: iter([torch.randn(4, 3) for _ in range(6 - skip)]), step, validate)
    assert modes == [True] * 6  # without the fix, steps 3-6 ran in eval mode (dropout off)


def test_validation_before_the_first_step_can_stay_best(tmp_path: Path) -> None:
    loop, model = _loop(tmp_path, total_steps=4, steps_per_epoch=2, validate_every_epochs=1, validate_at_start=True)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.9, 0.5, 0.6])  # the starting model is the best of the three validations

    loop.run(lambda epoch, skip: iter([torch.randn(4, 3) for _ in range(2 - skip)]),
             lambda b: StepResult(model(b).pow(2).mean()), lambda: Validation(next(scores)))
    assert loop.best_score == 0.9 and loop.best_epoch == -1 and loop.has_best
    best = find_checkpoint(tmp_path, "best")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5), torch.nn.Linear(3, 1))
    load_checkpoint(best, fresh, restore_rng=False)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in start.items())

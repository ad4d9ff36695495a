"""``medmap finetune`` argument handling (the engine itself is tested in tests/engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmap.cli.main import main


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    seen: list[dict] = []

    def fake_run_finetuning(cfg, data, out, resume=False, init=None):  # noqa: ANN001
        seen.append(cfg)
        return {}

    monkeypatch.setattr("medmap.engines.finetune.run_finetuning", fake_run_finetuning)
    return seen


@pytest.mark.parametrize("organ", ["liver", "liver_8mm_roi", "brain_4mm"])
def test_an_organ_variant_picks_its_task_config(organ: str, captured: list[dict], tmp_path: Path) -> None:
    """--organ liver_8mm_roi without --config uses the liver fine-tuning config (there is no
    finetune config named liver_8mm_roi), with the variant as its organ."""
    assert main(["finetune", "--data", "x.jsonl", "--organ", organ, "--out", str(tmp_path / "run")]) == 0
    assert captured[-1]["organ"] == organ
    assert captured[-1]["ablation"]["csa"] is True  # a whole fine-tuning config was loaded


def test_an_unknown_organ_is_a_clear_error(captured: list[dict], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--data", "x.jsonl", "--organ", "kidney", "--out", str(tmp_path / "run")]) == 2
    assert "kidney" in capsys.readouterr().err and not captured

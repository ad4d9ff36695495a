"""Precision picked per machine (medmap.precision)."""

from __future__ import annotations

import pytest
import torch

import medmap.precision
from medmap.precision import autocast_context, resolve_precision


def test_autocast_follows_the_precision() -> None:
    with autocast_context("fp32", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    with autocast_context("bf16", torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", torch.device("cpu"))


@pytest.mark.parametrize("native_bf16", [False, True])
def test_auto_is_float32_on_every_cpu_and_bf16_on_gpus_with_it(monkeypatch: pytest.MonkeyPatch, native_bf16: bool) -> None:
    # native bf16 units did not make a MedMAP step 2x faster (module docstring): auto stays float32
    monkeypatch.setattr(medmap.precision, "bf16_is_fast_on_cpu", lambda: native_bf16)
    assert resolve_precision("auto", torch.device("cpu")) is None
    assert resolve_precision("bf16", torch.device("cpu")) is torch.bfloat16  # still available when asked for
    # no float16 without a gradient scaler: a GPU without bf16 trains in float32 under auto
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) is torch.bfloat16


def test_bf16_is_native_only_with_avx512_bf16_or_amx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(medmap.precision, "cpu_flags", lambda: {"avx2", "avx512f"})
    assert medmap.precision.bf16_is_fast_on_cpu() is False
    monkeypatch.setattr(medmap.precision, "cpu_flags", lambda: {"avx2", "amx_bf16"})
    assert medmap.precision.bf16_is_fast_on_cpu() is True

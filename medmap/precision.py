"""Numeric precision, picked per machine: one place for the training engines, the baselines and
inference.

``precision: auto`` means bfloat16 autocast on GPUs that support it and float32 on every CPU.
bfloat16 is picked where it pays, which the project counts as a training step at least
:data:`BF16_PAYS` times faster than float32; on a CPU it did not for any MedMAP encoder kind:

* CPUs without native bfloat16 (AVX2, plain AVX-512) emulate it: 3-13x *slower* than float32;
* a CPU with native bfloat16 (AVX-512 BF16, AMD EPYC Zen 5; ``medmap bench --sections threads``,
  2026-12-02) runs a bfloat16 matmul about 4x faster, but a whole fine-tuning step only
  0.65-0.9x as fast (liver, ``cnn_patch`` encoders), 0.97-1.13x (brain, ``cnn_brain``) and
  1.64-1.92x (``vit_small``) in three runs: the 3D convolutions, norms and casts gain little;
* on an AMX Xeon the brain fine-tuning step ran at 5.5 studies/s in bfloat16 against 5.9 in
  float32 (issue 21).

``precision: bf16`` still trains in bfloat16 autocast on any CPU, for whoever wants that gain.
``fp16`` is accepted but never chosen by ``auto`` (it would need a gradient scaler).

Example:
    >>> import torch
    >>> resolve_precision("fp32", torch.device("cpu")) is None
    True
    >>> with autocast_context("fp32", torch.device("cpu")):
    ...     y = torch.ones(2) * 2
"""

from __future__ import annotations

import contextlib

import torch


#: bfloat16 must make a training step at least this much faster than float32 to be worth picking
BF16_PAYS = 2.0


def bf16_is_fast_on_cpu() -> bool:
    """True when this CPU has native bfloat16 matrix units (AMX or AVX-512 BF16).

    On CPUs without them, bfloat16 matmuls are emulated and far slower than float32 (measured
    on an AVX2-only AMD EPYC: 0.3 vs 129 GFLOP/s); with them, a bfloat16 matmul is several
    times faster (AVX-512 BF16 EPYC: 679-802 vs 173-191 GFLOP/s), though a MedMAP step is not (see the
    module docstring). Reported by ``medmap bench``.
    """
    flags = cpu_flags()
    if flags is not None:
        # oneDNN also reports bf16 "supported" on plain AVX-512 CPUs, where it is emulated: measured
        # on an AVX-512 Xeon without avx512_bf16, a MedMAP liver step took 100 ms in bf16 vs 60 in fp32
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover - very old torch builds
        return False


def cpu_flags() -> set[str] | None:
    """The CPU feature flags from ``/proc/cpuinfo`` (Linux), or ``None`` where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Map ``auto|fp32|bf16|fp16`` to an autocast dtype (``None`` = no autocast)."""
    precision = precision.lower()
    if precision in ("fp32", "float32", "32"):
        return None
    if precision in ("bf16", "bfloat16"):
        return torch.bfloat16
    if precision in ("fp16", "float16", "16"):
        return torch.float16
    if precision == "auto":
        if device.type == "cuda":  # float16 would need a gradient scaler; without bf16, train in float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
        return None  # no CPU made a MedMAP step BF16_PAYS times faster in bf16 (module docstring)
    raise ValueError(f"unknown precision '{precision}'; use auto, fp32, bf16 or fp16")


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``auto|fp32|bf16|fp16`` (see :func:`resolve_precision`).

    ``auto`` means bf16 on GPUs that support it and fp32 on CPUs (see the module docstring).
    """
    dtype = resolve_precision(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


#: CPU feature flags that decide which kernels float32 and bfloat16 run on
KERNEL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def cpu_kernel_info() -> dict[str, object]:
    """Which CPU kernel paths this machine gives PyTorch, and what ``precision: auto`` picks here.

    ``capability`` is the vector ISA PyTorch's own kernels were dispatched to (``AVX2``,
    ``AVX512``, ...); ``flags`` the :data:`KERNEL_FLAGS` the CPU reports; ``mkldnn_*`` whether
    oneDNN (convolutions, bf16 matmuls) is built in and switched on; ``native_bf16`` the
    bfloat16 matrix units (:func:`bf16_is_fast_on_cpu`).
    """
    flags = cpu_flags()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # pragma: no cover - torch < 2.1
        capability = "unknown"
    auto = resolve_precision("auto", torch.device("cpu"))
    return {"capability": capability,
            "flags": {f: (f in flags) for f in KERNEL_FLAGS} if flags is not None else None,
            "mkldnn_available": bool(torch.backends.mkldnn.is_available()),
            "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
            "native_bf16": bf16_is_fast_on_cpu(),
            "precision_auto": "bfloat16" if auto is torch.bfloat16 else "float32"}

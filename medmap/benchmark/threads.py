"""Bench section ``threads``: what the thread count and the precision cost a fine-tuning step.

Two tables (``python -m medmap.benchmark --sections threads``):

* the liver fine-tuning step (``configs/finetune/liver.yaml``, float32) at 1 and 2 torch
  threads, at PyTorch's default and at what ``run.threads: auto`` picks (:mod:`medmap.threads`),
  on the machine as it is ("idle": nothing of ours running besides the bench) and while a
  subprocess spins one core ("busy"), with the fastest setting and whether ``auto`` chose it;
* which CPU kernel paths this machine offers (ISA, oneDNN, native bf16: ``machine_info()``),
  which convolution kernel the CNN encoders actually ran, and one encoder training step
  (one study's volumes, forward + backward) per encoder kind (``cnn_patch``, the brain config's ``densenet_brain``,
  ``vit_small``) in float32 and in bfloat16 autocast, plus the whole fine-tuning step of a
  config per encoder kind in both: the evidence for ``precision: auto`` (float32 on CPUs; bf16
  would have to make the step at least 2x faster to pay, :data:`medmap.precision.BF16_PAYS`).

Figures are printed and stored in ``res["threads"]``; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from medmap.benchmark.sections import DEVICE, FinetuneSetup, _encoder_step, _fmt_s, machine_info, time_calls
from medmap.config import load_config, load_organ_config
from medmap.models.encoders import build_encoder
from medmap.precision import BF16_PAYS, resolve_precision
from medmap.threads import ThreadDecision, decide_threads

#: thread counts always timed (besides PyTorch's default and what ``auto`` picks)
THREAD_COUNTS = (1, 2)
#: convolution ops that only dispatch (the kernel that ran is the other ``aten::*conv*`` op)
_DISPATCH_OPS = {"aten::conv1d", "aten::conv2d", "aten::conv3d", "aten::convolution", "aten::_convolution",
                 "aten::convolution_backward"}


def make_setup() -> FinetuneSetup:
    """The stage-2 set-up the thread table times (the liver config)."""
    return FinetuneSetup("liver")


def encoder_cases() -> list[tuple[str, Any, tuple[int, ...], int]]:
    """``(kind, arch, roi, volumes)`` per encoder kind, each at the ROI of the config that uses it."""
    liver = load_organ_config(load_config("liver", "finetune")["organ"])
    brain_ft = load_config("brain", "finetune")
    brain = load_organ_config(brain_ft["organ"])
    brain_1mm = load_organ_config("brain")  # vit_small's 16^3 patches tile the 80x96x80 brain ROI
    brain_arch = str(brain_ft["encoder"]["arch"])
    return [("cnn_patch", "cnn_patch", tuple(liver.roi_size), len(liver.modalities)),
            (brain_arch, brain_arch, tuple(brain.roi_size), len(brain.modalities)),
            ("vit_small", "vit_small", tuple(brain_1mm.roi_size), len(brain_1mm.modalities))]


def step_cases() -> list[tuple[str, str, list[str]]]:
    """``(kind, fine-tuning config, overrides)``: a whole fine-tuning step per encoder kind.

    ``vit_small`` runs in the brain config at 1 mm (its 16^3 patches tile that ROI), with
    sequence tokens fused by sequence: the sequence exchange needs CNN encoders.
    """
    vit = ["encoder.arch=vit_small", "organ=brain", "model.sequence_exchange=false", "model.token_fusion=sequence"]
    brain_arch = str(load_config("brain", "finetune")["encoder"]["arch"])
    return [("cnn_patch", "liver", []), (brain_arch, "brain", []), ("vit_small", "brain", vit)]


@contextlib.contextmanager
def spinning_core(settle_s: float = 0.3) -> Iterator[subprocess.Popen]:
    """A subprocess that keeps one core busy for the block (killed afterwards, whatever happens)."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(settle_s)  # let it start spinning before anything is measured
        yield proc
    finally:
        proc.kill()
        proc.wait()


def time_thread_counts(setup: FinetuneSetup, counts: list[int], iters: int) -> dict[int, float]:
    """Median float32 step time of ``setup`` at each torch thread count."""
    batch = setup.random_batch()
    out = {}
    for n in counts:
        torch.set_num_threads(n)
        out[n] = time_calls(lambda: setup.step(*batch), iters)["median_s"]
    return out


def thread_row(setup: FinetuneSetup, load: str, iters: int, default_threads: int) -> dict[str, Any]:
    """One row of the thread table: ``auto``'s decision and the step time per thread count under ``load``."""
    with spinning_core() if load == "busy" else contextlib.nullcontext():
        decision: ThreadDecision = decide_threads()
        counts = sorted({*THREAD_COUNTS, decision.threads, default_threads})
        times = time_thread_counts(setup, counts, iters)
    fastest = min(times, key=times.__getitem__)
    # auto is right when its pick is the fastest or within 10% of it (timings are noisy)
    right = times[decision.threads] <= 1.1 * times[fastest]
    return {"load": load, "auto": decision.threads, "auto_decision": decision.describe(),
            "busy_cores_measured": decision.busy, "step_s": times, "fastest": fastest, "auto_is_fastest": right}


@contextlib.contextmanager
def _stderr_silenced() -> Iterator[None]:
    """Silence file descriptor 2 for the block: PyTorch 2.13's profiler prints a ``USDT: ...
    profiler_start/stop`` line from C++ at each use, which would clutter the bench's output."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def conv_kernels(model: nn.Module, x: Tensor, precision: str) -> list[str]:
    """The convolution kernels one training step of ``model`` ran (``aten::mkldnn_convolution`` = oneDNN)."""
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        _encoder_step(model, x, precision)
    return sorted({e.key for e in prof.key_averages()
                   if e.key.startswith("aten::") and "conv" in e.key and e.key not in _DISPATCH_OPS})


def _print_precision_row(label: str, row: dict[str, Any]) -> None:
    convs = row.get("conv_kernels")
    conv = f"; conv kernels fp32 {', '.join(convs['fp32']) or '-'}, bf16 {', '.join(convs['bf16']) or '-'}" if convs else ""
    print(f"  {label:44s} fp32 {_fmt_s(row['fp32_s']):>8s}  bf16 {_fmt_s(row['bf16_s']):>8s}"
          f"  {row['bf16_speedup']:.2f}x ({'pays' if row['bf16_pays'] else 'does not pay'}){conv}")


def step_precision_row(organ: str, overrides: list[str], iters: int, bf16_iters: int) -> dict[str, Any]:
    """float32 vs bfloat16 autocast for one whole fine-tuning step (``FinetuneSetup.step``)."""
    setup = FinetuneSetup(organ, overrides)
    batch = setup.random_batch()
    fp32 = time_calls(lambda: setup.step(*batch, "fp32"), iters)["median_s"]
    setup.make_optimizer()
    bf16 = time_calls(lambda: setup.step(*batch, "bf16"), bf16_iters)["median_s"]
    return {"config": organ, "overrides": overrides, "batch_size": setup.batch_size, "fp32_s": fp32, "bf16_s": bf16,
            "bf16_speedup": fp32 / bf16, "bf16_pays": fp32 / bf16 >= BF16_PAYS}


def precision_row(kind: str, arch: Any, roi: tuple[int, ...], volumes: int, iters: int, bf16_iters: int) -> dict[str, Any]:
    """float32 vs bfloat16 autocast for one encoder training step of ``kind``."""
    torch.manual_seed(0)
    enc = build_encoder(arch, roi).train()
    x = torch.randn(volumes, 1, *roi)
    fp32 = time_calls(lambda: _encoder_step(enc, x), iters)["median_s"]
    bf16 = time_calls(lambda: _encoder_step(enc, x, "bf16"), bf16_iters)["median_s"]
    row: dict[str, Any] = {"roi": list(roi), "volumes": volumes, "fp32_s": fp32, "bf16_s": bf16,
                           "bf16_speedup": fp32 / bf16, "bf16_pays": fp32 / bf16 >= BF16_PAYS}
    if any(isinstance(m, nn.Conv3d) for m in enc.modules()):
        row["conv_kernels"] = {"fp32": conv_kernels(enc, x, "fp32"), "bf16": conv_kernels(enc, x, "bf16")}
    return row


def _print_kernels(k: dict[str, Any]) -> None:
    flags = k.get("flags")
    isa = ", ".join(f"{f} {'yes' if v else 'no'}" for f, v in flags.items()) if flags is not None else "flags unknown"
    print(f"  CPU kernels: torch capability {k['capability']}; {isa}; oneDNN "
          f"{'available' if k['mkldnn_available'] else 'missing'}, {'enabled' if k['mkldnn_enabled'] else 'disabled'}; "
          f"native bf16 {'yes' if k['native_bf16'] else 'no'} -> precision auto = {k['precision_auto']}")


def section_threads(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Liver fine-tuning step by thread count (idle and one core busy), then bf16 vs fp32 per encoder kind."""
    iters = int(getattr(args, "iters", None) or (2 if getattr(args, "quick", False) else 3))
    bf16_iters = int(getattr(args, "bf16_iters", None) or 1)
    default_threads = torch.get_num_threads()
    out: dict[str, Any] = {"default_threads": default_threads, "iters": iters}
    setup = make_setup()
    print(f"\n== Threads: fine-tuning step ({setup.cfg['encoder']['arch'] if isinstance(setup.cfg['encoder']['arch'], str) else 'inline arch'}, "
          f"batch {setup.batch_size}, float32) by torch threads; 'idle' = as found (other jobs included), 'busy' = plus a subprocess spinning one core ==")
    try:
        rows = [thread_row(setup, load, iters, default_threads) for load in ("idle", "busy")]
    finally:
        torch.set_num_threads(default_threads)
    counts = sorted({n for r in rows for n in r["step_s"]})
    print("  " + f"{'load':6s}" + "".join(f"{f'{n} thr':>10s}" for n in counts) + "  fastest  auto")
    for r in rows:
        cells = "".join(f"{_fmt_s(r['step_s'][n]):>10s}" if n in r["step_s"] else f"{'-':>10s}" for n in counts)
        verdict = "fastest" if r["fastest"] == r["auto"] else ("within 10%" if r["auto_is_fastest"] else "NOT fastest")
        print(f"  {r['load']:6s}{cells}  {r['fastest']:>7d}  {r['auto']} ({verdict}; {r['auto_decision']})")
    out["rows"] = rows

    kernels = (res.get("machine") or {}).get("kernels") or machine_info()["kernels"]
    out["kernels"] = kernels
    print(f"\n== Precision per encoder kind: one study's volumes, forward+backward, fp32 vs bf16 autocast "
          f"(torch threads {rows[0]['auto']} = auto without the spinner) ==")
    _print_kernels(kernels)
    auto_dtype = resolve_precision("auto", DEVICE)
    torch.set_num_threads(rows[0]["auto"])
    try:
        per_kind = {kind: precision_row(kind, arch, roi, volumes, iters, bf16_iters)
                    for kind, arch, roi, volumes in encoder_cases()}
        for kind, row in per_kind.items():
            _print_precision_row(f"{kind} encoder, {row['volumes']} x {tuple(row['roi'])}", row)
        steps = {kind: step_precision_row(organ, overrides, iters, bf16_iters) for kind, organ, overrides in step_cases()}
        for kind, row in steps.items():
            _print_precision_row(f"{kind}: whole {row['config']} step, batch {row['batch_size']}", row)
    finally:
        torch.set_num_threads(default_threads)
    out["precision"], out["precision_steps"] = per_kind, steps
    picks_bf16 = auto_dtype is torch.bfloat16
    wrong = [k for k, r in steps.items() if r["bf16_pays"] != picks_bf16]
    out["precision_auto"] = "bfloat16" if picks_bf16 else "float32"
    out["precision_auto_wrong_for"] = wrong
    verdict = ("right for every kind" if not wrong else
               f"bf16 would pay (>= {BF16_PAYS:.0f}x) for: {', '.join(wrong)}" if not picks_bf16 else
               f"bf16 is < {BF16_PAYS:.0f}x faster for: {', '.join(wrong)}")
    print(f"  precision auto picks {out['precision_auto']} here (native bf16: "
          f"{'yes' if kernels['native_bf16'] else 'no'}); judged on the whole steps: {verdict}")
    res["threads"] = out

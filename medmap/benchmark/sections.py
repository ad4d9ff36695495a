"""Speed and memory of MedMAP's default configurations on this machine.

Prints (and with ``--json`` writes) figures; nothing is asserted. Sections:

* ``peak``: this CPU's measured matmul peak in float32 and bfloat16 (the reference for
  "achieved fraction of peak");
* ``finetune``: stage-2 training steps/s and studies/s of ``configs/finetune/<organ>.yaml``
  (encoder arch and batch size from the config), parameters, model FLOPs per study
  (``torch.utils.flop_counter.FlopCounterMode``), achieved FLOP/s, peak resident memory, in
  float32 and bfloat16 autocast;
* ``pretrain``: the same for stage 1 (``configs/pretrain/default.yaml``), one organ per step;
* ``predict``: latency of ``load_run(...).predict`` on a synthetic 4-sequence brain study
  written as NIfTI (1 mm 182x218x182, or 2 mm 99x117x95 with ``--quick``), preprocessing and
  model separately, from a freshly initialised run folder;
* ``data``: with the preprocessing cache warm, DataLoader time per batch vs compute per step;
* ``naive``: fine-tuning throughput of the optimised set-up (reshape + linear patch
  embedding, fused AdamW, warm preprocessing cache) against a naive float32 baseline of the
  same model (``nn.Conv3d`` patch embedding, PyTorch's default AdamW loop, every study
  preprocessed from NIfTI at every step);
* ``knobs``: what encoder width/depth, thread count, channels-last and bfloat16 change for
  one encoder's training step;
* ``compile``: ``torch.compile`` of one encoder, in a subprocess with a time limit.

Model throughput uses random tensors of each organ's ROI shape with every modality present
(synthetic inputs; speed does not depend on the values) and a random text bank of the
text encoder's width (384).

Usage:
    medmap bench --quick
    python -m medmap.benchmark [--quick] [--iters N] [--sections ...] [--json perf.json]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import nibabel as nib
import numpy as np
import torch
import yaml
from safetensors.torch import save_model
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from medmap.config import OrganConfig, load_config, load_organ_config
from medmap.data.cache import PreprocessCache
from medmap.data.dataset import StudyDataset, collate_studies
from medmap.data.studylist import Study
from medmap.engines.common import build_adamw, clip_gradients, save_resolved_config
from medmap.inference import ORGAN_FILE, StoredTextBank, load_run, save_text_bank
from medmap.losses.contrastive import build_contrastive_loss
from medmap.losses.finetune import build_medmap_loss
from medmap.models.encoders import PatchEmbed3d, build_encoder
from medmap.models.medmap import build_medmap_classifier
from medmap.models.pretrain import build_pretrain_model
from medmap.precision import autocast_context, bf16_is_fast_on_cpu, resolve_precision
from medmap.utils import atomic_write_text

TEXT_DIM = 384  # all-MiniLM-L6-v2
DEVICE = torch.device("cpu")
PREDICTION_TARGET_S = 2.0
NAIVE_TARGET_RATIO = 3.0


# --------------------------------------------------------------------------- measuring
def current_rss_mb() -> float:
    """Resident memory of this process now (MiB)."""
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextlib.contextmanager
def peak_rss() -> Iterator[dict[str, float]]:
    """Peak resident memory (MiB) inside the block.

    Resets the kernel's high-water mark (``/proc/self/clear_refs``) when allowed, so each
    block gets its own peak; otherwise reports the process-wide peak so far.
    """
    out: dict[str, float] = {}
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        out["scope"] = "block"  # type: ignore[assignment]
    except OSError:
        out["scope"] = "process"  # type: ignore[assignment]
    try:
        yield out
    finally:
        hwm = None
        with contextlib.suppress(OSError), open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) / 1024
        out["peak_rss_mb"] = hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def time_calls(fn: Callable[[], Any], iters: int, warmup: int = 1) -> dict[str, float]:
    """Median and min wall time of ``fn`` over ``iters`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, iters)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "n": len(times)}


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of the matmuls, convolutions and attention ``fn`` runs (FlopCounterMode)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, max_call_s: float = 0.5) -> dict[str, Any]:
    """Best matmul throughput (GFLOP/s) over square sizes and transformer-like shapes.

    Square sizes grow until one call takes ``max_call_s``. The ``(m, k, n)`` shapes of a
    ViT's linear layers (600 tokens, width 192/768) are tried too: where bf16 is emulated its
    speed depends strongly on the shape, and the model's own matmuls must not beat "peak".
    """
    best: dict[str, Any] = {"gflops": 0.0, "shape": None}

    def probe(m: int, k: int, n: int) -> float:
        a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
        t0 = time.perf_counter()
        a @ b  # warm-up (and the size probe)
        first = time.perf_counter() - t0
        t = time_calls(lambda: a @ b, 1 if first > max_call_s / 2 else 3, warmup=0)["min_s"]
        gflops = 2 * m * k * n / t / 1e9
        if gflops > best["gflops"]:
            best.update(gflops=gflops, shape=f"{m}x{k}x{n}")
        return first

    for n in (128, 256, 512, 1024, 2048):
        if probe(n, n, n) > max_call_s:
            break
    for m, k, n in ((600, 192, 768), (600, 768, 192)):
        probe(m, k, n)
    return best


def _fmt_s(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


# --------------------------------------------------------------------------- model set-ups
def synthetic_text_bank(organ: OrganConfig, prompts: int = 2, seed: int = 0) -> StoredTextBank:
    """A random text bank of the frozen text encoder's width (no text model is loaded)."""
    g = torch.Generator().manual_seed(seed)
    return StoredTextBank(
        classes=list(organ.classes),
        modalities=list(organ.modalities),
        class_emb=torch.randn(organ.num_classes, prompts, TEXT_DIM, generator=g),
        class_mask=torch.ones(organ.num_classes, prompts, dtype=torch.bool),
        modality_emb=torch.randn(len(organ.modalities), TEXT_DIM, generator=g),
        text_model="random (benchmark)",
    )


class FinetuneSetup:
    """The stage-2 model, loss and optimiser of a fine-tuning config, as the engine builds them.

    Args:
        organ_name: ``brain`` or ``liver`` (also the config name).
        overrides: ``key=value`` config overrides.
    """

    def __init__(self, organ_name: str, overrides: list[str] | None = None) -> None:
        torch.manual_seed(0)
        self.cfg = load_config(organ_name, "finetune", overrides or [])
        self.organ = load_organ_config(self.cfg["organ"])
        self.bank = synthetic_text_bank(self.organ)
        self.model = build_medmap_classifier(self.organ, self.cfg, TEXT_DIM).train()
        self.loss_fn = build_medmap_loss(self.cfg, self.organ.num_classes)
        tcfg = self.cfg["training"]
        self.batch_size = int(tcfg["batch_size"])
        self.grad_clip = float(tcfg.get("grad_clip") or 0)
        self.make_optimizer()

    def make_optimizer(self, naive: bool = False) -> None:
        """The engines' AdamW (:func:`build_adamw`), or PyTorch's default per-parameter loop (``naive``)."""
        lr = float(self.cfg["training"]["lr"])
        groups = self.model.parameter_groups(lr, float(self.cfg["training"]["weight_decay"]))
        self.optimizer = torch.optim.AdamW(groups, lr=lr) if naive else build_adamw(groups, lr=lr)

    def random_batch(self, batch_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
        b = batch_size or self.batch_size
        g = torch.Generator().manual_seed(1)
        images = torch.randn(b, len(self.organ.modalities), *self.organ.roi_size, generator=g)
        present = torch.ones(b, len(self.organ.modalities), dtype=torch.bool)
        return images, present, torch.arange(b) % self.organ.num_classes

    def forward_loss(self, images: Tensor, present: Tensor, labels: Tensor, precision: str) -> Tensor:
        with autocast_context(precision, DEVICE):
            out = self.model(images, present, self.bank)
        loss, _ = self.loss_fn({k: (v.float() if torch.is_tensor(v) else v) for k, v in out.items()}, labels)
        return loss

    def step(self, images: Tensor, present: Tensor, labels: Tensor, precision: str = "fp32") -> float:
        """One optimiser step, exactly as ``medmap.engines.finetune`` takes it."""
        loss = self.forward_loss(images, present, labels, precision)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(self.model, self.grad_clip)
        self.optimizer.step()
        return loss.item()


class ConvPatchEmbed3d(nn.Module):
    """The naive patch embedding: ``nn.Conv3d`` with ``kernel_size == stride == patch``.

    Built from a :class:`PatchEmbed3d` with the same weights, so both compute the same
    function (checked in :func:`swap_to_conv_patch_embedding`).
    """

    def __init__(self, linear_embed: PatchEmbed3d) -> None:
        super().__init__()
        p, lin = linear_embed.patch, linear_embed.proj
        in_ch = lin.in_features // p**3
        self.conv = nn.Conv3d(in_ch, lin.out_features, kernel_size=p, stride=p)
        with torch.no_grad():  # Linear's input order is (c, px, py, pz): Conv3d's weight layout
            self.conv.weight.copy_(lin.weight.reshape(lin.out_features, in_ch, p, p, p))
            self.conv.bias.copy_(lin.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


def swap_to_conv_patch_embedding(model: nn.Module) -> tuple[int, float]:
    """Replace every :class:`PatchEmbed3d` in ``model`` by an equivalent ``Conv3d``.

    Returns the number of modules swapped and the largest output difference on a test input.
    """
    swaps = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
             if isinstance(child, PatchEmbed3d)]
    max_diff = 0.0
    for parent, name, child in swaps:
        conv = ConvPatchEmbed3d(child)
        p = child.patch
        x = torch.randn(1, conv.conv.in_channels, 2 * p, 3 * p, 2 * p)
        with torch.no_grad():
            max_diff = max(max_diff, float((conv(x) - child(x)).abs().max()))
        setattr(parent, name, conv)
    return len(swaps), max_diff


# --------------------------------------------------------------------------- sections
def section_peak(res: dict[str, Any]) -> None:
    print("\n== Matmul peak of this CPU (best of square and ViT-linear shapes) ==")
    out = {}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out[name] = matmul_peak(dtype)
        print(f"  {name:9s} {out[name]['gflops']:8.1f} GFLOP/s  (best shape m x k x n = {out[name]['shape']})")
    out["native_bf16"] = bf16_is_fast_on_cpu()
    out["precision_auto_picks"] = str(resolve_precision("auto", DEVICE) or "float32").replace("torch.", "")
    print(f"  native bf16 (oneDNN): {out['native_bf16']}; precision 'auto' picks {out['precision_auto_picks']}")
    res["peak"] = out


def _throughput_row(label: str, step_s: float, batch: int, flops_per_study: int, peak_gflops: float,
                    rss: float, params: int) -> dict[str, Any]:
    achieved = flops_per_study * batch / step_s / 1e9
    row = {"label": label, "step_s": step_s, "steps_per_s": 1 / step_s, "studies_per_s": batch / step_s,
           "batch": batch, "train_gflop_per_study": flops_per_study / 1e9, "achieved_gflops": achieved,
           "fraction_of_peak": achieved / peak_gflops if peak_gflops else None, "peak_rss_mb": rss, "params": params}
    frac = f"{100 * row['fraction_of_peak']:.0f}%" if row["fraction_of_peak"] is not None else "n/a"
    print(f"  {label:32s} {row['steps_per_s']:7.3f} steps/s {row['studies_per_s']:7.2f} studies/s  step {_fmt_s(step_s):>8s}"
          f"  {achieved:6.1f} GFLOP/s ({frac} of peak)  peak RSS {rss:6.0f} MiB")
    return row


def _machine_peak(res: Mapping[str, Any]) -> float:
    """The CPU's best measured matmul rate in any precision: the "peak" of every FLOP/s fraction.

    (On CPUs with emulated bf16, the bf16 probe is far below the float32 one, and parts of a
    bf16-autocast model, such as oneDNN convolutions, run faster than the emulated matmul.)
    """
    p = res.get("peak") or {}
    return max((p.get(k) or {}).get("gflops", 0.0) for k in ("float32", "bfloat16"))


def section_finetune(res: dict[str, Any], organs: list[str], iters: int, bf16_iters: int) -> None:
    print("\n== Stage 2 fine-tuning (configs/finetune/<organ>.yaml; synthetic ROI-shaped tensors, all modalities) ==")
    peak, out = _machine_peak(res), {}
    for organ_name in organs:
        s = FinetuneSetup(organ_name)
        params = sum(p.numel() for p in s.model.parameters())
        one = s.random_batch(1)
        with torch.no_grad():
            s.model.eval()
            fwd = count_flops(lambda: s.model(one[0], one[1], s.bank))
            s.model.train()
        train = count_flops(lambda: s.forward_loss(*one, "fp32").backward())
        s.optimizer.zero_grad(set_to_none=True)
        arch = s.cfg["encoder"]["arch"]
        print(f" {organ_name}: arch {arch}, {len(s.organ.modalities)} modalities, ROI {tuple(s.organ.roi_size)}, "
              f"batch {s.batch_size}, {params / 1e6:.2f} M parameters, {fwd / 1e9:.2f} GFLOP forward / study, "
              f"{train / 1e9:.2f} GFLOP forward+backward / study")
        rows = []
        batch = s.random_batch()
        with peak_rss() as mem:
            t = time_calls(lambda: s.step(*batch, "fp32"), iters)
        rows.append(_throughput_row("float32", t["median_s"], s.batch_size, train, peak, mem["peak_rss_mb"], params))
        s.make_optimizer()
        small = s.random_batch(1)
        with peak_rss() as mem:
            t = time_calls(lambda: s.step(*small, "bf16"), bf16_iters)
        rows.append(_throughput_row("bfloat16 autocast (batch 1)", t["median_s"], 1, train, peak, mem["peak_rss_mb"], params))
        out[organ_name] = {"arch": arch, "params": params, "modalities": len(s.organ.modalities),
                           "roi_size": list(s.organ.roi_size), "batch_size": s.batch_size,
                           "forward_gflop_per_study": fwd / 1e9, "train_gflop_per_study": train / 1e9, "rows": rows}
    res["finetune"] = out


def section_pretrain(res: dict[str, Any], iters: int) -> None:
    print("\n== Stage 1 pre-training (configs/pretrain/default.yaml; synthetic tensors; one organ per step) ==")
    torch.manual_seed(0)
    cfg = load_config("default", "pretrain")
    organs = {name: load_organ_config(name) for name in cfg["data"]["organs"]}
    model = build_pretrain_model(cfg, organs, TEXT_DIM).train()
    loss_fn = build_contrastive_loss(cfg, model)
    optimizer = build_adamw(model.parameters(), lr=float(cfg["training"]["lr"]))
    bsz = int(cfg["training"]["batch_size"])
    params = sum(p.numel() for p in model.parameters())
    peak = _machine_peak(res)
    out: dict[str, Any] = {"arch": cfg["encoder"]["arch"], "params": params, "batch_size": bsz, "organs": {}}
    print(f"  arch {out['arch']}, {params / 1e6:.2f} M parameters (encoders for every modality of {', '.join(organs)}), batch {bsz}")

    for name, organ in organs.items():
        def make(b: int) -> tuple[Tensor, ...]:
            m = len(organ.modalities)
            g = torch.Generator().manual_seed(2)
            images = torch.randn(b, m, *organ.roi_size, generator=g)
            present = torch.ones(b, m, dtype=torch.bool)
            emb = torch.randn(b, m, TEXT_DIM, generator=g)
            ids = torch.arange(b * m).view(b, m)  # every findings text distinct
            return images, present, emb, ids

        def loss_of(batch: tuple[Tensor, ...]) -> Tensor:
            images, present, emb, ids = batch
            with autocast_context("fp32", DEVICE):
                o = model(images, present, organ.modalities, emb)
            pi = o["pair_index"]
            return loss_fn(o["v"].float(), o["t"].float(), ids[pi[:, 0], pi[:, 1]], o["modality"], o["logit_scale"].float())

        def step(batch: tuple[Tensor, ...]) -> None:
            loss = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            clip_gradients(model, float(cfg["training"].get("grad_clip") or 0))
            optimizer.step()

        flops = count_flops(lambda: loss_of(make(2)).backward()) / 2  # per study (the loss needs 2 to contrast)
        optimizer.zero_grad(set_to_none=True)
        batch = make(bsz)
        with peak_rss() as mem:
            t = time_calls(lambda: step(batch), iters)
        row = _throughput_row(f"{name} step, float32", t["median_s"], bsz, int(flops), peak, mem["peak_rss_mb"], params)
        out["organs"][name] = row
    res["pretrain"] = out


def write_brain_study(root: Path, quick: bool, seed: int = 0) -> dict[str, Path]:
    """A synthetic 4-sequence head study as int16 ``.nii.gz`` at a realistic scanner size.

    1 mm MNI-sized grid (182 x 218 x 182), or 2 mm (99 x 117 x 95) with ``quick``; an
    ellipsoidal head (scalp, skull, brain, ventricles) with a different contrast per sequence.
    """
    root.mkdir(parents=True, exist_ok=True)
    shape, mm = ((99, 117, 95), 2.0) if quick else ((182, 218, 182), 1.0)
    rng = np.random.default_rng(seed)
    axes = [(np.arange(s, dtype=np.float32) - (s - 1) / 2) * mm for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    r = np.sqrt((x / 70) ** 2 + (y / 90) ** 2 + (z / 75) ** 2)
    vent = np.sqrt((x / 12) ** 2 + (y / 25) ** 2 + (z / 15) ** 2) < 1
    affine = np.diag([mm, mm, mm, 1.0])
    affine[:3, 3] = [-(s - 1) / 2 * mm for s in shape]
    contrast = {"t1": (600, 80, 500, 150), "t1ce": (620, 80, 520, 160), "t2": (400, 60, 450, 900), "flair": (450, 60, 480, 120)}
    paths = {}
    for mod, (scalp, skull, brain, csf) in contrast.items():
        vol = np.where(r < 0.9, brain, np.where(r < 0.95, skull, np.where(r < 1.0, scalp, 0))).astype(np.float32)
        vol[vent & (r < 0.9)] = csf
        vol += rng.normal(0, 15, shape).astype(np.float32) * (r < 1.0)
        paths[mod] = root / f"{mod}.nii.gz"
        nib.save(nib.Nifti1Image(np.clip(vol, 0, None).astype(np.int16), affine), paths[mod])
    return paths


def make_run_folder(run_dir: Path, setup: FinetuneSetup) -> Path:
    """A freshly initialised fine-tuning run folder that :func:`medmap.inference.load_run` accepts."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(run_dir, setup.cfg)
    atomic_write_text(run_dir / ORGAN_FILE, yaml.safe_dump(setup.organ.to_dict(), sort_keys=False))
    save_text_bank(setup.bank, run_dir, text_model="random (benchmark)")
    (run_dir / "checkpoints" / "best").mkdir(parents=True, exist_ok=True)
    save_model(setup.model, str(run_dir / "checkpoints" / "best" / "model.safetensors"))
    return run_dir


def section_predict(res: dict[str, Any], work: Path, study: dict[str, Path], iters: int, input_desc: str) -> None:
    print(f"\n== Prediction of one 4-sequence brain study ({input_desc}; configs/finetune/brain.yaml, fresh run folder) ==")
    setup = FinetuneSetup("brain")
    run_dir = make_run_folder(work / "run_brain", setup)
    with peak_rss() as mem:
        t0 = time.perf_counter()
        predictor = load_run(run_dir, device="cpu")
        load_s = time.perf_counter() - t0
        preds = [predictor.predict(study) for _ in range(1 + iters)]
    cold, warm = preds[0], preds[1:]
    pre = statistics.median(p.preprocess_seconds for p in warm)
    mod = statistics.median(p.model_seconds for p in warm)
    total = pre + mod
    out = {"input": input_desc, "load_run_s": load_s, "cold_preprocess_s": cold.preprocess_seconds,
           "cold_model_s": cold.model_seconds, "preprocess_s": pre, "model_s": mod, "total_s": total,
           "precision": predictor.precision, "peak_rss_mb": mem["peak_rss_mb"], "target_s": PREDICTION_TARGET_S,
           "meets_target": total < PREDICTION_TARGET_S}
    print(f"  load_run {_fmt_s(load_s)}; first prediction: preprocess {_fmt_s(cold.preprocess_seconds)} + model "
          f"{_fmt_s(cold.model_seconds)}")
    print(f"  median of {len(warm)}: preprocess {_fmt_s(pre)} + model {_fmt_s(mod)} = {_fmt_s(total)} "
          f"({'under' if out['meets_target'] else 'OVER'} the {PREDICTION_TARGET_S:.0f} s target); "
          f"peak RSS {mem['peak_rss_mb']:.0f} MiB")
    res["predict"] = out


def _studies(paths: dict[str, Path], n: int) -> list[Study]:
    # n entries over the same files: the loader reads one cache entry per item either way
    return [Study(f"bench{i}", f"p{i}", "brain", dict(paths), label="tumour" if i % 2 else "normal") for i in range(n)]


def _load_batch(ds: StudyDataset, batch: int) -> dict[str, Any]:
    return collate_studies([ds[i] for i in range(batch)])


def section_data(res: dict[str, Any], work: Path, study: dict[str, Path], iters: int) -> None:
    print("\n== Data throughput with a warm preprocessing cache (brain, DataLoader, num_workers=0) ==")
    setup = FinetuneSetup("brain")
    b = setup.batch_size
    ds = StudyDataset(_studies(study, b), "brain", cache=PreprocessCache(work / "cache"))
    t0 = time.perf_counter()
    _load_batch(ds, 1)  # fills the cache
    cold = time.perf_counter() - t0
    loader = DataLoader(ds, batch_size=b, collate_fn=collate_studies, num_workers=0)
    load = time_calls(lambda: next(iter(loader)), iters)["median_s"]
    images, present, labels = setup.random_batch()
    compute = time_calls(lambda: setup.step(images, present, labels, "fp32"), iters)["median_s"]
    out = {"batch": b, "cold_fill_s": cold, "loader_s_per_batch": load, "compute_s_per_step": compute,
           "loader_fraction": load / (load + compute)}
    print(f"  batch {b}: loader {_fmt_s(load)} / batch vs compute {_fmt_s(compute)} / step -> loading is "
          f"{100 * out['loader_fraction']:.1f}% of a step (cache filled once in {_fmt_s(cold)})")
    res["data"] = out


def section_naive(res: dict[str, Any], work: Path, study: dict[str, Path], iters: int, input_desc: str) -> None:
    print(f"\n== Naive float32 baseline vs optimised fine-tuning (brain config, same model, {input_desc}) ==")
    precision = "auto"  # the optimised set-up uses the default: float32 on a CPU
    naive, opt = FinetuneSetup("brain"), FinetuneSetup("brain")
    n_swapped, diff = swap_to_conv_patch_embedding(naive.model)
    naive.make_optimizer(naive=True)
    b = opt.batch_size
    naive_ds = StudyDataset(_studies(study, b), "brain", cache=None)
    opt_ds = StudyDataset(_studies(study, b), "brain", cache=PreprocessCache(work / "cache"))
    _load_batch(opt_ds, 1)  # warm cache, as from the second epoch on

    def run(setup: FinetuneSetup, ds: StudyDataset, prec: str) -> None:
        batch = _load_batch(ds, b)
        setup.step(batch["images"], batch["present"], batch["label"], prec)

    warm = naive.random_batch()  # warm both models' kernels without counting any loading
    naive.step(*warm, "fp32")
    opt.step(*warm, precision)
    t_naive = time_calls(lambda: run(naive, naive_ds, "fp32"), iters, warmup=0)["median_s"]
    t_opt = time_calls(lambda: run(opt, opt_ds, precision), iters, warmup=0)["median_s"]
    # each optimisation alone: the Conv3d model on cached data, the linear one without a cache
    t_conv_cached = time_calls(lambda: run(naive, opt_ds, "fp32"), iters, warmup=0)["median_s"]
    t_linear_uncached = time_calls(lambda: run(opt, naive_ds, precision), iters, warmup=0)["median_s"]
    ratio = t_naive / t_opt
    out = {"batch": b, "patch_embeddings_swapped": n_swapped, "conv_vs_linear_max_abs_diff": diff,
           "naive_step_s": t_naive, "optimised_step_s": t_opt, "naive_studies_per_s": b / t_naive,
           "optimised_studies_per_s": b / t_opt, "ratio": ratio, "target_ratio": NAIVE_TARGET_RATIO,
           "conv_embedding_warm_cache_step_s": t_conv_cached, "linear_embedding_no_cache_step_s": t_linear_uncached,
           "optimised_precision": str(resolve_precision(precision, DEVICE) or "float32").replace("torch.", "")}
    print(f"  naive (Conv3d patch embedding x{n_swapped}, max |diff| {diff:.1e}; NIfTI preprocessing every step, fp32): "
          f"{_fmt_s(t_naive)} / step, {b / t_naive:.2f} studies/s")
    print(f"  optimised (reshape+linear patch embedding; warm cache; precision auto = {out['optimised_precision']}): "
          f"{_fmt_s(t_opt)} / step, {b / t_opt:.2f} studies/s")
    print(f"  ratio {ratio:.1f}x (target >= {NAIVE_TARGET_RATIO:.0f}x); one change at a time: Conv3d + warm cache "
          f"{_fmt_s(t_conv_cached)}, linear + no cache {_fmt_s(t_linear_uncached)} per step")
    res["naive"] = out


def _encoder_step(enc: nn.Module, x: Tensor, precision: str = "fp32") -> None:
    enc.zero_grad(set_to_none=True)
    with autocast_context(precision, DEVICE):
        out = enc(x)
    out.pooled.float().square().mean().backward()


def section_knobs(res: dict[str, Any], iters: int, bf16_iters: int) -> None:
    organ = load_organ_config("brain")
    roi = tuple(organ.roi_size)
    vols = len(organ.modalities)  # one study's worth of volumes through one encoder
    x = torch.randn(vols, 1, *roi)
    peak = _machine_peak(res)
    print(f"\n== Knobs: one encoder, forward+backward of {vols} brain volumes {roi} ==")
    out: dict[str, Any] = {"archs": {}, "threads": {}, "channels_last": {}, "bf16": {}}
    for arch in ("cnn_small", "vit_tiny", "vit_small"):
        torch.manual_seed(0)
        enc = build_encoder(arch, roi).train()
        params = sum(p.numel() for p in enc.parameters())
        flops = count_flops(lambda: _encoder_step(enc, x))
        t = time_calls(lambda: _encoder_step(enc, x), iters)["median_s"]
        out["archs"][arch] = {"params": params, "gflop": flops / 1e9, "step_s": t, "achieved_gflops": flops / t / 1e9,
                              "fraction_of_peak": flops / t / 1e9 / peak if peak else None}
        print(f"  {arch:10s} {params / 1e6:6.2f} M params {flops / 1e9:6.2f} GFLOP  {_fmt_s(t):>8s}  "
              f"{flops / t / 1e9:6.1f} GFLOP/s")

    out["patch_embedding"] = {}
    for arch in ("cnn_small", "vit_tiny"):
        torch.manual_seed(0)
        enc = build_encoder(arch, roi).train()
        linear = time_calls(lambda: _encoder_step(enc, x), iters)["median_s"]
        swap_to_conv_patch_embedding(enc)
        conv = time_calls(lambda: _encoder_step(enc, x), iters)["median_s"]
        out["patch_embedding"][arch] = {"linear_s": linear, "conv3d_s": conv, "speedup": conv / linear}
        print(f"  {arch} patch embedding: reshape+linear {_fmt_s(linear)} vs Conv3d {_fmt_s(conv)} ({conv / linear:.2f}x)")

    # the whole brain fine-tuning step, since oversubscribed OpenMP threads hurt every op
    setup = FinetuneSetup("brain")
    batch = setup.random_batch()
    threads = torch.get_num_threads()
    for n in sorted({1, 2, threads}):
        torch.set_num_threads(n)
        out["threads"][n] = time_calls(lambda: setup.step(*batch), iters)["median_s"]
    torch.set_num_threads(threads)
    print(f"  brain fine-tuning step (batch {setup.batch_size}) by torch threads: "
          + ", ".join(f"{n}: {_fmt_s(t)}" for n, t in out["threads"].items()))

    for arch in ("vit_small", "cnn_small"):
        e = build_encoder(arch, roi).train()
        fp32 = time_calls(lambda: _encoder_step(e, x), iters)["median_s"]
        bf16 = time_calls(lambda: _encoder_step(e, x, "bf16"), bf16_iters)["median_s"]
        out["bf16"][arch] = {"fp32_s": fp32, "bf16_s": bf16, "speedup": fp32 / bf16}
        print(f"  {arch} bf16 autocast: {_fmt_s(bf16)} vs fp32 {_fmt_s(fp32)} ({fp32 / bf16:.2f}x)")

    cnn = build_encoder("cnn_small", roi).train()
    contiguous = time_calls(lambda: _encoder_step(cnn, x), iters)["median_s"]
    cnn = cnn.to(memory_format=torch.channels_last_3d)
    x_cl = x.contiguous(memory_format=torch.channels_last_3d)
    cl = time_calls(lambda: _encoder_step(cnn, x_cl), iters)["median_s"]
    out["channels_last"]["cnn_small"] = {"contiguous_s": contiguous, "channels_last_s": cl, "speedup": contiguous / cl}
    print(f"  cnn_small channels_last_3d: {_fmt_s(cl)} vs contiguous {_fmt_s(contiguous)} ({contiguous / cl:.2f}x)")
    res["knobs"] = out


def compile_worker(arch: str, iters: int) -> dict[str, Any]:
    """Eager vs ``torch.compile`` training step of one brain encoder (runs in a subprocess)."""
    roi = tuple(load_organ_config("brain").roi_size)
    x = torch.randn(4, 1, *roi)
    torch.manual_seed(0)
    enc = build_encoder(arch, roi).train()
    eager = time_calls(lambda: _encoder_step(enc, x), iters)["median_s"]
    compiled = torch.compile(enc)
    t0 = time.perf_counter()
    _encoder_step(compiled, x)
    first = time.perf_counter() - t0
    steady = time_calls(lambda: _encoder_step(compiled, x), iters, warmup=0)["median_s"]
    return {"arch": arch, "eager_s": eager, "compile_and_first_step_s": first, "compiled_s": steady, "speedup": eager / steady}


def section_compile(res: dict[str, Any], iters: int, timeout: float) -> None:
    arch = "vit_small"
    print(f"\n== torch.compile of one {arch} encoder (subprocess, limit {timeout:.0f} s) ==")
    cmd = [sys.executable, "-m", "medmap.benchmark", "--compile-worker", arch, "--iters", str(iters),
           "--threads", str(torch.get_num_threads())]
    # caches off: the compile time of a first run, not of a warm ~/.cache or /tmp cache
    env = {**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        res["compile"] = {"arch": arch, "status": "timeout", "limit_s": timeout}
        print(f"  did not finish within {timeout:.0f} s (compilation on this machine is slower than the limit)")
        return
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        res["compile"] = {"arch": arch, "status": "failed", "error": err, "wall_s": time.perf_counter() - t0}
        print(f"  failed: {err}")
        return
    out = {"status": "ok", **json.loads(lines[-1])}
    res["compile"] = out
    print(f"  eager {_fmt_s(out['eager_s'])}, compiled {_fmt_s(out['compiled_s'])} ({out['speedup']:.2f}x); "
          f"compilation + first step {_fmt_s(out['compile_and_first_step_s'])}")


# --------------------------------------------------------------------------- driver
#: Sections measuring what a user waits for (``medmap bench --sections NAME``); each is
#: ``function(res, args)`` in its own module of this package.
USER_WAIT_SECTIONS = {
    "time_to_accuracy": "medmap.benchmark.time_to_accuracy:section_time_to_accuracy",
    "latency": "medmap.benchmark.latency:section_latency",
    "threads": "medmap.benchmark.threads:section_threads",
    "step_costs": "medmap.benchmark.step_costs:section_step_costs",
}


def machine_info() -> dict[str, Any]:
    from medmap.precision import cpu_kernel_info

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_average_1m": load[0] if load else None,
            "cuda": torch.cuda.is_available(),
            "kernels": cpu_kernel_info()}  # ISA, oneDNN, native bf16: which CPU kernel paths the figures used


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Run the selected sections and print them; returns (and optionally writes) every figure."""
    if args.threads:
        torch.set_num_threads(int(args.threads))
    iters = int(args.iters or (2 if args.quick else 3))
    sections = list(args.sections)
    res: dict[str, Any] = {"machine": machine_info(), "iters": iters, "quick": bool(args.quick),
                           "command": " ".join(sys.argv)}
    m = res["machine"]
    print(f"medmap performance on {m['cpu']} ({m['cpus']} CPUs, torch {m['torch']}, {m['torch_threads']} threads, "
          f"1-min load average {m['load_average_1m']}); {iters} timed iterations per figure, medians")
    t_start = time.perf_counter()
    if "peak" in sections or {"finetune", "pretrain", "knobs"} & set(sections):
        section_peak(res)
    if "finetune" in sections:
        section_finetune(res, list(args.organs), iters, int(args.bf16_iters))
    if "pretrain" in sections:
        section_pretrain(res, iters)
    with tempfile.TemporaryDirectory(prefix="medmap-bench-") as tmp:
        work = Path(tmp)
        if {"predict", "data", "naive"} & set(sections):
            input_desc = "2 mm 99x117x95 int16 .nii.gz" if args.quick else "1 mm 182x218x182 int16 .nii.gz"
            study = write_brain_study(work / "study", args.quick)
            if "predict" in sections:
                section_predict(res, work, study, iters, input_desc)
            if "data" in sections:
                section_data(res, work, study, iters)
            if "naive" in sections:
                section_naive(res, work, study, iters, input_desc)
    if "knobs" in sections:
        section_knobs(res, iters, int(args.bf16_iters))
    if "compile" in sections:
        section_compile(res, iters, float(args.compile_timeout))
    for name, where in USER_WAIT_SECTIONS.items():  # what a user waits for: each in its own module
        if name in sections:
            module, func = where.split(":")
            getattr(importlib.import_module(module), func)(res, args)
    res["wall_s"] = time.perf_counter() - t_start
    res["machine"]["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"\nbenchmark wall time {res['wall_s']:.0f} s; process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
        print(f"figures written to {args.json}")
    return res


def main(argv: list[str] | None = None) -> int:
    from medmap.cli.bench import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.add_argument("--compile-worker", metavar="ARCH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.compile_worker:
        if args.threads:
            torch.set_num_threads(int(args.threads))
        print(json.dumps(compile_worker(args.compile_worker, int(args.iters or 2))))
        return 0
    run_benchmark(args)
    return 0



"""Training-engine utilities shared by stage 1 (pre-training) and stage 2 (fine-tuning).

Nothing here knows about MedMAP's models; an engine combines these pieces:

* :func:`setup_distributed` / :func:`cleanup_distributed` / :class:`DistInfo`: ``torchrun``
  environment variables, gloo on CPU and NCCL on GPU;
* :func:`save_checkpoint` / :func:`load_checkpoint` / :func:`find_checkpoint`: atomic
  checkpoints (``model.safetensors`` + ``state.pt``) written to a temporary folder and
  renamed into place, RNG state included, loaded with ``weights_only=True``;
* :class:`RunLogger`: CSV + TensorBoard scalars, rank 0 only, resume-aware;
* :func:`build_adamw`, :func:`warmup_cosine_schedule`, :func:`clip_gradients` (precision: :mod:`medmap.precision`);
* :func:`save_resolved_config`, :func:`config_hash`, :func:`progress_bar`.

A run folder looks like::

    RUN_DIR/config.yaml  log.csv  tb/  checkpoints/{last,best}/{model.safetensors,state.pt}  metrics/

Example (the skeleton of a training loop)::

    dist_info = setup_distributed()
    model = build(...).to(dist_info.device)
    opt = build_adamw(model.parameters(), lr=1e-4)
    sched = warmup_cosine_schedule(opt, warmup_steps=50, total_steps=1000)
    state = load_checkpoint(find_checkpoint(run_dir, "last"), model, opt, sched) if resume else None
    step = state["step"] if state else 0
    logger = RunLogger(run_dir, enabled=dist_info.is_main, resume_step=step)
    while step < 1000:
        with autocast_context("auto", dist_info.device):
            loss = ...
        loss.backward(); clip_gradients(model, 1.0); opt.step(); sched.step(); step += 1
        logger.log(step, {"loss": loss.item()})
        if step % 100 == 0 and dist_info.is_main:
            save_checkpoint(run_dir / "checkpoints" / "last", model, opt, sched, step=step, config=cfg)
"""

from __future__ import annotations

import contextlib
import copy
import csv
import datetime
import math
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import yaml
from safetensors.torch import load_model, save_model
from torch import nn

from medmap.errors import CheckpointError, ConfigError
from medmap.threads import configure_threads  # noqa: F401  (engines import it from here)
from medmap.utils import atomic_write_text, pick_device, stable_hash

MODEL_FILE = "model.safetensors"
STATE_FILE = "state.pt"


# --------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly single-process) run.

    Attributes:
        rank: global rank (0 when not distributed).
        world_size: number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: the device this process trains on.
        distributed: whether ``torch.distributed`` was initialised by us.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that logs, writes checkpoints and shows progress."""
        return self.rank == 0


def setup_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistInfo:
    """Initialise ``torch.distributed`` from ``torchrun``'s environment, if present.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. With ``WORLD_SIZE > 1`` it joins the
    process group (NCCL on CUDA, gloo on CPU) by ``env://``; otherwise it returns a
    single-process :class:`DistInfo`. Calling it when a group already exists reuses it.

    Args:
        device: ``auto``, ``cpu``, ``cuda`` (the GPU is then chosen by ``LOCAL_RANK``).
        timeout_s: collective timeout.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(dev)
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)
    if world_size > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dev, True)
    return DistInfo(0, 1, 0, dev, False)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup_distributed` created one."""
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every rank (no-op in a single process)."""
    if info.distributed and dist.is_initialized():
        dist.barrier()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The bare model inside DDP (or ``torch.compile``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


# --------------------------------------------------------------------------- configs
#: keys that may change between a run and its resumption without invalidating it
VOLATILE_KEYS = ("run.num_workers", "run.log_every", "run.progress", "run.device", "run.threads")


def config_hash(cfg: Mapping[str, Any], volatile: tuple[str, ...] = VOLATILE_KEYS) -> str:
    """SHA-256 of a config with the ``volatile`` dotted keys removed (checked on resume)."""
    c = copy.deepcopy(dict(cfg))
    for key in volatile:
        node: Any = c
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return stable_hash(c)


def save_resolved_config(run_dir: str | Path, cfg: Mapping[str, Any], name: str = "config.yaml") -> Path:
    """Write the fully resolved config (after overrides) into the run folder, atomically."""
    return atomic_write_text(Path(run_dir) / name, yaml.safe_dump(dict(cfg), sort_keys=False))


# --------------------------------------------------------------------------- checkpoints
def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states (CUDA too when available), for exact resumption."""
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": np.random.get_state()[1].tolist() + [int(np.random.get_state()[2])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    np_state = np.random.get_state()
    np.random.set_state((np_state[0], np.asarray(state["numpy"][:-1], dtype=np.uint32), int(state["numpy"][-1]), 0, 0.0))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


#: Files that mark a folder as a MedMAP run folder (any one of them).
RUN_MARKERS = ("config.yaml", "run_info.json", "checkpoints")
LOCK_FILE = ".medmap.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def claim_run_dir(run_dir: Path, resume: bool, info: DistInfo) -> Iterator[None]:
    """Guard a run folder for the duration of a run (every rank checks; rank 0 locks).

    * a new run (``resume`` false) refuses a folder that already holds a run, and a
      non-empty folder that is not a run (nothing in it is overwritten);
    * a second process writing into the same folder is refused while the first holds
      ``RUN_DIR/.medmap.lock`` (a lock left by a killed process is taken over);
    * temporary checkpoint folders left by a killed run are removed.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is a file, not a run folder")
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []
    if not resume and find_checkpoint(run_dir, "last") is not None:
        raise ConfigError(f"{run_dir} already holds a run; use --resume to continue it or choose a new --out")
    if entries and not any(m in entries for m in RUN_MARKERS):
        raise ConfigError(f"{run_dir} is not empty and is not a MedMAP run folder ({', '.join(entries[:5])}); "
                          "choose a new or empty --out")
    lock = run_dir / LOCK_FILE
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _take_lock(lock)
        for stale in (run_dir / "checkpoints").glob(".*.tmp-*") if (run_dir / "checkpoints").is_dir() else ():
            shutil.rmtree(stale, ignore_errors=True)
    try:
        yield
    finally:
        if info.is_main:
            lock.unlink(missing_ok=True)


def _take_lock(lock: Path) -> None:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _pid_alive(pid):
                raise ConfigError(f"{lock.parent} is in use by another run (pid {pid}); wait for it or choose "
                                  "another --out") from None
            lock.unlink(missing_ok=True)  # left by a killed process
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return
    raise ConfigError(f"cannot lock {lock.parent}")


def position_epoch(augment: Any, sampler: Any, epoch: int, skip: int, resumed_rng: Mapping[str, Any] | None = None) -> None:
    """Put the random state where an uninterrupted run is at step ``skip`` of ``epoch``.

    The caller has seeded the epoch and created its data iterator (which draws from the global
    RNG). The augmentation continues after the samples of the ``skip`` skipped batches; a
    single-process run resumed mid-epoch (``skip > 0``) also gets the global RNG state saved
    with its checkpoint back (dropout), so ``--resume`` is bit-identical. With data-loader
    workers or several ranks, resuming at an epoch boundary (the default checkpoints) is.
    """
    if augment is not None and hasattr(augment, "set_position"):
        done = sum(len(b) for b in sampler.rank_batches(epoch)[:skip]) if skip else 0
        augment.set_position(epoch, done)
    if skip and resumed_rng:
        set_rng_state(resumed_rng)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    step: int,
    epoch: int = 0,
    config: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write a checkpoint folder atomically.

    The folder ``path`` gets ``model.safetensors`` (the unwrapped model's weights; shared
    tensors handled by safetensors) and ``state.pt`` (optimizer, scheduler, step, epoch,
    RNG state, config hash, ``extra``). Both are written into a temporary sibling folder
    which then replaces ``path`` with ``os.replace``, so a reader (or a resumed run) sees
    either the previous complete checkpoint or the new one, never a partial one.

    Call it on the main rank only.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        save_model(unwrap_model(model), str(tmp / MODEL_FILE))
        state = {
            "step": int(step),
            "epoch": int(epoch),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "config_hash": config_hash(config) if config is not None else None,
            "extra": dict(extra or {}),
        }
        torch.save(state, tmp / STATE_FILE)
        for f in (tmp / MODEL_FILE, tmp / STATE_FILE):
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = None
        if path.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def find_checkpoint(run_dir: str | Path, which: str = "last") -> Path | None:
    """The complete checkpoint folder ``RUN_DIR/checkpoints/<which>``, or ``None``.

    If a run was killed between the two renames of :func:`save_checkpoint`, the previous
    checkpoint sits in ``.<which>.old-*``; it is moved back into place here.
    """
    ckpt_dir = Path(run_dir) / "checkpoints"
    path = ckpt_dir / which
    if not path.exists():
        for old in sorted(ckpt_dir.glob(f".{which}.old-*")):
            if (old / MODEL_FILE).is_file() and (old / STATE_FILE).is_file():
                os.replace(old, path)
                break
    if (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file():
        return path
    return None


def check_resume_config(checkpoint: str | Path | None, config: Mapping[str, Any]) -> None:
    """Refuse to resume ``checkpoint`` with a config other than the one that wrote it.

    Called before a resumed run writes anything, so that a refused resume leaves the run
    folder as it was: its ``config.yaml`` still describes its checkpoints. ``None``: a new run.
    """
    if checkpoint is not None:
        _check_config_hash(Path(checkpoint), _read_state(Path(checkpoint)), config)


def _read_state(path: Path) -> dict[str, Any]:
    if not (path / STATE_FILE).is_file():
        raise CheckpointError(f"incomplete checkpoint {path}: needs {MODEL_FILE} and {STATE_FILE}")
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {e}") from e


def _check_config_hash(path: Path, state: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    if state.get("config_hash") not in (None, config_hash(config)):
        raise CheckpointError(
            f"checkpoint {path} was written with a different config; resume with the run's own "
            f"config.yaml, or start a new run folder"
        )


def load_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    restore_rng: bool = True,
    strict: bool = True,
) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` into live objects.

    Args:
        path: the checkpoint folder.
        model: receives the weights (DDP wrappers are unwrapped).
        optimizer / scheduler: receive their states when given.
        config: when given, its :func:`config_hash` must match the checkpoint's.
        restore_rng: restore Python/NumPy/torch RNG states.
        strict: require exactly matching parameter names.

    Returns:
        The ``state.pt`` dictionary (``step``, ``epoch``, ``extra``, ...).

    Raises:
        CheckpointError: the folder is incomplete, unreadable or from another config.
    """
    path = Path(path)
    if not (path / MODEL_FILE).is_file():
        raise CheckpointError(f"incomplete checkpoint {path}: needs {MODEL_FILE} and {STATE_FILE}")
    state = _read_state(path)
    if config is not None:
        _check_config_hash(path, state, config)
    target = unwrap_model(model)
    try:
        missing, unexpected = load_model(target, str(path / MODEL_FILE), strict=strict, device="cpu")
    except Exception as e:
        raise CheckpointError(f"weights in {path / MODEL_FILE} do not fit this model: {e}") from e
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    if restore_rng and state.get("rng"):
        set_rng_state(state["rng"])
    return state


# --------------------------------------------------------------------------- logging
class RunLogger:
    """Scalar logging to ``RUN_DIR/log.csv`` and TensorBoard (``RUN_DIR/tb``), main rank only.

    Rows are ``step`` plus any scalar keys; new keys extend the header (the file is
    rewritten then, which is cheap for logs of this size). When resuming from step ``s``,
    rows logged after ``s`` by the interrupted run are dropped so the log has no
    duplicates.

    Args:
        run_dir: the run folder.
        enabled: False on non-main ranks (every call becomes a no-op).
        resume_step: drop existing rows with ``step > resume_step``; ``None`` starts fresh.
        tensorboard: also write TensorBoard event files.
    """

    def __init__(
        self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None, tensorboard: bool = True
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "log.csv"
        self._rows: list[dict[str, Any]] = []
        self._fields: list[str] = ["step"]
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                reader = csv.DictReader(f)
                self._fields = list(reader.fieldnames or ["step"])
                self._rows = [r for r in reader if r.get("step") and int(float(r["step"])) <= resume_step]
        self._rewrite()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tb"), purge_step=resume_step)

    def _rewrite(self) -> None:
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            w.writeheader()
            w.writerows(self._rows)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Append one row of scalars at ``step``."""
        if not self.enabled:
            return
        row: dict[str, Any] = {"step": int(step)}
        row.update({k: float(v) for k, v in scalars.items()})
        self._rows.append(row)
        new = [k for k in row if k not in self._fields]
        if new:
            self._fields += new
            self._rewrite()
        else:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self._fields).writerow(row)
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


def progress_bar(total: int, initial: int = 0, enabled: bool = True, desc: str = "train"):
    """A tqdm bar on the main rank (a disabled bar elsewhere); show the loss with ``bar.set_postfix``."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True, leave=True)


# --------------------------------------------------------------------------- optimisation
def build_adamw(params: Any, lr: float, betas: Sequence[float] = (0.9, 0.999),
                weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel (one pass over all parameters) where the parameters'
    device has one, else the multi-tensor (``foreach``) kernel; the update is AdamW's either way.

    PyTorch's CPU default is a Python loop of small operations per parameter: for the
    2.9 M-parameter lesion-level liver model on two cores its step took 17 ms, the fused step
    4 ms (``medmap bench --sections step_costs``, docs/performance.md).

    >>> opt = build_adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    >>> opt.param_groups[0]["fused"]
    True
    """
    params = list(params)

    def fresh() -> list[Any]:  # an optimiser writes its options into group dicts: each attempt gets copies
        return [dict(p) if isinstance(p, dict) else p for p in params]

    try:
        return torch.optim.AdamW(fresh(), lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype without a fused kernel
        return torch.optim.AdamW(fresh(), lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=True)


def warmup_cosine_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from ~0 to the base LR over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * base_lr`` at ``total_steps``.

    Example:
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        >>> s = warmup_cosine_schedule(opt, warmup_steps=2, total_steps=4)
        >>> lrs = []
        >>> for _ in range(4):
        ...     lrs.append(round(s.get_last_lr()[0], 3)); opt.step(); s.step()
        >>> lrs
        [0.333, 0.667, 1.0, 0.5]
    """
    if total_steps < 1:
        raise ValueError("total_steps must be positive")
    warmup_steps = max(0, min(int(warmup_steps), total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_gradients(model: nn.Module, max_norm: float | None) -> float:
    """Clip the global gradient norm to ``max_norm`` (no clipping when ``None`` or <= 0).

    Returns the norm before clipping (useful to log).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm is None or max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's ``no_sync`` during gradient accumulation micro-steps (a no-op otherwise)."""
    if skip_sync and hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    else:
        yield

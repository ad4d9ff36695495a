"""How many intra-op CPU threads a process should use (``run.threads: auto``).

PyTorch's default is one OpenMP thread per core of the machine. That is right on an idle
machine and badly wrong on a shared one: OpenMP threads synchronise at a barrier after every
op, so one thread sharing its core with another process makes every other thread wait for
it. ``medmap.benchmark`` measured a liver fine-tuning step at 0.66 s with 1 thread and 7.8 s
with 2 threads on a 2-core machine while another process used one core (12x slower).

``auto`` therefore gives each process the cores that are free *now*, divided among the
processes that will share them::

    threads = max(1, (available cores - busy cores) // processes)

* available cores: the CPUs this process may run on (``os.sched_getaffinity``), capped by a
  cgroup CPU quota (``cpu.max`` in cgroup v2, ``cpu.cfs_quota_us`` in v1) when one is set;
* busy cores: how much CPU *other* processes used over a short window (~100 ms of
  ``/proc/stat`` on the allowed CPUs, this process's own CPU time subtracted; the 1-minute load
  average minus this process where ``/proc/stat`` cannot be read). A core counts as busy once
  more than :data:`BUSY_THRESHOLD` of it is in use: a thread that has to share a core costs
  far more (the barrier waits) than a thread too few;
* processes: the DDP ranks on this machine (``LOCAL_WORLD_SIZE``) plus this process's
  data-loader workers.

Example:
    >>> auto_threads(available=2, busy=0.0, processes=1)
    2
    >>> auto_threads(available=2, busy=1.0, processes=1)
    1
    >>> auto_threads(available=16, busy=0.1, processes=2)
    8
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

#: fraction of a core another process must use for that core to count as busy
BUSY_THRESHOLD = 0.3


def auto_threads(available: float, busy: float, processes: int = 1) -> int:
    """The ``auto`` rule as a pure function: ``max(1, free cores // processes)``.

    Args:
        available: cores this process may use (affinity, capped by a cgroup quota; may be fractional).
        busy: cores' worth of CPU other processes are using (e.g. 1.0 = one core fully busy).
        processes: processes sharing the free cores (DDP ranks on this machine + data workers).
    """
    busy_cores = max(0, math.ceil(busy - BUSY_THRESHOLD))
    free = int(available) - busy_cores
    return max(1, free // max(1, int(processes)))


@dataclass(frozen=True)
class ThreadDecision:
    """What ``auto`` saw and picked (see :func:`decide_threads`)."""

    threads: int
    available: float          # cores this process may use
    busy: float               # cores' worth of CPU other processes used during the measurement
    processes: int            # processes sharing the free cores
    source: str               # how ``busy`` was measured: "/proc/stat", "loadavg" or "none"

    def describe(self) -> str:
        cores = f"{self.available:g} cores"
        busy = f"{self.busy:.1f} busy" if self.source != "none" else "load unknown"
        procs = f", {self.processes} processes" if self.processes > 1 else ""
        return f"threads: auto -> {self.threads} ({cores}, {busy}{procs})"


def available_cores() -> float:
    """CPUs this process may run on, capped by the cgroup CPU quota when there is one."""
    try:
        n: float = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    return max(1.0, min(n, quota)) if quota else float(n)


def cgroup_cpu_quota() -> float | None:
    """The cgroup CPU quota in cores (``cpu.max`` v2 or ``cpu.cfs_quota_us`` v1), ``None`` if unlimited/absent."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period_us = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int] | None) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` (all when ``None``) from ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    seen = False
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        if cpus is not None and int(name[3:]) not in cpus:
            continue
        values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)
        total += sum(values)
        busy += sum(values) - idle
        seen = True
    return (busy, total) if seen else None


def busy_cores(window_s: float = 0.1) -> tuple[float, str]:
    """Cores' worth of CPU that other processes use, measured over ``window_s``, and how it was measured."""
    try:
        cpus: set[int] | None = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = None
    before, own0, t0 = _cpu_times(cpus), time.process_time(), time.perf_counter()
    if before is not None:
        time.sleep(window_s)
        after, own1, t1 = _cpu_times(cpus), time.process_time(), time.perf_counter()
        if after is not None and after[1] > before[1]:
            n = len(cpus) if cpus else (os.cpu_count() or 1)
            used = n * (after[0] - before[0]) / (after[1] - before[1])  # cores busy over the window
            own = (own1 - own0) / max(t1 - t0, 1e-6)
            return max(0.0, used - own), "/proc/stat"
    if hasattr(os, "getloadavg"):
        return max(0.0, os.getloadavg()[0] - 1.0), "loadavg"  # minus this process, which is running
    return 0.0, "none"


def sharing_processes(num_workers: int = 0) -> int:
    """Processes that will share the free cores: DDP ranks on this machine plus data-loader workers."""
    try:
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or 1)
    except ValueError:
        ranks = 1
    return max(1, ranks) * (1 + max(0, int(num_workers)))


def decide_threads(num_workers: int = 0, window_s: float = 0.1) -> ThreadDecision:
    """Measure this machine now and apply :func:`auto_threads` (takes ``window_s``)."""
    available = available_cores()
    busy, source = busy_cores(window_s)
    processes = sharing_processes(num_workers)
    return ThreadDecision(auto_threads(available, busy, processes), available, busy, processes, source)


def configure_threads(threads: int | str | None, num_workers: int = 0) -> int:
    """Set intra-op CPU threads for this process (``run.threads``) and return the count in use.

    ``auto`` (the default) picks ``max(1, free cores // processes)`` from the cores this
    process may use, how busy the other processes keep them right now, and the processes
    sharing them (DDP ranks on this machine, ``num_workers`` data-loader workers); see
    :mod:`medmap.threads`. The decision is printed once per call. An integer > 0 is used as
    given; ``None`` keeps PyTorch's default (one thread per core).

    On a CPU shared by several processes (DDP ranks, data workers, other jobs), OpenMP
    threads that outnumber the free cores spin against each other: a fine-tuning step took
    0.66 s with 1 thread and 7.8 s with 2 threads on a 2-core machine with one core busy.
    """
    if threads == "auto":
        decision = decide_threads(num_workers)
        torch.set_num_threads(decision.threads)
        print(decision.describe(), flush=True)
    elif threads is not None and int(threads) > 0:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()

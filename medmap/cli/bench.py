"""``medmap bench``: speed and memory of the default brain and liver configurations.

Runs ``benchmarks/perf.py`` from the source checkout (the benchmark is a development tool,
not part of the installed library): pre-training and fine-tuning steps per second,
prediction latency, peak memory, FLOPs against this machine's measured matmul peak,
float32 vs bfloat16, and the naive-vs-optimised fine-tuning ratio. Figures are printed
(and written with ``--json``), never asserted.

Example::

    medmap bench --quick                     # about 3-5 minutes on 2 CPU cores
    medmap bench --iters 5 --json perf.json
    python benchmarks/perf.py --quick        # the same, without the ``medmap`` entry point
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from medmap.errors import MedMAPError

ALL_SECTIONS = ("peak", "finetune", "pretrain", "predict", "data", "naive", "knobs", "compile")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``medmap bench`` and ``benchmarks/perf.py``)."""
    p.add_argument("--quick", action="store_true",
                   help="short run: 2 mm (99x117x95) input study instead of 1 mm (182x218x182), fewer repeats")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default 3; 2 with --quick)")
    p.add_argument("--sections", nargs="+", choices=ALL_SECTIONS, default=list(ALL_SECTIONS), metavar="SECTION",
                   help=f"what to measure (default: all of {', '.join(ALL_SECTIONS)})")
    p.add_argument("--organs", nargs="+", default=["brain", "liver"], help="fine-tuning configs to measure")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--compile-timeout", type=float, default=150.0,
                   help="seconds allowed for the torch.compile probe (run in a subprocess)")
    p.add_argument("--bf16-iters", type=int, default=1,
                   help="timed bfloat16 iterations (slow on CPUs without native bf16)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure training/prediction speed, memory and FLOP/s on this machine",
        description="Benchmark the default brain and liver configurations (see docs/performance.md). "
        "Model throughput uses synthetic tensors of each organ's ROI shape; prediction latency uses a "
        "synthetic 4-sequence brain study written as NIfTI.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _load_perf_script() -> object:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "perf.py"
    if not path.is_file():
        raise MedMAPError(f"medmap bench needs a source checkout of medmap ({path} not found); "
                          "clone the repository and run it there")
    spec = importlib.util.spec_from_file_location("medmap_benchmarks_perf", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args: argparse.Namespace) -> int:
    perf = _load_perf_script()
    perf.run_benchmark(args)  # type: ignore[attr-defined]
    return 0

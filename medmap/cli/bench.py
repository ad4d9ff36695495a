"""``medmap bench``: speed and memory of the default brain and liver configurations.

Runs :mod:`medmap.benchmark` (shipped with the package, so an installed wheel can run it):
pre-training and fine-tuning steps per second,
prediction latency, peak memory, FLOPs against this machine's measured matmul peak,
float32 vs bfloat16, and the naive-vs-optimised fine-tuning ratio. Figures are printed
(and written with ``--json``), never asserted.

Example::

    medmap bench --quick                     # about 3-5 minutes on 2 CPU cores
    medmap bench --iters 5 --json perf.json
    python -m medmap.benchmark --quick       # the same, without the ``medmap`` entry point
"""

from __future__ import annotations

import argparse
from pathlib import Path


ALL_SECTIONS = ("peak", "finetune", "pretrain", "predict", "data", "naive", "knobs", "compile",
                "time_to_accuracy", "latency", "threads", "step_costs")
#: Sections run when none are named (time to accuracy trains models for minutes: name it).
DEFAULT_SECTIONS = tuple(s for s in ALL_SECTIONS if s != "time_to_accuracy")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The benchmark's options (shared by ``medmap bench`` and ``python -m medmap.benchmark``)."""
    p.add_argument("--quick", action="store_true",
                   help="short run: 2 mm (99x117x95) input study instead of 1 mm (182x218x182), fewer repeats")
    p.add_argument("--iters", type=int, default=None, help="timed iterations per measurement (default 3; 2 with --quick)")
    p.add_argument("--sections", nargs="+", choices=ALL_SECTIONS, default=list(DEFAULT_SECTIONS), metavar="SECTION",
                   help=f"what to measure (default: {', '.join(DEFAULT_SECTIONS)}; time_to_accuracy only when named)")
    p.add_argument("--organs", nargs="+", default=["brain", "liver"], help="fine-tuning configs to measure")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's choice)")
    p.add_argument("--compile-timeout", type=float, default=150.0,
                   help="seconds allowed for the torch.compile probe (run in a subprocess)")
    p.add_argument("--bf16-iters", type=int, default=1,
                   help="timed bfloat16 iterations (slow on CPUs without native bf16)")
    p.add_argument("--json", type=Path, default=None, help="also write every figure to this JSON file")
    tta = p.add_argument_group("time to accuracy (--sections time_to_accuracy)")
    tta.add_argument("--tta-liver", type=Path, default=None, metavar="STUDIES",
                     help="lesion-level liver study list (e.g. medmap synth --organ liver --n 3000 --config lesion)")
    tta.add_argument("--tta-brain", type=Path, default=None, metavar="STUDIES", help="brain study list (4 mm)")
    tta.add_argument("--tta-liver-init", default=None, metavar="RUN", help="stage-1 run to start the liver encoders from")
    tta.add_argument("--tta-brain-init", default=None, metavar="RUN", help="stage-1 run to start the brain encoders from")
    tta.add_argument("--tta-threshold", type=float, default=0.90, help="validation balanced accuracy to reach (0.90)")
    tta.add_argument("--tta-cap-min", type=float, default=10.0, help="minutes allowed per run (10)")
    tta.add_argument("--tta-val-every-steps", type=int, default=50, help="validate every N steps (50)")
    tta.add_argument("--tta-work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    tta.add_argument("--tta-set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a value of the task's fine-tuning config, e.g. training.ema_decay=0.99 "
                     "(repeatable); the DenseNet follows the training values it shares (schedule, "
                     "augmentation, weight averaging)")


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


def run(args: argparse.Namespace) -> int:
    from medmap.benchmark import run_benchmark  # heavy imports only when benchmarking

    run_benchmark(args)
    return 0

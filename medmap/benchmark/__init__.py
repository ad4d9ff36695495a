"""``medmap bench``: speed and memory of MedMAP on this machine (figures printed, never asserted).

Modules: :mod:`~medmap.benchmark.sections` (throughput, FLOPs against the matmul peak, memory,
the naive-vs-optimised ratio, precision and compile knobs, and the driver), and one module per
figure a user waits for: :mod:`~medmap.benchmark.time_to_accuracy`,
:mod:`~medmap.benchmark.latency`, :mod:`~medmap.benchmark.threads` and
:mod:`~medmap.benchmark.step_costs`.

Example::

    medmap bench --quick
    python -m medmap.benchmark --sections latency threads
"""

from medmap.benchmark.sections import (
    TEXT_DIM,
    FinetuneSetup,
    build_medmap_classifier,
    count_flops,
    load_run,
    machine_info,
    main,
    make_run_folder,
    peak_rss,
    run_benchmark,
    swap_to_conv_patch_embedding,
    time_calls,
    write_brain_study,
)

__all__ = [
    "TEXT_DIM",
    "FinetuneSetup",
    "build_medmap_classifier",
    "count_flops",
    "load_run",
    "machine_info",
    "main",
    "make_run_folder",
    "peak_rss",
    "run_benchmark",
    "swap_to_conv_patch_embedding",
    "time_calls",
    "write_brain_study",
]

"""The results table of an experiment grid: mean and standard deviation over seeds, bootstrap CIs.

Every finished run contributes one :class:`RunResult` (the ``metrics.json`` that
:func:`medmap.evaluation.metrics.compute_metrics` wrote for its test split). Results are
grouped by ``(task, row)`` and summarised metric by metric:

* ``mean`` and ``std`` over seeds (sample standard deviation, ``ddof = 1``; ``None`` for a
  single seed). A metric that is undefined in a run (e.g. macro AUC when the test split
  holds one class) is left out of that metric's mean, and ``n_values`` says how many runs
  it averages.
* ``ci_low`` / ``ci_high``: the run's percentile-bootstrap 95% interval over test studies
  for a single seed; for several seeds, the mean over seeds of each run's interval bounds,
  i.e. the test-set sampling uncertainty of one typical run (seed variation is the
  ``std`` column, reported separately rather than mixed in).

Example:
    >>> r = [RunResult("liver", "full", s, {"accuracy": a, "ci": {"accuracy": [a - .1, a + .1]}})
    ...      for s, a in [(0, 0.5), (1, 0.7)]]
    >>> row = aggregate(r)[0]
    >>> round(row.summary["accuracy"].mean, 3), round(row.summary["accuracy"].std, 3)
    (0.6, 0.141)
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from medmap.utils import atomic_write_text

#: metrics of the table, in column order; the last one is the paper's figure, named as such
TABLE_METRICS: tuple[str, ...] = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece",
                                  "flattened_onehot_accuracy")
METRIC_LABELS = {
    "accuracy": "Top-1 acc.",
    "balanced_accuracy": "Balanced acc.",
    "macro_auc": "Macro AUC",
    "macro_f1": "Macro F1",
    "ece": "ECE",
    "flattened_onehot_accuracy": "Flattened one-hot acc. (paper's metric)",
}
#: metrics shown with their bootstrap CI in the Markdown table (all have CIs in the CSV when available)
CI_IN_MARKDOWN = ("accuracy", "balanced_accuracy", "macro_auc")


@dataclass(frozen=True)
class RunResult:
    """The test metrics of one run (one task, one grid row, one seed)."""

    task: str
    row: str
    seed: int
    metrics: Mapping[str, Any]
    label: str = ""
    regime: str = ""  #: the label regime of the grid (``""`` when the grid has none)
    source: Path | None = None  #: the ``metrics.json`` read (its folder holds ``predictions.csv``)


@dataclass(frozen=True)
class MetricSummary:
    """One metric of one table row, summarised over seeds."""

    mean: float | None
    std: float | None
    ci_low: float | None
    ci_high: float | None
    n_values: int


@dataclass
class TableRow:
    """One row of the results table."""

    task: str
    row: str
    label: str
    seeds: list[int]
    n_test: list[int]
    summary: dict[str, MetricSummary] = field(default_factory=dict)
    regime: str = ""


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(v) else v


def summarise_metric(values: Sequence[float | None], cis: Sequence[Sequence[float] | None]) -> MetricSummary:
    """Mean, sample standard deviation and mean CI bounds of one metric over seeds.

    Example:
        >>> s = summarise_metric([0.6, 0.8, None], [[0.5, 0.7], [0.7, 0.9], None])
        >>> round(s.mean, 3), round(s.std, 4), round(s.ci_low, 3), round(s.ci_high, 3), s.n_values
        (0.7, 0.1414, 0.6, 0.8, 2)
    """
    vals = [v for v in (_num(x) for x in values) if v is not None]
    bounds = [(float(c[0]), float(c[1])) for c in cis if c is not None and len(c) == 2 and None not in c]
    mean = sum(vals) / len(vals) if vals else None
    std = None
    if len(vals) >= 2 and mean is not None:
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))
    lo = sum(b[0] for b in bounds) / len(bounds) if bounds else None
    hi = sum(b[1] for b in bounds) / len(bounds) if bounds else None
    return MetricSummary(mean, std, lo, hi, len(vals))


def aggregate(results: Iterable[RunResult], metrics: Sequence[str] = TABLE_METRICS) -> list[TableRow]:
    """Group run results by ``(task, regime, row)`` (first-seen order) and summarise each metric."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for r in results:
        groups.setdefault((r.task, r.regime, r.row), []).append(r)
    rows: list[TableRow] = []
    for (task, regime, row), rs in groups.items():
        rs = sorted(rs, key=lambda r: r.seed)
        out = TableRow(task, row, next((r.label for r in rs if r.label), row), [r.seed for r in rs],
                       [int(r.metrics.get("n", 0) or 0) for r in rs], regime=regime)
        for m in metrics:
            out.summary[m] = summarise_metric([r.metrics.get(m) for r in rs],
                                              [(r.metrics.get("ci") or {}).get(m) for r in rs])
        rows.append(out)
    return rows


# --------------------------------------------------------------------------- rendering
def format_cell(s: MetricSummary, with_ci: bool, digits: int = 3) -> str:
    """``mean ± std [lo, hi]`` (``std`` only with two or more seeds, ``[lo, hi]`` when asked and known).

    Example:
        >>> format_cell(MetricSummary(0.8125, 0.02, 0.7, 0.9, 3), with_ci=True)
        '0.812 ± 0.020 [0.700, 0.900]'
        >>> format_cell(MetricSummary(None, None, None, None, 0), with_ci=True)
        'n/a'
    """
    if s.mean is None:
        return "n/a"
    text = f"{s.mean:.{digits}f}"
    if s.std is not None:
        text += f" ± {s.std:.{digits}f}"
    if with_ci and s.ci_low is not None and s.ci_high is not None:
        text += f" [{s.ci_low:.{digits}f}, {s.ci_high:.{digits}f}]"
    return text


def render_markdown(rows: Sequence[TableRow], title: str = "Results", notes: Sequence[str] = (),
                    metrics: Sequence[str] = TABLE_METRICS, regime_labels: Mapping[str, str] | None = None) -> str:
    """One Markdown table per task and label regime; cells are ``mean ± std [95% CI]`` (see the
    module docstring)."""
    lines = [f"# {title}", ""]
    lines += [f"{n}" for n in notes]
    if notes:
        lines.append("")
    lines += ["Cells: mean ± standard deviation over seeds (when more than one seed), and, for "
              f"{', '.join(METRIC_LABELS[m] for m in CI_IN_MARKDOWN if m in metrics)}, the bootstrap 95% CI over "
              "test studies in brackets (for several seeds: mean of the per-seed bounds). "
              "n/a: undefined on this test split (e.g. AUC with one class present).", ""]
    for task, regime in dict.fromkeys((r.task, r.regime) for r in rows):
        trs = [r for r in rows if r.task == task and r.regime == regime]
        head = ["row", "seeds", "n test", *[METRIC_LABELS.get(m, m) for m in metrics]]
        heading = f"{task}: {(regime_labels or {}).get(regime, regime)}" if regime else task
        lines += [f"## {heading}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in trs:
            n = sorted(set(r.n_test))
            cells = [r.label, str(len(r.seeds)), "/".join(str(x) for x in n)]
            cells += [format_cell(r.summary[m], m in CI_IN_MARKDOWN) for m in metrics]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def render_csv(rows: Sequence[TableRow], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """The aggregated table as CSV: per metric ``_mean``, ``_std``, ``_ci_low``, ``_ci_high``, ``_n``."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["task", "regime", "row", "label", "n_seeds", "seeds", "n_test"]
    for m in metrics:
        head += [f"{m}_mean", f"{m}_std", f"{m}_ci_low", f"{m}_ci_high", f"{m}_n"]
    w.writerow(head)
    fmt = lambda v: "" if v is None else f"{v:.6f}"  # noqa: E731
    for r in rows:
        line = [r.task, r.regime, r.row, r.label, len(r.seeds), " ".join(map(str, r.seeds)), " ".join(map(str, r.n_test))]
        for m in metrics:
            s = r.summary[m]
            line += [fmt(s.mean), fmt(s.std), fmt(s.ci_low), fmt(s.ci_high), s.n_values]
        w.writerow(line)
    return buf.getvalue()


def render_runs_csv(results: Sequence[RunResult], metrics: Sequence[str] = TABLE_METRICS) -> str:
    """Every run on its own line (task, row, seed, n, each metric and its CI)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    head = ["task", "regime", "row", "seed", "n_test"]
    for m in metrics:
        head += [m, f"{m}_ci_low", f"{m}_ci_high"]
    w.writerow(head)
    for r in results:
        line: list[Any] = [r.task, r.regime, r.row, r.seed, r.metrics.get("n", "")]
        for m in metrics:
            v = _num(r.metrics.get(m))
            ci = (r.metrics.get("ci") or {}).get(m) or [None, None]
            line += ["" if v is None else f"{v:.6f}", *("" if c is None else f"{float(c):.6f}" for c in ci)]
        w.writerow(line)
    return buf.getvalue()


def write_tables(results: Sequence[RunResult], out_dir: str | Path, title: str = "Results",
                 notes: Sequence[str] = (), regime_labels: Mapping[str, str] | None = None) -> dict[str, Path]:
    """Write ``results.md``, ``results.csv`` (aggregated) and ``runs.csv`` (per run) into ``out_dir``."""
    out_dir = Path(out_dir)
    rows = aggregate(results)
    return {
        "markdown": atomic_write_text(out_dir / "results.md",
                                      render_markdown(rows, title, notes, regime_labels=regime_labels)),
        "csv": atomic_write_text(out_dir / "results.csv", render_csv(rows)),
        "runs_csv": atomic_write_text(out_dir / "runs.csv", render_runs_csv(list(results))),
    }

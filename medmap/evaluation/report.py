"""Evaluation outputs of a run: ``metrics.json``, figures and a short Markdown report.

Example:
    >>> metrics = evaluate_and_report(y_true, probs, organ.classes, "runs/x/metrics/test",  # doctest: +SKIP
    ...                               title="brain, test split", extra={"checkpoint": "best"})
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medmap.evaluation.metrics import compute_metrics
from medmap.evaluation.plots import write_all_plots
from medmap.utils import atomic_write_json, atomic_write_text

_HEADLINE = [
    ("accuracy", "Top-1 accuracy"),
    ("balanced_accuracy", "Balanced accuracy"),
    ("macro_auc", "Macro AUC (one-vs-rest)"),
    ("macro_f1", "Macro F1"),
    ("ece", "ECE (15 bins, top label)"),
]


def write_report(metrics: Mapping[str, Any], out_dir: str | Path, title: str = "Evaluation",
                 extra: Mapping[str, Any] | None = None, figures: Mapping[str, str | Path] | None = None) -> dict[str, Path]:
    """Write ``metrics.json`` (the metrics plus ``extra``) and ``report.md`` into ``out_dir``.

    Args:
        metrics: the dict from :func:`~medmap.evaluation.metrics.compute_metrics`.
        out_dir: target folder (created).
        title: report heading, e.g. ``"brain, test split"``.
        extra: context stored with the metrics and listed in the report (run, checkpoint,
            split, seed ...); must be JSON-serialisable.
        figures: name -> PNG path, linked from the report (relative to ``out_dir``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = dict(metrics)
    if extra:
        payload["context"] = dict(extra)
    json_path = atomic_write_json(out_dir / "metrics.json", payload)
    md_path = atomic_write_text(out_dir / "report.md", render_markdown(metrics, title, extra, figures, out_dir))
    return {"metrics": json_path, "report": md_path}


def write_predictions(path: str | Path, study_ids: Sequence[str], y_true: Sequence[int] | np.ndarray,
                      probs: np.ndarray, class_names: Sequence[str]) -> Path:
    """Write one line per study (``study_id, label, predicted, p_<class>...``): what paired
    comparisons between runs on the same test studies read (:mod:`medmap.experiments.claims`)."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["study_id", "label", "predicted", *[f"p_{c}" for c in class_names]])
    for sid, yi, pi in zip(study_ids, y_true, probs):
        w.writerow([sid, class_names[int(yi)], class_names[int(np.argmax(pi))], *[f"{v:.6f}" for v in pi]])
    return atomic_write_text(Path(path), buf.getvalue())


def evaluate_and_report(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                        out_dir: str | Path, title: str = "Evaluation", extra: Mapping[str, Any] | None = None,
                        n_bootstrap: int = 1000, seed: int = 0, plots: bool = True) -> dict[str, Any]:
    """Compute every metric, draw the figures, write ``metrics.json`` and ``report.md``.

    Returns the metrics dict.
    """
    metrics = compute_metrics(y_true, probs, class_names, n_bootstrap=n_bootstrap, seed=seed)
    figures = write_all_plots(y_true, probs, class_names, out_dir) if plots else None
    write_report(metrics, out_dir, title, extra, figures)
    return metrics


def render_markdown(metrics: Mapping[str, Any], title: str = "Evaluation", extra: Mapping[str, Any] | None = None,
                    figures: Mapping[str, str | Path] | None = None, base: Path | None = None) -> str:
    """The Markdown text of the report."""
    names = list(metrics["class_names"])
    ci = metrics.get("ci") or {}
    lines = [f"# {title}", ""]
    if extra:
        lines += [f"- {k}: `{v}`" for k, v in extra.items()] + [""]
    lines += [f"{metrics['n']} studies, {len(names)} classes ({', '.join(names)}).", ""]
    lines += ["| metric | value | 95% CI |", "| --- | --- | --- |"]
    for key, label in _HEADLINE:
        lines.append(f"| {label} | {_fmt(metrics.get(key))} | {_fmt_ci(ci.get(key))} |")
    lines += [
        "",
        f"Paper-style flattened one-hot accuracy (not top-1; for comparison with the paper only): "
        f"{_fmt(metrics.get('flattened_onehot_accuracy'))}.",
    ]
    if metrics.get("n_bootstrap"):
        lines.append(f"Confidence intervals: percentile bootstrap over studies, {metrics['n_bootstrap']} resamples.")
    skipped = [c for c in names if c not in (metrics.get("macro_auc_classes") or [])]
    if skipped:
        lines.append(f"Macro AUC excludes classes without both positives and negatives here: {', '.join(skipped)}.")
    lines += ["", "## Per class", "", "| class | support | sensitivity | specificity | precision | F1 | AUC |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in names:
        pc = metrics["per_class"][c]
        lines.append(
            f"| {c} | {pc['support']} | {_fmt(pc['sensitivity'])} | {_fmt(pc['specificity'])} | "
            f"{_fmt(pc['precision'])} | {_fmt(pc['f1'])} | {_fmt(pc['auc'])} |"
        )
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
              "| true \\ predicted | " + " | ".join(names) + " |", "| --- " * (len(names) + 1) + "|"]
    for c, row in zip(names, metrics["confusion_matrix"]):
        lines.append(f"| {c} | " + " | ".join(str(v) for v in row) + " |")
    if figures:
        lines += ["", "## Figures", ""]
        for name, path in figures.items():
            rel = Path(path)
            if base is not None:
                try:
                    rel = rel.resolve().relative_to(base.resolve())
                except ValueError:
                    pass
            lines.append(f"![{name}]({rel.as_posix()})")
    return "\n".join(lines) + "\n"


def _fmt(x: Any) -> str:
    return "n/a" if x is None else f"{float(x):.4f}"


def _fmt_ci(x: Any) -> str:
    return "n/a" if not x else f"[{float(x[0]):.4f}, {float(x[1]):.4f}]"

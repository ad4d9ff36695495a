"""Evaluation figures as PNG files: confusion matrix, ROC curves, reliability diagram.

Figures are drawn on matplotlib's Agg canvas directly (``matplotlib.figure.Figure``), so
nothing here touches pyplot's global state or needs a display.

Example:
    >>> paths = write_all_plots(y_true, probs, ["normal", "tumour"], "run/metrics")  # doctest: +SKIP
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc as area_under_curve
from sklearn.metrics import roc_curve

from medmap.evaluation.metrics import reliability_bins


def plot_confusion_matrix(cm: Sequence[Sequence[int]] | np.ndarray, class_names: Sequence[str], path: str | Path,
                          normalize: bool = True, title: str = "Confusion matrix") -> Path:
    """Heat map of the confusion matrix (rows = true, columns = predicted).

    With ``normalize`` the colours show row-normalised rates (sensitivity on the diagonal);
    the cells are annotated with counts and rates.
    """
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1, keepdims=True)
    rate = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    c = len(class_names)
    size = max(4.0, 0.7 * c + 2.5)
    fig = Figure(figsize=(size, size * 0.9))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    img = ax.imshow(rate if normalize else cm, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(img, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class" if normalize else "count")
    for i in range(c):
        for j in range(c):
            shade = (rate if normalize else cm / max(cm.max(), 1))[i, j]
            ax.text(j, i, f"{int(cm[i, j])}\n{rate[i, j]:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if shade > 0.5 else "black")
    ax.set_xticks(range(c), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(c), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc_curves(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    path: str | Path, title: str = "ROC") -> Path:
    """One-vs-rest ROC curves; a binary task gets the single curve of the positive class
    (index 1). Classes without both positives and negatives are skipped (noted in the legend)."""
    y = np.asarray(y_true)
    p = np.asarray(probs)
    c = len(class_names)
    fig = Figure(figsize=(5.5, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
    for k in [1] if c == 2 else range(c):
        pos = y == k
        if pos.all() or not pos.any():
            ax.plot([], [], " ", label=f"{class_names[k]}: undefined (one class only)")
            continue
        fpr, tpr, _ = roc_curve(pos, p[:, k])
        auc = float(area_under_curve(fpr, tpr))
        ax.plot(fpr, tpr, linewidth=1.5, label=f"{class_names[k]} (AUC {auc:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title(title + (f": {class_names[1]} vs {class_names[0]}" if c == 2 else " (one-vs-rest)"))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reliability_diagram(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, path: str | Path,
                             title: str = "Reliability (top label)") -> Path:
    """Top-label reliability diagram (15 bins) with the per-bin sample counts below."""
    rel: dict[str, Any] = reliability_bins(np.asarray(y_true), np.asarray(probs))
    edges = np.asarray(rel["bin_edges"])
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    acc = np.array([a if a is not None else np.nan for a in rel["accuracy"]])
    conf = np.array([s if s is not None else np.nan for s in rel["confidence"]])
    fig = Figure(figsize=(5.5, 6))
    FigureCanvasAgg(fig)
    ax, ax_n = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.bar(centres, np.nan_to_num(acc), width=width * 0.95, color="tab:blue", alpha=0.8, label="accuracy")
    ax.scatter(conf, acc, color="tab:red", s=12, zorder=3, label="mean confidence")
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    ax_n.bar(centres, rel["count"], width=width * 0.95, color="grey")
    ax_n.set_xlim(0, 1)
    ax_n.set_xlabel("confidence of the predicted class")
    ax_n.set_ylabel("count")
    return _save(fig, path)


def write_all_plots(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    out_dir: str | Path, prefix: str = "") -> dict[str, Path]:
    """Write ``confusion_matrix.png``, ``roc.png`` and ``reliability.png`` into ``out_dir``."""
    from sklearn.metrics import confusion_matrix  # noqa: PLC0415

    out_dir = Path(out_dir)
    y = np.asarray(y_true)
    p = np.asarray(probs)
    cm = confusion_matrix(y, p.argmax(axis=1), labels=np.arange(len(class_names)))
    return {
        "confusion_matrix": plot_confusion_matrix(cm, class_names, out_dir / f"{prefix}confusion_matrix.png"),
        "roc": plot_roc_curves(y, p, class_names, out_dir / f"{prefix}roc.png"),
        "reliability": plot_reliability_diagram(y, p, out_dir / f"{prefix}reliability.png"),
    }


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def label_efficiency_plot(points: Sequence[tuple[str, float, float]], path: str | Path, title: str = "Label efficiency",
                          chance: float | None = None, ylabel: str = "balanced accuracy (test)") -> Path:
    """Accuracy against labelled training studies per class: one line per method (the mean
    over seeds) with the seed range shaded.

    Args:
        points: ``(method, labelled studies per class, score of one seed)``.
        path: the PNG to write.
        chance: drawn as a dotted line when given.

    Example:
        >>> label_efficiency_plot([("a", 5, 0.5), ("a", 5, 0.6), ("a", 20, 0.8)], "/tmp/le.png")  # doctest: +SKIP
    """
    fig = label_efficiency_figure(points, title, chance, ylabel)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def label_efficiency_figure(points: Sequence[tuple[str, float, float]], title: str = "Label efficiency",
                            chance: float | None = None, ylabel: str = "balanced accuracy (test)") -> Figure:
    """The figure of :func:`label_efficiency_plot`, not yet written."""
    fig = Figure(figsize=(8.6, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    methods = list(dict.fromkeys(m for m, _, _ in points))
    for method in methods:
        xs = sorted({x for m, x, _ in points if m == method})
        vals = [[v for m, x2, v in points if m == method and x2 == x] for x in xs]
        mean = [float(np.mean(v)) for v in vals]
        line = ax.plot(xs, mean, marker="o", label=f"{method} (n={max(len(v) for v in vals)} seeds)")[0]
        ax.fill_between(xs, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(), alpha=0.2)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label="chance")
    xs_all = sorted({x for _, x, _ in points})
    if xs_all and xs_all[0] == 0:  # a zero-shot point: linear below one label per class, logarithmic above
        ax.set_xscale("symlog", linthresh=1.0)
    else:
        ax.set_xscale("log")
    ax.set_xticks(xs_all)
    ax.set_xticklabels(["0\n(zero-shot)" if x == 0 else f"{x:.0f}" if x >= 10 else f"{x:g}" for x in xs_all])  # all labels: a mean, e.g. 300.6
    ax.set_xticks([], minor=True)  # a log axis spanning less than a decade would label its minor ticks (6 x 10^0)
    ax.set_xlabel("labelled training studies per class")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 1.02)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: the curves meet low right
    fig.tight_layout()
    return fig


def row_scores_figure(panels: Sequence[tuple[str, Sequence[tuple[str, float, float, float, Sequence[float]]], float | None]],
                      path: str | Path, xlabel: str = "balanced accuracy (test)") -> Path:
    """One panel per task and label regime: each grid row's score (mean over seeds) with its 95%
    CI as a bar and every seed as a dot.

    Args:
        panels: ``(title, rows, chance)`` with rows ``(label, mean, ci_low, ci_high, seed scores)``,
            drawn top to bottom in the given order.
        path: the PNG to write.

    Example:
        >>> row_scores_figure([("liver", [("full", 0.8, 0.7, 0.9, [0.78, 0.82])], 1 / 7)], "/tmp/r.png")  # doctest: +SKIP
    """
    height = max(2.5, 0.32 * max(len(rows) for _, rows, _ in panels) + 1.2)
    fig = Figure(figsize=(6.2 * len(panels), height))
    FigureCanvasAgg(fig)
    for i, (title, rows, chance) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ys = np.arange(len(rows))[::-1]
        for y, (_, mean, lo, hi, seeds) in zip(ys, rows):
            ax.plot([lo, hi], [y, y], color="tab:blue", linewidth=2.5, alpha=0.5)
            ax.plot([mean], [y], marker="|", color="tab:blue", markersize=14, markeredgewidth=2)
            ax.plot(list(seeds), [y] * len(seeds), "o", color="black", markersize=2.5, alpha=0.7)
        if chance is not None:
            ax.axvline(chance, color="grey", linestyle=":", label="chance")
            ax.legend(fontsize=7, loc="upper left")
        ax.set_yticks(ys)
        ax.set_yticklabels([r[0] for r in rows], fontsize=8)
        ax.set_xlim(0, 1.0)
        ax.set_xlabel(xlabel)
        ax.set_title(textwrap.fill(title, 48), fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)

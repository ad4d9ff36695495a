"""Every metric of the MedMAP evaluation protocol, with bootstrap confidence intervals.

Headline metrics are top-1 accuracy, balanced accuracy and macro AUC (one-vs-rest); the
paper-style "flattened one-hot accuracy" is reported separately under that name, for
comparison with the paper only.

Conventions (the same for binary and multi-class tasks):

* ``probs`` are class probabilities ``[n, C]``; the prediction is their arg-max.
* **Classes absent from ``y_true``** (possible in small test splits): their one-vs-rest AUC
  and sensitivity are undefined and reported as ``None``; macro AUC averages the classes
  that have both positives and negatives; balanced accuracy averages the recall of the
  classes present in ``y_true`` (scikit-learn's behaviour); macro F1 averages over the
  classes that occur in ``y_true`` or in the predictions (a class that occurs in neither
  carries no information and is not counted as F1 = 0).
* In a binary task the macro one-vs-rest AUC equals the ordinary ROC AUC (the two
  one-vs-rest AUCs are equal because ``p_0 = 1 - p_1``).
* ECE is the top-label expected calibration error over 15 equal-width confidence bins.
* Confidence intervals are percentile bootstrap 95% intervals over studies; a resample on
  which a metric is undefined (e.g. a single class, for AUC) is skipped.

Example:
    >>> import numpy as np
    >>> m = compute_metrics([0, 1, 1], np.array([[0.8, 0.2], [0.3, 0.7], [0.6, 0.4]]),
    ...                     ["normal", "tumour"], n_bootstrap=0)
    >>> round(m["accuracy"], 3), m["confusion_matrix"]
    (0.667, [[1, 0], [1, 1]])
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

from medmap.errors import MedMAPError

HEADLINE_METRICS = ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "ece")
ECE_BINS = 15


class MetricsInputError(MedMAPError, ValueError):
    """Labels and probabilities that cannot be evaluated (shapes, ranges, NaN)."""


def compute_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    n_bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
    """All evaluation-protocol metrics for one set of predictions (JSON-serialisable).

    Args:
        y_true: true class indices ``[n]``.
        probs: predicted probabilities ``[n, C]`` (rows sum to 1).
        class_names: ``C`` names, in label order.
        n_bootstrap: bootstrap resamples for the 95% CIs (0 = no CIs).
        seed: seed of the bootstrap resampling.

    Returns:
        A dict with ``n``, ``class_names``, ``accuracy``, ``balanced_accuracy``,
        ``macro_auc``, ``macro_f1``, ``ece``, ``flattened_onehot_accuracy``,
        ``confusion_matrix`` (rows = true, columns = predicted), ``per_class`` (name ->
        ``support``, ``sensitivity``, ``specificity``, ``precision``, ``f1``, ``auc``),
        ``reliability`` (per-bin ``count``, ``accuracy``, ``confidence``), and ``ci``
        (headline metric -> ``[low, high]``, or ``None`` if undefined on every resample).
    """
    y, p = _validate(y_true, probs, class_names)
    n, c = p.shape
    labels = np.arange(c)
    y_pred = p.argmax(axis=1)
    cm = confusion_matrix(y, y_pred, labels=labels)

    per_class: dict[str, dict[str, Any]] = {}
    aucs: list[float] = []
    tp = np.diag(cm)
    for k, name in enumerate(class_names):
        pos = int(cm[k].sum())
        neg = n - pos
        fp = int(cm[:, k].sum() - tp[k])
        auc = float(roc_auc_score(y == k, p[:, k])) if 0 < pos < n else None
        if auc is not None:
            aucs.append(auc)
        pred_k = int(cm[:, k].sum())
        prec = float(tp[k] / pred_k) if pred_k else None
        sens = float(tp[k] / pos) if pos else None
        f1 = float(2 * tp[k] / (pos + pred_k)) if (pos + pred_k) else None
        per_class[name] = {
            "support": pos,
            "sensitivity": sens,
            "specificity": float((neg - fp) / neg) if neg else None,
            "precision": prec,
            "f1": f1,
            "auc": auc,
        }

    f1_labels = np.union1d(y, y_pred)
    metrics: dict[str, Any] = {
        "n": int(n),
        "num_classes": int(c),
        "class_names": list(class_names),
        "accuracy": float(accuracy_score(y, y_pred)),
        "balanced_accuracy": _balanced_accuracy_sklearn(y, y_pred),
        "macro_auc": float(np.mean(aucs)) if aucs else None,
        "macro_auc_classes": [class_names[k] for k in range(c) if per_class[class_names[k]]["auc"] is not None],
        "macro_f1": float(f1_score(y, y_pred, labels=f1_labels, average="macro", zero_division=0)),
        "ece": expected_calibration_error(y, p),
        "flattened_onehot_accuracy": flattened_onehot_accuracy(y, p),
        "confusion_matrix": cm.tolist(),
        "per_class": per_class,
        "reliability": reliability_bins(y, p),
    }
    metrics["ci"] = bootstrap_ci(y, p, n_bootstrap, seed) if n_bootstrap > 0 else {}
    metrics["n_bootstrap"] = int(n_bootstrap)
    return metrics


def flattened_onehot_accuracy(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> float:
    """The paper's (official code's) "accuracy": agreement of flattened one-hot vectors.

    The arg-max prediction and the label are each one-hot encoded to ``C`` entries and the
    fraction of the ``n * C`` entries that agree is returned. This is **not** top-1
    accuracy: a wrong prediction still agrees on ``C - 2`` of its ``C`` entries, so the value
    equals ``1 - 2 (1 - top1) / C``; it matches top-1 only for ``C = 2`` and is inflated for
    more classes (7 classes, top-1 0.5 -> 0.857). Reported only for comparison with the paper.
    """
    y = np.asarray(y_true, dtype=np.int64)
    p = np.asarray(probs)
    c = p.shape[1]
    onehot_true = np.eye(c, dtype=bool)[y]
    onehot_pred = np.eye(c, dtype=bool)[p.argmax(axis=1)]
    return float((onehot_true == onehot_pred).mean())


def reliability_bins(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> dict[str, list]:
    """Top-label reliability data over ``n_bins`` equal-width bins ``(lo, hi]`` of [0, 1].

    Returns ``bin_edges`` (``n_bins + 1``), and per bin ``count``, ``accuracy`` and
    ``confidence`` (``None`` for empty bins).
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    return {
        "bin_edges": edges.tolist(),
        "count": count.astype(int).tolist(),
        "accuracy": [float(a / k) if k else None for a, k in zip(acc_sum, count)],
        "confidence": [float(s / k) if k else None for s, k in zip(conf_sum, count)],
    }


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """Top-label ECE: ``sum_b |B_b|/n * |acc(B_b) - conf(B_b)|`` over equal-width bins."""
    rel = reliability_bins(y_true, probs, n_bins)
    n = sum(rel["count"])
    return float(sum(k / n * abs(a - s) for k, a, s in zip(rel["count"], rel["accuracy"], rel["confidence"]) if k))


# --------------------------------------------------------------------------- bootstrap
def bootstrap_ci(y: np.ndarray, p: np.ndarray, n_bootstrap: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict[str, list[float] | None]:
    """Percentile bootstrap ``(1 - alpha)`` intervals of the headline metrics.

    Resamples studies with replacement. Uses fast NumPy implementations of the metrics
    (tested to agree with scikit-learn) because scikit-learn's input checks dominate the
    cost of thousands of small evaluations.
    """
    rng = np.random.default_rng(seed)
    n, c = p.shape
    y_pred = p.argmax(axis=1)
    conf = p.max(axis=1)
    correct = (y_pred == y).astype(np.float64)
    samples: dict[str, list[float]] = {k: [] for k in HEADLINE_METRICS}
    for _ in range(n_bootstrap):
        i = rng.integers(0, n, size=n)
        yi, pi, ypi = y[i], p[i], y_pred[i]
        cm = np.bincount(yi * c + ypi, minlength=c * c).reshape(c, c)
        samples["accuracy"].append(float(correct[i].mean()))
        samples["balanced_accuracy"].append(_balanced_accuracy_cm(cm))
        samples["macro_f1"].append(_macro_f1_cm(cm))
        auc = _macro_auc_fast(yi, pi)
        if auc is not None:
            samples["macro_auc"].append(auc)
        samples["ece"].append(_ece_fast(conf[i], correct[i]))
    out: dict[str, list[float] | None] = {}
    for k, vals in samples.items():
        out[k] = [float(np.quantile(vals, alpha / 2)), float(np.quantile(vals, 1 - alpha / 2))] if vals else None
    return out


def _balanced_accuracy_sklearn(y: np.ndarray, y_pred: np.ndarray) -> float:
    import warnings  # noqa: PLC0415

    with warnings.catch_warnings():
        # "y_pred contains classes not in y_true": expected when a class is absent.
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(y, y_pred))


def _balanced_accuracy_cm(cm: np.ndarray) -> float:
    support = cm.sum(axis=1)
    present = support > 0
    return float((np.diag(cm)[present] / support[present]).mean())


def _macro_f1_cm(cm: np.ndarray) -> float:
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=1) + cm.sum(axis=0)
    used = denom > 0
    return float((2 * tp[used] / denom[used]).mean())


def _macro_auc_fast(y: np.ndarray, p: np.ndarray) -> float | None:
    """Macro one-vs-rest AUC by the Mann-Whitney rank formula (ties get average ranks)."""
    n, c = p.shape
    aucs = []
    for k in range(c):
        pos = y == k
        n_pos = int(pos.sum())
        if n_pos == 0 or n_pos == n:
            continue
        r = rankdata(p[:, k])
        aucs.append((r[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (n - n_pos)))
    return float(np.mean(aucs)) if aucs else None


def _ece_fast(conf: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS) -> float:
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    gap = np.abs(np.bincount(idx, weights=correct, minlength=n_bins) - np.bincount(idx, weights=conf, minlength=n_bins))
    return float(gap.sum() / len(conf))


def _validate(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    c = len(class_names)
    if c < 2:
        raise MetricsInputError(f"need at least two classes, got {list(class_names)}")
    if p.ndim != 2 or p.shape[1] != c:
        raise MetricsInputError(f"probs must be [n, {c}] for classes {list(class_names)}, got shape {p.shape}")
    if y.ndim != 1 or y.shape[0] != p.shape[0]:
        raise MetricsInputError(f"y_true must be [n={p.shape[0]}], got shape {y.shape}")
    if y.shape[0] == 0:
        raise MetricsInputError("no predictions to evaluate")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise MetricsInputError("y_true must hold integer class indices")
        y = y.astype(np.int64)
    if y.min() < 0 or y.max() >= c:
        raise MetricsInputError(f"y_true must lie in [0, {c}); got values in [{y.min()}, {y.max()}] (unlabelled = -1?)")
    if not np.isfinite(p).all():
        raise MetricsInputError("probs contain NaN or Inf")
    if (p < -1e-6).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise MetricsInputError("probs must be non-negative and each row must sum to 1 (apply softmax first)")
    return y.astype(np.int64), p

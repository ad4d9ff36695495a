import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from medmap.evaluation.metrics import (
    MetricsInputError,
    _balanced_accuracy_cm,
    _ece_fast,
    _macro_auc_fast,
    _macro_f1_cm,
    compute_metrics,
    expected_calibration_error,
    flattened_onehot_accuracy,
)

CLASSES3 = ["a", "b", "c"]


def _onehot_probs(pred, c, conf=0.8):
    p = np.full((len(pred), c), (1 - conf) / (c - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def test_perfect_predictions():
    y = np.array([0, 1, 2, 0, 1, 2])
    m = compute_metrics(y, _onehot_probs(y, 3), CLASSES3, n_bootstrap=50)
    for k in ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1", "flattened_onehot_accuracy"):
        assert m[k] == pytest.approx(1.0)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert all(v["sensitivity"] == 1.0 and v["specificity"] == 1.0 for v in m["per_class"].values())
    assert m["ece"] == pytest.approx(0.2)  # always right at confidence 0.8
    assert m["ci"]["accuracy"] == [1.0, 1.0]


def test_known_confusion_matrix_hand_computed():
    y = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    m = compute_metrics(y, _onehot_probs(pred, 3), CLASSES3, n_bootstrap=0)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)
    pc = m["per_class"]
    assert (pc["a"]["sensitivity"], pc["a"]["specificity"]) == pytest.approx((2 / 3, 1.0))
    assert (pc["b"]["sensitivity"], pc["b"]["specificity"]) == pytest.approx((1 / 2, 3 / 4))
    assert (pc["c"]["sensitivity"], pc["c"]["specificity"]) == pytest.approx((1.0, 4 / 5))
    assert pc["a"]["support"] == 3 and pc["c"]["precision"] == pytest.approx(0.5)
    assert m["ci"] == {}


def test_flattened_onehot_accuracy_is_not_top1():
    y = np.array([0, 1, 2, 3, 4, 5, 6, 0, 1, 2])
    pred = np.array([0, 1, 2, 3, 4, 0, 0, 1, 2, 3])  # top-1 = 5/10
    p = _onehot_probs(pred, 7)
    m = compute_metrics(y, p, [f"k{i}" for i in range(7)], n_bootstrap=0)
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["flattened_onehot_accuracy"] == pytest.approx(1 - 2 * 0.5 / 7)  # 0.857
    # binary: each error flips both entries, so the two agree
    yb, pb = np.array([0, 1, 1, 0]), _onehot_probs(np.array([0, 1, 0, 0]), 2)
    assert flattened_onehot_accuracy(yb, pb) == pytest.approx(0.75)


def test_ece_perfectly_calibrated_is_zero_and_known_value():
    # 10 studies at confidence 0.8 with 8 right, 10 at 0.6 with 6 right: calibrated.
    y = np.zeros(20, dtype=int)
    pred = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    conf = np.array([0.8] * 10 + [0.6] * 10)
    p = np.zeros((20, 2))
    p[np.arange(20), pred] = conf
    p[np.arange(20), 1 - pred] = 1 - conf
    assert expected_calibration_error(y, p) == pytest.approx(0.0, abs=1e-12)
    # over-confident: always right at 0.6 -> ECE 0.4
    assert expected_calibration_error(np.zeros(5, int), np.tile([0.6, 0.4], (5, 1))) == pytest.approx(0.4)


def test_binary_task_and_auc_matches_sklearn():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(0.3 * y + rng.uniform(0, 0.7, 60), 0, 1)
    p = np.stack([1 - p1, p1], axis=1)
    m = compute_metrics(y, p, ["normal", "tumour"], n_bootstrap=200)
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y, p1))
    assert m["flattened_onehot_accuracy"] == pytest.approx(m["accuracy"])
    lo, hi = m["ci"]["macro_auc"]
    assert lo <= m["macro_auc"] <= hi and hi - lo > 0


def test_class_absent_from_y_true_is_handled():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])
    m = compute_metrics(y, _onehot_probs(pred, 3, conf=0.7), CLASSES3, n_bootstrap=20)
    assert m["per_class"]["c"]["auc"] is None and m["per_class"]["c"]["sensitivity"] is None
    assert m["per_class"]["c"]["specificity"] == pytest.approx(3 / 4)
    assert m["macro_auc_classes"] == ["a", "b"]
    assert m["balanced_accuracy"] == pytest.approx((1 / 2 + 1) / 2)
    # c was predicted once (F1 0), a: 2*1/(2+1), b: 1
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 + 0) / 3)


def test_fast_bootstrap_metrics_agree_with_sklearn():
    rng = np.random.default_rng(1)
    for _ in range(5):
        c = 4
        y = rng.integers(0, c, 40)
        p = rng.dirichlet(np.ones(c), 40)
        p = np.round(p, 1)  # create ties
        p /= p.sum(1, keepdims=True)
        pred = p.argmax(1)
        cm = np.bincount(y * c + pred, minlength=c * c).reshape(c, c)
        assert _balanced_accuracy_cm(cm) == pytest.approx(balanced_accuracy_score(y, pred))
        labels = np.union1d(y, pred)
        assert _macro_f1_cm(cm) == pytest.approx(f1_score(y, pred, labels=labels, average="macro"))
        ref = np.mean([roc_auc_score(y == k, p[:, k]) for k in range(c) if 0 < (y == k).sum() < len(y)])
        assert _macro_auc_fast(y, p) == pytest.approx(ref)
        assert _ece_fast(p.max(1), (pred == y).astype(float)) == pytest.approx(expected_calibration_error(y, p))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 80)
    p = rng.dirichlet(np.ones(3), 80)
    a = compute_metrics(y, p, CLASSES3, n_bootstrap=300, seed=5)
    b = compute_metrics(y, p, CLASSES3, n_bootstrap=300, seed=5)
    assert a["ci"] == b["ci"]
    for k in ("accuracy", "balanced_accuracy", "macro_auc", "macro_f1"):
        lo, hi = a["ci"][k]
        assert lo < hi and lo <= a[k] + 0.02 and a[k] - 0.02 <= hi


@pytest.mark.parametrize(
    "y,p,match",
    [
        ([0, 1], np.array([[0.5, 0.5], [0.5, 0.5]]), "probs must be"),
        ([0, 3], _onehot_probs(np.array([0, 1]), 3), "must lie in"),
        ([0, -1], _onehot_probs(np.array([0, 1]), 3), "must lie in"),
        ([0, 1], np.array([[0.9, 0.9, 0.0], [0.0, 1.0, 0.0]]), "sum to 1"),
        ([0, 1], np.array([[np.nan, 1.0, 0.0], [0.0, 1.0, 0.0]]), "NaN"),
    ],
)
def test_bad_inputs_raise_clear_errors(y, p, match):
    with pytest.raises(MetricsInputError, match=match):
        compute_metrics(y, p, CLASSES3, n_bootstrap=0)

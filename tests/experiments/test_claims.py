"""Paired claims: balanced accuracy on bootstrap draws, the paired CI and its verdict, config checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from medmap.errors import ConfigError
from medmap.evaluation.report import write_predictions
from medmap.experiments.claims import (balanced_accuracy_samples, drop_claims, measure_claims, paired_difference,
                                       parse_claims, render_claims_markdown, row_scores)

CLASSES = ["a", "b", "c"]


def _runs(n: int, accuracy: float, seeds: int, rng: np.random.Generator, y: np.ndarray) -> dict[str, tuple]:
    """Per seed, predictions right with probability ``accuracy`` (wrong ones: the next class)."""
    out = {}
    for s in range(seeds):
        right = rng.random(n) < accuracy
        out[str(s)] = (y, np.where(right, y, (y + 1) % 3))
    return out


def test_balanced_accuracy_on_draws_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    y, pred = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
    draws = rng.integers(0, 60, size=(20, 60))
    got = balanced_accuracy_samples(y, pred, draws)
    want = [balanced_accuracy_score(y[d], pred[d]) for d in draws]
    np.testing.assert_allclose(got, want)


def test_verdicts_follow_the_paired_ci() -> None:
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 50)
    good, poor = _runs(150, 0.9, 5, rng, y), _runs(150, 0.6, 5, rng, y)
    better = paired_difference(good, poor, n_bootstrap=500)
    assert better.verdict == "confirmed" and better.ci_low > 0.15 and better.seeds == tuple("01234")
    assert paired_difference(poor, good, n_bootstrap=500).verdict == "opposite"
    same = paired_difference(good, good, n_bootstrap=500)
    assert same.verdict == "not confirmed" and same.estimate == same.ci_low == same.ci_high == 0.0
    close = paired_difference(_runs(150, 0.8, 5, rng, y), _runs(150, 0.8, 5, rng, y), n_bootstrap=500)
    assert close.ci_low < 0 < close.ci_high and close.verdict == "not confirmed"


def test_a_single_run_row_stands_for_every_seed_and_sides_average_rows() -> None:
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 20)
    full = _runs(60, 0.9, 3, rng, y)
    intensity = {"0": (y, y)}  # a deterministic baseline run once: perfect
    d = paired_difference(full, intensity, n_bootstrap=200)
    assert d.seeds == ("0", "1", "2") and d.estimate < 0
    full_mean = np.mean([balanced_accuracy_score(*full[s]) for s in full])
    two = paired_difference([full, intensity], full, n_bootstrap=200)  # a side of two rows is their mean
    assert two.estimate == pytest.approx((full_mean + 1.0) / 2 - full_mean)


def test_runs_on_other_test_studies_are_refused() -> None:
    y = np.array([0, 1, 2, 0])
    with pytest.raises(ValueError, match="same test studies"):
        paired_difference({"0": (y, y)}, {"0": (y[::-1], y)}, n_bootstrap=10)


def test_measure_claims_from_prediction_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    y = np.repeat(np.arange(3), 10)
    ids = [f"s{i:02d}" for i in range(30)]
    runs: dict = {}
    for row, acc in [("full", 0.95), ("no_csa", 0.5), ("full_without_b1", 0.7)]:
        for seed, (_, pred) in _runs(30, acc, 2, rng, y).items():
            p = np.eye(3)[pred]
            path = write_predictions(tmp_path / row / seed / "predictions.csv", ids, y, p, CLASSES)
            runs.setdefault(("liver", "all", row), {})[seed] = path
    specs = parse_claims([{"name": "csa", "claim": "CSA helps", "a": "full", "b": "no_csa", "paper_points": 4.32},
                          {"name": "absent", "a": "full", "b": "no_such_row"}])
    results = measure_claims(specs, runs, {"liver": CLASSES}, n_bootstrap=300)
    assert [r.name for r in results] == ["csa", "needs_b1"]  # a claim without runs is left out
    csa = results[0]
    assert csa.difference.verdict == "confirmed" and csa.paper_inside_ci is False
    md = render_claims_markdown(results, {"all": "all labels"})
    assert "## liver: all labels" in md and "| CSA helps | full | no_csa | 2 |" in md and "confirmed" in md
    mean, lo, hi, each = row_scores(runs[("liver", "all", "full")], CLASSES, n_bootstrap=200)
    assert lo <= mean <= hi and len(each) == 2 and mean == pytest.approx(np.mean(each))


def test_claim_config_errors() -> None:
    with pytest.raises(ConfigError, match="'name', 'a' and 'b'"):
        parse_claims([{"name": "x", "a": "full"}])
    with pytest.raises(ConfigError, match="unknown keys \\['paper'\\]"):
        parse_claims([{"name": "x", "a": "full", "b": "no_cct", "paper": 3}])
    assert [c.name for c in drop_claims(["full", "full_without_t2", "seq_without_t2"])] == ["needs_t2"]

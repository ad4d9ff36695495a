"""The paper's claims as paired comparisons between grid rows, with a bootstrap CI and a verdict.

A claim compares two sides on the same test studies and the same seeds, e.g. "the
Cross-Cognition Transformer adds 3.03 points": side ``a`` = the full model, side ``b`` = the
model without CCT. A side is one row or several (their mean, e.g. every "one sequence
dropped" condition). Its score in one resample is the balanced accuracy averaged over the
seeds both sides have; the difference ``a - b`` is bootstrapped by resampling the *test
studies* (the same draw for every seed and both sides: a paired bootstrap), so the CI is the
uncertainty of this test set and these seeds. The verdict is

* ``confirmed``: the CI lies above 0 (``a`` better, as the paper says);
* ``opposite``: the CI lies below 0;
* ``not confirmed``: the CI holds 0.

and, when the paper gives a figure, whether the figure lies inside the CI.

Claims come from the experiment config (``claims:``, see ``paper_grid.yaml``); every
``drop_modality`` row also gives one "sequence carries information" comparison.

Example:
    >>> y = np.array([0, 0, 1, 1]); a = np.array([0, 0, 1, 1]); b = np.array([0, 1, 1, 0])
    >>> d = paired_difference({"s0": (y, a)}, {"s0": (y, b)}, n_bootstrap=200, seed=0)
    >>> round(d.estimate, 2), d.verdict
    (0.5, 'not confirmed')
"""

from __future__ import annotations

import csv
import fnmatch
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from medmap.errors import ConfigError
from medmap.utils import atomic_write_text

CLAIM_KEYS = {"name", "claim", "a", "b", "paper_points", "tasks", "regimes"}
#: predictions of one run: (true label index, predicted label index) per test study, in study order
Predictions = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Difference:
    """``a - b`` in balanced accuracy, averaged over seeds, with its paired bootstrap 95% CI."""

    estimate: float
    ci_low: float
    ci_high: float
    seeds: tuple[str, ...]
    n_test: int

    @property
    def verdict(self) -> str:
        if self.ci_low > 0:
            return "confirmed"
        if self.ci_high < 0:
            return "opposite"
        return "not confirmed"


@dataclass(frozen=True)
class ClaimResult:
    """One claim measured on one task and label regime."""

    name: str
    claim: str
    task: str
    regime: str
    a: str
    b: str
    paper_points: float | None
    difference: Difference

    @property
    def paper_inside_ci(self) -> bool | None:
        if self.paper_points is None:
            return None
        return self.difference.ci_low <= self.paper_points / 100 <= self.difference.ci_high


def balanced_accuracy_samples(y: np.ndarray, pred: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """Balanced accuracy of ``pred`` on each bootstrap draw (rows of study indices).

    Classes absent from a draw are left out of that draw's mean recall.

    Example:
        >>> y = np.array([0, 0, 1, 1]); p = np.array([0, 1, 1, 1])
        >>> balanced_accuracy_samples(y, p, np.array([[0, 1, 2, 3], [0, 0, 2, 2]])).tolist()
        [0.75, 1.0]
    """
    yd, correct = y[draws], (pred == y)[draws]
    recalls = []
    for c in np.unique(y):
        n = (yd == c).sum(axis=1)
        hit = ((yd == c) & correct).sum(axis=1)
        recalls.append(np.where(n > 0, hit / np.maximum(n, 1), np.nan))
    return np.nanmean(np.stack(recalls), axis=0)


def _at(row: Mapping[str, Predictions], seed: str) -> Predictions:
    """A row's run of ``seed``; a row of one run (a deterministic baseline) stands for every seed."""
    return row[seed] if seed in row else next(iter(row.values()))


def common_seeds(rows: Sequence[Mapping[str, Predictions]]) -> list[str]:
    """The seeds every row with several runs has (rows of one run are used for every seed)."""
    multi = [set(r) for r in rows if len(r) > 1] or [set(r) for r in rows]
    return sorted(set.intersection(*multi))


def side_scores(side: Sequence[Mapping[str, Predictions]], seeds: Sequence[str], draws: np.ndarray) -> np.ndarray:
    """Mean over seeds and over the side's rows of the balanced accuracy on each draw."""
    per = [balanced_accuracy_samples(*_at(row, s), draws) for row in side for s in seeds]
    return np.mean(np.stack(per), axis=0)


def paired_difference(a: Mapping[str, Predictions] | Sequence[Mapping[str, Predictions]],
                      b: Mapping[str, Predictions] | Sequence[Mapping[str, Predictions]],
                      n_bootstrap: int = 2000, seed: int = 0) -> Difference:
    """The paired bootstrap of ``a - b`` (see the module docstring).

    Args:
        a, b: per seed, the predictions of one row, or a list of such (a side of several
            rows, averaged). Every run must hold the same test studies in the same order.
        n_bootstrap: resamples of the test studies.
        seed: the resampling seed.
    """
    a = [a] if isinstance(a, Mapping) else list(a)
    b = [b] if isinstance(b, Mapping) else list(b)
    seeds = common_seeds([*a, *b])
    if not seeds:
        raise ValueError("the two sides share no seed")
    y0 = _at(a[0], seeds[0])[0]
    for row in [*a, *b]:
        for s in seeds:
            if not np.array_equal(_at(row, s)[0], y0):
                raise ValueError("the runs of a paired comparison must hold the same test studies in the same order")
    n = len(y0)
    full = np.arange(n)[None, :]
    draws = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    estimate = float(side_scores(a, seeds, full)[0] - side_scores(b, seeds, full)[0])
    diffs = side_scores(a, seeds, draws) - side_scores(b, seeds, draws)
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
    return Difference(estimate, float(lo), float(hi), tuple(seeds), n)


def read_predictions(path: Path, classes: Sequence[str]) -> tuple[list[str], Predictions]:
    """``predictions.csv`` of one run as study ids and label / prediction indices (sorted by study id)."""
    with Path(path).open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda r: r["study_id"])
    ids = [r["study_id"] for r in rows]
    y = np.array([classes.index(r["label"]) for r in rows])
    pred = np.array([classes.index(r["predicted"]) for r in rows])
    return ids, (y, pred)


@dataclass(frozen=True)
class ClaimSpec:
    """A claim of the config: side ``a`` against side ``b`` (row names; ``*`` patterns allowed)."""

    name: str
    claim: str
    a: tuple[str, ...]
    b: tuple[str, ...]
    paper_points: float | None = None
    tasks: tuple[str, ...] | None = None
    regimes: tuple[str, ...] | None = None


def parse_claims(raw: Any) -> list[ClaimSpec]:
    """The ``claims`` list of an experiment config, checked."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError("experiment config: 'claims' must be a list")
    out = []
    as_tuple = lambda v: tuple(str(x) for x in ([v] if isinstance(v, str) else v))  # noqa: E731
    for i, c in enumerate(raw):
        if not isinstance(c, Mapping) or not all(k in c for k in ("name", "a", "b")):
            raise ConfigError(f"experiment config: claims[{i}] must be a mapping with 'name', 'a' and 'b'")
        unknown = set(c) - CLAIM_KEYS
        if unknown:
            raise ConfigError(f"claim '{c['name']}': unknown keys {sorted(unknown)}; known: {sorted(CLAIM_KEYS)}")
        paper = c.get("paper_points")
        out.append(ClaimSpec(str(c["name"]), str(c.get("claim") or c["name"]), as_tuple(c["a"]), as_tuple(c["b"]),
                             None if paper is None else float(paper),
                             None if c.get("tasks") is None else as_tuple(c["tasks"]),
                             None if c.get("regimes") is None else as_tuple(c["regimes"])))
    return out


def drop_claims(row_names: Sequence[str]) -> list[ClaimSpec]:
    """One "the sequence carries information" comparison per ``<source>_without_<sequence>`` row."""
    out = []
    for name in row_names:
        if "_without_" in name:
            src, seq = name.split("_without_", 1)
            if src in row_names:
                out.append(ClaimSpec(f"needs_{seq}" if src == "full" else f"{src}_needs_{seq}",
                                     f"{seq} adds to {src} (removed at test time)", (src,), (name,)))
    return out


def _expand(patterns: Sequence[str], names: Sequence[str]) -> list[str]:
    return [n for p in patterns for n in names if fnmatch.fnmatchcase(n, p)]


def measure_claims(specs: Sequence[ClaimSpec], runs: Mapping[tuple[str, str, str], Mapping[str, Path]],
                   classes: Mapping[str, Sequence[str]], n_bootstrap: int = 2000) -> list[ClaimResult]:
    """Every claim on every (task, regime) where both sides have finished runs.

    Args:
        specs: the claims.
        runs: ``(task, regime, row) -> {seed: predictions.csv}`` of every finished run.
        classes: the class names of each task.
        n_bootstrap: resamples of the test studies.
    """
    out: list[ClaimResult] = []
    for task, regime in dict.fromkeys((t, r) for t, r, _ in runs):
        names = [row for t, r, row in runs if (t, r) == (task, regime)]
        for spec in [*specs, *drop_claims(names)]:
            if (spec.tasks and task not in spec.tasks) or (spec.regimes and regime not in spec.regimes):
                continue
            a, b = _expand(spec.a, names), _expand(spec.b, names)
            if not a or not b:
                continue
            sides = [[_load(runs[(task, regime, r)], classes[task]) for r in side] for side in (a, b)]
            try:
                diff = paired_difference(sides[0], sides[1], n_bootstrap=n_bootstrap)
            except ValueError:
                continue  # no common seed yet
            out.append(ClaimResult(spec.name, spec.claim, task, regime, " + ".join(a), " + ".join(b),
                                   spec.paper_points, diff))
    return out


def row_scores(runs: Mapping[str, Path], classes: Sequence[str], n_bootstrap: int = 2000,
               seed: int = 0) -> tuple[float, float, float, list[float]]:
    """One row's balanced accuracy: mean over seeds, its 95% CI (bootstrap over test studies,
    the same draw for every seed) and each seed's value."""
    preds = _load(runs, classes)
    seeds = sorted(preds)
    n = len(preds[seeds[0]][0])
    draws = np.random.default_rng(seed).integers(0, n, size=(n_bootstrap, n))
    mean = float(side_scores([preds], seeds, np.arange(n)[None, :])[0])
    lo, hi = np.nanpercentile(side_scores([preds], seeds, draws), [2.5, 97.5])
    each = [float(balanced_accuracy_samples(*preds[s], np.arange(n)[None, :])[0]) for s in seeds]
    return mean, float(lo), float(hi), each


def _load(seed_paths: Mapping[str, Path], classes: Sequence[str]) -> dict[str, Predictions]:
    loaded = {s: read_predictions(p, classes) for s, p in seed_paths.items()}
    ids = next(iter(loaded.values()))[0]
    for s, (other, _) in loaded.items():
        if other != ids:
            raise ValueError(f"{seed_paths[s]}: holds other test studies than seed {next(iter(loaded))}")
    return {s: preds for s, (_, preds) in loaded.items()}


def render_claims_markdown(results: Sequence[ClaimResult], regime_labels: Mapping[str, str] | None = None) -> str:
    """One table per task and regime: estimate, 95% CI, verdict, the paper's figure."""
    lines = ["# The paper's claims, measured", "",
             "Difference a - b in balanced accuracy (points), mean over the seeds both rows have, on the same "
             "test studies; 95% CI from a paired bootstrap over test studies (the same draw for every seed "
             "and both sides). Verdict: confirmed (CI above 0), opposite (CI below 0), not confirmed (CI holds 0).",
             ""]
    for task, regime in dict.fromkeys((r.task, r.regime) for r in results):
        heading = f"{task}: {(regime_labels or {}).get(regime, regime)}" if regime else task
        lines += [f"## {heading}", "", "| claim | a | b | seeds | a - b (points) | 95% CI | verdict | paper | paper in CI |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in [x for x in results if (x.task, x.regime) == (task, regime)]:
            d = r.difference
            paper = "" if r.paper_points is None else f"+{r.paper_points:.2f}"
            inside = {None: "", True: "yes", False: "no"}[r.paper_inside_ci]
            lines.append(f"| {r.claim} | {r.a} | {r.b} | {len(d.seeds)} | {100 * d.estimate:+.1f} | "
                         f"[{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}] | {d.verdict} | {paper} | {inside} |")
        lines.append("")
    return "\n".join(lines)


def render_claims_csv(results: Sequence[ClaimResult]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "regime", "name", "claim", "a", "b", "n_seeds", "n_test", "difference", "ci_low", "ci_high",
                "verdict", "paper_points", "paper_inside_ci"])
    for r in results:
        d = r.difference
        w.writerow([r.task, r.regime, r.name, r.claim, r.a, r.b, len(d.seeds), d.n_test, f"{d.estimate:.6f}",
                    f"{d.ci_low:.6f}", f"{d.ci_high:.6f}", d.verdict, "" if r.paper_points is None else r.paper_points,
                    "" if r.paper_inside_ci is None else r.paper_inside_ci])
    return buf.getvalue()


def write_claims(results: Sequence[ClaimResult], out_dir: Path,
                 regime_labels: Mapping[str, str] | None = None) -> dict[str, Path]:
    """``claims.md`` and ``claims.csv`` in ``out_dir``."""
    return {"claims_markdown": atomic_write_text(out_dir / "claims.md", render_claims_markdown(results, regime_labels)),
            "claims_csv": atomic_write_text(out_dir / "claims.csv", render_claims_csv(results))}

"""Where a model errs: accuracy per subgroup of the test studies, for one or several runs.

A headline metric hides where the errors are. Every study record can carry fields beyond
the image paths (``meta`` in the study list: lesion size, subtype, scanner, site, ...); this
module splits the studies of ``predictions.csv`` files (written by ``medmap evaluate``, the
baselines and the experiments) by such fields and counts each run's errors per subgroup,
with a Wilson 95% interval of its accuracy there. The rows are always split by the true
label first, so a row's accuracy is that class's sensitivity within the subgroup.

Fields are dotted paths into the study's JSON record (``meta.subtype``,
``meta.location.lobe``, ``split``); ``FIELD=EDGES`` bins a number (``meta.size_mm=15,25``
gives ``< 15``, ``15-25`` and ``>= 25``). A study without the field falls in ``-``.

Example:
    >>> GroupBy.parse("meta.size_mm=15,25").value({"meta": {"size_mm": 18.2}})
    '15-25'
    >>> GroupBy.parse("meta.subtype").value({"label": "normal"})
    '-'
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from scipy.stats import binomtest

from medmap.data.studylist import Study
from medmap.errors import MedMAPError

MISSING = "-"


class SubgroupError(MedMAPError, ValueError):
    """A grouping field, a predictions file or the study list cannot be used as given."""


@dataclass(frozen=True)
class GroupBy:
    """One grouping: a dotted field path, and bin edges when the field is numeric."""

    field: str
    edges: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str) -> "GroupBy":
        """``FIELD`` or ``FIELD=E1,E2,...`` (increasing numeric bin edges)."""
        name, sep, edges_text = str(text).partition("=")
        name = name.strip()
        if not name or any(not part for part in name.split(".")):
            raise SubgroupError(f"--by '{text}': expected FIELD or FIELD=E1,E2 with a dotted field such as meta.size_mm")
        if not sep:
            return cls(name)
        try:
            edges = tuple(float(e) for e in edges_text.split(","))
        except ValueError:
            raise SubgroupError(f"--by '{text}': bin edges must be numbers separated by commas") from None
        if any(b <= a for a, b in zip(edges, edges[1:])):
            raise SubgroupError(f"--by '{text}': bin edges must increase")
        return cls(name, edges)

    def value(self, record: Mapping[str, Any]) -> str:
        """The subgroup of one study record (its JSON form), as a label."""
        v: Any = record
        for part in self.field.split("."):
            if not isinstance(v, Mapping) or part not in v:
                return MISSING
            v = v[part]
        if not self.edges:
            return MISSING if v is None else str(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return MISSING
        return _bin(float(v), self.edges)


def _bin(x: float, edges: Sequence[float]) -> str:
    fmt = lambda e: f"{e:g}"  # noqa: E731
    if x < edges[0]:
        return f"< {fmt(edges[0])}"
    for lo, hi in zip(edges, edges[1:]):
        if x < hi:
            return f"{fmt(lo)}-{fmt(hi)}"
    return f">= {fmt(edges[-1])}"


@dataclass
class SubgroupRow:
    """One subgroup: its true label, its values of the grouping fields, and per run the errors."""

    label: str
    values: tuple[str, ...]
    n: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def accuracy(self, run: str) -> tuple[float, float, float]:
        """Accuracy of ``run`` in this subgroup with its Wilson 95% interval."""
        correct = self.n - self.errors[run]
        ci = binomtest(correct, self.n).proportion_ci(method="wilson")
        return correct / self.n, float(ci.low), float(ci.high)


def read_run_predictions(path: str | Path) -> dict[str, tuple[str, str]]:
    """``study_id -> (label, predicted)`` of a ``predictions.csv``, or of a run folder's test
    predictions (``RUN/metrics/test/predictions.csv``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics" / "test" / "predictions.csv"
    if not path.is_file():
        raise SubgroupError(f"{path}: no predictions file (run 'medmap evaluate' on the run first)")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"study_id", "label", "predicted"} - set(reader.fieldnames or ())
        if missing:
            raise SubgroupError(f"{path}: not a predictions file, columns {sorted(missing)} missing")
        out = {}
        for line, row in enumerate(reader, start=2):
            if not row["study_id"] or not row["label"] or not row["predicted"]:
                raise SubgroupError(f"{path}:{line}: empty study_id, label or predicted")
            out[row["study_id"]] = (row["label"], row["predicted"])
    if not out:
        raise SubgroupError(f"{path}: no predictions")
    return out


def subgroup_errors(runs: Mapping[str, Mapping[str, tuple[str, str]]], studies: Sequence[Study],
                    by: Sequence[GroupBy]) -> list[SubgroupRow]:
    """Count each run's errors per (true label, subgroup) over the studies the runs predicted.

    Args:
        runs: run name -> its predictions (:func:`read_run_predictions`); every run must hold
            the same studies, each present in ``studies`` with the same label.
        studies: the study list the predictions were made on.
        by: the groupings; none gives one row per label.

    Returns:
        The rows, sorted by label and subgroup.
    """
    if not runs:
        raise SubgroupError("no runs to compare")
    names = list(runs)
    ids = set(runs[names[0]])
    for name in names[1:]:
        if set(runs[name]) != ids:
            raise SubgroupError(f"runs '{names[0]}' and '{name}' predicted different studies; compare runs on one split")
    records = {s.study_id: s for s in studies}
    rows: dict[tuple[str, tuple[str, ...]], SubgroupRow] = {}
    for sid in sorted(ids):
        study = records.get(sid)
        label = runs[names[0]][sid][0]
        if study is None:
            raise SubgroupError(f"study '{sid}' of run '{names[0]}' is not in the study list")
        if study.label != label:
            raise SubgroupError(f"study '{sid}': label '{label}' in run '{names[0]}', '{study.label}' in the study list")
        record = study.to_json()
        key = (label, tuple(g.value(record) for g in by))
        row = rows.setdefault(key, SubgroupRow(label, key[1], errors={n: 0 for n in names}))
        row.n += 1
        for name in names:
            row.errors[name] += int(runs[name][sid][1] != label)
    return [rows[k] for k in sorted(rows)]


def render_subgroups(rows: Sequence[SubgroupRow], by: Sequence[GroupBy], run_names: Sequence[str]) -> str:
    """A Markdown table: label, subgroup values, n, then per run errors and accuracy [95% CI]."""
    head = ["label", *(g.field for g in by), "n"] + [f"{r}: errors, accuracy [95% CI]" for r in run_names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row.label, *row.values, str(row.n)]
        for r in run_names:
            acc, lo, hi = row.accuracy(r)
            cells.append(f"{row.errors[r]}, {acc:.2f} [{lo:.2f}, {hi:.2f}]")
        lines.append("| " + " | ".join(cells) + " |")
    totals = [sum(row.errors[r] for row in rows) for r in run_names]
    n = sum(row.n for row in rows)
    lines.append("| all | " + " | " * len(by) + f"{n} | " + " | ".join(f"{e}, {1 - e / n:.2f}" for e in totals) + " |")
    return "\n".join(lines) + "\n"

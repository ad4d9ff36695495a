"""Errors per subgroup: grouping fields, counting, the checks and the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from medmap.data.studylist import Study
from medmap.evaluation.subgroups import (GroupBy, SubgroupError, read_run_predictions, render_subgroups,
                                         subgroup_errors)


def _study(i: int, label: str, **meta) -> Study:
    return Study(study_id=f"s{i}", patient_id=f"p{i}", organ="brain", modalities={"t1": Path(f"/x/{i}.nii.gz")},
                 label=label, split="test", meta=meta)


STUDIES = [  # also used by tests/cli/test_subgroups.py
    _study(0, "normal"),
    _study(1, "normal"),
    _study(2, "tumour", size_mm=8.0, subtype="metastasis"),
    _study(3, "tumour", size_mm=12.0, subtype="metastasis"),
    _study(4, "tumour", size_mm=30.0, subtype="glioma"),
    _study(5, "tumour", size_mm=15.0, subtype="glioma"),
]


def _preds(wrong: set[int]) -> dict[str, tuple[str, str]]:
    flip = {"normal": "tumour", "tumour": "normal"}
    return {s.study_id: (s.label, flip[s.label] if i in wrong else s.label) for i, s in enumerate(STUDIES)}


def test_group_by_parses_fields_and_bins():
    g = GroupBy.parse("meta.size_mm=10,20")
    assert g == GroupBy("meta.size_mm", (10.0, 20.0))
    assert [g.value({"meta": {"size_mm": x}}) for x in (9.9, 10, 19.9, 20, 50)] == ["< 10", "10-20", "10-20", ">= 20", ">= 20"]
    assert g.value({"meta": {"size_mm": "big"}}) == "-"          # not a number
    assert g.value({"meta": {}}) == "-"                            # absent
    assert GroupBy.parse("meta.location.lobe").value({"meta": {"location": {"lobe": "frontal"}}}) == "frontal"
    assert GroupBy.parse("split").value({"split": "test"}) == "test"


@pytest.mark.parametrize("bad", ["", "meta.", "meta..x", "meta.size_mm=a,b", "meta.size_mm=20,10", "meta.size_mm=5,5"])
def test_group_by_rejects_malformed_specs(bad):
    with pytest.raises(SubgroupError, match="--by"):
        GroupBy.parse(bad)


def test_errors_are_counted_per_label_and_subgroup():
    by = [GroupBy.parse("meta.size_mm=15")]
    rows = subgroup_errors({"a": _preds({0, 2, 3}), "b": _preds({3})}, STUDIES, by)
    table = {(r.label, r.values): (r.n, r.errors) for r in rows}
    assert table == {
        ("normal", ("-",)): (2, {"a": 1, "b": 0}),
        ("tumour", ("< 15",)): (2, {"a": 2, "b": 1}),
        ("tumour", (">= 15",)): (2, {"a": 0, "b": 0}),
    }
    small = next(r for r in rows if r.values == ("< 15",))
    acc, lo, hi = small.accuracy("b")
    assert acc == 0.5 and 0.0 < lo < 0.5 < hi < 1.0              # Wilson interval around 1 of 2
    text = render_subgroups(rows, by, ["a", "b"])
    assert "| tumour | < 15 | 2 | 2, 0.00 [0.00, 0.66] | 1, 0.50 [" in text
    assert text.rstrip().endswith("| all |  | 6 | 3, 0.50 | 1, 0.83 |")


def test_without_groupings_one_row_per_label():
    rows = subgroup_errors({"a": _preds({4})}, STUDIES, [])
    assert [(r.label, r.values, r.n, r.errors["a"]) for r in rows] == [("normal", (), 2, 0), ("tumour", (), 4, 1)]


def test_runs_on_other_studies_or_labels_are_refused():
    other = dict(_preds(set()))
    other.pop("s0")
    with pytest.raises(SubgroupError, match="different studies"):
        subgroup_errors({"a": _preds(set()), "b": other}, STUDIES, [])
    with pytest.raises(SubgroupError, match="'s0' of run 'a' is not in the study list"):
        subgroup_errors({"a": _preds(set())}, STUDIES[1:], [])
    relabelled = dict(_preds(set()), s0=("tumour", "tumour"))
    with pytest.raises(SubgroupError, match="label 'tumour' in run 'a', 'normal' in the study list"):
        subgroup_errors({"a": relabelled}, STUDIES, [])


def test_predictions_files_are_checked(tmp_path):
    with pytest.raises(SubgroupError, match="no predictions file"):
        read_run_predictions(tmp_path)
    bad = tmp_path / "p.csv"
    bad.write_text("study_id,label\ns0,normal\n")
    with pytest.raises(SubgroupError, match=r"p.csv: not a predictions file, columns \['predicted'\] missing"):
        read_run_predictions(bad)
    bad.write_text("study_id,label,predicted\ns0,,normal\n")
    with pytest.raises(SubgroupError, match="p.csv:2: empty"):
        read_run_predictions(bad)

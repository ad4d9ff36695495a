from collections import Counter, defaultdict
from pathlib import Path

import pytest

from medmap.data.split import assign_splits, ensure_splits
from medmap.data.studylist import Study
from medmap.errors import ConfigError, StudyListError


def _studies(n_patients: int = 120, studies_per_patient: int = 2) -> list[Study]:
    out = []
    for p in range(n_patients):
        organ = "brain" if p % 3 else "liver"
        label = ["a", "b", "c"][p % 4 % 3] if organ == "liver" else ["normal", "tumour"][p % 2]
        for k in range(studies_per_patient):
            out.append(Study(f"s{p}-{k}", f"P{p}", organ, {"t1": Path(f"/x/{p}-{k}.nii.gz")}, label=label))
    return out


def test_no_patient_in_two_splits_and_all_assigned():
    out = assign_splits(_studies(), seed=0)
    splits = defaultdict(set)
    for s in out:
        splits[s.patient_id].add(s.split)
    assert all(len(v) == 1 for v in splits.values())
    assert {s.split for s in out} == {"train", "val", "test"}


def test_stratified_by_organ_and_label():
    studies = _studies(200, 1)
    out = assign_splits(studies, fractions=(0.6, 0.2, 0.2), seed=1)
    strata = defaultdict(Counter)
    for s in out:
        strata[(s.organ, s.label)][s.split] += 1
    for counts in strata.values():
        n = sum(counts.values())
        for split, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
            assert abs(counts[split] - frac * n) <= 1, (counts, n)


def test_deterministic_order_invariant_and_seed_dependent():
    studies = _studies()
    a = {s.study_id: s.split for s in assign_splits(studies, seed=3)}
    b = {s.study_id: s.split for s in assign_splits(list(reversed(studies)), seed=3)}
    c = {s.study_id: s.split for s in assign_splits(studies, seed=4)}
    assert a == b
    assert a != c


def test_tiny_strata_still_fill_val_and_test():
    studies = [Study(f"s{i}", f"P{i}", "liver", {"t1": Path("/x")}, label=f"class{i}") for i in range(20)]
    counts = Counter(s.split for s in assign_splits(studies, seed=0))
    assert counts == Counter({"train": 14, "val": 3, "test": 3})


def test_ensure_splits_keeps_given_and_fills_missing():
    studies = _studies(30, 2)
    studies[0].split = "test"  # patient P0 -> test for both its studies
    studies[10].split = "val"
    out = ensure_splits(studies, seed=0)
    assert [s.study_id for s in out] == [s.study_id for s in studies]
    by_id = {s.study_id: s.split for s in out}
    assert by_id["s0-0"] == by_id["s0-1"] == "test"
    assert by_id["s5-0"] == by_id["s5-1"] == "val"
    assert all(s.split in ("train", "val", "test") for s in out)
    assert studies[2].split is None  # inputs are not modified


def test_ensure_splits_rejects_a_leak_and_bad_fractions():
    studies = _studies(4, 2)
    studies[0].split, studies[1].split = "train", "test"
    with pytest.raises(StudyListError, match="'P0' in test, train"):
        ensure_splits(studies)
    with pytest.raises(ConfigError, match="sum to 1"):
        assign_splits(_studies(4), fractions=(0.5, 0.2, 0.2))
    with pytest.raises(ConfigError, match="three numbers"):
        assign_splits(_studies(4), fractions=(0.5, 0.5))


def test_labelled_subset_draws_per_class_independent_of_order():
    from medmap.data.split import labelled_subset

    studies = [Study(f"s{i:02d}", f"P{i}", "liver", {"t1": Path("/x")}, label=f"c{i % 3}") for i in range(30)]
    studies.append(Study("unlabelled", "PU", "liver", {"t1": Path("/x")}))
    a = labelled_subset(studies, 2, seed=0)
    assert Counter(s.label for s in a) == Counter({"c0": 2, "c1": 2, "c2": 2})
    b = labelled_subset(list(reversed(studies)), 2, seed=0)
    assert {s.study_id for s in a} == {s.study_id for s in b}
    assert {s.study_id for s in labelled_subset(studies, 2, seed=1)} != {s.study_id for s in a}
    assert len(labelled_subset(studies, 50, seed=0)) == 30  # a class with fewer keeps all of them
    assert labelled_subset(studies, None) == studies
    with pytest.raises(StudyListError, match="at least 1"):
        labelled_subset(studies, 0)

from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from medmap.data.split import assign_splits, ensure_splits, patient_split, patient_splits
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


def test_patient_splits_depend_on_the_patient_alone() -> None:
    """Stage 1 sees every study of every organ (labelled or not), stage 2 the labelled studies
    of one organ with any training seed: a patient's split must be the same in both."""
    rng = np.random.default_rng(0)
    for trial in range(20):
        stage1 = [Study(f"s{trial}-{i}", f"P{trial}-{i // 2}", str(rng.choice(["brain", "liver"])), {"t1": Path("/x")},
                        label=str(rng.choice(["a", "b", "c"])) if rng.random() < 0.7 else None) for i in range(60)]
        stage2 = [s for s in stage1 if s.organ == "liver" and s.label is not None]
        rng.shuffle(stage2)
        split1 = {s.patient_id: s.split for s in patient_splits(stage1)}
        test2 = {s.patient_id for s in patient_splits(stage2) if s.split == "test"}
        assert all(split1[p] == "test" for p in test2)
    counts = Counter(patient_split(f"P{i}") for i in range(20_000))
    assert abs(counts["train"] / 20_000 - 0.7) < 0.02 and abs(counts["test"] / 20_000 - 0.15) < 0.02
    given = _studies(6, 1)
    given[0].split = "val"
    assert patient_splits(given)[0].split == "val"  # a given split is kept

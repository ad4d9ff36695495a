"""Patient-level, stratified train/val/test splits (``medmap split``).

Splitting is done over *patients*, never studies, so no patient appears in two splits.
Each patient gets one stratum, ``(organ, label)`` of its most frequent (organ, label) pair
(ties broken by name; an unlabelled study counts as label ``None``). Within each stratum the
patients are shuffled with the seed and divided by the largest-remainder method; the
leftover patients of small strata go to the split that is furthest below its target
overall, so val and test are not starved when many strata are tiny. The result depends only
on the patients, their labels and the seed (not on the order of the list).

Example:
    >>> from medmap.data.split import assign_splits
    >>> studies = assign_splits(studies, fractions=(0.7, 0.15, 0.15), seed=0)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from typing import Sequence

import numpy as np

from medmap.data.studylist import SPLITS, Study
from medmap.errors import ConfigError, StudyListError

DEFAULT_FRACTIONS = (0.7, 0.15, 0.15)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    if len(fractions) != 3:
        raise ConfigError(f"split fractions must be three numbers (train, val, test), got {list(fractions)}")
    f = tuple(float(x) for x in fractions)
    if any(x < 0 for x in f) or abs(sum(f) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must be non-negative and sum to 1, got {list(f)}")
    return f  # type: ignore[return-value]


def _stratum(studies: list[Study]) -> tuple[str, str]:
    counts = Counter((s.organ, s.label if s.label is not None else "") for s in studies)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]


def _stratum_seed(seed: int, stratum: tuple[str, str]) -> int:
    digest = hashlib.sha256(f"{seed}:{stratum[0]}:{stratum[1]}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def assign_splits(
    studies: Sequence[Study],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
) -> list[Study]:
    """Assign every study a split, at patient level and stratified by (organ, label).

    Existing ``split`` values are ignored and overwritten (see :func:`ensure_splits` to keep
    them).

    Args:
        studies: the studies to split.
        fractions: target fractions of patients for train, val and test.
        seed: random seed; the same seed gives the same split.

    Returns:
        New :class:`Study` objects (same order) with ``split`` set.

    Raises:
        ConfigError: fractions are not three non-negative numbers summing to 1.
    """
    f = np.asarray(_check_fractions(fractions))
    by_patient: dict[str, list[Study]] = defaultdict(list)
    for s in studies:
        by_patient[s.patient_id].append(s)
    strata: dict[tuple[str, str], list[str]] = defaultdict(list)
    for patient, items in by_patient.items():
        strata[_stratum(items)].append(patient)

    counts = np.zeros(3)  # patients assigned so far to train/val/test, over all strata
    patient_split: dict[str, str] = {}
    for stratum in sorted(strata):
        patients = sorted(strata[stratum])
        rng = np.random.default_rng(_stratum_seed(seed, stratum))
        patients = [patients[i] for i in rng.permutation(len(patients))]
        n = len(patients)
        quota = np.floor(n * f + 1e-9).astype(int)
        remainder = n * f - quota
        for _ in range(n - int(quota.sum())):
            total = counts.sum() + quota.sum() + 1
            deficit = np.where(f > 0, f * total - (counts + quota), -np.inf)
            # the split furthest below its overall target wins; ties go to the larger remainder
            k = max(range(3), key=lambda j: (round(float(deficit[j]), 9), float(remainder[j]), -j))
            quota[k] += 1
            remainder[k] = -1.0
        start = 0
        for k, split in enumerate(SPLITS):
            for p in patients[start : start + quota[k]]:
                patient_split[p] = split
            start += quota[k]
        counts += quota
    return [dataclasses.replace(s, split=patient_split[s.patient_id]) for s in studies]


def _given_splits(studies: Sequence[Study]) -> dict[str, str]:
    """patient -> the split its studies already have; a patient in two splits is an error."""
    given: dict[str, set[str]] = defaultdict(set)
    for s in studies:
        if s.split is not None:
            given[s.patient_id].add(s.split)
    leaks = {p: sorted(v) for p, v in given.items() if len(v) > 1}
    if leaks:
        detail = "; ".join(f"'{p}' in {', '.join(v)}" for p, v in sorted(leaks.items()))
        raise StudyListError(f"patients appear in several splits: {detail}")
    return {p: next(iter(v)) for p, v in given.items()}


def ensure_splits(
    studies: Sequence[Study],
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
) -> list[Study]:
    """Keep the splits a list already has and assign the missing ones, stratified (``medmap split``).

    A patient with a split on any of its studies keeps it for all of its studies; patients
    with no split anywhere are assigned by :func:`assign_splits`. The assignment depends on
    the set of unassigned studies; the engines use :func:`patient_splits` instead.

    Raises:
        StudyListError: a patient already has studies in two different splits.
    """
    given = _given_splits(studies)
    unassigned = [s for s in studies if s.patient_id not in given]
    # assign_splits keeps the order of its input, so results line up with ``unassigned``
    new_splits = iter(assign_splits(unassigned, fractions, seed) if unassigned else [])
    return [dataclasses.replace(s, split=given[s.patient_id]) if s.patient_id in given else next(new_splits)
            for s in studies]


#: Salt of :func:`patient_split`; changing it would move patients between splits.
PATIENT_SPLIT_SALT = "medmap-split-v1"


def patient_split(patient_id: str, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> str:
    """The split of a patient whose study list gives none: a salted hash of the patient id alone.

    The same patient lands in the same split in every command, whatever the organ, the label,
    the training seed or the other studies in the list, so a stage-2 test patient can never
    have been a stage-1 training patient. Not stratified: use ``medmap split`` for that.

    Example:
        >>> patient_split("P0001") in ("train", "val", "test")
        True
    """
    f = _check_fractions(fractions)
    digest = hashlib.sha256(f"{PATIENT_SPLIT_SALT}:{patient_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2.0**64
    if u < f[0]:
        return SPLITS[0]
    return SPLITS[1] if u < f[0] + f[1] else SPLITS[2]


def patient_splits(studies: Sequence[Study], fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[Study]:
    """Keep the splits a list already has; give the rest :func:`patient_split` (used by every engine).

    Raises:
        StudyListError: a patient already has studies in two different splits.
    """
    given = _given_splits(studies)
    return [dataclasses.replace(s, split=given.get(s.patient_id) or patient_split(s.patient_id, fractions))
            for s in studies]


def split_summary(studies: Sequence[Study]) -> str:
    """A short table: studies and patients per split, and labels per split."""
    lines = []
    for split in (*SPLITS, None):
        sel = [s for s in studies if s.split == split]
        if not sel:
            continue
        labels = Counter(f"{s.organ}/{s.label}" for s in sel)
        label_txt = ", ".join(f"{k}: {v}" for k, v in sorted(labels.items()))
        lines.append(
            f"{split or 'unassigned'}: {len(sel)} studies, {len({s.patient_id for s in sel})} patients ({label_txt})"
        )
    return "\n".join(lines)


def labelled_subset(studies: Sequence[Study], per_class: int | None, seed: int = 0) -> list[Study]:
    """At most ``per_class`` studies of each label, drawn with ``seed`` (label-efficiency runs).

    The draw depends only on the studies' ids, labels and the seed, not on the list order, so
    every method of a comparison gets the same labelled studies. ``None`` keeps them all.

    >>> ss = [Study(f"s{i}", f"p{i}", "liver", {}, label="cyst" if i % 2 else "hcc") for i in range(10)]
    >>> sorted(s.label for s in labelled_subset(ss, 2, seed=0))
    ['cyst', 'cyst', 'hcc', 'hcc']
    """
    if per_class is None:
        return list(studies)
    if int(per_class) < 1:
        raise StudyListError(f"labels per class must be at least 1, got {per_class}")
    by_label: dict[str, list[Study]] = {}
    for s in sorted(studies, key=lambda s: s.study_id):
        if s.label is not None:
            by_label.setdefault(s.label, []).append(s)
    keep: set[str] = set()
    for label, group in sorted(by_label.items()):
        rng = np.random.default_rng(_stratum_seed(seed, ("labelled_subset", label)))
        keep.update(group[i].study_id for i in rng.permutation(len(group))[: int(per_class)])
    return [s for s in studies if s.study_id in keep]

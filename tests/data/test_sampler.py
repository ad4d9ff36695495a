"""Batches of whole studies of one organ: deterministic, single-organ, sharded across ranks."""

from __future__ import annotations

import pytest

from medmap.data.sampler import OrganBatchSampler
from medmap.errors import ConfigError


def test_sampler_is_deterministic_single_organ_and_sharded() -> None:
    organ_of = ["brain"] * 7 + ["liver"] * 5
    s0, s1 = (OrganBatchSampler(organ_of, 2, world_size=2, rank=r, seed=3) for r in (0, 1))
    assert s0.global_batches(1) == OrganBatchSampler(organ_of, 2, 2, 0, seed=3).global_batches(1)
    assert s0.global_batches(1) != s0.global_batches(2)
    for gb, b0, b1 in zip(s0.global_batches(1), s0.rank_batches(1), s1.rank_batches(1)):
        assert len({organ_of[i] for i in gb}) == 1
        assert not set(b0) & set(b1) and sorted(b0 + b1) == sorted(gb)
    assert s0.rank_batches(1, skip=1) == s0.rank_batches(1)[1:]


def test_stratified_batches_hold_the_classes_in_proportion() -> None:
    balanced = OrganBatchSampler(["brain"] * 40, 4, seed=1, labels=[0] * 20 + [1] * 20)
    for epoch in range(3):
        for b in balanced.rank_batches(epoch):
            assert sorted(balanced.labels[i] for i in b) == [0, 0, 1, 1]
    skewed = OrganBatchSampler(["liver"] * 40, 4, seed=1, labels=[0] * 30 + [1] * 10)
    counts = [sum(skewed.labels[i] for i in b) for b in skewed.rank_batches(0)]
    assert set(counts) == {1}  # 3 + 1 in every batch
    # random batches of the same studies are not all 2 + 2: stratification is what does it
    plain = OrganBatchSampler(["brain"] * 40, 4, seed=1)
    assert any(sorted(balanced.labels[i] for i in b) != [0, 0, 1, 1] for e in range(3) for b in plain.rank_batches(e))


def test_stratified_batches_stay_deterministic_sharded_and_complete() -> None:
    organ_of = ["brain"] * 12 + ["liver"] * 8
    labels = [0, 1, 2] * 4 + [0, 1] * 4
    s0, s1 = (OrganBatchSampler(organ_of, 2, world_size=2, rank=r, seed=5, labels=labels) for r in (0, 1))
    assert s0.global_batches(0) == OrganBatchSampler(organ_of, 2, 2, 0, seed=5, labels=labels).global_batches(0)
    assert s0.global_batches(0) != s0.global_batches(1)
    assert sorted(i for b in s0.global_batches(0) for i in b) == list(range(20))
    for gb, b0, b1 in zip(s0.global_batches(0), s0.rank_batches(0), s1.rank_batches(0)):
        assert len({organ_of[i] for i in gb}) == 1
        assert not set(b0) & set(b1) and sorted(b0 + b1) == sorted(gb)


def test_stratified_batches_need_one_label_per_study() -> None:
    with pytest.raises(ConfigError, match="3 labels for 4 studies"):
        OrganBatchSampler(["brain"] * 4, 2, labels=[0, 1, 0])

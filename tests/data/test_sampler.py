"""Batches of whole studies of one organ: deterministic, single-organ, sharded across ranks."""

from __future__ import annotations

from medmap.data.sampler import OrganBatchSampler


def test_sampler_is_deterministic_single_organ_and_sharded() -> None:
    organ_of = ["brain"] * 7 + ["liver"] * 5
    s0, s1 = (OrganBatchSampler(organ_of, 2, world_size=2, rank=r, seed=3) for r in (0, 1))
    assert s0.global_batches(1) == OrganBatchSampler(organ_of, 2, 2, 0, seed=3).global_batches(1)
    assert s0.global_batches(1) != s0.global_batches(2)
    for gb, b0, b1 in zip(s0.global_batches(1), s0.rank_batches(1), s1.rank_batches(1)):
        assert len({organ_of[i] for i in gb}) == 1
        assert not set(b0) & set(b1) and sorted(b0 + b1) == sorted(gb)
    assert s0.rank_batches(1, skip=1) == s0.rank_batches(1)[1:]

"""Batches of whole studies of one organ, deterministic and sharded across DDP ranks.

Used by stage 1, stage 2 and the CNN baseline alike.

Example:
    >>> s = OrganBatchSampler(["brain", "brain", "liver", "liver"], batch_size=2, seed=0)
    >>> sorted(len(b) for b in s.rank_batches(epoch=0))
    [2, 2]
"""

from __future__ import annotations

from typing import Sequence

import torch

from medmap.errors import ConfigError


class OrganBatchSampler:
    """Deterministic, modality-balanced, single-organ batches, sharded across ranks.

    For epoch ``e`` the order depends only on ``(seed, e)``: the studies of each organ are
    shuffled, cut into *global* batches of ``batch_size * world_size`` studies, and the
    global batches of all organs are shuffled together. Rank ``r`` takes every
    ``world_size``-th study of each global batch, so all ranks work on the same organ at the
    same step and their shards are disjoint. An incomplete last global batch is kept when
    every rank gets at least one study.

    Args:
        organ_of: organ name of each dataset index.
        batch_size: ``K``, studies per rank per step.
        world_size / rank: DDP layout.
        seed: base seed.
    """

    def __init__(self, organ_of: Sequence[str], batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0):
        if batch_size < 1:
            raise ConfigError("training.batch_size must be at least 1")
        self.organ_of = list(organ_of)
        self.batch_size = batch_size
        self.world_size = world_size
        self.rank = rank
        self.seed = seed

    def global_batches(self, epoch: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        size = self.batch_size * self.world_size
        batches: list[list[int]] = []
        for organ in sorted(set(self.organ_of)):
            idx = [i for i, o in enumerate(self.organ_of) if o == organ]
            perm = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
            for s in range(0, len(perm), size):
                chunk = perm[s : s + size]
                if len(chunk) >= self.world_size:
                    batches.append(chunk)
        order = torch.randperm(len(batches), generator=g).tolist()
        return [batches[i] for i in order]

    def steps_per_epoch(self) -> int:
        return len(self.global_batches(0))

    def rank_batches(self, epoch: int, skip: int = 0) -> list[list[int]]:
        """This rank's batches of ``epoch``, without the first ``skip`` steps."""
        return [b[self.rank :: self.world_size] for b in self.global_batches(epoch)][skip:]

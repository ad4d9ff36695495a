"""AsymmetricContrastiveLoss: hand-computed cases, multi-positives, symmetry, gradients, DDP."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from medmap.losses.contrastive import AsymmetricContrastiveLoss
from medmap.text.encoder import lock_module


def _ce(logits: list[float], target: list[float]) -> float:
    lse = math.log(sum(math.exp(x) for x in logits))
    return -sum(q * (x - lse) for x, q in zip(logits, target))


def test_hand_computed_two_pairs() -> None:
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # S = [[1, 0.6], [0, 0.8]]
    l_v2t = (math.log(1 + math.exp(-0.4)) + math.log(1 + math.exp(-0.8))) / 2
    l_t2v = (math.log(1 + math.exp(-1.0)) + math.log(1 + math.exp(-0.2))) / 2
    for alpha in (0.75, 0.3):
        loss = AsymmetricContrastiveLoss(alpha=alpha)(
            v, t, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([1.0])
        )
        assert loss.item() == pytest.approx(alpha * l_v2t + (1 - alpha) * l_t2v, abs=1e-6)
    # the temperature scales the logits
    loss = AsymmetricContrastiveLoss(alpha=1.0)(v, t, torch.tensor([0, 1]), torch.tensor([0, 0]), torch.tensor([2.0]))
    assert loss.item() == pytest.approx((_ce([2, 1.2], [1, 0]) + _ce([0, 1.6], [0, 1])) / 2, abs=1e-6)


def test_multi_positive_soft_targets() -> None:
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    t = F.normalize(torch.randn(3, 4, generator=g), dim=-1)
    ids = torch.tensor([7, 7, 9])  # pairs 0 and 1 have the same findings text
    s = (3.0 * v @ t.t()).tolist()
    same = [[1.0 if ids[i] == ids[j] else 0.0 for j in range(3)] for i in range(3)]
    v2t = sum(_ce(s[i], [x / sum(same[i]) for x in same[i]]) for i in range(3)) / 3
    cols = [[s[i][j] for i in range(3)] for j in range(3)]
    t2v = sum(_ce(cols[j], [same[i][j] / sum(same[k][j] for k in range(3)) for i in range(3)]) for j in range(3)) / 3
    loss = AsymmetricContrastiveLoss(alpha=0.75)(v, t, ids, torch.zeros(3, dtype=torch.long), torch.tensor([3.0]))
    assert loss.item() == pytest.approx(0.75 * v2t + 0.25 * t2v, abs=1e-6)
    # a duplicate text is never a negative: with perfectly aligned embeddings the soft-target
    # loss is lower than the one-hot loss that would push the duplicate away
    one_hot = AsymmetricContrastiveLoss()(v, t, torch.tensor([0, 1, 2]), torch.zeros(3, dtype=torch.long), torch.tensor([3.0]))
    assert loss.item() != pytest.approx(one_hot.item())


def test_symmetric_when_alpha_half_and_no_duplicates() -> None:
    g = torch.Generator().manual_seed(1)
    v = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    t = F.normalize(torch.randn(6, 5, generator=g), dim=-1)
    ids, mod, scale = torch.arange(6), torch.tensor([0, 0, 0, 1, 1, 1]), torch.tensor([5.0, 8.0])
    fn = AsymmetricContrastiveLoss(alpha=0.5)
    assert fn(v, t, ids, mod, scale).item() == pytest.approx(fn(t, v, ids, mod, scale).item(), abs=1e-6)
    asym = AsymmetricContrastiveLoss(alpha=0.75)
    assert asym(v, t, ids, mod, scale).item() != pytest.approx(asym(t, v, ids, mod, scale).item(), abs=1e-4)


def test_modality_groups_are_independent_and_weighted() -> None:
    g = torch.Generator().manual_seed(2)
    v = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    t = F.normalize(torch.randn(5, 4, generator=g), dim=-1)
    ids, mod, scale = torch.arange(5), torch.tensor([0, 0, 1, 1, 1]), torch.tensor([4.0, 4.0])
    fn = AsymmetricContrastiveLoss()
    l0 = fn(v[:2], t[:2], ids[:2], mod[:2], scale)
    l1 = fn(v[2:], t[2:], ids[2:], mod[2:], scale)
    assert fn(v, t, ids, mod, scale).item() == pytest.approx((l0.item() + l1.item()) / 2, abs=1e-6)
    weighted = AsymmetricContrastiveLoss(modality_weights={0: 3.0, 1: 1.0}, normalize_weights=False)
    assert weighted(v, t, ids, mod, scale).item() == pytest.approx(3 * l0.item() + l1.item(), abs=1e-5)
    # a single-pair group has no negatives and is skipped
    assert fn(v[:3], t[:3], ids[:3], mod[:3], scale).item() == pytest.approx(l0.item(), abs=1e-6)
    with pytest.raises(ValueError):
        AsymmetricContrastiveLoss(alpha=1.5)


def test_gradient_reaches_trainable_parts_only() -> None:
    torch.manual_seed(0)
    frozen_text = lock_module(torch.nn.Linear(6, 6))  # stands in for the frozen text encoder
    h = torch.nn.Linear(6, 4)
    g_m = torch.nn.Linear(3, 4)
    log_t = torch.nn.Parameter(torch.tensor([math.log(10.0)]))
    u = frozen_text(torch.randn(4, 6))
    loss = AsymmetricContrastiveLoss()(
        F.normalize(g_m(torch.randn(4, 3)), dim=-1), F.normalize(h(u), dim=-1),
        torch.arange(4), torch.zeros(4, dtype=torch.long), log_t.clamp(0, math.log(100)).exp(),
    )
    loss.backward()
    assert all(p.grad is None for p in frozen_text.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in [*h.parameters(), *g_m.parameters(), log_t])


def _global_batch():
    g = torch.Generator().manual_seed(3)
    v = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    t = F.normalize(torch.randn(8, 6, generator=g), dim=-1)
    ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 1])
    mod = torch.tensor([0, 1, 0, 1, 0, 1, 0, 0])
    return v, t, ids, mod, torch.tensor([6.0, 9.0])


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    v, t, ids, mod, scale = _global_batch()
    sl = slice(0, 5) if rank == 0 else slice(5, 8)  # uneven shards exercise the padding
    v_r, t_r = v[sl].clone().requires_grad_(True), t[sl].clone().requires_grad_(True)
    loss = AsymmetricContrastiveLoss()(v_r, t_r, ids[sl], mod[sl], scale)
    loss.backward()
    torch.save({"loss": loss.detach(), "gv": v_r.grad, "gt": t_r.grad}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()  # no rank tears down its connections while a peer finishes the backward all-to-all
    dist.destroy_process_group()
    # Everything the test reads is on disk. In about one full-suite run in three, a rank then
    # aborted in interpreter teardown ("terminate called without an active exception", SIGABRT,
    # never in 64 isolated runs), failing the spawn though its results were complete: leave
    # without the teardown.
    os._exit(0)


def test_loss_is_identical_on_one_and_two_ranks(tmp_path: Path) -> None:
    v, t, ids, mod, scale = _global_batch()
    v1, t1 = v.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = AsymmetricContrastiveLoss()(v1, t1, ids, mod, scale)
    ref.backward()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    assert r1["loss"].item() == pytest.approx(ref.item(), abs=1e-6)
    # all_gather's backward sums the identical per-rank losses' gradients (2x); DDP's
    # averaging of parameter gradients then gives exactly the single-process gradient
    torch.testing.assert_close(torch.cat([r0["gv"], r1["gv"]]) / 2, v1.grad)
    torch.testing.assert_close(torch.cat([r0["gt"], r1["gt"]]) / 2, t1.grad)

"""Retrieval recall@k: duplicate texts, ties and exact chance levels."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medmap.evaluation.retrieval import retrieval_metrics


def test_retrieval_counts_duplicate_texts_as_correct() -> None:
    v = torch.eye(4)
    v[1] = torch.tensor([0.1, 0.0, 1.0, 0.0])  # volume 1 is closer to text 6 than to its own text 5
    t = torch.tensor([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])  # texts of 0 and 1 identical
    r = retrieval_metrics(v, t, torch.tensor([5, 5, 6, 7]), ks=(1, 2))
    assert r["n_texts"] == 3
    assert r["v2t_R@1"] == pytest.approx(0.75) and r["v2t_R@2"] == 1.0
    # text 6: its volume 2 ties with volume 1 (both score 1), so R@1 is 1/2 for it
    assert r["t2v_R@1"] == pytest.approx((1 + 0.5 + 1) / 3) and r["t2v_R@2"] == 1.0
    assert r["v2t_R@1_chance"] == pytest.approx(1 / 3)
    # t2v chance: the text with 2 positive volumes among 4 has 1/2 at k=1, the others 1/4
    assert r["t2v_R@1_chance"] == pytest.approx((0.5 + 0.25 + 0.25) / 3)


def test_retrieval_of_a_collapsed_encoder_is_exactly_chance() -> None:
    # every volume embedded alike: all scores tie, and ties must not count as hits
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([0, 0, 0, 1, 2, 3, 4, 5, 6, 7])
    t = F.normalize(torch.randn(10, 8, generator=g), dim=-1)[ids]
    r = retrieval_metrics(F.normalize(torch.ones(10, 8), dim=-1), t, ids, ks=(1, 2, 5))
    for k in (1, 2, 5):
        assert r[f"t2v_R@{k}"] == pytest.approx(r[f"t2v_R@{k}_chance"])


def test_retrieval_splits_ties_at_random() -> None:
    # two volumes with identical embeddings and different texts: each text ties its volume
    # with the other one, so text -> volume R@1 is 1/2, R@2 is 1
    v = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    r = retrieval_metrics(v, t, torch.tensor([0, 1]), ks=(1, 2))
    assert r["t2v_R@1"] == pytest.approx(0.5) and r["t2v_R@2"] == 1.0
    assert r["v2t_R@1"] == pytest.approx(0.5)  # both volumes prefer text 0: one is right

"""Cross-modal retrieval metrics: volume-to-text and text-to-volume recall@k.

Used by stage-1 evaluation (``medmap.engines.pretrain``) and by the retrieval-ceiling
experiment (``medmap.experiments.ceiling``). Recall is computed within one modality group:
identical texts count once and are correct for every volume they describe, ties are broken
at random (the expected recall is reported), and chance levels are exact.

Example:
    >>> import torch
    >>> r = retrieval_metrics(torch.eye(3), torch.eye(3), torch.tensor([0, 1, 2]), ks=(1,))
    >>> r["v2t_R@1"], r["v2t_R@1_chance"]
    (1.0, 0.3333333333333333)
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def _hit_probability(better: int, tied: int, tied_pos: int, k: int) -> float:
    """P(a positive is in the top ``k``) when ``better`` wrong items score strictly higher and
    ``tied`` wrong items tie with the ``tied_pos >= 1`` best-scoring positives, ties broken at
    random: 1 - C(tied, s) / C(tied + tied_pos, s) with ``s = k - better`` free places."""
    s = k - better
    if s <= 0:
        return 0.0
    miss = 1.0
    for i in range(min(s, tied + 1)):
        miss *= max(0.0, (tied - i) / (tied + tied_pos - i))
    return 1.0 - miss


def _chance_recall(n_pos: np.ndarray, n: int, k: int) -> float:
    """Mean over queries of P(a random ranking of ``n`` items has a positive in its top ``k``)."""
    return float(np.mean([_hit_probability(0, n - int(p), int(p), k) for p in n_pos]))


def retrieval_metrics(v: Tensor, t: Tensor, ids: Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Volume-to-text and text-to-volume recall@k within one modality group.

    The text gallery is the set of *distinct* texts (identical findings count once and are
    the correct answer for every volume they describe); a text query is correct when any
    of the top-k volumes has that text. Tied scores are broken at random and the expected
    recall is reported, so a collapsed encoder (every volume embedded alike) scores exactly
    chance rather than a perfect text-to-volume recall. Chance levels are computed exactly.

    Args:
        v: ``[N, k]`` normalised volume embeddings; t: ``[N, k]`` their texts' embeddings.
        ids: ``[N]`` text ids.
    """
    uniq, inv = torch.unique(ids, return_inverse=True)
    first = torch.zeros(len(uniq), dtype=torch.long)
    first[inv.flip(0)] = torch.arange(len(ids) - 1, -1, -1)
    tu = t[first]  # one embedding per distinct text
    sim = v @ tu.t()  # [N, U]
    n, u = sim.shape
    out: dict[str, float] = {"n_volumes": float(n), "n_texts": float(u)}
    # volume -> text: one right text per volume
    right = sim.gather(1, inv[:, None])
    v2t = ((sim > right).sum(1), (sim == right).sum(1) - 1, torch.ones(n, dtype=torch.long))
    # text -> volume: the best-scoring of the text's volumes against the other volumes
    simt = sim.t()  # [U, N]
    pos = inv[None, :] == torch.arange(u)[:, None]
    best_pos = simt.masked_fill(~pos, -math.inf).max(1, keepdim=True).values
    t2v = (((simt > best_pos) & ~pos).sum(1), ((simt == best_pos) & ~pos).sum(1), ((simt == best_pos) & pos).sum(1))
    counts = torch.bincount(inv, minlength=u).numpy()
    for k in ks:
        for name, (better, tied, tied_pos) in (("v2t", v2t), ("t2v", t2v)):
            hits = [_hit_probability(int(b), int(e), int(q), k) for b, e, q in zip(better, tied, tied_pos)]
            out[f"{name}_R@{k}"] = float(np.mean(hits))
        out[f"v2t_R@{k}_chance"] = min(1.0, k / u)
        out[f"t2v_R@{k}_chance"] = _chance_recall(counts, n, k)
    return out

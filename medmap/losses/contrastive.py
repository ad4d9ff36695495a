"""The asymmetric, modality-grouped contrastive loss of MedMAP stage 1.

Within each modality group ``m`` of a (global) batch, with L2-normalised projected volume
embeddings ``v_i = g_m(z_i)`` and text embeddings ``t_j = h(u_j)``::

    S_ij  = exp(t_m) * <v_i, t_j>
    L_v2t = mean_i CE(S_i., q_i)     q_i: uniform over the texts identical to i's text
    L_t2v = mean_j CE(S_.j, p_j)     p_j: uniform over the volumes whose text is j's text
    L_pre = sum_m w_m [alpha * L_v2t + (1 - alpha) * L_t2v]

Negatives of a T2 volume are only other T2 findings texts, so the sequence name in the
text cannot solve the task; identical texts (text ids) are positives, never negatives.
By default ``w_m = 1 / (number of groups in the batch)`` (a mean over modalities, so that
brain batches with 4 groups and liver batches with 8 have the same scale); explicit
weights can be given per modality.

Under ``torch.distributed`` the features are all-gathered **with gradient** before the
loss, so every rank computes the loss of the global batch, identical to one process
seeing the same global batch. Ranks may hold different numbers of items (studies miss
modalities): tensors are padded to the largest rank and the padding is dropped.

Example:
    >>> loss_fn = AsymmetricContrastiveLoss(alpha=0.75)
    >>> v = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    >>> t = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    >>> loss = loss_fn(v, t, text_ids=torch.tensor([0, 1, 1, 2, 3, 4]),
    ...                modality=torch.tensor([0, 0, 0, 1, 1, 1]),
    ...                logit_scale=torch.tensor([10.0, 10.0]))
    >>> loss.ndim
    0
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from medmap.errors import ConfigError
from medmap.run_config import PretrainConfig, pretrain_config

if TYPE_CHECKING:
    from medmap.models.pretrain import MedMAPPretrainModel


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` ([n_r, ...], n_r may differ by rank) from all ranks, keeping gradients.

    Outside ``torch.distributed`` (or with one rank) it returns ``x`` unchanged. The
    backward pass sums the incoming gradients across ranks (reduce-scatter), which is what
    makes a loss computed redundantly on every rank equal, after DDP's gradient averaging,
    to the single-process loss of the global batch.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather as all_gather_with_grad

    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    top = max(sizes_i)
    if x.shape[0] < top:
        pad = x.new_zeros((top - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    parts = all_gather_with_grad(x.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)])


def gather_no_grad(x: Tensor) -> Tensor:
    """Like :func:`gather_with_grad` for tensors that need no gradient (ids, group labels)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    with torch.no_grad():
        return gather_with_grad(x.detach())


def _soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of each row of ``logits`` against a row-stochastic ``target``; mean over rows."""
    return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


class AsymmetricContrastiveLoss(nn.Module):
    """MedMAP's asymmetric, multi-positive, modality-grouped contrastive loss.

    Args:
        alpha: weight of the volume-to-text direction (``1 - alpha`` for text-to-volume).
            ``0.75`` by default: the frozen text side repeats itself, so text-to-volume has
            many true positives and is the noisier direction.
        modality_weights: optional ``w_m`` per modality index (or a ``[M]`` tensor).
            Missing entries weigh 1.
        normalize_weights: divide by the sum of ``w_m`` over the groups present in the
            batch (default), so the loss is a weighted mean over modalities.
        min_group_size: groups with fewer items (after gathering) are skipped, since a
            single pair has no negatives and a loss of exactly zero.
        gather: all-gather features across ranks when ``torch.distributed`` is initialised.
    """

    def __init__(
        self,
        alpha: float = 0.75,
        modality_weights: Mapping[int, float] | Tensor | None = None,
        normalize_weights: bool = True,
        min_group_size: int = 2,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if min_group_size < 1:
            raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
        self.alpha = float(alpha)
        if isinstance(modality_weights, Tensor):
            modality_weights = {i: float(w) for i, w in enumerate(modality_weights.tolist())}
        self.modality_weights = dict(modality_weights or {})
        if any(w < 0 for w in self.modality_weights.values()):
            raise ValueError("modality weights must be non-negative")
        self.normalize_weights = normalize_weights
        self.min_group_size = min_group_size
        self.gather = gather

    def group_losses(
        self, v: Tensor, t: Tensor, text_ids: Tensor, modality: Tensor, logit_scale: Tensor
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Per modality index: ``(L_v2t, L_t2v)`` on already-gathered features."""
        out: dict[int, tuple[Tensor, Tensor]] = {}
        for m in torch.unique(modality).tolist():
            sel = (modality == m).nonzero(as_tuple=True)[0]
            if sel.numel() < self.min_group_size:
                continue
            vm, tm, ids = v[sel], t[sel], text_ids[sel]
            logits = logit_scale[m] * (vm @ tm.t())  # [n, n]: volume i vs text j
            same = (ids[:, None] == ids[None, :]).to(logits.dtype)  # positives, symmetric
            q = same / same.sum(1, keepdim=True)  # rows: texts identical to volume i's text
            p = same / same.sum(0, keepdim=True)  # cols: volumes whose text is text j
            l_v2t = _soft_ce(logits, q)
            l_t2v = _soft_ce(logits.t(), p.t())
            out[int(m)] = (l_v2t, l_t2v)
        return out

    def forward(
        self, v: Tensor, t: Tensor, text_ids: Tensor, modality: Tensor, logit_scale: Tensor
    ) -> Tensor:
        """Compute ``L_pre``.

        Args:
            v: ``[N, k]`` L2-normalised projected volume embeddings (this rank's items).
            t: ``[N, k]`` L2-normalised projected text embeddings, ``t[i]`` paired with ``v[i]``.
            text_ids: ``int64 [N]``; equal ids mean identical texts (globally consistent).
            modality: ``int64 [N]`` modality index of each pair.
            logit_scale: ``[M_total]`` ``exp(t_m)`` per modality index (already clamped).

        Returns:
            A scalar; zero (with a graph) when no group has enough pairs.
        """
        if v.shape != t.shape or v.ndim != 2:
            raise ValueError(f"v and t must both be [N, k], got {tuple(v.shape)} and {tuple(t.shape)}")
        if text_ids.shape[0] != v.shape[0] or modality.shape[0] != v.shape[0]:
            raise ValueError("text_ids and modality must have one entry per pair")
        if self.gather:
            v, t = gather_with_grad(v), gather_with_grad(t)
            text_ids, modality = gather_no_grad(text_ids), gather_no_grad(modality)
        losses = self.group_losses(v, t, text_ids, modality, logit_scale)
        if not losses:
            return (v.sum() + t.sum() + logit_scale.sum()) * 0.0
        total = v.new_zeros(())
        weight_sum = 0.0
        for m, (l_v2t, l_t2v) in losses.items():
            w = self.modality_weights.get(m, 1.0)
            total = total + w * (self.alpha * l_v2t + (1.0 - self.alpha) * l_t2v)
            weight_sum += w
        if self.normalize_weights and weight_sum > 0:
            total = total / weight_sum
        return total


def build_contrastive_loss(cfg: Mapping[str, Any] | PretrainConfig, model: "MedMAPPretrainModel",
                           study: bool = False) -> AsymmetricContrastiveLoss:
    """The stage-1 loss of a run config (``loss.*``) for ``model``'s modalities; with ``study``
    the same loss for the study-impression pairs (one group, no modality weights)."""
    lcfg = pretrain_config(cfg).loss
    if study:
        return AsymmetricContrastiveLoss(alpha=lcfg.alpha, min_group_size=lcfg.min_group_size)
    weights = {}
    for name, w in lcfg.modality_weights.items():
        if name not in model.modalities:
            raise ConfigError(f"loss.modality_weights: unknown modality '{name}'")
        weights[model.modality_index(name)] = w
    return AsymmetricContrastiveLoss(
        alpha=lcfg.alpha,
        modality_weights=weights,
        normalize_weights=lcfg.normalize_weights,
        min_group_size=lcfg.min_group_size,
    )

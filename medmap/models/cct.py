"""Cross-Cognition Transformer (CCT): deep two-way interaction of visual and text tokens.

The visual sequence ``V`` is the concatenation of the CSA outputs ``A_m`` of the modalities
present in a batch; the text sequence ``Q`` holds the projected class tokens followed by the
projected modality descriptors. Each of the ``L`` pre-norm layers does

1. ``V <- V + CrossAttn(LN(V), LN(Q))``; ``V <- V + FFN(LN(V))``  (vision attends to text)
2. ``Q <- Q + CrossAttn(LN(Q), LN(V), key_padding_mask)``; ``Q <- Q + FFN(LN(Q))``  (text attends to vision)

Visual tokens of a modality that a study lacks are excluded through ``key_padding_mask``
(they never act as keys/values) and from the pooling, so their values cannot change any
output. The outputs are the pooled visual vector ``v*`` (masked mean, or masked attention
pooling with a learned query) and the updated class tokens ``q*_c``.

Example:
    >>> import torch
    >>> cct = CrossCognitionTransformer(dim=32, num_heads=4, num_layers=2)
    >>> v = torch.randn(2, 10, 32)
    >>> missing = torch.zeros(2, 10, dtype=torch.bool); missing[1, 5:] = True
    >>> q = torch.randn(2, 3 + 4, 32)                 # 3 class tokens + 4 modality descriptors
    >>> out = cct(v, q, missing, num_class_tokens=3)
    >>> out.pooled.shape, out.class_tokens.shape
    (torch.Size([2, 32]), torch.Size([2, 3, 32]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from medmap.models.csa import FeedForward

POOLINGS = ("mean", "attention", "max")


@dataclass
class CCTOutput:
    """Outputs of :class:`CrossCognitionTransformer`.

    Attributes:
        pooled: ``v*`` ``[B, d]``.
        class_tokens: ``q*_c`` ``[B, C, d]``.
        visual_tokens: the updated visual sequence ``[B, N, d]`` (padding positions are garbage).
        pool_weights: ``[B, N]`` pooling weights (zero on missing tokens), useful for saliency.
    """

    pooled: Tensor
    class_tokens: Tensor
    visual_tokens: Tensor
    pool_weights: Tensor


class CrossCognitionLayer(nn.Module):
    """One two-way layer: V attends to Q, then Q attends to V, each followed by an FFN.

    With ``self_attention`` the visual tokens first attend to each other (present tokens
    only), so tokens of different sequences meet directly, not only through the text tokens.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 self_attention: bool = False) -> None:
        super().__init__()
        self.self_attn: nn.MultiheadAttention | None = None
        if self_attention:
            self.sa_norm = nn.LayerNorm(dim)
            self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.v_norm_q = nn.LayerNorm(dim)
        self.v_norm_kv = nn.LayerNorm(dim)
        self.v_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.v_ffn = FeedForward(dim, mlp_ratio, dropout)
        self.q_norm_q = nn.LayerNorm(dim)
        self.q_norm_kv = nn.LayerNorm(dim)
        self.q_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.q_ffn = FeedForward(dim, mlp_ratio, dropout)

    def forward(self, v: Tensor, q: Tensor, v_padding: Tensor | None) -> tuple[Tensor, Tensor]:
        """``v_padding``: bool ``[B, N]``, ``True`` on tokens of missing modalities, or ``None``."""
        if self.self_attn is not None:
            h = self.sa_norm(v)
            v = v + self.self_attn(h, h, h, key_padding_mask=v_padding, need_weights=False)[0]
        kv = self.v_norm_kv(q)
        v = v + self.v_attn(self.v_norm_q(v), kv, kv, need_weights=False)[0]
        v = v + self.v_ffn(v)
        kv = self.q_norm_kv(v)
        q = q + self.q_attn(self.q_norm_q(q), kv, kv, key_padding_mask=v_padding, need_weights=False)[0]
        q = q + self.q_ffn(q)
        return v, q


class CrossCognitionTransformer(nn.Module):
    """``L`` layers of two-way cross attention between visual and text tokens, then pooling.

    Args:
        dim: token width ``d``.
        num_heads: attention heads (must divide ``dim``).
        num_layers: ``L`` (>= 1).
        mlp_ratio: feed-forward hidden width as a multiple of ``dim``.
        dropout: dropout in attention and feed-forward blocks.
        pooling: ``"mean"`` (masked mean over present tokens), ``"attention"`` (masked
            softmax pooling with a learned query) or ``"max"`` (masked channel-wise max: one
            token can carry a small lesion into ``v*`` without being averaged away).
        self_attention: each layer starts with self-attention among the visual tokens
            (:class:`CrossCognitionLayer`).
    """

    def __init__(self, dim: int, num_heads: int = 4, num_layers: int = 2, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, pooling: str = "mean", self_attention: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"CCT: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if num_layers < 1:
            raise ValueError("CCT: num_layers must be >= 1")
        if pooling not in POOLINGS:
            raise ValueError(f"CCT: pooling must be one of {POOLINGS}, got '{pooling}'")
        self.pooling = pooling
        self.layers = nn.ModuleList(CrossCognitionLayer(dim, num_heads, mlp_ratio, dropout, self_attention)
                                    for _ in range(num_layers))
        self.v_norm = nn.LayerNorm(dim)
        self.q_norm = nn.LayerNorm(dim)
        if pooling == "attention":
            self.pool_query = nn.Linear(dim, 1)

    def forward(self, visual: Tensor, text: Tensor, visual_padding: Tensor, num_class_tokens: int) -> CCTOutput:
        """Args:
            visual: ``V`` ``[B, N, d]``.
            text: ``Q`` ``[B, T, d]``; its first ``num_class_tokens`` tokens are the class tokens.
            visual_padding: bool ``[B, N]``, ``True`` where a token belongs to a missing modality.
            num_class_tokens: ``C``.
        """
        if visual_padding.shape != visual.shape[:2]:
            raise ValueError(f"CCT: padding mask {tuple(visual_padding.shape)} does not match V {tuple(visual.shape[:2])}")
        if bool(visual_padding.all(dim=1).any()):
            raise ValueError("CCT: a study has no present visual tokens (every modality missing)")
        v, q = visual, text
        # Without missing tokens the mask changes nothing, and attention without one takes
        # PyTorch's fused kernels (the masked softmax was a third of CCT's time on CPU).
        mask = visual_padding if bool(visual_padding.any()) else None
        for layer in self.layers:
            v, q = layer(v, q, mask)
        v = self.v_norm(v)
        q = self.q_norm(q)
        keep = (~visual_padding).to(v.dtype)
        if self.pooling == "max":
            masked = v.masked_fill(visual_padding.unsqueeze(-1), float("-inf"))
            pooled, argmax = masked.max(dim=1)
            # saliency: the share of the d channels whose maximum each token holds
            weights = torch.zeros_like(keep).scatter_add_(1, argmax, torch.ones_like(pooled)) / v.shape[-1]
        else:
            if self.pooling == "mean":
                weights = keep / keep.sum(dim=1, keepdim=True)
            else:
                scores = self.pool_query(v).squeeze(-1).masked_fill(visual_padding, float("-inf"))
                weights = torch.softmax(scores, dim=1)
            pooled = torch.einsum("bn,bnd->bd", weights, v.masked_fill(visual_padding.unsqueeze(-1), 0.0))
        return CCTOutput(pooled=pooled, class_tokens=q[:, :num_class_tokens], visual_tokens=v, pool_weights=weights)

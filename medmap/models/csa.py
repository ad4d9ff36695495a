"""Cross-Modal Semantic Aggregation (CSA), the per-modality fusion block of MedMAP stage 2.

CSA refines the tokens ``Z_m`` that a vision encoder produces for one MRI modality, guided by
the (projected) text bank, in two parallel streams:

* a **local stream** of 3D convolution blocks over the token grid, each modulated by FiLM
  (a per-channel scale and shift) computed from the projected modality descriptor and a
  summary (the mean) of the projected class tokens;
* a **global stream** of pre-norm transformer blocks: self-attention over the visual tokens,
  then cross-attention from the visual tokens to the text bank, then a feed-forward block;

and a learned **token-wise gate** ``g = sigmoid(W [L; G])`` mixes them,
``A_m = g * L + (1 - g) * G + e_m``, where ``e_m`` is a learned modality embedding.

One CSA module is shared by all modalities of an organ; modality-specific behaviour comes
from the modality descriptor (FiLM, cross-attention) and the modality embedding. See
``docs/method.md`` for the reasons.

Example:
    >>> import torch
    >>> csa = CrossModalSemanticAggregation(dim=32, num_modalities=4, num_heads=4)
    >>> z = torch.randn(2, 8, 32)                       # [B, N, d] tokens of a 2x2x2 grid
    >>> cls_tok, mod_tok = torch.randn(3, 32), torch.randn(4, 32)
    >>> csa(z, (2, 2, 2), modality_index=1, class_tokens=cls_tok, modality_tokens=mod_tok).shape
    torch.Size([2, 8, 32])
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class FeedForward(nn.Sequential):
    """Pre-norm MLP block ``LN -> Linear -> GELU -> Dropout -> Linear -> Dropout``."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        hidden = int(dim * mlp_ratio)
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )


class FiLMConvBlock(nn.Module):
    """Residual 3D convolution block whose normalised activations are FiLM-modulated.

    ``y = x + Conv(GELU(FiLM(GN(Conv(x)))))``; the FiLM parameters ``(gamma, beta)`` come
    from a conditioning vector and are initialised to the identity (``gamma = 1``,
    ``beta = 0``) so that an untrained block is a plain residual conv block.
    """

    def __init__(self, dim: int, cond_dim: int | None, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.norm = nn.GroupNorm(num_groups=_num_groups(dim), num_channels=dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv3d(dim, dim, kernel_size=3, padding=1)
        self.film: nn.Linear | None = None
        if cond_dim is not None:
            self.film = nn.Linear(cond_dim, 2 * dim)
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor | None) -> Tensor:
        """Args: x ``[B, d, gx, gy, gz]``; cond ``[cond_dim]`` (one for the batch), ``[B, cond_dim]``
        (one per study, e.g. when the batch mixes modalities) or ``None`` (no text)."""
        h = self.norm(self.conv1(x))
        if self.film is not None and cond is not None:
            gamma, beta = self.film(cond).chunk(2, dim=-1)
            shape = (-1 if cond.dim() == 2 else 1, h.shape[1], 1, 1, 1)
            h = h * (1.0 + gamma).view(shape) + beta.view(shape)
        return x + self.conv2(self.drop(self.act(h)))


class TextGuidedTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to text tokens, feed-forward."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 use_text: bool = True) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.use_text = use_text
        if use_text:
            self.norm_q = nn.LayerNorm(dim)
            self.norm_kv = nn.LayerNorm(dim)
            self.cross_attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.ffn = FeedForward(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor, text: Tensor | None) -> Tensor:
        """Args: x ``[B, N, d]`` visual tokens; text ``[B, T, d]`` text tokens or ``None``."""
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        if self.use_text and text is not None:
            kv = self.norm_kv(text)
            x = x + self.cross_attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x + self.ffn(x)


class CrossModalSemanticAggregation(nn.Module):
    """Dual-stream, text-guided aggregation of one modality's encoder tokens (CSA).

    Args:
        dim: token width ``d`` (the encoders' ``dim``; text is projected to it beforehand).
        num_modalities: size of the modality-embedding table (the organ's ``M``).
        num_heads: attention heads in the global stream (must divide ``dim``).
        conv_blocks: number of FiLM conv blocks in the local stream (>= 1).
        transformer_blocks: number of blocks in the global stream (>= 1).
        mlp_ratio: hidden width of the feed-forward blocks, as a multiple of ``dim``.
        dropout: dropout inside both streams.
        use_text: ``False`` for the "no text" ablation: no FiLM, no cross-attention.

    Inputs to :meth:`forward`: tokens ``[B, N, d]`` on a row-major ``grid`` (``N = gx*gy*gz``),
    the modality index, and the projected text: ``class_tokens [C, d]`` and
    ``modality_tokens [M, d]`` (both ``None`` when ``use_text`` is off).
    Output: aggregated tokens ``A_m [B, N, d]``.
    """

    def __init__(self, dim: int, num_modalities: int, num_heads: int = 4, conv_blocks: int = 1,
                 transformer_blocks: int = 1, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 use_text: bool = True) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"CSA: dim ({dim}) must be divisible by num_heads ({num_heads})")
        if conv_blocks < 1 or transformer_blocks < 1:
            raise ValueError("CSA: conv_blocks and transformer_blocks must both be >= 1")
        self.dim = dim
        self.use_text = use_text
        cond_dim = 2 * dim if use_text else None  # [modality descriptor; mean class token]
        self.local_blocks = nn.ModuleList(FiLMConvBlock(dim, cond_dim, dropout) for _ in range(conv_blocks))
        self.global_blocks = nn.ModuleList(
            TextGuidedTransformerBlock(dim, num_heads, mlp_ratio, dropout, use_text)
            for _ in range(transformer_blocks)
        )
        self.local_norm = nn.LayerNorm(dim)
        self.global_norm = nn.LayerNorm(dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.modality_embedding = nn.Parameter(torch.zeros(num_modalities, dim))
        nn.init.trunc_normal_(self.modality_embedding, std=0.02)
        self.last_gate: Tensor | None = None  # [B, N, d] gate of the latest call, for inspection

    def forward(self, tokens: Tensor, grid: tuple[int, int, int], modality_index: int | Tensor,
                class_tokens: Tensor | None = None, modality_tokens: Tensor | None = None) -> Tensor:
        """``modality_index`` is one index for the whole batch, or a LongTensor ``[B]`` with the
        modality of each row, so that the tokens of all modalities (on grids of one size) go
        through CSA in one call."""
        b, n, d = tokens.shape
        gx, gy, gz = grid
        if n != gx * gy * gz or d != self.dim:
            raise ValueError(f"CSA: tokens {tuple(tokens.shape)} do not match grid {grid} and dim {self.dim}")
        use_text = self.use_text and class_tokens is not None and modality_tokens is not None

        # Local stream: tokens back on their 3D grid (row-major: x slowest, z fastest).
        cond = None
        if use_text:
            mod_tok = modality_tokens[modality_index]  # [d] or [B, d]
            cls_mean = class_tokens.mean(dim=0).expand_as(mod_tok)
            cond = torch.cat([mod_tok, cls_mean], dim=-1)
        vol = tokens.transpose(1, 2).reshape(b, d, gx, gy, gz)
        for block in self.local_blocks:
            vol = block(vol, cond)
        local = self.local_norm(vol.reshape(b, d, n).transpose(1, 2))

        # Global stream: self-attention, then cross-attention to the text bank.
        text = None
        if use_text:
            text = torch.cat([class_tokens, modality_tokens], dim=0).unsqueeze(0).expand(b, -1, -1)
        glob = tokens
        for block in self.global_blocks:
            glob = block(glob, text)
        glob = self.global_norm(glob)

        gate = torch.sigmoid(self.gate(torch.cat([local, glob], dim=-1)))
        self.last_gate = gate.detach()
        emb = self.modality_embedding[modality_index]
        return gate * local + (1.0 - gate) * glob + (emb.unsqueeze(1) if emb.dim() == 2 else emb)


def _num_groups(dim: int) -> int:
    for g in (8, 4, 2):
        if dim % g == 0:
            return g
    return 1

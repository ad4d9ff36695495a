"""Modality-aware 3D vision encoders ``E_m``: one network per MRI modality.

Architectures are data: ``medmap/configs/encoders/<name>.yaml`` (or any YAML path, or a
dict) names a ``type`` (``vit``, ``cnn`` or ``densenet``) and its sizes. :func:`build_encoders` builds
one encoder per modality with separate weights (the MedMAP design) or, with
``shared=True``, a single trunk used for every modality (the ablation "without
modality-aware encoders").

Every encoder maps a volume ``[B, 1, X, Y, Z]`` to an :class:`EncoderOutput`: tokens on a
3D grid (row-major over the grid) and a pooled vector.

Example:
    >>> enc = build_encoders("cnn_small", {"t1": (32, 32, 32), "t2": (32, 32, 32)})
    >>> out = enc(torch.zeros(2, 1, 32, 32, 32), modality="t2")
    >>> out.tokens.shape, out.grid, out.pooled.shape
    (torch.Size([2, 8, 128]), (2, 2, 2), torch.Size([2, 128]))
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, TransformerBlock
from torch import Tensor, nn

from medmap.config import load_yaml, resolve_config_path
from medmap.errors import ConfigError
from medmap.models.norms import instance_norms_as_group_norms


@dataclass
class EncoderOutput:
    """Output of one vision encoder.

    Attributes:
        tokens: ``[B, N, d]`` with ``N = gx * gy * gz``, row-major over the token grid.
        grid: the token grid ``(gx, gy, gz)``.
        pooled: ``[B, d]`` the pooled volume vector ``z_m``.
    """

    tokens: Tensor
    grid: tuple[int, int, int]
    pooled: Tensor


def _grid_tokens(x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
    """``[B, d, gx, gy, gz]`` -> tokens ``[B, N, d]`` and the grid."""
    b, d, gx, gy, gz = x.shape
    return x.flatten(2).transpose(1, 2), (gx, gy, gz)


POOLS = ("mean", "max", "grid", "attention")


def check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ConfigError(f"encoder 'pool' must be one of {', '.join(POOLS)}, got {pool!r}")


def pool_tokens(tokens: Tensor, pool: str = "mean") -> Tensor:
    """The pooled volume vector ``z_m`` from tokens ``[B, N, d]`` (``mean`` or ``max``).

    ``mean`` averages the tokens. ``max`` takes each channel's maximum over the tokens, so a
    finding that fills a few of the N tokens is not averaged away (the tokens are
    layer-normalised, so no token can outweigh the others in a mean).

    >>> pool_tokens(torch.tensor([[[0.0, 1.0], [2.0, -1.0]]]), "max")
    tensor([[2., 1.]])
    """
    return tokens.amax(dim=1) if pool == "max" else tokens.mean(dim=1)


class TokenPool(nn.Module):
    """How an encoder's tokens become ``z_m``: ``mean``, ``max``, ``grid`` or ``attention``.

    ``mean`` and ``max`` (:func:`pool_tokens`) pool over the whole volume, so they keep *what*
    the volume shows but not *where*. ``grid`` max-pools the token grid into ``pool_grid``
    cells (an adaptive pool, so any input size works), concatenates the cells in a fixed order
    and maps them linearly to ``d``. With the default 2 x 2 x 2 cells ``z_m`` can tell left
    from right, front from back and top from bottom, which findings texts name ("left frontal
    lobe", "segment VII") and retrieval has to match. ``attention`` is a softmax-weighted mean
    with learned token scores (a linear map of each token, as CCT's ``attention`` pooling of
    ``v*``): a finding that fills a few of the N tokens can take most of the weight instead of
    1/N of it, as in the mean.

    >>> pool = TokenPool("grid", dim=4, pool_grid=(2, 1, 1))
    >>> pool(torch.randn(3, 6, 4), (2, 3, 1)).shape
    torch.Size([3, 4])
    """

    def __init__(self, pool: str = "mean", dim: int = 128, pool_grid: Sequence[int] = (2, 2, 2)) -> None:
        super().__init__()
        check_pool(pool)
        self.pool = pool
        self.pool_grid = tuple(int(g) for g in pool_grid)
        if len(self.pool_grid) != 3 or min(self.pool_grid) < 1:
            raise ConfigError(f"encoder 'pool_grid' must be three positive cell counts, got {list(pool_grid)}")
        if pool == "grid":
            self.proj = nn.Linear(dim * math.prod(self.pool_grid), dim)
        elif pool == "attention":
            self.score = nn.Linear(dim, 1)

    def forward(self, tokens: Tensor, grid: tuple[int, int, int]) -> Tensor:
        if self.pool == "attention":
            weights = torch.softmax(self.score(tokens).squeeze(-1), dim=1)
            return torch.einsum("bn,bnd->bd", weights, tokens)
        if self.pool != "grid":
            return pool_tokens(tokens, self.pool)
        b, _, d = tokens.shape
        cells = F.adaptive_max_pool3d(tokens.transpose(1, 2).reshape(b, d, *grid), self.pool_grid)
        return self.proj(cells.flatten(1))


class PatchEmbed3d(nn.Module):
    """Non-overlapping 3D patch embedding as a reshape plus ``nn.Linear``.

    Mathematically a ``Conv3d`` with ``kernel_size == stride == patch`` (tested), written as
    one matrix multiplication: in isolation its forward+backward on a full-resolution
    single-channel volume is several times faster on CPU than oneDNN's convolution; inside
    a whole encoder step ``medmap.benchmark`` measured 1.6x for ``cnn_small`` and no
    difference for ``vit_tiny`` (docs/performance.md).
    Input sizes that are not multiples of ``patch`` are cropped at the far end, like the
    convolution would.

    Args:
        in_channels: input channels.
        out_channels: embedding width.
        patch: patch edge in voxels.

    Example:
        >>> pe = PatchEmbed3d(1, 8, 4)
        >>> pe(torch.zeros(2, 1, 16, 12, 8)).shape
        torch.Size([2, 8, 4, 3, 2])
    """

    def __init__(self, in_channels: int, out_channels: int, patch: int) -> None:
        super().__init__()
        self.patch = int(patch)
        self.proj = nn.Linear(in_channels * self.patch**3, out_channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *size = x.shape
        p = self.patch
        g = [s // p for s in size]
        x = x[:, :, : g[0] * p, : g[1] * p, : g[2] * p]
        x = x.reshape(b, c, g[0], p, g[1], p, g[2], p).permute(0, 2, 4, 6, 1, 3, 5, 7)
        x = self.proj(x.reshape(b, g[0] * g[1] * g[2], c * p**3))
        return x.transpose(1, 2).reshape(b, -1, *g)


class ViT3DEncoder(nn.Module):
    """A small 3D ViT: conv stem, conv patch embedding, learnable positional embedding,
    MONAI transformer blocks, final layer norm, mean pooling.

    The positional embedding is learnt on the grid of ``roi_size`` and trilinearly
    interpolated when a volume of another size gives another grid.

    Args:
        roi_size: expected input size ``(X, Y, Z)``; sets the positional-embedding grid.
        dim: token width.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp_ratio: MLP width / token width.
        stem_channels: channels of the stride-2 conv stem (0 = no stem).
        patch_size: patch size of the embedding applied after the stem.
        dropout: dropout rate in the transformer blocks.
        pool: how the tokens become the pooled vector ``z_m``: ``mean``, ``max`` or ``grid``
            (see :class:`TokenPool`).
        pool_grid: cells of the ``grid`` pool.
    """

    def __init__(
        self,
        roi_size: Sequence[int],
        dim: int = 192,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        stem_channels: int = 16,
        patch_size: int = 8,
        dropout: float = 0.0,
        pool: str = "mean",
        pool_grid: Sequence[int] = (2, 2, 2),
    ) -> None:
        super().__init__()
        self.pooling = TokenPool(pool, dim, pool_grid)
        if dim % heads:
            raise ConfigError(f"vit: dim ({dim}) must be divisible by heads ({heads})")
        if depth < 1 or patch_size < 1:
            raise ConfigError("vit: depth and patch_size must be positive")
        self.dim = dim
        if stem_channels > 0:
            self.stem: nn.Module = Convolution(3, 1, stem_channels, strides=2, kernel_size=3, norm="instance", act="gelu")
            in_ch, self.stride = stem_channels, 2 * patch_size
        else:
            self.stem, in_ch, self.stride = nn.Identity(), 1, patch_size
        self.patch_embed = PatchEmbed3d(in_ch, dim, patch_size)
        grid = [max(1, self._out_size(int(s), stem_channels > 0, patch_size)) for s in roi_size]
        self.pos_embed = nn.Parameter(torch.zeros(1, dim, *grid))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, int(dim * mlp_ratio), heads, dropout_rate=dropout, qkv_bias=True) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        instance_norms_as_group_norms(self)  # the same function, faster on CPU (medmap.models.norms)

    @staticmethod
    def _out_size(s: int, stem: bool, patch: int) -> int:
        if stem:
            s = (s + 1) // 2  # kernel 3, stride 2, "same" padding
        return s // patch

    def forward(self, x: Tensor) -> EncoderOutput:
        x = self.patch_embed(self.stem(x))  # [B, d, gx, gy, gz]
        pos = self.pos_embed
        if pos.shape[2:] != x.shape[2:]:
            pos = F.interpolate(pos, size=x.shape[2:], mode="trilinear", align_corners=False)
        tokens, grid = _grid_tokens(x + pos)
        for blk in self.blocks:
            tokens = blk(tokens)
        tokens = self.norm(tokens)
        return EncoderOutput(tokens=tokens, grid=grid, pooled=self.pooling(tokens, grid))


class StagedConvEncoder(nn.Module):
    """What the convolutional encoders share: stages that models can run one at a time
    (``run_stage``, for the cross-sequence exchange), then a 1x1x1 convolution to the token
    width, a layer norm and the pooling. Subclasses set ``to_tokens``, ``norm`` and ``pooling``."""

    to_tokens: nn.Conv3d
    norm: nn.LayerNorm
    pooling: TokenPool

    def tokens_from(self, features: Tensor) -> EncoderOutput:
        """Tokens, grid and pooled vector from the last stage's feature map."""
        tokens, grid = _grid_tokens(self.to_tokens(features))
        tokens = self.norm(tokens)
        return EncoderOutput(tokens=tokens, grid=grid, pooled=self.pooling(tokens, grid))


class CNN3DEncoder(StagedConvEncoder):
    """A small 3D residual CNN (MONAI ``ResidualUnit`` stages, each of stride 2).

    Args:
        channels: output channels of each stage; ``len(channels)`` stride-2 stages.
        subunits: convolutions per residual unit.
        dim: token width (a 1x1x1 convolution maps the last stage to it).
        norm: MONAI norm name (``instance``, ``batch``, ...).
        dropout: dropout rate inside the units.
        stem_patch: when > 1, a non-overlapping ``stem_patch``-voxel patch embedding with
            ``stem_channels`` channels runs first (overall stride ``stem_patch * 2**len(channels)``).
        stem_channels: channels of that stem.
        pool: ``mean``, ``max`` or ``grid`` pooling of the tokens into ``z_m`` (:class:`TokenPool`).
        pool_grid: cells of the ``grid`` pool.
        in_channels: input channels (1 for one modality; the early-fusion baseline stacks them).
    """

    def __init__(
        self,
        roi_size: Sequence[int] | None = None,
        channels: Sequence[int] = (8, 16, 32, 64),
        subunits: int = 2,
        dim: int = 128,
        norm: str = "instance",
        dropout: float = 0.0,
        stem_patch: int = 1,
        stem_channels: int = 16,
        pool: str = "mean",
        pool_grid: Sequence[int] = (2, 2, 2),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.pooling = TokenPool(pool, dim, pool_grid)
        if not channels:
            raise ConfigError("cnn: 'channels' must list at least one stage")
        if stem_patch < 1:
            raise ConfigError("cnn: 'stem_patch' must be at least 1")
        self.dim = dim
        layers: list[nn.Module] = []
        in_ch = int(in_channels)
        self.stage_channels: list[int] = []  # output channels after each stage (see stage_bounds)
        self.stage_bounds: list[int] = []    # index into `stages` after which a stage ends
        if stem_patch > 1:
            # Patchify stem (kernel = stride): on CPU, full-resolution 3x3x3 convolutions dominate
            # the cost of a 3D CNN; a non-overlapping patch embedding cuts it by ~stem_patch^3.
            layers += [PatchEmbed3d(in_ch, stem_channels, stem_patch),
                       Convolution(3, stem_channels, stem_channels, kernel_size=1, norm=norm, act="gelu", conv_only=False)]
            in_ch = stem_channels
            self.stage_channels.append(in_ch)
            self.stage_bounds.append(len(layers))
        for ch in channels:
            layers.append(
                ResidualUnit(3, in_ch, int(ch), strides=2, subunits=subunits, norm=norm, dropout=dropout or None)
            )
            in_ch = int(ch)
            self.stage_channels.append(in_ch)
            self.stage_bounds.append(len(layers))
        self.stages = nn.Sequential(*layers)
        self.stride = stem_patch * 2 ** len(channels)
        self.to_tokens = nn.Conv3d(in_ch, dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        instance_norms_as_group_norms(self)  # the same function, faster on CPU (medmap.models.norms)

    def run_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i`` alone (``stage_channels[i]`` output channels), for models that let the
        encoders of several sequences exchange features between stages."""
        start = self.stage_bounds[i - 1] if i else 0
        for layer in self.stages[start : self.stage_bounds[i]]:
            x = layer(x)
        return x

    def forward(self, x: Tensor) -> EncoderOutput:
        return self.tokens_from(self.stages(x))


class SeparableMaxPool3d(nn.Module):
    """``nn.MaxPool3d`` that runs as three 1D maxima when no gradient is needed.

    A cubic max pool is separable (the maximum over a box is the maximum over x of the
    maxima over y of the maxima over z), and on CPU three strided ``unfold(...).amax()``
    passes are faster than ``max_pool3d``, which also computes the argmax indices; the
    brain model's validation forward with it is timed by ``medmap bench --sections
    step_costs`` (docs/performance.md). The result is bit-identical. With gradients
    (training) the native kernel runs, whose backward is the faster one.

    >>> x = torch.randn(2, 3, 9, 8, 7)
    >>> with torch.no_grad():
    ...     torch.equal(SeparableMaxPool3d(3, 2, 1)(x), nn.MaxPool3d(3, 2, 1)(x))
    True
    """

    def __init__(self, kernel_size: int = 3, stride: int = 2, padding: int = 1) -> None:
        super().__init__()
        self.kernel_size, self.stride, self.padding = int(kernel_size), int(stride), int(padding)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return F.max_pool3d(x, self.kernel_size, self.stride, self.padding)
        p = self.padding
        x = F.pad(x, (p, p, p, p, p, p), value=float("-inf"))
        for dim in (2, 3, 4):
            x = x.unfold(dim, self.kernel_size, self.stride).amax(dim=-1)
        return x


class DenseNet3DEncoder(StagedConvEncoder):
    """A small 3D DenseNet (MONAI ``DenseNet`` feature layers) for one sequence.

    MONAI's DenseNet trunk: a 7 x 7 x 7 stride-2 stem and a stride-2 max pool, then dense
    blocks (each layer ``norm -> ReLU -> 1x1x1 conv -> norm -> ReLU -> 3x3x3 conv`` whose
    output is concatenated to its input) separated by transitions that halve the grid; a
    final norm and ReLU, then a 1x1x1 convolution to the token width ``dim`` and a layer norm,
    as :class:`CNN3DEncoder`. Overall stride ``4 * 2 ** (len(block_config) - 1)``: 8 with two
    blocks, so 40 x 48 x 40 voxels give a 5 x 6 x 5 token grid.

    On the whole-brain task the residual :class:`CNN3DEncoder` stayed near chance for
    hundreds of steps where this trunk learnt at once, in MedMAP and as an early-fusion CNN
    alike (docs/results.md, "What made the brain model learn"): its wide stem sees a
    tumour with its surroundings from the first layer.

    Stages (for :class:`~medmap.models.exchange.CrossSequenceExchange`): the stem, then one
    per dense block (with the transition that follows it, or the final norm).

    Args:
        init_features: channels of the stem.
        growth_rate: channels each dense layer adds.
        block_config: dense layers per block.
        bn_size: bottleneck width of a dense layer, as a multiple of ``growth_rate``.
        dim: token width.
        norm: MONAI norm name (``instance``, ``batch``, ...).
        dropout: dropout rate inside the dense layers.
        pool: ``mean``, ``max``, ``grid`` or ``attention`` pooling of the tokens into ``z_m``.
        pool_grid: cells of the ``grid`` pool.
        in_channels: input channels (1 for one sequence).

    Example:
        >>> enc = DenseNet3DEncoder(init_features=8, growth_rate=4, dim=16)
        >>> out = enc(torch.zeros(2, 1, 40, 48, 40))
        >>> out.grid, out.tokens.shape, enc.stage_channels
        ((5, 6, 5), torch.Size([2, 150, 16]), [8, 8, 16])
    """

    def __init__(
        self,
        roi_size: Sequence[int] | None = None,
        init_features: int = 16,
        growth_rate: int = 8,
        block_config: Sequence[int] = (2, 2),
        bn_size: int = 4,
        dim: int = 64,
        norm: str = "instance",
        dropout: float = 0.0,
        pool: str = "max",
        pool_grid: Sequence[int] = (2, 2, 2),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        from monai.networks.nets import DenseNet

        if not block_config or min(int(n) for n in block_config) < 1:
            raise ConfigError("densenet: 'block_config' must list at least one block of at least one layer")
        self.pooling = TokenPool(pool, dim, pool_grid)
        self.dim = dim
        net = DenseNet(spatial_dims=3, in_channels=int(in_channels), out_channels=1, init_features=int(init_features),
                       growth_rate=int(growth_rate), block_config=tuple(int(n) for n in block_config),
                       bn_size=int(bn_size), norm=norm, dropout_prob=float(dropout))
        layers = dict(net.features.named_children())
        pool0 = layers["pool0"]  # nn.MaxPool3d(3, 2, 1): the same pool, faster in validation and prediction
        layers["pool0"] = SeparableMaxPool3d(pool0.kernel_size, pool0.stride, pool0.padding)
        stages = [nn.Sequential(*(layers[k] for k in ("conv0", "norm0", "relu0", "pool0")))]
        for i in range(1, len(block_config) + 1):
            last = i == len(block_config)  # MONAI names the final norm norm5, whatever the block count
            tail = nn.Sequential(layers["norm5"], nn.ReLU()) if last else layers[f"transition{i}"]
            stages.append(nn.Sequential(layers[f"denseblock{i}"], tail))
        self.stages = nn.ModuleList(stages)
        self.stage_channels = [int(init_features)]  # MONAI's DenseNet: a block adds growth per layer, a transition halves
        for i, n in enumerate(block_config):
            grown = self.stage_channels[-1] + int(n) * int(growth_rate)
            self.stage_channels.append(grown // 2 if i < len(block_config) - 1 else grown)
        self.stride = 4 * 2 ** (len(block_config) - 1)
        self.to_tokens = nn.Conv3d(self.stage_channels[-1], dim, kernel_size=1)
        self.norm = nn.LayerNorm(dim)
        instance_norms_as_group_norms(self)  # the same function, faster on CPU (medmap.models.norms)

    def run_stage(self, i: int, x: Tensor) -> Tensor:
        """Stage ``i`` alone (``stage_channels[i]`` output channels)."""
        return self.stages[i](x)

    def forward(self, x: Tensor) -> EncoderOutput:
        for stage in self.stages:
            x = stage(x)
        return self.tokens_from(x)


ARCH_TYPES: dict[str, type[nn.Module]] = {"vit": ViT3DEncoder, "cnn": CNN3DEncoder, "densenet": DenseNet3DEncoder}


def load_arch(arch: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """An architecture config as a dict: a built-in name (``vit_small``), a YAML path or a dict."""
    if isinstance(arch, Mapping):
        cfg = dict(arch)
    else:
        cfg = load_yaml(resolve_config_path(arch, "encoders"))
        cfg.setdefault("name", Path(str(arch)).stem)
    if cfg.get("type") not in ARCH_TYPES:
        raise ConfigError(f"encoder config: 'type' must be one of {sorted(ARCH_TYPES)}, got {cfg.get('type')!r}")
    return cfg


def build_encoder(arch: str | Path | Mapping[str, Any], roi_size: Sequence[int]) -> nn.Module:
    """One vision encoder from an architecture config."""
    cfg = load_arch(arch)
    kwargs = {k: v for k, v in cfg.items() if k not in ("type", "name")}
    cls = ARCH_TYPES[cfg["type"]]
    try:
        return cls(roi_size=tuple(int(s) for s in roi_size), **kwargs)
    except TypeError as e:
        raise ConfigError(f"encoder config '{cfg.get('name', cfg['type'])}': {e}") from e


class ModalityAwareEncoders(nn.Module):
    """The vision encoders ``E_m`` of all modalities, called by modality name.

    Args:
        arch: architecture config (name, path or dict).
        roi_sizes: modality name -> input size ``(X, Y, Z)``.
        shared: one trunk for all modalities (ablation) instead of one per modality.
    """

    def __init__(
        self, arch: str | Path | Mapping[str, Any], roi_sizes: Mapping[str, Sequence[int]], shared: bool = False
    ) -> None:
        super().__init__()
        if not roi_sizes:
            raise ConfigError("build_encoders: roi_sizes must name at least one modality")
        self.arch = load_arch(arch)
        self.modalities = list(roi_sizes)
        self.shared = bool(shared)
        if self.shared:
            # the largest ROI fixes the ViT's positional grid; others are interpolated
            roi = max((tuple(r) for r in roi_sizes.values()), key=lambda r: r[0] * r[1] * r[2])
            self.trunk = build_encoder(self.arch, roi)
            self.encoders = nn.ModuleDict()
        else:
            self.encoders = nn.ModuleDict({m: build_encoder(self.arch, r) for m, r in roi_sizes.items()})
        first = self.trunk if self.shared else next(iter(self.encoders.values()))
        self.dim: int = int(first.dim)
        self.stride: int = int(first.stride)

    def encoder_for(self, modality: str) -> nn.Module:
        if modality not in self.modalities:
            raise KeyError(f"no encoder for modality '{modality}'; known: {', '.join(self.modalities)}")
        return self.trunk if self.shared else self.encoders[modality]

    def forward(self, x: Tensor, modality: str) -> EncoderOutput:
        """Encode ``x`` (``[B, 1, X, Y, Z]``) with the encoder of ``modality``."""
        if x.ndim != 5 or x.shape[1] != 1:
            raise ValueError(f"expected a volume batch [B, 1, X, Y, Z], got {tuple(x.shape)}")
        return self.encoder_for(modality)(x)


def build_encoders(
    arch: str | Path | Mapping[str, Any], roi_sizes: Mapping[str, Sequence[int]], shared: bool = False
) -> ModalityAwareEncoders:
    """Build the modality-aware encoders (see :class:`ModalityAwareEncoders`)."""
    return ModalityAwareEncoders(arch, roi_sizes, shared=shared)

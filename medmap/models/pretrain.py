"""MedMAP stage-1 model: modality-aware encoders, projections ``g_m`` and ``h``, temperatures.

The frozen text encoder is *not* part of this module: it runs once, before training, and
the model receives its embeddings ``u``. Everything in this module is trainable:

* ``encoders``: :class:`~medmap.models.encoders.ModalityAwareEncoders` (``E_m``);
* ``vision_proj[m]``: per-modality projection ``g_m: d -> k``;
* ``text_proj``: the shared projection ``h: text_dim -> k``;
* ``log_temperature[m]``: learnable ``t_m``, clamped to ``[0, ln(max_logit_scale)]``.

Example:
    >>> model = MedMAPPretrainModel(["t1", "t2"], {"t1": (32, 32, 32), "t2": (32, 32, 32)},
    ...                             arch="cnn_small", text_dim=384, embed_dim=64)
    >>> v = model.encode_volume(torch.zeros(2, 1, 32, 32, 32), "t1")
    >>> v.shape
    torch.Size([2, 64])
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmap.config import OrganConfig
from medmap.errors import ConfigError
from medmap.models.encoders import build_encoders
from medmap.run_config import PretrainConfig, pretrain_config


def _projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim))
    raise ConfigError(f"projection must be 'linear' or 'mlp', got {kind!r}")


class MedMAPPretrainModel(nn.Module):
    """Trainable part of MedMAP stage 1.

    Args:
        modalities: all modality names the model knows (e.g. brain's then liver's); their
            index in this list is the *modality index* used by the loss.
        roi_sizes: modality -> input size ``(X, Y, Z)``.
        arch: encoder architecture config (name, path or dict).
        text_dim: size of the frozen text embeddings ``u``.
        embed_dim: size ``k`` of the joint space.
        shared_encoder: one trunk for all modalities (ablation).
        vision_proj: ``linear`` or ``mlp`` for ``g_m``.
        text_proj: ``linear`` or ``mlp`` for ``h``.
        init_logit_scale: initial ``exp(t_m)`` (CLIP's 1/0.07).
        max_logit_scale: upper clamp of ``exp(t_m)``; the lower clamp is 1.
    """

    def __init__(
        self,
        modalities: Sequence[str],
        roi_sizes: Mapping[str, Sequence[int]],
        arch: str | Path | Mapping[str, Any] = "vit_small",
        text_dim: int = 384,
        embed_dim: int = 128,
        shared_encoder: bool = False,
        vision_proj: str = "linear",
        text_proj: str = "mlp",
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
    ) -> None:
        super().__init__()
        self.modalities = list(modalities)
        missing = [m for m in self.modalities if m not in roi_sizes]
        if missing:
            raise ConfigError(f"no ROI size for modalities {missing}")
        if not 1.0 <= init_logit_scale <= max_logit_scale:
            raise ConfigError("init_logit_scale must lie in [1, max_logit_scale]")
        self.encoders = build_encoders(arch, {m: tuple(roi_sizes[m]) for m in self.modalities}, shared=shared_encoder)
        d = self.encoders.dim
        self.vision_proj = nn.ModuleDict({m: _projection(d, embed_dim, vision_proj) for m in self.modalities})
        self.text_proj = _projection(text_dim, embed_dim, text_proj)
        self.log_temperature = nn.Parameter(torch.full((len(self.modalities),), math.log(init_logit_scale)))
        self.max_log_temperature = math.log(max_logit_scale)
        self.embed_dim = embed_dim
        self.text_dim = text_dim

    def modality_index(self, modality: str) -> int:
        try:
            return self.modalities.index(modality)
        except ValueError:
            raise KeyError(f"unknown modality '{modality}'; known: {', '.join(self.modalities)}") from None

    def logit_scale(self) -> Tensor:
        """``exp(clamp(t_m, 0, ln max))`` per modality, ``[M_total]``."""
        return self.log_temperature.clamp(0.0, self.max_log_temperature).exp()

    def encode_volume(self, x: Tensor, modality: str) -> Tensor:
        """``g_m(E_m(x).pooled)``, L2-normalised: ``[B, k]`` for ``x`` of ``[B, 1, X, Y, Z]``."""
        z = self.encoders(x, modality).pooled
        return F.normalize(self.vision_proj[modality](z).float(), dim=-1)

    def encode_text(self, u: Tensor) -> Tensor:
        """``h(u)``, L2-normalised: ``[N, k]`` for frozen text embeddings ``u`` of ``[N, text_dim]``."""
        return F.normalize(self.text_proj(u).float(), dim=-1)

    def forward(
        self, images: Tensor, present: Tensor, modalities: Sequence[str], text_emb: Tensor
    ) -> dict[str, Tensor]:
        """Embed every present (volume, findings text) pair of a single-organ batch.

        Args:
            images: ``[B, M, X, Y, Z]`` (the organ's modalities, in ``modalities`` order).
            present: bool ``[B, M]``.
            modalities: the organ's modality names (length ``M``).
            text_emb: ``[B, M, text_dim]`` frozen embeddings of the findings texts.

        Returns:
            ``v`` and ``t`` (``[N, k]``), ``modality`` (``int64 [N]`` global modality index),
            ``pair_index`` (``int64 [N, 2]``: batch row and organ-modality column of each pair)
            and ``logit_scale`` (``[M_total]``).
        """
        vs, idx, pairs = [], [], []
        for j, m in enumerate(modalities):
            rows = present[:, j].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            vs.append(self.encode_volume(images[rows, j : j + 1], m))
            idx.append(torch.full((rows.numel(),), self.modality_index(m), dtype=torch.long, device=images.device))
            pairs.append(torch.stack([rows, torch.full_like(rows, j)], dim=1))
        if not vs:
            raise ValueError("batch has no present modality")
        pair_index = torch.cat(pairs)
        t = self.encode_text(text_emb[pair_index[:, 0], pair_index[:, 1]])
        return {
            "v": torch.cat(vs),
            "t": t,
            "modality": torch.cat(idx),
            "pair_index": pair_index,
            "logit_scale": self.logit_scale(),
        }


def is_modality_aware(cfg: Mapping[str, Any] | PretrainConfig) -> bool:
    """``ablation.modality_aware`` of a stage-1 config, the switch stage 2 has under the same
    name (run folders saved before it moved there have it as ``encoder.modality_aware``)."""
    return pretrain_config(cfg).ablation.modality_aware


def build_pretrain_model(cfg: Mapping[str, Any] | PretrainConfig, organs: Mapping[str, OrganConfig],
                         text_dim: int) -> MedMAPPretrainModel:
    """The stage-1 model for all modalities of the configured organs."""
    typed = pretrain_config(cfg)
    modalities: list[str] = []
    roi: dict[str, tuple[int, ...]] = {}
    for o in organs.values():
        for m in o.modalities:
            if m in roi and tuple(roi[m]) != tuple(o.roi_size):
                raise ConfigError(f"modality '{m}' appears in two organs with different ROI sizes")
            if m not in roi:
                modalities.append(m)
                roi[m] = tuple(o.roi_size)
    proj = typed.model
    return MedMAPPretrainModel(
        modalities,
        roi,
        arch=typed.encoder.arch,
        text_dim=text_dim,
        embed_dim=proj.embed_dim,
        shared_encoder=not typed.ablation.modality_aware,
        vision_proj=proj.vision_proj,
        text_proj=proj.text_proj,
        init_logit_scale=proj.init_logit_scale,
        max_logit_scale=proj.max_logit_scale,
    )

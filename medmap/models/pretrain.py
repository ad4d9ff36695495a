"""MedMAP stage-1 model: modality-aware encoders, projections ``g_m`` and ``h``, temperatures.

The frozen text encoder is *not* part of this module: it runs once, before training, and
the model receives its embeddings ``u``. Everything in this module is trainable:

* ``encoders``: :class:`~medmap.models.encoders.ModalityAwareEncoders` (``E_m``);
* ``vision_proj[m]``: per-modality projection ``g_m: d -> k``;
* ``text_proj``: the shared projection ``h: text_dim -> k``;
* ``log_temperature[m]``: learnable ``t_m``, clamped to ``[0, ln(max_logit_scale)]``;
* with ``study_alignment`` (the impression alignment, ``ablation.impression``): ``study_proj[m]``
  (``d -> k`` per modality) and ``study_log_temperature`` ``t_s``: the study embedding
  ``s = normalise(mean over present m of study_proj[m](z_m))`` is aligned with the
  impression, the part of a report that names the diagnosis.

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


def build_projection(in_dim: int, out_dim: int, kind: str) -> nn.Module:
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
        study_alignment: add the study embedding and its temperature (see the module docstring).
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
        study_alignment: bool = False,
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
        self.vision_proj = nn.ModuleDict({m: build_projection(d, embed_dim, vision_proj) for m in self.modalities})
        self.text_proj = build_projection(text_dim, embed_dim, text_proj)
        self.log_temperature = nn.Parameter(torch.full((len(self.modalities),), math.log(init_logit_scale)))
        self.max_log_temperature = math.log(max_logit_scale)
        self.embed_dim = embed_dim
        self.text_dim = text_dim
        self.study_alignment = study_alignment
        if study_alignment:
            self.study_proj = nn.ModuleDict({m: nn.Linear(d, embed_dim) for m in self.modalities})
            self.study_log_temperature = nn.Parameter(torch.tensor(math.log(init_logit_scale)))

    def modality_index(self, modality: str) -> int:
        try:
            return self.modalities.index(modality)
        except ValueError:
            raise KeyError(f"unknown modality '{modality}'; known: {', '.join(self.modalities)}") from None

    def logit_scale(self) -> Tensor:
        """``exp(clamp(t_m, 0, ln max))`` per modality, ``[M_total]``."""
        return self.log_temperature.clamp(0.0, self.max_log_temperature).exp()

    def study_scale(self) -> Tensor:
        """``exp(clamp(t_s, 0, ln max))``, the study-level temperature (needs ``study_alignment``)."""
        return self.study_log_temperature.clamp(0.0, self.max_log_temperature).exp()

    def encode_volume(self, x: Tensor, modality: str) -> Tensor:
        """``g_m(E_m(x).pooled)``, L2-normalised: ``[B, k]`` for ``x`` of ``[B, 1, X, Y, Z]``."""
        return self.project_volume(self.encoders(x, modality).pooled, modality)

    def project_volume(self, z: Tensor, modality: str) -> Tensor:
        """``g_m(z)``, L2-normalised, for pooled encoder features ``z`` ``[B, d]``."""
        return F.normalize(self.vision_proj[modality](z).float(), dim=-1)

    def encode_study(self, pooled: Mapping[str, tuple[Tensor, Tensor]], batch_size: int) -> tuple[Tensor, Tensor]:
        """The study embedding ``s`` (``[B, k]``, L2-normalised) and which rows have one.

        Args:
            pooled: modality -> (batch rows that have it, pooled encoder features ``[B_m, d]``).
            batch_size: ``B``.
        """
        first = next(iter(pooled.values()))[1]
        total = first.new_zeros(batch_size, self.embed_dim, dtype=torch.float32)
        count = first.new_zeros(batch_size, 1, dtype=torch.float32)
        for m, (rows, z) in pooled.items():
            total = total.index_add(0, rows, self.study_proj[m](z).float())
            count = count.index_add(0, rows, torch.ones_like(rows, dtype=torch.float32).unsqueeze(1))
        return F.normalize(total / count.clamp_min(1.0), dim=-1), count.squeeze(1) > 0

    def encode_text(self, u: Tensor) -> Tensor:
        """``h(u)``, L2-normalised: ``[N, k]`` for frozen text embeddings ``u`` of ``[N, text_dim]``."""
        return F.normalize(self.text_proj(u).float(), dim=-1)

    def forward(
        self, images: Tensor, present: Tensor, modalities: Sequence[str], text_emb: Tensor,
        pair_mask: Tensor | None = None, impression_emb: Tensor | None = None, impression_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Embed every present (volume, findings text) pair of a single-organ batch, and with
        the impression alignment every study and its impression.

        Args:
            images: ``[B, M, X, Y, Z]`` (the organ's modalities, in ``modalities`` order).
            present: bool ``[B, M]``: the volumes present (each goes through its encoder once).
            modalities: the organ's modality names (length ``M``).
            text_emb: ``[B, M, text_dim]`` frozen embeddings of the findings texts.
            pair_mask: bool ``[B, M]``: present volumes that have a findings text (default: ``present``).
            impression_emb: ``[B, text_dim]`` frozen embeddings of the impressions.
            impression_mask: bool ``[B]``: studies that have an impression.

        Returns:
            ``v`` and ``t`` (``[N, k]``), ``modality`` (``int64 [N]`` global modality index),
            ``pair_index`` (``int64 [N, 2]``: batch row and organ-modality column of each pair)
            and ``logit_scale`` (``[M_total]``); with the impression alignment and impressions
            also ``s`` and ``s_text`` (``[B_s, k]``), ``study_rows`` (``int64 [B_s]``) and
            ``study_scale``.
        """
        pair_mask = present if pair_mask is None else pair_mask & present
        vs, idx, pairs, pooled = [], [], [], {}
        for j, m in enumerate(modalities):
            rows = present[:, j].nonzero(as_tuple=True)[0]
            if rows.numel() == 0:
                continue
            z = self.encoders(images[rows, j : j + 1], m).pooled
            pooled[m] = (rows, z)
            keep = pair_mask[rows, j]
            if keep.any():
                vs.append(self.project_volume(z[keep], m))
                idx.append(torch.full((int(keep.sum()),), self.modality_index(m), dtype=torch.long, device=images.device))
                pairs.append(torch.stack([rows[keep], torch.full_like(rows[keep], j)], dim=1))
        if not pooled:
            raise ValueError("batch has no present modality")
        out: dict[str, Tensor] = {"logit_scale": self.logit_scale()}
        if vs:
            pair_index = torch.cat(pairs)
            out.update(v=torch.cat(vs), t=self.encode_text(text_emb[pair_index[:, 0], pair_index[:, 1]]),
                       modality=torch.cat(idx), pair_index=pair_index)
        if self.study_alignment and impression_emb is not None:
            s, has = self.encode_study(pooled, images.shape[0])
            ok = has if impression_mask is None else has & impression_mask.to(has.device)
            rows = ok.nonzero(as_tuple=True)[0]
            out.update(s=s[rows], s_text=self.encode_text(impression_emb[rows]), study_rows=rows,
                       study_scale=self.study_scale())
        return out


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
        study_alignment=typed.ablation.impression,
    )

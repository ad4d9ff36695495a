"""Zero-shot scores in stage 1's joint space, shared by stage 1, ``medmap zeroshot`` and stage 2.

Stage 1 gives every sequence ``m`` an embedding ``v_m = g_m(z_m)`` aligned with that
sequence's findings text, and (with the impression alignment) every study an embedding
``s`` aligned with its impression, the sentence that names the diagnosis. A class ``c`` is
then scored from its prompt set (:mod:`medmap.text.descriptors`) as::

    study part     exp(t_s) * (cos(s, P_c) - cos(s, N_c))            P_c: impression-style prompts,
                                                                      N_c: their negated forms (if any)
    sequence part  mean over present, described m of exp(t_m) * cos(v_m, D_cm)
                                                                      D_cm: c's descriptors of sequence m
    logit_c        w_study * study part + w_seq * sequence part

each prompt slot being a prompt ensemble (the normalised mean of its projected sentences).
Without a study embedding (a stage-1 run without the impression alignment) the study part
is left out; with neither a study embedding nor descriptors, the impression-style prompts
are scored against every sequence (the findings-only form of the paper).

Example:
    >>> text = JointClassText(study=F.normalize(torch.randn(3, 8), dim=-1), negative=None,
    ...                       per_sequence=F.normalize(torch.randn(3, 2, 8), dim=-1),
    ...                       described=torch.tensor([True, True]))
    >>> v = F.normalize(torch.randn(4, 2, 8), dim=-1)
    >>> joint_logits(v, torch.ones(4, 2, dtype=torch.bool), None, text, torch.tensor([10.0, 10.0])).shape
    torch.Size([4, 3])
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medmap.errors import CheckpointError
from medmap.models.pretrain import build_projection  # the same layers as stage 1


@dataclass(frozen=True)
class ZeroShotWeights:
    """How the parts of a zero-shot score are weighed (see the module docstring)."""

    study: float = 1.0        # w_study: the study embedding against impression-style prompts
    sequences: float = 1.0    # w_seq: each sequence against its own class descriptors
    negatives: bool = False   # subtract the negated prompts' similarity (when the prompt set has them)


@dataclass
class JointClassText:
    """A text bank's class prompts projected into the joint space.

    Attributes:
        study: ``[C, k]`` impression-style prompt ensembles.
        negative: ``[C, k]`` negated prompt ensembles, or ``None``.
        per_sequence: ``[C, M, k]`` per-sequence descriptor ensembles (zeros where undescribed),
            or ``None``.
        described: bool ``[M]``: sequences with descriptors for every class.
    """

    study: Tensor
    negative: Tensor | None
    per_sequence: Tensor | None
    described: Tensor | None


def _ensemble(project: Callable[[Tensor], Tensor], emb: Tensor, mask: Tensor) -> Tensor:
    """``[..., P, D]`` frozen embeddings -> ``[..., k]``: mean of the projected, normalised
    prompts where ``mask`` is True, normalised (rows without any prompt stay zero)."""
    lead = emb.shape[:-2]
    proj = F.normalize(project(emb.reshape(-1, emb.shape[-1])).float(), dim=-1).reshape(*lead, emb.shape[-2], -1)
    m = mask.to(proj.dtype).unsqueeze(-1)
    return F.normalize((proj * m).sum(-2), dim=-1)


def project_class_text(project: Callable[[Tensor], Tensor], bank: Any, device: torch.device | None = None) -> JointClassText:
    """Project ``bank``'s class prompts, negatives and descriptors with ``project`` (stage 1's ``h``)."""

    def get(name: str) -> Tensor | None:
        x = bank.get(name) if isinstance(bank, dict) else getattr(bank, name, None)
        return None if x is None else torch.as_tensor(x).to(device) if device is not None else torch.as_tensor(x)

    class_emb, class_mask = get("class_emb"), get("class_mask")
    if class_mask is None:
        class_mask = class_emb.norm(dim=-1) > 0
    study = _ensemble(project, class_emb.float(), class_mask.bool())
    negative = per_seq = described = None
    neg_emb, neg_mask = get("negative_emb"), get("negative_mask")
    if neg_emb is not None and neg_mask is not None:
        negative = _ensemble(project, neg_emb.float(), neg_mask.bool())
    d_emb, d_mask = get("descriptor_emb"), get("descriptor_mask")
    if d_emb is not None and d_mask is not None:
        per_seq = _ensemble(project, d_emb.float(), d_mask.bool())
        described = d_mask.bool().any(-1).all(0)
    return JointClassText(study, negative, per_seq, described)


def joint_logits(seq_emb: Tensor, present: Tensor, study_emb: Tensor | None, text: JointClassText,
                 seq_scale: Tensor, study_scale: Tensor | float = 1.0,
                 weights: ZeroShotWeights = ZeroShotWeights()) -> Tensor:
    """Zero-shot class logits ``[B, C]``.

    Args:
        seq_emb: ``[B, M, k]`` normalised sequence embeddings ``v_m`` (anything where absent).
        present: bool ``[B, M]``.
        study_emb: ``[B, k]`` normalised study embeddings ``s``, or ``None``.
        text: :func:`project_class_text` of the bank.
        seq_scale: ``[M]`` ``exp(t_m)`` of the organ's sequences.
        study_scale: ``exp(t_s)``.
        weights: :class:`ZeroShotWeights`.
    """
    pm = present.to(seq_emb.dtype)
    parts = []
    if study_emb is not None and weights.study > 0:
        score = study_emb @ text.study.t()
        if weights.negatives and text.negative is not None:
            score = score - study_emb @ text.negative.t()
        parts.append(weights.study * study_scale * score)
    if text.per_sequence is not None and text.described is not None and bool(text.described.any()) and weights.sequences > 0:
        use = pm * text.described.to(pm)[None, :]
        lg = torch.einsum("bmk,cmk->bmc", seq_emb, text.per_sequence) * seq_scale[None, :, None]
        parts.append(weights.sequences * (lg * use.unsqueeze(-1)).sum(1) / use.sum(1, keepdim=True).clamp_min(1.0))
    if not parts:  # the paper's findings-only form: class prompts against every sequence
        lg = torch.einsum("bmk,ck->bmc", seq_emb, text.study) * seq_scale[None, :, None]
        parts.append((lg * pm.unsqueeze(-1)).sum(1) / pm.sum(1, keepdim=True).clamp_min(1.0))
    return torch.stack(parts).sum(0)




class JointSpaceHead(nn.Module):
    """Stage 2's similarity head in stage 1's joint space (``model.sim_head: joint``).

    It holds stage 1's projections under stage 1's names (``vision_proj[m]`` = ``g_m``,
    ``text_proj`` = ``h``, ``log_temperature``, and with the impression alignment ``study_proj``
    and ``study_log_temperature``), so that :func:`load_joint_head` copies them from a stage-1
    checkpoint and, before any fine-tuning step, the head's logits are stage 1's zero-shot
    classifier (:func:`joint_logits` of the same text bank). Fine-tuning then refines it.

    Args:
        modalities: the organ's modalities, in tensor order.
        dim: encoder width ``d``.
        text_dim: frozen text embedding width.
        embed_dim: joint space size ``k`` (stage 1's ``model.embed_dim``).
        vision_proj / text_proj: ``linear`` or ``mlp`` (stage 1's ``model.vision_proj`` / ``text_proj``).
        study: with the study projection (stage 1's ``ablation.impression``).
        init_logit_scale / max_logit_scale: as in stage 1.
        weights: how the zero-shot parts are weighed.
    """

    def __init__(self, modalities: list[str], dim: int, text_dim: int, embed_dim: int = 128, vision_proj: str = "linear",
                 text_proj: str = "mlp", study: bool = True, init_logit_scale: float = 1 / 0.07,
                 max_logit_scale: float = 100.0, weights: ZeroShotWeights = ZeroShotWeights()) -> None:
        super().__init__()
        self.modalities = list(modalities)
        self.vision_proj = nn.ModuleDict({m: build_projection(dim, embed_dim, vision_proj) for m in self.modalities})
        self.text_proj = build_projection(text_dim, embed_dim, text_proj)
        self.log_temperature = nn.Parameter(torch.full((len(self.modalities),), math.log(init_logit_scale)))
        self.max_log_temperature = math.log(max_logit_scale)
        self.study = study
        if study:
            self.study_proj = nn.ModuleDict({m: nn.Linear(dim, embed_dim) for m in self.modalities})
            self.study_log_temperature = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.embed_dim = embed_dim
        self.weights = weights

    def forward(self, pooled: Mapping[str, tuple[Tensor, Tensor]], present: Tensor, text_bank: Any) -> Tensor:
        """Logits ``[B, C]`` from the pooled encoder features (modality -> (rows, ``z_m`` ``[B_m, d]``))."""
        b = present.shape[0]
        first = next(iter(pooled.values()))[1]
        cols = []
        study_sum = first.new_zeros(b, self.embed_dim, dtype=torch.float32)
        for name in self.modalities:
            col = first.new_zeros(b, self.embed_dim, dtype=torch.float32)
            if name in pooled:
                rows, z = pooled[name]
                col = col.index_copy(0, rows, F.normalize(self.vision_proj[name](z).float(), dim=-1))
                if self.study:
                    study_sum = study_sum.index_add(0, rows, self.study_proj[name](z).float())
            cols.append(col)
        seq = torch.stack(cols, dim=1)
        study = F.normalize(study_sum, dim=-1) if self.study else None
        text = project_class_text(self.text_proj, text_bank, device=present.device)
        scale = self.log_temperature.clamp(0.0, self.max_log_temperature).exp()
        study_scale = self.study_log_temperature.clamp(0.0, self.max_log_temperature).exp() if self.study else 1.0
        return joint_logits(seq, present, study, text, scale, study_scale, self.weights)


def load_joint_head(head: JointSpaceHead, state_dict: Mapping[str, Tensor], stage1_modalities: list[str]) -> list[str]:
    """Copy stage 1's projections and temperatures into ``head``; returns the names set.

    ``log_temperature`` is matched by modality name (``stage1_modalities`` is the stage-1
    model's modality order); every other tensor by its name.

    Raises:
        CheckpointError: a projection of ``head`` is missing from the stage-1 weights or has
            another shape (a stage-1 run with other projections or without the impression
            alignment: set ``model.joint`` to match it).
    """
    own = head.state_dict()
    new = dict(own)
    for key in own:
        if key == "log_temperature":
            try:
                idx = [stage1_modalities.index(m) for m in head.modalities]
            except ValueError as e:
                raise CheckpointError(f"the stage-1 run has no encoder for a modality of this organ ({e})") from None
            new[key] = state_dict["log_temperature"][idx]
            continue
        if key not in state_dict:
            raise CheckpointError(f"the stage-1 weights have no '{key}': set model.joint to the stage-1 run's projections "
                                  "(embed_dim, vision_proj, text_proj; study: true only for a run with ablation.impression)")
        if tuple(state_dict[key].shape) != tuple(own[key].shape):
            raise CheckpointError(f"stage-1 '{key}' is {tuple(state_dict[key].shape)}, the joint head's {tuple(own[key].shape)}: "
                                  "set model.joint to the stage-1 run's projections")
        new[key] = state_dict[key]
    head.load_state_dict(new)
    return list(own)


__all__ = ["JointClassText", "JointSpaceHead", "ZeroShotWeights", "joint_logits", "load_joint_head", "project_class_text"]

"""Class prompts and modality descriptors of an organ, embedded into a :class:`TextBank`.

The bank is used for zero-shot classification after pre-training and as the text side of
stage 2 (CSA and CCT attend to it). Texts come from the organ config
(``class_prompts``, ``modality_descriptors``), with generic fallbacks.

Example:
    >>> bank = build_text_bank(load_organ_config("brain"), cache)   # doctest: +SKIP
    >>> bank.class_emb.shape, bank.modality_emb.shape                # doctest: +SKIP
    (torch.Size([2, 2, 384]), torch.Size([4, 384]))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from medmap.config import OrganConfig, load_organ_config
from medmap.text.cache import TextEmbeddingCache


@dataclass
class TextBank:
    """Frozen text embeddings of one organ's class prompts and modality descriptors.

    Attributes:
        organ: organ (task) name.
        classes: class names, in label order.
        modalities: modality names, in the organ's order.
        class_prompts: ``[C][P_c]`` prompt texts.
        modality_texts: ``[M]`` descriptor texts.
        class_emb: float32 ``[C, P, D]``; classes with fewer than ``P`` prompts are padded
            with zeros, see ``class_mask``.
        class_mask: bool ``[C, P]``, True where a real prompt sits.
        modality_emb: float32 ``[M, D]``.
    """

    organ: str
    classes: list[str]
    modalities: list[str]
    class_prompts: list[list[str]]
    modality_texts: list[str]
    class_emb: torch.Tensor
    class_mask: torch.Tensor
    modality_emb: torch.Tensor

    @property
    def dim(self) -> int:
        return int(self.modality_emb.shape[-1])

    def mean_class_emb(self) -> torch.Tensor:
        """``[C, D]``: the mean over each class's real prompts (the usual prompt ensemble)."""
        m = self.class_mask.unsqueeze(-1).to(self.class_emb.dtype)
        return (self.class_emb * m).sum(1) / m.sum(1).clamp_min(1.0)


def build_text_bank(organ: OrganConfig | str | Path, cache: TextEmbeddingCache) -> TextBank:
    """Embed an organ's class prompts and modality descriptors through the cache."""
    organ = load_organ_config(organ)
    prompts = [organ.prompts_for(c) for c in organ.classes]
    descriptors = [organ.descriptor_for(m) for m in organ.modalities]
    flat = [p for ps in prompts for p in ps]
    emb = cache.embed(flat + descriptors)
    dim = emb.shape[1]
    n_prompts = max(len(ps) for ps in prompts)
    class_emb = torch.zeros(len(prompts), n_prompts, dim)
    class_mask = torch.zeros(len(prompts), n_prompts, dtype=torch.bool)
    i = 0
    for c, ps in enumerate(prompts):
        class_emb[c, : len(ps)] = emb[i : i + len(ps)]
        class_mask[c, : len(ps)] = True
        i += len(ps)
    return TextBank(
        organ=organ.name,
        classes=list(organ.classes),
        modalities=list(organ.modalities),
        class_prompts=prompts,
        modality_texts=descriptors,
        class_emb=class_emb,
        class_mask=class_mask,
        modality_emb=emb[len(flat) :].clone(),
    )


class TextTable:
    """All distinct texts of a run, embedded once before training.

    Training and evaluation loops look texts up here (a dictionary lookup); they never
    call the encoder. The row index of a text is its integer *text id*: identical texts
    share one id on every rank, because every rank builds the table from the same sorted
    list of texts.

    Args:
        texts: any texts, duplicates and empty strings allowed (empty strings are dropped).
        cache: the embedding cache (its encoder runs only for texts not on disk yet).
    """

    def __init__(self, texts: Sequence[str], cache: TextEmbeddingCache) -> None:
        self.texts = sorted({t for t in texts if t})
        self.index = {t: i for i, t in enumerate(self.texts)}
        self.embeddings = cache.embed(self.texts) if self.texts else torch.zeros(0, 0)

    def __len__(self) -> int:
        return len(self.texts)

    def ids(self, texts: Sequence[str]) -> torch.Tensor:
        """Integer ids (``int64 [N]``) of texts that are in the table."""
        try:
            return torch.tensor([self.index[t] for t in texts], dtype=torch.long)
        except KeyError as e:
            raise KeyError(f"text not embedded before training: {e.args[0][:80]!r}") from None

    def lookup(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeddings [N, D], ids [N])`` of texts that are in the table."""
        ids = self.ids(texts)
        return self.embeddings[ids], ids

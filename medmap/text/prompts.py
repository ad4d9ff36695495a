"""Class prompts and modality descriptors of an organ, embedded into a :class:`TextBank`.

The bank is used for zero-shot classification after pre-training and as the text side of
stage 2 (CSA and CCT attend to it). Texts come from the organ's prompt set
(:mod:`medmap.text.descriptors`: impression-style, negated and per-sequence class
descriptors) or, without one, its ``class_prompts``; ``modality_descriptors`` name the
sequences; generic fallbacks fill gaps.

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
from medmap.text.descriptors import PromptSet, load_prompt_set


@dataclass
class TextBank:
    """Frozen text embeddings of one organ's class prompts and modality descriptors.

    Attributes:
        organ: organ (task) name.
        classes: class names, in label order.
        modalities: modality names, in the organ's order.
        class_prompts: ``[C][P_c]`` prompt texts (impression-style: they name the class).
        modality_texts: ``[M]`` descriptor texts.
        class_emb: float32 ``[C, P, D]``; classes with fewer than ``P`` prompts are padded
            with zeros, see ``class_mask``.
        class_mask: bool ``[C, P]``, True where a real prompt sits.
        modality_emb: float32 ``[M, D]``.
        descriptor_emb: float32 ``[C, M, Q, D]``: per class and sequence, the findings-style
            descriptors of a prompt set (:mod:`medmap.text.descriptors`), zero-padded; ``None``
            without a prompt set.
        descriptor_mask: bool ``[C, M, Q]``; a sequence without descriptors for every class
            has an all-False column and is not scored.
        negative_emb: float32 ``[C, N, D]``: the negated class prompts, or ``None``.
        negative_mask: bool ``[C, N]``.
    """

    organ: str
    classes: list[str]
    modalities: list[str]
    class_prompts: list[list[str]]
    modality_texts: list[str]
    class_emb: torch.Tensor
    class_mask: torch.Tensor
    modality_emb: torch.Tensor
    descriptor_emb: torch.Tensor | None = None
    descriptor_mask: torch.Tensor | None = None
    negative_emb: torch.Tensor | None = None
    negative_mask: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return int(self.modality_emb.shape[-1])

    def mean_class_emb(self) -> torch.Tensor:
        """``[C, D]``: the mean over each class's real prompts (the usual prompt ensemble)."""
        m = self.class_mask.unsqueeze(-1).to(self.class_emb.dtype)
        return (self.class_emb * m).sum(1) / m.sum(1).clamp_min(1.0)


def _padded(groups: Sequence[Sequence[str]], emb: dict[str, torch.Tensor], dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[G, P, D]`` embeddings and ``[G, P]`` mask of ``G`` groups of up to ``P`` texts."""
    width = max([len(g) for g in groups] + [1])
    out = torch.zeros(len(groups), width, dim)
    mask = torch.zeros(len(groups), width, dtype=torch.bool)
    for i, texts in enumerate(groups):
        for j, t in enumerate(texts):
            out[i, j], mask[i, j] = emb[t], True
    return out, mask


def build_text_bank(organ: OrganConfig | str | Path, cache: TextEmbeddingCache,
                    prompts: PromptSet | str | Path | None = None) -> TextBank:
    """Embed an organ's class prompts and modality descriptors through the cache.

    Args:
        organ: the organ config (its ``prompts`` names the default prompt set).
        cache: the text embedding cache.
        prompts: a prompt set (or its name / path) that replaces the organ's; with neither,
            the organ's ``class_prompts`` alone (no per-sequence descriptors, no negatives).
    """
    organ = load_organ_config(organ)
    spec = prompts if prompts is not None else organ.prompts
    pset = load_prompt_set(spec) if isinstance(spec, (str, Path)) else spec
    if pset is not None:
        pset.check_organ(organ)
        study = [pset.classes[c].study for c in organ.classes]
    else:
        study = [organ.prompts_for(c) for c in organ.classes]
    descriptors = [organ.descriptor_for(m) for m in organ.modalities]
    texts = [t for ps in study for t in ps] + descriptors
    if pset is not None:
        for c in organ.classes:
            texts += pset.classes[c].negative + [t for ts in pset.classes[c].sequences.values() for t in ts]
    unique = sorted(set(texts))
    table = dict(zip(unique, cache.embed(unique)))
    dim = int(next(iter(table.values())).shape[0])
    class_emb, class_mask = _padded(study, table, dim)
    bank = TextBank(organ=organ.name, classes=list(organ.classes), modalities=list(organ.modalities),
                    class_prompts=study, modality_texts=descriptors, class_emb=class_emb, class_mask=class_mask,
                    modality_emb=torch.stack([table[t] for t in descriptors]))
    if pset is not None:
        scored = set(pset.sequences_described(list(organ.modalities)))
        per_seq = [[pset.classes[c].sequences.get(m, []) if m in scored else [] for m in organ.modalities]
                   for c in organ.classes]
        flat, fmask = _padded([g for row in per_seq for g in row], table, dim)
        bank.descriptor_emb = flat.reshape(len(organ.classes), len(organ.modalities), -1, dim)
        bank.descriptor_mask = fmask.reshape(len(organ.classes), len(organ.modalities), -1)
        if pset.has_negatives():
            bank.negative_emb, bank.negative_mask = _padded([pset.classes[c].negative for c in organ.classes], table, dim)
    return bank


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

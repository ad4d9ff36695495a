"""Report-mined labels: each study labelled from its impression by the nearest class prompt.

The honest bound on what the reports alone give a supervised model: every report-paired
training study gets the class whose impression-style prompt ensemble (the prompt set's
``study`` prompts) is nearest to its impression in the *frozen* text encoder's space, and a
supervised model is then trained on all of them. Nothing here learns; the agreement of the
mined labels with the true ones is reported next to the result.

Example:
    >>> mined, report = mine_labels(studies, load_organ_config("liver"), cache)   # doctest: +SKIP
    >>> report["agreement"]                                                        # doctest: +SKIP
    0.99
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medmap.config import OrganConfig
from medmap.data.studylist import Study
from medmap.text.cache import TextEmbeddingCache
from medmap.text.prompts import build_text_bank


def mine_labels(studies: Sequence[Study], organ: OrganConfig, cache: TextEmbeddingCache,
                prompts: str | Path | None = None) -> tuple[list[Study], dict[str, Any]]:
    """``studies`` with ``label`` replaced by the class mined from each impression.

    Studies without an impression keep no label (``None``). Returns the relabelled studies and
    a report: how many were mined, and the agreement with the labels they had (where they had one).
    """
    bank = build_text_bank(organ, cache, prompts)
    classes = F.normalize(bank.mean_class_emb(), dim=-1)  # [C, D]
    with_text = [s for s in studies if s.impression]
    emb = F.normalize(cache.embed([s.impression for s in with_text]), dim=-1) if with_text else torch.zeros(0, classes.shape[1])
    mined = (emb @ classes.t()).argmax(1).tolist()
    by_id = {s.study_id: organ.classes[k] for s, k in zip(with_text, mined)}
    out = [dataclasses.replace(s, label=by_id.get(s.study_id)) for s in studies]
    known = [(s.label, by_id[s.study_id]) for s in with_text if s.label is not None]
    agreement = float(np.mean([a == b for a, b in known])) if known else None
    return out, {"n": len(studies), "mined": len(with_text), "agreement": agreement,
                 "prompt_set": str(prompts or organ.prompts or "organ class_prompts")}


__all__ = ["mine_labels"]

"""How far could stage-1 retrieval go on MedMoM-Synth? A ceiling from the generator's truth.

Held-out retrieval (``medmap pretrain``'s ``metrics/pretrain_val.json``) is only readable
against two reference points: chance, and what a *perfect* image model could reach with the
same frozen text encoder. The findings texts are paraphrased by templates, so even a model
that knew everything the generator put into a volume could not predict a text's embedding
exactly. This module estimates that second point.

For each modality, every study is described by the generator's ground truth
(``study.meta``: class, subtype, location, sizes, enhancement, artefact of that sequence,
...; flattened by :func:`ground_truth_features`). A ridge regression, fitted on the training
split with its penalty chosen by cross-validation there, maps these features to the frozen
text encoder's embedding of the findings text. The predicted embeddings then take the place
of the image embeddings in the same retrieval metric as stage 1
(:func:`medmap.evaluation.retrieval.retrieval_metrics`), on the held-out split.

It is an estimate, not a bound: a linear map from hand-flattened metadata can miss what a
non-linear one would find, and an image model cannot see everything in ``meta``. It needs
studies written by ``medmap synth`` (their ``meta``); on other data it raises.

Example:
    >>> from medmap.experiments.ceiling import ground_truth_features
    >>> ground_truth_features({"class": "tumour", "size_mm": 16.0, "location": {"lobe": "frontal"},
    ...                        "artefacts": {"flair": "ghosting"}}, "flair")
    {'class=tumour': 1.0, 'size_mm': 16.0, 'location.lobe=frontal': 1.0, 'artefact=ghosting': 1.0}
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medmap.data.studylist import Study
from medmap.errors import StudyListError
from medmap.text.cache import TextEmbeddingCache

# Bookkeeping keys of the generator's meta that say nothing about what a volume shows.
NOT_CONTENT = frozenset({"generator", "seed", "index", "spacing_mm", "shape", "organ_mask", "lesion_mask", "artefacts"})
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)


def _flatten(meta: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in meta.items():
        if not prefix and key in NOT_CONTENT:
            continue
        name = prefix + key
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        elif isinstance(value, (bool, int, float)):
            out[name] = float(value)
        elif isinstance(value, str):
            out[f"{name}={value}"] = 1.0
        elif isinstance(value, (list, tuple)) and value:
            first = value[0] if isinstance(value[0], (list, tuple)) else value  # lists of centres: the first
            out.update({f"{name}[{i}]": float(x) for i, x in enumerate(first[:3]) if isinstance(x, (int, float))})
            out[f"{name}.n"] = float(len(value))
    return out


def ground_truth_features(
    meta: Mapping[str, Any], modality: str, keys: Collection[str] | None = None
) -> dict[str, float]:
    """The generator's ground truth of one study, as seen by one modality, as named numbers.

    Numbers stay numbers, strings become one-hot ``key=value`` entries, nested dicts are
    flattened with dotted names, lists keep their first three numbers and their length, and
    only this modality's artefact is kept. ``keys`` keeps only these top-level meta keys
    (``artefacts`` included), to see what each kind of ground truth buys.
    """
    if keys is not None:
        meta = {k: v for k, v in meta.items() if k in keys}
    feats = _flatten(meta)
    artefact = (meta.get("artefacts") or {}).get(modality)
    if artefact:
        feats[f"artefact={artefact}"] = 1.0
    return feats


def retrieval_ceiling(
    studies: Sequence[Study],
    cache: TextEmbeddingCache,
    train_split: str = "train",
    eval_split: str = "val",
    ks: Sequence[int] = (1, 5, 10),
    keys: Collection[str] | None = None,
) -> dict[str, dict[str, float]]:
    """Per modality: stage-1 retrieval metrics when the image embedding is the ground truth's
    ridge prediction of the text embedding (see the module docstring). ``keys``: only these
    top-level meta keys (:func:`ground_truth_features`).

    Returns:
        modality -> ``{"organ": ..., "alpha": ..., "v2t_R@k": ..., "v2t_R@k_chance": ..., ...}``,
        the same keys as stage 1's per-modality retrieval.
    """
    from sklearn.feature_extraction import DictVectorizer
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from medmap.evaluation.retrieval import retrieval_metrics

    if not any(s.meta.get("generator") for s in studies):
        raise StudyListError("retrieval_ceiling needs studies written by `medmap synth` (their 'meta' is the ground truth)")
    out: dict[str, dict[str, Any]] = {}
    for organ in sorted({s.organ for s in studies}):
        of_organ = [s for s in studies if s.organ == organ]
        for m in sorted({m for s in of_organ for m in s.modalities}):
            train = [s for s in of_organ if s.split == train_split and s.findings.get(m)]
            held = [s for s in of_organ if s.split == eval_split and s.findings.get(m)]
            if len(train) < 5 or len(held) < 2:
                continue
            model = make_pipeline(DictVectorizer(sparse=False), StandardScaler(), RidgeCV(alphas=RIDGE_ALPHAS))
            model.fit([ground_truth_features(s.meta, m, keys) for s in train], cache.embed([s.findings[m] for s in train]).numpy())
            texts = [s.findings[m] for s in held]
            predicted = torch.as_tensor(model.predict([ground_truth_features(s.meta, m, keys) for s in held]), dtype=torch.float32)
            _, ids = np.unique(texts, return_inverse=True)
            metrics = retrieval_metrics(F.normalize(predicted, dim=-1), F.normalize(cache.embed(texts), dim=-1),
                                        torch.as_tensor(ids), ks)
            out[m] = {"organ": organ, "alpha": float(model[-1].alpha_), **metrics}
    if not out:
        raise StudyListError(f"no modality has training ({train_split!r}) and held-out ({eval_split!r}) findings texts")
    return out

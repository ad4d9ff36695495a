"""A supervised probe of one stage-1 vision encoder: can it see what the texts describe?

Stage 1 can only retrieve a findings text from a volume if its encoder can see what the
text says: the lesion's class, where it is, how large. This probe trains the encoder of one
modality (the stage-1 architecture, from random weights, with stage 1's augmentation) and a
linear head on its pooled vector ``z_m`` to predict one field of the generator's ground truth
(``Study.meta``, e.g. ``location.segment``) or the study label, on the training split, and
scores the validation split against chance. A field that a supervised encoder cannot predict
is a field that contrastive pre-training cannot be expected to align either.

Example:
    >>> r = encoder_probe("runs/synth1000c/studies.jsonl", "liver_8mm", "t2wi",
    ...                   "location.segment", arch={"type": "cnn"})        # doctest: +SKIP
    >>> r["val"]["balanced_accuracy"], r["val"]["chance_balanced_accuracy"]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from medmap.config import load_organ_config
from medmap.data.augment import build_augmentation
from medmap.data.cache import PreprocessCache, default_cache_root
from medmap.data.dataset import StudyDataset, collate_studies
from medmap.data.studylist import Study, read_study_list
from medmap.errors import ConfigError, StudyListError
from medmap.models.encoders import build_encoder
from medmap.utils import seed_everything


def probe_target(study: Study, target: str) -> str | None:
    """The value of ``target`` for one study: ``label``, or a dotted path into ``meta``.

    Returns ``None`` when the study has no such field (e.g. no lesion, so no location).

    >>> s = Study("s", "p", "liver", {}, {}, "", "cyst", "train", {"location": {"segment": "VI"}})
    >>> probe_target(s, "location.segment"), probe_target(s, "label"), probe_target(s, "size")
    ('VI', 'cyst', None)
    """
    if target == "label":
        return study.label
    node: Any = study.meta
    for part in target.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return None if node is None else str(node)


class _Probe(nn.Module):
    def __init__(self, encoder: nn.Module, dim: int, n_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(dim, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).pooled)


def _scores(model: _Probe, loader: DataLoader, j: int, y: np.ndarray, n_classes: int) -> dict[str, float]:
    from sklearn.metrics import balanced_accuracy_score

    model.eval()
    preds = []
    with torch.no_grad():
        for batch in loader:
            preds.append(model(batch["images"][:, j : j + 1]).argmax(1))
    pred = torch.cat(preds).numpy()
    return {
        "n": int(len(y)),
        "accuracy": float((pred == y).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(y, pred)),
        "chance_accuracy_majority": float(np.bincount(y, minlength=n_classes).max() / len(y)),
        "chance_balanced_accuracy": 1.0 / len(np.unique(y)),
    }


def encoder_probe(
    study_list: str | Path,
    organ: str | Path,
    modality: str,
    target: str,
    arch: Mapping[str, Any],
    augment: Mapping[str, Any] | None = None,
    epochs: int = 20,
    batch_size: int = 16,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    train_split: str = "train",
    eval_split: str = "val",
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train ``arch`` + a linear head on ``modality`` to predict ``target``; score ``eval_split``.

    Args:
        study_list: a study list with ground truth in ``meta`` (MedMoM-Synth writes it).
        organ: organ config (built-in name or YAML path); fixes preprocessing and grid.
        modality: the sequence whose encoder is probed; studies without it are skipped.
        target: ``label`` or a dotted path into ``meta`` (``location.segment``, ``class``).
        arch: encoder architecture (as ``encoder.arch`` of a pre-training config).
        augment: stage 1's ``data.augment`` section, or ``None`` for none.
        epochs / batch_size / lr / weight_decay / seed: AdamW training of encoder and head.
        cache_dir: preprocessing cache (default: ``.medmap_cache/preprocess`` next to the list).

    Returns:
        ``classes``, scores of the final model with chance levels (``train``: the training
        split, un-augmented; ``val``: ``eval_split``), and ``train_time_s``.

    Raises:
        StudyListError: too few studies with the target, or a target with one value only.
    """
    organ_cfg = load_organ_config(organ)
    if modality not in organ_cfg.modalities:
        raise ConfigError(f"modality '{modality}' is not one of {', '.join(organ_cfg.modalities)}")
    # only the probed sequence is read, preprocessed and augmented (so the foreground mask of
    # preprocessing comes from this sequence alone, not from the union over the study's sequences)
    studies = [
        dataclasses.replace(s, modalities={modality: s.modalities[modality]})
        for s in read_study_list(study_list)
        if s.organ == organ_cfg.name and modality in s.modalities
    ]
    split_of: dict[str, list[tuple[Study, str]]] = {train_split: [], eval_split: []}
    for s in studies:
        value = probe_target(s, target)
        if value is not None and s.split in split_of:
            split_of[s.split].append((s, value))
    classes = sorted({v for _, v in split_of[train_split]})
    if len(classes) < 2:
        raise StudyListError(f"{study_list}: target '{target}' has {len(classes)} value(s) in the {train_split} split; need 2+")
    pairs = {k: [(s, v) for s, v in p if v in classes] for k, p in split_of.items()}
    if not pairs[eval_split]:
        raise StudyListError(f"{study_list}: no {eval_split} studies with target '{target}'")
    index = {c: i for i, c in enumerate(classes)}
    y = {k: np.array([index[v] for _, v in p]) for k, p in pairs.items()}

    seed_everything(seed)
    cache = PreprocessCache(cache_dir or default_cache_root(study_list) / "preprocess")
    aug = build_augmentation(dict(augment), seed=seed) if augment else None
    train_ds = StudyDataset([s for s, _ in pairs[train_split]], organ_cfg, cache=cache, augment=aug)
    eval_train = StudyDataset([s for s, _ in pairs[train_split]], organ_cfg, cache=cache)
    eval_ds = StudyDataset([s for s, _ in pairs[eval_split]], organ_cfg, cache=cache)
    j = organ_cfg.modalities.index(modality)

    encoder = build_encoder(dict(arch), organ_cfg.roi_size)
    model = _Probe(encoder, int(encoder.dim), len(classes))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * max(1, -(-len(train_ds) // batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    targets = torch.as_tensor(y[train_split])
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_ds), generator=gen).tolist()
        total = 0.0
        for b in range(0, len(order), batch_size):
            idx = order[b : b + batch_size]
            batch = collate_studies([train_ds[i] for i in idx])
            loss = nn.functional.cross_entropy(model(batch["images"][:, j : j + 1]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        if log is not None:
            log(f"epoch {epoch + 1}/{epochs}: train loss {total / len(train_ds):.3f}")
    train_time = time.perf_counter() - start

    def loader(ds: StudyDataset) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_studies)

    return {
        "target": target,
        "modality": modality,
        "classes": classes,
        "train": _scores(model, loader(eval_train), j, y[train_split], len(classes)),
        "val": _scores(model, loader(eval_ds), j, y[eval_split], len(classes)),
        "eval_split": eval_split,
        "train_time_s": train_time,
    }


def probe_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of probe results (one row per modality and target)."""
    lines = [
        "| modality | target | classes | train acc. | val acc. (majority) | val bal. acc. (chance) | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        v = r["val"]
        lines.append(
            f"| {r['modality']} | {r['target']} | {len(r['classes'])} | {r['train']['accuracy']:.3f} | "
            f"{v['accuracy']:.3f} ({v['chance_accuracy_majority']:.3f}) | "
            f"{v['balanced_accuracy']:.3f} ({v['chance_balanced_accuracy']:.3f}) | {r['train_time_s']:.0f} s |"
        )
    return "\n".join(lines)

"""A torch Dataset of whole studies: all modalities of one study come together.

Each item is one study, so a batch can never pair a T2 of one patient with a FLAIR of
another (a defect of the official code, which zipped independently shuffled loaders).

Example:
    >>> from torch.utils.data import DataLoader
    >>> ds = StudyDataset(read_study_list("studies.jsonl", organ="brain", split="train"), "brain",
    ...                   cache=PreprocessCache("cache"), augment=build_augmentation(None, seed=0))  # doctest: +SKIP
    >>> loader = DataLoader(ds, batch_size=4, shuffle=True, collate_fn=collate_studies)           # doctest: +SKIP
    >>> batch = next(iter(loader)); batch["images"].shape                                        # doctest: +SKIP
    torch.Size([4, 4, 80, 96, 80])
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import Dataset

from medmap.config import OrganConfig, load_organ_config
from medmap.data.cache import PreprocessCache
from medmap.data.preprocess import preprocess_study
from medmap.data.studylist import Study
from medmap.errors import StudyListError


class StudyDataset(Dataset):
    """Preprocessed studies of one organ.

    Args:
        studies: studies of ``organ`` (e.g. one split of a study list).
        organ: organ config, or a built-in name / YAML path.
        cache: optional on-disk preprocessing cache (recommended for training).
        augment: optional training augmentation ``sample -> sample``; leave ``None`` for
            evaluation and prediction.

    Items (see docs/architecture.md): ``images`` float32 [M, X, Y, Z], ``present`` bool [M],
    ``affine`` float64 [4, 4], ``label`` int (-1 when unlabelled), ``study_id``, ``organ``,
    ``findings`` (list of M strings, ``""`` for a missing modality) and ``impression``.

    Raises:
        StudyListError: a study of another organ, a label not among the organ's classes, or
            (for an organ config with ``crop: roi_mask``) a study without a ``roi_mask``, so
            that a run stops before training rather than at the first such study.
    """

    def __init__(
        self,
        studies: Sequence[Study],
        organ: OrganConfig | str | Path,
        cache: PreprocessCache | None = None,
        augment: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        self.organ = load_organ_config(organ)
        self.studies = list(studies)
        self.cache = cache
        self.augment = augment
        for s in self.studies:
            if s.organ != self.organ.name:
                raise StudyListError(f"study '{s.study_id}' is a {s.organ} study; this dataset is for {self.organ.name}")
            if s.label is not None and s.label not in self.organ.classes:
                raise StudyListError(
                    f"study '{s.study_id}': unknown label '{s.label}' for organ '{self.organ.name}' "
                    f"(classes: {', '.join(self.organ.classes)})"
                )
        if self.organ.crop == "roi_mask":
            lacking = [s.study_id for s in self.studies if s.roi_mask is None]
            if lacking:
                raise StudyListError(
                    f"{len(lacking)} {self.organ.name} studies have no 'roi_mask' (e.g. {', '.join(lacking[:3])}), "
                    f"but the organ config crops to one (crop: roi_mask); add each study's organ mask as "
                    "'roi_mask' to the study list, or use an organ config without crop: roi_mask"
                )

    def __len__(self) -> int:
        return len(self.studies)

    def label_index(self, study: Study) -> int:
        return -1 if study.label is None else self.organ.classes.index(study.label)

    def __getitem__(self, index: int) -> dict[str, Any]:
        study = self.studies[index]
        sample: dict[str, Any] = dict(preprocess_study(study, self.organ, cache=self.cache))
        if self.augment is not None:
            sample = self.augment(sample)
        sample.update(
            label=self.label_index(study),
            study_id=study.study_id,
            organ=study.organ,
            findings=[study.findings.get(m, "") if m in study.modalities else "" for m in self.organ.modalities],
            impression=study.impression,
        )
        return sample


def collate_studies(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch :class:`StudyDataset` items of one organ.

    Returns:
        ``images`` [B, M, X, Y, Z], ``present`` [B, M], ``label`` [B] (long), ``affine``
        [B, 4, 4], ``study_id`` list[str], ``organ`` str, ``findings`` list[list[str]],
        ``impression`` list[str].

    Raises:
        StudyListError: items of different organs (a batch holds a single organ).
    """
    if not items:
        raise ValueError("collate_studies needs at least one item")
    organs = {it["organ"] for it in items}
    if len(organs) != 1:
        raise StudyListError(f"a batch must hold studies of a single organ, got {sorted(organs)}")
    return {
        "images": torch.stack([it["images"] for it in items]),
        "present": torch.stack([torch.as_tensor(it["present"], dtype=torch.bool) for it in items]),
        "label": torch.tensor([int(it["label"]) for it in items], dtype=torch.long),
        "affine": torch.stack([torch.as_tensor(it["affine"], dtype=torch.float64) for it in items]),
        "study_id": [it["study_id"] for it in items],
        "organ": organs.pop(),
        "findings": [list(it["findings"]) for it in items],
        "impression": [it["impression"] for it in items],
    }

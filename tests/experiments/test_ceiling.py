"""The stage-1 retrieval ceiling: exact when texts follow the ground truth, chance when not."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from medmap.data.studylist import Study
from medmap.errors import StudyListError
from medmap.experiments.ceiling import ground_truth_features, retrieval_ceiling
from medmap.text.cache import TextEmbeddingCache


class HashEncoder:
    """Deterministic, unrelated 16-d vectors per text (a stand-in for the frozen encoder)."""

    model_id = "hash-v1"
    dim = 16

    def encode(self, texts):
        seeds = [int(hashlib.sha256(t.encode()).hexdigest()[:8], 16) for t in texts]
        return torch.stack([torch.randn(16, generator=torch.Generator().manual_seed(s)) for s in seeds])


SUBTYPES = ["cyst", "haemangioma", "metastasis", "abscess", "hcc", "fnh"]


def _studies(text_of) -> list[Study]:
    out = []
    for i in range(240):
        meta = {"generator": "medmom-synth", "seed": 0, "index": i, "subtype": SUBTYPES[i % 6],
                "location": {"segment": ["II", "VII"][(i // 6) % 2]}, "artefacts": {}}
        split = "train" if i < 180 else "val"
        out.append(Study(study_id=f"s{i}", patient_id=f"p{i}", organ="liver", modalities={"t2wi": "x.nii.gz"},
                         findings={"t2wi": text_of(i, meta)}, split=split, meta=meta))
    return out


def test_texts_that_follow_the_ground_truth_are_retrieved_exactly(tmp_path: Path) -> None:
    studies = _studies(lambda i, meta: f"{meta['subtype']} in segment {meta['location']['segment']}")
    res = retrieval_ceiling(studies, TextEmbeddingCache(tmp_path, HashEncoder()))["t2wi"]
    assert res["n_texts"] == 12 and res["v2t_R@1"] == 1.0 and res["t2v_R@1"] == 1.0
    assert res["v2t_R@1_chance"] == pytest.approx(1 / 12)


def test_texts_unrelated_to_the_ground_truth_stay_near_chance(tmp_path: Path) -> None:
    studies = _studies(lambda i, meta: f"report number {i}")  # unique, unpredictable texts
    res = retrieval_ceiling(studies, TextEmbeddingCache(tmp_path, HashEncoder()))["t2wi"]
    assert res["n_texts"] == 60 and res["v2t_R@10_chance"] == pytest.approx(10 / 60)
    # the best the ridge can do is guess; 60 queries leave room for luck, not for 3x chance
    assert res["v2t_R@10"] < 3 * res["v2t_R@10_chance"]


def test_features_flatten_the_meta_and_keep_only_this_sequences_artefact() -> None:
    meta = {"generator": "g", "seed": 3, "organ_mask": "m.nii.gz", "size_mm": 12.5, "necrotic": True,
            "nodule_centres_vox": [[1, 2, 3], [4, 5, 6]], "artefacts": {"flair": "ghosting", "t1": "motion"}}
    assert ground_truth_features(meta, "flair") == {
        "size_mm": 12.5, "necrotic": 1.0, "nodule_centres_vox[0]": 1.0, "nodule_centres_vox[1]": 2.0,
        "nodule_centres_vox[2]": 3.0, "nodule_centres_vox.n": 2.0, "artefact=ghosting": 1.0}


def test_keys_restrict_the_ground_truth(tmp_path: Path) -> None:
    studies = _studies(lambda i, meta: f"{meta['subtype']} in segment {meta['location']['segment']}")
    cache = TextEmbeddingCache(tmp_path, HashEncoder())
    res = retrieval_ceiling(studies, cache, keys={"subtype"})["t2wi"]  # the segment is unknown now
    assert 0.4 < res["v2t_R@1"] < 0.6  # the right subtype, then a coin flip between two segments
    assert ground_truth_features({"a": 1, "b": "x"}, "t2", keys={"b"}) == {"b=x": 1.0}


def test_studies_without_ground_truth_are_refused(tmp_path: Path) -> None:
    studies = _studies(lambda i, meta: "normal")
    for s in studies:
        s.meta = {}
    with pytest.raises(StudyListError, match="medmap synth"):
        retrieval_ceiling(studies, TextEmbeddingCache(tmp_path, HashEncoder()))

import pytest
import torch
from torch.utils.data import DataLoader

from medmap.data.augment import build_augmentation
from medmap.data.dataset import StudyDataset, collate_studies
from medmap.errors import StudyListError
from tests.helpers.volumes import make_study, toy_organ


def test_items_and_batches_follow_the_contract(tmp_path):
    organ = toy_organ()
    studies = [
        make_study(tmp_path, "s0", label="tumour"),
        make_study(tmp_path, "s1", modalities=("t1", "flair"), label=None, seed=3),
    ]
    ds = StudyDataset(studies, organ)
    item = ds[1]
    assert item["images"].shape == (3, 24, 24, 16) and item["present"].tolist() == [True, False, True]
    assert item["label"] == -1 and ds[0]["label"] == 1
    assert item["findings"] == ["t1 findings of s1", "", "flair findings of s1"]
    assert item["impression"] == "impression of s1" and item["study_id"] == "s1" and item["organ"] == "toy"

    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate_studies)))
    assert batch["images"].shape == (2, 3, 24, 24, 16)
    assert batch["present"].shape == (2, 3) and batch["present"].dtype == torch.bool
    assert batch["label"].tolist() == [1, -1] and batch["label"].dtype == torch.long
    assert batch["affine"].shape == (2, 4, 4)
    assert batch["study_id"] == ["s0", "s1"] and len(batch["findings"]) == 2 and len(batch["impression"]) == 2
    # the batch keeps each study's modalities together
    assert torch.equal(batch["images"][1], item["images"])


def test_augment_only_when_given(tmp_path):
    organ = toy_organ()
    study = make_study(tmp_path, "s0")
    plain = StudyDataset([study], organ)
    aug = StudyDataset([study], organ, augment=build_augmentation({"flip": {"prob": 1.0}, "affine": {"prob": 0.0}, "bias_field": {"prob": 0.0}, "scale_shift": {"prob": 0.0}, "noise": {"prob": 0.0}}, seed=0))
    assert torch.equal(plain[0]["images"], plain[0]["images"])
    assert torch.equal(aug[0]["images"], plain[0]["images"].flip(1))


def test_rejects_other_organs_and_unknown_labels(tmp_path):
    organ = toy_organ()
    with pytest.raises(StudyListError, match="is a brain study; this dataset is for toy"):
        StudyDataset([make_study(tmp_path, "b", organ="brain")], organ)
    with pytest.raises(StudyListError, match="unknown label 'x'"):
        StudyDataset([make_study(tmp_path, "x", label="x")], organ)
    a = {"organ": "toy", "images": torch.zeros(1), "present": [True], "label": 0, "affine": torch.eye(4), "study_id": "a", "findings": [""], "impression": ""}
    with pytest.raises(StudyListError, match="single organ"):
        collate_studies([a, {**a, "organ": "brain"}])


def test_an_roi_crop_organ_needs_every_roi_mask_up_front(tmp_path):
    studies = [make_study(tmp_path, f"s{i}", seed=i) for i in range(3)]
    with pytest.raises(StudyListError, match=r"3 toy studies have no 'roi_mask' \(e.g. s0, s1, s2\)"):
        StudyDataset(studies, toy_organ(crop="roi_mask"))
    assert len(StudyDataset(studies, toy_organ())) == 3

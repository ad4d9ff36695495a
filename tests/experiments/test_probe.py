"""The supervised encoder probe: an obvious target is learnt, targets are read from meta, bad input is refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from medmap.data.studylist import Study, read_study_list, write_study_list
from medmap.errors import StudyListError
from medmap.experiments.probe import encoder_probe, probe_table, probe_target
from tests.helpers.tiny_studies import make_tiny_brain_data

ARCH = {"type": "cnn", "channels": [4, 8], "subunits": 1, "dim": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_brain_data(tmp_path_factory.mktemp("probe"), n=16, n_val=4)


def test_an_obvious_target_is_learnt_and_scored_against_chance(data: Path) -> None:
    # tumour studies carry a blob 40x brighter than the noise: the label is trivially visible
    r = encoder_probe(data, data.parent / "brain_tiny.yaml", "t2", "label", ARCH, epochs=15, batch_size=4, lr=3e-3)
    assert r["classes"] == ["normal", "tumour"]
    assert r["train"]["n"] == 12 and r["val"]["n"] == 4
    assert r["train"]["accuracy"] >= 0.9
    assert r["val"]["chance_balanced_accuracy"] == 0.5
    assert "| t2 | label | 2 |" in probe_table([r])


def test_targets_come_from_meta_and_missing_fields_are_skipped() -> None:
    s = Study("s", "p", "liver", {}, {}, "", "cyst", "train", {"location": {"segment": "VI"}, "n_lesions": 3})
    assert probe_target(s, "location.segment") == "VI"
    assert probe_target(s, "n_lesions") == "3"
    assert probe_target(s, "label") == "cyst"
    assert probe_target(s, "location.hemisphere") is None
    assert probe_target(dataclasses.replace(s, meta={}), "location.segment") is None


def test_a_target_without_two_values_is_refused(data: Path, tmp_path: Path) -> None:
    with pytest.raises(StudyListError, match="location.segment"):
        encoder_probe(data, data.parent / "brain_tiny.yaml", "t2", "location.segment", ARCH, epochs=1)
    one_class = [dataclasses.replace(s, label="tumour") for s in read_study_list(data)]
    lst = write_study_list(one_class, tmp_path / "one.jsonl")
    with pytest.raises(StudyListError, match="1 value"):
        encoder_probe(lst, data.parent / "brain_tiny.yaml", "t2", "label", ARCH, epochs=1)

"""Prompt sets: the shipped and the alternative descriptors load, match their organs, are not
the generator's phrases, and bad files fail with one line naming the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from medmap.config import load_organ_config
from medmap.errors import ConfigError
from medmap.text.cache import TextEmbeddingCache
from medmap.text.descriptors import load_prompt_set
from medmap.text.prompts import build_text_bank
from tests.text.test_text import CountingEncoder

FIXTURES = Path(__file__).parents[1] / "fixtures" / "prompts"
GENERATOR = Path(__file__).parents[2] / "medmap" / "data" / "synth" / "reports.py"


@pytest.mark.parametrize("organ, alt", [("liver", "liver_alt.yaml"), ("brain", "brain_alt.yaml")])
def test_shipped_and_alternative_sets_fit_their_organs(organ: str, alt: str) -> None:
    cfg = load_organ_config(organ)
    for ps in (load_prompt_set(organ), load_prompt_set(FIXTURES / alt)):
        ps.check_organ(cfg)
        assert ps.sequences_described(cfg.modalities) == cfg.modalities  # every class describes every sequence
        for name, d in ps.classes.items():
            assert d.study and d.sources, name
            assert all(s in ps.sources for s in d.sources)


def test_the_two_liver_sets_are_worded_independently() -> None:
    shipped, alt = load_prompt_set("liver"), load_prompt_set(FIXTURES / "liver_alt.yaml")
    a = {t.lower() for d in shipped.classes.values() for ts in [d.study, *d.sequences.values()] for t in ts}
    b = {t.lower() for d in alt.classes.values() for ts in [d.study, *d.sequences.values()] for t in ts}
    assert not a & b


@pytest.mark.parametrize("name", ["liver", "brain"])
def test_shipped_descriptors_are_not_the_generators_phrases(name: str) -> None:
    """The appearance descriptors are written from the literature: none is, or holds, a phrase of
    the report templates (the impression-style prompts name the diagnoses, as the generator's
    impressions must, and are not checked)."""
    source = GENERATOR.read_text().lower()
    quoted = {q.rstrip(".") for q in re.findall(r'"([^"{}]{21,})"', source)}
    ps = load_prompt_set(name)
    for d in ps.classes.values():
        for text in (t for ts in d.sequences.values() for t in ts):
            t = text.lower().rstrip(".")
            assert t not in source, text
            assert not any(t in q or q in t for q in quoted), text


def test_text_bank_from_a_prompt_set(tmp_path: Path) -> None:
    cache = TextEmbeddingCache(tmp_path, CountingEncoder())
    liver = load_organ_config("liver")
    bank = build_text_bank(liver, cache, FIXTURES / "liver_alt.yaml")
    alt = load_prompt_set(FIXTURES / "liver_alt.yaml")
    assert bank.class_prompts[0] == alt.classes["hcc"].study
    i = liver.modalities.index("arterial")
    text = alt.classes["fnh"].sequences["arterial"][0]
    torch.testing.assert_close(bank.descriptor_emb[liver.classes.index("fnh"), i, 0], cache.embed([text])[0])
    assert bank.negative_emb is not None and bank.negative_mask.sum(1).min() == 1
    # a brain set without negatives: no negative bank
    brain = build_text_bank(load_organ_config("brain"), cache)
    assert brain.negative_emb is None and brain.descriptor_mask.shape[:2] == (2, 4)


def _write(tmp_path: Path, spec: dict) -> Path:
    p = tmp_path / "prompts.yaml"
    p.write_text(yaml.safe_dump(spec))
    return p


def _good() -> dict:
    return {"sources": {"a": "A textbook"},
            "classes": {"normal": {"sources": ["a"], "study": ["normal"], "sequences": {"t1": ["fine"]}},
                        "tumour": {"sources": ["a"], "study": ["tumour"], "sequences": {"t1": ["dark lump"]}}}}


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(colours=1), "unknown keys ['colours']"),
    (lambda s: s["classes"]["normal"].update(study=[]), "'study' must be a non-empty list"),
    (lambda s: s["classes"]["normal"].update(sources=["b"]), "sources ['b'] are not among"),
    (lambda s: s["classes"]["normal"]["sequences"].update(t1=[3]), "sequence 't1' must be"),
    (lambda s: s["classes"]["normal"].update(impression=["x"]), "unknown keys ['impression']"),
    (lambda s: s.update(classes=[]), "'classes' must map"),
])
def test_bad_prompt_files_fail_with_one_line(tmp_path: Path, change, message: str) -> None:
    spec = _good()
    change(spec)
    path = _write(tmp_path, spec)
    with pytest.raises(ConfigError) as e:
        load_prompt_set(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)


def test_a_set_for_another_organ_is_refused(tmp_path: Path) -> None:
    brain = load_organ_config("brain")
    spec = _good()
    spec["classes"]["cyst"] = spec["classes"].pop("tumour")
    with pytest.raises(ConfigError, match=r"missing \['tumour'\]"):
        load_prompt_set(_write(tmp_path, spec)).check_organ(brain)
    spec = _good()
    spec["classes"]["tumour"]["sequences"]["dwi"] = ["bright"]
    with pytest.raises(ConfigError, match=r"unknown sequences \['dwi'\]"):
        load_prompt_set(_write(tmp_path, spec)).check_organ(brain)
    with pytest.raises(ConfigError, match="unknown prompt config 'nope'"):
        load_prompt_set("nope")

import logging
import os

import pytest
import torch

import medmap.data.cache as cache_mod
from medmap.data.cache import PreprocessCache, clear_hash_memo
from medmap.data.preprocess import preprocess_study
from tests.helpers.volumes import head_volume, make_study, toy_organ, write_nifti


@pytest.fixture(autouse=True)
def _fresh_memo():
    clear_hash_memo()
    yield
    clear_hash_memo()


def _count_compute(monkeypatch):
    import medmap.data.preprocess as pp

    calls = []
    real = pp._compute

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(pp, "_compute", counting)
    return calls


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in ("images", "present", "affine"))


def test_cache_returns_the_uncached_tensors_without_recomputing(tmp_path, monkeypatch):
    organ = toy_organ()
    study = make_study(tmp_path, "s1", modalities=("t1", "flair"))
    plain = preprocess_study(study, organ)
    calls = _count_compute(monkeypatch)
    cache = PreprocessCache(tmp_path / "cache")
    first = preprocess_study(study, organ, cache=cache)
    second = preprocess_study(study, organ, cache=cache)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    assert _equal(first, plain) and _equal(second, plain)
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 1
    # a fresh cache object on the same folder (a new process, a new epoch) hits too
    again = PreprocessCache(tmp_path / "cache")
    assert _equal(preprocess_study(study, organ, cache=again), plain) and again.hits == 1


def test_changed_file_or_config_invalidates(tmp_path, monkeypatch):
    organ = toy_organ()
    study = make_study(tmp_path, "s1", modalities=("t1",))
    cache = PreprocessCache(tmp_path / "cache")
    before = preprocess_study(study, organ, cache=cache)

    write_nifti(study.modalities["t1"], head_volume(seed=42, scale=50.0))
    after = preprocess_study(study, organ, cache=cache)
    assert cache.misses == 2
    assert not torch.equal(before["images"], after["images"])
    assert _equal(after, preprocess_study(study, organ))

    other = preprocess_study(study, toy_organ(roi_size=(20, 20, 12)), cache=cache)
    assert cache.misses == 3 and other["images"].shape == (3, 20, 20, 12)
    preprocess_study(study, toy_organ(spacing=(3.0, 3.0, 3.0)), cache=cache)
    assert cache.misses == 4


def test_preprocessing_version_is_part_of_the_key(tmp_path, monkeypatch):
    import medmap.data.preprocess as pp

    organ = toy_organ()
    study = make_study(tmp_path, "s1", modalities=("t1",))
    cache = PreprocessCache(tmp_path / "cache")
    preprocess_study(study, organ, cache=cache)
    monkeypatch.setattr(pp, "PREPROCESSING_VERSION", "test-bump")
    preprocess_study(study, organ, cache=cache)
    assert cache.misses == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_entry_is_recomputed(tmp_path, caplog, damage):
    organ = toy_organ()
    study = make_study(tmp_path, "s1", modalities=("t1",))
    cache = PreprocessCache(tmp_path / "cache")
    plain = preprocess_study(study, organ, cache=cache)
    (entry,) = list((tmp_path / "cache").rglob("*.safetensors"))
    raw = bytearray(entry.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) - 100]
    elif damage == "flip":
        raw[-50] ^= 0xFF  # inside the image data: only the checksum can tell
    else:
        raw = bytearray(b"not a safetensors file")
    entry.write_bytes(bytes(raw))
    with caplog.at_level(logging.WARNING, logger="medmap.data.cache"):
        again = preprocess_study(study, organ, cache=cache)
    assert "corrupt" in caplog.text
    assert cache.misses == 2 and _equal(again, plain)
    assert cache.load(cache.key(study.modalities, cache_key_config(organ))) is not None


def cache_key_config(organ):
    from medmap.data.preprocess import preprocessing_signature

    return preprocessing_signature(organ)


def test_file_hash_is_memoised_per_size_and_mtime(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "t1.nii.gz", head_volume())
    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    h1 = cache_mod.file_content_hash(path)
    h2 = cache_mod.file_content_hash(path)
    assert h1 == h2 and len(calls) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache_mod.file_content_hash(path) == h1 and len(calls) == 2


def test_file_hash_memo_on_disk_survives_a_new_process(tmp_path, monkeypatch):
    path = write_nifti(tmp_path / "t1.nii.gz", head_volume())
    memo = tmp_path / "memo"
    calls = []
    real = cache_mod.sha256_file
    monkeypatch.setattr(cache_mod, "sha256_file", lambda p: calls.append(p) or real(p))
    h1 = cache_mod.file_content_hash(path, memo)
    clear_hash_memo()  # as in a fresh data-loader worker
    assert cache_mod.file_content_hash(path, memo) == h1 and len(calls) == 1
    clear_hash_memo()
    write_nifti(path, head_volume(seed=5))  # new content: size/mtime change -> rehash
    assert cache_mod.file_content_hash(path, memo) != h1 and len(calls) == 2


def test_resolved_path_follows_the_working_directory(tmp_path, monkeypatch):
    """The per-process memo of resolved paths keys on the absolute path, so the same relative
    name in another working directory is another file."""
    from medmap.utils import resolved_path

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = resolved_path("vol.nii.gz")
    monkeypatch.chdir(tmp_path / "b")
    assert first == (tmp_path / "a" / "vol.nii.gz").resolve()
    assert resolved_path("vol.nii.gz") == (tmp_path / "b" / "vol.nii.gz").resolve()

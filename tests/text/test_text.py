"""Frozen text encoder, on-disk embedding cache, text bank and text table."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from medmap.config import load_organ_config
from medmap.errors import ConfigError
from medmap.text.cache import TextEmbeddingCache
from medmap.text.encoder import FrozenTextEncoder, default_model_path, lock_module
from medmap.text.prompts import TextTable, build_text_bank

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def encoder() -> FrozenTextEncoder:
    return FrozenTextEncoder()


def test_default_encoder_embeds_and_is_frozen(encoder: FrozenTextEncoder) -> None:
    assert encoder.dim == 384
    assert encoder.model_id.startswith("all-MiniLM-L6-v2-")
    emb = encoder.encode(["no focal lesion", "a T2 hyperintense mass", "no focal lesion"])
    assert emb.shape == (3, 384) and emb.dtype == torch.float32
    assert not emb.requires_grad
    torch.testing.assert_close(emb[0], emb[2])
    assert torch.cosine_similarity(emb[0], emb[1], dim=0) < 0.99
    assert all(not p.requires_grad for p in encoder.model.parameters())
    encoder.model.train()  # locked: stays in eval mode
    assert not encoder.model.training


def test_model_id_follows_weight_content_not_size(tmp_path: Path) -> None:
    import shutil

    src = default_model_path()
    a, b = tmp_path / "a" / "m", tmp_path / "b" / "m"
    for d in (a, b):
        shutil.copytree(src, d, symlinks=False, ignore=shutil.ignore_patterns("*.bin", "*.onnx", "openvino", "onnx"))
    assert FrozenTextEncoder(a).model_id == FrozenTextEncoder(b).model_id  # same content, other folder
    weights = next(b.rglob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other weights (the last byte is tensor data)
    weights.write_bytes(bytes(data))
    assert FrozenTextEncoder(b).model_id != FrozenTextEncoder(a).model_id


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        FrozenTextEncoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="config.json"):
        FrozenTextEncoder(tmp_path / "empty")


def test_plain_huggingface_folder_uses_mean_pooling(tmp_path: Path, encoder: FrozenTextEncoder) -> None:
    src = default_model_path()
    hf = tmp_path / "plain-minilm"
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (hf / name).symlink_to(src / name)
    plain = FrozenTextEncoder(hf)
    assert plain.kind == "huggingface" and plain.dim == 384
    assert plain.model_id != encoder.model_id
    texts = ["ring-enhancing lesion", "normal study"]
    # sentence-transformers = mean pooling + L2 normalisation: same direction
    cos = torch.cosine_similarity(plain.encode(texts), encoder.encode(texts), dim=1)
    assert torch.all(cos > 0.999)


class CountingEncoder:
    """A stand-in encoder (deterministic per text) that counts what it embeds."""

    model_id = "counting-v1"
    dim = 8

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts):
        self.calls.append(list(texts))
        out = torch.stack([torch.tensor([float((hash(t) >> i) & 255) for i in range(8)]) for t in texts])
        return out


def test_cache_hits_misses_and_persistence(tmp_path: Path) -> None:
    enc = CountingEncoder()
    cache = TextEmbeddingCache(tmp_path, enc)
    a = cache.embed(["x", "y", "x"])
    assert a.shape == (3, 8) and enc.calls == [["x", "y"]]
    assert (cache.misses, cache.hits) == (2, 0)
    b = cache.embed(["y", "z"])
    assert enc.calls[-1] == ["z"] and cache.hits == 1
    torch.testing.assert_close(a[1], b[0])
    shards = list((tmp_path / "counting-v1").glob("shard-*.safetensors"))
    assert len(shards) == 2
    assert not list((tmp_path / "counting-v1").glob("*.tmp"))

    # a new cache on the same folder never calls its encoder for known texts
    def factory():
        raise AssertionError("encoder must not be built on a cache hit")

    cache2 = TextEmbeddingCache(tmp_path, factory, model_id="counting-v1")
    torch.testing.assert_close(cache2.embed(["z", "x", "y"]), torch.stack([b[1], a[0], a[1]]))
    assert cache2.hits == 3 and cache2.misses == 0
    # another model id is another namespace
    assert len(TextEmbeddingCache(tmp_path, enc, model_id="other")) == 0


class InterruptedEncoder(CountingEncoder):
    """Like :class:`CountingEncoder`, but killed (raises) on its ``fail_on``-th call."""

    def __init__(self, fail_on: int) -> None:
        super().__init__()
        self.fail_on = fail_on

    def encode(self, texts):
        if len(self.calls) + 1 == self.fail_on:
            raise KeyboardInterrupt("killed while embedding")
        return super().encode(texts)


def test_interrupted_embedding_keeps_finished_shards(tmp_path: Path) -> None:
    texts = [f"finding {i}" for i in range(10)]
    killed = InterruptedEncoder(fail_on=3)
    with pytest.raises(KeyboardInterrupt):
        TextEmbeddingCache(tmp_path, killed, shard_size=4).embed(texts)
    assert killed.calls == [texts[:4], texts[4:8]]  # two shards done, the third was killed
    assert len(list((tmp_path / "counting-v1").glob("shard-*.safetensors"))) == 2
    assert not list((tmp_path / "counting-v1").glob("*.tmp"))

    rerun = CountingEncoder()
    cache = TextEmbeddingCache(tmp_path, rerun, shard_size=4, progress=True)
    assert len(cache) == 8
    out = cache.embed(texts)
    assert rerun.calls == [texts[8:]]  # only what the interruption lost
    torch.testing.assert_close(out, CountingEncoder().encode(texts))
    with pytest.raises(ValueError, match="shard_size"):
        TextEmbeddingCache(tmp_path, rerun, shard_size=0)


def test_text_bank_and_table(tmp_path: Path) -> None:
    cache = TextEmbeddingCache(tmp_path, CountingEncoder())
    liver = load_organ_config("liver")
    bank = build_text_bank(liver, cache)
    assert bank.class_emb.shape[:2] == (7, 3) and bank.class_emb.shape[2] == 8
    assert bank.class_mask[0].all() and bank.class_mask.sum(1).min() >= 2  # liver.yaml's prompt set: 2-3 per class
    assert bank.class_prompts[0][0] == "hepatocellular carcinoma"
    assert bank.modality_emb.shape == (8, 8)
    assert bank.descriptor_emb.shape[:2] == (7, 8) and bank.descriptor_mask.any(-1).all()
    assert bank.negative_emb.shape[0] == 7 and bank.negative_mask.any(-1).all()
    assert bank.mean_class_emb().shape == (7, 8)
    torch.testing.assert_close(bank.modality_emb[0], cache.embed([liver.descriptor_for("t2wi")])[0])

    table = TextTable(["b", "a", "b", ""], cache)
    assert table.texts == ["a", "b"]
    emb, ids = table.lookup(["b", "a", "b"])
    assert ids.tolist() == [1, 0, 1]
    torch.testing.assert_close(emb[0], emb[2])
    with pytest.raises(KeyError, match="not embedded"):
        table.ids(["c"])


def test_lock_module_freezes_in_one_place() -> None:
    m = lock_module(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)))
    assert not any(p.requires_grad for p in m.parameters())
    m.train()
    assert not m.training

"""On-disk cache of frozen text embeddings, keyed by text-model id and text hash.

Layout::

    <cache_dir>/<model_id>/shard-<hash of the shard's keys>.safetensors

Each shard holds the embeddings of up to ``shard_size`` texts that were missing from the
cache, one float32 ``[dim]`` tensor per key, the key being the SHA-256 of the text. A long
list of new texts is embedded and written shard by shard, so an interrupted embedding keeps
what it finished and a rerun embeds only the rest. The shards
themselves are the index: on opening, the cache lists the keys of every shard (reading
headers only). Shards are written atomically (temporary file + rename), so a killed
process or two processes writing at once never leave a half-written shard, at worst two
shards holding the same text.

Example:
    >>> cache = TextEmbeddingCache("runs/text_cache", FrozenTextEncoder())   # doctest: +SKIP
    >>> cache.embed(["no focal lesion", "no focal lesion"]).shape           # doctest: +SKIP
    torch.Size([2, 384])
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors

from medmap.run_config import TextSection
from medmap.text.encoder import FrozenTextEncoder
from medmap.utils import atomic_write_bytes, sha256_text


def text_key(text: str) -> str:
    """Cache key of one text: SHA-256 of its UTF-8 bytes (texts are used verbatim)."""
    return sha256_text(text)


class TextEmbeddingCache:
    """Embeddings of texts by a frozen encoder, computed once and kept on disk.

    Args:
        cache_dir: root folder of the cache (shared by all runs is fine).
        encoder: the frozen text encoder, or a zero-argument factory returning one. It
            is only asked to embed texts that are not cached yet.
        model_id: cache namespace; defaults to ``encoder.model_id`` (give it explicitly
            together with a factory to avoid building the encoder at all).
        shard_size: new texts per shard, the unit of work an interruption can lose.
        progress: show a progress bar while new texts are embedded.

    Attributes:
        hits / misses: texts served from disk / sent to the encoder since creation.
    """

    def __init__(
        self,
        cache_dir: str | Path,
        encoder: FrozenTextEncoder | Callable[[], FrozenTextEncoder],
        model_id: str | None = None,
        shard_size: int = 1024,
        progress: bool = False,
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.shard_size = int(shard_size)
        self.progress = bool(progress)
        is_encoder = hasattr(encoder, "encode")
        self._encoder: FrozenTextEncoder | None = encoder if is_encoder else None  # type: ignore[assignment]
        self._factory = None if is_encoder else encoder
        if model_id is None:
            model_id = self.encoder.model_id
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model_id):
            model_id = re.sub(r"[^A-Za-z0-9._-]", "_", model_id)
        self.model_id = model_id
        self.root = Path(cache_dir) / model_id
        self.hits = 0
        self.misses = 0
        self._index: dict[str, Path] = {}
        self._memory: dict[str, torch.Tensor] = {}
        self.refresh()

    @property
    def encoder(self) -> FrozenTextEncoder:
        if self._encoder is None:
            assert self._factory is not None
            self._encoder = self._factory()
        return self._encoder

    def refresh(self) -> None:
        """Re-read the list of shards (e.g. after another process added some)."""
        self._index.clear()
        if not self.root.is_dir():
            return
        for shard in sorted(self.root.glob("shard-*.safetensors")):
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for key in f.keys():
                        self._index.setdefault(key, shard)
            except Exception:  # a foreign or damaged file: ignore it, the texts get re-embedded
                continue

    def __contains__(self, text: str) -> bool:
        return text_key(text) in self._index or text_key(text) in self._memory

    def __len__(self) -> int:
        return len(set(self._index) | set(self._memory))

    def _read(self, keys: Sequence[str]) -> None:
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self._memory:
                by_shard.setdefault(self._index[k], []).append(k)
        for shard, ks in by_shard.items():
            with safe_open(str(shard), framework="pt") as f:
                for k in ks:
                    self._memory[k] = f.get_tensor(k)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Embeddings of ``texts`` (float32 ``[len(texts), dim]``), embedding only the new ones."""
        keys = [text_key(t) for t in texts]
        new: dict[str, str] = {}
        for t, k in zip(texts, keys):
            if k not in self._memory and k not in self._index and k not in new:
                new[k] = t
        self.misses += len(new)
        self.hits += len(set(keys)) - len(new)
        if new:
            self._embed_new(list(new.items()))
        self._read([k for k in dict.fromkeys(keys) if k not in self._memory])
        if not keys:
            return torch.zeros(0, self.encoder.dim)
        return torch.stack([self._memory[k] for k in keys]).float()

    def _embed_new(self, items: list[tuple[str, str]]) -> None:
        """Embed ``(key, text)`` pairs not on disk yet, writing one shard per ``shard_size``."""
        from tqdm.auto import tqdm

        with tqdm(total=len(items), desc="embed texts", unit="text", disable=not self.progress) as bar:
            for start in range(0, len(items), self.shard_size):
                chunk = items[start : start + self.shard_size]
                emb = self.encoder.encode([t for _, t in chunk])
                tensors = {k: emb[i].contiguous().clone() for i, (k, _) in enumerate(chunk)}
                shard = self.root / f"shard-{sha256_text(''.join(sorted(tensors)))[:16]}.safetensors"
                atomic_write_bytes(shard, save_safetensors(tensors, metadata={"model_id": self.model_id}))
                for k, v in tensors.items():
                    self._index[k] = shard
                    self._memory[k] = v
                bar.update(len(chunk))


def run_text_cache(text: TextSection, default_dir: Path, progress: bool = False) -> TextEmbeddingCache:
    """The text cache of a run's ``text`` section; the encoder itself is only built if a text is missing.

    ``progress`` shows a bar while texts missing from the cache are embedded.
    """
    probe = FrozenTextEncoder(text.model)  # cheap: reads configs only, loads no weights
    return TextEmbeddingCache(Path(text.cache_dir or default_dir), probe, model_id=probe.model_id, progress=progress)

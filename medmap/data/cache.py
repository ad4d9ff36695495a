"""On-disk preprocessing cache, so later epochs do not re-read and re-resample NIfTI files.

An entry is keyed by the SHA-256 of every input file's *content* and by the preprocessing
signature (organ modalities, spacing, ROI size, normalisation parameters and
``PREPROCESSING_VERSION``), so editing a file or a config makes a new key; stale entries are
simply never read again. File hashes are memoised per ``(path, size, mtime_ns)`` in memory
and in ``<root>/file-hashes/``, so a warm epoch, even in a fresh data-loader worker, costs
one ``stat`` per file plus one read of a small safetensors file. A DICOM series folder
(:mod:`medmap.data.dicom`) is keyed by the names and contents of its files, memoised per
folder by the names, sizes and mtimes of its files (:func:`series_content_hash`).

Entries are safetensors files (no pickle) holding ``images`` as float16 (lossless: the
preprocessing output is rounded to float16 precision), ``present`` and ``affine``, with a
SHA-256 of the tensor bytes in the metadata. A truncated or altered entry fails that check
and is recomputed. Writes are atomic (temporary file + rename), so concurrent data-loader
workers never see half-written entries.

Example:
    >>> from medmap.data.cache import PreprocessCache
    >>> from medmap.data.preprocess import preprocess_study
    >>> cache = PreprocessCache("~/.cache/medmap/preprocess")          # doctest: +SKIP
    >>> sample = preprocess_study(study, "brain", cache=cache)          # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from medmap.data.dicom import folder_files, series_stat_key
from medmap.utils import atomic_write_bytes, resolved_path, sha256_file, stable_hash

log = logging.getLogger(__name__)

_HASH_MEMO: dict[tuple[str, ...] | tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def file_content_hash(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a file's content, memoised per ``(absolute path, size, mtime_ns)``.

    The memo lives in memory and, when ``memo_dir`` is given, also in small files there, so
    that new processes (e.g. data-loader workers re-created each epoch) do not rehash.
    """
    p = resolved_path(path)
    st = p.stat()
    return _memoised((str(p), st.st_size, st.st_mtime_ns), memo_dir, lambda: sha256_file(p))


def series_content_hash(path: str | Path, memo_dir: Path | None = None) -> str:
    """SHA-256 of a DICOM series folder: the names and contents of its files (hidden files aside).

    Memoised like :func:`file_content_hash`, per ``(absolute path, names, sizes and mtimes of
    the files)``, so a warm call costs one ``stat`` per file.
    """
    folder = resolved_path(path)
    return _memoised((str(folder), "dicom", series_stat_key(folder)), memo_dir,
                     lambda: stable_hash({"dicom_series": {f.name: sha256_file(f) for f in folder_files(folder)}}))


def volume_content_hash(path: str | Path, memo_dir: Path | None = None) -> str:
    """:func:`file_content_hash` of a file, :func:`series_content_hash` of a DICOM series folder."""
    if Path(path).is_dir():
        return series_content_hash(path, memo_dir)
    return file_content_hash(path, memo_dir)


def _memoised(memo_key: tuple[str, ...] | tuple[str, int, int], memo_dir: Path | None,
              compute: Callable[[], str]) -> str:
    """The digest memoised under ``memo_key`` (in memory and in ``memo_dir``), else ``compute()``."""
    with _HASH_LOCK:
        cached = _HASH_MEMO.get(memo_key)
    if cached is not None:
        return cached
    memo_file = None
    if memo_dir is not None:
        name = hashlib.sha256(repr(memo_key).encode()).hexdigest()
        memo_file = memo_dir / name[:2] / name
        try:
            text = memo_file.read_text().strip()
            if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
                cached = text
        except OSError:
            pass
    digest = cached or compute()
    if memo_file is not None and cached is None:
        atomic_write_bytes(memo_file, digest.encode())
    with _HASH_LOCK:
        _HASH_MEMO[memo_key] = digest
    return digest


def clear_hash_memo() -> None:
    """Forget memoised file hashes (used by benchmarks to measure a cold start)."""
    with _HASH_LOCK:
        _HASH_MEMO.clear()


def _tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    # Format: 8-byte little-endian header length, then a JSON header with "__metadata__".
    n = int.from_bytes(raw[:8], "little")
    return dict(json.loads(raw[8 : 8 + n]).get("__metadata__") or {})


def default_cache_root(study_list: str | Path) -> Path:
    """Where a study list's caches live unless a config says otherwise: ``.medmap_cache`` next
    to the list (``preprocess/`` and ``text/`` inside)."""
    return Path(study_list).resolve().parent / ".medmap_cache"


class PreprocessCache:
    """A folder of preprocessed studies keyed by file content and preprocessing config.

    Args:
        root: cache folder (created when needed; ``~`` is expanded).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(os.path.expanduser(str(root)))
        self.hits = 0
        self.misses = 0

    def key(self, files: Mapping[str, Path], config: Mapping[str, Any]) -> str:
        """The cache key of one study: hash of (modality -> file content hash, config)."""
        contents = {m: volume_content_hash(p, self.root / "file-hashes") for m, p in sorted(files.items())}
        return stable_hash({"files": contents, "config": dict(config)})

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def load(self, key: str) -> dict[str, torch.Tensor] | None:
        """The entry for ``key``, or ``None`` when absent or corrupt (a corrupt one is deleted)."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            raw = path.read_bytes()
            tensors = st_load(raw)
            meta = _safetensors_metadata(raw)
            if meta.get("key") != key or meta.get("digest") != _tensor_digest(tensors):
                raise ValueError("checksum mismatch")
            if set(tensors) != {"images", "present", "affine"}:
                raise ValueError(f"unexpected tensors {sorted(tensors)}")
        except (SafetensorError, ValueError, OSError, RuntimeError) as e:
            log.warning("preprocessing cache entry %s is corrupt (%s); recomputing", path, e)
            path.unlink(missing_ok=True)
            return None
        return {
            "images": tensors["images"].to(torch.float32),
            "present": tensors["present"].to(torch.bool),
            "affine": tensors["affine"].to(torch.float64),
        }

    def save(self, key: str, sample: Mapping[str, torch.Tensor]) -> Path:
        """Store one preprocessed study atomically."""
        tensors = {
            "images": sample["images"].to(torch.float16).contiguous(),
            "present": sample["present"].to(torch.bool).contiguous(),
            "affine": sample["affine"].to(torch.float64).contiguous(),
        }
        meta = {"key": key, "digest": _tensor_digest(tensors)}
        return atomic_write_bytes(self.path_for(key), st_save(tensors, metadata=meta))

    def get_or_compute(
        self,
        files: Mapping[str, Path],
        config: Mapping[str, Any],
        compute: Callable[[], dict[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:
        """Return the cached entry for these files and config, computing and storing it if needed."""
        key = self.key(files, config)
        hit = self.load(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        sample = compute()
        self.save(key, sample)
        return sample

"""Small shared helpers: atomic file writes, hashing, seeding, devices."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that a reader sees either the old file or the new one.

    The bytes go to a temporary file in the same folder, are flushed and fsynced, and then
    renamed over the target (``os.replace`` is atomic on POSIX and Windows).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


_RESOLVED: dict[str, Path] = {}


def resolved_path(path: str | Path) -> Path:
    """``Path(path).resolve()``, remembered for the life of the process.

    Resolving walks every component of the path with ``lstat``; a training run keys each of
    its files by the resolved path at every epoch (the preprocessing cache, the pre-flight
    memo), 20,000 files for a 3,000-study liver list, which took seconds per pass. Remembered
    by absolute path (no file-system access), so a relative path stays right after a change of
    working directory; a symlink re-pointed while a process runs is seen by the next process.

    >>> resolved_path("a/../b") == Path("b").resolve()
    True
    """
    key = os.path.abspath(path)
    hit = _RESOLVED.get(key)
    if hit is None:
        hit = _RESOLVED[key] = Path(key).resolve()
    return hit


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_hash(obj: Any) -> str:
    """SHA-256 of a JSON-serialisable object with sorted keys (for cache keys)."""
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


def derive_seed(*parts: int) -> int:
    """One 63-bit seed from several non-negative integers (run seed, epoch, rank, ...).

    Distinct tuples give independent, practically never colliding seeds, however many ranks
    or epochs (unlike ``seed * 1000 + epoch * 10 + rank``).

    Example:
        >>> derive_seed(0, 1, 0) != derive_seed(0, 0, 10)
        True
    """
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)

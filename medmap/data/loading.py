"""Reading the voxels of a study's volumes fast: one-shot gzip decompression, modalities in parallel.

What :func:`medmap.data.validate.check_volume` and :mod:`medmap.data.preprocess` use to get
voxels off the disk. The voxels are exactly those of nibabel's ``get_fdata(dtype=float32)``
(the same ``ArrayProxy`` does the scaling); only the way the bytes arrive changes:

* a ``.nii.gz`` file is read whole and decompressed in one call, with ISA-L (the ``isal``
  package, about 2x zlib's speed) when it is installed, otherwise with the standard library
  (zlib); nibabel's own reader streams it through :mod:`gzip` in 8 KiB pieces;
* the modalities of a study are read in threads (:func:`map_ordered`): decompression and
  numpy's conversions release the GIL, so a 2-core machine reads 4 sequences in about half
  the time. ``MEDMAP_READ_THREADS`` sets the number of threads (``1``: one after the other).

Anything the fast path cannot read (a corrupt or truncated file, an unusual image class)
is read again by nibabel's own reader, so a bad file fails with the same error as before.

Example:
    >>> from medmap.data.loading import GZIP_BACKEND, map_ordered
    >>> GZIP_BACKEND in ("isal", "zlib")
    True
    >>> map_ordered(lambda x: x * 2, [1, 2, 3])
    [2, 4, 6]
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np

try:  # ISA-L's gzip decoder: same output as zlib, about twice as fast
    from isal import igzip as _gzip
    GZIP_BACKEND = "isal"
except ImportError:  # pragma: no cover - depends on the environment
    import gzip as _gzip
    GZIP_BACKEND = "zlib"

T = TypeVar("T")
R = TypeVar("R")

#: Environment variable: threads used to read the volumes of one study (default: CPU count, at most 8).
READ_THREADS_ENV = "MEDMAP_READ_THREADS"


def gunzip(data: bytes) -> bytes:
    """Decompress a whole gzip stream (all members; CRC and length checked)."""
    return _gzip.decompress(data)


def read_threads(n_items: int) -> int:
    """Threads for reading ``n_items`` volumes: ``MEDMAP_READ_THREADS``, else the CPUs this process may use."""
    env = os.environ.get(READ_THREADS_ENV, "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 1
    else:
        try:
            n = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):  # pragma: no cover - not Linux
            n = os.cpu_count() or 1
        n = min(n, 8)
    return max(1, min(n, n_items))


def map_ordered(fn: Callable[[T], R], items: Sequence[T], threads: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, in threads; raises the exception of the *first* failing item.

    Every item is run to the end before raising, so the error does not depend on which thread
    finished first: the same error as the serial loop.
    """
    items = list(items)
    n = read_threads(len(items)) if threads is None else max(1, min(int(threads), len(items)))
    if n <= 1:
        return [fn(x) for x in items]

    def call(x: T) -> tuple[bool, Any]:
        try:
            return True, fn(x)
        except BaseException as e:  # noqa: BLE001 - re-raised below, in item order
            return False, e

    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="medmap-read") as pool:
        results = list(pool.map(call, items))
    for ok, value in results:
        if not ok:
            raise value
    return [value for _, value in results]


def read_fdata(path: str | Path, img: Any) -> np.ndarray:
    """The voxels of a lazily loaded NIfTI image as float32, exactly ``img.get_fdata(dtype=np.float32)``.

    The file is read in one piece and decompressed in one call (:func:`gunzip`), and the
    image's own ``ArrayProxy`` (data type, offset, order, scaling) is applied to the bytes.
    Falls back to ``img.get_fdata`` whenever the fast path does not apply or fails, so a bad
    file raises nibabel's own error.
    """
    path = Path(path)
    proxy = getattr(img, "dataobj", None)
    spec = None
    try:
        from nibabel.arrayproxy import ArrayProxy  # noqa: PLC0415

        if type(proxy) is ArrayProxy and path.is_file():
            spec = (proxy.shape, proxy.dtype, proxy.offset, proxy.slope, proxy.inter)
            order = proxy.order
    except AttributeError:  # an older nibabel without these properties
        spec = None
    if spec is not None:
        try:
            raw = path.read_bytes()
            if path.name.endswith(".gz"):
                raw = gunzip(raw)
            fast = ArrayProxy(io.BytesIO(raw), spec, order=order)
            return np.asarray(np.asanyarray(fast, dtype=np.float32))
        except Exception:  # noqa: BLE001 - nibabel's reader says what is wrong, below
            pass
    return np.asarray(img.get_fdata(dtype=np.float32))


__all__ = ["GZIP_BACKEND", "READ_THREADS_ENV", "gunzip", "map_ordered", "read_fdata", "read_threads"]

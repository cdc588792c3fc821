"""NEMS0 PointProcess / TiledSignal HDF5: one root dataset per key, nothing else.

PointProcess: key = channel (cellid), value = 1-D float64 spike times in seconds.
TiledSignal: key = epoch name, value = C x n array. No attributes and no groups are
written (``SignalBase._save_data_to_h5``); a key containing '/' would have become a nested
group, which is reported, not walked. Keys come back in code-point order (``sorted``),
which is also the channel order NEMS0 uses when it rasterizes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from nat4etl.errors import FormatError

__all__ = [
    "check_point_process",
    "check_tiled",
    "read_h5_datasets",
    "read_point_process",
    "read_tiled",
]

DEFAULT_MAX_BYTES = 2 << 30  # inflated size bound over all datasets (per-site files: few MB)


def read_h5_datasets(
    source: bytes | BinaryIO | str | os.PathLike,
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Every root dataset as a numpy array, keys in code-point order.

    Parameters
    ----------
    source
        HDF5 bytes, a binary file object (h5py reads file-like objects) or a path.
    path, member
        Named in errors.
    max_bytes
        Bound on the summed in-memory size of the datasets (default 2 GiB), checked on
        the declared shapes before reading, so a compressed bomb is refused.

    Raises
    ------
    FormatError
        Not HDF5, a group or link where a dataset is expected, a non-numeric dataset, or
        the size bound exceeded; names file and member (and key).
    """
    import h5py

    image = None
    if isinstance(source, bytes | bytearray | memoryview):
        image = memoryview(source).cast("B")
        source = io.BytesIO(source)
    try:
        h5 = h5py.File(source, "r")
    except Exception as err:  # libhdf5 raises OSError, ValueError, ... for bad bytes
        raise FormatError(f"not a readable HDF5 file ({err})", path=path, member=member) from err
    try:
        with h5:
            return _read_root(h5, image, path=path, member=member, max_bytes=max_bytes)
    except FormatError:
        raise
    except Exception as err:  # damaged chunks surface as several exception types
        raise FormatError(f"unreadable HDF5 data ({err})", path=path, member=member) from err


def read_point_process(
    source: bytes | BinaryIO | str | os.PathLike,
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Channel -> 1-D float64 spike times (s), channels in code-point order."""
    datasets = read_h5_datasets(source, path=path, member=member, max_bytes=max_bytes)
    return check_point_process(datasets, path=path, member=member)


def read_tiled(
    source: bytes | BinaryIO | str | os.PathLike,
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> dict[str, np.ndarray]:
    """Epoch name -> C x n float64 tile; every tile has the same C."""
    datasets = read_h5_datasets(source, path=path, member=member, max_bytes=max_bytes)
    return check_tiled(datasets, path=path, member=member)


def check_point_process(
    datasets: dict[str, np.ndarray],
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
) -> dict[str, np.ndarray]:
    """Every dataset must hold a vector of spike times; returns them 1-D, in stored order.

    A column ``(n, 1)`` (or row ``(1, n)``) is flattened: NEMS0 stores whatever array it
    was given, and rasterizes a column as it does a vector (it iterates the rows).
    """
    out = {}
    for key, arr in datasets.items():
        if arr.ndim == 2 and 1 in arr.shape:
            arr = arr.reshape(-1)
        if arr.ndim != 1:
            msg = f"dataset {key!r}: spike times must be 1-D, got shape {arr.shape}"
            raise FormatError(msg, path=path, member=member)
        out[key] = arr
    return out


def check_tiled(
    datasets: dict[str, np.ndarray],
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
) -> dict[str, np.ndarray]:
    """Every dataset must be 2-D with one shared channel count; returns them as given."""
    n_chans = None
    for key, arr in datasets.items():
        if arr.ndim != 2:
            msg = f"dataset {key!r}: a tile must be 2-D (C x n), got shape {arr.shape}"
            raise FormatError(msg, path=path, member=member)
        if n_chans is not None and arr.shape[0] != n_chans:
            msg = f"dataset {key!r}: {arr.shape[0]} channels, the others have {n_chans}"
            raise FormatError(msg, path=path, member=member)
        n_chans = arr.shape[0]
    return datasets


def _read_root(h5, image, *, path, member, max_bytes: int) -> dict[str, np.ndarray]:
    import h5py

    keys = sorted(h5.keys())
    total = 0
    datasets = []
    for key in keys:
        link = h5.get(key, getlink=True)
        if not isinstance(link, h5py.HardLink):
            msg = f"{key!r} is a {type(link).__name__}, expected a dataset"
            raise FormatError(msg, path=path, member=member)
        obj = h5[key]
        if isinstance(obj, h5py.Group):
            msg = f"{key!r} is a group where a dataset is expected (a key with '/'?)"
            raise FormatError(msg, path=path, member=member)
        if not isinstance(obj, h5py.Dataset):
            raise FormatError(f"{key!r} is not a dataset", path=path, member=member)
        if obj.dtype.kind not in "fiub":
            msg = f"dataset {key!r} has dtype {obj.dtype}, expected numbers"
            raise FormatError(msg, path=path, member=member)
        if obj.shape is None:
            raise FormatError(f"dataset {key!r} has no dataspace", path=path, member=member)
        total += int(np.prod(obj.shape, dtype=np.int64)) * 8
        if total > max_bytes:
            msg = f"datasets exceed the {max_bytes}-byte limit at {key!r}"
            raise FormatError(msg, path=path, member=member)
        datasets.append((key, obj))
    if image is not None and h5.id.get_create_plist().get_userblock() != 0:
        image = None  # chunk addresses would be relative to the userblock's end
    # Every dataset lands in one float64 buffer, back to back in key order, so a caller
    # that wants them as one list column (unpack's site spikes) takes them without a copy
    # (A1: 83 MB neither copied nor first-touched again).
    sizes = [int(np.prod(obj.shape, dtype=np.int64)) for _, obj in datasets]
    packed = np.empty(sum(sizes))
    out, slots, plans = {}, [], {}
    at = 0
    for i, ((key, obj), n) in enumerate(zip(datasets, sizes, strict=True)):
        slot = packed[at : at + n]
        slots.append(slot)
        plan = None if image is None else _plan_deflated_vector(obj, image, slot)
        if plan is not None:
            plans[i] = plan
        out[key] = slot.reshape(obj.shape)
        at += n
    try:
        inflated = _inflate_plans(plans)
    except _ChunkTooLong as err:
        key, size = datasets[err.plan][0], plans[err.plan].chunk_bytes
        msg = f"dataset {key!r}: a chunk inflates past its {size} bytes (a decompression bomb?)"
        raise FormatError(msg, path=path, member=member) from None
    for i, (_, obj) in enumerate(datasets):
        if i not in inflated:  # another layout, or a chunk the direct route refused
            slots[i][...] = np.asarray(obj[()], dtype=np.float64).reshape(-1)
    return out


@dataclass
class _Plan:
    """One dataset's deflated chunks and where their bytes go (:func:`_plan_deflated_vector`)."""

    #: (the chunk's bytes in the file, deflated? (else stored as is), its place: the last
    #: chunk's place stops at the dataset's end)
    chunks: list[tuple[memoryview, bool, memoryview]]
    chunk_bytes: int
    #: a dataset not float64 is inflated aside; this converts it into its slot
    finish: Callable[[], None] | None = None


def _plan_deflated_vector(ds, image: memoryview, slot: np.ndarray) -> _Plan | None:
    """How to inflate a 1-D dataset stored as deflated chunks from the file's bytes into the
    float64 ``slot``, or None when it is not plain.

    What NEMS0 writes for spike times (h5py ``compression='gzip'``, 8 KiB chunks): going
    through libhdf5 costs a zlib call and chunk-cache work per chunk under h5py's lock;
    isal inflates the same streams 1.7x faster here, and on two threads. Anything else
    (other filters, shapes, unwritten chunks) gives None, and the caller reads the dataset
    through h5py, which also reports damage.
    """
    if ds.ndim != 1 or ds.chunks is None or ds.size == 0:
        return None
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters() != 1 or dcpl.get_filter(0)[0] != _H5Z_FILTER_DEFLATE:
        return None
    if not hasattr(ds.id, "chunk_iter") or ds.dtype.kind not in "fiu":
        return None
    chunk_len, n, itemsize = ds.chunks[0], ds.shape[0], ds.dtype.itemsize
    if ds.dtype == np.dtype("<f8"):  # straight into the slot
        target, finish = memoryview(slot.view(np.uint8)), None
    else:
        raw = np.empty(n * itemsize, np.uint8)
        target = memoryview(raw)

        def finish() -> None:
            slot[...] = raw.view(ds.dtype)

    infos = []
    try:
        ds.id.chunk_iter(infos.append)
    except (ValueError, OSError):
        return None
    chunks, starts = [], set()
    for info in infos:
        offset = info.chunk_offset[0]
        start = offset * itemsize
        stored = image[info.byte_offset : info.byte_offset + info.size]
        # a chunk past the end (a damaged dataspace) would be counted for one never written
        if offset % chunk_len or offset >= n or start in starts or len(stored) != info.size:
            return None
        starts.add(start)
        chunks.append(
            (stored, not info.filter_mask & 1, target[start : start + chunk_len * itemsize])
        )
    if len(starts) != -(-n // chunk_len):  # an unwritten chunk holds the fill value
        return None
    return _Plan(chunks, chunk_len * itemsize, finish)


def _inflate_plans(plans: dict[int, _Plan]) -> set[int]:
    """Inflate every plan's chunks, half of them on a second thread (isal and zlib let go
    of the GIL while they inflate); the plans done, by key. A plan with a chunk that does
    not inflate to one whole chunk is left out (the caller reads it through h5py)."""
    jobs = [(i, chunk) for i, plan in plans.items() for chunk in plan.chunks]
    half = len(jobs) // 2 if len(jobs) >= _SPLIT_CHUNKS else 0
    failed: set[int] = set()
    if half:
        second = _inflate_pool().submit(_inflate_chunks, jobs[half:], plans)
        try:
            failed |= _inflate_chunks(jobs[:half], plans)
        finally:
            wait([second])  # its chunks land before the buffer is read or given up
        failed |= second.result()
    else:
        failed = _inflate_chunks(jobs, plans)
    for i, plan in plans.items():
        if i not in failed and plan.finish is not None:
            plan.finish()
    return set(plans) - failed


def _inflate_chunks(jobs, plans: dict[int, _Plan]) -> set[int]:
    """The plans of ``jobs`` with a chunk that is cut or damaged. A chunk inflated past its
    size raises :class:`_ChunkTooLong` (inflating it whole could take gigabytes)."""
    failed = set()
    for i, (stored, deflated, place) in jobs:
        if i in failed:
            continue
        chunk_bytes, data, whole = plans[i].chunk_bytes, stored, True
        if deflated:
            inflate = _zlib_decompressobj()
            try:
                data = inflate.decompress(stored, chunk_bytes + 1)
            except _ZlibError:
                failed.add(i)
                continue
            if len(data) > chunk_bytes:
                raise _ChunkTooLong(i)
            whole = inflate.eof
        if len(data) != chunk_bytes or not whole:
            failed.add(i)
            continue
        place[:] = memoryview(data)[: len(place)]
    return failed


class _ChunkTooLong(Exception):
    """A deflated chunk inflates past its chunk's size: a decompression bomb, or damage
    libhdf5 would inflate whole too."""

    def __init__(self, plan: int):
        super().__init__(plan)
        self.plan = plan


_SPLIT_CHUNKS = 64  # fewer chunks are inflated on the calling thread alone
_POOL: ThreadPoolExecutor | None = None


def _inflate_pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(1, thread_name_prefix="nat4etl-h5-inflate")
    return _POOL


def _forget_pool() -> None:
    """A forked child has no copy of the pool's thread: it makes its own (a job sent to
    the parent's pool object would wait forever)."""
    global _POOL
    _POOL = None


os.register_at_fork(after_in_child=_forget_pool)


_H5Z_FILTER_DEFLATE = 1
try:  # isal: the same zlib streams, inflated ~1.7x faster
    from isal.isal_zlib import decompressobj as _zlib_decompressobj
    from isal.isal_zlib import error as _ZlibError
except ImportError:  # pragma: no cover - isal is a dependency; zlib still beats the detour
    from zlib import decompressobj as _zlib_decompressobj
    from zlib import error as _ZlibError

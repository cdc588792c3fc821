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
    # (A1: 83 MB neither copied nor first-touched again). The room after the last one
    # takes the tail of its last whole chunk.
    sizes = [int(np.prod(obj.shape, dtype=np.int64)) for _, obj in datasets]
    packed = np.empty(sum(sizes) + max(map(_chunk_tail, (o for _, o in datasets)), default=0))
    out = {}
    at = 0
    for (key, obj), n in zip(datasets, sizes, strict=True):
        slot = packed[at : at + n]
        if image is None or not _inflate_deflated_vector(obj, image, packed, at):
            slot[...] = np.asarray(obj[()], dtype=np.float64).reshape(-1)
        out[key] = slot.reshape(obj.shape)
        at += n
    return out


def _chunk_tail(ds) -> int:
    """Values past the end of a 1-D chunked dataset that its last whole chunk holds."""
    if ds.ndim != 1 or ds.chunks is None:
        return 0
    return -ds.shape[0] % ds.chunks[0]


def _inflate_deflated_vector(ds, image: memoryview, out: np.ndarray, at: int) -> bool:
    """A 1-D dataset stored as deflated chunks, inflated from the file's bytes into the
    float64 ``out[at:at + n]``; True when done. A float64 dataset's chunks go straight
    there, its last chunk's tail into what follows (room ``out`` has, and that the next
    dataset overwrites); other types are inflated aside and converted.

    What NEMS0 writes for spike times (h5py ``compression='gzip'``, 8 KiB chunks): going
    through libhdf5 costs a zlib call and chunk-cache work per chunk under h5py's lock;
    isal inflates the same streams 1.7x faster here. Anything else (other filters, shapes,
    unwritten chunks, an inflated size that is not one chunk) returns False, and the
    caller reads the dataset through h5py, which also reports damage.
    """
    if ds.ndim != 1 or ds.chunks is None or ds.size == 0:
        return False
    dcpl = ds.id.get_create_plist()
    if dcpl.get_nfilters() != 1 or dcpl.get_filter(0)[0] != _H5Z_FILTER_DEFLATE:
        return False
    if not hasattr(ds.id, "chunk_iter") or ds.dtype.kind not in "fiu":
        return False
    chunk_len, n = ds.chunks[0], ds.shape[0]
    chunk_bytes = chunk_len * ds.dtype.itemsize
    n_chunks = -(-n // chunk_len)
    in_place = ds.dtype == np.dtype("<f8")
    if in_place:
        raw = out.view(np.uint8)[at * 8 : (at + n_chunks * chunk_len) * 8]
    else:
        raw = np.empty(n_chunks * chunk_bytes, np.uint8)
    seen = []

    def inflate(info) -> None:
        stored = image[info.byte_offset : info.byte_offset + info.size]
        data = stored if info.filter_mask & 1 else _zlib_decompress(stored)  # bit 0: skipped
        if len(data) != chunk_bytes or info.chunk_offset[0] % chunk_len:
            raise _NotPlain
        start = info.chunk_offset[0] * ds.dtype.itemsize
        raw[start : start + chunk_bytes] = np.frombuffer(data, np.uint8)
        seen.append(start)

    try:
        ds.id.chunk_iter(inflate)
    except (_NotPlain, ValueError, OSError, _ZlibError):
        return False
    if len(set(seen)) != n_chunks:  # an unwritten chunk holds the fill value
        return False
    if not in_place:
        out[at : at + n] = raw.view(ds.dtype)[:n]
    return True


class _NotPlain(Exception):
    """A chunk the direct route does not cover (h5py reads the dataset instead)."""


_H5Z_FILTER_DEFLATE = 1
try:  # isal: the same zlib streams, inflated ~1.7x faster
    from isal.isal_zlib import decompress as _zlib_decompress
    from isal.isal_zlib import error as _ZlibError
except ImportError:  # pragma: no cover - isal is a dependency; zlib still beats the detour
    from zlib import decompress as _zlib_decompress
    from zlib import error as _ZlibError

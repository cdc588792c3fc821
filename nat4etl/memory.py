"""Where large arrays live, so a build's peak memory follows what is in use.

Five tools, each for a measured peak or cost (see where each is used):

- :func:`paged_empty` (:func:`paged_zeros`) / :func:`give_back`: an array on its own
  anonymous mapping, whose pages are committed on first write and can be handed back to
  the OS part by part while the rest of the array is still in use (the population
  recording, consumed channel by channel).
- :func:`release_free_memory`: what Arrow's pool and glibc keep for reuse, back to the
  OS between an area's largest allocations.
- :func:`large_blocks_unmapped`: large mallocs on their own mappings within a block.
- :func:`arrow_allocator_for_builds`: the Arrow allocator that holds least for a build.
- :func:`fewer_gc_passes`: the cycle collector runs less often during a build.
- :func:`map_private`: a file mapped copy-on-write for the reader, holding no descriptor.

Only where memory lives changes, never a value.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import gc
import mmap
import os
import weakref

import numpy as np


def reserve(n_bytes: int) -> mmap.mmap | None:
    """Anonymous private memory committed page by page on first write (None: fall back
    to numpy, which on Linux behaves the same but cannot give pages back early)."""
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    flags |= getattr(mmap, "MAP_NORESERVE", 0)
    if not flags or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        return mmap.mmap(-1, max(n_bytes, 1), flags=flags)
    except (OSError, ValueError):
        return None


def paged_empty(shape: tuple[int, ...], dtype=np.float32, *, huge_pages: bool = True) -> np.ndarray:
    """``np.empty(shape, dtype)`` on a mapping of its own, so :func:`give_back` works.

    ``huge_pages=False`` keeps the kernel's transparent huge pages off the mapping: with
    them, writing a few bytes commits 2 MB, so an array filled in a scattered order (one
    row in every few hundred) is wholly resident after its first pass.
    """
    out = _on_mapping(shape, dtype, huge_pages)
    return np.empty(shape, dtype) if out is None else out


def paged_zeros(shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    """:func:`paged_empty` that reads as zeros: a fresh mapping does, with no page
    written; without one, ``np.zeros`` (calloc: on Linux the same)."""
    out = _on_mapping(shape, dtype, huge_pages=True)
    return np.zeros(shape, dtype) if out is None else out


def _on_mapping(shape: tuple[int, ...], dtype, huge_pages: bool) -> np.ndarray | None:
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64))
    mapping = reserve(n * dtype.itemsize)
    if mapping is None:
        return None
    if not huge_pages and hasattr(mmap, "MADV_NOHUGEPAGE"):
        mapping.madvise(mmap.MADV_NOHUGEPAGE)
    return np.frombuffer(mapping, dtype, count=n).reshape(shape)


def give_back(array: np.ndarray, lo_row: int, hi_row: int) -> None:
    """Return to the OS the whole pages of rows ``lo_row:hi_row`` of an ``array`` made
    by :func:`paged_empty` (or any array on an ``mmap``) whose rows are contiguous (C
    order, or 2-D rows spaced apart: then the room after each row goes too): they read
    as zeros afterwards, so call it only on rows never read again. Any other array is
    left as is: its memory belongs to an allocator that must not lose pages behind its
    back."""
    mapping = array.base
    while isinstance(mapping, np.ndarray):
        mapping = mapping.base
    if isinstance(mapping, memoryview):  # np.frombuffer keeps the buffer's view
        mapping = mapping.obj
    rows_contiguous = array.ndim >= 1 and (
        array.flags.c_contiguous or (array.ndim == 2 and array.strides[1] == array.itemsize)
    )
    if not isinstance(mapping, mmap.mmap) or not rows_contiguous:
        return
    start = array.__array_interface__["data"][0]
    base = np.frombuffer(mapping, np.uint8).__array_interface__["data"][0]
    row_bytes = array.strides[0]
    lo = start - base + lo_row * row_bytes
    hi = start - base + hi_row * row_bytes
    lo = -(-lo // mmap.PAGESIZE) * mmap.PAGESIZE
    hi = min(hi, len(mapping)) // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        mapping.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def release_free_memory() -> None:
    """Give memory freed by the last area back to the OS before the next area's largest
    allocation: Arrow's pool and glibc's heap keep freed blocks for reuse, which otherwise
    sit on top of the next area's peak (~250 MB at full scale)."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _libc_function("malloc_trim")
    if trim is not None:
        trim(0)


@functools.cache
def _libc():
    """The C library (looked up once: ``find_library`` runs a subprocess), or None."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _libc_function(name: str):
    """glibc's ``malloc_trim``, ``mallopt``, ... or None (musl, macOS)."""
    return getattr(_libc(), name, None)


#: glibc's mallopt parameter number for the mmap threshold
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for its self-adjusting threshold (64-bit): what it settles at after the
#: first large free, so restoring it leaves later stages as they were
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


@contextlib.contextmanager
def large_blocks_unmapped(threshold: int = 256 * 1024):
    """Within the block, every malloc of ``threshold`` bytes or more is its own mapping,
    returned to the OS the moment it is freed.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MB),
    so the per-site and per-stim arrays of rebin-sites (a few MB each, on three threads)
    come from the heap arenas instead, and what they free stays in the process until the
    next ``malloc_trim``, on top of A1's responses. Measured with the extra trims in
    rebin-sites: build peak 1.08 GB -> 1.00 GB (without this, the trims alone: 1.07 GB),
    wall time unchanged. Set for that one stage only: build-wide it costs ~1.4 s of
    page faults (unpack, align-wav). Only the allocator's bookkeeping changes, no value.
    """
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        yield
        return
    mallopt(_M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)


@contextlib.contextmanager
def arrow_allocator_for_builds():
    """Within the block Arrow allocates with jemalloc (malloc where this pyarrow has no
    jemalloc) instead of its default mimalloc.

    mimalloc keeps the pages a thread freed until that same thread allocates again, so
    the write-behind and site threads sit idle on them between tables (~40-60 MB at the
    build's peak: Parquet pages and levels). jemalloc reuses freed memory across threads
    and returns it after a second of disuse; malloc returns large blocks at once, but then
    every Parquet page buffer is fresh memory, which this VM makes slow to touch: writing
    A1's responses alone takes 1.3-1.4 s with mimalloc or jemalloc, 1.5-1.9 s with malloc.
    Full-scale builds, A/B interleaved: peak RSS mimalloc 937-956 MiB, jemalloc 900-937,
    malloc 897-922; wall time the same within noise (jemalloc vs malloc, 5 pairs: medians
    12.1 s both). Buffers made inside are freed by the pool that made them, whenever.
    """
    import pyarrow as pa

    try:
        pool = pa.jemalloc_memory_pool()
    except NotImplementedError:
        pool = pa.system_memory_pool()
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pool)
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


#: objects allocated between two youngest-generation collections within a build
GC_GEN0_THRESHOLD = 50_000


@contextlib.contextmanager
def fewer_gc_passes(gen0_threshold: int = GC_GEN0_THRESHOLD):
    """Within the block the cycle collector waits for ``gen0_threshold`` new objects
    (CPython's default: 700) before a pass.

    A build makes millions of short-lived objects (epoch rows, JSON, table keys) and
    almost no cycles; with the default thresholds a full-scale build ran 880 passes, six
    over every object, for 0.17-0.20 s of the main thread; with 50,000, 3 passes for
    0.03 s. Cycles are still collected, later; the thresholds are restored on exit.
    """
    previous = gc.get_threshold()
    gc.set_threshold(gen0_threshold, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)


def map_private(path: str | os.PathLike) -> ctypes.Array | mmap.mmap:
    """``path`` mapped copy-on-write: a writable buffer of its bytes, private to the caller.

    Python's ``mmap.mmap`` keeps a duplicate of the file's descriptor for as long as the
    mapping lives (3.13 adds ``trackfd=False``), so every array the reader handed out
    held one, and a program keeping about a thousand of them ran out of descriptors.
    Here the C ``mmap`` maps the file, the descriptor is closed at once, and the mapping
    goes when the last array on it does. Elsewhere than glibc/Linux: ``mmap.mmap``.
    OSError / ValueError (an empty file) as ``mmap.mmap`` raises them.
    """
    c_mmap = _c_mmap()
    if c_mmap is None:
        with open(path, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    c_mmap, c_munmap = c_mmap
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            raise ValueError("cannot mmap an empty file")
        prot, flags = mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE
        address = c_mmap(None, size, prot, flags, fd, 0)
        if address is None or address == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    buffer = (ctypes.c_char * size).from_address(address)
    unmap = weakref.finalize(buffer, c_munmap, address, size)
    unmap.atexit = False  # at exit arrays may still be in use; the OS unmaps after
    return buffer


#: ``(void *) -1`` as ``c_void_p`` returns it
_MAP_FAILED = ctypes.c_void_p(-1).value


@functools.cache
def _c_mmap():
    """libc's ``mmap`` and ``munmap`` with errno kept, or None where they are not found."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        c_mmap, c_munmap = libc.mmap, libc.munmap
    except (OSError, AttributeError):
        return None
    c_mmap.restype = ctypes.c_void_p
    c_mmap.argtypes = [
        ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
    ]  # fmt: skip
    c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return c_mmap, c_munmap

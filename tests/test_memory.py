"""rebin-sites' allocator settings: they change where memory lives, never a value."""

import numpy as np
import pytest

from nat4etl import memory


def test_large_blocks_unmapped_is_transparent_and_reentrant_after_errors():
    with memory.large_blocks_unmapped():
        a = np.arange(1_000_000, dtype=np.float32)  # 4 MB: above the threshold
        b = a * 2
    assert b[-1] == 1_999_998.0
    try:
        with memory.large_blocks_unmapped():
            raise ValueError("boom")
    except ValueError:
        pass
    memory.release_free_memory()
    with memory.large_blocks_unmapped(threshold=64 * 1024):
        assert np.ones(100_000).sum() == 100_000


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def test_give_back_zeroes_only_the_whole_pages_of_the_rows_it_is_given():
    a = memory.paged_empty((64, 3000))  # rows of 12000 bytes: not page multiples
    a[:] = np.arange(a.size, dtype=np.float32).reshape(a.shape)
    expected = a.copy()
    memory.give_back(a, 10, 20)
    # bytes of rows 9 and 20 share pages with rows 10 and 19: never lost
    np.testing.assert_array_equal(a[:10], expected[:10])
    np.testing.assert_array_equal(a[20:], expected[20:])
    assert np.count_nonzero(a[10:20] == 0) > 0.9 * a[10:20].size  # the pages inside: gone


def test_give_back_returns_memory_to_the_os():
    a = memory.paged_empty((200, 65536))  # 50 MiB
    a[:] = 1.0
    before = _rss_kib()
    for row in range(200):
        memory.give_back(a, row, row + 1)
    assert before - _rss_kib() > 40 * 1024


def test_give_back_takes_rows_spaced_apart_with_the_room_after_them():
    room = memory.paged_empty((8, 4096))  # rows of 16 KiB
    room[:] = 3.0
    spaced = room[:, :1000]  # each row contiguous, rows 16 KiB apart
    memory.give_back(spaced, 2, 5)
    assert np.all(spaced[:2] == 3.0) and np.all(spaced[5:] == 3.0)
    assert np.all(room[2:5] == 0.0)  # rows 2-4 and the room after them: pages returned
    assert np.all(room[5:] == 3.0)


def test_give_back_leaves_arrays_of_other_allocators_alone():
    a = np.ones((100, 5000), np.float32)  # malloc's: losing its pages would corrupt it
    memory.give_back(a, 0, 100)
    assert np.all(a == 1.0)
    view = memory.paged_empty((10, 2000))[:, ::2]  # not C-contiguous: rows are not ranges
    view[:] = 2.0
    memory.give_back(view, 0, 10)
    assert np.all(view == 2.0)


def test_paged_empty_without_huge_pages_is_an_ordinary_array():
    a = memory.paged_empty((1000, 150), huge_pages=False)
    assert a.shape == (1000, 150) and a.dtype == np.float32 and a.flags.writeable
    a[::7] = 3.0
    assert a[7, 0] == 3.0


def test_paged_zeros_read_as_zeros_on_a_mapping_and_without_one(monkeypatch):
    a = memory.paged_zeros((300, 5000))
    assert a.dtype == np.float32 and not a.any()
    a[5, 7] = 1.0
    memory.give_back(a, 0, 300)  # a mapping of its own: its pages can go back
    assert not a.any()
    monkeypatch.setattr(memory, "reserve", lambda n_bytes: None)
    b = memory.paged_zeros((300, 5000))  # numpy's memory: zeros all the same
    assert b.shape == (300, 5000) and not b.any()


def test_arrow_allocator_for_builds_restores_the_previous_pool():
    import pyarrow as pa

    before = pa.default_memory_pool().backend_name
    with memory.arrow_allocator_for_builds():
        assert pa.default_memory_pool().backend_name in ("jemalloc", "system")
        kept = pa.array(np.arange(1_000_000))
    assert pa.default_memory_pool().backend_name == before
    assert kept[-1].as_py() == 999_999  # freed later by the pool that made it


def test_fewer_gc_passes_raises_the_first_threshold_and_restores_it_after_errors():
    import gc

    before = gc.get_threshold()
    with pytest.raises(RuntimeError), memory.fewer_gc_passes(12_345):
        assert gc.get_threshold() == (12_345, *before[1:])
        raise RuntimeError("a stage failed")
    assert gc.get_threshold() == before

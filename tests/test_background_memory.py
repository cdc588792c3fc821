"""rebin-sites' allocator settings: they change where memory lives, never a value."""

import numpy as np

from nat4etl.stages import background


def test_large_blocks_unmapped_is_transparent_and_reentrant_after_errors():
    with background.large_blocks_unmapped():
        a = np.arange(1_000_000, dtype=np.float32)  # 4 MB: above the threshold
        b = a * 2
    assert b[-1] == 1_999_998.0
    try:
        with background.large_blocks_unmapped():
            raise ValueError("boom")
    except ValueError:
        pass
    background.release_free_memory()
    with background.large_blocks_unmapped(threshold=64 * 1024):
        assert np.ones(100_000).sum() == 100_000

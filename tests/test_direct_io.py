"""DirectWriter: the file holds exactly the bytes written, direct or not, and its digest
(blake3) covers them all."""

from __future__ import annotations

import errno
import os

import blake3
import numpy as np
import pytest

from nat4etl import direct_io
from nat4etl.direct_io import BLOCK_BYTES, BUFFER_BYTES, DirectWriter

SIZES = [0, 1, BLOCK_BYTES - 1, BLOCK_BYTES, BLOCK_BYTES + 1, BUFFER_BYTES - 1, BUFFER_BYTES,
         BUFFER_BYTES + 3 * BLOCK_BYTES + 17]  # fmt: skip


def _pieces(total: int, seed: int) -> list[bytes]:
    """``total`` random bytes cut at random places (some writes span buffers)."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, total, dtype=np.uint8).tobytes()
    cuts = np.sort(rng.integers(0, total + 1, 5))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, total], strict=True)]


def _write(path, pieces, **kwargs) -> DirectWriter:
    with DirectWriter(path, **kwargs) as sink:
        for piece in pieces:
            assert sink.write(piece) == len(piece)
    return sink


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direct", [True, False])
def test_the_file_is_the_bytes_written(tmp_path, size, direct):
    pieces = _pieces(size, seed=size)
    data = b"".join(pieces)
    sink = _write(tmp_path / "f", pieces, direct=direct)
    assert (tmp_path / "f").read_bytes() == data
    assert sink.hasher.hexdigest() == blake3.blake3(data).hexdigest()
    assert sink.size_bytes == size


@pytest.mark.parametrize("direct", [True, False])
def test_a_large_write_hashed_aside_keeps_the_digest_in_order(tmp_path, direct):
    """A write of HASH_ASIDE_BYTES or more is hashed on a second thread while it is
    written; the digest still covers every byte in order, small writes around it too."""
    rng = np.random.default_rng(7)
    large = rng.integers(0, 256, direct_io.HASH_ASIDE_BYTES + 5, dtype=np.uint8)
    pieces = [b"head" * 3, large, b"middle", large[::-1].copy(), b"tail"]
    sink = _write(tmp_path / "f", pieces, direct=direct)
    data = b"".join(bytes(p) for p in pieces)
    assert (tmp_path / "f").read_bytes() == data
    assert sink.hasher.hexdigest() == blake3.blake3(data).hexdigest()
    assert sink.size_bytes == len(data)


def test_direct_is_used_where_the_filesystem_takes_it(tmp_path):
    sink = _write(tmp_path / "f", [b"x" * 10])
    assert sink.direct == bool(getattr(os, "O_DIRECT", 0))  # ext4/xfs/btrfs tmp here


def test_a_filesystem_refusing_o_direct_at_open_gets_the_same_bytes(tmp_path, monkeypatch):
    real_open = os.open

    def refusing(path, flags, *args):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(direct_io.os, "open", refusing)
    pieces = _pieces(BUFFER_BYTES + 5000, seed=1)
    sink = _write(tmp_path / "f", pieces)
    assert not sink.direct
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_a_direct_write_refused_midway_goes_on_through_the_cache(tmp_path, monkeypatch):
    if not getattr(os, "O_DIRECT", 0):
        pytest.skip("no O_DIRECT on this platform: the open test covers the fallback")
    real_write = os.write
    calls = []

    def refusing_second(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(direct_io.os, "write", refusing_second)
    pieces = _pieces(2 * BUFFER_BYTES + 100, seed=2)
    sink = _write(tmp_path / "f", pieces)
    assert not sink.direct and len(calls) >= 3
    assert (tmp_path / "f").read_bytes() == b"".join(pieces)


def test_buffers_are_reused(tmp_path):
    _write(tmp_path / "a", [b"a" * 100])
    free = list(direct_io._free_buffers)
    _write(tmp_path / "b", [b"b" * 100])
    assert direct_io._free_buffers == free


def test_a_failed_hash_aside_is_raised_not_a_digest_of_part(tmp_path):
    class Broken:
        def update(self, data):
            raise MemoryError("no room to hash")

        def hexdigest(self):  # pragma: no cover - never reached
            return "partial"

    large = np.zeros(direct_io.HASH_ASIDE_BYTES, np.uint8)
    with DirectWriter(tmp_path / "f") as sink:
        sink.hasher = Broken()
        with pytest.raises(MemoryError, match="no room to hash"):
            sink.write(large)

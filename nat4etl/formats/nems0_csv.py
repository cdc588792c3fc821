"""Streaming parser for NEMS0 rasterized CSV: ``np.savetxt(data.T, fmt='%.18e', delimiter=',')``.

The file is time x channel, no header, ``\\n`` line ends, about 25 bytes per value; the A1
population ``resp`` is ~1.9 GB of text, so it is parsed from the (tar member) byte stream in
chunks and never held whole.

Speed comes from the writer's fixed format. A ``%.18e`` field is ``[-]d.<18 digits>e±XX``;
its 19 significant digits fit a uint64, so a block of fields is decoded with vectorised
SWAR byte arithmetic (eight digits per uint64 operation) instead of a per-value parser.
When every row of a block has the same byte width the fields are read through strided views
(no gathers at all); otherwise field boundaries are found first. Before either, a block whose
fields are all one-digit counts (``d.000000000000000000e+00``, as spike counts at 100 Hz
are) is checked with one memcmp against rows of zeros and comes out as its nonzero fields
(`SparseRows`), which `place_rows` writes into a zeroed (C, T) array.

Exactness: the result is ``np.float32(np.float64(text))``. The vectorised value is within a
few float64 ulps of the exact decimal; the field is accepted only if the float32 rounding of
that whole error interval is one value, so the answer is provably the same as the correctly
rounded route. Fields outside the fast format (``nan``, ``inf``, three-digit exponents, other
spellings, and the rare values next to a float32 rounding midpoint) are parsed with Python's
``float``, so the fast path never changes a result, it only skips work.
"""

from __future__ import annotations

import itertools
import math
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO

import numpy as np

from nat4etl.errors import FormatError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "SparseRows",
    "iter_raster_blocks",
    "parse_raster_bytes",
    "place_rows",
    "read_raster",
]

DEFAULT_CHUNK_BYTES = 16 << 20
_BLOCK_BYTES = 1 << 20  # cache-sized unit of vectorised work
_PAD_BYTES = 64  # zeros after the data so 8-byte loads past a field never leave the buffer
_CARRY_ROOM_BYTES = 1 << 16  # a chunk buffer's room for the line carried into it (A1's: 21 kB)
_FIELD_WIDTH = 25  # len('1.000000000000000000e+00,')
_MAX_LINE_BYTES = 64 << 20  # ~2.7 M channels; a longer "line" is not this format

_COMMA, _NEWLINE, _MINUS, _PLUS, _DOT, _E = (ord(c) for c in ",\n-+.e")
_ZERO = ord("0")
_ZERO_FIELD = b"0.000000000000000000e+00,"
_CR = ord("\r")

_U8 = np.uint64
_HI_NIBBLES = _U8(0xF0F0F0F0F0F0F0F0)
_ASCII_ZEROS = _U8(0x3030303030303030)
_ASCII_SIXES = _U8(0x0606060606060606)
_LOW_NIBBLES = _U8(0x0F0F0F0F0F0F0F0F)
_PAIRS = _U8(0x00FF00FF00FF00FF)
_QUADS = _U8(0x0000FFFF0000FFFF)
_OCTS = _U8(0x00000000FFFFFFFF)
# Bytes 18..23 of a field: d17 d18 'e' sign e1 e2. Mask keeps the digit high nibbles and 'e'.
_TAIL_MASK = _U8(0x0000_F0F0_00FF_F0F0)
_TAIL_WANT = _U8(0x0000_3030_0065_3030)
_TAIL_SIXES = _U8(0x0000_0606_0000_0606)
_NAN_U32 = int.from_bytes(b"nan", "little")
_INF_U32 = int.from_bytes(b"inf", "little")
_NEGINF_U32 = int.from_bytes(b"-inf", "little")

_POW10_MIN = -140
_POW10 = np.array([10.0**k for k in range(_POW10_MIN, 100)])
_BELOW = 1.0 - 2.0**-49  # widen by ~8 float64 ulps: covers every rounding in the fast path
_ABOVE = 1.0 + 2.0**-49

#: pandas' default ``na_values``: NEMS0 reads the data with ``pd.read_csv``, so a field
#: spelled any of these is NaN to it (``np.savetxt`` itself writes ``nan``)
PANDAS_NA = (
    b"#N/A", b"#N/A N/A", b"#NA", b"-1.#IND", b"-1.#QNAN", b"-NaN", b"-nan", b"1.#IND",
    b"1.#QNAN", b"<NA>", b"N/A", b"NA", b"NULL", b"NaN", b"None", b"n/a", b"nan", b"null",
)  # fmt: skip
_SPECIAL = {
    **dict.fromkeys(PANDAS_NA, math.nan),
    b"inf": math.inf,
    b"-inf": -math.inf,
    b"": math.nan,
}


def parse_raster_bytes(
    data: bytes,
    *,
    n_chans: int | None = None,
    path: str | None = None,
    member: str | None = None,
) -> np.ndarray:
    """Parse a whole CSV held in memory; C x T float32 (see `read_raster`)."""
    import io

    return read_raster(io.BytesIO(data), n_chans=n_chans, path=path, member=member, threads=1)


def read_raster(
    stream: BinaryIO,
    *,
    n_chans: int | None = None,
    path: str | None = None,
    member: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = 1,
) -> np.ndarray:
    """Read a rasterized CSV into a C x T float32 array (channels x time, as NEMS0 swaps axes).

    Parameters
    ----------
    stream
        Binary file object positioned at the start of the CSV (a tar member stream is fine).
    n_chans
        Expected columns per row (the JSON ``chans`` length); None infers it from row 1.
    path, member
        Named in errors.
    chunk_bytes
        Bytes read from ``stream`` at a time (default 16 MiB); memory use is a few chunks.
    threads
        Parser threads (default 1: parse on the caller's thread). Reading the stream
        (inflating a tar member) always runs on one more thread, so the default already
        overlaps inflate and parse on two cores. More parsers rarely help: numpy's short
        operations hand the GIL back and forth (measured 0.8-1.2x with 2 parsers).

    Returns
    -------
    numpy.ndarray
        float32, shape (C, T). A file without rows gives shape (n_chans or 0, 0).
    """
    blocks = list(
        iter_raster_blocks(
            stream,
            n_chans=n_chans,
            path=path,
            member=member,
            chunk_bytes=chunk_bytes,
            threads=threads,
            sparse=True,
        )
    )
    if not blocks:
        return np.zeros((n_chans or 0, 0), np.float32)
    n_rows = sum(len(b) for b in blocks)
    out = np.zeros((blocks[0].shape[1], n_rows), np.float32)  # sparse blocks place into zeros
    row = 0
    for block in blocks:
        place_rows(out, row, block)
        row += len(block)
    return out


class SparseRows:
    """A parsed block that is zero but at ``positions`` (row-major indices into its
    (rows, C) ``shape``), where it holds ``values``.

    Spike counts at 100 Hz are: ~90% of the A1 population's fields are
    ``0.000000000000000000e+00``. Placing the others into a zeroed (C, T) array costs a
    fraction of transposing every value (:func:`place_rows`).
    """

    __slots__ = ("shape", "positions", "values")

    def __init__(self, shape: tuple[int, int], positions: np.ndarray, values: np.ndarray):
        self.shape = shape
        self.positions = positions
        self.values = values

    def __len__(self) -> int:
        return self.shape[0]

    def toarray(self) -> np.ndarray:
        out = np.zeros(self.shape, np.float32)
        out.reshape(-1)[self.positions] = self.values
        return out


def place_rows(out: np.ndarray, row: int, block: np.ndarray | SparseRows) -> None:
    """A (rows, C) block as columns ``row:row + len(block)`` of ``out`` (C, T); for a
    `SparseRows` block those columns must hold zeros already (a fresh mapping does)."""
    if isinstance(block, SparseRows):
        rows, chans = np.divmod(block.positions, block.shape[1])
        rows += row
        if out.flags.c_contiguous:  # one flat index: a third faster than two
            chans *= out.shape[1]
            chans += rows
            out.reshape(-1)[chans] = block.values
        else:
            out[chans, rows] = block.values
    else:
        out[:, row : row + len(block)] = block.T


def iter_raster_blocks(
    stream: BinaryIO,
    *,
    n_chans: int | None = None,
    path: str | None = None,
    member: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    threads: int = 1,
    sparse: bool = False,
) -> Iterator[np.ndarray | SparseRows]:
    """Yield consecutive (rows, C) float32 blocks of a rasterized CSV, in file order.

    Streaming form of `read_raster` (same parameters): memory stays at a few chunks
    whatever the file size, so a caller can write each block out as it comes. With
    ``sparse``, a block of mostly zeros comes as `SparseRows` (place it with
    `place_rows`); otherwise every block is an array.

    Raises
    ------
    FormatError
        A row whose column count differs from ``n_chans`` (or from row 1), or a field that
        is not a number; the message names file, member and 1-based line.
    """
    if n_chans is not None and n_chans < 1:
        raise FormatError(f"n_chans must be >= 1, got {n_chans}", path=path, member=member)
    blocks = _iter_blocks(stream, n_chans, path, member, chunk_bytes, threads)
    if sparse:
        return blocks
    return (b.toarray() if isinstance(b, SparseRows) else b for b in blocks)


def _iter_blocks(
    stream: BinaryIO,
    n_chans: int | None,
    path: str | None,
    member: str | None,
    chunk_bytes: int,
    threads: int,
) -> Iterator[np.ndarray | SparseRows]:
    state = _State(n_chans=n_chans, path=path, member=member)
    depth = 2
    reader = _read_chunks(stream, chunk_bytes, n_buffers=depth + 3, state=state)
    chunks = _prefetch(reader, depth=depth)
    if threads <= 1:
        for buf, n_bytes in chunks:
            for lo, hi in _block_ranges(buf, n_bytes, state.n_chans):
                yield _take(state, _parse_block(buf, lo, hi, state))
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="nems0csv") as pool:
        previous: list = []
        for buf, n_bytes in chunks:
            ranges = _block_ranges(buf, n_bytes, state.n_chans)
            if state.n_chans is None and ranges:
                # the first block fixes the column count the others check against
                lo, hi = ranges.pop(0)
                yield _take(state, _parse_block(buf, lo, hi, state))
            # Queue this chunk before draining the previous one, so workers never idle at
            # a chunk boundary. At most two chunks are in flight, which the buffer pool of
            # _read_chunks allows for.
            current = [pool.submit(_parse_block, buf, lo, hi, state) for lo, hi in ranges]
            for fut in previous:
                yield _take(state, fut.result())
            previous = current
        for fut in previous:
            yield _take(state, fut.result())


# --- chunking ------------------------------------------------------------------------------


class _State:
    """What blocks share: the column count, running line number and names for errors."""

    def __init__(self, *, n_chans: int | None, path: str | None, member: str | None):
        self.n_chans = n_chans
        self.path = path
        self.member = member
        self.line = 1  # 1-based number of the first line of the next block
        self._zero_rows = b""

    def zero_rows(self, n_bytes: int) -> bytes:
        """At least ``n_bytes`` of whole rows of ``0.000000000000000000e+00`` fields."""
        if len(self._zero_rows) < n_bytes:
            row = bytearray(_ZERO_FIELD * self.n_chans)
            row[-1] = _NEWLINE
            self._zero_rows = bytes(row) * -(-n_bytes // len(row))
        return self._zero_rows

    def error(self, msg: str, line: int | None = None) -> FormatError:
        where = f"line {line}: " if line is not None else ""
        return FormatError(f"{where}{msg}", path=self.path, member=self.member)


def _read_exact(stream: BinaryIO, view: memoryview) -> int:
    """Fill ``view`` from ``stream`` (short reads are normal for pipes and members)."""
    filled = 0
    readinto = getattr(stream, "readinto", None)
    while filled < len(view):
        if readinto is not None:
            got = readinto(view[filled:])
        else:
            data = stream.read(len(view) - filled)
            got = len(data)
            view[filled : filled + got] = data
        if not got:
            break
        filled += got
    return filled


def _read_chunks(
    stream: BinaryIO, chunk_bytes: int, n_buffers: int, state: _State
) -> Iterator[tuple[np.ndarray, int]]:
    """Yield (buffer, n_bytes): whole lines, zero padded; a partial last line carries over.

    Buffers rotate through a pool of ``n_buffers``: one is parsed while the others are
    queued or being filled, and reusing them spares the page faults of fresh 16 MiB arrays.
    Each has room for a carried partial line beyond the chunk: sized to each carry
    exactly, a buffer was made anew whenever a carry outgrew the one it was made with (A1:
    26 buffers instead of 5, 0.35 GB more first touches).

    A file whose first chunk ends lines with a lone CR and has no LF (old Mac line
    endings, which pandas reads as line ends too) has every CR made an LF as it is read;
    CRLF files need nothing (the CR is read as a field's trailing blank).
    """
    chunk_bytes = max(chunk_bytes, 1 << 16)
    pool: list[np.ndarray | None] = [None] * n_buffers
    carry = b""
    offset = 0  # bytes of the stream before buf[0]
    cr_only: bool | None = None  # decided on the first bytes read
    carry_room = _CARRY_ROOM_BYTES  # doubled past any carry that outgrows it
    for turn in itertools.count():
        need = len(carry) + chunk_bytes + _PAD_BYTES
        buf = pool[turn % n_buffers]
        if buf is None or len(buf) < need:
            carry_room = max(carry_room, 2 * len(carry))
            buf = np.empty(chunk_bytes + carry_room + _PAD_BYTES, np.uint8)
            pool[turn % n_buffers] = buf
        buf[: len(carry)] = np.frombuffer(carry, np.uint8)
        got = _read_exact(stream, memoryview(buf)[len(carry) : len(carry) + chunk_bytes])
        n = len(carry) + got
        if cr_only is None and got:
            cr_only = _find_newline(buf, 0, n) < 0 and bool(np.any(buf[:n] == _CR))
        if cr_only:
            fresh = buf[len(carry) : n]
            fresh[fresh == _CR] = _NEWLINE
        if got == 0:
            if n:  # last line without '\n': parse as if it had one
                buf[n] = _NEWLINE
                buf[n + 1 : n + 1 + _PAD_BYTES] = 0
                yield buf, n + 1
            return
        cut = _rfind_newline(buf, n)
        if cut < 0:  # no line end yet: a very long line, keep reading
            if n > _MAX_LINE_BYTES:
                msg = f"no line end within {_MAX_LINE_BYTES} bytes after byte {offset}"
                raise state.error(msg)
            carry = buf[:n].tobytes()
            continue
        carry = buf[cut + 1 : n].tobytes()
        offset += cut + 1
        buf[cut + 1 : cut + 1 + _PAD_BYTES] = 0
        yield buf, cut + 1


def _rfind_newline(buf: np.ndarray, n: int) -> int:
    """Last '\n' in buf[:n], looking back in growing windows (lines are ~21 kB)."""
    step = 1 << 16
    hi = n
    while hi > 0:
        lo = max(0, hi - step)
        hits = np.flatnonzero(buf[lo:hi] == _NEWLINE)
        if len(hits):
            return lo + int(hits[-1])
        hi = lo
        step *= 4
    return -1


def _find_newline(buf: np.ndarray, start: int, stop: int) -> int:
    """First '\n' in buf[start:stop], or -1, looking ahead in growing windows (memchr)."""
    step = 1 << 14
    while start < stop:
        hi = min(stop, start + step)
        hit = buf[start:hi].tobytes().find(b"\n")
        if hit >= 0:
            return start + hit
        start = hi
        step *= 4
    return -1


def _block_ranges(buf: np.ndarray, n_bytes: int, n_chans: int | None) -> list[tuple[int, int]]:
    """Split [0, n_bytes) at line ends into cache-sized ranges.

    Any line end is a valid cut. With %.18e rows of ``n_chans`` fields the line end is
    where a fixed row width predicts it, so one byte is checked instead of searched for.
    """
    row_bytes = n_chans * _FIELD_WIDTH if n_chans else 0
    rows_per_block = max(1, _BLOCK_BYTES // row_bytes) if row_bytes else 0
    ranges = []
    lo = 0
    while lo < n_bytes:
        hi = n_bytes
        if lo + _BLOCK_BYTES < n_bytes:
            guess = lo + rows_per_block * row_bytes - 1
            if row_bytes and guess < n_bytes and buf[guess] == _NEWLINE:
                hi = guess + 1
            else:
                hi = _find_newline(buf, lo + _BLOCK_BYTES - 1, n_bytes) + 1
        ranges.append((lo, hi))
        lo = hi
    return ranges


def _prefetch(chunks: Iterator, depth: int = 2) -> Iterator:
    """Read ahead on a thread so inflating the next chunk overlaps parsing this one."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def pump() -> None:
        try:
            for item in chunks:
                while not stop.is_set():
                    try:
                        q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(done)
        except BaseException as err:  # handed to the consumer, raised there
            q.put(err)

    worker = threading.Thread(target=pump, name="nems0csv-read", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        worker.join()


# --- block parsing -------------------------------------------------------------------------


class _Parsed:
    """A parsed block: values (rows, C) and the number of lines it spanned."""

    __slots__ = ("values", "n_lines", "bad_line", "bad_msg")

    def __init__(self, values=None, n_lines=0, bad_line=None, bad_msg=None):
        self.values = values
        self.n_lines = n_lines
        self.bad_line = bad_line  # 0-based line within the block
        self.bad_msg = bad_msg


def _take(state: _State, parsed: _Parsed) -> np.ndarray | SparseRows:
    """Consume a parsed block in file order: raise its error or advance the line count."""
    if parsed.bad_msg is not None:
        raise state.error(parsed.bad_msg, state.line + parsed.bad_line)
    state.line += parsed.n_lines
    return parsed.values


def _parse_block(buf: np.ndarray, lo: int, hi: int, state: _State) -> _Parsed:
    """Parse whole lines buf[lo:hi] (ends with '\\n'). Runs on a worker thread."""
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        n_chans = state.n_chans
        if n_chans is None:
            n_chans = state.n_chans = _count_first_row(buf, lo, hi)
        try:
            if (hi - lo) % (n_chans * _FIELD_WIDTH) == 0:
                parsed = _parse_zeros(buf, lo, hi, n_chans, state) or _parse_fixed(
                    buf, lo, hi, n_chans
                )
                if parsed is not None:
                    return parsed
            return _parse_general(buf, lo, hi, n_chans)
        except _FieldError as err:
            line = int(np.count_nonzero(buf[lo : err.offset] == _NEWLINE))
            shown = err.text[:40].decode("ascii", "backslashreplace")
            return _Parsed(bad_line=line, bad_msg=f"not a number: {shown!r}")


def _count_first_row(buf: np.ndarray, lo: int, hi: int) -> int:
    for start, end in _lines(buf, lo, hi):
        if end > start:
            return int(np.count_nonzero(buf[start:end] == _COMMA)) + 1
    return 1


def _lines(buf: np.ndarray, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    start = lo
    while start < hi:
        end = int(np.argmax(buf[start:hi] == _NEWLINE)) + start
        yield start, end
        start = end + 1


def _parse_fixed(buf: np.ndarray, lo: int, hi: int, n_chans: int) -> _Parsed | None:
    """Every row is n_chans fields of 25 bytes: strided views, no field search; None
    when the block is not laid out so.

    A delimiter in every 25th byte does not prove it: shorter rows can put theirs there
    too (``-inf``, 5 bytes a row, five to 25 bytes). A field that decodes is 24 bytes of
    digits and signs, so only a field that does not can hide a delimiter; one that does
    sends the block to `_parse_general`.
    """
    n_fields = (hi - lo) // _FIELD_WIDTH

    def strided(offset: int, dtype: str) -> np.ndarray:
        return np.ndarray(
            (n_fields,), dtype=dtype, buffer=buf, offset=lo + offset, strides=(_FIELD_WIDTH,)
        )

    def column(offset: int, dtype: str, out: np.ndarray) -> np.ndarray:
        np.copyto(out, strided(offset, dtype))
        return out

    delims = strided(_FIELD_WIDTH - 1, "u1").reshape(-1, n_chans)
    if not (np.all(delims[:, :-1] == _COMMA) and np.all(delims[:, -1] == _NEWLINE)):
        return None
    values, ok = _decode_standard(column, n_fields)
    if not ok.all():
        starts = lo + np.arange(n_fields, dtype=np.int64) * _FIELD_WIDTH
        odd = starts[~ok]
        window = buf[odd[:, None] + np.arange(_FIELD_WIDTH - 1)]
        if np.any((window == _COMMA) | (window == _NEWLINE)):
            return None
        _fallback(buf, starts, starts + _FIELD_WIDTH - 1, ~ok, values)
    return _Parsed(values.reshape(-1, n_chans), n_lines=n_fields // n_chans)


def _parse_zeros(buf: np.ndarray, lo: int, hi: int, n_chans: int, state: _State) -> _Parsed | None:
    """A block whose every field is ``d.000000000000000000e+00`` (``d`` a digit), mostly
    zeros, as `SparseRows`; the same fields but fewer zeros as an array; else None.

    The lead digits are set to '0' for a moment, so that one memcmp of the block against
    rows of zero fields checks every other byte, delimiters included; they are put back
    before anything else reads the buffer. Where three 8-byte tests per field and a
    transpose of every value were: A1's population alone 1.25 -> 1.13 s (median of 5).
    """
    digits_at = buf[lo:hi:_FIELD_WIDTH]
    digits = digits_at.copy()
    digits_at[:] = _ZERO
    try:
        same = state.zero_rows(hi - lo).startswith(memoryview(buf)[lo:hi])
    finally:
        digits_at[:] = digits
    if not same:
        return None
    digits -= np.uint8(_ZERO)  # a byte below '0' wraps above 9
    if digits.max(initial=0) > 9:
        return None
    n_rows = len(digits) // n_chans
    nonzero = np.flatnonzero(digits != 0)
    if 4 * len(nonzero) > len(digits):  # dense: an array places faster
        return _Parsed(digits.astype(np.float32).reshape(n_rows, n_chans), n_lines=n_rows)
    values = digits[nonzero].astype(np.float32)
    return _Parsed(SparseRows((n_rows, n_chans), nonzero, values), n_lines=n_rows)


def _parse_general(buf: np.ndarray, lo: int, hi: int, n_chans: int) -> _Parsed:
    """Rows of mixed byte width (nan, signs, 3-digit exponents): locate fields first."""
    body = buf[lo:hi]
    ends = np.flatnonzero((body == _COMMA) | (body == _NEWLINE)) + lo
    starts = np.empty_like(ends)
    starts[0] = lo
    starts[1:] = ends[:-1] + 1
    line_ends = np.flatnonzero(buf[ends] == _NEWLINE)
    per_line = np.diff(line_ends, prepend=-1)
    blank = (per_line == 1) & (ends[line_ends] == starts[line_ends])
    bad = np.flatnonzero((per_line != n_chans) & ~blank)
    if len(bad):
        line = int(bad[0])
        msg = f"expected {n_chans} columns, got {int(per_line[line])}"
        return _Parsed(bad_line=line, bad_msg=msg)
    if blank.any():  # pandas skips blank lines; so do we
        keep = np.ones(len(ends), bool)
        keep[line_ends[blank]] = False
        starts, ends = starts[keep], ends[keep]
    n_fields = len(ends)
    neg = buf[starts] == _MINUS
    digits_at = starts + neg

    u64 = np.ndarray((len(buf) - 8,), dtype="<u8", buffer=buf, strides=(1,))
    u16 = np.ndarray((len(buf) - 2,), dtype="<u2", buffer=buf, strides=(1,))

    at = np.empty_like(digits_at)

    def column(offset: int, dtype: str, out: np.ndarray) -> np.ndarray:
        np.add(digits_at, offset, out=at)
        return (u64 if dtype == "<u8" else u16)[at]  # np.take would copy the strided source

    values, ok = _decode_standard(column, n_fields, neg=neg)
    ok &= (ends - digits_at) == _FIELD_WIDTH - 1
    _decode_special(buf, starts, ends, values, ok)
    if not ok.all():
        _fallback(buf, starts, ends, ~ok, values)
    return _Parsed(values.reshape(-1, n_chans), n_lines=len(line_ends))


class _Scratch(threading.local):
    """Per-thread reusable work arrays: allocation churn, not arithmetic, dominated otherwise."""

    def __init__(self) -> None:
        self.size = 0
        self.arrays: dict[str, np.ndarray] = {}

    def take(self, n: int) -> dict[str, np.ndarray]:
        if n > self.size:
            self.size = max(n, 2 * self.size)
            self.arrays = {
                name: np.empty(self.size, dtype)
                for name, dtype in (
                    ("raw", np.uint64),
                    ("val", np.uint64),
                    ("tmp", np.uint64),
                    ("mant", np.uint64),
                    ("head", np.uint16),
                    ("tmp16", np.uint16),
                    ("ok", bool),
                    ("okt", bool),
                    ("exp", np.intp),
                    ("approx", np.float64),
                    ("wide", np.float64),
                    ("f32", np.float32),
                )
            }
        return {name: arr[:n] for name, arr in self.arrays.items()}


_SCRATCH = _Scratch()


def _digits8(raw: np.ndarray, out: np.ndarray, w: dict[str, np.ndarray]) -> None:
    """Add the value of 8 ASCII digits packed little-endian in each uint64 of ``raw`` to
    ``out``*1 (caller scales); clear ``w['ok']`` where a byte is not a digit."""
    tmp, okt = w["tmp"], w["okt"]
    np.bitwise_and(raw, _HI_NIBBLES, out=tmp)
    np.equal(tmp, _ASCII_ZEROS, out=okt)
    w["ok"] &= okt
    np.add(raw, _ASCII_SIXES, out=tmp)
    tmp &= _HI_NIBBLES
    np.equal(tmp, _ASCII_ZEROS, out=okt)
    w["ok"] &= okt
    np.bitwise_and(raw, _LOW_NIBBLES, out=out)
    for shift, scale, mask in ((8, 10, _PAIRS), (16, 100, _QUADS), (32, 10000, _OCTS)):
        np.right_shift(out, _U8(shift), out=tmp)
        out *= _U8(scale)
        out += tmp
        out &= mask


def _decode_standard(
    column: Callable[[int, str, np.ndarray], np.ndarray],
    n_fields: int,
    *,
    neg: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Decode ``d.<18 digits>e±XX`` fields; returns (float32 values, exactly-decoded mask).

    ``column(offset, dtype, out)`` gives, per field, the bytes at ``offset`` from its first
    digit: a strided copy into ``out`` or a fresh gather. ``head`` is modified in place.
    """
    w = _SCRATCH.take(n_fields)
    ok, okt, raw, val, tmp, mant = w["ok"], w["okt"], w["raw"], w["val"], w["tmp"], w["mant"]
    head, tmp16 = w["head"], w["tmp16"]
    head = column(0, "<u2", head)  # lead digit, '.'
    np.right_shift(head, np.uint16(8), out=tmp16)
    np.equal(tmp16, _DOT, out=ok)
    head &= np.uint16(0xFF)
    head -= np.uint16(0x30)
    np.less_equal(head, np.uint16(9), out=okt)
    ok &= okt
    np.copyto(mant, head, casting="unsafe")
    mant *= _U8(10**18)

    _digits8(column(2, "<u8", raw), val, w)
    val *= _U8(10**10)
    mant += val
    _digits8(column(10, "<u8", raw), val, w)
    val *= _U8(100)
    mant += val

    raw = column(18, "<u8", raw)  # d17 d18 'e' sign e1 e2
    np.bitwise_and(raw, _TAIL_MASK, out=tmp)
    np.equal(tmp, _TAIL_WANT, out=okt)
    ok &= okt
    np.add(raw, _TAIL_SIXES, out=tmp)
    tmp &= _TAIL_MASK
    np.equal(tmp, _TAIL_WANT, out=okt)
    ok &= okt
    np.bitwise_and(raw, _U8(0x0F), out=val)
    val *= _U8(10)
    mant += val
    np.right_shift(raw, _U8(8), out=val)
    val &= _U8(0x0F)
    mant += val
    # exponent e1 e2 and its sign
    np.right_shift(raw, _U8(32), out=val)
    val &= _U8(0x0F)
    val *= _U8(10)
    np.right_shift(raw, _U8(40), out=tmp)
    tmp &= _U8(0x0F)
    val += tmp
    exp10 = w["exp"]
    np.copyto(exp10, val, casting="unsafe")
    np.right_shift(raw, _U8(24), out=tmp)
    tmp &= _U8(0xFF)
    np.equal(tmp, _MINUS, out=okt)
    np.negative(exp10, out=exp10, where=okt)
    np.logical_or(okt, tmp == _PLUS, out=okt)
    ok &= okt
    exp10 += -18 - _POW10_MIN
    np.clip(exp10, 0, len(_POW10) - 1, out=exp10)

    approx, wide = w["approx"], w["wide"]
    np.copyto(approx, mant, casting="unsafe")
    approx *= _POW10[exp10]
    values = np.empty(n_fields, np.float32)
    np.multiply(approx, _BELOW, out=wide)
    np.copyto(values, wide, casting="same_kind")
    np.multiply(approx, _ABOVE, out=wide)
    f32 = w["f32"]
    np.copyto(f32, wide, casting="same_kind")
    np.equal(values, f32, out=okt)
    ok &= okt
    if neg is not None:
        np.negative(values, out=values, where=neg)
    return values, ok.copy()


def _decode_special(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, values: np.ndarray, ok: np.ndarray
) -> None:
    """Vectorised ``nan``/``inf``/``-inf`` (masked units make NaN common in real files)."""
    n_bytes = ends - starts
    short = (n_bytes == 3) | (n_bytes == 4)
    if not short.any():
        return
    u32 = np.ndarray((len(buf) - 4,), dtype="<u4", buffer=buf, strides=(1,))
    idx = np.flatnonzero(short)
    word = u32[starts[idx]]
    three = n_bytes[idx] == 3
    low3 = word & np.uint32(0xFFFFFF)
    for hit, value in (
        (three & (low3 == _NAN_U32), np.nan),
        (three & (low3 == _INF_U32), np.inf),
        (~three & (word == _NEGINF_U32), -np.inf),
    ):
        values[idx[hit]] = value
        ok[idx[hit]] = True


def _fallback(
    buf: np.ndarray, starts: np.ndarray, ends: np.ndarray, which: np.ndarray, out: np.ndarray
) -> None:
    """Parse the fields the fast path left, one by one, with Python's correctly rounded float."""
    for i in np.flatnonzero(which):
        text = buf[starts[i] : ends[i]].tobytes()
        value = _SPECIAL.get(text)
        if value is None:
            value = _float_or_none(text)
            if value is None:
                raise _FieldError(int(starts[i]), text)
        out[i] = np.float32(value)


def _float_or_none(text: bytes) -> float | None:
    if b"_" in text:  # Python accepts 1_000; CSV readers do not
        return None
    try:
        return float(text)
    except ValueError:
        return None


class _FieldError(Exception):
    """Raised inside a block; turned into FormatError with the line number by the caller."""

    def __init__(self, offset: int, text: bytes):
        super().__init__(offset, text)
        self.offset = offset
        self.text = text

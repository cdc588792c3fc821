"""Streaming %.18e CSV parser: exact float32(float64(text)), widths, line numbers."""

from __future__ import annotations

import io

import numpy as np
import pytest
from nems0_build import raster_csv

from nat4etl.errors import FormatError
from nat4etl.formats import nems0_csv
from nat4etl.formats.nems0_csv import iter_raster_blocks, parse_raster_bytes, read_raster


def reference(text: bytes, n_chans: int) -> np.ndarray:
    """The definition: np.float32(np.float64(field)), C x T."""
    rows = [line.split(b",") for line in text.split(b"\n") if line.strip()]
    with np.errstate(over="ignore"):
        values = [[np.float32(float(f)) for f in row] for row in rows]
    return np.array(values, np.float32).reshape(-1, n_chans).T


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-identical, NaN equal to NaN (the sign of -0.0 counts)."""
    if a.shape != b.shape:
        return False
    nan = np.isnan(a) & np.isnan(b)
    return bool(np.all((a.view(np.uint32) == b.view(np.uint32)) | nan))


def nasty_values(rng: np.random.Generator, n: int) -> np.ndarray:
    """Wide exponents, signs, specials, float32 midpoints and the float32 range edges."""
    f32 = rng.random(n).astype(np.float32)
    midpoints = f32.astype(np.float64) + np.spacing(f32).astype(np.float64) / 2
    return np.concatenate(
        [
            rng.standard_normal(n) * 10.0 ** rng.integers(-45, 45, n),
            rng.standard_normal(n // 4) * 10.0 ** rng.integers(-320, 308, n // 4),
            midpoints,
            -midpoints[: n // 4],
            rng.integers(0, 5, n) / 20.0,
            [0.0, -0.0, np.nan, np.inf, -np.inf, 1.0, 3.4028235677973366e38, 3.4028234e38],
            [1.401298464324817e-45, 7.006492321624085e-46, 7.1e-46, 1e-300, 5e-324],
        ]
    )


@pytest.mark.parametrize("n_chans", [1, 3, 8])
@pytest.mark.parametrize("threads", [1, 2])
def test_matches_float32_of_float64_exactly(n_chans, threads):
    rng = np.random.default_rng(n_chans)
    values = nasty_values(rng, 4000)
    values = values[: len(values) // n_chans * n_chans].reshape(n_chans, -1)
    text = raster_csv(values)
    got = read_raster(io.BytesIO(text), chunk_bytes=1 << 16, threads=threads)
    assert same_bits(got, reference(text, n_chans))


def test_fixed_width_fast_path_and_mixed_rows_agree():
    rng = np.random.default_rng(1)
    data = rng.poisson(0.2, size=(849, 300)).astype(float)
    data[:40, 100:120] = np.nan  # rows of a different width: general path for those blocks
    text = raster_csv(data)
    got = read_raster(io.BytesIO(text), n_chans=849, chunk_bytes=1 << 16)
    assert got.shape == (849, 300)
    assert same_bits(got, data.astype(np.float32))


def test_one_digit_blocks_take_the_digit_path_and_agree(monkeypatch):
    """Spike counts 0-9 (``d.000000000000000000e+00``) skip the general decode; any other
    field in a block, even one differing in a single byte, sends that block to it."""
    calls = {"standard": 0}
    standard = nems0_csv._decode_standard

    def counted(*args, **kwargs):
        calls["standard"] += 1
        return standard(*args, **kwargs)

    monkeypatch.setattr(nems0_csv, "_decode_standard", counted)
    counts = np.random.default_rng(2).integers(0, 10, size=(64, 400)).astype(float)
    text = raster_csv(counts)
    assert same_bits(read_raster(io.BytesIO(text)), counts.astype(np.float32))
    assert calls["standard"] == 0
    near = [10.0, 0.5, 1.0 + 2.0**-40, 3e-18, 7e20, -2.0]  # one field differs from 'd.0...0e+00'
    for value in near:
        changed = counts.copy()
        changed[5, 7] = value
        text = raster_csv(changed)
        before = calls["standard"]
        got = read_raster(io.BytesIO(text))
        assert same_bits(got, reference(text, 64)), value
        assert calls["standard"] > before, value


@pytest.mark.parametrize("offset", [0, 1, 2, 9, 17, 19, 20, 21, 22, 23])
def test_a_corrupted_byte_in_a_digit_block_is_not_accepted(offset):
    text = bytearray(raster_csv(np.ones((3, 4))))
    text[25 + offset] = ord("x")  # second field of the first row
    with pytest.raises(FormatError, match="line 1: not a number"):
        parse_raster_bytes(bytes(text))


def placed(blocks: list, n_chans: int) -> np.ndarray:
    out = np.zeros((n_chans, sum(len(b) for b in blocks)), np.float32)
    row = 0
    for block in blocks:
        nems0_csv.place_rows(out, row, block)
        row += len(block)
    return out


def test_blocks_of_mostly_zero_counts_come_sparse_and_place_exactly():
    counts = np.random.default_rng(3).poisson(0.1, size=(849, 400)).astype(float)
    text = raster_csv(counts)
    blocks = list(iter_raster_blocks(io.BytesIO(text), chunk_bytes=1 << 16, sparse=True))
    assert all(isinstance(b, nems0_csv.SparseRows) for b in blocks)
    assert same_bits(placed(blocks, 849), counts.astype(np.float32))
    # by default, and in read_raster, the same values come as arrays
    dense = list(iter_raster_blocks(io.BytesIO(text), chunk_bytes=1 << 16))
    assert all(isinstance(b, np.ndarray) and b.dtype == np.float32 for b in dense)
    assert same_bits(np.concatenate(dense).T, counts.astype(np.float32))
    assert same_bits(read_raster(io.BytesIO(text), chunk_bytes=1 << 16), counts.astype(np.float32))


def test_blocks_of_many_counts_come_as_arrays_even_when_sparse_is_allowed():
    counts = np.random.default_rng(4).integers(1, 10, size=(30, 500)).astype(float)
    counts[:, ::3] = 0  # a third zeros: too many others for SparseRows
    text = raster_csv(counts)
    blocks = list(iter_raster_blocks(io.BytesIO(text), chunk_bytes=1 << 16, sparse=True))
    assert all(isinstance(b, np.ndarray) for b in blocks)
    assert same_bits(placed(blocks, 30), counts.astype(np.float32))


def test_sparse_blocks_mixed_with_other_blocks_keep_file_order():
    counts = np.random.default_rng(5).poisson(0.05, size=(400, 600)).astype(float)
    counts[7, 250:260] = 0.25  # blocks with a fraction: decoded in full
    counts[9, 400] = np.nan  # a block of another width: fields located first
    text = raster_csv(counts)
    blocks = list(iter_raster_blocks(io.BytesIO(text), chunk_bytes=1 << 16, sparse=True))
    kinds = {type(b) for b in blocks}
    assert kinds == {nems0_csv.SparseRows, np.ndarray}
    assert same_bits(placed(blocks, 400), counts.astype(np.float32))


def test_the_zero_check_puts_the_lead_digits_back_before_an_error():
    """The lead digits are zeroed for the memcmp; a block that fails it is reported (and
    decoded) from its own bytes."""
    counts = np.full((4, 3), 3.0)
    text = bytearray(raster_csv(counts))
    text[25 + 9] = ord("x")  # second field of row 1: '3.0000000x...'
    with pytest.raises(FormatError, match=r"line 1: not a number: '3\.0000000x"):
        parse_raster_bytes(bytes(text))


def test_sparse_rows_place_into_a_view_with_spaced_rows():
    counts = np.zeros((6, 5))
    counts[2, 3], counts[5, 0] = 4.0, 1.0
    (block,) = iter_raster_blocks(io.BytesIO(raster_csv(counts)), sparse=True)
    assert isinstance(block, nems0_csv.SparseRows) and len(block) == 5
    room = np.zeros((6, 20), np.float32)
    nems0_csv.place_rows(room[:, 10:], 2, block)  # not contiguous: rows 20 values apart
    expected = np.zeros((6, 20), np.float32)
    expected[:, 12:17] = counts
    assert same_bits(room, expected)
    assert same_bits(block.toarray(), counts.T.astype(np.float32))


def test_blocks_stream_in_file_order():
    data = np.arange(5 * 2000, dtype=float).reshape(5, 2000) / 7
    text = raster_csv(data)
    blocks = list(iter_raster_blocks(io.BytesIO(text), chunk_bytes=1 << 16, threads=2))
    assert len(blocks) > 1
    assert all(b.dtype == np.float32 and b.shape[1] == 5 for b in blocks)
    assert same_bits(np.concatenate(blocks).T, data.astype(np.float32))


def test_other_spellings_fall_back_to_float():
    text = b"1,0.5,-2\n1e5,  2.5,+inf\nNaN,-0,3.000000000000000000e+100\n"
    got = parse_raster_bytes(text)
    assert same_bits(got, reference(text, 3))


def test_crlf_and_missing_final_newline_and_blank_lines():
    text = b"1.000000000000000000e+00,2.000000000000000000e+00\r\n\n3.0,4.0"
    got = parse_raster_bytes(text)
    np.testing.assert_array_equal(got, [[1, 3], [2, 4]])


def test_empty_input():
    assert read_raster(io.BytesIO(b""), n_chans=4).shape == (4, 0)
    assert read_raster(io.BytesIO(b"")).shape == (0, 0)


def test_boolean_mask_reads_back_as_float():
    mask = np.array([[True, False, True]])
    got = parse_raster_bytes(raster_csv(mask))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, [[1.0, 0.0, 1.0]])


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (b"1,2,3\n4,5\n", 2),
        (b"1,2,3\n4,5,6\n7,8,9,10\n", 3),
        (b"1,2,3\n,\n", 2),
    ],
)
def test_width_mismatch_names_member_and_line(text, line):
    with pytest.raises(FormatError) as info:
        parse_raster_bytes(text, path="/x/A1.tgz", member="R/R.resp.csv")
    msg = str(info.value)
    assert msg.startswith("A1.tgz:R/R.resp.csv: ")
    assert f"line {line}" in msg
    assert "\n" not in msg


def test_width_against_json_chans():
    text = raster_csv(np.zeros((3, 4)))
    with pytest.raises(FormatError, match=r"line 1: expected 2 columns, got 3"):
        parse_raster_bytes(text, n_chans=2, member="R/R.resp.csv")


def test_width_mismatch_deep_in_a_big_file_reports_the_right_line():
    data = np.ones((4, 30000))
    text = raster_csv(data) + b"1,2,3\n"
    with pytest.raises(FormatError, match="line 30001:"):
        read_raster(io.BytesIO(text), chunk_bytes=1 << 16, threads=2)


@pytest.mark.parametrize(
    "na", [b"NA", b"N/A", b"NULL", b"null", b"#N/A", b"<NA>", b"None", b"-1.#IND", b"NaN"]
)
def test_pandas_na_spellings_are_nan_as_nems0_reads_them(na):
    """NEMS0 reads the data with pd.read_csv, whose default na_values these are."""
    text = b"1.0,2.0\n3.0," + na + b"\n" + b"5.000000000000000000e+00,6.0\n"
    got = parse_raster_bytes(text, member="R/R.resp.csv")
    assert got.shape == (2, 3)
    assert np.isnan(got[1, 1]) and np.count_nonzero(np.isnan(got)) == 1
    np.testing.assert_array_equal(got[:, [0, 2]], [[1.0, 5.0], [2.0, 6.0]])


@pytest.mark.parametrize("bad", [b"abc", b"1_000", b"1.0.0", b"0x10", b"--1", b"na", b"N/A N"])
def test_non_numbers_are_format_errors(bad):
    text = b"1.0,2.0\n3.0," + bad + b"\n"
    with pytest.raises(FormatError, match="line 2: not a number"):
        parse_raster_bytes(text, member="R/R.resp.csv")


def test_corrupted_fixed_width_digit_is_not_silently_accepted():
    text = bytearray(raster_csv(np.full((2, 3), 0.5)))
    text[10] = ord("x")  # inside the 18 fraction digits of the first field
    with pytest.raises(FormatError, match="line 1: not a number"):
        parse_raster_bytes(bytes(text))


def test_long_first_line_longer_than_a_chunk():
    data = np.random.default_rng(3).random((6000, 2))
    got = read_raster(io.BytesIO(raster_csv(data)), chunk_bytes=1 << 16)
    assert same_bits(got, data.astype(np.float32))


def test_reader_without_readinto():
    class ReadOnly:
        def __init__(self, data):
            self._buf = io.BytesIO(data)

        def read(self, n=-1):
            return self._buf.read(min(n, 777) if n and n > 0 else n)

    data = np.arange(12.0).reshape(3, 4)
    got = read_raster(ReadOnly(raster_csv(data)))
    np.testing.assert_array_equal(got, data)


def test_stream_error_propagates_from_the_reader_thread():
    class Broken(io.RawIOBase):
        def readable(self):
            return True

        def readinto(self, b):
            raise FormatError("boom", member="R/R.resp.csv")

    with pytest.raises(FormatError, match="boom"):
        read_raster(Broken())


def test_bad_n_chans_argument():
    with pytest.raises(FormatError):
        parse_raster_bytes(b"1\n", n_chans=0)


def test_block_size_is_cache_sized():
    assert nems0_csv._BLOCK_BYTES <= 4 << 20


def test_a_line_without_end_is_bounded(monkeypatch):
    monkeypatch.setattr(nems0_csv, "_MAX_LINE_BYTES", 1 << 18)
    with pytest.raises(FormatError, match="no line end within 262144 bytes"):
        read_raster(io.BytesIO(b"1," * (1 << 18)), chunk_bytes=1 << 16)


def test_many_small_chunks_reuse_buffers_safely():
    rng = np.random.default_rng(5)
    data = rng.poisson(0.5, size=(849, 400)).astype(float)
    data[::7, ::11] = np.nan
    text = raster_csv(data)
    got = read_raster(io.BytesIO(text), chunk_bytes=1 << 16, threads=2)
    assert same_bits(got, data.astype(np.float32))


def test_chunk_buffers_are_made_once_whatever_the_carried_lines():
    """Each pooled buffer has room for a carried partial line: one made for a short carry
    is not made again when a longer one comes (A1: 26 fresh 16 MiB buffers for 5)."""
    rng = np.random.default_rng(8)
    data = rng.poisson(0.5, size=(3000, 40)).astype(float)
    data[rng.random(data.shape) < 0.3] = np.nan  # 'nan' fields: lines of many lengths
    text = raster_csv(data)
    state = nems0_csv._State(n_chans=None, path=None, member=None)
    chunks = nems0_csv._read_chunks(io.BytesIO(text), 1 << 16, n_buffers=3, state=state)
    made, lines = set(), b""
    for buf, n_bytes in chunks:
        made.add(buf.__array_interface__["data"][0])
        lines += buf[:n_bytes].tobytes()
    assert len(made) == 3  # one per pool slot
    assert lines == text  # and every byte once, in order


@pytest.mark.parametrize("threads", [1, 2])
def test_cr_only_line_ends_read_as_pandas_reads_them(threads):
    """Old Mac line ends (a lone CR), across many chunks, with a blank line and no final
    line end: the same values as the LF file."""
    rng = np.random.default_rng(7)
    data = nasty_values(rng, 4000)[:6000].reshape(-1, 3)
    text = raster_csv(data.T)
    lf = read_raster(io.BytesIO(text), chunk_bytes=1 << 16, threads=threads)
    cr = text.replace(b"\n", b"\r")
    cr = cr.replace(b"\r", b"\r\r", 1)[:-1]  # a blank line; the last line unterminated
    got = read_raster(io.BytesIO(cr), chunk_bytes=1 << 16, threads=threads)
    assert same_bits(got, lf) and got.shape == (3, len(data))


def test_a_cr_inside_an_lf_file_is_still_an_error():
    text = b"1.0,2.0\n3.0\r4.0\n"
    with pytest.raises(FormatError, match="line 2"):
        parse_raster_bytes(text)


def _savetxt(data_tc: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savetxt(buf, data_tc, fmt="%.18e", delimiter=",")
    return buf.getvalue()


@pytest.mark.parametrize(
    "text",
    [
        _savetxt(np.full((5, 1), -np.inf)),  # 5-byte rows: '\n' every 25th byte
        _savetxt(np.full((5, 3), -np.inf)),  # 15-byte rows: ',' ',' '\n' on the slots
        _savetxt(np.array([[0.5] + [-np.inf] * 5 + [0.25] + [-np.inf] * 10]).T),
        _savetxt(np.array([[0.5, -np.inf, -np.inf, -np.inf, -np.inf, -np.inf] * 40]).T),
        b",,\n" * 25,  # empty fields, NaN to pandas
    ],
    ids=["inf-column", "inf-rows", "runs-of-inf", "runs-of-inf-many", "empty-fields"],
)
@pytest.mark.parametrize("threads", [1, 2])
def test_rows_whose_delimiters_fall_every_25th_byte_are_not_taken_for_fixed_width(text, threads):
    """np.savetxt writes -inf in 4 bytes: five such rows are 25 bytes with a delimiter in
    every 25th, as fixed-width rows have; they were read as 24-byte fields ('not a number:
    "-inf\\n-inf\\n..."'), so a signal with runs of -inf could not be read."""
    n_chans = text.split(b"\n")[0].count(b",") + 1
    assert len(text) % (25 * n_chans) == 0
    if text.startswith(b","):
        want = np.full((3, 25), np.nan, np.float32)
    else:
        want = reference(text, n_chans)
    got = read_raster(io.BytesIO(text), threads=threads)
    assert same_bits(got, want)

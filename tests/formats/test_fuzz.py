"""Hypothesis fuzzing: every reader returns a result or raises FormatError, nothing else.

Inputs are random bytes and mutations (flips, truncations, insertions) of valid files
built the way NEMS0 writes them. ``FUZZ_EXAMPLES`` raises the example count locally.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nems0_build import (
    POINT_TYPE,
    epoch_csv,
    h5_bytes,
    raster_csv,
    signal_json,
    simple_recording,
    tar_bytes,
    zip_bytes,
)

from nat4etl.errors import FormatError
from nat4etl.formats import archive, nems0, nems0_csv, nems0_h5, pred_correlation, wav

N = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=N,
    deadline=None,
    derandomize=os.environ.get("FUZZ_EXAMPLES") is None,  # stable in CI, random when asked
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
pytestmark = pytest.mark.timeout(120)

LIMITS = archive.Limits(
    max_member_bytes=64 << 20, max_total_bytes=256 << 20, ratio_floor_bytes=1 << 20
)


@st.composite
def mutated(draw, valid: bytes) -> bytes:
    """A valid file with a few byte flips, an insertion or deletion, maybe truncated."""
    data = bytearray(valid)
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        pos = draw(st.integers(0, len(data) - 1))
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[pos : pos + draw(st.integers(1, 8))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


def outcome(fn, *args, **kwargs):
    """Run a reader; FormatError is an accepted outcome, anything else fails the test."""
    try:
        return fn(*args, **kwargs)
    except FormatError as err:
        msg = str(err)
        assert msg and "\n" not in msg
        return err


# --- rasterized CSV ------------------------------------------------------------------------

CSV = raster_csv(np.array([[0.0, 1.5, np.nan, -2.0], [1e-300, np.inf, 0.25, 3.0]]))
CSV_ALPHABET = st.sampled_from(list(b"0123456789.,e+-\nnaif \r"))


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=400), mutated(CSV), st.lists(CSV_ALPHABET, max_size=300).map(bytes)
    )
)
def test_fuzz_raster_csv(data):
    got = outcome(nems0_csv.parse_raster_bytes, data, member="R/R.resp.csv")
    if isinstance(got, np.ndarray):
        assert got.dtype == np.float32 and got.ndim == 2


@FUZZ
@given(
    st.lists(st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1, max_size=60),
    st.integers(1, 4),
)
def test_fuzz_raster_csv_values_exact(values, n_chans):
    arr = np.array(values[: len(values) // n_chans * n_chans] or [0.0] * n_chans).reshape(
        n_chans, -1
    )
    got = nems0_csv.parse_raster_bytes(raster_csv(arr), n_chans=n_chans)
    with np.errstate(over="ignore"):
        want = arr.astype(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all()


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.integers(0, 9).map(float),  # spike counts: the digit path
            st.integers(0, 9).map(float),
            st.integers(0, 9).map(float),
            st.floats(allow_nan=True, allow_infinity=True, width=64),
        ),
        min_size=1,
        max_size=400,
    ),
    st.integers(1, 8),
    st.integers(0, 1),
)
def test_fuzz_mostly_digit_blocks_exact(values, n_chans, threads):
    """Blocks of one-digit counts with now and then any other float: whichever decode a
    block takes, every value is float32(float64(text))."""
    arr = np.array(values[: len(values) // n_chans * n_chans] or [0.0] * n_chans).reshape(
        n_chans, -1
    )
    got = nems0_csv.read_raster(
        io.BytesIO(raster_csv(arr)), n_chans=n_chans, chunk_bytes=1 << 10, threads=1 + threads
    )
    with np.errstate(over="ignore"):
        want = arr.astype(np.float32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    assert same.all()


# --- JSON and epochs -----------------------------------------------------------------------

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**20), 10**20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
NDARRAY_LIKE = st.fixed_dictionaries(
    {
        "__ndarray__": st.one_of(JSON_VALUES, st.text(max_size=12)),
        "dtype": st.one_of(
            st.sampled_from(["float64", "int8", "bool", "<U3", "V8", "O", "complex64", "x"]),
            JSON_SCALARS,
        ),
        "shape": st.one_of(st.lists(st.integers(-2, 4), max_size=3), JSON_SCALARS),
    }
)
SIGNAL_KEYS = st.fixed_dictionaries(
    {},
    optional={
        "name": JSON_VALUES,
        "fs": JSON_VALUES,
        "meta": JSON_VALUES,
        "recording": JSON_VALUES,
        "chans": JSON_VALUES,
        "segments": JSON_VALUES,
        "signal_type": st.one_of(JSON_VALUES, st.just("PointProcess")),
    },
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        mutated(signal_json("resp", chans=["a"], segments=[[0, 1]])),
        SIGNAL_KEYS.map(lambda d: json.dumps(d).encode()),
    )
)
def test_fuzz_signal_json(data):
    got = outcome(nems0.parse_signal_json, data, member="R/R.resp.json")
    if isinstance(got, nems0.SignalHeader):
        assert got.fs_hz > 0 and isinstance(got.name, str)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=200),
        st.lists(NDARRAY_LIKE, max_size=3).map(lambda v: json.dumps({"x": v}).encode()),
    )
)
def test_fuzz_meta_json(data):
    outcome(nems0.parse_meta_json, data, member="R/R.meta.json")


EPOCHS = epoch_csv(
    [("TRIAL", 0.0, 1.5), ("STIM_a, b.wav", 0.25, 1.25), ("NA", float("nan"), 2.0)],
    ("start", "end", "name"),
)


@FUZZ
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated(EPOCHS),
        st.text(alphabet='name,startd"\n0.51x\r', max_size=120).map(str.encode),
    )
)
def test_fuzz_epochs(data):
    got = outcome(nems0.read_epochs, data, member="R/R.resp.epoch.csv")
    if not isinstance(got, FormatError):
        assert got.column_names[:3] == ["name", "start_s", "end_s"]


# --- HDF5, wav, pred_correlation -----------------------------------------------------------

H5 = h5_bytes({"cellB": [0.1, 0.2], "cellA": [0.3]})


@FUZZ
@given(st.one_of(st.binary(max_size=300), mutated(H5)))
def test_fuzz_h5(data):
    got = outcome(nems0_h5.read_point_process, data, member="R/R.resp.h5")
    if isinstance(got, dict):
        assert list(got) == sorted(got)


def _wav() -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, np.linspace(-1, 1, 200).reshape(100, 2), 44100, format="WAV")
    return buf.getvalue()


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(_wav())))
def test_fuzz_wav(data):
    outcome(wav.read_wav, data, member="wav/x.wav")


PRED = b"cellid,r_test,sig_auditory\nA-01-1,0.5,True\nB-02-1,,False\n"


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(PRED)))
def test_fuzz_pred_correlation(data):
    outcome(pred_correlation.read_pred_correlation, data, path="A1_pred_correlation.csv")


# --- archives and whole recordings ---------------------------------------------------------

SMALL = [
    ("R/R.resp.csv", CSV),
    ("R/R.resp.json", signal_json("resp")),
    ("R/R.resp.epoch.csv", EPOCHS),
]
ARCHIVES = [tar_bytes(SMALL), tar_bytes(SMALL, gz=False), zip_bytes(SMALL)]


def read_all(data: bytes) -> dict[str, bytes]:
    return {m.name: m.read() for m in archive.iter_members(data, path="fuzz.tgz", limits=LIMITS)}


@FUZZ
@given(st.one_of(st.binary(max_size=300), st.sampled_from(ARCHIVES).flatmap(mutated)))
def test_fuzz_archive(data):
    outcome(read_all, data)


RECORDING, _ = simple_recording()
PP_RECORDING = tar_bytes(
    [
        ("S/S.resp.h5", H5),
        ("S/S.resp.json", signal_json("resp", recording="S", signal_type=POINT_TYPE)),
        ("S/S.resp.epoch.csv", EPOCHS),
    ]
)


@FUZZ
@given(st.one_of(mutated(RECORDING), mutated(PP_RECORDING), mutated(tar_bytes(SMALL, gz=False))))
def test_fuzz_recording(data):
    got = outcome(nems0.read_recording, data, path="fuzz.tgz", limits=LIMITS, threads=1)
    if isinstance(got, nems0.Recording):
        assert all(isinstance(s, nems0.Signal) for s in got.signals.values())


@FUZZ
@given(mutated(tar_bytes([(f"R/{n}", d) for n, d in SMALL], gz=False)))
def test_fuzz_plain_tar_members_never_escape(data):
    got = outcome(read_all, data)
    if isinstance(got, dict):
        assert all(".." not in name.split("/") and not name.startswith("/") for name in got)

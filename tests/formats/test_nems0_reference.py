"""The readers against recordings written the way the reference library (LBHB/NEMS0) writes
them (modelled in nems0_reference), each checked against an independent reading of the
same bytes with numpy, h5py, json and csv."""

from __future__ import annotations

import csv
import io
import json
import math
import ntpath
import tarfile

import numpy as np
import pytest
from nems0_reference import Epochs, Sig, as_targz, file_streams, raster_csv, save_dir, to_csv

from nat4etl.formats.nems0 import read_epochs, read_recording

RESP_CHANS = ["TNC015a-01-1", "TNC015a-02-1", "TNC015a-07-2"]


# --- independent readings ------------------------------------------------------------------


def tar_members(data: bytes) -> dict[str, bytes]:
    """Every regular member by name, read with tarfile as the reference loader does."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def numpy_raster(text: bytes) -> np.ndarray:
    """C x T float32 through numpy's own CSV parser (the writer's inverse)."""
    values = np.loadtxt(io.BytesIO(text), delimiter=",", ndmin=2, dtype=np.float64)
    with np.errstate(over="ignore"):  # 1e300 -> inf in float32, as the reader gives
        return values.T.astype(np.float32)


def h5py_datasets(data: bytes) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(io.BytesIO(data), "r") as f:
        return {key: f[key][()] for key in f}


def csv_epochs(text: bytes) -> dict[str, list]:
    rows = list(csv.DictReader(io.StringIO(text.decode(), newline="")))

    def num(v: str) -> float:
        return float(v) if v else math.nan

    return {
        "name": [r["name"] for r in rows],
        "start_s": [num(r["start"]) for r in rows],
        "end_s": [num(r["end"]) for r in rows],
    }


def assert_same_floats(got: list, want: list) -> None:
    np.testing.assert_array_equal(np.array(got, np.float64), np.array(want, np.float64))


def assert_matches_members(rec, members: dict[str, bytes], view: int = 0) -> None:
    """Each signal of a view equals the independent reading of its own members."""
    for sig in rec.views[view].values():
        header = json.loads(members[sig.json_member])
        assert sig.name == header["name"] and sig.header.recording == header["recording"]
        assert sig.fs_hz == float(header["fs"])
        assert sig.header.chans == (tuple(header["chans"]) if header["chans"] else None)
        np.testing.assert_array_equal(sig.header.segments, np.array(header["segments"], float))
        assert sig.header.raw == header
        data = members[sig.data_member]
        if sig.data_kind == "csv":
            want = numpy_raster(data)
            assert sig.data.dtype == np.float32 and sig.data.shape == want.shape
            np.testing.assert_array_equal(sig.data, want)
            assert np.array_equal(np.signbit(sig.data), np.signbit(want))
        else:
            want = h5py_datasets(data)
            assert list(sig.data) == sorted(want)
            for key, arr in want.items():
                assert sig.data[key].dtype == np.float64
                np.testing.assert_array_equal(sig.data[key], arr.astype(np.float64))
        want_epochs = csv_epochs(members[sig.epoch_member])
        got = sig.epochs.to_pydict()
        assert got["name"] == want_epochs["name"]
        assert_same_floats(got["start_s"], want_epochs["start_s"])
        assert_same_floats(got["end_s"], want_epochs["end_s"])


# --- recordings ----------------------------------------------------------------------------


def trial_epochs() -> Epochs:
    """baphy-style order (name,start,end), times rounded to 5 decimals, a quoted name."""
    return Epochs(
        ("name", "start", "end"),
        [
            ("TRIAL", 0.0, 0.3),
            ("STIM_00cat172_rec1_geese_excerpt1.wav", 0.05, 0.25),
            ("PreStimSilence", 0.05, 0.1),
            ("STIM_a, b.wav", 0.1, 0.2),
            ("TRIAL", 0.3, 0.6),
        ],
    )


def reference_views(rng: np.random.Generator) -> list[dict[str, Sig]]:
    resp = rng.poisson(0.4, size=(3, 60)).astype(np.float64)
    resp[1, 10:14] = np.nan
    resp[0, 3], resp[2, 4], resp[0, 5] = np.inf, -np.inf, -0.0
    stim = rng.random((2, 60)).astype(np.float32)  # float32 data: '%.18e' of the float32
    mask = np.zeros((1, 60), dtype=bool)
    mask[0, 20:] = True
    spikes = {
        "TNC015a-07-2": np.sort(rng.random(9)) * 0.6,
        "TNC015a-01-1": np.array([], np.float64),  # a unit that never fired
        "TNC015a-02-1": (np.sort(rng.random(4)) * 0.6).astype(np.float32),
    }
    epochs = trial_epochs()
    return [
        {
            "resp": Sig("raster", "resp", resp, chans=RESP_CHANS, epochs=epochs, meta={"a": 1}),
            "stim": Sig("raster", "stim", stim, epochs=epochs),
            # create_mask: a one-row bool copy of the first signal, chans and all
            "mask": Sig("raster", "mask", mask, chans=RESP_CHANS, epochs=epochs),
            "spikes": Sig("point", "spikes", spikes, fs=1000, chans=list(spikes), epochs=epochs),
        }
    ]


@pytest.mark.parametrize(
    "tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["py38+", "py37"]
)
def test_as_targz_recording_reads_back_as_written(tar_format):
    views = reference_views(np.random.default_rng(1))
    meta = {"siteid": "TNC015a", "rawid": np.array([123, 456]), "rasterfs": 100}
    data = as_targz("TNC015a", meta, views, tar_format=tar_format)
    members = tar_members(data)
    assert list(members)[0] == "TNC015a/TNC015a.meta.json"
    assert list(members)[1:4] == [
        "TNC015a/R.resp.csv",  # data before its JSON, as the writer orders them
        "TNC015a/R.resp.json",
        "TNC015a/R.resp.epoch.csv",
    ]

    rec = read_recording(data, path="A1_TNC015a_abc.tgz")
    assert rec.name == "R"  # from the signals' recording, not the directory
    assert list(rec.signals) == ["resp", "stim", "mask", "spikes"]
    assert rec.skipped == [] and len(rec.views) == 1
    assert rec.meta["rawid"].tolist() == [123, 456] and rec.meta["siteid"] == "TNC015a"
    assert_matches_members(rec, members)
    # the spot checks the independent reading cannot show
    assert rec.signals["mask"].data.tolist() == [[0.0] * 20 + [1.0] * 40]
    assert rec.signals["spikes"].data["TNC015a-01-1"].shape == (0,)
    assert rec.signals["resp"].header.segments.tolist() == [[0.0, 60.0]]
    assert rec.signals["spikes"].header.segments.tolist() == [[0.0, 600.0]]


def test_mask_sidecar_lists_the_base_signal_chans():
    """``create_mask`` copies the first signal's chans onto a one-row mask: the data's
    width wins and the JSON chans stay as written, whichever member comes first."""
    sig = Sig("raster", "mask", np.ones((1, 30), dtype=bool), chans=RESP_CHANS)
    members = {f"R/{name}": body for name, body in file_streams(sig)}
    for order in (members, dict(reversed(list(members.items())))):
        got = read_recording(rewrap(order, lambda n: n)).signals["mask"]
        assert got.data.tolist() == [[1.0] * 30]
        assert got.header.chans == tuple(RESP_CHANS)


@pytest.mark.parametrize(
    ("shape", "lines"),
    [((1, 7), 7), ((4, 1), 1), ((1, 1), 1)],
    ids=["one-channel", "one-sample", "one-value"],
)
def test_single_channel_and_single_sample_csv(shape, lines):
    data = np.arange(np.prod(shape), dtype=np.float64).reshape(shape) / 3
    sig = Sig("raster", "x", data, chans=[f"c{i}" for i in range(shape[0])])
    text = raster_csv(data)
    assert text.count(b"\n") == lines and (b"," in text) == (shape[0] > 1)
    rec = read_recording(as_targz("R", {}, [{"x": sig}]))
    got = rec.signals["x"].data
    assert got.shape == shape
    np.testing.assert_array_equal(got, numpy_raster(text))


@pytest.mark.parametrize(
    "data",
    [
        np.array([[np.nan, np.inf, -np.inf, -0.0, 0.0, 1e300, -5e-324, 1.5e-310]]),
        np.array([[np.nan, np.inf, -np.inf, -0.0, 0.0, 1e300, -5e-324, 1.5e-310]]).T,
        np.array([[True, False, True], [False, False, True]]),
        np.array([[3, -2, 0], [2**40, 7, -(2**53) + 1]], dtype=np.int64),
        np.array([[0.1, 1 / 3, 3.4e38, 1e-45]], dtype=np.float32),
        np.array([[0.5] + [-np.inf] * 5 + [0.25] + [-np.inf] * 10]),  # log of silence
    ],
    ids=["specials-one-channel", "specials-one-sample", "bool", "int64", "float32", "inf-runs"],
)
def test_csv_values_and_dtypes_as_savetxt_spells_them(data):
    text = raster_csv(data)
    rec = read_recording(as_targz("R", {}, [{"x": Sig("raster", "x", data)}]))
    got = rec.signals["x"].data
    want = numpy_raster(text)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(np.signbit(got), np.signbit(want))
    if data.dtype == np.float32:  # '%.18e' keeps every float32 exactly
        np.testing.assert_array_equal(got, data)


@pytest.mark.parametrize(
    ("changes", "kind", "want_type"),
    [
        ({"signal_type": None}, "raster", "rasterized"),  # key absent: Rasterized
        ({"signal_type": "<class 'nems.signal.RasterizedSignal'>"}, "raster", "rasterized"),
        ({"signal_type": "<class 'nems.signal.PointProcess'>"}, "point", "point_process"),
        ({"fs": 100.0, "chans": None}, "raster", "rasterized"),
        ({"fs": np.float64(1000.0)}, "point", "point_process"),  # json writes 1000.0
        ({"segments": [[0.0, 0.25], [0.5, 0.75]]}, "raster", "rasterized"),
        ({"meta": {"gain": math.nan, "lim": math.inf, "who": "r\u00e9c"}}, "raster", "rasterized"),
    ],
    ids=["no-type", "old-raster", "old-point", "float-fs", "np-fs", "segments", "meta-nan"],
)
def test_sidecar_variants(changes, kind, want_type):
    data = np.ones((2, 100)) if kind == "raster" else {"u": np.array([0.1, 0.2])}
    sig = Sig(kind, "s", data, epochs=Epochs.added("TRIAL", [(0, 1)]), **changes)
    archive = as_targz("R", {}, [{"s": sig}])
    header = read_recording(archive).signals["s"].header
    raw = json.loads(tar_members(archive)["R/R.s.json"])
    assert header.signal_type == want_type
    assert header.fs_hz == float(raw["fs"]) and header.raw == raw
    np.testing.assert_array_equal(header.segments, np.array(raw["segments"], float))
    if "meta" in changes:
        assert math.isnan(header.meta["gain"]) and header.meta["lim"] == math.inf
        assert header.meta["who"] == "r\u00e9c"


@pytest.mark.parametrize("lineterminator", ["\n", "\r\n"], ids=["posix", "windows"])
def test_epoch_csv_as_pandas_writes_it(lineterminator):
    """add_epoch's start,end,name order, extra columns, a leftover index column, names
    with commas, quotes and line breaks, NaN times, integer times."""
    epochs = Epochs(
        ("Unnamed: 0", "start", "end", "name", "stim_rep"),
        [
            (0, 0.0, 1.5, "STIM_a, b.wav", 1),
            (1, 75.80000000000001, math.nan, 'say "hi"', 2),
            (2, math.nan, 2.0, "two\nlines", math.nan),
            (3, 3, 4, "NA", 1),
            (4, 1e-05, 1.5e20, "", 1),
        ],
    )
    text = to_csv(epochs, lineterminator=lineterminator)
    got = read_epochs(text, member="R/R.x.epoch.csv")
    assert got.column_names == ["name", "start_s", "end_s", "stim_rep"]
    rows = list(csv.reader(io.StringIO(text.decode(), newline="")))
    assert got.column("name").to_pylist() == [r[3] for r in rows[1:]]
    assert got.column("stim_rep").to_pylist() == [r[4] for r in rows[1:]]
    want_start = [float(r[1]) if r[1] else math.nan for r in rows[1:]]
    want_end = [float(r[2]) if r[2] else math.nan for r in rows[1:]]
    assert_same_floats(got.column("start_s").to_pylist(), want_start)
    assert_same_floats(got.column("end_s").to_pylist(), want_end)
    assert got.column("name").to_pylist()[2] == "two\nlines"


H5_OPTIONS = [
    {"compression": "gzip"},
    {},
    {"compression": "gzip", "compression_opts": 1, "shuffle": True, "fletcher32": True},
    {"compression": "lzf"},
]


@pytest.mark.parametrize("options", H5_OPTIONS, ids=["gzip", "contiguous", "filters", "lzf"])
def test_point_process_h5_as_h5py_writes_it(options):
    spikes = {
        "z-9": np.array([0.5, 0.1, 0.3]),  # kept as stored, not sorted
        "a-1": np.array([], np.float64),
        "B-2": np.array([0.25, 0.75], np.float32),
        "m-3": [0.125],  # a list becomes a float64 dataset
    }
    sig = Sig("point", "resp", spikes, fs=1000, chans=list(spikes), h5_options=options)
    sig.epochs = Epochs.added("TRIAL", [(0, 1)])
    archive = as_targz("R", {}, [{"resp": sig}])
    rec = read_recording(archive)
    assert list(rec.signals["resp"].data) == ["B-2", "a-1", "m-3", "z-9"]
    assert_matches_members(rec, tar_members(archive))


def test_tiled_stim_as_h5py_writes_it():
    tiles = {
        "STIM_b.wav": np.arange(18 * 5, dtype=np.float32).reshape(18, 5),
        "STIM_a.wav": np.zeros((18, 3)),
        "STIM_c.wav": np.zeros((18, 0)),
    }
    sig = Sig("tiled", "stim", tiles, epochs=Epochs.added("STIM_a.wav", [(0, 0.03)]))
    archive = as_targz("R", {}, [{"stim": sig}])
    rec = read_recording(archive)
    got = rec.signals["stim"]
    assert got.signal_type == "tiled" and got.header.chans is None
    assert {k: v.shape for k, v in got.data.items()} == {
        "STIM_a.wav": (18, 3),
        "STIM_b.wav": (18, 5),
        "STIM_c.wav": (18, 0),
    }
    assert_matches_members(rec, tar_members(archive))


def test_member_names_windows_writer_and_other_directory_name():
    """``os.path.join`` on Windows gives ``R\\R.resp.csv``; ``Recording.name`` may differ
    from the signals' recording (the directory is the former, file names the latter)."""
    views = [{"resp": Sig("raster", "resp", np.ones((2, 5)), recording="TNC015a")}]
    for archive in (
        as_targz("A1_TNC015a", {"x": 1}, views, join=ntpath.join),
        as_targz("A1_TNC015a", {"x": 1}, views),
    ):
        rec = read_recording(archive)
        assert rec.name == "TNC015a" and rec.meta == {"x": 1} and rec.skipped == []
        assert rec.signals["resp"].data.shape == (2, 5)


def rewrap(members: dict[str, bytes], rename, *, dirs: tuple[str, ...] = ()) -> bytes:
    """The same files re-tarred by hand (``tar czf``): renamed, with directory entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for name, body in members.items():
            info = tarfile.TarInfo(rename(name))
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


@pytest.mark.parametrize(
    ("rename", "dirs"),
    [
        (lambda n: "./" + n, (".", "./R")),
        (lambda n: n.split("/", 1)[1], ()),
        (lambda n: "out/" + n, ("out", "out/R")),
    ],
    ids=["dot-slash", "flat", "nested"],
)
def test_rewrapped_archive_with_prefixes_and_directory_entries(rename, dirs):
    views = reference_views(np.random.default_rng(2))
    members = tar_members(as_targz("R", {"k": [1, 2]}, views))
    reordered = dict(reversed(list(members.items())))  # meta last, JSON before data
    rec = read_recording(rewrap(reordered, rename, dirs=dirs))
    assert list(rec.signals) == ["spikes", "mask", "stim", "resp"] and rec.skipped == []
    assert rec.name == "R" and rec.meta == {"k": [1, 2]}
    assert_matches_members(rec, {rename(k): v for k, v in members.items()})


def test_jackknife_views_from_as_targz():
    base = reference_views(np.random.default_rng(3))[0]
    views = [base]
    for k in range(1, 3):
        view = dict(views[-1])
        mask = base["mask"].data.copy()
        mask[0, 20 * k : 20 * k + 10] = False
        view["mask"] = Sig("raster", "mask", mask, chans=RESP_CHANS, epochs=base["mask"].epochs)
        views.append(view)
    archive = as_targz("R", {}, views)
    members = tar_members(archive)
    assert [n for n in members if "/01." in n or "/02." in n] == [
        "R/01.R.mask.csv",
        "R/01.R.mask.json",
        "R/01.R.mask.epoch.csv",
        "R/02.R.mask.csv",
        "R/02.R.mask.json",
        "R/02.R.mask.epoch.csv",
    ]
    rec = read_recording(archive)
    assert len(rec.views) == 3
    for k in range(3):
        assert_matches_members(rec, members, view=k)
        np.testing.assert_array_equal(rec.views[k]["mask"].data, views[k]["mask"].data)
        assert rec.views[k]["resp"] is rec.views[0]["resp"]


def test_meta_numpy_encoder_arrays_of_every_dtype_it_can_write():
    """NumpyEncoder writes ``tolist()`` with ``str(dtype)``: pandas ``.values`` columns
    are dtype object, strings ``<U..``; NaN goes out as the NaN token."""
    meta = {
        "cellid": np.array(["TNC015a-01-1", "TNC015a-02-1"], dtype=object),
        "mixed": np.array([1, "a", None, 2.5], dtype=object),
        "grid": np.array([["a", 1], ["b", 2]], dtype=object),
        "names": np.array(["x", "yy"]),
        "flags": np.array([True, False]),
        "gain": np.array(1.5),
        "rates": np.array([[np.nan, 1.0]], dtype=np.float32),
        "nested": {"files": ["/a/b.m"], "rawid": np.arange(3, dtype=np.int32)},
    }
    sig = Sig("raster", "x", np.ones((1, 3)))
    archive = as_targz("R", meta, [{"x": sig}])
    got = read_recording(archive).meta

    def decode(obj):  # what json_numpy_obj_hook does with an encoded array
        if "__ndarray__" in obj:
            return np.asarray(obj["__ndarray__"], obj["dtype"]).reshape(obj["shape"])
        return obj

    want = json.loads(tar_members(archive)["R/R.meta.json"], object_hook=decode)
    assert set(got) == set(want)
    for key in ("cellid", "mixed", "grid", "names", "flags", "gain", "rates"):
        assert got[key].dtype == want[key].dtype and got[key].shape == want[key].shape
        np.testing.assert_array_equal(got[key], want[key])
    assert got["cellid"].tolist() == ["TNC015a-01-1", "TNC015a-02-1"]
    assert got["mixed"].tolist() == [1, "a", None, 2.5]
    assert got["nested"]["files"] == ["/a/b.m"]
    assert got["nested"]["rawid"].dtype == np.int32


def test_save_dir_recording_read_from_the_directory(tmp_path):
    """``Recording.save(uri, uncompressed=True)`` / ``save_dir``: the same files, flat in
    one directory, with no R/ level."""
    views = reference_views(np.random.default_rng(4))
    meta = {"siteid": "TNC015a", "cells": np.array(RESP_CHANS, dtype=object)}
    root = save_dir(tmp_path / "TNC015a_0a1b", "R", meta, views)
    members = {p.name: p.read_bytes() for p in root.iterdir()}
    assert sorted(members) == sorted(
        ["R.meta.json"] + [f for s in views[0].values() for f, _ in file_streams(s)]
    )
    rec = read_recording(root)
    assert rec.name == "R" and rec.skipped == [] and rec.path == str(root)
    assert list(rec.signals) == ["mask", "resp", "spikes", "stim"]  # sorted file order
    assert rec.meta["cells"].tolist() == RESP_CHANS
    assert_matches_members(rec, members)
    with rec.open_data("resp") as stream:
        assert stream.read() == members["R.resp.csv"]


def test_save_dir_with_jackknife_views(tmp_path):
    """save_dir writes a later view's CSV as ``01.R.mask.csv`` but its JSON and epochs
    over view 0's ``R.mask.json`` / ``R.mask.epoch.csv``: the view borrows the latest
    sidecar of the same signal instead of failing for want of ``01.R.mask.json``."""
    base = reference_views(np.random.default_rng(5))[0]
    views = [base]
    for k in (1, 2):
        view = dict(views[-1])
        mask = base["mask"].data.copy()
        mask[0, 10 * k : 10 * k + 10] = False
        view["mask"] = Sig("raster", "mask", mask, chans=RESP_CHANS, epochs=base["mask"].epochs)
        views.append(view)
    root = save_dir(tmp_path / "rec", "R", {}, views)
    names = sorted(p.name for p in root.iterdir())
    assert "01.R.mask.csv" in names and "02.R.mask.csv" in names
    assert not [n for n in names if n.startswith("0") and not n.endswith(".mask.csv")]
    members = {p.name: p.read_bytes() for p in root.iterdir()}
    rec = read_recording(root)
    assert len(rec.views) == 3 and rec.skipped == []
    for k in range(3):
        np.testing.assert_array_equal(rec.views[k]["mask"].data, views[k]["mask"].data)
        assert rec.views[k]["mask"].json_member == "R.mask.json"
        assert rec.views[k]["mask"].epoch_member == "R.mask.epoch.csv"
        assert rec.views[k]["resp"] is rec.views[0]["resp"]
        assert_matches_members(rec, members, view=k)
    assert [rec.views[k]["mask"].data_member for k in range(3)] == [
        "R.mask.csv",
        "01.R.mask.csv",
        "02.R.mask.csv",
    ]
    assert [rec.views[k]["mask"].view for k in range(3)] == [0, 1, 2]


def test_signal_without_samples_is_an_empty_csv():
    """np.savetxt of a (0, C) array writes nothing, so the member is 0 bytes (the
    reference's own loader skips it and then fails): read as C x 0."""
    sig = Sig("raster", "pred", np.zeros((3, 0)), chans=["a", "b", "c"])
    views = [{"pred": sig, "stray": Sig("raster", "stray", np.ones((1, 4)))}]
    members = tar_members(as_targz("R", {}, views))
    assert members["R/R.pred.csv"] == b""
    members["R/R.other.csv"] = b""  # an empty CSV with no JSON stays a skipped member
    archive = rewrap(members, lambda n: n)
    rec = read_recording(archive)
    assert rec.signals["pred"].data.shape == (3, 0)
    assert rec.signals["pred"].data.dtype == np.float32
    assert rec.signals["pred"].epochs.to_pydict() == {
        "name": ["SIGNAL"],
        "start_s": [0.0],
        "end_s": [0.0],
    }
    assert [(s.name, s.reason) for s in rec.skipped] == [("R/R.other.csv", "empty member")]

    seen = []

    def handler(member, stream):
        header = member.header.name if member.header else None  # known late: the 0-byte one
        seen.append((member.name, member.size_bytes, header, stream.read()))
        return "handled"

    rec = read_recording(archive, on_data=handler)
    assert ("R/R.pred.csv", 0, "pred", b"") in seen
    assert rec.signals["pred"].data == "handled"
    assert read_recording(archive, load_data=False).signals["pred"].data is None


@pytest.mark.parametrize(
    "tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax-path", "gnu-longlink"]
)
def test_member_names_longer_than_a_tar_header_holds(tar_format):
    """Over 100 bytes: PAX writes a path record, GNU a ././@LongLink member."""
    name = "A1_TNC015a_" + "abf36" * 12
    sig = Sig("raster", "population_response", np.ones((2, 3)), recording=name)
    archive = as_targz(name, {}, [{"population_response": sig}], tar_format=tar_format)
    members = tar_members(archive)
    assert max(len(n) for n in members) > 100
    rec = read_recording(archive)
    assert rec.name == name and rec.skipped == []
    assert_matches_members(rec, members)


def test_save_dir_written_on_windows(tmp_path):
    """Text-mode files on Windows: savetxt's rows end in CRLF, and to_csv's os.linesep
    through a text handle ends epoch rows in CR CR LF."""
    views = reference_views(np.random.default_rng(6))
    unix = save_dir(tmp_path / "unix", "R", {}, views)
    windows = tmp_path / "windows"
    windows.mkdir()
    for path in unix.iterdir():
        body = path.read_bytes()
        if path.name.endswith(".epoch.csv"):
            body = body.replace(b"\n", b"\r\r\n")
        elif path.name.endswith(".csv"):
            body = body.replace(b"\n", b"\r\n")
        (windows / path.name).write_bytes(body)
    want, got = read_recording(unix), read_recording(windows)
    assert list(got.signals) == list(want.signals) and got.skipped == []
    assert b"\r\r\n" in (windows / "R.resp.epoch.csv").read_bytes()
    for name, sig in want.signals.items():
        if sig.data_kind == "csv":
            np.testing.assert_array_equal(got.signals[name].data, sig.data)
        assert got.signals[name].epochs.equals(sig.epochs)


def test_point_process_spike_times_stored_as_a_column():
    """The writer stores the arrays it holds; times loaded from MATLAB are often (n, 1),
    which the reference rasterizes like a vector."""
    spikes = {"u1": np.array([[0.1], [0.4], [0.2]]), "u2": np.array([[0.3, 0.5]]), "u3": []}
    sig = Sig("point", "resp", spikes, fs=1000, epochs=Epochs.added("TRIAL", [(0, 1)]))
    archive = as_targz("R", {}, [{"resp": sig}])
    stored = h5py_datasets(tar_members(archive)["R/R.resp.h5"])
    assert stored["u1"].shape == (3, 1) and stored["u2"].shape == (1, 2)
    got = read_recording(archive).signals["resp"].data
    assert {k: v.tolist() for k, v in got.items()} == {
        "u1": [0.1, 0.4, 0.2],
        "u2": [0.3, 0.5],
        "u3": [],
    }


def test_gunzipped_reference_archive():
    """The reference only writes gzip (and only reads it); a .tar someone gunzipped reads
    the same."""
    import gzip

    views = reference_views(np.random.default_rng(7))
    archive = as_targz("R", {"a": 1}, views)
    want, got = read_recording(archive), read_recording(gzip.decompress(archive))
    assert list(got.signals) == list(want.signals) and got.meta == want.meta
    for name, sig in want.signals.items():
        if sig.data_kind == "csv":
            np.testing.assert_array_equal(got.signals[name].data, sig.data)
        else:
            assert got.signals[name].data.keys() == sig.data.keys()
        assert got.signals[name].epochs.equals(sig.epochs)


def test_meta_hook_reads_model_parameter_lists_as_arrays_as_nems0_does():
    """json_numpy_obj_hook: in a dict holding a model-parameter key (mean, sd, tau, ...)
    every list value becomes an array; lists elsewhere stay lists; a KeywordRegistry
    (``_KWR_ARGS``) needs NEMS0 itself and stays a dict."""
    meta = {
        "prior": {
            "mean": [0.5, 1.5],
            "sd": [[1, 2], [3, 4]],
            "name": "normal",
            "ragged": [[1], [2, 3]],
        },
        "files": ["a.m", "b.m"],
        "kw": {"_KWR_ARGS": {"name": "registry"}, "keywords": []},
    }
    views = [{"resp": Sig("raster", "resp", np.ones((2, 5)))}]
    rec = read_recording(as_targz("R", meta, views))
    prior = rec.meta["prior"]
    assert isinstance(prior["mean"], np.ndarray) and prior["mean"].tolist() == [0.5, 1.5]
    assert isinstance(prior["sd"], np.ndarray) and prior["sd"].shape == (2, 2)
    assert prior["name"] == "normal" and prior["ragged"] == [[1], [2, 3]]  # NEMS0 fails here
    assert rec.meta["files"] == ["a.m", "b.m"]
    assert rec.meta["kw"] == {"_KWR_ARGS": {"name": "registry"}, "keywords": []}


def test_recording_without_meta_member_has_empty_meta_as_nems0():
    views = [{"resp": Sig("raster", "resp", np.ones((2, 5)))}]
    members = {k: v for k, v in tar_members(as_targz("R", {}, views)).items() if "meta" not in k}
    rec = read_recording(rewrap(members, lambda n: n))
    assert rec.meta == {} and rec.signals["resp"].data.shape == (2, 5)


def test_directory_named_with_dots_and_a_sidecar_without_optional_keys():
    """The directory may carry dots (a re-tar under the Zenodo file's name,
    ``A1_NAT4_ozgf.fs100.ch18``): the reader pairs members by file name alone, and only
    file names must be free of dots. A sidecar from an older writer may lack ``chans``,
    ``segments`` and ``signal_type`` (all read with ``js.get``): rasterized, no chans,
    no segments."""
    views = [{"resp": Sig("raster", "resp", np.arange(6.0).reshape(2, 3), recording="NAT4")}]
    members = tar_members(as_targz("NAT4", {"a": 1}, views))
    header = json.loads(members["NAT4/NAT4.resp.json"])
    for key in ("chans", "segments", "signal_type"):
        del header[key]
    members["NAT4/NAT4.resp.json"] = json.dumps(header).encode()
    rec = read_recording(rewrap(members, lambda n: "A1_NAT4_ozgf.fs100.ch18/" + n[5:]))
    assert rec.name == "NAT4" and rec.skipped == [] and rec.meta == {"a": 1}
    got = rec.signals["resp"]
    assert got.json_member == "A1_NAT4_ozgf.fs100.ch18/NAT4.resp.json"
    assert got.signal_type == "rasterized" and got.header.signal_type_raw is None
    assert got.header.chans is None and got.header.segments is None
    np.testing.assert_array_equal(got.data, np.arange(6.0).reshape(2, 3))

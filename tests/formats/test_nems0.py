"""NEMS0 recording reader against archives built the way NEMS0 writes them."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from nems0_build import (
    POINT_TYPE,
    TILED_TYPE,
    epoch_csv,
    h5_bytes,
    meta_json,
    raster_csv,
    signal_json,
    simple_recording,
    tar_bytes,
    zip_bytes,
)

from nat4etl.errors import FormatError, MissingMember
from nat4etl.formats import archive, nems0
from nat4etl.formats.nems0 import (
    MemberRole,
    classify_member,
    parse_meta_json,
    parse_signal_json,
    read_epochs,
    read_recording,
)
from nat4etl.formats.nems0_csv import iter_raster_blocks


def f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).astype(np.float32)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_what_nems0_writes(gz):
    data, truth = simple_recording("TNC015a", gz=gz)
    rec = read_recording(data, path="A1_TNC015a_abf3.tgz")
    assert rec.name == "TNC015a"
    assert list(rec.signals) == ["resp", "stim", "spikes"]  # archive order
    assert rec.skipped == []
    assert isinstance(rec.meta["arr"], np.ndarray) and rec.meta["arr"].tolist() == [0, 1, 2, 3]

    resp = rec.signals["resp"]
    assert (resp.signal_type, resp.fs_hz, resp.header.chans) == (
        "rasterized",
        100.0,
        ("u1", "u2", "u3"),
    )
    np.testing.assert_array_equal(resp.data, f32(truth["resp"]))
    assert resp.data_member == "TNC015a/TNC015a.resp.csv"
    assert resp.epoch_member == "TNC015a/TNC015a.resp.epoch.csv"

    stim = rec.signals["stim"]
    assert stim.header.chans is None
    np.testing.assert_array_equal(stim.data, f32(truth["stim"]))

    spikes = rec.signals["spikes"]
    assert spikes.signal_type == "point_process" and spikes.fs_hz == 1000.0
    assert list(spikes.data) == ["cellA", "cellB"]  # sorted keys, not JSON chans order
    assert spikes.header.chans == ("cellB", "cellA")
    np.testing.assert_array_equal(spikes.data["cellB"], truth["spikes"]["cellB"])
    assert spikes.data["cellB"].dtype == np.float64


def test_epochs_read_by_header_in_any_column_order():
    data, truth = simple_recording()
    rec = read_recording(data)
    want = {
        "name": [n for n, _, _ in truth["epochs"]],
        "start_s": [s for _, s, _ in truth["epochs"]],
        "end_s": [e for _, _, e in truth["epochs"]],
    }
    assert rec.signals["resp"].epochs.to_pydict() == want  # name,start,end
    assert rec.signals["stim"].epochs.to_pydict() == want  # start,end,name in the file
    assert "STIM_a,b.wav" in want["name"] and "NA" in want["name"]
    table = rec.epochs()
    assert table.column_names == ["signal", "name", "start_s", "end_s"]
    assert table.num_rows == 9


def test_members_in_any_order_and_stray_files_skipped():
    rec_name = "R"
    members = [
        ("R/R.resp.json", signal_json("resp", chans=["a", "b"])),
        ("R/.DS_Store", b"\x00\x00\x00\x01Bud1"),
        ("R/._R.resp.csv", b"\x00\x05\x16\x07 mac resource fork"),
        ("R/R.resp.epoch.csv", epoch_csv([("TRIAL", 0.0, 0.2)])),
        ("R/README.txt", b"hello"),
        ("R/R.resp.csv", raster_csv(np.ones((2, 20)))),
        ("R/R.resp.epochs.csv", epoch_csv([("X", 0.0, 1.0)])),
        ("R/R.meta.json", meta_json({"a": 1})),
        ("R/R.empty.json", b""),
        ("R/R.resp.extra.thing.json", b"{}"),
    ]
    random.Random(3).shuffle(members)
    rec = read_recording(tar_bytes(members))
    assert rec.name == rec_name and list(rec.signals) == ["resp"]
    reasons = {s.name: s.reason for s in rec.skipped}
    assert set(reasons) == {
        "R/.DS_Store",
        "R/._R.resp.csv",
        "R/README.txt",
        "R/R.resp.epochs.csv",
        "R/R.empty.json",
        "R/R.resp.extra.thing.json",
    }
    assert reasons["R/R.empty.json"] == "empty member"
    assert "epochs.csv" in reasons["R/R.resp.epochs.csv"]
    assert "extension 'txt'" in reasons["R/README.txt"]


def test_views_prefixed_members():
    base = np.zeros((1, 10))
    jack = np.ones((1, 10))
    members = [
        ("R/R.meta.json", meta_json({})),
        ("R/R.resp.csv", raster_csv(base)),
        ("R/R.resp.json", signal_json("resp")),
        ("R/R.resp.epoch.csv", epoch_csv([("TRIAL", 0.0, 0.1)])),
        ("R/R.mask.csv", raster_csv(base)),
        ("R/R.mask.json", signal_json("mask")),
        ("R/01.R.mask.csv", raster_csv(jack)),
        ("R/01.R.mask.json", signal_json("mask")),
        ("R/01.R.mask.epoch.csv", epoch_csv([("TRIAL", 0.0, 0.1)])),
        ("R/02.R.resp.csv", raster_csv(jack * 2)),
        ("R/02.R.resp.json", signal_json("resp")),
    ]
    rec = read_recording(tar_bytes(members))
    assert len(rec.views) == 3
    assert rec.signals["mask"].data.max() == 0 and rec.signals["mask"].view == 0
    assert rec.views[1]["mask"].data.max() == 1 and rec.views[1]["mask"].view == 1
    assert rec.views[1]["resp"] is rec.views[0]["resp"]  # carried over from view 0
    assert rec.views[2]["resp"].data.max() == 2
    assert rec.views[2]["mask"] is rec.views[1]["mask"]
    assert rec.signals["mask"].epochs is None


def test_json_with_nan_infinity_and_unicode_escapes():
    text = (
        b'{"name": "resp", "fs": 100, "recording": "R\\u00e9c", "chans": ["c\\u00b5", "d"],'
        b' "meta": {"gain": NaN, "max": Infinity, "min": -Infinity, "note": "\\u2603"},'
        b' "segments": [[0, 12.5], [20, 30]], "signal_type": "<class \'nems.signal.RasterizedSignal\'>"}'
    )
    header = parse_signal_json(text, member="R/R.resp.json")
    assert header.recording == "Réc" and header.chans == ("cµ", "d")
    assert np.isnan(header.meta["gain"]) and header.meta["max"] == np.inf
    assert header.meta["note"] == "☃"
    np.testing.assert_array_equal(header.segments, [[0, 12.5], [20, 30]])
    assert header.signal_type == "rasterized"  # old nems.signal spelling: substring match


def test_signal_type_absent_means_rasterized_and_dispatch_by_substring():
    assert parse_signal_json(signal_json("x", signal_type=None)).signal_type == "rasterized"
    assert (
        parse_signal_json(signal_json("x", signal_type="PointProcess")).signal_type
        == "point_process"
    )
    assert parse_signal_json(signal_json("x", signal_type=TILED_TYPE)).signal_type == "tiled"
    with pytest.raises(FormatError, match="unknown"):
        parse_signal_json(signal_json("x", signal_type="<class 'Other'>"))


@pytest.mark.parametrize("key", ["name", "fs", "meta", "recording"])
def test_missing_required_json_key_names_member(key):
    obj = json.loads(signal_json("resp"))
    del obj[key]
    with pytest.raises(FormatError) as info:
        parse_signal_json(json.dumps(obj).encode(), path="/d/x.tgz", member="R/R.resp.json")
    assert str(info.value).startswith(f'x.tgz:R/R.resp.json: "{key}" missing')


@pytest.mark.parametrize(
    "patch",
    [
        {"fs": "100"},
        {"fs": 0},
        {"fs": True},
        {"chans": "abc"},
        {"chans": [1, 2]},
        {"segments": [[0, 1, 2]]},
        {"segments": "x"},
        {"segments": [[0, True]]},
        {"fs": 10**400},  # no float holds it (was an OverflowError traceback)
        {"segments": [[0, 10**400]]},
        # json.dump escapes a lone surrogate (a name decoded with surrogateescape); no
        # Parquet string holds one (unpack failed with a UnicodeEncodeError traceback)
        {"chans": ["TNC015a-01-1", "TNC015a-0\udce9-1"]},
        {"name": "resp\udce9"},
        {"recording": "\ud800"},
        {"name": ""},
        {"recording": 3},
        {"signal_type": 5},
    ],
)
def test_bad_json_values(patch):
    obj = json.loads(signal_json("resp"))
    obj.update(patch)
    with pytest.raises(FormatError, match="^R/R.resp.json: ") as info:
        parse_signal_json(json.dumps(obj).encode(), member="R/R.resp.json")
    assert len(str(info.value)) < 200  # a 400-digit fs is not printed whole


@pytest.mark.parametrize("text", [b"", b"{", b"[1, 2]", b"\xff\xfe", b"[" * 100000, b"null"])
def test_json_garbage(text):
    with pytest.raises(FormatError):
        parse_signal_json(text, member="R/R.resp.json")


def test_meta_ndarray_numpy_encoder_and_base64():
    import base64

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    meta = {"a": arr, "nested": [{"b": np.array([True, False])}], "n": np.int64(3)}
    got = parse_meta_json(meta_json(meta))
    np.testing.assert_array_equal(got["a"], arr)
    assert got["a"].dtype == np.float32 and got["a"].shape == (2, 3)
    assert got["nested"][0]["b"].dtype == np.bool_ and got["n"] == 3
    b64 = {
        "__ndarray__": base64.b64encode(arr.tobytes()).decode(),
        "dtype": "float32",
        "shape": [3, 2],
    }
    np.testing.assert_array_equal(
        parse_meta_json(json.dumps({"x": b64}).encode())["x"], arr.reshape(3, 2)
    )


@pytest.mark.parametrize(
    "bad",
    [
        {"__ndarray__": [1, 2, 3], "dtype": "float64", "shape": [2, 2]},
        {"__ndarray__": [1], "dtype": "nope", "shape": [1]},
        {"__ndarray__": [1], "dtype": "V100000000", "shape": [1]},
        {"__ndarray__": ["x"], "dtype": "float64", "shape": [1]},
        {"__ndarray__": [1], "dtype": "float64"},
        {"__ndarray__": "!!", "dtype": "float64", "shape": [1]},
        {"__ndarray__": "AAAAAAAAAAA=", "dtype": "object", "shape": [1]},
        {"__ndarray__": [[1, 2], [3, 4]], "dtype": "object", "shape": [2]},
    ],
)
def test_meta_bad_ndarray(bad):
    with pytest.raises(FormatError):
        parse_meta_json(json.dumps({"x": bad}).encode(), member="R/R.meta.json")


# --- epochs --------------------------------------------------------------------------------


def test_epoch_csv_quirks():
    text = (
        b",start,end,name,extra\n"  # pandas index column, start,end,name order, extra column
        b'0,0.25,1.5,"STIM_a, b.wav",x\n'
        b"1,75.80000000000001,,NULL,\n"  # empty end -> NaN; NULL is a name
        b"\n"
        b"2,0.0,0.25,NA,y\n"
        b"3,0.0,0.25,NA,y\n"  # duplicates kept, unsorted rows kept
        b"4,-1e-05,nan,None,z\n"
    )
    table = read_epochs(text)
    assert table.column_names == ["name", "start_s", "end_s", "extra"]
    d = table.to_pydict()
    assert d["name"] == ["STIM_a, b.wav", "NULL", "NA", "NA", "None"]
    assert d["start_s"] == [0.25, 75.80000000000001, 0.0, 0.0, -1e-05]
    assert np.isnan(d["end_s"][1]) and np.isnan(d["end_s"][4])
    assert d["extra"] == ["x", "", "y", "y", "z"]


def test_epoch_times_in_pandas_na_spellings_are_nan():
    """NEMS0 reads the table with pd.read_csv: a start/end of NA, NULL, N/A, None ... is
    NaN to it (such an epoch is then left out, and a STIM_ one reported), not an error."""
    spellings = ["NA", "NULL", "N/A", "None", "#N/A", "<NA>", "n/a", "null", "-NaN", "1.#IND"]
    text = "name,start,end\n" + "".join(f"E{i},{na},{i}\n" for i, na in enumerate(spellings))
    table = read_epochs(text.encode())
    assert np.isnan(table.column("start_s").to_numpy()).all()
    assert table.column("end_s").to_pylist() == [float(i) for i in range(len(spellings))]
    with pytest.raises(FormatError, match="start is not a number: 'NAN!'"):
        read_epochs(b"name,start,end\nA,NAN!,1\n")


@pytest.mark.parametrize("missing", ["name", "start", "end"])
def test_epoch_csv_missing_column_names_member(missing):
    cols = [c for c in ("name", "start", "end") if c != missing]
    text = epoch_csv([tuple(range(len(cols)))], columns=cols)
    with pytest.raises(FormatError) as info:
        read_epochs(text, path="x.tgz", member="R/R.resp.epoch.csv")
    assert str(info.value).startswith("x.tgz:R/R.resp.epoch.csv: line 1: columns")
    assert repr(missing) in str(info.value)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (b"name,start,end\nA,0,1,2\n", "line 2: expected 3 fields"),
        (b"name,start,end\nA,zero,1\n", "line 2: start is not a number"),
        (b"name,start,end\nA,0,1\nB,0,1_0\n", "line 3: end is not a number"),
        # blank lines and a quoted two-line name before it: still the file's line
        (b'\nname,start,end\n\n"A\nB",0,1\n\nC,x,2\n', "line 7: start is not a number"),
        (b"name,start,end\nA,0,\nB,,1\nC,1,e\n", "line 4: end is not a number"),
        (b'name,start,end\n"A,0,1\n', "bad CSV"),
        (b"name,start,end,start\nA,0,1,2\n", "repeated"),
        (b"", "no header"),
        (b"\xff\xfe", "UTF-8"),
    ],
)
def test_epoch_csv_errors(text, match):
    with pytest.raises(FormatError, match=match):
        read_epochs(text, member="R/R.resp.epoch.csv")


def test_epoch_header_only_is_empty_table():
    table = read_epochs(b"name,start,end\n")
    assert table.num_rows == 0 and table.schema.field("start_s").type == "double"


# --- data members --------------------------------------------------------------------------


def test_nan_inf_in_raster_csv():
    data = np.array([[0.0, np.nan, np.inf], [-np.inf, 1e-300, -0.0]])
    members = [("R/R.resp.csv", raster_csv(data)), ("R/R.resp.json", signal_json("resp"))]
    got = read_recording(tar_bytes(members)).signals["resp"].data
    np.testing.assert_array_equal(got, f32(data))
    assert np.signbit(got[1, 2])


def test_json_chans_do_not_constrain_the_csv_width():
    """NEMS0 never compares them (create_mask gives a one-row mask the base signal's
    chans): the data keep their width, the header its chans, in either member order."""
    members = [
        ("R/R.resp.json", signal_json("resp", chans=["a", "b", "c"])),  # JSON first
        ("R/R.resp.csv", raster_csv(np.zeros((2, 5)))),
    ]

    def handler(member, stream):
        return np.concatenate(list(iter_raster_blocks(stream))).T

    for order in (members, members[::-1]):
        for kw in ({}, {"on_data": handler}):
            sig = read_recording(tar_bytes(order), **kw).signals["resp"]
            assert sig.data.shape == (2, 5) and sig.header.chans == ("a", "b", "c")


def test_ragged_csv_row_reports_line():
    csv_text = raster_csv(np.zeros((2, 5))) + b"1.0\n"
    members = [("R/R.resp.csv", csv_text), ("R/R.resp.json", signal_json("resp"))]
    with pytest.raises(FormatError, match=r"R/R.resp.csv: line 6: expected 2 columns, got 1"):
        read_recording(tar_bytes(members))


def test_point_process_keys_out_of_order_and_tiled_signal():
    spikes = {"z-1": [0.5, 0.1], "A-2": [0.3], "a-1": [], "B-10": [0.2, 0.25]}
    tiles = {"STIM_b.wav": np.ones((3, 4)), "STIM_a.wav": np.zeros((3, 2))}
    members = [
        ("R/R.resp.h5", h5_bytes(spikes)),
        ("R/R.resp.json", signal_json("resp", fs=1000, signal_type=POINT_TYPE, chans=list(spikes))),
        ("R/R.resp.epoch.csv", epoch_csv([("TRIAL", 0.0, 1.0)])),
        ("R/R.stim.h5", h5_bytes(tiles)),
        ("R/R.stim.json", signal_json("stim", signal_type=TILED_TYPE)),
    ]
    rec = read_recording(tar_bytes(members))
    assert list(rec.signals["resp"].data) == sorted(spikes) == ["A-2", "B-10", "a-1", "z-1"]
    assert rec.signals["resp"].data["z-1"].tolist() == [0.5, 0.1]  # as stored, not sorted
    assert list(rec.signals["stim"].data) == ["STIM_a.wav", "STIM_b.wav"]
    assert rec.signals["stim"].data["STIM_b.wav"].shape == (3, 4)


def test_point_process_with_2d_dataset_is_an_error():
    members = [
        ("R/R.resp.h5", h5_bytes({"c": np.zeros((2, 2))})),
        ("R/R.resp.json", signal_json("resp", signal_type=POINT_TYPE)),
    ]
    with pytest.raises(FormatError, match="R/R.resp.h5: dataset 'c': spike times must be 1-D"):
        read_recording(tar_bytes(members))


@pytest.mark.parametrize(
    ("members", "error", "match"),
    [
        (
            [("R/R.resp.csv", b"1\n")],
            MissingMember,
            "R/R.resp.csv: signal 'R.resp' .* no R.resp.json",
        ),
        ([("R/R.resp.json", signal_json("resp"))], MissingMember, "no data member"),
        (
            [("R/R.resp.h5", h5_bytes({"a": [1.0]})), ("R/R.resp.json", signal_json("resp"))],
            FormatError,
            "needs a .csv data member",
        ),
        (
            [
                ("R/R.a.csv", b"1\n"),
                ("R/R.a.json", signal_json("a", recording="R")),
                ("R/R.b.csv", b"1\n"),
                ("R/R.b.json", signal_json("b", recording="Q")),
            ],
            FormatError,
            # the JSON that differs is named (it named only the file)
            r"R/R.b.json: signals disagree on the recording name: this one says 'Q', "
            r"1 other\(s\) 'R'$",
        ),
        (
            [
                ("R/R.a.csv", b"1\n"),
                ("R/R.a.json", signal_json("x")),
                ("R/R.b.csv", b"1\n"),
                ("R/R.b.json", signal_json("x")),
            ],
            FormatError,
            "two signals named 'x'",
        ),
        ([("R/R.a.csv", b"1\n"), ("S/R.a.csv", b"2\n")], FormatError, "second data file"),
        (
            [("R/R.meta.json", b"{}"), ("S/R.meta.json", b"{}")],
            FormatError,
            "second recording meta",
        ),
        (
            [("R/R.resp.csv", b"1\n"), ("R/R.resp.json", b"{oops")],
            FormatError,
            "R/R.resp.json: bad JSON",
        ),
        (
            [
                ("R/R.resp.h5", b"not hdf5"),
                ("R/R.resp.json", signal_json("resp", signal_type=POINT_TYPE)),
            ],
            FormatError,
            "R/R.resp.h5: not a readable HDF5",
        ),
        (
            [
                ("R/R.resp.csv", b"1\n"),
                ("R/R.resp.json", signal_json("resp")),
                ("R/R.resp.epoch.csv", b"name,start\nA,0\n"),
            ],
            FormatError,
            "R/R.resp.epoch.csv: line 1: columns \\['end'\\] missing",
        ),
    ],
)
def test_broken_recordings(members, error, match):
    with pytest.raises(error, match=match):
        read_recording(tar_bytes(members), path="x.tgz")


def test_classify_member():
    assert classify_member("R/R.meta.json") == MemberRole("meta", 0, "R")
    assert classify_member("R/R.resp.csv") == MemberRole("data", 0, "R.resp", "csv")
    assert classify_member("R/12.R.resp.h5") == MemberRole("data", 12, "R.resp", "h5")
    assert classify_member("x/y/R.resp.epoch.csv") == MemberRole("epochs", 0, "R.resp")
    assert classify_member("R/R.xmeta.json") == MemberRole("json", 0, "R.xmeta")  # not the meta
    for stray in ("R/.DS_Store", "R/._x.csv", "R/x.txt", "R/noext", "R/a.b.c.d.csv", "R/x.R.S.csv"):
        assert isinstance(classify_member(stray), str)


# --- streaming and nesting -----------------------------------------------------------------


def test_on_data_streams_data_members_once():
    data, truth = simple_recording()
    seen = []

    def handler(member: nems0.DataMember, stream):
        seen.append((member.name, member.kind, member.view, member.key, member.header))
        if member.kind == "csv":
            blocks = list(iter_raster_blocks(stream, path=member.path, member=member.qualname))
            return np.concatenate(blocks).T
        return len(stream.read())

    rec = read_recording(data, on_data=handler)
    assert [s[:4] for s in seen] == [
        ("R/R.resp.csv", "csv", 0, "R.resp"),
        ("R/R.stim.csv", "csv", 0, "R.stim"),
        ("R/R.spikes.h5", "h5", 0, "R.spikes"),
    ]
    assert all(s[4] is None for s in seen)  # NEMS writes data before its JSON
    np.testing.assert_array_equal(rec.signals["resp"].data, f32(truth["resp"]))
    assert rec.signals["spikes"].data == rec.signals["spikes"].data_size_bytes


def test_index_only_then_open_data():
    data, truth = simple_recording()
    rec = read_recording(data, load_data=False)
    assert all(s.data is None for s in rec.signals.values())
    with rec.open_data("stim") as stream:
        assert stream.read() == raster_csv(truth["stim"])
    with pytest.raises(MissingMember):
        with rec.open_data("nope"):
            pass


def test_recording_inside_a_zip_names_both_in_errors():
    good, _ = simple_recording("ARM029a")
    bad = tar_bytes(
        [("B/B.resp.csv", b"1,2\n3\n"), ("B/B.resp.json", signal_json("resp", recording="B"))]
    )
    outer = zip_bytes(
        [("A1_single_sites/A1_ARM029a_ab12.tgz", good), ("A1_single_sites/A1_B_cd.tgz", bad)]
    )
    members = list(archive.iter_members(outer, path="/d/A1_single_sites.zip"))
    rec = read_recording(members[0])
    assert rec.name == "ARM029a" and rec.path == "/d/A1_single_sites.zip"
    with pytest.raises(FormatError) as info:
        read_recording(members[1])
    assert str(info.value).startswith(
        "A1_single_sites.zip:A1_single_sites/A1_B_cd.tgz:B/B.resp.csv: line 2:"
    )


@pytest.mark.parametrize(
    ("second", "problem"),
    [
        (signal_json("stim", recording="Q"), "signals disagree on the recording name"),
        (signal_json("resp", recording="B"), "two signals named 'resp'"),
    ],
)
def test_signals_that_clash_name_the_json_inside_the_zip_member(second, problem):
    """Two signals that cannot both be: the error names the JSON of the second as the
    other errors name a member (zip member, then tar member); it named the zip alone,
    or the tar member without the zip member holding it."""
    tgz = tar_bytes(
        [
            ("B/B.resp.csv", b"1\n"),
            ("B/B.resp.json", signal_json("resp", recording="B")),
            ("B/B.stim.csv", b"1\n"),
            ("B/B.stim.json", second),
        ]
    )
    outer = zip_bytes([("A1_single_sites/A1_B_cd.tgz", tgz)])
    (member,) = archive.iter_members(outer, path="/d/A1_single_sites.zip")
    with pytest.raises(FormatError) as info:
        read_recording(member)
    assert str(info.value).startswith(
        f"A1_single_sites.zip:A1_single_sites/A1_B_cd.tgz:B/B.stim.json: {problem}"
    )

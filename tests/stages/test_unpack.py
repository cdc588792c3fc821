"""unpack on the mini samples: every raw value against an independent reading of the files
(tarfile, zipfile, numpy, h5py, csv: not nat4etl.formats), and bad input through the CLI."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import shutil
import tarfile
import warnings
import zipfile
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from click.testing import CliRunner

from nat4etl.cli import cli
from nat4etl.stages import unpack
from nat4etl.store import Store
from tests.formats.nems0_build import Unseekable

AREAS = ("A1", "PEG")


# ============================================================================ fixtures
def _run(*args: str) -> object:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def _unpacked(tmp_path_factory, mirror, name: str) -> Store:
    out = tmp_path_factory.mktemp(name) / "store"
    result = _run("unpack", "--out", str(out), "--source", str(mirror.dir))
    assert result.exit_code == 0, result.output
    return Store(out)


@pytest.fixture(scope="module", params=["clean", "quirks"])
def case(request, tmp_path_factory, mini_sample, mini_quirks_sample):
    mirror = mini_sample if request.param == "clean" else mini_quirks_sample
    return mirror, _unpacked(tmp_path_factory, mirror, f"unpack_{request.param}")


# ============================================================================ independent reading
def _tar_members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def _signal_files(members: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """signal name -> {"json", "data", "epoch"} bytes (view 0, R/R.S.ext)."""
    out: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        base = PurePosixPath(name).name
        if base.startswith("."):
            continue
        parts = base.split(".")
        if parts[-2:] == ["meta", "json"]:
            continue
        if parts[-2:] == ["epoch", "csv"]:
            out.setdefault(parts[1], {})["epoch"] = data
        elif parts[-1] == "json":
            out.setdefault(parts[1], {})["json"] = data
        else:
            out.setdefault(parts[1], {})["data"] = data
    return out


def _meta(members: dict[str, bytes]) -> dict:
    (data,) = [d for n, d in members.items() if n.endswith(".meta.json")]
    return json.loads(data)


def _epoch_rows(data: bytes) -> list[tuple[str, float, float]]:
    rows = csv.DictReader(io.StringIO(data.decode()))
    return [(r["name"], float(r["start"]), float(r["end"])) for r in rows]


def _rows_by(table, *key: str) -> dict:
    return {tuple(r[k] for k in key): r for r in table.to_pylist()}


def _site_tgzs(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as zf:
        return {
            n: zf.read(n)
            for n in zf.namelist()
            if n.endswith(".tgz")
            and "__MACOSX" not in n
            and not PurePosixPath(n).name.startswith(".")
        }


# ============================================================================ raw tables
@pytest.mark.parametrize("area", AREAS)
def test_population_values_equal_an_independent_parse(case, area):
    mirror, store = case
    info = mirror.info.areas[area]
    members = _tar_members((mirror.dir / info.pop_file).read_bytes())
    pop = store.read_table("pop_signals", area=area)
    rows = _rows_by(pop, "signal", "channel")
    files = _signal_files(members)
    assert set(files) == set(info.pop_signals)
    for signal, f in files.items():
        expected = np.loadtxt(io.BytesIO(f["data"]), delimiter=",", ndmin=2).T.astype(np.float32)
        header = json.loads(f["json"])
        for channel, want in enumerate(expected):
            row = rows.pop((signal, channel))
            got = np.asarray(row["values"], np.float32)
            np.testing.assert_array_equal(got, want)  # NaN == NaN here
            finite = want[~np.isnan(want)]  # the stored extremes ignore NaN, else are NaN
            want_min, want_max = (f(finite) if finite.size else np.nan for f in (np.min, np.max))
            np.testing.assert_array_equal(
                [row["min_value"], row["max_value"]], [want_min, want_max]
            )
            assert row["chan"] == (header["chans"][channel] if header["chans"] else None)
    assert not rows, f"unexpected pop_signals rows {list(rows)[:3]}"


@pytest.mark.parametrize("area", AREAS)
def test_signals_recordings_and_epochs_match_the_files(case, area):
    mirror, store = case
    info = mirror.info.areas[area]
    recordings = _rows_by(store.read_table("recordings", area=area), "recording")
    signals = _rows_by(store.read_table("signals", area=area), "recording", "signal")
    epochs = store.read_table("epochs", area=area).to_pylist()
    archives = {(info.pop_recording, "population", None): (mirror.dir / info.pop_file).read_bytes()}
    tgzs = _site_tgzs(mirror.dir / info.single_sites_file)
    for site in info.sites:
        archives[(site.recording, "site", site.site)] = tgzs[site.member]
    assert set(recordings) == {(r,) for r, _, _ in archives}
    for (recording, kind, site), data in archives.items():
        members = _tar_members(data)
        rec = recordings[(recording,)]
        assert (rec["kind"], rec["site"]) == (kind, site)
        assert json.loads(rec["meta_json"]) == _meta(members)
        for signal, f in _signal_files(members).items():
            header = json.loads(f["json"])
            row = signals[(recording, signal)]
            assert row["fs_hz"] == header["fs"]
            assert row["chans"] == header["chans"]
            assert json.loads(row["segments_json"]) == header["segments"]
            assert json.loads(row["meta_json"]) == header["meta"]
            got = [
                (e["name"], e["start_s"], e["end_s"])
                for e in sorted(epochs, key=lambda e: e["row"])
                if (e["recording"], e["signal"]) == (recording, signal)
            ]
            assert got == _epoch_rows(f["epoch"])


@pytest.mark.parametrize("area", AREAS)
def test_site_spikes_are_the_hdf5_datasets_exactly(case, area):
    mirror, store = case
    info = mirror.info.areas[area]
    spikes = _rows_by(store.read_table("site_spikes", area=area), "site", "unit_id")
    tgzs = _site_tgzs(mirror.dir / info.single_sites_file)
    n_units = 0
    for site in info.sites:
        members = _tar_members(tgzs[site.member])
        (h5_bytes,) = [d for n, d in members.items() if n.endswith(".h5")]
        with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
            assert sorted(h5.keys()) == sorted(site.unit_ids)
            for unit_id in h5:
                row = spikes[(site.site, unit_id)]
                assert row["recording"] == site.recording
                want = h5[unit_id][()]
                got = np.asarray(row["spike_times_s"], np.float64)
                assert got.dtype == want.dtype and np.array_equal(got, want)
                n_units += 1
    assert n_units == len(spikes)


@pytest.mark.parametrize("area", AREAS)
def test_pred_correlation_is_carried_through(case, area):
    mirror, store = case
    info = mirror.info.areas[area]
    table = store.read_table("pred_correlation", area=area)
    with open(mirror.dir / info.pred_correlation_file, newline="") as f:
        rows = list(csv.DictReader(f))
    got = _rows_by(table, "cellid")
    assert len(got) == len(rows)
    for r in rows:
        g = got[(r["cellid"],)]
        assert g["sig_auditory"] == (r["sig_auditory"] == "True")
        for col, text in r.items():
            out = unpack.PRED_AREA_COLUMN if col == "area" else col
            value = g[out]
            if isinstance(value, float):
                assert value == float(text)
            elif not isinstance(value, bool):
                assert str(value) == text


@pytest.mark.parametrize("area", AREAS)
def test_source_members_list_every_zip_member(case, area):
    mirror, store = case
    info = mirror.info.areas[area]
    members = _rows_by(store.read_table("source_members", area=area), "file", "member")
    with zipfile.ZipFile(mirror.dir / info.single_sites_file) as zf:
        files = [i for i in zf.infolist() if not i.is_dir()]
    for i in files:
        row = members[(info.single_sites_file, i.filename)]
        assert row["size_bytes"] == i.file_size
        kind = "recording" if i.filename in {s.member for s in info.sites} else "skipped"
        assert row["kind"] == kind, i.filename
    strays = {m for m in info.stray_members if not m.endswith("/")}
    skipped = {m for (f, m), r in members.items() if r["kind"] == "skipped"}
    assert skipped == strays
    # not wav.zip's: parse-epochs lists it, so that its arrival does not rerun unpack
    assert {f for f, _ in members} == {info.single_sites_file}


# ============================================================================ helpers
def test_channel_buffer_holds_rows_of_short_fields():
    """Fields shorter than %.18e (here 1-byte digits) make more rows than 25-byte ones
    would: the room is for the most the member's size allows."""
    buf = unpack.ChannelBuffer(3, size_bytes=3 * 2 * 9)  # 9 rows of "d," fields
    blocks = [np.arange(i * 9, i * 9 + 9, dtype=np.float32).reshape(3, 3) for i in range(3)]
    for b in blocks:
        buf.append(b)
    got = buf.finish()
    np.testing.assert_array_equal(got, np.concatenate(blocks).T)
    assert got.strides[1] == 4  # each row contiguous


def test_channel_buffer_leaves_rows_where_they_were_written():
    buf = unpack.ChannelBuffer(2, size_bytes=2 * 25 * 10)
    buf.append(np.array([[1, 2], [3, 4]], np.float32))
    got = buf.finish()
    np.testing.assert_array_equal(got, [[1, 3], [2, 4]])
    assert got.strides == (4 * buf.capacity, 4)  # no compaction: rows stay spaced apart


def test_channel_buffer_places_sparse_blocks_into_its_zeros():
    from nat4etl.formats.nems0_csv import SparseRows

    buf = unpack.ChannelBuffer(3, size_bytes=3 * 25 * 10)
    buf.append(np.array([[1, 0, 0], [0, 0, 2]], np.float32))
    buf.append(SparseRows((3, 3), np.array([1, 8]), np.array([5, 7], np.float32)))
    buf.append(SparseRows((2, 3), np.array([], np.int64), np.array([], np.float32)))
    got = buf.finish()
    expected = np.zeros((3, 7), np.float32)
    expected[0, 0], expected[2, 1], expected[1, 2], expected[2, 4] = 1, 2, 5, 7
    np.testing.assert_array_equal(got, expected)


def test_channel_lists_of_spaced_rows_are_one_chunk_per_row_without_copies():
    buf = unpack.ChannelBuffer(3, size_bytes=3 * 25 * 100)
    values = np.arange(12, dtype=np.float32).reshape(4, 3)
    buf.append(values)
    spaced = buf.finish()
    lists = unpack.channel_lists(spaced)
    assert lists.num_chunks == 3 and lists.type == pa.list_(pa.float32())
    assert [list(x) for x in lists.to_pylist()] == values.T.tolist()
    for i, chunk in enumerate(lists.chunks):  # the row's own memory
        assert chunk.values.buffers()[1].address == spaced[i].__array_interface__["data"][0]


def test_channel_lists_chunk_without_copying(monkeypatch):
    monkeypatch.setattr(unpack, "_MAX_LIST_VALUES", 10)
    values = np.arange(24, dtype=np.float32).reshape(4, 6)
    lists = unpack.channel_lists(values)
    assert lists.num_chunks == 4
    assert [list(x) for x in lists.to_pylist()] == values.tolist()


def test_float64_lists_keep_exact_times():
    times = [np.array([0.1, 1 / 3]), np.array([]), np.array([2.0**-40])]
    got = unpack.float64_lists(times).to_pylist()
    assert got == [[0.1, 1 / 3], [], [2.0**-40]]


def test_float64_lists_take_back_to_back_views_without_copying(monkeypatch):
    """A site file's spike times lie back to back in one buffer: each such run is one chunk
    on that very memory; arrays of their own are concatenated, order kept throughout."""
    packed = np.arange(12.0)
    site = [packed[0:3], packed[3:3], packed[3:7]]  # an empty unit in the middle too
    other = np.arange(100.0, 110.0)
    loose = [np.array([0.5]), np.array([0.25, 0.75])]
    arrays = [*loose, *site, other[2:4], other[4:5], *loose]
    lists = unpack.float64_lists(arrays)
    assert lists.to_pylist() == [a.tolist() for a in arrays]
    sizes = [len(c) for c in lists.chunks]
    assert sizes == [2, 3, 2, 2]  # loose, one site, the other buffer's run, loose
    site_chunk, other_chunk = lists.chunks[1], lists.chunks[2]
    assert site_chunk.values.buffers()[1].address == packed.__array_interface__["data"][0]
    assert other_chunk.values.buffers()[1].address == other[2:].__array_interface__["data"][0]
    monkeypatch.setattr(unpack, "_MAX_LIST_VALUES", 4)  # int32 offsets: runs split too
    lists = unpack.float64_lists(site)
    assert lists.to_pylist() == [a.tolist() for a in site]
    assert all(len(c.values) <= 4 for c in lists.chunks)


@pytest.mark.parametrize(
    ("name", "stray"),
    [
        ("__MACOSX/A1_single_sites/._A1_x.tgz", True),
        ("A1_single_sites/.DS_Store", True),
        ("A1_single_sites/A1_ARM029a_ab.tgz", False),
        ("__MACOSX\\A1_single_sites\\._A1_x.tgz", True),  # a Windows tool's separators
        ("A1_single_sites\\A1_ARM029a_ab.tgz", False),
    ],
)
def test_stray_members(name, stray):
    assert unpack.is_stray(name) is stray


# ============================================================================ bad input
def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _retar(data: bytes, edit) -> bytes:
    """Rewrite a tgz: ``edit(name, bytes) -> bytes | None`` (None drops the member)."""

    def edited(name: str, body: bytes) -> list[tuple[str, bytes]]:
        body = edit(name, body)
        return [] if body is None else [(name, body)]

    return _retar_members(data, edited)


def _retar_members(data: bytes, edit) -> bytes:
    """Rewrite a tgz: ``edit(name, bytes) -> [(name, bytes), ...]`` for each member."""
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for m in src.getmembers():
            for name, body in edit(m.name, src.extractfile(m).read()):
                info = tarfile.TarInfo(name)
                info.size = len(body)
                dst.addfile(info, io.BytesIO(body))
    return out.getvalue()


def _edit_population(mirror_dir: Path, area: str, suffix: str, fn) -> None:
    path = mirror_dir / f"{area}_NAT4_ozgf.fs100.ch18.tgz"
    path.write_bytes(_retar(path.read_bytes(), lambda n, b: fn(b) if n.endswith(suffix) else b))


def _edit_site(mirror_dir: Path, area: str, suffix: str, fn) -> str:
    """Apply ``fn`` to one member of the first site tgz; returns that tgz's zip member."""
    return _rewrite_site(
        mirror_dir, area, lambda tgz: _retar(tgz, lambda n, b: fn(b) if n.endswith(suffix) else b)
    )


def _rewrite_site(mirror_dir: Path, area: str, rewrite) -> str:
    """Replace the first site tgz with ``rewrite(tgz bytes)``; returns its zip member."""
    path = mirror_dir / f"{area}_single_sites.zip"
    with zipfile.ZipFile(path) as zf:
        items = [(i, zf.read(i.filename)) for i in zf.infolist()]
    target = next(i.filename for i, _ in items if unpack.is_recording_member(i.filename))
    with zipfile.ZipFile(path, "w") as zf:
        for info, body in items:
            zf.writestr(info, rewrite(body) if info.filename == target else body)
    return target


def _drop_last_column(csv_bytes: bytes) -> bytes:
    return b"".join(line.rsplit(b",", 1)[0] + b"\n" for line in csv_bytes.splitlines())


def _unsafe(mirror_dir: Path) -> tuple[str, str]:
    path = mirror_dir / "A1_NAT4_ozgf.fs100.ch18.tgz"
    data = path.read_bytes()
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for m in src.getmembers():
            dst.addfile(m, src.extractfile(m))
        evil = tarfile.TarInfo("../evil.json")
        evil.size = 2
        dst.addfile(evil, io.BytesIO(b"{}"))
    path.write_bytes(out.getvalue())
    return path.name, "../evil.json"


def _truncate(mirror_dir: Path) -> tuple[str, str | None]:
    path = mirror_dir / "A1_NAT4_ozgf.fs100.ch18.tgz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path.name, None


POP_A1 = "A1_NAT4_ozgf.fs100.ch18.tgz"


def _csv_width(d: Path) -> tuple[str, str]:
    _edit_population(d, "A1", ".resp.csv", _drop_last_column)
    return POP_A1, "resp.csv"


def _csv_width_under_another_directory(d: Path) -> tuple[str, str]:
    """``as_targz`` names the directory after ``Recording.name`` and the files after the
    signals' ``recording``, which may differ (nems0-format.md §1): the error names the
    member as it is in the tar (it named ``<recording>/<file>``, a path not there)."""
    _edit_population(d, "A1", ".resp.csv", _drop_last_column)
    path = d / POP_A1
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(path.read_bytes()), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        for m in src.getmembers():
            body = src.extractfile(m).read()
            info = tarfile.TarInfo("A1_NAT4_ozgf.fs100.ch18/" + PurePosixPath(m.name).name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
            if m.name.endswith(".resp.csv"):
                member = info.name
    path.write_bytes(out.getvalue())
    return POP_A1, f"{POP_A1}:{member}:"


def _epoch_header(d: Path) -> tuple[str, str]:
    _edit_population(d, "A1", ".stim.epoch.csv", lambda b: b.replace(b"name,", b"label,", 1))
    return POP_A1, "stim.epoch.csv"


def _bad_json(d: Path) -> tuple[str, str]:
    _edit_population(d, "A1", ".resp.json", lambda b: b[: len(b) // 2])
    return POP_A1, "resp.json"


def _json_of_another_recording(d: Path) -> tuple[str, str]:
    """resp's JSON naming another recording than stim's and mask_est's: the error named
    the tgz only, not which JSON disagrees."""

    def rename(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "recording": ""}).encode()

    _edit_population(d, "A1", ".resp.json", rename)
    return POP_A1, f"{POP_A1}:A1_NAT4_ozgf_fs100_ch18/A1_NAT4_ozgf_fs100_ch18.resp.json: "


def _bad_hdf5(d: Path) -> tuple[str, str]:
    _edit_site(d, "A1", ".h5", lambda b: b"not hdf5")
    return "A1_single_sites.zip", "resp.h5"


def _pred_repeated_column(d: Path) -> tuple[str, None]:
    """pyarrow reads it, Parquet stores it, and then no reader can select either column:
    unpack published it and every later stage failed with a traceback."""
    path = d / "A1_pred_correlation.csv"
    path.write_bytes(path.read_bytes().replace(b"r_floor", b"r_test", 1))
    return path.name, None


def _pred_without_sig_auditory(d: Path) -> tuple[str, None]:
    """No sig_auditory column: every unit's auditory was null, exit 0, nothing said."""
    path = d / "A1_pred_correlation.csv"
    rows = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(line.rsplit(b",", 1)[0] + b"\n" for line in rows))
    return path.name, None


def _empty_site_tgz(d: Path) -> tuple[str, str]:
    """A site tgz with no members: no recording name, so a null key (was a traceback)."""
    member = _rewrite_site(d, "A1", lambda tgz: _retar(tgz, lambda n, b: None))
    return "A1_single_sites.zip", member


def _site_tgz_of_a_meta_json_only(d: Path) -> tuple[str, str]:
    """A site tgz holding its meta.json only: the directory names the recording, so it was
    read as a site without units and its units' val trials were NaN, exit 0."""
    member = _rewrite_site(
        d, "A1", lambda tgz: _retar(tgz, lambda n, b: b if n.endswith(".meta.json") else None)
    )
    return "A1_single_sites.zip", f"{member}: no 'resp' signal, the site's spikes (signals: none)"


def _site_spikes_not_named_resp(d: Path) -> tuple[str, str]:
    """The site's PointProcess named otherwise in its JSON: parse-epochs matched its units
    and counted their trials, rebin-sites binned none (it bins resp), exit 0 and no word."""

    def rename(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "name": "spikes"}).encode()

    member = _edit_site(d, "A1", ".resp.json", rename)
    return (
        "A1_single_sites.zip",
        f"{member}: no 'resp' signal, the site's spikes (signals: 'spikes')",
    )


def _infinite_epoch_end(d: Path) -> tuple[str, str]:
    """A site epoch ending at inf: NEMS0 cannot rasterize it (was an OverflowError)."""

    def edit(b: bytes) -> bytes:
        lines = b.splitlines()
        name, start, _ = lines[-1].split(b",")
        return b"\n".join([*lines[:-1], b",".join([name, start, b"inf"])]) + b"\n"

    _edit_site(d, "A1", ".epoch.csv", edit)
    return "A1_single_sites.zip", "resp.epoch.csv"


def _site_fs_of_a_gigahertz(d: Path) -> tuple[str, str]:
    """A site JSON's fs of 1e9 Hz: a raster of 1.2e11 samples, which NEMS0 cannot hold,
    and neither could rebin-sites (a MemoryError traceback for a 448 GiB array)."""

    def faster(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "fs": 1e9}).encode()

    member = _edit_site(d, "A1", ".resp.json", faster)
    return "A1_single_sites.zip", f"{member}:"


def _stim_cut_short(d: Path) -> tuple[str, str]:
    """stim.csv cut at a line end: every spectrogram was NaN, exit 0, nothing said."""
    _edit_population(d, "A1", ".stim.csv", lambda b: b"".join(b.splitlines(True)[:100]))
    return POP_A1, "stim.csv"


def _stim_at_another_rate(d: Path) -> tuple[str, str]:
    """stim's JSON at 99 Hz, resp's at 100: unpack wrote it, and rebin-sites refused it
    naming the area only ("population resp and stim differ in fs")."""

    def slower(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "fs": 99}).encode()

    _edit_population(d, "A1", ".stim.json", slower)
    return POP_A1, f"{POP_A1}:A1_NAT4_ozgf_fs100_ch18/A1_NAT4_ozgf_fs100_ch18.stim.json: "


def _population_at_a_gigahertz(d: Path) -> tuple[str, str]:
    """Every population JSON at 1e9 Hz: each 1.5 s sound is 1.5e9 samples of 1650, and
    rebin-sites failed with a MemoryError traceback (101 GiB)."""

    def faster(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "fs": 1e9}).encode()

    path = d / POP_A1
    meta = ".meta.json"
    path.write_bytes(
        _retar(
            path.read_bytes(),
            lambda n, b: faster(b) if n.endswith(".json") and not n.endswith(meta) else b,
        )
    )
    return POP_A1, f"{POP_A1}:A1_NAT4_ozgf_fs100_ch18/A1_NAT4_ozgf_fs100_ch18.stim.json: "


def _empty_population(d: Path) -> tuple[str, str]:
    """resp and stim 0-byte CSVs (rasters of C x 0): rebin-sites failed with a traceback."""
    for suffix in (".resp.csv", ".stim.csv", ".mask_est.csv"):
        _edit_population(d, "A1", suffix, lambda b: b"")
    return POP_A1, "resp.csv"


def _site_tgz_twice(d: Path) -> tuple[str, str]:
    """The same site file twice in the zip: the store's key error named no file."""
    path = d / "A1_single_sites.zip"
    with zipfile.ZipFile(path) as zf:
        first = next(n for n in zf.namelist() if unpack.is_recording_member(n))
        body = zf.read(first)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("copy/" + PurePosixPath(first).name, body)
    return path.name, f"copy/{PurePosixPath(first).name}: recording"


def _site_tgz_twice_under_one_name(d: Path) -> tuple[str, str]:
    """A site file listed twice under its own name (``zipfile`` in append mode adds an
    entry): both were read as one site, and the store's key error named no file."""
    path = d / "A1_single_sites.zip"
    with zipfile.ZipFile(path) as zf:
        first = next(n for n in zf.namelist() if unpack.is_recording_member(n))
        body = zf.read(first)
    _append_again(path, first, body)
    return path.name, f"{first}: member appears twice"


def _append_again(path: Path, name: str, body: bytes) -> None:
    """Add ``name`` to the zip at ``path`` once more (``zipfile`` in append mode adds an
    entry, as some tools do; the listing then names it twice)."""
    with zipfile.ZipFile(path, "a") as zf, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile's "Duplicate name"
        zf.writestr(name, body)


def _units_in_two_signals(d: Path) -> tuple[str, str]:
    """A second PointProcess signal with the same units (NEMS0 reads it): site_spikes
    holds one set of times per unit, and the store's key error named no file."""

    def with_copy(name: str, body: bytes) -> list[tuple[str, bytes]]:
        if ".resp." not in name:
            return [(name, body)]
        copy = body
        if name.endswith(".json"):
            copy = json.dumps({**json.loads(body), "name": "resp2"}).encode()
        return [(name, body), (name.replace(".resp.", ".resp2."), copy)]

    member = _rewrite_site(d, "A1", lambda tgz: _retar_members(tgz, with_copy))
    return "A1_single_sites.zip", f"{member}:"


def _site_named_as_population(d: Path) -> tuple[str, str]:
    """A site recording whose signals name the population's recording: two rows of one
    key in ``recordings``, which the store refused naming no file."""

    def rename(body: bytes) -> bytes:
        header = json.loads(body)
        if "recording" in header:
            header["recording"] = "A1_NAT4_ozgf_fs100_ch18"
        return json.dumps(header).encode()

    member = _edit_site(d, "A1", ".json", rename)
    return "A1_single_sites.zip", f"{member}: recording 'A1_NAT4_ozgf_fs100_ch18' again"


BAD_INPUTS = {
    "truncated archive": _truncate,
    "csv width": _csv_width,
    "csv width, directory named otherwise": _csv_width_under_another_directory,
    "epoch csv header": _epoch_header,
    "json": _bad_json,
    "json of another recording": _json_of_another_recording,
    "hdf5": _bad_hdf5,
    "unsafe member": _unsafe,
    "pred_correlation repeated column": _pred_repeated_column,
    "pred_correlation without sig_auditory": _pred_without_sig_auditory,
    "empty site tgz": _empty_site_tgz,
    "infinite epoch end": _infinite_epoch_end,
    "site fs of a gigahertz": _site_fs_of_a_gigahertz,
    "stim cut short": _stim_cut_short,
    "stim at another rate": _stim_at_another_rate,
    "population at a gigahertz": _population_at_a_gigahertz,
    "empty population": _empty_population,
    "site tgz twice": _site_tgz_twice,
    "site tgz twice, one name": _site_tgz_twice_under_one_name,
    "site tgz of a meta.json only": _site_tgz_of_a_meta_json_only,
    "site spikes not named resp": _site_spikes_not_named_resp,
    "units in two signals": _units_in_two_signals,
    "site named as the population": _site_named_as_population,
}


@pytest.fixture(scope="module")
def published(tmp_path_factory, mini_sample) -> Path:
    """A store already holding a good unpack: a failed run must leave it as it was."""
    out = tmp_path_factory.mktemp("published") / "store"
    assert _run("unpack", "--out", str(out), "--source", str(mini_sample.dir)).exit_code == 0
    return out


@pytest.mark.parametrize("fault", list(BAD_INPUTS))
def test_bad_input_is_one_line_naming_file_and_member(fault, tmp_path, mini_sample, published):
    bad = tmp_path / "bad"
    shutil.copytree(mini_sample.dir, bad)
    file_name, member = BAD_INPUTS[fault](bad)
    before = _digest(published)
    result = CliRunner().invoke(cli, ["unpack", "--out", str(published), "--source", str(bad)])
    assert result.exit_code not in (0, 1), result.output  # a nat4etl error, not a crash
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert file_name in errors[0]
    if member is not None:
        assert member in errors[0], errors[0]
    assert "Traceback" not in result.output
    assert _digest(published) == before


def test_missing_source_file_names_it(tmp_path, mini_sample):
    bad = tmp_path / "bad"
    shutil.copytree(mini_sample.dir, bad)
    (bad / "PEG_pred_correlation.csv").unlink()
    out = tmp_path / "store"
    result = CliRunner().invoke(cli, ["unpack", "--out", str(out), "--source", str(bad)])
    assert result.exit_code != 0
    assert "PEG_pred_correlation.csv" in result.output
    assert not out.exists() or not (out / "pop_signals").exists()


def test_mask_chans_of_the_signal_it_came_from_unpack(tmp_path, mini_sample):
    """``Recording.create_mask`` gives the one-row mask the chans of resp: NEMS0 reads
    that file, so unpack must too. The rows are stored unlabelled, the chans as written."""
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    inherited = ["unit-a", "unit-b", "unit-c"]

    def add_chans(b: bytes) -> bytes:
        header = json.loads(b)
        return json.dumps({**header, "chans": inherited}).encode()

    _edit_population(src, "A1", ".mask_est.json", add_chans)
    out = tmp_path / "store"
    result = _run("unpack", "--out", str(out), "--source", str(src))
    assert result.exit_code == 0, result.output
    store = Store(out)
    pop = store.read_table("pop_signals", area="A1")
    mask = pop.filter(pc.equal(pop.column("signal"), "mask_est"))
    assert mask.num_rows == 1
    assert mask.column("chan").to_pylist() == [None]
    signals = store.read_table("signals", area="A1").to_pylist()
    (row,) = [r for r in signals if r["signal"] == "mask_est"]
    assert row["chans"] == inherited
    assert row["n_chans"] == 1


def _add_point_process(mirror_dir: Path, area: str, signal: str) -> None:
    """Add a PointProcess signal (HDF5 spike times, JSON, epochs) to the population tgz,
    as NEMS0's ``Recording.save`` would write one."""
    path = mirror_dir / f"{area}_NAT4_ozgf.fs100.ch18.tgz"
    data = path.read_bytes()
    h5 = io.BytesIO()
    with h5py.File(h5, "w") as f:
        f.create_dataset("unit-a", data=np.array([0.5, 1.25]))
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as src,
        tarfile.open(fileobj=out, mode="w:gz") as dst,
    ):
        members = src.getmembers()
        for m in members:
            dst.addfile(m, src.extractfile(m))
        stem = members[0].name.rsplit(".", 2)[0]  # <R>/<R>
        recording = PurePosixPath(stem).name
        header = {
            "name": signal,
            "chans": ["unit-a"],
            "fs": 1000,
            "meta": None,
            "recording": recording,
            "signal_type": "<class 'nems0.signal.PointProcess'>",
        }
        added = {
            f"{stem}.{signal}.h5": h5.getvalue(),
            f"{stem}.{signal}.json": json.dumps(header).encode(),
            f"{stem}.{signal}.epoch.csv": b"name,start,end\nTRIAL,0.0,2.0\n",
        }
        for name, body in added.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            dst.addfile(info, io.BytesIO(body))
    path.write_bytes(out.getvalue())


def test_population_keeps_metadata_of_a_signal_that_is_not_rasterized(tmp_path, mini_sample):
    """NEMS0 loads a population recording with a PointProcess beside resp and stim; unpack
    does too, keeping its metadata and epochs, warning that its data is not stored; the
    later stages build as before."""
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    _add_point_process(src, "A1", "spikes")
    (src / "record.json").unlink()  # the edited file no longer has the published md5
    out = tmp_path / "store"
    result = _run("build", "--area", "A1", "--out", str(out), "--source", str(src))
    assert result.exit_code == 0, result.output
    assert "point_process signal 'spikes': only metadata and epochs stored" in result.output
    store = Store(out)
    pop = store.read_table("pop_signals", area="A1")
    assert "spikes" not in set(pop.column("signal").to_pylist())
    assert {"resp", "stim"} <= set(pop.column("signal").to_pylist())
    (row,) = [
        r for r in store.read_table("signals", area="A1").to_pylist() if r["signal"] == "spikes"
    ]
    assert row["signal_type"] == "point_process"
    assert row["chans"] == ["unit-a"]
    epochs = store.read_table("epochs", area="A1")
    spikes_epochs = epochs.filter(pc.equal(epochs.column("signal"), "spikes")).to_pylist()
    assert [(e["name"], e["start_s"], e["end_s"]) for e in spikes_epochs] == [("TRIAL", 0.0, 2.0)]
    assert store.read_table("responses", area="A1").num_rows > 0


def test_population_stim_that_is_not_rasterized_fails_naming_it(tmp_path, mini_sample):
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    path = src / POP_A1
    path.write_bytes(_retar(path.read_bytes(), lambda n, b: None if ".stim." in n else b))
    _add_point_process(src, "A1", "stim")
    result = _run("unpack", "--out", str(tmp_path / "store"), "--source", str(src))
    assert result.exit_code not in (0, 1), result.output
    assert "'stim' is point_process" in result.output
    assert POP_A1 in result.output


def test_spike_times_that_are_not_finite_are_a_warning_naming_the_units(tmp_path, mini_sample):
    """NEMS0 cannot rasterize a NaN or infinite spike time; no bin counts one here, and
    unpack says which units have them instead of dropping them silently."""
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    spoiled = []

    def spoil(data: bytes) -> bytes:
        with h5py.File(io.BytesIO(data), "r") as f:
            datasets = {k: f[k][()] for k in f}
        first = sorted(datasets)[0]
        spoiled.append(first)
        datasets[first] = np.concatenate([datasets[first], [np.nan, np.inf]])
        out = io.BytesIO()
        with h5py.File(out, "w") as f:
            for k, v in datasets.items():
                f.create_dataset(k, data=v)
        return out.getvalue()

    member = _edit_site(src, "A1", ".h5", spoil)
    (src / "record.json").unlink()
    out = tmp_path / "store"
    result = _run("build", "--area", "A1", "--out", str(out), "--source", str(src))
    assert result.exit_code == 0, result.output  # and the later stages bin the rest
    assert Store(out).read_table("responses", area="A1").num_rows > 0
    warned = [line for line in result.output.splitlines() if "NaN or infinite" in line]
    assert len(warned) == 1
    assert member in warned[0] and f"{spoiled[0]} (2)" in warned[0]


def _rename_members(data: bytes, rename) -> bytes:
    """Re-tar ``data`` with ``rename(name) -> [names]``: each member under every new name."""
    return _retar_members(data, lambda name, body: [(new, body) for new in rename(name)])


def test_skipped_recording_members_are_logged_with_the_reason(tmp_path, mini_sample):
    """A jackknife view (``01.R.S.*``, which as_targz writes) and a ``.epochs.csv`` (the
    stale spelling in NEMS0's docs) are not read; the log said of both "not a recording",
    which hid that a site had lost its epoch table."""
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    pop = src / POP_A1

    def with_view(name: str) -> list[str]:
        head, base = name.rsplit("/", 1)
        return [name, f"{head}/01.{base}"] if ".mask_est." in base else [name]

    pop.write_bytes(_rename_members(pop.read_bytes(), with_view))
    site = _edit_site(src, "A1", ".nothing", lambda b: b)
    zip_path = src / "A1_single_sites.zip"
    with zipfile.ZipFile(zip_path) as zf:
        items = [(i, zf.read(i.filename)) for i in zf.infolist()]
    with zipfile.ZipFile(zip_path, "w") as zf:
        for info, body in items:
            if info.filename == site:
                body = _rename_members(body, lambda n: [n.replace(".epoch.csv", ".epochs.csv")])
            zf.writestr(info, body)

    result = _run("unpack", "--area", "A1", "--out", str(tmp_path / "store"), "--source", str(src))
    assert result.exit_code == 0, result.output
    skipped = [line for line in result.output.splitlines() if "skipped" in line]
    views = [line for line in skipped if "/01." in line]
    assert len(views) == 3 and all("(jackknife view 1; only view 0 is stored)" in v for v in views)
    (stale,) = [line for line in skipped if ".epochs.csv" in line]
    assert "'.epochs.csv' is not the NEMS0 spelling" in stale, stale
    assert f"A1_single_sites.zip:{site}:" in stale


# ============================================================================ other writers
def _reframe(data: bytes, edit=lambda name, body: body) -> bytes:
    """The tgz as ``Recording.as_targz`` frames it on Python >= 3.8 (PAX headers, float
    mtime, uname nems), then re-tarred by hand: members reversed (meta last, JSON before
    data), ``./`` names, directory entries; ``edit(name, body)`` changes a member."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as src:
        members = [(m.name, src.extractfile(m).read()) for m in src.getmembers() if m.isfile()]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz", format=tarfile.PAX_FORMAT) as dst:
        for directory in (".", "./" + members[0][0].split("/")[0]):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            dst.addfile(info)
        for name, body in reversed(members):
            body = edit(name, body)
            info = tarfile.TarInfo("./" + name)
            info.size, info.mtime = len(body), 1.7e9 + 0.25
            info.uname, info.gname = "nems", "users"
            dst.addfile(info, io.BytesIO(body))
    return out.getvalue()


def _rewrite_mirror(mirror: Path, dest: Path, edit) -> None:
    """A copy of the mirror with every tgz reframed (``edit`` applied to its members) and
    each site zip streamed: stored members, data descriptors, no directory entries."""
    shutil.copytree(mirror, dest)
    (dest / "record.json").unlink()  # edited files no longer have the published md5s
    for area in AREAS:
        pop = dest / f"{area}_NAT4_ozgf.fs100.ch18.tgz"
        pop.write_bytes(_reframe(pop.read_bytes(), edit))
        sites = dest / f"{area}_single_sites.zip"
        with zipfile.ZipFile(sites) as zf:
            items = [(i.filename, zf.read(i)) for i in zf.infolist() if not i.is_dir()]
        pipe = Unseekable()  # zipfile then writes sizes in data descriptors
        with zipfile.ZipFile(pipe, "w", zipfile.ZIP_STORED) as zf:
            for name, body in items:
                if unpack.is_recording_member(name):
                    body = _reframe(body, edit)
                zf.writestr(name, body)
        sites.write_bytes(bytes(pipe.data))


def _windows_text(name: str, body: bytes) -> bytes:
    """Recording.save_dir on Windows, re-tarred: savetxt rows end CRLF, to_csv's through a
    text handle CR CR LF."""
    if name.endswith(".epoch.csv"):
        return body.replace(b"\n", b"\r\r\n")
    return body.replace(b"\n", b"\r\n") if name.endswith(".csv") else body


def _other_epoch_columns(name: str, body: bytes) -> bytes:
    """add_epoch's start,end,name order, a leftover pandas index, an extra column."""
    if not name.endswith(".epoch.csv"):
        return body
    rows = list(csv.DictReader(io.StringIO(body.decode(), newline="")))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["", "start", "end", "name", "stim_rep"])
    for i, row in enumerate(rows):
        writer.writerow([i, row["start"], row["end"], row["name"], i % 3])
    return out.getvalue().encode()


def _other_hdf5_and_json(name: str, body: bytes) -> bytes:
    """Spike times as big-endian (n, 1) columns, stored contiguous; sidecars with fs a
    float, the keys in another order and indented."""
    if name.endswith(".h5"):
        with h5py.File(io.BytesIO(body), "r") as f:
            data = {key: f[key][()] for key in f}
        out = io.BytesIO()
        with h5py.File(out, "w") as f:
            for key, times in reversed(list(data.items())):
                f.create_dataset(key, data=times.astype(">f8").reshape(-1, 1))
        return out.getvalue()
    if name.endswith(".json") and not name.endswith(".meta.json"):
        header = json.loads(body)
        header["fs"] = float(header["fs"])
        return json.dumps(dict(reversed(header.items())), indent=2).encode()
    return body


def _same_values(got: pa.Table, want: pa.Table, skip: tuple[str, ...] = ()) -> None:
    assert got.column_names == want.column_names and got.num_rows == want.num_rows
    for name in got.column_names:
        if name in skip:
            continue
        a, b = got.column(name), want.column(name)
        if pa.types.is_list(a.type):
            assert pc.list_value_length(a).equals(pc.list_value_length(b)), name
            a, b = pc.list_flatten(a), pc.list_flatten(b)
        if pa.types.is_floating(a.type):
            np.testing.assert_array_equal(a.to_numpy(), b.to_numpy(), err_msg=name)  # NaN ok
        else:
            assert a.to_pylist() == b.to_pylist(), name


@pytest.mark.parametrize(
    ("edit", "differ"),
    [
        (lambda name, body: body, {}),
        (_windows_text, {}),
        (_other_epoch_columns, {"epochs": ("extra_json",)}),
        (_other_hdf5_and_json, {}),
    ],
    ids=["framing", "windows-text", "epoch-columns", "hdf5-and-json"],
)
def test_unpack_reads_archives_other_writers_frame_the_same(edit, differ, tmp_path, mini_sample):
    """The mini mirror's archives as other writers could have made them (nems0-format.md
    §1-§2 leave these free) unpack to the same raw tables, value for value."""
    want = _unpacked_store(tmp_path / "want", mini_sample.dir)
    src = tmp_path / "src"
    _rewrite_mirror(mini_sample.dir, src, edit)
    got = _unpacked_store(tmp_path / "got", src)
    for area in AREAS:
        for table in ("recordings", "signals", "pop_signals", "site_spikes", "epochs"):
            _same_values(
                got.read_table(table, area=area),
                want.read_table(table, area=area),
                skip=differ.get(table, ()),
            )
    if "epochs" in differ:
        extra = got.read_table("epochs", area="A1").column("extra_json").to_pylist()
        assert {json.loads(e)["stim_rep"] for e in extra} == {"0", "1", "2"}


def _unpacked_store(out: Path, source: Path) -> Store:
    result = _run("unpack", "--out", str(out), "--source", str(source))
    assert result.exit_code == 0, result.output
    return Store(out)


def test_a_stray_member_named_in_latin1_is_listed_not_a_traceback(tmp_path, mini_sample):
    """A member whose name is not UTF-8 (a tar from an old Latin-1 system): skipped and
    listed with its byte escaped (unpack failed with a UnicodeEncodeError traceback)."""
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    pop = src / POP_A1
    out = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(pop.read_bytes()), mode="r:gz") as old,
        tarfile.open(
            fileobj=out, mode="w:gz", format=tarfile.GNU_FORMAT, encoding="latin-1"
        ) as new,
    ):
        for m in old.getmembers():
            new.addfile(m, old.extractfile(m))
        info = tarfile.TarInfo(m.name.rsplit("/", 1)[0] + "/notes caf\u00e9.txt")
        info.size = 3
        new.addfile(info, io.BytesIO(b"abc"))
    pop.write_bytes(out.getvalue())
    store = _unpacked_store(tmp_path / "store", src)
    (row,) = [
        r
        for r in store.read_table("recordings", area="A1").to_pylist()
        if r["kind"] == "population"
    ]
    assert [s.rsplit("/", 1)[1] for s in row["skipped_members"]] == ["notes caf\\xe9.txt"]


def test_meta_arrays_json_has_no_list_form_for_are_kept(tmp_path, mini_sample):
    """NEMS0's older NumpyEncoder wrote any array as base64 (``{"__ndarray__": "<b64>",
    "dtype", "shape"}``), so a meta may hold complex, datetime, timedelta or bytes arrays;
    their ``tolist()`` is no JSON (unpack failed with a TypeError traceback). They are
    stored in that base64 form, which reads back to the same arrays."""
    from nat4etl.formats.nems0 import parse_meta_json

    arrays = {
        "gain": np.array([1 + 2j, -0.5j]),
        "when": np.array(["2019-03-01T10:00:00.000001"], dtype="datetime64[us]"),
        "took": np.array([1500, 20], dtype="timedelta64[ms]"),
        "tag": np.array([b"ab", b"c"]),
        "n": np.array([3, 4]),
    }
    encoded = {
        key: {
            "__ndarray__": base64.b64encode(a.tobytes()).decode(),
            "dtype": str(a.dtype),
            "shape": list(a.shape),
        }
        for key, a in arrays.items()
    }
    src = tmp_path / "src"
    shutil.copytree(mini_sample.dir, src)
    _edit_population(
        src, "A1", ".meta.json", lambda b: json.dumps({**json.loads(b), **encoded}).encode()
    )
    store = _unpacked_store(tmp_path / "store", src)
    (row,) = [
        r
        for r in store.read_table("recordings", area="A1").to_pylist()
        if r["kind"] == "population"
    ]
    meta = parse_meta_json(row["meta_json"].encode())
    for key, want in arrays.items():
        assert meta[key].dtype == want.dtype
        np.testing.assert_array_equal(meta[key], want)

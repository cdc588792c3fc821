"""The synthetic NAT4 writer, checked through an independent path (tarfile, zipfile, h5py, csv,
numpy) rather than through its own code: byte layout, counts, population/site consistency by the
reference route, quirks, determinism."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import math
import tarfile
import zipfile

import h5py
import numpy as np
import pytest
import soundfile

from nat4etl.errors import ConfigError
from nat4etl.sample import SampleInfo, csv_18e_size, format_csv_18e, write_sample

RECORD_FILES = (
    "A1_NAT4_ozgf.fs100.ch18.tgz",
    "A1_single_sites.zip",
    "A1_pred_correlation.csv",
    "PEG_NAT4_ozgf.fs100.ch18.tgz",
    "PEG_single_sites.zip",
    "PEG_pred_correlation.csv",
    "wav.zip",
)
SIDECAR_KEYS = [
    "name",
    "chans",
    "fs",
    "meta",
    "recording",
    "segments",
    "signal_type",
    "normalization",
    "norm_baseline",
    "norm_gain",
]


# ---- independent readers ------------------------------------------------------------------


def read_epochs(raw: bytes) -> tuple[list[str], list[tuple[str, float, float]]]:
    rows = list(csv.reader(io.StringIO(raw.decode())))
    header = rows[0]
    i_name, i_start, i_end = (header.index(c) for c in ("name", "start", "end"))
    return header, [(r[i_name], float(r[i_start]), float(r[i_end])) for r in rows[1:]]


def pop_recording(mirror, area: str) -> dict:
    """Every member of a population tgz, parsed with tarfile/json/numpy only."""
    info = mirror.info.areas[area]
    with tarfile.open(mirror.dir / info.pop_file, "r:gz") as tar:
        members = tar.getmembers()
        raw = {m.name: tar.extractfile(m).read() for m in members}
    rec = {"members": members, "raw": raw, "R": info.pop_recording}
    prefix = f"{info.pop_recording}/{info.pop_recording}"
    for sig in ("resp", "stim", "mask_est"):
        csv_bytes = raw[f"{prefix}.{sig}.csv"]
        rec[sig] = np.loadtxt(io.BytesIO(csv_bytes), delimiter=",", ndmin=2).T
        rec[sig + ".json"] = json.loads(raw[f"{prefix}.{sig}.json"])
        rec[sig + ".epochs"] = read_epochs(raw[f"{prefix}.{sig}.epoch.csv"])
    return rec


def site_recording(mirror, area: str, site_info) -> dict:
    """One per-site tgz out of the zip: meta, h5 spike times, sidecar, epochs."""
    with zipfile.ZipFile(mirror.dir / f"{area}_single_sites.zip") as zf:
        tgz = zf.read(site_info.member)
    with tarfile.open(fileobj=io.BytesIO(tgz), mode="r:gz") as tar:
        members = tar.getmembers()
        raw = {m.name: tar.extractfile(m).read() for m in members}
    prefix = f"{site_info.recording}/{site_info.recording}"
    spikes, compression, attrs = {}, set(), 0
    with h5py.File(io.BytesIO(raw[f"{prefix}.resp.h5"]), "r") as f:
        for key, ds in f.items():
            assert isinstance(ds, h5py.Dataset)
            spikes[key] = ds[:]
            compression.add(ds.compression)
            attrs += len(ds.attrs)
    return {
        "members": [m.name for m in members],
        "meta": json.loads(raw[f"{prefix}.meta.json"]),
        "json": json.loads(raw[f"{prefix}.resp.json"]),
        "epochs": read_epochs(raw[f"{prefix}.resp.epoch.csv"]),
        "spikes": spikes,
        "compression": compression,
        "attrs": attrs,
    }


def reference_raster(spike_times_s, epochs, fs_hz: int) -> np.ndarray:
    """The reference loader's rasterization: counts at floor(t*fs), round(fs*max end) bins."""
    n_bins = int(np.round(fs_hz * max(end for _, _, end in epochs)))
    raster = np.zeros(n_bins)
    for t in spike_times_s.tolist():
        b = math.floor(t * fs_hz)
        if b < n_bins:
            raster[b] += 1
    return raster


def reference_cut(raster, epochs, fs_hz: int, stim: str) -> np.ndarray:
    """Cut [round(start*fs), round(end*fs)) per occurrence, sum groups of 10: (reps, 150)."""
    cuts = [(round(s * fs_hz), round(e * fs_hz)) for name, s, e in epochs if name == stim]
    return np.array([raster[lb:ub].reshape(-1, 10).sum(axis=1) for lb, ub in cuts])


@pytest.fixture(params=["mini_sample", "mini_quirks_sample"])
def mirror(request):
    return request.getfixturevalue(request.param)


# ---- files and record.json ----------------------------------------------------------------


def test_record_json_lists_the_seven_files_with_true_size_and_md5(mirror):
    record = json.loads((mirror.dir / "record.json").read_text())
    assert record["id"] == 8044773
    assert record["metadata"]["version"] == "1.1.0"
    assert "title" in record["metadata"]
    assert [f["key"] for f in record["files"]] == list(RECORD_FILES)
    for entry in record["files"]:
        data = (mirror.dir / entry["key"]).read_bytes()
        assert entry["size"] == len(data)
        assert entry["checksum"] == "md5:" + hashlib.md5(data).hexdigest()
        assert entry["links"]["self"] == (
            f"https://zenodo.org/api/records/8044773/files/{entry['key']}/content"
        )
        assert mirror.info.files[entry["key"]].md5 == hashlib.md5(data).hexdigest()
    written = {p.name for p in mirror.dir.iterdir()}
    assert written == set(RECORD_FILES) | {"record.json", "sample_info.json"}


def test_sample_info_json_round_trips(mirror):
    on_disk = SampleInfo.from_json((mirror.dir / "sample_info.json").read_text())
    assert on_disk == mirror.info
    assert SampleInfo.from_json(mirror.info.to_json()) == mirror.info


# ---- population recording -----------------------------------------------------------------


def test_pop_tgz_members_follow_nems_order(mirror):
    for area in ("A1", "PEG"):
        path = mirror.dir / mirror.info.areas[area].pop_file
        assert path.read_bytes()[:2] == b"\x1f\x8b"
        with gzip.open(path) as gz:
            assert gz.read(1)  # a plain gzip stream around the tar
        rec = pop_recording(mirror, area)
        r = rec["R"]
        assert "." not in r
        expected = [f"{r}/{r}.meta.json"] + [
            f"{r}/{r}.{sig}.{ext}"
            for sig in ("resp", "stim", "mask_est")
            for ext in ("csv", "json", "epoch.csv")
        ]
        assert [m.name for m in rec["members"]] == expected
        assert all(m.isfile() and m.uname == "nems" and m.gname == "users" for m in rec["members"])


def test_pop_signals_have_the_declared_shapes(mirror):
    info = mirror.info
    for area in ("A1", "PEG"):
        a = info.areas[area]
        rec = pop_recording(mirror, area)
        n_times = (len(a.val_stims) + len(a.est_stims)) * 150
        assert a.n_times == n_times
        for sig in ("resp", "stim", "mask_est"):
            sidecar = rec[sig + ".json"]
            assert list(sidecar) == SIDECAR_KEYS
            assert sidecar["name"] == sig and sidecar["fs"] == 100
            assert sidecar["recording"] == rec["R"]
            assert sidecar["signal_type"] == "<class 'nems0.signal.RasterizedSignal'>"
            assert rec[sig].shape[1] == n_times
        assert rec["resp.json"]["chans"] == list(a.cell_ids)
        assert rec["resp"].shape[0] == len(a.cell_ids)
        assert rec["stim"].shape[0] == 18
        assert np.all(rec["stim"] > 0)
        mask = rec["mask_est"][0]
        n_val = len(a.val_stims) * 150
        assert np.all(mask[:n_val] == 0) and np.all(mask[n_val:] == 1)


def test_pop_epochs_put_val_first_at_150_frames_each(mirror):
    a = mirror.info.areas["A1"]
    rec = pop_recording(mirror, "A1")
    header, rows = rec["resp.epochs"]
    assert header == ["name", "start", "end"]
    assert rec["stim.epochs"] == rec["resp.epochs"] == rec["mask_est.epochs"]
    stims = [(n, s, e) for n, s, e in rows if n.startswith("STIM_")]
    assert [n for n, _, _ in stims] == list(a.val_stims) + list(a.est_stims)
    assert all(n.startswith("STIM_00cat") for n in a.val_stims)
    assert all(n.startswith("STIM_cat") for n in a.est_stims)
    for i, (_, start, end) in enumerate(stims):
        assert (round(start * 100), round(end * 100)) == (150 * i, 150 * (i + 1))
    names = [n for n, _, _ in rows]
    for kind in ("REFERENCE", "PreStimSilence", "PostStimSilence"):
        assert names.count(kind) == len(stims)
    assert rows == sorted(rows, key=lambda r: (r[1], -r[2]))


def test_pop_csv_is_byte_identical_to_np_savetxt(mini_quirks_sample):
    rec = pop_recording(mini_quirks_sample, "A1")
    r = rec["R"]
    for sig in ("resp", "stim", "mask_est"):
        buf = io.BytesIO()
        np.savetxt(buf, rec[sig].T, delimiter=",", fmt="%.18e")
        assert rec["raw"][f"{r}/{r}.{sig}.csv"] == buf.getvalue()


def test_pop_resp_nan_exactly_where_sites_missed_a_sound(mirror):
    for area in ("A1", "PEG"):
        a = mirror.info.areas[area]
        resp = pop_recording(mirror, area)["resp"]
        stims = list(a.val_stims) + list(a.est_stims)
        expected = np.zeros(resp.shape, dtype=bool)
        for cell, stim in a.nan_pairs:
            i = stims.index(stim) * 150
            expected[a.cell_ids.index(cell), i : i + 150] = True
        assert np.array_equal(np.isnan(resp), expected)
    assert mirror.info.areas["A1"].nan_pairs  # NaN blocks are part of every sample


# ---- per-site recordings ------------------------------------------------------------------


def test_site_files_are_nems_point_process_recordings(mirror):
    for area in ("A1", "PEG"):
        for site in mirror.info.areas[area].sites:
            assert site.member.startswith(f"{area}_single_sites/{area}_{site.site}_")
            sha1 = site.member.rsplit("_", 1)[1].removesuffix(".tgz")
            assert len(sha1) == 40 and int(sha1, 16) >= 0
            rec = site_recording(mirror, area, site)
            r = site.recording
            assert rec["members"] == [
                f"{r}/{r}.meta.json",
                f"{r}/{r}.resp.h5",
                f"{r}/{r}.resp.json",
                f"{r}/{r}.resp.epoch.csv",
            ]
            assert "files" in rec["meta"]
            assert list(rec["json"]) == SIDECAR_KEYS
            assert rec["json"]["fs"] == 1000
            assert rec["json"]["signal_type"] == "<class 'nems0.signal.PointProcess'>"
            assert rec["json"]["chans"] == list(site.unit_ids)
            assert sorted(rec["spikes"]) == sorted(site.unit_ids)
            assert rec["compression"] == {"gzip"} and rec["attrs"] == 0
            for times in rec["spikes"].values():
                assert times.dtype == np.float64 and len(times) > 0
                assert np.all(np.diff(times) > 0) and times[0] >= 0
                samples = times * 30000
                assert np.allclose(samples, np.round(samples), rtol=0, atol=1e-6)


def test_site_epochs_hold_the_whole_experiment(mirror):
    info = mirror.info
    short = {(q.site, q.stim): q.n_reps for q in info.quirks_applied.short_val}
    for area in ("A1", "PEG"):
        a = info.areas[area]
        for site in a.sites:
            header, rows = site_recording(mirror, area, site)["epochs"]
            assert tuple(header) == site.epoch_columns
            assert rows == sorted(rows, key=lambda r: (r[1], -r[2]))
            names = [n for n, _, _ in rows]
            for stim in a.val_stims:
                expected = short.get((site.site, stim), 20)
                assert names.count(stim) == expected == site.val_reps[stim]
            for stim in a.est_stims:
                assert names.count(stim) == (0 if stim in site.missing_stims else 1)
            n_stim = sum(n.startswith("STIM_") for n in names)
            assert n_stim == site.n_presentations
            for kind in ("REFERENCE", "PreStimSilence", "PostStimSilence"):
                assert names.count(kind) == n_stim
            assert names.count("TRIAL") == site.n_trials
            assert f"BAPHYTRIAL{site.n_trials}_FILE1" in names
            assert names.count("PASSIVE_EXPERIMENT") == 1
            assert names.count(f"FILE_{site.parmfile}") == 1


def test_site_epoch_times_are_off_grid_and_exercise_half_even(mini_sample):
    starts = []
    for area in ("A1", "PEG"):
        for site in mini_sample.info.areas[area].sites:
            raw_rows = site_recording(mini_sample, area, site)["epochs"][1]
            starts += [s for n, s, _ in raw_rows if n.startswith("STIM_")]
    ms = np.array(starts) * 1000
    assert np.mean(np.round(ms) % 10 != 0) > 0.5  # not on the 10 ms grid
    assert all(round(s, 5) == s for s in starts)  # 5 decimals
    half_even_differs = [x for x in ms if x % 1 == 0.5 and math.floor(x) % 2 == 0]
    assert half_even_differs  # round() and round-half-up disagree here


@pytest.mark.parametrize("area", ["A1", "PEG"])
def test_pop_resp_equals_reference_rebinning_of_site_spikes(mirror, area):
    a = mirror.info.areas[area]
    rec = pop_recording(mirror, area)
    stims = list(a.val_stims) + list(a.est_stims)
    n_checked = 0
    for site in a.sites:
        site_rec = site_recording(mirror, area, site)
        epochs = site_rec["epochs"][1]
        for unit_id, cell in zip(site.unit_ids, site.pop_cell_ids, strict=True):
            if cell is None:
                continue
            row = rec["resp"][a.cell_ids.index(cell)]
            raster = reference_raster(site_rec["spikes"][unit_id], epochs, 1000)
            for k, stim in enumerate(stims):
                pop = row[150 * k : 150 * (k + 1)]
                trials = reference_cut(raster, epochs, 1000, stim)
                if len(trials) == 0:
                    assert np.isnan(pop).all()
                    continue
                assert trials.shape[1] == 150
                assert np.array_equal(trials.mean(axis=0), pop), (unit_id, stim)
                n_checked += 1
    assert n_checked > 100
    assert np.nansum(rec["resp"]) > 0


# ---- pred_correlation, wav ----------------------------------------------------------------


def test_pred_correlation_has_one_shuffled_row_per_unit(mirror):
    for area in ("A1", "PEG"):
        a = mirror.info.areas[area]
        text = (mirror.dir / a.pred_correlation_file).read_text()
        rows = list(csv.DictReader(io.StringIO(text)))
        assert tuple(rows[0]) == a.pred_correlation_columns
        cells = [r["cellid"] for r in rows]
        assert sorted(cells) == sorted(a.cell_ids) and cells != list(a.cell_ids)
        assert {r["sig_auditory"] for r in rows} <= {"True", "False"}
        auditory = {r["cellid"] for r in rows if r["sig_auditory"] == "True"}
        assert auditory == set(a.auditory_cell_ids)
        for r in rows:
            assert repr(float(r["r_test"])) == r["r_test"]


def test_wav_zip_has_one_readable_wav_per_sound(mirror):
    info = mirror.info
    a = info.areas["A1"]
    with zipfile.ZipFile(mirror.dir / "wav.zip") as zf:
        names = [n for n in zf.namelist() if n.endswith(".wav")]
        assert sorted(names) == sorted(info.wav_members.values())
        assert set(info.wav_members) == set(a.val_stims) | set(a.est_stims)
        for stim, member in info.wav_members.items():
            assert member.lower() == f"wav/{stim.removeprefix('STIM_')}".lower()
            samples, rate = soundfile.read(io.BytesIO(zf.read(member)))
            assert rate == 44100 and samples.shape == (44100,)
            assert soundfile.info(io.BytesIO(zf.read(member))).subtype == "PCM_16"
            assert 0 < np.abs(samples).max() <= 1


# ---- quirks -------------------------------------------------------------------------------


def test_clean_sample_has_no_quirks(mini_sample):
    info = mini_sample.info
    q = info.quirks_applied
    assert not (q.padded_electrode_sites or q.extra_sites or q.short_val or q.wav_case_mismatch)
    assert not (q.stray_members or q.units_without_site_data or q.start_end_name_sites)
    for area in ("A1", "PEG"):
        a = info.areas[area]
        assert not a.extra_sites and not a.stray_members and not a.units_without_site_data
        site_cells = {c for s in a.sites for c in s.pop_cell_ids}
        assert site_cells == set(a.cell_ids)
        assert all(s.unit_ids == s.pop_cell_ids for s in a.sites)
    for stim, member in info.wav_members.items():
        assert member == f"wav/{stim.removeprefix('STIM_')}"


def test_quirks_are_all_present(mini_quirks_sample):
    mirror = mini_quirks_sample
    info = mirror.info
    q = info.quirks_applied
    a1, peg = info.areas["A1"], info.areas["PEG"]

    # (1) TNC ids with a 3-digit electrode in the site file only
    tnc = a1.site("TNC015a")
    assert "TNC015a" in q.padded_electrode_sites
    for unit_id, cell in zip(tnc.unit_ids, tnc.pop_cell_ids, strict=True):
        site_id, electrode, unit = unit_id.split("-")
        assert len(electrode) == 3 and cell == f"{site_id}-{int(electrode):02d}-{unit}"
        assert unit_id not in a1.cell_ids and cell in a1.cell_ids

    # (2) an extra PEG site whose units are in neither the population nor pred_correlation
    assert ("PEG", "TNC022a") in q.extra_sites and peg.extra_sites == ("TNC022a",)
    extra = peg.site("TNC022a")
    assert not extra.in_population and set(extra.pop_cell_ids) == {None}
    pred = (mirror.dir / peg.pred_correlation_file).read_text()
    assert "TNC022a" not in pred and not any(c.startswith("TNC022a") for c in peg.cell_ids)
    with zipfile.ZipFile(mirror.dir / "PEG_single_sites.zip") as zf:
        assert extra.member in zf.namelist()

    # (3) one val sound shown 19 times at one site
    (short,) = q.short_val
    header, rows = site_recording(mirror, short.area, info.areas[short.area].site(short.site))[
        "epochs"
    ]
    assert short.n_reps == 19 and [n for n, _, _ in rows].count(short.stim) == 19

    # (4) wav names differing from the epoch name only in letter case
    assert len(q.wav_case_mismatch) >= 2
    for stim, member in q.wav_case_mismatch.items():
        expected = f"wav/{stim.removeprefix('STIM_')}"
        assert member != expected and member.lower() == expected.lower()

    # (5) stray non-recording files in the single_sites zips
    with zipfile.ZipFile(mirror.dir / "A1_single_sites.zip") as zf:
        names = zf.namelist()
    assert "A1_single_sites/.DS_Store" in names
    assert any(n.startswith("__MACOSX/A1_single_sites/._A1_") for n in names)
    assert set(q.stray_members["A1_single_sites.zip"]) <= set(names)
    assert tuple(names) == a1.single_sites_members

    # (6) a population unit with no per-site data
    (lost,) = q.units_without_site_data
    assert lost in a1.cell_ids and lost in a1.units_without_site_data
    assert all(lost not in s.pop_cell_ids for s in a1.sites)
    site = a1.site(lost.split("-")[0])
    assert lost not in site_recording(mirror, "A1", site)["spikes"]

    # epoch column order start,end,name in at least one site file
    assert "TNC015a" in q.start_end_name_sites
    assert site_recording(mirror, "A1", tnc)["epochs"][0] == ["start", "end", "name"]


# ---- determinism, scales, formatter -------------------------------------------------------


def test_same_seed_same_bytes_other_seed_other_bytes(mini_sample, tmp_path):
    again = write_sample(tmp_path / "again", scale="mini", seed=0)
    other = write_sample(tmp_path / "other", scale="mini", seed=1)
    assert again == mini_sample.info
    for name in (*RECORD_FILES, "record.json", "sample_info.json"):
        assert (tmp_path / "again" / name).read_bytes() == (mini_sample.dir / name).read_bytes()
    for name in ("A1_NAT4_ozgf.fs100.ch18.tgz", "PEG_single_sites.zip", "wav.zip"):
        assert (tmp_path / "other" / name).read_bytes() != (mini_sample.dir / name).read_bytes()
    assert other.areas["A1"].cell_ids == mini_sample.info.areas["A1"].cell_ids  # layout is fixed


def test_refuses_a_non_empty_directory_that_is_not_a_sample(tmp_path):
    """`sample --out` pointed at a store (or a home directory) must not scatter the mirror's
    files into it; a directory a sample was written to before is re-written."""
    from click.testing import CliRunner

    from nat4etl.cli import cli
    from nat4etl.errors import StoreError

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    store = tmp_path / "store"
    (store / "trials" / "area=A1").mkdir(parents=True)
    (store / "manifest.json").write_text("{}")
    for out in (other, store):
        before = sorted(p.name for p in out.iterdir())
        with pytest.raises(StoreError, match="sample_info.json"):
            write_sample(out, scale="mini")
        result = CliRunner().invoke(cli, ["sample", "--out", str(out)])
        assert result.exit_code == 7, result.output
        assert result.stderr.startswith(f"error: {out} ") and result.stderr.count("\n") == 1
        assert sorted(p.name for p in out.iterdir()) == before  # nothing was written
    assert "nat4etl store" in result.stderr

    again = tmp_path / "again"
    first = write_sample(again, scale="mini")  # new, then a previous sample: both fine
    (again / "wav.zip").write_bytes(b"damaged")
    result = CliRunner().invoke(cli, ["sample", "--out", str(again), "--quiet"])
    assert result.exit_code == 0, result.output
    assert SampleInfo.from_json((again / "sample_info.json").read_text()) == first
    assert (again / "wav.zip").read_bytes() != b"damaged"
    # no --config: it would change nothing a sample holds, so it is not offered
    config = tmp_path / "mine.toml"
    config.write_text("dt_ms = 20\n")
    refused = CliRunner().invoke(
        cli, ["sample", "--out", str(tmp_path / "s"), "--config", str(config)]
    )
    assert refused.exit_code == 2 and "--config" in refused.output


@pytest.mark.parametrize("scale", ["huge", 0, -1.0, float("nan")])
def test_bad_scale_is_a_config_error(tmp_path, scale):
    with pytest.raises(ConfigError, match="scale"):
        write_sample(tmp_path, scale=scale)


def test_full_and_float_scales_plan_the_real_dimensions():
    from nat4etl.sample import _plan_area, _plan_stims

    stims = _plan_stims("full", quirks=True)
    assert (len(stims.val), len(stims.est)) == (18, 575)
    assert len(set(stims.names)) == 593
    full = {area: _plan_area(area, "full", 1.0, True, stims) for area in ("A1", "PEG")}
    assert len(full["A1"].cell_ids) == 849 and len(full["A1"].sites) == 22
    assert len(full["PEG"].cell_ids) == 398 and len(full["PEG"].sites) == 12  # + TNC022a
    assert len(full["A1"].auditory) == 777 and len(full["PEG"].auditory) == 339
    assert {s.site[:3] for s in full["A1"].sites} == {"ARM", "CRD", "DRX", "TNC"}
    assert {s.site[:3] for s in full["PEG"].sites if s.in_population} == {"ARM"}
    double = _plan_area("A1", "2.0", 2.0, False, stims)
    assert len(double.cell_ids) == 1698 and len(set(double.cell_ids)) == 1698


def test_format_csv_18e_matches_np_savetxt_on_awkward_values():
    rng = np.random.default_rng(3)
    special = [0.0, -0.0, np.nan, np.inf, -np.inf, 5e-324, 1e100, 1e-99, 9.99e99, -1e-100]
    special += [k / 19 for k in range(40)] + [k / 20 for k in range(40)] + [1e300, -2.5e-7]
    data = rng.choice(np.array(special), size=(37, 11))
    data[3] = rng.normal(size=11) * 10.0 ** rng.integers(-120, 120, size=11)
    for block in (data, data[:, :1], data[:1], rng.poisson(0.1, size=(200, 7)).astype(float)):
        buf = io.BytesIO()
        np.savetxt(buf, block, delimiter=",", fmt="%.18e")
        assert format_csv_18e(block) == buf.getvalue()
        assert csv_18e_size(block) == len(buf.getvalue())

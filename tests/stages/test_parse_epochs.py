"""parse-epochs on small hand-made raw tables, then on the mini samples end to end."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow as pa
import pytest

from nat4etl import schema
from nat4etl.errors import InputMismatch
from nat4etl.stages import parse_epochs as pe

VAL_A = "STIM_00catA_rec1.wav"
VAL_B = "STIM_00catB_rec1.wav"
EST_X = "STIM_catX.wav"
EST_Y = "STIM_catY.wav"
ODD = "STIM_weird.wav"
POP = "NAT4_pop"


def _stim_block(name: str, start_s: float) -> list[tuple[str, float, float]]:
    """A 1.5 s STIM_ span with its 0.25 s silences, as baphy writes them."""
    return [
        (name, start_s, start_s + 1.5),
        ("REFERENCE", start_s, start_s + 1.5),
        ("PreStimSilence", start_s, start_s + 0.25),
        ("PostStimSilence", start_s + 1.25, start_s + 1.5),
    ]


def _epoch_rows(recording: str, signal: str, blocks: list[tuple[str, float, float]]):
    return [
        {
            "recording": recording,
            "signal": signal,
            "row": i,
            "name": n,
            "start_s": a,
            "end_s": b,
            "extra_json": None,
        }
        for i, (n, a, b) in enumerate(blocks)
    ]


def _session(names: list[str]) -> list[tuple[str, float, float]]:
    out = []
    for i, n in enumerate(names):
        out += _stim_block(n, 2.0 * i + 1.0)
    return out


SITE_ARM = [EST_X, VAL_A, VAL_B, VAL_A, VAL_B, EST_Y, VAL_A, VAL_B]  # 3 + 3 val
SITE_TNC = [VAL_A, VAL_B, VAL_A, VAL_B, VAL_A]  # VAL_B only twice
SITE_XYZ = [VAL_A, VAL_B, VAL_A, VAL_B, VAL_A, VAL_B]


def _raw(*, wav: bool = True) -> dict:
    pop_blocks = []
    for i, n in enumerate([VAL_A, VAL_B, EST_X, EST_Y, ODD]):
        pop_blocks += _stim_block(n, 1.5 * i)
    # every pop signal has its own (identical) epoch file: the union must not double them
    epochs = _epoch_rows(POP, "resp", pop_blocks) + _epoch_rows(POP, "stim", pop_blocks[::-1])
    sites = {"ARM001a": SITE_ARM, "TNC015a": SITE_TNC, "XYZ001a": SITE_XYZ}
    for site, names in sites.items():
        epochs += _epoch_rows(f"{site}_rec", "resp", _session(names))
    recordings = [
        {"recording": POP, "kind": "population", "site": None, "file": "A1_NAT4.tgz",
         "member": None, "meta_json": "{}", "skipped_members": []},
    ] + [
        {"recording": f"{s}_rec", "kind": "site", "site": s, "file": "A1_single_sites.zip",
         "member": f"A1_single_sites/A1_{s}_ab.tgz", "meta_json": "{}",
         "skipped_members": ["._x.h5"] if s == "XYZ001a" else []}
        for s in sites
    ]  # fmt: skip
    chans = ["ARM001a-01-1", "TNC015a-012-1", "ARM001a-02-1"]
    signals = [
        {"recording": POP, "signal": "resp", "signal_type": "rasterized", "fs_hz": 100.0,
         "n_chans": 3, "n_samples": 750, "chans": chans, "segments_json": None, "meta_json": None},
        {"recording": POP, "signal": "stim", "signal_type": "rasterized", "fs_hz": 100.0,
         "n_chans": 2, "n_samples": 750, "chans": None, "segments_json": None, "meta_json": None},
    ]  # fmt: skip
    units = [
        ("ARM001a", "ARM001a-01-1"),
        ("ARM001a", "ARM001a-05-1"),
        ("TNC015a", "TNC015a-12-1"),
        ("XYZ001a", "XYZ001a-01-1"),
    ]
    spikes = [
        {"site": s, "recording": f"{s}_rec", "signal": "resp", "unit_id": u, "spike_times_s": []}
        for s, u in units
    ]
    pred = pa.table(
        {
            "cellid": ["TNC015a-12-1", "ARM001a-01-1", "ZZZ001a-01-1"],
            "sig_auditory": [True, False, True],
            "r_test": [0.5, 0.25, 0.1],
            "site": ["x", "y", "z"],  # clashes with cells.site: carried as pred_site
        }
    )
    members = [{"file": "A1_single_sites.zip", "member": "__MACOSX/._a", "kind": "skipped",
                "size_bytes": 1}]  # fmt: skip
    if wav:
        members += [
            {"file": "wav.zip", "member": f"wav/{n}", "kind": "wav", "size_bytes": 1}
            for n in ("00catA_rec1.wav", "00CATB_rec1.wav", "catX.wav", "weird.wav")
        ]
    return {
        "recordings": pa.Table.from_pylist(recordings, schema=schema.RECORDINGS.schema),
        "signals": pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema),
        "epochs": pa.Table.from_pylist(epochs, schema=schema.EPOCHS.schema),
        "site_spikes": pa.Table.from_pylist(spikes, schema=schema.SITE_SPIKES.schema),
        "pred_correlation": pred,
        "source_members": pa.Table.from_pylist(members, schema=schema.SOURCE_MEMBERS.schema),
    }


def _parse(raw: dict) -> pe.Parsed:
    inputs = pe.area_inputs(
        raw["recordings"],
        raw["signals"],
        raw["epochs"],
        raw["site_spikes"],
        pred_correlation=raw["pred_correlation"],
        source_members=raw["source_members"],
        area="A1",
    )
    return pe.parse_area(inputs)


@pytest.fixture(scope="module")
def parsed() -> pe.Parsed:
    return _parse(_raw())


def _report(parsed: pe.Parsed) -> dict[tuple[str, str], str]:
    return {(r["kind"], r["subject"]): r["detail"] for r in parsed.report.to_pylist()}


def test_stims_est_then_val_then_other_in_first_appearance_order(parsed):
    rows = parsed.stims.to_pylist()
    assert [r["name"] for r in rows] == [EST_X, EST_Y, VAL_A, VAL_B, ODD]
    assert [r["stim"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["subset"] for r in rows] == ["est", "est", "val", "val", "other"]
    assert rows[0]["wav_name"] == "catX.wav"
    assert rows[0]["pop_start_s"] == 3.0
    for r in rows:
        assert r["duration_s"] == 1.5
        assert r["prestim_s"] == 0.25
        assert r["poststim_s"] == 0.25
        assert r["n_frames"] == 150
    schema.validate("stims", parsed.stims)


def test_trials_count_repetitions_per_site_in_presentation_order(parsed):
    rows = parsed.trials.to_pylist()
    arm = [r for r in rows if r["site"] == "ARM001a"]
    assert [r["order"] for r in arm] == list(range(len(SITE_ARM)))
    ids = {n: i for i, n in enumerate([EST_X, EST_Y, VAL_A, VAL_B, ODD])}
    assert [r["stim"] for r in arm] == [ids[n] for n in SITE_ARM]
    assert [r["trial"] for r in arm if r["stim"] == ids[VAL_A]] == [0, 1, 2]
    assert [r["start_s"] for r in arm][:2] == [1.0, 3.0]
    assert len(rows) == len(SITE_ARM) + len(SITE_TNC) + len(SITE_XYZ)
    schema.validate("trials", parsed.trials)


def test_cells_in_channel_order_matched_exact_canonical_none(parsed):
    rows = parsed.cells.to_pylist()
    assert [r["cell_id"] for r in rows] == ["ARM001a-01-1", "TNC015a-012-1", "ARM001a-02-1"]
    assert [r["match"] for r in rows] == ["exact", "canonical", "none"]
    assert [r["site_unit_id"] for r in rows] == ["ARM001a-01-1", "TNC015a-12-1", None]
    assert [r["n_val_trials"] for r in rows] == [6, 5, 0]
    assert [r["auditory"] for r in rows] == [False, True, None]
    assert [r["r_test"] for r in rows] == [0.25, 0.5, None]
    assert [r["pred_site"] for r in rows] == ["y", "x", None]
    assert (rows[1]["site"], rows[1]["animal"], rows[1]["electrode"], rows[1]["unit"]) == (
        "TNC015a",
        "TNC",
        12,
        1,
    )
    schema.validate("cells", parsed.cells)


def test_report_names_every_mismatch(parsed):
    report = _report(parsed)
    assert set(report) == {
        ("unit_without_site_data", "ARM001a-02-1"),
        ("unit_without_pred_correlation", "ARM001a-02-1"),
        ("pred_correlation_unit_not_in_population", "ZZZ001a-01-1"),
        ("site_unit_not_in_population", "ARM001a-05-1"),
        ("site_unit_not_in_population", "XYZ001a-01-1"),
        ("site_without_population_units", "XYZ001a"),
        ("repetition_count", f"TNC015a/{VAL_B}"),
        ("stim_unclassified", ODD),
        ("wav_case_only_match", VAL_B),
        ("wav_missing", EST_Y),
        ("skipped_member", "A1_single_sites.zip:__MACOSX/._a"),
        ("skipped_member", "A1_single_sites.zip:A1_single_sites/A1_XYZ001a_ab.tgz:._x.h5"),
    }
    assert report[("repetition_count", f"TNC015a/{VAL_B}")].startswith("2 repetitions")
    # why, from the name, as unpack's readers decided (the report outlives unpack's log)
    assert report[
        ("skipped_member", "A1_single_sites.zip:A1_single_sites/A1_XYZ001a_ab.tgz:._x.h5")
    ] == ("not read: operating-system metadata file")
    assert report[("skipped_member", "A1_single_sites.zip:__MACOSX/._a")] == (
        "not read: operating-system litter (__MACOSX/, ._*, .DS_Store) or a hidden file"
    )
    schema.validate("report", parsed.report)


def test_a_site_unit_outside_its_resp_signal_is_not_matched_and_is_named():
    """A site's units are its resp's (``rec['resp']``), which rebin-sites bins: a unit of
    another PointProcess signal was matched, its trials counted, and binned nowhere (its
    val responses NaN with no report row)."""
    raw = _raw()
    spikes = raw["site_spikes"].to_pylist() + [
        {"site": "ARM001a", "recording": "ARM001a_rec", "signal": "spikes",
         "unit_id": "ARM001a-02-1", "spike_times_s": []},
    ]  # fmt: skip
    raw["site_spikes"] = pa.Table.from_pylist(spikes, schema=schema.SITE_SPIKES.schema)
    parsed = _parse(raw)
    row = parsed.cells.to_pylist()[2]
    assert (row["cell_id"], row["match"], row["n_val_trials"]) == ("ARM001a-02-1", "none", 0)
    assert _report(parsed)[("unit_without_site_data", "ARM001a-02-1")] == (
        "no per-site unit with this id in a site's resp (ARM001a/spikes has it: only resp "
        "is binned)"
    )


def test_no_wav_listing_means_no_wav_report():
    parsed = _parse(_raw(wav=False))
    kinds = {r["kind"] for r in parsed.report.to_pylist()}
    assert not kinds & {"wav_case_only_match", "wav_missing"}


def test_a_stray_member_of_wav_zip_is_reported_as_not_a_wav_not_as_unpack_s():
    """parse-epochs lists wav.zip itself (unpack does not read it): unpack's log says
    nothing of its litter."""
    raw = _raw()
    litter = {"file": "wav.zip", "member": "__MACOSX/wav/._catX.wav", "kind": "skipped",
              "size_bytes": 1}  # fmt: skip
    rows = [*raw["source_members"].to_pylist(), litter]
    raw["source_members"] = pa.Table.from_pylist(rows, schema=schema.SOURCE_MEMBERS.schema)
    detail = _report(_parse(raw))[("skipped_member", "wav.zip:__MACOSX/wav/._catX.wav")]
    assert (
        detail == "not read: operating-system litter (__MACOSX/, ._*, .DS_Store) or a hidden file"
    )


@pytest.mark.parametrize(
    ("file", "member", "in_recording", "why"),
    [
        ("wav.zip", "wav/readme.txt", False, "not a .wav"),
        ("A1_single_sites.zip", "A1_single_sites/notes.pdf", False, "not a .tgz (a site recording)"),
        ("A1_NAT4.tgz", "R/01.R.resp.csv", True, "jackknife view 1; only view 0 is stored"),
        ("A1_NAT4.tgz", "R/R.resp.epoch.csv", True, "empty (0 bytes), as NEMS0 skips it"),
        ("A1_NAT4.tgz", "R/R.resp.epochs.csv", True,
         "name is not R.S.csv or NN.R.S.csv ('.epochs.csv' is not the NEMS0 spelling)"),
        ("A1_NAT4.tgz", "R/notes.txt", True, "unexpected extension 'txt'"),
    ],
)  # fmt: skip
def test_a_skipped_member_s_report_row_says_why(file, member, in_recording, why):
    raw = _raw()
    if in_recording:
        recs = raw["recordings"].to_pylist()
        recs[0]["skipped_members"] = [member]
        raw["recordings"] = pa.Table.from_pylist(recs, schema=raw["recordings"].schema)
    else:
        row = {"file": file, "member": member, "kind": "skipped", "size_bytes": 1}
        rows = [*raw["source_members"].to_pylist(), row]
        raw["source_members"] = pa.Table.from_pylist(rows, schema=schema.SOURCE_MEMBERS.schema)
    assert _report(_parse(raw))[("skipped_member", f"{file}:{member}")] == f"not read: {why}"


def test_wav_names_in_backslash_folders_are_checked_by_their_file_name():
    """Some Windows tools write ``wav\\x.wav`` (align-wav matches it by its file name): the
    names are checked as with ``wav/x.wav``, not every sound reported missing."""
    raw = _raw()
    rows = [
        {**m, "member": m["member"].replace("/", "\\")} if m["file"] == "wav.zip" else m
        for m in raw["source_members"].to_pylist()
    ]
    raw["source_members"] = pa.Table.from_pylist(rows, schema=schema.SOURCE_MEMBERS.schema)
    assert any("\\" in m["member"] for m in rows)
    assert _report(_parse(raw)) == _report(_parse(_raw()))


def test_counts_come_from_the_data(parsed):
    c = parsed.counts
    assert (c["stims_est"], c["stims_val"], c["stims_other"]) == (2, 2, 1)
    assert (c["cells_exact"], c["cells_canonical"], c["cells_none"]) == (1, 1, 1)
    assert c["trials"] == parsed.trials.num_rows


def test_duplicate_epochs_count_once():
    raw = _raw()
    rows = raw["epochs"].to_pylist()
    again = [{**r, "row": r["row"] + 10_000} for r in rows]
    raw["epochs"] = pa.Table.from_pylist(rows + again, schema=schema.EPOCHS.schema)
    assert _parse(raw).trials.num_rows == _parse(_raw()).trials.num_rows


# ---------------------------------------------------------------- extract_epoch semantics
def _nems0_extract(rows: list[tuple[float, float]], fs_hz: float) -> list[tuple[float, float]]:
    """nems0-format.md section 4, written out: snap, 'exclude', then remove_overlap."""

    bounds = np.round(np.array(rows, dtype=np.float64) * fs_hz) / fs_hz
    bounds = bounds[bounds[:, 0] >= 0]
    bounds.sort(axis=0)
    kept = [bounds[0]] if len(bounds) else []
    for start, end in bounds[1:]:
        if start >= kept[-1][1]:
            kept.append((start, end))
    return [(float(a), float(b)) for a, b in kept]


def _trials_of(rows: list[tuple[float, float]], fs_hz: float | None = 1000.0):
    name = "STIM_00catA_rec1.wav"
    stims = pe.build_stims([pe.Epoch(name, 0.0, 1.5)], stim_fs_hz=100.0, report=pe.Report())
    report = pe.Report()
    epochs = pe.recording_epochs((name, a, b) for a, b in rows)
    fs = None if fs_hz is None else {"S": fs_hz}
    return pe.build_trials({"S": epochs}, stims, report=report, fs_hz=fs), report


@pytest.mark.parametrize(
    "rows",
    [
        [(0.0, 1.5), (1.0, 2.5), (3.0, 4.5)],  # the second overlaps the first
        [(0.0, 1.5), (1.5, 3.0), (3.0, 4.5)],  # abutting: all kept
        [(2.0, 2.0), (2.0, 3.0), (3.0, 3.0)],  # zero-length ones abut: all kept
        [(0.0, 3.0), (1.0, 1.5), (4.0, 5.0)],  # a short one inside a long one
        [(-0.0004, 1.4996), (2.0, 3.5)],  # starts before 0, but 0 on the 1 kHz grid
        [(-0.0006, 1.4994), (2.0, 3.5)],  # -1 sample on the grid: before the recording
        [(1.0, 2.5004), (2.5, 4.0)],  # overlaps as written, abuts on the grid
    ],
)
def test_trials_are_what_extract_epoch_returns(rows):
    trials, _ = _trials_of(rows)
    want = _nems0_extract(rows, 1000.0)
    got = [(round(t.start_s * 1000) / 1000, round(t.end_s * 1000) / 1000) for t in trials]
    assert got == want
    assert [t.trial for t in trials] == list(range(len(want)))


def test_left_out_presentations_are_reported_and_kept_ones_keep_their_times():
    trials, report = _trials_of([(-0.0006, 1.4994), (2.0, 3.5), (3.0, 4.5), (5.0004, 6.5)])
    assert [(t.start_s, t.end_s) for t in trials] == [(2.0, 3.5), (5.0004, 6.5)]
    assert [t.order for t in trials] == [1, 3]  # order still counts every presentation
    assert set(report.kinds()) == {"presentation_before_recording", "overlapping_presentation"}
    subjects = {subject for _, subject in report.rows}
    assert subjects == {"S/STIM_00catA_rec1.wav@-0.0006", "S/STIM_00catA_rec1.wav@3"}


def test_without_a_sampling_rate_bounds_are_taken_as_written():
    trials, report = _trials_of([(-0.0004, 1.4996), (2.0, 3.5)], fs_hz=None)
    assert [t.start_s for t in trials] == [2.0]
    assert report.kinds() == {"presentation_before_recording": 1}


def test_site_sampling_rate_comes_from_its_resp_signal():
    raw = _raw()
    signals = raw["signals"].to_pylist() + [
        {"recording": "ARM001a_rec", "signal": "resp", "signal_type": "point_process",
         "fs_hz": 1000.0, "n_chans": 2, "n_samples": None, "chans": None,
         "segments_json": None, "meta_json": None},
    ]  # fmt: skip
    raw["signals"] = pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema)
    rows = raw["epochs"].to_pylist()
    # ARM001a's first VAL_A ends 0.4 ms into the second: it overlaps as written, but
    # both are whole samples apart on the 1 kHz grid only after snapping
    first = next(r for r in rows if r["recording"] == "ARM001a_rec" and r["name"] == VAL_A)
    first["end_s"] = 5.0004
    raw["epochs"] = pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)
    inputs = pe.area_inputs(
        raw["recordings"], raw["signals"], raw["epochs"], raw["site_spikes"], area="A1"
    )
    assert inputs.site_fs_hz == {"ARM001a": 1000.0}
    parsed = pe.parse_area(inputs)
    arm = [r for r in parsed.trials.to_pylist() if r["site"] == "ARM001a"]
    assert len(arm) == len(SITE_ARM)  # snapped to 5.0: abuts the next VAL_A at 5.0
    assert [r["order"] for r in arm] == list(range(len(SITE_ARM)))


def test_missing_population_is_an_input_mismatch():
    raw = _raw()
    raw["recordings"] = raw["recordings"].filter(
        pa.compute.equal(raw["recordings"]["kind"], "site")
    )
    with pytest.raises(InputMismatch, match="population"):
        _parse(raw)


def test_silence_outside_the_span_is_not_taken():
    epochs = [pe.Epoch("STIM_catA", 0.0, 1.0), pe.Epoch("PreStimSilence", 1.0, 1.5)]
    stims = pe.build_stims(epochs, stim_fs_hz=100.0, report=pe.Report())
    assert stims[0].prestim_s == 0.0
    assert stims[0].n_frames == 100


def test_report_table_is_json_friendly(parsed):
    json.dumps(parsed.report.to_pylist())


# ============================================================================ mini samples
@pytest.fixture(scope="module", params=["clean", "quirks"])
def built(request, tmp_path_factory, mini_sample, mini_quirks_sample):
    from click.testing import CliRunner

    from nat4etl.cli import cli
    from nat4etl.store import Store

    mirror = mini_sample if request.param == "clean" else mini_quirks_sample
    out = tmp_path_factory.mktemp(f"parse_{request.param}") / "store"
    # fetched, so that parse-epochs finds wav.zip in raw/ (as align-wav does)
    for args in (["fetch", "--source", str(mirror.dir)], ["unpack"], ["parse-epochs"]):
        result = CliRunner().invoke(cli, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    return mirror.info, Store(out), result.output


def test_without_wav_zip_the_wav_names_are_not_checked_and_a_warning_says_so(
    tmp_path, mini_quirks_sample
):
    """wav.zip is read from raw/ (as align-wav reads it), not from where unpack's --source
    was: without it the wav checks are left out, and said to be (not in a --no-wav
    build, which asks for no waveforms)."""
    from click.testing import CliRunner

    from nat4etl.cli import cli
    from nat4etl.store import Store

    out = tmp_path / "store"
    src = str(mini_quirks_sample.dir)
    for args in (["unpack", "--area", "A1", "--source", src], ["parse-epochs"]):
        result = CliRunner().invoke(cli, [*args, "--out", str(out)])
        assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.output.splitlines() if "wav.zip" in line]
    assert f"no wav.zip in {out / 'raw'}: the sounds' wav names are not checked" in warning
    assert f"`nat4etl fetch --wav --out {out}` gets it" in warning
    kinds = {r["kind"] for r in Store(out).read_table("report", area="A1").to_pylist()}
    assert "skipped_member" in kinds and not kinds & {"wav_case_only_match", "wav_missing"}
    built = CliRunner().invoke(
        cli, ["build", "--area", "A1", "--no-wav", "--source", src, "--out", str(tmp_path / "b")]
    )
    assert built.exit_code == 0 and "wav names are not checked" not in built.output
    # nor in a stage command on that store: it asks for the store's waveforms (none)
    again = CliRunner().invoke(cli, ["parse-epochs", "--out", str(tmp_path / "b"), "--force"])
    assert again.exit_code == 0 and "wav names are not checked" not in again.output


AREAS = ("A1", "PEG")


@pytest.mark.parametrize("area", AREAS)
def test_stims_match_the_sample(built, area):
    info, store, _ = built
    a = info.areas[area]
    stims = store.read_table("stims", area=area).to_pylist()
    assert [s["name"] for s in stims] == [*a.est_stims, *a.val_stims]
    assert [s["subset"] for s in stims] == ["est"] * len(a.est_stims) + ["val"] * len(a.val_stims)
    assert [s["stim"] for s in stims] == list(range(len(stims)))
    for s in stims:
        assert s["n_frames"] == info.n_frames_per_stim
        assert s["prestim_s"] == pytest.approx(info.pre_stim_s)
        assert s["poststim_s"] == pytest.approx(info.post_stim_s)
        assert s["duration_s"] == pytest.approx(info.pre_stim_s + info.sound_s + info.post_stim_s)
        assert s["wav_name"] == s["name"].removeprefix("STIM_")


@pytest.mark.parametrize("area", AREAS)
def test_cells_match_the_sample(built, area):
    info, store, _ = built
    a = info.areas[area]
    cells = store.read_table("cells", area=area).to_pylist()
    assert [c["cell_id"] for c in cells] == list(a.cell_ids)
    site_of = {}
    for site in a.sites:
        for unit_id, pop_id in zip(site.unit_ids, site.pop_cell_ids, strict=True):
            if pop_id is not None:
                site_of[pop_id] = (site, unit_id)
    for c in cells:
        assert c["auditory"] == (c["cell_id"] in a.auditory_cell_ids)
        if c["cell_id"] in a.units_without_site_data:
            assert (c["match"], c["site_unit_id"], c["n_val_trials"]) == ("none", None, 0)
            continue
        site, unit_id = site_of[c["cell_id"]]
        assert c["site_unit_id"] == unit_id
        assert c["match"] == ("exact" if unit_id == c["cell_id"] else "canonical")
        assert c["n_val_trials"] == sum(site.val_reps.values())
        assert c["site"] == site.site
    if info.quirks and area == "A1":
        assert any(c["match"] == "canonical" for c in cells)  # TNC 3-digit electrodes
        assert [c["cell_id"] for c in cells if c["match"] == "none"] == list(
            a.units_without_site_data
        )
    extra = set(a.pred_correlation_columns) - {"cellid", "sig_auditory", "area"}
    assert extra <= set(cells[0])


@pytest.mark.parametrize("area", AREAS)
def test_trials_match_the_sample(built, area):
    info, store, _ = built
    a = info.areas[area]
    trials = store.read_table("trials", area=area).to_pylist()
    names = {s["stim"]: s["name"] for s in store.read_table("stims", area=area).to_pylist()}
    for site in a.sites:
        rows = sorted((t for t in trials if t["site"] == site.site), key=lambda t: t["order"])
        assert len(rows) == site.n_presentations
        assert [t["order"] for t in rows] == list(range(site.n_presentations))
        reps = {}
        for t in rows:
            assert t["trial"] == reps.get(t["stim"], 0)
            reps[t["stim"]] = t["trial"] + 1
        val = {names[s]: n for s, n in reps.items() if names[s] in a.val_stims}
        assert val == site.val_reps
        assert not set(site.missing_stims) & {names[s] for s in reps}


@pytest.mark.parametrize("area", AREAS)
def test_report_matches_the_sample(built, area):
    info, store, output = built
    a = info.areas[area]
    q = info.quirks_applied
    report = {(r["kind"], r["subject"]) for r in store.read_table("report", area=area).to_pylist()}
    want = set()
    want |= {("unit_without_site_data", u) for u in a.units_without_site_data}
    want |= {("site_without_population_units", s) for s in a.extra_sites}
    for site in a.sites:
        if not site.in_population:
            want |= {("site_unit_not_in_population", u) for u in site.unit_ids}
    want |= {("repetition_count", f"{x.site}/{x.stim}") for x in q.short_val if x.area == area}
    want |= {("wav_case_only_match", name) for name in q.wav_case_mismatch}
    want |= {
        ("skipped_member", f"{a.single_sites_file}:{m}")
        for m in a.stray_members
        if not m.endswith("/")
    }
    assert report == want
    for kind, subject in report:
        assert f"{area}: {kind} {subject}" in output
    if info.quirks:
        kinds = {k for k, _ in report}
        assert {"wav_case_only_match", "skipped_member"} <= kinds
        if area == "PEG":
            assert ("site_without_population_units", "TNC022a") in report
        else:
            assert "repetition_count" in kinds  # the 19-repetition sound
            assert ("unit_without_site_data", "DRX006b-124-1") in report


@pytest.mark.parametrize("area", AREAS)
def test_mask_est_row_0_is_read_from_the_store(built, area):
    info, store, _ = built
    a = info.areas[area]
    mask = pe.read_mask_est(store, area)
    n_frames = info.n_frames_per_stim
    assert mask.shape == ((len(a.val_stims) + len(a.est_stims)) * n_frames,)
    assert mask[: len(a.val_stims) * n_frames].sum() == 0
    assert (mask[len(a.val_stims) * n_frames :] == 1).all()


def _with_segments(raw: dict, segments: dict[tuple[str, str], str | None]) -> dict:
    """``raw`` with the JSON segments of (recording, signal), adding a 1 kHz site resp row
    for a site recording not yet in ``signals``."""
    signals = raw["signals"].to_pylist()
    known = {(r["recording"], r["signal"]) for r in signals}
    for recording, signal in segments:
        if (recording, signal) not in known:
            signals.append(
                {"recording": recording, "signal": signal, "signal_type": "point_process",
                 "fs_hz": 1000.0, "n_chans": 2, "n_samples": None, "chans": None,
                 "segments_json": None, "meta_json": None}
            )  # fmt: skip
    for r in signals:
        r["segments_json"] = segments.get((r["recording"], r["signal"]), r["segments_json"])
    return {**raw, "signals": pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema)}


@pytest.mark.parametrize(
    ("segments", "applied"),
    [(None, False), ("null", False), ("[[0, 750]]", False), ("[[0.0, 7.5]]", False),
     ("[[0.0, 7.0]]", True), ("[[0, 5.0], [10.0, 20.0]]", True), ("[[1.5, 7.5]]", True)],
)  # fmt: skip
def test_segments_apply_where_they_change_anything(segments, applied):
    """NEMS0's default, one span from 0 past every epoch (its end a sample count read as
    seconds), changes nothing and leaves the times as written; any other span does."""
    rows = _report(_parse(_with_segments(_raw(), {(POP, "resp"): segments})))
    key = ("segments_applied", f"{POP}/resp")
    assert (key in rows) is applied
    if applied:
        as_floats = [[float(x) for x in span] for span in json.loads(segments)]
        assert json.dumps(as_floats) in rows[key]
    assert ("segments_not_applied", f"{POP}/stim") not in rows  # the stim has none


def test_population_segments_place_each_sound_where_extract_epoch_finds_it():
    """Sounds at 0, 1.5, 3.0, 4.5 and 6.0 s, 1.5 s each; spans [1.5, 3.0] and [4.5, 7.5]
    concatenated: VAL_B fills the first (data 0 s), EST_Y and ODD follow in the second
    (data 1.5 and 3.0 s); VAL_A and EST_X lie in no span and are left out."""
    spans = "[[1.5, 3.0], [4.5, 7.5]]"
    parsed = _parse(_with_segments(_raw(), {(POP, "resp"): spans, (POP, "stim"): spans}))
    stims = {r["name"]: r for r in parsed.stims.to_pylist()}
    assert [r["name"] for r in parsed.stims.to_pylist()] == [EST_Y, VAL_B, ODD]
    assert {n: r["pop_start_s"] for n, r in stims.items()} == {VAL_B: 0.0, EST_Y: 1.5, ODD: 3.0}
    assert all(r["duration_s"] == 1.5 and r["n_frames"] == 150 for r in stims.values())
    rows = _report(parsed)
    for name in (VAL_A, EST_X):
        assert ("stim_outside_segments", name) in rows
    assert ("segments_applied", f"{POP}/stim") in rows  # the same spans: used alike


def test_point_process_segments_are_ignored_as_nems0_loads_and_rasterizes_it():
    """nems0-format.md sections 2.1/3: NEMS0's ``load_signal_from_streams`` sets
    ``segments`` from the JSON only for a RasterizedSignal; a PointProcess (a site's
    ``resp``) gets the default, and ``PointProcess.rasterize`` builds its raster with the
    default ``[[0, ntimes]]`` again. The spike times stay in the recording's own time, so
    extract_epoch cuts every presentation where its epoch says, whatever the JSON
    segments of the PointProcess: trials are those of a file without segments."""
    spans = "[[0.0, 6.0], [8.0, 100.0]]"
    parsed = _parse(_with_segments(_raw(), {("ARM001a_rec", "resp"): spans}))
    assert parsed.trials.to_pylist() == _parse(_raw()).trials.to_pylist()
    rows = _report(parsed)
    assert ("segments_applied", "ARM001a_rec/resp") not in rows
    assert ("segments_not_applied", "ARM001a_rec/resp") in rows
    assert not any(kind == "presentation_outside_segments" for kind, _ in rows)


def test_site_segments_place_trials_in_the_site_data_and_leave_out_what_no_span_holds():
    """A rasterized site resp (NEMS0 keeps its JSON segments): ARM001a presents sounds at
    1, 3, 5, ... 15 s, 1.5 s each; spans [0, 6] and [8, 100]: a presentation must lie
    within one (5.0-6.5 and 7.0-8.5 do not), and one in the second span sits 6 s (the
    first span's length) after that span's start in the data."""
    spans = "[[0.0, 6.0], [8.0, 100.0]]"
    raw = _with_segments(_raw(), {("ARM001a_rec", "resp"): spans})
    signals = raw["signals"].to_pylist()
    for r in signals:
        if r["recording"] == "ARM001a_rec":
            r["signal_type"] = "rasterized"
    raw["signals"] = pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema)
    parsed = _parse(raw)
    ids = {r["name"]: r["stim"] for r in parsed.stims.to_pylist()}
    arm = [t for t in parsed.trials.to_pylist() if t["site"] == "ARM001a"]
    got = {(t["stim"], t["trial"]): (t["start_s"], t["end_s"]) for t in arm}
    assert got == {
        (ids[EST_X], 0): (1.0, 2.5),
        (ids[VAL_A], 0): (3.0, 4.5),
        (ids[VAL_B], 0): (7.0, 8.5),  # 9.0 s -> 6 + (9 - 8)
        (ids[EST_Y], 0): (9.0, 10.5),
        (ids[VAL_A], 1): (11.0, 12.5),
        (ids[VAL_B], 1): (13.0, 14.5),
    }
    orders = {(t["stim"], t["trial"]): t["order"] for t in arm}
    assert orders[(ids[VAL_A], 1)] == 6 and orders[(ids[VAL_B], 0)] == 4  # presentation index
    rows = _report(parsed)
    assert ("segments_applied", "ARM001a_rec/resp") in rows
    assert ("presentation_outside_segments", f"ARM001a/{VAL_B}@5") in rows
    assert ("presentation_outside_segments", f"ARM001a/{VAL_A}@7") in rows
    others = [t for t in parsed.trials.to_pylist() if t["site"] != "ARM001a"]
    assert others == [t for t in _parse(_raw()).trials.to_pylist() if t["site"] != "ARM001a"]


def test_site_trials_come_from_the_resp_signals_own_epochs():
    """nems0-format.md section 3: every signal has its own epoch table, and
    ``rec['resp'].rasterize().extract_epoch(name)`` looks only at resp's. A presentation
    that only another signal of the site recording lists (here a ``pupil`` signal with
    one more VAL_A) is not a trial of the units."""
    raw = _raw()
    extra = _epoch_rows("ARM001a_rec", "pupil", _session(SITE_ARM) + _stim_block(VAL_A, 40.0))
    epochs = raw["epochs"].to_pylist() + extra
    raw = {**raw, "epochs": pa.Table.from_pylist(epochs, schema=schema.EPOCHS.schema)}
    assert _parse(raw).trials.to_pylist() == _parse(_raw()).trials.to_pylist()


def test_a_stim_epoch_with_a_time_that_is_not_finite_is_reported_and_left_out():
    """A STIM_ row whose end is inf or NaN has no sample to be placed at: it is left out,
    as before, and now a report row names it (the population's as ``population``, a
    site's by its site)."""
    raw = _raw()
    rows = raw["epochs"].to_pylist()
    pop_row = next(r for r in rows if r["recording"] != "ARM001a_rec" and r["name"] == VAL_A)
    site_row = next(r for r in rows if r["recording"] == "ARM001a_rec" and r["name"] == VAL_B)
    pop_row["end_s"] = math.inf
    site_row["start_s"] = math.nan
    raw["epochs"] = pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)
    parsed = _parse(raw)
    bad = {
        (r["kind"], r["subject"]): r["detail"]
        for r in parsed.report.to_pylist()
        if r["kind"] == "stim_epoch_time_not_finite"
    }
    assert set(bad) == {
        ("stim_epoch_time_not_finite", f"population/{VAL_A}"),
        ("stim_epoch_time_not_finite", f"ARM001a/{VAL_B}"),
    }
    assert "end inf" in bad[("stim_epoch_time_not_finite", f"population/{VAL_A}")]
    clean = _parse(_raw())
    arm = [t for t in parsed.trials.to_pylist() if t["site"] == "ARM001a"]
    arm_clean = [t for t in clean.trials.to_pylist() if t["site"] == "ARM001a"]
    assert len(arm) == len(arm_clean) - 1


# ---------------------------------------------------------------- interpretation edge cases
def _with_site_session(raw: dict, site: str, names: list[str]) -> dict:
    rows = [r for r in raw["epochs"].to_pylist() if r["recording"] != f"{site}_rec"]
    rows += _epoch_rows(f"{site}_rec", "resp", _session(names))
    return {**raw, "epochs": pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)}


def test_a_val_sound_a_site_never_presented_is_a_repetition_count_of_0():
    # TNC015a plays VAL_A three times and VAL_B not at all: its units have no single
    # trials of VAL_B, which must be said as a short count is (README: odd counts reported)
    report = _report(_parse(_with_site_session(_raw(), "TNC015a", [VAL_A] * 3)))
    assert report[("repetition_count", f"TNC015a/{VAL_B}")].startswith("0 repetitions")
    assert ("repetition_count", f"TNC015a/{VAL_A}") not in report  # 3, as at every site


def test_a_stim_without_its_silences_in_the_population_is_reported():
    # prestim_s places the wav (align-wav); a missing PreStimSilence must not pass as 0 s
    raw = _raw()
    rows = [
        r
        for r in raw["epochs"].to_pylist()
        if not (r["recording"] == POP and r["name"] == "PreStimSilence" and r["start_s"] == 3.0)
    ]
    raw["epochs"] = pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)
    parsed = _parse(raw)
    assert parsed.stims.to_pylist()[0]["prestim_s"] == 0.0
    report = _report(parsed)
    assert ("silence_missing", EST_X) in report
    assert "PreStimSilence" in report[("silence_missing", EST_X)]
    assert not any(k == "silence_missing" for k, s in report if s != EST_X)


def test_a_site_presentation_longer_or_shorter_than_the_sound_is_reported():
    # rebin-sites cuts n_bins from each start: a 1.6 s presentation is silently cut, a
    # 1.4 s one NaN-padded; the 1.5 s population epoch is the reference
    raw = _raw()
    rows = raw["epochs"].to_pylist()
    for r in rows:
        if r["recording"] == "TNC015a_rec" and r["name"] == VAL_A:
            if r["start_s"] == 1.0:
                r["end_s"] = 2.6
            elif r["start_s"] == 5.0:
                r["end_s"] = 6.4
    raw["epochs"] = pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)
    report = _report(_parse(raw))
    lengths = {s for k, s in report if k == "presentation_length"}
    assert lengths == {f"TNC015a/{VAL_A}@1", f"TNC015a/{VAL_A}@5"}


def _silence_rows(parsed: pe.Parsed) -> dict[str, str]:
    return {s: d for (k, s), d in _report(parsed).items() if k == "site_silence_length"}


def test_site_silences_as_long_as_the_populations_add_no_report_row(parsed):
    assert _silence_rows(parsed) == {}


def test_a_site_silence_of_another_length_or_missing_is_reported_per_site():
    # ARM001a: the 2nd presentation (VAL_A at 3 s) has a 0.5 s PreStimSilence, the 4th
    # (VAL_A at 7 s) none; TNC015a loses the PostStimSilence of its 1st presentation
    raw = _raw()
    rows = []
    for r in raw["epochs"].to_pylist():
        if r["recording"] == "ARM001a_rec" and r["name"] == "PreStimSilence":
            if r["start_s"] == 3.0:
                r["end_s"] = 3.5
            elif r["start_s"] == 7.0:
                continue
        if r["recording"] == "TNC015a_rec" and r["name"] == "PostStimSilence":
            if r["end_s"] == 2.5:
                continue
        rows.append(r)
    raw["epochs"] = pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)
    found = _silence_rows(_parse(raw))
    assert set(found) == {"ARM001a/PreStimSilence", "TNC015a/PostStimSilence"}
    arm = found["ARM001a/PreStimSilence"]
    assert arm.startswith(f"2 of {len(SITE_ARM)} presentations differ from the population's 0.25 s")
    assert "1 without one at their start" in arm and "1 with one of 0.5 s" in arm
    assert f"first {VAL_A}@3" in arm
    tnc = found["TNC015a/PostStimSilence"]
    assert (
        tnc.startswith(f"1 of {len(SITE_TNC)} presentations") and "without one at their end" in tnc
    )


def test_a_longer_silence_beside_the_sounds_own_is_not_a_mismatch():
    # a trial-level PreStimSilence starting with the sound's (baphy writes epochs for
    # trials too) is not the sound's silence: the one of the expected length is
    raw = _raw()
    extra = _epoch_rows("ARM001a_rec", "resp", [("PreStimSilence", 1.0, 1.75)])
    extra[0]["row"] = 10_000  # a row number of its own
    raw["epochs"] = pa.Table.from_pylist(
        extra + raw["epochs"].to_pylist(), schema=schema.EPOCHS.schema
    )
    assert _silence_rows(_parse(raw)) == {}


def test_site_silences_are_read_from_the_resp_epoch_table_only():
    # a site file's other signal may carry other epochs: its trials, and so their
    # silences, come from resp's table (what extract_epoch reads)
    raw = _raw()
    odd = _epoch_rows("ARM001a_rec", "stim", [("PreStimSilence", 1.0, 1.9)])
    raw["epochs"] = pa.Table.from_pylist(  # first: it would be the one matched
        odd + raw["epochs"].to_pylist(), schema=schema.EPOCHS.schema
    )
    assert _silence_rows(_parse(raw)) == {}


def _mask_kinds(parsed: pe.Parsed) -> dict[str, str]:
    return {s: d for (k, s), d in _report(parsed).items() if k == "mask_est_disagrees"}


def _parse_with_mask(raw: dict, mask) -> pe.Parsed:
    signals = raw["signals"].to_pylist()
    signals.append(
        {"recording": POP, "signal": "mask_est", "signal_type": "rasterized", "fs_hz": 100.0,
         "n_chans": 1, "n_samples": None if mask is None else len(mask), "chans": None,
         "segments_json": None,
         "meta_json": None}
    )  # fmt: skip
    inputs = pe.area_inputs(
        raw["recordings"],
        pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema),
        raw["epochs"],
        raw["site_spikes"],
        mask_est=None if mask is None else np.asarray(mask, dtype=np.float32),
        area="A1",
    )
    return pe.parse_area(inputs)


def test_mask_est_that_agrees_with_the_names_adds_no_report_row():
    # population: VAL_A 0-1.5 s, VAL_B 1.5-3, EST_X 3-4.5, EST_Y 4.5-6, ODD 6-7.5 at 100 Hz
    mask = np.r_[np.zeros(300), np.ones(450)]
    assert _mask_kinds(_parse_with_mask(_raw(), mask)) == {}
    # the "other" sound's samples are not checked either way
    assert _mask_kinds(_parse_with_mask(_raw(), np.r_[np.zeros(300), np.ones(300)])) == {}


def test_mask_est_against_a_sounds_name_is_reported_and_the_name_wins():
    mask = np.r_[np.zeros(300), np.ones(450)]
    mask[310:320] = 0  # 10 samples of EST_X marked val
    mask[299] = 1  # the last sample of VAL_B marked est
    parsed = _parse_with_mask(_raw(), mask)
    rows = _mask_kinds(parsed)
    assert set(rows) == {EST_X, VAL_B}
    assert "est sound by its name" in rows[EST_X]
    assert "mask_est is 0 on 10 of its 150 samples" in rows[EST_X]
    assert "mask_est is 1 on 1 of its 150 samples" in rows[VAL_B]
    subsets = {r["name"]: r["subset"] for r in parsed.stims.to_pylist()}
    assert (subsets[EST_X], subsets[VAL_B]) == ("est", "val")


def test_mask_est_shorter_than_a_sounds_epoch_is_reported():
    mask = np.r_[np.zeros(300), np.ones(150), np.ones(100)]  # ends at 5.5 s, in EST_Y
    rows = _mask_kinds(_parse_with_mask(_raw(), mask))
    assert set(rows) == {EST_Y}
    assert "misses 50 of its 150" in rows[EST_Y]


def test_without_mask_est_nothing_is_checked(parsed):
    assert _mask_kinds(parsed) == {}


def test_a_mask_est_without_rows_is_reported_not_skipped():
    """An empty mask_est CSV (a signal of no channels): nothing to check, which is said."""
    rows = _mask_kinds(_parse_with_mask(_raw(), None))
    assert list(rows) == ["mask_est"]
    assert "no row 0" in rows["mask_est"] and "classed by name" in rows["mask_est"]


@pytest.mark.parametrize(
    ("drop", "lacks"),
    [("chans", "resp signal with chans (unit ids)"), ("stim", "stim signal")],
)
def test_a_population_without_resp_chans_or_stim_names_its_file(drop, lacks):
    raw = _raw()
    signals = raw["signals"].to_pylist()
    if drop == "chans":
        signals = [{**r, "chans": None} if r["signal"] == "resp" else r for r in signals]
    else:
        signals = [r for r in signals if not (r["recording"] == POP and r["signal"] == "stim")]
    raw["signals"] = pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema)
    file = raw["recordings"].to_pylist()[0]["file"]
    with pytest.raises(InputMismatch, match="^" + re.escape(f"{file}: population recording")):
        _parse(raw)
    with pytest.raises(InputMismatch, match=f"has no {re.escape(lacks)}$"):
        _parse(raw)


def _extent_rows(parsed: pe.Parsed) -> dict[str, str]:
    return {s: d for (k, s), d in _report(parsed).items() if k == "population_epoch_past_data"}


def test_a_population_epoch_past_the_data_is_reported(parsed):
    assert _extent_rows(parsed) == {}  # 750 samples hold every epoch (the last ends at 750)
    raw = _raw()
    signals = [
        {**r, "n_samples": 550} if r["signal"] in ("resp", "stim") and r["recording"] == POP else r
        for r in raw["signals"].to_pylist()
    ]
    raw["signals"] = pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema)
    rows = _extent_rows(_parse(raw))
    # EST_Y holds frames 450-600, ODD 600-750: NaN-padded past sample 550
    assert set(rows) == {EST_Y, ODD}
    assert "runs 50 of its 150 frames past the population's 550 samples" in rows[EST_Y]
    assert "runs 150 of its 150 frames" in rows[ODD]
    assert "NaN-padded" in rows[EST_Y]


def test_the_same_unit_id_at_two_sites():
    # ARM001a-01-1 is in the population; a copy of its id in XYZ001a's file listed first
    # must not take the match from the unit's own site (rebin-sites bins cells at the
    # site their id names), and an unmatched id at two sites is reported at both
    raw = _with_site_session(_raw(), "XYZ001a", SITE_XYZ[:4])  # 4 val trials, ARM001a 6
    spikes = raw["site_spikes"].to_pylist()
    xyz = {"site": "XYZ001a", "recording": "XYZ001a_rec"}
    spikes = [{**spikes[0], **xyz}, {**spikes[1], **xyz}, *spikes]
    raw["site_spikes"] = pa.Table.from_pylist(spikes, schema=schema.SITE_SPIKES.schema)
    parsed = _parse(raw)
    cell = parsed.cells.to_pylist()[0]
    assert (cell["cell_id"], cell["match"], cell["n_val_trials"]) == ("ARM001a-01-1", "exact", 6)
    report = _report(parsed)
    detail = report[("site_unit_not_in_population", "ARM001a-05-1")]
    assert "ARM001a" in detail and "XYZ001a" in detail
    assert ("site_unit_duplicate_id", "XYZ001a/ARM001a-01-1") in report
    assert ("site_unit_not_in_population", "ARM001a-01-1") not in report


def test_a_unit_found_only_in_another_sites_file_is_placed_at_that_site():
    """ARM001a-01-1's spikes are only in XYZ001a's file: its cell's site is the site whose
    file holds them, where rebin-sites bins it and n_val_trials counts, not the one its id
    names (no rows at all came out before)."""
    raw = _with_site_session(_raw(), "XYZ001a", SITE_XYZ[:4])  # 4 val trials
    xyz = {"site": "XYZ001a", "recording": "XYZ001a_rec"}
    spikes = [
        {**r, **xyz} if r["unit_id"] == "ARM001a-01-1" else r
        for r in raw["site_spikes"].to_pylist()
    ]
    raw["site_spikes"] = pa.Table.from_pylist(spikes, schema=schema.SITE_SPIKES.schema)
    cell = _parse(raw).cells.to_pylist()[0]
    assert (cell["cell_id"], cell["match"]) == ("ARM001a-01-1", "exact")
    assert (cell["site"], cell["n_val_trials"]) == ("XYZ001a", 4)
    others = [c for c in _parse(raw).cells.to_pylist()[1:] if c["match"] != "none"]
    assert others and all(c["site"] == c["cell_id"].split("-")[0] for c in others)


def test_a_presentation_one_sample_short_on_the_site_grid_is_reported():
    """1.4998 s written, within half a population frame of 1.5 s, but [round(0.0006 *
    1000), round(1.5004 * 1000)) is 1499 samples: its last 10 ms bin is NaN (the old loader
    failed on it), which must not pass silently."""
    raw = _raw()
    signals = raw["signals"].to_pylist() + [
        {"recording": "TNC015a_rec", "signal": "resp", "signal_type": "point_process",
         "fs_hz": 1000.0, "n_chans": 1, "n_samples": None, "chans": None,
         "segments_json": None, "meta_json": None},
    ]  # fmt: skip
    raw["signals"] = pa.Table.from_pylist(signals, schema=schema.SIGNALS.schema)
    rows = raw["epochs"].to_pylist()
    (row,) = [
        r
        for r in rows
        if r["recording"] == "TNC015a_rec" and r["name"] == VAL_A and r["start_s"] == 1.0
    ]
    row["start_s"], row["end_s"] = 1.0006, 2.5004
    raw["epochs"] = pa.Table.from_pylist(rows, schema=schema.EPOCHS.schema)
    report = _report(_parse(raw))
    lengths = {s: d for (k, s), d in report.items() if k == "presentation_length"}
    assert list(lengths) == [f"TNC015a/{VAL_A}@1.0006"]
    assert lengths[f"TNC015a/{VAL_A}@1.0006"].startswith("1499 samples at 1000 Hz")


def test_every_report_kind_written_is_documented_and_every_documented_kind_is_written():
    """The README's list of report kinds (and `report --kind`) is schema.REPORT_KINDS: it
    must name exactly the kinds parse-epochs writes, plus spikes_before_0 from rebin-sites."""
    from pathlib import Path

    from nat4etl.summary import SPIKES_BEFORE_0

    source = Path(pe.__file__).read_text()
    written = set(re.findall(r'report\.add\(\s*"([a-z_0-9]+)"', source))
    assert written and written | {SPIKES_BEFORE_0} == set(schema.REPORT_KINDS)
    with pytest.raises(ValueError, match="not in schema.REPORT_KINDS"):
        pe.Report().add("no_such_kind", "x", "y")

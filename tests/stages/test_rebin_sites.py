"""rebin-sites on a small hand-made area, against the reference route written out in full."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pytest

from nat4etl import binning
from nat4etl.errors import ConfigError
from nat4etl.stages import rebin_sites as rs

POP_FS_HZ, SITE_FS_HZ, FRAMES = 100.0, 1000.0, 150
STIMS = [("STIM_cat1.wav", "est"), ("STIM_cat2.wav", "est"), ("STIM_00cat3.wav", "val")]
#: cell -> (site, site unit id); cell 3 has no site unit (match none)
CELLS = [("AAA001a", "AAA001a-01-1"), ("AAA001a", "AAA001a-02-1"), ("BBB002b", "BBB002b-1-1")]


def _raster_cut_sum(times_s, start_s, end_s, group):
    """Reference route for one unit and one presentation (nems0-format.md §3-4).

    A window may round to 1501 samples (15.0005 -> 15000, 16.5005 -> 16501); the
    reference would then fail to reshape, nat4etl keeps the first 1.5 s from the start.
    """
    lb, ub = round(start_s * SITE_FS_HZ), round(end_s * SITE_FS_HZ)
    ub = min(ub, lb + 1500)
    raster = np.zeros(ub + 10)
    for t in times_s:
        b = int(np.floor(t * SITE_FS_HZ))
        if b < len(raster):
            raster[b] += 1
    return raster[lb:ub].reshape(-1, group).sum(axis=1)


def _area(rng):
    """A site AAA001a with 3 val repetitions, BBB002b with 2; starts off the 10 ms grid."""
    presentations = {
        "AAA001a": [(0, 10.0123), (1, 12.5137), (2, 15.0005), (2, 17.5021), (2, 20.0459)],
        "BBB002b": [(2, 3.2049), (1, 5.9995), (0, 8.3333), (2, 11.1117)],
    }
    trials, spikes = [], []
    for site, pres in presentations.items():
        seen = {}
        for order, (stim, start) in enumerate(pres):
            trials.append((site, stim, seen.get(stim, 0), order, start, start + 1.5))
            seen[stim] = seen.get(stim, 0) + 1
    for site, unit in CELLS:
        end = max(p[1] for p in presentations[site]) + 2
        spikes.append((site, unit, np.sort(rng.uniform(0, end, 900))))
    spikes.append(("BBB002b", "BBB002b-9-9", np.array([1.0])))  # not in the population

    pop_start = [0.0, 1.5, 3.0]
    n_cells = len(CELLS) + 1
    resp = np.full((n_cells, FRAMES * 3), np.nan, np.float32)
    for cell, (site, unit) in enumerate(CELLS):
        times = next(t for s, u, t in spikes if u == unit)
        for stim in range(3):
            reps = [r for r in trials if r[0] == site and r[1] == stim]
            if cell == 2 and stim == 1:
                continue  # unit not recorded for this sound in the population file
            binned = [_raster_cut_sum(times, r[4], r[5], 10) for r in reps]
            resp[cell, stim * FRAMES : (stim + 1) * FRAMES] = np.mean(binned, axis=0)
    resp[3, :FRAMES] = rng.poisson(0.5, FRAMES)  # a unit with no site data, est stim 0 only
    stim_spec = rng.uniform(0, 5, (4, FRAMES * 3)).astype(np.float32)

    stims = pa.table(
        {
            "stim": pa.array(range(3), pa.int32()),
            "name": [n for n, _ in STIMS],
            "subset": [s for _, s in STIMS],
            "duration_s": [1.5] * 3,
            "n_frames": pa.array([FRAMES] * 3, pa.int32()),
            "pop_start_s": pop_start,
        }
    )
    cells = pa.table(
        {
            "cell": pa.array(range(n_cells), pa.int32()),
            "site": [s for s, _ in CELLS] + ["CCC003c"],
            "site_unit_id": [u for _, u in CELLS] + [None],
        }
    )
    trials_t = pa.table(
        {
            "site": [t[0] for t in trials],
            "stim": pa.array([t[1] for t in trials], pa.int32()),
            "trial": pa.array([t[2] for t in trials], pa.int32()),
            "start_s": [t[4] for t in trials],
            "end_s": [t[5] for t in trials],
        }
    )
    site_spikes = pa.table(
        {
            "site": [s[0] for s in spikes],
            "unit_id": [s[1] for s in spikes],
            "spike_times_s": pa.array([s[2].tolist() for s in spikes], pa.list_(pa.float64())),
        }
    )
    inputs = rs.AreaInputs(
        stims=stims,
        cells=cells,
        trials=trials_t,
        site_spikes=site_spikes,
        pop_resp=resp,
        pop_stim=stim_spec,
        pop_fs_hz=POP_FS_HZ,
        site_fs_hz={"AAA001a": SITE_FS_HZ, "BBB002b": SITE_FS_HZ},
    )
    return inputs, trials, spikes


def _rows(table, column):
    vecs = rs.vector_view(table, column)
    keys = zip(*(table.column(k).to_pylist() for k in ("stim", "cell", "trial")), strict=True)
    return {k: vecs[i] for i, k in enumerate(keys)}


@pytest.fixture(scope="module")
def area():
    return _area(np.random.default_rng(0))


def test_dt10_est_from_population_val_from_sites(area):
    inputs, trials, spikes = area
    out = rs.rebin_area(inputs, dt_ms=10)
    rows = _rows(out.responses, "counts")
    sources = dict(
        zip(
            zip(out.responses["stim"].to_pylist(), out.responses["cell"].to_pylist(), strict=True),
            out.responses["source"].to_pylist(),
            strict=True,
        )
    )
    # est: population trial 0, NaN pairs and the unmatched cell absent
    for stim in (0, 1):
        for cell in range(4):
            present = (stim, cell, 0) in rows
            recorded = not (cell == 2 and stim == 1) and (cell < 3 or stim == 0)
            assert present == recorded
            if present:
                assert sources[(stim, cell)] == "population"
                np.testing.assert_array_equal(
                    rows[(stim, cell, 0)], inputs.pop_resp[cell, stim * 150 : stim * 150 + 150]
                )
    # val: every single trial, by the reference route
    for cell, (site, unit) in enumerate(CELLS):
        times = next(t for s, u, t in spikes if u == unit)
        reps = [r for r in trials if r[0] == site and r[1] == 2]
        for r in reps:
            want = _raster_cut_sum(times, r[4], r[5], 10)
            np.testing.assert_array_equal(rows[(2, cell, r[2])], want)
            assert sources[(2, cell)] == "site"
        assert (2, cell, len(reps)) not in rows
    assert out.metadata["responses"]["est_source"] == "population"
    assert out.metadata["spectrograms"]["unavailable"] is None
    # the count the log prints: every est row came from the population file
    assert out.counts["est_rows_from_population"] == list(sources.values()).count("population")
    assert out.counts["est_rows_from_population"] > 0


def test_val_means_and_qc(area):
    inputs, _, _ = area
    out = rs.rebin_area(inputs, dt_ms=10)
    means = rs._vector_index(out.val_means, "mean_counts")
    assert set(means) == {(2, 0), (2, 1), (2, 2)}
    np.testing.assert_array_equal(means[(2, 1)], inputs.pop_resp[1, 300:450])
    qc = {r["site"]: r for r in out.qc_val.to_pylist()}
    assert qc["AAA001a"]["n_trials"] == 3 and qc["AAA001a"]["n_cells"] == 2
    assert qc["BBB002b"]["n_trials"] == 2 and qc["BBB002b"]["n_cells"] == 1
    assert max(r["max_abs_diff"] for r in qc.values()) < 1e-6


def test_spectrogram_rows_are_population_stim_cut_at_each_epoch(area):
    inputs, _, _ = area
    out = rs.rebin_area(inputs, dt_ms=10)
    values = rs.vector_view(out.spectrograms, "values").reshape(3, 4, 150)
    np.testing.assert_array_equal(values[1], inputs.pop_stim[:, 150:300])
    assert out.metadata["spectrograms"]["n_bands"] == 4


def test_dt20_est_from_sites_equals_population_summed(area):
    inputs, _, _ = area
    out = rs.rebin_area(inputs, dt_ms=20)
    rows = _rows(out.responses, "counts")
    assert out.metadata["responses"]["est_source"] == "site"
    # cell 2 / stim 1: NaN in the population, but the site presented it: a row from spikes
    assert (1, 2, 0) in rows
    for cell in range(2):
        pop = inputs.pop_resp[cell, 150:300].reshape(75, 2).sum(axis=1)
        np.testing.assert_array_equal(rows[(1, cell, 0)], pop)
    # the unit without site data keeps its est responses, from the population, summed
    sources = out.responses.filter(pa.compute.equal(out.responses["cell"], 3))
    assert sources["source"].to_pylist() == ["population"]
    np.testing.assert_array_equal(rows[(0, 3, 0)], inputs.pop_resp[3, :150].reshape(75, 2).sum(1))
    assert out.counts["est_rows_from_population"] == 1
    values = rs.vector_view(out.spectrograms, "values").reshape(3, 4, 75)
    np.testing.assert_allclose(
        values[0], inputs.pop_stim[:, :150].reshape(4, 75, 2).mean(axis=2), rtol=1e-6
    )
    means = rs._vector_index(out.val_means, "mean_counts")
    assert len(means[(2, 0)]) == 75 and out.metadata["val_means"]["dt_ms"] == 20
    assert out.qc_val.column("max_abs_diff").to_pylist() == pytest.approx([0, 0], abs=1e-6)


def test_dt5_responses_but_no_spectrograms(area):
    inputs, trials, spikes = area
    out = rs.rebin_area(inputs, dt_ms=5)
    assert out.spectrograms.num_rows == 0
    assert "not a whole number" in out.metadata["spectrograms"]["unavailable"]
    rows = _rows(out.responses, "counts")
    times = next(t for s, u, t in spikes if u == CELLS[0][1])
    np.testing.assert_array_equal(rows[(0, 0, 0)], _raster_cut_sum(times, 10.0123, 11.5123, 5))
    assert out.metadata["val_means"]["dt_ms"] == 10  # kept at the population frame width
    assert out.qc_val.num_rows == 2


@pytest.mark.parametrize(("dt_ms", "match"), [(7, "does not divide"), (2.5, "multiple of 1 ms")])
def test_bad_bin_widths_are_config_errors(area, dt_ms, match):
    with pytest.raises(ConfigError, match=match):
        rs.rebin_area(area[0], dt_ms=dt_ms)


def test_the_bin_widths_offered_are_those_that_fit_the_presentation(area):
    # 1.5 s presentations of 10 ms frames: each offered width gives whole bins and whole
    # frames (5 ms divides 1.5 s but leaves the spectrograms out)
    with pytest.raises(ConfigError) as info:
        rs.rebin_area(area[0], dt_ms=7)
    offered = str(info.value).split(": ")[-1].removesuffix(" ms")
    assert offered == "10, 20, 30, 50, 60, 100"


def test_pair_means_same_for_grouped_and_shuffled_rows():
    """The grouped fast path (no sort, float32 summed in float64) and the sorting path
    agree, and NaN counts are left out of each mean (all-NaN pairs give NaN)."""
    rng = np.random.default_rng(7)
    pair = np.repeat(np.array([3, 5, 8, 13], np.int64), 20)
    counts = (rng.poisson(0.4, (len(pair), 6)) / 3).astype(np.float32)
    counts[::7, 2] = np.nan  # a missing bin here and there
    counts[pair == 13] = np.nan  # a pair with no data at all
    keys, means = rs.pair_means(pair, counts)
    np.testing.assert_array_equal(keys, [3, 5, 8, 13])
    want = np.array([np.nanmean(counts[pair == k].astype(np.float64), axis=0) for k in (3, 5, 8)])
    np.testing.assert_allclose(means[:3], want, rtol=1e-15)
    assert np.isnan(means[3]).all()
    shuffle = rng.permutation(len(pair))
    keys2, means2 = rs.pair_means(pair[shuffle], counts[shuffle])
    np.testing.assert_array_equal(keys2, keys)
    np.testing.assert_allclose(means2, means, rtol=1e-15, equal_nan=True)
    # one pair short of a trial (the 19-repetition sound): the general route, same sums
    keys3, means3 = rs.pair_means(pair[1:], counts[1:])
    np.testing.assert_array_equal(keys3, keys)
    want3 = np.nanmean(counts[1:20].astype(np.float64), axis=0)
    np.testing.assert_allclose(means3[0], want3, rtol=1e-15)
    np.testing.assert_array_equal(means3[1:], means[1:])  # bit for bit across the routes


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("threads", [1, 2, 8])  # 8: more threads than channels
def test_population_rows_are_epochs_cut_channel_by_channel(k, threads, monkeypatch):
    """Filled a channel at a time (and given back after), the rows are each pair's epoch
    as extract_epoch cuts it: an epoch running past the end is NaN-padded, one starting
    before 0 is all NaN, pairs whose epoch is all NaN get no row. The same with the
    channels split over any number of threads."""
    from nat4etl import memory

    monkeypatch.setattr(rs, "FILL_THREADS", threads)

    rng = np.random.default_rng(3)
    n_cells, n_samples, frames = 5, 40, 10
    resp = memory.paged_empty((n_cells, n_samples))
    resp[:] = rng.poisson(1.0, (n_cells, n_samples)).astype(np.float32)
    resp[2, 0:10] = np.nan  # cell 2 not recorded for stim 0
    reference = resp.copy()
    start_s = [0.0, 0.12, 0.35, -0.05]  # stim 2 runs 5 frames past the end; stim 3 starts < 0
    stims = pa.table({"stim": pa.array([0, 1, 2, 3], pa.int32()), "pop_start_s": pa.array(start_s)})
    plan = rs.BinPlan(10.0 * k, frames // k, frames / 100, 100.0, frames, k, None)
    keep = rs.population_keep(resp, stims, plan)
    assert not keep[0, 2] and not keep[3].any() and keep[2].all()
    stim_col, cell_col = rs.population_keys(stims, keep)
    dest = rng.permutation(len(stim_col))  # rows may go anywhere in the output
    out = np.full((len(stim_col), frames // k), -1.0, np.float32)
    rs.fill_population_rows(out, dest, resp, stims, plan, keep, give_back=True)
    starts = binning.epoch_samples(np.array(start_s), 100.0)
    for row, (stim, cell) in enumerate(zip(stim_col, cell_col, strict=True)):
        epoch = binning.cut_frames(reference[cell], int(starts[stim]), frames)
        np.testing.assert_array_equal(out[dest[row]], binning.sum_frames(epoch, k))
    assert np.isnan(out[dest[(stim_col == 2)]][:, -5 // k :]).all()


def test_spike_samples_table_is_what_the_site_pass_derives_from_the_times(area):
    """The handed-over form (int32 samples at each row's file rate, chunked as the times
    were) bins to the same rows, bit for bit, as the spike times themselves."""
    inputs = area[0]
    spikes = inputs.site_spikes
    spikes = pa.table(
        {
            "site": spikes["site"],
            "recording": spikes["site"],
            "signal": ["resp"] * (spikes.num_rows - 1) + ["other"],
            "unit_id": spikes["unit_id"],
            "spike_times_s": pa.chunked_array(  # two chunks: offsets restart per chunk
                [
                    spikes["spike_times_s"].combine_chunks()[:2],
                    spikes["spike_times_s"].combine_chunks()[2:],
                ]
            ),
        }
    )
    fs = {(s, "resp"): SITE_FS_HZ for s in ("AAA001a", "BBB002b")} | {("BBB002b", "other"): 30.0}
    samples = rs.with_spike_samples(spikes, fs)
    assert samples.column_names == [
        "site",
        "recording",
        "signal",
        "unit_id",
        "spike_samples",
        "spikes_before_0",
        "spikes_before_raster",
    ]
    assert samples["spikes_before_0"].to_pylist() == [0] * spikes.num_rows
    assert samples.column("spike_samples").type == pa.list_(pa.int32())
    for row in range(spikes.num_rows):
        rate = fs[(spikes["recording"][row].as_py(), spikes["signal"][row].as_py())]
        want = binning.spike_samples(spikes["spike_times_s"][row].values.to_numpy(), rate)
        assert samples["spike_samples"][row].values.to_numpy().tolist() == want.tolist()
    by_times = rs.rebin_area(inputs, dt_ms=10)
    by_samples = rs.rebin_area(dataclasses.replace(inputs, site_spikes=samples), dt_ms=10)
    assert by_samples.responses.equals(by_times.responses)
    assert by_samples.qc_val.equals(by_times.qc_val)


def test_a_start_before_0_that_snaps_to_0_is_binned_from_sample_0():
    """NEMS0 tests 'exclude' on bounds snapped to the grid: -0.4 ms at 1 kHz is sample 0
    and is kept; -0.6 ms is sample -1 and is left out."""
    site = rs.Site(
        site="AAA001a",
        fs_hz=SITE_FS_HZ,
        spikes=pa.table(
            {
                "unit_id": ["AAA001a-01-1"],
                "spike_times_s": pa.array([[0.0, 0.005, 0.012]], pa.list_(pa.float64())),
            }
        ),
        trials=pa.table(
            {
                "stim": pa.array([0, 0], pa.int32()),
                "trial": pa.array([0, 1], pa.int32()),
                "start_s": [-0.0004, -0.0006],
                "end_s": [1.4996, 1.4994],
            }
        ),
        cells=pa.table({"cell": pa.array([0], pa.int32()), "site_unit_id": ["AAA001a-01-1"]}),
    )
    job = rs.SiteJob(site, np.array([0], np.int32), dt_ms=10, n_bins=150)
    assert job.trials.column("trial").to_pylist() == [0]
    counts = job.counts()
    assert counts.shape == (1, 150)
    assert counts[0, :2].tolist() == [2.0, 1.0]  # samples 0 and 5 in bin 0, 12 in bin 1
    assert counts[0, 2:].sum() == 0


def test_spikes_before_0_count_from_the_end_of_their_sites_raster(area):
    """NEMS0 rasterizes a spike at -0.3 ms into sample -1, the raster's last: with the
    raster ending at AAA001a's last presentation, that is the last bin of its trial 2.
    A spike before the raster's length (NEMS0 fails there) is not counted; both are said."""
    inputs, trials, spikes = area
    times = [t.tolist() for _, _, t in spikes]
    times[0] = [-30.0, -0.0003, *times[0]]  # AAA001a-01-1, cell 0
    n = len(spikes)
    table = pa.table(
        {
            "site": [s for s, _, _ in spikes],
            "recording": [s for s, _, _ in spikes],
            "signal": ["resp"] * n,
            "unit_id": [u for _, u, _ in spikes],
            "spike_times_s": pa.array(times, pa.list_(pa.float64())),
        }
    )
    fs = {(s, "resp"): SITE_FS_HZ for s in ("AAA001a", "BBB002b")}
    last_end = {("AAA001a", "resp"): 20.0459 + 1.5, ("BBB002b", "resp"): 12.6117}
    samples = rs.with_spike_samples(table, fs, last_end)
    assert samples["spike_samples"][0].values.to_pylist()[:2] == [binning.NO_SAMPLE, 21545]
    assert samples["spikes_before_0"].to_pylist() == [2] + [0] * (n - 1)
    assert samples["spikes_before_raster"].to_pylist() == [1] + [0] * (n - 1)

    before = _rows(rs.rebin_area(inputs, dt_ms=10).responses, "counts")
    out = rs.rebin_area(dataclasses.replace(inputs, site_spikes=samples), dt_ms=10)
    after = _rows(out.responses, "counts")
    assert after[(2, 0, 2)][-1] == before[(2, 0, 2)][-1] + 1
    assert all(
        np.array_equal(after[k], v, equal_nan=True) for k, v in before.items() if k != (2, 0, 2)
    )
    assert out.metadata["responses"]["spikes_before_0"] == [
        {
            "site": "AAA001a",
            "unit_id": "AAA001a-01-1",
            "spikes_before_0": 2,
            "spikes_before_raster": 1,
        }
    ]
    assert out.counts["spikes_before_0"] == 2


def test_a_signal_whose_epochs_end_by_0_gets_a_raster_as_long_as_its_latest_spike():
    table = pa.table(
        {
            "site": ["S", "S"],
            "recording": ["R", "R"],
            "signal": ["resp", "resp"],
            "unit_id": ["u1", "u2"],
            "spike_times_s": pa.array([[-0.002, 1.0], [2.5]], pa.list_(pa.float64())),
        }
    )
    samples = rs.with_spike_samples(table, {("R", "resp"): 1000.0}, {("R", "resp"): math.nan})
    assert samples["spike_samples"].to_pylist() == [[2498, 1000], [2500]]  # raster: 2500
    assert rs.last_epoch_ends(
        pa.table(
            {"recording": ["R", "R", "Q"], "signal": ["resp"] * 3, "end_s": [1.0, np.nan, None]}
        )
    ) == {("R", "resp"): 1.0, ("Q", "resp"): pytest.approx(math.nan, nan_ok=True)}


def _with_spike_added(sites_zip, t_s: float | None) -> tuple[str, str]:
    """Rewrite the first site of ``sites_zip`` with a spike at ``t_s`` added to its first
    unit (h5py, gzip chunks as the reference writes them; None: no change); returns
    (site, unit id)."""
    import io
    import tarfile
    import zipfile

    import h5py

    with zipfile.ZipFile(sites_zip) as zf:
        entries = [(i, zf.read(i)) for i in zf.infolist()]
    index = next(k for k, (i, _) in enumerate(entries) if i.filename.endswith(".tgz"))
    info, data = entries[index]
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf.getmembers()]
    k = next(k for k, (m, _) in enumerate(members) if m.name.endswith(".resp.h5"))
    m, h5_bytes = members[k]
    with h5py.File(io.BytesIO(h5_bytes), "r") as h5:
        datasets = {key: h5[key][()] for key in h5}
    site, unit = m.name.split("/")[0], sorted(datasets)[0]
    if t_s is None:
        return site, unit
    datasets[unit] = np.sort(np.r_[t_s, datasets[unit]])
    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        for key, values in datasets.items():
            h5.create_dataset(key, data=values, compression="gzip")
    m.size = len(buf.getvalue())
    members[k] = (m, buf.getvalue())
    tgz = io.BytesIO()
    with tarfile.open(fileobj=tgz, mode="w:gz") as tf:
        for member, payload in members:
            tf.addfile(member, io.BytesIO(payload))
    entries[index] = (info, tgz.getvalue())
    with zipfile.ZipFile(sites_zip, "w", zipfile.ZIP_DEFLATED) as zf:
        for i, payload in entries:
            zf.writestr(i.filename, payload)
    return site, unit


def test_a_spike_before_0_in_a_site_file_is_counted_alike_in_a_build_and_a_rerun(
    mini_sample, tmp_path
):
    """Through the real stages: a spike time t < 0 is sample floor(t*fs) < 0, which NEMS0
    counts at raster + floor(t*fs). Placed so that this falls in bin 1 of the site's last
    val trial, it adds 1 there and nowhere else, in the build (spikes handed over by
    unpack) and in a later `rebin-sites` (spikes read back from the store) alike."""
    import shutil

    from nat4etl.config import load_settings
    from nat4etl.progress import NullProgress
    from nat4etl.stages.build import build
    from nat4etl.store import Store

    mirror = tmp_path / "mirror"
    shutil.copytree(mini_sample.dir, mirror)
    (mirror / "record.json").unlink()  # sizes and md5s are computed from the files then
    settings = load_settings().with_overrides(source_dir=mirror, areas=("A1",), wav=False)
    build(tmp_path / "before", settings, NullProgress())
    store = Store(tmp_path / "before")
    site, unit = _with_spike_added(mirror / "A1_single_sites.zip", None)

    recordings = store.read_table("recordings", area="A1").to_pylist()
    recording = next(r["recording"] for r in recordings if r["site"] == site)
    epochs = store.read_table("epochs", area="A1").to_pylist()
    last_end = max(e["end_s"] for e in epochs if e["recording"] == recording)
    raster = binning.raster_samples(last_end, np.empty(0), SITE_FS_HZ)
    cell = next(
        c["cell"]
        for c in store.read_table("cells", area="A1").to_pylist()
        if c["site_unit_id"] == unit
    )
    before = _rows(store.read_table("responses", area="A1"), "counts")
    trials = [
        t
        for t in store.read_table("trials", area="A1").to_pylist()
        if t["site"] == site and (t["stim"], cell, t["trial"]) in before
    ]
    last_trial = max(trials, key=lambda t: t["start_s"])
    target = round(last_trial["start_s"] * SITE_FS_HZ) + 15  # bin 1 at 10 ms
    _with_spike_added(mirror / "A1_single_sites.zip", (target - raster + 0.5) / SITE_FS_HZ)
    build(tmp_path / "after", settings, NullProgress())

    after_store = Store(tmp_path / "after")
    after = _rows(after_store.read_table("responses", area="A1"), "counts")
    key = (last_trial["stim"], cell, last_trial["trial"])
    changed = {k for k in after if not np.array_equal(after[k], before[k], equal_nan=True)}
    assert changed == {key}
    assert after[key][1] == before[key][1] + 1
    early = after_store.table_metadata("responses", "A1")["spikes_before_0"]
    assert early == [
        {"site": site, "unit_id": unit, "spikes_before_0": 1, "spikes_before_raster": 0}
    ]
    rerun = tmp_path / "rerun"
    shutil.copytree(tmp_path / "after", rerun)
    build(rerun, settings, NullProgress(), force=True, only=("rebin-sites",))
    again = Store(rerun)
    responses = after_store.read_table("responses", area="A1")
    assert again.read_table("responses", area="A1").equals(responses)
    assert again.table_metadata("responses", "A1")["spikes_before_0"] == early


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (-1, 1),  # mostly ties: the order among them must be the file order
        (-7, 7),
        (-(2**19), 2**19),  # a combined key of 60 bits
        (2**62, 2**62 + 9),  # small ranges of huge values: a combined key still
        (-(2**40), 2**40),  # the combined key would overflow: lexsort itself
    ],
)
def test_key_order_is_lexsorts_stable_order(low, high):
    rng = np.random.default_rng(abs(high) % 1000)
    columns = [rng.integers(low, high, 500, dtype=np.int64) for _ in range(3)]
    np.testing.assert_array_equal(rs._key_order(*columns), np.lexsort(columns[::-1]))
    empty = np.zeros(0, np.int64)
    assert len(rs._key_order(empty, empty, empty)) == 0


def test_a_site_whose_rate_does_not_fit_the_bins_is_named():
    """A site file at 7 Hz cannot make 10 ms bins: the error names the site, not only the
    rate, so the file can be found."""
    empty = pa.table({"stim": pa.array([], pa.int32())})
    site = rs.Site("ODD001a", 7.0, spikes=empty, trials=empty, cells=empty)
    with pytest.raises(ConfigError, match=r"^site ODD001a: dt_ms=10 is not a whole number"):
        rs.SiteJob(site, np.array([0]), dt_ms=10.0, n_bins=150)


def test_the_counts_are_logged_in_words_with_the_qc_check_named():
    counts = {
        "responses": 1219,
        "sites": 3,
        "val_means": 54,
        "spectrograms": 11,
        "est_rows_from_population": 139,
        "qc_max_abs_diff": 4.768371586472142e-08,
        "spikes_before_0": 2,
    }
    line = rs._counts_line("A1", 10.0, counts)
    assert line == (
        "A1: rebin-sites at 10 ms: 1219 responses rows (139 est rows from the population), "
        "3 sites, 54 val_means rows, 11 spectrograms; site val trials average within 4.8e-08 "
        "spikes per bin of the population's (qc_val); 2 spike times before 0"
    )
    unchecked = rs._counts_line("PEG", 20.0, {**counts, "qc_max_abs_diff": None})
    assert "no val trials to check against the population (qc_val)" in unchecked

"""The NEMS0 rasterize / cut / sum route, against a literal transcription of it."""

from __future__ import annotations

import numpy as np
import pytest

from nat4etl import binning
from nat4etl.errors import ConfigError


def reference_route(spikes_s, starts_s, ends_s, fs_hz, group):
    """NEMS0 step by step (nems0-format.md §3-4): one dense raster, loops, no shortcuts."""
    max_time = max(ends_s)
    nbins = int(np.round(fs_hz * max_time))
    raster = np.zeros((len(spikes_s), nbins))
    for i, times in enumerate(spikes_s):
        for t in times:
            b = int(np.floor(t * fs_hz))
            if b < nbins:
                raster[i, b] += 1
    out = []
    for start, end in zip(starts_s, ends_s, strict=True):
        lb, ub = round(start * fs_hz), round(end * fs_hz)  # Python round: half to even
        seg = raster[:, lb:ub]
        out.append(seg.reshape(len(spikes_s), -1, group).sum(axis=-1))
    return np.stack(out, axis=1)  # (units, windows, bins)


def _session(rng, n_units=5, n_windows=12, window_s=1.5):
    """Windows with starts off the 10 ms grid, including exact half-sample boundaries."""
    gaps = rng.uniform(0.3, 1.0, n_windows)
    starts = np.cumsum(gaps + window_s) + rng.integers(0, 1000, n_windows) * 1e-4
    starts[2] = 40.2345  # *1000 = 40234.5 -> half to even = 40234
    starts[3] = starts[2] + 2.0  # 42234.5 -> 42234
    starts = np.sort(starts)
    ends = starts + window_s
    end_s = ends[-1] + 1.0
    spikes = [np.sort(rng.uniform(0, end_s, rng.integers(200, 2000))) for _ in range(n_units)]
    # spikes exactly on sample edges and on window edges
    spikes[0] = np.sort(np.concatenate([spikes[0], starts, ends, starts + 0.0105]))
    return spikes, starts, ends


@pytest.mark.parametrize("dt_ms", [1, 5, 10, 30, 50, 150])
def test_counts_equal_the_reference_route(dt_ms):
    rng = np.random.default_rng(dt_ms)
    spikes, starts, ends = _session(rng)
    fs_hz = 1000.0
    group = binning.samples_per_bin(dt_ms, fs_hz)
    n_bins = binning.bins_per_window(1500, group, what="trial", dt_ms=dt_ms)
    got = binning.count_windows(
        [binning.spike_samples(s, fs_hz) for s in spikes],
        binning.epoch_samples(starts, fs_hz),
        binning.epoch_samples(ends, fs_hz),
        n_bins=n_bins,
        group=group,
    )
    want = reference_route(spikes, starts, ends, fs_hz, group)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert got.sum() > 0 and got.max() > 1  # counts, not a binary raster


def test_direct_100hz_binning_differs_and_is_not_what_we_do():
    """Epoch starts off the 10 ms grid: histogramming at 100 Hz moves some spikes."""
    rng = np.random.default_rng(1)
    spikes, starts, ends = _session(rng, n_units=8, n_windows=30)
    group = 10
    got = binning.count_windows(
        [binning.spike_samples(s, 1000) for s in spikes],
        binning.epoch_samples(starts, 1000),
        binning.epoch_samples(ends, 1000),
        n_bins=150,
        group=group,
    )
    direct = np.stack(
        [
            np.stack([np.histogram(s, bins=st + np.arange(151) * 0.01)[0] for st in starts])
            for s in spikes
        ]
    )
    assert not np.array_equal(got, direct)
    np.testing.assert_array_equal(got, reference_route(spikes, starts, ends, 1000, group))


def test_half_sample_bounds_round_to_even():
    assert binning.epoch_samples(np.array([0.0005, 0.0015, 0.0025]), 1000).tolist() == [0, 2, 2]


def test_short_and_overlapping_windows():
    spikes = [np.array([0.0001, 0.0101, 0.0102, 0.025, 0.031]), np.array([0.015])]
    samples = [binning.spike_samples(s, 1000) for s in spikes]
    # window 1 overlaps window 0; window 2 is short: its last bin is NaN
    starts = np.array([0, 10, 0])
    stops = np.array([30, 40, 25])
    got = binning.count_windows(samples, starts, stops, n_bins=3, group=10)
    np.testing.assert_array_equal(got[0, 0], [1, 2, 1])
    np.testing.assert_array_equal(got[0, 1], [2, 1, 1])
    np.testing.assert_array_equal(got[0, 2, :2], [1, 2])
    assert np.isnan(got[0, 2, 2])
    np.testing.assert_array_equal(got[1, :, 1], [1, 0, 1])


def test_long_window_is_truncated_and_negative_spikes_ignored():
    samples = [np.array([-5, 0, 29, 30, 31])]
    got = binning.count_windows(samples, np.array([0]), np.array([100]), n_bins=3, group=10)
    np.testing.assert_array_equal(got[0, 0], [1, 0, 1])


def test_many_units_are_chunked(monkeypatch):
    monkeypatch.setattr(binning, "_MAX_CELLS_PER_CHUNK", 7)
    rng = np.random.default_rng(3)
    spikes, starts, ends = _session(rng, n_units=6, n_windows=4)
    args = (
        [binning.spike_samples(s, 1000) for s in spikes],
        binning.epoch_samples(starts, 1000),
        binning.epoch_samples(ends, 1000),
    )
    got = binning.count_windows(*args, n_bins=150, group=10)
    np.testing.assert_array_equal(got, reference_route(spikes, starts, ends, 1000, 10))


def test_bin_width_errors_name_the_reason():
    assert binning.samples_per_bin(10, 1000) == 10
    with pytest.raises(ConfigError, match="whole number of samples"):
        binning.samples_per_bin(2.5, 1000)
    with pytest.raises(ConfigError, match="does not divide"):
        binning.bins_per_window(1500, 7, what="1.5 s trial", dt_ms=7)
    assert binning.frames_per_bin(20, 10) == 2
    assert binning.frames_per_bin(15, 10) is None


def test_cut_and_rebin_frames():
    v = np.arange(20, dtype=np.float32).reshape(2, 10)
    np.testing.assert_array_equal(binning.cut_frames(v, 2, 4), v[:, 2:6])
    padded = binning.cut_frames(v, 8, 4)
    assert np.isnan(padded[:, 2:]).all()
    np.testing.assert_array_equal(binning.sum_frames(v[:, :4], 2), [[1, 5], [21, 25]])
    np.testing.assert_array_equal(binning.mean_frames(v[:, :4], 2), [[0.5, 2.5], [10.5, 12.5]])


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_spike_samples_floor_and_the_times_no_window_reaches(dtype):
    times = np.array([0.0, 0.0004999, 0.001, 2.5005, -0.2, np.nan, 1e7, -np.inf, np.inf])
    got = binning.spike_samples(times, 1000.0, dtype=dtype)
    assert got.dtype == dtype
    big = np.iinfo(np.int32).max if dtype is np.int32 else 10_000_000_000
    assert got.tolist() == [0, 0, 1, 2500, -1, -1, big, -1, min(np.iinfo(dtype).max, 2**62)]


def test_spikes_before_0_count_from_the_end_of_the_raster_as_in_the_reference():
    """NEMS0 indexes its raster with floor(t*fs) unchecked below 0: a spike at -0.4 ms is
    sample -1, the raster's last, inside a presentation that ends where the epochs do."""
    fs_hz, group = 1000.0, 10
    starts, ends = np.array([0.5, 3.0]), np.array([2.0, 4.5])
    spikes = [np.array([-0.0004, -0.0015, 0.7]), np.array([-0.0101, 4.4999]), np.array([])]
    nbins = binning.raster_samples(float(ends.max()), np.concatenate(spikes), fs_hz)
    assert nbins == 4500
    got = binning.count_windows(
        [binning.spike_samples(s, fs_hz, raster_samples=nbins) for s in spikes],
        binning.epoch_samples(starts, fs_hz),
        binning.epoch_samples(ends, fs_hz),
        n_bins=150,
        group=group,
    )
    want = reference_route(spikes, starts, ends, fs_hz, group)
    np.testing.assert_array_equal(got, want)
    assert got[0, 1, -1] == 2 and got[1, 1, -2] == 1 and got[1, 1, -1] == 1


def test_spike_samples_before_the_raster_or_nan_are_never_counted():
    times = np.array([-0.001, -4.5, -4.5001, np.nan, 0.002])
    got = binning.spike_samples(times, 1000.0, dtype=np.int32, raster_samples=4500)
    assert got.tolist() == [4499, 0, binning.NO_SAMPLE, binning.NO_SAMPLE, 2]
    plain = binning.spike_samples(times, 1000.0, dtype=np.int32)
    assert plain.tolist() == [-1, -1, -1, -1, 2]  # without the raster: none counted


def test_raster_samples_from_the_last_epoch_end_else_the_latest_spike():
    assert binning.raster_samples(1.25, np.array([9.0]), 2.0) == 2  # 2.5: half to even
    assert binning.raster_samples(1.75, np.array([9.0]), 2.0) == 4  # 3.5
    for no_end in (0.0, -1.0, float("nan")):
        assert binning.raster_samples(no_end, np.array([1.25, np.nan, 3.5]), 100.0) == 350
    assert binning.raster_samples(float("nan"), np.array([]), 100.0) == 0


def test_bin_lookup_is_int32_unless_the_flat_bins_need_more():
    starts, stops = np.array([0, 20]), np.array([20, 40])
    small = binning._bin_lookup(starts, stops, n_bins=2, group=10)
    assert small.dtype == np.int32
    assert small.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [3] * 10
    huge = binning._bin_lookup(starts, stops, n_bins=2**30, group=10)
    assert huge.dtype == np.int64
    assert huge[20] == 2**30 and huge[39] == 2**30 + 1


def _reference_indices(bounds, segments, fs):
    """nems0-format.md section 4, get_epoch_indices, line by line."""
    out = []
    o = 0
    s = 0
    e = 0
    nseg, nep = len(segments), len(bounds)
    while s < nseg and e < nep:
        sa, sb = segments[s]
        while True:
            ea, eb = bounds[e]
            if ea <= sa and eb >= sb:
                out.append((o, o + round((sb - sa) * fs)))
                e += 1
            elif sa <= ea < sb:
                out.append((o + round((ea - sa) * fs), o + round((min(eb, sb) - sa) * fs)))
                e += 1
            else:
                s += 1
                o += round((sb - sa) * fs)
                break
            if e >= nep:
                break
    return out


def test_segment_indices_follow_the_reference_loop_on_random_cases():
    rng = np.random.default_rng(11)
    for _ in range(300):
        edges = np.sort(
            rng.choice(np.arange(0, 400) * 0.25, size=2 * rng.integers(1, 4), replace=False)
        )
        segments = edges.reshape(-1, 2)
        starts = np.sort(
            rng.integers(0, 400, rng.integers(0, 8)) * 0.25 + rng.choice([0, 0.0005, 0.1234])
        )
        bounds = np.c_[starts, starts + rng.integers(0, 40, len(starts)) * 0.25]
        bounds = bounds[binning.within_segments(bounds, segments)]
        for fs in (100.0, 1000.0):
            got = binning.segment_indices(bounds, segments, fs)
            assert got == _reference_indices(bounds.tolist(), segments.tolist(), fs)


def test_segments_concatenate_and_an_epoch_out_of_order_ends_the_loop():
    segments = np.array([[0.0, 1.0], [5.0, 6.0]])
    bounds = np.array([[0.25, 0.75], [5.0, 6.0], [5.5, 5.75]])
    assert binning.segment_indices(bounds, segments, 100.0) == [(25, 75), (100, 200), (150, 175)]
    late_first = np.array([[5.0, 5.5], [0.25, 0.5]])  # unsorted: the second gets nothing
    assert binning.segment_indices(late_first, segments, 100.0) == [(100, 150)]
    inside = binning.within_segments(
        np.array([[0.5, 1.0], [0.5, 1.01], [4.0, 5.5], [5.0, 6.0]]), segments
    )
    assert inside.tolist() == [True, False, False, True]  # both ends included


def test_whole_sample_widths_ms():
    """The whole-ms bin widths samples_per_bin accepts at a rate, and none at an odd one."""
    assert binning.whole_sample_widths_ms(1000.0, up_to_ms=5).tolist() == [1, 2, 3, 4, 5]
    assert binning.whole_sample_widths_ms(99.0).tolist()[:3] == [1000, 2000, 3000]
    assert binning.whole_sample_widths_ms(1e-3).tolist() == []
    for w in binning.whole_sample_widths_ms(44_100.0, up_to_ms=100):
        assert binning.samples_per_bin(float(w), 44_100.0) == w * 441 // 10

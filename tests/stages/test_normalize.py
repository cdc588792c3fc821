"""normalize: both presets' constants and the scaling rule, against the formulas written out."""

from __future__ import annotations

import warnings

import numpy as np
import pyarrow as pa
import pytest
from click.testing import CliRunner

from nat4etl.cli import cli
from nat4etl.stages import normalize as nz
from nat4etl.stages import rebin_sites as rs
from nat4etl.store import Store


def _nems_minmax(m):
    """NEMS0 ``_normalize_data`` minmax, per row (nems0-format.md §6)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the all-NaN unit
        b = np.nanmin(m, axis=1, keepdims=True)
        g = np.nanmax(m, axis=1, keepdims=True) - b
    g[g == 0] = 1
    out = (m - b) / g
    out[out < 1e-6] = 0
    return out


def _rng_values():
    rng = np.random.default_rng(0)
    spec = rng.gamma(2.0, 2.0, (4, 300)).astype(np.float32)
    resp = rng.poisson(0.7, (5, 300)).astype(np.float32)
    resp[1, :150] = np.nan  # a unit not recorded for half the sounds
    resp[3] = 2.0  # a constant unit: zero range
    resp[4] = np.nan  # never recorded
    return spec, resp


def _constants(table, method, signal):
    rows = [r for r in table.to_pylist() if r["method"] == method and r["signal"] == signal]
    return tuple(np.array([r[k] for r in rows]) for k in ("channel", "offset", "min", "max"))


def test_nems_preset_is_norm_l1():
    spec, resp = _rng_values()
    table = nz.constants_table(nz.Rows.of_matrix(spec), nz.Rows.of_matrix(resp))
    ch, off, lo, hi = _constants(table, "nems", "spectrogram")
    assert ch.tolist() == [0, 1, 2, 3] and set(off) == {0.1}
    got = nz.scale(spec, 0.1, lo[:, None], hi[:, None])
    want = _nems_minmax(np.log((spec.astype(np.float64) + 0.1) / 0.1))
    np.testing.assert_allclose(got, want, atol=2e-6)

    ch, off, lo, hi = _constants(table, "nems", "responses")
    assert ch.tolist() == [0, 1, 2, 3, 4] and set(off) == {0.0}
    assert np.isnan(lo[4]) and lo[3] == hi[3] == 2.0
    got = nz.scale(resp, 0.0, lo[:, None], hi[:, None])
    with np.errstate(invalid="ignore"):
        want = _nems_minmax(resp.astype(np.float64))
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.all(got[3] == 0)  # zero range -> 1, then (2 - 2) / 1 = 0
    assert np.isnan(got[1, :150]).all() and np.isnan(got[4]).all()


def test_deepstrf_preset_is_one_global_min_max():
    spec, resp = _rng_values()
    table = nz.constants_table(nz.Rows.of_matrix(spec), nz.Rows.of_matrix(resp))
    ch, off, lo, hi = _constants(table, "deepstrf", "spectrogram")
    assert ch.tolist() == [-1] and off.tolist() == [1.0]
    y = np.log1p(spec.astype(np.float64))
    assert lo[0] == np.float64(np.log1p(np.float64(spec.min())))
    rule = nz.RULES[("deepstrf", "spectrogram")]
    np.testing.assert_allclose(  # the old loader: no 1e-6 cut
        nz.scale(spec, 1.0, lo, hi, floor=rule.floor), (y - y.min()) / np.ptp(y), atol=2e-7
    )
    tiny = np.array([[0.0, 1e-7, 1.0]], np.float32)  # 1e-7 stays, as in the old loader
    np.testing.assert_array_equal(nz.scale(tiny, 0.0, 0.0, 1.0, floor=rule.floor), tiny)
    ch, off, lo, hi = _constants(table, "deepstrf", "responses")
    assert ch.tolist() == [-1] and lo[0] == np.nanmin(resp) and hi[0] == np.nanmax(resp)


def test_scale_in_place_and_small_values():
    x = np.array([[0.0, 1e-7, 0.5, np.nan, 1.0]], np.float32)
    out = nz.scale(x, 0.0, 0.0, 1.0, in_place=True)
    assert out is x
    np.testing.assert_array_equal(out[0, [0, 1, 2, 4]], [0, 0, 0.5, 1])
    assert np.isnan(out[0, 3])


def test_recording_rebinned_per_sound_at_k_frames():
    pop = np.arange(2 * 12, dtype=np.float32).reshape(2, 12)
    stims = pa.table(
        {
            "stim": pa.array([0, 1], pa.int32()),
            "pop_start_s": [0.06, 0.0],
            "duration_s": [0.06, 0.06],
            "n_frames": pa.array([6, 6], pa.int32()),
        }
    )
    plan = rs.plan_bins(stims, dt_ms=20, pop_fs_hz=100)
    summed = nz.recording_at_bin_width(pop, stims, plan, counts=True)
    np.testing.assert_array_equal(summed[0], [13, 17, 21, 1, 5, 9])
    averaged = nz.recording_at_bin_width(pop, stims, plan, counts=False)
    np.testing.assert_array_equal(averaged[1], [18.5, 20.5, 22.5, 12.5, 14.5, 16.5])


def test_responses_as_recording_averages_val_trials():
    counts = np.array([[1, 2], [3, 4], [5, np.nan], [7, 8]], np.float32)
    table = rs.responses_table([0, 1, 1, 1], [0, 0, 0, 1], [0, 0, 1, 0], "site", counts)
    rows = nz.responses_as_recording(table, n_cells=3)
    # per (stim, cell) the est trial or the trials' mean: [[1, 2], [4, 4], [7, 8]]
    np.testing.assert_array_equal(rows.lo, [1, 4, 7])
    np.testing.assert_array_equal(rows.hi, [2, 4, 8])
    assert rows.channel_of_row.tolist() == [0, 0, 1]
    _, _, lo, hi = _constants(nz.constants_table(None, rows), "nems", "responses")
    np.testing.assert_array_equal(lo[:2], [1, 7])
    np.testing.assert_array_equal(hi[:2], [4, 8])
    assert np.isnan(lo[2])


@pytest.mark.parametrize("dt_ms", [10, 20])
def test_constants_from_stored_extremes_equal_the_decoded_recording(
    tmp_path, mini_quirks_sample, dt_ms
):
    """At 10 ms the constants come from pop_signals' min_value/max_value columns (no decode
    of the values); at 20 ms from the decoded, re-binned recording. Both must equal the
    constants of the decoded recording computed here."""
    out = tmp_path / "store"
    result = CliRunner().invoke(
        cli,
        [
            "build",
            "--out",
            str(out),
            "--source",
            str(mini_quirks_sample.dir),
            "--dt-ms",
            str(dt_ms),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    store = Store(out)
    for area in store.areas("norm_constants"):
        inputs = rs.load_area(store, area, sites=False)
        plan = rs.plan_bins(inputs.stims, dt_ms=dt_ms, pop_fs_hz=inputs.pop_fs_hz)
        resp, spec = (
            nz.Rows.of_matrix(nz.recording_at_bin_width(x, inputs.stims, plan, counts=c))
            for x, c in ((inputs.pop_resp, True), (inputs.pop_stim, False))
        )
        want = nz.constants_table(spec, resp)
        got = store.read_table("norm_constants", area=area).drop_columns(["area"])
        assert got.num_rows == want.num_rows > 0
        for method in nz.PRESETS:
            for signal in (nz.SPECTROGRAM, nz.RESPONSES):
                g, w = _constants(got, method, signal), _constants(want, method, signal)
                for a, b in zip(g, w, strict=True):
                    np.testing.assert_array_equal(a, b)  # exact, NaN where no value


def test_a_zero_range_is_1_for_nems_and_unscaled_for_deepstrf():
    """NEMS0 counts a zero range as 1 (y - min); the old loader scaled only when max > min,
    so a flat signal kept its values."""
    flat = np.full((2, 3), 2.0, np.float32)
    flat[1, 0] = np.nan
    lo, hi = np.float64(2.0), np.float64(2.0)
    for preset, want in (("nems", 0.0), ("deepstrf", np.log1p(np.float32(2.0)))):
        rule = nz.RULES[(preset, "spectrogram")]
        got = nz.scale(
            flat,
            rule.offset,
            *(np.log1p(v / rule.offset) for v in (lo, hi)),
            floor=rule.floor,
            flat_unscaled=rule.flat_unscaled,
        )
        assert np.isnan(got[1, 0])
        np.testing.assert_allclose(got[~np.isnan(got)], want, rtol=1e-6, err_msg=preset)
    rule = nz.RULES[("deepstrf", "responses")]
    got = nz.scale(flat, 0.0, lo, hi, floor=rule.floor, flat_unscaled=rule.flat_unscaled)
    np.testing.assert_array_equal(got, flat)

"""The reader on a small hand-written store: shapes, NaN padding, selection, budget, errors."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

import nat4etl
from nat4etl.errors import MissingTableError, SchemaError
from nat4etl.reader import ResultTooLarge
from nat4etl.stages import normalize as nz
from nat4etl.stages import rebin_sites as rs
from nat4etl.store import Store, write_manifest

T, F = 6, 3
#: stims 0-2 est, 3-4 val; cells 0-3
SUBSETS = ["est", "est", "est", "val", "val"]
N_CELLS = 4


def _counts(stim, cell, trial):
    """A recognisable value per (stim, cell, trial, bin)."""
    return np.arange(T, dtype=np.float32) + 1000 * stim + 100 * cell + 10 * trial


def _rows():
    """est: trial 0, cell 3 not recorded for stim 1; val: cell 0 has 3 trials, cell 1 two, cell 2
    three with the last NaN-padded bin, cell 3 none."""
    keys = []
    for stim in range(3):
        keys += [(stim, cell, 0) for cell in range(N_CELLS) if not (stim == 1 and cell == 3)]
    for stim in (3, 4):
        keys += [(stim, 0, r) for r in range(3)] + [(stim, 1, r) for r in range(2)]
        keys += [(stim, 2, r) for r in range(3)]
    counts = np.stack([_counts(*k) for k in keys])
    counts[keys.index((4, 2, 2)), -1] = np.nan
    return keys, counts


def _write_store(root, *, norm="nems"):
    store = Store(root)
    stims = pa.table(
        {
            "stim": pa.array(range(5), pa.int32()),
            "name": [f"STIM_{'00' if s == 'val' else ''}cat{i}.wav" for i, s in enumerate(SUBSETS)],
            "subset": SUBSETS,
            "wav_name": [f"cat{i}.wav" for i in range(5)],
            "duration_s": [0.06] * 5,
            "prestim_s": [0.01] * 5,
            "poststim_s": [0.01] * 5,
            "n_frames": pa.array([T] * 5, pa.int32()),
            "pop_start_s": [0.06 * i for i in range(5)],
        }
    )
    cells = pa.table(
        {
            "cell": pa.array(range(N_CELLS), pa.int32()),
            "cell_id": [f"ARM029a-0{i}-1" for i in range(N_CELLS)],
            "site": ["ARM029a"] * N_CELLS,
            "animal": ["ARM"] * N_CELLS,
            "electrode": pa.array(range(N_CELLS), pa.int32()),
            "unit": pa.array([1] * N_CELLS, pa.int32()),
            "auditory": [True] * N_CELLS,
            "site_unit_id": [f"ARM029a-0{i}-1" for i in range(3)] + [None],
            "match": ["exact"] * 3 + ["none"],
            "n_val_trials": pa.array([6] * N_CELLS, pa.int32()),
        }
    )
    store.write_table("stims", stims, area="A1")
    store.write_table("cells", cells, area="A1")
    keys, counts = _rows()
    k = np.array(keys)
    responses = rs.responses_table(k[:, 0], k[:, 1], k[:, 2], "site", counts)
    store.write_table("responses", responses, area="A1", metadata={"dt_ms": 10.0, "n_bins": T})
    spec = np.arange(5 * F * T, dtype=np.float32).reshape(5, F * T)
    store.write_table(
        "spectrograms",
        rs._vectors_table({"stim": np.arange(5, dtype=np.int32)}, "values", spec),
        area="A1",
        metadata={"dt_ms": 10.0, "n_bins": T, "n_bands": F, "unavailable": None},
    )
    wave = np.linspace(-1, 1, 5 * 4 * T, dtype=np.float32).reshape(5, 4 * T)
    store.write_table(
        "waveforms",
        rs._vectors_table({"stim": np.arange(5, dtype=np.int32)}, "samples", wave),
        area="A1",
        metadata={"audio_fs_hz": 400, "hop": 4},
    )
    resp_rows = nz.responses_as_recording(responses, N_CELLS)
    constants = nz.constants_table(
        nz.Rows.of_matrix(spec.reshape(5, F, T).transpose(1, 0, 2).reshape(F, -1)), resp_rows
    )
    store.write_table(
        "norm_constants", constants, area="A1", metadata={"dt_ms": 10.0, "default_norm": norm}
    )
    write_manifest(store)
    return store


@pytest.fixture()
def store(tmp_path):
    _write_store(tmp_path / "nat4")
    with nat4etl.open(tmp_path / "nat4") as s:
        yield s


def test_tables_in_id_order(store):
    stims = store.stims("A1")
    assert isinstance(stims, pl.DataFrame)
    assert stims["stim"].to_list() == list(range(5))
    assert "area" not in stims.columns
    assert store.cells("A1")["cell_id"][3] == "ARM029a-03-1"
    assert store.areas == ["A1"]


def test_responses_dense_with_nan_padding(store):
    keys, counts = _rows()
    arr = store.responses("A1")
    assert arr.dtype == np.float32 and arr.shape == (5, N_CELLS, 3, T)
    present = np.zeros(arr.shape[:3], bool)
    for key, row in zip(keys, counts, strict=True):
        np.testing.assert_array_equal(arr[key], row)
        present[key] = True
    assert np.isnan(arr[~present]).all()
    est = store.responses("A1", subset="est")
    assert est.shape == (3, N_CELLS, 1, T)
    assert np.isnan(est[1, 3]).all() and not np.isnan(est[2, 3]).any()


def test_responses_mean_is_nan_aware(store):
    full = store.responses("A1", subset="val")
    mean = store.responses("A1", subset="val", trials="mean")
    assert mean.shape == (2, N_CELLS, T)
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want = np.nanmean(full, axis=2)
    np.testing.assert_allclose(mean, want, rtol=1e-6)
    assert mean[1, 2, -1] == _counts(4, 2, 0)[-1] + 5  # mean of trials 0 and 1 only
    assert np.isnan(mean[:, 3]).all()


def test_selection_by_id_or_name_keeps_the_given_order(store):
    arr = store.responses("A1", stims=["STIM_00cat4.wav", 0], cells=[2, "ARM029a-00-1"])
    assert arr.shape == (2, 2, 3, T)
    np.testing.assert_array_equal(arr[0, 0, 1], _counts(4, 2, 1))
    np.testing.assert_array_equal(arr[1, 1, 0], _counts(0, 0, 0))
    assert np.isnan(arr[1, :, 1:]).all()  # est: one trial, the rest padding
    with pytest.raises(ValueError, match="unknown stims"):
        store.responses("A1", stims=["STIM_nope.wav"])
    with pytest.raises(ValueError, match="not in subset"):
        store.responses("A1", stims=[0], subset="val")


def test_normalized_responses_share_one_scale(store):
    raw = store.responses("A1")
    for preset in ("nems", "deepstrf"):
        got = store.responses("A1", norm=preset)
        c = store._constants("A1", preset, "responses", N_CELLS)
        want = nz.scale(raw, c[0], c[1][None, :, None, None], c[2][None, :, None, None])
        np.testing.assert_allclose(got, want, atol=1e-6)
        est = got[:3]  # constants span est trials and val means; single val trials may exceed 1
        assert np.nanmax(est) <= 1 + 1e-6 and np.nanmin(got) >= 0
    np.testing.assert_array_equal(
        store.responses("A1", norm="default"), store.responses("A1", norm="nems")
    )
    mean = store.responses("A1", norm="nems", trials="mean")
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        np.testing.assert_allclose(
            mean, np.nanmean(store.responses("A1", norm="nems"), axis=2), atol=1e-6
        )


def test_spectrograms_and_waveforms(store):
    spec = store.spectrograms("A1", subset="val")
    assert spec.shape == (2, F, T) and spec.dtype == np.float32
    np.testing.assert_array_equal(spec[0].reshape(-1), np.arange(3 * F * T, 4 * F * T))
    nems = store.spectrograms("A1", norm="nems")
    y = np.log1p(store.spectrograms("A1").astype(np.float64) / 0.1)
    lo, hi = y.min(axis=(0, 2), keepdims=True), y.max(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(
        nems, np.where((y - lo) / (hi - lo) < 1e-6, 0, (y - lo) / (hi - lo)), atol=1e-6
    )
    wave = store.waveforms("A1", subset="est")
    assert wave.shape == (3, 4 * T)


def test_memory_budget_fails_before_allocating(store):
    with pytest.raises(ResultTooLarge, match="trials='mean'") as err:
        store.responses("A1", max_bytes=1000)
    assert isinstance(err.value, MemoryError)
    assert store.responses("A1", trials="mean", max_bytes=2000).shape == (5, N_CELLS, T)


def test_scan_parquet_gives_the_same_numbers(store, tmp_path):
    lazy = pl.scan_parquet(
        str(tmp_path / "nat4" / "responses" / "**" / "*.parquet"), hive_partitioning=True
    )
    rows = (
        lazy.filter((pl.col("area") == "A1") & (pl.col("stim") == 3) & (pl.col("cell") == 1))
        .sort("trial")
        .collect()
    )
    got = np.stack(rows["counts"].to_numpy())
    np.testing.assert_array_equal(got, store.responses("A1", stims=[3], cells=[1])[0, 0, :2])


def test_missing_table_and_old_schema(tmp_path):
    with pytest.raises(MissingTableError, match="no nat4etl store"):
        nat4etl.open(tmp_path / "nowhere")
    store = _write_store(tmp_path / "a")
    store.table_file("waveforms", "A1").unlink()
    with nat4etl.open(tmp_path / "a") as s:
        with pytest.raises(MissingTableError, match="align-wav"):
            s.waveforms("A1")
        with pytest.raises(MissingTableError, match="no area 'PEG'"):
            s.responses("PEG")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["schema_version"] = 0
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="schema version 0"):
        nat4etl.open(tmp_path / "a")


def test_reader_pins_one_generation(tmp_path):
    """A store swapped under an open reader keeps serving the generation it opened."""
    import os

    _write_store(tmp_path / "nat4")
    reader = nat4etl.open(tmp_path / "nat4")
    before = reader.responses("A1", subset="est").copy()
    os.rename(tmp_path / "nat4", tmp_path / "old")
    _write_store(tmp_path / "nat4", norm="deepstrf")
    np.testing.assert_array_equal(reader.responses("A1", subset="est"), before)
    assert reader.default_norm("A1") == "nems"
    reader.close()


def test_fixed_size_view_respects_slices():
    from nat4etl.reader import _fixed_size_values

    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3)
    view = _fixed_size_values(arr.slice(1, 2), 3)
    np.testing.assert_array_equal(view, [[3, 4, 5], [6, 7, 8]])

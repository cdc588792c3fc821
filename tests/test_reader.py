"""The reader on a small hand-written store: shapes, NaN padding, selection, budget, errors."""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
import soundfile

import nat4etl
import nat4etl.store
from nat4etl.errors import MissingTableError, SchemaError
from nat4etl.hashing import file_digest
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


def _write_store(root, *, norm="nems", spec=None):
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
    if spec is None:
        spec = np.arange(5 * F * T, dtype=np.float32).reshape(5, F * T)
    store.write_table(
        "spectrograms",
        rs.vectors_table({"stim": np.arange(5, dtype=np.int32)}, "values", spec),
        area="A1",
        metadata={"dt_ms": 10.0, "n_bins": T, "n_bands": F, "unavailable": None},
    )
    wave = np.linspace(-1, 1, 5 * 4 * T, dtype=np.float32).reshape(5, 4 * T)
    store.write_table(
        "waveforms",
        rs.vectors_table({"stim": np.arange(5, dtype=np.int32)}, "samples", wave),
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


def test_an_area_is_taken_in_any_case_as_the_cli_takes_it(store):
    """`--area a1` works on the command line; `responses("a1")` gives A1's arrays too."""
    np.testing.assert_array_equal(store.responses("a1"), store.responses("A1"))
    np.testing.assert_array_equal(store.spectrograms("a1"), store.spectrograms("A1"))
    np.testing.assert_array_equal(store.waveforms("a1"), store.waveforms("A1"))
    assert store.stims("a1").equals(store.stims("A1"))
    assert store.cells("a1").equals(store.cells("A1"))
    assert store.metadata("responses", "a1") == store.metadata("responses", "A1")
    assert store.default_norm("a1") == store.default_norm("A1")
    with pytest.raises(MissingTableError, match="no area 'peg'"):
        store.responses("peg")


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
    # a unit id as a site file spells it (a padded electrode) is the same unit
    padded = store.responses("A1", stims=[0], cells=["ARM029a-002-1", "ARM029a-0-1"])
    np.testing.assert_array_equal(padded, store.responses("A1", stims=[0], cells=[2, 0]))
    with pytest.raises(ValueError, match="repeats an entry"):
        store.responses("A1", cells=["ARM029a-02-1", "ARM029a-002-1"])
    with pytest.raises(ValueError, match="unknown cells"):
        store.responses("A1", cells=["ARM029a-02-2"])  # another unit number: not a spelling
    with pytest.raises(ValueError, match="unknown stims"):
        store.responses("A1", stims=["STIM_nope.wav"])
    with pytest.raises(ValueError, match="not in subset"):
        store.responses("A1", stims=[0], subset="val")


def test_a_selection_that_is_not_an_id_or_name_is_refused_naming_it(store):
    """1.5 or True are not ids: int() would silently select unit 1."""
    for bad in (1.5, True, None, np.float64(2.0)):
        with pytest.raises(TypeError, match=f"`cells` takes ids .* not {re.escape(repr(bad))}"):
            store.responses("A1", cells=[bad])
    with pytest.raises(TypeError, match="`stims` takes ids"):
        store.responses("A1", stims=[0.5])
    with pytest.raises(ValueError, match="'ARM029a-01-1' and 1 are both cell 1"):
        store.responses("A1", cells=[1, "ARM029a-01-1"])
    with pytest.raises(ValueError, match="repeats an entry: 3 and 3"):
        store.responses("A1", stims=[3, 3])


def test_a_damaged_manifest_is_a_store_error_naming_it(tmp_path):
    from nat4etl.errors import StoreError

    _write_store(tmp_path / "nat4")
    manifest = tmp_path / "nat4" / "manifest.json"
    for text in (manifest.read_text()[:50], "", "[]"):
        manifest.write_text(text)
        with pytest.raises(StoreError, match="manifest.json"):
            nat4etl.open(tmp_path / "nat4")


def test_a_sidecar_warning_names_the_store_path_not_a_proc_fd(tmp_path):
    store = _write_store(tmp_path / "nat4")
    store.sidecar_file("responses", "A1").write_bytes(b"not arrow")
    with nat4etl.open(tmp_path / "nat4") as s:
        with pytest.warns(RuntimeWarning) as caught:
            s.responses("A1")
    msg = str(caught[0].message)
    assert str(tmp_path / "nat4" / "responses") in msg and "/proc/self/fd" not in msg


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


def test_deepstrf_keeps_small_values_as_the_old_loader(tmp_path):
    """The old loader's deepstrf scaling is log1p then (y - min) / (max - min) in float64,
    with no 1e-6 cut (nat4-dataset.md; the cut is NEMS0's, i.e. the nems preset's)."""
    spec = np.arange(5 * F * T, dtype=np.float32).reshape(5, F * T)
    spec[0, 1], spec[0, 2] = 1e-7, 2e-5  # deepstrf: ~2e-8 and ~4e-6 after scaling
    _write_store(tmp_path / "nat4", spec=spec)
    with nat4etl.open(tmp_path / "nat4") as store:
        raw = store.spectrograms("A1").astype(np.float64)
        y = np.log1p(raw)
        old = ((y - y.min()) / (y.max() - y.min())).astype(np.float32)
        got = store.spectrograms("A1", norm="deepstrf")
        assert got[0, 0, 1] > 0 and got[0, 0, 2] > 0
        np.testing.assert_allclose(got, old, rtol=1e-6, atol=0)
        nems = store.spectrograms("A1", norm="nems")  # NEMS0 norm.l1: the cut applies
        assert nems[0, 0, 1] == 0


def test_memory_budget_fails_before_allocating(store):
    with pytest.raises(ResultTooLarge, match="trials='mean'") as err:
        store.responses("A1", max_bytes=1000)
    assert isinstance(err.value, MemoryError)
    assert store.responses("A1", trials="mean", max_bytes=2000).shape == (5, N_CELLS, T)


def test_the_memory_budget_error_shows_amounts_that_differ(store):
    """Not "0.00 GiB, over the 0.00 GiB budget": exact bytes, binary units when large."""
    shape = (5, N_CELLS, 3, T)
    need = int(np.prod(shape)) * 4
    with pytest.raises(ResultTooLarge) as err:
        store.responses("A1", max_bytes=need - 1)
    msg = str(err.value)
    assert "0.00" not in msg
    assert need == 1440
    assert f"{shape} float32 = 1.41 KiB (1,440 bytes), over the budget of 1.41 KiB (1,439 " in msg
    # trials="mean": (5, 4, 6) float32 results, float64 sums and float32 counts while averaging
    with pytest.raises(ResultTooLarge) as err:
        store.responses("A1", trials="mean", max_bytes=1000)
    assert "(1,440 bytes) while averaging, over the budget of 1,000 bytes" in str(err.value)

    from nat4etl.reader import _amount

    assert _amount(1023) == "1,023 bytes"
    assert _amount(1536) == "1.50 KiB (1,536 bytes)"
    assert _amount(2 * 1024**3) == "2.00 GiB (2,147,483,648 bytes)"
    assert _amount(2 * 1024**3 + 1) == "2.00 GiB (2,147,483,649 bytes)"


def test_the_reader_returns_raw_values_unless_asked_as_the_readme_says(store):
    """The store's preset (`--norm`) applies only with norm="default"; the README says so
    where it describes the reader's `norm` argument."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    reading = readme[readme.index("## Reading") :]
    reading = reading[: reading.index("\n## ", 1)]
    normalize = readme[readme.index("**normalize**") :]
    for section in (reading, normalize[: normalize.index("\n\n")]):
        assert any(
            'norm="default"' in p and "raw values" in p and "--norm" in p
            for p in section.split("\n\n")
        ), section[:200]
    np.testing.assert_array_equal(store.responses("A1", subset="est")[0, 0, 0], _counts(0, 0, 0))
    assert store.default_norm("A1") == "nems"
    np.testing.assert_array_equal(
        store.responses("A1", norm="default"), store.responses("A1", norm="nems")
    )
    np.testing.assert_array_equal(
        store.spectrograms("A1", norm="default"), store.spectrograms("A1", norm="nems")
    )


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


def test_every_public_method_of_a_closed_store_says_it_is_closed(tmp_path):
    """Not a missing table: a closed store raises ValueError (as a closed file does), for
    every public method, facts read before the close included."""
    import inspect

    _write_store(tmp_path / "nat4")
    s = nat4etl.open(tmp_path / "nat4")
    before = s.responses("A1", norm="default")  # also caches metadata, ids and constants
    s.metadata("responses", "A1")
    s.close()
    calls = {
        "areas": lambda: s.areas,
        "dt_ms": lambda: s.dt_ms,
        "stims": lambda: s.stims("A1"),
        "cells": lambda: s.cells("A1"),
        "metadata": lambda: s.metadata("responses", "A1"),
        "default_norm": lambda: s.default_norm("A1"),
        "spectrograms": lambda: s.spectrograms("A1"),
        "responses": lambda: s.responses("A1", norm="default"),
        "waveforms": lambda: s.waveforms("A1"),
        "reliability": lambda: s.reliability("A1"),
    }
    public = {n for n, _ in inspect.getmembers(type(s)) if not n.startswith("_")} - {"close"}
    assert public == set(calls), "a new public method: add it here"
    for name, call in calls.items():
        with pytest.raises(ValueError, match="closed") as err:
            call()
        assert not isinstance(err.value, MissingTableError), name
        assert str(tmp_path / "nat4") in str(err.value), name
        assert "nat4etl.open" in str(err.value), name
    with pytest.raises(ValueError, match="closed"):
        with s:
            pass
    s.close()  # closing again is harmless
    assert "closed" in repr(s)
    assert np.isfinite(before[0, 0, 0]).all()  # results read before the close stay usable


def test_fixed_size_view_respects_slices():
    from nat4etl.reader import _fixed_size_values

    arr = pa.FixedSizeListArray.from_arrays(pa.array(np.arange(12, dtype=np.float32)), 3)
    view = _fixed_size_values(arr.slice(1, 2), 3)
    np.testing.assert_array_equal(view, [[3, 4, 5], [6, 7, 8]])


# ============================================================================ sidecar
# Tables with vector columns also have an uncompressed Arrow IPC copy, part-0.arrow, which
# the reader maps copy-on-write: results are views of it where the layout allows.
VECTOR_TABLES = ("responses", "spectrograms", "waveforms")


def _all_results(s) -> dict[str, np.ndarray]:
    """Every kind of reader call, including selections out of table order."""
    out = {}
    for subset in ("all", "est", "val"):
        out[f"spec {subset}"] = s.spectrograms("A1", subset=subset)
        out[f"wave {subset}"] = s.waveforms("A1", subset=subset)
        for norm in (None, "nems", "deepstrf"):
            out[f"spec {subset} {norm}"] = s.spectrograms("A1", subset=subset, norm=norm)
            for trials in ("all", "mean"):
                out[f"resp {subset} {norm} {trials}"] = s.responses(
                    "A1", subset=subset, norm=norm, trials=trials
                )
    for trials in ("all", "mean"):
        for norm in (None, "nems"):
            out[f"picked {trials} {norm}"] = s.responses(
                "A1", stims=[4, 0, 3], cells=[2, 0, 3], trials=trials, norm=norm
            )
    out["one stim"] = s.responses("A1", stims=[0])
    out["no cells"] = s.responses("A1", cells=[])
    return out


def _assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name, arr in want.items():
        assert got[name].dtype == arr.dtype and got[name].shape == arr.shape, name
        # bit for bit, NaN where NaN
        np.testing.assert_array_equal(got[name].view(np.uint32), arr.view(np.uint32), name)


def _mapped_file(arr: np.ndarray) -> str | None:
    """The file mapped at ``arr``'s first byte, from /proc/self/maps (None: anonymous)."""
    address = arr.__array_interface__["data"][0]
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if lo <= address < hi:
            return fields[5] if len(fields) > 5 else None
    return None


def test_results_hold_no_file_descriptor_and_unmap_when_dropped(store):
    """Python's mmap kept a descriptor per result: a thousand kept results ran out."""
    import gc
    import os

    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def mappings_of_sidecars() -> int:
        return Path("/proc/self/maps").read_text().count("part-0.arrow")

    store.spectrograms("A1")  # first calls read facts and footers
    gc.collect()  # other tests' arrays: gone before counting
    before_fds, before_maps = open_fds(), mappings_of_sidecars()
    kept = [store.spectrograms("A1") for _ in range(50)]
    assert _mapped_file(kept[0]).endswith("spectrograms/area=A1/part-0.arrow")  # zero-copy
    kept[0][0, 0, 0] = -1.0  # writable, private: the next result does not see it
    assert store.spectrograms("A1")[0, 0, 0] != -1.0
    # with a descriptor per result it was +50; other threads of the test session may
    # hold a few for a moment
    assert open_fds() < before_fds + 10
    assert mappings_of_sidecars() >= before_maps + 50
    del kept
    gc.collect()
    assert mappings_of_sidecars() < before_maps + 10


def test_running_out_of_descriptors_is_not_called_store_damage(store, monkeypatch):
    import errno

    from nat4etl import memory

    def no_fds(path):
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    monkeypatch.setattr(memory, "map_private", no_fds)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "unreadable ... nat4etl verify" warning
        with pytest.raises(OSError, match="Too many open files"):
            store.spectrograms("A1")


def test_sidecar_holds_the_parquet_rows_schema_and_metadata(tmp_path):
    import pyarrow.parquet as pq

    store = _write_store(tmp_path / "nat4")
    for name in ("stims", "cells", "norm_constants"):
        assert not store.sidecar_file(name, "A1").exists()
    for name in VECTOR_TABLES:
        with pa.memory_map(str(store.sidecar_file(name, "A1"))) as f:
            reader = pa.ipc.open_file(f)
            assert reader.num_record_batches == 1  # one contiguous buffer per column
            arrow = reader.read_all()
        parquet = pq.read_table(store.table_file(name, "A1"))
        assert arrow.schema.metadata == parquet.schema.metadata
        # the same types; only the list's child is named "item" in Arrow, "element" in Parquet
        arrow = arrow.cast(parquet.schema)
        assert arrow.schema.equals(parquet.schema, check_metadata=True)
        for a, b in zip(arrow.columns, parquet.columns, strict=True):
            if pa.types.is_fixed_size_list(a.type):  # bit for bit (NaN != NaN for equals)
                a, b = (c.combine_chunks().flatten().to_numpy().view(np.uint32) for c in (a, b))
                np.testing.assert_array_equal(a, b)
            else:
                assert a.equals(b)
    manifest = json.loads((tmp_path / "nat4" / "manifest.json").read_text())
    listed = {t["path"]: t for t in manifest["tables"]}
    for name in VECTOR_TABLES:
        entry = listed[f"{name}/area=A1/part-0.arrow"]
        assert entry["rows"] == listed[f"{name}/area=A1/part-0.parquet"]["rows"]
        assert entry["digest"] == store.written[f"{name}/area=A1/part-0.arrow"]


def test_sidecar_bytes_do_not_depend_on_chunking(tmp_path):
    keys, counts = _rows()
    k = np.array(keys)
    table = rs.responses_table(k[:, 0], k[:, 1], k[:, 2], "site", counts)
    chunked = pa.concat_tables([table.slice(0, 5), table.slice(5, 7), table.slice(12)])
    assert chunked.column("counts").num_chunks == 3
    shifted = pa.concat_tables([table.slice(0, 1), table]).slice(1)  # offsets into buffers
    digests = set()
    for i, t in enumerate((table, chunked, shifted, table)):
        store = Store(tmp_path / str(i))
        store.write_table("responses", t, area="A1", metadata={"dt_ms": 10.0, "n_bins": T})
        digests.add(file_digest(store.sidecar_file("responses", "A1")))
    assert len(digests) == 1


def test_reader_gives_the_same_bits_with_and_without_sidecars(tmp_path):
    store = _write_store(tmp_path / "nat4")
    with nat4etl.open(tmp_path / "nat4") as s:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the sidecar is used, silently
            mapped = _all_results(s)
    for name in VECTOR_TABLES:
        store.sidecar_file(name, "A1").unlink()
    with nat4etl.open(tmp_path / "nat4") as s:
        decoded = _all_results(s)
    _assert_same(mapped, decoded)
    assert np.isnan(mapped["no cells"]).all() and mapped["no cells"].shape == (5, 0, 1, T)


def test_normalization_is_bit_identical_to_normalize_scale(store):
    raw = store.responses("A1")
    for preset in ("nems", "deepstrf"):
        c = store._constants("A1", preset, "responses", N_CELLS)
        rule = nz.RULES[(preset, "responses")]
        want = nz.scale(
            raw,
            c[0],
            c[1][None, :, None, None],
            c[2][None, :, None, None],
            floor=rule.floor,
            flat_unscaled=rule.flat_unscaled,
        )
        np.testing.assert_array_equal(
            store.responses("A1", norm=preset).view(np.uint32), want.view(np.uint32)
        )
        spec = store.spectrograms("A1")
        c = store._constants("A1", preset, "spectrogram", F)
        rule = nz.RULES[(preset, "spectrogram")]
        want = nz.scale(
            spec,
            c[0],
            c[1][None, :, None],
            c[2][None, :, None],
            floor=rule.floor,
            flat_unscaled=rule.flat_unscaled,
        )
        np.testing.assert_array_equal(store.spectrograms("A1", norm=preset), want)


def test_raw_results_are_private_views_of_the_sidecar(store, tmp_path):
    sidecar = store._store.sidecar_file("spectrograms", "A1")
    before = sidecar.read_bytes()
    results = {
        "spectrograms": store.spectrograms("A1", subset="val"),
        "waveforms": store.waveforms("A1"),
        "responses": store.responses("A1", stims=[0]),  # every unit, its one trial: dense
    }
    for name, arr in results.items():
        assert _mapped_file(arr).endswith(f"{name}/area=A1/part-0.arrow"), name  # no copy
        assert arr.flags.writeable and arr.flags.c_contiguous, name
    np.testing.assert_array_equal(
        results["responses"][0, :, 0], np.stack([_counts(0, c, 0) for c in range(N_CELLS)])
    )
    again = store.spectrograms("A1", subset="val")
    spec = results["spectrograms"]
    spec[:] = -1  # copy-on-write: the store and other results keep their values
    assert sidecar.read_bytes() == before
    np.testing.assert_array_equal(
        again.reshape(2, -1), np.arange(3 * F * T, 5 * F * T).reshape(2, -1)
    )
    assert np.shares_memory(store.spectrograms("A1"), store.spectrograms("A1")) is False
    # a result that is not the dense grid is one fresh array, not in the file
    est = store.responses("A1", subset="est")
    assert est.flags.owndata or est.base.flags.owndata
    assert _mapped_file(est) is None or not _mapped_file(est).endswith(".arrow")


def test_unusable_sidecar_falls_back_to_parquet_with_a_warning(tmp_path):
    store = _write_store(tmp_path / "nat4")
    with nat4etl.open(tmp_path / "nat4") as s:
        want = s.responses("A1", norm="nems")
    side = store.sidecar_file("responses", "A1")
    data = side.read_bytes()
    side.write_bytes(data[: len(data) // 2])  # truncated
    with nat4etl.open(tmp_path / "nat4") as s:
        with pytest.warns(RuntimeWarning, match="part-0.arrow unreadable"):
            np.testing.assert_array_equal(s.responses("A1", norm="nems"), want)
    other = Store(tmp_path / "other")  # the same rows written by another run: other metadata
    keys, counts = _rows()
    k = np.array(keys)
    t = rs.responses_table(k[:, 0], k[:, 1], k[:, 2], "site", counts)
    other.write_table("responses", t, area="A1", metadata={"dt_ms": 10.0, "n_bins": T, "x": 1})
    side.write_bytes(other.sidecar_file("responses", "A1").read_bytes())
    with nat4etl.open(tmp_path / "nat4") as s:
        with pytest.warns(RuntimeWarning, match="does not match part-0.parquet"):
            np.testing.assert_array_equal(s.responses("A1", norm="nems"), want)


def test_an_empty_responses_table_reads_as_nan_with_or_without_sidecar(tmp_path):
    store = _write_store(tmp_path / "nat4")
    none = np.empty(0, np.int32)
    empty = rs.responses_table(none, none, none, "site", np.empty((0, T), np.float32))
    store.write_table("responses", empty, area="A1", metadata={"dt_ms": 10.0, "n_bins": T})
    write_manifest(store)
    for _ in ("sidecar", "parquet"):
        with nat4etl.open(tmp_path / "nat4") as s:
            assert np.isnan(s.responses("A1", norm="nems")).all()
            assert s.responses("A1", trials="mean").shape == (5, N_CELLS, T)
        store.sidecar_file("responses", "A1").unlink(missing_ok=True)


def test_verify_reports_a_damaged_sidecar_and_build_repairs_it(built_quirks, tmp_path):
    import shutil

    from nat4etl.stages.build import verify

    reader, mirror, _ = built_quirks
    out = tmp_path / "nat4"
    shutil.copytree(reader.path, out, symlinks=True)
    assert verify(out) == []
    side = out / "responses/area=A1/part-0.arrow"
    data = bytearray(side.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit in the counts: same size, same footer
    side.write_bytes(bytes(data))
    problems = verify(out)
    assert problems and all("responses/area=A1/part-0.arrow" in p for p in problems)
    build_store(mirror.dir, out)
    assert verify(out) == []
    with nat4etl.open(out) as fixed:
        np.testing.assert_array_equal(
            fixed.responses("A1", subset="val"), reader.responses("A1", subset="val")
        )


def test_built_store_reads_the_same_without_sidecars(built_quirks, tmp_path):
    import shutil

    reader, _, _ = built_quirks
    out = tmp_path / "nat4"
    shutil.copytree(reader.path, out, symlinks=True)
    for side in out.glob("*/area=*/part-0.arrow"):
        side.unlink()
    with nat4etl.open(out) as decoded:
        for area in ("A1", "PEG"):
            for subset in ("est", "val", "all"):
                for trials in ("all", "mean"):
                    for norm in (None, "nems"):
                        np.testing.assert_array_equal(
                            reader.responses(area, subset=subset, trials=trials, norm=norm),
                            decoded.responses(area, subset=subset, trials=trials, norm=norm),
                        )
                np.testing.assert_array_equal(
                    reader.spectrograms(area, subset=subset, norm="deepstrf"),
                    decoded.spectrograms(area, subset=subset, norm="deepstrf"),
                )
                np.testing.assert_array_equal(
                    reader.waveforms(area, subset=subset), decoded.waveforms(area, subset=subset)
                )


# ============================================================================ acceptance
# The reader on a store built from the mini sample, against arrays computed in this file
# straight from the sample's own files (tarfile / zipfile / h5py / numpy / soundfile): no
# nat4etl code is involved in the expected values.
POP_FS, SITE_FS, N_FRAMES, AUDIO_FS = 100, 1000, 150, 44_100


def _epochs_csv(text: str) -> list[tuple[str, float, float]]:
    import csv

    rows = csv.DictReader(io.StringIO(text))
    return [(r["name"], float(r["start"]), float(r["end"])) for r in rows]


def _tar_members(data_or_path) -> dict[str, bytes]:
    import tarfile

    if isinstance(data_or_path, bytes):
        tar = tarfile.open(fileobj=io.BytesIO(data_or_path), mode="r:gz")
    else:
        tar = tarfile.open(data_or_path, mode="r:gz")
    with tar:
        return {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar if m.isfile()}


def _suffix(members: dict[str, bytes], suffix: str) -> bytes:
    (name,) = [n for n in members if n.endswith(suffix) and not n.startswith("._")]
    return members[name]


def _unit_key(unit_id: str) -> tuple[str, int, int]:
    site, electrode, unit = unit_id.split("-")
    return site, int(electrode), int(unit)


def _reference_route(times_s, start_s, end_s, group):
    """floor(t*fs) raster, cut [round(start*fs), round(end*fs)), sum groups (NEMS0)."""
    lb, ub = round(start_s * SITE_FS), round(end_s * SITE_FS)
    samples = np.floor(np.asarray(times_s) * SITE_FS).astype(np.int64)
    raster = np.bincount(samples[(samples >= lb) & (samples < ub)] - lb, minlength=ub - lb)
    return raster.reshape(-1, group).sum(axis=1)


class Reference:
    """One area of a sample mirror, computed from its files by the NEMS0 rules."""

    def __init__(self, mirror: Path, area: str, *, group: int = 10):
        pop = _tar_members(mirror / f"{area}_NAT4_ozgf.fs100.ch18.tgz")
        self.cell_ids = json.loads(_suffix(pop, ".resp.json"))["chans"]
        resp = np.loadtxt(io.BytesIO(_suffix(pop, ".resp.csv")), delimiter=",", ndmin=2).T
        stim = np.loadtxt(io.BytesIO(_suffix(pop, ".stim.csv")), delimiter=",", ndmin=2).T
        self.pop_resp, self.pop_stim = resp, stim
        epochs = sorted(_epochs_csv(_suffix(pop, ".resp.epoch.csv").decode()), key=lambda e: e[1])
        first = {}
        for name, start, _ in epochs:
            if name.startswith("STIM_") and name not in first:
                first[name] = start
        est = [n for n in first if n.startswith("STIM_cat")]
        val = [n for n in first if n.startswith("STIM_00cat")]
        self.names, self.subsets = est + val, ["est"] * len(est) + ["val"] * len(val)
        lb = [round(first[n] * POP_FS) for n in self.names]
        self.spec = np.stack([stim[:, b : b + N_FRAMES] for b in lb])  # (S, F, T)
        self.resp = np.stack([resp[:, b : b + N_FRAMES] for b in lb])  # (S, N, T)
        self.val_trials = self._val_trials(mirror, area, val, group)
        self.mirror, self.area = mirror, area

    def _val_trials(self, mirror, area, val, group):
        """(S_val, N, R, T) single trials from the site files, units matched on their key."""
        spikes, site_epochs = {}, {}
        with zipfile.ZipFile(mirror / f"{area}_single_sites.zip") as zf:
            for member in zf.namelist():
                if not member.endswith(".tgz") or "__MACOSX" in member:
                    continue
                m = _tar_members(zf.read(member))
                with h5py.File(io.BytesIO(_suffix(m, ".resp.h5")), "r") as h5:
                    units = {k: h5[k][:] for k in h5}
                assert json.loads(_suffix(m, ".resp.json"))["fs"] == SITE_FS
                for unit_id, times in units.items():
                    spikes[_unit_key(unit_id)] = times
                    site_epochs[_unit_key(unit_id)[0]] = _epochs_csv(
                        _suffix(m, ".resp.epoch.csv").decode()
                    )
        n_reps = max(sum(1 for e in eps if e[0] == v) for eps in site_epochs.values() for v in val)
        out = np.full((len(val), len(self.cell_ids), n_reps, N_FRAMES * 10 // group), np.nan)
        for n, cell_id in enumerate(self.cell_ids):
            key = _unit_key(cell_id)
            if key not in spikes:
                continue
            for s, v in enumerate(val):
                pres = sorted(e for e in site_epochs[key[0]] if e[0] == v)
                pres = sorted(pres, key=lambda e: e[1])
                for r, (_, start, end) in enumerate(pres):
                    out[s, n, r] = _reference_route(spikes[key], start, end, group)
        return out

    def waveforms(self) -> np.ndarray:
        """Each sound's wav, mono, at 0.25 s in a 1.5 s window of 441-sample frames."""
        out = np.zeros((len(self.names), N_FRAMES * 441), np.float32)
        with zipfile.ZipFile(self.mirror / "wav.zip") as zf:
            by_lower = {n.rsplit("/", 1)[-1].lower(): n for n in zf.namelist()}
            for i, name in enumerate(self.names):
                data, fs = soundfile.read(
                    io.BytesIO(zf.read(by_lower[name[5:].lower()])), dtype="float32", always_2d=True
                )
                assert fs == AUDIO_FS
                mono = data.mean(axis=1)
                start = round(0.25 * AUDIO_FS)
                seg = mono[: out.shape[1] - start]
                out[i, start : start + len(seg)] = seg
        return out


def build_store(mirror: Path, out: Path, **overrides) -> Path:
    """`build --source mirror` into ``out``."""
    import dataclasses

    from nat4etl.config import load_settings
    from nat4etl.progress import NullProgress
    from nat4etl.stages.build import build

    settings = dataclasses.replace(load_settings(), source_dir=mirror, wav=True, **overrides)
    build(out, settings, NullProgress())
    return out


def _built(mirror, tmp_path_factory):
    out = build_store(mirror.dir, tmp_path_factory.mktemp("built") / "nat4")
    refs = {area: Reference(mirror.dir, area) for area in ("A1", "PEG")}
    return nat4etl.open(out), mirror, refs


@pytest.fixture(scope="module", params=["mini_sample", "mini_quirks_sample"])
def built(request, tmp_path_factory):
    """(reader, mirror, {area: Reference}) for a store built from each mini mirror."""
    reader, mirror, refs = _built(request.getfixturevalue(request.param), tmp_path_factory)
    with reader:
        yield reader, mirror, refs


@pytest.fixture(scope="module")
def built_quirks(mini_quirks_sample, tmp_path_factory):
    reader, mirror, refs = _built(mini_quirks_sample, tmp_path_factory)
    with reader:
        yield reader, mirror, refs


def check_stims_and_cells(reader, ref: Reference, area: str) -> None:
    stims = reader.stims(area)
    assert stims["name"].to_list() == ref.names
    assert stims["subset"].to_list() == ref.subsets
    assert reader.cells(area)["cell_id"].to_list() == ref.cell_ids


def check_spectrograms(reader, ref: Reference, area: str) -> None:
    np.testing.assert_allclose(reader.spectrograms(area), ref.spec, rtol=1e-6)
    n_est = ref.subsets.count("est")
    np.testing.assert_allclose(reader.spectrograms(area, subset="val"), ref.spec[n_est:], rtol=1e-6)
    y = np.log1p(ref.pop_stim)  # deepstrf: log1p, one min-max over the whole recording
    want = (np.log1p(ref.spec) - y.min()) / (y.max() - y.min())  # no 1e-6 cut
    got = reader.spectrograms(area, norm="deepstrf")
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    y = np.log((ref.pop_stim + 0.1) / 0.1)  # nems: ln(1 + x/0.1), min-max per band
    lo, hi = y.min(axis=1)[None, :, None], y.max(axis=1)[None, :, None]
    want = (np.log((ref.spec + 0.1) / 0.1) - lo) / (hi - lo)
    got = reader.spectrograms(area, norm="nems")
    np.testing.assert_allclose(got, np.where(want < 1e-6, 0, want), atol=2e-6)


def check_responses(reader, ref: Reference, area: str) -> None:
    n_est = ref.subsets.count("est")
    est = reader.responses(area, subset="est")
    assert est.shape == (n_est, len(ref.cell_ids), 1, N_FRAMES)
    np.testing.assert_array_equal(est[:, :, 0], ref.resp[:n_est].astype(np.float32))
    val = reader.responses(area, subset="val")
    assert val.shape == ref.val_trials.shape
    np.testing.assert_array_equal(val, ref.val_trials.astype(np.float32))
    everything = reader.responses(area)
    assert everything.shape[2] == ref.val_trials.shape[2]  # est padded to R with NaN
    assert np.isnan(everything[:n_est, :, 1:]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        psth = np.nanmean(ref.val_trials, axis=2)
    np.testing.assert_allclose(reader.responses(area, subset="val", trials="mean"), psth, rtol=1e-6)
    # both presets, constants from the whole population recording, one scale for est and val
    for preset, per_unit in (("deepstrf", False), ("nems", True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            axis = 1 if per_unit else None
            lo = np.nanmin(ref.pop_resp, axis=axis, keepdims=per_unit)
            hi = np.nanmax(ref.pop_resp, axis=axis, keepdims=per_unit)
        span = np.where(hi - lo == 0, 1, hi - lo)
        lo4 = lo[None, :, :, None] if per_unit else lo
        span4 = span[None, :, :, None] if per_unit else span
        for subset, raw in (("est", ref.resp[:n_est, :, None]), ("val", ref.val_trials)):
            want = (raw - lo4) / span4
            if per_unit:  # nems cuts values below 1e-6; deepstrf (the old loader) does not
                want = np.where(want < 1e-6, 0, want)
            got = reader.responses(area, subset=subset, norm=preset)
            np.testing.assert_allclose(got, want, atol=2e-6, err_msg=f"{preset} {subset}")


def check_waveforms(reader, ref: Reference, area: str) -> None:
    np.testing.assert_allclose(reader.waveforms(area), ref.waveforms(), atol=1e-7)


@pytest.mark.parametrize("area", ["A1", "PEG"])
def test_reader_matches_the_sample_files(built, area):
    reader, _, refs = built
    ref = refs[area]
    check_stims_and_cells(reader, ref, area)
    check_spectrograms(reader, ref, area)
    check_responses(reader, ref, area)
    check_waveforms(reader, ref, area)


def test_quirks_are_visible_in_the_arrays(built_quirks):
    """TNC units present via canonical matching; a 19-repetition site has a NaN 20th trial."""
    reader, mirror, refs = built_quirks
    quirks = mirror.info.quirks_applied
    assert mirror.info.quirks
    cells = reader.cells("A1")
    tnc = cells.filter(pl.col("site") == "TNC015a")
    assert set(tnc["match"].to_list()) == {"canonical"}
    val = reader.responses("A1", subset="val", cells=tnc["cell"].to_list())
    assert not np.isnan(val).any()  # every TNC unit has all its val trials
    short = quirks.short_val[0]
    stim = reader.stims("A1").filter(pl.col("name") == short.stim)["stim"][0]
    site_cells = cells.filter(pl.col("site") == short.site)["cell"].to_list()
    arr = reader.responses("A1", stims=[stim])  # R: the largest count in the selection
    assert arr.shape[2] == 20
    assert np.isnan(arr[:, site_cells, short.n_reps :]).all()
    assert not np.isnan(arr[:, site_cells, : short.n_reps]).any()
    assert reader.responses("A1", stims=[stim], cells=site_cells).shape[2] == short.n_reps
    (dropped,) = quirks.units_without_site_data
    cell = cells.filter(pl.col("cell_id") == dropped)["cell"][0]
    assert np.isnan(reader.responses("A1", subset="val", cells=[cell])).all()
    assert not np.isnan(reader.responses("A1", subset="est", cells=[cell])).all()


def test_scan_parquet_matches_the_reader_on_a_built_store(built):
    reader, _, _ = built
    lazy = pl.scan_parquet(
        str(reader.path / "responses" / "**" / "*.parquet"), hive_partitioning=True
    )
    for area, stim, cell in (("A1", 9, 3), ("PEG", 0, 2), ("A1", 10, 0)):
        rows = (
            lazy.filter(
                (pl.col("area") == area) & (pl.col("stim") == stim) & (pl.col("cell") == cell)
            )
            .sort("trial")
            .collect()
        )
        got = np.stack(rows["counts"].to_numpy())
        want = reader.responses(area, stims=[stim], cells=[cell])[0, 0, : len(rows)]
        np.testing.assert_array_equal(got, want)
        assert rows["trial"].to_list() == list(range(len(rows)))


def test_many_row_groups_read_on_threads_give_the_same_arrays(tmp_path):
    """Row groups split (stim, cell) runs; threaded decoding must not change a value."""
    import pyarrow.parquet as pq

    store = _write_store(tmp_path / "nat4")
    with nat4etl.open(tmp_path / "nat4") as s:
        want = {t: s.responses("A1", trials=t, norm="nems") for t in ("all", "mean")}
        picked = s.responses("A1", stims=[4, 0, 3], cells=[2, 0], trials="mean")
    path = store.table_file("responses", "A1")
    table = pq.read_table(path)
    pq.write_table(table, path, row_group_size=4, compression="zstd")
    store.sidecar_file("responses", "A1").unlink()  # this test is about the Parquet route
    assert pq.ParquetFile(path).metadata.num_row_groups > 5
    with nat4etl.open(tmp_path / "nat4") as s:
        for t, arr in want.items():
            np.testing.assert_array_equal(s.responses("A1", trials=t, norm="nems"), arr)
        got = s.responses("A1", stims=[4, 0, 3], cells=[2, 0], trials="mean")
        np.testing.assert_array_equal(got, picked)


@pytest.mark.parametrize("dt_ms", [20, 5])
def test_other_bin_widths_follow_the_reference_route(mini_quirks_sample, tmp_path, dt_ms):
    """dt 20: everything re-binned; dt 5: responses only, spectrograms a clear error: the
    one the reader raises for any table a store lacks (not a configuration error: the
    reader has no option to fix), with the reason and the rebuild that adds them."""
    from nat4etl.errors import ConfigError, MissingTableError, StoreError

    audio_fs_hz = 44_100 if dt_ms == 20 else 48_000  # 5 ms at 44.1 kHz is not whole samples
    out = build_store(
        mini_quirks_sample.dir, tmp_path / "nat4", dt_ms=float(dt_ms), audio_fs_hz=audio_fs_hz
    )
    ref = Reference(mini_quirks_sample.dir, "A1", group=dt_ms)
    n_est, n_bins = ref.subsets.count("est"), 1500 // dt_ms
    with nat4etl.open(out) as reader:
        val = reader.responses("A1", subset="val")
        np.testing.assert_array_equal(val, ref.val_trials.astype(np.float32))
        est = reader.responses("A1", subset="est")
        assert est.shape == (n_est, len(ref.cell_ids), 1, n_bins)
        if dt_ms == 20:
            pop = ref.resp[:n_est].reshape(n_est, len(ref.cell_ids), n_bins, 2).sum(axis=-1)
            np.testing.assert_array_equal(est[:, :, 0], pop.astype(np.float32))
            spec = ref.spec.reshape(*ref.spec.shape[:2], n_bins, 2).mean(axis=-1)
            np.testing.assert_allclose(reader.spectrograms("A1"), spec, rtol=1e-6)
            assert reader.waveforms("A1").shape == (len(ref.names), n_bins * 882)
        else:
            with pytest.raises(MissingTableError, match="not a whole number of the population"):
                reader.spectrograms("A1")
            with pytest.raises(StoreError) as err:
                reader.spectrograms("A1", subset="val", norm="nems")
            assert not isinstance(err.value, ConfigError)
            assert err.value.exit_code == 7  # the store's exit code, as a missing table's
            assert str(err.value) == (
                f"no spectrograms in {out} for A1: dt_ms=5 is not a whole number of the "
                "population spectrogram's 10 ms frames, so frames cannot be averaged into "
                "bins; rebuild with `--dt-ms` a multiple of 10 for spectrograms"
            )
            assert reader.waveforms("A1").shape == (len(ref.names), n_bins * 240)
        norm = reader.responses("A1", subset="est", norm="nems")
        assert np.nanmax(norm) == pytest.approx(1.0) and np.nanmin(norm) == 0.0

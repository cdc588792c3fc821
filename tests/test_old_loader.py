"""README's "Coming from the deepSTRF NAT4Dataset" recipe against the old loader's arrays.

`old_loader.py` recomputes, without nat4etl, what the old loader returned for a mirror;
:func:`recipe` follows the README section word for word, differences it documents
included; the two must agree on every returned field.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from old_loader import OldArrays, old_loader_arrays

import nat4etl
from nat4etl.sample import format_csv_18e

#: README: "each within about 1.2e-7 (absolute)", one float32 step at 1.0
TOLERANCE = 2.0**-23


def build(mirror: Path, out: Path, **overrides) -> Path:
    from nat4etl.config import load_settings
    from nat4etl.progress import NullProgress
    from nat4etl.stages.build import build as build_store

    settings = dataclasses.replace(load_settings(), source_dir=mirror, **overrides)
    build_store(out, settings, NullProgress())
    return out


@pytest.fixture(scope="module", params=["mini_sample", "mini_quirks_sample"])
def built(request, tmp_path_factory):
    mirror = request.getfixturevalue(request.param)
    out = build(mirror.dir, tmp_path_factory.mktemp("old_loader") / "nat4", wav=True)
    with nat4etl.open(out) as store:
        yield store, mirror.dir, request.param == "mini_quirks_sample"


@dataclasses.dataclass
class Recipe:
    """The README recipe's arrays, indexed as the old loader indexed its lists."""

    stim_meta: list[dict]
    nrn_meta: list[dict]
    spectrograms: np.ndarray  # [s] is its stims[s][0]
    est: np.ndarray  # [s, n] is its est responses[s][n]
    val: np.ndarray  # [s - S_est, n] is its val responses[s][n]
    waveforms: np.ndarray | None


def recipe(store, area: str, *, waveforms: bool = True) -> Recipe:
    """What the README section says to call, and the changes it says to make."""
    stims, cells = store.stims(area), store.cells(area)
    known = stims.filter(pl.col("subset") != "other")  # "other" sounds come last
    s_est = (stims["subset"] == "est").sum()
    val = store.responses(area, subset="val")
    canonical = (cells["match"] == "canonical").to_numpy()
    val[:, canonical] = np.nan  # "set their val responses to NaN to get the old arrays"
    nrn_meta = [
        {
            "cell_id": c["cell_id"],
            "area": area,
            "auditory": bool(c["auditory"]),  # null (no pred_correlation row) was False
            "site": c["site"],
            "animal": c["animal"],
            "electrode": c["electrode"],
            "unit_in_electrode": c["unit"],
        }
        for c in cells.iter_rows(named=True)
    ]
    return Recipe(
        stim_meta=known.select("name", "subset").to_dicts(),
        nrn_meta=nrn_meta,
        spectrograms=store.spectrograms(area, norm="deepstrf")[: known.height],
        est=store.responses(area, subset="est", norm="deepstrf")[:s_est],
        val=val,
        waveforms=store.waveforms(area)[: known.height] if waveforms else None,
    )


def assert_same_as_old(got: Recipe, old: OldArrays) -> None:
    """Every field the old loader returned, pair by pair, as the README promises."""
    assert got.stim_meta == old.stim_meta
    assert got.nrn_meta == old.nrn_meta
    assert got.spectrograms.dtype == got.est.dtype == got.val.dtype == np.float32
    assert len(got.spectrograms) == len(old.stims)
    for s, spec in enumerate(old.stims):
        assert got.spectrograms[s].shape == spec[0].shape
        np.testing.assert_allclose(got.spectrograms[s], spec[0], rtol=0, atol=TOLERANCE)
    n_est = len(got.est)
    assert len(old.responses) == n_est + len(got.val)
    for s in range(len(old.responses)):
        for n in range(len(old.nrn_meta)):
            mine = got.est[s, n] if s < n_est else got.val[s - n_est, n]
            if old.is_sentinel(s, n):
                assert np.isnan(mine).all(), (s, n)
                continue
            want = old.responses[s][n]
            assert mine.shape == want.shape, (s, n)
            if s < n_est:  # normalized: float32 arithmetic here, float64 there
                np.testing.assert_array_equal(np.isnan(mine), np.isnan(want))
                np.testing.assert_allclose(mine, want, rtol=0, atol=TOLERANCE)
            else:  # raw counts: the same numbers
                np.testing.assert_array_equal(mine, want)
    if got.waveforms is not None:
        np.testing.assert_array_equal(got.waveforms, np.stack([w[0] for w in old.waveforms]))


@pytest.mark.parametrize("area", ["A1", "PEG"])
def test_the_readme_recipe_gives_the_old_loaders_arrays(built, area):
    store, mirror, quirks = built
    # On the quirks mirror the old loader failed (a .DS_Store among the site archives, a
    # val sound shown 19 times): lenient goes on as the README says nat4etl does.
    old = old_loader_arrays(mirror, area, lenient=quirks, waveforms=True)
    assert_same_as_old(recipe(store, area), old)
    if quirks and area == "A1":
        with pytest.raises(Exception):  # noqa: B017 - whichever way it failed
            old_loader_arrays(mirror, area)
        # units matched `canonical` have val data here: the adjustment is not vacuous
        canonical = (store.cells(area)["match"] == "canonical").to_numpy()
        assert canonical.any()
        assert not np.isnan(store.responses(area, subset="val")[:, canonical]).all()


# ============================================================================ edited mirrors
def _edit_population_csv(mirror: Path, area: str, signal: str, fn) -> None:
    """Rewrite one population signal's CSV (time x channel) with ``fn(array) -> array``."""
    from tests.stages.test_unpack import _edit_population

    def edit(data: bytes) -> bytes:
        return format_csv_18e(fn(np.loadtxt(io.BytesIO(data), delimiter=",", ndmin=2)))

    _edit_population(mirror, area, f".{signal}.csv", edit)


def _edited_mirror(mini_sample, tmp_path: Path, signal: str, fn) -> Path:
    mirror = tmp_path / "mirror"
    shutil.copytree(mini_sample.dir, mirror)
    (mirror / "record.json").unlink()  # sizes and md5s are then taken from the files
    _edit_population_csv(mirror, "A1", signal, fn)
    return mirror


def _compare(mirror: Path, tmp_path: Path) -> None:
    out = build(mirror, tmp_path / "nat4", areas=("A1",), wav=False)
    with nat4etl.open(out) as store:
        assert_same_as_old(recipe(store, "A1", waveforms=False), old_loader_arrays(mirror, "A1"))


def test_a_partly_missing_est_response_stays_partly_nan(mini_sample, tmp_path):
    """The old loader kept a trace with some NaN bins as it was (the sentinel only for an
    all-NaN one); its other bins normalized with the same global constants."""

    def holes(resp):
        last = resp[-150:]  # the last sound in the file, an est one
        n = int(np.flatnonzero(~np.isnan(last).any(axis=0))[0])  # a unit recorded for it
        last[10:20, n] = np.nan
        return resp

    _compare(_edited_mirror(mini_sample, tmp_path, "resp", holes), tmp_path)


@pytest.mark.parametrize("signal", ["stim", "resp"])
def test_a_flat_signal_is_left_unscaled_as_the_old_loader(mini_sample, tmp_path, signal):
    """The old loader scaled only when max > min: a flat spectrogram stayed log1p(x), flat
    responses their counts (not x - min, which would be all 0)."""

    def flat(values):
        return np.where(np.isnan(values), np.nan, 3.0)

    _compare(_edited_mirror(mini_sample, tmp_path, signal, flat), tmp_path)

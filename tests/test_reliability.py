"""TTRC and CCmax of val trials (nat4etl.reliability), against the definitions written out."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from nat4etl import reliability as rel


def _trials(rng, *, r=6, s=3, t=40, noise=1.0) -> np.ndarray:
    """(S, R, T): one signal per sound, the same in every trial, plus independent noise."""
    signal = rng.normal(size=(s, 1, t))
    return signal + noise * rng.normal(size=(s, r, t))


def test_ttrc_is_the_mean_pearson_r_over_all_pairs_of_whole_trials():
    rng = np.random.default_rng(1)
    val = _trials(rng)
    flat = val.transpose(1, 0, 2).reshape(6, -1)  # trial r: the sounds one after the other
    pairs = [np.corrcoef(flat[i], flat[j])[0, 1] for i, j in itertools.combinations(range(6), 2)]
    got = rel.unit_reliability(val, cell=3, seed=0)
    assert got["n_trials"] == 6
    assert got["ttrc"] == pytest.approx(np.mean(pairs), rel=1e-12)


@pytest.mark.parametrize("r", [6, 7])  # an odd count leaves one trial out of each split
def test_rho_half_is_the_mean_r_between_half_psths_over_the_seeded_splits(r):
    rng = np.random.default_rng(2)
    val = _trials(rng, r=r)
    flat = val.transpose(1, 0, 2).reshape(r, -1)
    order = np.random.default_rng([5, 11]).permuted(np.tile(np.arange(r), (20, 1)), axis=1)
    half = r // 2
    want = np.mean(
        [
            np.corrcoef(flat[o[:half]].mean(axis=0), flat[o[half : 2 * half]].mean(axis=0))[0, 1]
            for o in order
        ]
    )
    got = rel.unit_reliability(val, cell=11, seed=5, n_splits=20)
    assert got["rho_half"] == pytest.approx(want, rel=1e-10)
    assert got["ccmax"] == pytest.approx(np.sqrt(2 / (1 + 1 / want)), rel=1e-10)
    # the splits are random, not the old reference's lexicographic ones: another seed differs
    assert rel.unit_reliability(val, cell=11, seed=6, n_splits=20)["rho_half"] != got["rho_half"]
    assert rel.unit_reliability(val, cell=11, seed=5, n_splits=20) == got  # and repeats


def test_identical_trials_are_perfectly_reliable_and_noise_is_not():
    rng = np.random.default_rng(3)
    same = _trials(rng, noise=0.0)
    got = rel.unit_reliability(same, cell=0, seed=0)
    assert got["ttrc"] == pytest.approx(1.0) and got["ccmax"] == pytest.approx(1.0)
    noise = rng.normal(size=(18, 20, 150))
    got = rel.unit_reliability(noise, cell=0, seed=0)
    assert abs(got["ttrc"]) < 0.02 and abs(got["rho_half"]) < 0.1


def test_only_trials_present_for_every_sound_count():
    rng = np.random.default_rng(4)
    val = _trials(rng, r=5)
    val[1, 4] = np.nan  # sound 1 was played once fewer: trial 4 is not whole
    assert rel.whole_trials(val).shape == (4, 3 * 40)
    np.testing.assert_array_equal(rel.whole_trials(val)[2], val[:, 2].reshape(-1))
    assert rel.unit_reliability(val, cell=0, seed=0)["n_trials"] == 4
    # a presentation a sample short: its last bin is NaN; the bin goes, not the trials
    short = _trials(rng, r=5)
    short[2, 1, -1] = np.nan
    kept = rel.whole_trials(short)
    assert kept.shape == (5, 3 * 40 - 1) and not np.isnan(kept).any()
    assert rel.unit_reliability(short, cell=0, seed=0)["n_trials"] == 5


def test_fewer_than_two_trials_or_no_positive_rho_give_nan():
    nan_unit = np.full((3, 5, 40), np.nan)  # a unit without site data
    got = rel.unit_reliability(nan_unit, cell=0, seed=0)
    assert got["n_trials"] == 0 and np.isnan([got["ttrc"], got["rho_half"], got["ccmax"]]).all()
    one = _trials(np.random.default_rng(5), r=1)
    assert np.isnan(rel.unit_reliability(one, cell=0, seed=0)["ttrc"])
    assert np.isnan(rel.ccmax(0.0)) and np.isnan(rel.ccmax(-0.2)) and np.isnan(rel.ccmax(np.nan))
    assert rel.ccmax(0.5) == pytest.approx(np.sqrt(2 / 3))
    flat = np.ones((3, 4, 40))  # a unit that never changes: r undefined everywhere
    assert np.isnan(rel.unit_reliability(flat, cell=0, seed=0)["ttrc"])


def test_the_reader_gives_one_row_per_unit_from_the_stores_val_trials(tmp_path, mini_sample):
    from click.testing import CliRunner

    import nat4etl
    from nat4etl.cli import cli

    out = tmp_path / "store"
    args = ["build", "--area", "A1", "--no-wav", "--source", str(mini_sample.dir), "--out", out]
    built = CliRunner().invoke(cli, [str(a) for a in args])
    assert built.exit_code == 0, built.output
    a1 = mini_sample.info.areas["A1"]
    whole = {}  # cell_id -> trials it has for every val sound, from the sample's truth
    for site in a1.sites:
        for pop_id in site.pop_cell_ids:
            if pop_id is not None:
                whole[pop_id] = min(site.val_reps.get(s, 0) for s in a1.val_stims)
    with nat4etl.open(out) as store:
        table = store.reliability("A1")
        assert table["cell_id"].to_list() == list(a1.cell_ids)
        assert table["n_trials"].to_list() == [whole.get(c, 0) for c in a1.cell_ids]
        for unit in a1.units_without_site_data:
            row = table.filter(table["cell_id"] == unit)
            assert row["n_trials"].item() == 0 and np.isnan(row["ttrc"].item())
        # a unit's figures are its own: the same when asked for alone, in another order
        some = store.reliability("A1", cells=[3, 0], seed=0)
        assert some["cell"].to_list() == [3, 0]
        assert some.row(0) == table.row(3) and some.row(1) == table.row(0)
        # and they are the module's, from the reader's val responses
        val = store.responses("A1", subset="val", cells=[3])[:, 0]
        want = rel.unit_reliability(val, cell=3, seed=0)
        assert some.row(0, named=True)["ttrc"] == want["ttrc"]
        with pytest.raises(ValueError, match="n_splits"):
            store.reliability("A1", n_splits=0)
        none = store.reliability("A1", cells=[])  # the same columns and types, no rows
        assert none.height == 0 and none.schema == table.schema

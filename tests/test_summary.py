"""The end-of-build summary counts what the tables hold (checked against the sample's truth)."""

from __future__ import annotations

import dataclasses

from click.testing import CliRunner

from nat4etl import summary
from nat4etl.cli import cli


def test_summary_counts_come_from_the_store(mini_quirks_sample, tmp_path):
    out = tmp_path / "nat4"
    result = CliRunner().invoke(
        cli, ["build", "--source", str(mini_quirks_sample.dir), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    info = mini_quirks_sample.info
    by_area = {s.area: s for s in summary.summarize(out)}
    a1 = by_area["A1"]
    truth = info.areas["A1"]
    assert a1.n_cells == len(truth.cell_ids)
    assert a1.n_stims_val == len(truth.val_stims) and a1.n_stims_est == len(truth.est_stims)
    tnc = [c for c in truth.cell_ids if c.startswith("TNC")]
    assert a1.match_counts["canonical"] == len(tnc)
    assert a1.match_counts.get("none", 0) == len(truth.units_without_site_data)
    assert a1.cells_without_val == len(truth.units_without_site_data)
    assert a1.missing_pairs["val"] == len(truth.units_without_site_data) * len(truth.val_stims)
    assert a1.missing_pairs["est"] == len(truth.nan_pairs)
    assert by_area["PEG"].n_sites == len(info.areas["PEG"].sites)
    # and the command printed them
    assert f"A1: {a1.n_cells} units" in result.output
    assert f"{a1.missing_pairs['val']} val" in result.output


def test_missing_pairs_of_unclassified_sounds_are_printed():
    """A STIM_ sound that is neither est nor val (none in the sample) still has its missing
    pairs in the printed line, not only in as_dicts."""
    s = summary.AreaSummary(
        area="A1",
        n_cells=3,
        n_auditory=2,
        n_stims_est=2,
        n_stims_val=1,
        n_stims_other=1,
        n_sites=1,
        match_counts={"exact": 3},
        missing_pairs={"est": 0, "val": 3, "other": 2},
        cells_without_val=1,
        n_report_rows=4,
    )
    lines = summary.render("out", [s])
    assert "A1: missing (sound, unit) pairs: 0 est, 3 val, 2 other; units with no val" in lines[1]
    plain = summary.render("out", [dataclasses.replace(s, n_stims_other=0)])
    assert "3 val; units with no val trial" in plain[1]

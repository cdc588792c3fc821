"""The end-of-build summary counts what the tables hold (checked against the sample's truth)."""

from __future__ import annotations

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

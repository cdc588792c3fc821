"""`build --zenodo-url` against the fake Zenodo gives the same tables as `build --source`."""

from __future__ import annotations

import polars as pl
from click.testing import CliRunner
from fake_zenodo import ZENODO_NAMES, FakeZenodo, Fault

from nat4etl.cli import cli
from nat4etl.store import Store


def _tables(out):
    """Every table's content (provenance metadata aside: it names where the files came from)."""
    store = Store(out)
    return {
        f"{name}/{area}": store.read_table(name, area=area) for name, area, _ in store.table_files()
    }


def test_network_build_equals_source_build(mini_sample, tmp_path):
    runner = CliRunner()
    local = tmp_path / "local"
    result = runner.invoke(cli, ["build", "--source", str(mini_sample.dir), "--out", str(local)])
    assert result.exit_code == 0, result.output

    net = tmp_path / "net"
    with FakeZenodo.from_dir(mini_sample.dir, ZENODO_NAMES) as srv:
        srv.inject("A1_NAT4_ozgf.fs100.ch18.tgz", Fault("drop"))  # and it still converges
        result = runner.invoke(
            cli,
            ["build", "--zenodo-url", srv.url, "--out", str(net), "--cache", str(tmp_path / "c")],
        )
        assert result.exit_code == 0, result.output
        assert len(srv.content_gets()) >= len(ZENODO_NAMES)
        srv.requests.clear()
        again = runner.invoke(cli, ["build", "--zenodo-url", srv.url, "--out", str(net)])
        assert again.exit_code == 0, again.output
        assert srv.content_gets() == []  # nothing changed: no download

    local_tables, net_tables = _tables(local), _tables(net)
    assert local_tables.keys() == net_tables.keys() and len(local_tables) > 10
    for key, table in local_tables.items():  # polars equals: NaN equals NaN (not recorded)
        assert pl.from_arrow(table).equals(pl.from_arrow(net_tables[key])), key

"""handoff: a kept value is given once, and only while its file is the one written."""

from __future__ import annotations

import os

from nat4etl import nat4
from nat4etl.stages import handoff
from nat4etl.store import Store


def _write(store: Store, text: str, table: str = "pop_signals") -> None:
    path = store.table_file(table, "A1")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # as the store does: a new file, never an edit in place


def test_taken_once(tmp_path):
    store = Store(tmp_path)
    _write(store, "x")
    handoff.keep(store, "pop_signals", "A1", {"resp": 1})
    assert handoff.take(store, "pop_signals", "A1") == {"resp": 1}
    assert handoff.take(store, "pop_signals", "A1") is None


def test_not_given_after_the_file_was_replaced(tmp_path):
    store = Store(tmp_path)
    _write(store, "x")
    handoff.keep(store, "pop_signals", "A1", {"resp": 1})
    _write(store, "y")
    assert handoff.take(store, "pop_signals", "A1") is None


def test_other_stores_see_nothing(tmp_path):
    store = Store(tmp_path)
    _write(store, "x")
    handoff.keep(store, "pop_signals", "A1", {"resp": 1})
    assert handoff.take(Store(tmp_path), "pop_signals", "A1") is None
    assert not handoff.has(store, "pop_signals", "PEG")


def test_unpack_keeps_the_population_only_for_a_later_rebin_sites(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from nat4etl.stages import unpack

    monkeypatch.setattr(unpack, "source_dir", lambda store, settings: tmp_path)
    kept = {"pop_signals": {"resp": 1}, "site_spikes": "spikes"}
    monkeypatch.setattr(
        unpack,
        "unpack_area",
        lambda writer, src, area, p, *, hand_off: ({}, kept if hand_off else {}),
    )
    settings = SimpleNamespace(areas=["A1"], source_dir=None)
    for name in nat4.area_files("A1").names:  # unpack checks they are there first
        (tmp_path / name).touch()
    alone = Store(tmp_path)
    _write(alone, "x")
    unpack.run(alone, settings, None)
    assert not handoff.has(alone, "pop_signals", "A1")  # `nat4etl unpack`: nothing held
    _write(alone, "x", "site_spikes")
    build = Store(tmp_path)
    build.stages_planned = frozenset({"unpack", "rebin-sites"})
    unpack.run(build, settings, None)
    assert handoff.take(build, "pop_signals", "A1") == {"resp": 1}
    assert handoff.take(build, "site_spikes", "A1") == "spikes"


def test_build_with_handoffs_writes_what_stages_run_alone_write(
    tmp_path, mini_quirks_sample, monkeypatch
):
    """In a build rebin-sites takes unpack's population arrays and site spikes from memory;
    run alone it reads them from the files. The tables must not tell the difference."""
    import shutil

    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from nat4etl.cli import cli

    def run(*args: str) -> None:
        result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output

    from nat4etl.stages import rebin_sites

    reads = []
    read_in_batches = rebin_sites.read_in_batches
    monkeypatch.setattr(
        rebin_sites,
        "read_in_batches",
        lambda store, name, area, **kw: (
            reads.append(name) or read_in_batches(store, name, area, **kw)
        ),
    )
    built = tmp_path / "built"
    run("build", "--out", str(built), "--source", str(mini_quirks_sample.dir), "--quiet")
    assert "site_spikes" not in reads  # taken from unpack
    alone = tmp_path / "alone"
    shutil.copytree(built, alone)
    run("rebin-sites", "--out", str(alone), "--force", "--quiet")
    assert "site_spikes" in reads  # alone: read from the file
    for name in ("responses", "val_means", "qc_val", "spectrograms"):
        for area in Store(built).areas(name):
            a, b = (pq.read_table(Store(root).table_file(name, area)) for root in (built, alone))
            assert a.num_rows > 0 or name == "qc_val"
            assert a.equals(b), (name, area)

"""handoff: a kept value is given once, and only while its file is the one written."""

from __future__ import annotations

import os

from nat4etl.stages import handoff
from nat4etl.store import Store


def _write(store: Store, text: str) -> None:
    path = store.table_file("pop_signals", "A1")
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
    monkeypatch.setattr(unpack, "unpack_area", lambda writer, src, area, p: ({}, {"resp": 1}))
    settings = SimpleNamespace(areas=["A1"])
    alone = Store(tmp_path)
    _write(alone, "x")
    unpack.run(alone, settings, None)
    assert not handoff.has(alone, "pop_signals", "A1")  # `nat4etl unpack`: nothing held
    build = Store(tmp_path)
    build.stages_planned = frozenset({"unpack", "rebin-sites"})
    unpack.run(build, settings, None)
    assert handoff.take(build, "pop_signals", "A1") == {"resp": 1}

"""WriteBehind: writes finish (or fail loudly) before the stage returns."""

from __future__ import annotations

import threading

import pytest

from nat4etl.stages.background import WriteBehind


class _FakeStore:
    def __init__(self, fail: str | None = None):
        self.fail = fail
        self.written: list[str] = []
        self.threads: set[str] = set()

    def write_table(self, name, table, *, area):
        self.threads.add(threading.current_thread().name)
        if name == self.fail:
            raise ValueError(f"cannot write {name}")
        self.written.append(f"{name}/{area}")
        return len(table)


def test_writes_run_in_order_on_one_other_thread():
    store = _FakeStore()
    with WriteBehind(store, max_pending=1) as writer:
        futures = [writer.submit(n, [1, 2, 3], area="A1") for n in ("a", "b", "c")]
    assert store.written == ["a/A1", "b/A1", "c/A1"]
    assert [f.result() for f in futures] == [3, 3, 3]
    assert store.threads and threading.current_thread().name not in store.threads


def test_a_failed_write_is_raised_when_the_block_ends():
    store = _FakeStore(fail="b")
    with pytest.raises(ValueError, match="cannot write b"):
        with WriteBehind(store) as writer:
            writer.submit("a", [], area="A1")
            writer.submit("b", [], area="A1")
    assert store.written == ["a/A1"]


def test_an_error_in_the_block_wins_and_later_writes_are_dropped():
    store = _FakeStore()
    gate = threading.Event()
    store.write_table = lambda name, table, *, area: gate.wait(5) and name
    with pytest.raises(KeyError):
        with WriteBehind(store, max_pending=3) as writer:
            writer.submit("a", [], area="A1")
            writer.submit("b", [], area="A1")
            gate.set()
            raise KeyError("decode failed")

"""Store layout, atomic table writes and atomic publish."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from nat4etl.errors import DuplicateKeyError, MissingTableError, SchemaError, StoreLocked
from nat4etl.store import Store, open_for_write, store_lock


def _trials(n=3, dup=False):
    stims = list(range(n)) if not dup else [0] * n
    return pa.table(
        {
            "site": pa.array(["ARM029a"] * n),
            "stim": pa.array(stims[::-1], pa.int32()),
            "trial": pa.array([0] * n, pa.int32()),
            "order": pa.array(range(n), pa.int32()),
            "start_s": pa.array([1.0 * i for i in range(n)]),
            "end_s": pa.array([1.0 * i + 1.5 for i in range(n)]),
        }
    )


def test_write_sorts_by_key_and_partitions_by_area(tmp_path):
    store = Store(tmp_path)
    info = store.write_table("trials", _trials(), area="A1")
    assert info.rows == 3
    assert store.table_file("trials", "A1").is_file()
    t = store.read_table("trials")
    assert t.column_names[0] == "area"
    assert t["stim"].to_pylist() == [0, 1, 2]
    df = pl.scan_parquet(str(tmp_path / "trials" / "**" / "*.parquet"), hive_partitioning=True)
    assert df.filter(pl.col("area") == "A1").collect()["stim"].to_list() == [0, 1, 2]


def test_duplicate_key_and_bad_schema_write_nothing(tmp_path):
    store = Store(tmp_path)
    with pytest.raises(DuplicateKeyError, match="trials"):
        store.write_table("trials", _trials(dup=True), area="A1")
    with pytest.raises(SchemaError, match="stim"):
        store.write_table("trials", _trials().drop_columns(["stim"]), area="A1")
    assert not store.has("trials")
    with pytest.raises(MissingTableError, match="trials"):
        store.read_table("trials", area="A1")


def test_identical_input_gives_identical_bytes(tmp_path):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    assert (
        a.write_table("trials", _trials(), area="A1").digest
        == b.write_table("trials", _trials(), area="A1").digest
    )


def test_open_for_write_publishes_and_failure_keeps_previous(tmp_path):
    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["rows"] for t in manifest["tables"]] == [2]

    with pytest.raises(RuntimeError):
        with open_for_write(out) as store:
            store.write_table("trials", _trials(3), area="A1")
            raise RuntimeError("stage failed")
    assert Store(out).read_table("trials").num_rows == 2
    assert [p.name for p in tmp_path.iterdir() if "staging" in p.name] == []

    with open_for_write(out) as store:
        assert store.read_table("trials").num_rows == 2  # staging starts as the old store
        store.write_table("trials", _trials(4), area="A1")
    assert Store(out).read_table("trials").num_rows == 4


def _lock_holder(out, then: str) -> subprocess.Popen:
    """Another process that takes the lock, prints "ready", then runs ``then`` (a Python
    statement). A subprocess, not a fork: forking a process that loaded JAX can deadlock."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from nat4etl.store import store_lock\n"
        f"with store_lock(Path({str(out)!r})):\n"
        "    print('ready', flush=True)\n"
        f"    {then}\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_lock_held_by_another_process(tmp_path):
    out = tmp_path / "nat4"
    holder = _lock_holder(out, "sys.stdin.readline()")  # holds until we write a line
    try:
        with pytest.raises(StoreLocked, match=f"pid {holder.pid}"):
            with open_for_write(out, wait_s=0.3):
                pass
    finally:
        holder.communicate("go\n", timeout=10)
    with open_for_write(out, wait_s=1):  # released on exit, taken over
        pass


def test_lock_timeout_hint_fits_whether_wait_was_given(tmp_path):
    """After --wait expired, the hint must not tell the user to pass --wait again."""
    out = tmp_path / "nat4"
    holder = _lock_holder(out, "sys.stdin.readline()")
    try:
        with pytest.raises(StoreLocked) as waited:
            with open_for_write(out, wait_s=0.3):
                pass
        with pytest.raises(StoreLocked) as at_once:
            with open_for_write(out):
                pass
    finally:
        holder.communicate("go\n", timeout=10)
    msg = str(waited.value)
    assert "waited 0.3 s" in msg and "a longer --wait" in msg, msg
    assert "pass --wait SECONDS" not in msg
    assert "pass --wait SECONDS" in str(at_once.value)
    assert "waited" not in str(at_once.value)


def test_killed_holder_releases_the_lock(tmp_path):
    out = tmp_path / "nat4"
    (tmp_path / ".nat4.staging-dead").mkdir()  # what a killed build leaves
    holder = _lock_holder(out, "os.kill(os.getpid(), signal.SIGKILL)")
    assert holder.wait(10) == -signal.SIGKILL
    with open_for_write(out):  # no waiting: the kernel dropped the dead holder's lock
        pass
    assert not (tmp_path / ".nat4.staging-dead").exists()


def test_snapshot_reads_the_generation_it_opened(tmp_path):
    from nat4etl.store import open_snapshot

    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    snap = open_snapshot(out)
    with open_for_write(out) as store:
        store.write_table("trials", _trials(5), area="A1")
    assert snap.read_table("trials").num_rows == 2  # still the old generation
    assert open_snapshot(out).read_table("trials").num_rows == 5
    snap.close()


def test_a_snapshot_outlives_any_number_of_publishes_until_closed(tmp_path):
    """An open reader keeps its generation through two (or more) rebuilds, not just one;
    the first publish after it is closed removes it."""
    from nat4etl.store import open_snapshot

    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    snap = open_snapshot(out)
    for n in (3, 4, 5):
        with open_for_write(out) as store:
            store.write_table("trials", _trials(n), area="A1")
        assert snap.read_table("trials").num_rows == 2  # still the generation it opened
    assert len([p for p in tmp_path.iterdir() if ".previous-" in p.name]) == 1  # its own
    snap.close()
    with open_for_write(out) as store:
        store.write_table("trials", _trials(6), area="A1")
    # the closed reader's generation and the one just replaced (nobody pins it) are gone:
    # no hidden copy of the store is left on disk
    assert [p.name for p in tmp_path.iterdir() if ".previous-" in p.name] == []


def test_a_snapshot_opened_as_a_publish_replaces_the_store_pins_the_new_one(tmp_path, monkeypatch):
    """Opened between a publish's rename and its removal of the old generation, a
    snapshot must not end up on a deleted directory: it sees the swap and pins again."""
    import nat4etl.store as store_mod
    from nat4etl.store import open_snapshot

    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    real_flock = store_mod.fcntl.flock
    swapped = []

    def flock_after_a_publish(fd, op):
        if op == store_mod.fcntl.LOCK_SH and not swapped:
            swapped.append(True)  # the reader's first open is now of the old generation
            with open_for_write(out) as store:
                store.write_table("trials", _trials(3), area="A1")
        return real_flock(fd, op)

    monkeypatch.setattr(store_mod.fcntl, "flock", flock_after_a_publish)
    snap = open_snapshot(out)
    monkeypatch.setattr(store_mod.fcntl, "flock", real_flock)
    assert snap.read_table("trials").num_rows == 3
    snap.close()


def test_a_generation_left_under_the_staging_name_by_a_kill_stays_while_pinned(tmp_path):
    """Killed at "exchanged", a build leaves the replaced generation at .OUT.staging-*;
    the next writer's cleanup must not pull it from under a reader that pins it."""
    from nat4etl.store import open_snapshot

    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    snap = open_snapshot(out)
    staged = tmp_path / ".nat4.staging-1-1"
    os.rename(out, staged)  # what the exchange leaves, the new generation aside
    with open_for_write(out) as store:
        store.write_table("trials", _trials(3), area="A1")
    assert snap.read_table("trials").num_rows == 2
    snap.close()
    with open_for_write(out) as store:
        pass
    assert not staged.exists()


def test_ctrl_c_after_the_swap_counts_as_published_and_spares_a_pinned_old_generation(
    tmp_path, monkeypatch
):
    """Interrupted between the exchange and what follows it, the new store is in place (so
    a Ctrl-C message must say it was published) and the old one, under the staging name
    for a moment, is still a reader's: the cleanup must not delete it from under it."""
    import nat4etl.store as store_mod
    from nat4etl.store import open_snapshot

    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    reader = open_snapshot(out)

    def interrupted(name):
        if name == "exchanged":
            raise KeyboardInterrupt

    monkeypatch.setattr(store_mod, "kill_point", interrupted)
    monkeypatch.setattr(store_mod, "PUBLISHED", [])
    with pytest.raises(KeyboardInterrupt):
        with open_for_write(out) as store:
            store.write_table("trials", _trials(3), area="A1")
    assert store_mod.PUBLISHED == [out]
    assert Store(out).read_table("trials").num_rows == 3
    assert reader.read_table("trials").num_rows == 2  # its generation was not removed
    reader.close()


def test_a_flock_error_other_than_unsupported_keeps_the_generation(tmp_path, monkeypatch):
    """NFS refuses an exclusive flock on a directory (EBADF) while shared ones work: a
    reader's generation must not be taken for unpinned and deleted."""
    import errno

    import nat4etl.store as store_mod
    from nat4etl.store import remove_unpinned

    generation = tmp_path / ".nat4.previous-1"
    generation.mkdir()
    real_flock = store_mod.fcntl.flock

    def refuses(fd, op):
        if op & store_mod.fcntl.LOCK_EX:
            raise OSError(errno.EBADF, "Bad file descriptor")
        return real_flock(fd, op)

    monkeypatch.setattr(store_mod.fcntl, "flock", refuses)
    assert remove_unpinned(generation) is False and generation.is_dir()

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(store_mod.fcntl, "flock", unsupported)
    assert remove_unpinned(generation, unknown=False) is False and generation.is_dir()
    assert remove_unpinned(generation) is True and not generation.exists()


def test_open_snapshot_of_a_missing_store_says_so(tmp_path):
    from nat4etl.store import open_snapshot

    with pytest.raises(MissingTableError, match="no nat4etl store"):
        open_snapshot(tmp_path / "nothing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(MissingTableError, match="no nat4etl store"):
        open_snapshot(tmp_path / "file")


def test_publish_without_renameat2_and_recovery_between_its_renames(tmp_path, monkeypatch):
    import nat4etl.store as store_mod
    from nat4etl.store import open_snapshot, recover, swap_marker

    monkeypatch.setattr(store_mod, "exchange_dirs", lambda a, b: False)
    out = tmp_path / "nat4"
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
    reader = open_snapshot(out)  # pins generation 2, so the publish keeps it as .previous
    with open_for_write(out) as store:
        store.write_table("trials", _trials(3), area="A1")
    reader.close()
    assert Store(out).read_table("trials").num_rows == 3
    # a fallback publish killed between its two renames: no OUT, the marker names the old one
    previous = next(p for p in tmp_path.iterdir() if ".previous-" in p.name)
    out.rename(tmp_path / ".nat4.staging-dead")
    previous.rename(tmp_path / ".nat4.previous-1")
    swap_marker(out).write_text(".nat4.previous-1")
    notes = recover(out)
    assert "restored nat4 from .nat4.previous-1" in notes
    assert Store(out).read_table("trials").num_rows == 2
    assert not swap_marker(out).exists() and not (tmp_path / ".nat4.staging-dead").exists()


def test_lock_holder_reads_proc_locks_without_locking(tmp_path):
    from nat4etl.store import lock_holder

    out = tmp_path / "nat4"
    assert lock_holder(out) is None
    with store_lock(out):
        assert f"pid {os.getpid()}" in lock_holder(out)
    assert lock_holder(out) is None


def test_refuses_to_publish_over_a_directory_that_is_not_a_store(tmp_path):
    from nat4etl.errors import StoreError

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep")
    with pytest.raises(StoreError, match="refusing to replace"):
        with open_for_write(tmp_path / "docs"):
            pass
    assert (tmp_path / "docs" / "notes.txt").read_text() == "keep"
    with open_for_write(tmp_path / "empty"):  # new or empty directories are fine
        pass


def test_sort_and_duplicate_check_match_a_plain_sort_and_group_by():
    import numpy as np

    from nat4etl import schema
    from nat4etl.store import _sorted_unique

    rng = np.random.default_rng(0)
    seen = set()
    for n in [10, 50] * 10:
        t = pa.table(
            {
                "site": pa.array(rng.choice(["a", "b"], n)),
                "stim": pa.array(rng.integers(0, 6, n), pa.int32()),
                "trial": pa.array(rng.integers(0, 6, n), pa.int32()),
                "order": pa.array(range(n), pa.int32()),
                "start_s": pa.array(rng.random(n)),
                "end_s": pa.array(rng.random(n)),
            }
        )
        keys = ["site", "stim", "trial"]
        groups = t.select(keys).group_by(keys).aggregate([([], "count_all")])
        if groups.num_rows < n:
            with pytest.raises(DuplicateKeyError):
                _sorted_unique(t, schema.spec("trials"), "trials", "A1")
            seen.add("dup")
        else:
            got = _sorted_unique(t, schema.spec("trials"), "trials", "A1")
            assert got.equals(t.sort_by([(k, "ascending") for k in keys]))
            seen.add("unique")
    assert seen == {"dup", "unique"}


def test_a_symlinked_store_is_published_where_it_points(tmp_path):
    real = tmp_path / "disk" / "nat4"
    real.parent.mkdir()
    link = tmp_path / "nat4"
    with open_for_write(real) as store:
        store.write_table("trials", _trials(2), area="A1")
    link.symlink_to(real)
    with open_for_write(link) as store:
        store.write_table("trials", _trials(4), area="A1")
    assert link.is_symlink() and Store(link).read_table("trials").num_rows == 4


def test_staged_files_are_fsynced_before_publish_not_one_by_one(tmp_path, monkeypatch):
    """In a staging copy a write only starts its file's writeback; every file written is
    fsynced (under its final name) after the manifest and before the publish."""
    from pathlib import Path

    import numpy as np

    import nat4etl.store as store_mod
    from nat4etl.stages.rebin_sites import vectors_table

    events: list[tuple[str, str]] = []
    fsync = store_mod._fsync
    monkeypatch.setattr(
        store_mod, "_fsync", lambda p: events.append(("fsync", Path(p).name)) or fsync(p)
    )
    monkeypatch.setattr(
        store_mod, "start_writeback", lambda p: events.append(("start", Path(p).name))
    )
    publish = store_mod.publish
    monkeypatch.setattr(
        store_mod, "publish", lambda a, b: events.append(("publish", "")) or publish(a, b)
    )

    out = tmp_path / "nat4"
    spectra = vectors_table(
        {"stim": np.arange(3, dtype=np.int32)}, "values", np.ones((3, 4), np.float32)
    )
    with open_for_write(out) as store:
        store.write_table("trials", _trials(2), area="A1")
        store.write_table("spectrograms", spectra, area="A1")
        assert not [e for e in events if e[0] == "fsync"]  # nothing waited for the disk yet
    names = ("part-0.parquet", "part-0.arrow", "manifest.json")
    started = {name for kind, name in events if kind == "start"}
    assert all(any(s.startswith(f".{n}.tmp-") for s in started) for n in names)
    before_publish = events[: events.index(("publish", ""))]
    synced = [name for kind, name in before_publish if kind == "fsync"]
    assert synced.count("part-0.parquet") == 2 and synced.count("part-0.arrow") == 1
    assert "manifest.json" in synced
    assert Store(out).read_table("spectrograms").num_rows == 3

    events.clear()  # a Store outside staging fsyncs each file as it is written
    Store(tmp_path / "plain").write_table("trials", _trials(2), area="A1")
    assert [kind for kind, _ in events] == ["fsync"]


def _responses(n=200):
    from nat4etl.stages.rebin_sites import SOURCE_SITE, responses_table

    rng = np.random.default_rng(0)
    counts = rng.poisson(0.3, (n, 150)).astype(np.float32)
    counts[3, 5:] = np.nan
    ids = np.arange(n, dtype=np.int32)
    return responses_table(ids % 7, ids // 7, np.zeros(n, np.int32), SOURCE_SITE, counts)


def test_fixed_size_vector_tables_are_encoded_by_polars_and_read_back_as_written(tmp_path):
    import pyarrow.parquet as pq

    store = Store(tmp_path)
    table = _responses()
    store.write_table("responses", table, area="A1", metadata={"dt_ms": 10.0})
    path = store.table_file("responses", "A1")
    assert pq.read_metadata(path).created_by.startswith("Polars")
    back = store.read_table("responses", area="A1").drop_columns(["area"])
    assert back.schema.field("source").type == pa.string()  # not polars' large_string
    assert back.column("counts").type == table.column("counts").type
    sort = [("stim", "ascending"), ("cell", "ascending"), ("trial", "ascending")]
    want = table.sort_by(sort)
    for name in ("stim", "cell", "trial", "source"):
        assert back[name].equals(want[name])
    np.testing.assert_array_equal(
        np.stack(back["counts"].to_numpy(zero_copy_only=False)),
        np.stack(want["counts"].to_numpy(zero_copy_only=False)),
    )
    assert store.table_metadata("responses", "A1")["dt_ms"] == 10.0
    pl_schema = pl.read_parquet(path).schema
    assert pl_schema["counts"] == pl.Array(pl.Float32, 150) and pl_schema["source"] == pl.String
    again = Store(tmp_path / "again").write_table(
        "responses", table, area="A1", metadata={"dt_ms": 10.0}
    )
    assert again.digest == store.written[str(path.relative_to(tmp_path))]  # deterministic


def test_wide_vector_rows_are_split_into_row_groups_of_bounded_bytes(tmp_path, monkeypatch):
    """A table of few wide rows gets several row groups (polars encodes them on both
    cores), none over ROW_GROUP_BYTES of vectors; narrow rows keep ROW_GROUP_ROWS."""
    import pyarrow.parquet as pq

    from nat4etl import store as store_module

    row_bytes = 150 * 4  # _responses(): 150 float32 counts per row
    monkeypatch.setattr(store_module, "ROW_GROUP_BYTES", 16 * row_bytes)
    store = Store(tmp_path)
    table = _responses(200)
    store.write_table("responses", table, area="A1")
    meta = pq.read_metadata(store.table_file("responses", "A1"))
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [16] * 12 + [8]
    back = store.read_table("responses", area="A1").drop_columns(["area"])
    want = table.sort_by([("stim", "ascending"), ("cell", "ascending"), ("trial", "ascending")])
    np.testing.assert_array_equal(
        np.stack(back["counts"].to_numpy(zero_copy_only=False)),
        np.stack(want["counts"].to_numpy(zero_copy_only=False)),
    )
    assert store_module.row_group_rows(table.schema) == 16
    narrow = pa.schema([("stim", pa.int32()), ("v", pa.list_(pa.float32(), 2))])
    monkeypatch.undo()
    assert store_module.row_group_rows(narrow) == store_module.ROW_GROUP_ROWS
    assert store_module.row_group_rows(pa.schema([("stim", pa.int32())])) == 65_536


def test_a_polars_file_whose_footer_differs_is_written_again_by_pyarrow(tmp_path, monkeypatch):
    """Should a polars version write its own ARROW:schema (strings as large_string), the
    footer check catches it and pyarrow writes the file."""
    import pyarrow.parquet as pq

    from nat4etl import store as store_module

    def polars_alone(table, path):
        pl.from_arrow(table).write_parquet(path)

    monkeypatch.setattr(store_module, "_write_parquet_polars", polars_alone)
    store = Store(tmp_path)
    store.write_table("responses", _responses(), area="A1")
    path = store.table_file("responses", "A1")
    assert pq.read_metadata(path).created_by.startswith("parquet-cpp-arrow")
    assert store.read_table("responses", area="A1").schema.field("source").type == pa.string()


def test_only_nullable_fixed_size_vector_tables_go_to_polars():
    from nat4etl.store import _polars_encodes

    vec = pa.list_(pa.float32(), 4)
    assert _polars_encodes(pa.schema([("stim", pa.int32()), ("v", vec)]))
    assert not _polars_encodes(pa.schema([("stim", pa.int32())]))  # nothing to gain
    assert not _polars_encodes(pa.schema([("v", pa.list_(pa.float32()))]))  # 64-bit copies
    assert not _polars_encodes(pa.schema([pa.field("v", vec, nullable=False)]))  # optional


def test_a_polars_without_parquet_metadata_leaves_the_file_to_pyarrow(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from nat4etl import store as store_module

    def old_polars(table, path):
        raise TypeError("DataFrame.write_parquet() got an unexpected keyword 'metadata'")

    monkeypatch.setattr(store_module, "_write_parquet_polars", old_polars)
    store = Store(tmp_path)
    store.write_table("responses", _responses(), area="A1")
    path = store.table_file("responses", "A1")
    assert pq.read_metadata(path).created_by.startswith("parquet-cpp-arrow")
    assert store.read_table("responses", area="A1").num_rows == 200


def test_columns_whose_spec_names_a_codec_get_it_and_every_other_column_zstd(tmp_path):
    """pyarrow takes per-column codecs by leaf path; a list column named by its table
    name alone would silently be written uncompressed."""
    import pyarrow.parquet as pq

    from nat4etl import schema

    assert schema.SITE_SPIKES.codecs == {"spike_times_s": "none"}
    store = Store(tmp_path)
    spikes = pa.table(
        {
            "site": ["ARM029a", "ARM029a"],
            "recording": ["r", "r"],
            "signal": ["resp", "resp"],
            "unit_id": ["u1", "u2"],
            "spike_times_s": pa.array([[0.5, 1.25], [2.0]], pa.list_(pa.float64())),
        }
    )
    store.write_table("site_spikes", spikes, area="A1")
    meta = pq.read_metadata(store.table_file("site_spikes", "A1")).row_group(0)
    codecs = {meta.column(i).path_in_schema: meta.column(i).compression for i in range(5)}
    assert codecs == {
        "site": "ZSTD",
        "recording": "ZSTD",
        "signal": "ZSTD",
        "unit_id": "ZSTD",
        "spike_times_s.list.element": "UNCOMPRESSED",
    }
    assert store.read_table("site_spikes", area="A1")["spike_times_s"].to_pylist() == [
        [0.5, 1.25],
        [2.0],
    ]


def test_parquet_codecs_name_list_values_by_their_leaf_path():
    from nat4etl.store import parquet_codecs

    s = pa.schema([("signal", pa.string()), ("values", pa.list_(pa.float32()))])
    assert parquet_codecs(s, {"values": "lz4"}) == {
        "signal": "zstd",
        "values.list.element": "lz4",
    }
    assert parquet_codecs(s, {}) == {"signal": "zstd", "values.list.element": "zstd"}

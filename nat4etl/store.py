"""The one place that knows the store's layout, writes tables atomically and publishes builds.

Layout of an output directory ``OUT``::

    OUT/manifest.json                     written last by every publish
    OUT/raw/                              Zenodo files, record.json, fetch.json
    OUT/_stages/<stage>.json              what each stage ran on (fingerprints)
    OUT/<table>/area=<AREA>/part-0.parquet
    OUT/<table>/area=<AREA>/part-0.arrow  tables with vector columns: the same rows as an
                                          uncompressed Arrow IPC file, for zero-copy reads

Beside it, never read by readers::

    .OUT.lock                             flock; holds the holder's pid, host and start time
    .OUT.staging-<pid>-<ns>/              a build in progress (removed by the next writer)
    .OUT.previous-<ns>/                   generations replaced by a publish, kept while a
                                          reader pins them (removed by the next publish after)

Writers never touch ``OUT`` directly. Under the lock (:func:`store_lock`), :func:`staging`
clones ``OUT`` into a staging directory with hard links (every file is immutable: it is
replaced, never modified in place, so links are safe), lets the stages write there, writes
``manifest.json`` last and swaps the staging directory in with one
``renameat2(RENAME_EXCHANGE)``. A reader sees the old store or the new one, never a mix; a
build killed at any point leaves ``OUT`` as it was plus leftovers that :func:`recover`
removes under the next writer's lock. No file ever appears under its final name before it
is complete: tables and JSON go through a temp file and a rename.

Test hook: ``NAT4ETL_TEST_KILL_AT=<point>`` makes :func:`kill_point` SIGKILL the process at
that point, so tests can check the claims above. The points are ``stage:<stage>`` (a stage
is about to run, staging exists), ``write:<table>`` (a table's temp file is written, not yet
renamed), ``manifest`` (all stages done, manifest not written), ``publish`` (just before the
swap) and ``exchanged`` (swapped, the old generation not yet renamed away).

pyarrow is imported lazily, so a build with nothing to do never pays for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nat4etl import __version__
from nat4etl.direct_io import DirectWriter
from nat4etl.errors import (
    DuplicateKeyError,
    MissingTableError,
    SchemaError,
    StoreError,
    StoreLocked,
)
from nat4etl.hashing import CHUNK_BYTES, TABLE_DIGEST, file_digest, new_hash

if TYPE_CHECKING:
    import pyarrow as pa

    from nat4etl import schema as schema_mod

MANIFEST = "manifest.json"
RAW = "raw"
STAGES = "_stages"
PART = "part-0.parquet"
#: beside the Parquet file of a table with ``vectors``: the same rows, schema and metadata as
#: one uncompressed Arrow IPC record batch, which the reader memory-maps (zero-copy numpy
#: views); Parquet stays the interchange format (polars, DuckDB, Spark)
SIDECAR = "part-0.arrow"
#: rows per Parquet row group: fixed so that two builds give byte-identical files
ROW_GROUP_ROWS = 65_536
#: at most this many bytes of fixed-size vectors per row group, so that a table of few wide
#: rows still has several row groups, which polars encodes on both cores (waveforms: 593
#: rows of 265 kB, 5 groups instead of 1: its write 0.20-0.22 -> 0.10-0.11 s alone;
#: responses' 600-byte rows: 55,924 rows a group instead of 65,536)
ROW_GROUP_BYTES = 32 << 20
META_KEY = b"nat4etl"
KILL_ENV = "NAT4ETL_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL this process here if ``NAT4ETL_TEST_KILL_AT`` names this point (tests only)."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _schema():
    """nat4etl.schema, imported on first use (it imports pyarrow)."""
    from nat4etl import schema

    return schema


@dataclass(frozen=True)
class TableInfo:
    name: str
    area: str
    path: str  # relative to the store root
    rows: int
    digest: str  # "<TABLE_DIGEST>:<hex>"


class Store:
    """Paths and table I/O for one store directory (a published store or a staging copy).

    ``provenance`` is merged into every table's Parquet metadata: `build` sets it per stage
    (record, parameters, library versions; never a timestamp, so two builds from the same
    inputs write the same bytes), and ``area_sources``, each area's source files: a
    table's ``sources`` are those of the areas it is made from.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.published_at = self.root
        self.provenance: dict = {}
        #: the Zenodo files each area's tables are made from (name, size, md5), by area
        self.area_sources: dict[str, list[dict]] = {}
        #: digest ("blake3:<hex>") of every table file written through this Store, by path
        #: relative to the root
        self.written: dict[str, str] = {}
        #: stages this build may still run on this Store (set by `build`): a stage leaves
        #: arrays for a later one (:mod:`nat4etl.stages.handoff`) only if that one is here
        self.stages_planned: frozenset[str] = frozenset()
        #: written files are made durable at publish (`staging`), not one by one
        self.sync_at_publish = False
        self._unsynced: list[Path] = []
        self._dir_fd: int | None = None

    def close(self) -> None:
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None

    def __del__(self) -> None:
        self.close()

    # ------------------------------------------------------------------ paths
    @property
    def raw_dir(self) -> Path:
        return self.root / RAW

    @property
    def shown_raw_dir(self) -> Path:
        """``raw/`` of the published store, for messages: a build writes into a staging
        copy that is gone (or renamed) by the time the user reads them."""
        return Path(self.published_at) / RAW

    @property
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def table_dir(self, name: str) -> Path:
        _schema().spec(name)
        return self.root / name

    def table_file(self, name: str, area: str) -> Path:
        return self.table_dir(name) / f"area={area}" / PART

    def sidecar_file(self, name: str, area: str) -> Path:
        """The Arrow IPC copy of a table with vector columns (see :data:`SIDECAR`)."""
        return self.table_dir(name) / f"area={area}" / SIDECAR

    def stage_record_path(self, stage: str) -> Path:
        return self.root / STAGES / f"{stage}.json"

    def read_stage_record(self, stage: str) -> dict | None:
        """What ``stage`` last ran on (see :mod:`nat4etl.fingerprint`); None if never run."""
        try:
            return json.loads(self.stage_record_path(stage).read_text())
        except (FileNotFoundError, ValueError):
            return None

    # ------------------------------------------------------------------ tables
    def areas(self, name: str) -> list[str]:
        return table_areas(self.table_dir(name))

    def has(self, name: str, area: str | None = None) -> bool:
        return bool(self.areas(name)) if area is None else self.table_file(name, area).is_file()

    def write_table(
        self,
        name: str,
        table: pa.Table,
        *,
        area: str,
        metadata: dict | None = None,
        sources_of: Iterable[str] = (),
    ) -> TableInfo:
        """Validate, sort by key, refuse duplicate keys, then write via temp file + rename.

        ``sources_of``: the areas whose files the table is made from, when not ``area``
        alone (a file several areas share: :meth:`link_table`).

        A table with vector columns also gets its Arrow IPC sidecar (:data:`SIDECAR`),
        written on a second thread (around the page cache: :mod:`nat4etl.direct_io`) while
        the Parquet file is encoded, and renamed into place just before it.
        """
        schema = _schema()
        table = _drop_area(table, area, name)
        schema.validate(name, table)
        s = schema.spec(name)
        table = _sorted_unique(table, s, name, area)
        meta = {
            "table": name,
            "key": ["area", *s.key],
            "units": s.units,
            "schema_version": schema.SCHEMA_VERSION,
            "nat4etl_version": __version__,
            **self.provenance,
            **self._sources(sources_of or (area,)),
            **(metadata or {}),
        }
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
        target = self.table_file(name, area)
        with self._writing(target):
            return self._write_table_files(name, area, table, target, s)

    def _sources(self, areas: Iterable[str]) -> dict:
        """``sources`` of a table made from ``areas``' files: every file of theirs, by name
        (none when no build set :attr:`area_sources`)."""
        if not self.area_sources:
            return {}
        files = {s["name"]: s for a in areas for s in self.area_sources[a]}
        return {"sources": [files[n] for n in sorted(files)]}

    def _write_table_files(
        self, name: str, area: str, table: pa.Table, target: Path, s
    ) -> TableInfo:
        """`write_table`'s writes: ``table`` validated and sorted, ``s`` its spec."""
        from concurrent.futures import ThreadPoolExecutor

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        side_target = self.sidecar_file(name, area)
        with ThreadPoolExecutor(1) as pool:
            side = (
                pool.submit(_write_ipc_sidecar, table, side_target, self._durable)
                if s.vectors
                else None
            )
            _write_parquet(table, tmp, s.codecs)
            self._durable(tmp, target)
        kill_point(f"write:{name}")
        if side is not None:
            side_tmp, side_digest = side.result()
            os.replace(side_tmp, side_target)
            self.written[str(side_target.relative_to(self.root))] = side_digest
        elif side_target.exists():  # never left stale beside a rewritten table
            side_target.unlink()
        os.replace(tmp, target)
        rel = str(target.relative_to(self.root))
        self.written[rel] = file_digest(target)
        return TableInfo(name, area, rel, table.num_rows, self.written[rel])

    def link_table(self, name: str, *, from_area: str, area: str) -> TableInfo:
        """Give ``area`` the very files ``from_area``'s table has (hard links, else copies).

        For a table two areas share byte for byte (the waveforms of one wav.zip): no second
        encoding, no second 300 MB on disk. The files hold nothing area-specific (the area
        is the directory name). Each file appears under its new name by rename, as in
        `write_table`; a later rewrite of either area replaces its own link only.
        """
        pairs = [(self.table_file(name, from_area), self.table_file(name, area))]
        pairs.append((self.sidecar_file(name, from_area), self.sidecar_file(name, area)))
        for src, dst in pairs:
            rel = str(dst.relative_to(self.root))
            if not src.is_file():
                dst.unlink(missing_ok=True)  # no stale sidecar beside the new table
                self.written.pop(rel, None)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
            tmp.unlink(missing_ok=True)
            link_or_copy(src, tmp)
            os.replace(tmp, dst)
            src_rel = str(src.relative_to(self.root))
            self.written[rel] = self.written.get(src_rel) or file_digest(dst)
        fsync_dir(self.table_file(name, area).parent)
        rel = str(self.table_file(name, area).relative_to(self.root))
        return TableInfo(
            name, area, rel, table_file_rows(self.table_file(name, area)), self.written[rel]
        )

    def areas_with(self, name: str, wanted: Iterable[str], *, made_by: str) -> list[str]:
        """The areas of ``wanted`` that have table ``name``; none at all is an error naming
        the stage (``made_by``) to run first."""
        wanted = list(wanted)
        areas = [a for a in wanted if self.has(name, a)]
        if not areas:
            raise MissingTableError(
                f"no {name} table for {', '.join(wanted)} in {self.published_at}; "
                f"run `nat4etl {made_by} --out {self.published_at}` first"
            )
        return areas

    def read_table(
        self, name: str, *, area: str | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """Read one area (or all), with ``area`` as the first column."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        areas = [area] if area is not None else self.areas(name)
        if not areas or not all(self.has(name, a) for a in areas):
            where = f" for area {area}" if area else ""
            raise MissingTableError(
                f"table {name!r}{where} not found in {self.root}; run the stage that writes it "
                f"(`nat4etl build --out {self.root}`)"
            )
        parts = []
        for a in areas:
            path = self.table_file(name, a)
            t = pq.read_table(path, columns=columns, memory_map=True)
            check_file_metadata(name, t.schema, path)
            t = t.replace_schema_metadata(None)
            parts.append(t.add_column(0, "area", pa.array([a] * t.num_rows, pa.string())))
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]

    def parquet_file(self, name: str, area: str):
        """One area's Parquet file, open for reading in batches or row groups (a few rows
        of a list column without decoding the rest); schema version checked."""
        import pyarrow.parquet as pq

        path = self.table_file(name, area)
        if not path.is_file():
            raise MissingTableError(
                f"table {name!r} for {area} not found in {self.published_at}; run the stage "
                f"that writes it (`nat4etl build --out {self.published_at}`)"
            )
        pf = pq.ParquetFile(path, memory_map=True)
        check_file_metadata(name, pf.schema_arrow, path)
        return pf

    def table_metadata(self, name: str, area: str) -> dict:
        import pyarrow.parquet as pq

        path = self.table_file(name, area)
        if not path.is_file():
            raise MissingTableError(f"table {name!r} for area {area} not found in {self.root}")
        md = pq.read_schema(path).metadata or {}
        return json.loads(md.get(META_KEY, b"{}"))

    # ------------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        try:
            return json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            return None

    def write_json(self, path: Path, obj: dict) -> None:
        """Atomic JSON write (temp file + rename) for manifests and stage records."""
        with self._writing(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
            self._durable(tmp, path)
            os.replace(tmp, path)

    @contextlib.contextmanager
    def _writing(self, path: Path) -> Iterator[None]:
        """A failed write (a full disk, a quota, EIO) as one line naming the store file,
        where the OSError names the temp file or nothing at all."""
        try:
            yield
        except OSError as err:
            try:
                rel = path.relative_to(self.root)
            except ValueError:
                rel = path
            reason = (err.strerror or str(err)).replace("\n", " ")
            raise StoreError(f"{rel}: cannot write ({reason})") from err

    # ------------------------------------------------------------------ durability
    def _durable(self, tmp: Path, final: Path) -> None:
        """fsync ``tmp``, just written and about to be renamed to ``final``. In a staging
        copy only its writeback starts here and `sync_written` fsyncs ``final`` before the
        publish: writes do not wait for the disk one by one (the A1 responses' 0.5 GB
        sidecar alone waited 0.2 s), and the publish still follows only durable files."""
        if not self.sync_at_publish:
            _fsync(tmp)
            return
        start_writeback(tmp)
        self._unsynced.append(final)

    def sync_written(self) -> None:
        """fsync every file `_durable` deferred (their writeback mostly done by now)."""
        paths, self._unsynced = self._unsynced, []
        for path in dict.fromkeys(paths):
            with contextlib.suppress(FileNotFoundError):  # removed since (a stale sidecar)
                _fsync(path)

    def table_files(self) -> list[tuple[str, str, Path]]:
        """Every (table, area, file) present, Parquet file then sidecar, in a stable order."""
        out = []
        for name in _schema().TABLES:
            for a in self.areas(name):
                out.append((name, a, self.table_file(name, a)))
                if self.sidecar_file(name, a).is_file():
                    out.append((name, a, self.sidecar_file(name, a)))
        return out


def table_areas(table_dir: Path) -> list[str]:
    """Areas with a complete part file under ``table_dir`` (no schema check, no pyarrow)."""
    if not table_dir.is_dir():
        return []
    return sorted(
        p.name.split("=", 1)[1]
        for p in table_dir.iterdir()
        if p.name.startswith("area=") and (p / PART).is_file()
    )


def table_file_rows(path: Path) -> int:
    """Row count of a table file from its footer: Parquet, or an Arrow IPC sidecar."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.name.endswith(".arrow"):
        with pa.memory_map(str(path)) as f:
            return pa.ipc.open_file(f).count_rows()
    return pq.read_metadata(path).num_rows


def _write_ipc_sidecar(
    table: pa.Table, target: Path, durable: Callable[[Path, Path], None]
) -> tuple[Path, str]:
    """Write ``table`` as one uncompressed Arrow IPC record batch to a temp file beside
    ``target``, made ``durable``; returns (temp path, digest). One batch, whatever the
    chunking of ``table``, so the bytes depend only on the rows (two builds write the same
    file) and every vector column is one contiguous buffer in the file."""
    import pyarrow as pa

    if any(col.num_chunks > 1 for col in table.columns):
        table = table.combine_chunks()
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with DirectWriter(tmp) as sink:
        with pa.ipc.new_file(pa.PythonFile(sink, mode="w"), table.schema) as writer:
            writer.write_table(table)
    durable(tmp, target)
    return tmp, f"{TABLE_DIGEST}:{sink.hasher.hexdigest()}"


def _write_parquet(table: pa.Table, path: Path, codecs: dict[str, str] | None = None) -> None:
    """``table`` as a Parquet file at ``path``, zstd but for ``codecs`` (column -> codec),
    encoded by polars when its vectors are all fixed-size lists (responses, spectrograms,
    waveforms, val_means) and it needs no other codec, else by pyarrow.

    polars encodes a list column's row groups on both cores, with less work per value:
    A1's responses (495 MB) take it 0.3 s and 0.55 s of CPU, pyarrow 1.1-1.3 s on one
    core, and a full build went 9.0-9.5 -> 8.4-8.7 s (with the sidecars written around
    the page cache, which frees the second core for it). The file carries pyarrow's own
    ``ARROW:schema`` entry (the table's schema, our metadata included), so pyarrow reads
    back exactly the types written (polars alone would make the strings
    ``large_string``). The footer is checked: should a polars version write anything
    else, pyarrow writes the file again. (Parquet files through `DirectWriter` too were
    slower: 8.5 -> 8.8 s, Python-level writes of every page.)
    """
    import pyarrow.parquet as pq

    codecs = codecs or {}
    if _polars_encodes(table.schema) and not codecs:
        try:
            _write_parquet_polars(table, path)
        except TypeError:  # a polars without `write_parquet(metadata=)`: pyarrow below
            pass
        else:
            stored = pq.read_schema(path)
            if _as_stored(stored).equals(_as_stored(table.schema), check_metadata=True):
                return
    pq.write_table(
        table,
        path,
        compression=parquet_codecs(table.schema, codecs),
        row_group_size=row_group_rows(table.schema),
        **parquet_encoding(table.schema),
    )


def row_group_rows(schema: pa.Schema) -> int:
    """Rows per row group: :data:`ROW_GROUP_ROWS`, fewer where the fixed-size vectors of a
    row hold more than ``ROW_GROUP_BYTES / ROW_GROUP_ROWS``; from the schema alone, so the
    same table always gets the same row groups."""
    import pyarrow as pa

    row_bytes = sum(
        f.type.list_size * f.type.value_type.bit_width // 8
        for f in schema
        if pa.types.is_fixed_size_list(f.type) and pa.types.is_primitive(f.type.value_type)
    )
    return max(1, min(ROW_GROUP_ROWS, ROW_GROUP_BYTES // max(row_bytes, 1)))


def _polars_encodes(schema: pa.Schema) -> bool:
    """Only fixed-size lists: polars copies variable-length ones into lists with 64-bit
    offsets (the population's made the build's peak 1.13-1.16 GiB, and it was no
    faster), and it writes every column optional, so non-null ones would not read back
    as declared."""
    import pyarrow as pa

    if not all(f.nullable for f in schema):
        return False
    nested = [f.type for f in schema if pa.types.is_nested(f.type)]
    return bool(nested) and all(
        pa.types.is_fixed_size_list(t) and not pa.types.is_nested(t.value_type) for t in nested
    )


def _as_stored(schema: pa.Schema) -> pa.Schema:
    """``schema`` with each list's child named ``element``, as Parquet stores it whoever
    writes the file (and pyarrow reads it back)."""
    import pyarrow as pa

    def stored(t: pa.DataType) -> pa.DataType:
        if pa.types.is_fixed_size_list(t):
            return pa.list_(t.value_field.with_name("element"), t.list_size)
        return t

    return pa.schema([f.with_type(stored(f.type)) for f in schema], schema.metadata)


def _write_parquet_polars(table: pa.Table, path: Path) -> None:
    import base64

    import polars as pl

    metadata = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    metadata["ARROW:schema"] = base64.b64encode(table.schema.serialize()).decode()
    try:
        pl.from_arrow(table, rechunk=False).write_parquet(
            path,
            compression="zstd",
            compression_level=1,  # pyarrow's zstd default: the same speed and size
            statistics=True,
            row_group_size=row_group_rows(table.schema),
            metadata=metadata,
        )
    except pl.exceptions.ComputeError as err:  # how polars reports a failed write (ENOSPC)
        raise OSError(f"polars: {err}") from err


def parquet_codecs(schema: pa.Schema, codecs: dict[str, str]) -> dict[str, str]:
    """Every Parquet column's codec, zstd unless ``codecs`` names the table column.

    pyarrow takes per-column codecs by leaf path (a list column's values are
    ``<name>.list.element``); a column left out of the mapping would not be compressed.
    """
    import pyarrow as pa

    def leaf(f: pa.Field) -> str:
        nested = pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type)
        return f"{f.name}.list.element" if nested else f.name

    return {leaf(f): codecs.get(f.name, "zstd") for f in schema}


def parquet_encoding(schema: pa.Schema) -> dict:
    """Per-column Parquet options: dictionaries and statistics for scalar columns only.

    A list column of floats (spike counts, spectrograms, audio, population samples) is
    tens of millions of values: hashing each into a dictionary was the largest single cost
    of writing them, and its min/max statistics prune nothing, since filters select rows
    by key columns. Measured on A1's responses and pop_signals: write CPU -40%, Parquet
    read CPU -30%, files 25-40% larger (zstd still applies).
    """
    import pyarrow as pa

    scalar = [
        f.name
        for f in schema
        if not (pa.types.is_list(f.type) or pa.types.is_fixed_size_list(f.type))
    ]
    return {"use_dictionary": scalar, "write_statistics": scalar}


def check_file_metadata(name: str, file_schema: pa.Schema, path: Path) -> None:
    schema = _schema()
    md = json.loads((file_schema.metadata or {}).get(META_KEY, b"{}"))
    version = md.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise SchemaError(
            f"table {name!r} was written with schema version {version}, this nat4etl reads "
            f"{schema.SCHEMA_VERSION}; rebuild with `nat4etl build --force`",
            path=path,
        )


def _drop_area(table: pa.Table, area: str, name: str) -> pa.Table:
    import pyarrow.compute as pc

    if "area" not in table.column_names:
        return table
    col = table.column("area")
    if table.num_rows and not pc.all(pc.equal(col, area)).as_py():
        raise SchemaError(f"table {name!r}: rows of other areas written to area={area}")
    return table.drop_columns(["area"])


def in_key_order(name: str, table: pa.Table, *, area: str) -> pa.Table:
    """``table`` in the row order `Store.write_table` writes it (no copy when it already
    is), for a stage that keeps what it wrote for a later stage (:mod:`.stages.handoff`)."""
    return _sorted_unique(table, _schema().spec(name), name, area)


def _sorted_unique(table: pa.Table, s: schema_mod.TableSpec, name: str, area: str) -> pa.Table:
    """Sort by key (stable), refusing repeated keys.

    Stages mostly hand over tables already in key order: then nothing is copied (a
    ``take`` of the vector columns costs seconds at full scale). Duplicates are found by
    comparing neighbours in key order, which needs no hash table.
    """
    import numpy as np
    import pyarrow.compute as pc

    keys = list(s.key)
    n = table.num_rows
    if n == 0:
        return table
    order = pc.sort_indices(table.select(keys), sort_keys=[(k, "ascending") for k in keys])
    if not np.array_equal(order.to_numpy(), np.arange(n)):
        table = table.take(order)
    if n == 1:
        return table
    same = None
    for k in keys:
        col = table.column(k)
        eq = pc.equal(col.slice(1), col.slice(0, n - 1))
        same = eq if same is None else pc.and_(same, eq)
    if pc.any(same).as_py():
        i = pc.index(same, True).as_py()
        dup = {k: table.column(k)[i].as_py() for k in keys}
        raise DuplicateKeyError(f"table {name!r} area={area}: key {dup} occurs more than once")
    return table


def link_or_copy(
    source: Path,
    target: Path,
    *,
    link: bool = True,
    on_bytes: Callable[[int], None] | None = None,
    hash_algo: str | None = None,
) -> str | None:
    """Hardlink ``source`` to ``target`` when asked and the filesystem allows (no copy, no
    extra space), else a streamed, fsynced copy; ``on_bytes`` counts what was placed.

    With ``hash_algo`` a copy is hashed as it is written and its hex digest returned
    (None after a hardlink), so a caller that verifies the copy need not read it back.
    """
    count = on_bytes or (lambda n: None)
    if link:
        try:
            os.link(source, target)
        except OSError:
            pass  # another filesystem, or no hardlinks there: copy
        else:
            count(target.stat().st_size)
            return None
    hasher = new_hash(hash_algo) if hash_algo else None
    with open(source, "rb") as src, open(target, "wb") as dst:
        while block := src.read(CHUNK_BYTES):
            dst.write(block)
            if hasher is not None:
                hasher.update(block)
            count(len(block))
        dst.flush()
        os.fsync(dst.fileno())
    return hasher.hexdigest() if hasher is not None else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(path: Path) -> None:
    """Ask the kernel to start writing ``path``'s dirty pages to disk, without waiting
    (Linux ``sync_file_range``); elsewhere a no-op: the later fsync does it all."""
    fn = _sync_file_range()
    if fn is None:
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        fn(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # failure only means the fsync does it later
    finally:
        os.close(fd)


@functools.cache
def _sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


# ====================================================================== publishing


def store_path(out: str | os.PathLike) -> Path:
    """OUT as an absolute path with symlinks resolved: a symlinked store is staged and
    published beside its target, so the link keeps pointing at the current store."""
    return Path(out).expanduser().resolve()


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-"


def previous_prefix(out: Path) -> str:
    return f".{out.name}.previous-"


@contextlib.contextmanager
def store_lock(
    out: Path, *, wait_s: float = 0.0, on_wait: Callable[[str], None] | None = None
) -> Iterator[None]:
    """An exclusive flock beside OUT. The kernel drops it when the holder dies, so a stale
    lock from a killed build is taken over without guessing from pids.

    ``on_wait(holder)`` is called once if the lock is busy and ``wait_s`` > 0.
    """
    out = store_path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    told = False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _read_holder(path)
                if time.monotonic() >= deadline:
                    if wait_s > 0:
                        waited = f"; waited {wait_s:g} s for it"
                        hint = "run again once it has finished, or with a longer --wait"
                    else:
                        waited, hint = "", "pass --wait SECONDS to wait for it"
                    raise StoreLocked(
                        f"another nat4etl process holds the lock on {out} ({holder}){waited}; "
                        f"nothing was written. Hint: {hint}",
                        path=path,
                    ) from None
                if on_wait is not None and not told:
                    on_wait(holder)
                    told = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso()}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def lock_holder(out: str | os.PathLike) -> str | None:
    """Who holds the lock on ``out`` now, or None. Reads /proc/locks instead of trying the
    lock, so asking never makes a starting build find the lock busy. Linux only."""
    path = lock_path(store_path(out))
    try:
        st = path.stat()
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():
        parts = line.split()
        if "FLOCK" in parts and "->" not in parts:
            i = parts.index("FLOCK")
            if len(parts) > i + 4 and parts[i + 4] == want:
                return _read_holder(path)
    return None


def _read_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
    except (OSError, ValueError):
        return "holder unknown"


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def remove_leftovers(out: Path) -> list[Path]:
    """Staging directories of killed builds. Only call while holding the lock.

    A build killed between the exchange and its second rename leaves the replaced
    generation under the staging name; an open reader may pin it, and then it stays."""
    gone = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            if p.name.startswith(staging_prefix(out)) and p.is_dir() and remove_unpinned(p):
                gone.append(p)
    return gone


def recover(out: str | os.PathLike) -> list[str]:
    """Undo what a killed writer left; call under the lock before planning. Returns notes.

    - staging directories are removed (a build that did not publish never happened);
    - if a publish without ``renameat2`` died between its two renames (``OUT`` missing,
      the swap marker naming the generation moved aside), that generation is put back.
    """
    out = store_path(out)
    notes = [f"removed leftover {p.name}" for p in remove_leftovers(out)]
    marker = swap_marker(out)
    if marker.is_file():
        previous = out.parent / marker.read_text().strip()
        if not out.exists() and previous.is_dir():
            os.rename(previous, out)
            notes.append(f"restored {out.name} from {previous.name}")
        marker.unlink()
    return notes


def swap_marker(out: Path) -> Path:
    """Names the generation moved aside while the fallback publish has no store at OUT."""
    return out.parent / f".{out.name}.swap"


def check_replaceable(out: Path) -> None:
    """Refuse to publish over a directory that is not a nat4etl store (``--out ~`` typo)."""
    if not out.exists():
        return
    if not out.is_dir():
        raise StoreError(f"{out} exists and is not a directory; nothing was written")
    if (out / MANIFEST).is_file() or (out / STAGES).is_dir():
        return
    if any(out.iterdir()):
        raise StoreError(
            f"{out} is not empty and holds no nat4etl store (no {MANIFEST}); refusing to "
            "replace it; nothing was written. Hint: choose another --out"
        )


def clone_with_links(src: Path, dst: Path) -> None:
    """Copy the directory tree with hard links (cheap; files are never modified in place)."""
    dst.mkdir()
    for dirpath, dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        for d in dirnames:
            (dst / rel / d).mkdir()
        for f in filenames:
            if f.startswith(".") and ".tmp-" in f:
                continue  # a temp file of a killed writer
            try:
                os.link(Path(dirpath) / f, dst / rel / f)
            except OSError:
                shutil.copy2(Path(dirpath) / f, dst / rel / f)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2; False where the kernel/fs cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


#: every store this process published, in order (what a Ctrl-C message can say of them)
PUBLISHED: list[Path] = []


def publish(staging_dir: Path, out: Path) -> None:
    """Make ``staging_dir`` the store at ``out``.

    The replaced generation is removed at once unless a reader pins it (see
    :func:`open_snapshot`); a pinned one is kept as ``.OUT.previous-*`` so that reader
    finishes on a consistent store, and the first publish after it is closed removes it.
    A reader that opened files by path (polars, pyarrow) holds them open or sees the new
    ones: it never reads through the ``.previous`` name.
    """
    for p in out.parent.iterdir():
        if p.name.startswith(previous_prefix(out)):
            remove_unpinned(p)
    kill_point("publish")
    if not out.exists():
        os.rename(staging_dir, out)
        PUBLISHED.append(out)
    else:
        previous = out.parent / f"{previous_prefix(out)}{time.time_ns()}"
        if exchange_dirs(staging_dir, out):
            PUBLISHED.append(out)  # from here a Ctrl-C leaves the new store in place
            kill_point("exchanged")
            os.rename(staging_dir, previous)
        else:
            # Fallback: two renames; a reader may briefly find no store, never a mixed one,
            # and recover() puts the previous generation back if we die in between.
            marker = swap_marker(out)
            marker.write_text(previous.name)
            _fsync(marker)
            os.rename(out, previous)
            kill_point("exchanged")
            os.rename(staging_dir, out)
            PUBLISHED.append(out)
            marker.unlink()
        fsync_dir(out.parent)
        # a snapshot that opened it meanwhile sees it replaced and pins the new one
        remove_unpinned(previous, unknown=False)
    fsync_dir(out.parent)


#: flock errors that mean "no flock here" (pins cannot be seen), not "pinned"
_FLOCK_UNSUPPORTED = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL})


def remove_unpinned(generation: Path, *, unknown: bool = True) -> bool:
    """Remove a replaced generation unless a reader still pins it (:func:`open_snapshot`
    holds a shared flock on its directory); True if it was removed. Where flock does
    not work, pins cannot be seen: ``unknown`` says whether to remove it anyway (a publish
    removes the one before last, and keeps the one it just replaced)."""
    try:
        fd = os.open(generation, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        shutil.rmtree(generation, ignore_errors=True)
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # an open reader's: kept; the first publish after it closes removes it
        except OSError as err:
            if err.errno not in _FLOCK_UNSUPPORTED or not unknown:
                return False  # e.g. NFS refusing an exclusive lock on a directory: keep it
        shutil.rmtree(generation, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (a power cut afterwards keeps the new names); a no-op
    where directories cannot be opened (the rename itself is still atomic)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


#: tries to pin the published generation while publishes replace it (each a rename)
_PIN_ATTEMPTS = 100


def _same_dir(fd: int, path: Path) -> bool:
    try:
        pinned, now = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (pinned.st_dev, pinned.st_ino) == (now.st_dev, now.st_ino)


def _swap_in_progress(out: Path) -> bool:
    """A fallback publish is between its two renames (its marker is there)."""
    return swap_marker(out).exists()


def open_snapshot(path: str | os.PathLike) -> Store:
    """A read-only Store pinned to the generation published at ``path`` right now.

    It holds a directory file descriptor with a shared flock on it, so a concurrent publish
    (which renames the old generation away) does not change what this Store reads, and no
    later publish removes that generation while this Store is open (:func:`publish` keeps a
    pinned one). Linux only (``/proc/self/fd``); elsewhere it reads ``path`` directly.
    """
    path = Path(path)
    missing = MissingTableError(f"no nat4etl store at {path}; build one with `nat4etl build`")
    if not path.is_dir() and not _swap_in_progress(path):
        raise missing
    if not Path("/proc/self/fd").is_dir():
        return Store(path)
    for _ in range(_PIN_ATTEMPTS):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except FileNotFoundError:
            if not _swap_in_progress(path):
                raise missing from None
            time.sleep(0.01)  # between the two renames of a fallback publish
            continue
        except NotADirectoryError:
            raise missing from None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)  # pins the generation: see remove_unpinned
        except OSError:
            break  # a filesystem without flock: held by the descriptor until a publish
        except BaseException:  # Ctrl-C while a publish holds it: no descriptor left open
            os.close(fd)
            raise
        if _same_dir(fd, path):
            break  # still the published one: a publish keeps it from now on
        os.close(fd)  # replaced (and maybe removed) between open and flock: again
    else:
        raise StoreError(f"{path} was replaced {_PIN_ATTEMPTS} times while being opened")
    store = Store(f"/proc/self/fd/{fd}")
    store.published_at = path
    store._dir_fd = fd  # closed with the Store
    return store


@contextlib.contextmanager
def staging(
    out: str | os.PathLike, *, manifest: Callable[[Store], dict] | None = None
) -> Iterator[Store]:
    """A hard-link copy of ``out`` to write into; published atomically if the block succeeds.

    The caller holds the lock (:func:`store_lock`). ``manifest(store)`` is called after the
    block to write ``manifest.json`` (default :func:`write_manifest`); on any exception the
    staging copy is removed and ``out`` is untouched.
    """
    out = store_path(out)
    check_replaceable(out)
    staging_dir = out.parent / f"{staging_prefix(out)}{os.getpid()}-{time.time_ns()}"
    if out.exists():
        clone_with_links(out, staging_dir)
    else:
        staging_dir.mkdir()
    store = Store(staging_dir)
    store.published_at = out
    store.sync_at_publish = True
    published_before = len(PUBLISHED)
    try:
        yield store
        kill_point("manifest")
        (manifest or write_manifest)(store)
        store.sync_written()
        publish(staging_dir, out)
    except BaseException:
        if len(PUBLISHED) > published_before and staging_dir.exists():
            # interrupted between the exchange and its rename: the staging name holds the
            # replaced generation now, which a reader may pin
            remove_unpinned(staging_dir, unknown=False)
        else:
            shutil.rmtree(staging_dir, ignore_errors=True)
        raise


@contextlib.contextmanager
def open_for_write(out: str | os.PathLike, *, wait_s: float = 0.0) -> Iterator[Store]:
    """Lock, clean up after killed writers, and stage a copy of ``out`` (see :func:`staging`).

    On any exception the staging copy is discarded and ``out`` is untouched.
    """
    out = store_path(out)
    with store_lock(out, wait_s=wait_s):
        recover(out)
        with staging(out) as store:
            yield store


def write_manifest(
    store: Store, extra: dict | None = None, *, digest: Callable[[Path], str] | None = None
) -> dict:
    """Row counts and digests of every table; written last so its presence means complete.

    ``digest(path)`` may supply known digests (build's cache) instead of re-hashing. Each
    table's ``digest`` names its algorithm (``"blake3:<hex>"``); manifests written before
    it held ``sha256`` (hex) instead (:func:`manifest_digest` reads either).
    """
    digest = digest or file_digest
    try:
        previous = store.read_manifest() or {}
    except ValueError:  # a damaged manifest is replaced, not merged
        previous = {}
    tables = []
    for name, area, path in store.table_files():
        tables.append(
            {
                "table": name,
                "area": area,
                "path": str(path.relative_to(store.root)),
                "rows": table_file_rows(path),
                "size_bytes": path.stat().st_size,
                "digest": digest(path),
            }
        )
    manifest = {
        **{k: v for k, v in previous.items() if k not in ("tables", "written_at")},
        **(extra or {}),
        "nat4etl_version": __version__,
        "schema_version": _schema().SCHEMA_VERSION,
        "tables": tables,
        "written_at": _now_iso(),
    }
    store.write_json(store.manifest_path, manifest)
    return manifest


def manifest_digest(entry: dict) -> str | None:
    """A manifest table entry's digest, ``"<algo>:<hex>"``: ``digest``, or the ``sha256``
    (hex) of a manifest written before; None when it has neither."""
    if "digest" in entry:
        return entry["digest"]
    return f"sha256:{entry['sha256']}" if "sha256" in entry else None

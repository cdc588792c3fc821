"""The one place that knows the store's layout, writes tables atomically and publishes builds.

Layout of an output directory ``OUT``::

    OUT/manifest.json                     written last by every publish
    OUT/raw/                              Zenodo files, record.json, fetch.json
    OUT/_stages/<stage>.json              what each stage ran on (fingerprints)
    OUT/<table>/area=<AREA>/part-0.parquet

Writers never touch ``OUT`` directly. :func:`open_for_write` takes a lock beside ``OUT``,
clones ``OUT`` into a staging directory with hard links (every file is immutable: it is
replaced, never modified in place, so links are safe), lets the stages write there, and
swaps the staging directory in with one ``renameat2(RENAME_EXCHANGE)``. A reader sees the
old store or the new one, never a mix; a killed build leaves only a staging directory that
the next writer removes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nat4etl import __version__, schema
from nat4etl.errors import DuplicateKeyError, MissingTableError, SchemaError, StoreLocked

MANIFEST = "manifest.json"
RAW = "raw"
STAGES = "_stages"
PART = "part-0.parquet"
#: rows per Parquet row group: fixed so that two builds give byte-identical files
ROW_GROUP_ROWS = 65_536
META_KEY = b"nat4etl"


@dataclass(frozen=True)
class TableInfo:
    name: str
    area: str
    path: str  # relative to the store root
    rows: int
    sha256: str


class Store:
    """Paths and table I/O for one store directory (a published store or a staging copy)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.published_at = self.root
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
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    def table_dir(self, name: str) -> Path:
        schema.spec(name)
        return self.root / name

    def table_file(self, name: str, area: str) -> Path:
        return self.table_dir(name) / f"area={area}" / PART

    def stage_record_path(self, stage: str) -> Path:
        return self.root / STAGES / f"{stage}.json"

    # ------------------------------------------------------------------ tables
    def areas(self, name: str) -> list[str]:
        d = self.table_dir(name)
        if not d.is_dir():
            return []
        return sorted(
            p.name.split("=", 1)[1]
            for p in d.iterdir()
            if p.name.startswith("area=") and (p / PART).is_file()
        )

    def has(self, name: str, area: str | None = None) -> bool:
        return bool(self.areas(name)) if area is None else self.table_file(name, area).is_file()

    def write_table(
        self, name: str, table: pa.Table, *, area: str, metadata: dict | None = None
    ) -> TableInfo:
        """Validate, sort by key, refuse duplicate keys, then write via temp file + rename."""
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
            **(metadata or {}),
        }
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
        target = self.table_file(name, area)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        pq.write_table(
            table,
            tmp,
            compression="zstd",
            row_group_size=ROW_GROUP_ROWS,
            write_statistics=True,
        )
        _fsync(tmp)
        os.replace(tmp, target)
        return TableInfo(
            name, area, str(target.relative_to(self.root)), table.num_rows, file_sha256(target)
        )

    def read_table(
        self, name: str, *, area: str | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """Read one area (or all), with ``area`` as the first column."""
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

    def table_metadata(self, name: str, area: str) -> dict:
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
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        _fsync(tmp)
        os.replace(tmp, path)

    def table_files(self) -> list[tuple[str, str, Path]]:
        """Every (table, area, file) present, in a stable order."""
        out = []
        for name in schema.TABLES:
            for a in self.areas(name):
                out.append((name, a, self.table_file(name, a)))
        return out


def check_file_metadata(name: str, file_schema: pa.Schema, path: Path) -> None:
    md = json.loads((file_schema.metadata or {}).get(META_KEY, b"{}"))
    version = md.get("schema_version")
    if version != schema.SCHEMA_VERSION:
        raise SchemaError(
            f"table {name!r} was written with schema version {version}, this nat4etl reads "
            f"{schema.SCHEMA_VERSION}; rebuild with `nat4etl build --force`",
            path=path,
        )


def _drop_area(table: pa.Table, area: str, name: str) -> pa.Table:
    if "area" not in table.column_names:
        return table
    col = table.column("area")
    if table.num_rows and not pc.all(pc.equal(col, area)).as_py():
        raise SchemaError(f"table {name!r}: rows of other areas written to area={area}")
    return table.drop_columns(["area"])


def _sorted_unique(table: pa.Table, s: schema.TableSpec, name: str, area: str) -> pa.Table:
    keys = list(s.key)
    if table.num_rows == 0:
        return table
    table = table.sort_by([(k, "ascending") for k in keys])
    counts = table.select(keys).group_by(keys).aggregate([([], "count_all")])
    if counts.num_rows != table.num_rows:
        dup = counts.filter(pc.greater(counts["count_all"], 1)).slice(0, 1).to_pylist()[0]
        dup.pop("count_all")
        raise DuplicateKeyError(f"table {name!r} area={area}: key {dup} occurs more than once")
    return table


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ====================================================================== publishing


def lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


def staging_prefix(out: Path) -> str:
    return f".{out.name}.staging-"


@contextlib.contextmanager
def store_lock(out: Path, *, wait_s: float = 0.0) -> Iterator[None]:
    """An exclusive flock beside OUT. The kernel drops it when the holder dies, so a stale
    lock from a killed build is taken over without guessing from pids."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + wait_s
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _read_holder(path)
                    raise StoreLocked(
                        f"another nat4etl process holds the lock on {out} ({holder}); "
                        "Hint: pass --wait SECONDS to wait for it",
                        path=path,
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso()}
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the flock


def _read_holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text() or "{}")
        return f"pid {h.get('pid')} on {h.get('host')} since {h.get('since')}"
    except (OSError, ValueError):
        return "holder unknown"


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def remove_leftovers(out: Path) -> list[Path]:
    """Staging directories of killed builds. Only call while holding the lock."""
    gone = []
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            if p.name.startswith(staging_prefix(out)) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p)
    return gone


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


def previous_prefix(out: Path) -> str:
    return f".{out.name}.previous-"


def publish(staging: Path, out: Path) -> None:
    """Make ``staging`` the store at ``out``.

    The replaced generation is kept as ``.OUT.previous-*`` until the next publish, so a
    reader that opened it (see :func:`open_snapshot`) can finish reading a consistent store.
    """
    for p in out.parent.iterdir():
        if p.name.startswith(previous_prefix(out)):
            shutil.rmtree(p, ignore_errors=True)
    if not out.exists():
        os.rename(staging, out)
        return
    previous = out.parent / f"{previous_prefix(out)}{time.time_ns()}"
    if exchange_dirs(staging, out):
        os.rename(staging, previous)
    else:
        # Fallback: two renames; a reader may briefly find no store, never a mixed one.
        os.rename(out, previous)
        os.rename(staging, out)


def open_snapshot(path: str | os.PathLike) -> Store:
    """A read-only Store pinned to the generation published at ``path`` right now.

    It holds a directory file descriptor, so a concurrent publish (which renames the old
    generation away and keeps it until the following publish) does not change what this
    Store reads. Linux only (``/proc/self/fd``); elsewhere it reads ``path`` directly.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingTableError(f"no nat4etl store at {path}; build one with `nat4etl build`")
    if not Path("/proc/self/fd").is_dir():
        return Store(path)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    store = Store(f"/proc/self/fd/{fd}")
    store.published_at = path
    store._dir_fd = fd  # closed with the Store
    return store


@contextlib.contextmanager
def open_for_write(out: str | os.PathLike, *, wait_s: float = 0.0) -> Iterator[Store]:
    """A writable copy of the store at ``out``, published atomically if the block succeeds.

    On any exception the staging copy is discarded and ``out`` is untouched.
    """
    out = Path(out).absolute()
    with store_lock(out, wait_s=wait_s):
        remove_leftovers(out)
        staging = out.parent / f"{staging_prefix(out)}{os.getpid()}-{time.time_ns()}"
        if out.exists():
            clone_with_links(out, staging)
        else:
            staging.mkdir()
        try:
            store = Store(staging)
            yield store
            write_manifest(store)
            publish(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


def write_manifest(store: Store, extra: dict | None = None) -> dict:
    """Row counts and digests of every table; written last so its presence means complete."""
    previous = store.read_manifest() or {}
    tables = []
    for name, area, path in store.table_files():
        md = pq.read_metadata(path)
        tables.append(
            {
                "table": name,
                "area": area,
                "path": str(path.relative_to(store.root)),
                "rows": md.num_rows,
                "sha256": file_sha256(path),
            }
        )
    manifest = {
        **{k: v for k, v in previous.items() if k not in ("tables", "written_at")},
        **(extra or {}),
        "nat4etl_version": __version__,
        "schema_version": schema.SCHEMA_VERSION,
        "tables": tables,
        "written_at": _now_iso(),
    }
    store.write_json(store.manifest_path, manifest)
    return manifest

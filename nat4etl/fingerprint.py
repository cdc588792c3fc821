"""Stage fingerprints: what each stage's output was made from, so `build` reruns only what changed.

After a stage runs, `build` writes ``OUT/_stages/<stage>.json``::

    stage, fingerprint       sha256 of the canonical JSON of the four parts below
    inputs                   {"raw/<file>": "md5:<hex>", "<table>/area=A1/part-0.parquet":
                              "blake3:<hex>", "raw/record.json#record": "<id>@<version>", ...}
                             (Parquet files only: a table's Arrow sidecar holds the same rows)
    params                   {Settings field: value} for the stage's PARAMS
    nat4etl_version, schema_version
    outputs                  {path: {size_bytes, mtime_ns, digest}} of every file
                             the stage owns (its tables and their Arrow sidecars; raw/ for
                             fetch)
    ran_at, seconds, summary
    source_dir               only for a stage command given a ``--source`` mirror whose files
                             are not raw/'s: where it read them (not part of the fingerprint:
                             the files' md5s are its inputs, the mirror's path is not)

A stage is up to date when its fingerprint, computed from the files now present, equals the
recorded one and every recorded output is still there with its digest. Raw files are named
by md5 (what Zenodo publishes), tables by blake3 (:data:`nat4etl.hashing.TABLE_DIGEST`); a
digest string names its algorithm, so a store recorded with sha256 re-runs its stages once.

Checking is cheap: a file whose size and mtime equal its recorded state keeps its recorded
digest without being read. A later write in the same tick of the file-system clock would keep
the mtime (git's "racy clean" problem); nobody else can write a staging copy, so `build`
only has to wait, before it publishes, until its newest file is :data:`RACY_NS` old
(:func:`settle`): any write after publishing then gets a new mtime. Only ``nat4etl verify``
re-reads everything.

``fetch`` reads the outside world, not the store: its inputs are the mirror's
``record.json`` and the size and mtime of each mirror file (``--source``), or the Zenodo
record id. A Zenodo record's files never change (a new version is a new record id), so an
up-to-date fetch does not touch the network; ``--force`` or ``--from fetch`` re-verifies.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nat4etl import __version__
from nat4etl.hashing import TABLE_DIGEST, file_digest
from nat4etl.store import PART, RAW, SIDECAR, table_areas

#: publish no sooner than this after the last write (one tick of the coarse file-system
#: clock is <= 10 ms on Linux; 30 ms leaves room)
RACY_NS = 30_000_000
#: raw/ files that describe the download, not the data: timestamps, API statistics
RAW_META = ("record.json", "fetch.json")
FETCH = "fetch"


@dataclass(frozen=True)
class StageSpec:
    """A stage's declared contract: see :mod:`nat4etl.stages`.

    ``reads``: tables, and Zenodo files in raw/ (``"raw"``: all of them; ``"raw/<name>"``:
    the ones matching a glob, ``{area}`` standing for each area built). ``lists``: raw
    files of which the stage reads only the member names: inputs of its fingerprint, but
    not what its tables are made from (:func:`source_reads`).
    """

    name: str
    reads: tuple[str, ...] = ()
    writes: tuple[str, ...] = ()
    params: tuple[str, ...] = ()
    lists: tuple[str, ...] = ()

    @property
    def writes_raw(self) -> bool:
        return self.name == FETCH or "raw" in self.writes

    @property
    def tables(self) -> tuple[str, ...]:
        return tuple(t for t in self.writes if t != "raw")


# ====================================================================== file states


@dataclass(frozen=True)
class FileState:
    """A file's digest and the stat it had when hashed."""

    size_bytes: int
    mtime_ns: int
    digest: str  # "blake3:<hex>" (or "sha256:<hex>", recorded before) or "md5:<hex>"

    def still_valid(self, st: os.stat_result, algo: str) -> bool:
        """Same size and mtime, and a digest with the wanted algorithm."""
        return (
            st.st_size == self.size_bytes
            and st.st_mtime_ns == self.mtime_ns
            and self.digest.startswith(f"{algo}:")
        )


def algo_for(rel: str) -> str:
    """md5 for raw files (what Zenodo publishes), :data:`TABLE_DIGEST` for everything we
    write."""
    return "md5" if rel.startswith(f"{RAW}/") else TABLE_DIGEST


class DigestCache:
    """Known file states by path relative to a store root (the same in staging, whose files
    are hard links of the published ones). A file is read only when its stat changed."""

    def __init__(self) -> None:
        self.states: dict[str, FileState] = {}
        self.hashed: list[str] = []  # files actually read, for logs and tests

    def learn(self, outputs: Mapping[str, Mapping[str, Any]]) -> None:
        for rel, s in outputs.items():
            try:
                self.states[rel] = FileState(**s)
            except TypeError:
                continue  # a record from an older layout: re-hash

    def state(self, root: Path, rel: str) -> FileState:
        """The file's state, from memory when its stat matches, else by hashing it."""
        return self._state(root / rel, rel, algo_for(rel))

    def mirror_state(self, path: Path) -> FileState:
        """A ``--source`` mirror file's state (md5, as Zenodo lists it), hashed once a run
        however many stages and tables name it."""
        return self._state(path, f"source:{path}", "md5")

    def _state(self, path: Path, key: str, algo: str) -> FileState:
        st = path.stat()
        known = self.states.get(key)
        if known is not None and known.still_valid(st, algo):
            return known
        digest = file_digest(path, algo)
        self.hashed.append(key)
        fresh = FileState(st.st_size, st.st_mtime_ns, digest)
        self.states[key] = fresh
        return fresh

    def digest(self, root: Path, rel: str) -> str:
        return self.state(root, rel).digest

    def trust(self, root: Path, rel: str, digest: str) -> None:
        """Take a digest computed by the writer moments ago (staging is private to the lock
        holder, so nothing else wrote the file since)."""
        st = (root / rel).stat()
        self.states[rel] = FileState(st.st_size, st.st_mtime_ns, digest)


# ====================================================================== which files


def raw_data_files(root: Path) -> list[str]:
    """The Zenodo files in ``raw/``: fetch.json's list when present, else every plain file."""
    raw = root / RAW
    if not raw.is_dir():
        return []
    names = _fetch_json_names(raw)
    if names is None:
        names = [p.name for p in raw.iterdir() if _is_plain_file(p) and p.name not in RAW_META]
    return sorted(f"{RAW}/{n}" for n in names if (raw / n).is_file())


def _fetch_json_names(raw: Path) -> list[str] | None:
    try:
        files = json.loads((raw / "fetch.json").read_text())["files"]
        return [str(e["name"]) for e in files]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _is_plain_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and ".part-" not in p.name


def raw_files(root: Path) -> list[str]:
    """Everything fetch owns: the data files plus record.json and fetch.json."""
    raw = root / RAW
    if not raw.is_dir():
        return []
    return sorted(f"{RAW}/{p.name}" for p in raw.iterdir() if _is_plain_file(p))


def table_files(root: Path, table: str, *, sidecars: bool = True) -> list[str]:
    """A table's files: each area's Parquet file and, where present, its Arrow sidecar."""
    rels = []
    for a in table_areas(root / table):
        rels.append(f"{table}/area={a}/{PART}")
        if sidecars and (root / table / f"area={a}" / SIDECAR).is_file():
            rels.append(f"{table}/area={a}/{SIDECAR}")
    return rels


def output_files(root: Path, spec: StageSpec) -> list[str]:
    """The files a stage owns in the store as it is now."""
    rels = raw_files(root) if spec.writes_raw else []
    for t in spec.tables:
        rels += table_files(root, t)
    return rels


# ====================================================================== fingerprints


@dataclass(frozen=True)
class Fingerprint:
    """What a stage's output depends on, computed from the files present now."""

    stage: str
    inputs: dict[str, str]
    params: dict[str, Any]
    nat4etl_version: str = __version__
    schema_version: int = 0

    @property
    def digest(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))
        return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def param_values(spec: StageSpec, settings: Any) -> dict[str, Any]:
    """The stage's PARAMS as JSON values (paths as strings, tuples as lists)."""
    return {name: jsonable(getattr(settings, name)) for name in spec.params}


def jsonable(value: Any) -> Any:
    """JSON-ready: paths as strings, tuples as lists, anything unknown as its ``str``."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, tuple | list | set | frozenset):
        return [jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    return str(value)


def fingerprint(
    root: Path, spec: StageSpec, settings: Any, cache: DigestCache, *, schema_version: int
) -> Fingerprint:
    """The stage's fingerprint over the store at ``root`` (published or staging)."""
    inputs: dict[str, str] = {}
    if spec.name == FETCH:
        inputs.update(outside_inputs(settings))
    raw = [r for r in (*spec.reads, *spec.lists) if is_raw(r)]
    if raw and not spec.writes_raw:
        inputs.update(raw_inputs(root, settings, cache, raw))
    for name in spec.reads:
        if not is_raw(name):
            rels = table_files(root, name, sidecars=False)  # a sidecar adds no information
            inputs.update({rel: cache.digest(root, rel) for rel in rels})
    return Fingerprint(spec.name, inputs, param_values(spec, settings), __version__, schema_version)


def is_raw(read: str) -> bool:
    """``"raw"`` or ``"raw/<glob>"``: Zenodo files, not a table."""
    return read == RAW or read.startswith(f"{RAW}/")


def raw_selected(names: Iterable[str], reads: Iterable[str], areas: Iterable[str]) -> list[str]:
    """The file names of ``names`` that the raw ``reads`` name (see :class:`StageSpec`)."""
    globs: list[str] = []
    for read in reads:
        if read == RAW:
            return list(names)
        glob = read.removeprefix(f"{RAW}/")
        globs += [glob.format(area=a) for a in areas] if "{area}" in glob else [glob]
    return [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]


def raw_inputs(
    root: Path, settings: Any, cache: DigestCache, reads: Iterable[str] = (RAW,)
) -> dict[str, str]:
    """md5 of each Zenodo file the stage reads (``reads``), and the record they belong to.

    A stage given ``--source DIR`` (``unpack --source DIR``) reads the mirror's files,
    whatever raw/ holds; the others read the ones fetch got into raw/. A mirror whose
    files are raw/'s, byte for byte, is the same input as raw/ (a built store's own
    mirror passed again leaves unpack up to date).
    """
    areas = getattr(settings, "areas", ())
    fetched: dict[str, str] | None = None
    if rels := raw_data_files(root):
        names = raw_selected((rel.split("/", 1)[1] for rel in rels), reads, areas)
        fetched = {f"{RAW}/{n}": cache.digest(root, f"{RAW}/{n}") for n in names}
        fetched[f"{RAW}/record.json#record"] = record_label(record_info(root / RAW))
    src = source_files_dir(settings)
    if src is None:
        return fetched or {}
    names = raw_selected(source_file_names(src), reads, areas)
    mirror = {n: cache.mirror_state(src / n).digest for n in names}
    mirror["record.json#record"] = record_label(record_info(src))
    if fetched == {f"{RAW}/{n}": digest for n, digest in mirror.items()}:
        return fetched
    return {f"source/{n}": digest for n, digest in mirror.items()}


def source_files_dir(settings: Any) -> Path | None:
    """The ``--source`` mirror a stage other than fetch reads instead of raw/ (a stage
    command given one; a build hands later stages raw/), if it is a directory."""
    source = getattr(settings, "source_dir", None)
    return Path(source) if source is not None and Path(source).is_dir() else None


def mirror_read(spec: StageSpec, settings: Any, inputs: Mapping[str, str]) -> str | None:
    """The ``--source`` mirror a stage other than fetch read in place of raw/, when its
    files are not raw/'s (:func:`raw_inputs` names them ``source/<file>``); else None."""
    src = source_files_dir(settings)
    if spec.name == FETCH or src is None or not any(k.startswith("source/") for k in inputs):
        return None
    return str(src.resolve())


def source_file_names(src: Path) -> list[str]:
    """The Zenodo files of a mirror directory (not its record.json and checksums)."""
    return [p.name for p in sorted(src.iterdir()) if _is_plain_file(p) and p.name not in RAW_META]


def raw_file(root: Path, name: str, source_dir: Any = None) -> Path | None:
    """The Zenodo file ``name`` as :func:`raw_inputs` covers it: in the ``--source``
    mirror when a stage is given one, else in raw/ if fetch got it (not one an earlier
    fetch left there, such as a ``--no-wav`` fetch's wav.zip); None when it has none."""
    if source_dir is not None:
        path = Path(source_dir) / name
        return path if _is_plain_file(path) else None
    fetched = raw_data_files(root)
    return root / RAW / name if f"{RAW}/{name}" in fetched else None


def source_reads(spec: StageSpec, specs: Iterable[StageSpec]) -> list[str]:
    """The raw reads a stage's tables are made from: its own (not ``lists``) and, through
    the tables it reads, those of the stages that wrote them (by ``specs``)."""
    writer = {t: s for s in specs for t in s.tables}
    out: list[str] = []
    seen: set[str] = set()
    todo = [spec]
    while todo:
        s = todo.pop()
        if s.name in seen:
            continue
        seen.add(s.name)
        for read in s.reads:
            if is_raw(read):
                out.append(read)
            elif read in writer:
                todo.append(writer[read])
    return list(dict.fromkeys(out))


def outside_inputs(settings: Any) -> dict[str, str]:
    """What fetch reads: the mirror's listing, or the Zenodo record (immutable per id)."""
    source = getattr(settings, "source_dir", None)
    if source is not None:
        src = Path(source)
        if not src.is_dir():
            return {"source": "missing"}
        files = [p for p in sorted(src.iterdir()) if _is_plain_file(p)]
        inputs = {f"source/{p.name}": _stat_label(p) for p in files}
        if (src / "record.json").is_file():
            inputs["source/record.json"] = file_digest(src / "record.json", "sha256")
        return inputs
    url = getattr(settings, "zenodo_url", "")
    return {f"zenodo/{getattr(settings, 'record_id', '')}": f"record at {url}"}


def _stat_label(path: Path) -> str:
    """Size and mtime of a mirror file: whether fetch would find anything new, without
    hashing the mirror on every build (fetch itself verifies md5s when it runs)."""
    st = path.stat()
    return f"stat:{st.st_size}:{st.st_mtime_ns}"


def record_info(raw_dir: Path) -> dict[str, Any]:
    """Record id, version and DOI from a Zenodo record.json; {} when absent or unreadable."""
    try:
        rec = json.loads((raw_dir / "record.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(rec, dict):
        return {}
    meta = rec.get("metadata") if isinstance(rec.get("metadata"), dict) else {}
    info = {
        "id": rec.get("id", rec.get("recid")),
        "version": meta.get("version", rec.get("version")),
        "doi": rec.get("doi", meta.get("doi")),
        "title": meta.get("title", rec.get("title")),
    }
    return {k: v for k, v in info.items() if v is not None}


def record_label(info: Mapping[str, Any]) -> str:
    return f"{info.get('id', '?')}@{info.get('version', '?')}"


# ====================================================================== records


def new_record(
    root: Path,
    spec: StageSpec,
    fp: Fingerprint,
    cache: DigestCache,
    *,
    summary: Mapping[str, Any] | None = None,
    seconds: float | None = None,
    trusted: Mapping[str, str] | None = None,
    source_dir: str | None = None,
) -> dict[str, Any]:
    """The stage record to write after ``spec`` ran into ``root``.

    ``trusted`` digests (by path) were computed by the writer in this staging copy and are
    taken without re-reading the file. ``source_dir``: the mirror the stage read instead
    of raw/ (:func:`mirror_read`).
    """
    rels = output_files(root, spec)
    for rel, digest in (trusted or {}).items():
        if rel in rels and digest.startswith(f"{algo_for(rel)}:"):
            cache.trust(root, rel, digest)
    outputs = {rel: asdict(cache.state(root, rel)) for rel in rels}
    record = {
        "stage": spec.name,
        "fingerprint": fp.digest,
        "inputs": fp.inputs,
        "params": fp.params,
        "nat4etl_version": fp.nat4etl_version,
        "schema_version": fp.schema_version,
        "outputs": outputs,
        "ran_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": None if seconds is None else round(seconds, 3),
        "summary": jsonable(dict(summary or {})),
    }
    if source_dir is not None:
        record["source_dir"] = source_dir
    return record


def settle(root: Path, rels: Iterable[str]) -> None:
    """Wait until the newest of ``rels`` is RACY_NS old: call once, just before publishing."""
    newest = max(((root / r).stat().st_mtime_ns for r in rels), default=0)
    wait_ns = newest + RACY_NS - time.time_ns()
    if wait_ns > 0:
        time.sleep(min(wait_ns, 2 * RACY_NS) / 1e9)


@dataclass(frozen=True)
class Decision:
    """Whether a stage runs, and why (empty reasons: up to date)."""

    stage: str
    run: bool
    reasons: tuple[str, ...] = ()
    fingerprint: Fingerprint | None = field(default=None, compare=False)


def why_stale(record: Mapping[str, Any] | None, fp: Fingerprint) -> list[str]:
    """Differences between a stage record and the fingerprint now, in words."""
    if record is None:
        return ["never built"]
    if record.get("fingerprint") == fp.digest:
        return []
    out = []
    for key in ("nat4etl_version", "schema_version"):
        if record.get(key) != getattr(fp, key):
            out.append(f"{key.replace('_', ' ')} {record.get(key)} -> {getattr(fp, key)}")
    old_params = record.get("params") or {}
    for k in sorted(set(old_params) | set(fp.params)):
        if k not in fp.params:  # an earlier nat4etl counted it (unpack's source_dir)
            out.append(f"parameter {k} is no longer one (it was {old_params[k]!r})")
        elif k not in old_params:
            out.append(f"parameter {k} is new ({fp.params[k]!r})")
        elif old_params[k] != fp.params[k]:
            out.append(f"parameter {k}: {old_params[k]!r} -> {fp.params[k]!r}")
    out += _input_changes(record.get("inputs") or {}, fp.inputs)
    return out or ["fingerprint changed"]


def _input_changes(old: Mapping[str, str], new: Mapping[str, str], limit: int = 5) -> list[str]:
    changes = [
        f"input {k} {_how_changed(old[k], new[k])}"
        for k in sorted(set(old) & set(new))
        if old[k] != new[k]
    ]
    # an input set changes with the areas or the mirror asked for, not only when files
    # come and go: say which, not "is gone" of a file still on disk
    changes += [f"input {k} is read now (was not)" for k in sorted(set(new) - set(old))]
    changes += [f"input {k} is no longer read" for k in sorted(set(old) - set(new))]
    if len(changes) > limit:
        changes = changes[:limit] + [f"... and {len(changes) - limit} more input changes"]
    return changes


def _how_changed(old: str, new: str) -> str:
    """How an input's digest changed: "changed", or, between two algorithms, just that
    (digests of different algorithms cannot tell whether the content did)."""
    old_algo, new_algo = (d.partition(":")[0] for d in (str(old), str(new)))
    if old_algo != new_algo and ":" in str(old) and ":" in str(new):
        return f"was recorded with {old_algo}, now {new_algo}"
    if old_algo == new_algo == "stat" and old.split(":")[1] == new.split(":")[1]:
        # maybe the same bytes (a copy, `nat4etl sample` again), maybe not: fetch reruns
        # and hashes them, and the stages after it run only if the bytes differ
        return "has a new modification time (same size)"
    return "changed"


def check_outputs(
    root: Path, record: Mapping[str, Any], cache: DigestCache, *, full: bool = False
) -> list[str]:
    """Recorded outputs that are missing or changed. Cheap unless ``full`` (re-hash all)."""
    problems = []
    other_algo: dict[str, int] = {}  # recorded with another digest: cannot be compared
    for rel, s in sorted((record.get("outputs") or {}).items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"output {rel} is missing")
            continue
        size = path.stat().st_size
        if size != s.get("size_bytes"):
            problems.append(f"output {rel}: size {size} bytes, recorded {s.get('size_bytes')}")
            continue
        recorded_algo = str(s.get("digest")).partition(":")[0]
        if recorded_algo != algo_for(rel):
            other_algo[recorded_algo] = other_algo.get(recorded_algo, 0) + 1
            continue
        digest = file_digest(path, algo_for(rel)) if full else cache.digest(root, rel)
        if digest != s.get("digest"):
            problems.append(f"output {rel}: digest {digest}, recorded {s.get('digest')}")
    for algo, n in sorted(other_algo.items()):
        problems.append(f"{n} output(s) recorded with {algo} digests, now {TABLE_DIGEST}")
    return problems

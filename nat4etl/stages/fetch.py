"""Stage ``fetch``: the NAT4 Zenodo record -> verified local files under their Zenodo names.

Decide, then act (as pooch does):

1. :func:`read_listing` gets the file list: the record JSON over HTTP, or
   ``source_dir/record.json``, or (no record there) the source files themselves.
2. :func:`plan_fetch` decides per needed file: ``up-to-date``, ``copy-from-cache``,
   ``copy-from-source`` or ``download``. It reads the disk (sizes, md5s) and writes nothing.
3. The executor runs the steps on ``jobs`` threads. Every file lands as
   ``<name>.part-<random>`` beside its target, is fsynced, verified (size, then md5) and
   only then ``os.replace``-d: no reader ever sees partial or unverified bytes under a
   final name, in ``dest_dir`` or in the cache.
4. ``record.json`` (as fetched) and ``fetch.json`` (one entry per file) are written,
   atomically, once every file is in place.

The download cache is content-addressed, ``<cache>/zenodo/<md5>/<name>``: a changed remote
file is a new entry, and the same bytes under another record version are reused. Every
cached file is re-hashed when used (cheap next to a download), so a corrupted entry is
detected, deleted and downloaded again. Files reach ``dest_dir`` by hardlink when the
cache is on the same filesystem, else by copy, and are verified again there.

Errors (see ``nat4etl.errors``): :class:`FetchError` (record or file not retrievable,
names the URL), :class:`RemoteUnavailable` (retries exhausted), :class:`ChecksumMismatch`
(names the file, expected and actual), :class:`InputMismatch` (a needed file is not in the
record or the source directory), :class:`ConfigError` (bad arguments).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import secrets
import shlex
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import platformdirs

from nat4etl import net
from nat4etl.config import CACHE_ENV
from nat4etl.errors import (
    ChecksumMismatch,
    ConfigError,
    FetchError,
    InputMismatch,
    RemoteRefused,
    StoreError,
    VerificationError,
)
from nat4etl.formats.zenodo import RemoteFile, parse_record_bytes, record_url
from nat4etl.hashing import md5_file, mismatch, mismatch_of
from nat4etl.nat4 import AREAS, WAV_ZIP, area_files
from nat4etl.progress import NullProgress, Progress
from nat4etl.store import fsync_dir, link_or_copy

if TYPE_CHECKING:
    import httpx

AREA_FILES: dict[str, list[str]] = {area: list(area_files(area).names) for area in AREAS}
WAV_FILE = WAV_ZIP
RECORD_JSON = "record.json"
FETCH_JSON = "fetch.json"
DEFAULT_RECORD_ID = 8044773
DEFAULT_ZENODO_URL = "https://zenodo.org"
VERIFY_ATTEMPTS = 3  # whole re-downloads after an md5 mismatch (network retries are separate)
CANCEL_GRACE_S = 2.0  # after Ctrl-C, how long to let workers clean up
STALE_PART_AGE_S = 24 * 3600  # older temp files are leftovers of a killed run

Action = Literal["up-to-date", "copy-from-cache", "copy-from-source", "download"]

# the stage contract (nat4etl.stages): fetch writes the store's raw area, reads no table


@dataclass(frozen=True)
class FetchStep:
    """What to do for one file, decided before anything is written."""

    remote: RemoteFile
    action: Action
    target: Path
    source: Path | None = None  # the cache entry or source file to copy from
    cache_entry: Path | None = None  # where a download is kept; None: no cache
    stale: tuple[Path, ...] = ()  # existing files that failed verification: delete first
    reason: str = ""

    def describe(self) -> str:
        """One line for logs and ``--dry-run``."""
        return f"{self.remote.name}: {self.action}" + (f" ({self.reason})" if self.reason else "")


@dataclass(frozen=True)
class FetchEntry:
    """One line of ``fetch.json``: a file in ``dest_dir`` and how it was verified."""

    name: str
    size_bytes: int
    md5: str
    source_url: str
    verified_at: str
    via: str  # "download", "cache", "source" or "up-to-date"


@dataclass(frozen=True)
class Listing:
    """The files on offer and the record they came from."""

    remote: list[RemoteFile]
    record_bytes: bytes
    origin: str  # the record URL or the source directory
    published_checksums: bool  # False when md5s were computed from a source dir itself


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch` did. ``entries`` are the needed files, in plan order."""

    dest_dir: Path
    record_id: int
    steps: list[FetchStep]
    entries: list[FetchEntry]
    downloaded_bytes: int

    def count(self, action: Action) -> int:
        return sum(step.action == action for step in self.steps)


# ---------------------------------------------------------------- decide


def needed_files(areas: Iterable[str], *, wav: bool) -> list[str]:
    """Zenodo file names for ``areas`` (``A1``, ``PEG`` or ``all``), plus ``wav.zip``."""
    names: list[str] = []
    for area in normalize_areas(areas):
        names += AREA_FILES[area]
    if wav:
        names.append(WAV_FILE)
    return names


def normalize_areas(areas: Iterable[str]) -> list[str]:
    """Upper-case, expand ``all``, drop repeats; unknown names are a :class:`ConfigError`."""
    if isinstance(areas, str):
        areas = [areas]
    out: list[str] = []
    for area in areas:
        expanded = list(AREA_FILES) if area.lower() == "all" else [area.upper()]
        for name in expanded:
            if name not in AREA_FILES:
                msg = f"`areas`: unknown area {area!r}; expected one of {', '.join(AREA_FILES)} or all"
                raise ConfigError(msg)
            if name not in out:
                out.append(name)
    return out


def default_cache_dir() -> Path:
    """``$NAT4ETL_CACHE`` if set, else the platform's user cache dir for nat4etl."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("nat4etl"))


def cache_entry_path(cache_dir: Path, remote: RemoteFile) -> Path:
    """``<cache>/zenodo/<md5>/<name>``: content-addressed, so a changed file is a new entry."""
    return Path(cache_dir) / "zenodo" / remote.md5 / remote.name


def plan_fetch(
    remote: list[RemoteFile],
    *,
    areas: list[str],
    wav: bool,
    dest_dir: Path,
    cache_dir: Path | None,
    source_dir: Path | None = None,
    cache_writable: bool = True,
) -> list[FetchStep]:
    """Decide, per file the areas need, how it reaches ``dest_dir``. Writes nothing.

    A file already in ``dest_dir`` with the right size and md5 is ``up-to-date``. Otherwise
    it comes from ``source_dir`` when given, else from a cache entry that still verifies,
    else from the network (into the cache when there is one and it is writable). Files that
    fail verification are listed in ``stale`` for the executor to delete (never a file in
    a cache that is not ``cache_writable``: someone else's).

    Raises :class:`InputMismatch` when ``remote`` lacks a needed file.
    """
    by_name = {rf.name: rf for rf in remote}
    names = needed_files(areas, wav=wav)
    missing = [n for n in names if n not in by_name]
    if missing:
        msg = f"the file list has no {', '.join(missing)}; it has {', '.join(sorted(by_name)) or 'nothing'}"
        raise InputMismatch(msg)
    return [
        _plan_one(by_name[n], Path(dest_dir), cache_dir, source_dir, cache_writable) for n in names
    ]


def _plan_one(
    rf: RemoteFile,
    dest_dir: Path,
    cache_dir: Path | None,
    source_dir: Path | None,
    cache_writable: bool = True,
) -> FetchStep:
    target = dest_dir / rf.name
    why = mismatch(target, size_bytes=rf.size_bytes, md5=rf.md5)
    if why is None:
        return FetchStep(rf, "up-to-date", target, reason="size and md5 verified")
    stale = (target,) if why != "missing" else ()
    if source_dir is not None:
        return FetchStep(
            rf, "copy-from-source", target, source=Path(source_dir) / rf.name, stale=stale
        )
    if cache_dir is None:
        return FetchStep(rf, "download", target, stale=stale, reason="no cache")
    entry = cache_entry_path(cache_dir, rf)
    cache_why = mismatch(entry, size_bytes=rf.size_bytes, md5=rf.md5)
    if not cache_writable:  # read what it holds; download the rest straight to dest
        if cache_why is None:
            return FetchStep(rf, "copy-from-cache", target, source=entry, stale=stale)
        why_not = "not cached" if cache_why == "missing" else f"cache entry corrupt: {cache_why}"
        return FetchStep(rf, "download", target, stale=stale, reason=f"{why_not}; cache read-only")
    if cache_why is None:
        return FetchStep(
            rf, "copy-from-cache", target, source=entry, cache_entry=entry, stale=stale
        )
    if cache_why == "missing":
        return FetchStep(
            rf, "download", target, cache_entry=entry, stale=stale, reason="not cached"
        )
    reason = f"cache entry corrupt: {cache_why}"
    return FetchStep(
        rf, "download", target, cache_entry=entry, stale=(*stale, entry), reason=reason
    )


# ---------------------------------------------------------------- read the listing


def read_listing(
    *,
    areas: list[str],
    wav: bool,
    record_id: int = DEFAULT_RECORD_ID,
    zenodo_url: str = DEFAULT_ZENODO_URL,
    source_dir: Path | None = None,
    client: httpx.Client | None = None,
    policy: net.RetryPolicy | None = None,
    timeout_s: float | None = None,
    progress: Progress | None = None,
) -> Listing:
    """The files on offer: from ``source_dir`` when given, else the Zenodo record."""
    progress = progress or NullProgress()
    if source_dir is not None:
        return _listing_from_source(
            Path(source_dir), needed_files(areas, wav=wav), record_id, progress
        )
    if client is None:
        raise ConfigError("`client` is required to read a remote record")
    url = record_url(zenodo_url, record_id)
    progress.log(f"reading record {url}")
    on_retry = _warn(progress, "record")
    data = net.get_bytes(client, url, policy=policy, timeout_s=timeout_s, on_retry=on_retry)
    remote = parse_record_bytes(data, base_url=zenodo_url, record_id=record_id, source=url)
    return Listing(remote, data, url, published_checksums=True)


def _listing_from_source(
    source_dir: Path, names: list[str], record_id: int, progress: Progress
) -> Listing:
    if not source_dir.is_dir():
        raise ConfigError(f"`source_dir`: {source_dir} is not a directory")
    record_path = source_dir / RECORD_JSON
    if record_path.is_file():
        data = record_path.read_bytes()
        listed = parse_record_bytes(
            data, base_url=DEFAULT_ZENODO_URL, record_id=record_id, source=str(record_path)
        )
        # the bytes come from the directory; the record only vouches for them
        remote = [
            replace(rf, url=_file_uri(source_dir / rf.name), fallback_urls=()) for rf in listed
        ]
        listed_id = _record_id(data)
        if listed_id is not None and listed_id != record_id:
            progress.log(
                f"source {source_dir}: its {RECORD_JSON} is record {listed_id}, not the "
                f"record {record_id} asked for (--record / zenodo.record_id); its files are "
                f"checked against its {RECORD_JSON}, and the store's manifest names {listed_id}",
                level="warning",
            )
        progress.log(f"source {source_dir}: verifying files against its {RECORD_JSON}")
        return Listing(remote, data, str(source_dir), published_checksums=True)
    progress.log(
        f"source {source_dir} has no {RECORD_JSON}: taking its files as they are "
        "(md5 computed here, not checked against Zenodo)",
        level="warning",
    )
    absent = [n for n in names if not (source_dir / n).is_file()]
    if absent:
        raise _source_lacks(source_dir, absent)
    remote = [_describe_local(source_dir / n) for n in names]
    record = _synthesized_record(remote, record_id, source_dir)
    return Listing(remote, record, str(source_dir), published_checksums=False)


def _source_lacks(source_dir: Path, absent: list[str]) -> InputMismatch:
    """The error for Zenodo files a mirror does not hold, with what to do about each.

    deepSTRF's ``download_nat4`` unzips what it fetched into folders of the same stem
    (``A1_single_sites/``, ``wav/``), and its loader also took the population tgz
    extracted: a user may point --source at that directory with the archives gone.
    """
    hints = []
    listed = (source_dir / RECORD_JSON).is_file()  # its md5s are Zenodo's: a repack fails them
    for name in absent:
        folder = source_dir / name.removesuffix(".zip").removesuffix(".tgz")
        if folder.is_dir():
            hint = (
                f"{folder.name}/ is {name} unpacked, which nat4etl does not read: put {name} "
                "beside it, as Zenodo publishes it"
            )
            if not listed:  # members are found by their file names, so a repack reads the same
                tool = "zipfile" if name.endswith(".zip") else "tarfile"
                packed, unpacked = (shlex.quote(str(f)) for f in (source_dir / name, folder))
                hint += f", or pack it: `python -m {tool} -c {packed} {unpacked}`"
            hints.append(hint)
    if WAV_FILE in absent:
        hints.append("--no-wav builds without the waveforms")
    hint = f" ({'; '.join(hints)})" if hints else ""
    return InputMismatch(
        f"source {source_dir} lacks {', '.join(absent)}{hint}", path=source_dir / absent[0]
    )


def _record_id(record_json: bytes) -> int | None:
    """The id a record JSON states (``id``, or ``recid`` in older exports), if any."""
    try:
        record = json.loads(record_json)
        value = record.get("id", record.get("recid"))
        return int(value) if value is not None else None
    except (ValueError, TypeError, AttributeError):
        return None


def _describe_local(path: Path) -> RemoteFile:
    return RemoteFile(path.name, path.stat().st_size, md5_file(path), _file_uri(path))


def _synthesized_record(remote: list[RemoteFile], record_id: int, source_dir: Path) -> bytes:
    """A legacy-shape record for a source without one, marked as not from Zenodo."""
    record = {
        "id": record_id,
        "nat4etl_synthesized": f"no {RECORD_JSON} in {source_dir}; sizes and md5s computed from the files",
        "files": [
            {
                "key": rf.name,
                "size": rf.size_bytes,
                "checksum": f"md5:{rf.md5}",
                "links": {"self": rf.url},
            }
            for rf in remote
        ],
    }
    return (json.dumps(record, indent=2) + "\n").encode()


def _file_uri(path: Path) -> str:
    return path.resolve().as_uri()


# ---------------------------------------------------------------- act


def fetch(
    dest_dir: Path,
    *,
    areas: list[str],
    wav: bool = True,
    record_id: int = DEFAULT_RECORD_ID,
    zenodo_url: str = DEFAULT_ZENODO_URL,
    source_dir: Path | None = None,
    cache_dir: Path | None = None,
    jobs: int = 2,
    progress: Progress | None = None,
    client: httpx.Client | None = None,
    max_attempts: int = 5,
    timeout_s: float = 60.0,
    backoff_base_s: float = 1.0,
    retry_after_cap_s: float = 120.0,
    shown_dir: Path | None = None,
) -> FetchResult:
    """Make ``dest_dir`` hold the verified Zenodo files the areas need.

    Parameters
    ----------
    dest_dir
        The store's raw area; created if needed. After success it holds the files under
        their Zenodo names, ``record.json`` and ``fetch.json``.
    areas
        ``["A1"]``, ``["PEG"]``, ``["A1", "PEG"]`` or ``["all"]``.
    wav
        Also fetch ``wav.zip`` (default True).
    record_id, zenodo_url
        The record to read, ``GET {zenodo_url}/api/records/{record_id}``; default 8044773
        on https://zenodo.org.
    source_dir
        Take the files from this directory instead of the network, verified against its
        ``record.json`` when it has one (else accepted as they are, with a warning).
    cache_dir
        Download cache root; default ``$NAT4ETL_CACHE``, else the platform user cache dir.
        Not used with ``source_dir``. A cache that cannot be created is skipped, one that
        cannot be written (another user's, a read-only mount) is only read, with a warning.
    jobs
        Parallel transfers (threads), default 2.
    progress
        Where progress and log lines go; default: nowhere.
    client
        An httpx client to use (tests, proxies); default a new one with nat4etl's
        User-Agent. Not closed by ``fetch`` when given.
    max_attempts, timeout_s, backoff_base_s, retry_after_cap_s
        Network retries: see :mod:`nat4etl.net`. ``timeout_s`` applies to connect and to
        each read, not to the whole file.
    shown_dir
        What the log calls ``dest_dir`` (a build writes into a staging copy of the store,
        but the user knows it by its published path).

    Raises
    ------
    FetchError
        The record or a file cannot be retrieved (the message names the URL);
        :class:`RemoteUnavailable` when retries ran out.
    ChecksumMismatch
        A file's size or md5 never matched (names the file, expected and actual).
    InputMismatch
        The record or source directory lacks a needed file.
    ConfigError
        Bad arguments.

    On any error no unverified file is left under a final name and temp files are
    removed (a worker stuck in a read at Ctrl-C may leave one ``.part-*``); files already
    verified stay. ``record.json`` and ``fetch.json`` are removed as soon as anything is
    about to change and written back only when every file is in place, so when present
    they always describe the files beside them.
    """
    if jobs < 1:
        raise ConfigError(f"`jobs` must be >= 1, got {jobs}")
    if not needed_files(areas, wav=wav):
        raise ConfigError("nothing to fetch: `areas` is empty and `wav` is False")
    dest_dir = Path(dest_dir)
    if source_dir is not None and _same_dir(source_dir, dest_dir):
        raise ConfigError(f"`source_dir` and `dest_dir` are the same directory ({dest_dir})")
    progress = progress or NullProgress()
    cancel = threading.Event()
    policy = net.RetryPolicy(
        max_attempts=max_attempts,
        backoff_base_s=backoff_base_s,
        retry_after_cap_s=retry_after_cap_s,
        sleep=lambda s: _cancellable_sleep(cancel, s),
    )
    own_client = client is None and source_dir is None
    http = net.make_client(timeout_s=timeout_s) if own_client else client
    try:
        listing = read_listing(
            areas=areas,
            wav=wav,
            record_id=record_id,
            zenodo_url=zenodo_url,
            source_dir=source_dir,
            client=http,
            policy=policy,
            timeout_s=timeout_s,
            progress=progress,
        )
        dest_dir.mkdir(parents=True, exist_ok=True)
        cache, cache_writable = (
            (None, False) if source_dir is not None else _usable_cache(cache_dir, progress)
        )
        shown = shown_dir or dest_dir
        progress.log(f"checking files already in {shown}" + (f" and {cache}" if cache else ""))
        steps = plan_fetch(
            listing.remote,
            areas=areas,
            wav=wav,
            dest_dir=dest_dir,
            cache_dir=cache,
            source_dir=source_dir,
            cache_writable=cache_writable,
        )
        absent = [
            step.remote.name
            for step in steps
            if step.action == "copy-from-source" and not step.source.is_file()
        ]
        if absent:  # all at once, before anything changes
            raise _source_lacks(Path(source_dir), absent)
        if any(step.action != "up-to-date" for step in steps):
            _forget_manifests(dest_dir)  # until the end, they would vouch for changing files
        executor = _Executor(http, policy, timeout_s, progress, cancel, dest_dir, shown)
        entries = executor.run(steps, jobs=jobs)
    finally:
        if own_client and http is not None:
            http.close()
    try:
        _write_manifests(dest_dir, listing, entries, record_id)
    except OSError as err:
        raise _io_error(err, dest_dir / FETCH_JSON, dest_dir) from err
    progress.log(_summary(steps, executor.downloaded_bytes, shown_dir or dest_dir))
    return FetchResult(dest_dir, record_id, steps, entries, executor.downloaded_bytes)


def run(store, settings, progress) -> dict:
    """Stage entry point for ``build`` and the CLI: :func:`fetch` into ``store.raw_dir``
    with the settings' values; returns a flat summary for the log."""
    result = fetch(
        store.raw_dir,
        areas=list(settings.areas),
        wav=settings.wav,
        record_id=settings.record_id,
        zenodo_url=settings.zenodo_url,
        source_dir=settings.source_dir,
        cache_dir=settings.cache_dir,
        jobs=settings.jobs,
        progress=progress,
        max_attempts=settings.max_attempts,
        timeout_s=settings.timeout_s,
        shown_dir=store.shown_raw_dir,
    )
    return {
        "files": len(result.entries),
        "up_to_date": result.count("up-to-date"),
        "from_cache": result.count("copy-from-cache"),
        "from_source": result.count("copy-from-source"),
        "downloaded": result.count("download"),
        "downloaded_bytes": result.downloaded_bytes,
    }


def _usable_cache(cache_dir: Path | None, progress: Progress) -> tuple[Path | None, bool]:
    """The cache root, created, and whether we can write there; None (with a warning)
    when it cannot be created. One that exists but is read-only to us (a shared cache of
    another user, a read-only mount) is read, not written, with a warning."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        (root / "zenodo").mkdir(parents=True, exist_ok=True)
    except OSError as err:
        progress.log(f"cache {root} unusable ({err}); downloading without a cache", level="warning")
        return None, False
    try:  # mkdir succeeds on an existing directory, writable or not: try a file
        fd, probe = tempfile.mkstemp(dir=root / "zenodo", prefix=".nat4etl-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        reason = err.strerror or str(err)
        progress.log(
            f"cache {root} is read-only ({reason}): using the files it holds, "
            "downloading the others without caching them",
            level="warning",
        )
        return root, False
    return root, True


class _Cancelled(Exception):
    """Raised in workers after the main thread was interrupted."""


def _cancellable_sleep(cancel: threading.Event, seconds: float) -> None:
    if cancel.wait(seconds):
        raise _Cancelled


class _Executor:
    """Runs planned steps; every file it writes goes through part -> verify -> replace."""

    def __init__(
        self,
        client: httpx.Client | None,
        policy: net.RetryPolicy,
        timeout_s: float,
        progress: Progress,
        cancel: threading.Event,
        dest_dir: Path | None = None,
        shown_dir: Path | None = None,
    ) -> None:
        self.client = client
        self.policy = policy
        self.timeout_s = timeout_s
        self.progress = progress
        self.cancel = cancel
        self.dest_dir = dest_dir
        #: what the log calls ``dest_dir``: a build's is raw/ of a staging copy of OUT
        self.shown_dir = shown_dir
        self.downloaded_bytes = 0
        self.used_urls: dict[str, str] = {}  # file name -> the URL its bytes came from
        self._lock = threading.Lock()

    def run(self, steps: list[FetchStep], *, jobs: int) -> list[FetchEntry]:
        """All steps, ``jobs`` at a time; the first error (in plan order) is raised after
        the others finished, so one bad file does not waste the other transfers.

        Workers are daemon threads: on Ctrl-C they stop at their next chunk or retry wait
        (removing their temp file); one stuck in a read is abandoned after
        ``CANCEL_GRACE_S`` rather than holding the process for a whole timeout. What it
        leaves is a ``.part-*`` file, never a final name.
        """
        _remove_stale_parts(steps)
        todo: queue.SimpleQueue[tuple[int, FetchStep]] = queue.SimpleQueue()
        # largest first, so the last file started is a small one and the threads end
        # together (results stay in plan order)
        for item in sorted(enumerate(steps), key=lambda item: -item[1].remote.size_bytes):
            todo.put(item)
        results: list[FetchEntry | BaseException | None] = [None] * len(steps)

        def work(finished: threading.Event) -> None:
            try:
                while not self.cancel.is_set():
                    try:
                        i, step = todo.get_nowait()
                    except queue.Empty:
                        return
                    try:
                        results[i] = self._run_step(step)
                    except BaseException as err:  # reported by the main thread, in plan order
                        results[i] = err
            finally:
                finished.set()

        # Events, not Thread.join: a join interrupted by Ctrl-C can mark a live thread
        # stopped (CPython bpo-45274 handling), which would end the grace wait early.
        finished = [threading.Event() for _ in range(min(jobs, len(steps)))]
        for k, event in enumerate(finished):
            threading.Thread(
                target=work, args=(event,), name=f"nat4etl-fetch-{k}", daemon=True
            ).start()
        try:
            for event in finished:
                while not event.wait(0.5):  # short waits keep the main thread responsive to Ctrl-C
                    pass
        except BaseException:
            self.cancel.set()
            deadline_s = time.monotonic() + CANCEL_GRACE_S
            for event in finished:
                event.wait(max(0.0, deadline_s - time.monotonic()))
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        for err in errors[1:]:
            self.progress.log(str(err), level="error")
        if errors:
            raise errors[0]
        return [r for r in results if isinstance(r, FetchEntry)]

    def _run_step(self, step: FetchStep) -> FetchEntry:
        """One step; a failed read or write (a full disk, a quota, EIO) is a one-line
        :class:`StoreError` naming the file, where the OSError names a temp file or nothing."""
        try:
            return self._run_step_io(step)
        except OSError as err:
            raise _io_error(err, step.target) from err

    def _run_step_io(self, step: FetchStep) -> FetchEntry:
        name = step.remote.name
        for path in step.stale:
            self.progress.log(
                f"{name}: {self._shown(path)} failed verification; deleted", level="warning"
            )
            path.unlink(missing_ok=True)
        if step.action == "up-to-date":
            self.progress.log(f"{name}: up to date")
            return self._entry(step.remote, "up-to-date")
        if step.action == "copy-from-source":
            assert step.source is not None
            self._copy_from_source(step)
            return self._entry(step.remote, "source")
        if step.action == "copy-from-cache" and self._copy_from_cache(step):
            return self._entry(step.remote, "cache")
        self._download(step)
        return self._entry(step.remote, "download")

    def _shown(self, path: Path) -> Path:
        """``path`` as the user knows it: in the published store, not its staging copy."""
        if self.shown_dir is None or self.dest_dir is None:
            return path
        if path == self.dest_dir:
            return self.shown_dir
        return self.shown_dir / path.name if path.parent == self.dest_dir else path

    def _copy_from_source(self, step: FetchStep) -> None:
        assert step.source is not None
        if not step.source.is_file():
            raise _source_lacks(step.source.parent, [step.remote.name])
        # copied, never hardlinked: the user may rewrite their mirror in place later
        why = self._install(step.source, step.target, step.remote, link=False)
        if why is not None:
            msg = f"{why} (source {step.source}); nothing written under the final name"
            raise ChecksumMismatch(msg, path=step.target)
        self.progress.log(f"{step.remote.name}: copied from {step.source.parent}, verified")

    def _copy_from_cache(self, step: FetchStep) -> bool:
        """True when the cache entry installed and verified; else it is deleted (False)."""
        assert step.source is not None
        why = self._install(step.source, step.target, step.remote, link=True)
        if why is None:
            self.progress.log(f"{step.remote.name}: from cache, verified")
            return True
        if step.cache_entry is None:  # a read-only cache: not ours to delete
            self.progress.log(
                f"{step.remote.name}: cache entry {why} (cache read-only); downloading",
                level="warning",
            )
            return False
        self.progress.log(
            f"{step.remote.name}: cache entry {why}; deleted, downloading", level="warning"
        )
        step.source.unlink(missing_ok=True)
        return False

    def _download(self, step: FetchStep) -> None:
        """Download into the cache entry (or straight to the target), then install.

        A cache that cannot take the file (full, over quota, turned read-only) is left
        out for this file, with a warning: the download goes straight to the target."""
        rf = step.remote
        if step.cache_entry is not None:
            try:
                self._download_to(step, step.cache_entry)
                return
            except _CacheUnwritable as err:
                reason = (err.os_error.strerror or str(err.os_error)).replace("\n", " ")
                self.progress.log(
                    f"{rf.name}: cannot write the cache entry {step.cache_entry.parent} "
                    f"({reason}); downloading straight into {self._shown(step.target.parent)}",
                    level="warning",
                )
                step = replace(step, cache_entry=None)
        self._download_to(step, step.target)

    def _download_to(self, step: FetchStep, kept: Path) -> None:
        rf = step.remote
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _write_failure(err, kept, step.target) from err
        attempts = min(VERIFY_ATTEMPTS, self.policy.max_attempts)
        why = ""
        for attempt in range(1, attempts + 1):
            why = self._download_once(rf, kept, step.target)
            if why is None:
                break
            more = "downloading again" if attempt < attempts else "giving up"
            self.progress.log(
                f"{rf.name}: {why} (download {attempt}/{attempts}); temp file deleted, {more}",
                level="warning",
            )
        else:
            msg = (
                f"{why} after {attempts} downloads from {rf.url}; temp file deleted, nothing written "
                "under the final name. Hint: the record may have changed; rerun later"
            )
            raise ChecksumMismatch(msg, path=step.target)
        if step.cache_entry is not None:
            install_why = self._install(
                step.cache_entry, step.target, rf, link=True, count_progress=False
            )
            if install_why is not None:
                msg = f"{install_why} copying from cache {step.cache_entry}; nothing written under the final name"
                raise ChecksumMismatch(msg, path=step.target)
        self.progress.log(f"{rf.name}: downloaded, md5 verified")

    def _download_once(self, rf: RemoteFile, final: Path, target: Path) -> str | None:
        """One verified download to ``final`` (the cache entry or ``target``); None on
        success, else the mismatch. Network errors name ``target``."""
        part = _part_path(final)
        self.progress.start(rf.name, total=rf.size_bytes)
        try:
            try:
                self._download_from_any(rf, part)
            except (FetchError, VerificationError) as err:  # same class, naming the file
                msg = f"{err.msg}; nothing written under the final name"
                raise type(err)(msg, path=target) from err
            why = mismatch(part, size_bytes=rf.size_bytes, md5=rf.md5)
            if why is None:
                _publish(part, final)
            return why
        except OSError as err:
            raise _write_failure(err, final, target) from err
        finally:
            with contextlib.suppress(OSError):  # a cache turned read-only: not the error
                part.unlink(missing_ok=True)
            self.progress.done(rf.name)

    def _download_from_any(self, rf: RemoteFile, part: Path) -> None:
        """``rf.url`` into ``part``, else the first of its fallbacks the server serves: a
        refusal (404, 403, 410) moves on, any other failure ends the download."""
        urls = (rf.url, *rf.fallback_urls)
        refusals: list[str] = []
        for i, url in enumerate(urls):
            try:
                net.download(
                    self._http(),
                    url,
                    part,
                    size_bytes=rf.size_bytes,
                    policy=self.policy,
                    timeout_s=self.timeout_s,
                    on_bytes=lambda n: self._advance(rf.name, n, network=True),
                    on_restart=lambda: self.progress.reset(rf.name),
                    on_retry=_warn(self.progress, rf.name),
                )
            except RemoteRefused as err:
                if err.status_code not in _REFUSALS_WITH_FALLBACK:
                    raise
                refusals.append(err.msg.removesuffix("; not retried"))
                if i + 1 < len(urls):
                    self.progress.log(
                        f"{rf.name}: {refusals[-1]}; trying {urls[i + 1]}", level="warning"
                    )
                    continue
                if len(refusals) == 1:
                    raise
                raise RemoteRefused(
                    f"{'; '.join(refusals)}; every URL refused", status_code=err.status_code
                ) from err
            self.used_urls[rf.name] = url
            return

    def _install(
        self, source: Path, target: Path, rf: RemoteFile, *, link: bool, count_progress: bool = True
    ) -> str | None:
        """Hardlink (``link``, when the filesystem allows) or copy ``source`` to a part beside
        ``target``, verify, replace.

        Returns None when installed, else why the copy failed verification (nothing is
        left under ``target``).
        """
        part = _part_path(target)
        if count_progress:
            self.progress.start(rf.name, total=rf.size_bytes)
        try:
            # a copy right after a download is not shown again: its bytes were counted
            shown = rf.name if count_progress else None
            copied_md5 = link_or_copy(
                source, part, link=link, on_bytes=lambda n: self._advance(shown, n), hash_algo="md5"
            )
            # a copy was hashed as it was written (one pass over the bytes, not two); a
            # hardlink is read here
            why = (
                mismatch(part, size_bytes=rf.size_bytes, md5=rf.md5)
                if copied_md5 is None
                else mismatch_of(part.stat().st_size, copied_md5, rf.size_bytes, rf.md5)
            )
            if why is None:
                _publish(part, target)
            return why
        except OSError as err:
            raise _io_error(err, target, target.parent) from err
        finally:
            part.unlink(missing_ok=True)
            if count_progress:
                self.progress.done(rf.name)

    def _advance(self, name: str | None, n: int, *, network: bool = False) -> None:
        """Count ``n`` bytes for task ``name`` (None: not shown); stop here after Ctrl-C."""
        if self.cancel.is_set():
            raise _Cancelled
        if network:
            with self._lock:
                self.downloaded_bytes += n
        if name is not None:
            self.progress.advance(name, n)

    def _http(self) -> httpx.Client:
        if self.client is None:
            raise ConfigError("a download was planned without an HTTP client")
        return self.client

    def _entry(self, rf: RemoteFile, via: str) -> FetchEntry:
        url = self.used_urls.get(rf.name, rf.url)
        return FetchEntry(rf.name, rf.size_bytes, rf.md5, url, _now_iso(), via)


#: statuses after which a file's fallback URLs are tried (not found, forbidden, gone)
_REFUSALS_WITH_FALLBACK = frozenset({403, 404, 410})

#: a cache entry that fails to write with one of these is skipped, not fatal
_CACHE_UNWRITABLE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
)


class _CacheUnwritable(Exception):
    """A download into the cache failed on a write the target may still take."""

    def __init__(self, os_error: OSError):
        super().__init__(str(os_error))
        self.os_error = os_error


def _write_failure(err: OSError, written: Path, target: Path) -> Exception:
    """What a failed write of ``written`` (a cache entry, or ``target`` itself) raises:
    :class:`_CacheUnwritable` when the target may still take it, else a StoreError."""
    if written != target and err.errno in _CACHE_UNWRITABLE_ERRNOS:
        return _CacheUnwritable(err)
    return _io_error(err, target, written.parent)


def _io_error(err: OSError, target: Path, directory: Path | None = None) -> StoreError:
    """``<name>: cannot read or write <where> (<reason>); nothing written under the final
    name``: ``where`` is the file the OSError names, else the directory being written."""
    reason = (err.strerror or str(err)).replace("\n", " ")
    where = err.filename if err.filename is not None else directory
    at = f" {where}" if where is not None else ""
    msg = f"cannot read or write{at} ({reason}); nothing written under the final name"
    return StoreError(msg, path=target)


def _part_path(final: Path) -> Path:
    """``<name>.part-<random>`` beside ``final``: same filesystem, so the rename is atomic."""
    return final.with_name(f"{final.name}.part-{secrets.token_hex(6)}")


def _publish(part: Path, final: Path) -> None:
    """Rename a verified part to its final name and make the rename durable."""
    os.replace(part, final)
    fsync_dir(final.parent)


def _remove_stale_parts(steps: list[FetchStep], *, older_than_s: float = STALE_PART_AGE_S) -> None:
    """Delete temp files a killed run left beside our targets. Recent ones may belong to a
    concurrent fetch sharing the cache, so they are left alone."""
    now_s = time.time()
    for step in steps:
        for final in filter(None, (step.target, step.cache_entry)):
            if not final.parent.is_dir():
                continue
            for part in final.parent.glob(f"{final.name}.part-*"):
                try:
                    if now_s - part.stat().st_mtime > older_than_s:
                        part.unlink()
                except OSError:
                    pass


def _write_manifests(
    dest_dir: Path, listing: Listing, entries: list[FetchEntry], record_id: int
) -> None:
    """``record.json`` as fetched, then ``fetch.json``: exactly the files this run verified
    (never entries carried over from earlier runs: readers trust these md5s)."""
    manifest = {
        "record_id": record_id,
        "origin": listing.origin,
        "published_checksums": listing.published_checksums,
        "files": [asdict(e) for e in entries],
    }
    _write_atomic(dest_dir / RECORD_JSON, listing.record_bytes)
    _write_atomic(dest_dir / FETCH_JSON, (json.dumps(manifest, indent=2) + "\n").encode())


def _forget_manifests(dest_dir: Path) -> None:
    for name in (FETCH_JSON, RECORD_JSON):
        (dest_dir / name).unlink(missing_ok=True)


def _write_atomic(path: Path, data: bytes) -> None:
    part = _part_path(path)
    try:
        with open(part, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(part, path)
    finally:
        part.unlink(missing_ok=True)


def _summary(steps: list[FetchStep], downloaded_bytes: int, dest_dir: Path) -> str:
    counts = {
        a: sum(s.action == a for s in steps)
        for a in ("up-to-date", "copy-from-cache", "copy-from-source", "download")
    }
    parts = [f"{n} {a}" for a, n in counts.items() if n]
    return f"fetch: {len(steps)} files in {dest_dir} ({', '.join(parts)}; {downloaded_bytes} bytes downloaded)"


def _warn(progress: Progress, name: str) -> Callable[[str], None]:
    return lambda msg: progress.log(f"{name}: {msg}", level="warning")


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")

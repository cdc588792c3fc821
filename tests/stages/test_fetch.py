"""The fetch stage against a Zenodo-shaped server on 127.0.0.1 (tests/fake_zenodo.py).

Every fault either recovers to the verified file or fails with a clear error, leaving no
file under its final name and nothing unverified in the cache.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import socket
import time
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow.parquet as pq
import pytest
from fake_zenodo import (
    RECORD,
    ZENODO_NAMES,
    FakeZenodo,
    Fault,
    content_name,
    random_files,
)  # tests/ is on sys.path via conftest
from rich.console import Console

from nat4etl import hashing
from nat4etl.errors import (
    ChecksumMismatch,
    ConfigError,
    FetchError,
    FormatError,
    InputMismatch,
    RemoteRefused,
    RemoteUnavailable,
    StoreError,
)
from nat4etl.formats.zenodo import RemoteFile, parse_record, parse_record_bytes
from nat4etl.hashing import md5_bytes, md5_file
from nat4etl.net import USER_AGENT
from nat4etl.progress import (
    JsonProgress,
    NullProgress,
    PlainProgress,
    RichProgress,
    format_amount,
    make_progress,
)
from nat4etl.stages import fetch as fetch_stage
from nat4etl.stages.fetch import (
    AREA_FILES,
    WAV_FILE,
    cache_entry_path,
    default_cache_dir,
    fetch,
    needed_files,
    plan_fetch,
)

FAST = {"backoff_base_s": 0.01, "timeout_s": 5.0, "max_attempts": 4}
TARGET = "A1_single_sites.zip"  # the file faults are injected on


@pytest.fixture
def server():
    with FakeZenodo(random_files(seed=1)) as srv:
        yield srv


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def run(server: FakeZenodo, dest: Path, cache: Path | None, **kw: Any):
    kw = {"areas": ["all"], "zenodo_url": server.url, "cache_dir": cache, **FAST, **kw}
    return fetch(dest, **kw)


class Recorder(NullProgress):
    """Keeps log lines; checks on every advance that no final name exists yet."""

    def __init__(self, dest: Path | None = None) -> None:
        self.lines: list[tuple[str, str]] = []
        self.dest = dest
        self.premature: list[str] = []

    def advance(self, task: str, n: int) -> None:
        if self.dest is not None and (self.dest / task).exists():
            self.premature.append(task)

    def log(self, msg: str, *, level: str = "info", **fields: Any) -> None:
        self.lines.append((level, msg))

    def warnings(self) -> list[str]:
        return [m for lvl, m in self.lines if lvl == "warning"]


def parts_under(*dirs: Path) -> list[Path]:
    return [p for d in dirs if d.exists() for p in d.rglob("*.part-*")]


def assert_cache_clean(cache: Path) -> None:
    """Every cache entry verifies against the md5 in its path; no temp files."""
    assert parts_under(cache) == []
    for entry in (cache / "zenodo").glob("*/*"):
        assert md5_file(entry) == entry.parent.name, f"corrupt cache entry {entry}"


def assert_has(dest: Path, server: FakeZenodo, names: list[str]) -> None:
    for name in names:
        assert (dest / name).read_bytes() == server.files[name], name


# ------------------------------------------------------------ the happy path


@pytest.mark.parametrize("jobs", [1, 3])
def test_fetch_all_verified_with_manifests(
    server: FakeZenodo, tmp_path: Path, cache: Path, jobs: int
) -> None:
    dest = tmp_path / "raw"
    result = run(server, dest, cache, jobs=jobs)

    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [*ZENODO_NAMES, "record.json", "fetch.json"]
    )
    assert_has(dest, server, ZENODO_NAMES)
    assert json.loads((dest / "record.json").read_bytes()) == server.record()
    manifest = json.loads((dest / "fetch.json").read_text())
    assert manifest["record_id"] == 8044773 and manifest["published_checksums"] is True
    by_name = {e["name"]: e for e in manifest["files"]}
    assert sorted(by_name) == sorted(ZENODO_NAMES)
    for name, entry in by_name.items():
        assert entry["md5"] == server.md5(name) and entry["size_bytes"] == len(server.files[name])
        assert entry["source_url"].startswith(server.url) and entry["via"] == "download"
        datetime.fromisoformat(entry["verified_at"])
    assert result.count("download") == 7 and result.downloaded_bytes == sum(
        map(len, server.files.values())
    )
    assert all(r.headers["user-agent"] == USER_AGENT for r in server.requests)
    assert_cache_clean(cache)


def test_second_fetch_downloads_nothing(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    run(server, tmp_path / "raw", cache)
    server.clear_log()
    result = run(server, tmp_path / "raw", cache)
    assert server.content_gets() == []
    assert len(server.record_gets()) == 1
    assert result.count("up-to-date") == 7 and result.downloaded_bytes == 0


def test_area_subset(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    dest = tmp_path / "raw"
    run(server, dest, cache, areas=["PEG"], wav=False)
    requested = {content_name(r.path) for r in server.content_gets()}
    assert requested == set(AREA_FILES["PEG"])
    assert not (dest / "A1_single_sites.zip").exists() and not (dest / WAV_FILE).exists()
    run(server, dest, cache, areas=["a1"], wav=False)
    # fetch.json lists what this run verified, nothing carried over
    names = [e["name"] for e in json.loads((dest / "fetch.json").read_text())["files"]]
    assert names == AREA_FILES["A1"]


def test_no_final_name_before_verification(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    dest = tmp_path / "raw"
    server.inject(TARGET, Fault("drop"), Fault("wrong_bytes"))
    progress = Recorder(dest)
    run(server, dest, cache, progress=progress)
    assert progress.premature == []
    assert_has(dest, server, ZENODO_NAMES)


def test_existing_corrupt_file_in_dest_is_replaced(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    dest = tmp_path / "raw"
    run(server, dest, cache)
    data = bytearray((dest / TARGET).read_bytes())
    data[10] ^= 0xFF
    (dest / TARGET).unlink()  # a hardlink to the cache: replace, do not edit in place
    (dest / TARGET).write_bytes(bytes(data))
    server.clear_log()
    progress = Recorder()
    run(server, dest, cache, progress=progress)
    assert_has(dest, server, [TARGET])
    assert server.content_gets() == []  # the cache still had it
    assert any("failed verification" in w for w in progress.warnings())


@pytest.mark.parametrize("shape", ["legacy", "new", "export"])
def test_record_shapes(tmp_path: Path, cache: Path, shape: str) -> None:
    with FakeZenodo(random_files(seed=2), shape=shape) as srv:
        run(srv, tmp_path / "raw", cache, areas=["A1"], wav=False)
        assert_has(tmp_path / "raw", srv, AREA_FILES["A1"])
        paths = [r.path for r in srv.content_gets()]
    expected_prefix = {
        "legacy": "/api/records/8044773/files/",  # built from the id, not links.self
        "new": "/api/records/8044773/files/",  # built from the base URL: no links
        "export": "/api/records/8044773/files/",  # links.content
    }[shape]
    assert all(p.startswith(expected_prefix) for p in paths)
    assert all(p.endswith("?via=links.content") == (shape == "export") for p in paths)


# ------------------------------------------------------------ faults that recover


RECOVERABLE = {
    "429 Retry-After": [Fault("status", status=429, retry_after="0")],
    "500": [Fault("status", status=500)],
    "503 twice": [Fault("status", status=503, times=2)],
    "drop mid-body": [Fault("drop")],
    "drop, then 200 to Range": [Fault("drop"), Fault("ignore_range")],
    "wrong bytes once": [Fault("wrong_bytes")],
    # every byte arrives before the lie shows: the drop is reported, the file is complete
    "Content-Length too high": [Fault("length_high")],
    "Content-Length too low": [Fault("length_low")],
    "slow past the timeout": [Fault("slow", delay_s=1.5)],
    "drop on every response": [Fault("drop", after_bytes=30_000, times=None)],
    "stall mid-body past the read timeout": [Fault("stall", after_bytes=10_000, delay_s=1.5)],
    "drop, then 206 from the wrong byte": [Fault("drop", after_bytes=10_000), Fault("bad_range")],
    "drop, then no Content-Length": [Fault("drop", after_bytes=10_000), Fault("no_length")],
    "gzip despite Accept-Encoding: identity": [Fault("gzip")],
    "429 Retry-After as a past HTTP date": [
        Fault("status", status=429, retry_after="Wed, 21 Oct 2015 07:28:00 GMT")
    ],
}


@pytest.mark.parametrize("faults", list(RECOVERABLE.values()), ids=list(RECOVERABLE))
def test_fault_recovers(
    server: FakeZenodo, tmp_path: Path, cache: Path, faults: list[Fault]
) -> None:
    dest = tmp_path / "raw"
    server.inject(TARGET, *faults)
    progress = Recorder(dest)
    run(server, dest, cache, areas=["A1"], wav=False, timeout_s=0.5, progress=progress)
    assert_has(dest, server, AREA_FILES["A1"])
    assert progress.premature == []
    assert progress.warnings(), "a recovered fault should still be reported"
    assert len(server.content_gets(TARGET)) >= (1 if faults[0].kind == "length_high" else 2)
    assert (dest / "fetch.json").exists()
    assert parts_under(dest) == []
    assert_cache_clean(cache)


def test_drop_resumes_with_range(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    server.inject(TARGET, Fault("drop", after_bytes=10_000))
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    first, second = server.content_gets(TARGET)
    assert "range" not in first.headers
    assert second.headers["range"] == "bytes=10000-" and second.status == 206
    assert_has(tmp_path / "raw", server, [TARGET])


def test_retry_after_is_honoured(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    server.inject(TARGET, Fault("status", status=429, retry_after="1"))
    started = time.monotonic()
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    assert time.monotonic() - started >= 1.0
    assert_has(tmp_path / "raw", server, [TARGET])


def test_redirect_to_storage_keeps_range_and_retries(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    """Zenodo sends downloads to a storage host: each retry starts again at the content URL
    (a fresh redirect, as a signed storage URL may have expired) and keeps its Range."""
    server.inject(TARGET, Fault("redirect", times=None))
    server.inject(f"storage:{TARGET}", Fault("drop", after_bytes=10_000))
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    gets = [
        (r.path.split("/")[1], r.headers.get("range"), r.status)
        for r in server.content_gets(TARGET)
    ]
    assert gets == [
        ("api", None, 302),
        ("storage", None, 200),
        ("api", "bytes=10000-", 302),
        ("storage", "bytes=10000-", 206),
    ]
    assert_has(tmp_path / "raw", server, [TARGET])


def test_slow_but_alive_is_not_a_timeout(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    server.inject(TARGET, Fault("trickle", after_bytes=32_768, delay_s=0.2))
    progress = Recorder()
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False, timeout_s=0.5, progress=progress)
    assert len(server.content_gets(TARGET)) == 1 and progress.warnings() == []
    assert_has(tmp_path / "raw", server, [TARGET])


def test_record_429_with_retry_after_date_is_honoured(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    from datetime import UTC, timedelta
    from email.utils import format_datetime

    when = format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    server.inject(RECORD, Fault("status", status=429, retry_after=when))
    started = time.monotonic()
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    assert time.monotonic() - started >= 1.0  # the date has one-second resolution
    assert len(server.record_gets()) == 2
    assert_has(tmp_path / "raw", server, AREA_FILES["A1"])


# ------------------------------------------------------------ faults that fail


FATAL = {
    "503 forever": ([Fault("status", status=503, times=None)], RemoteUnavailable, "HTTP 503"),
    "429 forever": (
        [Fault("status", status=429, retry_after="0", times=None)],
        RemoteUnavailable,
        "HTTP 429",
    ),
    "404": ([Fault("status", status=404, times=None)], FetchError, "HTTP 404"),
    "slow forever": ([Fault("slow", delay_s=1.5, times=None)], RemoteUnavailable, "ReadTimeout"),
    "drop before any byte": (
        [Fault("drop", after_bytes=0, times=None)],
        RemoteUnavailable,
        "gave up",
    ),
    "wrong bytes forever": (
        [Fault("wrong_bytes", times=None)],
        ChecksumMismatch,
        "md5 mismatch: expected",
    ),
}


@pytest.mark.parametrize(("faults", "error", "text"), list(FATAL.values()), ids=list(FATAL))
def test_fault_fails_cleanly(
    server: FakeZenodo, tmp_path: Path, cache: Path, faults: list[Fault], error: type, text: str
) -> None:
    dest = tmp_path / "raw"
    server.inject(TARGET, *faults)
    with pytest.raises(error, match=text) as info:
        run(server, dest, cache, areas=["A1"], wav=False, timeout_s=0.3, max_attempts=3)
    message = str(info.value)
    assert message.startswith(f"{TARGET}: ") and info.value.path == str(dest / TARGET)
    assert "nothing written under the final name" in message and "\n" not in message
    assert not (dest / TARGET).exists()
    assert not (dest / "fetch.json").exists() and not (dest / "record.json").exists()
    assert parts_under(dest, cache) == []
    assert not cache_entry_path(cache, _remote(server, TARGET)).exists()
    assert_cache_clean(cache)
    # the other files were not held hostage by the bad one
    assert_has(dest, server, [n for n in AREA_FILES["A1"] if n != TARGET])


def test_a_refused_url_falls_back_to_the_record_pages_download_link(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    """The dataset notes' fallback: ``/records/<id>/files/<key>?download=1`` when the API's
    content URL is refused (Zenodo has moved its routes before); fetch.json says which
    URL the bytes came from."""
    server.inject(TARGET, Fault("status", status=404))
    progress = Recorder()
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False, progress=progress)
    assert_has(tmp_path / "raw", server, AREA_FILES["A1"])
    web = f"/records/{server.record_id}/files/{TARGET}?download=1"
    assert [r.path for r in server.content_gets(TARGET)] == [
        f"/api/records/{server.record_id}/files/{TARGET}/content",
        web,
    ]
    (warning,) = [w for w in progress.warnings() if w.startswith(TARGET)]
    assert "HTTP 404" in warning and f"trying {server.url}{web}" in warning
    entries = json.loads((tmp_path / "raw" / "fetch.json").read_text())["files"]
    urls = {e["name"]: e["source_url"] for e in entries}
    assert urls[TARGET] == f"{server.url}{web}"
    assert urls["A1_pred_correlation.csv"].endswith("/content")


def test_every_url_refused_names_each_and_other_statuses_do_not_fall_back(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    server.inject(TARGET, Fault("status", status=410, times=None))
    with pytest.raises(RemoteRefused) as info:
        run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    message = str(info.value)
    assert message.count("HTTP 410") == 2 and "every URL refused" in message
    assert "?download=1" in message and "\n" not in message
    assert len(server.content_gets(TARGET)) == 2
    server.clear_faults()
    server.clear_log()
    server.inject(TARGET, Fault("status", status=401, times=None))  # not a moved route
    with pytest.raises(RemoteRefused, match="HTTP 401"):
        run(server, tmp_path / "raw2", cache, areas=["A1"], wav=False)
    assert len(server.content_gets(TARGET)) == 1


def test_checksum_mismatch_names_expected_and_actual(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    server.inject(TARGET, Fault("wrong_bytes", times=None))
    with pytest.raises(ChecksumMismatch) as info:
        run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    actual = md5_bytes(_flipped(server.files[TARGET]))
    assert f"expected {server.md5(TARGET)}, got {actual}" in str(info.value)
    assert len(server.content_gets(TARGET)) == 3  # VERIFY_ATTEMPTS whole downloads, then stop


def test_failed_refetch_leaves_no_stale_manifest(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    dest = tmp_path / "raw"
    run(server, dest, cache, areas=["A1"], wav=False)
    server.files[TARGET] = b"new version" * 1000
    server.inject(TARGET, Fault("status", status=503, times=None))
    with pytest.raises(RemoteUnavailable):
        run(server, dest, cache, areas=["A1"], wav=False, max_attempts=2)
    # the old file no longer matches the record: gone, and no manifest vouches for it
    assert not (dest / TARGET).exists()
    assert not (dest / "fetch.json").exists() and not (dest / "record.json").exists()
    server.clear_faults()
    run(server, dest, cache, areas=["A1"], wav=False)
    assert_has(dest, server, AREA_FILES["A1"])


def test_changed_remote_file_is_a_new_cache_entry(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    old = cache_entry_path(cache, _remote(server, TARGET))
    server.files[TARGET] = b"new version" * 1000
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    assert_has(tmp_path / "raw", server, [TARGET])
    assert old.exists() and cache_entry_path(cache, _remote(server, TARGET)).exists()
    assert_cache_clean(cache)


# ------------------------------------------------------------ record failures


def test_record_404_names_the_url(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    with pytest.raises(FetchError, match=rf"GET {server.url}/api/records/1234: HTTP 404") as info:
        run(server, tmp_path / "raw", cache, record_id=1234)
    assert not isinstance(info.value, RemoteUnavailable)
    assert not (tmp_path / "raw").exists() or not any((tmp_path / "raw").iterdir())


def test_record_503_once_recovers(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    server.inject(RECORD, Fault("status", status=503, retry_after="0"))
    run(server, tmp_path / "raw", cache, areas=["A1"], wav=False)
    assert len(server.record_gets()) == 2


def test_unreachable_server_names_the_url(tmp_path: Path, cache: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed when the block ends: connection refused
    url = f"http://127.0.0.1:{port}"
    with pytest.raises(FetchError, match=rf"GET {url}/api/records/8044773: ConnectError"):
        fetch(tmp_path / "raw", areas=["A1"], zenodo_url=url, cache_dir=cache, **FAST)


def test_record_without_needed_file(tmp_path: Path, cache: Path) -> None:
    files = random_files(seed=3)
    del files["PEG_single_sites.zip"]
    with FakeZenodo(files) as srv, pytest.raises(InputMismatch, match="no PEG_single_sites.zip"):
        run(srv, tmp_path / "raw", cache, areas=["PEG"])


# ------------------------------------------------------------ cache


def test_second_dest_uses_the_cache(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    run(server, tmp_path / "one", cache)
    server.clear_log()
    result = run(server, tmp_path / "two", cache)
    assert server.content_gets() == []
    assert result.count("copy-from-cache") == 7
    assert_has(tmp_path / "two", server, ZENODO_NAMES)
    entry = cache_entry_path(cache, _remote(server, TARGET))
    assert (tmp_path / "two" / TARGET).stat().st_ino == entry.stat().st_ino  # hardlinked, same fs
    entries = json.loads((tmp_path / "two" / "fetch.json").read_text())["files"]
    assert {e["via"] for e in entries} == {"cache"}


def test_corrupt_cache_entry_is_detected_and_refetched(
    server: FakeZenodo, tmp_path: Path, cache: Path
) -> None:
    run(server, tmp_path / "one", cache)
    entry = cache_entry_path(cache, _remote(server, TARGET))
    with open(entry, "r+b") as fh:  # in place, same size
        fh.seek(100)
        fh.write(b"\x00" * 16)
    server.clear_log()
    progress = Recorder()
    run(server, tmp_path / "two", cache, progress=progress)
    assert [content_name(r.path) for r in server.content_gets()] == [TARGET]
    assert_has(tmp_path / "two", server, ZENODO_NAMES)
    assert_cache_clean(cache)
    assert any(
        "cache entry corrupt" in w or "failed verification" in w for w in progress.warnings()
    )


def test_cache_from_env(
    server: FakeZenodo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NAT4ETL_CACHE", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    run(server, tmp_path / "raw", None, areas=["A1"], wav=False)
    assert cache_entry_path(tmp_path / "envcache", _remote(server, TARGET)).exists()


def test_unusable_cache_is_skipped(server: FakeZenodo, tmp_path: Path) -> None:
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not a directory")
    progress = Recorder()
    run(server, tmp_path / "raw", blocker, areas=["A1"], wav=False, progress=progress)
    assert_has(tmp_path / "raw", server, AREA_FILES["A1"])
    assert any("unusable" in w for w in progress.warnings())


@pytest.fixture
def read_only():
    """``read_only(dir)``: nothing can be created or deleted in ``dir`` (chmod for a user,
    ``chattr +i`` for root, whom permission bits do not stop); undone after the test."""
    import subprocess

    done: list[Path] = []

    def make(directory: Path) -> None:
        if os.geteuid() != 0:
            directory.chmod(0o555)
        elif subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode:
            pytest.skip("cannot make a directory read-only here (no chattr +i)")
        done.append(directory)

    yield make
    for directory in done:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        else:
            directory.chmod(0o755)


def test_read_only_cache_is_read_not_written(server: FakeZenodo, tmp_path: Path, read_only) -> None:
    """A shared cache this user cannot write (another user's, a read-only mount): its
    verified entries are used, missing ones downloaded straight to dest, with a warning."""
    cache = tmp_path / "cache"
    run(server, tmp_path / "first", cache, areas=["A1"], wav=False)  # A1 cached, PEG not
    corrupt = cache_entry_path(cache, _remote(server, "A1_pred_correlation.csv"))
    corrupt.write_bytes(b"damaged")
    for entry_dir in (cache / "zenodo").iterdir():
        read_only(entry_dir)
    read_only(cache / "zenodo")
    server.clear_log()
    progress = Recorder()
    result = run(server, tmp_path / "raw", cache, areas=["all"], wav=False, progress=progress)
    assert_has(tmp_path / "raw", server, AREA_FILES["A1"] + AREA_FILES["PEG"])
    assert result.count("copy-from-cache") == 2
    assert sorted(content_name(r.path) for r in server.content_gets()) == sorted(
        ["A1_pred_correlation.csv", *AREA_FILES["PEG"]]
    )
    assert any("read-only" in w or "not writable" in w for w in progress.warnings())
    assert corrupt.read_bytes() == b"damaged"  # not ours to delete
    assert parts_under(tmp_path / "raw") == []


# ------------------------------------------------------------ source_dir


def _mirror(server: FakeZenodo, directory: Path, *, record: bool) -> Path:
    directory.mkdir()
    for name, data in server.files.items():
        (directory / name).write_bytes(data)
    if record:
        (directory / "record.json").write_text(json.dumps(server.record()))
    return directory


def test_source_with_record(server: FakeZenodo, tmp_path: Path) -> None:
    src = _mirror(server, tmp_path / "usb", record=True)
    result = fetch(tmp_path / "raw", areas=["all"], source_dir=src, zenodo_url="http://127.0.0.1:9")
    assert_has(tmp_path / "raw", server, ZENODO_NAMES)
    assert server.requests == []
    assert (tmp_path / "raw" / "record.json").read_bytes() == (src / "record.json").read_bytes()
    entries = json.loads((tmp_path / "raw" / "fetch.json").read_text())["files"]
    assert all(e["source_url"].startswith("file://") and e["via"] == "source" for e in entries)
    assert result.count("copy-from-source") == 7
    assert (tmp_path / "raw" / TARGET).stat().st_ino != (src / TARGET).stat().st_ino  # a copy


def test_source_record_of_another_id_than_asked_is_a_warning(
    server: FakeZenodo, tmp_path: Path
) -> None:
    src = _mirror(server, tmp_path / "usb", record=True)
    listed = json.loads((src / "record.json").read_text())["id"]
    progress = Recorder()
    fetch(tmp_path / "raw", areas=["A1"], wav=False, source_dir=src, record_id=123,
          progress=progress)  # fmt: skip
    (warning,) = [w for w in progress.warnings() if "record.json is record" in w]
    assert f"is record {listed}, not the record 123 asked for" in warning
    quiet = Recorder()
    fetch(tmp_path / "raw2", areas=["A1"], wav=False, source_dir=src, record_id=listed,
          progress=quiet)  # fmt: skip
    assert not [w for w in quiet.warnings() if "record.json is record" in w]


def test_source_without_record_accepts_files_and_says_so(
    server: FakeZenodo, tmp_path: Path
) -> None:
    src = _mirror(server, tmp_path / "usb", record=False)
    progress = Recorder()
    fetch(tmp_path / "raw", areas=["A1"], wav=False, source_dir=src, progress=progress)
    assert_has(tmp_path / "raw", server, AREA_FILES["A1"])
    assert any("no record.json" in w for w in progress.warnings())
    manifest = json.loads((tmp_path / "raw" / "fetch.json").read_text())
    assert manifest["published_checksums"] is False
    assert {e["name"]: e["md5"] for e in manifest["files"]} == {
        n: server.md5(n) for n in AREA_FILES["A1"]
    }
    synthesized = parse_record_bytes(
        (tmp_path / "raw" / "record.json").read_bytes(), base_url="https://zenodo.org"
    )
    assert {f.name for f in synthesized} == set(AREA_FILES["A1"])


def test_source_corrupt_file_fails_naming_it(server: FakeZenodo, tmp_path: Path) -> None:
    src = _mirror(server, tmp_path / "usb", record=True)
    (src / TARGET).write_bytes(_flipped(server.files[TARGET]))
    with pytest.raises(ChecksumMismatch) as info:
        fetch(tmp_path / "raw", areas=["A1"], wav=False, source_dir=src)
    msg = str(info.value)
    assert msg.startswith(
        f"{TARGET}: md5 mismatch: expected {server.md5(TARGET)}, got {md5_file(src / TARGET)}"
    )
    assert not (tmp_path / "raw" / TARGET).exists()
    assert parts_under(tmp_path / "raw") == []


def test_source_copies_are_verified_as_written_largest_first(
    server: FakeZenodo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy is hashed while it is written, never read back; one worker takes the files
    largest first (so two end together), and the manifest keeps plan order."""
    src = _mirror(server, tmp_path / "usb", record=True)
    sizes = {n: len(server.files[n]) for n in ZENODO_NAMES}
    read_back: list[str] = []
    real_md5_file = hashing.md5_file

    def watched(path, **kwargs):
        read_back.append(Path(path).name)
        return real_md5_file(path, **kwargs)

    monkeypatch.setattr(hashing, "md5_file", watched)
    progress = Recorder()
    fetch(tmp_path / "raw", areas=["all"], source_dir=src, jobs=1, progress=progress)
    assert_has(tmp_path / "raw", server, ZENODO_NAMES)
    assert [r for r in read_back if ".part-" in r] == []
    copied = [m.split(":")[0] for _, m in progress.lines if "copied from" in m]
    assert copied == sorted(sizes, key=lambda n: -sizes[n])
    entries = json.loads((tmp_path / "raw" / "fetch.json").read_text())["files"]
    assert [e["name"] for e in entries] == needed_files(["all"], wav=True)


def test_source_missing_file(server: FakeZenodo, tmp_path: Path) -> None:
    src = _mirror(server, tmp_path / "usb", record=False)
    (src / TARGET).unlink()
    with pytest.raises(InputMismatch, match=TARGET):
        fetch(tmp_path / "raw", areas=["A1"], wav=False, source_dir=src)


@pytest.mark.parametrize("record", [False, True])
def test_source_in_deepstrf_layout_says_what_to_do(
    server: FakeZenodo, tmp_path: Path, record: bool
) -> None:
    """deepSTRF's data directory: the zips unpacked into folders of their stem, and the
    zips deleted. The error names each absent file, its folder, and --no-wav for wav.zip,
    whether a record.json lists the files or not."""
    src = _mirror(server, tmp_path / "deepstrf", record=record)
    for name in ("A1_single_sites.zip", "wav.zip"):
        (src / name).unlink()
        (src / name.removesuffix(".zip")).mkdir()
    with pytest.raises(InputMismatch) as info:
        fetch(tmp_path / "raw", areas=["A1"], wav=True, source_dir=src, jobs=1)
    msg = str(info.value)
    assert "A1_single_sites/ is A1_single_sites.zip unpacked" in msg
    assert "--no-wav builds without the waveforms" in msg
    assert "lacks A1_single_sites.zip, wav.zip (" in msg  # every one, before any copy
    assert "wav/ is wav.zip unpacked" in msg
    assert not (tmp_path / "raw" / "A1_single_sites.zip").exists()
    # without Zenodo's md5s to match, a repack of the folder is offered (and tested below)
    pack = f"`python -m zipfile -c {src / 'wav.zip'} {src / 'wav'}`"
    assert (pack in msg) is not record
    (src / "A1_single_sites").rmdir()
    (src / "A1_single_sites.zip").write_bytes(server.files["A1_single_sites.zip"])
    with pytest.raises(InputMismatch) as info:
        fetch(tmp_path / "raw", areas=["A1"], wav=True, source_dir=src)
    assert "lacks wav.zip (wav/ is wav.zip unpacked" in str(info.value)
    fetch(tmp_path / "raw", areas=["A1"], wav=False, source_dir=src)  # the hint works
    assert_has(tmp_path / "raw", server, AREA_FILES["A1"])


def test_the_repack_a_deepstrf_folder_is_offered_builds_the_same_tables(tmp_path, mini_sample):
    """A mirror without record.json whose site zip and population tgz were unpacked and
    deleted: the commands the error offers make archives that give the same tables (members
    are found by file name, so the folder layout does not matter)."""
    import shlex
    import subprocess
    import sys

    from click.testing import CliRunner

    from nat4etl.cli import cli
    from nat4etl.formats.archive import extract_all

    src = shutil.copytree(
        mini_sample.dir, tmp_path / "deepstrf", ignore=shutil.ignore_patterns("record.json")
    )
    for name in ("A1_single_sites.zip", "A1_NAT4_ozgf.fs100.ch18.tgz"):
        extract_all(src / name, src / name.removesuffix(".zip").removesuffix(".tgz"))
        (src / name).unlink()
    args = ["build", "--area", "A1", "--no-wav", "--source", str(src)]
    refused = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "store")])
    assert refused.exit_code == 3
    commands = [c for c in refused.output.split("`") if c.startswith("python -m ")]
    assert len(commands) == 2, refused.output
    for command in commands:
        subprocess.run([sys.executable, *shlex.split(command)[1:]], check=True)
    built = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "store")])
    assert built.exit_code == 0, built.output
    reference = ["build", "--area", "A1", "--no-wav", "--source", str(mini_sample.dir)]
    assert CliRunner().invoke(cli, [*reference, "--out", str(tmp_path / "ref")]).exit_code == 0
    for table in ("responses", "spectrograms", "cells", "stims", "trials", "report"):
        got, want = (
            pq.read_table(root / table / "area=A1" / "part-0.parquet").replace_schema_metadata(None)
            for root in (tmp_path / "store", tmp_path / "ref")
        )
        assert got.equals(want), table


def test_source_same_as_dest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="same directory"):
        fetch(tmp_path, areas=["A1"], source_dir=tmp_path)


def test_stage_run_uses_settings(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    out = tmp_path / "out"
    store = SimpleNamespace(raw_dir=out / "raw", shown_raw_dir=out / "raw")
    settings = SimpleNamespace(
        areas=("A1",),
        wav=False,
        record_id=8044773,
        zenodo_url=server.url,
        source_dir=None,
        cache_dir=cache,
        jobs=2,
        max_attempts=3,
        timeout_s=5.0,
    )
    summary = fetch_stage.run(store, settings, NullProgress())
    assert summary == {
        "files": 3,
        "up_to_date": 0,
        "from_cache": 0,
        "from_source": 0,
        "downloaded": 3,
        "downloaded_bytes": sum(len(server.files[n]) for n in AREA_FILES["A1"]),
    }
    assert_has(store.raw_dir, server, AREA_FILES["A1"])


# ------------------------------------------------------------ plan_fetch (pure)


def _remote_files(seed: int = 5) -> tuple[dict[str, bytes], list[RemoteFile]]:
    files = random_files(seed, min_bytes=100, max_bytes=2000)
    remote = [
        RemoteFile(n, len(d), md5_bytes(d), f"https://z.example/{n}") for n, d in files.items()
    ]
    return files, remote


def _snapshot(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_plan_empty_dest_downloads_everything(tmp_path: Path) -> None:
    _, remote = _remote_files()
    steps = plan_fetch(remote, areas=["all"], wav=True, dest_dir=tmp_path / "raw", cache_dir=None)
    assert [s.remote.name for s in steps] == needed_files(["all"], wav=True) == ZENODO_NAMES
    assert {s.action for s in steps} == {"download"} and all(s.cache_entry is None for s in steps)


def test_plan_decides_from_disk_and_writes_nothing(tmp_path: Path) -> None:
    files, remote = _remote_files()
    by_name = {r.name: r for r in remote}
    dest, cache = tmp_path / "raw", tmp_path / "cache"
    dest.mkdir()
    names = AREA_FILES["A1"]
    (dest / names[0]).write_bytes(files[names[0]])  # good copy
    (dest / names[1]).write_bytes(files[names[1]][:-1])  # truncated
    cached = cache_entry_path(cache, by_name[names[1]])
    cached.parent.mkdir(parents=True)
    cached.write_bytes(files[names[1]])  # verified cache entry
    bad = cache_entry_path(cache, by_name[names[2]])
    bad.parent.mkdir(parents=True)
    bad.write_bytes(_flipped(files[names[2]]))  # same size, wrong md5
    before = _snapshot(tmp_path)

    steps = plan_fetch(remote, areas=["A1"], wav=False, dest_dir=dest, cache_dir=cache)

    assert _snapshot(tmp_path) == before
    assert [(s.remote.name, s.action) for s in steps] == [
        (names[0], "up-to-date"),
        (names[1], "copy-from-cache"),
        (names[2], "download"),
    ]
    assert steps[1].stale == (dest / names[1],) and steps[1].source == cached
    assert (
        steps[2].stale == (bad,)
        and steps[2].cache_entry == bad
        and "md5 mismatch" in steps[2].reason
    )


def test_plan_with_source(tmp_path: Path) -> None:
    _, remote = _remote_files()
    steps = plan_fetch(
        remote,
        areas=["PEG"],
        wav=True,
        dest_dir=tmp_path,
        cache_dir=tmp_path / "c",
        source_dir=Path("/mnt/usb"),
    )
    assert {s.action for s in steps} == {"copy-from-source"}
    assert steps[-1].source == Path("/mnt/usb") / WAV_FILE


def test_plan_errors() -> None:
    _, remote = _remote_files()
    with pytest.raises(InputMismatch, match="no wav.zip"):
        plan_fetch(
            [r for r in remote if r.name != WAV_FILE],
            areas=["A1"],
            wav=True,
            dest_dir=Path("x"),
            cache_dir=None,
        )
    with pytest.raises(ConfigError, match="unknown area 'A2'"):
        plan_fetch(remote, areas=["A2"], wav=False, dest_dir=Path("x"), cache_dir=None)


# ------------------------------------------------------------ record shapes (pure)

MD5 = "0123456789abcdef0123456789abcdef"
BASE = "https://zenodo.org"


def test_parse_legacy_shape() -> None:
    record = {
        "id": 7,
        "files": [
            {
                "key": "a.zip",
                "size": 3,
                "checksum": f"md5:{MD5.upper()}",
                "links": {"self": "https://x/api/files/b/a.zip"},
            }
        ],
    }
    web = (f"{BASE}/records/7/files/a.zip?download=1",)
    assert parse_record(record, base_url=BASE) == [
        RemoteFile("a.zip", 3, MD5, f"{BASE}/api/records/7/files/a.zip/content", web)
    ]
    # links.self only where no record id gives the content URL; no id, no fallback
    del record["id"]
    (listed,) = parse_record(record, base_url=BASE)
    assert (listed.url, listed.fallback_urls) == ("https://x/api/files/b/a.zip", ())


def test_parse_new_shape_builds_content_url() -> None:
    record = {"id": 7, "files": [{"filename": "a b.zip", "filesize": 3, "checksum": MD5}]}
    web = (f"{BASE}/records/7/files/a%20b.zip?download=1",)
    assert parse_record(record, base_url=BASE + "/") == [
        RemoteFile("a b.zip", 3, MD5, f"{BASE}/api/records/7/files/a%20b.zip/content", web)
    ]


def test_parse_export_shape_prefers_links_content() -> None:
    entry = {
        "size": 3,
        "checksum": f"md5:{MD5}",
        "links": {"self": "https://x/meta", "content": "https://files.x/a.zip"},
    }
    record = {"files": {"enabled": True, "entries": {"a.zip": entry}}}
    api, web = (
        f"{BASE}/api/records/7/files/a.zip/content",
        f"{BASE}/records/7/files/a.zip?download=1",
    )
    assert parse_record(record, base_url=BASE, record_id=7) == [
        RemoteFile("a.zip", 3, MD5, "https://files.x/a.zip", (api, web))
    ]
    entry["links"]["content"] = "/api/records/7/files/a.zip/content"  # relative: resolved
    assert parse_record(record, base_url=BASE, record_id=7) == [
        RemoteFile("a.zip", 3, MD5, api, (web,))
    ]


def test_parse_entries_as_list_and_record_id_fallback() -> None:
    record = {"files": {"entries": [{"key": "a.zip", "size": 0, "checksum": MD5}]}}
    assert (
        parse_record(record, base_url=BASE, record_id=9)[0].url
        == f"{BASE}/api/records/9/files/a.zip/content"
    )


@pytest.mark.parametrize(
    ("files", "text"),
    [
        (None, "no file list"),
        ([{"key": "a", "size": 1}], "checksum None missing"),
        ([{"key": "a", "size": 1, "checksum": "sha256:" + "0" * 64}], "is sha256, expected md5"),
        ([{"key": "a", "size": 1, "checksum": "md5:xyz"}], "not an md5 hex digest"),
        ([{"key": "../a", "size": 1, "checksum": MD5}], "unsafe or missing file name"),
        ([{"size": 1, "checksum": MD5}], "unsafe or missing file name"),
        ([{"key": "a", "size": "1", "checksum": MD5}], "not a byte count"),
        (
            [{"key": "a", "size": 1, "checksum": MD5}, {"key": "a", "size": 1, "checksum": MD5}],
            "listed twice",
        ),
        (["a"], r"files\[0\] is not an object"),
    ],
)
def test_parse_rejects_bad_records(files: Any, text: str) -> None:
    with pytest.raises(FormatError, match=text):
        parse_record({"id": 1, "files": files}, base_url=BASE)


def test_parse_bad_json() -> None:
    with pytest.raises(FormatError, match="not JSON"):
        parse_record_bytes(b"<html>", base_url=BASE, source="https://z/api/records/1")


# ------------------------------------------------------------ progress renderings


def test_plain_and_json_progress(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    server.inject(TARGET, Fault("status", status=503, retry_after="0"))
    plain = io.StringIO()
    run(server, tmp_path / "a", cache, areas=["A1"], wav=False, progress=PlainProgress(plain))
    text = plain.getvalue()
    assert f"start {TARGET}" in text and f"done  {TARGET}" in text
    assert f"warning: {TARGET}: GET " in text and "HTTP 503" in text and "retry 2/4" in text

    server.inject(TARGET, Fault("status", status=503, retry_after="0"))
    out = io.StringIO()
    run(
        server,
        tmp_path / "b",
        tmp_path / "cache2",
        areas=["A1"],
        wav=False,
        progress=JsonProgress(out),
    )
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert {e["event"] for e in events} >= {"start", "done", "log"}
    assert any(
        e["event"] == "log" and e["level"] == "warning" and "HTTP 503" in e["msg"] for e in events
    )
    assert all("time" in e for e in events)


class Counting(NullProgress):
    """Tracks each task's amount like a progress bar would."""

    def __init__(self) -> None:
        self.completed: dict[str, int] = {}
        self.finished: dict[str, int] = {}

    def start(self, task: str, *, total: int | None = None, unit: str = "B") -> None:
        self.completed[task] = 0

    def advance(self, task: str, n: int) -> None:
        self.completed[task] += n

    def reset(self, task: str) -> None:
        self.completed[task] = 0

    def done(self, task: str) -> None:
        self.finished[task] = self.completed[task]


def test_progress_amounts_match_sizes(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    server.inject(TARGET, Fault("drop"), Fault("ignore_range"))  # a resume, then a restart
    progress = Counting()
    run(server, tmp_path / "one", cache, progress=progress)
    assert progress.finished == {n: len(d) for n, d in server.files.items()}
    progress = Counting()
    run(server, tmp_path / "two", cache, progress=progress)  # from the cache
    assert progress.finished == {n: len(d) for n, d in server.files.items()}


def test_rich_progress_and_mode_choice(server: FakeZenodo, tmp_path: Path, cache: Path) -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with RichProgress(console=console) as progress:
        run(server, tmp_path / "raw", cache, areas=["A1"], wav=False, progress=progress)
    text = buf.getvalue()
    for name in AREA_FILES["A1"]:
        size = format_amount(len(server.files[name]))
        assert f"{size} / {size}" in text

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert isinstance(make_progress("rich", stream=Tty()), RichProgress)
    assert isinstance(make_progress(stream=io.StringIO()), PlainProgress)
    assert isinstance(make_progress("json", stream=io.StringIO()), JsonProgress)
    quiet = io.StringIO()
    with make_progress("quiet", stream=quiet) as progress:
        progress.start("x", total=3)
        progress.log("routine")
        progress.log("trouble", level="warning")
        progress.done("x")
    assert quiet.getvalue().splitlines()[-1].endswith("warning: trouble")
    assert len(quiet.getvalue().splitlines()) == 1


# ------------------------------------------------------------ a real sample mirror


def test_serves_a_sample_mirror(tmp_path: Path, cache: Path) -> None:
    from nat4etl import sample

    mirror = tmp_path / "mirror"
    sample.write_sample(mirror, scale="mini")
    with FakeZenodo.from_dir(mirror, ZENODO_NAMES) as srv:
        srv.inject(TARGET, Fault("drop"))
        run(srv, tmp_path / "net", cache)
    fetch(tmp_path / "local", areas=["all"], source_dir=mirror)  # checked against its record.json
    for name in ZENODO_NAMES:
        assert (tmp_path / "net" / name).read_bytes() == (mirror / name).read_bytes()
    record = (mirror / "record.json").read_bytes()
    published = parse_record_bytes(record, base_url="https://zenodo.org")
    for where in ("net", "local"):
        entries = json.loads((tmp_path / where / "fetch.json").read_text())["files"]
        assert {e["name"]: e["md5"] for e in entries} == {f.name: f.md5 for f in published}


# ------------------------------------------------------------ helpers


def _remote(server: FakeZenodo, name: str) -> RemoteFile:
    return RemoteFile(name, len(server.files[name]), server.md5(name), "")


def _flipped(data: bytes) -> bytes:
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def test_auto_progress_is_plain_unless_stdout_and_stderr_are_terminals(monkeypatch) -> None:
    from nat4etl.progress import PlainProgress, RichProgress, make_progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdout", io.StringIO())  # e.g. `nat4etl build > log`
    assert isinstance(make_progress("auto", stream=Tty()), PlainProgress)
    monkeypatch.setattr("sys.stdout", Tty())
    assert isinstance(make_progress("auto", stream=Tty()), RichProgress)
    assert isinstance(make_progress("auto", stream=io.StringIO()), PlainProgress)


# ------------------------------------------------------------ a disk that fills up


@pytest.fixture
def file_size_limit():
    """``limit(n)``: writes past ``n`` bytes of any file fail with EFBIG, as a full disk
    fails them with ENOSPC (RLIMIT_FSIZE; SIGXFSZ ignored so the write returns an error)."""
    resource = pytest.importorskip("resource")
    import signal

    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def limit(n_bytes: int) -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, old_limit[1]))

    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_disk_full_mid_download_is_one_line_naming_the_file(
    server: FakeZenodo, tmp_path: Path, cache: Path, file_size_limit
) -> None:
    dest = tmp_path / "raw"
    progress = Recorder()
    big = [n for n in AREA_FILES["A1"] if len(server.files[n]) > 60_000]
    assert big, "the test needs a file larger than the limit"
    file_size_limit(60_000)
    with pytest.raises(StoreError) as info:
        run(server, dest, cache, areas=["A1"], wav=False, progress=progress)
    file_size_limit(2**62)
    message = str(info.value)
    assert message.startswith(f"{big[0]}: ") and "\n" not in message
    # the cache could not take it, so the download went straight to dest: that failed too
    assert "File too large" in message and str(dest) in message
    assert "nothing written under the final name" in message
    assert info.value.exit_code == 7
    assert any(w.startswith(f"{big[0]}: cannot write the cache entry") for w in progress.warnings())
    # the other failures are logged the same way, each naming its file
    errors = [m for lvl, m in progress.lines if lvl == "error"]
    assert [m.split(":")[0] for m in errors] == big[1:]
    for name in big:
        assert not (dest / name).exists()
    assert parts_under(dest, cache) == []
    assert_cache_clean(cache)


def _make_cache_disk_full(monkeypatch, cache: Path) -> None:
    """Downloads into ``cache`` fail with ENOSPC; others go through."""
    real_download = fetch_stage.net.download

    def cache_disk_full(client, url, part_path, **kw):
        if Path(part_path).is_relative_to(cache):
            raise OSError(errno.ENOSPC, "No space left on device", str(part_path))
        return real_download(client, url, part_path, **kw)

    monkeypatch.setattr(fetch_stage.net, "download", cache_disk_full)


def test_a_full_cache_is_left_out_and_files_download_straight_to_dest(
    server: FakeZenodo, tmp_path: Path, cache: Path, monkeypatch
) -> None:
    """A cache on a full disk (a small home, the store on scratch): each file it cannot
    take is downloaded into dest instead, with a warning naming the cache."""
    _make_cache_disk_full(monkeypatch, cache)
    progress = Recorder()
    dest = tmp_path / "raw"
    result = run(server, dest, cache, areas=["A1"], wav=False, progress=progress)
    assert_has(dest, server, AREA_FILES["A1"])
    assert result.count("download") == len(AREA_FILES["A1"])
    warned = [w for w in progress.warnings() if "cannot write the cache entry" in w]
    assert sorted(w.split(":")[0] for w in warned) == sorted(AREA_FILES["A1"])
    assert all("No space left on device" in w and str(dest) in w for w in warned)
    assert list(cache.rglob("*.*")) == [] and parts_under(dest) == []


def test_warnings_name_the_raw_dir_the_user_knows_not_the_staging_copy(
    server: FakeZenodo, tmp_path: Path, cache: Path, monkeypatch
) -> None:
    """A build fetches into raw/ of a staging copy of OUT, which is gone once it has
    published: a file it replaces and a download the cache cannot take are said to be
    in OUT/raw (``shown_dir``)."""
    _make_cache_disk_full(monkeypatch, cache)
    staging = tmp_path / ".nat4.staging-1-2" / "raw"
    staging.mkdir(parents=True)
    name = AREA_FILES["A1"][0]
    (staging / name).write_bytes(b"not the file")
    shown = tmp_path / "nat4" / "raw"
    progress = Recorder()
    run(server, staging, cache, areas=["A1"], wav=False, progress=progress, shown_dir=shown)
    warned = progress.warnings()
    assert f"{name}: {shown / name} failed verification; deleted" in warned
    straight = [w for w in warned if "downloading straight into" in w]
    assert len(straight) == len(AREA_FILES["A1"])
    assert all(w.endswith(f"downloading straight into {shown}") for w in straight)
    assert not any(str(staging) in w for w in warned)


def test_disk_full_copying_from_source_names_the_file(
    server: FakeZenodo, tmp_path: Path, file_size_limit
) -> None:
    cache = tmp_path / "cache"
    run(server, tmp_path / "first", cache, areas=["A1"], wav=False)
    dest = tmp_path / "raw"
    file_size_limit(60_000)
    with pytest.raises(StoreError) as info:  # source files are copied, never hardlinked
        run(server, dest, None, areas=["A1"], wav=False, source_dir=tmp_path / "first")
    file_size_limit(2**62)
    message = str(info.value)
    assert "File too large" in message and str(dest) in message and "\n" not in message
    assert parts_under(dest) == []

"""A Zenodo-shaped HTTP server on 127.0.0.1, with faults on demand, for fetch tests.

Serves a set of files as one record::

    GET /api/records/<id>                          the record JSON (legacy, new or export shape)
    GET /api/records/<id>/files/<key>/content      a file (Range supported)
    GET /api/files/<bucket>/<key>                  the same file (legacy ``links.self``)
    GET /records/<id>/files/<key>?download=1      the same file (the web page's link)

Every request is logged (method, path, headers, status, fault). Faults are queued per
file name (or :data:`RECORD` for the record endpoint) and consumed one per request::

    server.inject("A1_single_sites.zip", Fault("status", status=429, retry_after="1"))
    server.inject("wav.zip", Fault("drop", after_bytes=1000, times=None))  # every request

Fault kinds: ``status`` (an error status, optional Retry-After), ``drop`` (close the
connection after ``after_bytes`` of the body), ``wrong_bytes`` (one byte flipped: md5
mismatch), ``length_high`` / ``length_low`` (a Content-Length that lies), ``slow`` (wait
``delay_s`` before answering), ``ignore_range`` (answer 200 with the whole file to a Range
request), ``redirect`` (302 to ``/storage/<bucket>/<key>``, as Zenodo sends file downloads to
its storage; that route takes faults queued under ``"storage:" + name``), ``gzip`` (the body
gzip-compressed on the fly, ``Content-Encoding: gzip``), ``trickle`` (the body in
``after_bytes`` pieces, ``delay_s`` apart: slow but alive), ``stall`` (``after_bytes`` of the
body, then silence for ``delay_s``), ``bad_range`` (a Range request answered 206 from byte 0,
Content-Range saying so), ``no_length`` (no Content-Length: the body ends when the connection
closes).

Use :class:`FakeZenodo` directly (a context manager) or the :func:`fake_zenodo` fixture.
Stdlib only, so it can serve anything a test writes, including a ``nat4etl sample`` mirror.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote, unquote, urlsplit

import pytest

from nat4etl.nat4 import ZENODO_FILES

RECORD = "<record>"  # fault key for the record endpoint
RECORD_ID = 8044773
ZENODO_NAMES = list(ZENODO_FILES)
Shape = Literal["legacy", "new", "export"]
FaultKind = Literal[
    "status",
    "drop",
    "wrong_bytes",
    "length_high",
    "length_low",
    "slow",
    "ignore_range",
    "redirect",
    "gzip",
    "trickle",
    "stall",
    "bad_range",
    "no_length",
]


@dataclass
class Fault:
    """One injected misbehaviour; ``times=None`` repeats it on every request."""

    kind: FaultKind
    status: int = 503
    retry_after: str | None = None
    after_bytes: int | None = None  # drop: body bytes sent before closing (default half)
    delay_s: float = 2.0  # slow
    times: int | None = 1


@dataclass
class LoggedRequest:
    method: str
    path: str
    headers: dict[str, str]
    status: int | None = None
    fault: str | None = None


@dataclass
class FakeZenodo:
    """Serve ``files`` (name -> bytes) as Zenodo record ``record_id`` on 127.0.0.1."""

    files: dict[str, bytes]
    record_id: int = RECORD_ID
    shape: Shape = "legacy"
    record_override: dict[str, Any] | None = None  # served instead of the generated record
    requests: list[LoggedRequest] = field(default_factory=list)
    bucket: str = field(default_factory=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self.files = dict(self.files)
        self._faults: dict[str, list[Fault]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def from_dir(
        cls, directory: str | Path, names: list[str] | None = None, **kwargs: Any
    ) -> FakeZenodo:
        """Serve ``names`` (default: every file but ``record.json``) from ``directory``."""
        directory = Path(directory)
        if names is None:
            names = [
                p.name
                for p in sorted(directory.iterdir())
                if p.is_file() and p.name != "record.json"
            ]
        return cls({n: (directory / n).read_bytes() for n in names}, **kwargs)

    # -- lifecycle

    def start(self) -> FakeZenodo:
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        httpd.daemon_threads = True
        httpd.block_on_close = False  # a handler stuck in a slow fault must not block stop()
        httpd.fake = self  # type: ignore[attr-defined]
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> FakeZenodo:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def record_url(self) -> str:
        return f"{self.url}/api/records/{self.record_id}"

    # -- faults and log

    def inject(self, name: str, *faults: Fault) -> None:
        """Queue ``faults`` for requests of file ``name`` (or :data:`RECORD`)."""
        with self._lock:
            self._faults.setdefault(name, []).extend(faults)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def next_fault(self, name: str) -> Fault | None:
        with self._lock:
            queue = self._faults.get(name, [])
            if not queue:
                return None
            fault = queue[0]
            if fault.times is not None:
                fault.times -= 1
                if fault.times <= 0:
                    queue.pop(0)
            return fault

    def content_gets(self, name: str | None = None) -> list[LoggedRequest]:
        """GETs of file content (any route), optionally for one file."""
        names = [(r, content_name(r.path)) for r in list(self.requests) if r.method == "GET"]
        return [r for r, n in names if n is not None and (name is None or n == name)]

    def record_gets(self) -> list[LoggedRequest]:
        return [
            r
            for r in list(self.requests)
            if r.method == "GET" and r.path == f"/api/records/{self.record_id}"
        ]

    def clear_log(self) -> None:
        self.requests.clear()

    # -- content

    def md5(self, name: str) -> str:
        return hashlib.md5(self.files[name]).hexdigest()

    def record(self) -> dict[str, Any]:
        """The record JSON in ``self.shape`` (or ``record_override``)."""
        if self.record_override is not None:
            return self.record_override
        entries = [self._entry(name, data) for name, data in self.files.items()]
        if self.shape == "export":
            return {
                "id": self.record_id,
                "files": {"enabled": True, "entries": {e["key"]: e for e in entries}},
            }
        return {"id": self.record_id, "metadata": {"title": "fake NAT4"}, "files": entries}

    def _entry(self, name: str, data: bytes) -> dict[str, Any]:
        md5 = hashlib.md5(data).hexdigest()
        if self.shape == "new":
            return {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, name)),
                "filename": name,
                "filesize": len(data),
                "checksum": md5,
            }
        if self.shape == "export":
            # a query the fallback URL lacks, so tests can tell links.content was followed
            link = f"{self.url}/api/records/{self.record_id}/files/{quote(name)}/content?via=links.content"
            return {
                "key": name,
                "size": len(data),
                "checksum": f"md5:{md5}",
                "links": {"content": link},
            }
        link = f"{self.url}/api/files/{self.bucket}/{quote(name)}"
        return {"key": name, "size": len(data), "checksum": f"md5:{md5}", "links": {"self": link}}


def content_name(path: str) -> str | None:
    """The file name a content path asks for, or None for other paths."""
    path = urlsplit(path).path
    match = (
        re.fullmatch(r"/api/records/\d+/files/([^/]+)/content", path)
        or re.fullmatch(r"/api/files/[^/]+/([^/]+)", path)
        or re.fullmatch(r"/storage/[^/]+/([^/]+)", path)
        or re.fullmatch(r"/records/\d+/files/([^/]+)", path)
    )
    return unquote(match.group(1)) if match else None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Zenodo
    timeout = 10  # idle keep-alive connections end on their own

    @property
    def fake(self) -> FakeZenodo:
        return self.server.fake  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # the request log is the record; keep pytest output clean

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        entry = LoggedRequest("GET", self.path, {k.lower(): v for k, v in self.headers.items()})
        self.fake.requests.append(entry)
        try:
            self._route(entry)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up (a timeout): nothing to do

    def _route(self, entry: LoggedRequest) -> None:
        path = urlsplit(self.path).path
        if path == f"/api/records/{self.fake.record_id}":
            fault = self.fake.next_fault(RECORD)
            if fault is not None and self._apply_early_fault(fault, entry):
                return
            self._send_json(200, self.fake.record(), entry)
            return
        name = content_name(path)
        if name is None or name not in self.fake.files:
            self._send_json(404, {"status": 404, "message": "PID does not exist."}, entry)
            return
        storage = path.startswith("/storage/")
        self._serve_file(name, entry, fault_key=f"storage:{name}" if storage else name)

    def _apply_early_fault(self, fault: Fault, entry: LoggedRequest) -> bool:
        """Faults that happen before any body: slow (then carry on) and status. True when
        the request is answered."""
        entry.fault = fault.kind
        if fault.kind == "slow":
            if self.fake._stopping.wait(fault.delay_s):
                self.close_connection = True
                return True
            return False
        if fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
            self._send_json(
                fault.status, {"status": fault.status, "message": "injected"}, entry, headers
            )
            return True
        return False

    def _serve_file(self, name: str, entry: LoggedRequest, *, fault_key: str) -> None:
        data = self.fake.files[name]
        fault = self.fake.next_fault(fault_key)
        if fault is not None and self._apply_early_fault(fault, entry):
            return
        kind = fault.kind if fault is not None else None
        if kind == "redirect":
            where = f"/storage/{self.fake.bucket}/{quote(name)}"
            self._send_bytes(302, b"", entry, {"Location": where})
            return
        if kind == "wrong_bytes":
            data = _flip_one_byte(data)
        start = _range_start(self.headers.get("Range")) if kind != "ignore_range" else None
        if kind == "bad_range" and start is not None:
            start = 0  # "206 Partial Content" for bytes we did not ask for
            status_206 = True
        else:
            status_206 = start is not None
        if start is not None and start >= len(data):
            self._send_bytes(416, b"", entry, {"Content-Range": f"bytes */{len(data)}"})
            return
        body = data[start or 0 :]
        headers = {"Content-Type": "application/octet-stream"}
        if status_206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        status = 206 if status_206 else 200
        if kind == "gzip":
            headers["Content-Encoding"] = "gzip"
            self._send_bytes(status, gzip.compress(body), entry, headers)
        elif kind == "trickle":
            assert fault is not None
            self._send_bytes(
                status,
                body,
                entry,
                headers,
                piece_bytes=fault.after_bytes or 4096,
                piece_delay_s=fault.delay_s,
            )
        elif kind == "stall":
            assert fault is not None
            cut = fault.after_bytes if fault.after_bytes is not None else len(body) // 2
            self._send_bytes(
                status,
                body,
                entry,
                headers,
                send_bytes=min(cut, len(body)),
                close=True,
                stall_s=fault.delay_s,
            )
        elif kind == "no_length":
            self._send_bytes(status, body, entry, headers, claimed_bytes=-1, close=True)
        elif kind == "drop":
            cut = fault.after_bytes if fault.after_bytes is not None else len(body) // 2
            self._send_bytes(
                status, body, entry, headers, send_bytes=min(cut, len(body)), close=True
            )
        elif kind == "length_high":
            self._send_bytes(
                status, body, entry, headers, claimed_bytes=len(body) + 100, close=True
            )
        elif kind == "length_low":
            self._send_bytes(status, body, entry, headers, claimed_bytes=len(body) // 2, close=True)
        else:
            self._send_bytes(status, body, entry, headers)

    def _send_json(
        self, status: int, obj: Any, entry: LoggedRequest, headers: Mapping[str, str] | None = None
    ) -> None:
        body = json.dumps(obj).encode()
        self._send_bytes(
            status, body, entry, {"Content-Type": "application/json", **(headers or {})}
        )

    def _send_bytes(
        self,
        status: int,
        body: bytes,
        entry: LoggedRequest,
        headers: Mapping[str, str] | None = None,
        *,
        claimed_bytes: int | None = None,
        send_bytes: int | None = None,
        close: bool = False,
        piece_bytes: int | None = None,
        piece_delay_s: float = 0.0,
        stall_s: float = 0.0,
    ) -> None:
        """``claimed_bytes=-1``: no Content-Length (the connection is closed after the body)."""
        entry.status = status
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if claimed_bytes != -1:
            self.send_header(
                "Content-Length", str(len(body) if claimed_bytes is None else claimed_bytes)
            )
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        out = body if send_bytes is None else body[:send_bytes]
        if piece_bytes is None:
            self.wfile.write(out)
            self.wfile.flush()
        else:
            for i in range(0, len(out), piece_bytes):
                self.wfile.write(out[i : i + piece_bytes])
                self.wfile.flush()
                if self.fake._stopping.wait(piece_delay_s):
                    break
        if stall_s:
            self.fake._stopping.wait(stall_s)


def _range_start(header: str | None) -> int | None:
    """Start of ``bytes=N-`` / ``bytes=N-M`` (the end is ignored: we always send to EOF)."""
    if not header:
        return None
    match = re.fullmatch(r"\s*bytes=(\d+)-(\d*)\s*", header)
    return int(match.group(1)) if match else None


def _flip_one_byte(data: bytes) -> bytes:
    if not data:
        return b"x"
    i = len(data) // 2
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]


def random_files(
    seed: int = 0, *, min_bytes: int = 20_000, max_bytes: int = 200_000
) -> dict[str, bytes]:
    """Random bytes under the seven real Zenodo file names (until a sample mirror is used)."""
    rng = random.Random(seed)
    return {name: rng.randbytes(rng.randint(min_bytes, max_bytes)) for name in ZENODO_NAMES}


@pytest.fixture
def fake_zenodo() -> Iterator[FakeZenodo]:
    """A started server with :func:`random_files`, legacy shape."""
    with FakeZenodo(random_files()) as server:
        yield server

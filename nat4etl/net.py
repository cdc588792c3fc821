"""HTTP for nat4etl: one client, bounded retries, resumable downloads. Knows nothing of NAT4.

What is retried, and how:

- HTTP 408, 429 and 5xx, and transport failures (connect errors, DNS failures, timeouts,
  a connection dropped mid-body, a body shorter than its Content-Length).
- The wait is the server's ``Retry-After`` (seconds or an HTTP date, capped at
  ``retry_after_cap_s``) when it sends one, else jittered exponential backoff
  (``backoff_base_s * 2**(n-1)``, half fixed, half random, capped at ``backoff_max_s``).
- At most ``max_attempts`` consecutive failures. A download that failed *after* bringing
  new bytes resets that count (a long transfer on a flaky link keeps moving); a hard cap
  of ``10 * max_attempts`` requests per download bounds it anyway.
- Other 4xx are not retried: :class:`~nat4etl.errors.RemoteRefused` naming the URL and status.
  Exhausted retries: :class:`~nat4etl.errors.RemoteUnavailable` naming the URL and the
  last failure.

:func:`download` resumes with ``Range: bytes=N-``; a server answering 200 instead of 206
restarts the file from byte 0. It never verifies content: callers hash the whole file
afterwards (resumed or not), which is the only check that covers every failure mode.
"""

from __future__ import annotations

import email.utils
import math
import os
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, NamedTuple

from nat4etl import __version__
from nat4etl.errors import FetchError, RemoteRefused, RemoteUnavailable, VerificationError

if TYPE_CHECKING:  # imported where a request is made: a build from a local mirror
    import httpx  # never makes one, and importing httpx costs ~40 ms

USER_AGENT = f"nat4etl/{__version__} (+https://github.com/nat4etl)"
_RESUME_REQUESTS_FACTOR = 10

Callback = Callable[[str], None]


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to wait. ``sleep`` and ``rng`` are injectable for tests."""

    max_attempts: int = 5
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    retry_after_cap_s: float = 120.0
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def backoff_s(self, failures: int) -> float:
        """Equal jitter: half of the exponential step fixed, half random.

        The fixed half guarantees the wait grows; the random half keeps clients that failed
        together (a rate limit, a restart) from retrying together.
        """
        step_s = min(self.backoff_max_s, self.backoff_base_s * 2 ** max(failures - 1, 0))
        return step_s / 2 + self.rng.uniform(0, step_s / 2)

    def delay_s(self, failures: int, retry_after: str | None = None) -> float:
        """The server's Retry-After when given (capped, plus a little jitter), else backoff."""
        wait_s = parse_retry_after_s(retry_after)
        if wait_s is None:
            return self.backoff_s(failures)
        return min(wait_s, self.retry_after_cap_s) + self.rng.uniform(0, self.backoff_base_s / 10)


def parse_retry_after_s(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date); None if absent
    or unreadable. Past dates and negative values mean "now" (0)."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else max(seconds, 0.0)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    now = now or datetime.now(UTC)
    return max((when - now).total_seconds(), 0.0)


def is_retryable_status(status_code: int) -> bool:
    """408, 429 and every 5xx: the server may answer differently next time."""
    return status_code in (408, 429) or 500 <= status_code <= 599


def make_client(
    *, timeout_s: float = 60.0, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """An httpx client with nat4etl's User-Agent, redirects followed, and ``timeout_s`` for
    connect, read, write and pool waits (a read timeout is per chunk, not per file)."""
    import httpx

    return httpx.Client(
        headers={"User-Agent": USER_AGENT},
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=True,
        transport=transport,
    )


def get_bytes(
    client: httpx.Client,
    url: str,
    *,
    policy: RetryPolicy | None = None,
    timeout_s: float | None = None,
    on_retry: Callback | None = None,
) -> bytes:
    """GET ``url`` and return the body (a record JSON: small), retrying as the module says."""
    import httpx

    policy = policy or RetryPolicy()
    failures = 0
    while True:
        try:
            response = client.get(
                url, headers=_headers(client), timeout=_timeout(client, timeout_s)
            )
        except httpx.TransportError as err:
            _raise_if_permanent(err, url)
            reason, retry_after = describe_error(err), None
        except (httpx.HTTPError, httpx.InvalidURL) as err:
            raise FetchError(f"GET {url}: {describe_error(err)}") from err
        else:
            if response.status_code == 200:
                return response.content
            _raise_if_not_retryable(response, url)
            reason = status_text(response)
            retry_after = response.headers.get("Retry-After")
        failures += 1
        if failures >= policy.max_attempts:
            msg = f"GET {url}: {reason}; gave up after {_counted(failures, 'attempt')}"
            raise RemoteUnavailable(msg)
        _wait(policy, failures, retry_after, f"GET {url}: {reason}", on_retry)


def download(
    client: httpx.Client,
    url: str,
    part_path: str | Path,
    *,
    size_bytes: int | None = None,
    policy: RetryPolicy | None = None,
    timeout_s: float | None = None,
    on_bytes: Callable[[int], None] | None = None,
    on_restart: Callable[[], None] | None = None,
    on_retry: Callback | None = None,
) -> None:
    """Stream ``url`` into ``part_path`` (created or appended to), resuming after drops.

    Returns when the body arrived whole (``size_bytes`` of it, when given) and is fsynced.
    ``on_bytes(n)`` follows the bytes written; ``on_restart()`` says the file went back to
    0 bytes (a server that ignored Range, a body longer than expected). The content is
    not verified here: hash the file afterwards.
    """
    policy = policy or RetryPolicy()
    max_requests = policy.max_attempts * _RESUME_REQUESTS_FACTOR
    failures = requests = 0
    with open(part_path, "ab") as fh:
        best_bytes = most_bytes = fh.tell()
        while True:
            requests += 1
            failure = _stream_once(
                client,
                url,
                fh,
                size_bytes=size_bytes,
                timeout_s=timeout_s,
                on_bytes=on_bytes,
                on_restart=on_restart,
            )
            if failure is None:
                fh.flush()
                os.fsync(fh.fileno())
                return
            have_bytes = fh.tell()
            failures = 1 if have_bytes > best_bytes else failures + 1
            best_bytes = max(best_bytes, have_bytes)
            most_bytes = max(most_bytes, have_bytes, failure.bytes_dropped)
            if failures >= policy.max_attempts or requests >= max_requests:
                of = f" of {size_bytes}" if size_bytes is not None else ""
                got = f"{have_bytes}{of} bytes kept"
                if most_bytes > have_bytes:
                    got += f", {most_bytes} received before a restart"
                msg = f"GET {url}: {failure.reason}; gave up after {_counted(requests, 'request')} ({got})"
                if failure.too_long:  # the last of the tries without progress went past the size
                    raise VerificationError(
                        f"{msg}; the file on the server is longer than the record says"
                    )
                raise RemoteUnavailable(msg)
            _wait(policy, failures, failure.retry_after, f"GET {url}: {failure.reason}", on_retry)


class _Failure(NamedTuple):
    """Why one request failed, and how many bytes a restart threw away with it."""

    reason: str
    retry_after: str | None = None  # the Retry-After header
    bytes_dropped: int = 0
    too_long: bool = False  # the body went past the expected size


def _stream_once(
    client: httpx.Client,
    url: str,
    fh: BinaryIO,
    *,
    size_bytes: int | None,
    timeout_s: float | None,
    on_bytes: Callable[[int], None] | None,
    on_restart: Callable[[], None] | None,
) -> _Failure | None:
    """One GET, appending to ``fh``. None on a whole body, else why it failed."""
    import httpx

    have_bytes = fh.tell()
    if size_bytes is not None and have_bytes == size_bytes and have_bytes > 0:
        # an earlier attempt got every byte before failing (a Content-Length that lied)
        return None
    if size_bytes is not None and have_bytes > size_bytes:
        _restart(fh, on_restart)
        have_bytes = 0
    headers = {**_headers(client), "Accept-Encoding": "identity"}  # Range counts raw bytes
    if have_bytes:
        headers["Range"] = f"bytes={have_bytes}-"
    try:
        with client.stream(
            "GET", url, headers=headers, timeout=_timeout(client, timeout_s)
        ) as response:
            failure = _accept_response(response, url, fh, have_bytes, on_restart)
            if failure is not None:
                return failure
            for chunk in response.iter_raw():  # as received, so a drop loses nothing already read
                fh.write(chunk)
                if on_bytes is not None:
                    on_bytes(len(chunk))
                if size_bytes is not None and fh.tell() > size_bytes:
                    dropped = fh.tell()
                    _restart(fh, on_restart)
                    return _Failure(
                        f"body longer than the expected {size_bytes} bytes; restarting",
                        bytes_dropped=dropped,
                        too_long=True,
                    )
    except httpx.TransportError as err:
        _raise_if_permanent(err, url)
        return _Failure(describe_error(err))
    except (httpx.HTTPError, httpx.InvalidURL) as err:
        raise FetchError(f"GET {url}: {describe_error(err)}") from err
    got_bytes = fh.tell()
    if size_bytes is not None and got_bytes < size_bytes:
        return _Failure(f"body ended early ({got_bytes} of {size_bytes} bytes)")
    return None


def _accept_response(
    response: httpx.Response,
    url: str,
    fh: BinaryIO,
    have_bytes: int,
    on_restart: Callable[[], None] | None,
) -> _Failure | None:
    """Decide what a response's status means for the bytes already on disk."""
    status = response.status_code
    if status == 206 and have_bytes and _range_start(response) == have_bytes:
        return None
    if status == 200:
        if have_bytes:
            _restart(fh, on_restart)  # the server ignored Range: take the whole body again
        return None
    if status in (206, 416):
        _restart(fh, on_restart)  # a range we did not ask for, or one it cannot serve
        return _Failure(
            f"HTTP {status} for Range bytes={have_bytes}-; restarting from 0",
            bytes_dropped=have_bytes,
        )
    _raise_if_not_retryable(response, url)
    return _Failure(status_text(response), response.headers.get("Retry-After"))


def _range_start(response: httpx.Response) -> int | None:
    match = re.match(r"\s*bytes\s+(\d+)-", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _restart(fh: BinaryIO, on_restart: Callable[[], None] | None) -> None:
    fh.seek(0)
    fh.truncate()
    if on_restart is not None:
        on_restart()


def _wait(
    policy: RetryPolicy,
    failures: int,
    retry_after: str | None,
    what: str,
    on_retry: Callback | None,
) -> None:
    delay_s = policy.delay_s(failures, retry_after)
    if on_retry is not None:
        asked_s = parse_retry_after_s(retry_after)
        capped = ""
        if asked_s is not None and asked_s > policy.retry_after_cap_s:
            capped = f" (the server asked for {asked_s:.0f} s; waiting at most {policy.retry_after_cap_s:g} s)"
        on_retry(f"{what}; retry {failures + 1}/{policy.max_attempts} in {delay_s:.1f} s{capped}")
    policy.sleep(delay_s)


def _raise_if_not_retryable(response: httpx.Response, url: str) -> None:
    if not is_retryable_status(response.status_code):
        msg = f"GET {url}: {status_text(response)}; not retried"
        raise RemoteRefused(msg, status_code=response.status_code)


def _counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def status_text(response: httpx.Response) -> str:
    """``HTTP 503 Service Unavailable`` (the phrase may be empty)."""
    return f"HTTP {response.status_code} {response.reason_phrase}".rstrip()


def _raise_if_permanent(err: httpx.TransportError, url: str) -> None:
    """A URL httpx cannot speak to will never work: fail now instead of backing off."""
    import httpx

    if isinstance(err, httpx.UnsupportedProtocol):
        raise FetchError(f"GET {url}: {err}") from err


def describe_error(err: Exception) -> str:
    """Short reason for a transport error: its class plus message (``ConnectError: ...``)."""
    text = str(err) or "no detail"
    return f"{type(err).__name__}: {text}"


def _headers(client: httpx.Client) -> dict[str, str]:
    """Our User-Agent unless the caller's client already set its own."""
    if client.headers.get("User-Agent", "").startswith("python-httpx/"):
        return {"User-Agent": USER_AGENT}
    return {}


def _timeout(client: httpx.Client, timeout_s: float | None) -> httpx.Timeout:
    import httpx

    return httpx.Timeout(timeout_s) if timeout_s is not None else client.timeout

"""Retry, backoff and resume logic of nat4etl.net, against httpx.MockTransport (no sockets)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import httpx
import pytest

from nat4etl import __version__
from nat4etl.errors import FetchError, RemoteRefused, RemoteUnavailable, VerificationError
from nat4etl.net import (
    USER_AGENT,
    RetryPolicy,
    download,
    get_bytes,
    is_retryable_status,
    make_client,
    parse_retry_after_s,
)

URL = "https://zenodo.example/api/records/1/files/x.bin/content"
DATA = bytes(range(256)) * 40  # 10240 bytes


class Sleeps(list):
    """A RetryPolicy.sleep that records instead of sleeping."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def policy(max_attempts: int = 5, **kw) -> tuple[RetryPolicy, Sleeps]:
    sleeps = Sleeps()
    return RetryPolicy(max_attempts=max_attempts, sleep=sleeps, rng=random.Random(0), **kw), sleeps


def client_for(
    responses: list[Callable[[httpx.Request], httpx.Response] | httpx.Response],
) -> tuple[httpx.Client, list[httpx.Request]]:
    """A client whose n-th request gets the n-th response (the last one repeats)."""
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        item = responses[min(len(seen), len(responses)) - 1]
        return item(request) if callable(item) else item

    return make_client(transport=httpx.MockTransport(handler), timeout_s=5), seen


class Body(httpx.SyncByteStream):
    """A streamed body (``content=`` responses are pre-read and cannot be ``iter_raw``-ed);
    ``drop=True`` fails after ``data`` like a dropped connection."""

    def __init__(self, data: bytes, *, drop: bool = False) -> None:
        self.data = data
        self.drop = drop

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        if self.drop:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body"
            )


def ok(
    data: bytes = DATA, status: int = 200, headers: dict | None = None
) -> Callable[[httpx.Request], httpx.Response]:
    """A handler answering ``data`` in full (a fresh stream per request)."""
    return lambda request: httpx.Response(status, headers=headers or {}, stream=Body(data))


def dropped(
    data: bytes, total: int, status: int = 200, headers: dict | None = None
) -> httpx.Response:
    return httpx.Response(
        status,
        headers={"Content-Length": str(total), **(headers or {})},
        stream=Body(data, drop=True),
    )


def partial(start: int) -> httpx.Response:
    headers = {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"}
    return httpx.Response(206, headers=headers, stream=Body(DATA[start:]))


# ------------------------------------------------------------ Retry-After and backoff


def test_retry_after_seconds_and_dates() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after_s("7") == 7.0
    assert parse_retry_after_s(" 0 ") == 0.0
    assert parse_retry_after_s("-3") == 0.0
    assert (
        parse_retry_after_s(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now)
        == 30.0
    )
    assert (
        parse_retry_after_s(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now)
        == 0.0
    )
    assert parse_retry_after_s("soon") is None
    assert parse_retry_after_s("nan") is None
    assert parse_retry_after_s(None) is None


def test_backoff_grows_is_jittered_and_capped() -> None:
    p, _ = policy(backoff_base_s=1.0, backoff_max_s=8.0)
    for failures, step in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 8.0)]:
        delays = [p.backoff_s(failures) for _ in range(50)]
        assert all(step / 2 <= d <= step for d in delays)
        assert len(set(delays)) > 1  # jittered


def test_retry_after_wins_over_backoff_and_is_capped() -> None:
    p, _ = policy(backoff_base_s=0.5, retry_after_cap_s=120.0)
    assert 7.0 <= p.delay_s(1, "7") <= 7.05
    assert 120.0 <= p.delay_s(1, "100000") <= 120.05


def test_retryable_statuses() -> None:
    assert all(is_retryable_status(s) for s in (408, 429, 500, 502, 503, 504))
    assert not any(is_retryable_status(s) for s in (200, 301, 400, 403, 404, 410))


# ------------------------------------------------------------ get_bytes


def test_get_sends_user_agent() -> None:
    client, seen = client_for([httpx.Response(200, content=b"{}")])
    assert get_bytes(client, URL, policy=policy()[0]) == b"{}"
    assert (
        seen[0].headers["User-Agent"]
        == USER_AGENT
        == f"nat4etl/{__version__} (+https://github.com/nat4etl)"
    )


def test_get_honours_retry_after_then_succeeds() -> None:
    client, seen = client_for(
        [
            httpx.Response(429, headers={"Retry-After": "7"}),
            httpx.Response(503),
            httpx.Response(200, content=b"ok"),
        ]
    )
    p, sleeps = policy(backoff_base_s=0.01)
    assert get_bytes(client, URL, policy=p) == b"ok"
    assert len(seen) == 3
    assert 7.0 <= sleeps[0] < 7.01  # Retry-After, not backoff
    assert sleeps[1] <= 0.02  # backoff (2nd step: base * 2) for a 503 without Retry-After


def test_get_gives_up_after_max_attempts() -> None:
    client, seen = client_for([httpx.Response(503)])
    p, sleeps = policy(max_attempts=4)
    with pytest.raises(RemoteUnavailable, match=r"HTTP 503 .* gave up after 4 attempts") as info:
        get_bytes(client, URL, policy=p)
    assert URL in str(info.value)
    assert len(seen) == 4 and len(sleeps) == 3
    with pytest.raises(RemoteUnavailable, match=r"gave up after 1 attempt$"):
        get_bytes(client, URL, policy=policy(max_attempts=1)[0])


def test_get_404_is_not_retried() -> None:
    client, seen = client_for([httpx.Response(404)])
    with pytest.raises(FetchError, match="HTTP 404") as info:
        get_bytes(client, URL, policy=policy()[0])
    assert not isinstance(info.value, RemoteUnavailable)
    assert isinstance(info.value, RemoteRefused) and info.value.status_code == 404
    assert URL in str(info.value) and len(seen) == 1


def test_get_connect_error_dns_is_retried_then_named() -> None:
    def fail(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("[Errno -2] Name or service not known", request=request)

    client, seen = client_for([fail])
    with pytest.raises(
        RemoteUnavailable, match="ConnectError: .*Name or service not known"
    ) as info:
        get_bytes(client, URL, policy=policy(max_attempts=3)[0])
    assert URL in str(info.value) and len(seen) == 3


def test_get_timeout_is_retried() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client, seen = client_for([slow, httpx.Response(200, content=b"ok")])
    assert get_bytes(client, URL, policy=policy()[0]) == b"ok"
    assert len(seen) == 2


def test_unsupported_scheme_fails_at_once() -> None:
    with make_client() as client, pytest.raises(FetchError, match="ftp://"):
        get_bytes(client, "ftp://example.org/x", policy=policy()[0])


# ------------------------------------------------------------ download


def test_download_whole(tmp_path: Path) -> None:
    client, seen = client_for([ok()])
    got: list[int] = []
    download(
        client,
        URL,
        tmp_path / "x.part",
        size_bytes=len(DATA),
        policy=policy()[0],
        on_bytes=got.append,
    )
    assert (tmp_path / "x.part").read_bytes() == DATA
    assert sum(got) == len(DATA)
    assert seen[0].headers["Accept-Encoding"] == "identity" and "Range" not in seen[0].headers


def test_download_resumes_with_range_after_drop(tmp_path: Path) -> None:
    client, seen = client_for([dropped(DATA[:4000], len(DATA)), lambda r: partial(4000)])
    download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy()[0])
    assert (tmp_path / "x.part").read_bytes() == DATA
    assert seen[1].headers["Range"] == "bytes=4000-"


def test_download_restarts_when_server_ignores_range(tmp_path: Path) -> None:
    restarts: list[bool] = []
    client, seen = client_for([dropped(DATA[:4000], len(DATA)), ok()])
    download(
        client,
        URL,
        tmp_path / "x.part",
        size_bytes=len(DATA),
        policy=policy()[0],
        on_restart=lambda: restarts.append(True),
    )
    assert (tmp_path / "x.part").read_bytes() == DATA  # not 4000 bytes + the whole file
    assert seen[1].headers["Range"] == "bytes=4000-" and restarts == [True]


def test_download_restarts_on_wrong_content_range(tmp_path: Path) -> None:
    client, seen = client_for([dropped(DATA[:4000], len(DATA)), lambda r: partial(1000), ok()])
    download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy()[0])
    assert (tmp_path / "x.part").read_bytes() == DATA
    assert "Range" not in seen[2].headers


def test_download_short_body_counts_as_drop(tmp_path: Path) -> None:
    # a body that ends "cleanly" but short of the record's size: resume, do not accept
    client, seen = client_for([ok(DATA[:3000]), lambda r: partial(3000)])
    download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy()[0])
    assert (tmp_path / "x.part").read_bytes() == DATA
    assert seen[1].headers["Range"] == "bytes=3000-"


def test_download_longer_body_restarts(tmp_path: Path) -> None:
    client, _ = client_for([ok(DATA + b"junk"), ok()])
    download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy()[0])
    assert (tmp_path / "x.part").read_bytes() == DATA


def test_download_retries_429_with_retry_after(tmp_path: Path) -> None:
    client, _ = client_for([httpx.Response(429, headers={"Retry-After": "3"}), ok()])
    p, sleeps = policy(backoff_base_s=0.01)
    download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=p)
    assert (tmp_path / "x.part").read_bytes() == DATA
    assert 3.0 <= sleeps[0] < 3.01


def test_download_timeouts_exhaust_to_remote_unavailable(tmp_path: Path) -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    client, seen = client_for([slow])
    with pytest.raises(RemoteUnavailable, match="ReadTimeout.*gave up after 3 requests") as info:
        download(
            client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy(max_attempts=3)[0]
        )
    assert URL in str(info.value) and len(seen) == 3


def test_download_404_is_fetch_error_not_retried(tmp_path: Path) -> None:
    client, seen = client_for([httpx.Response(404)])
    with pytest.raises(FetchError, match="HTTP 404"):
        download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy()[0])
    assert len(seen) == 1


def test_drops_that_make_progress_do_not_exhaust_attempts(tmp_path: Path) -> None:
    # every response drops after 1000 bytes; with 2 attempts the file still completes
    def step(request: httpx.Request) -> httpx.Response:
        start = int(request.headers.get("Range", "bytes=0-")[6:-1])
        status, headers = (
            (206, {"Content-Range": f"bytes {start}-{len(DATA) - 1}/{len(DATA)}"})
            if start
            else (200, {})
        )
        return dropped(DATA[start : start + 1000], len(DATA) - start, status, headers)

    client, seen = client_for([step])
    download(
        client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy(max_attempts=2)[0]
    )
    assert (tmp_path / "x.part").read_bytes() == DATA
    assert len(seen) == 11


def test_drops_without_progress_are_bounded(tmp_path: Path) -> None:
    client, seen = client_for([lambda r: dropped(b"", len(DATA))])
    with pytest.raises(RemoteUnavailable, match=r"\(0 of 10240 bytes kept\)"):
        download(
            client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy(max_attempts=3)[0]
        )
    assert len(seen) == 3


def test_a_body_always_longer_than_the_record_is_a_size_mismatch(tmp_path: Path) -> None:
    # every attempt restarts from 0: the message says what was received, not just "0 kept",
    # and the exit code is the verification one (6), not "network" (4)
    client, seen = client_for([ok(DATA + b"junk")])
    with pytest.raises(VerificationError) as info:
        download(
            client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy(max_attempts=3)[0]
        )
    message = str(info.value)
    assert "longer than the record says" in message and URL in message
    assert "0 of 10240 bytes kept" in message
    assert "received before a restart" in message
    assert info.value.exit_code == 6 and len(seen) == 3


def test_bytes_lost_to_a_restart_are_said_when_giving_up(tmp_path: Path) -> None:
    # 3000 bytes arrive, then the server answers every Range with a 416: the give-up
    # message says 0 are kept but 3000 had been received
    def step(request: httpx.Request) -> httpx.Response:
        if "Range" in request.headers:
            return httpx.Response(416)
        return dropped(DATA[:3000], len(DATA))

    client, _ = client_for([step])
    with pytest.raises(RemoteUnavailable) as info:
        download(
            client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy(max_attempts=2)[0]
        )
    assert "0 of 10240 bytes kept, 3000 received before a restart" in str(info.value)


def test_a_capped_retry_after_says_what_the_server_asked_for(tmp_path: Path) -> None:
    client, _ = client_for([httpx.Response(503, headers={"Retry-After": "3600"}), ok()])
    p, sleeps = policy(retry_after_cap_s=5.0, backoff_base_s=0.01)
    said: list[str] = []
    download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=p, on_retry=said.append)
    assert 5.0 <= sleeps[0] < 5.01
    assert "the server asked for 3600 s; waiting at most 5 s" in said[0]
    client, _ = client_for([httpx.Response(503, headers={"Retry-After": "2"}), ok()])
    said.clear()
    download(client, URL, tmp_path / "y.part", size_bytes=len(DATA), policy=p, on_retry=said.append)
    assert "asked for" not in said[0]


def test_callers_client_user_agent_is_kept(tmp_path: Path) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return ok()(request)

    with httpx.Client(
        transport=httpx.MockTransport(handler), headers={"User-Agent": "mine/1"}
    ) as client:
        download(client, URL, tmp_path / "x.part", size_bytes=len(DATA), policy=policy()[0])
    with httpx.Client(transport=httpx.MockTransport(handler)) as client:  # httpx default UA
        download(client, URL, tmp_path / "y.part", size_bytes=len(DATA), policy=policy()[0])
    assert seen[0].headers["User-Agent"] == "mine/1"
    assert seen[1].headers["User-Agent"] == USER_AGENT

"""Shared fixtures: synthetic NAT4 mirrors written once per test session by nat4etl.sample."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Mirror:
    dir: Path
    info: object  # nat4etl.sample.SampleInfo: the ground truth of what was written


def _mirror(tmp_path_factory, name: str, *, quirks: bool) -> Mirror:
    from nat4etl.sample import write_sample

    out = tmp_path_factory.mktemp(name)
    info = write_sample(out, scale="mini", quirks=quirks, seed=0)
    return Mirror(out, info)


@pytest.fixture(scope="session")
def mini_sample(tmp_path_factory) -> Mirror:
    """A clean mini mirror (both areas). Treat as read-only."""
    return _mirror(tmp_path_factory, "mini", quirks=False)


@pytest.fixture(scope="session")
def mini_quirks_sample(tmp_path_factory) -> Mirror:
    """A mini mirror with every real-world quirk of nat4-dataset.md. Treat as read-only."""
    return _mirror(tmp_path_factory, "mini_quirks", quirks=True)


@pytest.fixture(autouse=True)
def _private_download_cache(tmp_path_factory, monkeypatch):
    """No test writes to the user's real download cache."""
    monkeypatch.setenv("NAT4ETL_CACHE", str(tmp_path_factory.getbasetemp() / "nat4etl-cache"))


@pytest.fixture(autouse=True)
def _sigint_handler_restored():
    """`nat4etl.cli.main` ignores Ctrl-C once its work is done (it is about to exit);
    called in-process by a test, it must not leave pytest deaf to Ctrl-C."""
    import signal

    handler = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, handler)

"""The bad-input standard through `build`: one `error:` line naming the file (and member),
a nat4etl exit code, the published store byte-identical, no staging copy left behind.

Inputs from tests/stages/test_unpack.py's BAD_INPUTS that once crashed a *build* (in
unpack's hand-off to rebin-sites, or in rebin-sites) rather than the unpack command, inputs
only the later stages read (wav.zip), and a full disk in the middle of writing a table."""

from __future__ import annotations

import errno
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from nat4etl.cli import cli
from tests.stages.test_unpack import (
    BAD_INPUTS,
    POP_A1,
    _append_again,
    _digest,
    _edit_site,
    _retar,
)


@pytest.fixture(scope="module")
def built(tmp_path_factory, mini_sample) -> Path:
    out = tmp_path_factory.mktemp("built") / "store"
    args = ["build", "--area", "all", "--source", str(mini_sample.dir), "--out", str(out)]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def _check_failed(result, out: Path, before: dict, *names: str) -> str:
    assert result.exit_code not in (0, 1), result.output  # a nat4etl error, not a crash
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    for name in names:
        assert name in errors[0], errors[0]
    assert _digest(out) == before
    assert [p.name for p in out.parent.iterdir() if ".staging-" in p.name] == []
    return errors[0]


def _wav_twice_under_one_name(d: Path) -> tuple[str, str]:
    """wav.zip listing one wav twice, the second another sound's bytes (unpack does not
    read wav.zip): align-wav decoded both and placed whichever finished last."""
    path = d / "wav.zip"
    with zipfile.ZipFile(path) as zf:
        first, other = [n for n in zf.namelist() if n.endswith(".wav")][:2]
        body = zf.read(other)
    _append_again(path, first, body)
    return path.name, f"{first}: member appears twice"


def _site_fs_off_the_bin_grid(d: Path) -> tuple[str, str]:
    """A site JSON's fs of 99 Hz: no whole number of samples makes a 10 ms bin. The error
    named the site (its recording) but not the file holding the JSON."""

    def slower(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "fs": 99}).encode()

    member = _edit_site(d, "A1", ".resp.json", slower)
    return "A1_single_sites.zip", f"{member}: site "


def _site_fs_no_bin_holds(d: Path) -> tuple[str, str]:
    """A site JSON's fs of 1 mHz: no bin of whole ms up to 10 s holds whole samples, so
    no --dt-ms helps: bad input (exit 3) naming the file, not a configuration error whose
    hint was "a multiple of 1e+06 ms"."""

    def slower(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "fs": 1e-3}).encode()

    member = _edit_site(d, "A1", ".resp.json", slower)
    return "A1_single_sites.zip", f"{member}: site "


def _population_at_99_hz(d: Path) -> tuple[str, None]:
    """Every population JSON at 99 Hz: a sound is 148 frames of 10.1 ms, which no whole-ms
    bin divides. It was a configuration error (exit 2) naming no file, and suggesting the
    bin widths that would do: "none"."""

    def slower(body: bytes) -> bytes:
        return json.dumps({**json.loads(body), "fs": 99}).encode()

    path = d / POP_A1
    path.write_bytes(
        _retar(
            path.read_bytes(),
            lambda n, b: slower(b) if n.endswith(".json") and not n.endswith(".meta.json") else b,
        )
    )
    return POP_A1, None


#: BAD_INPUTS' faults that once crashed a build, and those only a build reads
FAULTS = {
    **{
        fault: BAD_INPUTS[fault]
        for fault in (
            "infinite epoch end",
            "site fs of a gigahertz",
            "stim at another rate",
            "population at a gigahertz",
            "empty population",
            "empty site tgz",
            "pred_correlation repeated column",
        )
    },
    "wav.zip member twice": _wav_twice_under_one_name,
    "site fs off the bin grid": _site_fs_off_the_bin_grid,
    "site fs no bin holds": _site_fs_no_bin_holds,
    "population at 99 Hz": _population_at_99_hz,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_build_on_bad_input_fails_naming_it(fault, tmp_path, mini_sample, built):
    bad = tmp_path / "bad"
    shutil.copytree(mini_sample.dir, bad)
    file_name, member = FAULTS[fault](bad)
    (bad / "record.json").unlink()  # edited files no longer have the published md5s
    before = _digest(built)
    args = ["build", "--area", "all", "--source", str(bad), "--out", str(built)]
    result = CliRunner().invoke(cli, args)
    error = _check_failed(result, built, before, file_name, *([member] if member else []))
    if fault == "site fs no bin holds":
        assert result.exit_code == 3 and "a wrong JSON fs?" in error
    if fault == "site fs off the bin grid":  # 99 Hz: only whole seconds hold whole samples
        assert result.exit_code == 2 and "Widths that are: 1000, 2000, 3000" in error


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _polars_enospc(*args, **kwargs):
    import polars as pl

    raise pl.exceptions.ComputeError(
        "parquet: File out of specification: underlying IO error: No space left on device "
        "(os error 28)"
    )


@pytest.mark.parametrize(
    ("module", "owner", "attr", "fake", "file"),
    [
        ("polars", "DataFrame", "write_parquet", _polars_enospc, "responses/area="),
        ("pyarrow.parquet", None, "write_table", _enospc, "/area="),
        ("pathlib", "Path", "write_text", _enospc, "_stages/"),  # a stage record
    ],
)
def test_full_disk_is_one_line_naming_the_file(
    module, owner, attr, fake, file, monkeypatch, mini_sample, built
):
    import importlib

    target = importlib.import_module(module)
    target = getattr(target, owner) if owner else target
    before = _digest(built)
    monkeypatch.setattr(target, attr, fake)
    args = ["build", "--area", "all", "--source", str(mini_sample.dir), "--out", str(built)]
    result = CliRunner().invoke(cli, [*args, "--force"])
    monkeypatch.undo()
    line = _check_failed(result, built, before, file, "No space left on device")
    assert ".tmp-" not in line  # the store's file, not its temp file

"""The cron contract, tested the hard way: SIGKILL mid-build, two builds at once, exit codes.

Builds run in subprocesses. ``NAT4ETL_TEST_KILL_AT=<point>`` (see ``nat4etl.store``) makes
the build SIGKILL itself at a named point. The fake-stage tests drive ``build`` through a
tiny driver (fake stages from ``test_build``); the real-stage tests run the CLI on the
mini sample and are skipped until every stage module has landed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_build import FAKES, table_bytes, write_mirror

import nat4etl.stages.build as build_mod
from nat4etl.cli import cli
from nat4etl.errors import EXIT_CODES
from nat4etl.stages.build import verify
from nat4etl.store import Store, lock_holder

TESTS = Path(__file__).parent
PY = sys.executable

DRIVER = f"""
import os, sys, time
sys.path.insert(0, {str(TESTS)!r})
from pathlib import Path
import test_build
from nat4etl.errors import Nat4EtlError
from nat4etl.progress import make_progress
from nat4etl.stages.build import build

out, mirror, wait_s = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
gate = os.environ.get("FAKE_GATE")  # unpack waits until this file exists
unpack = test_build.FAKES["unpack"].run

def gated(*args):
    deadline = time.monotonic() + 60
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    return unpack(*args)

test_build.FAKES["unpack"].run = gated
try:
    with make_progress("plain") as progress:
        build(out, test_build.settings_for(mirror), progress, wait_s=wait_s,
              stages=test_build.FAKES)
except Nat4EtlError as err:
    print(f"error: {{err}}", file=sys.stderr)
    sys.exit(err.exit_code)
"""


def fake_build(out: Path, mirror: Path, *, kill_at: str = "", wait_s: float = 0, gate=None):
    env = {**os.environ, "NAT4ETL_TEST_KILL_AT": kill_at, "FAKE_GATE": str(gate or "")}
    cmd = [PY, "-c", DRIVER, str(out), str(mirror), str(wait_s)]
    return subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def snapshot(out: Path) -> dict[str, bytes]:
    """Every file of the published store, by path."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    return [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.staging-")]


# ----------------------------------------------------------------------- SIGKILL, fake stages
#: the real-stage tests below cover "during unpack" (write:epochs), a later table write and
#: "just before the swap" (publish); these add the points between
KILL_POINTS = ["stage:unpack", "write:trials", "manifest"]


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """An old mirror, a new one, and the store an uninterrupted build makes of the new one."""
    d = tmp_path_factory.mktemp("kill")
    old, new = write_mirror(d / "old"), write_mirror(d / "new", a1="r1 r2 r9", version="1.2")
    reference = d / "reference"
    assert finish(fake_build(reference, new))[0] == 0
    return old, new, table_bytes(reference)


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_keeps_the_previous_store_and_the_next_build_completes(tmp_path, two_inputs, point):
    old, new, reference = two_inputs
    out = tmp_path / "nat4"
    assert finish(fake_build(out, old))[0] == 0
    before = snapshot(out)

    code, _ = finish(fake_build(out, new, kill_at=point))
    assert code == -signal.SIGKILL
    assert snapshot(out) == before, "the published store changed"
    assert verify(out) == [] and Store(out).read_table("trials").num_rows == 5
    assert leftovers(out), "a killed build leaves its staging copy"

    code, err = finish(fake_build(out, new))  # the dead build's lock is taken over at once
    assert code == 0, err
    assert "removed leftover" in err and leftovers(out) == []
    assert table_bytes(out) == reference
    assert verify(out) == []


def test_sigkill_right_after_the_swap_leaves_the_new_store(tmp_path, two_inputs):
    old, new, reference = two_inputs
    out = tmp_path / "nat4"
    assert finish(fake_build(out, old))[0] == 0
    assert finish(fake_build(out, new, kill_at="exchanged"))[0] == -signal.SIGKILL
    assert table_bytes(out) == reference and verify(out) == []
    code, err = finish(fake_build(out, new))
    assert code == 0 and "up to date" in err and leftovers(out) == []


# ----------------------------------------------------------------------- two builds at once
def wait_for_lock(out: Path, timeout_s: float = 20) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (holder := lock_holder(out)) is not None:
            return holder
        time.sleep(0.02)
    raise AssertionError("the first build never took the lock")


def test_second_build_exits_with_the_lock_code_or_waits(tmp_path):
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "nat4"
    gate = tmp_path / "gate"
    first = fake_build(out, mirror, gate=gate)  # holds the lock until the gate opens
    holder = wait_for_lock(out)
    assert f"pid {first.pid}" in holder

    code, err = finish(fake_build(out, mirror))  # no --wait
    assert code == EXIT_CODES["lock_held"] == 5
    assert f"pid {first.pid}" in err and "--wait" in err

    waiter = fake_build(out, mirror, wait_s=30)
    assert "waiting up to 30 s" in waiter.stderr.readline()
    gate.touch()
    assert finish(first)[0] == 0
    code, err = finish(waiter)
    assert code == 0 and "up to date" in err
    assert verify(out) == [] and leftovers(out) == []


# ----------------------------------------------------------------------- CLI contract
@pytest.fixture
def cli_on_fakes(monkeypatch):
    """The real CLI, with build's stages replaced by the fakes."""
    monkeypatch.setattr(
        build_mod,
        "default_stages",
        lambda names, **_: build_mod.stages_from_modules(
            {n: FAKES[n] for n in names if n in FAKES}
        ),
    )
    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args])


def test_cli_json_quiet_verify_and_repair(tmp_path, cli_on_fakes):
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "nat4"
    args = ("--out", out, "--source", mirror, "--no-wav")

    result = cli_on_fakes("build", *args, "--json")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert any(x.get("stage") == "unpack" and x.get("action") == "run" for x in lines)
    assert lines[-1]["ran"] == ["fetch", "unpack", "parse-epochs", "rebin-sites"]

    result = cli_on_fakes("build", *args, "--quiet")
    assert result.exit_code == 0 and result.output == "" and result.stderr == ""

    status = cli_on_fakes("status", *args, "--dt-ms", "5", "--json")
    stages = {s["stage"]: s for s in json.loads(status.stdout)["stages"]}
    assert stages["rebin-sites"]["reasons"] == ["parameter dt_ms: 10.0 -> 5.0"]
    text = cli_on_fakes("status", *args).stdout
    assert "record  8044773 version 1.1.0" in text and "rebin-sites   up to date" in text

    table = out / "trials/area=PEG/part-0.parquet"
    table.write_bytes(table.read_bytes()[:-7] + b"garbage")
    result = cli_on_fakes("verify", "--out", out)
    assert result.exit_code == EXIT_CODES["verification"] == 6
    assert "trials/area=PEG/part-0.parquet" in result.stderr
    result = cli_on_fakes("verify", "--out", out, "--json")
    lines = [json.loads(line) for line in result.stderr.splitlines()]
    assert lines[0]["difference"] and "trials/area=PEG" in lines[0]["msg"]
    assert lines[-1]["exit_code"] == 6 and result.stdout == ""

    assert cli_on_fakes("build", *args).exit_code == 0
    assert cli_on_fakes("verify", "--out", out).exit_code == 0


def test_cli_lock_held_exit_code(tmp_path, cli_on_fakes):
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "nat4"
    gate = tmp_path / "gate"
    first = fake_build(out, mirror, gate=gate)
    wait_for_lock(out)
    result = cli_on_fakes("build", "--out", out, "--source", mirror, "--no-wav", "--json")
    assert result.exit_code == 5
    assert result.stdout == ""
    err = json.loads(result.stderr.strip().splitlines()[-1])
    assert err["error"] == "StoreLocked" and f"pid {first.pid}" in err["msg"]
    assert err["exit_code"] == 5 and err["level"] == "error"
    gate.touch()
    assert finish(first)[0] == 0


# ----------------------------------------------------------------------- real stages, mini sample


#: one area keeps these tests fast; the other area takes the same code paths
AREA = ("--area", "A1")


def nat4(*args, kill_at: str = "", wait: bool = True):
    """The real CLI in a subprocess (as cron runs it: no TTY); builds get ``AREA``."""
    env = {**os.environ, "NAT4ETL_TEST_KILL_AT": kill_at}
    cmd = [PY, "-m", "nat4etl.cli", *map(str, args)]
    if args[0] == "build":
        cmd += AREA
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def real(tmp_path_factory, mini_sample, mini_quirks_sample):
    """A store built from the quirks mirror (the "previous" store) and an uninterrupted
    build of the clean mirror (the reference every interrupted build must end up equal to)."""
    d = tmp_path_factory.mktemp("real")
    previous, reference = d / "previous", d / "reference"
    r = nat4("build", "--source", mini_quirks_sample.dir, "--out", previous, "--quiet")
    assert r.returncode == 0, r.stderr
    r = nat4("build", "--source", mini_sample.dir, "--out", reference)
    assert r.returncode == 0, r.stderr
    return previous, reference, mini_sample.dir


def test_real_noop_rebuild_publishes_nothing(real):
    _, reference, mirror = real
    inode = reference.stat().st_ino
    t0 = time.monotonic()
    r = nat4("build", "--source", mirror, "--out", reference, "--json")
    seconds = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stderr.splitlines()[-1])
    assert last["up_to_date"] and last["ran"] == [] and last["files_hashed"] == 0
    assert reference.stat().st_ino == inode
    assert seconds < 3, f"no-op build took {seconds:.2f} s"


@pytest.mark.parametrize("point", ["write:epochs", "write:responses", "publish"])
def test_real_sigkill_at_each_point(real, tmp_path, point):
    import shutil

    previous, reference, mirror = real
    out = shutil.copytree(previous, tmp_path / "nat4")  # copy2: mtimes kept, states valid
    before = snapshot(out)
    r = nat4("build", "--source", mirror, "--out", out, kill_at=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert snapshot(out) == before
    assert verify(out) == []
    r = nat4("build", "--source", mirror, "--out", out)
    assert r.returncode == 0, r.stderr
    assert table_bytes(out) == table_bytes(reference)
    assert leftovers(out) == []


def test_real_two_builds_at_once(real, tmp_path):
    _, reference, mirror = real
    out = tmp_path / "nat4"
    first = nat4("build", "--source", mirror, "--out", out, wait=False)
    wait_for_lock(out)
    second = nat4("build", "--source", mirror, "--out", out, wait=False)
    waiter = nat4("build", "--source", mirror, "--out", out, "--wait", "120", wait=False)
    _, err2 = second.communicate(timeout=300)
    assert first.wait(timeout=300) == 0
    # the second either found the lock held (exit 5, naming the holder) or, if the first
    # had already finished, found the store up to date
    assert second.returncode in (0, 5)
    if second.returncode == 5:
        assert f"pid {first.pid}" in err2
    else:
        assert "up to date" in err2
    assert waiter.wait(timeout=300) == 0
    assert verify(out) == [] and table_bytes(out) == table_bytes(reference)


def test_real_corrupt_table_verify_names_it_and_build_repairs_it(real, tmp_path):
    import shutil

    _, reference, mirror = real
    out = shutil.copytree(reference, tmp_path / "nat4")
    victim = out / "responses/area=A1/part-0.parquet"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    r = nat4("verify", "--out", out)
    assert r.returncode == 6 and "responses/area=A1/part-0.parquet" in r.stderr
    r = nat4("build", "--source", mirror, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    ran = json.loads(r.stderr.splitlines()[-1])["ran"]
    assert ran == ["rebin-sites"]
    assert nat4("verify", "--out", out).returncode == 0
    assert table_bytes(out) == table_bytes(reference)


def test_real_two_builds_give_identical_tables(real, tmp_path):
    _, reference, mirror = real
    r = nat4("build", "--source", mirror, "--out", tmp_path / "again", "--quiet")
    assert r.returncode == 0, r.stderr

    def digests(out):
        return {
            t["path"]: t["digest"]
            for t in json.loads((out / "manifest.json").read_text())["tables"]
        }

    assert digests(tmp_path / "again") == digests(reference)
    assert table_bytes(tmp_path / "again") == table_bytes(reference)


def test_real_waveforms_added_to_a_no_wav_store_rerun_only_what_reads_wav_zip(
    tmp_path, mini_quirks_sample
):
    """`build --no-wav`, then `build --wav` on the same store: wav.zip's arrival reruns
    fetch (it gets it), parse-epochs (it checks the sounds' names against wav.zip's) and
    align-wav, not unpack nor what follows it; and every table file is byte for byte the
    one a fresh `build --wav` writes."""
    mirror = mini_quirks_sample.dir
    out, fresh = tmp_path / "nat4", tmp_path / "fresh"
    r = nat4("build", "--no-wav", "--source", mirror, "--out", out, "--quiet")
    assert r.returncode == 0, r.stderr
    without = Store(out).read_table("report", area="A1").to_pylist()
    # status cannot know what fetch will bring; it must not call parse-epochs up to date
    r = nat4("status", "--wav", "--source", mirror, "--out", out, "--json", *AREA)
    states = {row["stage"]: row["state"] for row in json.loads(r.stdout)["stages"]}
    assert states["fetch"] == "will run" and states["align-wav"] == "will run"
    assert states["parse-epochs"] == "may run", states  # it lists wav.zip's members
    r = nat4("build", "--wav", "--source", mirror, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stderr.splitlines()[-1])
    assert last["ran"] == ["fetch", "parse-epochs", "align-wav"]
    assert last["skipped"] == ["unpack", "rebin-sites", "normalize"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["build"]["ran"] == last["ran"]
    assert manifest["parameters"]["wav"] is True
    r = nat4("build", "--wav", "--source", mirror, "--out", fresh, "--quiet")
    assert r.returncode == 0, r.stderr

    def tables(store: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(store)): p.read_bytes()
            for p in sorted(store.glob("*/area=*/part-0.*"))
        }

    assert tables(out) == tables(fresh)
    assert any(p.startswith("waveforms/") for p in tables(out))
    # what made that possible: a table's provenance names the files it is made from
    a1 = {"A1_NAT4_ozgf.fs100.ch18.tgz", "A1_single_sites.zip", "A1_pred_correlation.csv"}
    sources = {
        table: {s["name"] for s in Store(out).table_metadata(table, "A1")["sources"]}
        for table in ("epochs", "stims", "report", "responses", "waveforms", "norm_constants")
    }
    assert sources.pop("waveforms") == a1 | {"wav.zip"}
    assert all(names == a1 for names in sources.values()), sources
    # parse-epochs had to rerun: the quirks sample's case-only wav names are reported
    report = Store(out).read_table("report", area="A1").to_pylist()
    added = [r for r in report if r not in without]
    assert added and {r["kind"] for r in added} == {"wav_case_only_match"}
    r = nat4("build", "--wav", "--source", mirror, "--out", out, "--json")
    assert json.loads(r.stderr.splitlines()[-1])["up_to_date"]
    # and back: wav.zip stays in raw/, but no longer fetched, it is not read (as the
    # fingerprints say): the report is the --no-wav one again
    r = nat4("build", "--no-wav", "--source", mirror, "--out", out, "--json")
    assert json.loads(r.stderr.splitlines()[-1])["ran"] == ["fetch", "parse-epochs"]
    assert (out / "raw/wav.zip").is_file()
    assert Store(out).read_table("report", area="A1").to_pylist() == without


def test_unpack_with_source_records_the_mirror_it_read(tmp_path, mini_sample, mini_quirks_sample):
    """`unpack --source M` on a store whose raw/ fetch filled from another mirror reads M:
    its fingerprint and the tables' sources are M's files (they named raw/'s, so a change
    to M did not rerun unpack and the md5s recorded were not the ones read)."""
    out = tmp_path / "nat4"
    r = nat4("fetch", "--no-wav", "--source", mini_quirks_sample.dir, "--out", out, *AREA)
    assert r.returncode == 0, r.stderr

    def md5s(mirror: Path) -> dict[str, str]:
        return {
            p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(mirror.glob("A1_*"))
        }

    read, fetched = md5s(mini_sample.dir), md5s(mini_quirks_sample.dir)
    assert read != fetched
    r = nat4("unpack", "--source", mini_sample.dir, "--out", out, *AREA)
    assert r.returncode == 0, r.stderr
    inputs = json.loads((out / "_stages/unpack.json").read_text())["inputs"]
    assert {k: v for k, v in inputs.items() if not k.endswith("#record")} == {
        f"source/{name}": f"md5:{md5}" for name, md5 in read.items()
    }
    sources = Store(out).table_metadata("epochs", "A1")["sources"]
    assert {s["name"]: s["md5"] for s in sources} == read
    r = nat4("unpack", "--source", mini_sample.dir, "--out", out, *AREA, "--json")
    assert json.loads(r.stderr.splitlines()[-1])["up_to_date"]
    # without --source it reads raw/, which fetch filled from the other mirror
    r = nat4("unpack", "--out", out, *AREA, "--json")
    assert json.loads(r.stderr.splitlines()[-1])["ran"] == ["unpack"]
    sources = Store(out).table_metadata("epochs", "A1")["sources"]
    assert {s["name"]: s["md5"] for s in sources} == fetched

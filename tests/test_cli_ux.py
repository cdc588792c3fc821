"""The command line as a user meets it: config mistakes, --json errors, help, status/verify
on directories that are not stores, progress on a terminal."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from nat4etl.cli import cli, main
from nat4etl.config import load_settings
from nat4etl.errors import ConfigError


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ----------------------------------------------------------------------- config mistakes
@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("[build]\ndtms = 5\n", "build.dtms"),  # a typo must not build at 10 ms silently
        ("[bild]\ndt_ms = 5\n", "bild"),
        ("[zenodo]\nrecord = 1\n", "zenodo.record"),
    ],
)
def test_config_unknown_key_is_a_config_error(tmp_path, text, named):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=named) as err:
        load_settings(cfg)
    assert "c.toml" in str(err.value) and "unknown" in str(err.value)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('[build]\nwav = "no"\n', "build.wav"),  # bool("no") is True
        ('[build]\nareas = "A1"\n', "build.areas"),  # tuple("A1") is ('A', '1')
        ("[zenodo]\njobs = 2.7\n", "zenodo.jobs"),  # int(2.7) is 2
        ('[build]\ndt_ms = "ten"\n', "build.dt_ms"),
        ("build = 3\n", "build"),
        ("[build]\nnorm = 3\n", "build.norm"),
    ],
)
def test_config_wrong_type_names_the_key(tmp_path, text, named):
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    with pytest.raises(ConfigError, match=named) as err:
        load_settings(cfg)
    assert "c.toml" in str(err.value) and "\n" not in str(err.value)


def test_config_ints_are_fine_where_floats_are_expected(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[build]\ndt_ms = 20\n[zenodo]\ntimeout_s = 5\n")
    s = load_settings(cfg)
    assert (s.dt_ms, s.timeout_s) == (20.0, 5.0)


def test_cli_config_typo_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[build]\ndtms = 5\n")
    result = invoke("status", "--out", tmp_path / "o", "--config", cfg)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: c.toml")


def test_cli_config_not_utf8_exits_2_with_one_line(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_bytes(b"\xff\xfe")  # UTF-16's byte-order mark: a file saved by the wrong editor
    result = invoke("status", "--out", tmp_path / "o", "--config", cfg)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: c.toml")
    assert "UTF-8" in result.stderr


@pytest.mark.parametrize("command", ["build", "fetch", "status"])
def test_cli_malformed_zenodo_url_exits_2_before_anything_runs(tmp_path, command):
    """A URL without http(s):// and a host is a usage error (2), not a network failure (4)."""
    out = tmp_path / "o"
    result = invoke(command, "--zenodo-url", "not-a-url", "--out", out)
    assert result.exit_code == 2, result.output
    assert "--zenodo-url" in result.stderr and "not-a-url" in result.stderr
    assert not out.exists() and not (tmp_path / ".o.lock").exists()


def test_cli_malformed_zenodo_url_in_a_config_file_exits_2(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[zenodo]\nurl = "zenodo.org"\n')
    out = tmp_path / "o"
    result = invoke("build", "--out", out, "--config", cfg)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: c.toml")
    assert "zenodo.url" in result.stderr and "'zenodo.org'" in result.stderr
    assert not out.exists()


# ----------------------------------------------------------------------- --json errors
def test_json_mode_usage_errors_are_one_json_line(tmp_path, monkeypatch, capsys):
    """cron parses stderr line by line: click's own errors must be JSON too with --json."""
    args = ["build", "--out", str(tmp_path / "o"), "--config", str(tmp_path / "nope.toml")]
    monkeypatch.setattr("sys.argv", ["nat4etl", *args, "--json"])
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "error" and obj["exit_code"] == 2 and "nope.toml" in obj["msg"]
    assert "time" in obj

    monkeypatch.setattr("sys.argv", ["nat4etl", *args])  # without --json: click's text
    with pytest.raises(SystemExit) as exit_:
        main()
    assert exit_.value.code == 2
    assert "nope.toml" in capsys.readouterr().err


def test_json_summary_line_has_a_time(monkeypatch, capsys, tmp_path):
    from nat4etl import cli as cli_mod
    from nat4etl import summary

    monkeypatch.setattr(summary, "summarize", lambda out: [])
    cli_mod._echo_summary(tmp_path, json_mode=True, quiet=False)
    obj = json.loads(capsys.readouterr().out)
    assert obj["event"] == "summary" and obj["areas"] == [] and "time" in obj


# ----------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_says_whether_this_run_had_published(monkeypatch, tmp_path, mini_sample):
    from nat4etl import cli as cli_mod
    from nat4etl import store as store_mod

    monkeypatch.setattr(store_mod, "PUBLISHED", [])
    assert "nothing was published" in cli_mod._interrupted()

    def interrupted(*_args):  # Ctrl-C while the summary is printed: after the publish
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_mod, "_echo_summary", interrupted)
    out = tmp_path / "store"
    result = invoke("build", "--area", "A1", "--no-wav", "--source", mini_sample.dir, "--out", out)
    assert result.exit_code == 130
    assert f"interrupted after {out} was published; the new store is complete" in result.output
    assert (out / "manifest.json").is_file()


# ----------------------------------------------------------------------- closed stdout
def test_output_into_a_closed_pipe_exits_141_without_a_traceback(mini_quirks_sample, tmp_path):
    """`nat4etl report | head -1`: the reader goes away; exit as SIGPIPE ends Unix tools."""
    out = tmp_path / "store"
    built = invoke("build", "--area", "A1", "--source", mini_quirks_sample.dir, "--out", out)
    assert built.exit_code == 0, built.output
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout fails with EPIPE
    try:
        for args in (["report", "--out", str(out)], ["status", "--out", str(out), "--json"]):
            done = subprocess.run(
                [sys.executable, "-m", "nat4etl", *args],
                stdout=write_end,
                stderr=subprocess.PIPE,
                timeout=120,
            )
            assert done.returncode == 141, done.stderr
            assert done.stderr == b"", done.stderr  # no traceback, no "Broken pipe" line
    finally:
        os.close(write_end)


def test_shell_completion_as_the_readme_says():
    """`_NAT4ETL_COMPLETE=bash_source nat4etl` (README): click's completion reaches through
    main(), which runs the group outside click's standalone mode."""
    script = subprocess.run(
        [sys.executable, "-m", "nat4etl"],
        env={**os.environ, "_NAT4ETL_COMPLETE": "bash_source"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert script.returncode == 0 and "_nat4etl_completion()" in script.stdout

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_NAT4ETL_COMPLETE": "bash_complete"}
        env |= {"COMP_WORDS": words, "COMP_CWORD": str(cword)}
        done = subprocess.run(
            [sys.executable, "-m", "nat4etl"], env=env, capture_output=True, text=True, timeout=60
        )
        return [line.split(",", 1)[1] for line in done.stdout.splitlines()]

    assert complete("nat4etl re", 1) == ["rebin-sites", "report"]
    assert "--area" in complete("nat4etl build --ar", 2)
    assert complete("nat4etl build --area p", 3) == ["PEG"]


def test_area_choices_are_shown_as_the_dataset_writes_them():
    """--area takes any case, but help and errors say A1 and PEG (click alone casefolds them)."""
    for command in ("build", "report"):
        assert "--area [A1|PEG|all]" in invoke(command, "--help").output
    result = invoke("status", "--out", "nowhere", "--area", "V1")
    assert result.exit_code == 2
    assert "'V1' is not one of 'A1', 'PEG', 'all'." in result.output


def test_area_metavar_as_click_8_1_asks_for_it():
    """pyproject allows click 8.1, whose Parameter.make_metavar calls
    ``type.get_metavar(param)`` without a context: every --help with --area must work there."""
    from nat4etl.cli import AreaChoice

    param = click.Option(["--area"], type=AreaChoice())
    assert AreaChoice().get_metavar(param) == "[A1|PEG|all]"


# ----------------------------------------------------------------------- help
def test_root_help_explains_exit_codes_in_words():
    out = invoke("--help").output
    assert "lock_held" not in out and "bad_input" not in out
    assert "another build holds the lock" in out
    assert "interrupted" in out


# ----------------------------------------------------------------------- not a store
def test_verify_on_a_directory_that_is_not_a_store_exits_7(tmp_path):
    """README: 7 = the store is unusable (... OUT is not a store); 6 is for differences."""
    for out in (tmp_path / "missing", tmp_path / "notstore"):
        if out.name == "notstore":
            out.mkdir()
            (out / "x.txt").write_text("hi")
        result = invoke("verify", "--out", out)
        assert result.exit_code == 7, result.output
        assert "not a nat4etl store" in result.stderr
        assert result.stderr.count("\n") == 1


def test_status_on_a_directory_build_would_refuse(tmp_path):
    out = tmp_path / "notstore"
    out.mkdir()
    (out / "x.txt").write_text("hi")
    result = invoke("status", "--out", out)
    assert result.exit_code == 7
    assert "refusing" in result.stderr and "will run" not in result.output


# ----------------------------------------------------------------------- progress on a TTY
def test_rich_progress_does_not_pile_up_finished_bars():
    from rich.console import Console

    from nat4etl.progress import RichProgress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80)
    with RichProgress(console=console) as progress:
        for i in range(20):
            progress.start(f"file{i}.zip", total=10)
            progress.advance(f"file{i}.zip", 10)
            progress.done(f"file{i}.zip")
        assert len(progress._bars.tasks) == 0


# ----------------------------------------------------------------------- status says what to run
def test_status_text_ends_with_what_to_run():
    from nat4etl.cli import _render_status

    stale = {
        "out": "/data/nat4",
        "built": True,
        "stages": [
            {"stage": "unpack", "state": "up to date", "reasons": []},
            {"stage": "rebin-sites", "state": "will run", "reasons": ["parameter dt_ms"]},
        ],
        "manifest": [],
        "up_to_date": False,
    }
    assert "nat4etl build --out /data/nat4" in _render_status(stale).splitlines()[-1]
    fresh = {**stale, "stages": stale["stages"][:1], "up_to_date": True}
    assert "nat4etl build" not in _render_status(fresh)


def test_a_bar_on_an_80_column_terminal_names_the_member_and_keeps_to_one_line():
    """A population member's label keeps its own name (a cut at the end left only the tgz
    and the recording's name), a name with [brackets] is not rich markup, and the amount
    stays on the bar's line."""
    from rich.console import Console

    from nat4etl.progress import RichProgress

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, color_system=None)
    member = "A1_NAT4_ozgf.fs100.ch18.tgz:A1_NAT4_ozgf_fs100_ch18/A1_NAT4_ozgf_fs100_ch18.resp.csv"
    with RichProgress(console=console) as progress:
        progress.start(member, total=1_900_000_000)
        progress.advance(member, 855_600_000)
        progress.start("wav.zip:[odd].wav", total=10)
        progress._bars.refresh()
        lines = buf.getvalue().replace("\r", "\n").splitlines()
    bars = [line for line in lines if "resp.csv" in line]
    assert bars and all("…ozgf_fs100_ch18.resp.csv" in bar for bar in bars)
    assert any("855.6 MB / 1.9 GB" in bar for bar in bars)
    assert any("wav.zip:[odd].wav" in line for line in lines)

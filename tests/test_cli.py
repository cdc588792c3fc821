"""The CLI shell: stages listed, placeholders honest, errors one line with exit codes."""

from __future__ import annotations

from click.testing import CliRunner

from nat4etl.cli import cli
from nat4etl.stages import STAGES


def test_help_lists_every_stage_build_and_sample():
    result = CliRunner().invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in (*STAGES, "build", "sample"):
        assert f"  {name} " in result.output or f"  {name}\n" in result.output, name


def test_every_stage_command_has_help():
    for name in (*STAGES, "build", "sample"):
        result = CliRunner().invoke(cli, [name, "--help"])
        assert result.exit_code == 0, (name, result.output)
        assert "--out" in result.output


def test_unknown_area_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(cli, ["unpack", "--out", str(tmp_path / "o"), "--area", "XX"])
    assert result.exit_code == 2
    assert not (tmp_path / "o").exists()

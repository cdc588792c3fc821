"""The command line: parse options, call one function, render, map errors to exit codes.

No logic lives here. Heavy imports happen inside commands so ``--help`` stays instant.
"""

from __future__ import annotations

import functools
import os
import signal
import sys
from pathlib import Path

import click

from nat4etl import __version__
from nat4etl.errors import EXIT_CODES, Nat4EtlError
from nat4etl.stages import STAGES

#: what each exit code means, in the README's words
EXIT_CODE_MEANINGS = {
    "ok": "built, or already up to date",
    "unexpected": "unexpected error (a bug: please report it)",
    "usage": "usage or configuration error",
    "bad_input": "bad input (a file or member that cannot be decoded; inputs that disagree)",
    "network": "network failure (Zenodo unreachable, retries exhausted)",
    "lock_held": "another build holds the lock",
    "verification": "verification failure (size or digest mismatch)",
    "store": "the store is unusable (schema version, missing table, OUT is not a store / "
    "sample, a write that failed, e.g. a full disk)",
    "interrupted": "interrupted (Ctrl-C); the store is as it was unless this run had published",
    "output_closed": "stdout closed before the output was written (piped into `head`)",
}
#: "\b" keeps click from re-flowing the table into one line
EXIT_CODE_HELP = "\b\n" + "\n".join(
    f"{code:>3}  {EXIT_CODE_MEANINGS[what]}" for what, code in EXIT_CODES.items()
)


def _progress(json_mode: bool, quiet: bool):
    """rich bars on a terminal, plain lines otherwise; use as a context manager."""
    from nat4etl.progress import make_progress

    return make_progress("json" if json_mode else "quiet" if quiet else "auto")


def _fail(err: Exception, code: int, json_mode: bool, *, kind: str | None = None) -> None:
    """The last line on stderr, where the log lines go (in --json mode one more object)."""
    if json_mode:
        kind = kind or type(err).__name__
        click.echo(_json_line("error", str(err), error=kind, exit_code=code), err=True)
    else:
        click.echo(f"error: {err}", err=True)
    sys.exit(code)


def _json_line(level: str, msg: str, **fields) -> str:
    """A log line in the shape of nat4etl.progress's JSON lines."""
    import json
    from datetime import UTC, datetime

    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    return json.dumps({"time": now, "event": "log", "level": level, "msg": msg, **fields})


def _output_closed() -> None:
    """stdout's reader went away (``nat4etl report | head``): exit quietly with SIGPIPE's
    code, as Unix tools do, with stdout on /dev/null so that the interpreter's last flush
    cannot fail again with a traceback."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    sys.exit(EXIT_CODES["output_closed"])


def _interrupted() -> str:
    """What a Ctrl-C left: whether this run had published its store (then it is whole)."""
    store = sys.modules.get("nat4etl.store")  # not imported: nothing was published
    published = list(getattr(store, "PUBLISHED", []))
    if published:
        where = ", ".join(str(p) for p in published)
        return f"interrupted after {where} was published; the new store is complete"
    return "interrupted; nothing was published, the store is as it was"


def handle_errors(fn):
    """Map every nat4etl error to its exit code with a one-line message; no tracebacks."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        json_mode = bool(kwargs.get("json_mode"))
        try:
            return fn(*args, **kwargs)
        except Nat4EtlError as err:
            _fail(err, err.exit_code, json_mode)
        except BrokenPipeError:
            _output_closed()
        except KeyboardInterrupt:
            _fail(
                RuntimeError(_interrupted()),
                EXIT_CODES["interrupted"],
                json_mode,
                kind="Interrupted",
            )
        except OSError as err:
            _fail(err, EXIT_CODES["unexpected"], json_mode)

    return wrapper


def log_options(fn):
    """How a command logs: every command has these."""
    fn = click.option(
        "--quiet", is_flag=True, help="Only warnings and errors; no progress, no summary."
    )(fn)
    return click.option(
        "--json", "json_mode", is_flag=True, help="One JSON object per log line (for cron/CI)."
    )(fn)


def common_options(fn):
    """Options every store command shares."""
    fn = log_options(fn)
    fn = click.option(
        "--config",
        "config_file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="TOML file overriding configs/default.toml.",
    )(fn)
    return fn


def _remember_force(ctx: click.Context, _param, value: bool) -> bool:
    ctx.meta["nat4etl.force"] = value
    return value


def _forced() -> bool:
    return bool(click.get_current_context().meta.get("nat4etl.force"))


def out_options(fn):
    fn = click.option(
        "--force",
        is_flag=True,
        expose_value=False,
        callback=_remember_force,
        help="Rerun even if the output is up to date.",
    )(fn)
    fn = click.option(
        "--wait",
        "wait_s",
        type=float,
        default=0.0,
        show_default=True,
        help="Seconds to wait for another build holding the lock.",
    )(fn)
    fn = click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Store directory.",
    )(fn)
    return fn


class AreaChoice(click.Choice):
    """A1, PEG or all, in any case, shown as Zenodo and the README write them: click shows a
    case-insensitive choice casefolded (``[a1|peg|all]``, "not one of 'a1', ...")."""

    def __init__(self):
        super().__init__(["A1", "PEG", "all"], case_sensitive=False)

    def get_metavar(self, param, ctx=None) -> str:  # click 8.1 passes no ctx
        return "[" + "|".join(self.choices) + "]"

    def get_invalid_choice_message(self, value, ctx) -> str:
        return f"{value!r} is not one of " + ", ".join(map(repr, self.choices)) + "."

    def shell_complete(self, ctx, param, incomplete):
        from click.shell_completion import CompletionItem

        typed = incomplete.casefold()
        return [CompletionItem(c) for c in self.choices if c.casefold().startswith(typed)]


area_option = click.option(
    "--area",
    type=AreaChoice(),
    default=None,
    help="Area(s) to process [default: all; for a stage command on a built store, its areas].",
)


#: `--cache`: the order `nat4etl.config` settles it in
CACHE_HELP = (
    "Download cache [default: $NAT4ETL_CACHE, else config cache_dir, else the platform cache dir]."
)
#: `--dt-ms`: a --config file's dt_ms, not the store's (a stage command too)
DT_MS_HELP = "Bin width in ms [default: config dt_ms, 10 unless set]."


def _check_zenodo_url(_ctx, _param, value: str | None) -> str | None:
    """A malformed --zenodo-url is a usage error (exit 2) before anything runs."""
    if value is not None:
        from nat4etl.config import url_problem

        problem = url_problem(value)
        if problem:
            raise click.BadParameter(f"{value!r} is not a Zenodo base URL ({problem})")
    return value


def zenodo_url_option(fn):
    return click.option(
        "--zenodo-url",
        default=None,
        callback=_check_zenodo_url,
        help="Zenodo base URL, http(s)://HOST[/PATH].",
    )(fn)


def _settings(config_file, **flags):
    from nat4etl.config import load_settings

    return load_settings(config_file).with_overrides(**flags)


def _areas(area, config_file):
    from nat4etl.config import load_settings, parse_areas

    return parse_areas(area, load_settings(config_file))


def source_option(help_text: str):
    """`--source DIR`: a directory holding the Zenodo files (a mirror, a USB copy)."""
    return click.option(
        "--source",
        "source_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help=help_text,
    )


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    epilog=f"Exit codes:\n\n{EXIT_CODE_HELP}",
)
@click.version_option(__version__, prog_name="nat4etl")
def cli() -> None:
    """nat4etl: the NAT4 auditory-cortex dataset (Zenodo 8044773) as a Parquet store.

    Run `nat4etl build --area A1 --out ./nat4` for everything, or the stages one by one:
    fetch, unpack, parse-epochs, rebin-sites, align-wav, normalize.
    """


def _run_stage_command(
    stage: str, out: Path, wait_s: float, config_file, json_mode, quiet, **flags
) -> None:
    """One stage through `build`: locked, skipped when up to date, published atomically;
    a warning names the later stages it left out of date. Without ``--area`` (or a
    ``--config`` file that sets ``areas``) it works on the areas the store was built for
    (a bare ``rebin-sites`` on an A1 store is A1's); a stage after fetch, with its
    waveforms or without them (parse-epochs on a ``--no-wav`` store does not warn that
    it has no wav.zip to check the names against)."""
    from nat4etl.config import file_sets
    from nat4etl.stages.build import build, rebuild_command, recorded_parameters, stale_after

    recorded = recorded_parameters(out)
    if flags.get("areas") is None and not file_sets(config_file, "build", "areas"):
        held = recorded.get("areas")  # a --config file's own areas win
        if held:
            flags["areas"] = tuple(held)
    if stage != "fetch" and not file_sets(config_file, "build", "wav"):
        flags["wav"] = recorded.get("wav")  # fetch's --wav/--no-wav is its own
    settings = _settings(config_file, **flags)
    with _progress(json_mode, quiet) as progress:
        build(out, settings, progress, wait_s=wait_s, force=_forced(), only=(stage,))
        stale = stale_after(out, settings, stage)
        if stale:
            progress.log(
                f"{', '.join(stale)} now out of date (built from tables {stage} replaced); "
                f"`{rebuild_command(out, after=stage)}` brings them up to date",
                level="warning",
            )


@cli.command("fetch")
@out_options
@area_option
@click.option("--wav/--no-wav", default=None, help="Also fetch wav.zip [default: from config].")
@click.option("--record", "record_id", type=int, default=None, help="Zenodo record id.")
@zenodo_url_option
@source_option("Take the files from a local mirror.")
@click.option(
    "--cache",
    "cache_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help=CACHE_HELP,
)
@click.option("--jobs", type=int, default=None, help="Parallel downloads.")
@common_options
@handle_errors
def fetch_cmd(
    out,
    wait_s,
    area,
    wav,
    record_id,
    zenodo_url,
    source_dir,
    cache_dir,
    jobs,
    config_file,
    json_mode,
    quiet,
):
    """Download the Zenodo files into OUT/raw, verifying size and md5 of each."""
    _run_stage_command(
        "fetch",
        out,
        wait_s,
        config_file,
        json_mode,
        quiet,
        areas=_areas(area, config_file),
        wav=wav,
        record_id=record_id,
        zenodo_url=zenodo_url,
        source_dir=source_dir,
        cache_dir=cache_dir,
        jobs=jobs,
    )


@cli.command("unpack")
@out_options
@area_option
@source_option("Read the Zenodo files from DIR, not OUT/raw.")
@common_options
@handle_errors
def unpack_cmd(out, wait_s, area, source_dir, config_file, json_mode, quiet):
    """Decode the NEMS0 archives into raw tables (signals, spike times, epochs)."""
    _run_stage_command(
        "unpack",
        out,
        wait_s,
        config_file,
        json_mode,
        quiet,
        areas=_areas(area, config_file),
        source_dir=source_dir,
    )


@cli.command("parse-epochs")
@out_options
@common_options
@handle_errors
def parse_epochs_cmd(out, wait_s, config_file, json_mode, quiet):
    """Interpret epochs as stims, cells and trials; report every mismatch."""
    _run_stage_command("parse-epochs", out, wait_s, config_file, json_mode, quiet)


@cli.command("rebin-sites")
@out_options
@click.option("--dt-ms", type=float, default=None, help=DT_MS_HELP)
@common_options
@handle_errors
def rebin_sites_cmd(out, wait_s, dt_ms, config_file, json_mode, quiet):
    """Spike counts per (stim, cell, trial) and spectrograms at the chosen bin width."""
    _run_stage_command("rebin-sites", out, wait_s, config_file, json_mode, quiet, dt_ms=dt_ms)


@cli.command("align-wav")
@out_options
@click.option(
    "--audio-fs",
    "audio_fs_hz",
    type=int,
    default=None,
    help="Waveform sample rate in Hz [default: config audio_fs_hz, 44100 unless set].",
)
@common_options
@handle_errors
def align_wav_cmd(out, wait_s, audio_fs_hz, config_file, json_mode, quiet):
    """Source waveforms placed in each trial window, matched to stims."""
    _run_stage_command(
        "align-wav", out, wait_s, config_file, json_mode, quiet, audio_fs_hz=audio_fs_hz
    )


#: `--norm` of normalize, build and status: what the preset does, and what it does not
NORM_HELP = (
    'Preset recorded in the store as its default: what the reader applies for norm="default". '
    "The reader returns raw values unless given a norm."
)


@cli.command("normalize")
@out_options
@click.option(
    "--norm",
    type=click.Choice(["deepstrf", "nems"]),
    default=None,
    help=f"{NORM_HELP} Constants for both presets are always written. [default: from config]",
)
@common_options
@handle_errors
def normalize_cmd(out, wait_s, norm, config_file, json_mode, quiet):
    """Normalization constants for both presets (raw values are always kept)."""
    _run_stage_command("normalize", out, wait_s, config_file, json_mode, quiet, norm=norm)


def build_settings_options(fn):
    """The settings `build` and `status` share (status answers "what would build do?")."""
    for option in reversed(
        [
            area_option,
            source_option("Use a local mirror instead of Zenodo."),
            zenodo_url_option,
            click.option("--record", "record_id", type=int, default=None, help="Zenodo record id."),
            click.option(
                "--cache",
                "cache_dir",
                type=click.Path(file_okay=False, path_type=Path),
                default=None,
                help=CACHE_HELP,
            ),
            click.option(
                "--wav/--no-wav", default=None, help="Include waveforms [default: from config]."
            ),
            click.option("--dt-ms", type=float, default=None, help=DT_MS_HELP),
            click.option(
                "--audio-fs", "audio_fs_hz", type=int, default=None, help="Waveform rate, Hz."
            ),
            click.option(
                "--norm",
                type=click.Choice(["deepstrf", "nems"]),
                default=None,
                help=f"{NORM_HELP} [default: from config]",
            ),
            click.option(
                "--from",
                "from_stage",
                type=click.Choice(list(STAGES)),
                default=None,
                help="Rerun this stage and every later one.",
            ),
        ]
    ):
        fn = option(fn)
    return fn


_SETTINGS_FLAGS = (
    "source_dir",
    "zenodo_url",
    "record_id",
    "cache_dir",
    "wav",
    "dt_ms",
    "audio_fs_hz",
    "norm",
)


def _build_settings(config_file, area, flags: dict):
    return _settings(
        config_file,
        areas=_areas(area, config_file),
        **{k: flags[k] for k in _SETTINGS_FLAGS},
    )


@cli.command("build")
@out_options
@build_settings_options
@common_options
@handle_errors
def build_cmd(out, wait_s, area, from_stage, config_file, json_mode, quiet, **flags):
    """Run every stage that is not up to date and publish the store atomically.

    Safe from cron: a second build waits (--wait) or exits 5 naming the holder; a build
    with nothing to do writes nothing and exits 0; a killed build leaves the store intact.
    """
    from nat4etl.stages.build import build

    settings = _build_settings(config_file, area, flags)
    with _progress(json_mode, quiet) as progress:
        build(out, settings, progress, wait_s=wait_s, force=_forced(), from_stage=from_stage)
    _echo_summary(out, json_mode, quiet)


def _echo_summary(out: Path, json_mode: bool, quiet: bool) -> None:
    """The result of a build on stdout: counts and missing pairs, taken from the tables."""
    if quiet:
        return
    from nat4etl import summary

    summaries = summary.summarize(out)
    if json_mode:
        import json
        from datetime import UTC, datetime

        now = datetime.now(UTC).isoformat(timespec="milliseconds")
        line = {"time": now, "event": "summary", "areas": summary.as_dicts(summaries)}
        click.echo(json.dumps(line))
    else:
        click.echo("\n".join(summary.render(out, summaries)))


@cli.command("status")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Store."
)
@click.option("--force", is_flag=True, help="Show what `build --force` would do.")
@build_settings_options
@common_options
@handle_errors
def status_cmd(out, force, area, from_stage, config_file, json_mode, quiet, **flags):
    """What is built, from which inputs, and what `build` (same options) would rerun and why."""
    from nat4etl.stages.build import status

    settings = _build_settings(config_file, area, flags)
    report = status(out, settings, force=force, from_stage=from_stage)
    if json_mode:
        import json

        click.echo(json.dumps(report, default=str))
    elif not quiet:
        click.echo(_render_status(report))


def _render_status(report: dict) -> str:
    lines = [f"store   {report['out']}"]
    if not report.get("built"):
        lines.append("        not built yet")
    else:
        rec = report.get("record") or {}
        lines.append(f"built   {report.get('written_at')}, {_table_files(report)}")
        lines.append(f"record  {rec.get('id', '?')} version {rec.get('version', '?')}")
        for src in report.get("sources", []):
            lines.append(f"source  {src['name']}  {src['size_bytes']} B  md5 {src['md5']}")
    if report.get("lock"):
        lines.append(f"lock    held by {report['lock']} (a build is running)")
    for st in report.get("stages", []):
        why = f": {'; '.join(st['reasons'])}" if st.get("reasons") else ""
        ran = f" (ran {st['ran_at']})" if st.get("ran_at") and st["state"] == "up to date" else ""
        lines.append(f"stage   {st['stage']:<13} {st['state']}{ran}{why}")
    for problem in report.get("manifest") or []:
        lines.append(f"manifest  {problem}")
    if report.get("built_from_mirror"):
        mirror = report["built_from_mirror"]
        lines.append(
            f"note    built from the mirror {mirror}; this status, like a build without "
            f"--source, goes to Zenodo (add --source {mirror} to judge against the mirror)"
        )
    if report.get("up_to_date") is False or not report.get("built"):
        lines.append(
            f"next    nat4etl build --out {report['out']}  (with this status's other options)"
        )
    return "\n".join(lines)


def _table_files(report: dict) -> str:
    """ "42 table files (34 Parquet, one per table and area; 8 Arrow sidecars)": the
    numbers are the manifest's files of the areas asked, counted by kind; "of A1" when
    the store holds other areas' too."""
    files = report.get("table_files") or {}
    parquet, arrow = files.get("parquet", 0), files.get("arrow", 0)
    kinds = f"{parquet} Parquet, one per table and area"
    if arrow:
        kinds += f"; {arrow} Arrow sidecars"
    of = ""
    if report.get("other_areas"):
        of = f" of {' and '.join(report.get('table_areas') or [])}"
    return f"{parquet + arrow} table files{of} ({kinds})"


@cli.command("verify")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Store."
)
@click.option("--json", "json_mode", is_flag=True, help="One JSON object per line.")
@click.option("--quiet", is_flag=True, help="Only the differences.")
@handle_errors
def verify_cmd(out, json_mode, quiet):
    """Re-hash every table and raw file against the manifest; exit 6 naming each difference."""
    from nat4etl.errors import StoreError, VerificationError
    from nat4etl.stages.build import rebuild_command, verify
    from nat4etl.store import MANIFEST, STAGES, store_path

    root = store_path(out)
    if not (root / MANIFEST).is_file() and not (root / STAGES).is_dir():
        # nothing to compare with: the store is missing, not different (exit 7, not 6)
        if root.is_dir() and any(root.iterdir()):
            raise StoreError(f"{out} is not a nat4etl store (it has no {MANIFEST})")
        what = "does not exist" if not root.exists() else "is empty"
        raise StoreError(
            f"{out} is not a nat4etl store ({what}); `nat4etl build --out {out}` builds one"
        )
    problems = verify(out)
    for problem in problems:  # on stderr with the other log lines; the exit code is the verdict
        if json_mode:
            click.echo(_json_line("error", problem, difference=True), err=True)
        else:
            click.echo(f"difference: {problem}", err=True)
    if problems:
        raise VerificationError(
            f"{len(problems)} difference(s) in {out}; Hint: `{rebuild_command(out)}` "
            "rebuilds what changed"
        )
    msg = f"{out}: every table and raw file matches the manifest"
    if json_mode:
        click.echo(_json_line("info", msg, verified=True), err=True)
    elif not quiet:
        click.echo(msg, err=True)


def _known_report_kinds(kinds: tuple[str, ...]) -> tuple[str, ...]:
    """A misspelt kind would list nothing and exit 0; name it and the nearest kinds."""
    import difflib

    from nat4etl.schema import REPORT_KINDS

    for kind in kinds:
        if kind not in REPORT_KINDS:
            near = difflib.get_close_matches(kind, REPORT_KINDS, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(near)}?" if near else ""
            raise click.BadParameter(
                f"no report kind {kind!r}{hint} (the README's `report` table lists them)",
                param_hint="'--kind'",
            )
    return kinds


@cli.command("report")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Store."
)
@click.option(
    "--area",
    type=AreaChoice(),
    default="all",
    help="Area(s) to list [default: all].",
)
@click.option(
    "--kind",
    "kinds",
    multiple=True,
    callback=lambda ctx, param, kinds: _known_report_kinds(kinds),
    help="Only rows of this kind (repeatable), e.g. repetition_count or spikes_before_0; "
    "the README's `report` table lists every kind.",
)
@click.option("--json", "json_mode", is_flag=True, help="One JSON object per row.")
@handle_errors
def report_cmd(out, area, kinds, json_mode):
    """The mismatches parse-epochs found (the `report` table) and the spike times before 0
    rebin-sites found (kind spikes_before_0, from the responses metadata), one per line."""
    from nat4etl.summary import render_report, report_rows

    areas = None if area.lower() == "all" else [area.upper()]
    listing = report_rows(out, areas=areas, kinds=list(kinds) or None)
    if json_mode:
        import json

        for row in [*listing.rows, *listing.unavailable]:
            click.echo(json.dumps(row))
        return
    selection = " ".join(
        part
        for part in (
            f"of kind {', '.join(kinds)}" if kinds else "",
            f"in {areas[0]}" if areas else "",
        )
        if part
    )
    for line in render_report(listing, selection=selection):
        click.echo(line)


@cli.command("sample")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the synthetic Zenodo mirror into: new, empty or an earlier sample.",
)
@click.option(
    "--scale",
    default="mini",
    show_default=True,
    help="mini, full, or a unit multiplier of full (e.g. 2).",
)
@click.option("--quirks", is_flag=True, help="Add the real dataset's known faults.")
@click.option("--seed", type=int, default=0, show_default=True)
@log_options  # no --config: a sample's content depends on --scale, --quirks, --seed only
@handle_errors
def sample_cmd(out, scale, quirks, seed, json_mode, quiet):
    """Write a synthetic NAT4 mirror in the exact real file format (offline tests, demos)."""
    from nat4etl.sample import write_sample

    if scale not in ("mini", "full"):
        try:
            scale = float(scale)
        except ValueError:
            raise click.BadParameter("use mini, full or a number", param_hint="--scale") from None
    with _progress(json_mode, quiet) as progress:
        write_sample(out, scale=scale, quirks=quirks, seed=seed, progress=progress.log)
        progress.log(f"sample: wrote {out}")


def main() -> None:
    """The console script. click's own errors (a bad option, a missing --config file) are
    one JSON line too with --json, as every other error is: cron parses stderr by line."""
    args = sys.argv[1:]
    json_mode = "--json" in args
    try:
        code = cli.main(args=args, prog_name="nat4etl", standalone_mode=False)
    except click.ClickException as err:
        if not json_mode:
            err.show()
            sys.exit(err.exit_code)
        msg = err.format_message()
        if isinstance(err, click.UsageError) and err.ctx is not None:
            msg = f"{err.ctx.command_path}: {msg}"
        _fail(RuntimeError(msg), err.exit_code, json_mode, kind=type(err).__name__)
    except click.exceptions.Abort:  # Ctrl-C outside a command (e.g. while importing)
        _fail(RuntimeError(_interrupted()), EXIT_CODES["interrupted"], json_mode)
    # the work is done and said: a Ctrl-C now (threads winding down, exit handlers) must
    # not turn it into a silent exit 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code or 0)


if __name__ == "__main__":
    main()

"""The CLI shell: stages listed, placeholders honest, errors one line with exit codes."""

from __future__ import annotations

import json
import re
import shlex

import pytest
from click.testing import CliRunner

import nat4etl
from nat4etl.cli import cli
from nat4etl.errors import MissingTableError
from nat4etl.schema import REPORT_KINDS
from nat4etl.stages import STAGES
from nat4etl.store import Store


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


def test_a_single_stage_rerun_names_the_later_stages_it_left_out_of_date(tmp_path, mini_sample):
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    built = CliRunner().invoke(cli, ["build", "--area", "A1", "--source", src, "--out", str(out)])
    assert built.exit_code == 0, built.output
    rerun = CliRunner().invoke(cli, ["rebin-sites", "--out", str(out), "--dt-ms", "20"])
    assert rerun.exit_code == 0, rerun.output
    warned = [line for line in rerun.output.splitlines() if "now out of date" in line]
    assert len(warned) == 1, rerun.output
    assert "align-wav, normalize now out of date" in warned[0]
    # the build that brings them up to date is the store's own: its area, the new bin
    # width, and the mirror it was fetched from (a bare `build` would fetch from Zenodo)
    assert f"`nat4etl build --out {out} --area A1 --dt-ms 20" in warned[0]
    assert f"--source {mini_sample.dir.resolve()}`" in warned[0]
    # a rerun that changes nothing leaves nothing out of date, though the stage command
    # has no --source: the stages before it are not judged
    hint = warned[0].split("`")[1].split()
    assert hint[:2] == ["nat4etl", "build"]
    updated = CliRunner().invoke(cli, hint[1:])
    assert updated.exit_code == 0, updated.output
    same = CliRunner().invoke(cli, ["rebin-sites", "--out", str(out), "--dt-ms", "20", "--force"])
    assert same.exit_code == 0, same.output
    assert "now out of date" not in same.output
    again = CliRunner().invoke(cli, ["parse-epochs", "--out", str(out), "--force"])
    assert again.exit_code == 0 and "now out of date" not in again.output, again.output
    # fetch from the mirror again: the later stages read raw/, which did not change
    fetched = CliRunner().invoke(cli, ["fetch", "--out", str(out), "--source", src])
    assert fetched.exit_code == 0 and "now out of date" not in fetched.output, fetched.output
    # a stage whose later stages were never built warns of nothing
    fresh = tmp_path / "fresh"
    first = CliRunner().invoke(cli, ["fetch", "--area", "A1", "--source", src, "--out", str(fresh)])
    assert first.exit_code == 0, first.output
    assert "now out of date" not in first.output
    # the log names the store by its published path, not the staging copy built into
    assert f"checking files already in {fresh / 'raw'}" in first.output
    assert ".staging-" not in first.output


def test_the_store_keeps_the_parameters_its_latest_stage_commands_set(tmp_path, mini_sample):
    """`rebin-sites --dt-ms 5` makes the store's bin width 5 ms, though normalize (now out
    of date) was built at 10: the manifest says 5, and the build that a later stage
    command's warning suggests keeps 5 rather than rebinning at 10."""
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    args = ["build", "--area", "A1", "--no-wav", "--source", src, "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    rebinned = CliRunner().invoke(cli, ["rebin-sites", "--out", str(out), "--dt-ms", "5"])
    assert rebinned.exit_code == 0, rebinned.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["parameters"]["dt_ms"] == 5.0
    assert manifest["stages"]["normalize"]["params"]["dt_ms"] == 10.0  # out of date
    unpacked = CliRunner().invoke(cli, ["unpack", "--out", str(out), "--source", src, "--force"])
    assert unpacked.exit_code == 0, unpacked.output
    (warned,) = [line for line in unpacked.output.splitlines() if "now out of date" in line]
    hint = warned.split("`")[1].split()
    assert hint[hint.index("--dt-ms") + 1] == "5"
    assert json.loads((out / "manifest.json").read_text())["parameters"]["dt_ms"] == 5.0


@pytest.fixture(scope="module")
def built_both(tmp_path_factory, mini_sample):
    """A store of both areas, waveforms included, built from the mini mirror."""
    out = tmp_path_factory.mktemp("both") / "store"
    args = ["build", "--area", "all", "--source", str(mini_sample.dir), "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


def test_unpack_given_the_mirror_the_store_was_built_from_is_up_to_date(
    tmp_path, mini_sample, built_both
):
    """The mirror's files are raw/'s byte for byte: the same input. Its path is not one
    (it was: unpack reran, and its tables, recorded with the path, put every later stage
    out of date)."""
    import shutil

    out = shutil.copytree(built_both, tmp_path / "store")  # copy2: mtimes kept
    src = ["--source", str(mini_sample.dir), "--out", str(out)]
    unpacked = CliRunner().invoke(cli, ["unpack", *src, "--json"])
    assert unpacked.exit_code == 0, unpacked.output
    assert json.loads(unpacked.stderr.splitlines()[-1])["up_to_date"], unpacked.output
    status = CliRunner().invoke(cli, ["status", *src, "--json"])
    assert {row["state"] for row in json.loads(status.stdout)["stages"]} == {"up to date"}
    # run anyway, it rewrites its tables byte for byte: nothing after it is out of date
    forced = CliRunner().invoke(cli, ["unpack", *src, "--force"])
    assert forced.exit_code == 0 and "now out of date" not in forced.output, forced.output
    status = CliRunner().invoke(cli, ["status", *src, "--json"])
    assert {row["state"] for row in json.loads(status.stdout)["stages"]} == {"up to date"}
    assert "source_dir" not in json.loads((out / "_stages/unpack.json").read_text())


def test_a_table_of_a_build_of_both_areas_lists_its_own_areas_files(built_both):
    """A1's tables are made from A1's files, not PEG's (every table listed both areas'
    files); the areas' identical waveforms are one file, made from both areas' stims."""
    store = Store(built_both)
    kinds = ("NAT4_ozgf.fs100.ch18.tgz", "single_sites.zip", "pred_correlation.csv")
    files = {area: {f"{area}_{kind}" for kind in kinds} for area in ("A1", "PEG")}
    tables = [p.name for p in sorted(built_both.iterdir()) if (p / "area=A1").is_dir()]
    assert len(tables) == 17
    for area in ("A1", "PEG"):
        listed = {t: {s["name"] for s in store.table_metadata(t, area)["sources"]} for t in tables}
        assert listed.pop("waveforms") == files["A1"] | files["PEG"] | {"wav.zip"}
        assert all(names == files[area] for names in listed.values()), (area, listed)
    shared = [built_both / "waveforms" / f"area={a}" / "part-0.parquet" for a in ("A1", "PEG")]
    assert shared[0].read_bytes() == shared[1].read_bytes()


def test_unpack_from_another_mirror_suggests_the_build_that_keeps_its_files(
    tmp_path, mini_sample, mini_quirks_sample
):
    """A mirror whose files are not raw/'s reruns unpack, and the build that brings the
    later stages up to date fetches from it (not from the mirror raw/ came from, which
    would unpack raw/'s files again); after that build, the mirror is up to date."""
    out = tmp_path / "store"
    args = ["build", "--area", "A1", "--no-wav", "--source", str(mini_sample.dir)]
    assert CliRunner().invoke(cli, [*args, "--out", str(out)]).exit_code == 0
    other = ["unpack", "--source", str(mini_quirks_sample.dir), "--out", str(out)]
    unpacked = CliRunner().invoke(cli, other)
    assert unpacked.exit_code == 0, unpacked.output
    assert "stage unpack: running" in unpacked.output
    record = json.loads((out / "_stages/unpack.json").read_text())
    assert record["source_dir"] == str(mini_quirks_sample.dir.resolve())
    (warned,) = [line for line in unpacked.output.splitlines() if "now out of date" in line]
    hint = shlex.split(warned.split("`")[1])
    assert hint[hint.index("--source") + 1] == str(mini_quirks_sample.dir.resolve())
    assert CliRunner().invoke(cli, hint[1:]).exit_code == 0
    again = CliRunner().invoke(cli, [*other, "--json"])
    assert json.loads(again.stderr.splitlines()[-1])["up_to_date"], again.output


def test_stage_commands_after_unpack_from_another_mirror_suggest_that_mirror(
    tmp_path, mini_sample, mini_quirks_sample
):
    """After `unpack --source OTHER`, the later stage commands' hints build from OTHER too:
    the store's tables are made from its files, and a build from the mirror raw/ came from
    would unpack those again, undoing it (only unpack's own hint named OTHER)."""
    out = tmp_path / "store"
    args = ["build", "--area", "A1", "--no-wav", "--source", str(mini_sample.dir)]
    assert CliRunner().invoke(cli, [*args, "--out", str(out)]).exit_code == 0
    other = ["unpack", "--source", str(mini_quirks_sample.dir), "--out", str(out)]
    assert CliRunner().invoke(cli, other).exit_code == 0
    # status names the same mirror as the one its tables are now made from
    (note,) = [
        line
        for line in CliRunner().invoke(cli, ["status", "--out", str(out)]).output.splitlines()
        if line.startswith("note")
    ]
    assert f"built from the mirror {mini_quirks_sample.dir.resolve()};" in note
    parsed = CliRunner().invoke(cli, ["parse-epochs", "--out", str(out)])
    assert parsed.exit_code == 0, parsed.output
    (warned,) = [line for line in parsed.output.splitlines() if "now out of date" in line]
    assert warned.split(" now out of date")[0].endswith("rebin-sites, normalize")
    hint = shlex.split(warned.split("`")[1])
    assert hint[hint.index("--source") + 1] == str(mini_quirks_sample.dir.resolve())
    assert CliRunner().invoke(cli, hint[1:]).exit_code == 0
    again = CliRunner().invoke(cli, [*other, "--json"])  # the store is the other mirror's
    assert json.loads(again.stderr.splitlines()[-1])["up_to_date"], again.output


def test_fetching_wav_zip_for_a_no_wav_store_leaves_only_parse_epochs_out_of_date(
    tmp_path, mini_sample
):
    """parse-epochs lists wav.zip, nothing else after fetch reads it but align-wav (never
    built): the stages that read parse-epochs' tables are not named, as it may rewrite
    them byte for byte (it does: the rebuild then skips them)."""
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    args = ["build", "--area", "A1", "--no-wav", "--source", src, "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    fetched = CliRunner().invoke(cli, ["fetch", "--wav", "--source", src, "--out", str(out)])
    assert fetched.exit_code == 0, fetched.output
    (warned,) = [line for line in fetched.output.splitlines() if "now out of date" in line]
    assert "warning: parse-epochs now out of date (built from tables fetch replaced)" in warned
    hint = warned.split("`")[1].split()
    assert hint[:2] == ["nat4etl", "build"] and "--wav" in hint
    rebuilt = CliRunner().invoke(cli, [*hint[1:], "--json"])
    assert rebuilt.exit_code == 0, rebuilt.output
    last = json.loads(rebuilt.stderr.splitlines()[-1])
    assert last["ran"] == ["parse-epochs", "align-wav"], last


def test_a_new_wav_zip_reruns_what_reads_it_and_each_area_set_its_own_files(tmp_path, mini_sample):
    """wav.zip changed in the mirror: fetch, parse-epochs (it lists it) and align-wav
    rerun, not unpack; the rest is skipped as parse-epochs rewrites its tables byte for
    byte. unpack's inputs are the areas' files asked for: A1's, then both, then A1's."""
    import shutil
    import zipfile

    mirror = tmp_path / "mirror"
    shutil.copytree(mini_sample.dir, mirror)
    (mirror / "record.json").unlink()  # sizes and md5s are taken from the files then
    out = tmp_path / "store"

    def build(*args: str) -> dict:
        argv = ["build", *args, "--wav", "--source", str(mirror), "--out", str(out), "--json"]
        result = CliRunner().invoke(cli, argv)
        assert result.exit_code == 0, result.output
        return json.loads(result.stderr.splitlines()[-1])

    def unpack_reads() -> set[str]:
        record = json.loads((out / "_stages" / "unpack.json").read_text())
        return {k.split("/", 1)[1].split("_", 1)[0] for k in record["inputs"] if "#" not in k}

    build("--area", "A1")
    assert unpack_reads() == {"A1"}
    with zipfile.ZipFile(mirror / "wav.zip", "a") as zf:
        zf.writestr("wav/readme.txt", b"not a sound")
    last = build("--area", "A1")
    assert last["ran"] == ["fetch", "parse-epochs", "align-wav"], last
    report = Store(out).read_table("report", area="A1").to_pylist()
    assert {"area": "A1", "kind": "skipped_member", "subject": "wav.zip:wav/readme.txt"} in [
        {k: r[k] for k in ("area", "kind", "subject")} for r in report
    ]
    assert build("--area", "all")["ran"] == list(STAGES)
    assert unpack_reads() == {"A1", "PEG"}
    assert build("--area", "A1")["ran"] == list(STAGES)
    assert unpack_reads() == {"A1"}
    assert build("--area", "A1")["up_to_date"]


def test_stage_commands_without_area_work_on_the_areas_the_store_holds(tmp_path, mini_sample):
    # the area default is "all": unpack after `fetch --area A1` looked for PEG's files
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    fetched = CliRunner().invoke(cli, ["fetch", "--area", "A1", "--source", src, "--out", str(out)])
    assert fetched.exit_code == 0, fetched.output
    for stage in ("unpack", "parse-epochs"):
        result = CliRunner().invoke(cli, [stage, "--out", str(out)])
        assert result.exit_code == 0, (stage, result.output)
    assert sorted(p.name for p in (out / "stims").iterdir()) == ["area=A1"]
    # a --config file that does not set areas leaves the store's
    other = tmp_path / "other.toml"
    other.write_text("[build]\ndt_ms = 10\n")
    again = CliRunner().invoke(
        cli, ["parse-epochs", "--config", str(other), "--out", str(out), "--force"]
    )
    assert again.exit_code == 0, again.output
    record = json.loads((out / "_stages" / "parse-epochs.json").read_text())
    assert record["params"]["areas"] == ["A1"]
    # a --config file's areas are asked for, not the store's
    config = tmp_path / "both.toml"
    config.write_text('[build]\nareas = ["A1", "PEG"]\nwav = false\n')
    both = CliRunner().invoke(
        cli, ["fetch", "--config", str(config), "--source", src, "--out", str(out)]
    )
    assert both.exit_code == 0, both.output
    assert (out / "raw" / "PEG_single_sites.zip").is_file()


def test_a_bin_width_the_waveforms_cannot_take_fails_before_anything_runs(tmp_path, mini_sample):
    out = tmp_path / "store"
    args = ["build", "--source", str(mini_sample.dir), "--dt-ms", "5", "--out", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "220.5 audio samples per bin" in result.output
    assert not out.exists()  # no stage ran: nothing fetched, nothing staged
    # without waveforms the same width builds
    result = CliRunner().invoke(cli, [*args, "--no-wav"])
    assert result.exit_code == 0, result.output


def test_a_missing_raw_file_is_named_in_the_published_store_not_the_staging_copy(
    tmp_path, mini_sample
):
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    args = ["fetch", "--area", "A1", "--no-wav", "--source", src, "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    result = CliRunner().invoke(cli, ["unpack", "--area", "PEG", "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert f"PEG_NAT4_ozgf.fs100.ch18.tgz (PEG) not found in {out / 'raw'};" in result.output
    assert "`nat4etl fetch --area PEG`" in result.output
    assert ".staging-" not in result.output
    for stage in ("unpack", "parse-epochs"):
        assert CliRunner().invoke(cli, [stage, "--out", str(out)]).exit_code == 0
    result = CliRunner().invoke(cli, ["align-wav", "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert f"wav.zip not found (looked in {out / 'raw'})" in result.output
    assert ".staging-" not in result.output
    assert f"`nat4etl fetch --wav --out {out}` gets it" in result.output
    fetched = CliRunner().invoke(cli, ["fetch", "--wav", "--source", src, "--out", str(out)])
    assert fetched.exit_code == 0, fetched.output
    assert CliRunner().invoke(cli, ["align-wav", "--out", str(out)]).exit_code == 0


def test_align_wav_decodes_only_the_wav_zip_fetch_got_as_parse_epochs_lists(tmp_path, mini_sample):
    """A --no-wav fetch leaves an earlier wav.zip in raw/ but not among the files it got:
    no fingerprint covers it and parse-epochs does not list it, so align-wav does not
    decode it either (its waveforms would name no wav.zip among their sources)."""
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    for wav in ("--wav", "--no-wav"):
        args = ["build", "--area", "A1", wav, "--source", src, "--out", str(out)]
        built = CliRunner().invoke(cli, args)
        assert built.exit_code == 0, built.output
    assert (out / "raw" / "wav.zip").is_file()
    result = CliRunner().invoke(cli, ["align-wav", "--out", str(out), "--force"])
    assert result.exit_code == 3, result.output
    assert f"wav.zip in {out / 'raw'} is not one the last fetch got" in result.output
    assert f"`nat4etl fetch --wav --out {out}` gets it" in result.output
    fetched = CliRunner().invoke(cli, ["fetch", "--wav", "--source", src, "--out", str(out)])
    assert fetched.exit_code == 0, fetched.output
    result = CliRunner().invoke(cli, ["align-wav", "--out", str(out)])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "_stages" / "align-wav.json").read_text())
    assert "raw/wav.zip" in record["inputs"]
    sources = Store(out).table_metadata("waveforms", "A1")["sources"]
    assert "wav.zip" in {s["name"] for s in sources}


def test_status_without_source_of_a_store_built_from_a_mirror_says_so(tmp_path, mini_sample):
    out = tmp_path / "store"
    src = mini_sample.dir
    args = ["--area", "A1", "--no-wav", "--out", str(out)]
    assert CliRunner().invoke(cli, ["build", *args, "--source", str(src)]).exit_code == 0
    text = CliRunner().invoke(cli, ["status", *args]).stdout
    (note,) = [line for line in text.splitlines() if line.startswith("note ")]
    assert f"built from the mirror {src.resolve()}" in note
    assert f"add --source {src.resolve()}" in note
    text = CliRunner().invoke(cli, ["status", *args, "--source", str(src)]).stdout
    assert "note " not in text and "next " not in text  # up to date against the mirror


def test_report_lists_the_report_table(tmp_path, mini_quirks_sample):
    import json

    import pyarrow.parquet as pq

    out = tmp_path / "store"
    args = ["build", "--no-wav", "--source", str(mini_quirks_sample.dir), "--out", str(out)]
    assert CliRunner().invoke(cli, args).exit_code == 0
    table = [
        {"area": area, **row}
        for area in ("A1", "PEG")
        for row in pq.read_table(out / "report" / f"area={area}" / "part-0.parquet").to_pylist()
    ]
    assert table, "the quirks sample has report rows"
    listed = CliRunner().invoke(cli, ["report", "--out", str(out), "--json"])
    assert listed.exit_code == 0, listed.output
    assert [json.loads(line) for line in listed.stdout.splitlines()] == table
    text = CliRunner().invoke(cli, ["report", "--out", str(out)]).stdout.splitlines()
    assert len(text) == len(table) + 1 and text[-1].startswith(f"{len(table)} report rows: ")
    kind = table[0]["kind"]
    only = CliRunner().invoke(cli, ["report", "--out", str(out), "--kind", kind, "--json"])
    assert {json.loads(line)["kind"] for line in only.stdout.splitlines()} == {kind}
    absent = next(k for k in REPORT_KINDS if k not in {r["kind"] for r in table})
    none = CliRunner().invoke(cli, ["report", "--out", str(out), "--kind", absent])
    assert none.exit_code == 0 and none.stdout.strip() == f"no report rows of kind {absent}"
    # a misspelt kind is not "no rows": it is named, with the kinds it is near
    typo = CliRunner().invoke(cli, ["report", "--out", str(out), "--kind", "repetition"])
    assert typo.exit_code == 2
    assert "no report kind 'repetition'; did you mean repetition_count" in typo.output
    missing = CliRunner().invoke(cli, ["report", "--out", str(tmp_path / "nowhere")])
    assert missing.exit_code == 7


def test_verify_hint_rebuilds_with_the_stores_own_parameters(tmp_path, mini_sample):
    out = tmp_path / "store"
    src = str(mini_sample.dir)
    args = ["build", "--area", "A1", "--dt-ms", "20", "--no-wav", "--source", src]
    built = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert built.exit_code == 0, built.output
    table = next((out / "responses").rglob("*.parquet"))
    table.write_bytes(table.read_bytes()[:-1] + b"x")  # tampered: one byte changed
    result = CliRunner().invoke(cli, ["verify", "--out", str(out)])
    assert result.exit_code == 6, result.output
    (hint,) = [line for line in result.output.splitlines() if "Hint:" in line]
    assert f"nat4etl build --out {out} --area A1 --dt-ms 20" in hint
    assert "--no-wav" in hint
    # the mirror it was built from, as fetch.json's file URLs name it (absolute)
    assert f"--no-wav --source {mini_sample.dir.resolve()}` rebuilds" in hint


def test_status_counts_the_table_files_the_store_holds(tmp_path, mini_sample):
    """status's number is the files on disk (Parquet and the .arrow sidecars), not the
    (table, area) pairs under the words "table files"; those of the areas asked (--area),
    every area's without --area."""
    import json

    out = tmp_path / "store"
    src = ["--source", str(mini_sample.dir), "--out", str(out)]
    built = CliRunner().invoke(cli, ["build", "--area", "all", *src])
    assert built.exit_code == 0, built.output

    def on_disk(area: str) -> tuple[int, int]:
        tables = [p for p in out.glob(f"*/area={area}/*") if p.is_file()]
        parquet = sum(p.suffix == ".parquet" for p in tables)
        arrow = sum(p.suffix == ".arrow" for p in tables)
        assert parquet and arrow and parquet + arrow == len(tables)
        return parquet, arrow

    a1, peg = on_disk("A1"), on_disk("PEG")
    assert a1 != (a1[0] + peg[0], a1[1] + peg[1])  # the test tells them apart
    for args, (parquet, arrow), of in (
        (["--area", "A1"], a1, " of A1"),
        (["--area", "PEG"], peg, " of PEG"),
        ([], (a1[0] + peg[0], a1[1] + peg[1]), ""),
        (["--area", "all"], (a1[0] + peg[0], a1[1] + peg[1]), ""),
    ):
        text = CliRunner().invoke(cli, ["status", *args, *src]).stdout
        (line,) = [line for line in text.splitlines() if line.startswith("built ")]
        assert line.endswith(
            f", {parquet + arrow} table files{of} ({parquet} Parquet, one per table and "
            f"area; {arrow} Arrow sidecars)"
        ), (args, line)
        report = json.loads(CliRunner().invoke(cli, ["status", *args, *src, "--json"]).stdout)
        assert report["table_files"] == {"parquet": parquet, "arrow": arrow}, args
        assert report["tables"] == parquet, args  # one Parquet file per (table, area)


def test_report_lists_spike_times_before_0_from_the_responses_metadata(tmp_path, mini_sample):
    """Kind spikes_before_0: one row per unit, as rebin-sites records them in the
    responses metadata (parse-epochs does not read spike times); --kind and --area select
    them as any kind; a store without responses says so for that kind, exit 0."""
    import shutil

    from nat4etl.store import Store
    from tests.stages.test_rebin_sites import _with_spike_added

    mirror = tmp_path / "mirror"
    shutil.copytree(mini_sample.dir, mirror)
    (mirror / "record.json").unlink()  # sizes and md5s are computed from the files then
    sites_zip = mirror / "A1_single_sites.zip"
    site, unit = _with_spike_added(sites_zip, -0.25)
    _with_spike_added(sites_zip, -1e5)  # earlier than the raster is long: not counted
    out = tmp_path / "store"
    args = ["--area", "A1", "--no-wav", "--source", str(mirror), "--out", str(out)]
    built = CliRunner().invoke(cli, ["build", *args])
    assert built.exit_code == 0, built.output
    early = Store(out).table_metadata("responses", "A1")["spikes_before_0"]
    assert early == [
        {"site": site, "unit_id": unit, "spikes_before_0": 2, "spikes_before_raster": 1}
    ]
    table = Store(out).read_table("report", area="A1").to_pylist()
    # the build's summary counts them beside the report table's rows
    assert (
        f"{len(table)} report rows and 1 unit with spike times before 0 "
        f"(`nat4etl report --out {out}` lists them)"
    ) in built.stdout

    def listed(*extra: str) -> list[dict]:
        result = CliRunner().invoke(cli, ["report", "--out", str(out), "--json", *extra])
        assert result.exit_code == 0, result.output
        return [json.loads(line) for line in result.stdout.splitlines()]

    (row,) = [r for r in listed() if r["kind"] == "spikes_before_0"]
    assert row == {
        "area": "A1",
        "kind": "spikes_before_0",
        "subject": f"{site}/{unit}",
        "detail": f"2 spike times before 0 in site {site}'s file, counted from the end of "
        "the site's raster, as NEMS0 counts them, but for 1 earlier than the raster is "
        "long (where NEMS0 fails): not counted",
        **early[0],
    }
    others = [r for r in listed() if r["kind"] != "spikes_before_0"]
    assert others == table  # the report table's rows as before, in key order
    assert listed("--kind", "spikes_before_0") == [row]
    assert listed("--kind", "spikes_before_0", "--area", "PEG") == []
    assert listed("--kind", "repetition_count") == [
        r for r in table if r["kind"] == "repetition_count"
    ]
    text = CliRunner().invoke(cli, ["report", "--out", str(out)]).stdout.splitlines()
    assert f"A1  spikes_before_0  {site}/{unit}: {row['detail']}" in text
    n = len(table) + 1
    assert text[-1].startswith(f"{n} report row{'s' if n != 1 else ''}: ")
    assert "spikes_before_0 1" in text[-1]

    # a store parse-epochs has been run on, rebin-sites not: no responses table
    part = tmp_path / "part"
    fetched = CliRunner().invoke(cli, ["fetch", *args[:-1], str(part)])
    assert fetched.exit_code == 0, fetched.output
    for stage in ("unpack", "parse-epochs"):
        ran = CliRunner().invoke(cli, [stage, "--out", str(part)])
        assert ran.exit_code == 0, (stage, ran.output)
    assert not (part / "responses").exists()
    result = CliRunner().invoke(cli, ["report", "--out", str(part)])
    assert result.exit_code == 0, result.output
    why = f"no responses table for A1; `nat4etl rebin-sites --out {part}` makes it"
    assert result.stdout.splitlines()[-1] == f"A1  spikes_before_0: not known: {why}"
    result = CliRunner().invoke(cli, ["report", "--out", str(part), "--json"])
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "area": "A1",
        "kind": "spikes_before_0",
        "unavailable": why,
    }
    only = CliRunner().invoke(cli, ["report", "--out", str(part), "--kind", "spikes_before_0"])
    assert only.stdout.splitlines() == [
        "no report rows of kind spikes_before_0",
        f"A1  spikes_before_0: not known: {why}",
    ]
    other = CliRunner().invoke(
        cli, ["report", "--out", str(part), "--kind", "wav_missing", "--json"]
    )
    assert other.exit_code == 0 and other.stdout == ""  # that kind alone: nothing missing


def test_waveforms_of_a_no_wav_store_say_it_was_built_without_them(tmp_path, mini_sample):
    """Not `align-wav` (no wav.zip there, and it says "build with --no-wav"): the store
    records wav = false, so the hint is the build that adds them, and that build works."""
    out = tmp_path / "store dir"  # a space: the command is shell-quoted
    src = str(mini_sample.dir)
    args = ["build", "--area", "A1", "--dt-ms", "20", "--no-wav", "--source", src]
    built = CliRunner().invoke(cli, [*args, "--out", str(out)])
    assert built.exit_code == 0, built.output
    with nat4etl.open(out) as store:
        with pytest.raises(MissingTableError, match="built without waveforms") as err:
            store.waveforms("A1")
    msg = str(err.value)
    assert "align-wav" not in msg and "wav = false" in msg and "wav.zip" in msg
    (command,) = re.findall(r"`(nat4etl build [^`]*)`", msg)
    words = shlex.split(command)
    assert words[:4] == ["nat4etl", "build", "--out", str(out)]
    assert "--wav" in words and "--no-wav" not in words
    assert words[words.index("--dt-ms") + 1] == "20"  # the store's own parameters
    assert words[words.index("--source") + 1] == str(mini_sample.dir.resolve())
    rebuilt = CliRunner().invoke(cli, words[1:])
    assert rebuilt.exit_code == 0, rebuilt.output
    with nat4etl.open(out) as store:
        assert store.waveforms("A1").shape[0] == len(store.stims("A1"))
        assert store.dt_ms == 20


def test_norm_help_and_config_say_the_reader_returns_raw_values_unless_asked():
    """`--norm` / config `norm` is recorded in the store and is what the reader's
    norm="default" applies; the reader itself returns raw values unless given `norm=`."""
    from nat4etl.config import DEFAULT_CONFIG

    for name in ("build", "normalize", "status"):
        (option,) = [p for p in cli.commands[name].params if p.name == "norm"]
        text = " ".join(option.help.split())
        assert 'norm="default"' in text and "raw values" in text, (name, text)
        assert "by default" not in text, (name, text)
    lines = DEFAULT_CONFIG.read_text().splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("norm ="))
    comment = lines[at].split("#", 1)[1]
    for more in lines[at + 1 :]:  # the comment may go on below, aligned
        if not more.lstrip().startswith("#") or not more.startswith(" "):
            break
        comment += more.split("#", 1)[1]
    assert 'norm="default"' in comment and "raw" in comment, comment
    assert "by default" not in comment, comment

"""`build` skips what is up to date, reruns what changed (and only that), and explains why.

These tests drive the build machinery with small fake stages that honour the stage contract
(READS/WRITES/PARAMS/run) and write real tables, so they run in milliseconds and do not
depend on the real stages. ``tests/test_cron.py`` runs the real CLI on the mini sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import blake3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nat4etl import SCHEMA_VERSION
from nat4etl.config import load_settings
from nat4etl.errors import ConfigError, StoreError
from nat4etl.fingerprint import Fingerprint
from nat4etl.progress import NullProgress
from nat4etl.stages.build import build, status, verify
from nat4etl.store import Store

CALLS: list[str] = []


# ----------------------------------------------------------------------------- fake stages
def _copy_atomic(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.part-x")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _fetch(store: Store, settings, progress) -> dict:
    """Copy the mirror's files into raw/ and list them in fetch.json, as the real fetch does."""
    CALLS.append("fetch")
    store.raw_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for area in settings.areas:
        name = f"{area}.txt"
        _copy_atomic(settings.source_dir / name, store.raw_dir / name)
        data = (store.raw_dir / name).read_bytes()
        import hashlib

        files.append({"name": name, "size_bytes": len(data), "md5": hashlib.md5(data).hexdigest()})
    _copy_atomic(settings.source_dir / "record.json", store.raw_dir / "record.json")
    store.write_json(store.raw_dir / "fetch.json", {"files": files, "verified_at": "now"})
    return {"files": len(files)}


def _unpack(store: Store, settings, progress) -> dict:
    CALLS.append("unpack")
    for area in settings.areas:
        lines = (store.raw_dir / f"{area}.txt").read_text().split()
        n = len(lines)
        table = pa.table(
            {
                "recording": lines,
                "kind": ["population"] * n,
                "site": pa.array([None] * n, pa.string()),
                "file": [f"{area}.txt"] * n,
                "member": pa.array([None] * n, pa.string()),
                "meta_json": pa.array([None] * n, pa.string()),
                "skipped_members": pa.array([[]] * n, pa.list_(pa.string())),
            }
        )
        store.write_table("recordings", table, area=area)
    return {}


def _parse(store: Store, settings, progress) -> dict:
    CALLS.append("parse-epochs")
    for area in store.areas("recordings"):
        recs = store.read_table("recordings", area=area)["recording"].to_pylist()
        n = len(recs)
        table = pa.table(
            {
                "stim": pa.array(range(n), pa.int32()),
                "name": [f"STIM_{r}" for r in recs],
                "subset": ["est"] * n,
                "wav_name": pa.array([None] * n, pa.string()),
                "duration_s": [1.0] * n,
                "prestim_s": [0.25] * n,
                "poststim_s": [0.25] * n,
                "n_frames": pa.array([150] * n, pa.int32()),
                "pop_start_s": [1.5 * i for i in range(n)],
            }
        )
        store.write_table("stims", table, area=area)
    return {}


def _rebin(store: Store, settings, progress) -> dict:
    CALLS.append("rebin-sites")
    for area in store.areas("stims"):
        n = store.read_table("stims", area=area).num_rows
        table = pa.table(
            {
                "site": ["S1"] * n,
                "stim": pa.array(range(n), pa.int32()),
                "trial": pa.array([0] * n, pa.int32()),
                "order": pa.array(range(n), pa.int32()),
                "start_s": [i * settings.dt_ms for i in range(n)],
                "end_s": [i * settings.dt_ms + 1 for i in range(n)],
            }
        )
        store.write_table("trials", table, area=area)
    return {"dt_ms": settings.dt_ms}


def _fail(store, settings, progress) -> dict:
    raise RuntimeError("stage failed")


FAKES = {
    "fetch": SimpleNamespace(READS=(), WRITES=(), PARAMS=("areas",), run=_fetch),
    "unpack": SimpleNamespace(READS=("raw",), WRITES=("recordings",), PARAMS=(), run=_unpack),
    "parse-epochs": SimpleNamespace(
        READS=("recordings",), WRITES=("stims",), PARAMS=(), run=_parse
    ),
    "rebin-sites": SimpleNamespace(
        READS=("stims",), WRITES=("trials",), PARAMS=("dt_ms",), run=_rebin
    ),
}


def write_mirror(d: Path, *, a1: str = "r1 r2 r3", version: str = "1.1.0") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "A1.txt").write_text(a1)
    (d / "PEG.txt").write_text("p1 p2")
    record = {"id": 8044773, "metadata": {"version": version, "title": "NAT4"}}
    (d / "record.json").write_text(json.dumps(record))
    return d


def settings_for(mirror: Path, **over):
    return load_settings().with_overrides(source_dir=mirror, wav=False, **over)


def run(out: Path, mirror: Path, stages=None, **kw):
    CALLS.clear()
    over = {k: kw.pop(k) for k in ("dt_ms", "areas") if k in kw}
    return build(out, settings_for(mirror, **over), NullProgress(), stages=stages or FAKES, **kw)


def table_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture
def built(tmp_path):
    mirror = write_mirror(tmp_path / "mirror")
    out = tmp_path / "nat4"
    run(out, mirror)
    return out, mirror


# ----------------------------------------------------------------------------- tests
def test_first_build_runs_every_stage_and_records_fingerprints(built):
    out, _ = built
    assert CALLS == ["fetch", "unpack", "parse-epochs", "rebin-sites"]
    for stage in FAKES:
        record = json.loads((out / "_stages" / f"{stage}.json").read_text())
        assert record["fingerprint"].startswith("sha256:")
        assert record["nat4etl_version"] and record["schema_version"] == SCHEMA_VERSION
        assert record["outputs"]
    unpack = json.loads((out / "_stages/unpack.json").read_text())
    assert unpack["inputs"]["raw/A1.txt"].startswith("md5:")
    assert unpack["inputs"]["raw/record.json#record"] == "8044773@1.1.0"
    rebin = json.loads((out / "_stages/rebin-sites.json").read_text())
    assert rebin["params"] == {"dt_ms": 10.0}
    assert set(rebin["inputs"]) == {"stims/area=A1/part-0.parquet", "stims/area=PEG/part-0.parquet"}


def test_manifest_and_table_metadata_carry_provenance(built):
    out, _ = built
    m = json.loads((out / "manifest.json").read_text())
    assert m["record"]["id"] == 8044773 and m["record"]["version"] == "1.1.0"
    assert {s["name"] for s in m["sources"]} == {"A1.txt", "PEG.txt"}
    assert all(len(s["md5"]) == 32 and s["size_bytes"] > 0 for s in m["sources"])
    assert set(m["libraries"]) >= {"pyarrow", "polars", "h5py", "numpy", "soxr"}
    assert m["parameters"]["dt_ms"] == 10.0 and m["schema_version"] == SCHEMA_VERSION
    assert m["written_at"] and m["build"]["started_at"]
    assert {t["table"]: t["rows"] for t in m["tables"] if t["area"] == "A1"} == {
        "recordings": 3,
        "stims": 3,
        "trials": 3,
    }
    meta = Store(out).table_metadata("trials", "A1")
    assert meta["stage"] == "rebin-sites" and meta["params"] == {"dt_ms": 10.0}
    assert meta["record"]["version"] == "1.1.0" and meta["sources"] == m["sources"]
    assert meta["libraries"]["pyarrow"] == pa.__version__
    assert not any("_at" in k for k in meta), "no timestamps inside tables"


def test_rerun_with_nothing_changed_does_nothing_at_all(built):
    out, mirror = built
    inode = out.stat().st_ino
    manifest = (out / "manifest.json").read_bytes()
    result = run(out, mirror)
    assert result.up_to_date and CALLS == []
    assert result.files_hashed == 0, "no-op reads no file, only stats"
    assert out.stat().st_ino == inode, "no new generation published"
    assert (out / "manifest.json").read_bytes() == manifest
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]


def test_changed_parameter_reruns_only_the_stages_that_use_it(built):
    out, mirror = built
    result = run(out, mirror, dt_ms=5.0)
    assert CALLS == ["rebin-sites"]
    decision = {d.stage: d for d in result.decisions}["rebin-sites"]
    assert decision.reasons == ("parameter dt_ms: 10.0 -> 5.0",)
    assert Store(out).read_table("trials", area="A1")["start_s"].to_pylist() == [0, 5, 10]


def test_changed_source_reruns_downstream(built, tmp_path):
    out, mirror = built
    write_mirror(mirror, a1="r1 r2 r3 r4", version="1.2.0")
    result = run(out, mirror)
    assert CALLS == ["fetch", "unpack", "parse-epochs", "rebin-sites"]
    reasons = {d.stage: d.reasons for d in result.decisions}
    assert "input source/record.json changed" in reasons["fetch"]
    assert "input raw/A1.txt changed" in reasons["unpack"]
    assert Store(out).read_table("trials", area="A1").num_rows == 4


def test_identical_output_stops_the_cascade(built):
    """A stage that reran but wrote the same bytes does not make the next one rerun."""
    out, mirror = built
    (out / "recordings/area=PEG/part-0.parquet").unlink()  # the store is ours to break
    result = run(out, mirror)
    assert CALLS == ["unpack"]
    assert {d.stage: d.reasons for d in result.decisions}["unpack"] == (
        "output recordings/area=PEG/part-0.parquet is missing",
    )


def test_force_and_from_rerun_what_they_say(built):
    out, mirror = built
    run(out, mirror, force=True)
    assert CALLS == ["fetch", "unpack", "parse-epochs", "rebin-sites"]
    run(out, mirror, from_stage="parse-epochs")
    assert CALLS == ["parse-epochs", "rebin-sites"]
    with pytest.raises(ConfigError, match="--from align-wav"):
        run(out, mirror, from_stage="align-wav")


def test_single_stage_command_skips_when_up_to_date(built):
    out, mirror = built
    assert run(out, mirror, only=("unpack",)).up_to_date and CALLS == []
    run(out, mirror, only=("rebin-sites",), dt_ms=20.0)
    assert CALLS == ["rebin-sites"]


def test_corrupt_table_is_found_by_verify_and_repaired_by_build(built):
    out, mirror = built
    before = table_bytes(out)
    path = out / "stims/area=A1/part-0.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as f:  # in place, same size
        f.write(data)
    problems = verify(out)
    assert len(problems) == 1 and "stims/area=A1/part-0.parquet" in problems[0]
    run(out, mirror)
    assert CALLS == ["parse-epochs"]
    assert verify(out) == []
    assert table_bytes(out) == before


def test_deleted_manifest_is_rewritten_without_running_stages(built):
    out, mirror = built
    (out / "manifest.json").unlink()
    result = run(out, mirror)
    assert not result.up_to_date and CALLS == []
    assert verify(out) == []


def test_failed_stage_keeps_the_previous_store(built):
    out, mirror = built
    before = table_bytes(out)
    stages = {
        **FAKES,
        "rebin-sites": SimpleNamespace(**{**vars(FAKES["rebin-sites"]), "run": _fail}),
    }
    with pytest.raises(RuntimeError, match="stage failed"):
        run(out, mirror, stages=stages, dt_ms=3.0)
    assert table_bytes(out) == before
    assert not [p for p in out.parent.iterdir() if ".staging-" in p.name]
    assert verify(out) == []


def test_two_builds_of_the_same_inputs_are_byte_identical(tmp_path):
    mirror = write_mirror(tmp_path / "mirror")
    run(tmp_path / "a", mirror)
    other = shutil.copytree(mirror, tmp_path / "elsewhere")  # same bytes, another path
    run(tmp_path / "b", other)
    assert table_bytes(tmp_path / "a") == table_bytes(tmp_path / "b")
    digests = [
        {
            t["path"]: t["digest"]
            for t in json.loads((tmp_path / o / "manifest.json").read_text())["tables"]
        }
        for o in ("a", "b")
    ]
    assert digests[0] == digests[1]


def test_status_says_what_would_rerun_and_why(built):
    out, mirror = built
    report = status(out, settings_for(mirror), stages=FAKES)
    assert report["up_to_date"] and report["record"]["version"] == "1.1.0"
    assert [s["state"] for s in report["stages"]] == ["up to date"] * 4
    report = status(out, settings_for(mirror, dt_ms=5.0), stages=FAKES)
    assert report["stages"][3] == {
        **report["stages"][3],
        "state": "will run",
        "reasons": ["parameter dt_ms: 10.0 -> 5.0"],
    }
    write_mirror(mirror, a1="x y")
    states = {
        s["stage"]: s["state"] for s in status(out, settings_for(mirror), stages=FAKES)["stages"]
    }
    assert states == {
        "fetch": "will run",
        "unpack": "may run",
        "parse-epochs": "may run",
        "rebin-sites": "may run",
    }


def test_status_of_nothing(tmp_path):
    report = status(tmp_path / "none", settings_for(tmp_path), stages=FAKES)
    assert not report["built"] and report["stages"][0]["reasons"] == ["never built"]


def test_refuses_to_replace_a_directory_that_is_not_a_store(tmp_path):
    mirror = write_mirror(tmp_path / "mirror")
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("precious")
    with pytest.raises(StoreError, match="refusing to replace"):
        run(home, mirror)
    assert (home / "thesis.tex").read_text() == "precious"


def test_contracts_cover_every_stage_and_known_tables():
    """Tables the schema knows; Zenodo files the record has (a glob that names none would
    leave a stage blind to its input)."""
    from nat4etl import nat4, schema
    from nat4etl.fingerprint import is_raw, raw_selected
    from nat4etl.stages import CONTRACTS, STAGES

    assert tuple(CONTRACTS) == STAGES
    for spec in CONTRACTS.values():
        for table in (*spec.reads, *spec.writes):
            assert table == "raw" or is_raw(table) or table in schema.TABLES, (spec.name, table)
        for read in (*spec.reads, *spec.lists):
            for area in nat4.AREAS:
                if is_raw(read):
                    assert raw_selected(nat4.ZENODO_FILES, [read], [area]), (spec.name, read)


def test_verify_reports_missing_and_extra_files(built):
    out, _ = built
    (out / "raw/PEG.txt").unlink()
    extra = out / "stims/area=XX/part-0.parquet"
    extra.parent.mkdir()
    pq.write_table(pa.table({"a": [1]}), extra)
    problems = "\n".join(verify(out))
    assert "raw/PEG.txt: missing" in problems
    assert "stims/area=XX/part-0.parquet: not in manifest.json" in problems


def test_unreadable_manifest_is_reported_and_rewritten(built):
    out, mirror = built
    (out / "manifest.json").write_text("{ truncated")
    assert verify(out)[0].startswith("manifest.json: not valid JSON")
    assert not run(out, mirror).up_to_date and CALLS == []
    assert verify(out) == []


def test_a_copied_store_is_read_once_then_free_again(built, tmp_path):
    out, mirror = built
    copy = shutil.copytree(out, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    first = run(copy, mirror)
    assert CALLS == [] and first.files_hashed > 0 and not first.up_to_date
    again = run(copy, mirror)
    assert again.up_to_date and again.files_hashed == 0
    assert table_bytes(copy) == table_bytes(out) and verify(copy) == []


def _as_recorded_with_sha256(out: Path) -> None:
    """Rewrite a store's manifest and stage records as nat4etl wrote them with sha256
    digests (a manifest ``sha256`` hex per table, ``sha256:<hex>`` in the records)."""

    def sha256_of(rel: str) -> str:
        return hashlib.sha256((out / rel).read_bytes()).hexdigest()

    manifest = json.loads((out / "manifest.json").read_text())
    for t in manifest["tables"]:
        del t["digest"]
        t["sha256"] = sha256_of(t["path"])
    (out / "manifest.json").write_text(json.dumps(manifest))
    for path in (out / "_stages").glob("*.json"):
        record = json.loads(path.read_text())
        for states in (record.get("inputs") or {}, record.get("outputs") or {}):
            for rel, value in states.items():
                digest = value["digest"] if isinstance(value, dict) else value
                if isinstance(digest, str) and digest.startswith("blake3:"):
                    new = f"sha256:{sha256_of(rel)}"
                    if isinstance(value, dict):
                        value["digest"] = new
                    else:
                        states[rel] = new
        fields = ("stage", "inputs", "params", "nat4etl_version", "schema_version")
        record["fingerprint"] = Fingerprint(*(record[f] for f in fields)).digest
        path.write_text(json.dumps(record))


def test_tables_are_digested_with_blake3_and_named_so(built):
    out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    rel = "stims/area=A1/part-0.parquet"
    entry = next(t for t in manifest["tables"] if t["path"] == rel)
    assert entry["digest"] == f"blake3:{blake3.blake3((out / rel).read_bytes()).hexdigest()}"
    record = json.loads((out / "_stages/parse-epochs.json").read_text())
    assert record["outputs"][rel]["digest"] == entry["digest"]


def test_a_store_recorded_with_sha256_verifies_then_rebuilds_once(built):
    out, mirror = built
    before = table_bytes(out)
    _as_recorded_with_sha256(out)
    assert verify(out) == []  # the manifest's sha256 and the records' are still checked
    path = out / "stims/area=A1/part-0.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    problems = verify(out)
    assert problems and all("stims/area=A1/part-0.parquet: sha256" in p for p in problems)
    path.write_bytes(before["stims/area=A1/part-0.parquet"])
    result = run(out, mirror)  # digests named another way: the stages with tables run once
    assert CALLS and "fetch" not in CALLS
    reasons = {d.stage: d.reasons for d in result.decisions}
    assert reasons["unpack"] == ("2 output(s) recorded with sha256 digests, now blake3",)  # A1, PEG
    assert any("was recorded with sha256, now blake3" in r for r in reasons["parse-epochs"])
    assert table_bytes(out) == before and verify(out) == []
    run(out, mirror)
    assert CALLS == []


def test_verify_names_a_table_listed_without_a_digest_and_an_unknown_algorithm(built):
    out, _ = built
    manifest = json.loads((out / "manifest.json").read_text())
    rel = "stims/area=A1/part-0.parquet"
    del next(t for t in manifest["tables"] if t["path"] == rel)["digest"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    record_path = out / "_stages/parse-epochs.json"
    record = json.loads(record_path.read_text())
    record["outputs"][rel]["digest"] = "whirl9:00ff"
    record_path.write_text(json.dumps(record))
    problems = verify(out)
    assert f"{rel}: listed in manifest.json without a digest" in problems
    assert f"{rel}: unknown digest 'whirl9:00ff' (_stages/parse-epochs.json)" in problems


def test_the_rebuild_hint_names_a_mirror_only_when_every_file_came_from_it(tmp_path):
    from nat4etl.stages.build import _fetched_from_dir

    raw = tmp_path / "raw"
    raw.mkdir()
    mirror = tmp_path / "my mirror"
    local = [{"source_url": (mirror / n).as_uri()} for n in ("a.tgz", "b.zip")]
    remote = {"source_url": "https://zenodo.org/api/records/1/files/c.csv/content"}
    for files, want in ((local, str(mirror)), ([*local, remote], None), ([], None)):
        (raw / "fetch.json").write_text(json.dumps({"files": files}))
        assert _fetched_from_dir(tmp_path) == want
    (raw / "fetch.json").write_text("{not json")
    assert _fetched_from_dir(tmp_path) is None


def test_the_rebuild_hint_quotes_paths_for_the_shell(tmp_path):
    import shlex

    from nat4etl.stages.build import rebuild_command

    out = tmp_path / "a store; rm -rf x"
    words = shlex.split(rebuild_command(out))
    assert words[:4] == ["nat4etl", "build", "--out", str(out)]


def test_the_rebuild_command_says_wav_either_way():
    # a store built with waveforms: --wav, so a config file with wav = false cannot drop them
    from nat4etl.stages.build import build_command

    assert build_command("o", {"wav": True}).split()[-1] == "--wav"
    assert build_command("o", {"wav": False}).split()[-1] == "--no-wav"
    assert "wav" not in build_command("o", {})
    assert build_command("o", {"wav": False}, wav=True).split()[-1] == "--wav"


def test_input_changes_say_read_or_no_longer_read_not_gone():
    # `build --area A1` on an all-area store stops reading PEG's files; they are still there
    from nat4etl.fingerprint import _input_changes

    old = {"raw/A1.tgz": "md5:a", "raw/PEG.tgz": "md5:p"}
    new = {"raw/A1.tgz": "md5:b", "raw/wav.zip": "md5:w"}
    assert _input_changes(old, new) == [
        "input raw/A1.tgz changed",
        "input raw/wav.zip is read now (was not)",
        "input raw/PEG.tgz is no longer read",
    ]


def test_a_mirror_file_rewritten_with_the_same_bytes_reruns_fetch_alone_and_says_why(built):
    """Fetch judges a mirror by size and mtime (it checks md5s when it runs): a rewrite of
    the same bytes is "a new modification time", not "changed", and nothing after fetch runs."""
    out, mirror = built
    stat = (mirror / "A1.txt").stat()
    os.utime(mirror / "A1.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    result = run(out, mirror)
    assert CALLS == ["fetch"]
    reasons = {d.stage: d.reasons for d in result.decisions}
    assert reasons["fetch"] == ("input source/A1.txt has a new modification time (same size)",)
    (mirror / "A1.txt").write_text("r1 r2 r3 r4")
    result = run(out, mirror)
    assert CALLS[:2] == ["fetch", "unpack"]
    assert {d.stage: d.reasons for d in result.decisions}["fetch"] == (
        "input source/A1.txt changed",
    )


def test_a_parameter_an_earlier_nat4etl_recorded_is_named_when_it_is_no_longer_one():
    """unpack once recorded `source_dir` (null in a build) among its parameters: an old
    store's unpack reruns once, and says why rather than "fingerprint changed"."""
    from nat4etl.fingerprint import why_stale

    fp = Fingerprint("unpack", inputs={}, params={"areas": ["A1"]}, nat4etl_version="1")
    old = {"fingerprint": "old", "nat4etl_version": "1", "schema_version": 0, "inputs": {}}
    recorded = {**old, "params": {"areas": ["A1"], "source_dir": None}}
    assert why_stale(recorded, fp) == ["parameter source_dir is no longer one (it was None)"]
    fewer = {**old, "params": {}}
    assert why_stale(fewer, fp) == ["parameter areas is new (['A1'])"]

"""`build`: every stage in order inside one atomic publish, skipping what is up to date.

Decide, then act. Under the store's lock, :func:`build` first decides per stage from the
published store alone (:func:`decide`: fingerprint and cheap output checks, see
:mod:`nat4etl.fingerprint`). If nothing would run and the manifest is current, it returns:
no staging copy, no publish, no stage imported, no pyarrow. Otherwise it stages a hard-link
copy of the store and walks the stages again, deciding each one against the staging copy
just before it would run: a stage whose upstream reran but produced identical files is still
skipped (early cut-off). Every stage that ran gets a record in ``_stages/``; then
``manifest.json`` is written and the copy is published (:func:`nat4etl.store.staging`).
A store whose files were copied (new mtimes, same bytes) is read once and its records
refreshed, so the next no-op build reads nothing again.

``status`` and ``verify`` live here too: the same decisions, reported instead of acted on,
and a full re-hash of the store against its manifest.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import platform
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from nat4etl import SCHEMA_VERSION, memory
from nat4etl.config import Settings, check_audio_bins
from nat4etl.errors import ConfigError, NotImplementedYet, StoreError
from nat4etl.fingerprint import (
    FETCH,
    Decision,
    DigestCache,
    Fingerprint,
    StageSpec,
    check_outputs,
    fingerprint,
    is_raw,
    mirror_read,
    new_record,
    raw_data_files,
    raw_selected,
    record_info,
    settle,
    source_file_names,
    source_files_dir,
    source_reads,
    table_files,
    why_stale,
)
from nat4etl.hashing import file_digest
from nat4etl.stages import CONTRACTS, STAGES
from nat4etl.store import (
    MANIFEST,
    RAW,
    Store,
    check_replaceable,
    kill_point,
    lock_holder,
    manifest_digest,
    open_snapshot,
    recover,
    staging,
    store_lock,
    store_path,
    write_manifest,
)
from nat4etl.store import (
    STAGES as STAGES_DIR,
)

#: library versions recorded in the manifest and in every table's metadata
LIBRARIES = ("pyarrow", "polars", "h5py", "numpy", "soxr")


# ====================================================================== stages


@dataclass(frozen=True)
class Stage:
    """A stage's contract plus a way to get its ``run`` (imported only when it runs)."""

    spec: StageSpec
    load: Callable[[], Callable[..., Any]]
    missing: str | None = None  # why the stage cannot run (status reports it)

    @property
    def name(self) -> str:
        return self.spec.name


def stages_for(settings: Settings) -> tuple[str, ...]:
    return tuple(s for s in STAGES if settings.wav or s != "align-wav")


def default_stages(names: Sequence[str], *, tolerant: bool = False) -> list[Stage]:
    """The real stages: contracts from :data:`nat4etl.stages.CONTRACTS`, modules imported
    only when a stage runs.

    ``tolerant``: a stage that is not implemented is returned with ``missing`` set instead
    of raising (for ``status``).
    """
    out = []
    for name in names:
        missing = None
        if importlib.util.find_spec(_module_name(name)) is None:
            if not tolerant:
                raise NotImplementedYet(
                    f"stage `{name}` is not implemented yet; nothing was written"
                )
            missing = f"stage `{name}` is not implemented yet"
        out.append(Stage(CONTRACTS[name], _runner(name), missing=missing))
    return out


def stages_from_modules(modules: Mapping[str, Any]) -> list[Stage]:
    """Stages from module-like objects with READS/WRITES/PARAMS/run (tests use fakes)."""
    return [Stage(_spec_from(name, m), lambda m=m: m.run) for name, m in modules.items()]


def _module_name(stage: str) -> str:
    return f"nat4etl.stages.{stage.replace('-', '_')}"


def _spec_from(name: str, module: Any) -> StageSpec:
    return StageSpec(
        name,
        tuple(getattr(module, "READS", ())),
        tuple(getattr(module, "WRITES", ())),
        tuple(getattr(module, "PARAMS", ())),
    )


def _runner(name: str) -> Callable[[], Callable[..., Any]]:
    def load():
        from nat4etl.stages import stage_module

        return stage_module(name).run

    return load


def forced_reasons(
    names: Sequence[str], *, force: bool = False, from_stage: str | None = None
) -> dict[str, str]:
    """Stages to rerun whatever their fingerprints say, with the reason to print."""
    if force:
        return {n: "forced (--force)" for n in names}
    if from_stage is None:
        return {}
    if from_stage not in names:
        raise ConfigError(
            f"`--from {from_stage}`: not a stage of this build; choose one of {', '.join(names)}"
        )
    return {n: f"forced (--from {from_stage})" for n in names[names.index(from_stage) :]}


# ====================================================================== decide


class Context:
    """What deciding needs: settings, the digest cache, the schema version.

    When the build runs ``fetch``, the later stages get ``source_dir=None``: they read the
    verified copy in ``raw/``, not the mirror, so their fingerprints do not depend on where
    the mirror lives (moving it reruns fetch only, which then finds nothing new).
    """

    def __init__(
        self,
        settings: Settings,
        root: Path,
        stages: Sequence[str] = (),
        specs: Sequence[StageSpec] = (),
    ) -> None:
        self.settings = settings
        # who writes each table, for a table's provenance: the build's stages (tests'
        # fakes too: the later win), else the real contracts (a single-stage command)
        self.specs = [*CONTRACTS.values(), *specs]
        self.after_fetch = replace(settings, source_dir=None) if FETCH in stages else settings
        self.cache = DigestCache()
        self.schema_version = SCHEMA_VERSION
        self.records = read_records(root)
        for record in self.records.values():
            self.cache.learn(record.get("outputs") or {})

    def settings_for(self, stage: str) -> Settings:
        return self.settings if stage == FETCH else self.after_fetch


def read_records(root: Path) -> dict[str, dict]:
    """Every ``_stages/<stage>.json`` of the store at ``root``, in build order."""
    d = root / STAGES_DIR
    if not d.is_dir():
        return {}

    def order(name: str) -> tuple[int, str]:  # unknown names (tests' fakes) last
        return (STAGES.index(name) if name in STAGES else len(STAGES), name)

    store = Store(root)
    names = sorted((p.stem for p in d.glob("*.json")), key=order)
    return {n: r for n in names if (r := store.read_stage_record(n)) is not None}


def decide(root: Path, stage: Stage, ctx: Context, *, forced: str | None = None) -> Decision:
    """Run or skip ``stage`` against the store at ``root``, and why."""
    settings = ctx.settings_for(stage.name)
    fp = fingerprint(root, stage.spec, settings, ctx.cache, schema_version=ctx.schema_version)
    if forced:
        return Decision(stage.name, True, (forced,), fp)
    record = Store(root).read_stage_record(stage.name)
    reasons = why_stale(record, fp) or check_outputs(root, record or {}, ctx.cache)
    return Decision(stage.name, bool(reasons), tuple(reasons), fp)


def manifest_problems(root: Path, ctx: Context) -> list[str]:
    """Why ``manifest.json`` does not describe the store as it is (cheap checks)."""
    try:
        manifest = Store(root).read_manifest()
    except ValueError:
        return ["manifest.json is not valid JSON"]
    if manifest is None:
        return ["manifest.json is missing"]
    problems = []
    listed = {t.get("path"): manifest_digest(t) for t in manifest.get("tables", [])}
    present = all_table_files(root)
    for rel in sorted(set(listed) - set(present)):
        problems.append(f"manifest lists {rel}, which is missing")
    for rel in present:
        if rel not in listed:
            problems.append(f"{rel} is not in the manifest")
        elif listed[rel] != ctx.cache.digest(root, rel):
            problems.append(f"{rel} differs from the manifest")
    stages = manifest.get("stages") or {}
    for name, record in ctx.records.items():
        if (stages.get(name) or {}).get("fingerprint") != record.get("fingerprint"):
            problems.append(f"manifest does not match _stages/{name}.json")
    return problems


def all_table_files(root: Path) -> list[str]:
    """Every ``<table>/area=*/part-0.parquet`` (and ``part-0.arrow`` sidecar) in the store,
    without the schema module."""
    if not root.is_dir():
        return []
    rels: list[str] = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name not in (RAW, STAGES_DIR) and not d.name.startswith("."):
            rels += table_files(root, d.name)
    return rels


# ====================================================================== act


@dataclass
class BuildResult:
    """What a build did. ``up_to_date``: nothing ran and nothing was published."""

    out: Path
    up_to_date: bool
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    seconds: float = 0.0
    files_hashed: int = 0  # files read to check them (0 on a no-op with intact states)

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "up_to_date": self.up_to_date,
            "ran": self.ran,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "files_hashed": self.files_hashed,
        }


def build(
    out: str | os.PathLike,
    settings: Settings,
    progress,
    *,
    wait_s: float = 0.0,
    force: bool = False,
    from_stage: str | None = None,
    only: Sequence[str] | None = None,
    stages: Mapping[str, Any] | None = None,
) -> BuildResult:
    """Bring the store at ``out`` up to date with ``settings``; publish only if all succeed.

    Parameters
    ----------
    out
        The store directory; created on the first build.
    settings
        Every parameter (see :mod:`nat4etl.config`).
    progress
        Where log lines go (``.log(msg, **fields)``).
    wait_s
        Seconds to wait for another writer's lock; default 0: fail at once with
        :class:`~nat4etl.errors.StoreLocked` naming the holder.
    force
        Rerun every stage whatever the fingerprints say.
    from_stage
        Rerun this stage and every later one.
    only
        Run just these stages (the single-stage commands); default: every stage of the
        build (``align-wav`` only with ``settings.wav``).
    stages
        Stage modules by name, in order (tests); default the real ones.

    Returns
    -------
    BuildResult
        ``up_to_date`` when nothing had to run (then nothing was written at all).
    """
    t0 = time.monotonic()
    out = store_path(out)
    chosen = _choose(settings, only, stages)
    forced = forced_reasons([s.name for s in chosen], force=force, from_stage=from_stage)
    if any(s.name == "align-wav" for s in chosen):  # fail now, not after the other stages
        check_audio_bins(settings.audio_fs_hz, settings.dt_ms)

    def on_wait(holder: str) -> None:
        progress.log(f"waiting up to {wait_s:g} s for the lock on {out} ({holder})")

    with store_lock(out, wait_s=wait_s, on_wait=on_wait):
        for note in recover(out):
            progress.log(note, level="warning")
        ctx = Context(settings, out, [s.name for s in chosen], [s.spec for s in chosen])
        plan = [decide(out, s, ctx, forced=forced.get(s.name)) for s in chosen]
        stale_manifest = [] if not ctx.records else manifest_problems(out, ctx)
        moved = stale_states(ctx)
        if not any(d.run for d in plan) and not stale_manifest and not moved:
            result = BuildResult(out, True, [], [d.stage for d in plan], plan)
            result.seconds = time.monotonic() - t0
            result.files_hashed = len(ctx.cache.hashed)
            progress.log(f"{out}: up to date ({result.seconds:.2f} s)", **result.as_dict())
            return result
        for problem in stale_manifest:
            progress.log(f"manifest: {problem}; rewriting it")
        if moved:
            progress.log(
                f"{len(moved)} files have new mtimes but the same content (copied or touched); "
                "recording their new state so the next build need not read them"
            )
        result = _run_staged(out, chosen, ctx, forced, progress, started=_now_iso())
    result.seconds = time.monotonic() - t0
    result.files_hashed = len(ctx.cache.hashed)
    progress.log(
        f"{out}: published ({', '.join(result.ran) or 'manifest only'}; {result.seconds:.1f} s)",
        **result.as_dict(),
    )
    return result


def _choose(
    settings: Settings,
    only: Sequence[str] | None,
    stages: Mapping[str, Any] | None,
    *,
    tolerant: bool = False,
) -> list[Stage]:
    if stages is not None:
        chosen = stages_from_modules(stages)
        return [s for s in chosen if only is None or s.name in only]
    names = tuple(only) if only is not None else stages_for(settings)
    unknown = [n for n in names if n not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stages {unknown}; known: {', '.join(STAGES)}")
    return default_stages(names, tolerant=tolerant)


def _run_staged(
    out: Path,
    chosen: list[Stage],
    ctx: Context,
    forced: Mapping[str, str],
    progress,
    *,
    started: str,
) -> BuildResult:
    result = BuildResult(out, False)

    def manifest(store: Store) -> dict:
        _refresh_states(store, ctx, skip=result.ran)
        written = [rel for name in result.ran for rel in ctx.records[name]["outputs"]]
        settle(store.root, written + stale_states(ctx))
        return _write_build_manifest(store, ctx, result, started)

    with (
        staging(out, manifest=manifest) as store,
        memory.arrow_allocator_for_builds(),
        memory.fewer_gc_passes(),
    ):
        store.stages_planned = frozenset(stage.name for stage in chosen)
        for stage in chosen:
            d = decide(store.root, stage, ctx, forced=forced.get(stage.name))
            result.decisions.append(d)
            if not d.run:
                result.skipped.append(stage.name)
                progress.log(f"stage {stage.name}: up to date", stage=stage.name, action="skip")
                continue
            why = "; ".join(d.reasons)
            progress.log(
                f"stage {stage.name}: running ({why})",
                stage=stage.name,
                action="run",
                reasons=list(d.reasons),
            )
            try:
                _run_one(store, stage, d.fingerprint, ctx, progress)
            except BaseException:
                progress.log(
                    f"stage {stage.name}: failed; {out} is unchanged",
                    level="error",
                    stage=stage.name,
                    action="failed",
                )
                raise
            result.ran.append(stage.name)
    return result


def _run_one(store: Store, stage: Stage, fp: Fingerprint, ctx: Context, progress) -> None:
    """Run one stage in staging and record what it ran on and what it wrote."""
    run = stage.load()
    store.provenance = table_provenance(store.root, stage.spec, fp, ctx)
    store.area_sources = area_sources(store.root, stage.spec, ctx)
    store.written = {}
    kill_point(f"stage:{stage.name}")
    t0 = time.monotonic()
    summary = run(store, ctx.settings_for(stage.name), progress) or {}
    memory.release_free_memory()  # the next stage's peak starts from what is live
    seconds = time.monotonic() - t0
    store.provenance, store.area_sources = {}, {}
    trusted = dict(store.written)
    if stage.spec.writes_raw:
        trusted.update(_fetch_json_md5s(store.root))
    record = new_record(
        store.root,
        stage.spec,
        fp,
        ctx.cache,
        summary=summary,
        seconds=seconds,
        trusted=trusted,
        source_dir=mirror_read(stage.spec, ctx.settings_for(stage.name), fp.inputs),
    )
    store.write_json(store.stage_record_path(stage.name), record)
    ctx.records[stage.name] = record
    progress.log(
        f"stage {stage.name}: done in {seconds:.1f} s",
        stage=stage.name,
        action="done",
        seconds=round(seconds, 3),
    )


def stale_states(ctx: Context) -> list[str]:
    """Recorded outputs that had to be re-read because their stat changed, though their
    content did not (a ``cp -r``, a ``touch``): worth recording anew, once."""
    outputs = {rel for r in ctx.records.values() for rel in (r.get("outputs") or {})}
    return sorted(
        rel
        for rel in set(ctx.cache.hashed) & outputs
        if any(
            (r.get("outputs") or {}).get(rel, {}).get("digest") == ctx.cache.states[rel].digest
            for r in ctx.records.values()
        )
    )


def _refresh_states(store: Store, ctx: Context, *, skip: Sequence[str]) -> None:
    """Rewrite the records of stages that did not run whose outputs' stats changed."""
    moved = set(stale_states(ctx))
    for name, record in list(ctx.records.items()):
        outputs = record.get("outputs") or {}
        if name in skip or not moved & set(outputs):
            continue
        fresh = {rel: asdict(ctx.cache.state(store.root, rel)) for rel in outputs}
        record = {**record, "outputs": fresh}
        store.write_json(store.stage_record_path(name), record)
        ctx.records[name] = record


def _fetch_json_md5s(root: Path) -> dict[str, str]:
    """md5s fetch verified moments ago in this staging copy (saves re-reading raw/)."""
    import json

    try:
        files = json.loads((root / RAW / "fetch.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    out = {}
    for e in files:
        try:
            path = root / RAW / e["name"]
            if path.is_file() and path.stat().st_size == e["size_bytes"]:
                out[f"{RAW}/{e['name']}"] = f"md5:{str(e['md5']).lower().removeprefix('md5:')}"
        except (KeyError, TypeError):
            continue
    return out


# ====================================================================== provenance


@functools.cache
def library_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def sources(
    root: Path,
    cache: DigestCache,
    reads: Sequence[str] = (RAW,),
    areas: Sequence[str] = (),
    source_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """The Zenodo files that ``reads`` name (all by default): name, size, md5; in raw/, or
    in ``source_dir``, the mirror a stage command was given (what it read)."""
    if source_dir is not None:
        names = raw_selected(source_file_names(source_dir), reads, areas)
        states = {name: cache.mirror_state(source_dir / name) for name in names}
    else:
        names = raw_selected((rel.split("/", 1)[1] for rel in raw_data_files(root)), reads, areas)
        states = {name: cache.state(root, f"{RAW}/{name}") for name in names}
    return [
        {"name": name, "size_bytes": s.size_bytes, "md5": s.digest.removeprefix("md5:")}
        for name, s in states.items()
    ]


def table_provenance(root: Path, spec: StageSpec, fp: Fingerprint, ctx: Context) -> dict:
    """What goes into every table the stage writes, but its ``sources``
    (:func:`area_sources`). No timestamps and no paths, so the same inputs give the same
    bytes wherever the mirror lives."""
    mirror = source_files_dir(ctx.settings_for(spec.name))  # a stage command's --source
    return {
        "stage": spec.name,
        "params": fp.params,  # no paths: a --source mirror is not a parameter
        "record": record_info(mirror or root / RAW),
        "libraries": library_versions(),
    }


def area_sources(root: Path, spec: StageSpec, ctx: Context) -> dict[str, list[dict[str, Any]]]:
    """Per area, the Zenodo files its tables are made from
    (:func:`~nat4etl.fingerprint.source_reads`): not every file in raw/, so a file that
    arrives later (wav.zip) changes only the tables made from it, and another area's
    files (PEG's) none of A1's."""
    settings = ctx.settings_for(spec.name)
    reads = source_reads(spec, ctx.specs)
    mirror = source_files_dir(settings)  # a stage command's --source: what it read
    return {a: sources(root, ctx.cache, reads, (a,), mirror) for a in settings.areas}


def _latest_parameters(records: dict[str, dict]) -> dict[str, Any]:
    """Each parameter as the stage that ran last set it: after `rebin-sites --dt-ms 5`,
    the store's bin width is 5 ms, though normalize (now out of date) ran at 10. Stages
    that ran in the same second: the earlier stage in the pipeline wins, as the later
    ones are made from its tables."""
    position = {name: i for i, name in enumerate(STAGES)}

    def recency(item: tuple[str, dict]) -> tuple[str, int]:
        name, record = item
        return str(record.get("ran_at") or ""), -position.get(name, len(STAGES))

    parameters: dict[str, Any] = {}
    for _, record in sorted(records.items(), key=recency):
        parameters.update(record.get("params") or {})
    return parameters


def _manifest_stage(record: Mapping[str, Any]) -> dict[str, Any]:
    """What the manifest repeats of a stage record: ``source_dir`` only where a stage
    command read a mirror's files in place of raw/'s (a later build's hint needs it)."""
    entry = {k: record.get(k) for k in ("fingerprint", "ran_at", "seconds", "params", "inputs")}
    if record.get("source_dir"):
        entry["source_dir"] = record["source_dir"]
    return entry


def _write_build_manifest(store: Store, ctx: Context, result: BuildResult, started: str) -> dict:
    root = store.root
    stages = {name: _manifest_stage(record) for name, record in ctx.records.items()}
    parameters = _latest_parameters(ctx.records)
    extra = {
        "record": record_info(root / RAW),
        "sources": sources(root, ctx.cache),
        "libraries": library_versions(),
        "parameters": parameters,
        "stages": stages,
        "build": {
            "started_at": started,
            "finished_at": _now_iso(),
            "ran": result.ran,
            "skipped": result.skipped,
        },
    }

    def digest(path: Path) -> str:
        return ctx.cache.digest(root, str(path.relative_to(root)))

    return write_manifest(store, extra, digest=digest)


def _now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ====================================================================== status


def status(
    out: str | os.PathLike,
    settings: Settings,
    *,
    force: bool = False,
    from_stage: str | None = None,
    stages: Mapping[str, Any] | None = None,
    only: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What is built, from which inputs, what a build with ``settings`` would rerun and why
    (of the stages in ``only``, when given).

    Read-only and lock-free: it reads the generation published now (a snapshot).
    """
    out = store_path(out)
    chosen = _choose(settings, only, stages, tolerant=True)
    forced = forced_reasons([s.name for s in chosen], force=force, from_stage=from_stage)
    report: dict[str, Any] = {"out": str(out), "built": False, "lock": lock_holder(out)}
    if not out.is_dir():
        report["stages"] = [
            {"stage": s.name, "state": "will run", "reasons": ["never built"]} for s in chosen
        ]
        return report
    check_replaceable(out)  # a directory build would refuse (StoreError), not "never built"
    snap = open_snapshot(out)
    try:
        root = snap.root
        ctx = Context(settings, root, [s.name for s in chosen], [s.spec for s in chosen])
        manifest = _manifest_or_empty(snap)
        # the files of the areas asked (--area, else the config's: both), as the stages
        # below are judged for those areas
        every = manifest.get("tables", [])
        entries = [t for t in every if t.get("area") in settings.areas]
        suffixes = [Path(str(t.get("path", ""))).suffix for t in entries]
        report.update(
            built=bool(manifest),
            written_at=manifest.get("written_at"),
            record=manifest.get("record") or record_info(root / RAW),
            sources=manifest.get("sources", []),
            # one per (table, area); the files are these Parquet files and the .arrow
            # sidecars of tables with vector columns
            tables=len({(t.get("table"), t.get("area")) for t in entries}),
            table_files={
                "parquet": suffixes.count(".parquet"),
                "arrow": suffixes.count(".arrow"),
            },
            table_areas=list(settings.areas),
            other_areas=sorted({str(t.get("area")) for t in every} - set(settings.areas)),
        )
        report["stages"] = _stage_states(root, chosen, ctx, forced)
        report["manifest"] = manifest_problems(root, ctx) if ctx.records else []
        # the mirror its tables were made from: the one the build hint names
        mirror = _mirror_read_since_fetch(manifest.get("stages") or {}, None)
        mirror = mirror or _fetched_from_dir(root)
        if mirror and settings.source_dir is None:  # judged against Zenodo, built from it
            report["built_from_mirror"] = mirror
    finally:
        snap.close()
    report["up_to_date"] = (
        all(s["state"] == "up to date" for s in report["stages"]) and not (report["manifest"])
    )
    return report


def stale_after(out: str | os.PathLike, settings: Settings, stage: str) -> list[str]:
    """The stages after ``stage`` that were built before and are now out of date: what a
    single stage's rerun leaves behind (its tables changed under them; not the stages
    after those, which may be left as they are).

    Judged with the parameters the store records, not ``settings``: a stage command has
    no ``--source`` or ``--dt-ms`` of the build's, and must not call the stages after it
    stale for options it was never given (nor look at the stages before it)."""
    # the later stages read raw/, whatever mirror this stage was given (as in a build)
    recorded = replace(recorded_settings(out, settings, after=stage), source_dir=None)
    later = [s for s in STAGES[STAGES.index(stage) + 1 :] if s in stages_for(recorded)]
    if not later:
        return []
    return [  # not "may run": its inputs may come back byte for byte (they are rewritten)
        row["stage"]
        for row in status(out, recorded, only=later)["stages"]
        if row["state"] == "will run" and "never built" not in row["reasons"]
    ]


def recorded_parameters(out: str | os.PathLike, *, after: str | None = None) -> dict[str, Any]:
    """:func:`store_parameters` of the generation published at ``out`` ({} when there is
    no readable manifest)."""
    try:
        snap = open_snapshot(store_path(out))
    except (OSError, StoreError):
        return {}
    try:
        return store_parameters(snap, after=after)
    except (OSError, ValueError):
        return {}
    finally:
        snap.close()


def store_parameters(store: Store, *, after: str | None = None) -> dict[str, Any]:
    """The build parameters ``store``'s manifest records, with the local mirror fetch
    copied from, which the manifest leaves out (see :func:`_fetched_from_dir`).
    ``after``: the parameters stage ``after`` last ran with win over the other stages'.
    The mirror is the one a stage up to ``after`` read in place of raw/ since the last
    fetch (:func:`_mirror_read_since_fetch`), if one did. OSError / ValueError: an
    unreadable manifest."""
    manifest = store.read_manifest() or {}
    params = manifest.get("parameters") or {}
    stages = manifest.get("stages") or {}
    if after is not None:  # not its areas: a stage command's default is "all", and it
        # ran on the areas the store holds
        stage_params = (stages.get(after) or {}).get("params") or {}
        params = {**params, **{k: v for k, v in stage_params.items() if k != "areas"}}
    mirror = _mirror_read_since_fetch(stages, after)
    if mirror:  # the mirror the tables were made from, not raw/'s files: build from it
        params = {**params, "source_dir": mirror}
    if not params.get("source_dir"):
        params = {**params, "source_dir": _fetched_from_dir(store.root)}
    return params


def _mirror_read_since_fetch(stages: Mapping[str, Any], after: str | None) -> str | None:
    """The mirror the latest stage up to ``after`` (all: None) that read one in place of
    raw/ read (``source_dir``: `unpack --source`), unless fetch ran later: the tables after
    it are made from that mirror's files, so a build from raw/'s mirror would redo them
    (after `unpack --source OTHER`, the hint of a later stage command too names OTHER)."""
    names = STAGES if after not in STAGES else STAGES[: STAGES.index(after) + 1]
    since = str((stages.get(FETCH) or {}).get("ran_at") or "")
    mirror, ran_at = None, since
    for name in names:
        entry = stages.get(name) or {}
        at = str(entry.get("ran_at") or "")
        if entry.get("source_dir") and at >= ran_at:  # ran_at is to the second
            mirror, ran_at = entry["source_dir"], at
    return mirror


def recorded_settings(
    out: str | os.PathLike, settings: Settings, *, after: str | None = None
) -> Settings:
    """``settings`` with what the store records for areas, bin width, waveforms, norm ...
    (see :func:`recorded_parameters`); the mirror is left out: stages after fetch read
    ``raw/``."""
    params = recorded_parameters(out, after=after)
    given = {
        f.name: params[f.name]
        for f in fields(Settings)
        if params.get(f.name) is not None and f.name != "source_dir"
    }
    if "areas" in given:
        given["areas"] = tuple(given["areas"])
    return replace(settings, **given)


def _manifest_or_empty(store: Store) -> dict:
    try:
        return store.read_manifest() or {}
    except ValueError:
        return {}


def _stage_states(
    root: Path, chosen: list[Stage], ctx: Context, forced: Mapping[str, str]
) -> list[dict[str, Any]]:
    """Per stage: up to date / will run / may run (an upstream reruns; skipped if it
    produces the same files)."""
    rows = []
    rerun_tables: dict[str, str] = {}  # table (or "raw") -> the stage that rewrites it
    for stage in chosen:
        record = ctx.records.get(stage.name) or {}
        if stage.missing:
            rows.append({"stage": stage.name, "state": "not available", "reasons": [stage.missing]})
            continue
        d = decide(root, stage, ctx, forced=forced.get(stage.name))
        reads = (RAW if is_raw(r) else r for r in (*stage.spec.reads, *stage.spec.lists))
        upstream = sorted({rerun_tables[r] for r in reads if r in rerun_tables})
        if d.run:
            state = "will run"
        elif upstream:
            state = "may run"
        else:
            state = "up to date"
        reasons = list(d.reasons)
        if state == "may run":
            verb = "writes" if len(upstream) == 1 else "write"
            reasons = [f"if {', '.join(upstream)} {verb} different files"]
        if state != "up to date":
            for t in stage.spec.writes:
                rerun_tables[t] = stage.name
            if stage.spec.writes_raw:
                rerun_tables[RAW] = stage.name
        rows.append(
            {
                "stage": stage.name,
                "state": state,
                "reasons": reasons,
                "ran_at": record.get("ran_at"),
                "params": record.get("params"),
                "inputs": len(record.get("inputs") or {}),
                "outputs": len(record.get("outputs") or {}),
            }
        )
    return rows


# ====================================================================== verify


def rebuild_command(out: str | os.PathLike, *, after: str | None = None) -> str:
    """The ``nat4etl build`` command line that rebuilds ``out`` with the parameters its
    manifest records (its areas, bin width, waveforms, ...), not the config's defaults;
    ``after``: those the stage of that name last ran with win (a stage command's)."""
    return build_command(out, recorded_parameters(out, after=after))


def build_command(out: str | os.PathLike, params: Mapping, *, wav: bool | None = None) -> str:
    """``nat4etl build --out out`` with ``params`` (:func:`store_parameters`) as flags,
    shell-quoted. ``wav``: True adds ``--wav``, False ``--no-wav``; None (default) the one
    ``params`` records (explicit either way: a config file's ``wav`` must not change it)."""
    words = ["nat4etl", "build", "--out", str(out)]
    areas = params.get("areas")
    if areas:
        words += ["--area", areas[0] if len(areas) == 1 else "all"]
    flags = {"dt_ms": "--dt-ms", "audio_fs_hz": "--audio-fs", "norm": "--norm"}
    for key, flag in flags.items():
        if params.get(key) is not None:
            words += [
                flag,
                f"{params[key]:g}" if isinstance(params[key], float) else str(params[key]),
            ]
    if wav is None:
        wav = params.get("wav")
    if wav is not None:
        words.append("--wav" if wav else "--no-wav")
    if params.get("source_dir"):
        words += ["--source", str(params["source_dir"])]
    return shlex.join(words)  # pastes into a shell as is, spaces in paths included


def _fetched_from_dir(root: Path) -> str | None:
    """The local mirror fetch copied every file from (``fetch.json``'s file URLs), or None
    when any came over the network: the build records only what it ran on, ``raw/``."""
    import json
    from urllib.parse import unquote, urlparse

    try:
        files = json.loads((root / RAW / "fetch.json").read_text())["files"]
        urls = [urlparse(str(e["source_url"])) for e in files]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    dirs = {str(Path(unquote(u.path)).parent) for u in urls if u.scheme == "file"}
    return dirs.pop() if len(dirs) == 1 and all(u.scheme == "file" for u in urls) else None


def verify(out: str | os.PathLike) -> list[str]:
    """Re-hash every table and raw file against the manifest and the stage records.

    Returns the differences, one line each, naming the file (empty: the store verifies).
    Read-only and lock-free: it checks the generation published now.
    """
    out = store_path(out)
    if not (out / MANIFEST).is_file():
        return [f"{out}: no {MANIFEST}; not a complete nat4etl store"]
    snap = open_snapshot(out)
    try:
        try:
            manifest = snap.read_manifest() or {}
        except ValueError as err:
            return [f"{MANIFEST}: not valid JSON ({err})"]
        return _verify_root(snap.root, manifest)
    finally:
        snap.close()


def _verify_root(root: Path, manifest: dict) -> list[str]:
    expected: dict[str, dict[str, str]] = {}  # path -> {claimant: digest}
    sizes: dict[str, int] = {}
    problems = []
    for t in manifest.get("tables", []):
        digest = manifest_digest(t)
        if digest is None:
            problems.append(f"{t['path']}: listed in {MANIFEST} without a digest")
        else:
            expected.setdefault(t["path"], {})[MANIFEST] = digest
        if "size_bytes" in t:
            sizes[t["path"]] = t["size_bytes"]
    for s in manifest.get("sources", []):
        expected.setdefault(f"{RAW}/{s['name']}", {})[MANIFEST] = f"md5:{s['md5']}"
        sizes[f"{RAW}/{s['name']}"] = s["size_bytes"]
    for name, record in read_records(root).items():
        for rel, state in (record.get("outputs") or {}).items():
            expected.setdefault(rel, {})[f"_stages/{name}.json"] = state.get("digest")
            sizes.setdefault(rel, state.get("size_bytes"))
    for rel in sorted(expected):
        problems += _verify_file(root, rel, expected[rel], sizes.get(rel))
    for rel in all_table_files(root):
        if rel not in expected:
            problems.append(f"{rel}: not in {MANIFEST} (a table nothing recorded)")
    problems += _verify_rows(root, manifest)
    return problems


def _verify_file(root: Path, rel: str, claims: dict[str, str], size: int | None) -> list[str]:
    path = root / rel
    if not path.is_file():
        return [f"{rel}: missing (listed in {', '.join(sorted(claims))})"]
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        return [f"{rel}: size {got_size} bytes, expected {size}"]
    by_digest: dict[str, list[str]] = {}  # expected digest -> who says so
    for claimant, digest in sorted(claims.items()):
        by_digest.setdefault(str(digest), []).append(claimant)
    problems = []
    got: dict[str, str] = {}
    for digest, claimants in sorted(by_digest.items()):
        algo, _, want = digest.partition(":")
        if algo not in got:
            try:
                got[algo] = file_digest(path, algo)
            except ValueError:  # hashlib knows no such algorithm
                problems.append(f"{rel}: unknown digest {digest!r} ({', '.join(claimants)})")
                continue
        if got[algo] != digest:
            problems.append(
                f"{rel}: {algo} {got[algo].partition(':')[2]}, expected {want} "
                f"({', '.join(claimants)})"
            )
    return problems


def _verify_rows(root: Path, manifest: dict) -> list[str]:
    """Row counts from each file's footer (after the digests, so the files are intact)."""
    tables = [t for t in manifest.get("tables", []) if (root / t["path"]).is_file()]
    if not tables:
        return []
    from nat4etl.store import table_file_rows

    problems = []
    for t in tables:
        try:
            rows = table_file_rows(root / t["path"])
        except Exception as err:  # a corrupt footer: name the file, whatever pyarrow says
            kind = "Arrow IPC" if t["path"].endswith(".arrow") else "Parquet"
            problems.append(f"{t['path']}: unreadable {kind} ({err})")
            continue
        if rows != t.get("rows"):
            problems.append(f"{t['path']}: {rows} rows, {MANIFEST} says {t.get('rows')}")
    return problems

"""What a finished build holds, in a few lines: counts and missing pairs, all from the tables.

Used by `nat4etl build` (and so `make run`) to end with something a person can check at a
glance. Every number is counted from the store; the published dataset sizes are checks,
never sources.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class AreaSummary:
    area: str
    n_cells: int
    n_auditory: int
    n_stims_est: int
    n_stims_val: int
    n_stims_other: int
    n_sites: int
    match_counts: dict[str, int]
    #: (stim, cell) pairs with no response at all, per subset
    missing_pairs: dict[str, int]
    #: cells with no val trial for any val sound
    cells_without_val: int
    n_report_rows: int
    #: units with spike times before 0 (the responses metadata; not in the report table)
    n_units_spikes_before_0: int = 0


def summarize(out: str | Path) -> list[AreaSummary]:
    import polars as pl

    from nat4etl.store import open_snapshot

    store = open_snapshot(Path(out))
    try:
        result = []
        for area in store.areas("cells"):
            cells = pl.from_arrow(store.read_table("cells", area=area))
            stims = pl.from_arrow(store.read_table("stims", area=area))
            pairs = pl.from_arrow(
                store.read_table("responses", area=area, columns=["stim", "cell"])
            ).unique()
            report = store.read_table("report", area=area)
            trials = pl.from_arrow(store.read_table("trials", area=area, columns=["site"]))
            summary = _area_summary(area, cells, stims, pairs, report.num_rows, trials)
            early = store.table_metadata("responses", area).get(SPIKES_BEFORE_0) or []
            result.append(replace(summary, n_units_spikes_before_0=len(early)))
        return result
    finally:
        store.close()


def _area_summary(area, cells, stims, pairs, n_report_rows, trials) -> AreaSummary:
    import polars as pl

    by_subset = {s: stims.filter(pl.col("subset") == s) for s in ("est", "val", "other")}
    missing = {}
    for subset, these in by_subset.items():
        present = pairs.join(these.select("stim"), on="stim").height
        missing[subset] = these.height * cells.height - present
    val_pairs = pairs.join(by_subset["val"].select("stim"), on="stim")
    cells_with_val = val_pairs["cell"].n_unique()
    matches = cells.group_by("match").len().sort("match")
    return AreaSummary(
        area=area,
        n_cells=cells.height,
        n_auditory=int(cells["auditory"].fill_null(False).sum()),
        n_stims_est=by_subset["est"].height,
        n_stims_val=by_subset["val"].height,
        n_stims_other=by_subset["other"].height,
        n_sites=trials["site"].n_unique(),
        match_counts=dict(zip(matches["match"], matches["len"], strict=True)),
        missing_pairs=missing,
        cells_without_val=cells.height - cells_with_val,
        n_report_rows=n_report_rows,
    )


def render(out: str | Path, summaries: list[AreaSummary]) -> list[str]:
    lines = []
    for s in summaries:
        matched = ", ".join(f"{n} {kind}" for kind, n in s.match_counts.items())
        lines.append(
            f"{s.area}: {s.n_cells} units ({s.n_auditory} auditory; matched to site files: "
            f"{matched}), {s.n_stims_est} est + {s.n_stims_val} val sounds"
            + (f" + {s.n_stims_other} other" if s.n_stims_other else "")
            + f", {s.n_sites} sites"
        )
        lines.append(
            f"{s.area}: missing (sound, unit) pairs: {s.missing_pairs['est']} est, "
            f"{s.missing_pairs['val']} val"
            + (f", {s.missing_pairs.get('other', 0)} other" if s.n_stims_other else "")
            + f"; units with no val trial: {s.cells_without_val}; "
            f"{s.n_report_rows} report row{'s' if s.n_report_rows != 1 else ''}"
            + (
                f" and {s.n_units_spikes_before_0} "
                f"unit{'s' if s.n_units_spikes_before_0 != 1 else ''} with spike times before 0"
                if s.n_units_spikes_before_0
                else ""
            )
            + f" (`nat4etl report --out {out}` lists them)"
        )
    lines.append(f"tables: {Path(out)}/<table>/area=<AREA>/part-0.parquet; read with nat4etl.open")
    return lines


def as_dicts(summaries: list[AreaSummary]) -> list[dict]:
    return [asdict(s) for s in summaries]


#: the kind `nat4etl report` lists beside the ``report`` table's: spike times before 0,
#: which rebin-sites finds (it reads the spike times; parse-epochs does not, to stay fast)
#: and records per unit in the ``responses`` metadata
SPIKES_BEFORE_0 = "spikes_before_0"


@dataclass(frozen=True)
class ReportListing:
    """What `nat4etl report` lists: ``rows`` (area, kind, subject, detail, in key order;
    a spikes_before_0 row also has its unit's metadata entry), and the (area, kind)
    pairs it could not read, each with why (``unavailable``)."""

    rows: list[dict]
    unavailable: list[dict]


def report_rows(
    out: str | Path, *, areas: list[str] | None = None, kinds: list[str] | None = None
) -> ReportListing:
    """The ``report`` rows of the store at ``out`` (parse-epochs' table) and its spike
    times before 0 (the ``responses`` metadata, per unit); only ``areas`` / ``kinds``
    when given. An area without a ``responses`` table gives an ``unavailable`` entry for
    that kind, not an error."""
    from nat4etl.errors import MissingTableError
    from nat4etl.store import open_snapshot

    store = open_snapshot(Path(out))
    try:
        held = store.areas("report")
        if not held:
            raise MissingTableError(
                f"{out} has no report table; `nat4etl build --out {out}` makes one"
            )
        rows, unavailable = [], []
        for area in held:
            if areas is not None and area not in areas:
                continue
            rows += [
                r
                for r in store.read_table("report", area=area).to_pylist()
                if kinds is None or r["kind"] in kinds
            ]
            if kinds is None or SPIKES_BEFORE_0 in kinds:
                early, why = _spikes_before_0(store, area, out)
                rows += early
                if why:
                    unavailable.append({"area": area, "kind": SPIKES_BEFORE_0, "unavailable": why})
        rows.sort(key=lambda r: (r["area"], r["kind"], r["subject"]))
        return ReportListing(rows, unavailable)
    finally:
        store.close()


def _spikes_before_0(store, area: str, out: str | Path) -> tuple[list[dict], str | None]:
    """Report rows of the units with spike times before 0, from the responses metadata
    rebin-sites wrote (the subject is site/unit id, as a unit id may be in two site
    files); or why there are none to read."""
    from nat4etl.stages.rebin_sites import SPIKES_UNCOUNTED

    if not store.has("responses", area):
        return [], f"no responses table for {area}; `nat4etl rebin-sites --out {out}` makes it"
    units = store.table_metadata("responses", area).get(SPIKES_BEFORE_0)
    if units is None:
        return [], (
            f"the responses metadata of {area} does not list them (written by an older "
            f"nat4etl); `nat4etl rebin-sites --out {out}` rewrites it"
        )
    rows = []
    for unit in units:
        n, uncounted = unit[SPIKES_BEFORE_0], unit[SPIKES_UNCOUNTED]
        detail = (
            f"{n} spike time{'s' if n != 1 else ''} before 0 in site {unit['site']}'s file, "
            "counted from the end of the site's raster, as NEMS0 counts them"
        )
        if uncounted:
            detail += (
                f", but for {uncounted} earlier than the raster is long (where NEMS0 fails): "
                "not counted"
            )
        rows.append(
            {
                "area": area,
                "kind": SPIKES_BEFORE_0,
                "subject": f"{unit['site']}/{unit['unit_id']}",
                "detail": detail,
                **unit,
            }
        )
    return rows, None


def render_report(listing: ReportListing, *, selection: str = "") -> list[str]:
    """One line per row, then the count per kind (or that there is nothing to report),
    then each kind that could not be read and why; ``selection`` names the filter the
    rows passed ("of kind X in A1"), if any."""
    rows = listing.rows
    lines = [f"{r['area']}  {r['kind']}  {r['subject']}: {r['detail']}" for r in rows]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
    if rows:
        lines.append(
            f"{len(rows)} report row{'s' if len(rows) != 1 else ''}: "
            + ", ".join(f"{k} {n}" for k, n in sorted(counts.items()))
        )
    elif selection:
        lines.append(f"no report rows {selection}")
    elif listing.unavailable:
        lines.append("no report rows among the kinds that could be read")
    else:
        lines.append("no report rows: every unit, sound and presentation lines up")
    lines += [
        f"{u['area']}  {u['kind']}: not known: {u['unavailable']}" for u in listing.unavailable
    ]
    return lines

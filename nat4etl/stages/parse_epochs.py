"""`parse-epochs`: raw epochs and unit ids -> ``stims``, ``cells``, ``trials`` and ``report``.

Everything here is interpretation of tables ``unpack`` wrote verbatim, with one file read
here: ``wav.zip``'s member list, when the store has it (the sounds' wav names are checked
against it). Listing it here, not in unpack, keeps a later wav.zip (a ``--no-wav`` store
built ``--wav``) from rerunning unpack and every stage after it (see :mod:`nat4etl.stages`).
Choices, each stated once:

- A recording's epochs are the union of its signals' epoch tables, exact duplicates
  dropped, in time order (start, then file order): NEMS0's ``Recording.epochs``.
- ``stims``: est (``^STIM_cat``) then val (``^STIM_00cat``) then other, each in order of
  first appearance in the population recording; ids count from 0 in that order.
- ``cells``: population ``resp`` channel order; units match the per-site ids exactly, else
  on the parsed (site, electrode, unit) numbers (``canonical``), else ``none``.
- ``trials``: the ``STIM_`` presentations of every site file (est ones included; from
  its ``resp`` signal's own epoch table, which is what NEMS0 extracts from) that
  NEMS0's ``extract_epoch`` returns: bounds snapped to the site's sample grid (as the old
  loader snapped them), those starting before 0 left out, then overlapping repeats of
  one sound dropped (``fix_overlap='first'``; the old loader kept them). Each one left
  out is a report row.
- JSON ``segments`` (the data is the concatenation of these spans of the original time
  base) are applied where they change anything, as ``extract_epoch`` applies them: a
  presentation must lie within one span, and its bounds become positions in the data
  (:func:`nat4etl.binning.segment_indices`); ``trials.start_s``/``end_s`` and
  ``stims.pop_start_s`` are then those positions in seconds. NEMS0's default, one span
  from 0 past every epoch, changes nothing and leaves every time as written. Only a
  rasterized signal's segments count: NEMS0 loads none for a PointProcess (a site's
  ``resp``), and its raster gets the default ones; those are reported, not applied.
- Sounds are est or val by name, as the old loader classes them; the population's
  ``mask_est`` (row 0 only, as NEMS0 reads it: 1 on est data, 0 on val data) is a check
  on that, and a sound whose own epoch it contradicts is a report row.
- A site's Pre/PostStimSilence epochs are read only to check them against the
  population's (where the sound sits in a trial); trials are cut at the STIM_ bounds.
- Anything that does not line up becomes a ``report`` row, never a silent drop.
"""

from __future__ import annotations

import bisect
import json
import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nat4etl import binning, nat4, schema
from nat4etl.errors import InputMismatch
from nat4etl.formats import nems0
from nat4etl.stages import CONTRACTS

#: cells columns that a carried-through pred_correlation column must not overwrite
_PRED_PREFIX = "pred_"
_POPULATION = "population"
_SITE = "site"
RESP = "resp"
MASK_EST = "mask_est"


# ============================================================================ inputs
class Epoch(NamedTuple):
    """One epoch of a recording (a tuple: ~100 k of them are made per build, and a frozen
    dataclass took 0.3 s of that)."""

    name: str
    start_s: float
    end_s: float


@dataclass
class AreaInputs:
    """What parse-epochs needs of one area, already out of Arrow."""

    pop_epochs: list[Epoch]
    stim_fs_hz: float
    resp_chans: list[str]
    #: site -> epochs of that site's recording, in time order
    site_epochs: dict[str, list[Epoch]]
    #: (site, unit id as written) of every unit of a site's resp signal (what rebin-sites
    #: bins; NEMS0's ``rec['resp']``)
    site_units: list[tuple[str, str]]
    #: site -> sampling rate of its spike times (its resp signal); bounds snap to it
    site_fs_hz: dict[str, float] = field(default_factory=dict)
    #: recording/signal -> its JSON segments (seconds), where the JSON has any
    segments: dict[str, np.ndarray] = field(default_factory=dict)
    #: recording/signal -> its signal type, for the signals in ``segments``: NEMS0 loads
    #: JSON segments into a RasterizedSignal only (nems0-format.md section 3)
    segment_signal_types: dict[str, str] = field(default_factory=dict)
    #: the population recording's name, and each site's recording
    pop_recording: str = ""
    site_recordings: dict[str, str] = field(default_factory=dict)
    pred_correlation: pa.Table | None = None
    #: base names in wav.zip; None when wav.zip was not in the source
    wav_names: list[str] | None = None
    #: (``file:member``, why it was not read) of the members unpack skipped, and wav.zip's
    skipped_members: list[tuple[str, str]] = field(default_factory=list)
    #: (recording, name, start_s, end_s) of the STIM_ epochs with a time that is missing
    #: or not finite: left out as extract_epoch leaves them out, and reported
    unusable_stim_epochs: list[tuple] = field(default_factory=list)
    #: site -> PreStimSilence/PostStimSilence -> (n, 2) start and end seconds, from the
    #: site's resp epoch table (as its trials are), to check them against the population's
    site_silences: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    #: row 0 of the population's ``mask_est`` and its rate; None when it has none
    mask_est: np.ndarray | None = None
    mask_fs_hz: float | None = None
    #: samples in the population's stim signal (resp has as many: unpack checks); None
    #: when its JSON and data left it unknown
    pop_n_samples: int | None = None
    #: unit id -> ``site/signal`` of the units of a site's other PointProcess signals:
    #: stored, never matched (rebin-sites bins resp only), named where a unit is unmatched
    unbinned_units: dict[str, str] = field(default_factory=dict)


@dataclass
class Report:
    """Report rows keyed by (kind, subject) so a repeat cannot make a duplicate key."""

    rows: dict[tuple[str, str], str] = field(default_factory=dict)

    def add(self, kind: str, subject: str, detail: str) -> None:
        if kind not in schema.REPORT_KINDS:  # the README's list and `report --kind` come from it
            raise ValueError(f"report kind {kind!r} is not in schema.REPORT_KINDS")
        self.rows.setdefault((kind, subject), detail)

    def kinds(self) -> Counter:
        return Counter(kind for kind, _ in self.rows)

    def table(self) -> pa.Table:
        items = sorted(self.rows.items())
        return pa.table(
            {
                "kind": pa.array([k for (k, _), _ in items], pa.string()),
                "subject": pa.array([s for (_, s), _ in items], pa.string()),
                "detail": pa.array([d for _, d in items], pa.string()),
            }
        )


def recording_epochs(rows: Iterable[tuple]) -> list[Epoch]:
    """One recording's epochs: union over signals, exact duplicates dropped, time order.

    ``rows`` are (name, start_s, end_s) of epochs-table rows in table order; rows without
    a name or finite times cannot be interpreted and are left out (they stay in
    ``epochs``).
    """
    isfinite = math.isfinite
    usable = [
        r
        for r in rows
        if r[0] is not None
        and r[1] is not None
        and r[2] is not None
        and isfinite(r[1])
        and isfinite(r[2])
    ]
    ordered = sorted(usable, key=lambda r: r[1])
    seen: set[tuple] = set()
    out = []
    for key in ordered:
        if key not in seen:
            seen.add(key)
            out.append(Epoch._make(key))
    return out


# ============================================================================ stims
@dataclass(frozen=True)
class Stim:
    stim: int
    name: str
    subset: str
    wav_name: str
    duration_s: float
    prestim_s: float
    poststim_s: float
    n_frames: int
    pop_start_s: float


def build_stims(
    pop_epochs: list[Epoch],
    *,
    stim_fs_hz: float,
    report: Report,
    segments: np.ndarray | None = None,
) -> list[Stim]:
    """Stims in est, val, other order; silences are the ones inside the first occurrence.

    With ``segments`` (the population's, when they restrict: see the module docstring) a
    sound's first occurrence is the first that ``extract_epoch`` returns, and
    ``pop_start_s`` its position in the data; a sound with none is left out, reported.
    """
    first: dict[str, Epoch] = {}
    for e in pop_epochs:
        if nat4.is_stim(e.name) and e.name not in first:
            first[e.name] = e
    placed = {name: e.start_s for name, e in first.items()}
    if segments is not None:
        placed = {}
        occurrences_of: dict[str, list[Epoch]] = {}
        for e in pop_epochs:
            if e.name in first:
                occurrences_of.setdefault(e.name, []).append(e)
        for name, occurrences in occurrences_of.items():
            kept = extracted(
                occurrences, stim_fs_hz, site=_POPULATION, report=report, segments=segments
            )
            times = _placed(kept, segments, stim_fs_hz, site=_POPULATION, report=report)
            if not times:
                report.add(
                    "stim_outside_segments",
                    name,
                    "no occurrence in the population recording lies within its JSON "
                    "segments, so extract_epoch returns none; left out",
                )
                del first[name]
                continue
            first[name], placed[name] = kept[0], times[0][0]
    silences = {n: _sorted_spans(pop_epochs, n) for n in (nat4.PRESTIM, nat4.POSTSTIM)}
    stims = []
    for subset in ("est", "val", "other"):
        for name, e in first.items():
            if nat4.stim_subset(name) != subset:
                continue
            if subset == "other":
                report.add(
                    "stim_unclassified", name, "STIM_ epoch neither ^STIM_cat nor ^STIM_00cat"
                )
            missing = [n for n in (nat4.PRESTIM, nat4.POSTSTIM) if not _has_inner(silences[n], e)]
            if missing:
                report.add(
                    "silence_missing",
                    name,
                    f"no {' or '.join(missing)} inside its population epoch; taken as 0 s "
                    "(align-wav places the wav at prestim_s)",
                )
            duration_s = e.end_s - e.start_s
            stims.append(
                Stim(
                    stim=len(stims),
                    name=name,
                    subset=subset,
                    wav_name=nat4.wav_name(name),
                    duration_s=duration_s,
                    prestim_s=_inner_length_s(silences[nat4.PRESTIM], e),
                    poststim_s=_inner_length_s(silences[nat4.POSTSTIM], e),
                    n_frames=int(round(duration_s * stim_fs_hz)),
                    pop_start_s=placed[name],
                )
            )
    return stims


def _sorted_spans(epochs: list[Epoch], name: str) -> list[tuple[float, float]]:
    return sorted((e.start_s, e.end_s) for e in epochs if e.name == name)


def _inner_length_s(spans: list[tuple[float, float]], outer: Epoch) -> float:
    """Length of the first span lying inside ``outer``; 0.0 when there is none."""
    i = bisect.bisect_left(spans, (outer.start_s, float("-inf")))
    for start_s, end_s in spans[i:]:
        if start_s > outer.end_s:
            break
        if end_s <= outer.end_s:
            return end_s - start_s
    return 0.0


def _has_inner(spans: list[tuple[float, float]], outer: Epoch) -> bool:
    """Does a span lie inside ``outer`` (as :func:`_inner_length_s` looks for one)?"""
    i = bisect.bisect_left(spans, (outer.start_s, float("-inf")))
    for start_s, end_s in spans[i:]:
        if start_s > outer.end_s:
            return False
        if end_s <= outer.end_s:
            return True
    return False


def stims_table(stims: list[Stim]) -> pa.Table:
    return pa.Table.from_pylist([s.__dict__ for s in stims], schema=schema.STIMS.schema)


# ============================================================================ trials
@dataclass(frozen=True)
class Trial:
    site: str
    stim: int
    trial: int
    order: int
    start_s: float
    end_s: float


def build_trials(
    site_epochs: dict[str, list[Epoch]],
    stims: list[Stim],
    *,
    report: Report,
    fs_hz: dict[str, float] | None = None,
    segments: dict[str, np.ndarray] | None = None,
) -> list[Trial]:
    """The STIM_ presentations per site that ``extract_epoch`` returns (`extracted`):
    ``order`` counts every presentation of the site, ``trial`` the kept ones per stim.
    A site in ``segments`` (its resp's, when they restrict) has every sound extracted
    and placed in its data (:func:`_placed`)."""
    ids = {s.name: s.stim for s in stims}
    trials = []
    for site in sorted(site_epochs):
        presentations = [e for e in site_epochs[site] if nat4.is_stim(e.name)]
        fs = (fs_hz or {}).get(site)
        spans = (segments or {}).get(site)
        if spans is not None:
            odd = {e.name for e in presentations}
        else:
            odd = _names_to_extract(presentations, fs)
        seen: Counter = Counter()
        for order, e in enumerate(presentations):
            if e.name not in ids:
                report.add(
                    "site_stim_not_in_population",
                    f"{site}/{e.name}",
                    "STIM_ epoch in the site file but not in the population recording",
                )
            elif e.name not in odd:  # kept as it is: extract_epoch would return it
                trials.append(Trial(site, ids[e.name], seen[e.name], order, e.start_s, e.end_s))
                seen[e.name] += 1
        if not odd & ids.keys():
            continue
        order_of = {e: i for i, e in enumerate(presentations)}
        first_at = {}  # (name, start) -> order, for an interval sorting paired anew
        for i, e in enumerate(presentations):
            first_at.setdefault((e.name, e.start_s), i)
        for name in sorted(odd & ids.keys()):
            occurrences = [e for e in presentations if e.name == name]
            kept = extracted(occurrences, fs, site=site, report=report, segments=spans)
            times = [(e.start_s, e.end_s) for e in kept]
            if spans is not None:
                times = _placed(kept, spans, fs, site=site, report=report)
            for trial, (e, (start_s, end_s)) in enumerate(zip(kept, times, strict=False)):
                order = order_of.get(e, first_at.get((name, e.start_s), len(presentations)))
                trials.append(Trial(site, ids[name], trial, order, start_s, end_s))
        trials.sort(key=lambda t: (t.site, t.start_s, t.order))  # time order, as before
    return trials


def _names_to_extract(presentations: list[Epoch], fs_hz: float | None) -> set[str]:
    """Names whose presentations `extracted` would change: one starts before 0 on the
    sample grid, or overlaps an earlier one, or ends before it (sorting would re-pair
    them). Checked for all names at once; usually none (a site has ~4 k presentations)."""
    if not presentations:
        return set()
    codes: dict[str, int] = {}
    code = np.array([codes.setdefault(e.name, len(codes)) for e in presentations])
    bounds = _snapped(presentations, fs_hz)
    by_name = np.lexsort((bounds[:, 0], code))  # stable: file order among equal starts
    code, start, end = code[by_name], bounds[by_name, 0], bounds[by_name, 1]
    same = code[1:] == code[:-1]
    odd = start < 0
    odd[1:] |= same & ((start[1:] < end[:-1]) | (end[1:] < end[:-1]))
    names = list(codes)
    return {names[c] for c in np.unique(code[odd])}


def _snapped(epochs: list[Epoch], fs_hz: float | None) -> np.ndarray:
    """(n, 2) start and end seconds on the sample grid, as NEMS0's ``get_epoch_bounds``
    puts them: ``np.round(b * fs) / fs`` (half to even); as written without a rate."""
    bounds = np.array([(e.start_s, e.end_s) for e in epochs], dtype=np.float64).reshape(-1, 2)
    return np.round(bounds * fs_hz) / fs_hz if fs_hz else bounds


def extracted(
    occurrences: list[Epoch],
    fs_hz: float | None,
    *,
    site: str,
    report: Report,
    segments: np.ndarray | None = None,
) -> list[Epoch]:
    """What ``RasterizedSignal.extract_epoch(name)`` keeps of one sound's presentations,
    in time order (nems0-format.md section 4).

    Bounds snap to the sample grid (``np.round(b * fs) / fs``, half to even); 'exclude'
    drops a presentation that then starts before 0; ``fix_overlap='first'`` sorts the
    starts and the ends separately and keeps each interval that starts at or after the
    end of the last one kept (identical repeats go, abutting ones stay). A kept interval
    keeps its presentation's own times; one that sorting paired anew (only when repeats
    of unequal length overlap out of order) gets the snapped bounds. Without a sampling
    rate nothing is snapped. With ``segments`` 'exclude' keeps a presentation only if it
    then lies within one of them (ends included), not merely starts at or after 0.
    """
    bounds = _snapped(occurrences, fs_hz)
    if segments is not None:
        inside = binning.within_segments(bounds, segments)
        for e, ok in zip(occurrences, inside.tolist(), strict=True):
            if not ok:
                report.add(
                    "presentation_outside_segments",
                    f"{site}/{e.name}@{e.start_s:g}",
                    "not within any span of the signal's JSON segments on the sample "
                    "grid; left out, as extract_epoch's boundary_mode='exclude' does",
                )
        occurrences = [e for e, ok in zip(occurrences, inside.tolist(), strict=True) if ok]
        bounds = bounds[inside]
    raw_of: dict[tuple[float, float], list[Epoch]] = {}
    for e, (start, end) in zip(occurrences, bounds.tolist(), strict=True):
        if start < 0:
            report.add(
                "presentation_before_recording",
                f"{site}/{e.name}@{e.start_s:g}",
                f"starts at {start:g} s on the site's sample grid, before the recording; "
                "left out, as extract_epoch's boundary_mode='exclude' does",
            )
            continue
        raw_of.setdefault((start, end), []).append(e)
    inside = bounds[bounds[:, 0] >= 0]
    kept: list[Epoch] = []
    last_end = -math.inf
    for start, end in np.sort(inside, axis=0).tolist():
        same = raw_of.get((start, end))
        if start < last_end:
            dropped = same.pop(0) if same else Epoch(occurrences[0].name, start, end)
            report.add(
                "overlapping_presentation",
                f"{site}/{dropped.name}@{dropped.start_s:g}",
                f"starts before the previous presentation ends ({last_end:g} s); left out, "
                "as extract_epoch's fix_overlap='first' does",
            )
            continue
        kept.append(same.pop(0) if same else Epoch(occurrences[0].name, start, end))
        last_end = end
    return kept


def _placed(
    kept: list[Epoch], segments: np.ndarray, fs_hz: float | None, *, site: str, report: Report
) -> list[tuple[float, float]]:
    """(start_s, end_s) of each of ``kept`` (time order, as `extracted` returns them) as its
    position in data made of ``segments`` concatenated (NEMS0 ``get_epoch_indices``); the
    list stops where that loop does, and every presentation it never reaches is reported."""
    if not fs_hz:  # no rate, no sample positions: as written
        return [(e.start_s, e.end_s) for e in kept]
    bounds = _snapped(kept, fs_hz)
    indices = binning.segment_indices(bounds, segments, fs_hz)
    for e in kept[len(indices) :]:
        report.add(
            "presentation_not_placed",
            f"{site}/{e.name}@{e.start_s:g}",
            "extract_epoch's loop over the JSON segments ended before it (an earlier "
            "presentation lay beyond the segment it had reached); left out, as NEMS0 does",
        )
    return [(lb / fs_hz, ub / fs_hz) for lb, ub in indices]


def report_repetitions(
    trials: list[Trial], stims: list[Stim], *, report: Report, sites: Iterable[str] = ()
) -> None:
    """Flag (site, sound) repetition counts that differ from the subset's modal count; a
    val sound a site (of ``sites``, or with trials) never presented counts 0 there."""
    counts = Counter((t.site, t.stim) for t in trials)
    by_id = {s.stim: s for s in stims}
    for subset in ("est", "val"):
        pairs = {k: n for k, n in counts.items() if by_id[k[1]].subset == subset}
        if not pairs:
            continue
        modal = Counter(pairs.values()).most_common(1)[0][0]
        if subset == "val":  # the only single trials of a val sound are the site files'
            for site in set(sites) | {t.site for t in trials}:
                for s in stims:
                    if s.subset == "val":
                        pairs.setdefault((site, s.stim), 0)
        for (site, stim), n in sorted(pairs.items()):
            if n != modal:
                report.add(
                    "repetition_count",
                    f"{site}/{by_id[stim].name}",
                    f"{n} repetitions, {subset} sounds have {modal} at most sites",
                )


def report_lengths(
    trials: list[Trial],
    stims: list[Stim],
    *,
    report: Report,
    stim_fs_hz: float,
    site_fs_hz: dict[str, float] | None = None,
) -> None:
    """Presentations whose length differs from their sound's population epoch by half a
    population frame or more, or (with ``site_fs_hz``) by a sample once both bounds are
    snapped to the site's grid, as they are cut: rebin-sites cuts as many bins from every
    start, so the end of a longer one is not counted and a shorter one is NaN-padded (a
    presentation 1 ms short at 1 kHz loses its last 10 ms bin; the old loader failed)."""
    duration = {s.stim: s.duration_s for s in stims}
    frames = {s.stim: s.n_frames for s in stims}
    name = {s.stim: s.name for s in stims}
    tolerance_s = 0.5 / stim_fs_hz if stim_fs_hz else 0.0
    # snapped lengths of all trials at once (tens of thousands at full scale)
    fs = np.array([(site_fs_hz or {}).get(t.site, np.nan) for t in trials], np.float64)
    bounds = np.array([(t.start_s, t.end_s) for t in trials], np.float64).reshape(-1, 2)
    with np.errstate(invalid="ignore"):
        n_samples = np.round(bounds[:, 1] * fs) - np.round(bounds[:, 0] * fs)
        want = np.round(np.array([frames[t.stim] for t in trials]) * fs / (stim_fs_hz or np.nan))
    off_grid = np.isfinite(want) & (n_samples != want)
    for i, t in enumerate(trials):
        length_s = t.end_s - t.start_s
        detail = None
        if abs(length_s - duration[t.stim]) >= tolerance_s:
            detail = f"{length_s:g} s long, the population epoch {duration[t.stim]:g} s"
        elif off_grid[i]:
            detail = (
                f"{n_samples[i]:.0f} samples at {fs[i]:g} Hz once its bounds are snapped to "
                f"the sample grid, the population epoch {want[i]:.0f}"
            )
        if detail is not None:
            report.add(
                "presentation_length",
                f"{t.site}/{name[t.stim]}@{t.start_s:g}",
                f"{detail}: binned from its start, cut or NaN-padded to the population's length",
            )


def report_site_silences(
    trials: list[Trial],
    stims: list[Stim],
    silences: dict[str, dict[str, np.ndarray]],
    *,
    report: Report,
    stim_fs_hz: float,
    skip_sites: Iterable[str] = (),
) -> None:
    """Sites whose presentations start (end) with a Pre- (Post-)StimSilence of another
    length than the sound's population epoch has, by half a population frame or more (a
    missing one counts as 0 s, as it does for the population): in those trials the sound
    sits elsewhere than in the population's spectrogram and wav placement. One row per
    site and silence, with counts. ``skip_sites``: trials placed by JSON segments, whose
    times are positions in the data, not the epoch times the silences have."""
    tolerance_s = 0.5 / stim_fs_hz if stim_fs_hz else 1e-9
    expected = {
        nat4.PRESTIM: np.array([s.prestim_s for s in stims]),
        nat4.POSTSTIM: np.array([s.poststim_s for s in stims]),
    }
    names = [s.name for s in stims]
    by_site: dict[str, list[Trial]] = {}
    for t in trials:
        by_site.setdefault(t.site, []).append(t)
    skip = set(skip_sites)
    for site, site_trials in sorted(by_site.items()):
        if site in skip:
            continue
        stim = np.array([t.stim for t in site_trials])
        for name, at_end in ((nat4.PRESTIM, False), (nat4.POSTSTIM, True)):
            anchor = np.array([t.end_s if at_end else t.start_s for t in site_trials])
            want = expected[name][stim]
            spans = silences.get(site, {}).get(name)
            length = _silence_lengths(spans, anchor, want, at_end=at_end, tolerance_s=tolerance_s)
            bad = np.flatnonzero(np.abs(np.nan_to_num(length) - want) >= tolerance_s)
            if len(bad) == 0:
                continue
            missing = int(np.isnan(length[bad]).sum())
            found = length[bad][~np.isnan(length[bad])]
            parts = []
            if missing:
                parts.append(f"{missing} without one at their {'end' if at_end else 'start'}")
            if len(found):
                lengths = ", ".join(f"{x:g}" for x in np.unique(np.round(found, 6))[:3])
                parts.append(f"{len(found)} with one of {lengths} s")
            first = site_trials[int(bad[0])]
            usual = ", ".join(f"{x:g}" for x in np.unique(np.round(want[bad], 6))[:3])
            report.add(
                "site_silence_length",
                f"{site}/{name}",
                f"{len(bad)} of {len(site_trials)} presentations differ from the population's "
                f"{usual} s ({'; '.join(parts)}), first {names[first.stim]}@{first.start_s:g}: "
                "the sound sits elsewhere in those trials than in the spectrogram",
            )


def _silence_lengths(
    spans: np.ndarray | None,
    anchor_s: np.ndarray,
    want_s: np.ndarray,
    *,
    at_end: bool,
    tolerance_s: float,
) -> np.ndarray:
    """Length of the silence starting (``at_end``: ending) at each anchor time, within
    the tolerance; of several there (a trial's own silence beside the sound's), the one
    nearest ``want_s``; NaN where there is none."""
    out = np.full(len(anchor_s), np.nan)
    if spans is None or len(spans) == 0:
        return out
    keys = spans[:, 1] if at_end else spans[:, 0]
    order = np.argsort(keys, kind="stable")
    keys, lengths = keys[order], (spans[:, 1] - spans[:, 0])[order]
    lo = np.searchsorted(keys, anchor_s - tolerance_s, side="right")
    hi = np.searchsorted(keys, anchor_s + tolerance_s, side="left")
    one = hi - lo == 1
    out[one] = lengths[lo[one]]
    for i in np.flatnonzero(hi - lo > 1):  # rare: pick the best of the few
        near = lengths[lo[i] : hi[i]]
        out[i] = near[np.argmin(np.abs(near - want_s[i]))]
    return out


def report_mask_est(
    stims: list[Stim], mask_est: np.ndarray, *, fs_hz: float, report: Report
) -> None:
    """Sounds whose population epoch ``mask_est`` puts in the other subset, wholly or in
    part: an est sound should have it nonzero on every sample (NEMS0 keeps est data where
    it is true), a val sound zero on every one. Sounds stay classed by name."""
    want_true = {"est": True, "val": False}
    for s in stims:
        if s.subset not in want_true:
            continue
        lb, ub = (
            int(b)
            for b in np.round(np.array([s.pop_start_s, s.pop_start_s + s.duration_s]) * fs_hz)
        )
        seen = mask_est[max(lb, 0) : max(ub, 0)]
        n = ub - lb
        wrong = int(np.count_nonzero(seen == 0) if want_true[s.subset] else np.count_nonzero(seen))
        beyond = n - len(seen)
        if wrong == 0 and beyond == 0:
            continue
        parts = []
        if wrong:
            value = 0 if want_true[s.subset] else 1
            parts.append(f"mask_est is {value} on {wrong} of its {n} samples")
        if beyond:
            parts.append(f"mask_est ({len(mask_est)} samples) misses {beyond} of its {n}")
        report.add(
            "mask_est_disagrees",
            s.name,
            f"a{'n' if s.subset == 'est' else ''} {s.subset} sound by its name, but "
            f"{' and '.join(parts)} (row 0, from {lb}); kept as {s.subset}",
        )


def report_population_extent(
    stims: list[Stim], *, n_samples: int, fs_hz: float, report: Report
) -> None:
    """Sounds whose population epoch runs past the end of the population's data: their
    spectrogram and est responses are NaN-padded there (NEMS0 extract_epoch), which the
    values alone would not tell from a unit not recorded."""
    starts = binning.epoch_samples(np.array([s.pop_start_s for s in stims]), fs_hz)
    for s, start in zip(stims, starts.tolist(), strict=True):
        beyond = start + s.n_frames - max(n_samples, start)
        if beyond > 0:
            report.add(
                "population_epoch_past_data",
                s.name,
                f"its population epoch (frames {start}-{start + s.n_frames}) runs {beyond} of "
                f"its {s.n_frames} frames past the population's {n_samples} samples: NaN-padded "
                "in its spectrogram and est responses",
            )


def trials_table(trials: list[Trial]) -> pa.Table:
    return pa.Table.from_pylist([t.__dict__ for t in trials], schema=schema.TRIALS.schema)


def val_trials_per_site(trials: list[Trial], stims: list[Stim]) -> Counter:
    val = {s.stim for s in stims if s.subset == "val"}
    return Counter(t.site for t in trials if t.stim in val)


# ============================================================================ cells
@dataclass
class UnitMatch:
    site_unit_id: str | None
    site: str | None
    match: str  # exact | canonical | none


def match_units(cell_ids: list[str], site_units: list[tuple[str, str]]) -> list[UnitMatch]:
    """Exact id first, then the parsed (site, electrode, unit) key (TNC ``012`` == ``12``).

    An id in several site files matches the one of the site the id names (rebin-sites
    bins a cell at that site), else the first."""
    exact: dict[str, list[str]] = {}
    canonical = {}
    for site, unit_id in site_units:
        exact.setdefault(unit_id, []).append(site)
        key = nat4.canonical_unit_key(unit_id)
        if key is not None:
            canonical.setdefault(key, (site, unit_id))
    out = []
    for cell_id in cell_ids:
        if cell_id in exact:
            sites = exact[cell_id]
            own = nat4.site_of_unit(cell_id)
            out.append(UnitMatch(cell_id, own if own in sites else sites[0], "exact"))
            continue
        key = nat4.canonical_unit_key(cell_id)
        if key is not None and key in canonical:
            site, unit_id = canonical[key]
            out.append(UnitMatch(unit_id, site, "canonical"))
        else:
            out.append(UnitMatch(None, None, "none"))
    return out


def report_unit_matches(
    cell_ids: list[str],
    matches: list[UnitMatch],
    site_units: list[tuple[str, str]],
    sites: Iterable[str],
    *,
    report: Report,
    unbinned: dict[str, str] | None = None,
) -> None:
    """Population units without site data, site units without a population unit, and
    site files none of whose units are in the population. ``unbinned``: unit id ->
    ``site/signal`` of site units outside a resp signal, named where such a unit is."""
    elsewhere = {}
    for unit_id, where in (unbinned or {}).items():
        elsewhere.setdefault(unit_id, where)
        if (key := nat4.canonical_unit_key(unit_id)) is not None:
            elsewhere.setdefault(key, where)
    for cell_id, m in zip(cell_ids, matches, strict=True):
        if m.match == "none":
            where = elsewhere.get(cell_id) or elsewhere.get(nat4.canonical_unit_key(cell_id))
            detail = "no per-site unit with this id"
            if where:
                detail += f" in a site's resp ({where} has it: only resp is binned)"
            report.add("unit_without_site_data", cell_id, detail)
    used = {(m.site, m.site_unit_id) for m in matches if m.match != "none"}
    used_at = {m.site_unit_id: m.site for m in matches if m.match != "none"}
    matched_sites = {m.site for m in matches if m.match != "none"}
    unmatched: dict[str, list[str]] = {}
    for site, unit_id in site_units:
        if (site, unit_id) in used:
            continue
        if unit_id in used_at:
            report.add(
                "site_unit_duplicate_id",
                f"{site}/{unit_id}",
                f"the population unit with this id is matched at site {used_at[unit_id]}; "
                "this copy is not used",
            )
        else:
            unmatched.setdefault(unit_id, []).append(site)
    for unit_id, in_sites in unmatched.items():
        report.add(
            "site_unit_not_in_population",
            unit_id,
            f"unit of site{'s' if len(in_sites) > 1 else ''} {', '.join(in_sites)}",
        )
    n_units = Counter(site for site, _ in site_units)
    for site in sorted(set(sites)):
        if site not in matched_sites:
            report.add(
                "site_without_population_units",
                site,
                f"{n_units[site]} units in the site file, none in the population recording",
            )


def build_cells(
    cell_ids: list[str],
    site_units: list[tuple[str, str]],
    pred_correlation: pa.Table | None,
    val_trials: Counter,
    *,
    sites: Iterable[str],
    report: Report,
    unbinned: dict[str, str] | None = None,
) -> pa.Table:
    """The cells table; pred_correlation columns other than cellid/sig_auditory follow."""
    matches = match_units(cell_ids, site_units)
    report_unit_matches(cell_ids, matches, site_units, sites, report=report, unbinned=unbinned)
    parsed = [nat4.parse_unit_id(c) for c in cell_ids]
    for cell_id, p in zip(cell_ids, parsed, strict=True):
        if p is None:
            report.add("unit_id_unparsed", cell_id, "not <site>-<electrode>-<unit>")
    pred_rows = _pred_rows_for(cell_ids, pred_correlation, report=report)
    columns = {
        "cell": pa.array(range(len(cell_ids)), pa.int32()),
        "cell_id": pa.array(cell_ids, pa.string()),
        # the site whose file holds the unit's spikes (rebin-sites bins it there, and
        # n_val_trials counts there), else the one its id names
        "site": pa.array(
            [
                m.site or (p.site if p else nat4.site_of_unit(c))
                for c, p, m in zip(cell_ids, parsed, matches, strict=True)
            ],
            pa.string(),
        ),
        "animal": pa.array([p.animal if p else None for p in parsed], pa.string()),
        "electrode": pa.array([p.electrode if p else None for p in parsed], pa.int32()),
        "unit": pa.array([p.unit if p else None for p in parsed], pa.int32()),
        "auditory": pa.array([_auditory(pred_correlation, i) for i in pred_rows], pa.bool_()),
        "site_unit_id": pa.array([m.site_unit_id for m in matches], pa.string()),
        "match": pa.array([m.match for m in matches], pa.string()),
        "n_val_trials": pa.array(
            [val_trials.get(m.site, 0) if m.site else 0 for m in matches], pa.int32()
        ),
    }
    table = pa.table(columns)
    return _append_pred_columns(table, pred_correlation, pred_rows)


def _pred_rows_for(
    cell_ids: list[str], pred: pa.Table | None, *, report: Report
) -> list[int | None]:
    """Row of pred_correlation for each cell: exact cellid, else the canonical key."""
    if pred is None:
        return [None] * len(cell_ids)
    ids = pred.column("cellid").to_pylist()
    exact = {c: i for i, c in reversed(list(enumerate(ids)))}
    canonical = {}
    for i, c in enumerate(ids):
        key = nat4.canonical_unit_key(c) if c is not None else None
        if key is not None:
            canonical.setdefault(key, i)
    rows = []
    for cell_id in cell_ids:
        i = exact.get(cell_id)
        if i is None:
            key = nat4.canonical_unit_key(cell_id)
            i = canonical.get(key) if key is not None else None
        if i is None:
            report.add("unit_without_pred_correlation", cell_id, "no row in pred_correlation")
        rows.append(i)
    used = set(rows)
    for i, c in enumerate(ids):
        if i not in used:
            report.add(
                "pred_correlation_unit_not_in_population", str(c), "row has no population unit"
            )
    return rows


_TRUE = {"true", "1", "yes", "t"}
_FALSE = {"false", "0", "no", "f"}


def _auditory(pred: pa.Table | None, row: int | None) -> bool | None:
    """``sig_auditory`` as a bool, whatever type the CSV reader gave it."""
    if pred is None or row is None or "sig_auditory" not in pred.column_names:
        return None
    value = pred.column("sig_auditory")[row].as_py()
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return bool(value)
    text = str(value).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _append_pred_columns(
    cells: pa.Table, pred: pa.Table | None, rows: list[int | None]
) -> pa.Table:
    """Carry every other pred_correlation column through, renamed if it would clash."""
    if pred is None:
        return cells
    taken = set(cells.column_names) | {"area"}
    indices = pa.array(rows, pa.int64())
    for name in pred.column_names:
        if name in ("cellid", "sig_auditory", "area"):
            continue
        out_name = name if name not in taken else f"{_PRED_PREFIX}{name}"
        taken.add(out_name)
        cells = cells.append_column(out_name, pred.column(name).take(indices))
    return cells


# ============================================================================ wavs
def report_wavs(stims: list[Stim], wav_names: list[str] | None, *, report: Report) -> None:
    """Wav names matched only case-insensitively (align-wav accepts them) or not at all."""
    if wav_names is None:
        return
    exact = set(wav_names)
    folded: dict[str, str] = {}
    for n in wav_names:
        folded.setdefault(n.lower(), n)
    for s in stims:
        if s.wav_name in exact:
            continue
        other = folded.get(s.wav_name.lower())
        if other is not None:
            report.add("wav_case_only_match", s.name, f"wav.zip has {other!r}")
        else:
            report.add("wav_missing", s.name, f"no {s.wav_name!r} in wav.zip")


# ============================================================================ one area
@dataclass
class Parsed:
    stims: pa.Table
    cells: pa.Table
    trials: pa.Table
    report: pa.Table
    counts: dict


def parse_area(inputs: AreaInputs) -> Parsed:
    """The four tables of one area from its raw inputs."""
    report = Report()
    for skipped, why in inputs.skipped_members:
        report.add("skipped_member", skipped, f"not read: {why}")
    site_of = {rec: site for site, rec in inputs.site_recordings.items()}
    for recording, name, start_s, end_s in inputs.unusable_stim_epochs:
        where = _POPULATION if recording == inputs.pop_recording else site_of.get(recording)
        report.add(
            "stim_epoch_time_not_finite",
            f"{where or recording}/{name}",
            f"start {start_s}, end {end_s}: no sample to place it at; left out",
        )
    pop_segments, site_segments = _segments_applied(inputs, report)
    stims = build_stims(
        inputs.pop_epochs, stim_fs_hz=inputs.stim_fs_hz, report=report, segments=pop_segments
    )
    trials = build_trials(
        inputs.site_epochs,
        stims,
        report=report,
        fs_hz=inputs.site_fs_hz,
        segments=site_segments,
    )
    report_repetitions(trials, stims, report=report, sites=inputs.site_epochs)
    report_lengths(
        trials, stims, report=report, stim_fs_hz=inputs.stim_fs_hz, site_fs_hz=inputs.site_fs_hz
    )
    report_site_silences(
        trials,
        stims,
        inputs.site_silences,
        report=report,
        stim_fs_hz=inputs.stim_fs_hz,
        skip_sites=site_segments,
    )
    report_wavs(stims, inputs.wav_names, report=report)
    if inputs.mask_est is not None and inputs.mask_fs_hz:
        report_mask_est(stims, inputs.mask_est, fs_hz=inputs.mask_fs_hz, report=report)
    elif inputs.mask_fs_hz is not None:  # the signal is there, without a row to read
        report.add(
            "mask_est_disagrees",
            MASK_EST,
            "the population's mask_est has no row 0 (an empty CSV): no sound's subset was "
            "checked against it; sounds are classed by name",
        )
    if inputs.pop_n_samples is not None:
        report_population_extent(
            stims, n_samples=inputs.pop_n_samples, fs_hz=inputs.stim_fs_hz, report=report
        )
    cells = build_cells(
        inputs.resp_chans,
        inputs.site_units,
        inputs.pred_correlation,
        val_trials_per_site(trials, stims),
        sites=inputs.site_epochs,
        report=report,
        unbinned=inputs.unbinned_units,
    )
    subsets = Counter(s.subset for s in stims)
    matches = Counter(cells.column("match").to_pylist())
    counts = {
        "stims": len(stims),
        **{f"stims_{k}": subsets[k] for k in ("est", "val", "other")},
        "cells": cells.num_rows,
        **{f"cells_{k}": matches[k] for k in ("exact", "canonical", "none")},
        "sites": len(inputs.site_epochs),
        "trials": len(trials),
        "report": dict(sorted(report.kinds().items())),
    }
    return Parsed(stims_table(stims), cells, trials_table(trials), report.table(), counts)


# ============================================================================ tables -> inputs
def area_inputs(
    recordings: pa.Table,
    signals: pa.Table,
    epochs: pa.Table,
    site_spikes: pa.Table,
    *,
    pred_correlation: pa.Table | None = None,
    source_members: pa.Table | None = None,
    mask_est: np.ndarray | None = None,
    area: str = "",
) -> AreaInputs:
    """Gather one area's raw tables into :class:`AreaInputs` (no interpretation yet)."""
    recs = recordings.to_pylist()
    pop = [r for r in recs if r["kind"] == _POPULATION]
    if len(pop) != 1:
        msg = f"area {area}: expected one population recording, found {len(pop)}; rerun unpack"
        raise InputMismatch(msg)
    pop_name = pop[0]["recording"]
    sig = {(r["recording"], r["signal"]): r for r in signals.to_pylist()}
    resp, stim = sig.get((pop_name, "resp")), sig.get((pop_name, "stim"))
    if resp is None or stim is None or not resp["chans"]:
        lacks = "stim signal" if stim is None else "resp signal with chans (unit ids)"
        msg = f"{pop[0]['file']}: population recording {pop_name!r} has no {lacks}"
        raise InputMismatch(msg)
    # A site's trials are what resp.rasterize().extract_epoch(name) returns: it reads
    # resp's own epoch table (each signal has its own, nems0-format.md section 3), so a
    # site recording with a resp takes that signal's rows only.
    with_resp = {rec for rec, signal in sig if signal == RESP}
    with_resp.update(
        pc.unique(epochs.filter(pc.equal(epochs.column("signal"), RESP)).column("recording"))
        .drop_null()
        .to_pylist()
    )
    # Of the site files only STIM_ epochs are interpreted (trials): the rest, three in four
    # rows, never become Python objects (parse-epochs 0.5 -> 0.3 s at full scale).
    recording, signal = epochs.column("recording"), epochs.column("signal")
    resp_only = pa.array(sorted(with_resp - {pop_name}), pa.string())
    read_rows = pc.or_(pc.invert(pc.is_in(recording, value_set=resp_only)), pc.equal(signal, RESP))
    is_pop = pc.equal(recording, pop_name)
    silence_names = pa.array([nat4.PRESTIM, nat4.POSTSTIM], pa.string())
    site_of_recording = {r["recording"]: r["site"] for r in recs if r["kind"] == _SITE}
    site_silences = _silences(
        epochs.filter(
            pc.and_(
                pc.and_(read_rows, pc.invert(is_pop)),
                pc.is_in(epochs.column("name"), value_set=silence_names),
            )
        ),
        site_of_recording,
    )
    needed = pc.and_(
        pc.or_(is_pop, pc.starts_with(epochs.column("name"), nat4.STIM_PREFIX)), read_rows
    )
    epochs = epochs.filter(needed)  # a null name is not a STIM_ one: dropped with them
    unusable = epochs.filter(
        pc.and_(
            pc.starts_with(epochs.column("name"), nat4.STIM_PREFIX),
            pc.invert(
                pc.and_(
                    pc.is_finite(epochs.column("start_s")), pc.is_finite(epochs.column("end_s"))
                )
            ).fill_null(True),
        )
    )
    unusable_rows = list(
        zip(
            *(unusable.column(c).to_pylist() for c in ("recording", "name", "start_s", "end_s")),
            strict=True,
        )
    )
    # Column lists and tuples, not to_pylist() dicts: ~100k rows per area.
    by_recording: dict[str, list[tuple]] = {}
    columns = [epochs.column(c).to_pylist() for c in ("recording", "name", "start_s", "end_s")]
    for recording, *row in zip(*columns, strict=True):
        by_recording.setdefault(recording, []).append(tuple(row))
    site_epochs = {
        r["site"]: recording_epochs(by_recording.get(r["recording"], []))
        for r in recs
        if r["kind"] == _SITE
    }
    skipped = [
        (":".join(filter(None, (r["file"], r["member"], m))), _why_skipped_in_recording(m))
        for r in recs
        for m in (r["skipped_members"] or [])
    ]
    wav_names = None
    if source_members is not None:
        for m in source_members.to_pylist():
            if m["kind"] == "skipped":
                skipped.append((f"{m['file']}:{m['member']}", _why_skipped_in_zip(m)))
        if any(m == nat4.WAV_ZIP for m in source_members.column("file").to_pylist()):
            wav_names = [  # by file name; folders split on / or \ (as align-wav)
                m["member"].replace("\\", "/").rsplit("/", 1)[-1]
                for m in source_members.to_pylist()
                if m["kind"] == "wav"
            ]
    units = site_spikes.select(["site", "signal", "unit_id"]).to_pylist()
    segments, segment_signal_types = {}, {}
    for r in signals.to_pylist():
        if (spans := _segments(r["segments_json"])) is not None:
            segments[f"{r['recording']}/{r['signal']}"] = spans
            segment_signal_types[f"{r['recording']}/{r['signal']}"] = r["signal_type"]
    return AreaInputs(
        segments=segments,
        segment_signal_types=segment_signal_types,
        pop_recording=pop_name,
        site_recordings={r["site"]: r["recording"] for r in recs if r["kind"] == _SITE},
        pop_epochs=recording_epochs(by_recording.get(pop_name, [])),
        stim_fs_hz=float(stim["fs_hz"]),
        resp_chans=list(resp["chans"]),
        site_epochs=site_epochs,
        site_silences=site_silences,
        # a site's units are its resp's (rec['resp'], what rebin-sites bins): a unit of
        # another PointProcess signal matched here was counted trials and binned nowhere
        site_units=[(r["site"], r["unit_id"]) for r in units if r["signal"] == RESP],
        unbinned_units={
            r["unit_id"]: f"{r['site']}/{r['signal']}" for r in units if r["signal"] != RESP
        },
        site_fs_hz={
            r["site"]: float(sig[(r["recording"], "resp")]["fs_hz"])
            for r in recs
            if r["kind"] == _SITE and (r["recording"], "resp") in sig
        },
        pred_correlation=pred_correlation,
        wav_names=wav_names,
        skipped_members=skipped,
        unusable_stim_epochs=unusable_rows,
        mask_est=mask_est,
        mask_fs_hz=(sig.get((pop_name, MASK_EST)) or {}).get("fs_hz"),
        pop_n_samples=stim["n_samples"],
    )


def _silences(rows: pa.Table, site_of_recording: dict[str, str]) -> dict[str, dict]:
    """site -> silence name -> (n, 2) seconds, straight from Arrow (tens of thousands of
    rows per area: no Python object per row)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    if rows.num_rows == 0:
        return out
    bounds = np.column_stack(
        [rows.column(c).to_numpy(zero_copy_only=False) for c in ("start_s", "end_s")]
    ).astype(np.float64)
    groups = pc.binary_join_element_wise(rows.column("recording"), rows.column("name"), "\0")
    codes = pc.dictionary_encode(groups).combine_chunks()
    indices = codes.indices.to_numpy(zero_copy_only=False)
    for code, key in enumerate(codes.dictionary.to_pylist()):
        recording, name = key.split("\0", 1)
        site = site_of_recording.get(recording)
        if site is not None:
            out.setdefault(site, {})[name] = bounds[indices == code]
    return out


def _segments(segments_json: str | None) -> np.ndarray | None:
    """The JSON ``segments`` as (n, 2) seconds; None when the JSON has none (or null)."""
    if segments_json is None:
        return None
    spans = json.loads(segments_json)
    return None if spans is None else np.asarray(spans, dtype=np.float64).reshape(-1, 2)


def _restricts(segments: np.ndarray | None, epochs: list[Epoch]) -> bool:
    """Do ``segments`` change where any of ``epochs`` is? Not NEMS0's default, one span
    from 0 whose end (a sample count, read as seconds) is past every epoch's end: then a
    bound's position in the data is its own time, and 'exclude' keeps all that start at
    or after 0, as without segments."""
    if segments is None:
        return False
    if len(segments) != 1 or segments[0, 0] != 0:
        return True
    return any(e.end_s > segments[0, 1] for e in epochs)


def _segments_applied(
    inputs: AreaInputs, report: Report
) -> tuple[np.ndarray | None, dict[str, np.ndarray]]:
    """The segments that place epochs: the population's (its resp's, which the stim must
    share) and each site's resp's, where they restrict the recording's epochs; and a
    report row for every signal whose segments restrict.

    Only a rasterized signal's segments count: NEMS0's ``load_signal_from_streams`` sets
    them from the JSON for a RasterizedSignal alone, and ``PointProcess.rasterize``
    makes its raster with the default ones, so a site's spike times are cut at the
    epochs' own times whatever its JSON says."""
    pop = inputs.pop_recording
    epochs_of = {pop: inputs.pop_epochs}
    site_of = {rec: site for site, rec in inputs.site_recordings.items()}
    epochs_of.update({rec: inputs.site_epochs.get(site, []) for rec, site in site_of.items()})
    restricting = {
        subject: spans
        for subject, spans in sorted(inputs.segments.items())
        if _restricts(spans, epochs_of.get(subject.rsplit("/", 1)[0], []))
    }
    unloaded = {
        subject: restricting.pop(subject)
        for subject in list(restricting)
        if inputs.segment_signal_types.get(subject, "rasterized") != "rasterized"
    }
    for subject, spans in unloaded.items():
        report.add(
            "segments_not_applied",
            subject,
            f"JSON segments {json.dumps(spans.tolist())} of a "
            f"{inputs.segment_signal_types[subject]} signal: NEMS0 loads only a "
            "RasterizedSignal's segments, and rasterizing gives the default ones, so "
            "epochs are cut at their own times",
        )
    pop_spans = restricting.get(f"{pop}/{RESP}")
    site_spans = {
        site: restricting[f"{rec}/{RESP}"]
        for rec, site in site_of.items()
        if f"{rec}/{RESP}" in restricting
    }
    for subject, spans in restricting.items():
        recording, signal = subject.rsplit("/", 1)
        text = json.dumps(spans.tolist())
        used = signal == RESP or (
            recording == pop and pop_spans is not None and np.array_equal(spans, pop_spans)
        )
        if used:
            report.add(
                "segments_applied",
                subject,
                f"JSON segments {text}: the data is these spans of the recording's time, "
                "concatenated; each presentation must lie within one, and its times are "
                "its position in the data, as extract_epoch places it",
            )
        else:
            report.add(
                "segments_not_applied",
                subject,
                f"JSON segments {text} differ from the resp signal's; nat4etl cuts every "
                "signal of the recording where the resp segments place the epochs",
            )
    return pop_spans, site_spans


# ============================================================================ stage
def run(store, settings, progress) -> dict:
    summary = {}
    wavs = wav_members(store, settings)
    if wavs is None and settings.wav:
        progress.log(
            f"no {nat4.WAV_ZIP} in {store.shown_raw_dir}: the sounds' wav names are not "
            f"checked (`nat4etl fetch --wav --out {store.published_at}` gets it)",
            level="warning",
        )
    for area in store.areas_with("epochs", settings.areas, made_by="unpack"):
        inputs = area_inputs(
            store.read_table("recordings", area=area),
            store.read_table("signals", area=area),
            store.read_table("epochs", area=area),
            store.read_table(
                "site_spikes", area=area, columns=["site", "recording", "signal", "unit_id"]
            ),
            pred_correlation=_optional(store, "pred_correlation", area),
            source_members=_with_rows(_optional(store, "source_members", area), wavs),
            mask_est=read_mask_est(store, area),
            area=area,
        )
        parsed = parse_area(inputs)
        for name in CONTRACTS["parse-epochs"].writes:
            store.write_table(name, getattr(parsed, name), area=area)
        _log_report(progress, area, parsed)
        summary[area] = {k: v for k, v in parsed.counts.items() if k != "report"}
    return summary


def read_mask_est(store, area: str) -> np.ndarray | None:
    """Row 0 of the population's ``mask_est`` (channel 0), None if it has none.

    Rows are in key order (signal, channel), so batches are decoded only up to it: A1's
    whole ``pop_signals`` takes 0.5 s to decode, its first rows a few ms."""
    pf = store.parquet_file("pop_signals", area)
    keys = pf.read(columns=["signal", "channel"])
    found = pc.and_(pc.equal(keys.column("signal"), MASK_EST), pc.equal(keys.column("channel"), 0))
    rows = np.flatnonzero(found.to_numpy(zero_copy_only=False))
    if len(rows) == 0:
        return None
    row = int(rows[0])
    seen = 0
    for batch in pf.iter_batches(batch_size=1, columns=["values"], use_threads=False):
        if row < seen + batch.num_rows:
            return batch.column("values")[row - seen].values.to_numpy(zero_copy_only=False)
        seen += batch.num_rows
    return None  # not reached: the row was counted above


def wav_members(store, settings) -> pa.Table | None:
    """``wav.zip``'s members as ``source_members`` rows (no audio is decoded: align-wav
    does that); None without wav.zip (a ``--no-wav`` store): then no wav name is checked.

    The file is the one the stage's fingerprint covers (:func:`~nat4etl.fingerprint.raw_file`):
    the ``--source`` mirror's when the stage is given one, else raw/wav.zip if fetch got
    it (a ``--no-wav`` fetch leaves an earlier one in raw/ but not in fetch.json, and it is
    not read)."""
    from nat4etl.fingerprint import raw_file
    from nat4etl.formats import archive
    from nat4etl.stages.unpack import is_stray

    path = raw_file(store.root, nat4.WAV_ZIP, settings.source_dir)  # align-wav's too
    if path is None:
        return None
    rows = []
    for m in archive.iter_members(path):
        is_wav = not is_stray(m.name) and m.name.lower().endswith(".wav")
        rows.append(
            {
                "file": path.name,
                "member": m.name,
                "kind": "wav" if is_wav else "skipped",
                "size_bytes": m.size_bytes,
            }
        )
    return pa.Table.from_pylist(rows, schema=schema.SOURCE_MEMBERS.schema)


def _why_skipped_in_recording(member: str) -> str:
    """Why unpack left a member of a recording out, from its name, as its reader decided
    (``nems0.classify_member``): the report says so long after unpack's log is gone."""
    role = nems0.classify_member(member)
    if isinstance(role, str):
        return role
    if role.view > 0:
        return f"jackknife view {role.view}; only view 0 is stored"
    return "empty (0 bytes), as NEMS0 skips it"


def _why_skipped_in_zip(row: dict) -> str:
    """Why a member of a site or wav zip was not read (``unpack.is_stray`` and the
    extensions decide which are)."""
    from nat4etl.stages.unpack import is_stray

    if is_stray(row["member"]):
        return "operating-system litter (__MACOSX/, ._*, .DS_Store) or a hidden file"
    wanted = ".wav" if row["file"] == nat4.WAV_ZIP else ".tgz (a site recording)"
    return f"not a {wanted}"


def _with_rows(table: pa.Table | None, more: pa.Table | None) -> pa.Table | None:
    if table is None or more is None:
        return more if table is None else table
    return pa.concat_tables([table, more.select(table.column_names)])


def _optional(store, name: str, area: str) -> pa.Table | None:
    if not store.has(name, area):
        return None
    table = store.read_table(name, area=area)
    return table.drop_columns(["area"])


def _log_report(progress, area: str, parsed: Parsed) -> None:
    """The plain report: counts from the data, then one line per report row."""
    c = parsed.counts
    progress.log(
        f"{area}: {c['stims']} stims ({c['stims_est']} est, {c['stims_val']} val, "
        f"{c['stims_other']} other), {c['cells']} cells ({c['cells_exact']} exact, "
        f"{c['cells_canonical']} canonical, {c['cells_none']} unmatched), "
        f"{c['sites']} sites, {c['trials']} trials"
    )
    for kind, n in c["report"].items():
        progress.log(f"{area}: report {kind}: {n}")
    for row in parsed.report.to_pylist():
        progress.log(f"{area}: {row['kind']} {row['subject']}: {row['detail']}")

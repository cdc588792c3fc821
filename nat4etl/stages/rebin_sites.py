"""`rebin-sites`: spike counts per (stim, cell, trial), the spectrograms, and their QC.

Choices, each stated once:

- Val sounds: one row per single trial, binned from the per-site spike times by the NEMS0
  route (:mod:`nat4etl.binning`); ``trial`` is the repetition index within the site, so a
  site with 19 repetitions simply has 19 rows (the reader pads with NaN).
- Est sounds (and unclassified ``STIM_`` sounds): at the population file's own bin width
  (10 ms) the population recording's single trial, ``trial`` 0, ``source`` "population";
  at any other width the per-site spike times (every site file holds every est
  presentation too), ``source`` "site". A unit the population file marks NaN for a sound
  (not recorded) gets no row.
- ``val_means``: the population file's val responses (already averaged over trials),
  summed to the bin width when it is a whole number of population frames, else kept at
  the population's frame width (the table's ``dt_ms`` metadata says which).
- ``qc_val``: always at the population's frame width, so the two sources are compared the
  same way whatever ``--dt-ms`` is.
- ``spectrograms``: population ``stim`` cut at each sound's population epoch, frames
  averaged to the bin width. A bin width that is not a whole number of frames gives an
  empty table whose metadata names the reason; the reader raises it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nat4etl import binning, memory, schema
from nat4etl.errors import ConfigError, InputMismatch
from nat4etl.stages import CONTRACTS, handoff
from nat4etl.stages.background import WriteBehind

#: sites binned at once (two cores here; more only adds transient memory)
SITE_THREADS = 2
#: threads that check and fill the population's est rows (split in contiguous ranges)
FILL_THREADS = 2
SOURCE_POPULATION = "population"
SOURCE_SITE = "site"
#: signal names in the NEMS0 recordings
RESP, STIM = "resp", "stim"
#: the column of spike sample indices that replaces ``spike_times_s`` in memory
SPIKE_SAMPLES = "spike_samples"
#: beside it, per unit: its spikes before time 0 (NEMS0 counts them from the end of the
#: raster), and of those the ones before the raster's length (NEMS0 fails; never counted)
SPIKES_BEFORE_0, SPIKES_UNCOUNTED = "spikes_before_0", "spikes_before_raster"
BINNING_ROUTE = (
    "per-site spike times rasterized at the site file's fs (sample floor(t*fs)), each "
    "presentation cut at [round(start*fs), round(end*fs)) half to even, consecutive "
    "samples summed per bin (NEMS0 route)"
)


# ============================================================================ bin plan
@dataclass(frozen=True)
class BinPlan:
    """Every bin width derived from ``dt_ms`` and the files, checked once up front."""

    dt_ms: float
    n_bins: int  # bins per presentation
    window_s: float  # presentation length
    pop_fs_hz: float
    pop_frames: int  # population frames per presentation
    #: population frames per bin; None when dt_ms is not a whole number of frames
    frames_per_bin: int | None
    #: why spectrograms (and val_means at dt_ms) cannot be made; None when they can
    spectrogram_unavailable: str | None

    @property
    def pop_frame_ms(self) -> float:
        return 1000.0 / self.pop_fs_hz

    @property
    def est_from_population(self) -> bool:
        """At the population's own bin width its single est trial is used as is."""
        return self.frames_per_bin == 1


def plan_bins(
    stims: pa.Table, *, dt_ms: float, pop_fs_hz: float, pop_file: str | None = None
) -> BinPlan:
    """Check ``dt_ms`` against the presentation length and the population frame width.

    Raises ConfigError when ``dt_ms`` does not divide the presentation (responses cannot
    be binned at all); a width that only the spectrogram cannot follow is recorded in
    ``spectrogram_unavailable`` instead, because responses are still well defined. When
    no bin width could, the population's own grid is at fault: an InputMismatch naming
    ``pop_file``, whose JSON holds the fs.
    """
    if stims.num_rows == 0:
        raise InputMismatch("no stims to bin; rerun parse-epochs")
    durations_s = np.unique(stims.column("duration_s").to_numpy())
    frames = np.unique(stims.column("n_frames").to_numpy())
    if len(frames) != 1 or np.ptp(durations_s) * pop_fs_hz > 0.5:
        msg = (
            f"stims differ in length ({sorted(set(durations_s.tolist()))} s, "
            f"{frames.tolist()} frames); fixed-length vectors need one presentation length"
        )
        raise InputMismatch(msg)
    pop_frames = int(frames[0])
    window_s = pop_frames / pop_fs_hz
    window_ms = window_s * 1000.0
    n_bins_exact = window_ms / dt_ms
    n_bins = round(n_bins_exact)
    if dt_ms < 1 or abs(dt_ms - round(dt_ms)) > 1e-9:
        raise ConfigError(
            f"dt_ms={dt_ms:g} is not a multiple of 1 ms; responses are summed from the site "
            "files' 1 ms samples"
        )
    if n_bins < 1 or abs(n_bins_exact - n_bins) > 1e-9:
        frame_ms = 1000.0 / pop_fs_hz
        fits = [
            w
            for w in range(1, int(window_ms) + 1)
            if abs(window_ms / w - round(window_ms / w)) < 1e-9
            and abs(w / frame_ms - round(w / frame_ms)) < 1e-9
        ]
        if not fits:  # at 99 Hz a sound is 148 frames of 10.1 ms: no --dt-ms helps
            msg = (
                f"the population's presentations are {pop_frames} frames at {pop_fs_hz:g} Hz "
                f"({window_ms:g} ms): no bin width of whole ms divides them into whole "
                "frames (a wrong JSON fs?)"
            )
            raise InputMismatch(msg, path=pop_file)
        raise ConfigError(
            f"dt_ms={dt_ms:g} does not divide the {window_ms:g} ms presentation; bin widths "
            f"that divide it into whole spectrogram frames: "
            f"{', '.join(map(str, fits[:6]))} ms"
        )
    k = binning.frames_per_bin(dt_ms, 1000.0 / pop_fs_hz)
    reason = None
    if k is None or pop_frames % k:
        k = None
        reason = (
            f"dt_ms={dt_ms:g} is not a whole number of the population spectrogram's "
            f"{1000.0 / pop_fs_hz:g} ms frames, so frames cannot be averaged into bins; "
            f"rebuild with `--dt-ms` a multiple of {1000.0 / pop_fs_hz:g} for spectrograms"
        )
    return BinPlan(dt_ms, n_bins, window_s, pop_fs_hz, pop_frames, k, reason)


# ============================================================================ population
def pop_starts(stims: pa.Table, pop_fs_hz: float) -> np.ndarray:
    """First population frame of each stim (round half to even, as NEMS0)."""
    return binning.epoch_samples(stims.column("pop_start_s").to_numpy(), pop_fs_hz)


def population_keep(
    resp: np.ndarray, stims: pa.Table, plan: BinPlan, *, skip_pairs: np.ndarray | None = None
) -> np.ndarray:
    """(stims, cells) mask of the population pairs that become rows.

    A pair whose whole epoch is NaN (unit not recorded for the sound) is left out, as are
    ``skip_pairs`` (``stim * n_cells + cell``).
    """
    stim_ids = stims.column("stim").to_numpy()
    keep = np.zeros((len(stim_ids), resp.shape[0]), dtype=bool)
    starts = pop_starts(stims, plan.pop_fs_hz)

    def check(stim_rows: range) -> None:
        for i in stim_rows:
            frames = binning.cut_frames(resp, int(starts[i]), plan.pop_frames)
            keep[i] = ~np.all(np.isnan(frames), axis=1)

    _on_threads(check, len(starts))
    if skip_pairs is not None and len(skip_pairs):
        pairs = stim_ids.astype(np.int64)[:, None] * resp.shape[0] + np.arange(resp.shape[0])
        keep &= ~np.isin(pairs, skip_pairs)
    return keep


def population_keys(stims: pa.Table, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(stim, cell) of the rows ``keep`` selects, stim-major: the order of the blocks."""
    stim_ids = stims.column("stim").to_numpy()
    return np.repeat(stim_ids, keep.sum(axis=1)), np.nonzero(keep)[1]


def fill_population_rows(
    out: np.ndarray,
    dest: np.ndarray,
    resp: np.ndarray,
    stims: pa.Table,
    plan: BinPlan,
    keep: np.ndarray,
    *,
    give_back: bool = False,
) -> None:
    """The kept pairs' epochs, frames summed to the bin width, into rows ``dest`` of ``out``.

    ``dest`` gives each kept pair's row in :func:`population_keys` order. The work goes
    channel by channel so that, with ``give_back``, each channel's samples return to the
    OS once its rows are written (:func:`nat4etl.memory.give_back`): A1's population
    (300 MB) and its copy in the responses (280 MB) are then never both held whole. The
    channel's values are zeros afterwards; only a caller done with ``resp`` asks for it.
    """
    k = plan.frames_per_bin
    if k is None:
        raise ConfigError(plan.spectrogram_unavailable or "bin width is not whole frames")
    n_cells, n_samples = resp.shape
    row_of = np.full(keep.shape, -1, np.int64)
    row_of[keep] = dest
    window = pop_starts(stims, plan.pop_fs_hz)[:, None] + np.arange(plan.pop_frames)
    # NEMS0 extract_epoch: an epoch starting before 0 is all NaN, one past the end NaN-padded
    inside = (window[:, :1] >= 0) & (window < n_samples)
    all_inside = bool(inside.all())

    def fill(cells: range) -> None:
        for cell in cells:
            stims_here = keep[:, cell]
            if stims_here.any():
                if all_inside and stims_here.all():
                    frames = np.take(resp[cell], window)  # the usual case: no masked copies
                elif all_inside:
                    frames = np.take(resp[cell], window[stims_here])
                else:
                    frames = np.full((int(stims_here.sum()), plan.pop_frames), np.nan, resp.dtype)
                    where = inside[stims_here]
                    frames[where] = resp[cell][window[stims_here][where]]
                out[row_of[stims_here, cell]] = binning.sum_frames(frames, k)
            if give_back:
                memory.give_back(resp, cell, cell + 1)

    # Channels are independent and each is a few long numpy calls that release the GIL
    # (gather, sum, scatter into fresh pages)
    _on_threads(fill, n_cells)


def _on_threads(work: Callable[[range], None], n: int) -> None:
    """``work`` over ``range(n)`` split into :data:`FILL_THREADS` contiguous ranges, one
    per thread; for loops of long numpy calls, which release the GIL."""
    bounds = np.linspace(0, n, FILL_THREADS + 1).astype(int)
    ranges = [range(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    with ThreadPoolExecutor(len(ranges), thread_name_prefix="nat4etl-fill") as pool:
        for done in [pool.submit(work, part) for part in ranges]:
            done.result()


def population_responses(
    resp: np.ndarray,
    stims: pa.Table,
    plan: BinPlan,
    *,
    source: str = SOURCE_POPULATION,
    skip_pairs: np.ndarray | None = None,
) -> pa.Table:
    """Rows (stim, cell, trial 0) from the population ``resp``, NaN-only pairs dropped.

    ``resp`` is (cells, samples) in cell id order. Frames are summed to the bin width.
    ``skip_pairs`` (``stim * n_cells + cell``) are left out too.
    """
    keep = population_keep(resp, stims, plan, skip_pairs=skip_pairs)
    stim_col, cell_col = population_keys(stims, keep)
    counts = np.empty((len(stim_col), plan.n_bins), dtype=np.float32)
    fill_population_rows(counts, np.arange(len(stim_col)), resp, stims, plan, keep)
    return responses_table(stim_col, cell_col, np.zeros(len(cell_col)), source, counts)


def val_means(resp: np.ndarray, val_stims: pa.Table, plan: BinPlan) -> tuple[pa.Table, float]:
    """The population file's val averages at dt_ms (or at its frame width), and that width."""
    k = plan.frames_per_bin or 1
    rows = population_responses(
        resp, val_stims, _at_frames(plan, k), source=SOURCE_POPULATION
    ).drop_columns(["trial", "source"])
    return rows.rename_columns(["stim", "cell", "mean_counts"]), plan.pop_frame_ms * k


def _at_frames(plan: BinPlan, k: int) -> BinPlan:
    """The plan for bins of ``k`` population frames."""
    return BinPlan(
        plan.pop_frame_ms * k,
        plan.pop_frames // k,
        plan.window_s,
        plan.pop_fs_hz,
        plan.pop_frames,
        k,
        None,
    )


def spectrograms(stim: np.ndarray, stims: pa.Table, plan: BinPlan) -> pa.Table:
    """Each stim's (bands, frames) spectrogram, frames averaged to dt_ms, flattened row-major."""
    k = plan.frames_per_bin
    stim_ids = stims.column("stim").to_numpy().astype(np.int32)
    if k is None:
        return vectors_table({"stim": stim_ids[:0]}, "values", np.empty((0, 0), np.float32))
    n_bands = stim.shape[0]
    values = np.empty((len(stim_ids), n_bands * plan.n_bins), dtype=np.float32)
    for i, start in enumerate(pop_starts(stims, plan.pop_fs_hz)):
        frames = binning.cut_frames(stim, int(start), plan.pop_frames)
        values[i] = binning.mean_frames(frames, k).reshape(-1)
    return vectors_table({"stim": stim_ids}, "values", values)


# ============================================================================ sites
@dataclass(frozen=True)
class Site:
    """One site's inputs: its units' spike times, presentations and the cells they are."""

    site: str
    fs_hz: float
    spikes: pa.Table  # unit_id, spike_times_s or spike_samples (see with_spike_samples)
    trials: pa.Table  # stim, trial, start_s, end_s
    cells: pa.Table  # cell, site_unit_id (matched cells of this site)
    #: the site file and its zip member, named in errors (None: not known)
    file: str | None = None
    member: str | None = None


class SiteJob:
    """One site's rows for some stims: keys known up front, counts binned on demand.

    Rows are unit-major, then the site's presentations in table order; ``keys`` and
    ``counts`` agree on that order.
    """

    def __init__(self, site: Site, stim_ids: np.ndarray, *, dt_ms: float, n_bins: int):
        self.site, self.dt_ms, self.n_bins = site, dt_ms, n_bins
        try:
            self.group = binning.samples_per_bin(dt_ms, site.fs_hz)
        except ConfigError as err:  # the bin width, or this one site's fs: name the site
            # and its file (its JSON holds the fs); with no width that would do, the fs
            if not len(binning.whole_sample_widths_ms(site.fs_hz)):
                msg = (
                    f"site {site.site}: its fs of {site.fs_hz:g} Hz gives no bin of whole "
                    "milliseconds (up to 10 s) a whole number of samples (a wrong JSON fs?)"
                )
                raise InputMismatch(msg, path=site.file, member=site.member) from None
            msg = f"site {site.site}: {err.msg}"
            raise ConfigError(msg, path=site.file, member=site.member) from None
        trials = site.trials.filter(
            pc.is_in(site.trials.column("stim"), pa.array(stim_ids, pa.int32()))
        )
        start_s = trials.column("start_s").to_numpy()
        end_s = trials.column("end_s").to_numpy()
        usable = np.isfinite(start_s) & np.isfinite(end_s)
        # NEMS0 ('exclude'): the start snapped to the sample grid, not as written, >= 0
        usable[usable] &= binning.epoch_samples(start_s[usable], site.fs_hz) >= 0
        self.trials = trials.filter(pa.array(usable))
        units = pa.array(site.spikes.column("unit_id").to_pylist(), pa.string())
        self.cells = site.cells.filter(pc.is_in(site.cells.column("site_unit_id"), units))

    @property
    def n_rows(self) -> int:
        return self.cells.num_rows * self.trials.num_rows

    def keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(stim, cell, trial) per row."""
        n_cells, n_windows = self.cells.num_rows, self.trials.num_rows
        return (
            np.tile(self.trials.column("stim").to_numpy(), n_cells),
            np.repeat(self.cells.column("cell").to_numpy(), n_windows),
            np.tile(self.trials.column("trial").to_numpy(), n_cells),
        )

    def counts(self) -> np.ndarray:
        """float32 (rows, n_bins), by the NEMS0 route."""
        by_unit = _spike_samples_by_unit(self.site.spikes, self.site.fs_hz)
        samples = [by_unit[u] for u in self.cells.column("site_unit_id").to_pylist()]
        counts = binning.count_windows(
            samples,
            binning.epoch_samples(self.trials.column("start_s").to_numpy(), self.site.fs_hz),
            binning.epoch_samples(self.trials.column("end_s").to_numpy(), self.site.fs_hz),
            n_bins=self.n_bins,
            group=self.group,
        )
        return counts.reshape(self.n_rows, self.n_bins)

    def table(self) -> pa.Table:
        return responses_table(*self.keys(), SOURCE_SITE, self.counts())


def site_responses(site: Site, stim_ids: np.ndarray, *, dt_ms: float, n_bins: int) -> pa.Table:
    """Rows (stim, cell, trial) binned from one site's spike times, for ``stim_ids`` only."""
    return SiteJob(site, stim_ids, dt_ms=dt_ms, n_bins=n_bins).table()


def _spike_samples_by_unit(spikes: pa.Table, fs_hz: float) -> dict[str, np.ndarray]:
    """unit id -> spike sample indices, from the list column without Python floats."""
    name = _spike_column(spikes)
    column = spikes.column(name).combine_chunks()
    flat = column.flatten().to_numpy(zero_copy_only=False)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    samples = flat if name == SPIKE_SAMPLES else binning.spike_samples(flat, fs_hz)
    units = spikes.column("unit_id").to_pylist()
    return {u: samples[offsets[i] : offsets[i + 1]] for i, u in enumerate(units)}


def _spike_column(spikes: pa.Table) -> str:
    return SPIKE_SAMPLES if SPIKE_SAMPLES in spikes.column_names else "spike_times_s"


def with_spike_samples(
    site_spikes: pa.Table,
    fs_hz: dict[tuple[str, str], float],
    last_epoch_end_s: dict[tuple[str, str], float] | None = None,
) -> pa.Table:
    """``site_spikes`` with ``spike_samples`` in place of ``spike_times_s``: each spike's
    sample at its file's rate (``fs_hz`` by (recording, signal)), int32, by
    :func:`nat4etl.binning.spike_samples`. With ``last_epoch_end_s`` (by (recording,
    signal), :func:`last_epoch_ends`) a spike before 0 counts from the end of its
    signal's raster, as in NEMS0 (:func:`nat4etl.binning.raster_samples`); columns
    :data:`SPIKES_BEFORE_0` and :data:`SPIKES_UNCOUNTED` say per unit how many there were.

    It is all the site pass needs of the spike times, in half the memory: unpack hands
    this over (:mod:`.handoff`) instead of the float64 times, and it waits in memory
    through the other area's work (A1: 83 -> 42 MB). Converted row by row, so no float64
    temporary of the whole column exists.
    """
    keys = list(
        zip(
            site_spikes.column("recording").to_pylist(),
            site_spikes.column("signal").to_pylist(),
            strict=True,
        )
    )
    rasters = (
        None
        if last_epoch_end_s is None
        else _raster_lengths(site_spikes, keys, fs_hz, last_epoch_end_s)
    )
    chunks, row = [], 0
    before_0 = np.zeros(len(keys), np.int32)  # spikes before time 0, per row
    uncounted = np.zeros(len(keys), np.int32)  # of those, before the raster: never counted
    for chunk in site_spikes.column("spike_times_s").chunks:
        flat = chunk.flatten().to_numpy(zero_copy_only=False)
        offsets = chunk.offsets.to_numpy()
        offsets = offsets - offsets[0]
        samples = np.empty(len(flat), np.int32)
        any_before_0 = bool(len(flat)) and bool(np.nanmin(flat, initial=0.0) < 0)
        for i in range(len(chunk)):
            lo, hi = offsets[i], offsets[i + 1]
            key = keys[row + i]
            samples[lo:hi] = binning.spike_samples(
                flat[lo:hi],
                fs_hz[key],
                dtype=np.int32,
                raster_samples=None if rasters is None else rasters[key],
            )
            if any_before_0:
                early = flat[lo:hi] < 0
                before_0[row + i] = np.count_nonzero(early)
                uncounted[row + i] = np.count_nonzero(samples[lo:hi][early] == binning.NO_SAMPLE)
        chunks.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(samples)))
        row += len(chunk)
    column = pa.chunked_array(chunks, pa.list_(pa.int32()))
    index = site_spikes.column_names.index("spike_times_s")
    out = site_spikes.set_column(index, SPIKE_SAMPLES, column)
    out = out.append_column(SPIKES_BEFORE_0, pa.array(before_0))
    return out.append_column(SPIKES_UNCOUNTED, pa.array(uncounted))


def spikes_before_0(site_spikes: pa.Table) -> list[dict]:
    """The units with spike times before 0 (site, unit id, how many, how many of them
    were before the raster and so never counted), from :func:`with_spike_samples`'s
    columns; none for a table without them."""
    if SPIKES_BEFORE_0 not in site_spikes.column_names:
        return []
    counts = site_spikes.column(SPIKES_BEFORE_0).to_numpy()
    rows = site_spikes.take(np.flatnonzero(counts))
    return [
        {
            "site": r["site"],
            "unit_id": r["unit_id"],
            SPIKES_BEFORE_0: r[SPIKES_BEFORE_0],
            SPIKES_UNCOUNTED: r[SPIKES_UNCOUNTED],
        }
        for r in rows.select(["site", "unit_id", SPIKES_BEFORE_0, SPIKES_UNCOUNTED]).to_pylist()
    ]


def _raster_lengths(
    site_spikes: pa.Table,
    keys: list[tuple[str, str]],
    fs_hz: dict[tuple[str, str], float],
    last_epoch_end_s: dict[tuple[str, str], float],
) -> dict[tuple[str, str], int]:
    """(recording, signal) -> its raster's length in NEMS0 (the latest spike of the
    signal's units stands in when no epoch ends after 0)."""
    out = {}
    for key in dict.fromkeys(keys):
        last_end = last_epoch_end_s.get(key, math.nan)
        spikes = np.empty(0)
        if not last_end > 0:
            rows = [i for i, k in enumerate(keys) if k == key]
            column = site_spikes.column("spike_times_s").take(rows)
            spikes = pc.list_flatten(column).to_numpy(zero_copy_only=False)
        out[key] = binning.raster_samples(last_end, spikes, fs_hz[key])
    return out


def last_epoch_ends(epochs: pa.Table) -> dict[tuple[str, str], float]:
    """(recording, signal) -> the latest epoch end of its epoch table (NaN ends skipped,
    NaN when all are), from the ``epochs`` table's columns of those names."""
    last = epochs.group_by(["recording", "signal"]).aggregate([("end_s", "max")])
    return {
        (r["recording"], r["signal"]): math.nan if r["end_s_max"] is None else r["end_s_max"]
        for r in last.to_pylist()
    }


def split_sites(
    site_spikes: pa.Table,
    trials: pa.Table,
    cells: pa.Table,
    site_fs_hz: dict[str, float],
    site_files: dict[str, tuple[str, str | None]] | None = None,
) -> list[Site]:
    """One :class:`Site` per site with spike data, in site order."""
    matched = cells.filter(pc.invert(pc.is_null(cells.column("site_unit_id"))))
    sites = []
    for name in sorted(set(site_spikes.column("site").to_pylist())):
        file, member = (site_files or {}).get(name, (None, None))
        sites.append(
            Site(
                site=name,
                fs_hz=site_fs_hz[name],
                spikes=_rows_of(site_spikes, "site", name).select(
                    ["unit_id", _spike_column(site_spikes)]
                ),
                trials=_rows_of(trials, "site", name).select(["stim", "trial", "start_s", "end_s"]),
                cells=matched.filter(
                    pc.or_kleene(
                        pc.equal(matched.column("site"), name), pc.is_null(matched.column("site"))
                    )
                ).select(["cell", "site_unit_id"]),
                file=file,
                member=member,
            )
        )
    return sites


def _rows_of(table: pa.Table, column: str, value) -> pa.Table:
    """Rows with ``column == value``: a zero-copy slice when they are contiguous (the store
    writes tables sorted by key), else a filtered copy."""
    rows = np.flatnonzero(pc.equal(table.column(column), value).to_numpy(zero_copy_only=False))
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return table.slice(int(rows[0]), len(rows))
    return table.take(pa.array(rows))


def qc_val(site: Site, val_rows: pa.Table, means: pa.Table, val_ids: np.ndarray) -> list[dict]:
    """Per val stim the site presented: mean over its trials vs the population's average.

    ``val_rows`` (this site's val trials) and ``means`` (the val_means table) must be at
    the same bin width. Cells with no population average for the stim are not compared.
    """
    trial_stims = site.trials.column("stim").to_numpy()
    stims_here = np.intersect1d(val_ids, trial_stims)
    n_cells = 1 + max(int(pc.max(means["cell"]).as_py() or 0), _max_int(val_rows, "cell"))
    uniq, trial_means = pair_means(_pairs(val_rows, n_cells), vector_view(val_rows, "counts"))
    mean_pairs = _pairs(means, n_cells)
    order = np.argsort(mean_pairs, kind="stable")
    mean_pairs = mean_pairs[order]
    pos = np.searchsorted(mean_pairs, uniq)
    found = pos < len(mean_pairs)  # none when there are no population averages at all
    found[found] = mean_pairs[pos[found]] == uniq[found]
    pop = vector_view(means, "mean_counts")
    diff = np.abs(trial_means[found] - pop[order[pos[found]]])
    diff_stim = uniq[found] // n_cells
    out = []
    for stim in stims_here:
        d = diff[diff_stim == stim]
        n_compared = len(d)
        d = d[np.isfinite(d)]
        out.append(
            {
                "site": site.site,
                "stim": int(stim),
                "n_cells": n_compared,
                "n_trials": int(np.sum(trial_stims == stim)),
                "max_abs_diff": float(d.max()) if d.size else None,
                "mean_abs_diff": float(d.mean()) if d.size else None,
            }
        )
    return out


def pair_means(pair: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique pair keys and the NaN-aware mean of their rows (float64).

    Rows usually come grouped by pair (then nothing is sorted), each pair with as many
    rows (trials; then the sums are a reshape and a sum). Every route adds the same rows in
    the same order, so the means are bit for bit the same; this runs for every val trial
    of every site.
    """
    if len(pair) and np.any(pair[1:] < pair[:-1]):
        order = np.argsort(pair, kind="stable")
        pair, counts = pair[order], counts[order]
    first = np.flatnonzero(np.r_[True, pair[1:] != pair[:-1]]) if len(pair) else np.empty(0, int)
    if len(first) == 0:
        return pair, np.empty((0, counts.shape[1]))
    finite = np.isfinite(counts)
    size = len(pair) // len(first)
    if len(pair) == size * len(first) and np.all(np.diff(first) == size):
        # 4x faster than reduceat; numpy sums axis 1 row by row, as reduceat does, and
        # casts to float64 as it goes (no float64 copy; skipping a NaN adds what 0 would)
        shape = (len(first), size, counts.shape[1])
        finite = finite.reshape(shape)
        sums = np.sum(counts.reshape(shape), axis=1, dtype=np.float64, where=finite)
        n = finite.sum(axis=1, dtype=np.int64)
    else:
        zeroed = np.where(finite, counts, np.float32(0))
        sums = np.add.reduceat(zeroed, first, axis=0, dtype=np.float64)
        n = np.add.reduceat(finite, first, axis=0, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return pair[first], sums / n  # 0 / 0: no finite value, NaN


def _pairs(table: pa.Table, n_cells: int) -> np.ndarray:
    """``stim * n_cells + cell`` per row (int64), a one-number key of the pair."""
    return table.column("stim").to_numpy().astype(np.int64) * n_cells + table.column(
        "cell"
    ).to_numpy().astype(np.int64)


def _max_int(table: pa.Table, column: str) -> int:
    return int(pc.max(table[column]).as_py() or 0) if table.num_rows else 0


# ============================================================================ tables
def responses_table(stim, cell, trial, source: str, counts: np.ndarray) -> pa.Table:
    n = len(counts)
    return vectors_table(
        {
            "stim": np.asarray(stim, dtype=np.int32),
            "cell": np.asarray(cell, dtype=np.int32),
            "trial": np.asarray(trial, dtype=np.int32),
            "source": pa.array([source] * n, pa.string()) if n else pa.array([], pa.string()),
        },
        "counts",
        counts,
    )


def vectors_table(keys: dict, name: str, values: np.ndarray) -> pa.Table:
    """Key columns plus one fixed_size_list<float32> column, without copying ``values``."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    width = values.shape[1] if values.ndim == 2 else 0
    flat = pa.array(values.reshape(-1), type=pa.float32())
    column = (
        pa.FixedSizeListArray.from_arrays(flat, width)
        if width
        else pa.array([[]] * 0, pa.list_(pa.float32(), 0))
    )
    return pa.table({**keys, name: column})


def vector_view(table: pa.Table, name: str) -> np.ndarray:
    """A fixed_size_list column as a (rows, width) numpy view."""
    col = table.column(name)
    width = col.type.list_size
    if table.num_rows == 0:
        return np.empty((0, width), np.float32)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return arr.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)


def _vector_index(table: pa.Table, name: str) -> dict[tuple[int, int], np.ndarray]:
    values = vector_view(table, name)
    keys = zip(table.column("stim").to_pylist(), table.column("cell").to_pylist(), strict=True)
    return {k: values[i] for i, k in enumerate(keys)}


# ============================================================================ one area
@dataclass
class AreaInputs:
    stims: pa.Table
    cells: pa.Table
    trials: pa.Table
    site_spikes: pa.Table
    pop_resp: np.ndarray  # (cells, samples)
    pop_stim: np.ndarray  # (bands, samples)
    pop_fs_hz: float
    site_fs_hz: dict[str, float]
    #: site -> (file, zip member) of its recording, and the population's file, named in
    #: errors
    site_files: dict[str, tuple[str, str | None]] = field(default_factory=dict)
    pop_file: str | None = None


@dataclass
class AreaOutputs:
    responses: pa.Table
    val_means: pa.Table
    qc_val: pa.Table
    spectrograms: pa.Table
    metadata: dict[str, dict]
    counts: dict


class _SortedRows:
    """Rows from several sources written straight into one array in key order.

    Every source declares its keys first; the array is then allocated once and each
    source's counts land at their final place, so the table reaches the store already
    sorted (no copy there) and no source's rows are held twice.
    """

    SOURCES = (SOURCE_POPULATION, SOURCE_SITE)

    def __init__(self, n_bins: int):
        self.n_bins = n_bins
        self._keys: list[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = []
        self._dest: list[np.ndarray] = []

    def declare(self, stim, cell, trial, source: str) -> int:
        """Register a block of rows; returns its handle for :meth:`fill`."""
        self._keys.append((stim, cell, trial, self.SOURCES.index(source)))
        return len(self._keys) - 1

    def allocate(self) -> None:
        sizes = [len(k[0]) for k in self._keys]
        cat = [np.concatenate([k[i] for k in self._keys]) for i in range(3)] if sizes else []
        stim, cell, trial = (
            [c.astype(np.int64) for c in cat] if sizes else [np.empty(0, np.int64)] * 3
        )
        source = np.repeat([k[3] for k in self._keys], sizes).astype(np.int64)
        order = _key_order(stim, cell, trial)
        dest = np.empty_like(order)
        dest[order] = np.arange(len(order))
        bounds = np.r_[0, np.cumsum(sizes)]
        self._dest = [dest[bounds[i] : bounds[i + 1]] for i in range(len(sizes))]
        self.stim, self.cell, self.trial = stim[order], cell[order], trial[order]
        self.source = source[order]
        # filled a channel at a time, one row in every n_cells: 4 kB pages so that the
        # rows become resident as they are written (see fill_population_rows)
        self.counts = memory.paged_empty((len(order), self.n_bins), huge_pages=False)

    def destination(self, handle: int) -> np.ndarray:
        """Where block ``handle``'s rows go in :attr:`counts`, in their declared order."""
        return self._dest[handle]

    def fill(self, handle: int, start: int, rows: np.ndarray) -> None:
        """Rows ``start:start+len(rows)`` of block ``handle``."""
        self.counts[self._dest[handle][start : start + len(rows)]] = rows

    def table(self) -> pa.Table:
        names = pa.array(list(self.SOURCES), pa.string())
        return vectors_table(
            {
                "stim": self.stim.astype(np.int32),
                "cell": self.cell.astype(np.int32),
                "trial": self.trial.astype(np.int32),
                "source": names.take(pa.array(self.source)),
            },
            "counts",
            self.counts,
        )


def _key_order(*columns: np.ndarray) -> np.ndarray:
    """The stable order of rows sorted by ``columns`` (int64, first the most significant):
    ``np.lexsort``'s, from one stable argsort of a combined key when the ranges fit in
    an int64 (A1's 760k rows: 4-7 ms instead of 22-24 ms)."""
    if not len(columns[0]):
        return np.zeros(0, np.int64)
    lows = [int(c.min()) for c in columns]
    spans = [int(c.max()) - lo + 1 for c, lo in zip(columns, lows, strict=True)]
    if math.prod(spans) >= 2**62:
        return np.lexsort(columns[::-1])
    key = np.zeros(len(columns[0]), np.int64)
    for column, lo, span in zip(columns, lows, spans, strict=True):
        key *= span
        key += column - lo  # in [0, span)
    return np.argsort(key, kind="stable")


def _site_rows(
    job: SiteJob,
    handle: int,
    rows: _SortedRows,
    val_ids: np.ndarray,
    qc_means: pa.Table,
    frame_plan: BinPlan,
    *,
    dt_ms: float,
) -> list[dict]:
    """Bin one site into its rows of ``rows``; returns the QC rows of its val trials."""
    counts = job.counts()
    rows.fill(handle, 0, counts)
    if dt_ms == frame_plan.dt_ms:
        keys = job.keys()
        is_val_row = np.isin(keys[0], val_ids)
        if not is_val_row.all():  # at 10 ms the sites give val rows only: no copy then
            keys, counts = tuple(k[is_val_row] for k in keys), counts[is_val_row]
        val_rows = responses_table(*keys, SOURCE_SITE, counts)
    else:
        val_rows = site_responses(
            job.site, val_ids, dt_ms=frame_plan.dt_ms, n_bins=frame_plan.n_bins
        )
    del counts
    return qc_val(job.site, val_rows, qc_means, val_ids)


def rebin_area(
    inputs: AreaInputs, *, dt_ms: float, progress=None, release_inputs: bool = False
) -> AreaOutputs:
    """Every table rebin-sites writes for one area.

    With ``release_inputs`` the population gives back each channel as soon as its est
    rows are filled (A1: 300 MB of population and 280 MB of rows are never both held)
    and is dropped before the site pass.
    """
    plan = plan_bins(
        inputs.stims, dt_ms=dt_ms, pop_fs_hz=inputs.pop_fs_hz, pop_file=inputs.pop_file
    )
    if inputs.pop_resp.shape[0] != inputs.cells.num_rows:
        raise InputMismatch(
            f"population resp has {inputs.pop_resp.shape[0]} channels, the cells table "
            f"{inputs.cells.num_rows} rows; rerun parse-epochs"
        )
    stims = inputs.stims
    is_val = pc.equal(stims.column("subset"), "val")
    val_stims, other_stims = stims.filter(is_val), stims.filter(pc.invert(is_val))
    val_ids = val_stims.column("stim").to_numpy()
    site_ids = val_ids
    if not plan.est_from_population:
        site_ids = np.concatenate([other_stims.column("stim").to_numpy(), val_ids])
    sites = split_sites(
        inputs.site_spikes, inputs.trials, inputs.cells, inputs.site_fs_hz, inputs.site_files
    )
    early = spikes_before_0(inputs.site_spikes)
    jobs = [SiteJob(site, site_ids, dt_ms=dt_ms, n_bins=plan.n_bins) for site in sites]

    # 1. every row's key
    rows = _SortedRows(plan.n_bins)
    pop_keep = None
    if plan.est_from_population:
        pop_keep = population_keep(inputs.pop_resp, other_stims, plan)
    elif plan.frames_per_bin is not None:  # units without site data keep est rows
        n_cells = inputs.pop_resp.shape[0]
        covered = [j.keys() for j in jobs]
        covered = np.concatenate([s.astype(np.int64) * n_cells + c for s, c, _ in covered] or [[]])
        pop_keep = population_keep(
            inputs.pop_resp, other_stims, plan, skip_pairs=covered.astype(np.int64)
        )
    pop_handle = None
    if pop_keep is not None:
        stim_col, cell_col = population_keys(other_stims, pop_keep)
        pop_handle = rows.declare(stim_col, cell_col, np.zeros_like(cell_col), SOURCE_POPULATION)
    site_handles = [rows.declare(*j.keys(), SOURCE_SITE) for j in jobs]
    rows.allocate()

    # 2. population rows, val averages and spectrograms; then the population can go
    means, means_dt_ms = val_means(inputs.pop_resp, val_stims, plan)
    frame_plan = _at_frames(plan, 1)
    qc_means = val_means(inputs.pop_resp, val_stims, frame_plan)[0]
    specs = spectrograms(inputs.pop_stim, stims, plan)
    n_bands = int(inputs.pop_stim.shape[0])
    n_pop_rows = 0
    if pop_handle is not None:
        fill_population_rows(
            rows.counts,
            rows.destination(pop_handle),
            inputs.pop_resp,
            other_stims,
            plan,
            pop_keep,
            give_back=release_inputs,
        )
        n_pop_rows = int(pop_keep.sum())
    if release_inputs:
        inputs.pop_resp = inputs.pop_stim = None
        memory.release_free_memory()  # the population pass's scraps, before the site rows fill in

    # 3. site rows, with the QC of each site's val trials at the population frame width.
    # Sites are independent and their work is long numpy calls (bincount, gathers) that
    # release the GIL, so two run at once; each fills its own rows of ``rows``.
    def one_site(job: SiteJob, handle: int) -> list[dict]:
        return _site_rows(job, handle, rows, val_ids, qc_means, frame_plan, dt_ms=dt_ms)

    qc_rows = []
    with ThreadPoolExecutor(SITE_THREADS, thread_name_prefix="nat4etl-sites") as pool:
        for qc in pool.map(one_site, jobs, site_handles):  # in site order
            qc_rows += qc
            if progress is not None:
                progress.advance("rebin-sites", 1)
    responses = rows.table()

    common = {"dt_ms": plan.dt_ms, "n_bins": plan.n_bins, "window_s": plan.window_s}
    metadata = {
        "responses": {
            **common,
            "binning": BINNING_ROUTE,
            "site_fs_hz": sorted(set(inputs.site_fs_hz.values())),
            "est_source": SOURCE_POPULATION if plan.est_from_population else SOURCE_SITE,
            "spikes_before_0": early,
        },
        "val_means": {
            **common,
            "dt_ms": means_dt_ms,
            "n_bins": round(plan.window_s * 1000.0 / means_dt_ms),
        },
        "qc_val": {"dt_ms": frame_plan.dt_ms},
        "spectrograms": {
            **common,
            "n_bands": n_bands,
            "layout": "row-major (band, bin)",
            "frames_averaged": plan.frames_per_bin,
            "unavailable": plan.spectrogram_unavailable,
        },
    }
    diffs = [r["max_abs_diff"] for r in qc_rows if r["max_abs_diff"] is not None]
    counts = {
        "responses": responses.num_rows,
        "sites": len(sites),
        "val_means": means.num_rows,
        "spectrograms": specs.num_rows,
        "est_rows_from_population": n_pop_rows,  # every est row at 10 ms; else fallbacks
        "qc_max_abs_diff": max(diffs, default=None),
        "spikes_before_0": sum(u["spikes_before_0"] for u in early),
    }
    qc = pa.Table.from_pylist(qc_rows, schema=schema.QC_VAL.schema)
    return AreaOutputs(responses, means, qc, specs, metadata, counts)


# ============================================================================ stage
def read_population_signals(
    store, area: str, signals: tuple[str, ...], *, batch_rows: int = 32
) -> dict[str, np.ndarray]:
    """The population signals as (channels, samples) float32 arrays, read in small batches.

    Decoding the whole ``pop_signals`` list column at once costs about 4x its 300 MB in
    transient Parquet buffers (levels, pages) for A1; batches of a few channels keep the
    peak near the arrays themselves.
    """
    kept = handoff.take(store, "pop_signals", area)  # unpack ran in this build: no read
    if kept is not None and all(s in kept for s in signals):
        return {s: kept[s] for s in signals}
    pf = store.parquet_file("pop_signals", area)
    keys = pf.read(columns=["signal", "channel"])
    names = np.asarray(keys.column("signal").to_pylist(), dtype=object)
    channels = keys.column("channel").to_numpy()
    rank = np.zeros(len(names), dtype=np.int64)  # row -> position in its signal, by channel
    for name in set(names.tolist()):
        rows = np.flatnonzero(names == name)
        rank[rows[np.argsort(channels[rows], kind="stable")]] = np.arange(len(rows))
    out: dict[str, np.ndarray] = {}
    row = 0
    for batch in pf.iter_batches(batch_size=batch_rows, columns=["values"], use_threads=False):
        values = batch.column("values")
        lengths = pc.list_value_length(values).to_numpy(zero_copy_only=False)
        flat = values.flatten().to_numpy(zero_copy_only=False)
        starts = np.r_[0, np.cumsum(lengths)]
        for i in range(len(batch)):
            name = names[row + i]
            if name in signals:
                target = out.get(name)
                if target is None:
                    n_chans = int(np.sum(names == name))
                    # no NaN prefill: every row of the signal is written below
                    target = out[name] = memory.paged_empty((n_chans, lengths[i]))
                if lengths[i] != target.shape[1]:
                    raise InputMismatch(f"population {name!r} channels differ in length")
                target[rank[row + i]] = flat[starts[i] : starts[i + 1]]
        row += len(batch)
    missing = [s for s in signals if s not in out]
    if missing:
        raise InputMismatch(f"population recording of {area} lacks signals {missing}")
    pa.default_memory_pool().release_unused()  # decode buffers back to the OS
    return out


def read_in_batches(store, name: str, area: str, *, batch_rows: int = 64) -> pa.Table:
    """A table read a few rows at a time (list columns decode with ~3x transient memory)."""
    pf = store.parquet_file(name, area)
    batches = list(pf.iter_batches(batch_size=batch_rows, use_threads=False))
    table = pa.Table.from_batches(batches, schema=pf.schema_arrow.remove_metadata())
    pa.default_memory_pool().release_unused()
    return table


def load_area(store, area: str, *, sites: bool = True) -> AreaInputs:
    """Read one area's inputs through the store (the only I/O of this stage).

    ``sites=False`` leaves out the per-site spike times and trials (normalize needs only
    the population recording).
    """
    fs = _fs_hz(store, area)
    pop_fs_hz = population_fs_hz(store, area, fs)
    site_fs_hz = {}
    if sites:
        # unpack ran in this build: its spike samples (with_spike_samples), no read
        site_spikes = handoff.take(store, "site_spikes", area)
        if site_spikes is None:
            epochs = store.read_table("epochs", area=area, columns=["recording", "signal", "end_s"])
            site_spikes = with_spike_samples(
                read_in_batches(store, "site_spikes", area), fs, last_epoch_ends(epochs)
            )
        is_resp = pc.equal(site_spikes.column("signal"), RESP)
        if not pc.all(is_resp).as_py():  # a filter would copy every row (A1: 40 MB)
            site_spikes = site_spikes.filter(is_resp)
        for site, rec in zip(
            site_spikes.column("site").to_pylist(),
            site_spikes.column("recording").to_pylist(),
            strict=True,
        ):
            site_fs_hz[site] = float(fs[(rec, RESP)])
        trials = store.read_table("trials", area=area).drop_columns(["area"])
    else:
        site_spikes = schema.SITE_SPIKES.schema.empty_table()
        trials = schema.TRIALS.schema.empty_table()
    population = read_population_signals(store, area, (RESP, STIM))
    recordings = store.read_table(
        "recordings", area=area, columns=["kind", "site", "file", "member"]
    )
    site_files = {
        r["site"]: (r["file"], r["member"]) for r in recordings.to_pylist() if r["kind"] == "site"
    }
    pop_file = next((r["file"] for r in recordings.to_pylist() if r["kind"] == "population"), None)
    return AreaInputs(
        stims=store.read_table("stims", area=area).drop_columns(["area"]),
        cells=store.read_table("cells", area=area).drop_columns(["area"]),
        trials=trials,
        site_spikes=site_spikes,
        pop_resp=population[RESP],
        pop_stim=population[STIM],
        pop_fs_hz=pop_fs_hz,
        site_fs_hz=site_fs_hz,
        site_files=site_files,
        pop_file=pop_file,
    )


def _fs_hz(store, area: str) -> dict[tuple[str, str], float]:
    """(recording, signal) -> fs_hz, from the signals table."""
    signals = store.read_table("signals", area=area)
    return {
        (r["recording"], r["signal"]): r["fs_hz"]
        for r in signals.select(["recording", "signal", "fs_hz"]).to_pylist()
    }


def population_fs_hz(store, area: str, fs: dict | None = None) -> float:
    """The population recording's one sampling rate (resp and stim must share it)."""
    fs = _fs_hz(store, area) if fs is None else fs
    recordings = store.read_table("recordings", area=area)
    pop = [r for r in recordings.to_pylist() if r["kind"] == "population"]
    if len(pop) != 1:
        raise InputMismatch(f"area {area}: expected one population recording, found {len(pop)}")
    pop_name = pop[0]["recording"]
    pop_fs = {fs[(pop_name, s)] for s in (RESP, STIM)}
    if len(pop_fs) != 1:
        raise InputMismatch(f"area {area}: population resp and stim differ in fs ({pop_fs})")
    return float(pop_fs.pop())


def run(store, settings, progress) -> dict:
    """Every area's tables. An area's inputs are read while the previous area's tables are
    still being written (:class:`WriteBehind`); its rows are allocated only once those
    writes are done, so two areas' responses are never in memory together."""
    summary = {}
    areas = store.areas_with("stims", settings.areas, made_by="parse-epochs")
    with memory.large_blocks_unmapped(), WriteBehind(store) as writer:
        # Smallest population first: an area's population handed over by unpack waits in
        # memory until its turn, and the small one waiting through A1's peak costs more.
        for area in sorted(areas, key=lambda a: _file_size(store.table_file("pop_signals", a))):
            inputs = load_area(store, area)
            writer.wait()
            memory.release_free_memory()
            progress.start("rebin-sites", total=len(set(inputs.site_fs_hz)), unit="sites")
            try:
                out = rebin_area(
                    inputs, dt_ms=settings.dt_ms, progress=progress, release_inputs=True
                )
            finally:
                progress.done("rebin-sites")
            del inputs  # the site spikes: free them before the next area is read
            # what the site pass freed (Arrow's pool, the site threads' heaps) goes back
            # before the responses are encoded, whose buffers come on top of them
            memory.release_free_memory()
            summary[area] = _queue_writes(writer, area, out, settings, progress)
            del out  # held only by the writer now: gone once written, not through the next area
    return {area: summary[area] for area in areas}


def _queue_writes(writer: WriteBehind, area: str, out: AreaOutputs, settings, progress) -> dict:
    """Hand one area's tables to the writer and log what was made; returns its counts."""
    for name in CONTRACTS["rebin-sites"].writes:
        writer.submit(name, getattr(out, name), area=area, metadata=out.metadata[name])
    early = out.metadata["responses"]["spikes_before_0"]
    if early:
        n_spikes = out.counts["spikes_before_0"]
        n_uncounted = sum(u[SPIKES_UNCOUNTED] for u in early)
        progress.log(
            f"{area}: spike times before 0: {n_spikes} in {len(early)} unit(s); NEMS0 counts "
            "them from the end of their site's raster, and so does nat4etl "
            f"({n_uncounted} earlier than the raster is long, where NEMS0 fails, are not "
            "counted); per unit in the responses metadata, `spikes_before_0`",
            level="warning",
        )
    if out.metadata["spectrograms"]["unavailable"]:
        progress.log(
            f"{area}: no spectrograms: {out.metadata['spectrograms']['unavailable']}",
            level="warning",
        )
    progress.log(_counts_line(area, settings.dt_ms, out.counts), **out.counts)
    return out.counts


def _counts_line(area: str, dt_ms: float, c: dict) -> str:
    """The counts in words, as parse-epochs logs its own (``--json`` keeps them as keys)."""
    diff = c["qc_max_abs_diff"]
    qc = (
        "no val trials to check against the population"
        if diff is None
        else f"site val trials average within {diff:.2g} spikes per bin of the population's"
    )
    return (
        f"{area}: rebin-sites at {dt_ms:g} ms: {c['responses']} responses rows "
        f"({c['est_rows_from_population']} est rows from the population), {c['sites']} sites, "
        f"{c['val_means']} val_means rows, {c['spectrograms']} spectrograms; {qc} (qc_val); "
        f"{c['spikes_before_0']} spike times before 0"
    )


def _file_size(path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # load_area says what is missing

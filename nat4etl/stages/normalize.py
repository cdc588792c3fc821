"""`normalize`: min-max constants for both presets; raw values stay in their tables.

Two conventions are in use for NAT4 (``nat4-dataset.md``, "defects") and both are
legitimate, so both are always written and the reader applies either on read:

- ``deepstrf`` (the reference loader): spectrogram ``ln(1 + x)``, then ONE min-max over
  every band and sample; responses ONE min-max over every unit and sample.
- ``nems`` (Pennington & David, NEMS0 ``norm.l1``): spectrogram ``ln(1 + x / 0.1)``, then
  min-max PER BAND; responses min-max PER UNIT, no log.

In both, constants come from the whole population recording (before any est/val split),
NaN ignored. A zero range (a flat signal or unit): ``nems`` counts it as 1, so values
become ``y - min`` (NEMS0); ``deepstrf`` leaves ``y`` unscaled (the reference loader scaled
only when max > min). After scaling, ``nems`` sets values below 1e-6 to 0 (NEMS0
``_normalize_data``); ``deepstrf`` does not (the reference loader has no such cut), it
only sets float32 rounding's tiny negatives to 0. Val single trials are scaled with the same constants as the
est responses, so all responses of a preset share one scale (the reference loader left
val trials as raw counts: its scale defect).

The population recording is at its own frame width (10 ms). At a bin width of k frames
the constants are taken from the recording re-binned the same way the tables are
(spectrogram frames averaged, counts summed, per sound epoch). At a width that is not a
whole number of frames there are no spectrograms; response constants then come from the
responses table itself: est rows plus the mean of each val sound's trials, i.e. what the
population recording holds, binned from the site files.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nat4etl import binning, schema
from nat4etl.errors import InputMismatch, MissingTableError
from nat4etl.stages import rebin_sites as rs

Preset = Literal["deepstrf", "nems"]
PRESETS: tuple[Preset, ...] = ("deepstrf", "nems")
SPECTROGRAM, RESPONSES = "spectrogram", "responses"
GLOBAL = -1
#: values below this after scaling are set to 0 (NEMS0 ``_normalize_data``)
FLOOR = 1e-6


@dataclass(frozen=True)
class Rule:
    """How one preset treats one signal: the log offset and whether min-max is per channel."""

    offset: float  # d in ln(1 + x / d); 0 = no log
    per_channel: bool
    floor: float = 0.0  # values below it after scaling -> 0 (0: negatives only)
    #: a zero range leaves y as it is (the reference loader), instead of counting as 1
    flat_unscaled: bool = False


RULES: dict[tuple[str, str], Rule] = {
    ("deepstrf", SPECTROGRAM): Rule(offset=1.0, per_channel=False, flat_unscaled=True),
    ("deepstrf", RESPONSES): Rule(offset=0.0, per_channel=False, flat_unscaled=True),
    ("nems", SPECTROGRAM): Rule(offset=0.1, per_channel=True, floor=FLOOR),
    ("nems", RESPONSES): Rule(offset=0.0, per_channel=True, floor=FLOOR),
}


# ============================================================================ math
def log_compress(x: np.ndarray, offset: float) -> np.ndarray:
    """``ln(1 + x / offset)`` (NEMS0 ``_dlog``); ``offset`` 0 returns ``x`` unchanged."""
    if offset == 0:
        return x
    return np.log1p(x / offset) if offset != 1 else np.log1p(x)


def constants(rows: Rows, rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) of the log-compressed values, NaN ignored: per channel or one pair over
    everything, as ``rule`` says. A channel with no finite extreme gets NaN. The log is
    monotonic, so the extremes of the raw values are compressed, not every value."""
    if not rule.per_channel:
        lo = np.array([np.fmin.reduce(rows.lo, initial=np.inf)], np.float64)
        hi = np.array([np.fmax.reduce(rows.hi, initial=-np.inf)], np.float64)
    else:
        lo = np.full(rows.n_channels, np.inf)
        hi = np.full(rows.n_channels, -np.inf)
        np.fmin.at(lo, rows.channel_of_row, rows.lo)
        np.fmax.at(hi, rows.channel_of_row, rows.hi)
    empty = ~np.isfinite(lo)
    lo[empty], hi[empty] = np.nan, np.nan
    return log_compress(lo, rule.offset), log_compress(hi, rule.offset)


def float32_constants(
    lo: np.ndarray | float, hi: np.ndarray | float, *, flat_unscaled: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(min, range) as float32, as :func:`scale` and the reader apply them.

    A zero range counts as 1; with ``flat_unscaled`` (``deepstrf``) a channel whose max is
    not above its min (float64, as the reference loader tested it) gets min 0 and range 1,
    so its values stay as they are.
    """
    lo32 = np.asarray(lo, dtype=np.float32)
    span = np.asarray(hi, dtype=np.float32) - lo32
    flat = span == 0
    if flat_unscaled:
        with np.errstate(invalid="ignore"):
            flat = flat | ~(np.asarray(hi, dtype=np.float64) > np.asarray(lo, dtype=np.float64))
        lo32 = np.where(flat, np.float32(0), lo32).astype(np.float32)
    return lo32, np.where(flat, np.float32(1), span).astype(np.float32)


def scale(
    x: np.ndarray,
    offset: float,
    lo: np.ndarray | float,
    hi: np.ndarray | float,
    *,
    in_place: bool = False,
    floor: float = FLOOR,
    flat_unscaled: bool = False,
) -> np.ndarray:
    """Normalize ``x``: log-compress, ``(y - lo) / range``, values < ``floor`` -> 0 (the
    preset's :attr:`Rule.floor`: 1e-6 for ``nems``, 0 for ``deepstrf``), NaN kept.

    ``lo`` and ``hi`` broadcast against ``x``; a zero range counts as 1, or with
    ``flat_unscaled`` (the preset's :attr:`Rule.flat_unscaled`) leaves ``y`` as it is
    (:func:`float32_constants`). Returns float32, written into ``x`` itself when
    ``in_place`` (``x`` must then be writable float32), so a large array is normalized
    without temporaries of its size.
    """
    y = x if in_place else np.array(x, dtype=np.float32)
    lo32, span = float32_constants(lo, hi, flat_unscaled=flat_unscaled)
    if offset:
        if offset != 1:
            np.divide(y, np.float32(offset), out=y)
        np.log1p(y, out=y)
    np.subtract(y, lo32, out=y)
    np.divide(y, span, out=y)
    np.copyto(y, np.float32(0), where=y < floor)  # NaN compares False: it stays NaN
    np.add(y, np.float32(0), out=y)  # -0.0 -> +0.0
    return y


# ============================================================================ tables
@dataclass
class Rows:
    """Rows of raw values, each belonging to one channel (band or cell), kept as each row's
    extremes (NaN ignored; NaN for a row with no value): all the constants need, and what
    ``pop_signals`` stores, so the population recording is not decoded to get them."""

    lo: np.ndarray  # (rows,)
    hi: np.ndarray
    channel_of_row: np.ndarray
    n_channels: int

    @classmethod
    def of_values(cls, values: np.ndarray, channel_of_row: np.ndarray, n_channels: int) -> Rows:
        lo = np.fmin.reduce(values, axis=1, initial=np.inf)
        hi = np.fmax.reduce(values, axis=1, initial=-np.inf)
        return cls(lo, hi, channel_of_row, n_channels)

    @classmethod
    def of_matrix(cls, values: np.ndarray) -> Rows:
        """One row per channel."""
        return cls.of_values(values, np.arange(len(values)), len(values))


def constants_table(spectrogram: Rows | None, responses: Rows) -> pa.Table:
    """Rows of norm_constants for both presets (spectrogram None when unavailable)."""
    rows: dict[str, list] = {k: [] for k in ("method", "signal", "channel", "offset", "min", "max")}
    for method in PRESETS:
        for signal, data in ((SPECTROGRAM, spectrogram), (RESPONSES, responses)):
            if data is None:
                continue
            rule = RULES[(method, signal)]
            lo, hi = constants(data, rule)
            channels = np.arange(len(lo)) if rule.per_channel else np.array([GLOBAL])
            rows["method"] += [method] * len(lo)
            rows["signal"] += [signal] * len(lo)
            rows["channel"] += channels.tolist()
            rows["offset"] += [rule.offset] * len(lo)
            rows["min"] += lo.tolist()
            rows["max"] += hi.tolist()
    return pa.Table.from_pydict(rows, schema=schema.NORM_CONSTANTS.schema)


def recording_at_bin_width(
    pop: np.ndarray, stims: pa.Table, plan: rs.BinPlan, *, counts: bool
) -> np.ndarray:
    """The population signal (channels, samples) at the store's bin width.

    At the population's own width, every sample as recorded; at k frames per bin, each
    sound's epoch re-binned (counts summed, spectrogram frames averaged) and concatenated.
    """
    k = plan.frames_per_bin
    if k == 1:
        return pop
    rebin = binning.sum_frames if counts else binning.mean_frames
    starts = rs.pop_starts(stims, plan.pop_fs_hz)
    return np.concatenate(
        [rebin(binning.cut_frames(pop, int(s), plan.pop_frames), k) for s in starts], axis=1
    )


def responses_as_recording(responses: pa.Table, n_cells: int) -> Rows:
    """One row per (stim, cell): the est trial, or the mean of a val sound's trials.

    What the population recording holds, binned from the site files, for bin widths the
    recording cannot be re-binned to. ``responses`` must be sorted by (stim, cell, trial),
    as the store writes it.
    """
    counts = rs.vector_view(responses, "counts")
    stim = responses.column("stim").to_numpy().astype(np.int64)
    cell = responses.column("cell").to_numpy().astype(np.int64)
    if len(counts) == 0:
        return Rows.of_values(np.empty((0, counts.shape[1])), cell, n_cells)
    pairs, means = rs.pair_means(stim * n_cells + cell, counts)
    return Rows.of_values(means, pairs % n_cells, n_cells)


# ============================================================================ stage
def stored_extremes(store, area: str, signal: str) -> Rows:
    """One population signal's per-channel extremes as unpack stored them (no decode)."""
    table = store.read_table(
        "pop_signals", area=area, columns=["signal", "channel", "min_value", "max_value"]
    )
    table = table.filter(pc.equal(table.column("signal"), signal))
    if table.num_rows == 0:
        raise InputMismatch(f"population recording of {area} lacks signal {signal!r}")
    channel = table.column("channel").to_numpy()
    order = np.argsort(channel, kind="stable")
    lo, hi = (
        table.column(c).to_numpy()[order].astype(np.float64) for c in ("min_value", "max_value")
    )
    return Rows(lo, hi, np.arange(len(order)), len(order))


def load_and_compute(store, area: str) -> tuple[pa.Table, dict]:
    """One area's constants and the table metadata, read through the store."""
    responses_md = store.table_metadata("responses", area)
    dt_ms = float(responses_md["dt_ms"])
    stims = store.read_table("stims", area=area).drop_columns(["area"])
    plan = rs.plan_bins(stims, dt_ms=dt_ms, pop_fs_hz=rs.population_fs_hz(store, area))
    if plan.frames_per_bin is None:
        n_cells = store.read_table("cells", area=area, columns=["cell"]).num_rows
        responses = store.read_table("responses", area=area, columns=["stim", "cell", "counts"])
        resp = responses_as_recording(responses, n_cells)
        spec, source = None, "responses table (est rows + val trial means)"
    elif plan.frames_per_bin == 1:
        resp, spec = (stored_extremes(store, area, s) for s in (rs.RESP, rs.STIM))
        source = "population recording, every sample"
    else:
        inputs = rs.load_area(store, area, sites=False)
        resp = Rows.of_matrix(
            recording_at_bin_width(inputs.pop_resp, inputs.stims, plan, counts=True)
        )
        spec = Rows.of_matrix(
            recording_at_bin_width(inputs.pop_stim, inputs.stims, plan, counts=False)
        )
        source = f"population recording, each sound re-binned to {dt_ms:g} ms"
    table = constants_table(spec, resp)
    metadata = {
        "dt_ms": dt_ms,
        "source": source,
        "formula": "y = ln(1 + x/offset) (offset 0: y = x); (y - min) / (max - min), "
        "a zero range counts as 1 for nems and leaves y unscaled for deepstrf; values < 0 "
        "-> 0, and for nems values < 1e-6 -> 0; NaN stays NaN",
        "presets": list(PRESETS),
    }
    return table, metadata


def run(store, settings, progress) -> dict:
    """Constants of every area. The areas are read and reduced on two threads (Parquet
    decoding and numpy reductions release the GIL), so PEG's population is decoded while
    A1's is; results are written in area order."""
    areas = store.areas_with("stims", settings.areas, made_by="parse-epochs")
    for area in areas:
        if not store.has("responses", area):
            raise MissingTableError(
                f"no responses for {area} in {store.published_at}; run `nat4etl rebin-sites "
                f"--out {store.published_at}` first"
            )
    with ThreadPoolExecutor(2, thread_name_prefix="nat4etl-normalize") as pool:
        computed = [pool.submit(load_and_compute, store, area) for area in areas]
        return {
            area: _write_area(store, area, *job.result(), settings, progress)
            for area, job in zip(areas, computed, strict=True)
        }


def _write_area(store, area: str, table: pa.Table, metadata: dict, settings, progress) -> dict:
    """Write one area's constants and report channels without any."""
    metadata["default_norm"] = settings.norm
    store.write_table("norm_constants", table, area=area, metadata=metadata)
    bad = table.filter(pc.is_nan(table.column("min")))
    if bad.num_rows:
        units = sorted(set(bad.column("channel").to_pylist()))
        progress.log(
            f"{area}: no normalization constants (all NaN) for channels {units}",
            level="warning",
        )
    progress.log(f"{area}: normalization constants ({metadata['source']}), default {settings.norm}")
    return {"rows": table.num_rows, "default_norm": settings.norm}

"""Spike counts per bin exactly as the NEMS0 reference route computes them.

The reference (``nems0-format.md`` §3, §4) never bins spike times at the target width.
It rasterizes each unit at the site file's own rate (1 kHz): spike ``t`` lands in sample
``floor(t * fs)`` (a float64 product, counts not booleans); it cuts each presentation at
``[round(start * fs), round(end * fs))`` with round half to even; then it sums consecutive
groups of ``dt * fs / 1000`` samples. Epoch starts in NAT4 are not on a 10 ms grid, so
binning directly at 100 Hz moves spikes across bin edges in about 1% of bins. Everything
here follows the reference route, vectorised over all units and presentations of a site.

Nothing here knows NAT4; :mod:`nat4etl.stages.rebin_sites` decides what to bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from nat4etl.errors import ConfigError

#: float tolerance when checking that a bin width is a whole number of samples
_TOL = 1e-9
#: cap on the (units x windows x bins) cells counted at once, so a 1 ms bin width on a
#: long session does not allocate gigabytes of int64 counters
_MAX_CELLS_PER_CHUNK = 1 << 24


#: the sample given to a spike time that is NaN (no sample: never counted, as any < 0)
NO_SAMPLE = -1


def spike_samples(
    spike_times_s: np.ndarray,
    fs_hz: float,
    *,
    dtype=np.int64,
    raster_samples: int | None = None,
) -> np.ndarray:
    """Sample index of each spike: ``floor(t * fs)`` in float64, as ``PointProcess.rasterize``.

    With ``raster_samples`` (the raster's length, :func:`raster_samples`) a sample ``b``
    in ``[-raster_samples, 0)``, a spike before time 0, is ``raster_samples + b``: NEMS0
    indexes the raster with it, and a negative index counts from the end (§3). An earlier
    one would make NEMS0 fail; like a NaN time it gets :data:`NO_SAMPLE` (never counted),
    as does any spike before 0 without ``raster_samples``. With ``dtype=np.int32`` samples
    beyond its range are clipped to it: no presentation window reaches 2**31 samples (25
    days at 1 kHz), so a clipped spike is still outside every window.
    """
    samples = np.floor(np.asarray(spike_times_s, dtype=np.float64) * float(fs_hz))
    if raster_samples is not None:
        before_0 = samples < 0
        if before_0.any():
            before_0 &= samples >= -raster_samples
            np.add(samples, float(raster_samples), out=samples, where=before_0)
    upper = min(float(np.iinfo(dtype).max), 2.0**62)  # a float64 that casts back exactly
    np.clip(samples, NO_SAMPLE, upper, out=samples)
    samples[np.isnan(samples)] = NO_SAMPLE
    return samples.astype(dtype)


def raster_samples(last_epoch_end_s: float, spike_times_s: np.ndarray, fs_hz: float) -> int:
    """Length of a PointProcess signal rasterized at ``fs_hz``, as NEMS0 makes it (§3):
    ``round(fs * max_time)`` half to even, ``max_time`` the recording's last epoch end
    when it is positive (NaN ends ignored), else its latest spike (0 with no spikes)."""
    max_time = last_epoch_end_s
    if not max_time > 0:  # NaN too: pandas' max skips NaN, and no end was > 0
        finite = np.asarray(spike_times_s, dtype=np.float64)
        finite = finite[~np.isnan(finite)]
        max_time = float(finite.max()) if len(finite) else 0.0
    return int(np.round(float(fs_hz) * max_time))


def within_segments(bounds_s: np.ndarray, segments_s: np.ndarray) -> np.ndarray:
    """Per (start, end) row of ``bounds_s``: does it lie within some segment ``[a, b]``,
    both ends included? NEMS0's ``boundary_mode='exclude'`` keeps only those (§4)."""
    bounds = np.asarray(bounds_s, dtype=np.float64).reshape(-1, 2)
    segments = np.asarray(segments_s, dtype=np.float64).reshape(-1, 2)
    starts_in = bounds[:, None, 0] >= segments[None, :, 0]
    ends_in = bounds[:, None, 1] <= segments[None, :, 1]
    return (starts_in & ends_in).any(axis=1)


def segment_indices(
    bounds_s: np.ndarray, segments_s: np.ndarray, fs_hz: float
) -> list[tuple[int, int]]:
    """Sample ``[lb, ub)`` of each (start, end) row of ``bounds_s`` in data that is the
    concatenation of ``segments_s`` (seconds of the original time base), by NEMS0's
    ``get_epoch_indices`` loop (§4), which assumes both in time order. An epoch outside
    the segment the loop is in moves it to the next segment, so once the segments run out
    the rest get no indices: the list is then shorter than ``bounds_s``.
    """
    bounds = np.asarray(bounds_s, dtype=np.float64).reshape(-1, 2).tolist()
    segments = np.asarray(segments_s, dtype=np.float64).reshape(-1, 2).tolist()
    fs = float(fs_hz)
    out: list[tuple[int, int]] = []
    offset = s = e = 0
    while s < len(segments) and e < len(bounds):
        seg_start, seg_end = segments[s]
        while True:
            start, end = bounds[e]
            if start <= seg_start and end >= seg_end:  # the whole segment
                out.append((offset, offset + round((seg_end - seg_start) * fs)))
                e += 1
            elif seg_start <= start < seg_end:
                first = offset + round((start - seg_start) * fs)
                out.append((first, offset + round((min(end, seg_end) - seg_start) * fs)))
                e += 1
            else:
                s += 1
                offset += round((seg_end - seg_start) * fs)
                break
            if e >= len(bounds):
                break
    return out


def epoch_samples(times_s: np.ndarray, fs_hz: float) -> np.ndarray:
    """Epoch bound -> sample index, rounded half to even (NEMS0 ``get_epoch_indices``).

    NEMS0 first snaps bounds to ``np.round(t * fs) / fs`` and then rounds ``t * fs`` again;
    the second rounding returns the first one's integer, so one ``np.round`` is the same.
    """
    return np.round(np.asarray(times_s, dtype=np.float64) * float(fs_hz)).astype(np.int64)


def samples_per_bin(dt_ms: float, fs_hz: float) -> int:
    """How many samples at ``fs_hz`` make one ``dt_ms`` bin; a ConfigError if not whole."""
    exact = dt_ms * fs_hz / 1000.0
    n = round(exact)
    if n < 1 or abs(exact - n) > _TOL * max(1.0, exact):
        widths = whole_sample_widths_ms(fs_hz)
        hint = ", ".join(f"{w:d}" for w in widths[:6]) + (", ..." if len(widths) > 6 else "")
        msg = (
            f"dt_ms={dt_ms:g} is not a whole number of samples at the site files' "
            f"{fs_hz:g} Hz ({exact:g} samples); responses are summed from whole samples. "
            + (f"Widths that are: {hint} ms" if len(widths) else "No bin of whole ms up to 10 s is")
        )
        raise ConfigError(msg)
    return int(n)


def whole_sample_widths_ms(fs_hz: float, up_to_ms: int = 10_000) -> np.ndarray:
    """The bin widths of whole milliseconds, up to ``up_to_ms``, that hold a whole number
    of samples at ``fs_hz`` (as :func:`samples_per_bin` accepts them): none means the
    rate itself is odd (99 Hz, a wrong JSON fs), not the chosen width."""
    widths = np.arange(1, up_to_ms + 1, dtype=np.float64)
    exact = widths * float(fs_hz) / 1000.0
    n = np.round(exact)
    whole = (n >= 1) & (np.abs(exact - n) <= _TOL * np.maximum(1.0, exact))
    return widths[whole].astype(np.int64)


def bins_per_window(window_samples: int, group: int, *, what: str, dt_ms: float) -> int:
    """Bins in one presentation window; a ConfigError unless ``group`` divides it."""
    if window_samples % group:
        msg = (
            f"dt_ms={dt_ms:g} does not divide the {what} ({window_samples} samples = "
            f"{window_samples / group:g} bins of {group} samples); pick a bin width that "
            "divides it"
        )
        raise ConfigError(msg)
    return window_samples // group


def count_windows(
    unit_samples: Sequence[np.ndarray],
    window_start: np.ndarray,
    window_stop: np.ndarray,
    *,
    n_bins: int,
    group: int,
) -> np.ndarray:
    """Spike counts of every unit in every window, summed over ``group`` samples per bin.

    Parameters
    ----------
    unit_samples
        Per unit, the spike sample indices (:func:`spike_samples`), any order.
    window_start, window_stop
        Per window, the first and one-past-last sample (:func:`epoch_samples`).
    n_bins
        Bins per window; a window spans ``n_bins * group`` samples from its start.
    group
        Samples summed into one bin (``dt * fs / 1000``).

    Returns
    -------
    numpy.ndarray
        float32 ``(units, windows, n_bins)``. Bins not wholly inside ``[start, stop)`` are
        NaN (NEMS0 NaN-pads short occurrences); samples past ``start + n_bins * group``
        are not counted.
    """
    starts = np.asarray(window_start, dtype=np.int64)
    stops = np.minimum(np.asarray(window_stop, dtype=np.int64), starts + n_bins * group)
    n_units, n_windows = len(unit_samples), len(starts)
    out = np.zeros((n_units, n_windows, n_bins), dtype=np.float32)
    if n_units == 0 or n_windows == 0:
        return out
    units_per_chunk = max(1, _MAX_CELLS_PER_CHUNK // max(1, n_windows * n_bins))
    for layer in _non_overlapping_layers(starts, stops):
        lookup = _bin_lookup(starts[layer], stops[layer], n_bins, group)
        for first in range(0, n_units, units_per_chunk):
            chunk = unit_samples[first : first + units_per_chunk]
            counts = _count_chunk(chunk, lookup, len(layer) * n_bins)
            out[first : first + len(chunk), layer, :] = counts.reshape(
                len(chunk), len(layer), n_bins
            )
    covered = (stops - starts)[:, None] // group  # whole bins inside each window
    out[:, np.arange(n_bins)[None, :] >= covered] = np.nan
    return out


def _non_overlapping_layers(starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
    """Split windows into groups with no overlap, so each sample maps to one bin per group.

    Presentations of one session never overlap in practice: this is one group. Overlaps
    (a malformed epoch table) still count correctly, in a few more passes.
    """
    order = np.argsort(starts, kind="stable")
    if np.all(starts[order][1:] >= stops[order][:-1]):
        return [order]
    layer_ends: list[int] = []
    members: list[list[int]] = []
    for w in order:
        for k, end in enumerate(layer_ends):
            if starts[w] >= end:
                layer_ends[k] = max(end, stops[w])
                members[k].append(w)
                break
        else:
            layer_ends.append(stops[w])
            members.append([w])
    return [np.asarray(m, dtype=np.int64) for m in members]


def _bin_lookup(starts: np.ndarray, stops: np.ndarray, n_bins: int, group: int) -> np.ndarray:
    """Array over samples: the flat (window, bin) index each sample adds to, or -1.

    Filled window by window (a few hundred slices per site): building the same map with
    whole-session index arrays held five int64 copies of every sample at once, which with
    two sites binned in parallel was the largest transient of rebin-sites.
    """
    length = np.maximum(stops - starts, 0)
    size = int(max(stops.max(initial=0), 0))
    # int32 whenever the flat indices fit: half the memory to touch (A1: 290 -> 145 MB)
    dtype = np.int32 if len(starts) * n_bins < 2**31 else np.int64
    lookup = np.full(size, -1, dtype=dtype)
    if int(length.sum()) == 0:
        return lookup
    bin_of = (np.arange(int(length.max())) // group).astype(dtype)  # offset -> its bin
    for w, (start, n) in enumerate(zip(starts.tolist(), length.tolist(), strict=True)):
        lo = max(start, 0)  # NEMS0 excludes epochs that start before 0; never index backwards
        if start + n > lo:
            lookup[lo : start + n] = w * n_bins + bin_of[lo - start : n]
    return lookup


def _count_chunk(chunk: Sequence[np.ndarray], lookup: np.ndarray, cells: int) -> np.ndarray:
    """bincount of (unit, flat bin) over the spikes of a few units."""
    sizes = np.fromiter((len(s) for s in chunk), dtype=np.int64, count=len(chunk))
    samples = np.concatenate(chunk) if len(chunk) else np.empty(0, np.int64)
    unit = np.repeat(np.arange(len(chunk)), sizes)
    inside = (samples >= 0) & (samples < len(lookup))
    flat = lookup[samples[inside]]
    hit = flat >= 0
    key = unit[inside][hit] * cells + flat[hit]  # int64 as unit is, whatever the lookup
    return np.bincount(key, minlength=len(chunk) * cells)


def cut_frames(values: np.ndarray, start: int, n_frames: int) -> np.ndarray:
    """``values[..., start:start + n_frames]``, NaN-padded past the end (NEMS0 extract_epoch)."""
    stop = min(start + n_frames, values.shape[-1])
    if start >= 0 and stop - start == n_frames:
        return values[..., start:stop]
    out = np.full((*values.shape[:-1], n_frames), np.nan, dtype=values.dtype)
    if stop > start >= 0:
        out[..., : stop - start] = values[..., start:stop]
    return out


def sum_frames(frames: np.ndarray, k: int) -> np.ndarray:
    """Sum consecutive groups of ``k`` frames along the last axis (counts re-binned)."""
    if k == 1:
        return frames
    return frames.reshape(*frames.shape[:-1], frames.shape[-1] // k, k).sum(axis=-1)


def mean_frames(frames: np.ndarray, k: int) -> np.ndarray:
    """Average consecutive groups of ``k`` frames along the last axis (spectrogram re-binned)."""
    if k == 1:
        return frames
    return frames.reshape(*frames.shape[:-1], frames.shape[-1] // k, k).mean(axis=-1)


def frames_per_bin(dt_ms: float, frame_ms: float) -> int | None:
    """``dt_ms / frame_ms`` when it is a whole number, else None."""
    ratio = dt_ms / frame_ms
    k = round(ratio)
    return k if k >= 1 and math.isclose(ratio, k, rel_tol=0, abs_tol=_TOL) else None

"""`unpack`: the Zenodo archives of each area -> raw tables, without loss and without
extracting anything to disk.

Per area it reads ``<area>_NAT4_ozgf.fs100.ch18.tgz`` (the population recording),
``<area>_single_sites.zip`` (one NEMS0 tgz per site) and ``<area>_pred_correlation.csv``,
and writes ``recordings``, ``signals``, ``pop_signals``, ``site_spikes``, ``epochs``,
``pred_correlation`` and ``source_members``. Not ``wav.zip``: parse-epochs lists it and
align-wav decodes it, so that its arrival reruns those two only (:mod:`nat4etl.stages`).

Memory: the population CSVs stream from the tar into one float32 (C, T) array per signal
(``nems0_csv.iter_raster_blocks``), which Arrow then wraps without copying; the
population goes to the background writer (:mod:`nat4etl.stages.background`) and is
dropped once written, while the site files are decoded.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nat4etl import memory, nat4, schema
from nat4etl.errors import FormatError, MissingMember
from nat4etl.formats import archive, nems0, nems0_csv
from nat4etl.formats.pred_correlation import read_pred_correlation
from nat4etl.stages import handoff
from nat4etl.stages.background import WriteBehind
from nat4etl.stages.rebin_sites import last_epoch_ends, with_spike_samples
from nat4etl.store import in_key_order

_MAX_LIST_VALUES = 2**31 - 1  # list<float32> offsets are int32
_CHUNK_VALUES = 1 << 22  # population values per Arrow chunk (16 MB of float32)
#: the raw pred_correlation table cannot hold ``area``: the store's partition column
PRED_AREA_COLUMN = "pred_area"


# ============================================================================ population
class ChannelBuffer:
    """Rows of a (T, C) CSV appended into a (C, capacity) float32 array: one copy only.

    T is unknown until the CSV ends, and growing an array would hold two copies. So the
    buffer reserves room for the most rows the member can hold (every field takes at
    least 2 bytes: a digit and a delimiter) as an anonymous mapping: pages are committed
    only when written, so resident memory follows the data, not the reservation;
    :meth:`finish` leaves each row where it was written. The mapping reads as zeros, so
    a block of mostly zeros (`nems0_csv.SparseRows`) writes only its other values.
    """

    def __init__(self, n_chans: int, size_bytes: int):
        self.n_samples = 0
        self.capacity = size_bytes // (2 * n_chans) + 1
        self._data = memory.paged_zeros((n_chans, self.capacity))

    def append(self, block: np.ndarray | nems0_csv.SparseRows) -> None:
        n = len(block)
        if self.n_samples + n > self.capacity:  # cannot happen: see the class docstring
            msg = f"more rows than {self.capacity}, the most the member's size allows"
            raise FormatError(msg)
        nems0_csv.place_rows(self._data, self.n_samples, block)
        self.n_samples += n

    def finish(self) -> np.ndarray:
        """The (C, T) values where they were written: each row contiguous, rows spaced by
        the reservation. Nothing moves (moving them together cost A1 0.25 s and another
        300 MB of first-touched pages); the room between rows was never written, so it
        holds no memory."""
        return self._data[:, : self.n_samples]


class _Counted(io.RawIOBase):
    """Reports bytes read to the progress task while the parser pulls them."""

    def __init__(self, stream: BinaryIO, advance: Callable[[int], None]):
        super().__init__()
        self._stream = stream
        self._advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self._stream.readinto(b)
        if n:
            self._advance(n)
        return n or 0


def stream_rasters(progress, file_name: str) -> nems0.DataHandler:
    """A ``read_recording`` data handler: rasterized CSV -> (C, T) float32, streamed."""

    def handle(member: nems0.DataMember, stream: BinaryIO) -> Any:
        if member.kind != "csv":
            return None  # HDF5: a signal nothing here reads (the caller says so)
        task = f"{file_name}:{member.name}"
        progress.start(task, total=member.size_bytes, unit="B")
        try:
            counted = _Counted(stream, lambda n: progress.advance(task, n))
            buffer = None
            # the width comes from the CSV's first row: the JSON chans need not match it
            # (see _check_population)
            for block in nems0_csv.iter_raster_blocks(
                counted, path=member.path, member=member.qualname, sparse=True
            ):
                if buffer is None:
                    buffer = ChannelBuffer(block.shape[1], member.size_bytes)
                buffer.append(block)
        finally:
            progress.done(task)
        if buffer is not None:
            return buffer.finish()
        chans = member.header.chans if member.header is not None else None
        return np.zeros((len(chans) if chans else 0, 0), np.float32)  # no rows: no width

    return handle


def channel_lists(values: np.ndarray) -> pa.ChunkedArray:
    """(C, T) float32 -> one list<float32> per channel, zero-copy; chunked so that no
    chunk's int32 offsets overflow, and into pieces of at most ``_CHUNK_VALUES`` values:
    the Parquet writer builds its level buffers (4 bytes per value) one chunk at a time,
    so one 300 MB chunk would cost another 300 MB while it is written."""
    n_chans, n_samples = values.shape
    if not values.flags.c_contiguous:  # rows spaced apart (ChannelBuffer): one per chunk
        one = pa.array(np.array([0, n_samples], dtype=np.int32))
        chunks = [pa.ListArray.from_arrays(one, pa.array(row)) for row in values]
        return pa.chunked_array(chunks, pa.list_(pa.float32()))
    flat = values.reshape(-1)
    per_chunk = max(1, min(_MAX_LIST_VALUES, _CHUNK_VALUES) // max(n_samples, 1))
    chunks = []
    for lo in range(0, n_chans, per_chunk):
        hi = min(n_chans, lo + per_chunk)
        offsets = pa.array(np.arange(hi - lo + 1, dtype=np.int32) * np.int32(n_samples))
        chunks.append(
            pa.ListArray.from_arrays(offsets, pa.array(flat[lo * n_samples : hi * n_samples]))
        )
    if not chunks:
        return pa.chunked_array([], pa.list_(pa.float32()))
    return pa.chunked_array(chunks)


def pop_signal_table(signal: str, values: np.ndarray, chans: tuple[str, ...] | None) -> pa.Table:
    n = values.shape[0]
    lo, hi = channel_extremes(values)
    return pa.table(
        {
            "signal": pa.array([signal] * n, pa.string()),
            "channel": pa.array(np.arange(n, dtype=np.int32)),
            # chans that do not describe the rows (a mask's) label none of them
            "chan": pa.array(list(chans) if chans and len(chans) == n else [None] * n, pa.string()),
            "min_value": pa.array(lo),
            "max_value": pa.array(hi),
            "values": channel_lists(values),
        }
    )


def channel_extremes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the min and max with NaN ignored; NaN for a row with no other value.

    Taken while the arrays are in memory, so normalize needs no decode of the values."""
    lo = np.fmin.reduce(values, axis=1, initial=np.inf)
    hi = np.fmax.reduce(values, axis=1, initial=-np.inf)
    nothing = lo > hi  # only when every value is NaN (or there are none)
    lo[nothing], hi[nothing] = np.nan, np.nan
    return lo.astype(np.float32), hi.astype(np.float32)


# ============================================================================ rows
@dataclass
class RawRows:
    """Rows of the small raw tables, gathered over one area's recordings."""

    recordings: list[dict] = field(default_factory=list)
    signals: list[dict] = field(default_factory=list)
    epochs: dict[str, list] = field(
        default_factory=lambda: {c: [] for c in schema.EPOCHS.column_names}
    )
    members: list[dict] = field(default_factory=list)
    #: why a recording's member was skipped, by (file, recording member or name, member):
    #: for the log only (the recordings table lists the names)
    skip_reasons: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def tables(self) -> dict[str, pa.Table]:
        return {
            "recordings": pa.Table.from_pylist(self.recordings, schema=schema.RECORDINGS.schema),
            "signals": pa.Table.from_pylist(self.signals, schema=schema.SIGNALS.schema),
            "epochs": pa.table(self.epochs, schema=schema.EPOCHS.schema),
            "source_members": pa.Table.from_pylist(
                self.members, schema=schema.SOURCE_MEMBERS.schema
            ),
        }


def add_recording(
    rows: RawRows,
    rec: nems0.Recording,
    *,
    kind: str,
    site: str | None,
    file: str,
    member: str | None,
) -> None:
    """Recording, signal and epoch rows of one recording (view 0, file units)."""
    views = _extra_view_members(rec)
    rows.recordings.append(
        {
            "recording": rec.name,
            "kind": kind,
            "site": site,
            "file": file,
            "member": member,
            "meta_json": _json(rec.meta) if rec.meta is not None else None,
            "skipped_members": [s.name for s in rec.skipped] + list(views),
        }
    )
    where = member or rec.name
    rows.skip_reasons.update({(file, where, s.name): s.reason for s in rec.skipped})
    rows.skip_reasons.update({(file, where, m): why for m, why in views.items()})
    for name, sig in rec.signals.items():
        rows.signals.append(_signal_row(rec.name, sig))
        if sig.epochs is not None:
            _add_epochs(rows.epochs, rec.name, name, sig.epochs)


def _extra_view_members(rec: nems0.Recording) -> dict[str, str]:
    """Jackknife views (``NN.R.S.*``) are not stored: their members, sorted, each with
    why it is listed as skipped."""
    names = {}
    for view in rec.views[1:]:
        for sig in view.values():
            if sig.view > 0:
                for m in (sig.json_member, sig.data_member, sig.epoch_member):
                    if m:
                        names[m] = f"jackknife view {sig.view}; only view 0 is stored"
    return dict(sorted(names.items()))


def _signal_row(recording: str, sig: nems0.Signal) -> dict:
    h = sig.header
    data = sig.data
    if isinstance(data, np.ndarray):
        n_chans, n_samples = int(data.shape[0]), int(data.shape[1])
    elif isinstance(data, dict):
        n_chans, n_samples = len(data), None
    else:
        n_chans, n_samples = len(h.chans or ()), None
    return {
        "recording": recording,
        "signal": h.name,
        "signal_type": h.signal_type,
        "fs_hz": h.fs_hz,
        "n_chans": n_chans,
        "n_samples": n_samples,
        "chans": list(h.chans) if h.chans is not None else None,
        "segments_json": _json(h.raw["segments"]) if "segments" in h.raw else None,
        "meta_json": _json(h.meta),
    }


def _add_epochs(out: dict[str, list], recording: str, signal: str, table: pa.Table) -> None:
    """Rows in file order; columns other than name/start/end as one JSON object."""
    n = table.num_rows
    extra = [c for c in table.column_names if c not in ("name", "start_s", "end_s")]
    extra_values = [table.column(c).to_pylist() for c in extra]
    out["recording"] += [recording] * n
    out["signal"] += [signal] * n
    out["row"] += range(n)
    out["name"] += table.column("name").to_pylist()
    out["start_s"] += table.column("start_s").to_pylist()
    out["end_s"] += table.column("end_s").to_pylist()
    if extra:
        out["extra_json"] += [
            json.dumps(dict(zip(extra, vals, strict=True)))
            for vals in zip(*extra_values, strict=True)
        ]
    else:
        out["extra_json"] += [None] * n


def _json(obj: Any) -> str:
    """JSON text; numpy arrays (NEMS0 meta ``__ndarray__``) back in NumpyEncoder form."""
    return json.dumps(obj, default=_numpy_default, allow_nan=True)


#: dtype kinds whose ``tolist()`` JSON cannot hold (complex, datetime, timedelta, bytes,
#: void): such arrays are written as the base64 form NEMS0's older NumpyEncoder wrote
_BASE64_KINDS = "cMmSV"


def _numpy_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return (
            obj.item() if obj.dtype.kind not in _BASE64_KINDS else _numpy_default(np.asarray(obj))
        )
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in _BASE64_KINDS:
            payload = base64.b64encode(np.ascontiguousarray(obj).tobytes()).decode("ascii")
            return {"__ndarray__": payload, "dtype": str(obj.dtype), "shape": list(obj.shape)}
        return {
            "__ndarray__": obj.tolist(),
            "dtype": str(obj.dtype),
            "shape": list(obj.shape),
            "encoding": "list",
        }
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


# ============================================================================ population file
def read_population(path: Path, rows: RawRows, progress) -> tuple[pa.Table, dict]:
    """Rows of the population recording into ``rows``; returns the pop_signals table and
    the (C, T) arrays it wraps, by signal name."""
    rec = nems0.read_recording(path, on_data=stream_rasters(progress, path.name))
    others = _check_population(rec, path)
    for name in others:
        kind = rec.signals[name].signal_type
        msg = f"{path.name}: {kind} signal {name!r}: only metadata and epochs stored"
        progress.log(msg, level="warning")
    add_recording(rows, rec, kind="population", site=None, file=path.name, member=None)
    rasters = {name: sig for name, sig in rec.signals.items() if name not in others}
    arrays = {name: sig.data for name, sig in rasters.items()}
    parts = [
        pop_signal_table(name, sig.data, sig.header.chans) for name, sig in sorted(rasters.items())
    ]
    del rec
    if not parts:
        return _empty(schema.POP_SIGNALS), arrays
    # Already in key order: the store's sort moves nothing. Left in chunks (no copy).
    return pa.concat_tables(parts), arrays


#: signals whose JSON chans must name their rows: resp's chans are the cell ids
#: parse-epochs matches. Elsewhere NEMS0 never ties chans to the data, and a mask made by
#: ``Recording.create_mask`` keeps the chans of the signal it came from (one row, every
#: unit listed); those rows are stored unlabelled and the chans as written.
ROWS_NAMED_BY_CHANS = ("resp",)


def _check_population(rec: nems0.Recording, path: Path) -> list[str]:
    """resp and stim rasterized, and resp with as many CSV columns as JSON chans (the JSON
    may come after the CSV in the tar, so the streaming parser cannot check it); returns
    the other signals that are not rasterized (NEMS0 loads them too; nothing here reads
    their data, so only their metadata and epochs are kept)."""
    if rec.name is None:
        raise FormatError("no signal names a recording", path=path)
    others = []
    for sig in rec.signals.values():
        where = {"path": path, "member": sig.data_member}
        if sig.signal_type != "rasterized":
            if sig.name in HANDED_OFF:
                msg = f"signal {sig.name!r} is {sig.signal_type}; the population's {sig.name} must be rasterized"
                raise FormatError(msg, **where)
            others.append(sig.name)
            continue
        chans = sig.header.chans
        n_chans, n_samples = sig.data.shape
        named = sig.name in ROWS_NAMED_BY_CHANS and chans is not None
        if named and n_samples and len(chans) != n_chans:
            msg = f"CSV has {n_chans} columns, the JSON chans lists {len(chans)}; nothing written"
            raise FormatError(msg, **where)
    resp, stim = rec.signals.get("resp"), rec.signals.get("stim")
    if resp is not None and stim is not None and resp.data.shape[1] != stim.data.shape[1]:
        short = min((resp, stim), key=lambda s: s.data.shape[1])  # the cut one, most likely
        msg = (
            f"resp has {resp.data.shape[1]} samples, stim {stim.data.shape[1]}: the signals "
            "of one recording share a time base; nothing written"
        )
        raise FormatError(msg, path=path, member=short.data_member)
    if resp is not None and stim is not None and resp.header.fs_hz != stim.header.fs_hz:
        # rebin-sites refused it naming the area only, after every other stage had run
        msg = (
            f"resp is at {resp.header.fs_hz:g} Hz ({resp.json_member}), stim at "
            f"{stim.header.fs_hz:g} Hz: the signals of one recording share a time base; "
            "nothing written"
        )
        raise FormatError(msg, path=path, member=stim.json_member)
    if stim is not None:
        _check_presentations_fit(rec, stim, path)
    if resp is not None and resp.data.shape[1] == 0:  # an empty CSV: a raster of C x 0
        msg = "resp has no samples (an empty CSV); nothing written"
        raise FormatError(msg, path=path, member=resp.data_member)
    return others


# ============================================================================ site files
@dataclass
class SiteData:
    spikes: dict[str, list] = field(
        default_factory=lambda: {c: [] for c in schema.SITE_SPIKES.column_names}
    )
    #: (site, unit id) -> the member and signal its spike times came from
    origin: dict[tuple[str, str], str] = field(default_factory=dict)
    #: recording name -> the member it came from
    recordings: dict[str, str] = field(default_factory=dict)

    def table(self) -> pa.Table:
        return pa.table(self.spikes, schema=schema.SITE_SPIKES.schema)


def is_stray(name: str) -> bool:
    """OS litter in a zip: ``__MACOSX/``, AppleDouble ``._x``, ``.DS_Store``, hidden files
    (a backslash separates folders too, as in zips made by some Windows tools)."""
    parts = PurePosixPath(name.replace("\\", "/")).parts
    return "__MACOSX" in parts or any(p.startswith(".") for p in parts)


def is_recording_member(name: str) -> bool:
    return not is_stray(name) and name.lower().endswith((".tgz", ".tar.gz"))


def read_sites(path: Path, rows: RawRows, sites: SiteData, progress) -> None:
    """Every per-site recording in ``<area>_single_sites.zip``; strays listed, not read.

    Two passes over the zip: the central directory first (cheap) for the listing and the
    progress total, then each site tgz while the zip is open.
    """
    listing = [(m.name, m.size_bytes) for m in archive.iter_members(path)]
    for name, size_bytes in listing:
        kind = "recording" if is_recording_member(name) else "skipped"
        rows.members.append(
            {"file": path.name, "member": name, "kind": kind, "size_bytes": size_bytes}
        )
    task = path.name
    progress.start(task, total=sum(is_recording_member(n) for n, _ in listing), unit="files")
    try:
        for m in archive.iter_members(path):
            if not is_recording_member(m.name):
                continue
            rec = nems0.read_recording(m)
            if rec.name is None:  # no signal at all (an empty tar): nothing to key it by
                raise FormatError("no signal names a recording", path=path, member=m.name)
            _check_site_resp(rec, path, m.name)
            _check_raster_lengths(rec, path, m.name)
            site = site_id(rec, m.name)
            first = sites.recordings.setdefault(rec.name, m.name)
            if first != m.name:
                msg = f"recording {rec.name!r} again (first in {first}); nothing written"
                raise FormatError(msg, path=path, member=m.name)
            add_recording(rows, rec, kind="site", site=site, file=path.name, member=m.name)
            not_finite = _add_spikes(sites, rec, site, path=path, member=m.name)
            if not_finite:
                # NEMS0 cannot rasterize such a time (int() of NaN or inf fails); no bin
                # counts it here, and the log says so rather than nothing
                units = ", ".join(f"{u} ({n})" for u, n in sorted(not_finite.items()))
                msg = f"{path.name}:{m.name}: spike times that are NaN or infinite, never counted: {units}"
                progress.log(msg, level="warning")
            for sig in rec.signals.values():
                if sig.signal_type != "point_process":
                    msg = f"{m.name}: {sig.signal_type} signal {sig.name!r}: only metadata and epochs stored"
                    progress.log(msg, level="warning")
            progress.advance(task, 1)
    finally:
        progress.done(task)


def _check_presentations_fit(rec: nems0.Recording, stim: nems0.Signal, path: Path) -> None:
    """No population STIM_ epoch may be longer, at stim's fs, than all of the data: the
    JSON fs is wrong (at 1e9 Hz a 1.5 s sound is 1.5e9 samples, and rebin-sites failed
    with a traceback allocating 101 GiB). One that runs past the data's end is NaN-padded
    as NEMS0 pads it (parse-epochs reports it); one longer than the data would be nothing
    else."""
    fs_hz, n_samples = stim.header.fs_hz, stim.data.shape[1]
    longest, where = 0.0, None
    for sig in rec.signals.values():  # the recording's epochs: every signal's (section 3)
        if sig.epochs is None or not n_samples:
            continue
        is_stim = pc.starts_with(sig.epochs.column("name"), nat4.STIM_PREFIX).fill_null(False)
        starts = sig.epochs.column("start_s").to_numpy(zero_copy_only=False)
        ends = sig.epochs.column("end_s").to_numpy(zero_copy_only=False)
        with np.errstate(invalid="ignore", over="ignore"):
            lengths = np.where(is_stim.to_numpy(zero_copy_only=False), ends - starts, np.nan)
        lengths[~np.isfinite(lengths)] = np.nan
        if np.any(~np.isnan(lengths)) and np.nanmax(lengths) > longest:
            longest, where = float(np.nanmax(lengths)), sig
    if where is not None and longest * fs_hz > n_samples + 0.5:
        msg = (
            f"a STIM_ epoch of {longest:g} s ({where.epoch_member}) is {longest * fs_hz:g} "
            f"samples at this JSON's fs of {fs_hz:g} Hz, more than all {n_samples} of the "
            "data (a wrong fs?); nothing written"
        )
        raise FormatError(msg, path=path, member=stim.json_member)


def _check_site_resp(rec: nems0.Recording, path: Path, member: str) -> None:
    """A site's spikes are its ``resp`` signal (NEMS0's ``rec['resp']``, what rebin-sites
    bins): a site tgz without one (only a meta.json, or its signal under another name)
    was read as a site without units, and its units' val trials were silently NaN."""
    if SITE_RESP in rec.signals:
        return
    found = ", ".join(repr(s) for s in sorted(rec.signals)) or "none"
    msg = f"no {SITE_RESP!r} signal, the site's spikes (signals: {found}); nothing written"
    raise FormatError(msg, path=path, member=member)


#: the signal of a site recording that holds its units' spike times (nat4-dataset.md)
SITE_RESP = "resp"


def _check_raster_lengths(rec: nems0.Recording, path: Path, member: str) -> None:
    """Each PointProcess's raster length, as NEMS0 rasterizes it (fs times the last epoch
    end, else the last spike), must be a number of samples that can be held: NEMS0 fails
    on an infinite one or one too long for memory, and so did rebin-sites, with a
    traceback instead of the file's name (a site JSON's fs of 1e9 Hz: a 448 GiB array)."""
    from nat4etl.binning import raster_samples

    for sig in rec.signals.values():
        if sig.signal_type != "point_process":
            continue
        ends = np.empty(0)
        if sig.epochs is not None and sig.epochs.num_rows:
            ends = sig.epochs.column("end_s").to_numpy(zero_copy_only=False)
        last_end = float(np.nanmax(ends)) if np.any(~np.isnan(ends)) else float("nan")
        spikes = np.empty(0)
        if not last_end > 0 and sig.data:  # no epoch end: NEMS0 takes the last spike
            spikes = np.concatenate([np.asarray(t, np.float64) for t in sig.data.values()])
        try:
            ok = 0 <= raster_samples(last_end, spikes, sig.header.fs_hz) <= _MAX_RASTER
        except (OverflowError, ValueError):
            ok = False
        if not ok:
            inner = sig.epoch_member if last_end > 0 else sig.data_member
            msg = (
                f"signal {sig.name!r}: its raster would be {sig.header.fs_hz:g} Hz x "
                f"{last_end if last_end > 0 else 'the last spike'} s long, not a usable "
                f"number of samples (at most 2**{_MAX_RASTER.bit_length() - 1}; an infinite "
                "or huge epoch end or spike time, a wrong fs?)"
            )
            raise FormatError(msg, path=path, member=f"{member}:{inner}")


#: the longest PointProcess raster `_check_raster_lengths` lets through: rebin-sites maps
#: every sample of a site's session to its bin (4 bytes a sample: 2 GiB), NEMS0 holds 8
#: bytes per unit and sample; 2**29 samples are 6 days at 1 kHz (a NAT4 site: about 28 min)
_MAX_RASTER = 2**29


def site_id(rec: nems0.Recording, member: str) -> str:
    """The site from inside the archive: the recording name, else the unit ids' common
    site; the ``<AREA>_<SITE>_<hex>.tgz`` file name only as the last resort."""
    from_name = nat4.site_from_recording_name(rec.name or "")
    if from_name is not None:
        return from_name
    unit_sites = {
        nat4.site_of_unit(unit)
        for sig in rec.signals.values()
        if sig.signal_type == "point_process" and isinstance(sig.data, dict)
        for unit in sig.data
    }
    unit_sites.discard(None)
    if len(unit_sites) == 1:
        return unit_sites.pop()
    return nat4.site_from_file_name(member) or rec.name or PurePosixPath(member).stem


def _add_spikes(
    sites: SiteData, rec: nems0.Recording, site: str, *, path: Path, member: str
) -> dict[str, int]:
    """One row per unit of every PointProcess signal, spike times float64 as stored;
    returns, by unit, how many of its times are NaN or infinite (none: {}). A unit of the
    site that another signal or file already gave is an error naming both."""
    out = sites.spikes
    not_finite = {}
    for name, sig in rec.signals.items():
        if sig.signal_type != "point_process":
            continue
        for unit_id, times_s in sig.data.items():
            here = f"{member}:{sig.data_member}"
            first = sites.origin.setdefault((site, unit_id), here)
            if first != here:
                msg = f"site {site} unit {unit_id!r} again (first in {first}); nothing written"
                raise FormatError(msg, path=path, member=here)
            times_s = np.asarray(times_s, np.float64)
            out["site"].append(site)
            out["recording"].append(rec.name)
            out["signal"].append(name)
            out["unit_id"].append(unit_id)
            out["spike_times_s"].append(times_s)
            if not np.isfinite(times_s).all():
                not_finite[unit_id] = int(np.count_nonzero(~np.isfinite(times_s)))
    return not_finite


def spikes_table(sites: SiteData) -> pa.Table:
    s = sites.spikes
    return pa.table(
        {
            "site": pa.array(s["site"], pa.string()),
            "recording": pa.array(s["recording"], pa.string()),
            "signal": pa.array(s["signal"], pa.string()),
            "unit_id": pa.array(s["unit_id"], pa.string()),
            "spike_times_s": float64_lists(s["spike_times_s"]),
        },
        schema=schema.SITE_SPIKES.schema,
    )


def float64_lists(arrays: list[np.ndarray]) -> pa.ChunkedArray:
    """list<float64> from numpy arrays (no Python floats), chunked so that int32 offsets
    never overflow.

    Arrays that lie back to back in one buffer, as a site file's spike times do
    (:func:`nat4etl.formats.nems0_h5.read_h5_datasets`), become one chunk without a
    copy (A1: 83 MB neither copied nor first-touched again); any others are concatenated
    once per chunk.
    """
    chunks: list[pa.ListArray] = []
    loose: list[np.ndarray] = []  # arrays of their own, concatenated into the next chunk

    def flush() -> None:
        if loose:
            chunks.append(_list_chunk(loose, np.concatenate(loose)))
            loose.clear()

    for run in _back_to_back(arrays):
        span = _span(run)
        if span is not None:
            flush()
            chunks.append(_list_chunk(run, span))
            continue
        if sum(map(len, loose)) + sum(map(len, run)) > _MAX_LIST_VALUES:
            flush()
        loose += run
    flush()
    if not chunks:
        chunks.append(_list_chunk([], np.zeros(0, np.float64)))
    return pa.chunked_array(chunks, pa.list_(pa.float64()))


def _back_to_back(arrays: list[np.ndarray]) -> Iterator[list[np.ndarray]]:
    """Runs of consecutive views of one buffer, each starting where the last non-empty
    one before it ends (an empty array goes anywhere: numpy may point it anywhere), of at
    most ``_MAX_LIST_VALUES`` values; every other array is a run alone."""
    run: list[np.ndarray] = []
    n_values, end = 0, None  # end: address after the run's last value
    for arr in arrays:
        here = arr.__array_interface__["data"][0]
        joins = (
            bool(run)
            and arr.base is not None
            and arr.base is run[0].base
            and (len(arr) == 0 or end is None or here == end)
            and n_values + len(arr) <= _MAX_LIST_VALUES
        )
        if run and not joins:
            yield run
            run, n_values, end = [], 0, None
        run.append(arr)
        n_values += len(arr)
        if len(arr):
            end = here + arr.nbytes
    if run:
        yield run


def _span(run: list[np.ndarray]) -> np.ndarray | None:
    """One float64 view covering a run of views of one 1-D float64 buffer, else None."""
    base = run[0].base
    if not (
        isinstance(base, np.ndarray)
        and base.ndim == 1
        and base.dtype == np.float64
        and base.flags.c_contiguous
        and all(a.dtype == np.float64 and a.ndim == 1 and a.flags.c_contiguous for a in run)
    ):
        return None
    filled = [a for a in run if len(a)]
    if not filled:
        return base[:0]
    first = (filled[0].__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 8
    return base[first : first + sum(len(a) for a in filled)]


def _list_chunk(arrays: list[np.ndarray], flat: np.ndarray) -> pa.ListArray:
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum(np.array([len(a) for a in arrays], np.int64), out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, pa.float64()))


# ============================================================================ small files
def read_pred_table(path: Path) -> pa.Table:
    """The CSV as read; a CSV ``area`` column is renamed (``area`` is the partition)."""
    table = read_pred_correlation(path)
    if "area" in table.column_names:
        if PRED_AREA_COLUMN in table.column_names:
            msg = f"columns 'area' and {PRED_AREA_COLUMN!r} both present"
            raise FormatError(msg, path=path)
        names = [PRED_AREA_COLUMN if c == "area" else c for c in table.column_names]
        table = table.rename_columns(names)
    return table


def _empty(spec: schema.TableSpec) -> pa.Table:
    return spec.schema.empty_table()


# ============================================================================ stage
def source_dir(store, settings) -> Path:
    return Path(settings.source_dir) if settings.source_dir else store.raw_dir


def _required(src: Path, name: str) -> Path:
    path = src / name
    if not path.is_file():
        raise MissingMember(
            f"{name} not found in {src}; Hint: run `nat4etl fetch` or pass --source DIR",
            path=src,
            member=name,
        )
    return path


def run(store, settings, progress) -> dict:
    """Every area's raw tables. Writes go to a background thread (:class:`WriteBehind`),
    so an area's population is encoded to Parquet while its site files are decoded."""
    src = source_dir(store, settings)
    shown = Path(settings.source_dir) if settings.source_dir else store.shown_raw_dir
    for area in settings.areas:  # all there before anything is decoded
        for name in nat4.area_files(area).names:
            if not (src / name).is_file():
                raise MissingMember(
                    f"{name} ({area}) not found in {shown}; Hint: `nat4etl fetch --area "
                    f"{area}` gets it, or pass --source DIR",
                    path=shown,
                    member=name,
                )
    # What rebin-sites reads is kept for it only when this build runs it next; otherwise
    # (e.g. `nat4etl unpack` alone) each area's is dropped once written instead of
    # sitting through the later areas (~400 MB for A1).
    hand_off = "rebin-sites" in store.stages_planned
    done = {}
    with WriteBehind(store) as writer:
        for area in settings.areas:
            if done:
                # the last area's population written and its buffers returned before the
                # next one is decoded on top of them; its smaller tables (site_spikes,
                # epochs) may still be encoding meanwhile
                last_written, _ = done[next(reversed(done))]
                last_written["pop_signals"].exception()  # waits; failures raise below
                memory.release_free_memory()
            done[area] = unpack_area(writer, src, area, progress, hand_off=hand_off)
    for area, (_, kept) in done.items():
        for table, value in kept.items():
            handoff.keep(store, table, area, value)  # for rebin-sites
    return {area: {name: f.result().rows for name, f in w.items()} for area, (w, _) in done.items()}


#: population signals rebin-sites reads; the others are not kept after unpack
HANDED_OFF = ("resp", "stim")


def unpack_area(
    writer: WriteBehind, src: Path, area: str, progress, *, hand_off: bool = False
) -> tuple[dict[str, Future], dict[str, object]]:
    """Read one area's files and queue its raw tables for writing; returns the pending
    writes by table and, with ``hand_off``, by table what rebin-sites reads of them: the
    population arrays and the site spikes as sample indices (``with_spike_samples``).
    The population is handed to the writer before the site files are decoded."""
    files = nat4.area_files(area)
    pop_path = _required(src, files.population)
    sites_path = _required(src, files.single_sites)
    pred_path = _required(src, files.pred_correlation)
    rows = RawRows()
    pop, arrays = read_population(pop_path, rows, progress)
    population = {name: arrays[name] for name in HANDED_OFF if name in arrays}
    del arrays
    written = {"pop_signals": writer.submit("pop_signals", pop, area=area)}
    n_chans = pop.num_rows
    del pop
    # a site recording named as the population would make two rows of one key
    sites = SiteData(recordings={rows.recordings[0]["recording"]: pop_path.name})
    read_sites(sites_path, rows, sites, progress)
    pred = read_pred_table(pred_path)
    spikes = in_key_order("site_spikes", spikes_table(sites), area=area)
    del sites
    raw_tables = rows.tables()
    last_epoch_end_s = last_epoch_ends(raw_tables["epochs"]) if hand_off else {}
    for name, table in {**raw_tables, "site_spikes": spikes, "pred_correlation": pred}.items():
        written[name] = writer.submit(name, table, area=area)
    del raw_tables  # the writer holds them now, and only until each is written
    counts = {"pop_signals": n_chans, "epochs": len(rows.epochs["row"]), "pred": pred.num_rows}
    _log_summary(progress, area, rows, spikes, counts)
    if not hand_off:
        return written, {}
    fs_hz = {(r["recording"], r["signal"]): r["fs_hz"] for r in rows.signals}
    samples = with_spike_samples(spikes, fs_hz, last_epoch_end_s)
    return written, {"pop_signals": population, "site_spikes": samples}


def _log_summary(progress, area: str, rows: RawRows, spikes: pa.Table, counts: dict) -> None:
    n_sites = sum(1 for r in rows.recordings if r["kind"] == "site")
    skipped = [
        (m["file"], m["member"], "not a recording") for m in rows.members if m["kind"] == "skipped"
    ]
    skipped += [
        (r["file"], f"{where}:{s}", rows.skip_reasons.get((r["file"], where, s), "not read"))
        for r in rows.recordings
        for where in [r["member"] or r["recording"]]
        for s in r["skipped_members"]
    ]
    progress.log(
        f"{area}: {counts['pop_signals']} population channels, {n_sites} site files, "
        f"{spikes.num_rows} site units, {counts['epochs']} epochs, "
        f"{counts['pred']} pred_correlation rows"
    )
    for file, member, why in skipped:
        progress.log(f"{area}: skipped {file}:{member} ({why})", level="warning")

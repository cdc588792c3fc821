"""The reader: a built store -> numpy arrays any framework can take (``torch.from_dlpack``).

Thin on purpose: it selects by key and hands out numpy arrays; it never imports torch or
jax. Every call reads one generation of the store (:func:`nat4etl.store.open_snapshot`),
so a rebuild published meanwhile never mixes into a result.

Layout of the results (``S`` sounds, ``N`` units, ``R`` repetitions, ``F`` bands, ``T``
bins of ``dt_ms``):

- ``spectrograms``: float32 ``(S, F, T)``; a view of the Parquet column's buffer when no
  normalization is asked for and the sounds are contiguous in the table;
- ``responses``: float32 ``(S, N, R, T)``, NaN where a unit was not recorded for a sound or
  a repetition is missing; ``trials="mean"`` gives ``(S, N, T)``;
- ``waveforms``: float32 ``(S, T_audio)``.

Sounds are in stim id order (est, then val, then other), units in cell id order
(population channel order), unless ``stims=`` / ``cells=`` give another order.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from nat4etl.errors import (
    ConfigError,
    MissingTableError,
    Nat4EtlError,
    SchemaError,
    StoreError,
)

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

    from nat4etl.store import Store

Subset = Literal["all", "est", "val"]
Norm = Literal["deepstrf", "nems", "default"] | None
Trials = Literal["all", "mean"]
SUBSETS = ("all", "est", "val")
NORMS = ("deepstrf", "nems")
#: default memory budget of one dense result (``max_bytes``)
DEFAULT_MAX_BYTES = 2 * 1024**3
#: which stage writes each table, for "missing table" hints
_WRITTEN_BY = {
    "stims": "parse-epochs",
    "cells": "parse-epochs",
    "responses": "rebin-sites",
    "spectrograms": "rebin-sites",
    "val_means": "rebin-sites",
    "qc_val": "rebin-sites",
    "waveforms": "align-wav",
    "norm_constants": "normalize",
}


class ResultTooLarge(Nat4EtlError, MemoryError):
    """A dense result would exceed the reader's memory budget; nothing was allocated."""

    exit_code = 2


def open_store(path: str | os.PathLike) -> Nat4Store:
    """Open a built store for reading (see :func:`nat4etl.open`)."""
    from nat4etl.store import open_snapshot

    return Nat4Store(open_snapshot(Path(path).expanduser()))


class Nat4Store:
    """Read access to one generation of a nat4etl store.

    Obtain it with ``nat4etl.open(path)``. Use as a context manager, or call
    :meth:`close`, to release the generation it pins.
    """

    def __init__(self, store: Store):
        self._store = store
        self.path = Path(store.published_at)
        self._check_store_version()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the pinned generation (its directory handle)."""
        self._store.close()

    def __enter__(self) -> Nat4Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<nat4etl store {str(self.path)!r} areas={self.areas}>"

    # ------------------------------------------------------------------ tables
    @property
    def areas(self) -> list[str]:
        """Areas with a stims table, e.g. ``["A1", "PEG"]``."""
        return self._store.areas("stims")

    def stims(self, area: str) -> pl.DataFrame:
        """The sounds of ``area`` in stim id order (est, then val, then other).

        Columns as in the ``stims`` table: ``stim``, ``name``, ``subset``, ``wav_name``,
        ``duration_s``, ``prestim_s``, ``poststim_s``, ``n_frames``, ``pop_start_s``.
        """
        return self._frame("stims", area, "stim")

    def cells(self, area: str) -> pl.DataFrame:
        """The units of ``area`` in cell id order (the population channel order).

        Columns as in the ``cells`` table (``cell``, ``cell_id``, ``site``, ``auditory``,
        ``match``, ...), then the carried-through ``pred_correlation`` columns.
        """
        return self._frame("cells", area, "cell")

    def metadata(self, table: str, area: str) -> dict:
        """A table's metadata: units, ``dt_ms``, shapes, provenance."""
        self._require(table, area)
        return self._store.table_metadata(table, area)

    @property
    def dt_ms(self) -> float | None:
        """Bin width of the responses and spectrograms, in ms (None before rebin-sites)."""
        for area in self._store.areas("responses"):
            return float(self.metadata("responses", area)["dt_ms"])
        return None

    def default_norm(self, area: str) -> str:
        """The preset ``norm="default"`` means (the ``--norm`` given to `normalize`)."""
        return self.metadata("norm_constants", area)["default_norm"]

    # ------------------------------------------------------------------ arrays
    def spectrograms(self, area: str, *, subset: Subset = "all", norm: Norm = None) -> np.ndarray:
        """Spectrogram of each sound, float32 ``(S, F, T)``.

        Parameters
        ----------
        area
            ``"A1"`` or ``"PEG"``.
        subset
            ``"all"`` (default), ``"est"`` or ``"val"``: which sounds, in stim id order.
        norm
            None (default): raw ozgf values. ``"deepstrf"``: ``ln(1 + x)`` then one global
            min-max; ``"nems"``: ``ln(1 + x / 0.1)`` then min-max per band;
            ``"default"``: the store's default preset. Constants come from the whole
            population recording; values below 1e-6 after scaling are 0.

        Returns
        -------
        numpy.ndarray
            float32 ``(S, F, T)``, ``F`` bands, ``T`` bins of ``dt_ms`` (10 ms by default).
            Raw results are a read-only-by-convention view of the table's buffer when the
            sounds are contiguous: copy before writing into it.
        """
        md = self.metadata("spectrograms", area)
        if md.get("unavailable"):
            raise ConfigError(f"no spectrograms in {self.path} for {area}: {md['unavailable']}")
        ids = self._stim_ids(area, subset)
        n_bands, n_bins = int(md["n_bands"]), int(md["n_bins"])
        values = self._vectors("spectrograms", area, "values", ids)
        arr = values.reshape(len(ids), n_bands, n_bins)
        preset = self._preset(area, norm)
        if preset is None:
            return arr
        offset, lo, hi = self._constants(area, preset, "spectrogram", n_bands)
        return _scale(arr, offset, lo[None, :, None], hi[None, :, None], in_place=False)

    def responses(
        self,
        area: str,
        *,
        subset: Subset = "all",
        norm: Norm = None,
        cells: Sequence[int | str] | None = None,
        stims: Sequence[int | str] | None = None,
        trials: Trials = "all",
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> np.ndarray:
        """Spike counts per bin, float32 ``(S, N, R, T)`` or ``(S, N, T)`` with ``trials="mean"``.

        Parameters
        ----------
        area
            ``"A1"`` or ``"PEG"``.
        subset
            ``"all"`` (default), ``"est"`` or ``"val"``. With ``stims=``, every given sound
            must belong to it.
        norm
            None (default): counts per bin. ``"deepstrf"``: one global min-max;
            ``"nems"``: min-max per unit; ``"default"``: the store's default preset.
            Constants come from the whole population recording; est responses and val
            single trials share them (one scale).
        cells
            Units to return, as cell ids (int) or unit ids (``"ARM029a-01-1"``), in the
            order given. Default: every unit, in cell id order.
        stims
            Sounds to return, as stim ids (int) or epoch names (``"STIM_cat..."``), in the
            order given. Default: every sound of ``subset``, in stim id order.
        trials
            ``"all"`` (default): every repetition; ``R`` is the largest repetition count in
            the selection (1 for est sounds, 20 for val sounds in NAT4), and missing
            repetitions are NaN. ``"mean"``: the NaN-aware mean over repetitions (PSTH).
        max_bytes
            Memory budget of the result, in bytes (default 2 GiB). A larger request fails
            before anything is allocated.

        Returns
        -------
        numpy.ndarray
            float32. NaN where a unit was not recorded for a sound (or the population file
            marks it NaN) and where a repetition is missing.

        Raises
        ------
        ResultTooLarge
            The dense result exceeds ``max_bytes``: ask for ``trials="mean"``, a subset,
            or fewer sounds/units.
        """
        if trials not in ("all", "mean"):
            raise ValueError(f"`trials` must be 'all' or 'mean', not {trials!r}")
        md = self.metadata("responses", area)
        n_bins = int(md["n_bins"])
        stim_ids = self._stim_ids(area, subset, stims)
        cell_ids = self._cell_ids(area, cells)
        preset = self._preset(area, norm)
        constants = None
        if preset is not None:
            constants = self._constants(area, preset, "responses", self._n_cells(area))
        return _dense_responses(
            self._parquet("responses", area),
            self._require("responses", area),
            stim_ids,
            cell_ids,
            n_bins,
            trials=trials,
            constants=constants,
            max_bytes=max_bytes,
            area=area,
        )

    def waveforms(self, area: str, *, subset: Subset = "all") -> np.ndarray:
        """The source sound of each stim in its trial window, float32 ``(S, T_audio)``.

        Parameters
        ----------
        area
            ``"A1"`` or ``"PEG"``.
        subset
            ``"all"`` (default), ``"est"`` or ``"val"``.

        Returns
        -------
        numpy.ndarray
            float32 mono samples in [-1, 1] at ``audio_fs_hz`` (table metadata, 44.1 kHz by
            default), the sound starting at the PreStimSilence offset; ``T_audio`` is
            ``T * hop``, ``hop = audio_fs_hz * dt_ms / 1000``, so frame ``t`` of a
            spectrogram covers samples ``[t * hop, (t + 1) * hop)``.
        """
        self.metadata("waveforms", area)
        ids = self._stim_ids(area, subset)
        return self._vectors("waveforms", area, "samples", ids)

    # ------------------------------------------------------------------ helpers
    def _check_store_version(self) -> None:
        from nat4etl import schema

        manifest = self._store.read_manifest()
        if manifest is None:
            if not any(self._store.has(name) for name in ("stims", "responses")):
                raise MissingTableError(
                    f"{self.path} is not a built nat4etl store (no manifest.json); "
                    f"build one with `nat4etl build --out {self.path}`"
                )
            return
        version = manifest.get("schema_version")
        if version != schema.SCHEMA_VERSION:
            raise SchemaError(
                f"store {self.path} was written with schema version {version}, this nat4etl "
                f"reads {schema.SCHEMA_VERSION}; rebuild with `nat4etl build --force "
                f"--out {self.path}`"
            )

    def _require(self, table: str, area: str) -> Path:
        path = self._store.table_file(table, area)
        if not path.is_file():
            known = self.areas
            if known and area not in known:
                raise MissingTableError(f"no area {area!r} in {self.path}; it holds {known}")
            stage = _WRITTEN_BY.get(table, "build")
            raise MissingTableError(
                f"table {table!r} for {area} is not in {self.path}; run `nat4etl {stage} "
                f"--out {self.path}` (or `nat4etl build`)"
            )
        return path

    def _parquet(self, table: str, area: str):
        """An open ParquetFile after the schema version check."""
        import pyarrow.parquet as pq

        from nat4etl.store import check_file_metadata

        path = self._require(table, area)
        pf = pq.ParquetFile(path, memory_map=True)
        check_file_metadata(table, pf.schema_arrow, path)
        return pf

    def _table(self, table: str, area: str, columns: list[str] | None = None) -> pa.Table:
        pf = self._parquet(table, area)
        return pf.read(columns=columns, use_threads=True).replace_schema_metadata(None)

    def _frame(self, table: str, area: str, key: str) -> pl.DataFrame:
        import polars as pl

        return pl.from_arrow(self._table(table, area)).sort(key)

    def _stim_table(self, area: str) -> pa.Table:
        return self._table("stims", area, ["stim", "name", "subset"])

    def _stim_ids(
        self, area: str, subset: Subset, stims: Sequence[int | str] | None = None
    ) -> np.ndarray:
        if subset not in SUBSETS:
            raise ValueError(f"`subset` must be one of {SUBSETS}, not {subset!r}")
        table = self._stim_table(area)
        ids = table.column("stim").to_numpy()
        subsets = np.asarray(table.column("subset").to_pylist(), dtype=object)
        if stims is None:
            keep = ids if subset == "all" else ids[subsets == subset]
            return np.sort(keep).astype(np.int64)
        chosen = _resolve(stims, ids, table.column("name").to_pylist(), what="stims")
        if subset != "all":
            by_id = dict(zip(ids.tolist(), subsets.tolist(), strict=True))
            wrong = [int(s) for s in chosen if by_id[int(s)] != subset]
            if wrong:
                raise ValueError(f"stims {wrong} are not in subset {subset!r}")
        return chosen

    def _n_cells(self, area: str) -> int:
        return self._parquet("cells", area).metadata.num_rows

    def _cell_ids(self, area: str, cells: Sequence[int | str] | None) -> np.ndarray:
        table = self._table("cells", area, ["cell", "cell_id"])
        ids = table.column("cell").to_numpy()
        if cells is None:
            return np.sort(ids).astype(np.int64)
        return _resolve(cells, ids, table.column("cell_id").to_pylist(), what="cells")

    def _vectors(self, table: str, area: str, column: str, ids: np.ndarray) -> np.ndarray:
        """Rows ``ids`` (stim ids) of a (stim, vector) table as a float32 (len(ids), width)."""
        t = self._table(table, area, ["stim", column])
        width = t.schema.field(column).type.list_size
        stim = t.column("stim").to_numpy()
        if len(ids) == 0:
            return np.empty((0, width), np.float32)
        pos = np.searchsorted(stim, ids)
        if np.any(pos >= len(stim)) or np.any(stim[np.minimum(pos, len(stim) - 1)] != ids):
            missing = sorted(set(ids.tolist()) - set(stim.tolist()))
            raise StoreError(f"table {table!r} for {area} lacks stims {missing}; rebuild it")
        col = t.column(column)
        contiguous = np.all(np.diff(pos) == 1) if len(pos) > 1 else True
        if col.num_chunks == 1 and contiguous:
            values = _fixed_size_values(col.chunk(0), width)  # zero-copy view
            return values[pos[0] : pos[0] + len(pos)]
        values = np.concatenate([_fixed_size_values(c, width) for c in col.chunks])
        return values[pos]

    def _preset(self, area: str, norm: Norm) -> str | None:
        if norm is None:
            return None
        if norm == "default":
            return self.default_norm(area)
        if norm not in NORMS:
            raise ValueError(f"`norm` must be None, 'default' or one of {NORMS}, not {norm!r}")
        return norm

    def _constants(
        self, area: str, preset: str, signal: str, n_channels: int
    ) -> tuple[float, np.ndarray, np.ndarray]:
        """(log offset, min, max) of ``preset`` for ``signal``, one value per channel."""
        md = self.metadata("norm_constants", area)
        data_md = self.metadata("responses", area)
        if float(md["dt_ms"]) != float(data_md["dt_ms"]):
            raise StoreError(
                f"normalization constants are for dt_ms={md['dt_ms']}, the responses for "
                f"{data_md['dt_ms']}; rerun `nat4etl normalize --out {self.path}`"
            )
        t = self._table("norm_constants", area)
        rows = [r for r in t.to_pylist() if r["method"] == preset and r["signal"] == signal]
        if not rows:
            raise MissingTableError(
                f"no {preset!r} constants for {signal} in {self.path} ({area}); rerun "
                f"`nat4etl normalize --out {self.path}`"
            )
        offset = float(rows[0]["offset"])
        lo, hi = np.full(n_channels, np.nan), np.full(n_channels, np.nan)
        for r in rows:
            if r["channel"] < 0:
                lo[:], hi[:] = r["min"], r["max"]
            elif r["channel"] < n_channels:
                lo[r["channel"]], hi[r["channel"]] = r["min"], r["max"]
        return offset, lo, hi


# ============================================================================ helpers
def _scale(x, offset, lo, hi, *, in_place):
    from nat4etl.stages.normalize import scale

    return scale(x, offset, lo, hi, in_place=in_place)


def _fixed_size_values(chunk, width: int) -> np.ndarray:
    """A FixedSizeListArray chunk as a (rows, width) float32 numpy view (no copy).

    The view is taken on the Arrow buffer itself, so it is writable when Arrow owns the
    memory (decoded Parquet pages): DLPack consumers that refuse read-only arrays (jax)
    take it. A read-only buffer (e.g. memory-mapped) is copied instead.
    """
    values = chunk.values
    if values.null_count:
        raise StoreError("a fixed_size_list<float32> column holds nulls; rebuild the store")
    start = (values.offset + chunk.offset * width) * 4
    n = len(chunk) * width
    flat = np.frombuffer(values.buffers()[1], dtype=np.float32, count=n, offset=start)
    if not flat.flags.writeable:
        flat = flat.copy()
    return flat.reshape(len(chunk), width)


def _column_rows(column, width: int) -> np.ndarray:
    """A fixed_size_list ChunkedArray as (rows, width): a view when it has one chunk."""
    if column.num_chunks == 1:
        return _fixed_size_values(column.chunk(0), width)
    if column.num_chunks == 0:
        return np.empty((0, width), np.float32)
    return np.concatenate([_fixed_size_values(c, width) for c in column.chunks])


def _group_sums(slot: np.ndarray, rows: np.ndarray):
    """((slots, sums), counts): per distinct slot, the sum and count of finite values.

    The table is sorted by (stim, cell, trial), so a row group's slots usually come in
    runs already; only a caller-chosen stim/cell order needs the sort.
    """
    if np.any(slot[1:] < slot[:-1]):
        order = np.argsort(slot, kind="stable")
        slot, rows = slot[order], rows[order]
    first = np.flatnonzero(np.r_[True, slot[1:] != slot[:-1]])
    if not np.isnan(rows).any():  # the common case: no NaN, counts are run lengths
        sizes = np.diff(np.r_[first, len(slot)]).astype(np.float32)
        return (slot[first], np.add.reduceat(rows, first, axis=0)), sizes[:, None]
    finite = np.isfinite(rows)
    sums = np.add.reduceat(np.where(finite, rows, 0), first, axis=0)
    return (slot[first], sums), np.add.reduceat(finite, first, axis=0, dtype=np.float32)


def _read_group(path: Path, metadata, g: int, column: str):
    """One column of one row group, through a ParquetFile of this thread's own.

    A ParquetFile must not be read from two threads at once (it crashes), so each call
    opens the file again, reusing the already parsed footer.
    """
    import pyarrow.parquet as pq

    own = pq.ParquetFile(path, metadata=metadata, memory_map=True)
    try:
        return own.read_row_group(g, columns=[column], use_threads=False).column(column)
    finally:
        own.close()


def _run_threaded(fn, args: list[tuple]) -> None:
    """``fn(*a)`` for each ``a`` on a few threads (Parquet decoding releases the GIL)."""
    workers = min(len(args), os.cpu_count() or 1, 8)
    if workers <= 1:
        for a in args:
            fn(*a)
        return
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for future in [pool.submit(fn, *a) for a in args]:
            future.result()


def _resolve(
    wanted: Sequence[int | str], ids: np.ndarray, names: list[str], *, what: str
) -> np.ndarray:
    """User selection (ids or names) -> ids, in the given order; unknown or repeated: error."""
    if isinstance(wanted, str | int | np.integer):
        wanted = [wanted]
    by_name = dict(zip(names, ids.tolist(), strict=True))
    known = set(ids.tolist())
    out, unknown = [], []
    for w in wanted:
        if isinstance(w, str):
            v = by_name.get(w)
        else:
            v = int(w) if int(w) in known else None
        if v is None:
            unknown.append(w)
        else:
            out.append(v)
    if unknown:
        raise ValueError(f"unknown {what}: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    if len(set(out)) != len(out):
        raise ValueError(f"`{what}` repeats an entry")
    return np.asarray(out, dtype=np.int64)


@dataclass
class _Selection:
    """Where each selected row of the responses table goes in the dense result."""

    row_groups: list[int]
    slot: np.ndarray  # per row of those row groups: s * N + n, or -1 if not selected
    trial: np.ndarray
    n_trials: int  # R


def _select_rows(pf, stim_ids: np.ndarray, cell_ids: np.ndarray) -> _Selection:
    """Read only the key columns of the row groups that can hold the selected stims."""
    wanted = set(stim_ids.tolist())
    lo_id, hi_id = (min(wanted), max(wanted)) if wanted else (0, -1)
    groups = []
    for g in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(g).column(0).statistics  # column 0 is stim
        if stats is None or not stats.has_min_max or (stats.max >= lo_id and stats.min <= hi_id):
            groups.append(g)
    keys = pf.read_row_groups(groups, columns=["stim", "cell", "trial"]) if groups else None
    if keys is None or keys.num_rows == 0:
        empty = np.empty(0, np.int64)
        return _Selection(groups, empty, empty, 1)
    stim = keys.column("stim").to_numpy()
    cell = keys.column("cell").to_numpy()
    trial = keys.column("trial").to_numpy().astype(np.int64)
    stim_pos = _position_lookup(stim_ids, int(max(stim.max(), stim_ids.max(initial=0))) + 1)
    cell_pos = _position_lookup(cell_ids, int(max(cell.max(), cell_ids.max(initial=0))) + 1)
    s, n = stim_pos[stim], cell_pos[cell]
    selected = (s >= 0) & (n >= 0)
    slot = np.where(selected, s * len(cell_ids) + n, -1)
    n_trials = int(trial[selected].max()) + 1 if selected.any() else 1
    return _Selection(groups, slot, trial, n_trials)


def _position_lookup(ids: np.ndarray, size: int) -> np.ndarray:
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    return lookup


def _dense_responses(
    pf,
    path: Path,
    stim_ids: np.ndarray,
    cell_ids: np.ndarray,
    n_bins: int,
    *,
    trials: Trials,
    constants: tuple[float, np.ndarray, np.ndarray] | None,
    max_bytes: int,
    area: str,
) -> np.ndarray:
    """Scatter the selected rows into a NaN-filled dense array (checked against the budget)."""
    sel = _select_rows(pf, stim_ids, cell_ids)
    n_s, n_n = len(stim_ids), len(cell_ids)
    n_r = sel.n_trials if trials == "all" else 1
    shape = (n_s, n_n, n_r, n_bins) if trials == "all" else (n_s, n_n, n_bins)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * 4
    if trials == "mean":
        n_bytes *= 2  # sums and counts while averaging
    if n_bytes > max_bytes:
        hint = (
            "ask for trials='mean' (the PSTH), subset='est' or 'val', or fewer stims/cells"
            if trials == "all"
            else "ask for a subset or fewer stims/cells"
        )
        raise ResultTooLarge(
            f"responses({area!r}) would be {shape} float32 = {n_bytes / 2**30:.2f} GiB, over "
            f"the {max_bytes / 2**30:.2f} GiB budget (max_bytes); nothing was allocated. "
            f"Hint: {hint}, or raise max_bytes"
        )
    cell_lo = cell_hi = None
    offset = 0.0
    if constants is not None:
        offset, lo, hi = constants
        cell_lo, cell_hi = lo[cell_ids].astype(np.float32), hi[cell_ids].astype(np.float32)
    if trials == "all":
        out = np.full((n_s * n_n * n_r, n_bins), np.nan, dtype=np.float32)
        counts = None
    else:
        out = np.zeros((n_s * n_n, n_bins), dtype=np.float32)
        counts = np.zeros((n_s * n_n, n_bins), dtype=np.float32)
    lock = threading.Lock()

    def one_group(g: int, start: int) -> None:
        """Decode one row group and put its selected rows in place (runs in a thread)."""
        n_rows = pf.metadata.row_group(g).num_rows
        slot = sel.slot[start : start + n_rows]
        keep = slot >= 0
        if not keep.any():
            return
        rows = _column_rows(_read_group(path, pf.metadata, g, "counts"), n_bins)
        trial = sel.trial[start : start + n_rows]
        if not keep.all():
            slot, trial, rows = slot[keep], trial[keep], rows[keep]
        if constants is not None:
            unit = slot % n_n
            rows = _scale(rows, offset, cell_lo[unit, None], cell_hi[unit, None], in_place=False)
        if counts is None:
            out[slot * n_r + trial] = rows  # distinct slots per group: no lock needed
        else:
            sums, n = _group_sums(slot, rows)
            with lock:  # a (stim, cell) may straddle two row groups
                out[sums[0]] += sums[1]
                counts[sums[0]] += n

    starts = np.r_[0, np.cumsum([pf.metadata.row_group(g).num_rows for g in sel.row_groups])]
    _run_threaded(one_group, list(zip(sel.row_groups, starts[:-1].tolist(), strict=True)))
    if trials == "mean":
        with np.errstate(invalid="ignore", divide="ignore"):
            np.divide(out, counts, out=out)  # 0/0 -> NaN: no repetition recorded
    return out.reshape(shape)

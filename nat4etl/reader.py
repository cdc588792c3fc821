"""The reader: a built store -> numpy arrays any framework can take (``torch.from_dlpack``).

Thin on purpose: it selects by key and hands out numpy arrays; it never imports torch or
jax. Every call reads one generation of the store (:func:`nat4etl.store.open_snapshot`),
so a rebuild published meanwhile never mixes into a result.

Where the numbers come from: a table with vector columns has, beside its Parquet file, an
uncompressed Arrow IPC copy of the same rows (``part-0.arrow``, see
:data:`nat4etl.store.SIDECAR`). The reader maps it into memory copy-on-write and views the
vector column's buffer as a numpy array: a raw result whose rows are consecutive in the
table (spectrograms, waveforms, a subset whose rows form the whole dense grid) is that view,
without a copy; any other result is filled with one pass over the requested rows
(normalization fused into that pass). Each call maps the file anew, so a result is private
and writable like a fresh array: writing into it never changes the store or another result.
Without the sidecar (a store from an older nat4etl), or if it does not match its Parquet
file, the Parquet file is decoded instead (same numbers, slower).

Layout of the results (``S`` sounds, ``N`` units, ``R`` repetitions, ``F`` bands, ``T``
bins of ``dt_ms``):

- ``spectrograms``: float32 ``(S, F, T)``;
- ``responses``: float32 ``(S, N, R, T)``, NaN where a unit was not recorded for a sound or
  a repetition is missing; ``trials="mean"`` gives ``(S, N, T)``;
- ``waveforms``: float32 ``(S, T_audio)``.

Sounds are in stim id order (est, then val, then other), units in cell id order
(population channel order), unless ``stims=`` / ``cells=`` give another order.
"""

from __future__ import annotations

import copy
import errno
import os
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from nat4etl import memory
from nat4etl.errors import (
    MissingTableError,
    Nat4EtlError,
    SchemaError,
    StoreError,
)
from nat4etl.reliability import DEFAULT_SPLITS

if TYPE_CHECKING:
    import polars as pl
    import pyarrow as pa

    from nat4etl.stages.normalize import Rule
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
    :meth:`close`, to release the generation it pins. After :meth:`close`, every method
    raises ``ValueError`` (as a closed file does); arrays read before stay valid.
    """

    def __init__(self, store: Store):
        self._store = store
        self._closed = False
        self.path = Path(store.published_at)
        #: facts of the pinned generation (ids, metadata, constants): its files never
        #: change, so they are read once; results themselves are never kept
        self._facts: dict[tuple, object] = {}
        self._check_store_version()

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Release the pinned generation (its directory handle). Closing again does nothing;
        arrays already returned stay valid (they map the files, not the directory)."""
        self._closed = True
        self._facts.clear()
        self._store.close()

    def _area(self, area: str) -> str:
        """``area`` as the store spells it, in any case, as the CLI's ``--area`` takes it
        (an area the store does not hold is named by the table lookup)."""
        for held in self._store.areas("stims"):
            if held.casefold() == str(area).casefold():
                return held
        return area

    def _check_open(self) -> None:
        """ValueError once closed, as Python's closed files: the pinned generation is
        released (its ``/proc/self/fd`` path may even name another directory by now)."""
        if self._closed:
            raise ValueError(
                f"the nat4etl store {str(self.path)!r} is closed; open it again with "
                f"`nat4etl.open({str(self.path)!r})` (or read inside its `with` block)"
            )

    def __enter__(self) -> Nat4Store:
        self._check_open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"<nat4etl store {str(self.path)!r} closed>"
        return f"<nat4etl store {str(self.path)!r} areas={self.areas}>"

    # ------------------------------------------------------------------ tables
    @property
    def areas(self) -> list[str]:
        """Areas with a stims table, e.g. ``["A1", "PEG"]``."""
        self._check_open()
        return self._store.areas("stims")

    def stims(self, area: str) -> pl.DataFrame:
        """The sounds of ``area`` in stim id order (est, then val, then other).

        Columns as in the ``stims`` table: ``stim``, ``name``, ``subset``, ``wav_name``,
        ``duration_s``, ``prestim_s``, ``poststim_s``, ``n_frames``, ``pop_start_s``.
        """
        self._check_open()
        area = self._area(area)
        return self._frame("stims", area, "stim")

    def cells(self, area: str) -> pl.DataFrame:
        """The units of ``area`` in cell id order (the population channel order).

        Columns as in the ``cells`` table (``cell``, ``cell_id``, ``site``, ``auditory``,
        ``match``, ...), then the carried-through ``pred_correlation`` columns.
        """
        self._check_open()
        area = self._area(area)
        return self._frame("cells", area, "cell")

    def metadata(self, table: str, area: str) -> dict:
        """A table's metadata: units, ``dt_ms``, shapes, provenance."""
        self._check_open()
        area = self._area(area)
        return copy.deepcopy(self._metadata(table, area))

    @property
    def dt_ms(self) -> float | None:
        """Bin width of the responses and spectrograms, in ms (None before rebin-sites)."""
        self._check_open()
        for area in self._store.areas("responses"):
            return float(self._metadata("responses", area)["dt_ms"])
        return None

    def default_norm(self, area: str) -> str:
        """The preset ``norm="default"`` means (the ``--norm`` given to `normalize`)."""
        self._check_open()
        area = self._area(area)
        return self._metadata("norm_constants", area)["default_norm"]

    # ------------------------------------------------------------------ arrays
    def spectrograms(self, area: str, *, subset: Subset = "all", norm: Norm = None) -> np.ndarray:
        """Spectrogram of each sound, float32 ``(S, F, T)``.

        Parameters
        ----------
        area
            ``"A1"`` or ``"PEG"`` (any case, as the CLI takes it).
        subset
            ``"all"`` (default), ``"est"`` or ``"val"``: which sounds, in stim id order.
        norm
            None (default): raw ozgf values. ``"deepstrf"``: ``ln(1 + x)`` then one global
            min-max, as the old deepSTRF loader; ``"nems"``: ``ln(1 + x / 0.1)`` then
            min-max per band, values below 1e-6 after scaling set to 0 (NEMS0);
            ``"default"``: the preset the store was built with (``--norm``, see
            :meth:`default_norm`). Constants come from the whole
            population recording. Computed in float32: within about 1.2e-7 (absolute)
            of the old loader's float64 computation cast to float32.

        Returns
        -------
        numpy.ndarray
            float32 ``(S, F, T)``, ``F`` bands, ``T`` bins of ``dt_ms`` (10 ms by default).
            Raw results are a copy-on-write view of the store's file when the sounds are
            consecutive in the table (they are for every ``subset``).

        Raises
        ------
        MissingTableError
            When the store has no spectrograms for ``area``: as for any table it lacks,
            also when it was built at a bin width that is not a whole number of the
            population's spectrogram frames (the message says why, and what to rebuild).
        """
        self._check_open()
        area = self._area(area)
        md = self._metadata("spectrograms", area)
        if md.get("unavailable"):  # the table is there, empty: a store without spectrograms
            raise MissingTableError(
                f"no spectrograms in {self.path} for {area}: {md['unavailable']}"
            )
        ids = self._stim_ids(area, subset)
        n_bands, n_bins = int(md["n_bands"]), int(md["n_bins"])
        preset = self._preset(area, norm)
        values, private = self._vectors("spectrograms", area, "values", ids)
        if preset is None:
            return values.reshape(len(ids), n_bands, n_bins)
        offset, lo, hi = self._constants(area, preset, "spectrogram", n_bands)
        scaler = _Scaler(offset, lo, hi, _rule(preset, "spectrogram"))
        rows = values.reshape(len(ids) * n_bands, n_bins)
        out = rows if private else _aligned_empty(rows.shape)
        scaler.apply(rows, out, np.tile(np.arange(n_bands), len(ids)))
        return out.reshape(len(ids), n_bands, n_bins)

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
            ``"A1"`` or ``"PEG"`` (any case, as the CLI takes it).
        subset
            ``"all"`` (default), ``"est"`` or ``"val"``. With ``stims=``, every given sound
            must belong to it.
        norm
            None (default): counts per bin. ``"deepstrf"``: one global min-max;
            ``"nems"``: min-max per unit, values below 1e-6 after scaling set to 0;
            ``"default"``: the preset the store was built with (``--norm``, see
            :meth:`default_norm`). Constants come from the whole
            population recording; est responses and val single trials share them (one
            scale). The old deepSTRF loader scaled only est responses and left val
            trials as raw counts: ``subset="est", norm="deepstrf"`` together with
            ``subset="val", norm=None`` gives what it gave.
        cells
            Units to return, as cell ids (int) or unit ids (``"ARM029a-01-1"``, as
            ``cells.cell_id`` or a site file writes it: ``TNC015a-015-1`` is
            ``TNC015a-15-1``), in the order given. Default: every unit, in cell id
            order.
        stims
            Sounds to return, as stim ids (int) or epoch names (``"STIM_cat..."``), in the
            order given. Default: every sound of ``subset``, in stim id order.
        trials
            ``"all"`` (default): every repetition; ``R`` is the largest repetition count in
            the selection (1 for est sounds, 20 for val sounds in NAT4), and missing
            repetitions are NaN. ``"mean"``: the NaN-aware mean over repetitions (PSTH).
        max_bytes
            Memory budget of the result, in bytes (default 2 GiB); ``trials="mean"``
            counts three times its result (float64 sums and counts while averaging). A
            larger request fails before anything is allocated.

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
        self._check_open()
        area = self._area(area)
        if trials not in ("all", "mean"):
            raise ValueError(f"`trials` must be 'all' or 'mean', not {trials!r}")
        md = self._metadata("responses", area)
        n_bins = int(md["n_bins"])
        stim_ids = self._stim_ids(area, subset, stims)
        cell_ids = self._cell_ids(area, cells)
        preset = self._preset(area, norm)
        constants = None
        if preset is not None:
            offset, lo, hi = self._constants(area, preset, "responses", self._n_cells(area))
            constants = (offset, lo, hi, _rule(preset, "responses"))
        sidecar = self._sidecar("responses", area, ["stim", "cell", "trial", "counts"])
        if sidecar is not None:
            source = _SidecarRows(sidecar, n_bins)
        else:
            pf = self._parquet("responses", area)
            source = _ParquetRows(pf, self._require("responses", area), stim_ids, n_bins)
        return _dense_responses(
            source,
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
            ``"A1"`` or ``"PEG"`` (any case, as the CLI takes it).
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
        self._check_open()
        area = self._area(area)
        self._metadata("waveforms", area)
        ids = self._stim_ids(area, subset)
        return self._vectors("waveforms", area, "samples", ids)[0]

    def reliability(
        self,
        area: str,
        *,
        cells: Sequence[int | str] | None = None,
        seed: int = 0,
        n_splits: int = DEFAULT_SPLITS,
    ) -> pl.DataFrame:
        """Trial-to-trial reliability of each unit's val single trials (raw counts).

        Parameters
        ----------
        area
            ``"A1"`` or ``"PEG"`` (any case, as the CLI takes it).
        cells
            Units, as in :meth:`responses`. Default: every unit.
        seed, n_splits
            The random half-splits for ``rho_half``: ``n_splits`` drawn from a generator
            seeded by ``(seed, cell)`` (not the old reference's first 126 lexicographic
            splits, which all share trials 0-6). A unit's figures depend on these alone.

        Returns
        -------
        polars.DataFrame
            One row per unit, in the order asked: ``cell``, ``cell_id``, ``n_trials`` (its
            trials present for every val sound; a trial is the sounds one after the other),
            ``ttrc`` (mean Pearson r over all pairs of trials), ``rho_half`` (mean r between
            the PSTHs of two random halves), ``ccmax`` (``sqrt(2 / (1 + 1 / rho_half))``),
            ``seed``, ``n_splits``. NaN with fewer than two trials; see
            :mod:`nat4etl.reliability`.
        """
        import polars as pl

        from nat4etl import reliability

        self._check_open()
        area = self._area(area)
        if n_splits < 1:
            raise ValueError(f"`n_splits` must be at least 1, not {n_splits!r}")
        cell_ids = self._cell_ids(area, cells)
        val = self.responses(area, subset="val", cells=cell_ids.tolist())  # (S, N, R, T)
        rows = [
            reliability.unit_reliability(val[:, i], cell=int(c), seed=seed, n_splits=n_splits)
            for i, c in enumerate(cell_ids)
        ]
        names = self._frame("cells", area, "cell").select("cell", "cell_id")
        name_of = dict(zip(names["cell"].to_list(), names["cell_id"].to_list(), strict=True))
        return pl.DataFrame(
            {
                "cell": cell_ids.astype(np.int32),
                "cell_id": [name_of[int(c)] for c in cell_ids],
                "n_trials": [r["n_trials"] for r in rows],
                "ttrc": [r["ttrc"] for r in rows],
                "rho_half": [r["rho_half"] for r in rows],
                "ccmax": [r["ccmax"] for r in rows],
                "seed": [seed] * len(rows),
                "n_splits": [n_splits] * len(rows),
            },
            schema={
                "cell": pl.Int32,
                "cell_id": pl.String,
                "n_trials": pl.Int32,
                "ttrc": pl.Float64,
                "rho_half": pl.Float64,
                "ccmax": pl.Float64,
                "seed": pl.Int64,
                "n_splits": pl.Int32,
            },
        )

    # ------------------------------------------------------------------ helpers
    def _fact(self, key: tuple, compute):
        """``compute()`` once per store generation (an error is not remembered)."""
        try:
            return self._facts[key]
        except KeyError:
            value = self._facts[key] = compute()
            return value

    def _metadata(self, table: str, area: str) -> dict:
        """:meth:`metadata`, shared: do not modify."""

        def read() -> dict:
            self._require(table, area)
            return self._store.table_metadata(table, area)

        return self._fact(("metadata", table, area), read)

    def _check_store_version(self) -> None:
        from nat4etl import schema

        try:
            manifest = self._store.read_manifest()
        except (OSError, ValueError) as err:  # JSONDecodeError is a ValueError
            raise StoreError(
                f"{self.path / 'manifest.json'} is unreadable ({err}); `nat4etl verify --out "
                f"{self.path}` checks the store, `nat4etl build --out {self.path}` rewrites it"
            ) from None
        if manifest is not None and not isinstance(manifest, dict):
            raise StoreError(
                f"{self.path / 'manifest.json'} is not a JSON object; rebuild with "
                f"`nat4etl build --out {self.path}`"
            )
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
            if table == "waveforms":
                self._built_without_waveforms(area)
            stage = _WRITTEN_BY.get(table, "build")
            raise MissingTableError(
                f"table {table!r} for {area} is not in {self.path}; run `nat4etl {stage} "
                f"--out {self.path}` (or `nat4etl build`)"
            )
        return path

    def _built_without_waveforms(self, area: str) -> None:
        """MissingTableError naming the build that adds waveforms if this store was built
        without them (its manifest records ``wav`` false): `align-wav` alone cannot, as
        the store holds no wav.zip."""
        from nat4etl.stages.build import build_command, store_parameters

        try:
            params = store_parameters(self._store)  # the pinned generation's manifest
        except (OSError, ValueError):
            return
        if params.get("wav") is not False:
            return
        command = build_command(self.path, params, wav=True)
        raise MissingTableError(
            f"{self.path} was built without waveforms (its manifest records wav = false: "
            f"`--no-wav`, or `wav = false` in the config), so {area} has no waveforms "
            f"table. To add them, run `{command}`: a build with waveforms, which needs "
            "wav.zip (downloaded from Zenodo, or copied from the --source mirror) and keeps "
            "the store's other parameters"
        )

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

    def _sidecar(self, table: str, area: str, columns: list[str]) -> _Mapped | None:
        """``columns`` of the table's Arrow IPC sidecar, mapped copy-on-write: zero-copy,
        writable, private to this call. None when there is no usable sidecar (the caller
        reads the Parquet file): absent, unreadable, or not the same table as the Parquet
        file beside it (metadata or row count differ; then a warning says so)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from nat4etl.store import META_KEY, check_file_metadata

        parquet = self._require(table, area)
        path = self._store.sidecar_file(table, area)
        # warnings name the store's path, not the pinned generation's /proc/self/fd/N
        shown = self.path / path.relative_to(self._store.root)
        try:
            mapped = memory.map_private(path)  # holds no descriptor, unlike mmap.mmap
        except FileNotFoundError:
            return None
        except OSError as err:
            if err.errno in _NOT_THE_FILES_FAULT:  # the process's limits, not the store
                raise
            return _unusable(shown, f"unreadable ({err})")
        except ValueError as err:  # e.g. an empty file cannot be mapped
            return _unusable(shown, f"unreadable ({err})")
        whole = pa.py_buffer(mapped)
        try:
            reader = pa.ipc.open_file(pa.BufferReader(whole))
            schema = reader.schema
            batches = [
                reader.get_batch(i).select(columns) for i in range(reader.num_record_batches)
            ]
        except (pa.ArrowException, KeyError, ValueError) as err:
            return _unusable(shown, f"unreadable ({err})")
        rows = sum(b.num_rows for b in batches)

        def matches() -> bool:
            footer = pq.read_metadata(parquet)
            mine = (schema.metadata or {}).get(META_KEY)
            if mine != (footer.metadata or {}).get(META_KEY) or rows != footer.num_rows:
                _unusable(shown, f"does not match {parquet.name} beside it")
                return False
            check_file_metadata(table, schema, path)
            return True

        if not self._fact(("sidecar matches", table, area), matches):
            return None
        if not batches:
            return _Mapped(schema.remove_metadata().empty_table().select(columns), mapped, 0)
        return _Mapped(pa.Table.from_batches(batches), mapped, whole.address)

    def _frame(self, table: str, area: str, key: str) -> pl.DataFrame:
        import polars as pl

        return pl.from_arrow(self._table(table, area)).sort(key)

    def _stim_ids(
        self, area: str, subset: Subset, stims: Sequence[int | str] | None = None
    ) -> np.ndarray:
        if subset not in SUBSETS:
            raise ValueError(f"`subset` must be one of {SUBSETS}, not {subset!r}")
        if stims is None:

            def read() -> np.ndarray:
                import pyarrow.compute as pc

                table = self._table("stims", area, ["stim", "subset"])
                ids = table.column("stim").to_numpy()
                if subset != "all":
                    is_in = pc.equal(table.column("subset"), subset)
                    ids = ids[is_in.to_numpy(zero_copy_only=False)]
                return _frozen(np.sort(ids).astype(np.int64))

            return self._fact(("stim ids", area, subset), read)
        table = self._table("stims", area, ["stim", "name", "subset"])
        ids = table.column("stim").to_numpy()
        subsets = np.asarray(table.column("subset").to_pylist(), dtype=object)
        chosen = _resolve(stims, ids, table.column("name").to_pylist(), what="stims")
        if subset != "all":
            by_id = dict(zip(ids.tolist(), subsets.tolist(), strict=True))
            wrong = [int(s) for s in chosen if by_id[int(s)] != subset]
            if wrong:
                raise ValueError(f"stims {wrong} are not in subset {subset!r}")
        return chosen

    def _n_cells(self, area: str) -> int:
        return self._fact(("n cells", area), lambda: self._parquet("cells", area).metadata.num_rows)

    def _cell_ids(self, area: str, cells: Sequence[int | str] | None) -> np.ndarray:
        if cells is None:

            def read() -> np.ndarray:
                ids = self._table("cells", area, ["cell"]).column("cell").to_numpy()
                return _frozen(np.sort(ids).astype(np.int64))

            return self._fact(("cell ids", area), read)
        table = self._table("cells", area, ["cell", "cell_id"])
        ids = table.column("cell").to_numpy()
        names = table.column("cell_id").to_pylist()
        return _resolve(cells, ids, names, what="cells", alias=_unit_aliases(names, ids))

    def _vectors(
        self, table: str, area: str, column: str, ids: np.ndarray
    ) -> tuple[np.ndarray, bool]:
        """Rows ``ids`` (stim ids) of a (stim, vector) table as a float32 (len(ids), width),
        and whether that array is private memory (False: a copy-on-write view of the
        sidecar, better not written into)."""
        mapped = self._sidecar(table, area, ["stim", column])
        t = mapped.table if mapped is not None else self._table(table, area, ["stim", column])
        width = t.schema.field(column).type.list_size
        stim = t.column("stim").to_numpy()
        if len(ids) == 0:
            return np.empty((0, width), np.float32), True
        pos = np.searchsorted(stim, ids)
        if np.any(pos >= len(stim)) or np.any(stim[np.minimum(pos, len(stim) - 1)] != ids):
            missing = sorted(set(ids.tolist()) - set(stim.tolist()))
            raise StoreError(f"table {table!r} for {area} lacks stims {missing}; rebuild it")
        if mapped is not None:
            values, private = mapped.vectors(column), False
        else:  # decoded Parquet pages: a view of memory only this call holds
            values, private = _column_rows(t.column(column), width), True
        if pos[-1] - pos[0] == len(pos) - 1 and np.all(np.diff(pos) == 1):
            return values[pos[0] : pos[0] + len(pos)], private
        return values[pos], True

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
        key = ("constants", area, preset, signal, n_channels)
        return self._fact(key, lambda: self._read_constants(area, preset, signal, n_channels))

    def _read_constants(
        self, area: str, preset: str, signal: str, n_channels: int
    ) -> tuple[float, np.ndarray, np.ndarray]:
        md = self._metadata("norm_constants", area)
        data_md = self._metadata("responses", area)
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
        return offset, _frozen(lo), _frozen(hi)


# ============================================================================ helpers
def _rule(preset: str, signal: str) -> Rule:
    """How ``preset`` scales ``signal`` (its floor, how a zero range is treated)."""
    from nat4etl.stages.normalize import RULES

    return RULES[(preset, signal)]


#: alignment of the arrays the reader fills: jax (CPU) takes a DLPack buffer without a copy
#: only when it is 64-byte aligned (numpy's own allocations are 16-byte aligned)
_RESULT_ALIGN = 64


def _aligned_empty(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialized float32 array whose data starts on a 64-byte boundary."""
    n = int(np.prod(shape, dtype=np.int64)) * 4
    raw = np.empty(n + _RESULT_ALIGN, dtype=np.uint8)
    skip = -raw.ctypes.data % _RESULT_ALIGN
    return raw[skip : skip + n].view(np.float32).reshape(shape)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


#: rows normalized per step: ~1 MiB, so the steps after the first run in L2 cache
_SCALE_BLOCK_BYTES = 1 << 20


class _Scaler:
    """One normalization preset's constants, applied block by block.

    Exactly the float32 operations of :func:`nat4etl.stages.normalize.scale`, in the same
    order (so the same bits), but on blocks of rows small enough to stay in cache: reading
    the source and writing the result is one pass over memory, not five.
    """

    def __init__(self, offset: float, lo: np.ndarray, hi: np.ndarray, rule: Rule):
        from nat4etl.stages.normalize import float32_constants

        self.offset = offset
        self.floor = np.float32(rule.floor)
        self.lo, self.span = float32_constants(lo, hi, flat_unscaled=rule.flat_unscaled)

    def apply(self, x: np.ndarray, out: np.ndarray, channel: np.ndarray) -> None:
        """``out = scale(x)`` for 2-D ``x`` (rows, width); row ``i`` uses the constants of
        ``channel[i]``. ``out`` may be ``x``."""
        n, width = x.shape
        step = max(1, _SCALE_BLOCK_BYTES // max(1, width * 4))
        mask = np.empty((min(step, n), width), dtype=bool)
        for a in range(0, n, step):
            b = min(n, a + step)
            src, dst, ch = x[a:b], out[a:b], channel[a:b]
            if self.offset:
                if self.offset != 1:
                    np.divide(src, np.float32(self.offset), out=dst)
                    src = dst
                np.log1p(src, out=dst)
                src = dst
            np.subtract(src, self.lo[ch][:, None], out=dst)
            np.divide(dst, self.span[ch][:, None], out=dst)
            # values < floor -> +0, NaN kept: the same bits as copyto(where=dst < floor),
            # at a tenth of its cost
            np.maximum(dst, np.float32(0), out=dst)  # -inf and negatives -> 0, NaN kept
            if self.floor > 0:
                m = mask[: b - a]
                np.greater_equal(dst, self.floor, out=m)  # NaN -> False, and NaN * 0 = NaN
                np.multiply(dst, m, out=dst)
            np.add(dst, np.float32(0), out=dst)  # -0.0 -> +0.0


def _unusable(path: Path, why: str) -> None:
    warnings.warn(
        f"{path} {why}; reading the Parquet file instead (slower). `nat4etl verify` checks "
        "the store, `nat4etl build --force` rewrites it",
        RuntimeWarning,
        stacklevel=4,
    )
    return None


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
    """((slots, sums), counts): per distinct slot, the float64 sum and the count of the
    finite values (float64: exact for these values, so any blocking gives the same bits).

    The table is sorted by (stim, cell, trial), so a block's slots usually come in runs
    already; only a caller-chosen stim/cell order needs the sort. Runs of one length (every
    unit with all its repetitions) are summed as a (groups, R, T) array, without reduceat.
    """
    if np.any(slot[1:] < slot[:-1]):
        order = np.argsort(slot, kind="stable")
        slot, rows = slot[order], rows[order]
    first = np.flatnonzero(np.r_[True, slot[1:] != slot[:-1]])
    sizes = np.diff(np.r_[first, len(slot)])
    uniform = bool(np.all(sizes == sizes[0]))
    has_nan = bool(np.isnan(rows).any())
    if has_nan:
        finite = np.isfinite(rows)
        rows = np.where(finite, rows, np.float32(0))
    if uniform:
        k, width = int(sizes[0]), rows.shape[1]
        sums = rows.reshape(-1, k, width).sum(axis=1, dtype=np.float64)
        if has_nan:
            return (slot[first], sums), finite.reshape(-1, k, width).sum(axis=1, dtype=np.float32)
        return (slot[first], sums), np.full((len(first), 1), k, dtype=np.float32)
    sums = np.add.reduceat(rows, first, axis=0, dtype=np.float64)
    if has_nan:
        return (slot[first], sums), np.add.reduceat(finite, first, axis=0, dtype=np.float32)
    return (slot[first], sums), sizes.astype(np.float32)[:, None]


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


def _unit_aliases(names: list[str], ids: np.ndarray):
    """A unit id as a site file may spell it (``TNC015a-015-1`` for ``TNC015a-15-1``: the
    same site, electrode and unit numbers, as parse-epochs matches them) -> its cell id;
    None when no single cell has those numbers."""
    from nat4etl.nat4 import canonical_unit_key

    by_key: dict[tuple, list[int]] = {}
    for name, cell in zip(names, ids.tolist(), strict=True):
        key = canonical_unit_key(name) if isinstance(name, str) else None
        if key is not None:
            by_key.setdefault(key, []).append(cell)

    def alias(name: str) -> int | None:
        key = canonical_unit_key(name)
        hits = by_key.get(key, []) if key is not None else []
        return hits[0] if len(hits) == 1 else None

    return alias


def _resolve(
    wanted: Sequence[int | str],
    ids: np.ndarray,
    names: list[str],
    *,
    what: str,
    alias=None,
) -> np.ndarray:
    """User selection (ids or names) -> ids, in the given order; unknown or repeated: error.
    ``alias(name)``: the id of a name spelled otherwise, or None."""
    if isinstance(wanted, str | int | np.integer):
        wanted = [wanted]
    by_name = dict(zip(names, ids.tolist(), strict=True))
    known = set(ids.tolist())
    out, unknown, given = [], [], {}
    for w in wanted:
        if isinstance(w, str):
            v = by_name.get(w)
            if v is None and alias is not None:
                v = alias(w)
        elif isinstance(w, bool | np.bool_) or not isinstance(w, int | np.integer):
            # 1.5, True, None: not an id (int(1.5) would silently select id 1)
            raise TypeError(
                f"`{what}` takes ids (int) or names (str), not {w!r} ({type(w).__name__})"
            )
        else:
            v = int(w) if int(w) in known else None
        if v is None:
            unknown.append(w)
        else:
            if v in given:
                raise ValueError(
                    f"`{what}` repeats an entry: {w!r} and {given[v]!r} are both {what[:-1]} {v}"
                )
            given[v] = w
            out.append(v)
    if unknown:
        raise ValueError(f"unknown {what}: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return np.asarray(out, dtype=np.int64)


@dataclass
class _Selection:
    """The responses rows a request takes, in table order, and where each one goes."""

    first: int | None  # the rows are first, first + 1, ... (one run of the table), or
    src: np.ndarray | None  # their indices into the source's key arrays, ascending
    slot: np.ndarray  # s * N + n in the result
    trial: np.ndarray
    n_trials: int  # R: the largest repetition count among them

    def part(self, start: int, end: int) -> tuple[slice, int | np.ndarray]:
        """The selected rows whose table row is in [start, end), and those table rows
        relative to ``start`` (an int: consecutive rows from there)."""
        n = len(self.slot)
        if self.first is not None:
            a, b = (min(max(x - self.first, 0), n) for x in (start, end))
            return slice(a, b), self.first + a - start
        a, b = np.searchsorted(self.src, [start, end]).tolist()
        return slice(a, b), self.src[a:b] - start

    def any_in(self, start: int, end: int) -> bool:
        part = self.part(start, end)[0]
        return part.stop > part.start


def _select(
    stim: np.ndarray,
    cell: np.ndarray,
    trial: np.ndarray,
    stim_ids: np.ndarray,
    cell_ids: np.ndarray,
) -> _Selection:
    """Rows of the wanted (stim, cell) pairs; ``stim`` is sorted (tables are in key order).

    Works on the key columns in place (views of the sidecar): the common requests (a
    subset's sounds, every unit) cost a handful of passes over int32 columns."""
    n_s, n_n = len(stim_ids), len(cell_ids)
    want = stim_ids.astype(stim.dtype, copy=False)
    lo = np.searchsorted(stim, want, "left")
    hi = np.searchsorted(stim, want, "right")
    counts = hi - lo
    total = int(counts.sum())
    if total == 0 or n_n == 0:
        empty = np.empty(0, np.int64)
        return _Selection(None, empty, empty, empty, 1)
    index = np.int64 if n_s * n_n >= 2**31 else np.int32
    first, src = None, None
    if np.all(lo[1:] == hi[:-1]):  # the wanted sounds' rows follow each other in the table
        first = int(lo[0])
        rows = slice(first, first + total)
        c, t = cell[rows], trial[rows]
        if np.all(np.diff(stim_ids) == 1):  # consecutive ids, ascending: position = offset
            s_pos = np.subtract(stim[rows], int(stim_ids[0]), dtype=index)
        else:
            s_pos = np.repeat(np.arange(n_s, dtype=index), counts)
    else:
        src = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(total)
        c, t = cell[src], trial[src]
        s_pos = np.repeat(np.arange(n_s, dtype=index), counts)
    every_unit = int(cell_ids[0]) == 0 and bool(np.all(np.diff(cell_ids) == 1))
    if every_unit and 0 <= int(c.min()) and int(c.max()) < n_n:  # position = cell id
        slot = np.add(np.multiply(s_pos, n_n, out=s_pos), c, out=s_pos)
        keep = None
    else:
        n_pos = _position_lookup(cell_ids, int(max(c.max(), cell_ids.max())) + 1)[c]
        slot = np.add(np.multiply(s_pos, n_n, out=s_pos), n_pos, out=s_pos, casting="unsafe")
        keep = np.flatnonzero(n_pos >= 0)
        if len(keep) == len(n_pos):
            keep = None
    if keep is not None:
        src = first + keep if first is not None else src[keep]
        first, slot, t = None, slot[keep], t[keep]
    if src is not None and len(src) > 1 and np.any(src[1:] < src[:-1]):  # sounds out of order
        order = np.argsort(src, kind="stable")
        src, slot, t = src[order], slot[order], t[order]
    n_trials = int(t.max()) + 1 if len(t) else 1
    return _Selection(first, src, slot, t, n_trials)


def _position_lookup(ids: np.ndarray, size: int) -> np.ndarray:
    lookup = np.full(size, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    return lookup


#: errors opening or mapping a sidecar that say nothing about the file itself
_NOT_THE_FILES_FAULT = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


@dataclass
class _Mapped:
    """Columns of a sidecar mapped copy-on-write; ``base`` is the mapping's address."""

    table: pa.Table
    mapped: Any  # memory.map_private's buffer
    base: int

    def vectors(self, column: str) -> np.ndarray:
        """A fixed_size_list<float32> column as (rows, width): a writable view of the
        private mapping itself (Arrow hands out its buffers read-only)."""
        col = self.table.column(column)
        width = col.type.list_size
        if col.num_chunks != 1:
            return _column_rows(col, width)
        chunk = col.chunk(0)
        if len(chunk) == 0:
            return np.empty((0, width), dtype=np.float32)
        values = chunk.values
        if values.null_count:
            raise StoreError("a fixed_size_list<float32> column holds nulls; rebuild the store")
        start = values.buffers()[1].address - self.base + (values.offset + chunk.offset * width) * 4
        flat = np.frombuffer(self.mapped, np.float32, count=len(chunk) * width, offset=start)
        return flat.reshape(len(chunk), width)


class _SidecarRows:
    """The responses rows of the Arrow sidecar: keys and counts are views of the mapping."""

    def __init__(self, mapped: _Mapped, n_bins: int):
        self.table = mapped.table
        self.counts = mapped.vectors("counts")

    def keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self.table.column(k).to_numpy() for k in ("stim", "cell", "trial"))

    def each_block(self, fn, needed=None) -> None:
        fn(self.counts, 0, len(self.counts))


class _ParquetRows:
    """The responses rows of the Parquet file: the key columns of the row groups that can
    hold the wanted sounds (by their statistics), then each group's counts decoded on a
    few threads."""

    def __init__(self, pf, path: Path, stim_ids: np.ndarray, n_bins: int):
        self.pf, self.path, self.n_bins = pf, path, n_bins
        lo_id, hi_id = (int(stim_ids.min()), int(stim_ids.max())) if len(stim_ids) else (0, -1)
        self.groups = []
        for g in range(pf.metadata.num_row_groups):
            stats = pf.metadata.row_group(g).column(0).statistics  # column 0 is stim
            if (
                stats is None
                or not stats.has_min_max
                or (stats.max >= lo_id and stats.min <= hi_id)
            ):
                self.groups.append(g)
        sizes = [pf.metadata.row_group(g).num_rows for g in self.groups]
        self.starts = np.r_[0, np.cumsum(sizes, dtype=np.int64)]

    def keys(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not self.groups:
            return (np.empty(0, np.int32),) * 3
        keys = self.pf.read_row_groups(self.groups, columns=["stim", "cell", "trial"])
        return tuple(keys.column(k).to_numpy() for k in ("stim", "cell", "trial"))

    def each_block(self, fn, needed=None) -> None:
        """``fn(rows, start, end)`` for each row group [start, end) that ``needed``."""

        def one_group(i: int) -> None:
            start, end = int(self.starts[i]), int(self.starts[i + 1])
            if needed is not None and not needed(start, end):
                return
            column = _read_group(self.path, self.pf.metadata, self.groups[i], "counts")
            fn(_column_rows(column, self.n_bins), start, end)

        _run_threaded(one_group, [(i,) for i in range(len(self.groups))])


#: a run of rows is copied in pieces of this size: faster than one memcpy of hundreds of MB
#: (measured here: 39 ms instead of 62 ms for 293 MB), and it lets two threads share a run
_COPY_BLOCK_BYTES = 16 << 20
#: a result larger than this is filled on two threads (copies and ufuncs release the GIL)
_PARALLEL_BYTES = 64 << 20


def _split_work(pieces: list, work, n_bytes: int) -> None:
    """``work(pieces)``, on two threads (half the pieces each) when the job is large."""
    if n_bytes < _PARALLEL_BYTES or len(pieces) < 2 or (os.cpu_count() or 1) < 2:
        work(pieces)
        return
    half = len(pieces) // 2
    failed: list[BaseException] = []

    def first_half() -> None:
        try:
            work(pieces[:half])
        except BaseException as err:  # re-raised below, in the caller's thread
            failed.append(err)

    helper = threading.Thread(target=first_half)
    helper.start()
    try:
        work(pieces[half:])
    finally:
        helper.join()
    if failed:
        raise failed[0]


def _scatter(out, rows, src: int | np.ndarray, dest, scaler: _Scaler | None, channel_of) -> None:
    """``out[dest] = rows[src]`` row by row, normalized on the way if ``scaler``; ``src``
    is an array, or an int for the consecutive rows ``src, src + 1, ...``.

    Rows that follow each other in both go as one block copy (the usual case: the table is
    in the result's order), so filling the result is one pass over memory."""
    n = len(dest)
    if n == 0:
        return
    consecutive = isinstance(src, int)
    step = np.diff(dest) != 1
    if not consecutive:
        step |= np.diff(src) != 1
    brk = np.flatnonzero(step) + 1
    starts, ends = np.r_[0, brk], np.r_[brk, n]
    if len(starts) <= max(64, n // 16):
        firsts = (starts + src) if consecutive else src[starts]
        row_bytes = max(1, rows.shape[1] * 4)
        block = max(1, _COPY_BLOCK_BYTES // row_bytes)
        pieces = [  # (from, to, rows): runs cut into blocks
            (s0 + k, d0 + k, min(block, e - a - k))
            for a, e, s0, d0 in zip(
                starts.tolist(), ends.tolist(), firsts.tolist(), dest[starts].tolist(), strict=True
            )
            for k in range(0, e - a, block)
        ]

        def work(some: list[tuple[int, int, int]]) -> None:
            for s0, d0, k in some:
                if scaler is None:
                    out[d0 : d0 + k] = rows[s0 : s0 + k]
                else:
                    scaler.apply(rows[s0 : s0 + k], out[d0 : d0 + k], channel_of(d0, d0 + k))

        _split_work(pieces, work, n * row_bytes)
        return
    picked = rows[np.arange(src, src + n) if consecutive else src]  # scattered: gather, scatter
    if scaler is not None:
        scaler.apply(picked, picked, channel_of(dest))
    out[dest] = picked


def _fill_missing(out: np.ndarray, dest: np.ndarray) -> None:
    """NaN in the rows of ``out`` that no ``dest`` names (``dest`` distinct)."""
    if len(dest) == len(out):
        return
    if len(dest) == 0:
        out.fill(np.nan)
        return
    step = np.diff(dest)
    if np.all(step > 0):  # ascending (the usual order): NaN the gaps between runs
        after = np.flatnonzero(step > 1)
        gaps = zip(
            [-1, *dest[after].tolist(), int(dest[-1])],
            [int(dest[0]), *dest[after + 1].tolist(), len(out)],
            strict=True,
        )
        for a, b in gaps:
            out[a + 1 : b] = np.nan
        return
    missing = np.ones(len(out), dtype=bool)
    missing[dest] = False
    out[missing] = np.nan


def _amount(n_bytes: int) -> str:
    """A byte count for a message: exact below 1 KiB, else in binary units (as the budget's
    default, 2 GiB) with the exact count, so two amounts that differ never print alike."""
    if n_bytes < 1024:
        return f"{n_bytes:,} bytes"
    size, unit = n_bytes / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if size < 1024:
            break
        size, unit = size / 1024, bigger
    return f"{size:.2f} {unit} ({n_bytes:,} bytes)"


def _dense_responses(
    source: _SidecarRows | _ParquetRows,
    stim_ids: np.ndarray,
    cell_ids: np.ndarray,
    n_bins: int,
    *,
    trials: Trials,
    constants: tuple[float, np.ndarray, np.ndarray, Rule] | None,
    max_bytes: int,
    area: str,
) -> np.ndarray:
    """The dense result (checked against the budget first), NaN where no row lands.

    Raw ``trials="all"`` from the sidecar is a view of it when the selected rows are
    exactly the dense grid in order (every unit, every repetition); otherwise the result is
    filled with one pass over the selected rows."""
    sel = _select(*source.keys(), stim_ids, cell_ids)
    n_s, n_n = len(stim_ids), len(cell_ids)
    n_r = sel.n_trials if trials == "all" else 1
    shape = (n_s, n_n, n_r, n_bins) if trials == "all" else (n_s, n_n, n_bins)
    n_bytes = int(np.prod(shape, dtype=np.int64)) * 4
    if trials == "mean":
        n_bytes *= 3  # float64 sums and float32 counts (then the result) while averaging
    if n_bytes > max_bytes:
        hint = (
            "ask for trials='mean' (the PSTH), subset='est' or 'val', or fewer stims/cells"
            if trials == "all"
            else "ask for a subset or fewer stims/cells"
        )
        size = (
            f"responses({area!r}) would be {shape} float32 = {_amount(n_bytes)}"
            if trials == "all"
            else f"responses({area!r}, trials='mean') would be {shape} float32, taking "
            f"{_amount(n_bytes)} while averaging"
        )
        raise ResultTooLarge(
            f"{size}, over the budget of {_amount(max_bytes)} "
            f"(max_bytes); nothing was allocated. Hint: {hint}, or raise max_bytes"
        )
    scaler = None
    if constants is not None:
        offset, lo, hi, rule = constants
        scaler = _Scaler(offset, lo[cell_ids], hi[cell_ids], rule)  # channel: cell_ids position
    n_slots = n_s * n_n
    if trials == "all":
        n_rows = n_slots * n_r
        dest = sel.slot
        if n_r > 1:
            dest = dest.astype(np.int64 if n_rows >= 2**31 else dest.dtype) * n_r + sel.trial
        if (
            scaler is None
            and isinstance(source, _SidecarRows)
            and sel.first is not None
            and len(dest) == n_rows > 0
            and int(dest[0]) == 0
            and bool(np.all(np.diff(dest) == 1))
        ):  # the rows are the dense grid, in order: the result is a view, no copy at all
            return source.counts[sel.first : sel.first + n_rows].reshape(shape)
        out = _aligned_empty((n_rows, n_bins))

        def channel_of(d0, d1=None):
            d = np.arange(d0, d1) if d1 is not None else d0
            return (d // n_r) % n_n

        def fill(rows: np.ndarray, start: int, end: int) -> None:
            part, src = sel.part(start, end)
            _scatter(out, rows, src, dest[part], scaler, channel_of)

        source.each_block(fill, sel.any_in)  # distinct rows per block: no lock needed
        _fill_missing(out, dest)
        return out.reshape(shape)

    sums = np.zeros((n_slots, n_bins), dtype=np.float64)
    counts = _aligned_empty((n_slots, n_bins))  # becomes the result
    counts.fill(0)
    lock = threading.Lock()
    step = max(1, (16 << 20) // (n_bins * 4 or 1))  # bounded temporaries: 16 MiB of rows

    def accumulate(rows: np.ndarray, start: int, end: int) -> None:
        part, src = sel.part(start, end)
        slot = sel.slot[part]
        a = 0
        while a < len(slot):
            b = min(len(slot), a + step)
            if b < len(slot):  # end the block where a (stim, cell) ends, if that is near
                after = np.flatnonzero(slot[b : b + sel.n_trials] != slot[b - 1])
                b += int(after[0]) if len(after) else 0
            slot_b = slot[a:b]
            if isinstance(src, int) or int(src[b - 1] - src[a]) == b - a - 1:
                s0 = src + a if isinstance(src, int) else int(src[a])
                picked, fresh = rows[s0 : s0 + b - a], False
            else:
                picked, fresh = rows[src[a:b]], True
            a = b
            if scaler is not None:
                target = picked if fresh else np.empty_like(picked)
                scaler.apply(picked, target, slot_b % n_n)
                picked = target
            (slots, part_sums), n = _group_sums(slot_b, picked)
            with lock:  # a (stim, cell) may straddle two blocks
                sums[slots] += part_sums
                counts[slots] += n

    source.each_block(accumulate, sel.any_in)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.divide(sums, counts, out=counts)  # 0/0 -> NaN: no repetition recorded
    return mean.reshape(shape)

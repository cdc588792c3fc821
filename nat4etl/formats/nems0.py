"""NEMS0 recording archives: members -> meta, signal headers, epoch tables, data.

Follows ``load_recording_from_targz_stream`` (nems0-format.md §1) but is more robust:

- members may come in any order; they are paired by ``(view, R.S)`` from the basename
  (``R.S.ext``, ``NN.R.S.ext`` for view NN, ``R.S.epoch.csv`` singular);
- empty members, OS litter (``.DS_Store``, ``._*``) and unknown names are *skipped and
  listed* in `Recording.skipped` instead of failing, except an empty CSV next to its
  JSON: a rasterized signal with no samples (C x 0);
- the recording meta is ``R.meta.json`` exactly (NEMS0 takes any ``*meta.json``);
- a later view's data member without its own JSON takes the sidecar (and epochs) of the
  same signal in the nearest earlier view: ``Recording.save_dir`` writes ``01.R.S.csv``
  but no ``01.R.S.json``;
- epoch CSVs are read by header name, and names such as ``NA`` stay strings.

Everything is returned in file units (seconds, Hz) with no NAT4 meaning. Data members are
handed to a callback *as they stream past*, so one pass over a gzip tar can parse the
~1.9 GB population CSV without holding it (`read_recording(on_data=...)`).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any, BinaryIO, Literal

import numpy as np
import pyarrow as pa

from nat4etl.errors import FormatError, MissingMember
from nat4etl.formats import archive, nems0_csv, nems0_h5

__all__ = [
    "DataHandler",
    "DataMember",
    "MemberRole",
    "Recording",
    "Signal",
    "SignalHeader",
    "SignalType",
    "Skipped",
    "classify_member",
    "parse_meta_json",
    "parse_signal_json",
    "read_epochs",
    "read_recording",
]

SignalType = Literal["rasterized", "point_process", "tiled"]
DataKind = Literal["csv", "h5"]

# signal_type is matched by substring, as load_signal_from_streams does
_TYPE_SUBSTRINGS: tuple[tuple[str, SignalType], ...] = (
    ("RasterizedSignal", "rasterized"),
    ("PointProcess", "point_process"),
    ("TiledSignal", "tiled"),
)
_DATA_KIND: dict[SignalType, DataKind] = {
    "rasterized": "csv",
    "point_process": "h5",
    "tiled": "h5",
}
_UNNAMED = re.compile(r"^(|Unnamed: \d+)$")
_MAX_DTYPE_BYTES = 1024  # an __ndarray__ dtype bigger than this is not numpy-encoder output
_MAX_SIDECAR_BYTES = 256 << 20  # JSON / epoch members are kB to a few MB


# --- what the reader returns ---------------------------------------------------------------


@dataclass(frozen=True)
class Skipped:
    """A member the reader ignored, and why (NEMS0 would have failed on most)."""

    name: str
    size_bytes: int
    reason: str


@dataclass(frozen=True)
class MemberRole:
    """What a member name means: its role and the (view, key) it pairs under."""

    role: Literal["meta", "json", "epochs", "data"]
    view: int
    key: str  # "R.S" from the basename; "R" for the meta
    data_kind: DataKind | None = None


@dataclass(frozen=True)
class SignalHeader:
    """The ``R.S.json`` sidecar. ``fs_hz`` in Hz; ``segments`` as written (see §4)."""

    name: str
    fs_hz: float
    recording: str
    signal_type: SignalType
    chans: tuple[str, ...] | None  # as written; may not match the data's rows (a mask)
    segments: np.ndarray | None  # (n, 2) float64, or None when absent / null
    meta: Any
    signal_type_raw: str | None  # the JSON string, None when the key is absent
    raw: dict[str, Any] = field(repr=False, compare=False)  # the whole JSON object


@dataclass(frozen=True)
class DataMember:
    """What a data handler is told about the member it is given."""

    name: str
    size_bytes: int
    kind: DataKind
    view: int
    key: str
    header: SignalHeader | None  # set when the JSON came earlier in the archive
    path: str | None
    qualname: str  # the member as named in errors


DataHandler = Callable[[DataMember, BinaryIO], Any]


@dataclass(frozen=True)
class Signal:
    """One signal of one view: header, epochs and data (or the handler's result)."""

    header: SignalHeader
    view: int
    key: str
    json_member: str
    data_member: str
    data_kind: DataKind
    data_size_bytes: int
    epoch_member: str | None
    epochs: pa.Table | None  # name, start_s, end_s, extra columns as strings
    data: Any = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def fs_hz(self) -> float:
        return self.header.fs_hz

    @property
    def signal_type(self) -> SignalType:
        return self.header.signal_type


@dataclass
class Recording:
    """A NEMS0 recording as the archive holds it.

    ``signals`` is view 0 keyed by JSON ``name``; ``views[k]`` is view k (a copy of view
    k-1 updated with the signals view k defines, as NEMS0 builds them).
    """

    name: str | None
    meta: Any
    signals: dict[str, Signal]
    views: list[dict[str, Signal]]
    skipped: list[Skipped]
    path: str | None = None
    _source: Any = field(default=None, repr=False)
    _limits: archive.Limits | None = field(default=None, repr=False)

    def epochs(self, *, view: int = 0) -> pa.Table:
        """All signals' epochs of a view, concatenated in signal order, with a ``signal``
        column first. No dedup or sorting: that is interpretation."""
        tables = []
        for sig in self.views[view].values() if self.views else []:
            if sig.epochs is not None:
                col = pa.array([sig.name] * sig.epochs.num_rows, pa.string())
                tables.append(
                    sig.epochs.select(["name", "start_s", "end_s"]).add_column(0, "signal", col)
                )
        if not tables:
            return _empty_epochs().add_column(0, "signal", pa.array([], pa.string()))
        return pa.concat_tables(tables)

    @contextlib.contextmanager
    def open_data(self, signal: str, *, view: int = 0) -> Iterator[BinaryIO]:
        """Stream a signal's data member again (re-reads the archive up to it)."""
        try:
            sig = self.views[view][signal]
        except (IndexError, KeyError):
            msg = f"no signal {signal!r} in view {view}"
            raise MissingMember(msg, path=self.path) from None
        if self._source is None:
            msg = "recording was read from a stream; pass a path or bytes to reopen data"
            raise FormatError(msg, path=self.path, member=sig.data_member)
        with archive.open_member(
            self._source, sig.data_member, path=self.path, limits=self._limits
        ) as stream:
            yield stream


# --- reading a recording -------------------------------------------------------------------


def read_recording(
    source: archive.Source | archive.Member,
    *,
    path: str | os.PathLike | None = None,
    on_data: DataHandler | None = None,
    load_data: bool = True,
    limits: archive.Limits | None = None,
    threads: int = 1,
) -> Recording:
    """Read a NEMS0 recording archive (gzip or plain tar) in one pass.

    Parameters
    ----------
    source
        Path, bytes, binary stream, or an `archive.Member` holding the tgz (a per-site
        recording inside a zip). A path may also be a directory holding the files (what
        ``Recording.save_dir`` writes).
    path
        Name used in errors when ``source`` is not a path.
    on_data
        ``on_data(member, stream) -> result`` is called for each data member (``.csv`` /
        ``.h5``) while it streams past; the result lands in `Signal.data`. Use it to parse
        the big CSV block by block (`nems0_csv.iter_raster_blocks`).
    load_data
        Without ``on_data``: True (default) parses data into memory (rasterized: C x T
        float32; PointProcess/TiledSignal: key -> float64 array, keys sorted); False
        leaves ``data`` None (use `Recording.open_data` later).
    limits
        Archive size/ratio bounds.
    threads
        CSV parser threads for the default loader (see `nems0_csv.read_raster`).

    Raises
    ------
    FormatError
        A bad JSON/epoch/data member, a signal without JSON or data, or signals that
        disagree on the recording name; names file and member.
    ArchiveError
        Unsafe, truncated or corrupt archive.
    """
    parent = source if isinstance(source, archive.Member) else None
    if parent is not None:
        path = parent.path
        source = parent.read()
    elif path is None and isinstance(source, str | os.PathLike):
        path = source
    shown = str(path) if path is not None else None
    handler = on_data if on_data is not None else (_load_default(threads) if load_data else None)

    builder = _Builder(shown)
    for member in archive.iter_members(source, path=shown, limits=limits, parent=parent):
        builder.add(member, handler)
    rec = builder.finish(check_default_data=on_data is None and load_data, handler=handler)
    if isinstance(source, bytes | bytearray | memoryview | str | os.PathLike):
        rec._source = source
        rec._limits = limits
    return rec


def classify_member(name: str) -> MemberRole | str:
    """The role of a member from its basename, or the reason it is skipped (a str)."""
    base = PurePosixPath(name.replace("\\", "/")).name
    if base == ".DS_Store" or base.startswith("._"):
        return "operating-system metadata file"
    if base.startswith("."):
        return "hidden file"
    parts = base.split(".")
    if len(parts) < 2:
        return "no file extension"
    ext = parts[-1]
    stem = parts[:-1]
    if ext == "json" and len(stem) == 2 and stem[1] == "meta":
        return MemberRole("meta", 0, stem[0])
    if ext == "csv" and stem[-1] == "epoch":
        role, kind, stem = "epochs", None, stem[:-1]
    elif ext == "csv":
        role, kind = "data", "csv"
    elif ext == "h5":
        role, kind = "data", "h5"
    elif ext == "json":
        role, kind = "json", None
    else:
        return f"unexpected extension {ext!r}"
    if len(stem) == 2 and all(stem):
        return MemberRole(role, 0, ".".join(stem), kind)
    if len(stem) == 3 and stem[0].isdigit() and stem[0].isascii() and all(stem):
        return MemberRole(role, int(stem[0]), ".".join(stem[1:]), kind)
    hint = " ('.epochs.csv' is not the NEMS0 spelling)" if stem[-1:] == ["epochs"] else ""
    return f"name is not R.S.{ext} or NN.R.S.{ext}{hint}"


class _Group:
    """The members of one (view, key)."""

    def __init__(self) -> None:
        self.json: tuple[archive.Member, SignalHeader] | None = None
        self.data: tuple[archive.Member, DataKind, Any] | None = None
        self.epochs: tuple[archive.Member, pa.Table] | None = None
        self.empty: list[archive.Member] = []  # 0-byte CSVs: a raster with no samples?


class _Builder:
    def __init__(self, path: str | None):
        self.path = path
        self.meta: Any = None
        self.meta_member: archive.Member | None = None
        self.groups: dict[tuple[int, str], _Group] = {}
        self.skipped: list[Skipped] = []
        self.dirs: set[str] = set()

    def add(self, member: archive.Member, handler: DataHandler | None) -> None:
        if member.size_bytes == 0:
            role = classify_member(member.name)
            if isinstance(role, MemberRole) and role.data_kind == "csv":
                # np.savetxt writes nothing for a signal without samples: decided in finish
                self.groups.setdefault((role.view, role.key), _Group()).empty.append(member)
            else:
                self.skipped.append(Skipped(member.name, 0, "empty member"))
            return
        role = classify_member(member.name)
        if isinstance(role, str):
            self.skipped.append(Skipped(member.name, member.size_bytes, role))
            return
        self.dirs.add(str(PurePosixPath(member.name).parent))
        if role.role != "data" and member.size_bytes > _MAX_SIDECAR_BYTES:
            msg = f"{member.size_bytes} bytes is too big for a {role.role} member"
            raise FormatError(msg, path=member.path, member=member.qualname)
        if role.role == "meta":
            self._once(self.meta_member, member, "recording meta")
            self.meta_member = member
            self.meta = parse_meta_json(member.read(), path=member.path, member=member.qualname)
            return
        group = self.groups.setdefault((role.view, role.key), _Group())
        if role.role == "json":
            self._once(group.json, member, "JSON sidecar")
            text = member.read()
            group.json = (member, parse_signal_json(text, path=member.path, member=member.qualname))
        elif role.role == "epochs":
            self._once(group.epochs, member, "epoch file")
            group.epochs = (
                member,
                read_epochs(member.read(), path=member.path, member=member.qualname),
            )
        else:
            self._once(group.data, member, "data file")
            assert role.data_kind is not None
            group.data = (member, role.data_kind, self._data(member, role, group, handler))

    def _once(self, seen: Any, member: archive.Member, what: str) -> None:
        if seen is not None:
            first = seen[0] if isinstance(seen, tuple) else seen
            msg = f"second {what} for the same signal (first: {first.name})"
            raise FormatError(msg, path=member.path, member=member.qualname)

    def _data(
        self,
        member: archive.Member,
        role: MemberRole,
        group: _Group,
        handler,
        stream: BinaryIO | None = None,
    ) -> Any:
        if handler is None:
            return None
        info = DataMember(
            name=member.name,
            size_bytes=member.size_bytes,
            kind=role.data_kind,  # type: ignore[arg-type]
            view=role.view,
            key=role.key,
            header=group.json[1] if group.json else None,
            path=member.path,
            qualname=member.qualname,
        )
        with stream if stream is not None else member.open() as stream:
            return handler(info, stream)

    def finish(self, *, check_default_data: bool, handler: DataHandler | None) -> Recording:
        by_view: dict[int, dict[str, Signal]] = {}
        #: (view, signal name) -> its JSON member as errors name it (nested: parent:member)
        json_at: dict[tuple[int, str], str] = {}
        described: dict[str, _Group] = {}  # key -> the latest group with a JSON
        for (view, key), group in sorted(self.groups.items(), key=lambda kv: kv[0][0]):
            has_data = group.data is not None or group.empty
            if group.json is None and has_data and key in described:
                group.json = described[key].json
                group.epochs = group.epochs or described[key].epochs
            if group.data is None and group.json is not None and group.empty:
                member = group.empty.pop(0)
                role = MemberRole("data", view, key, "csv")
                data = self._data(member, role, group, handler, io.BytesIO())
                group.data = (member, "csv", data)
            self.skipped += [Skipped(m.name, 0, "empty member") for m in group.empty]
            if group.json is None and group.data is None and group.epochs is None:
                continue  # nothing but empty members
            if group.json is not None:
                described[key] = group
            sig = self._signal(view, key, group, check_default_data)
            signals = by_view.setdefault(view, {})
            assert group.json is not None  # _signal refused a signal without one
            where = group.json[0].qualname
            if sig.name in signals:
                msg = f"two signals named {sig.name!r} in view {view}"
                raise FormatError(msg, path=self.path, member=where)
            signals[sig.name] = sig
            json_at[(view, sig.name)] = where
        views: list[dict[str, Signal]] = []
        for view in range(max(by_view, default=-1) + 1):
            current = dict(views[-1]) if views else {}
            current.update(by_view.get(view, {}))
            views.append(current)
        return Recording(
            name=self._recording_name(by_view, json_at),
            meta=self.meta if self.meta_member is not None else {},  # NEMS0 starts from {}
            signals=views[0] if views else {},
            views=views,
            skipped=self.skipped,
            path=self.path,
        )

    def _signal(self, view: int, key: str, group: _Group, check_default_data: bool) -> Signal:
        some = next(m for m in (group.json, group.data, group.epochs) if m is not None)[0]
        if group.json is None:
            msg = f"signal {key!r} (view {view}) has no {key}.json sidecar"
            raise MissingMember(msg, path=some.path, member=some.qualname)
        json_member, header = group.json
        if group.data is None:
            msg = f"signal {header.name!r} has no data member ({key}.csv or {key}.h5)"
            raise MissingMember(msg, path=json_member.path, member=json_member.qualname)
        data_member, kind, data = group.data
        where = {"path": data_member.path, "member": data_member.qualname}
        if _DATA_KIND[header.signal_type] != kind:
            msg = f"signal_type {header.signal_type} needs a .{_DATA_KIND[header.signal_type]} data member"
            raise FormatError(msg, **where)
        if check_default_data:
            data = _check_default_data(header, data, where)
        epochs = group.epochs
        return Signal(
            header=header,
            view=view,
            key=key,
            json_member=json_member.name,
            data_member=data_member.name,
            data_kind=kind,
            data_size_bytes=data_member.size_bytes,
            epoch_member=epochs[0].name if epochs else None,
            epochs=epochs[1] if epochs else None,
            data=data,
        )

    def _recording_name(
        self, by_view: dict[int, dict[str, Signal]], json_at: dict[tuple[int, str], str]
    ) -> str | None:
        """The one recording name every signal's JSON gives; a JSON that disagrees is named
        (the one that differs from what most say, else from the first in archive order)."""
        signals = [(view, sig) for view, sigs in by_view.items() for sig in sigs.values()]
        names = Counter(sig.header.recording for _, sig in signals)
        if len(names) > 1:
            usual = names.most_common(1)[0][0]  # on a tie, the first signal's
            view, odd = next((v, s) for v, s in signals if s.header.recording != usual)
            msg = (
                f"signals disagree on the recording name: this one says "
                f"{odd.header.recording!r}, {names[usual]} other(s) {usual!r}"
            )
            raise FormatError(msg, path=self.path, member=json_at[(view, odd.name)])
        if names:
            return next(iter(names))
        if len(self.dirs) == 1:
            (only,) = self.dirs
            return only if only != "." else None
        return None


def _load_default(threads: int) -> DataHandler:
    """Parse data into memory: rasterized C x T float32, HDF5 key -> array (sorted).

    The CSV width comes from its first row, never from the JSON chans (see
    `_check_default_data`).
    """

    def load(member: DataMember, stream: BinaryIO) -> Any:
        where = {"path": member.path, "member": member.qualname}
        if member.kind == "csv":
            if member.size_bytes == 0:  # no samples; the JSON chans are all we know
                chans = member.header.chans if member.header is not None else None
                return np.zeros((len(chans) if chans else 0, 0), np.float32)
            return nems0_csv.read_raster(stream, threads=threads, **where)
        return nems0_h5.read_h5_datasets(stream.read(), **where)

    return load


def _check_default_data(header: SignalHeader, data: Any, where: dict) -> Any:
    """PointProcess and TiledSignal shapes.

    A raster's width is not checked against the JSON chans: NEMS0 never compares them, and
    ``Recording.create_mask`` gives the one-row mask the chans of the signal it was made
    from, so a real ``R.mask.json`` may list every unit of ``resp``.
    """
    if header.signal_type == "rasterized":
        return data
    if header.signal_type == "point_process":
        return nems0_h5.check_point_process(data, **where)
    return nems0_h5.check_tiled(data, **where)


# --- JSON ----------------------------------------------------------------------------------


def _load_json(data: bytes, *, path, member, object_hook=None) -> Any:
    try:
        text = data.decode("utf-8-sig")
        return json.loads(text, object_hook=object_hook)
    except _HookError as err:
        raise FormatError(str(err), path=path, member=member) from err
    except UnicodeDecodeError as err:
        raise FormatError(
            f"not UTF-8 ({err.reason} at byte {err.start})", path=path, member=member
        ) from err
    except json.JSONDecodeError as err:
        raise FormatError(
            f"bad JSON: {err.msg} at line {err.lineno} column {err.colno}", path=path, member=member
        ) from err
    except (RecursionError, ValueError) as err:  # too deep, or int too long to convert
        raise FormatError(f"bad JSON: {err}", path=path, member=member) from err


def parse_signal_json(
    data: bytes, *, path: str | os.PathLike | None = None, member: str | None = None
) -> SignalHeader:
    """Parse and check a ``R.S.json`` sidecar (required: name, fs, meta, recording)."""
    obj = _load_json(data, path=path, member=member)

    def bad(msg: str) -> FormatError:
        return FormatError(msg, path=path, member=member)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("name", "fs", "meta", "recording"):
        if key not in obj:
            raise bad(f'"{key}" missing; nothing read')
    name, recording, fs = obj["name"], obj["recording"], obj["fs"]
    if not isinstance(name, str) or not name:
        raise bad(f'"name" must be a non-empty string, got {name!r}')
    if not isinstance(recording, str):
        raise bad(f'"recording" must be a string, got {recording!r}')
    if isinstance(fs, bool) or not isinstance(fs, int | float) or not _finite(fs) or fs <= 0:
        raise bad(f'"fs" must be a positive number of Hz, got {_shown(fs)}')
    raw_type = obj.get("signal_type")
    chans = _chans(obj.get("chans"), bad)
    for key, text in [
        ("name", name),
        ("recording", recording),
        *(("chans", c) for c in chans or ()),
    ]:
        if not _unicode(text):
            raise bad(f'"{key}" holds {_shown(text)}: a lone surrogate escape, not Unicode text')
    return SignalHeader(
        name=name,
        fs_hz=float(fs),
        recording=recording,
        signal_type=_signal_type(raw_type, bad),
        chans=chans,
        segments=_segments(obj.get("segments"), bad),
        meta=obj["meta"],
        signal_type_raw=raw_type,
        raw=obj,
    )


def _finite(value: int | float) -> bool:
    """A JSON integer of hundreds of digits is not a float (``math.isfinite`` raises)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _unicode(text: str) -> bool:
    """JSON may escape a lone surrogate (``"\\udce9"``, as json.dump writes a name read
    with surrogateescape); no message or Parquet string can hold one."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _signal_type(raw: Any, bad) -> SignalType:
    if raw is None:
        return "rasterized"  # NEMS0 default when the key is absent
    if not isinstance(raw, str):
        raise bad(f'"signal_type" must be a string, got {raw!r}')
    for needle, kind in _TYPE_SUBSTRINGS:
        if needle in raw:
            return kind
    raise bad(f'unknown "signal_type" {raw!r}')


def _chans(raw: Any, bad) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(c, str) for c in raw):
        raise bad('"chans" must be null or a list of strings')
    return tuple(raw)


def _segments(raw: Any, bad) -> np.ndarray | None:
    if raw is None:
        return None
    ok = isinstance(raw, list) and all(
        isinstance(row, list)
        and len(row) == 2
        and all(
            isinstance(v, float) or (isinstance(v, int) and not isinstance(v, bool) and _finite(v))
            for v in row
        )
        for row in raw
    )
    if not ok:
        raise bad('"segments" must be a list of [start, end] number pairs')
    return np.array(raw, dtype=np.float64).reshape(-1, 2)


class _HookError(Exception):
    pass


def parse_meta_json(
    data: bytes, *, path: str | os.PathLike | None = None, member: str | None = None
) -> Any:
    """Parse ``R.meta.json`` as NEMS0's ``json_numpy_obj_hook`` does: NumpyEncoder
    ``{"__ndarray__": ...}`` objects become arrays, and so do the list values of a dict
    holding one of the model-parameter keys (:data:`ARRAY_LIST_KEYS`). A ``_KWR_ARGS``
    dict (a NEMS0 KeywordRegistry, which needs NEMS0 itself) stays a dict."""
    return _load_json(data, path=path, member=member, object_hook=_meta_hook)


#: a dict with any of these keys has its list values read as arrays (NEMS0 utils.py)
ARRAY_LIST_KEYS = frozenset(
    ("level", "coefficients", "amplitude", "kappa", "base", "shift", "mean", "sd", "u")
    + ("tau", "offset")
)


def _meta_hook(obj: dict) -> Any:
    if "__ndarray__" in obj:
        return _ndarray_hook(obj)
    if not ARRAY_LIST_KEYS.isdisjoint(obj):
        for key, value in obj.items():
            if type(value) is list:
                try:
                    obj[key] = np.asarray(value)
                except ValueError:  # ragged: NEMS0 fails here; the list is kept as read
                    pass
    return obj


def _ndarray_hook(obj: dict) -> Any:
    """The ndarray part of NEMS0 ``json_numpy_obj_hook`` (list or base64 payloads).

    dtype ``object`` is allowed with a list payload: NumpyEncoder writes any array with
    ``tolist()``, and meta arrays of strings taken from pandas (``.values``) are object.
    """
    try:
        dtype = np.dtype(obj["dtype"])
        shape = tuple(int(n) for n in obj["shape"])
    except (KeyError, TypeError, ValueError) as err:
        raise _HookError(f"bad __ndarray__ dtype/shape: {err}") from err
    if (
        dtype.kind not in "biufcUSMm?O"
        or dtype.itemsize > _MAX_DTYPE_BYTES
        or any(n < 0 for n in shape)
    ):
        raise _HookError(f"refused __ndarray__ dtype {dtype} / shape {shape}")
    payload = obj["__ndarray__"]
    if dtype.kind == "O" and isinstance(payload, str):
        raise _HookError("refused base64 __ndarray__ of dtype object")
    try:
        if isinstance(payload, str):
            arr = np.frombuffer(base64.b64decode(payload, validate=True), dtype=dtype)
        else:
            arr = np.asarray(payload, dtype=dtype)
        return arr.reshape(shape)
    except (TypeError, ValueError, OverflowError) as err:
        raise _HookError(f"bad __ndarray__ data: {err}") from err


# --- epochs --------------------------------------------------------------------------------


def _empty_epochs() -> pa.Table:
    return pa.table(
        {
            "name": pa.array([], pa.string()),
            "start_s": pa.array([], pa.float64()),
            "end_s": pa.array([], pa.float64()),
        }
    )


def read_epochs(
    data: bytes, *, path: str | os.PathLike | None = None, member: str | None = None
) -> pa.Table:
    """Read an ``R.S.epoch.csv`` by header names.

    Returns ``name`` (string, as written: ``NA``/``NULL`` stay names), ``start_s`` and
    ``end_s`` (float64 seconds; an empty field, or another of pandas' NA strings such as
    ``NA`` or ``NULL``, is NaN, as NEMS0 reads it), then any extra columns as strings, in
    file row order (rows are not sorted or deduplicated). An unnamed leading column (a
    pandas index) is dropped.
    """

    def bad(msg: str, line: int | None = None) -> FormatError:
        where = f"line {line}: " if line is not None else ""
        return FormatError(where + msg, path=path, member=member)

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise bad(f"not UTF-8 ({err.reason} at byte {err.start})") from err
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        while header == []:
            header = next(reader, None)
        if header is None:
            raise bad("no header row; expected name,start,end")
        drop_first = len(header) > 1 and _UNNAMED.match(header[0]) is not None
        names = header[1:] if drop_first else header
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise bad(f"repeated column names {dupes}", 1)
        missing = [c for c in ("name", "start", "end") if c not in names]
        if missing:
            raise bad(f"columns {missing} missing; header is {names}", 1)
        rows = []
        for row in reader:
            if not row:
                continue  # blank line, skipped as pandas does
            if len(row) != len(header):
                raise bad(f"expected {len(header)} fields, got {len(row)}", reader.line_num)
            rows.append(row)
    except csv.Error as err:
        raise bad(f"bad CSV: {err}", reader.line_num) from err

    columns = list(zip(*rows, strict=True)) if rows else [() for _ in header]
    by_name = dict(zip(names, columns[1:] if drop_first else columns, strict=True))

    def line_of(row: int) -> int:
        """The file line of data row ``row``: counted again, only for a message."""
        again = csv.reader(io.StringIO(text, newline=""), strict=True)
        seen = -1  # the header row
        for fields in again:
            seen += bool(fields)
            if seen == row + 1 and fields:
                break
        return again.line_num

    out = {
        "name": pa.array(by_name["name"], pa.string()),
        "start_s": _float_column(by_name["start"], "start", line_of, bad),
        "end_s": _float_column(by_name["end"], "end", line_of, bad),
    }
    for col_name, values in by_name.items():
        if col_name in ("name", "start", "end"):
            continue
        if col_name in out:
            raise bad(f"extra column {col_name!r} clashes with an output column", 1)
        out[col_name] = pa.array(values, pa.string())
    return pa.table(out)


#: a start/end field pandas reads as NaN (its default ``na_values``: "", "NA", "NULL", ...)
_NA_TIMES = frozenset(na.decode() for na in nems0_csv.PANDAS_NA) | {""}


def _float_column(
    values: Sequence[str], column: str, line_of: Callable[[int], int], bad
) -> pa.Array:
    """Python's ``float`` of each field, as ``pd.read_csv`` reads it (one of pandas'
    default NA strings, the empty field among them, is NaN; no digit-group underscores)."""
    if "_" not in "".join(values):
        try:  # every field a number: one pass in C (0.2 s per build in the row loop)
            return pa.array(np.fromiter(map(float, values), np.float64, len(values)))
        except ValueError:
            pass  # an empty field, or a bad one to name: field by field below
    out = np.empty(len(values), np.float64)
    for i, text in enumerate(values):
        if text in _NA_TIMES:
            out[i] = np.nan
            continue
        try:
            if "_" in text:
                raise ValueError(text)
            out[i] = float(text)
        except ValueError:
            raise bad(f"{column} is not a number: {text[:40]!r}", line_of(i)) from None
    return pa.array(out, pa.float64())

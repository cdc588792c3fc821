"""A model of how the reference library (LBHB/NEMS0) writes a whole recording.

`nems0_build` makes single members; this models complete writes as the reference does
them, so the readers are tested on what NEMS0 really produces, not on what our sample
writer produces:

- ``Recording.as_targz``: ``tarfile`` "w:gz", members ``<Recording.name>/<file>``, the
  recording meta first, then view 0's signals in dict order (data, JSON, epochs each),
  then for view k only the signals that changed, prefixed ``kk.``; every member has
  ``uname='nems'``, ``gname='users'`` and a float ``mtime=time.time()``, which Python >= 3.8
  (PAX by default) stores in an extended header before each member;
- the JSON sidecar always carries ``segments`` (``[[0, ntimes]]`` by default) and the keys
  in ``_get_attributes`` order, via plain ``json.dump``;
- epochs go through ``DataFrame.to_csv(index=False)``: header, the frame's own column
  order, minimal quoting, shortest float repr, NaN as an empty field;
- ``Recording.save_dir``: the same files flat in one directory, where a later view's
  rasterized signal gets a prefixed CSV but its JSON and epochs overwrite view 0's
  unprefixed ones.

Written from a reading of the reference code; no code is taken from it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import posixpath
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from nems0_build import NumpyEncoder

_TYPES = {
    "raster": "<class 'nems0.signal.RasterizedSignal'>",
    "point": "<class 'nems0.signal.PointProcess'>",
    "tiled": "<class 'nems0.signal.TiledSignal'>",
}
_UNSET = object()


@dataclass
class Epochs:
    """An epochs DataFrame: its column order and rows (NaN for missing values)."""

    columns: tuple[str, ...]
    rows: list[tuple]

    @classmethod
    def added(cls, name: str, bounds) -> Epochs:
        """What ``add_epoch`` builds: a start,end frame, then the name column."""
        return cls(("start", "end", "name"), [(float(a), float(b), name) for a, b in bounds])

    def column(self, name: str) -> list:
        i = self.columns.index(name)
        return [row[i] for row in self.rows]


@dataclass
class Sig:
    """One signal as the reference holds it before writing.

    ``kind`` is raster (``data`` C x T), point (``data`` unit -> spike times) or tiled
    (``data`` epoch name -> C x n). ``signal_type`` None leaves the key out, as files older
    than the key have it; ``segments`` None means the constructor's default.
    """

    kind: str
    name: str
    data: Any
    recording: str = "R"
    fs: Any = 100
    chans: Any = None
    epochs: Epochs | None = None
    meta: Any = None
    segments: Any = None
    signal_type: Any = _UNSET
    h5_options: dict = field(default_factory=lambda: {"compression": "gzip"})

    def __post_init__(self):
        # SignalBase.__init__: ntimes from the longest of data and epochs; segments
        # default to [[0, ntimes]]; a signal without epochs gets one SIGNAL epoch.
        ends = self.epochs.column("end") if self.epochs else []
        max_end = float(np.nanmax(ends)) if ends else 0
        span = self.data.shape[1] / self.fs if self.kind == "raster" else 0
        ntimes = int(np.round(self.fs * max(max_end, span)))
        if self.segments is None:
            self.segments = [[0, ntimes]]
        if self.epochs is None:
            self.epochs = Epochs.added("SIGNAL", [(0, ntimes / self.fs)])
        if self.signal_type is _UNSET:
            self.signal_type = _TYPES[self.kind]


def to_csv(epochs: Epochs, *, lineterminator: str = "\n") -> bytes:
    """``DataFrame.to_csv(sep=',', index=False)`` for the value types epochs hold."""

    def cell(value):
        if isinstance(value, float) and math.isnan(value):
            return ""
        if isinstance(value, float):
            return repr(value)
        return value

    out = io.StringIO()
    writer = csv.writer(out, lineterminator=lineterminator)
    writer.writerow(epochs.columns)
    for row in epochs.rows:
        writer.writerow([cell(v) for v in row])
    return out.getvalue().encode()


def sidecar(sig: Sig) -> bytes:
    """``SignalBase._save_metadata``: the attributes, epochs removed, plain json.dump."""
    attrs = {
        "name": sig.name,
        "chans": sig.chans,
        "fs": sig.fs,
        "meta": sig.meta,
        "recording": sig.recording,
        "segments": sig.segments,
        "signal_type": sig.signal_type,
        "normalization": "none",
        "norm_baseline": [[0]],
        "norm_gain": [[1]],
    }
    if sig.signal_type is None:
        del attrs["signal_type"]
    return json.dumps(attrs).encode()


def raster_csv(data_ct: np.ndarray) -> bytes:
    """``np.savetxt(data.T)`` into a BytesIO, with the dtype the signal has."""
    buf = io.BytesIO()
    np.savetxt(buf, np.swapaxes(np.asarray(data_ct), 0, 1), delimiter=",", fmt="%.18e")
    return buf.getvalue()


def h5_file(datasets: dict, **options) -> bytes:
    """``_save_data_to_h5``: a file on disk opened "a", one root dataset per key."""
    import h5py

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "x.h5")
        with h5py.File(path, "a") as f:
            for key, array in datasets.items():
                f.create_dataset(key, data=array, **options)
        return Path(path).read_bytes()


def file_streams(sig: Sig) -> list[tuple[str, bytes]]:
    """``as_file_streams``: (file name, bytes), data first, then JSON, then epochs."""
    base = f"{sig.recording}.{sig.name}"
    if sig.kind == "raster":
        data = (f"{base}.csv", raster_csv(sig.data))
    else:
        data = (f"{base}.h5", h5_file(sig.data, **sig.h5_options))
    return [data, (f"{base}.json", sidecar(sig)), (f"{base}.epoch.csv", to_csv(sig.epochs))]


def changed_signals(views: list[dict[str, Sig]]):
    """(view index, file prefix, signal) in the order the writer visits them."""
    for i, view in enumerate(views):
        for key, sig in view.items():
            sig.name = key  # as_targz renames each signal to its dict key
            if i == 0:
                yield i, "", sig
            elif sig is not views[i - 1][key]:
                yield i, f"{i:02d}.", sig


def as_targz(
    name: str,
    meta: dict,
    views: list[dict[str, Sig]],
    *,
    tar_format: int = tarfile.PAX_FORMAT,
    join=posixpath.join,
) -> bytes:
    """``Recording.as_targz``. ``tar_format=GNU_FORMAT`` models Python < 3.8 (no PAX
    headers, the float mtime truncated); ``join=ntpath.join`` a Windows writer."""
    members = [(f"{name}.meta.json", json.dumps(meta, cls=NumpyEncoder).encode())]
    for _, prefix, sig in changed_signals(views):
        members += [(prefix + file, data) for file, data in file_streams(sig)]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tar_format) as tar:
        for file, data in members:
            info = tarfile.TarInfo(join(name, file))
            info.uname, info.gname = "nems", "users"
            info.mtime = time.time()
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def save_dir(directory: Path, name: str, meta: dict, views: list[dict[str, Sig]]) -> Path:
    """``Recording.save_dir``: flat files in ``directory``, which must not exist.

    A later view's rasterized signal writes its CSV with the ``kk.`` prefix but its JSON
    and epochs under the unprefixed names (``save`` passes no prefix to the metadata
    writer), overwriting view 0's. The reference raises for a later-view PointProcess.
    """
    directory.mkdir()
    for _, prefix, sig in changed_signals(views):
        if prefix and sig.kind != "raster":
            raise TypeError("PointProcess.save and TiledSignal.save take no prefix")
        (data_file, data), *metadata = file_streams(sig)
        (directory / (prefix + data_file)).write_bytes(data)
        for file, text in metadata:
            (directory / file).write_bytes(text)
    (directory / f"{name}.meta.json").write_text(json.dumps(meta, cls=NumpyEncoder))
    return directory

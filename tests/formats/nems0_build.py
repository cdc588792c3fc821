"""Build NEMS0 archives by hand, byte for byte as NEMS0 writes them (nems0-format.md).

Deliberately independent of nat4etl.sample: the readers must follow the format document,
so these helpers reproduce the real writer's calls (np.savetxt, json.dump, to_csv, h5py).
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
import zipfile

import numpy as np

RASTER_TYPE = "<class 'nems0.signal.RasterizedSignal'>"
POINT_TYPE = "<class 'nems0.signal.PointProcess'>"
TILED_TYPE = "<class 'nems0.signal.TiledSignal'>"


class NumpyEncoder(json.JSONEncoder):
    """nems0.utils.NumpyEncoder: ndarray -> {"__ndarray__": list, dtype, shape, encoding}."""

    def default(self, obj):
        if isinstance(obj, np.ndarray):
            return {
                "__ndarray__": obj.tolist(),
                "dtype": str(obj.dtype),
                "shape": obj.shape,
                "encoding": "list",
            }
        if isinstance(obj, np.integer):
            return int(obj)
        if isinstance(obj, np.floating):
            return float(obj)
        return super().default(obj)


def raster_csv(data_ct: np.ndarray) -> bytes:
    """RasterizedSignal.as_file_streams: np.savetxt(data.T, delimiter=',', fmt='%.18e')."""
    buf = io.BytesIO()
    np.savetxt(buf, np.asarray(data_ct, dtype=np.float64).T, delimiter=",", fmt="%.18e")
    return buf.getvalue()


def signal_json(
    name: str,
    *,
    recording: str = "R",
    fs=100,
    chans=None,
    signal_type: str | None = RASTER_TYPE,
    meta=None,
    segments=None,
    **extra,
) -> bytes:
    """SignalBase._save_metadata: plain json.dump of the attributes (no NumpyEncoder)."""
    attrs = {"name": name, "chans": chans, "fs": fs, "meta": meta, "recording": recording}
    if segments is not None:
        attrs["segments"] = segments
    if signal_type is not None:
        attrs["signal_type"] = signal_type
    attrs.update({"normalization": "none", "norm_baseline": [[0]], "norm_gain": [[1]]})
    attrs.update(extra)
    return json.dumps(attrs).encode()


def epoch_csv(rows, columns=("name", "start", "end")) -> bytes:
    """DataFrame.to_csv(index=False): header, minimal quoting, repr floats, NaN -> ''."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow(["" if isinstance(v, float) and v != v else v for v in row])
    return out.getvalue().encode()


def h5_bytes(datasets: dict) -> bytes:
    """SignalBase._save_data_to_h5: one root dataset per key, gzip, no attributes."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as h5:
        for key, value in datasets.items():
            h5.create_dataset(key, data=np.asarray(value), compression="gzip")
    return buf.getvalue()


def meta_json(meta) -> bytes:
    return json.dumps(meta, cls=NumpyEncoder).encode()


def tar_bytes(members, *, gz: bool = True) -> bytes:
    """Recording.as_targz: tarfile 'w:gz', uname nems, gname users, no directory entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.uname, info.gname = "nems", "users"
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def zip_bytes(members) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def simple_recording(rec: str = "R", *, gz: bool = True, rng=None):
    """A view-0 recording with a rasterized resp, stim and a PointProcess spikes signal.

    Returns (archive bytes, ground truth dict).
    """
    rng = rng or np.random.default_rng(0)
    resp = rng.poisson(0.3, size=(3, 40)).astype(float)
    resp[1, 5:9] = np.nan
    stim = rng.random((2, 40))
    spikes = {"cellB": np.sort(rng.random(7) * 0.4), "cellA": np.sort(rng.random(3) * 0.4)}
    epochs = [("TRIAL", 0.0, 0.4), ("STIM_a,b.wav", 0.1, 0.35), ("NA", 0.0, 0.1)]
    members = [
        (f"{rec}/{rec}.meta.json", meta_json({"siteid": rec, "arr": np.arange(4)})),
        (f"{rec}/{rec}.resp.csv", raster_csv(resp)),
        (f"{rec}/{rec}.resp.json", signal_json("resp", recording=rec, chans=["u1", "u2", "u3"])),
        (f"{rec}/{rec}.resp.epoch.csv", epoch_csv(epochs)),
        (f"{rec}/{rec}.stim.csv", raster_csv(stim)),
        (f"{rec}/{rec}.stim.json", signal_json("stim", recording=rec, chans=None)),
        (
            f"{rec}/{rec}.stim.epoch.csv",
            epoch_csv([(s, e, n) for n, s, e in epochs], ("start", "end", "name")),
        ),
        (f"{rec}/{rec}.spikes.h5", h5_bytes(spikes)),
        (
            f"{rec}/{rec}.spikes.json",
            signal_json(
                "spikes", recording=rec, fs=1000, chans=["cellB", "cellA"], signal_type=POINT_TYPE
            ),
        ),
        (f"{rec}/{rec}.spikes.epoch.csv", epoch_csv(epochs)),
    ]
    truth = {"resp": resp, "stim": stim, "spikes": spikes, "epochs": epochs}
    return tar_bytes(members, gz=gz), truth


class Unseekable(io.RawIOBase):
    """A sink that cannot seek, as a pipe: zipfile then writes data descriptors."""

    def __init__(self):
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.data += b
        return len(b)

"""What the deepSTRF ``NAT4Dataset`` (the loader nat4etl replaces) returned, recomputed.

A test helper: the old loader's behaviour written out afresh from its description
(``nat4-dataset.md``, "How the reference loader behaves"), reading a mirror's files with
the standard library, numpy, h5py and soundfile only. Nothing here imports nat4etl, so the
README's recipe ("Coming from the deepSTRF NAT4Dataset") is checked against an independent
computation, not against the code it documents.

The old loader, step by step:

- population: ``resp`` and ``stim`` CSVs parsed as float64, channel names from the resp
  JSON ``chans``, its ``fs``; the epochs are the resp signal's epoch CSV, rows in file
  order (no sorting, no duplicates dropped, no JSON segments applied);
- sounds: ``^STIM_cat`` names (est), then ``^STIM_00cat`` names (val), each in order of
  first appearance among those rows;
- a sound's data: every row of that exact name, cut at ``[round(start*fs), round(end*fs))``
  (Python ``round``), stacked in row order;
- normalization, over the whole population recording, NaN ignored, in float64:
  spectrogram ``log1p`` then ONE min-max; responses ONE min-max; a signal whose max is not
  above its min is left as it is; then float32;
- spectrogram of a sound: its first row's cut; est response ``[s][n]``: the cut (R, T),
  or a ``(1, 1)`` NaN sentinel when it is all NaN;
- val single trials: every site archive in the single-sites folder, in file name order;
  channels from the site resp JSON ``chans`` (looked up in the HDF5 by that name); a raster
  of ``floor(t*fs)`` counts, float32, as long as the JSON's last segment end says, spikes
  outside it (before 0 included) dropped; each val sound's rows of the site epoch CSV in
  file order, cut as above, summed in groups of 10 samples (1 ms -> 10 ms); sites
  concatenated, population units looked up by exact id (a later site wins), a unit not
  found gets the sentinel; raw counts, not normalized;
- unit metadata: ``auditory`` from ``<area>_pred_correlation.csv`` by exact ``cellid``
  (a later row wins; False without a row), and the id's site, animal, electrode, unit;
- waveforms: the wav named as the epoch without ``STIM_`` (case-insensitive), mono (mean
  of channels), zero-padded at the length of the first PreStimSilence row, cut or padded
  to ``T * hop``.

It fails where the old loader failed (a site archive that is not one, a val sound shown a
different number of times); ``lenient=True`` skips such files and NaN-pads the missing
repetitions, as the README says nat4etl does, so the rest can still be compared.
"""

from __future__ import annotations

import csv
import io
import json
import re
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SENTINEL_SHAPE = (1, 1)
_ID = re.compile(r"([A-Za-z]{3})\d+[a-z]?-(\d+)-(\d+)")


@dataclass
class OldArrays:
    """One area as the old loader held it (lists of per-pair arrays, as it returned them)."""

    stim_meta: list[dict]
    stims: list[np.ndarray]  # (1, F, T) float32 each
    nrn_meta: list[dict]
    responses: list[list[np.ndarray]]  # [stim][cell]: (R, T) float32, or (1, 1) NaN
    waveforms: list[np.ndarray] = field(default_factory=list)  # (1, T * hop) float32

    def is_sentinel(self, s: int, n: int) -> bool:
        r = self.responses[s][n]
        return r.shape == SENTINEL_SHAPE and bool(np.isnan(r).all())


def _members(data: bytes) -> dict[str, bytes]:
    """A tar archive's files by base name (the old loader extracted and listed them)."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
        return {m.name.rsplit("/", 1)[-1]: tar.extractfile(m).read() for m in tar if m.isfile()}


def _one(members: dict[str, bytes], suffix: str, *, not_suffix: str | None = None) -> bytes:
    found = [
        n for n in members if n.endswith(suffix) and not (not_suffix and n.endswith(not_suffix))
    ]
    assert len(found) == 1, f"expected one *{suffix}, got {found}"
    return members[found[0]]


def _epoch_rows(data: bytes) -> list[tuple[str, float, float]]:
    """(name, start, end) in file row order, columns found by header name."""
    return [
        (r["name"], float(r["start"]), float(r["end"]))
        for r in csv.DictReader(io.StringIO(data.decode()))
    ]


def _cut(signal_tk: np.ndarray, rows, name: str, fs: int) -> np.ndarray:
    """(R, K, T): every row called ``name``, file order, [round(start*fs), round(end*fs))."""
    out = [
        signal_tk[int(round(start * fs)) : int(round(end * fs))].T
        for n, start, end in rows
        if n == name
    ]
    if not out:
        raise KeyError(name)
    return np.stack(out)  # unequal lengths fail here, as they did


def _first_seen(rows, pattern: str) -> list[str]:
    rx, names = re.compile(pattern), []
    for name, _, _ in rows:
        if rx.match(name) and name not in names:
            names.append(name)
    return names


def _minmax(a: np.ndarray) -> np.ndarray:
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    return (a - lo) / (hi - lo) if hi > lo else a


def _unit_meta(cell_id: str) -> dict:
    out = {"site": None, "animal": None, "electrode": None, "unit_in_electrode": None}
    if "-" not in cell_id:
        return out
    out["site"] = cell_id.split("-")[0]
    m = _ID.fullmatch(cell_id)
    if m:
        out.update(animal=m[1], electrode=int(m[2]), unit_in_electrode=int(m[3]))
    return out


def _site_raster(members: dict[str, bytes]):
    """(chans, fs, epoch rows, raster (T_total, N) float32) of one site archive."""
    import h5py

    sidecar = json.loads(_one(members, ".resp.json"))
    chans, fs = list(sidecar["chans"]), int(sidecar["fs"])
    n_samples = int((sidecar.get("segments") or [[0, 0]])[-1][-1])
    raster = np.zeros((n_samples, len(chans)), np.float32)
    with h5py.File(io.BytesIO(_one(members, ".resp.h5")), "r") as h5:
        for n, chan in enumerate(chans):
            idx = np.floor(h5[chan][...] * fs).astype(np.int64)
            idx = idx[(idx >= 0) & (idx < n_samples)]
            np.add.at(raster, (idx, n), 1.0)
    return chans, fs, _epoch_rows(_one(members, ".resp.epoch.csv")), raster


def _site_val(members, val_names, *, lenient: bool):
    """(chans, (S_val, R, N, T) float32) of one site: each val sound's rows, 10 ms bins."""
    chans, fs, rows, raster = _site_raster(members)
    per_stim = []
    for name in val_names:
        if lenient and not any(n == name for n, _, _ in rows):
            per_stim.append(np.zeros((0, len(chans), 150), np.float32))
            continue
        a = _cut(raster, rows, name, fs)
        r, n, t = a.shape
        per_stim.append(a.reshape(r, n, t // 10, 10).sum(axis=-1))
    if lenient:  # missing repetitions NaN, as nat4etl gives them
        most = max(a.shape[0] for a in per_stim)
        per_stim = [
            np.concatenate([a, np.full((most - len(a), *a.shape[1:]), np.nan, np.float32)])
            for a in per_stim
        ]
    return chans, np.stack(per_stim)


def old_loader_arrays(
    mirror: Path, area: str, *, lenient: bool = False, waveforms: bool = False
) -> OldArrays:
    """``NAT4Dataset(path=mirror, area=area, subset='all')``'s stims, responses and metadata.

    ``mirror`` holds the Zenodo files as published (``fetch --source`` input)."""
    pop = _members((mirror / f"{area}_NAT4_ozgf.fs100.ch18.tgz").read_bytes())
    resp_json = json.loads(_one(pop, ".resp.json"))
    cells, fs = list(resp_json["chans"]), int(resp_json["fs"])
    resp = np.loadtxt(
        io.BytesIO(_one(pop, ".resp.csv", not_suffix=".epoch.csv")), delimiter=",", ndmin=2
    )
    stim = np.loadtxt(
        io.BytesIO(_one(pop, ".stim.csv", not_suffix=".epoch.csv")), delimiter=",", ndmin=2
    )
    rows = _epoch_rows(_one(pop, ".resp.epoch.csv"))
    stim, resp = _minmax(np.log1p(stim)), _minmax(resp)
    val_names, est_names = _first_seen(rows, "^STIM_00cat"), _first_seen(rows, "^STIM_cat")
    names = est_names + val_names
    out = OldArrays(
        stim_meta=[{"name": n, "subset": "est" if n in est_names else "val"} for n in names],
        stims=[_cut(stim, rows, n, fs)[0][None].astype(np.float32) for n in names],
        nrn_meta=[],
        responses=[],
    )
    auditory = {}
    with open(mirror / f"{area}_pred_correlation.csv", newline="") as fh:
        for r in csv.DictReader(fh):
            flag = r["sig_auditory"].strip().lower()  # pandas: True/False; empty is NaN, truthy
            auditory[r["cellid"]] = flag in ("true", "1", "1.0", "")
    out.nrn_meta = [
        {"cell_id": c, "area": area, "auditory": auditory.get(c, False), **_unit_meta(c)}
        for c in cells
    ]
    sentinel = np.full(SENTINEL_SHAPE, np.nan, np.float32)
    for name in est_names:
        a = _cut(resp, rows, name, fs)
        out.responses.append(
            [
                sentinel if np.isnan(a[:, n]).all() else a[:, n].astype(np.float32)
                for n in range(len(cells))
            ]
        )

    site_chans, blocks = [], []
    with zipfile.ZipFile(mirror / f"{area}_single_sites.zip") as zf:
        folder = f"{area}_single_sites/"
        files = sorted(
            n[len(folder) :] for n in zf.namelist() if n.startswith(folder) and n != folder
        )
        for fname in files:
            if lenient and not fname.endswith(".tgz"):
                continue
            chans, block = _site_val(_members(zf.read(folder + fname)), val_names, lenient=lenient)
            site_chans += chans
            blocks.append(block)
    if lenient:
        most = max(b.shape[1] for b in blocks)
        blocks = [
            np.concatenate(
                [b, np.full((b.shape[0], most - b.shape[1], *b.shape[2:]), np.nan, np.float32)],
                axis=1,
            )
            for b in blocks
        ]
    val = np.concatenate(blocks, axis=2)  # (S_val, R, N_sites, T)
    where = {c: i for i, c in enumerate(site_chans)}  # a later site wins
    for s in range(len(val_names)):
        out.responses.append([val[s, :, where[c]] if c in where else sentinel for c in cells])

    if waveforms:
        out.waveforms = _waveforms(mirror, rows, names, [x.shape[-1] for x in out.stims])
    return out


def _waveforms(mirror: Path, rows, names: list[str], n_frames: list[int]) -> list[np.ndarray]:
    """Each sound's wav at the first PreStimSilence row's length, ``T * 441`` samples."""
    import soundfile

    audio_fs, hop = 44_100, 441
    silence = next(((s, e) for n, s, e in rows if n == "PreStimSilence"), None)
    pre = int(round((silence[1] - silence[0]) * audio_fs)) if silence else 0
    out = []
    with zipfile.ZipFile(mirror / "wav.zip") as zf:
        by_lower = {
            n.rsplit("/", 1)[-1].lower(): n for n in zf.namelist() if n.lower().endswith(".wav")
        }
        for name, t in zip(names, n_frames, strict=True):
            data, sr = soundfile.read(
                io.BytesIO(zf.read(by_lower[name[len("STIM_") :].lower()])),
                dtype="float32",
                always_2d=True,
            )
            assert sr == audio_fs  # the old loader resampled otherwise (torchaudio)
            mono = data.T.mean(axis=0, dtype=np.float32)
            full = np.zeros((1, t * hop), np.float32)
            seg = mono[: max(0, t * hop - pre)]
            full[0, pre : pre + len(seg)] = seg
            out.append(full)
    return out

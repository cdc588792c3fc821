"""Write a synthetic NAT4 mirror, byte for byte in the format of the real Zenodo record.

Why: the real archives (Zenodo 8044773, ~200 MB) cannot be fetched in CI, and every stage needs
inputs whose truth is known. ``write_sample`` writes the seven files of the record plus a
Zenodo-shaped ``record.json``, and returns a ``SampleInfo`` saying exactly what was written, so
tests compare a stage's output with ground truth instead of with another reader.

How a sample is made, in order:

1. plan      sites, unit ids, sound names and quirk choices. These do not depend on ``seed``,
             so ``ARM029a-01-1`` means the same thing in every sample of one scale.
2. simulate  per site, a presentation schedule (epochs on a 10 us grid, deliberately off the
             10 ms grid) and spike times at 30 kHz driven by the sounds' spectrograms.
3. derive    the population ``resp`` from the spike times *as written*, by the reference route:
             ``floor(t * 1000)``, cut ``[round(start * 1000), round(end * 1000))``, sum groups of
             10 samples; validation sounds averaged over the site's repetitions. Population and
             per-site files therefore agree exactly.
4. write     NEMS0 tgz recordings (``nems0-format.md``), zips, CSVs, wavs, record.json,
             sample_info.json. Fixed mtimes, seeded generators: same seed, same bytes.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import os
import queue
import tarfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nat4etl.errors import ConfigError, StoreError
from nat4etl.nat4 import ZENODO_FILES

__all__ = [
    "AREAS",
    "AreaInfo",
    "FileInfo",
    "QuirkInfo",
    "SampleInfo",
    "ShortValQuirk",
    "SiteInfo",
    "csv_18e_size",
    "format_csv_18e",
    "rebin_reference_route",
    "write_sample",
]

RECORD_ID = 8044773
RECORD_VERSION = "1.1.0"
RECORD_TITLE = (
    "Auditory cortex single unit population activity during natural sound presentation -- dataset"
)
AREAS = ("A1", "PEG")
FS_HZ = 100
SITE_FS_HZ = 1000
SPIKE_FS_HZ = 30_000
WAV_FS_HZ = 44_100
N_BANDS = 18
N_FRAMES = 150
PRE_STIM_S, SOUND_S, POST_STIM_S = 0.25, 1.0, 0.25
N_VAL_REPS = 20
N_VAL_FULL, N_EST_FULL = 18, 575

# Epoch times are rounded to 5 decimals, so integer ticks of 10 us are exact; seconds are made
# once, at write time, as ticks / 1e5 (the double nearest to the 5-decimal value).
_TICKS_PER_S = 100_000
_PRE_TICKS = 25_000
_STIM_TICKS = 150_000
_SPIKES_PER_TICK = SPIKE_FS_HZ / _TICKS_PER_S
_SPIKE_SAMPLES_PER_FRAME = SPIKE_FS_HZ // FS_HZ
_MS_PER_FRAME = SITE_FS_HZ // FS_HZ
_STIM_MS = N_FRAMES * _MS_PER_FRAME

_ZIP_DATE_TIME = (2023, 4, 4, 12, 0, 0)
_GZIP_LEVEL = 9  # tarfile's "w:gz" default, which NEMS0 used
_LAYOUT_SEED = 0x4E415434  # "NAT4": plan choices do not depend on the user's seed
_BATCH = {"A1": 322, "PEG": 323}
_ELECTRODES = {"ARM": 64, "CRD": 64, "DRX": 128, "TNC": 64}
_ANIMAL_DIR = {"ARM": "Armillaria", "CRD": "Cordyceps", "DRX": "Drechslera", "TNC": "Tinea"}
_N_AUDITORY_FULL = {"A1": 777, "PEG": 339}
_N_UNITS_FULL = {"A1": 849, "PEG": 398}

# Units per site at full scale (sums: A1 849, PEG 398). TNC015a holds 32 units so that, with the
# one unit dropped from DRX006b in quirks mode, a naive id join loses 33 A1 units, as the
# reference loader does on the real data.
_FULL_SITES: dict[str, dict[str, int]] = {
    "A1": {
        "ARM029a": 45, "ARM030a": 38, "ARM031a": 52, "ARM032a": 33, "ARM033a": 40,
        "CRD002a": 29, "CRD003b": 36, "CRD004a": 44, "CRD005b": 31, "CRD010b": 27,
        "DRX006b": 58, "DRX007a": 49, "DRX008b": 61, "DRX021a": 43, "DRX023a": 46,
        "TNC008a": 34, "TNC009a": 30, "TNC010a": 37, "TNC012a": 28, "TNC013a": 35,
        "TNC014a": 21, "TNC015a": 32,
    },
    "PEG": {
        "ARM011b": 31, "ARM012d": 38, "ARM013b": 42, "ARM015b": 27, "ARM016a": 36,
        "ARM017a": 44, "ARM018a": 33, "ARM019a": 40, "ARM021b": 29, "ARM022b": 39,
        "ARM024a": 39,
    },
}  # fmt: skip
_MINI_SITES: dict[str, dict[str, int]] = {
    "A1": {"ARM029a": 6, "DRX006b": 5, "TNC015a": 7},
    "PEG": {"ARM017a": 5, "ARM018a": 4, "ARM019a": 6},
}
_EXTRA_SITE = ("PEG", "TNC022a", 26, 3)  # area, site, units at full, units in mini

# Which site carries which fault. Every role exists in both the mini and the full layout.
_SHORT_VAL_SITE = ("A1", "ARM029a")  # one val sound shown 19 times (quirk)
_DROPPED_UNIT_SITE = ("A1", "DRX006b")  # one population unit absent from the site file (quirk)
_MISSING_EST_SITE = ("A1", "DRX006b")  # a few est sounds never played: NaN blocks (always)
_PADDED_SITES = ("TNC015a", "TNC022a")  # 3-digit electrodes in the site file (quirk)
_START_END_NAME_SITES = ("TNC015a", "TNC022a")  # epoch columns start,end,name (quirk)

# Sound names. The first two validation names are the ones quoted in nat4-dataset.md.
_VAL_NAMES_KNOWN = (
    "00cat172_rec1_geese_excerpt1.wav",
    "00cat668_rec3_ferret_kits_51p9-8-10-11-12-13-14_excerpt1.wav",
)
_SOUND_WORDS = (
    "geese", "ferret_kits", "ferret_fights", "ferret_dooks", "rain", "waterfall", "stream",
    "wind", "thunder", "fire_crackling", "crickets", "cicadas", "frogs", "songbird",
    "crow_caws", "owl_hoot", "dog_barking", "cat_meow", "cow_moo", "horse_whinny",
    "sheep_bleat", "female_speech", "male_speech", "infant_cry", "laughter", "footsteps",
    "door_knock", "typing", "chimes", "church_bells", "violin", "cello", "flute", "piano",
    "drums", "guitar", "harp", "traffic", "jackhammer", "helicopter", "train_horn",
    "clock_ticking", "zipper", "paper_crumpling", "water_pouring", "bubbles", "monkey_calls",
    "elephant_trumpet", "whale_song", "marmoset_twitter",
)  # fmt: skip
# Names with capitals: in quirks mode their wav file name is all lower case.
_MIXED_CASE_WORDS = (
    "ferret_fights_Athena-Violet001",
    "Male_Speech_TIMIT_si1234",
    "KitWhine_0715",
    "speech_True_alpha",
    "Bird_Chorus_Dawn",
    "MarmosetPhee_3p2-4",
)


# --------------------------------------------------------------------------------------------
# Ground truth returned to callers
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteInfo:
    """One per-site recording as written.

    - ``member``: path inside ``<AREA>_single_sites.zip``,
      ``<AREA>_single_sites/<AREA>_<SITE>_<sha1>.tgz`` (sha1 of the site meta, as nems0's
      ``recording_filename_hash``).
    - ``recording``: the ``R`` inside that tgz (the site id); members ``R/R.meta.json``,
      ``R/R.resp.h5``, ``R/R.resp.json``, ``R/R.resp.epoch.csv``.
    - ``unit_ids``: ids in the site file (h5 keys == JSON ``chans``), sorted.
      ``pop_cell_ids[i]`` is the population id of ``unit_ids[i]`` (``None`` if the unit is not
      in the population). They differ only at padded-electrode sites.
    - ``epoch_columns``: header order of the epoch CSV.
    - ``val_reps``: val stim -> times played here (20, or 19 for the short-val quirk).
    - ``missing_stims``: est stims never played here; the site's units are NaN there in the
      population ``resp``.
    - ``duration_s``: end of ``FILE_``/``PASSIVE_EXPERIMENT`` (the last trial end, floored to 1 ms).
    """

    area: str
    site: str
    member: str
    recording: str
    parmfile: str
    unit_ids: tuple[str, ...]
    pop_cell_ids: tuple[str | None, ...]
    epoch_columns: tuple[str, ...]
    val_reps: dict[str, int]
    missing_stims: tuple[str, ...]
    n_presentations: int
    n_trials: int
    duration_s: float
    in_population: bool


@dataclass(frozen=True)
class AreaInfo:
    """Everything written for one area: population recording, site files, pred_correlation.

    - ``pop_recording``: the ``R`` inside ``pop_file``; signals ``pop_signals`` in that order.
    - ``cell_ids``: population ``resp`` channel order (code-point sorted).
    - ``val_stims`` / ``est_stims``: epoch names in population order; val block first.
    - ``n_times``: samples at 100 Hz, 150 per sound.
    - ``sites``: every site file in zip order, including ``extra_sites`` (not in the population).
    - ``units_without_site_data``: population units absent from every site file. Their
      population values are kept (derived from spikes that were simulated, not written).
    - ``nan_pairs``: every (cell, stim) that is NaN in the population ``resp``.
    - ``single_sites_members``: all zip member names in order, directories and strays included.
    """

    area: str
    batch: int
    pop_file: str
    pop_recording: str
    pop_signals: tuple[str, ...]
    cell_ids: tuple[str, ...]
    val_stims: tuple[str, ...]
    est_stims: tuple[str, ...]
    n_times: int
    sites: tuple[SiteInfo, ...]
    units_without_site_data: tuple[str, ...]
    extra_sites: tuple[str, ...]
    auditory_cell_ids: tuple[str, ...]
    nan_pairs: tuple[tuple[str, str], ...]
    pred_correlation_file: str
    pred_correlation_columns: tuple[str, ...]
    single_sites_file: str
    single_sites_members: tuple[str, ...]
    stray_members: tuple[str, ...]

    def site(self, site: str) -> SiteInfo:
        """The ``SiteInfo`` of ``site`` (KeyError if this area has no such site)."""
        for info in self.sites:
            if info.site == site:
                return info
        raise KeyError(site)


@dataclass(frozen=True)
class ShortValQuirk:
    """A validation sound shown fewer than 20 times at one site."""

    area: str
    site: str
    stim: str
    n_reps: int


@dataclass(frozen=True)
class QuirkInfo:
    """The real-world faults applied (all empty when ``quirks=False``)."""

    padded_electrode_sites: tuple[str, ...] = ()
    extra_sites: tuple[tuple[str, str], ...] = ()
    short_val: tuple[ShortValQuirk, ...] = ()
    wav_case_mismatch: dict[str, str] = dataclasses.field(default_factory=dict)
    stray_members: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    units_without_site_data: tuple[str, ...] = ()
    start_end_name_sites: tuple[str, ...] = ()


@dataclass(frozen=True)
class FileInfo:
    """Size and md5 of one written file, as listed in record.json."""

    size: int
    md5: str


@dataclass(frozen=True)
class SampleInfo:
    """Ground truth of one synthetic mirror; ``to_json`` is what ``sample_info.json`` holds.

    ``scale`` is "mini", "full" or the factor's repr; ``unit_scale`` is 0.0 for mini.
    ``wav_members`` maps each stim epoch name to its member in ``wav.zip``. ``files`` holds
    size and md5 of the seven record files, as in ``record.json``.
    """

    record_id: int
    version: str
    scale: str
    unit_scale: float
    quirks: bool
    seed: int
    fs_hz: int
    dt_s: float
    site_fs_hz: int
    spike_fs_hz: int
    wav_fs_hz: int
    n_frames_per_stim: int
    pre_stim_s: float
    sound_s: float
    post_stim_s: float
    n_val_reps: int
    areas: dict[str, AreaInfo]
    wav_members: dict[str, str]
    quirks_applied: QuirkInfo
    files: dict[str, FileInfo]

    def to_json(self) -> str:
        """Plain JSON (tuples become lists); ``from_json`` reverses it."""
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> SampleInfo:
        """Rebuild a ``SampleInfo`` from ``to_json`` output (e.g. ``sample_info.json``)."""
        raw = json.loads(text)
        raw["areas"] = {k: _area_from_dict(v) for k, v in raw["areas"].items()}
        raw["files"] = {k: FileInfo(**v) for k, v in raw["files"].items()}
        q = raw["quirks_applied"]
        raw["quirks_applied"] = QuirkInfo(
            padded_electrode_sites=tuple(q["padded_electrode_sites"]),
            extra_sites=tuple(tuple(x) for x in q["extra_sites"]),
            short_val=tuple(ShortValQuirk(**x) for x in q["short_val"]),
            wav_case_mismatch=dict(q["wav_case_mismatch"]),
            stray_members={k: tuple(v) for k, v in q["stray_members"].items()},
            units_without_site_data=tuple(q["units_without_site_data"]),
            start_end_name_sites=tuple(q["start_end_name_sites"]),
        )
        return cls(**raw)


def _area_from_dict(d: dict[str, Any]) -> AreaInfo:
    sites = tuple(
        SiteInfo(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
        for s in d["sites"]
    )
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    fields["nan_pairs"] = tuple(tuple(p) for p in d["nan_pairs"])
    fields["sites"] = sites
    return AreaInfo(**fields)


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def write_sample(
    out_dir: Path,
    *,
    scale: str | float = "mini",
    quirks: bool = False,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> SampleInfo:
    """Write a synthetic NAT4 mirror into ``out_dir`` and return what was written.

    Parameters
    ----------
    out_dir
        Directory to write into (created if needed): new, empty, or one a sample was
        written to before (it has ``sample_info.json``); any other raises ``StoreError``
        (:func:`check_writable`) before a file is written. Files land directly in it:
        ``{A1,PEG}_NAT4_ozgf.fs100.ch18.tgz``, ``{A1,PEG}_pred_correlation.csv``,
        ``{A1,PEG}_single_sites.zip``, ``wav.zip``, ``record.json`` and ``sample_info.json``.
    scale
        ``"mini"`` (default): 3 sites per area, 4-7 units each, 3 val + 8 est sounds; writes in
        well under a second. ``"full"``: the real dimensions (849 + 398 units, 18 + 575 sounds,
        22 + 11 sites). A float multiplies the full unit counts (``1.0 == "full"``), for
        scaling benchmarks; sounds and sites stay as in ``"full"``.
    quirks
        Default False. If True, add the real-world faults listed in nat4-dataset.md; they are
        listed in ``SampleInfo.quirks_applied``.
    seed
        Seeds the simulated data (spectrograms, spikes, schedules, wavs). Same seed, same bytes.
    progress
        Optional callable receiving one-line log messages.

    Returns
    -------
    SampleInfo
        Ground truth; also written as ``out_dir/sample_info.json``.
    """
    label, unit_scale = _parse_scale(scale)
    log = progress or (lambda _msg: None)
    out_dir = Path(out_dir)
    check_writable(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    stims = _plan_stims(label, quirks)
    spec = _spectrograms(len(stims.names), _rng(seed, "spectrogram"))
    design = _lagged_design(spec)
    area_infos: dict[str, AreaInfo] = {}
    quirk_parts: list[QuirkInfo] = []
    for area in AREAS:
        plan = _plan_area(area, label, unit_scale, quirks, stims)
        log(f"{area}: {len(plan.sites)} sites, {len(plan.cell_ids)} population units")
        info, quirk = _write_area(out_dir, plan, stims, spec, design, seed, log)
        area_infos[area] = info
        quirk_parts.append(quirk)
    log("wav.zip")
    wav_members = _write_wav_zip(out_dir / "wav.zip", stims, spec, seed)
    files = _write_record_json(out_dir, label, seed, quirks)
    quirk_info = _merge_quirks(quirk_parts, stims, wav_members, quirks)
    info = SampleInfo(
        record_id=RECORD_ID,
        version=RECORD_VERSION,
        scale=label,
        unit_scale=unit_scale,
        quirks=quirks,
        seed=seed,
        fs_hz=FS_HZ,
        dt_s=1.0 / FS_HZ,
        site_fs_hz=SITE_FS_HZ,
        spike_fs_hz=SPIKE_FS_HZ,
        wav_fs_hz=WAV_FS_HZ,
        n_frames_per_stim=N_FRAMES,
        pre_stim_s=PRE_STIM_S,
        sound_s=SOUND_S,
        post_stim_s=POST_STIM_S,
        n_val_reps=N_VAL_REPS,
        areas=area_infos,
        wav_members=wav_members,
        quirks_applied=quirk_info,
        files=files,
    )
    _atomic_write(out_dir / "sample_info.json", info.to_json().encode())
    log(f"done: {out_dir}")
    return info


def check_writable(out_dir: Path) -> None:
    """A sample goes into a new or empty directory, or over a sample written before (it has
    ``sample_info.json``); anything else (a store, a home directory, a real mirror) is
    refused with :class:`StoreError` (exit 7), as ``build`` refuses a directory that is not
    a store, before a file is written."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise StoreError(f"{out_dir} exists and is not a directory; nothing was written")
    if (out_dir / "sample_info.json").is_file() or not any(out_dir.iterdir()):
        return
    what = "a nat4etl store" if (out_dir / "manifest.json").is_file() else "other files"
    raise StoreError(
        f"{out_dir} is not empty and holds {what}, not a sample written before (no "
        "sample_info.json); refusing to write a sample into it; nothing was written. "
        "Hint: choose a new or empty directory for --out"
    )


def _parse_scale(scale: str | float) -> tuple[str, float]:
    """``"mini"`` -> ("mini", 0); ``"full"`` or 1.0 -> ("full", 1.0); 2 -> ("2.0", 2.0)."""
    if isinstance(scale, str) and scale in ("mini", "full"):
        return scale, 0.0 if scale == "mini" else 1.0
    try:
        factor = float(scale)
    except (TypeError, ValueError):
        factor = float("nan")
    if not np.isfinite(factor) or factor <= 0:
        msg = f"--scale must be 'mini', 'full' or a positive number; got {scale!r}."
        raise ConfigError(msg + " Hint: use --scale full for the real dimensions.")
    return ("full" if factor == 1.0 else repr(factor)), factor


def _rng(seed: int, *keys: str) -> np.random.Generator:
    """An independent generator per (seed, purpose), stable whatever the generation order."""
    words = [seed & 0xFFFFFFFF, seed >> 32 & 0xFFFFFFFF] + [zlib.crc32(k.encode()) for k in keys]
    return np.random.default_rng(np.random.SeedSequence(words))


# --------------------------------------------------------------------------------------------
# 1. Plan: names, sites, units, quirk roles (independent of the seed)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stims:
    """All sounds in population order: val (sorted) then est (sorted)."""

    names: tuple[str, ...]  # epoch names, "STIM_<sound>"
    n_val: int
    wav_names: tuple[str, ...]  # wav file names (differ in case for quirk sounds)

    @property
    def val(self) -> tuple[str, ...]:
        return self.names[: self.n_val]

    @property
    def est(self) -> tuple[str, ...]:
        return self.names[self.n_val :]


@dataclass(frozen=True)
class _SitePlan:
    area: str
    site: str
    pop_ids: tuple[str, ...]  # population id of every simulated unit, sorted
    file_ids: tuple[str, ...]  # id written in the site file, same order as pop_ids
    dropped: frozenset[str]  # pop ids simulated but left out of the site file
    in_population: bool
    missing_est: tuple[int, ...]  # stim indices never played
    short_val: dict[int, int]  # stim index -> repetitions, where not 20
    epoch_columns: tuple[str, ...]
    parmfile: str


@dataclass(frozen=True)
class _AreaPlan:
    area: str
    sites: tuple[_SitePlan, ...]
    cell_ids: tuple[str, ...]  # population channel order
    auditory: frozenset[str]
    quirks: bool


def _plan_stims(label: str, quirks: bool) -> _Stims:
    """Realistic, unique sound names; mini keeps a subset that still has mixed-case names."""
    val, est_plain, est_mixed = _sound_names(_np_layout_rng("sounds"))
    if label == "mini":
        val, est = val[:3], est_plain[:6] + est_mixed[:2]
    else:
        est = est_plain[: N_EST_FULL - len(est_mixed)] + est_mixed
    names = tuple(sorted(f"STIM_{v}" for v in val)) + tuple(sorted(f"STIM_{e}" for e in est))
    mixed = {f"STIM_{e}" for e in est_mixed}
    wav_names = tuple(
        (n[5:].lower() if quirks and n in mixed else n[5:]) for n in names
    )  # quirk: same letters, different case
    return _Stims(names=names, n_val=len(val), wav_names=wav_names)


def _np_layout_rng(*keys: str) -> np.random.Generator:
    return _rng(_LAYOUT_SEED, "layout", *keys)


def _sound_names(rng: np.random.Generator) -> tuple[list[str], list[str], list[str]]:
    """18 val names (``00cat…_excerpt1.wav``), plain est names, and mixed-case est names."""
    val = list(_VAL_NAMES_KNOWN)
    used_cats = {172, 668}
    while len(val) < N_VAL_FULL:
        cat = int(rng.integers(100, 700))
        if cat in used_cats:
            continue
        used_cats.add(cat)
        word = _SOUND_WORDS[int(rng.integers(len(_SOUND_WORDS)))]
        val.append(f"00cat{cat}_rec{int(rng.integers(1, 6))}_{word}_excerpt1.wav")
    est_mixed = [
        f"cat{500 + 3 * i}_rec{1 + i % 4}_{word}_excerpt1.wav"
        for i, word in enumerate(_MIXED_CASE_WORDS)
    ]
    seen = set(est_mixed)
    est_plain: list[str] = []
    while len(est_plain) < N_EST_FULL:
        word = _SOUND_WORDS[int(rng.integers(len(_SOUND_WORDS)))]
        if rng.random() < 0.08:
            word += "_" + "-".join(str(x) for x in rng.integers(1, 20, size=4))
        name = (
            f"cat{int(rng.integers(1, 700))}_rec{int(rng.integers(1, 6))}_{word}"
            f"_excerpt{int(rng.integers(1, 4))}.wav"
        )
        if name not in seen:
            seen.add(name)
            est_plain.append(name)
    return val, est_plain, est_mixed


def _plan_area(area: str, label: str, unit_scale: float, quirks: bool, stims: _Stims) -> _AreaPlan:
    """Sites and unit ids of one area, plus which site carries which quirk."""
    counts = _site_unit_counts(area, label, unit_scale)
    extra_area, extra_site, extra_full, extra_mini = _EXTRA_SITE
    if quirks and area == extra_area:
        counts[extra_site] = (
            extra_mini if label == "mini" else max(1, round(extra_full * unit_scale))
        )
    sites = tuple(
        _plan_site(area, site, counts[site], n, label, quirks, stims)
        for n, site in enumerate(sorted(counts))
    )
    cell_ids = tuple(sorted(u for s in sites if s.in_population for u in s.pop_ids))
    n_auditory = round(len(cell_ids) * _N_AUDITORY_FULL[area] / _N_UNITS_FULL[area])
    pick = _np_layout_rng(area, "auditory").permutation(len(cell_ids))[:n_auditory]
    return _AreaPlan(
        area=area,
        sites=sites,
        cell_ids=cell_ids,
        auditory=frozenset(cell_ids[i] for i in pick),
        quirks=quirks,
    )


def _plan_site(
    area: str, site: str, n_units: int, index: int, label: str, quirks: bool, stims: _Stims
) -> _SitePlan:
    """One site: its unit ids (population and as written) and the faults it carries."""
    pop_ids = _unit_ids(site, n_units)
    role = (area, site)
    padded = quirks and site in _PADDED_SITES
    dropped = {pop_ids[1 % n_units]} if quirks and role == _DROPPED_UNIT_SITE else set()
    short_val = {1: N_VAL_REPS - 1} if quirks and role == _SHORT_VAL_SITE else {}
    if quirks and site in _START_END_NAME_SITES:
        epoch_columns = ("start", "end", "name")  # the add_epoch order
    else:
        epoch_columns = ("name", "start", "end")  # the baphy order
    return _SitePlan(
        area=area,
        site=site,
        pop_ids=pop_ids,
        file_ids=tuple(_pad_electrode(u) if padded else u for u in pop_ids),
        dropped=frozenset(dropped),
        in_population=role != _EXTRA_SITE[:2],
        missing_est=_missing_est(area, site, label, stims),
        short_val=short_val,
        epoch_columns=epoch_columns,
        parmfile=f"{site}{3 + index % 5:02d}_p_NAT",
    )


def _site_unit_counts(area: str, label: str, unit_scale: float) -> dict[str, int]:
    """Units per site; a float scale keeps the full proportions (largest remainder, >= 1)."""
    if label == "mini":
        return dict(_MINI_SITES[area])
    full = _FULL_SITES[area]
    if unit_scale == 1.0:
        return dict(full)
    sites = sorted(full)
    exact = np.array([full[s] * unit_scale for s in sites])
    base = np.maximum(np.floor(exact).astype(int), 1)
    short = max(0, round(_N_UNITS_FULL[area] * unit_scale) - int(base.sum()))
    for i in np.argsort(-(exact - np.floor(exact)), kind="stable")[:short]:
        base[i] += 1
    return {s: int(n) for s, n in zip(sites, base, strict=True)}


def _unit_ids(site: str, n_units: int) -> tuple[str, ...]:
    """``<site>-<electrode 2 digits>-<unit>``; several units may share an electrode."""
    rng = _np_layout_rng("units", site)
    n_electrodes = _ELECTRODES[site[:3]]
    electrodes = np.sort(rng.integers(1, n_electrodes + 1, size=n_units))
    ids, per_electrode = [], {}
    for e in electrodes.tolist():
        per_electrode[e] = per_electrode.get(e, 0) + 1
        ids.append(f"{site}-{e:02d}-{per_electrode[e]}")
    return tuple(sorted(ids))


def _pad_electrode(unit_id: str) -> str:
    """``TNC015a-12-1`` -> ``TNC015a-012-1``: how some TNC site files spell their units."""
    site, electrode, unit = unit_id.split("-")
    return f"{site}-{int(electrode):03d}-{unit}"


def _missing_est(area: str, site: str, label: str, stims: _Stims) -> tuple[int, ...]:
    """Est sounds this site never played (not a quirk: NaN in the population is part of NAT4)."""
    if (area, site) != _MISSING_EST_SITE:
        return ()
    n_missing = 1 if label == "mini" else 3
    est_idx = np.arange(stims.n_val, len(stims.names))
    pick = _np_layout_rng("missing", site).choice(est_idx, size=n_missing, replace=False)
    return tuple(sorted(int(i) for i in pick))


# --------------------------------------------------------------------------------------------
# 2. Simulate: spectrograms, unit rates, schedules, spikes
# --------------------------------------------------------------------------------------------


def _spectrograms(n_stims: int, rng: np.random.Generator) -> np.ndarray:
    """(n_stims, 18, 150) positive float64 "ozgf" spectrograms with spectro-temporal structure.

    Smooth log-normal texture inside the 1 s sound, a faint noise floor in the silences.
    """
    n_sound = round(SOUND_S * FS_HZ)
    pre = round(PRE_STIM_S * FS_HZ)
    noise = rng.standard_normal((n_stims, N_BANDS, n_sound))
    cutoff = rng.uniform(2.0, 12.0, size=(n_stims, 1, 1))  # modulation cutoff, in frequency bins
    freqs = np.arange(n_sound // 2 + 1)[None, None, :]
    smooth_t = np.fft.irfft(np.fft.rfft(noise, axis=2) * np.exp(-((freqs / cutoff) ** 2)), n_sound)
    smooth_t /= smooth_t.std(axis=2, keepdims=True)
    smooth = 0.25 * np.roll(smooth_t, 1, axis=1) + 0.5 * smooth_t + 0.25 * np.roll(smooth_t, -1, 1)
    bands = np.linspace(-1.0, 1.0, N_BANDS)[None, :, None]
    tilt = rng.normal(0.0, 0.8, size=(n_stims, 1, 1)) * bands
    level = rng.normal(0.8, 0.3, size=(n_stims, 1, 1))
    ramp = np.minimum(1.0, np.minimum(np.arange(n_sound) + 1, n_sound - np.arange(n_sound)) / 3)
    spec = np.empty((n_stims, N_BANDS, N_FRAMES))
    spec[:] = 0.02 * np.exp(0.3 * rng.standard_normal((n_stims, N_BANDS, N_FRAMES)))
    spec[:, :, pre : pre + n_sound] += np.exp(level + tilt + 0.7 * smooth) * ramp
    return spec


_N_LAGS = 10


def _lagged_design(spec: np.ndarray) -> np.ndarray:
    """(n_stims * 150, 18 * lags) float32 design matrix: the recent past of log-spectrogram."""
    logspec = np.log1p(spec / 0.1).astype(np.float32)
    n_stims = spec.shape[0]
    design = np.zeros((n_stims, N_FRAMES, N_BANDS, _N_LAGS), dtype=np.float32)
    for lag in range(_N_LAGS):
        design[:, lag:, :, lag] = logspec[:, :, : N_FRAMES - lag].transpose(0, 2, 1)
    return design.reshape(n_stims * N_FRAMES, N_BANDS * _N_LAGS)


def _unit_rates_hz(
    design: np.ndarray, n_stims: int, auditory: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Rates (n_stims, 150, n_units) and spontaneous rates (n_units,), in Hz.

    Linear STRF on the log spectrogram -> softplus -> + spontaneous rate. Auditory units follow
    the sound strongly; the others barely (their r_test is low).
    """
    n_units = len(auditory)
    band = np.arange(N_BANDS)[:, None, None]
    lag = np.arange(_N_LAGS)[None, :, None]
    best_band = rng.uniform(0, N_BANDS - 1, size=n_units)
    width = rng.uniform(1.0, 3.5, size=n_units)
    tau = rng.uniform(1.0, 3.0, size=n_units)
    inhibition = rng.uniform(0.2, 0.8, size=n_units)
    strf = np.exp(-((band - best_band) ** 2) / (2 * width**2)) * (
        np.exp(-lag / tau) - inhibition * np.exp(-lag / (2 * tau))
    )
    drive = design @ strf.reshape(N_BANDS * _N_LAGS, n_units).astype(np.float32)
    drive = (drive - drive.mean(axis=0)) / (drive.std(axis=0) + 1e-6)
    slope = rng.uniform(0.8, 2.0, size=n_units).astype(np.float32)
    driven = np.logaddexp(0.0, slope * drive - 1.0)
    driven /= driven.mean(axis=0)
    peak_hz = np.where(auditory, rng.lognormal(np.log(6.0), 0.5, n_units), 0.4)
    spont_hz = rng.lognormal(np.log(2.0), 0.6, size=n_units)
    rate = spont_hz.astype(np.float32) + peak_hz.astype(np.float32) * driven
    np.minimum(rate, np.float32(150.0), out=rate)
    return rate.reshape(n_stims, N_FRAMES, n_units), spont_hz


@dataclass(frozen=True)
class _Schedule:
    """One site's experiment: presentations in time order, trials, file span (10 us ticks)."""

    stim_of_pres: np.ndarray  # stim index per presentation
    start_ticks: np.ndarray  # REFERENCE start per presentation
    trials: tuple[tuple[int, int], ...]  # (start, end) ticks
    end_ticks: int  # file end, floored to the 1 ms grid

    @property
    def start_s(self) -> np.ndarray:
        return self.start_ticks / _TICKS_PER_S

    @property
    def end_s(self) -> np.ndarray:
        return (self.start_ticks + _STIM_TICKS) / _TICKS_PER_S


def _schedule(plan: _SitePlan, stims: _Stims, rng: np.random.Generator) -> _Schedule:
    """Shuffle every est sound once and every val sound 20 times into trials of 1-4 sounds.

    Gaps have 10 us resolution, so epochs sit off the 10 ms grid; about one start in seven sits
    exactly on half a millisecond, where round-half-even and round-half-up disagree.
    """
    reps = np.ones(len(stims.names), dtype=int)
    reps[: stims.n_val] = N_VAL_REPS
    for idx, n in plan.short_val.items():
        reps[idx] = n
    reps[list(plan.missing_est)] = 0
    order = rng.permutation(np.repeat(np.arange(len(stims.names)), reps))
    starts, trials = [], []
    tick, i = int(rng.integers(0, 100)), 0
    while i < len(order):
        n_in_trial = min(int(rng.integers(1, 5)), len(order) - i)
        trial_start = tick
        for _ in range(n_in_trial):
            tick = _valid_stim_start(tick, rng)
            starts.append(tick)
            tick += _STIM_TICKS + int(rng.integers(0, 1000))  # < 10 ms gap between sounds
        trial_end = tick + int(rng.integers(5_000, 20_000))
        trials.append((trial_start, trial_end))
        tick = trial_end + int(rng.integers(30_000, 80_000))  # inter-trial interval
        i += n_in_trial
    file_end = trials[-1][1] // 100 * 100  # baphy floors the last trial end to 1/rasterfs
    return _Schedule(
        stim_of_pres=order, start_ticks=np.array(starts), trials=tuple(trials), end_ticks=file_end
    )


def _valid_stim_start(tick: int, rng: np.random.Generator) -> int:
    """The first tick >= ``tick`` whose 1.5 s window is exactly 1500 samples at 1 kHz.

    With float times, round(end * 1000) - round(start * 1000) can be 1499 or 1501 near
    half-milliseconds; the reference loader crashes on unequal lengths, so avoid those.
    """
    if rng.random() < 0.15:
        tick = tick - tick % 100 + 50 + (100 if tick % 100 > 50 else 0)  # on a half-ms
    while True:
        start_s, end_s = tick / _TICKS_PER_S, (tick + _STIM_TICKS) / _TICKS_PER_S
        if round(end_s * SITE_FS_HZ) - round(start_s * SITE_FS_HZ) == _STIM_MS:
            return tick
        tick += 1


def _simulate_spike_samples(
    rate_hz: np.ndarray, spont_hz: np.ndarray, schedule: _Schedule, rng: np.random.Generator
) -> list[np.ndarray]:
    """Spike sample indices at 30 kHz per unit: Poisson, driven in each presentation window,
    spontaneous in the gaps. No two spikes of a unit share a sample."""
    n_units = rate_hz.shape[2]
    onset = schedule.start_ticks * 3 // 10  # ticks (1e5/s) -> samples (3e4/s)
    lam = rate_hz[schedule.stim_of_pres] * np.float32(1.0 / FS_HZ)  # (pres, frame, unit)
    counts = rng.poisson(lam)
    pres, frame, unit = np.nonzero(counts)
    n = counts[pres, frame, unit]
    pres, frame, unit = np.repeat(pres, n), np.repeat(frame, n), np.repeat(unit, n)
    driven = (
        onset[pres]
        + frame * _SPIKE_SAMPLES_PER_FRAME
        + rng.integers(0, _SPIKE_SAMPLES_PER_FRAME, size=len(pres))
    )
    n_samples = schedule.end_ticks * 3 // 10
    n_spont = rng.poisson(spont_hz * n_samples / SPIKE_FS_HZ)
    spont_unit = np.repeat(np.arange(n_units), n_spont)
    spont = rng.integers(0, n_samples, size=len(spont_unit))
    window = np.searchsorted(onset, spont, side="right") - 1  # windows carry their own spont
    window_samples = N_FRAMES * _SPIKE_SAMPLES_PER_FRAME
    in_window = (window >= 0) & (spont < onset[np.maximum(window, 0)] + window_samples)
    keys = np.concatenate(
        [unit * n_samples + driven, spont_unit[~in_window] * n_samples + spont[~in_window]]
    )
    keys.sort()
    keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # one spike per sample
    bounds = np.searchsorted(keys, np.arange(n_units + 1) * n_samples)
    return [keys[bounds[u] : bounds[u + 1]] - u * n_samples for u in range(n_units)]


def rebin_reference_route(
    spike_times_s: Sequence[np.ndarray],
    start_s: np.ndarray,
    end_s: np.ndarray,
    *,
    max_time_s: float,
    fs_hz: int = SITE_FS_HZ,
    group: int = _MS_PER_FRAME,
) -> np.ndarray:
    """Counts per (presentation, unit, frame) exactly as the reference loader computes them.

    Rasterize at ``fs_hz`` with ``floor(t * fs)`` (``round(fs * max_time_s)`` bins, later spikes
    dropped), cut ``[round(start * fs), round(end * fs))`` (half to even), sum groups of
    ``group`` samples. Every window must have the same length, a multiple of ``group``.
    Windows must not overlap.
    """
    lb = np.round(np.asarray(start_s) * fs_hz).astype(np.int64)
    ub = np.round(np.asarray(end_s) * fs_hz).astype(np.int64)
    length = ub - lb
    if len(lb) and (np.any(length != length[0]) or length[0] % group):
        msg = f"windows must share one length that is a multiple of {group}; got {set(length)}"
        raise ValueError(msg)
    n_frames = int(length[0]) // group if len(lb) else 0
    n_bins = int(np.round(fs_hz * max_time_s))
    order = np.argsort(lb, kind="stable")
    lb_sorted = lb[order]
    counts = np.zeros((len(lb), len(spike_times_s), n_frames), dtype=np.uint16)
    for u, times in enumerate(spike_times_s):
        bins = np.floor(np.asarray(times, dtype=np.float64) * fs_hz).astype(np.int64)
        bins = bins[(bins >= 0) & (bins < n_bins)]
        k = np.searchsorted(lb_sorted, bins, side="right") - 1
        ok = k >= 0
        k, bins = k[ok], bins[ok]
        inside = bins < lb_sorted[k] + length[0]
        pres = order[k[inside]]
        frame = (bins[inside] - lb[pres]) // group
        flat = np.bincount(pres * n_frames + frame, minlength=len(lb) * n_frames)
        counts[:, u, :] = flat.reshape(len(lb), n_frames)
    return counts


# --------------------------------------------------------------------------------------------
# 3./4. One area: site files (zip), population recording, pred_correlation
# --------------------------------------------------------------------------------------------


@dataclass
class _SiteResult:
    plan: _SitePlan
    sums: np.ndarray  # (n_stims, n_units, 150) uint16: spike counts summed over repetitions
    reps: np.ndarray  # (n_stims,) repetitions played (0 = never)
    info: SiteInfo


def _write_area(
    out_dir: Path,
    plan: _AreaPlan,
    stims: _Stims,
    spec: np.ndarray,
    design: np.ndarray,
    seed: int,
    log: Callable[[str], None],
) -> tuple[AreaInfo, QuirkInfo]:
    area = plan.area
    zip_name = f"{area}_single_sites.zip"
    results, members, stray = _write_single_sites_zip(
        out_dir / zip_name, plan, stims, design, seed, log
    )
    pop_sites = [r for r in results if r.plan.in_population]
    recording = f"{area}_NAT4_ozgf_fs100_ch18"
    pop_file = f"{area}_NAT4_ozgf.fs100.ch18.tgz"
    log(f"{area}: population recording {pop_file}")
    _write_population_tgz(out_dir / pop_file, recording, plan, stims, spec, pop_sites)
    pred_file = f"{area}_pred_correlation.csv"
    columns = _write_pred_correlation(out_dir / pred_file, plan, seed)
    nan_pairs = tuple(
        (cell, stims.names[i])
        for r in pop_sites
        for i in r.plan.missing_est
        for cell in r.plan.pop_ids
    )
    dropped = tuple(sorted(u for r in results for u in r.plan.dropped))
    extra = tuple(r.plan.site for r in results if not r.plan.in_population)
    info = AreaInfo(
        area=area,
        batch=_BATCH[area],
        pop_file=pop_file,
        pop_recording=recording,
        pop_signals=("resp", "stim", "mask_est"),
        cell_ids=plan.cell_ids,
        val_stims=stims.val,
        est_stims=stims.est,
        n_times=len(stims.names) * N_FRAMES,
        sites=tuple(r.info for r in results),
        units_without_site_data=dropped,
        extra_sites=extra,
        auditory_cell_ids=tuple(sorted(plan.auditory)),
        nan_pairs=tuple(sorted(nan_pairs)),
        pred_correlation_file=pred_file,
        pred_correlation_columns=columns,
        single_sites_file=zip_name,
        single_sites_members=members,
        stray_members=stray,
    )
    quirk = QuirkInfo(
        padded_electrode_sites=tuple(
            r.plan.site for r in results if r.plan.file_ids != r.plan.pop_ids
        ),
        extra_sites=tuple((area, s) for s in extra),
        short_val=tuple(
            ShortValQuirk(area, r.plan.site, stims.names[i], n)
            for r in results
            for i, n in sorted(r.plan.short_val.items())
        ),
        stray_members={zip_name: stray} if stray else {},
        units_without_site_data=dropped,
        start_end_name_sites=tuple(
            r.plan.site for r in results if r.plan.epoch_columns[0] == "start"
        ),
    )
    return info, quirk


def _write_single_sites_zip(
    path: Path,
    plan: _AreaPlan,
    stims: _Stims,
    design: np.ndarray,
    seed: int,
    log: Callable[[str], None],
) -> tuple[list[_SiteResult], tuple[str, ...], tuple[str, ...]]:
    """Simulate each site in name order and append its tgz to the zip as soon as it exists.

    Returns the site results, every zip member in order, and the stray (non-recording) members.
    """
    folder = f"{plan.area}_single_sites/"
    results: list[_SiteResult] = []
    stray: list[str] = []
    with _atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        _zip_dir(zf, folder)
        if plan.quirks:  # Finder litter, as in zips made on a Mac
            stray.append(folder + ".DS_Store")
            _zip_bytes(zf, stray[-1], _DS_STORE_BYTES)
        for site_plan in plan.sites:
            log(f"{plan.area}: site {site_plan.site} ({len(site_plan.pop_ids)} units)")
            result, tgz = _simulate_site(site_plan, plan, stims, design, seed)
            _zip_bytes(zf, result.info.member, tgz)
            results.append(result)
        if plan.quirks and plan.area == "A1":
            mac = "__MACOSX/" + folder
            stray += ["__MACOSX/", mac, mac + "._" + Path(results[0].info.member).name]
            _zip_dir(zf, stray[-3])
            _zip_dir(zf, stray[-2])
            _zip_bytes(zf, stray[-1], _APPLE_DOUBLE_BYTES)
        members = tuple(zf.namelist())
    return results, members, tuple(stray)


_DS_STORE_BYTES = b"\x00\x00\x00\x01Bud1" + bytes(2048 - 8)
_APPLE_DOUBLE_BYTES = (
    b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \x00\x02"
    + b"\x00\x00\x00\x09\x00\x00\x00\x32\x00\x00\x0e\xb0\x00\x00\x00\x02\x00\x00\x0e\xe2"
    + bytes(4096 - 50)
)


def _simulate_site(
    plan: _SitePlan, area_plan: _AreaPlan, stims: _Stims, design: np.ndarray, seed: int
) -> tuple[_SiteResult, bytes]:
    """Schedule, spikes, site tgz bytes, and the per-stim sums the population is built from."""
    rng = _rng(seed, plan.area, plan.site)
    schedule = _schedule(plan, stims, rng)
    if plan.in_population:
        auditory = np.array([u in area_plan.auditory for u in plan.pop_ids])
    else:
        auditory = rng.random(len(plan.pop_ids)) < 0.85
    rate_hz, spont_hz = _unit_rates_hz(design, len(stims.names), auditory, rng)
    samples = _simulate_spike_samples(rate_hz, spont_hz, schedule, rng)
    spike_times_s = [s / SPIKE_FS_HZ for s in samples]  # float64, exactly what the h5 holds
    counts = rebin_reference_route(
        spike_times_s,
        schedule.start_s,
        schedule.end_s,
        max_time_s=schedule.end_ticks / _TICKS_PER_S,
    )
    n_stims = len(stims.names)
    sums = np.zeros((n_stims, len(plan.pop_ids), N_FRAMES), dtype=np.uint16)
    np.add.at(sums, schedule.stim_of_pres, counts)
    reps = np.bincount(schedule.stim_of_pres, minlength=n_stims)
    tgz, recording, meta_sha1 = _site_tgz_bytes(plan, stims, schedule, spike_times_s)
    member = f"{plan.area}_single_sites/{plan.area}_{plan.site}_{meta_sha1}.tgz"
    written = [i for i, u in enumerate(plan.pop_ids) if u not in plan.dropped]
    info = SiteInfo(
        area=plan.area,
        site=plan.site,
        member=member,
        recording=recording,
        parmfile=plan.parmfile,
        unit_ids=tuple(plan.file_ids[i] for i in written),
        pop_cell_ids=tuple(plan.pop_ids[i] if plan.in_population else None for i in written),
        epoch_columns=plan.epoch_columns,
        val_reps={stims.names[i]: int(reps[i]) for i in range(stims.n_val)},
        missing_stims=tuple(stims.names[i] for i in plan.missing_est),
        n_presentations=len(schedule.stim_of_pres),
        n_trials=len(schedule.trials),
        duration_s=schedule.end_ticks / _TICKS_PER_S,
        in_population=plan.in_population,
    )
    return _SiteResult(plan=plan, sums=sums, reps=reps, info=info), tgz


def _site_tgz_bytes(
    plan: _SitePlan, stims: _Stims, schedule: _Schedule, spike_times_s: list[np.ndarray]
) -> tuple[bytes, str, str]:
    """A per-site NEMS0 recording with one PointProcess ``resp``; returns (bytes, R, sha1)."""
    recording = plan.site
    animal = plan.site[:3]
    meta = {
        "siteid": plan.site,
        "batch": _BATCH[plan.area],
        "rasterfs": SITE_FS_HZ,
        "resp": True,
        "stim": False,
        "pupil": False,
        "recache": False,
        "runclass": "NAT",
        "rawid": [int(zlib.crc32(plan.parmfile.encode()) % 90_000 + 10_000)],
        "files": [f"/auto/data/daq/{_ANIMAL_DIR[animal]}/{plan.site[:6]}/{plan.parmfile}.m"],
    }
    meta_sha1 = hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest()
    written = [i for i, u in enumerate(plan.pop_ids) if u not in plan.dropped]
    unit_ids = [plan.file_ids[i] for i in written]
    n_bins = int(np.round(SITE_FS_HZ * schedule.end_ticks / _TICKS_PER_S))
    sidecar = _signal_json(
        "resp", unit_ids, SITE_FS_HZ, {"siteid": plan.site}, recording, n_bins, "PointProcess"
    )
    epochs = _epoch_csv_bytes(_site_epoch_rows(plan, stims, schedule), plan.epoch_columns)
    h5 = _h5_bytes({plan.file_ids[i]: spike_times_s[i] for i in written})
    prefix = f"{recording}/{recording}"
    buf = io.BytesIO()
    with _gzip_tar(buf) as tar:
        _tar_bytes(tar, f"{prefix}.meta.json", json.dumps(meta).encode())
        _tar_bytes(tar, f"{prefix}.resp.h5", h5)
        _tar_bytes(tar, f"{prefix}.resp.json", sidecar)
        _tar_bytes(tar, f"{prefix}.resp.epoch.csv", epochs)
    return buf.getvalue(), recording, meta_sha1


def _site_epoch_rows(
    plan: _SitePlan, stims: _Stims, schedule: _Schedule
) -> list[tuple[str, float, float]]:
    """The whole-experiment epoch table, sorted by (start asc, end desc), ties in insertion order.

    Built in integer ticks (exact), turned into seconds once: the nearest double to each
    5-decimal time, as baphy's ``round(t, 5)`` gives.
    """
    end = schedule.end_ticks
    rows = [(f"FILE_{plan.parmfile}", 0, end), ("PASSIVE_EXPERIMENT", 0, end)]
    for n, (t0, t1) in enumerate(schedule.trials, start=1):
        rows += [("TRIAL", t0, t1), (f"BAPHYTRIAL{n}_FILE1", t0, t1)]
    for stim, t0 in zip(schedule.stim_of_pres.tolist(), schedule.start_ticks.tolist(), strict=True):
        t1 = t0 + _STIM_TICKS
        rows += [
            ("REFERENCE", t0, t1),
            (stims.names[stim], t0, t1),
            ("PreStimSilence", t0, t0 + _PRE_TICKS),
            ("PostStimSilence", t1 - _PRE_TICKS, t1),
        ]
    rows.sort(key=lambda r: (r[1], -r[2]))
    return [(name, t0 / _TICKS_PER_S, t1 / _TICKS_PER_S) for name, t0, t1 in rows]


def _h5_bytes(datasets: dict[str, np.ndarray]) -> bytes:
    """NEMS0 PointProcess HDF5: one gzip'd root dataset per unit, no attrs, no timestamps."""
    import h5py

    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        for name in sorted(datasets):
            f.create_dataset(
                name, data=datasets[name].astype(np.float64), compression="gzip", track_times=False
            )
    return buf.getvalue()


def _pop_epoch_rows(stims: _Stims) -> list[tuple[str, float, float]]:
    """Population epochs: each sound once, 1.5 s apart, in population order."""
    rows = []
    for i, name in enumerate(stims.names):
        start, end = i * N_FRAMES / FS_HZ, (i + 1) * N_FRAMES / FS_HZ
        rows += [
            ("REFERENCE", start, end),
            (name, start, end),
            ("PreStimSilence", start, start + PRE_STIM_S),
            ("PostStimSilence", end - POST_STIM_S, end),
        ]
    return sorted(rows, key=lambda r: (r[1], -r[2]))


def _write_population_tgz(
    path: Path,
    recording: str,
    plan: _AreaPlan,
    stims: _Stims,
    spec: np.ndarray,
    sites: list[_SiteResult],
) -> None:
    """The NEMS0 population recording: resp, stim, mask_est, each CSV + JSON + epochs."""
    n_times = len(stims.names) * N_FRAMES
    column = {cell: i for i, cell in enumerate(plan.cell_ids)}
    placement = [(r, np.array([column[u] for u in r.plan.pop_ids], dtype=np.intp)) for r in sites]

    def resp_blocks() -> Iterator[np.ndarray]:
        for s in range(len(stims.names)):
            block = np.empty((N_FRAMES, len(plan.cell_ids)))
            for result, cols in placement:
                n = result.reps[s]
                block[:, cols] = result.sums[s].T / n if n else np.nan
            yield block

    def stim_blocks() -> Iterator[np.ndarray]:
        for s in range(len(stims.names)):
            yield spec[s].T

    def mask_blocks() -> Iterator[np.ndarray]:
        yield (np.arange(n_times) >= stims.n_val * N_FRAMES).astype(np.float64)[:, None]

    meta = {
        "batch": _BATCH[plan.area],
        "loadkey": "ozgf.fs100.ch18.pop",
        "siteid": f"NAT4_{plan.area}",
        "rasterfs": FS_HZ,
        "stimfmt": "ozgf",
        "chancount": N_BANDS,
        "runclass": "NAT",
        "recording": recording,
    }
    epochs = _epoch_csv_bytes(_pop_epoch_rows(stims), ("name", "start", "end"))
    signals = [
        ("resp", list(plan.cell_ids), {"batch": _BATCH[plan.area]}, resp_blocks),
        ("stim", None, None, stim_blocks),
        ("mask_est", None, None, mask_blocks),
    ]
    prefix = f"{recording}/{recording}"
    with _atomic_path(path) as tmp, open(tmp, "wb") as raw, _gzip_tar(raw) as tar:
        _tar_bytes(tar, f"{prefix}.meta.json", json.dumps(meta).encode())
        for name, chans, signal_meta, blocks in signals:
            size = sum(csv_18e_size(b) for b in blocks())
            _tar_stream(tar, f"{prefix}.{name}.csv", size, (format_csv_18e(b) for b in blocks()))
            sidecar = _signal_json(
                name, chans, FS_HZ, signal_meta, recording, n_times, "RasterizedSignal"
            )
            _tar_bytes(tar, f"{prefix}.{name}.json", sidecar)
            _tar_bytes(tar, f"{prefix}.{name}.epoch.csv", epochs)


def _signal_json(
    name: str,
    chans: list[str] | None,
    fs_hz: int,
    meta: dict[str, Any] | None,
    recording: str,
    n_times: int,
    kind: str,
) -> bytes:
    """The sidecar keys of SignalBase._get_attributes, in its order, via plain json.dump."""
    attributes = {
        "name": name,
        "chans": chans,
        "fs": fs_hz,
        "meta": meta,
        "recording": recording,
        "segments": [[0, n_times]],
        "signal_type": f"<class 'nems0.signal.{kind}'>",
        "normalization": "none",
        "norm_baseline": [[0]],
        "norm_gain": [[1]],
    }
    return json.dumps(attributes).encode()


def _write_pred_correlation(path: Path, plan: _AreaPlan, seed: int) -> tuple[str, ...]:
    """One row per population unit, shuffled; bools and floats as pandas.to_csv writes them."""
    rng = _rng(seed, plan.area, "pred_correlation")
    columns = ("cellid", "siteid", "area", "r_test", "r_floor", "r_ceiling", "sig_auditory")
    rows = []
    for cell in plan.cell_ids:
        auditory = cell in plan.auditory
        r_floor = float(rng.uniform(0.02, 0.12))
        r_test = float(rng.beta(4, 5) if auditory else rng.uniform(-0.05, r_floor))
        r_ceiling = float(min(0.99, r_test + rng.uniform(0.05, 0.3)))
        rows.append([cell, cell.split("-")[0], plan.area, r_test, r_floor, r_ceiling, auditory])
    order = rng.permutation(len(rows))
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for i in order:
        writer.writerow([repr(v) if isinstance(v, float) else str(v) for v in rows[i]])
    _atomic_write(path, out.getvalue().encode())
    return columns


# --------------------------------------------------------------------------------------------
# wav.zip, record.json
# --------------------------------------------------------------------------------------------


def _write_wav_zip(path: Path, stims: _Stims, spec: np.ndarray, seed: int) -> dict[str, str]:
    """``wav/<sound>.wav``: 1 s of noise shaped by the sound's spectrogram, 16-bit mono."""
    import soundfile

    members = {}
    with _atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        _zip_dir(zf, "wav/")
        for i in sorted(range(len(stims.names)), key=lambda k: stims.wav_names[k]):
            member = f"wav/{stims.wav_names[i]}"
            samples = _waveform(spec[i], _rng(seed, "wav", stims.names[i]))
            buf = io.BytesIO()
            soundfile.write(buf, samples, WAV_FS_HZ, subtype="PCM_16", format="WAV")
            _zip_bytes(zf, member, buf.getvalue())
            members[stims.names[i]] = member
    return dict(sorted(members.items()))


def _waveform(spec: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noise with a per-sound spectral tilt, amplitude-modulated by the spectrogram envelope."""
    n = round(SOUND_S * WAV_FS_HZ)
    pre = round(PRE_STIM_S * FS_HZ)
    freqs_hz = np.fft.rfftfreq(n, 1.0 / WAV_FS_HZ)
    shape = np.exp(-(np.log(np.maximum(freqs_hz, 100.0) / 2000.0) ** 2) / 4.0)
    noise = np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * shape, n)
    envelope = spec[:, pre : pre + round(SOUND_S * FS_HZ)].mean(axis=0)
    t_frames = (np.arange(len(envelope)) + 0.5) / FS_HZ
    amplitude = np.interp(np.arange(n) / WAV_FS_HZ, t_frames, envelope)
    wave = noise * amplitude
    return 0.5 * wave / np.abs(wave).max()


_RECORD_FILES = ZENODO_FILES


def _write_record_json(out_dir: Path, label: str, seed: int, quirks: bool) -> dict[str, FileInfo]:
    """record.json in the Zenodo API shape, listing the seven files with real sizes and md5s."""
    files = {name: _file_info(out_dir / name) for name in _RECORD_FILES}
    api = f"https://zenodo.org/api/records/{RECORD_ID}"
    record = {
        "id": RECORD_ID,
        "doi": f"10.5281/zenodo.{RECORD_ID}",
        "created": "2023-04-04T17:21:09.123456+00:00",
        "metadata": {
            "title": RECORD_TITLE,
            "version": RECORD_VERSION,
            "publication_date": "2023-04-04",
            "doi": f"10.5281/zenodo.{RECORD_ID}",
            "resource_type": {"type": "dataset"},
            "license": {"id": "cc-by-4.0"},
            "creators": [{"name": "David, Stephen V."}, {"name": "Pennington, Jacob R."}],
            "notes": f"SYNTHETIC mirror written by nat4etl.sample "
            f"(scale={label}, quirks={quirks}, seed={seed}); not real data.",
        },
        "files": [
            {
                "key": name,
                "size": info.size,
                "checksum": f"md5:{info.md5}",
                "links": {"self": f"{api}/files/{name}/content"},
            }
            for name, info in files.items()
        ],
        "links": {"self": api},
    }
    _atomic_write(out_dir / "record.json", json.dumps(record, indent=2).encode())
    return files


def _file_info(path: Path) -> FileInfo:
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            md5.update(chunk)
    return FileInfo(size=path.stat().st_size, md5=md5.hexdigest())


def _merge_quirks(
    parts: list[QuirkInfo], stims: _Stims, wav_members: dict[str, str], quirks: bool
) -> QuirkInfo:
    if not quirks:
        return QuirkInfo()
    case = {
        name: wav_members[name]
        for name, wav in zip(stims.names, stims.wav_names, strict=True)
        if wav != name[5:]
    }
    stray: dict[str, tuple[str, ...]] = {}
    for p in parts:
        stray.update(p.stray_members)
    return QuirkInfo(
        padded_electrode_sites=tuple(s for p in parts for s in p.padded_electrode_sites),
        extra_sites=tuple(s for p in parts for s in p.extra_sites),
        short_val=tuple(s for p in parts for s in p.short_val),
        wav_case_mismatch=case,
        stray_members=stray,
        units_without_site_data=tuple(u for p in parts for u in p.units_without_site_data),
        start_end_name_sites=tuple(s for p in parts for s in p.start_end_name_sites),
    )


# --------------------------------------------------------------------------------------------
# Byte-level helpers: %.18e CSV, epoch CSV, tar, zip, atomic files
# --------------------------------------------------------------------------------------------


def format_csv_18e(data_tc: np.ndarray) -> bytes:
    """Bytes identical to ``np.savetxt(f, data_tc, delimiter=',', fmt='%.18e')``.

    ``data_tc`` is time x channel (NEMS0 writes ``data.T``). Fast because response data hold few
    distinct values: each distinct bit pattern is formatted once into a table of byte tokens
    (value + ',' or value + newline), which is then gathered in C order.
    """
    data = np.ascontiguousarray(data_tc, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    if data.size == 0:
        return b""
    bits, codes = _distinct(data.view(np.int64).ravel())
    tokens = [b"%.18e" % v for v in bits.view(np.float64).tolist()]
    token_lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
    width = int(token_lengths.max()) + 1
    rows = np.repeat(np.arange(len(tokens)), token_lengths)
    starts = np.cumsum(token_lengths) - token_lengths
    cols = np.arange(len(rows)) - np.repeat(starts, token_lengths)
    half = np.zeros((len(tokens), width), dtype=np.uint8)
    half[rows, cols] = np.frombuffer(b"".join(tokens), dtype=np.uint8)
    table = np.concatenate([half, half])
    table[np.arange(len(tokens)), token_lengths] = ord(",")
    table[np.arange(len(tokens)) + len(tokens), token_lengths] = ord("\n")
    lengths = np.concatenate([token_lengths, token_lengths]) + 1
    codes = codes.reshape(data.shape)
    codes[:, -1] += len(tokens)  # the last column ends its line
    flat = codes.ravel()
    gathered = np.take(table, flat, axis=0)
    if np.all(lengths == width):
        return gathered.tobytes()
    keep = np.arange(width)[None, :] < lengths[:, None]
    return gathered[np.take(keep, flat, axis=0)].tobytes()


def _distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(keys, return_inverse=True)`` by a stable argsort: ~10x faster here."""
    order = np.argsort(keys, kind="stable")
    ordered = keys[order]
    first = np.concatenate([[True], ordered[1:] != ordered[:-1]])
    inverse = np.empty(len(keys), dtype=np.int64)
    inverse[order] = np.cumsum(first) - 1
    return ordered[first], inverse


def csv_18e_size(data_tc: np.ndarray) -> int:
    """``len(format_csv_18e(data_tc))`` without formatting: lets the tar header come first.

    '%.18e' is 24 characters for a finite value with a 2-digit exponent, one more for a minus
    sign or a 3-digit exponent; 'nan' and 'inf' are 3. Values near 1e+-100 are formatted to
    be sure of their exponent width.
    """
    data = np.asarray(data_tc, dtype=np.float64)
    if data.ndim == 1:
        data = data[:, None]
    finite = np.isfinite(data)
    absolute = np.abs(np.where(finite, data, 1.0))
    lengths = np.where(finite, 24, 3) + (np.signbit(data) & ~np.isnan(data))
    lengths += finite & (absolute != 0) & ((absolute >= 1e100) | (absolute < 1e-99))
    decades = np.abs(np.log10(np.where(absolute > 0, absolute, 1.0)))
    near = finite & (absolute > 0) & (np.abs(decades - 100) < 0.01)
    for index in zip(*np.nonzero(near), strict=True):
        lengths[index] = len(b"%.18e" % float(data[index]))
    return int(lengths.sum()) + data.size  # one ',' or '\n' after every value


def _epoch_csv_bytes(rows: Iterable[tuple[str, float, float]], columns: Sequence[str]) -> bytes:
    """``DataFrame.to_csv(index=False)``: header, minimal quoting, shortest-repr floats, '\\n'."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for name, start, end in rows:
        value = {"name": name, "start": repr(float(start)), "end": repr(float(end))}
        writer.writerow([value[c] for c in columns])
    return out.getvalue().encode()


class _ChunkReader:
    """A read(n)-only file over byte chunks: tarfile.addfile needs exactly n bytes per read."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._current = memoryview(b"")
        self.n_read = 0

    def read(self, n: int) -> bytes:
        parts, need = [], n
        while need > 0:
            if not self._current:
                chunk = next(self._chunks, None)
                if chunk is None:
                    break
                self._current = memoryview(chunk)
            part = self._current[:need]
            self._current = self._current[need:]
            parts.append(part)
            need -= len(part)
        data = b"".join(parts)
        self.n_read += len(data)
        return data

    def at_end(self) -> bool:
        return not self._current and next(self._chunks, None) is None


@contextlib.contextmanager
def _gzip_tar(raw: io.IOBase) -> Iterator[tarfile.TarFile]:
    """``tarfile`` "w" inside a GzipFile with mtime 0 and no file name: reproducible bytes.

    Same stream as NEMS0's ``mode='w:gz'`` (level 9) minus the wall-clock gzip header.
    """
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=_GZIP_LEVEL, mtime=0)
    with gz, tarfile.open(fileobj=gz, mode="w", copybufsize=1 << 20) as tar:
        yield tar


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.uname, info.gname = "nems", "users"
    return info


def _tar_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))


def _tar_stream(tar: tarfile.TarFile, name: str, size: int, chunks: Iterable[bytes]) -> None:
    """Add a member of known size whose bytes are produced lazily (GBs never sit in memory).

    The chunks are produced in a helper thread while this one compresses: zlib releases the
    GIL, so formatting and deflate overlap (the A1 resp CSV is ~1.9 GB of text).
    """
    reader = _ChunkReader(_in_background(chunks))
    tar.addfile(_tar_info(name, size), reader)
    if reader.n_read != size or not reader.at_end():
        msg = f"{name}: produced a different number of bytes than the {size} announced"
        raise RuntimeError(msg)


def _in_background(chunks: Iterable[bytes], depth: int = 8) -> Iterator[bytes]:
    """Iterate ``chunks`` in a helper thread, at most ``depth`` ahead; re-raise its errors.

    If the consumer stops early, the producer is told to stop and is drained, never left
    blocked on a full queue.
    """
    done = object()
    box: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    failure: list[BaseException] = []

    def produce() -> None:
        try:
            for chunk in chunks:
                if stop.is_set():
                    return
                box.put(chunk)
        except BaseException as err:  # handed to the consumer below
            failure.append(err)
        finally:
            box.put(done)

    thread = threading.Thread(target=produce, name="nat4etl-sample-producer", daemon=True)
    thread.start()
    try:
        while (chunk := box.get()) is not done:
            yield chunk
    finally:
        stop.set()
        while thread.is_alive():
            try:
                box.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()
    if failure:
        raise failure[0]


def _zip_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_DATE_TIME)
    info.create_system = 3
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    return info


def _zip_bytes(zf: zipfile.ZipFile, name: str, data: bytes) -> None:
    zf.writestr(_zip_info(name), data)


def _zip_dir(zf: zipfile.ZipFile, name: str) -> None:
    info = _zip_info(name)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = (0o40755 << 16) | 0x10
    zf.writestr(info, b"")


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield ``<path>.part``; on success move it over ``path``, on failure delete it.

    A crash never leaves a truncated file under a real name.
    """
    tmp = path.with_name(path.name + ".part")
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _atomic_write(path: Path, data: bytes) -> None:
    with _atomic_path(path) as tmp:
        tmp.write_bytes(data)

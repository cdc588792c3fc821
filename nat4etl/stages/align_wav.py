"""`align-wav`: each sound's source waveform, placed in its trial window on the bin grid.

A NAT4 presentation is PreStimSilence + the 1 s sound + PostStimSilence; ``wav.zip`` holds
only the sound. Each waveform is downmixed to mono, resampled with soxr when its rate is
not ``audio_fs_hz``, placed at the PreStimSilence offset and cropped or zero-padded to
exactly ``n_bins * hop`` samples, ``hop = audio_fs_hz * dt_ms / 1000`` (an integer, so
spectrogram frame ``t`` covers samples ``[t * hop, (t + 1) * hop)``).

Wav files are matched to epoch names case-insensitively: a few NAT4 names differ from
their file only in letter case. Each case-only match is logged; a sound with no wav at all
fails the stage, listing every missing name at once.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from nat4etl import nat4
from nat4etl.config import check_audio_bins
from nat4etl.errors import ConfigError, InputMismatch, MissingMember
from nat4etl.stages import rebin_sites as rs
from nat4etl.stages.background import WriteBehind


# ============================================================================ grid
@dataclass(frozen=True)
class AudioGrid:
    """Samples per bin and per presentation at ``audio_fs_hz``."""

    audio_fs_hz: int
    dt_ms: float
    hop: int
    n_bins: int

    @property
    def n_samples(self) -> int:
        return self.n_bins * self.hop


def audio_grid(stims: pa.Table, *, dt_ms: float, audio_fs_hz: int) -> AudioGrid:
    """Check that a bin is a whole number of audio samples and the trial whole bins."""
    hop = check_audio_bins(audio_fs_hz, dt_ms)
    durations_s = np.unique(stims.column("duration_s").to_numpy())
    n_bins_exact = durations_s * 1000.0 / dt_ms
    n_bins = np.round(n_bins_exact)
    if len(stims) == 0 or np.any(np.abs(n_bins_exact - n_bins) > 1e-6) or len(set(n_bins)) != 1:
        raise ConfigError(
            f"dt_ms={dt_ms:g} does not divide the presentations "
            f"({sorted(set(durations_s.tolist()))} s) into whole bins"
        )
    return AudioGrid(audio_fs_hz, dt_ms, hop, int(n_bins[0]))


# ============================================================================ matching
@dataclass(frozen=True)
class WavMatch:
    """Which wav.zip member each stim uses; case-only matches and misses listed."""

    member_of: dict[int, str]  # stim id -> member name
    case_only: list[tuple[str, str]]  # (epoch name, member)
    missing: list[str]  # epoch names


def match_wavs(stims: pa.Table, members: list[str]) -> WavMatch:
    """Exact file name first, then the same name ignoring case (unique), per stim. A
    backslash separates folders too, as in zips made by some Windows tools."""
    exact = {
        PurePosixPath(m.replace("\\", "/")).name: m for m in members if m.lower().endswith(".wav")
    }
    folded: dict[str, list[str]] = {}
    for name, member in exact.items():
        folded.setdefault(name.lower(), []).append(member)
    member_of, case_only, missing = {}, [], []
    for stim, name, wav in zip(
        stims.column("stim").to_pylist(),
        stims.column("name").to_pylist(),
        stims.column("wav_name").to_pylist(),
        strict=True,
    ):
        wav = wav or nat4.wav_name(name)
        if wav in exact:
            member_of[stim] = exact[wav]
            continue
        candidates = folded.get(wav.lower(), [])
        if len(candidates) == 1:
            member_of[stim] = candidates[0]
            case_only.append((name, candidates[0]))
        else:
            missing.append(name if not candidates else f"{name} (ambiguous: {candidates})")
    return WavMatch(member_of, case_only, missing)


# ============================================================================ audio
class Decoded(NamedTuple):
    """What decoding a wav member told: its rate, and frames its header promised but the
    file lacked (a cut file: placed as what is there, zero-padded like a short sound)."""

    fs_hz: int
    missing_frames: int = 0
    #: frames the file holds: 0 places nothing (a waveform of zeros), which is said
    n_frames: int = -1


def decode_wav(data: bytes, *, name: str = "", path: Path | None = None):
    """Wav bytes -> a :class:`nat4etl.formats.wav.Wav` of float32 (frames, channels) in
    [-1, 1]."""
    from nat4etl.formats.wav import read_wav

    return read_wav(data, path=path, member=name, always_2d=True)


def place(samples: np.ndarray, fs_hz: int, *, prestim_s: float, grid: AudioGrid) -> np.ndarray:
    """Mono, at ``grid.audio_fs_hz``, starting at ``prestim_s``, exactly ``grid.n_samples``."""
    mono = samples.mean(axis=1, dtype=np.float32) if samples.ndim == 2 else samples
    mono = np.asarray(mono, dtype=np.float32)
    if fs_hz != grid.audio_fs_hz:
        import soxr

        mono = soxr.resample(mono, fs_hz, grid.audio_fs_hz).astype(np.float32, copy=False)
    out = np.zeros(grid.n_samples, dtype=np.float32)
    start = min(max(round(prestim_s * grid.audio_fs_hz), 0), grid.n_samples)
    seg = mono[: grid.n_samples - start]
    out[start : start + len(seg)] = seg
    return out


class Recipe(NamedTuple):
    """Everything an area's waveforms table is made from: the grid, then per row (in stims
    table order) the stim id, its wav member and its PreStimSilence. Equal recipes give
    byte-identical tables (A1 and PEG play the same sounds)."""

    grid: AudioGrid
    rows: tuple[tuple[int, str, float], ...]


def table_recipe(stims: pa.Table, match: WavMatch, grid: AudioGrid) -> Recipe:
    prestim = dict(
        zip(stims.column("stim").to_pylist(), stims.column("prestim_s").to_pylist(), strict=True)
    )
    ids = [s for s in stims.column("stim").to_pylist() if s in match.member_of]
    return Recipe(grid, tuple((s, match.member_of[s], prestim[s]) for s in ids))


def waveforms(recipe: Recipe, path: Path, progress) -> tuple[pa.Table, dict[str, Decoded]]:
    """The waveforms table, one row per stim of ``recipe``, and what decoding each wav
    member of ``path`` it used told (:class:`Decoded`); each member is decoded once and
    placed straight into its rows. A cut wav, or one without audio, is a warning.

    The main thread inflates members in archive order while two workers decode and place
    them (libsndfile, soxr and numpy's copies release the GIL): align-wav alone went from
    2.2 to 1.8 s on the full-scale sample (median of 4), and no dict of decoded sounds is
    held (peak 628 -> 528 MiB).
    """
    from nat4etl.formats.archive import iter_members

    grid = recipe.grid
    rows_of: dict[str, list[tuple[int, float]]] = {}
    for i, (_, member, prestim_s) in enumerate(recipe.rows):
        rows_of.setdefault(member, []).append((i, prestim_s))
    samples = np.empty((len(recipe.rows), grid.n_samples), dtype=np.float32)
    decoded: dict[str, Decoded] = {}

    def decode_and_place(name: str, data: bytes) -> None:
        wav = decode_wav(data, name=name, path=path)
        fs_hz = int(wav.sample_rate_hz)
        n_frames = len(wav.samples)
        decoded[name] = Decoded(fs_hz, wav.missing_frames, n_frames)
        if n_frames == 0:
            progress.log(
                f"{path.name}:{name}: no audio (0 frames); its waveform is all zeros",
                level="warning",
            )
        elif wav.missing_frames:
            progress.log(
                f"{path.name}:{name}: the file ends {wav.missing_frames} frames before its "
                "header says; placed as it is, zero-padded",
                level="warning",
            )
        for i, prestim_s in rows_of[name]:
            samples[i] = place(wav.samples, fs_hz, prestim_s=prestim_s, grid=grid)
        progress.advance("align-wav", 1)

    progress.start("align-wav", total=len(rows_of), unit="wavs")
    try:
        with ThreadPoolExecutor(2, thread_name_prefix="nat4etl-wav") as pool:
            pending: collections.deque[Future] = collections.deque()
            for member in iter_members(path):
                if member.name in rows_of:
                    pending.append(pool.submit(decode_and_place, member.name, member.read()))
                while len(pending) > 4 or (pending and pending[0].done()):
                    pending.popleft().result()  # the first failure stops the stage
            for placed in pending:
                placed.result()
    finally:
        progress.done("align-wav")
    ids = np.asarray([stim for stim, _, _ in recipe.rows], dtype=np.int32)
    return rs.vectors_table({"stim": ids}, "samples", samples), decoded


# ============================================================================ stage
def wav_zip_path(store, settings) -> Path:
    """wav.zip in the ``--source`` mirror when the stage is given one, else as fetched
    into the store's raw dir: the one the stage's fingerprint covers and parse-epochs
    lists (:func:`nat4etl.fingerprint.raw_file`), not one a ``--no-wav`` fetch left in
    raw/."""
    from nat4etl.fingerprint import raw_data_files, raw_file

    path = raw_file(store.root, nat4.WAV_ZIP, settings.source_dir)
    if path is not None:
        return path
    looked = [store.shown_raw_dir]
    if settings.source_dir is not None and not raw_data_files(store.root):
        looked.append(Path(settings.source_dir))
    what = f"{nat4.WAV_ZIP} not found (looked in {', '.join(map(str, looked))})"
    if (store.raw_dir / nat4.WAV_ZIP).is_file():
        what = f"{nat4.WAV_ZIP} in {store.shown_raw_dir} is not one the last fetch got"
    raise MissingMember(
        f"{what}; `nat4etl fetch --wav --out {store.published_at}` gets it (with --source DIR "
        "from a mirror); or, to go without waveforms, build with --no-wav",
        path=store.shown_raw_dir / nat4.WAV_ZIP,
    )


def _metadata(grid: AudioGrid, decoded: dict[str, Decoded], match: WavMatch) -> dict:
    rates = sorted({d.fs_hz for d in decoded.values()})
    return {
        "audio_fs_hz": grid.audio_fs_hz,
        "dt_ms": grid.dt_ms,
        "hop": grid.hop,
        "n_bins": grid.n_bins,
        "n_samples": grid.n_samples,
        "source_fs_hz": rates,
        "resampled": rates != [grid.audio_fs_hz],
        "case_only_matches": [list(x) for x in match.case_only],
        "cut_wavs": {m: d.missing_frames for m, d in sorted(decoded.items()) if d.missing_frames},
        "empty_wavs": [m for m, d in sorted(decoded.items()) if d.n_frames == 0],
    }


def run(store, settings, progress) -> dict:
    from nat4etl.formats.archive import iter_members

    path = wav_zip_path(store, settings)
    names = [m.name for m in iter_members(path) if m.name.lower().endswith(".wav")]
    areas = store.areas_with("stims", settings.areas, made_by="parse-epochs")
    stims = {a: store.read_table("stims", area=a).drop_columns(["area"]) for a in areas}
    grids = {
        a: audio_grid(stims[a], dt_ms=settings.dt_ms, audio_fs_hz=settings.audio_fs_hz)
        for a in areas
    }
    matches = {a: match_wavs(stims[a], names) for a in areas}
    missing = [f"{a}: {name}" for a in areas for name in matches[a].missing]
    if missing:
        raise InputMismatch(
            f"{len(missing)} sounds have no wav in {nat4.WAV_ZIP}: {', '.join(missing)}",
            path=path,
        )
    for a in areas:
        for name, member in matches[a].case_only:
            progress.log(f"{a}: {name} matched {member} ignoring letter case")
    recipes = {a: table_recipe(stims[a], matches[a], grids[a]) for a in areas}
    # The same sounds placed the same way, with the same case-only matches, give the same
    # bytes (metadata too: a wav decodes the same for every area): one file, written for
    # the first area of such a group and linked for the others, lists all their sources.
    groups: dict[tuple, list[str]] = {}
    for a in areas:
        groups.setdefault((recipes[a], tuple(matches[a].case_only)), []).append(a)
    group_of = {a: group for group in groups.values() for a in group}
    summary = {}
    # Each area's table is encoded to Parquet on a second core while the next is placed.
    with WriteBehind(store, max_pending=1) as writer:
        for area in areas:
            match, grid, recipe, group = matches[area], grids[area], recipes[area], group_of[area]
            if area != group[0]:
                writer.link("waveforms", from_area=group[0], area=area)
                progress.log(f"{area}: waveforms identical to {group[0]}'s, files shared")
            else:
                table, decoded = waveforms(recipe, path, progress)
                metadata = _metadata(grid, decoded, match)
                writer.submit("waveforms", table, area=area, metadata=metadata, sources_of=group)
                del table
            summary[area] = {
                "waveforms": len(recipe.rows),
                "case_only_matches": len(match.case_only),
                "hop": grid.hop,
            }
    return summary

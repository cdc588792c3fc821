"""align-wav: wav.zip members matched to stims, downmixed, resampled, placed on the bin grid."""

from __future__ import annotations

import dataclasses
import io
import zipfile

import numpy as np
import pyarrow as pa
import pytest
import soundfile

from nat4etl.config import load_settings
from nat4etl.errors import ConfigError, InputMismatch
from nat4etl.progress import NullProgress
from nat4etl.stages import align_wav as aw
from nat4etl.stages import rebin_sites as rs
from nat4etl.store import Store

NAMES = ["STIM_cat1_Bird.wav", "STIM_cat2.wav", "STIM_00cat3.wav"]


def _stims(names=NAMES):
    n = len(names)
    return pa.table(
        {
            "stim": pa.array(range(n), pa.int32()),
            "name": names,
            "subset": ["val" if "00cat" in x else "est" for x in names],
            "wav_name": [x[len("STIM_") :] for x in names],
            "duration_s": [1.5] * n,
            "prestim_s": [0.25] * n,
            "poststim_s": [0.25] * n,
            "n_frames": pa.array([150] * n, pa.int32()),
            "pop_start_s": [1.5 * i for i in range(n)],
        }
    )


def _wav_bytes(samples, fs_hz):
    buf = io.BytesIO()
    soundfile.write(buf, samples, fs_hz, subtype="FLOAT", format="WAV")
    return buf.getvalue()


def _sounds():
    rng = np.random.default_rng(0)
    mono = (0.5 * rng.uniform(-1, 1, 44_100)).astype(np.float32)
    stereo = (0.5 * rng.uniform(-1, 1, (48_000, 2))).astype(np.float32)
    long = (0.5 * rng.uniform(-1, 1, 44_100 * 2)).astype(np.float32)
    return {
        "wav/cat1_bird.wav": (mono, 44_100),  # case-only match for STIM_cat1_Bird.wav
        "wav/cat2.wav": (stereo, 48_000),
        "wav/00cat3.wav": (long, 44_100),  # longer than the window: cropped
    }


def _zip(path, sounds, cut=None):
    """``cut``: bytes to drop from the end of a member's file (a cut wav)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("wav/", b"")
        for name, (samples, fs) in sounds.items():
            data = _wav_bytes(samples, fs)
            zf.writestr(name, data[: len(data) - (cut or {}).get(name, 0)])


def test_grid_requires_whole_samples_per_bin():
    grid = aw.audio_grid(_stims(), dt_ms=10, audio_fs_hz=44_100)
    assert (grid.hop, grid.n_bins, grid.n_samples) == (441, 150, 66_150)
    with pytest.raises(ConfigError, match="220.5 audio samples per bin") as info:
        aw.audio_grid(_stims(), dt_ms=5, audio_fs_hz=44_100)
    # every way out it offers works (44100 is not a multiple of 200 Hz, as it once said)
    hint = str(info.value).split("Hint: ")[1]
    assert "--audio-fs a multiple of 200 Hz (44000 or 44200)" in hint
    assert "--dt-ms a multiple of 10 ms" in hint and "--no-wav" in hint
    for audio_fs_hz in (44_000, 44_200):
        assert aw.audio_grid(_stims(), dt_ms=5, audio_fs_hz=audio_fs_hz).hop * 200 == audio_fs_hz
    assert aw.audio_grid(_stims(), dt_ms=30, audio_fs_hz=44_100).hop == 1323
    assert aw.audio_grid(_stims(), dt_ms=5, audio_fs_hz=48_000).hop == 240


def test_matching_is_case_insensitive_and_lists_every_miss():
    m = aw.match_wavs(_stims(), ["wav/cat1_bird.wav", "wav/cat2.wav", "wav/00cat3.wav"])
    assert m.member_of == {0: "wav/cat1_bird.wav", 1: "wav/cat2.wav", 2: "wav/00cat3.wav"}
    assert m.case_only == [("STIM_cat1_Bird.wav", "wav/cat1_bird.wav")]
    m = aw.match_wavs(_stims(), ["wav/cat2.wav"])
    assert m.missing == ["STIM_cat1_Bird.wav", "STIM_00cat3.wav"]


def test_matching_takes_backslash_folders_of_windows_zips():
    """PowerShell's Compress-Archive (Windows PowerShell 5) writes ``wav\\x.wav``."""
    names = ["wav\\cat1_Bird.wav", "wav\\cat2.wav", "wav\\00cat3.wav", "__MACOSX\\wav\\._cat2.wav"]
    m = aw.match_wavs(_stims(), names)
    assert m.member_of == {0: names[0], 1: names[1], 2: names[2]} and not m.missing


def test_placement_downmix_resample_crop():
    grid = aw.audio_grid(_stims(), dt_ms=10, audio_fs_hz=44_100)
    sounds = _sounds()
    mono, _ = sounds["wav/cat1_bird.wav"]
    out = aw.place(mono[:, None], 44_100, prestim_s=0.25, grid=grid)
    assert out.dtype == np.float32 and out.shape == (66_150,)
    np.testing.assert_array_equal(out[:11_025], 0)
    np.testing.assert_array_equal(out[11_025 : 11_025 + 44_100], mono)
    np.testing.assert_array_equal(out[11_025 + 44_100 :], 0)

    stereo, fs = sounds["wav/cat2.wav"]
    out = aw.place(stereo, fs, prestim_s=0.25, grid=grid)
    import soxr

    want = soxr.resample(stereo.mean(axis=1), 48_000, 44_100)
    np.testing.assert_allclose(out[11_025 : 11_025 + len(want)], want, atol=1e-6)

    long, _ = sounds["wav/00cat3.wav"]
    out = aw.place(long[:, None], 44_100, prestim_s=0.25, grid=grid)
    np.testing.assert_array_equal(out[11_025:], long[: 66_150 - 11_025])


def _run(tmp_path, sounds, stims_by_area=None, cut=None):
    store = Store(tmp_path / "store")
    store.raw_dir.mkdir(parents=True)
    _zip(store.raw_dir / "wav.zip", sounds, cut)
    stims_by_area = stims_by_area or {"A1": _stims()}
    for area, stims in stims_by_area.items():
        store.write_table("stims", stims, area=area)
    settings = dataclasses.replace(
        load_settings(), areas=tuple(stims_by_area), dt_ms=10.0, audio_fs_hz=44_100
    )
    logs = []

    class Progress(NullProgress):
        def log(self, msg, **_):
            logs.append(msg)

    summary = aw.run(store, settings, Progress())
    return store, summary, logs


def test_stage_writes_waveforms_and_logs_case_matches(tmp_path):
    store, summary, logs = _run(tmp_path, _sounds())
    assert summary["A1"]["waveforms"] == 3 and summary["A1"]["case_only_matches"] == 1
    assert any("STIM_cat1_Bird.wav" in line and "letter case" in line for line in logs)
    table = store.read_table("waveforms", area="A1")
    values = rs.vector_view(table, "samples")
    assert values.shape == (3, 66_150)
    md = store.table_metadata("waveforms", "A1")
    assert md["hop"] == 441 and md["audio_fs_hz"] == 44_100 and md["resampled"]


def test_stage_missing_wavs_is_an_input_mismatch(tmp_path):
    sounds = _sounds()
    del sounds["wav/cat2.wav"], sounds["wav/00cat3.wav"]
    with pytest.raises(InputMismatch, match="2 sounds.*A1: STIM_cat2.wav, A1: STIM_00cat3.wav"):
        _run(tmp_path, sounds)


def test_areas_playing_the_same_sounds_share_the_files(tmp_path):
    """PEG's recipe equals A1's: its files are A1's (one encoding), read back the same."""
    store, summary, logs = _run(tmp_path, _sounds(), {"A1": _stims(), "PEG": _stims()})
    assert summary["PEG"] == summary["A1"]
    assert any("PEG: waveforms identical to A1's" in line for line in logs)
    for file in (store.table_file, store.sidecar_file):
        assert file("waveforms", "PEG").stat().st_ino == file("waveforms", "A1").stat().st_ino
        rel = str(file("waveforms", "PEG").relative_to(store.root))
        assert store.written[rel] == store.written[rel.replace("PEG", "A1")]
    a1, peg = (store.read_table("waveforms", area=a).drop_columns(["area"]) for a in ("A1", "PEG"))
    assert peg.equals(a1)
    assert store.table_metadata("waveforms", "PEG") == store.table_metadata("waveforms", "A1")


def test_areas_with_other_onsets_get_their_own_tables(tmp_path):
    later = _stims().set_column(5, "prestim_s", pa.array([0.5] * len(NAMES)))
    store, _, _ = _run(tmp_path, _sounds(), {"A1": _stims(), "PEG": later})
    a1, peg = (store.table_file("waveforms", a).stat().st_ino for a in ("A1", "PEG"))
    assert a1 != peg
    first, second = (
        rs.vector_view(store.read_table("waveforms", area=a), "samples") for a in ("A1", "PEG")
    )
    # same sound, placed 0.25 s (11 025 samples) later in PEG's window
    np.testing.assert_array_equal(second[0, 22_050:], first[0, 11_025:-11_025])


def test_a_bad_wav_fails_the_stage_naming_zip_and_member(tmp_path):
    """Decoding runs on worker threads; the error still reaches the caller, whole."""
    from nat4etl.errors import FormatError

    sounds = _sounds()
    path = tmp_path / "wav.zip"
    with pytest.raises(FormatError) as info:
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("wav/cat1_bird.wav", _wav_bytes(*sounds["wav/cat1_bird.wav"]))
            zf.writestr("wav/cat2.wav", b"RIFF\x00\x00\x00\x00WAVEnot a wav at all")
            zf.writestr("wav/00cat3.wav", _wav_bytes(*sounds["wav/00cat3.wav"]))
        recipe = aw.table_recipe(
            _stims(),
            aw.match_wavs(
                _stims(), [f"wav/{n}" for n in ("cat1_bird.wav", "cat2.wav", "00cat3.wav")]
            ),
            aw.audio_grid(_stims(), dt_ms=10, audio_fs_hz=44_100),
        )
        aw.waveforms(recipe, path, NullProgress())
    message = str(info.value)
    assert "wav.zip" in message and "wav/cat2.wav" in message and "\n" not in message


def test_a_cut_wav_is_placed_as_it_is_with_a_warning_and_listed(tmp_path):
    """A wav whose file ends before its header says: libsndfile reads what is there; the
    stage places that (zero-padded, as a short sound), warns, and lists it."""
    sounds = _sounds()
    store, _, logs = _run(tmp_path, sounds, cut={"wav/cat1_bird.wav": 4 * 1000})  # float32
    warned = [line for line in logs if "wav/cat1_bird.wav" in line and "1000 frames" in line]
    assert len(warned) == 1
    md = store.table_metadata("waveforms", "A1")
    assert md["cut_wavs"] == {"wav/cat1_bird.wav": 1000}
    values = rs.vector_view(store.read_table("waveforms", area="A1"), "samples")
    start = round(0.25 * 44_100)
    mono = sounds["wav/cat1_bird.wav"][0]
    np.testing.assert_array_equal(values[0, start : start + 44_100 - 1000], mono[:-1000])
    assert not values[0, start + 44_100 - 1000 :].any()


def test_a_wav_without_audio_is_a_warning_and_listed(tmp_path):
    """A wav of 0 frames places nothing: its waveform is all zeros, which is said and
    listed (before: silently, like a short sound)."""
    sounds = _sounds()
    sounds["wav/cat2.wav"] = (np.zeros((0, 2), np.float32), 48_000)
    store, _, logs = _run(tmp_path, sounds)
    warned = [line for line in logs if "wav/cat2.wav" in line and "0 frames" in line]
    assert len(warned) == 1 and "all zeros" in warned[0]
    md = store.table_metadata("waveforms", "A1")
    assert md["empty_wavs"] == ["wav/cat2.wav"] and md["cut_wavs"] == {}
    values = rs.vector_view(store.read_table("waveforms", area="A1"), "samples")
    assert not values[1].any() and values[0].any() and values[2].any()

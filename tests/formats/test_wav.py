"""wav bytes -> float32 samples and sample rate."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from nat4etl.errors import FormatError
from nat4etl.formats.wav import missing_frames, read_wav


def wav_bytes(samples: np.ndarray, rate: int, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_mono_44k():
    t = np.arange(44100) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    wav = read_wav(wav_bytes(tone, 44100, "FLOAT"))
    assert wav.sample_rate_hz == 44100 and wav.samples.dtype == np.float32
    assert wav.samples.shape == (44100,) and wav.n_channels == 1 and wav.duration_s == 1.0
    np.testing.assert_array_equal(wav.samples, tone)
    assert read_wav(wav_bytes(tone, 44100), always_2d=True).samples.shape == (44100, 1)


def test_stereo_pcm16_scaled_to_unit_range():
    samples = np.array([[0.5, -0.5], [1.0 - 2**-15, -1.0]])
    wav = read_wav(io.BytesIO(wav_bytes(samples, 8000)))
    assert wav.samples.shape == (2, 2) and wav.n_channels == 2
    np.testing.assert_allclose(wav.samples, samples, atol=2**-15)


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00\x00\x00WAVEjunk", b"not a sound file at all"])
def test_garbage(data):
    with pytest.raises(FormatError) as info:
        read_wav(data, path="/d/wav.zip", member="wav/cat.wav")
    assert str(info.value).startswith("wav.zip:wav/cat.wav: not a readable sound file")
    assert " object at 0x" not in str(info.value)  # libsndfile's reason, not the buffer's id


@pytest.mark.parametrize("channels", [1, 2])
def test_a_cut_wav_reads_what_is_there_and_says_how_much_is_missing(channels):
    tone = np.linspace(-0.5, 0.5, 1000 * channels, dtype=np.float32).reshape(1000, channels)
    whole = wav_bytes(tone, 8000)
    assert read_wav(whole).missing_frames == 0
    cut = whole[: len(whole) - 2 * channels * 300]  # 300 frames of 16-bit samples gone
    wav = read_wav(cut, always_2d=True)
    assert wav.missing_frames == 300
    assert wav.samples.shape == (700, channels)
    np.testing.assert_allclose(wav.samples, tone[:700], atol=2**-15)


def test_missing_frames_skips_other_chunks_and_open_sizes():
    tone = np.zeros(100, np.float32)
    whole = wav_bytes(tone, 8000)
    data_at = whole.index(b"data")
    # a LIST chunk of odd length (padded) before the data chunk
    extra = b"LIST" + (3).to_bytes(4, "little") + b"abc\x00"
    riff = whole[:data_at] + extra + whole[data_at:]
    riff = riff[:4] + (len(riff) - 8).to_bytes(4, "little") + riff[8:]
    assert missing_frames(riff[:-20]) == 10  # 16-bit mono: 2 bytes a frame
    open_size = whole[: data_at + 4] + b"\xff\xff\xff\xff" + whole[data_at + 8 : -20]
    assert missing_frames(open_size) == 0
    assert missing_frames(b"fLaC....") == 0

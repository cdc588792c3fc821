"""wav bytes -> float32 samples and sample rate."""

from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile

from nat4etl.errors import FormatError
from nat4etl.formats.wav import read_wav


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

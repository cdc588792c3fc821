"""WAV bytes -> float32 samples and the sample rate (via soundfile / libsndfile)."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np

from nat4etl.errors import FormatError

__all__ = ["Wav", "read_wav"]


@dataclass(frozen=True)
class Wav:
    """Samples in [-1, 1] float32: shape (n,) for mono, (n, channels) otherwise."""

    samples: np.ndarray
    sample_rate_hz: int

    @property
    def n_channels(self) -> int:
        return 1 if self.samples.ndim == 1 else self.samples.shape[1]

    @property
    def duration_s(self) -> float:
        return self.samples.shape[0] / self.sample_rate_hz


def read_wav(
    source: bytes | BinaryIO | str | os.PathLike,
    *,
    path: str | os.PathLike | None = None,
    member: str | None = None,
    always_2d: bool = False,
) -> Wav:
    """Decode a WAV (or any libsndfile format) file.

    Parameters
    ----------
    source
        The file bytes, a binary file object or a path.
    path, member
        Named in errors (``wav.zip`` and ``wav/<sound>.wav``).
    always_2d
        Return (n, 1) for mono instead of (n,).

    Raises
    ------
    FormatError
        Not a decodable sound file, or a zero sample rate.
    """
    import soundfile

    if isinstance(source, bytes | bytearray | memoryview):
        source = io.BytesIO(source)
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=always_2d)
    except Exception as err:  # LibsndfileError, TypeError, RuntimeError for bad bytes
        msg = f"not a readable sound file ({type(err).__name__}: {err})"
        raise FormatError(msg, path=path, member=member) from err
    if rate <= 0:
        raise FormatError(f"sample rate {rate} Hz", path=path, member=member)
    return Wav(samples=np.ascontiguousarray(samples), sample_rate_hz=int(rate))

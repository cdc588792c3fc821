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
    #: frames the WAV header's data chunk declares but the file does not hold (a cut file:
    #: libsndfile reads what is there)
    missing_frames: int = 0

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

    missing = 0
    if isinstance(source, bytes | bytearray | memoryview):
        missing = missing_frames(source)
        source = io.BytesIO(source)
    try:
        samples, rate = soundfile.read(source, dtype="float32", always_2d=always_2d)
    except Exception as err:  # LibsndfileError, TypeError, RuntimeError for bad bytes
        # libsndfile's own words: str(err) names the buffer ("<_io.BytesIO object at
        # 0x7f...>"), an address that differs every run and tells nothing
        why = getattr(err, "error_string", None) or err
        msg = f"not a readable sound file ({type(err).__name__}: {why})"
        raise FormatError(msg, path=path, member=member) from err
    if rate <= 0:
        raise FormatError(f"sample rate {rate} Hz", path=path, member=member)
    return Wav(np.ascontiguousarray(samples), int(rate), missing)


def missing_frames(data: bytes | bytearray | memoryview) -> int:
    """Frames a RIFF/WAVE file's ``data`` chunk declares beyond the bytes it holds; 0 for
    a whole file, another format, or a size left open (0 or 0xFFFFFFFF: a stream)."""
    view = memoryview(data).cast("B")
    if len(view) < 12 or view[:4] != b"RIFF" or view[8:12] != b"WAVE":
        return 0
    block_align, at = 0, 12
    while at + 8 <= len(view):
        chunk, size = bytes(view[at : at + 4]), int.from_bytes(view[at + 4 : at + 8], "little")
        body = at + 8
        if chunk == b"fmt " and size >= 14 and body + 14 <= len(view):
            block_align = int.from_bytes(view[body + 12 : body + 14], "little")
        elif chunk == b"data":
            held = len(view) - body
            if size in (0, 0xFFFFFFFF) or size <= held or block_align <= 0:
                return 0
            return (size - held) // block_align
        at = body + size + (size & 1)  # chunks are padded to an even length
    return 0

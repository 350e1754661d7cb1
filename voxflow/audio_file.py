"""Reading an uploaded or given audio file (any format FFmpeg reads) as float mono samples."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

from .errors import InvalidRequest, LimitExceeded


def read_audio(source: str | Path | BinaryIO, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """An audio file (any format FFmpeg reads: wav, mp3, ogg, flac, ...) as float32 mono at its
    own rate. Unreadable input raises InvalidRequest; audio past `max_seconds`, LimitExceeded."""
    chunks: list[np.ndarray] = []
    samples = 0
    try:
        with av.open(str(source) if isinstance(source, (str, Path)) else source) as container:
            if not container.streams.audio:
                raise InvalidRequest("the file holds no audio")
            stream = container.streams.audio[0]
            rate = stream.rate or stream.codec_context.sample_rate
            if not rate:
                raise InvalidRequest("the audio has no sample rate")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
            limit = None if max_seconds is None else int(max_seconds * rate)

            def take(frames: list[av.AudioFrame]) -> None:
                nonlocal samples
                for frame in frames:
                    chunk = frame.to_ndarray().reshape(-1)
                    samples += len(chunk)
                    if limit is not None and samples > limit:
                        raise LimitExceeded(f"the audio is longer than {max_seconds:g} s")
                    chunks.append(chunk)

            for frame in container.decode(stream):
                take(resampler.resample(frame))
            take(resampler.resample(None))
    except (av.FFmpegError, OSError, EOFError) as exc:
        raise InvalidRequest(f"not a readable audio file: {exc}") from None
    audio = np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0, np.float32)
    return np.clip(np.nan_to_num(audio), -1.0, 1.0), rate

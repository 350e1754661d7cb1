"""Audio encoders shared by every HTTP and WebSocket protocol that sends encoded audio.

Each takes mono s16le PCM as it is synthesized and returns the bytes of its format as soon as
they exist, so a response streams instead of waiting for the end. The codecs are FFmpeg's
(through PyAV); only the WAV header and raw PCM are written here.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import av
import numpy as np


class Encoder(Protocol):
    """Mono s16le PCM in, bytes of the response format out, as soon as they exist."""

    def encode(self, pcm: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class PcmEncoder:
    def __init__(self, sample_rate: int) -> None:
        self.sample_rate = sample_rate

    def encode(self, pcm: bytes) -> bytes:
        return pcm

    def finish(self) -> bytes:
        return b""


_UNKNOWN_SIZE = 0xFFFFFFFF


def streaming_wav_header(sample_rate: int, channels: int = 1, sample_bytes: int = 2) -> bytes:
    """A PCM WAV header for audio of unknown length.

    The RIFF and data sizes are the largest values the fields hold, read as "until the end of
    the stream". The alternative, 0, is what some servers send; Python's `wave` then refuses
    the file and libsndfile reads no samples. With 0xFFFFFFFF FFmpeg, libsndfile and `wave`
    all read every sample; `wave.getnframes()` reports an upper bound (2^31 - 1), so a client
    reads to the end of the body rather than trusting it (docs/compatibility.md).
    """
    block_align = channels * sample_bytes
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * block_align, block_align, 8 * sample_bytes)
    return (
        b"RIFF" + struct.pack("<I", _UNKNOWN_SIZE) + b"WAVE"
        + b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"data" + struct.pack("<I", _UNKNOWN_SIZE)
    )


class WavEncoder:
    def __init__(self, sample_rate: int) -> None:
        self._header: bytes | None = streaming_wav_header(sample_rate)

    def _take_header(self) -> bytes:
        header, self._header = self._header or b"", None
        return header

    def encode(self, pcm: bytes) -> bytes:
        return self._take_header() + pcm

    def finish(self) -> bytes:
        # Text with nothing to speak still yields a readable (empty) file.
        return self._take_header()


class _Collector:
    """A write-only file for the muxer; what it wrote is taken after each packet."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data


class AvEncoder:
    """A codec in a container through FFmpeg (PyAV), written to a non-seekable sink.

    Output that is not seekable makes the muxers write each packet (or page) as it is ready
    instead of holding the file back for a seek-and-patch at the end.
    """

    def __init__(
        self, sample_rate: int, *, container: str, codec: str, options: dict[str, str], bit_rate: int | None = None
    ) -> None:
        self.sample_rate = sample_rate
        self._sink = _Collector()
        self._container = av.open(self._sink, "w", format=container, container_options=options)
        self._stream = self._container.add_stream(codec, rate=sample_rate, layout="mono")
        if bit_rate is not None:
            self._stream.bit_rate = bit_rate

    def _mux(self, frame: av.AudioFrame | None) -> bytes:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def encode(self, pcm: bytes) -> bytes:
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        return self._mux(frame)

    def finish(self) -> bytes:
        data = self._mux(None)
        self._container.close()
        return data + self._sink.take()


@dataclass(frozen=True)
class AudioFormat:
    name: str
    media_type: str
    encoder: Callable[[int], Encoder]  # sample rate -> a fresh encoder


def pcm_format(name: str) -> AudioFormat:
    return AudioFormat(name, "audio/pcm", PcmEncoder)


def wav_format(name: str) -> AudioFormat:
    return AudioFormat(name, "audio/wav", WavEncoder)


def _av_format(name: str, media_type: str, container: str, codec: str, bit_rate: int | None = None, **options: str) -> AudioFormat:
    return AudioFormat(
        name, media_type, lambda rate: AvEncoder(rate, container=container, codec=codec, options=options, bit_rate=bit_rate)
    )


def mp3_format(name: str, bit_rate: int | None = None) -> AudioFormat:
    # No ID3 tag or Xing frame: their lengths would be wrong in a stream written front to back.
    return _av_format(name, "audio/mpeg", "mp3", "libmp3lame", bit_rate, id3v2_version="0", write_xing="0")


def ogg_opus_format(name: str, bit_rate: int | None = None) -> AudioFormat:
    # Ogg pages of 100 ms instead of the muxer's 1 s, so audio leaves as it is made.
    return _av_format(name, "audio/ogg", "ogg", "libopus", bit_rate, page_duration="100000")


def aac_format(name: str) -> AudioFormat:
    return _av_format(name, "audio/aac", "adts", "aac")


def flac_format(name: str) -> AudioFormat:
    return _av_format(name, "audio/flac", "flac", "flac")


def g711_format(name: str, law: str) -> AudioFormat:
    """Raw G.711 bytes at 8 kHz, no header, as telephony carriers (Twilio, SIP) take them."""
    if law == "ulaw":
        return _av_format(name, "audio/basic", "mulaw", "pcm_mulaw")
    return _av_format(name, "audio/x-alaw-basic", "alaw", "pcm_alaw")

"""The CUDA path (float32 and float16): runs only where torch sees a CUDA device.

Noise generators differ between devices, so the renderings are compared with noise off.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine
from voxflow.streaming.events import AudioFrame
from voxflow.voices.styles import Style

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXT = "The quick brown fox jumps over the lazy dog."
CALM = Style(expressiveness=0)


@pytest.mark.parametrize("half", [False, True])
async def test_a_cuda_stream_speaks_as_the_cpu_does(engine: Engine, half: bool) -> None:
    cpu = engine.synthesize(TEXT, style=CALM)
    gpu_engine = Engine(EngineConfig(device="cuda", half=half))
    try:
        voice = gpu_engine.voice()
        assert voice.device.type == "cuda" and voice.decoder.dtype == (torch.float16 if half else torch.float32)
        stream = gpu_engine.open_stream(style=CALM, cached=False)
        await stream.push(TEXT)
        await stream.end()
        pcm = b"".join([e.pcm async for e in stream if isinstance(e, AudioFrame)])
        streamed = np.frombuffer(pcm, dtype=np.int16).astype(np.float32) / 32768
        whole = gpu_engine.synthesize(TEXT, style=CALM)
    finally:
        gpu_engine.close()
    assert abs(whole.duration - cpu.duration) <= 0.05 * cpu.duration
    assert abs(len(streamed) / whole.sample_rate - whole.duration) <= 0.05 * whole.duration
    n = min(len(whole.audio), len(cpu.audio))
    assert np.corrcoef(whole.audio[:n], cpu.audio[:n])[0, 1] > 0.9

"""HiFi-GAN as the engine runs it: windows padded to a few shapes, in the configured precision.

Four measured facts on CPU shape this (docs/ARCHITECTURE.md, "Decoder precision and shapes"):
- oneDNN builds a convolution kernel for each input shape it meets and keeps a bounded cache
  of them. Decoder windows come in every length, so most calls paid that build: the same
  frames decoded in windows of varied lengths cost ~1.35x what they cost in one repeated
  shape. Padding each window up to a multiple of BUCKET_FRAMES (with the padding masked, so
  the audio is unchanged) leaves a few dozen shapes that stay built.
- On CPUs with bfloat16 instructions (AVX512-BF16, AMX) a bfloat16 decoder runs ~1.7x faster
  than float32 once its kernels are built, its error ~37 dB below the signal. `auto` picks it
  there, and `auto` is the default; benchmarks/throughput.py checks its WER and spectral
  distance against float32, benchmarks/fidelity.py streamed against whole with it.
- Run channels-last (channels_last.py), 256 frames decode ~2x faster in bfloat16 and ~1.4x in
  float32, the same audio to 1e-6.
- With the residual blocks' activations and sums fused into their convolutions (fused_blocks.py),
  float32 windows of 96 / 256 frames decode ~7 / ~14 % faster again, the same audio bit for bit.

Padding to a shared length is also what lets windows of several streams run as one batch.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from .channels_last import to_channels_last
from .fused_blocks import fuse_residual_blocks, fusion_available
from .vits.hifigan import Generator

BUCKET_FRAMES = 16
def bucket(frames: int) -> int:
    return -(-frames // BUCKET_FRAMES) * BUCKET_FRAMES


class WindowDecoder:
    """Latent windows -> float32 audio, one window or several at once."""

    def __init__(self, generator: Generator, dtype: torch.dtype) -> None:
        # A copy in the decoding precision and layout: the model's own decoder stays as loaded
        # (ONNX export, whole-graph parity with the voice file).
        self.generator = copy.deepcopy(generator).to(dtype)
        if next(generator.parameters()).device.type == "cpu":
            # On CPU only: the copies it saves are oneDNN's; CUDA's kernels were not measured.
            to_channels_last(self.generator)
            if fusion_available():
                fuse_residual_blocks(self.generator)
        if dtype == torch.bfloat16:
            # bfloat16 keeps 8 bits of mantissa: an output layer in it rounds every sample to
            # ~0.4 % and spreads that as noise into the spectrum's quiet bands (MCD to float32
            # ~6 on loud frames). In float32 it costs little (64 channels in, one out) and
            # leaves ~2.8.
            self.generator.conv_post.float()
        self.dtype = dtype
        self.hop = generator.cfg.hop_length

    def __call__(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """z [1, C, T] -> audio [1, 1, T * hop], float32."""
        return self.batch([z], g)[0]

    @torch.inference_mode()
    def batch(self, windows: list[torch.Tensor], g: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Decode [1, C, T_i] windows in one forward pass; g is [1, gin, 1] (one speaker) or [B, gin, 1]."""
        lengths = [z.shape[2] for z in windows]
        frames = bucket(max(lengths))
        z = torch.cat([F.pad(w, (0, frames - w.shape[2])) for w in windows]).to(self.dtype)
        padded = torch.tensor(lengths, device=z.device) if min(lengths) < frames else None
        if g is not None:
            g = g.to(self.dtype).expand(len(windows), -1, -1)
        audio = self.generator(z, g, padded).float()
        return [audio[i : i + 1, :, : n * self.hop] for i, n in enumerate(lengths)]

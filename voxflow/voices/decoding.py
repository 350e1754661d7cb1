"""HiFi-GAN as the engine runs it: windows padded to a few shapes, in the configured precision.

Three measured facts on CPU shape this (docs/ARCHITECTURE.md, "Decoder precision and shapes"):
- oneDNN builds a convolution kernel for each input shape it meets and keeps a bounded cache
  of them. Decoder windows come in every length, so most calls paid that build: the same
  frames decoded in windows of varied lengths cost ~1.35x what they cost in one repeated
  shape. Padding each window up to a multiple of BUCKET_FRAMES (with the padding masked, so
  the audio is unchanged) leaves a few dozen shapes that stay built.
- On CPUs with bfloat16 instructions (AVX512-BF16, AMX) a bfloat16 decoder runs ~1.7x faster
  than float32 once its kernels are built, its error ~37 dB below the signal. `auto` picks it
  there; benchmarks/throughput.py checks its WER and spectral distance against float32.
  The default stays float32 (config.py says why).
- oneDNN computes a 1-D convolution in a channels-last layout and torch copied every result
  back to channels-first: in bfloat16 those copies took 30 % of the decoder's time. Run as 2-D
  convolutions on channels-last tensors, nothing is copied and the elementwise steps between
  convolutions keep the layout: 256 frames decode ~2x faster in bfloat16 and ~1.4x in float32,
  the same audio to 1e-6.

Padding to a shared length is also what lets windows of several streams run as one batch.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidRequest
from .vits.hifigan import Generator

BUCKET_FRAMES = 16
PRECISIONS = ("auto", "float32", "bfloat16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bfloat16 math natively (not emulated, which is slower than float32)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split())
    except OSError:  # not Linux: no cheap way to ask, so stay with float32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def decoder_dtype(precision: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    if precision not in PRECISIONS:
        raise InvalidRequest(f"decoder_precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16":
        if device.type != "cpu":
            raise InvalidRequest("decoder_precision bfloat16 is for CPUs; GPUs use half")
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and model_dtype == torch.float32 and cpu_has_native_bf16():
        return torch.bfloat16
    return model_dtype


def bucket(frames: int) -> int:
    return -(-frames // BUCKET_FRAMES) * BUCKET_FRAMES


class ChannelsLastConv(nn.Module):
    """A Conv1d or ConvTranspose1d run as its 2-D form on [B, C, 1, T] channels-last tensors.

    It takes and returns [B, C, T] tensors, so the generator's code is unchanged; what it
    returns is a view in [B, T, C] order, which the elementwise steps after it keep and the next
    convolution reads without a copy.
    """

    def __init__(self, conv: nn.Conv1d | nn.ConvTranspose1d) -> None:
        super().__init__()
        self.transposed = isinstance(conv, nn.ConvTranspose1d)
        (self.stride,), (self.padding,), (self.dilation,) = conv.stride, conv.padding, conv.dilation
        self.groups = conv.groups
        self.output_padding = conv.output_padding[0] if self.transposed else 0
        if conv.padding_mode != "zeros":
            raise ValueError(f"only zero padding is supported, not {conv.padding_mode}")
        weight = conv.weight.detach().unsqueeze(2).contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        if self.transposed:
            y = F.conv_transpose2d(
                x, self.weight, self.bias, (1, self.stride), (0, self.padding), (0, self.output_padding), self.groups, (1, self.dilation)
            )
        else:
            y = F.conv2d(x, self.weight, self.bias, 1, (0, self.padding), (1, self.dilation), self.groups)
        return y.squeeze(2)


def to_channels_last(module: nn.Module) -> None:
    """Replace every 1-D convolution under module with its ChannelsLastConv, in place."""
    for name, child in module.named_children():
        if isinstance(child, (nn.Conv1d, nn.ConvTranspose1d)):
            setattr(module, name, ChannelsLastConv(child))
        else:
            to_channels_last(child)


class WindowDecoder:
    """Latent windows -> float32 audio, one window or several at once."""

    def __init__(self, generator: Generator, dtype: torch.dtype) -> None:
        # A copy in the decoding precision and layout: the model's own decoder stays as loaded
        # (ONNX export, whole-graph parity with the voice file).
        self.generator = copy.deepcopy(generator).to(dtype)
        if next(generator.parameters()).device.type == "cpu":
            # On CPU only: the copies it saves are oneDNN's; CUDA's kernels were not measured.
            to_channels_last(self.generator)
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

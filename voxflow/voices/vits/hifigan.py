"""HiFi-GAN generator: latent frames -> waveform."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .layers import same_padding

LRELU_SLOPE = 0.1


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


def _valid(lengths: torch.Tensor, frames: int, rate: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, frames * rate]: 1 where a sample lies inside its item's first lengths * rate."""
    positions = torch.arange(frames * rate, device=lengths.device)
    return (positions[None, None, :] < (lengths * rate)[:, None, None]).to(dtype)


class ResBlock1(nn.Module):
    """Pairs of (dilated conv, plain conv) with a residual around each pair."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d)) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=same_padding(kernel_size)) for _ in dilations
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = _masked(x + c2(_masked(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE), mask)), mask)
        return x


class ResBlock2(nn.Module):
    """One dilated conv per residual step (the lighter variant of low/medium voices)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d)) for d in dilations
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for conv in self.convs:
            x = _masked(x + conv(F.leaky_relu(x, LRELU_SLOPE)), mask)
        return x


@dataclass(frozen=True)
class GeneratorConfig:
    in_channels: int
    resblock: str  # "1" or "2"
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    upsample_rates: tuple[int, ...]
    upsample_initial_channel: int
    upsample_kernel_sizes: tuple[int, ...]
    gin_channels: int = 0

    @property
    def hop_length(self) -> int:
        hop = 1
        for rate in self.upsample_rates:
            hop *= rate
        return hop

    @property
    def receptive_frames(self) -> int:
        """Latent frames on each side that can change an output sample (rounded up).

        Each convolution reaches (kernel - 1) * dilation / 2 samples at its own stage's rate;
        a transposed convolution spreads each input frame over kernel samples at its output
        rate, its own stride of them plus (kernel - stride) / 2 on each side; a stage's parallel
        resblocks are averaged, so the widest one counts. Block decoding with this much context
        on both sides reproduces a whole decode; rounded up, the bound is tight to within one frame
        (tests/test_decoding.py perturbs one frame and finds where the output changes).
        """
        reach = 3.0  # conv_pre, kernel 7, at the latent rate
        rate = 1
        for up_rate, up_kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            rate *= up_rate
            reach += math.ceil((up_kernel - up_rate) / 2) / rate  # transposed conv, its wider side
            widest = 0.0
            for kernel, dilations in zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes):
                per_step = (kernel - 1) // 2
                plain = per_step if self.resblock == "1" else 0  # resblock 1 pairs each dilated conv with a plain one
                widest = max(widest, sum(per_step * d + plain for d in dilations))
            reach += widest / rate
        reach += 3 / rate  # conv_post, kernel 7, at the output rate
        return math.ceil(reach)


class Generator(nn.Module):
    def __init__(self, cfg: GeneratorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_kernels = len(cfg.resblock_kernel_sizes)
        block = ResBlock1 if cfg.resblock == "1" else ResBlock2
        self.conv_pre = nn.Conv1d(cfg.in_channels, cfg.upsample_initial_channel, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        channels = cfg.upsample_initial_channel
        for rate, kernel in zip(cfg.upsample_rates, cfg.upsample_kernel_sizes):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes):
                self.resblocks.append(block(channels, k, d))
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3, bias=False)
        self.cond = nn.Conv1d(cfg.gin_channels, cfg.upsample_initial_channel, 1) if cfg.gin_channels else None

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Latents [B, C, T] -> audio [B, 1, T * hop].

        lengths [B] marks item b's frames past lengths[b] as padding: every layer's output is
        zeroed there, so each convolution sees the zeros its own padding would have given and
        the audio of the first lengths[b] * hop samples equals that of the unpadded latents.
        This lets windows of many lengths share a few shapes (and one batch).
        """
        frames = z.shape[2]
        mask = None if lengths is None else _valid(lengths, frames, 1, z.dtype)
        x = _masked(self.conv_pre(_masked(z, mask)), mask)
        if self.cond is not None and g is not None:
            x = _masked(x + self.cond(g), mask)
        rate = 1
        for i, up in enumerate(self.ups):
            rate *= self.cfg.upsample_rates[i]
            mask = None if lengths is None else _valid(lengths, frames, rate, z.dtype)
            x = _masked(up(F.leaky_relu(x, LRELU_SLOPE)), mask)
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x, mask)
            for blk in blocks[1:]:
                acc = acc + blk(x, mask)
            x = acc / self.num_kernels
        # The final activation uses torch's default slope, not LRELU_SLOPE, as trained. The
        # output layer may run in a wider type than the rest (decoding.py says why).
        x = F.leaky_relu(x).to(self.conv_post.weight.dtype)
        return torch.tanh(self.conv_post(x))

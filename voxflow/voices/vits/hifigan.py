"""HiFi-GAN generator: latent frames -> waveform."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .layers import same_padding

LRELU_SLOPE = 0.1


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2 in zip(self.convs1, self.convs2):
            x = x + c2(F.leaky_relu(c1(F.leaky_relu(x, LRELU_SLOPE)), LRELU_SLOPE))
        return x


class ResBlock2(nn.Module):
    """One dilated conv per residual step (the lighter variant of low/medium voices)."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=same_padding(kernel_size, d)) for d in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.convs:
            x = x + conv(F.leaky_relu(x, LRELU_SLOPE))
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
        a stage's parallel resblocks are averaged, so the widest one counts. Block decoding
        with this much context on both sides reproduces a whole decode.
        """
        reach = 3.0  # conv_pre, kernel 7, at the latent rate
        rate = 1
        for up_rate, up_kernel in zip(self.upsample_rates, self.upsample_kernel_sizes):
            reach += (up_kernel - up_rate) / 2 / (rate * up_rate) + 1 / rate  # transposed conv
            rate *= up_rate
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

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        x = self.conv_pre(z)
        if self.cond is not None and g is not None:
            x = x + self.cond(g)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, LRELU_SLOPE))
            blocks = self.resblocks[i * self.num_kernels : (i + 1) * self.num_kernels]
            acc = blocks[0](x)
            for blk in blocks[1:]:
                acc = acc + blk(x)
            x = acc / self.num_kernels
        # The final activation uses torch's default slope, not LRELU_SLOPE, as trained.
        return torch.tanh(self.conv_post(F.leaky_relu(x)))

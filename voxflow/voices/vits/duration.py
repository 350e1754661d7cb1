"""Stochastic duration predictor (inference direction only).

VITS predicts log-durations by running a small normalising flow backwards from noise,
conditioned on the text encoder's hidden states. Only the reverse pass is needed to speak; the
training-only posterior flows are absent from voice files.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ChannelLayerNorm, masked, same_padding

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3


class DilatedDepthSeparableConv(nn.Module):
    """Stack of depth-separable convolutions with dilations 1, k, k^2, ... and GELU."""

    def __init__(self, channels: int, kernel_size: int, n_layers: int) -> None:
        super().__init__()
        dilations = [kernel_size**i for i in range(n_layers)]
        self.convs_sep = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, groups=channels, dilation=d, padding=same_padding(kernel_size, d))
            for d in dilations
        )
        self.convs_1x1 = nn.ModuleList(nn.Conv1d(channels, channels, 1) for _ in dilations)
        self.norms_1 = nn.ModuleList(ChannelLayerNorm(channels) for _ in dilations)
        self.norms_2 = nn.ModuleList(ChannelLayerNorm(channels) for _ in dilations)

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + cond
        for sep, pointwise, norm1, norm2 in zip(self.convs_sep, self.convs_1x1, self.norms_1, self.norms_2):
            y = F.gelu(norm1(sep(masked(x, mask))))
            x = x + F.gelu(norm2(pointwise(y)))
        return x


def _bin_edges(unnormalized: torch.Tensor, low: float, high: float, min_size: float) -> torch.Tensor:
    """Monotone bin edges over [low, high] from unconstrained logits, each bin at least min_size."""
    n_bins = unnormalized.shape[-1]
    sizes = min_size + (1 - min_size * n_bins) * F.softmax(unnormalized, dim=-1)
    edges = F.pad(torch.cumsum(sizes, dim=-1), (1, 0))
    edges = (high - low) * edges + low
    # Pin the outer edges exactly; cumulative rounding would otherwise leave tiny gaps.
    return torch.cat([torch.full_like(edges[..., :1], low), edges[..., 1:-1], torch.full_like(edges[..., :1], high)], -1)


def inverse_rational_quadratic_spline(
    y: torch.Tensor,
    widths_logits: torch.Tensor,
    heights_logits: torch.Tensor,
    derivatives_logits: torch.Tensor,
    tail_bound: float,
) -> torch.Tensor:
    """Invert a monotone rational-quadratic spline on [-B, B] with identity tails outside.

    Written out here because no maintained library ships the piecewise rational-quadratic
    transform (Durkan et al., 2019) in the exact parameterisation these voices were trained with.
    """
    inside = (y >= -tail_bound) & (y <= tail_bound)
    # Boundary derivatives are fixed so that the spline meets the identity tails smoothly.
    boundary = math.log(math.exp(1 - MIN_DERIVATIVE) - 1)
    derivatives_logits = F.pad(derivatives_logits, (1, 1), value=boundary)

    x_edges = _bin_edges(widths_logits, -tail_bound, tail_bound, MIN_BIN_WIDTH)
    y_edges = _bin_edges(heights_logits, -tail_bound, tail_bound, MIN_BIN_HEIGHT)
    widths = x_edges[..., 1:] - x_edges[..., :-1]
    heights = y_edges[..., 1:] - y_edges[..., :-1]
    derivatives = MIN_DERIVATIVE + F.softplus(derivatives_logits)

    y_clamped = y.clamp(-tail_bound, tail_bound)
    search_edges = torch.cat([y_edges[..., :-1], y_edges[..., -1:] + 1e-6], dim=-1)
    bin_index = (torch.sum(y_clamped[..., None] >= search_edges, dim=-1) - 1).clamp(0, widths.shape[-1] - 1)[..., None]

    def pick(t: torch.Tensor) -> torch.Tensor:
        return torch.gather(t, -1, bin_index)[..., 0]

    x_low, width = pick(x_edges[..., :-1]), pick(widths)
    y_low, height = pick(y_edges[..., :-1]), pick(heights)
    slope = height / width
    d_low, d_high = pick(derivatives[..., :-1]), pick(derivatives[..., 1:])

    offset = y_clamped - y_low
    curvature = d_low + d_high - 2 * slope
    a = offset * curvature + height * (slope - d_low)
    b = height * d_low - offset * curvature
    c = -slope * offset
    root = (2 * c) / (-b - torch.sqrt(b.pow(2) - 4 * a * c))
    return torch.where(inside, root * width + x_low, y)


class ConvFlow(nn.Module):
    """Coupling layer whose transform is a rational-quadratic spline on half the channels."""

    def __init__(self, channels: int, filter_channels: int, kernel_size: int, n_layers: int, num_bins: int, tail_bound: float = 5.0) -> None:
        super().__init__()
        self.half = channels // 2
        self.filter_channels = filter_channels
        self.num_bins = num_bins
        self.tail_bound = tail_bound
        self.pre = nn.Conv1d(self.half, filter_channels, 1)
        self.convs = DilatedDepthSeparableConv(filter_channels, kernel_size, n_layers)
        self.proj = nn.Conv1d(filter_channels, self.half * (num_bins * 3 - 1), 1)

    def reverse(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.half, self.half], dim=1)
        h = self.proj(self.convs(self.pre(x0), cond, mask))
        batch, channels, length = x0.shape
        h = h.reshape(batch, channels, -1, length).permute(0, 1, 3, 2)
        scale = math.sqrt(self.filter_channels)
        n = self.num_bins
        x1 = inverse_rational_quadratic_spline(x1, h[..., :n] / scale, h[..., n : 2 * n] / scale, h[..., 2 * n :], self.tail_bound)
        return torch.cat([x0, x1], dim=1)


class ElementwiseAffine(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.m = nn.Parameter(torch.zeros(channels, 1))
        self.logs = nn.Parameter(torch.zeros(channels, 1))

    def reverse(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.m) * torch.exp(-self.logs)


class StochasticDurationPredictor(nn.Module):
    """Hidden states -> log duration per phoneme, sampled from noise scaled by noise_w."""

    # Index layout of `flows` in voice files: 0 affine, odd indices spline couplings, even
    # indices > 0 parameter-free channel flips. Flow 1 is never used when sampling.
    def __init__(self, channels: int, filter_channels: int, kernel_size: int, n_flows: int, num_bins: int, gin_channels: int = 0) -> None:
        super().__init__()
        self.pre = nn.Conv1d(channels, filter_channels, 1)
        self.convs = DilatedDepthSeparableConv(filter_channels, kernel_size, 3)
        self.proj = nn.Conv1d(filter_channels, filter_channels, 1)
        self.cond = nn.Conv1d(gin_channels, filter_channels, 1) if gin_channels else None
        couplings = {str(2 * i + 1): ConvFlow(2, filter_channels, kernel_size, 3, num_bins) for i in range(1, n_flows)}
        self.flows = nn.ModuleDict({"0": ElementwiseAffine(2), **couplings})

    def forward(self, x: torch.Tensor, noise: torch.Tensor, g: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """noise: [batch, 2, length], already scaled by noise_w; mask: length_mask of a padded
        batch (None: no padding). Returns log-durations [batch, 1, length]."""
        x = self.pre(x)
        if self.cond is not None and g is not None:
            x = x + self.cond(g)
        x = self.proj(self.convs(x, mask=mask))
        z = noise
        for key in sorted(self.flows, key=int, reverse=True)[:-1]:
            z = self.flows[key].reverse(torch.flip(z, [1]), x, mask)
        z = self.flows["0"].reverse(torch.flip(z, [1]))
        return z[:, :1]

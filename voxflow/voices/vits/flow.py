"""Residual coupling flow that maps prior samples to the decoder's latent space."""

from __future__ import annotations

import torch
from torch import nn

from .layers import masked, same_padding


class WaveNet(nn.Module):
    """Non-causal gated WaveNet stack used inside each coupling layer."""

    def __init__(self, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0) -> None:
        super().__init__()
        self.hidden = hidden
        self.in_layers = nn.ModuleList()
        self.res_skip_layers = nn.ModuleList()
        for i in range(n_layers):
            dilation = dilation_rate**i
            self.in_layers.append(
                nn.Conv1d(hidden, 2 * hidden, kernel_size, dilation=dilation, padding=same_padding(kernel_size, dilation))
            )
            # The last layer only feeds the skip sum, so it has no residual half.
            self.res_skip_layers.append(nn.Conv1d(hidden, 2 * hidden if i < n_layers - 1 else hidden, 1))
        self.cond_layer = nn.Conv1d(gin_channels, 2 * hidden * n_layers, 1) if gin_channels else None

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        cond = self.cond_layer(g) if self.cond_layer is not None and g is not None else None
        skip = torch.zeros_like(x)
        last = len(self.in_layers) - 1
        for i, (conv, res_skip) in enumerate(zip(self.in_layers, self.res_skip_layers)):
            h = conv(masked(x, mask))
            if cond is not None:
                h = h + cond[:, 2 * self.hidden * i : 2 * self.hidden * (i + 1)]
            acts = torch.tanh(h[:, : self.hidden]) * torch.sigmoid(h[:, self.hidden :])
            out = res_skip(acts)
            if i < last:
                x = x + out[:, : self.hidden]
                skip = skip + out[:, self.hidden :]
            else:
                skip = skip + out
        return skip


class MeanOnlyCoupling(nn.Module):
    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, gin_channels: int = 0) -> None:
        super().__init__()
        self.half = channels // 2
        self.pre = nn.Conv1d(self.half, hidden, 1)
        self.enc = WaveNet(hidden, kernel_size, dilation_rate, n_layers, gin_channels)
        self.post = nn.Conv1d(hidden, self.half, 1)

    def reverse(self, x: torch.Tensor, g: torch.Tensor | None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x0, x1 = torch.split(x, [self.half, self.half], dim=1)
        mean = self.post(self.enc(self.pre(x0), g, mask))
        return torch.cat([x0, x1 - mean], dim=1)


class ResidualCouplingFlow(nn.Module):
    """Couplings at even indices of `flows`, channel flips (no parameters) between them."""

    def __init__(self, channels: int, hidden: int, kernel_size: int, dilation_rate: int, n_layers: int, n_flows: int, gin_channels: int = 0) -> None:
        super().__init__()
        self.flows = nn.ModuleDict(
            {
                str(2 * i): MeanOnlyCoupling(channels, hidden, kernel_size, dilation_rate, n_layers, gin_channels)
                for i in range(n_flows)
            }
        )

    def reverse(self, z: torch.Tensor, g: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: length_mask of a right-padded batch (None: no padding); each sequence's frames
        come out as if it ran alone."""
        for key in sorted(self.flows, key=int, reverse=True):
            z = self.flows[key].reverse(torch.flip(z, [1]), g, mask)
        return z

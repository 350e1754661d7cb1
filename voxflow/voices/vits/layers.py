"""Small building blocks shared by the VITS sub-networks."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a [batch, channels, time] tensor.

    VITS keeps activations channel-first for its convolutions, so the norm has to move the
    channel axis last and back. Parameter names (gamma, beta) follow the voice files.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.channels = channels
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The normalised shape comes from the module, not the tensor, so it stays a constant
        # when the model is traced for ONNX export.
        x = F.layer_norm(x.transpose(1, -1), (self.channels,), self.gamma, self.beta, self.eps)
        return x.transpose(1, -1)


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


def length_mask(lengths: list[int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, max(lengths)]: 1 over each sequence's own positions, 0 over its right padding."""
    positions = torch.arange(max(lengths), device=device)
    return (positions[None, :] < torch.as_tensor(lengths, device=device)[:, None]).to(dtype)[:, None]


def masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x with its padding zeroed, as a convolution over one unpadded sequence sees beyond its end."""
    return x if mask is None else x * mask

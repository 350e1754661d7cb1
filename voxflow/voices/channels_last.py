"""1-D convolutions run as 2-D ones on channels-last tensors, for CPU inference.

oneDNN computes a 1-D convolution in a channels-last layout, and torch copies each result back
to channels-first; in the bfloat16 decoder those copies took 30 % of the time. With the layout
kept from one convolution to the next, nothing is copied, and the elementwise steps between
convolutions keep it too. The results are the same to float rounding (~1e-6), so the engine
converts the modules it runs on CPU (docs/ARCHITECTURE.md, "Decoder precision and shapes").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ChannelsLastConv(nn.Module):
    """A Conv1d or ConvTranspose1d run as its 2-D form on [B, C, 1, T] channels-last tensors.

    It takes and returns [B, C, T] tensors, so the model's code is unchanged; what it
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

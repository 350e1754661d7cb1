"""HiFi-GAN's residual blocks with their activations and sums done inside the convolutions (CPU).

Profiled in float32, about a third of the channels-last decoder's time went to the elementwise
steps between its convolutions: each leaky ReLU and each residual sum is a pass of its own over
tensors larger than a core's cache (at the last stage of a 96-frame window, 32 channels by
24,576 samples, 3 MB). oneDNN applies such steps to a convolution's output while it is still in
cache ("post-ops"); torch reaches them through `torch.ops.mkldnn._convolution_pointwise`, the op
its compiler emits for this fusion. Called directly, the eager decoder gets the fusion without
compiling, which cost seconds per shape (docs/ARCHITECTURE.md). In float32 the fused steps are
the same operations in the same order: the audio is bit-for-bit the unfused blocks'.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from .channels_last import ChannelsLastConv
from .vits.hifigan import LRELU_SLOPE, ResBlock1, ResBlock2


def _args(conv: ChannelsLastConv) -> tuple:
    """The fused op's weight, bias, padding, stride, dilation and groups for a conv."""
    return conv.weight, conv.bias, [0, conv.padding], [1, 1], [1, conv.dilation], conv.groups


def conv_leaky_relu(conv: ChannelsLastConv, x: torch.Tensor) -> torch.Tensor:
    """leaky_relu(conv(x), LRELU_SLOPE) on a [B, C, 1, T] channels-last tensor."""
    return torch.ops.mkldnn._convolution_pointwise(x, *_args(conv), "leaky_relu", [LRELU_SLOPE], "")


def conv_add(conv: ChannelsLastConv, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """conv(x) + other on [B, C, 1, T] channels-last tensors."""
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, *_args(conv), "add", 1.0, None, [], None)


class FusedResBlock(nn.Module):
    """A ResBlock1 or ResBlock2 whose convolutions are ChannelsLastConvs, run with fused steps.

    Each residual step is leaky_relu, then convolutions with a leaky_relu after all but the last,
    then the sum with the step's input: every activation after a convolution and every sum is
    fused into it. The first activation stays apart (the step's input is needed unactivated
    for the sum). Masking, where windows are padded, is the same as the blocks' own.
    """

    def __init__(self, block: ResBlock1 | ResBlock2) -> None:
        super().__init__()
        steps = zip(block.convs1, block.convs2) if isinstance(block, ResBlock1) else ((conv,) for conv in block.convs)
        self.steps = nn.ModuleList(nn.ModuleList(step) for step in steps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        mask = None if mask is None else mask.unsqueeze(2)
        for step in self.steps:
            h = F.leaky_relu(x, LRELU_SLOPE)
            for conv in step[:-1]:
                h = conv_leaky_relu(conv, h)
                if mask is not None:
                    h.mul_(mask)
            x = conv_add(step[-1], h, x)
            if mask is not None:
                x.mul_(mask)
        return x.squeeze(2)


@functools.cache
def fusion_available() -> bool:
    """Whether this torch build runs the fused op and gets what the separate steps give (it is
    oneDNN's; checked on x86-64 only)."""
    if not torch.backends.mkldnn.is_available():
        return False
    with torch.random.fork_rng(devices=[]):  # the probe's weights must not move anyone's seed
        probe = ChannelsLastConv(nn.Conv1d(4, 4, 3, padding=1))
    x = torch.randn(1, 4, 1, 8, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    try:
        with torch.inference_mode():
            fused = conv_add(probe, conv_leaky_relu(probe, x), x)
            plain = probe(F.leaky_relu(probe(x.squeeze(2)), LRELU_SLOPE)).unsqueeze(2) + x
    except RuntimeError:
        return False
    return torch.allclose(fused, plain, atol=1e-6)


def fuse_residual_blocks(module: nn.Module) -> None:
    """Replace every ResBlock1 and ResBlock2 under module (already channels-last) with a
    FusedResBlock, in place."""
    for name, child in module.named_children():
        if isinstance(child, (ResBlock1, ResBlock2)):
            setattr(module, name, FusedResBlock(child))
        else:
            fuse_residual_blocks(child)

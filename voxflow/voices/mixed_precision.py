"""Precision choices: bfloat16 where the CPU computes it natively and the quality guards hold.

Two parts of a voice may run in bfloat16 (`decoder_precision`, `flow_precision`):
- HiFi-GAN (decoding.py), all but its output layer.
- The flow's dilated WaveNet convolutions, the bulk of the acoustic step's arithmetic: the
  flow runs ~2.4x faster at 550 frames, ~1.5x at 90. Only those convolutions change type;
  their inputs are cast down and their outputs back up, so the gates, the residual and skip
  sums and the coupling's subtraction stay float32 and the rounding does not pile up through
  the layers. The flow's output then moves ~0.3 % RMS from float32's.

What was measured and left in float32 (docs/ARCHITECTURE.md, "Flow precision"): the rest of
the WaveNets (in bfloat16 too, the flow was 15 % faster at 550 frames, no faster at 90, and
its spectral distance to float32 rose from 2.91 to 3.27, past the guard's 3), and the text
encoder's feed-forward layers (1.7x faster, but the durations they predict move and the
distance doubled).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from ..config import PRECISIONS
from ..errors import InvalidRequest
from .vits import VitsSynthesizer


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU executes bfloat16 math natively (not emulated, which is slower than float32)."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace").split())
    except OSError:  # not Linux: no cheap way to ask, so stay with float32
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"}) and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def precision_dtype(setting: str, precision: str, device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The float type a precision setting (decoder_precision, flow_precision) picks here."""
    if precision not in PRECISIONS:
        raise InvalidRequest(f"{setting} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "bfloat16":
        if device.type != "cpu":
            raise InvalidRequest(f"{setting} bfloat16 is for CPUs; GPUs use half")
        return torch.bfloat16
    if precision == "auto" and device.type == "cpu" and model_dtype == torch.float32 and cpu_has_native_bf16():
        return torch.bfloat16
    return model_dtype


class InDtype(nn.Module):
    """A module converted to `dtype`; its input is cast to it and its result back."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module = module.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.to(self.dtype)).to(x.dtype)


def narrow_flow(model: VitsSynthesizer, dtype: torch.dtype) -> None:
    """Run the flow's dilated WaveNet convolutions in dtype, in place."""
    for coupling in model.flow.flows.values():
        wavenet = coupling.enc
        wavenet.in_layers = nn.ModuleList(InDtype(conv, dtype) for conv in wavenet.in_layers)

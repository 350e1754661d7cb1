"""Which float types the precision settings pick, and the flow with its dilated convolutions narrowed."""

from __future__ import annotations

import functools

import pytest
import torch

from voxflow.errors import InvalidRequest
from voxflow.voices.mixed_precision import InDtype, cpu_has_native_bf16, precision_dtype
from voxflow.voices.registry import _embedded_voice
from voxflow.voices.voice import Voice


def test_precision_choice() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    choose = functools.partial(precision_dtype, "flow_precision")
    assert choose("float32", cpu, torch.float32) == torch.float32
    assert choose("bfloat16", cpu, torch.float32) == torch.bfloat16
    assert choose("auto", cpu, torch.float32) == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert choose("auto", cuda, torch.float16) == torch.float16  # GPUs keep the model's precision
    with pytest.raises(InvalidRequest, match="flow_precision bfloat16 is for CPUs"):
        choose("bfloat16", cuda, torch.float32)
    with pytest.raises(InvalidRequest, match="flow_precision must be one of"):
        choose("int4", cpu, torch.float32)


def test_a_bfloat16_flow_stays_close_to_float32() -> None:
    info = _embedded_voice()
    exact = Voice.load(info, flow_precision="float32")
    narrow = Voice.load(info, flow_precision="bfloat16")
    assert exact.flow_dtype == torch.float32 and narrow.flow_dtype == torch.bfloat16
    for coupling in narrow.model.flow.flows.values():
        assert all(isinstance(conv, InDtype) and conv.dtype == torch.bfloat16 for conv in coupling.enc.in_layers)
        # The residual and skip paths stay float32, so rounding does not pile up through layers.
        assert all(p.dtype == torch.float32 for p in coupling.enc.res_skip_layers.parameters())
    z = torch.randn(1, exact.model.cfg.inter_channels, 120, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want, got = exact.model.flow.reverse(z), narrow.model.flow.reverse(z)
    assert got.dtype == torch.float32
    relative = ((got - want).pow(2).mean() / want.pow(2).mean()).sqrt().item()
    assert 0 < relative < 0.01  # changed (it runs narrowed), but by bfloat16 rounding only (~0.3 %)

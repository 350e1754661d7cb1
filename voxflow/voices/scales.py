"""Piper's sampling knobs, kept free of torch so that protocol code can validate styles cheaply."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scales:
    """Piper's three sampling knobs: prior noise, length (1/speed) and duration noise."""

    noise: float = 0.667
    length: float = 1.0
    noise_w: float = 0.8

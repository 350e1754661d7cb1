"""The seeded noise of a rendering, drawn so that saying a sentence in pieces draws the same.

VITS samples two kinds of noise: two values per phoneme for the duration predictor and one
value per channel and frame for the prior. A rendering owns one generator per kind and draws
each in order of position, so the n-th phoneme and the n-th frame get the same values whether
the sentence is rendered whole or streamed in several steps: with the same seed a streamed
reply then differs from the whole one only where the model's inputs differ, not by chance.

torch's CPU sampler turns uniforms into normals sixteen at a time and redraws a ragged tail, so
consecutive draws continue one sequence only when each is a multiple of sixteen values: every
position draws a whole number of blocks of sixteen and keeps what it needs. (CUDA generators
advance differently; there the equality is not promised.)
"""

from __future__ import annotations

import torch

_BLOCK = 16


class Noise:
    def __init__(self, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self._durations = torch.Generator(device=device).manual_seed(seed)
        self._prior = torch.Generator(device=device).manual_seed((seed + 1) % 2**64)
        self.device, self.dtype = device, dtype

    def _draw(self, generator: torch.Generator, positions: int, values: int) -> torch.Tensor:
        width = -(-values // _BLOCK) * _BLOCK
        drawn = torch.randn(positions, width, generator=generator, device=self.device, dtype=self.dtype)
        return drawn[:, :values].T[None].contiguous()

    def durations(self, phonemes: int) -> torch.Tensor:
        """[1, 2, phonemes] for the next phonemes."""
        return self._draw(self._durations, phonemes, 2)

    def prior(self, channels: int, frames: int) -> torch.Tensor:
        """[1, channels, frames] for the next frames."""
        return self._draw(self._prior, frames, channels)

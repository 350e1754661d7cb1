"""HiFi-GAN decoding in overlapping blocks, joined by a short crossfade.

A block is decoded with up to `context_frames` latent frames on each side and cropped to its
own span; the decoder's receptive field is about 10 frames, so inside a chunk the stitched
audio equals a whole-chunk decode. The last `crossfade` samples of each block are held back
and blended with the same span as re-decoded by the next block: inside a chunk both agree and
the blend changes nothing; across a chunk join (where the earlier block had no right context)
it removes the seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class BlockOptions:
    first_block_frames: int = 8  # ~93 ms of audio at hop 256 / 22050 Hz: a fast first packet
    block_frames: tuple[int, ...] = (16, 32, 48)  # later blocks; the last size repeats
    context_frames: int = 10
    crossfade_samples: int = 256


def _fade_in(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n)).astype(np.float32)


class BlockDecoder:
    """Per-stream decoder state: the previous chunk's latent tail and the held audio tail."""

    def __init__(self, decode: Callable[[torch.Tensor], torch.Tensor], hop: int, options: BlockOptions = BlockOptions()) -> None:
        self.decode = decode
        self.hop = hop
        self.options = options
        self.blocks_done = 0
        self.latent_tail: torch.Tensor | None = None
        self._prefix = 0  # frames of the previous chunk's tail in front of the current chunk
        self.held = np.zeros(0, dtype=np.float32)
        self.fade_in = _fade_in(options.crossfade_samples)

    def _next_size(self, index: int) -> int:
        if index == 0:
            return self.options.first_block_frames
        sizes = self.options.block_frames
        return sizes[min(index - 1, len(sizes) - 1)]

    def plan(self, n_frames: int) -> list[tuple[int, int]]:
        """Block spans for a chunk of n_frames; a remainder under half a block joins the last block."""
        spans, start, index = [], 0, self.blocks_done
        while start < n_frames:
            size = self._next_size(index)
            end = n_frames if n_frames - start < size + size // 2 else start + size
            spans.append((start, end))
            start, index = end, index + 1
        return spans

    def begin_chunk(self, z: torch.Tensor) -> torch.Tensor:
        """Prefix the chunk with the previous chunk's latent tail; returns the joined latents."""
        joined = z if self.latent_tail is None else torch.cat([self.latent_tail, z], dim=2)
        self.latent_tail = joined[:, :, -self.options.context_frames :]
        self._prefix = joined.shape[2] - z.shape[2]
        return joined

    @torch.inference_mode()
    def decode_block(self, joined: torch.Tensor, start: int, end: int) -> np.ndarray:
        """Audio for chunk frames [start, end) ready to emit; the last crossfade samples stay held."""
        ctx, hop, xfade = self.options.context_frames, self.hop, self.options.crossfade_samples
        s, e = self._prefix + start, self._prefix + end
        left = min(ctx, s)
        right = min(ctx, joined.shape[2] - e)
        audio = self.decode(joined[:, :, s - left : e + right])[0, 0].float().cpu().numpy()
        body_start = left * hop
        body = audio[body_start : body_start + (e - s) * hop]
        self.blocks_done += 1

        overlap = min(len(self.held), body_start)
        if overlap:
            ramp = self.fade_in if overlap == xfade else _fade_in(overlap)
            redone = audio[body_start - overlap : body_start]
            joined_tail = self.held[-overlap:] * (1 - ramp) + redone * ramp
            head = np.concatenate([self.held[: len(self.held) - overlap], joined_tail])
        else:
            head = self.held
        out = np.concatenate([head, body])
        self.held = out[len(out) - xfade :].copy()
        return out[: len(out) - xfade]

    def release(self) -> np.ndarray:
        """Hand out the held tail (end of an utterance or a flush)."""
        held, self.held = self.held, np.zeros(0, dtype=np.float32)
        return held

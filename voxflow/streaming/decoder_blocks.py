"""HiFi-GAN decoding in overlapping blocks, joined by a short crossfade.

A block is decoded with up to `context_frames` latent frames on each side and cropped to its
own span. The context defaults to the voice's HiFi-GAN receptive field (computed from its
configuration: 11 frames for medium voices), so inside a chunk the stitched audio equals a
whole-chunk decode. A chunk's last block takes its right context from the provisional latents
of the phonemes still held back. The last `crossfade` samples of each block are held back and
blended with the same span as re-decoded by the next block: inside a chunk both agree and the
blend changes nothing; across a chunk join (where the right context was provisional) it
removes the seam.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch


@dataclass(frozen=True)
class BlockOptions:
    # With the medium voices' 11 frames of context on each side, a block's window fills the
    # decoder's 16-frame buckets exactly (32, 64, 96 frames): no padded frame is decoded. (Where
    # a side has less context, at a stream's start or a chunk's end, the window is padded.)
    first_block_frames: int = 10  # ~116 ms of audio at hop 256 / 22050 Hz: a fast first packet
    # Later blocks; the last size repeats. Larger blocks spend less of their time on context:
    # 0.054 s of decoding per second of audio against 0.076 with (16, 32, 48), single-threaded,
    # bfloat16 decoder (docs/ARCHITECTURE.md).
    block_frames: tuple[int, ...] = (42, 74)
    context_frames: int | None = None  # None: the voice decoder's receptive field
    crossfade_samples: int = 256


@dataclass(frozen=True)
class Window:
    """A block's latents with their context: `left` frames before the block's own `frames`."""

    latents: torch.Tensor
    left: int
    frames: int


# A change applied to each rendered window (a matched voice's transform, its watermark):
# (window audio, start, end) -> the window audio with samples [start, end) changed. The span
# is the block plus the crossfade before it, so both renderings of a crossfade are changed; the
# rest of the window is context the effect may analyse.
WindowEffect = Callable[[np.ndarray, int, int], np.ndarray]


def _fade_in(n: int) -> np.ndarray:
    return (0.5 - 0.5 * np.cos(np.pi * (np.arange(n, dtype=np.float32) + 0.5) / n)).astype(np.float32)


class BlockDecoder:
    """Per-stream decoder state: the previous chunk's latent tail and the held audio tail."""

    def __init__(
        self,
        decode: Callable[[torch.Tensor], torch.Tensor],
        hop: int,
        receptive_frames: int,
        options: BlockOptions = BlockOptions(),
        effect: WindowEffect | None = None,
    ) -> None:
        self.decode = decode
        self.effect = effect
        self.hop = hop
        self.options = options
        self.context = receptive_frames if options.context_frames is None else options.context_frames
        self.blocks_done = 0  # since the last release: picks the next block's size
        self.latent_tail: torch.Tensor | None = None
        self._prefix = 0  # frames of the previous chunk's tail in front of the current chunk
        self._span = 0  # frames of the current chunk itself (the rest of `joined` is right context)
        self.held = np.zeros(0, dtype=np.float32)
        self.fade_in = _fade_in(options.crossfade_samples)
        self._fade_next = False  # after a pause the audio resumes from silence

    def _next_size(self, index: int) -> int:
        if index == 0:
            return self.options.first_block_frames
        sizes = self.options.block_frames
        return sizes[min(index - 1, len(sizes) - 1)]

    def plan(self, n_frames: int, small_first: bool = True) -> list[tuple[int, int]]:
        """Block spans for a chunk of n_frames; a remainder under half a block joins the last block.

        small_first=False starts a run with a later block size: more audio from the first block,
        for when the next one may wait behind other work.
        """
        spans, start = [], 0
        index = self.blocks_done if small_first else max(1, self.blocks_done)
        while start < n_frames:
            size = self._next_size(index)
            end = n_frames if n_frames - start < size + size // 2 else start + size
            spans.append((start, end))
            start, index = end, index + 1
        return spans

    def begin_chunk(self, z: torch.Tensor, right: torch.Tensor | None = None) -> torch.Tensor:
        """Join the previous chunk's latent tail, the chunk and its provisional right context."""
        joined = z if self.latent_tail is None else torch.cat([self.latent_tail, z], dim=2)
        self.latent_tail = joined[:, :, -self.context :]
        self._prefix = joined.shape[2] - z.shape[2]
        self._span = z.shape[2]
        if right is not None and right.shape[2]:
            joined = torch.cat([joined, right[:, :, : self.context]], dim=2)
        return joined

    def decode_block(self, joined: torch.Tensor, start: int, end: int) -> np.ndarray:
        """Audio for chunk frames [start, end) ready to emit; the last crossfade samples stay held."""
        window = self.window(joined, start, end)
        return self.stitch(window, self.render(window))

    def window(self, joined: torch.Tensor, start: int, end: int) -> Window:
        """The latents block [start, end) is decoded from, with its context (cheap: a view)."""
        if not 0 <= start < end <= self._span:
            raise ValueError(f"block [{start}, {end}) is outside the chunk's {self._span} frames")
        s, e = self._prefix + start, self._prefix + end
        left = min(self.context, s)
        right = min(self.context, joined.shape[2] - e)
        return Window(joined[:, :, s - left : e + right], left, end - start)

    @torch.inference_mode()
    def render(self, window: Window) -> np.ndarray:
        """Run the decoder on a window. Touches no state: a chunk's windows may render at once."""
        audio = self.decode(window.latents)[0, 0].float().cpu().numpy()
        if self.effect is None:
            return audio
        body_start = window.left * self.hop
        return self.effect(audio, max(0, body_start - self.options.crossfade_samples), body_start + window.frames * self.hop)

    def stitch(self, window: Window, audio: np.ndarray) -> np.ndarray:
        """Crop a rendered window to its block and join it to the audio before, in block order."""
        hop, xfade = self.hop, self.options.crossfade_samples
        body_start = window.left * hop
        body = audio[body_start : body_start + window.frames * hop]
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
        if self._fade_next:
            n = min(xfade, len(out))
            out[:n] *= self.fade_in[:n] if n == xfade else _fade_in(n)
            self._fade_next = False
        self.held = out[len(out) - xfade :].copy()
        return out[: len(out) - xfade]

    def release(self, pause: bool = False) -> np.ndarray:
        """Hand out the held tail: at the end of an utterance, or at a pause in the text.

        The next block is then the first of a run again (small, for a fast restart). At a pause
        the tail fades out and the audio after it fades in, so the silence between them has no
        clicks; the latent context stays, so the words after the pause continue the sentence.
        """
        held, self.held = self.held, np.zeros(0, dtype=np.float32)
        self.blocks_done = 0
        if pause and len(held):
            held = held * self.fade_in[::-1][-len(held) :]
            self._fade_next = True
        return held

"""Chunk-attention acoustic step: phoneme ids of a piece of text -> settled decoder latents.

Each step encodes the sentence's unsettled ids together with a bounded window of its settled
phonemes (left context, so prosody carries across joins). Ids near the right edge have no
right context yet: their durations and latents would change once the next words arrive, so a
step may settle only the ids before its last few phonemes (lookahead.py decides which) and
leave the rest to the next step, which sees them again with new text to their right. The
frames of the unsettled ids, as far as they can be predicted now, still serve as right context
for the flow and the decoder, so the audio of the settled part is made with context on both
sides.

Nothing grows with the utterance: the encoder sees at most `context_phonemes` old phonemes,
the flow its own receptive field of old frames, so each step costs the same whatever came
before (re-encoding the whole prefix, as GPT-SoVITS streaming does, grows without bound).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..voices.vits import Scales, VitsSynthesizer, expand_by_durations
from ..voices.vits.noise import Noise


@dataclass(frozen=True)
class AcousticOptions:
    # Left context in phonemes (each phoneme is two ids: the symbol and the pad after it).
    # Attention is global, so more context keeps durations closer to the whole rendering;
    # docs/ARCHITECTURE.md has the measurements behind this default.
    context_phonemes: int = 96
    # Phonemes held back at the end of a step whose sentence goes on, rounded up to whole words.
    lookahead_phonemes: int = 8

    def __post_init__(self) -> None:
        if self.context_phonemes < 0 or self.lookahead_phonemes < 0:
            raise ValueError("context_phonemes and lookahead_phonemes must not be negative")


@dataclass(frozen=True)
class ChunkLatents:
    ids: tuple[int, ...]  # the ids settled by this step
    z: torch.Tensor  # [1, channels, frames] decoder input for the settled ids
    durations: torch.Tensor  # [settled ids] frames each, int64
    right: torch.Tensor  # [1, channels, k] provisional latents after z: right context for the decoder


class AcousticState:
    """Per-stream cache of a sentence's settled phonemes, duration noise and recent prior samples."""

    def __init__(
        self,
        model: VitsSynthesizer,
        scales: Scales,
        speaker_id: int | None,
        seed: int,
        options: AcousticOptions = AcousticOptions(),
    ) -> None:
        self.model = model
        self.scales = scales
        self.options = options
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        # Each stream owns its noise source, so a seed reproduces a stream exactly whatever
        # other streams run beside it, and draws it as a whole rendering with that seed does.
        self.noise = Noise(seed, self.device, self.dtype)
        self.speaker_id = speaker_id
        self.g: torch.Tensor | None = None  # computed on the compute thread at the first step
        self.flow_frames = model.cfg.flow_receptive_frames
        self.right_frames = self.flow_frames + model.cfg.generator.receptive_frames
        self.context: list[int] = []  # settled ids of the current sentence, at most the window
        channels = model.cfg.inter_channels
        # Duration noise of context + unsettled ids: drawn once per position, so ids said again
        # do not draw it again.
        self.duration_noise = torch.zeros(1, 2, 0, device=self.device, dtype=self.dtype)
        self.prior_tail = torch.zeros(1, channels, 0, device=self.device, dtype=self.dtype)
        self.encoded_lengths: deque[int] = deque(maxlen=64)  # encoder input length per step, for cost checks

    @property
    def context_ids(self) -> int:
        return 2 * self.options.context_phonemes

    def end_sentence(self) -> None:
        """Forget the text context after a sentence's end (as whole-text rendering does).

        The latent tail stays, so the next sentence joins the audio smoothly.
        """
        self.context = []
        self.duration_noise = self.duration_noise[:, :, :0]

    @torch.inference_mode()
    def step(self, pending: Sequence[int], settle: Callable[[list[int]], int] | None = None) -> ChunkLatents:
        """Encode the sentence's unsettled ids after its context; settle the first `settle(durations)`.

        `pending` is all of the sentence not yet settled: what the last step left unsettled,
        phonemized again together with the new text. `settle` sees the frames predicted for
        every pending id, so the caller can settle by audio length as well as by position;
        None settles all. The rest is left for the next step.
        """
        model, scales = self.model, self.scales
        if self.g is None and self.speaker_id is not None:
            self.g = model.speaker(self.speaker_id)
        pending = list(pending)
        n_ctx = len(self.context)
        ids = torch.as_tensor(self.context + pending, dtype=torch.long, device=self.device)
        self.encoded_lengths.append(len(ids))

        hidden, mean, log_scale = model.enc_p(ids[None])
        kept = self.duration_noise[:, :, : len(ids)]
        noise = torch.cat([kept, self.noise.durations(len(ids) - kept.shape[2]) * scales.noise_w], dim=2)
        durations = model.durations(hidden, noise, scales.length, self.g)[n_ctx:]
        n_settle = len(pending) if settle is None else settle(durations.tolist())
        if not 0 <= n_settle <= len(pending):
            raise ValueError(f"cannot settle {n_settle} of {len(pending)} ids")

        # Settled frames get their prior sample now; unsettled ones only their mean, enough to
        # give the flow and decoder a plausible right edge.
        mean, log_scale = mean[:, :, n_ctx:], log_scale[:, :, n_ctx:]
        settled = durations[:n_settle]
        prior = torch.zeros_like(self.prior_tail)
        if n_settle:
            mean_f = expand_by_durations(mean[:, :, :n_settle], settled)
            log_scale_f = expand_by_durations(log_scale[:, :, :n_settle], settled)
            prior = mean_f + self.noise.prior(*mean_f.shape[1:]) * torch.exp(log_scale_f) * scales.noise
        provisional = torch.zeros_like(self.prior_tail)
        if n_settle < len(pending):
            provisional = expand_by_durations(mean[:, :, n_settle:], durations[n_settle:])[:, :, : self.right_frames]
        tail = self.prior_tail.shape[2]
        z = model.flow.reverse(torch.cat([self.prior_tail, prior, provisional], dim=2), self.g)
        frames = prior.shape[2]

        self.context = (self.context + pending[:n_settle])[-self.context_ids :] if self.context_ids else []
        unsettled = len(pending) - n_settle
        self.duration_noise = noise[:, :, noise.shape[2] - len(self.context) - unsettled :]
        self.prior_tail = torch.cat([self.prior_tail, prior], dim=2)[:, :, -self.flow_frames :]
        return ChunkLatents(
            ids=tuple(pending[:n_settle]),
            z=z[:, :, tail : tail + frames],
            durations=settled,
            right=z[:, :, tail + frames :],
        )

"""Chunk-attention acoustic step: phoneme ids of one text chunk -> decoder latents.

Each chunk is encoded together with a bounded window of the phonemes before it, so prosody
carries across chunk joins, and durations and latent frames are produced for the new phonemes
only. Nothing grows with the utterance: the encoder sees at most `phoneme_context` old phonemes
and the flow at most `latent_context` old frames, so every chunk costs the same whatever came
before (re-encoding the whole prefix, as GPT-SoVITS streaming does, grows without bound).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..voices.vits import Scales, VitsSynthesizer, expand_by_durations


@dataclass(frozen=True)
class AcousticOptions:
    phoneme_context: int = 48
    # The flow's receptive field is 4 couplings x 4 WaveNet layers x +-2 frames = +-32 frames.
    latent_context: int = 32


@dataclass(frozen=True)
class ChunkLatents:
    z: torch.Tensor  # [1, channels, frames] decoder input for the new phonemes
    durations: torch.Tensor  # [new phonemes] frames each, int64


class AcousticState:
    """Per-stream cache of recent phonemes, their duration noise and recent prior samples."""

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
        # other streams run beside it.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.speaker_id = speaker_id
        self.g: torch.Tensor | None = None  # computed on the compute thread at the first step
        self.ids = torch.zeros(0, dtype=torch.long, device=self.device)
        channels = model.cfg.inter_channels
        self.duration_noise = torch.zeros(1, 2, 0, device=self.device, dtype=self.dtype)
        self.prior_tail = torch.zeros(1, channels, 0, device=self.device, dtype=self.dtype)
        self.encoded_lengths: list[int] = []  # encoder input length per step, for cost checks

    def end_utterance(self) -> None:
        """Forget the text context after an utterance's end; the latent tail stays for a smooth join."""
        self.ids = self.ids[:0]
        self.duration_noise = self.duration_noise[:, :, :0]

    def _randn(self, *shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator, device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def step(self, new_ids: Sequence[int]) -> ChunkLatents:
        model, opts, scales = self.model, self.options, self.scales
        if self.g is None and self.speaker_id is not None:
            self.g = model.speaker(self.speaker_id)
        new = torch.as_tensor(list(new_ids), dtype=torch.long, device=self.device)
        n_ctx = self.ids.shape[0]
        ids = torch.cat([self.ids, new])
        self.encoded_lengths.append(int(ids.shape[0]))

        hidden, mean, log_scale = model.enc_p(ids[None])
        noise = torch.cat([self.duration_noise, self._randn(1, 2, new.shape[0]) * scales.noise_w], dim=2)
        durations = model.durations(hidden, noise, scales.length, self.g)[n_ctx:]

        mean_f = expand_by_durations(mean[:, :, n_ctx:], durations)
        log_scale_f = expand_by_durations(log_scale[:, :, n_ctx:], durations)
        prior = mean_f + self._randn(*mean_f.shape) * torch.exp(log_scale_f) * scales.noise
        window = torch.cat([self.prior_tail, prior], dim=2)
        z = model.flow.reverse(window, self.g)[:, :, self.prior_tail.shape[2] :]

        self.ids = ids[-opts.phoneme_context :]
        self.duration_noise = noise[:, :, -opts.phoneme_context :]
        self.prior_tail = window[:, :, -opts.latent_context :]
        return ChunkLatents(z=z, durations=durations)

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
from torch.nn import functional as F

from ..voices.vits import Scales, VitsSynthesizer, expand_by_durations
from ..voices.vits.layers import length_mask
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
        # Each stream owns its noise source, so a seed draws the same noise for a stream whatever
        # other streams run beside it (batched steps included), and draws it as a whole
        # rendering with that seed does.
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

    def duration_noise_for(self, n_ids: int) -> torch.Tensor:
        """Duration noise [1, 2, n_ids] for context + pending ids: the context's as drawn before,
        fresh draws (scaled by noise_w) for the rest."""
        kept = self.duration_noise[:, :, :n_ids]
        return torch.cat([kept, self.noise.durations(n_ids - kept.shape[2]) * self.scales.noise_w], dim=2)

    def flow_input(self, mean: torch.Tensor, log_scale: torch.Tensor, durations: torch.Tensor, n_settle: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flow input, settled prior sample) for the pending ids' prior statistics [1, C, ids].

        Settled frames get their prior sample now; unsettled ones only their mean, enough to
        give the flow and decoder a plausible right edge.
        """
        prior = torch.zeros_like(self.prior_tail)
        if n_settle:
            settled = durations[:n_settle]
            mean_f = expand_by_durations(mean[:, :, :n_settle], settled)
            log_scale_f = expand_by_durations(log_scale[:, :, :n_settle], settled)
            prior = mean_f + self.noise.prior(*mean_f.shape[1:]) * torch.exp(log_scale_f) * self.scales.noise
        provisional = torch.zeros_like(self.prior_tail)
        if n_settle < len(durations):
            provisional = expand_by_durations(mean[:, :, n_settle:], durations[n_settle:])[:, :, : self.right_frames]
        return torch.cat([self.prior_tail, prior, provisional], dim=2), prior

    def settle(self, pending: list[int], n_settle: int, noise: torch.Tensor, durations: torch.Tensor, prior: torch.Tensor, z: torch.Tensor) -> ChunkLatents:
        """Keep the first n_settle pending ids as context and their prior as the latent tail;
        z is the flow's output for flow_input's frames."""
        tail, frames = self.prior_tail.shape[2], prior.shape[2]
        self.context = (self.context + pending[:n_settle])[-self.context_ids :] if self.context_ids else []
        unsettled = len(pending) - n_settle
        self.duration_noise = noise[:, :, noise.shape[2] - len(self.context) - unsettled :]
        self.prior_tail = torch.cat([self.prior_tail, prior], dim=2)[:, :, -self.flow_frames :]
        return ChunkLatents(
            ids=tuple(pending[:n_settle]),
            z=z[:, :, tail : tail + frames],
            durations=durations[:n_settle],
            right=z[:, :, tail + frames :],
        )

    def step(self, pending: Sequence[int], settle: Callable[[list[int]], int] | None = None) -> ChunkLatents:
        """Encode the sentence's unsettled ids after its context; settle the first `settle(durations)`.

        `pending` is all of the sentence not yet settled: what the last step left unsettled,
        phonemized again together with the new text. `settle` sees the frames predicted for
        every pending id, so the caller can settle by audio length as well as by position;
        None settles all. The rest is left for the next step.
        """
        return step_together([StepRequest(self, pending, settle)])[0]


@dataclass(frozen=True)
class StepRequest:
    state: AcousticState
    pending: Sequence[int]
    settle: Callable[[list[int]], int] | None = None


def _padded(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[1, C, T_i] tensors right-padded with zeros to the longest and stacked: [n, C, max T_i]."""
    if len(parts) == 1:
        return parts[0]  # a lone step: no copy
    longest = max(part.shape[2] for part in parts)
    return torch.cat([F.pad(part, (0, longest - part.shape[2])) for part in parts])


@torch.inference_mode()
def step_together(requests: Sequence[StepRequest]) -> list[ChunkLatents]:
    """One acoustic step (AcousticState.step) for each request, in one batch per model part.

    The requests' states must share a model. Batched, each sequence is right-padded to the
    longest and masked, so its result is its own step's up to float rounding (the kernels sum
    in another order); a batch of one runs unpadded, exactly as a step alone.
    """
    states = [request.state for request in requests]
    model = states[0].model
    if any(state.model is not model for state in states):
        raise ValueError("steps taken together must share a model")
    for state in states:
        if state.g is None and state.speaker_id is not None:
            state.g = model.speaker(state.speaker_id)
    pendings = [list(request.pending) for request in requests]
    n_ctx = [len(state.context) for state in states]
    ids = [state.context + pending for state, pending in zip(states, pendings)]
    for state, sequence in zip(states, ids):
        state.encoded_lengths.append(len(sequence))
    lengths = [len(sequence) for sequence in ids] if len(requests) > 1 else None
    device = states[0].device
    ids_batch = _padded([torch.as_tensor(sequence, dtype=torch.long, device=device)[None, None] for sequence in ids])[:, 0]
    g = None if states[0].g is None else torch.cat([state.g for state in states])

    hidden, mean, log_scale = model.enc_p(ids_batch, lengths)
    noises = [state.duration_noise_for(len(sequence)) for state, sequence in zip(states, ids)]
    mask = None if lengths is None else length_mask(lengths, hidden.device, hidden.dtype)
    log_w = model.dp(hidden, _padded(noises), g, mask)

    flow_inputs, settled = [], []
    for i, (state, request, pending) in enumerate(zip(states, requests, pendings)):
        durations = torch.ceil(torch.exp(log_w[i, 0, n_ctx[i] : len(ids[i])]) * state.scales.length).long()
        n_settle = len(pending) if request.settle is None else request.settle(durations.tolist())
        if not 0 <= n_settle <= len(pending):
            raise ValueError(f"cannot settle {n_settle} of {len(pending)} ids")
        own = slice(n_ctx[i], len(ids[i]))
        x, prior = state.flow_input(mean[i : i + 1, :, own], log_scale[i : i + 1, :, own], durations, n_settle)
        flow_inputs.append(x)
        settled.append((n_settle, durations, prior))

    frames = [x.shape[2] for x in flow_inputs]
    flow_mask = None if lengths is None else length_mask(frames, hidden.device, hidden.dtype)
    z = model.flow.reverse(_padded(flow_inputs), g, flow_mask)

    return [
        state.settle(pending, n_settle, noise, durations, prior, z[i : i + 1, :, : frames[i]])
        for i, (state, pending, noise, (n_settle, durations, prior)) in enumerate(zip(states, pendings, noises, settled))
    ]

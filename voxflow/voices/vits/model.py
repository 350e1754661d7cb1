"""The VITS synthesizer assembled from its parts, with the steps exposed one by one.

The streaming engine calls the steps separately (encode a window of phonemes, predict the new
phonemes' durations, expand, run the flow over a window of frames, decode blocks); `infer` runs
them end to end for a whole sentence, the way the voice file's own graph does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import TextEncoder
from .duration import StochasticDurationPredictor
from .flow import ResidualCouplingFlow
from ..scales import Scales
from .hifigan import Generator, GeneratorConfig
from .noise import Noise


@dataclass(frozen=True)
class VitsConfig:
    n_vocab: int
    inter_channels: int
    hidden_channels: int
    filter_channels: int
    n_heads: int
    n_layers: int
    kernel_size: int
    window: int
    dp_kernel_size: int
    dp_n_flows: int
    dp_num_bins: int
    flow_kernel_size: int
    flow_dilation_rate: int
    flow_n_layers: int
    flow_n_flows: int
    generator: GeneratorConfig
    n_speakers: int = 1
    gin_channels: int = 0

    @property
    def hop_length(self) -> int:
        return self.generator.hop_length

    @property
    def flow_receptive_frames(self) -> int:
        """Latent frames on each side that one flow output frame depends on.

        Each coupling's WaveNet reaches (kernel - 1) / 2 * dilation_rate**i frames per layer,
        and the couplings run one after another, so their reaches add up.
        """
        per_coupling = sum((self.flow_kernel_size - 1) // 2 * self.flow_dilation_rate**i for i in range(self.flow_n_layers))
        return per_coupling * self.flow_n_flows


def expand_by_durations(values: torch.Tensor, durations: torch.Tensor) -> torch.Tensor:
    """Repeat each phoneme's column durations[i] times: [1, C, T] x [T] -> [1, C, sum(durations)].

    Written as a comparison against cumulative ends (not repeat_interleave) so the same code
    exports to ONNX with a data-dependent output length.
    """
    ends = torch.cumsum(durations, 0)
    frames = torch.arange(ends[-1], device=values.device)
    owner = (frames[:, None] >= ends[None, :]).sum(1)
    return values[:, :, owner]


class VitsSynthesizer(nn.Module):
    def __init__(self, cfg: VitsConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.enc_p = TextEncoder(
            cfg.n_vocab, cfg.inter_channels, cfg.hidden_channels, cfg.filter_channels,
            cfg.n_heads, cfg.n_layers, cfg.kernel_size, cfg.window,
        )
        self.dp = StochasticDurationPredictor(
            cfg.hidden_channels, cfg.hidden_channels, cfg.dp_kernel_size, cfg.dp_n_flows, cfg.dp_num_bins, cfg.gin_channels
        )
        self.flow = ResidualCouplingFlow(
            cfg.inter_channels, cfg.hidden_channels, cfg.flow_kernel_size, cfg.flow_dilation_rate,
            cfg.flow_n_layers, cfg.flow_n_flows, cfg.gin_channels,
        )
        self.dec = Generator(cfg.generator)
        self.emb_g = nn.Embedding(cfg.n_speakers, cfg.gin_channels) if cfg.n_speakers > 1 else None

    def speaker(self, speaker_id: int | torch.Tensor | None) -> torch.Tensor | None:
        """Speaker conditioning [1, gin, 1], or None for single-speaker voices."""
        if self.emb_g is None:
            return None
        sid = torch.as_tensor([0 if speaker_id is None else speaker_id], device=self.emb_g.weight.device).reshape(1)
        return self.emb_g(sid).unsqueeze(-1)

    def durations(self, hidden: torch.Tensor, duration_noise: torch.Tensor, length_scale: float | torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        """Integer frame count per phoneme, [T] int64 (each >= 1: ceil of a positive number).

        duration_noise: [1, 2, T], already multiplied by noise_w.
        """
        log_w = self.dp(hidden, duration_noise, g)
        return torch.ceil(torch.exp(log_w) * length_scale)[0, 0].long()

    def infer(
        self,
        ids: torch.Tensor,
        scales: Scales | torch.Tensor = Scales(),
        speaker_id: int | torch.Tensor | None = None,
        noise: Noise | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Whole-sentence synthesis: ids [1, T] -> (audio [1, 1, samples], durations [T])."""
        z, durations = self.infer_latents(ids, scales, speaker_id, noise)
        return self.dec(z, self.speaker(speaker_id)), durations

    def infer_latents(
        self,
        ids: torch.Tensor,
        scales: Scales | torch.Tensor = Scales(),
        speaker_id: int | torch.Tensor | None = None,
        noise: Noise | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything before the decoder: ids [1, T] -> (latents [1, C, frames], durations [T]).

        `noise` defaults to a source seeded with 0.
        """
        if isinstance(scales, Scales):
            noise_scale, length, noise_w = scales.noise, scales.length, scales.noise_w
        else:
            noise_scale, length, noise_w = scales[0], scales[1], scales[2]
        g = self.speaker(speaker_id)
        hidden, mean, log_scale = self.enc_p(ids)
        if noise is None:
            noise = Noise(0, hidden.device, hidden.dtype)
        durations = self.durations(hidden, noise.durations(hidden.shape[2]) * noise_w, length, g)
        mean_f = expand_by_durations(mean, durations)
        log_scale_f = expand_by_durations(log_scale, durations)
        eps = noise.prior(mean_f.shape[1], mean_f.shape[2])
        return self.flow.reverse(mean_f + eps * torch.exp(log_scale_f) * noise_scale, g), durations

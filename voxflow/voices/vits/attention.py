"""Transformer text encoder with windowed relative-position attention (the VITS prior encoder).

Queries and keys carry absolute positions so that a streaming caller can encode a chunk of new
phonemes against a cached left context: relative offsets are computed from the positions, not
assumed to be a square self-attention over one sequence.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .layers import ChannelLayerNorm, length_mask, masked


def relative_offsets(length: int, window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[length, length, 2*window+1] one-hot of each (query, key) offset inside +-window.

    Offsets outside the window map to all zeros. As a dense tensor (rather than an index to
    gather and scatter with) the relative terms are two einsums, which export to ONNX as they
    run in torch.
    """
    positions = torch.arange(length, device=device)
    offsets = positions[None, :] - positions[:, None]
    inside = (offsets.abs() <= window).to(dtype)
    one_hot = F.one_hot((offsets + window).clamp(0, 2 * window), 2 * window + 1).to(dtype)
    return one_hot * inside[..., None]


class RelativeMultiHeadAttention(nn.Module):
    """Multi-head self-attention with learned relative-position terms inside +-window.

    Outside the window the relative terms are zero, exactly as in VITS, so attention itself
    still spans the whole sequence it is given; what bounds the streaming cost is the caller
    handing it only a bounded window of phonemes.
    """

    def __init__(self, channels: int, n_heads: int, window: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_channels = channels // n_heads
        self.window = window
        self.conv_q = nn.Conv1d(channels, channels, 1)
        self.conv_k = nn.Conv1d(channels, channels, 1)
        self.conv_v = nn.Conv1d(channels, channels, 1)
        self.conv_o = nn.Conv1d(channels, channels, 1)
        table = torch.zeros(1, 2 * window + 1, self.head_channels)
        self.emb_rel_k = nn.Parameter(table.clone())
        self.emb_rel_v = nn.Parameter(table.clone())

    def forward(self, x: torch.Tensor, offsets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """offsets: relative_offsets(length, window) for x's length, shared by every layer;
        mask: length_mask of a padded batch (None: no padding)."""
        batch, channels, length = x.shape
        heads, head_ch = self.n_heads, self.head_channels

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, heads, head_ch, length).transpose(2, 3)

        query = split_heads(self.conv_q(x)) / math.sqrt(head_ch)
        key = split_heads(self.conv_k(x))
        value = split_heads(self.conv_v(x))

        rel_logits = query @ self.emb_rel_k[0].transpose(0, 1)  # [b, h, length, 2w+1]
        scores = query @ key.transpose(-2, -1) + torch.einsum("bhir,ijr->bhij", rel_logits, offsets)
        if mask is not None:
            # Padding keys get no weight: exp(-1e4) underflows to exactly 0 beside real scores.
            scores = scores.masked_fill(mask[:, :, None, :] == 0, -1e4)
        weights = F.softmax(scores, dim=-1)
        per_offset = torch.einsum("bhij,ijr->bhir", weights, offsets)  # attention mass per offset
        out = weights @ value + per_offset @ self.emb_rel_v[0]
        return self.conv_o(out.transpose(2, 3).reshape(batch, channels, length))


class FeedForward(nn.Module):
    def __init__(self, channels: int, filter_channels: int, kernel_size: int) -> None:
        super().__init__()
        # Asymmetric 'same' padding keeps even kernel sizes aligned the way VITS trained them.
        self.pad = ((kernel_size - 1) // 2, kernel_size // 2)
        self.conv_1 = nn.Conv1d(channels, filter_channels, kernel_size)
        self.conv_2 = nn.Conv1d(filter_channels, channels, kernel_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = torch.relu(self.conv_1(F.pad(masked(x, mask), self.pad)))
        return self.conv_2(F.pad(masked(x, mask), self.pad))


class Encoder(nn.Module):
    def __init__(
        self, channels: int, filter_channels: int, n_heads: int, n_layers: int, kernel_size: int, window: int
    ) -> None:
        super().__init__()
        self.window = window
        self.attn_layers = nn.ModuleList(
            RelativeMultiHeadAttention(channels, n_heads, window) for _ in range(n_layers)
        )
        self.norm_layers_1 = nn.ModuleList(ChannelLayerNorm(channels) for _ in range(n_layers))
        self.ffn_layers = nn.ModuleList(
            FeedForward(channels, filter_channels, kernel_size) for _ in range(n_layers)
        )
        self.norm_layers_2 = nn.ModuleList(ChannelLayerNorm(channels) for _ in range(n_layers))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        offsets = relative_offsets(x.shape[2], self.window, x.device, x.dtype)
        for attn, norm1, ffn, norm2 in zip(self.attn_layers, self.norm_layers_1, self.ffn_layers, self.norm_layers_2):
            x = norm1(x + attn(x, offsets, mask))
            x = norm2(x + ffn(x, mask))
        return x


class TextEncoder(nn.Module):
    """Phoneme ids -> hidden states and the prior's per-phoneme mean and log-scale."""

    def __init__(
        self,
        n_vocab: int,
        out_channels: int,
        hidden_channels: int,
        filter_channels: int,
        n_heads: int,
        n_layers: int,
        kernel_size: int,
        window: int,
    ) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.hidden_channels = hidden_channels
        self.emb = nn.Embedding(n_vocab, hidden_channels)
        self.encoder = Encoder(hidden_channels, filter_channels, n_heads, n_layers, kernel_size, window)
        self.proj = nn.Conv1d(hidden_channels, out_channels * 2, 1)

    def forward(self, ids: torch.Tensor, lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [batch, T]; `lengths` of the sequences in a right-padded batch (None: none padded).
        Each sequence's outputs over its own positions are as if it were encoded alone; those
        over its padding are meaningless."""
        x = self.emb(ids) * math.sqrt(self.hidden_channels)
        mask = None if lengths is None else length_mask(lengths, x.device, x.dtype)
        x = self.encoder(x.transpose(1, 2), mask)
        mean, log_scale = torch.split(self.proj(x), self.out_channels, dim=1)
        return x, mean, log_scale

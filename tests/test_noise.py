"""Seeded noise: a sentence said in pieces draws the same noise as the sentence said whole."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.voices.vits.noise import Noise


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**64 - 1),
    channels=st.sampled_from([2, 5, 96, 192]),
    pieces=st.lists(st.integers(1, 40), min_size=1, max_size=6),
)
def test_noise_drawn_in_pieces_is_the_noise_drawn_at_once(seed, channels, pieces):
    whole, split = Noise(seed), Noise(seed)
    at_once = whole.durations(sum(pieces)), whole.prior(channels, sum(pieces))
    in_pieces = (
        torch.cat([split.durations(n) for n in pieces], dim=2),
        torch.cat([split.prior(channels, n) for n in pieces], dim=2),
    )
    assert at_once[0].shape == (1, 2, sum(pieces)) and at_once[1].shape == (1, channels, sum(pieces))
    assert torch.equal(at_once[0], in_pieces[0]) and torch.equal(at_once[1], in_pieces[1])


def test_seeds_give_different_noise_and_the_two_kinds_differ():
    a, b = Noise(1), Noise(2)
    assert not torch.equal(a.durations(8), b.durations(8))
    c = Noise(1)
    assert not torch.equal(c.durations(8)[0, 0], c.prior(2, 8)[0, 0])

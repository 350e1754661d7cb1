"""Word timestamps from the phoneme durations the acoustic model predicted."""

from __future__ import annotations

from itertools import accumulate
from typing import Sequence

from ..voices.phonemizer import WordSpan
from .events import WordTimestamp


def word_timestamps(
    context_id: str,
    words: Sequence[WordSpan],
    durations: Sequence[int],
    seconds_per_frame: float,
    offset: float,
) -> list[WordTimestamp]:
    """durations[i] frames for phoneme id i; spans index the same ids; offset = chunk start (s)."""
    ends = [0, *accumulate(durations)]
    return [
        WordTimestamp(
            context_id,
            span.text,
            round(offset + ends[span.start] * seconds_per_frame, 4),
            round(offset + ends[span.end] * seconds_per_frame, 4),
        )
        for span in words
    ]

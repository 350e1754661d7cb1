"""Which words of a sentence that goes on to say now, and which to hold for more context.

The acoustic model predicts a phoneme's duration and sound from the whole sentence around it.
While the sentence is still arriving, the words nearest its known end would change once the
next words exist, so they are held back (the lookahead) and said again, re-phonemized with the
new text, at the next say. Text arrives several times faster than it is spoken, so a say only
settles about as much audio as the listener needs until the next one: the rest waits and gets
more of its sentence to its right.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..voices.phonemizer import WordSpan


def word_cuts(ids: Sequence[int], words: Sequence[WordSpan], separator: int) -> list[int]:
    """Where the ids may be split: at each word separator between two input words.

    A piece cut there ends with the punctuation of its last word (a comma's pause belongs to
    it), and the text after it, phonemized without BOS, starts with that same separator. A
    separator inside one input word's span (espeak reads "$12.50" as several words) is no cut.
    """
    inside = [False] * len(ids)
    for word in words:
        for i in range(word.start + 1, word.end):
            inside[i] = True
    return [i for i, value in enumerate(ids) if value == separator and i > 0 and not inside[i]]


def settle_point(
    cuts: Sequence[int],
    durations: Sequence[int],
    *,
    lookahead_ids: int,
    enough_frames: float,
    most_held_ids: int,
    least_ids: int = 0,
) -> int:
    """How many ids to settle: up to one of the ascending `cuts`, none within the last `lookahead_ids`.

    Pieces are settled until they give `enough_frames` of audio and `least_ids` ids, then only
    while more than `most_held_ids` would stay unsettled (they are encoded again at every say,
    so a sentence that never ends must not make them grow without bound).
    """
    limit = len(durations) - lookahead_ids
    settle = frames = 0
    for cut in cuts:
        enough = frames >= enough_frames and settle >= least_ids
        if cut > limit or (enough and len(durations) - settle <= most_held_ids):
            break
        frames += sum(durations[settle:cut])
        settle = cut
    return settle


def can_settle(cuts: Sequence[int], n_ids: int, *, lookahead_ids: int, least_ids: int) -> bool:
    """Whether settle_point can settle `least_ids` ids of these: known before the acoustic step,
    since it depends on where the cuts and the lookahead fall, not on durations."""
    return least_ids == 0 or any(least_ids <= cut <= n_ids - lookahead_ids for cut in cuts)


def unsettled_text(text: str, words: Sequence[WordSpan], settle: int) -> str:
    """The part of `text` whose words end after id `settle`, as it was written.

    Spans name their input words in order; words without a span (punctuation alone) stay with
    the words around them.
    """
    tokens = text.split()
    index = 0  # of the token after the last settled word
    for span in words:
        if span.end > settle:
            break
        while index < len(tokens) and tokens[index] != span.text:
            index += 1
        index += 1
    return " ".join(tokens[index:])

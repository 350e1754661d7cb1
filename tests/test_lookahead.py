"""Which words a say settles while its sentence goes on, and the text it leaves for later."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from voxflow.streaming.lookahead import can_settle, settle_point, unsettled_text, word_cuts
from voxflow.voices.phonemizer import WordSpan

SEP = 3  # the word separator's id in these made-up sequences
PAD = 0


def sequence(*lengths: int, texts: list[str] | None = None) -> tuple[list[int], list[WordSpan]]:
    """BOS PAD, then words of the given phoneme counts (each phoneme + PAD), separated by SEP PAD."""
    ids, words = [1, PAD], []
    for i, n in enumerate(lengths):
        if i:
            ids += [SEP, PAD]
        start = len(ids)
        ids += [50 + i, PAD] * n
        words.append(WordSpan(texts[i] if texts else f"w{i}", start, len(ids)))
    return ids, words


def test_cuts_fall_on_separators_between_words_only() -> None:
    ids, words = sequence(2, 3, 1)
    assert word_cuts(ids, words, SEP) == [words[1].start - 2, words[2].start - 2]
    # espeak reading one input word as several: a separator inside its span is no cut.
    merged = [WordSpan("$12.50", words[0].start, words[1].end), words[2]]
    assert word_cuts(ids, merged, SEP) == [words[2].start - 2]


def test_comma_pauses_stay_with_the_word_before_them() -> None:
    # "red, green": the comma's id and its pad come before the separator that is cut.
    ids = [1, PAD, 60, PAD, 61, PAD, 8, PAD, SEP, PAD, 62, PAD]
    words = [WordSpan("red,", 2, 6), WordSpan("green", 10, 12)]
    assert word_cuts(ids, words, SEP) == [8]


def test_pieces_in_the_lookahead_are_not_settled() -> None:
    durations = [1] * 20
    cuts = [6, 12, 16]
    assert settle_point(cuts, durations, lookahead_ids=4, enough_frames=100, most_held_ids=100) == 16
    assert settle_point(cuts, durations, lookahead_ids=8, enough_frames=100, most_held_ids=100) == 12
    assert settle_point(cuts, durations, lookahead_ids=15, enough_frames=100, most_held_ids=100) == 0


def test_only_enough_audio_is_settled_while_more_text_may_come() -> None:
    durations = [3] * 30
    cuts = [6, 12, 18, 24]
    # The first piece (18 frames) is enough: the rest waits for more context ...
    assert settle_point(cuts, durations, lookahead_ids=2, enough_frames=12, most_held_ids=100) == 6
    # ... unless that would leave too much unsettled.
    assert settle_point(cuts, durations, lookahead_ids=2, enough_frames=12, most_held_ids=12) == 18
    # ... or fewer than least_ids would be settled (a first say beside other streams' work).
    assert settle_point(cuts, durations, lookahead_ids=2, enough_frames=12, most_held_ids=100, least_ids=10) == 12
    assert settle_point(cuts, durations, lookahead_ids=8, enough_frames=12, most_held_ids=100, least_ids=30) == 18
    assert can_settle(cuts, 30, lookahead_ids=8, least_ids=18) and not can_settle(cuts, 30, lookahead_ids=8, least_ids=19)


def test_unsettled_text_is_the_rest_as_written() -> None:
    text = "Well, I think -- that we should"
    _, words = sequence(3, 1, 3, 3, 2, 4, texts=["Well,", "I", "think", "that", "we", "should"])
    assert unsettled_text(text, words, 0) == text
    assert unsettled_text(text, words, words[3].start - 2) == "-- that we should"  # a soundless word stays with the rest
    assert unsettled_text(text, words, words[4].start - 2) == "we should"
    assert unsettled_text(text, words, words[-1].end) == ""


@given(st.lists(st.integers(1, 6), min_size=1, max_size=12), st.integers(0, 40), st.integers(0, 60), st.integers(0, 80))
def test_settled_ids_end_at_a_cut_outside_the_lookahead(lengths: list[int], lookahead: int, enough: int, most_held: int) -> None:
    ids, words = sequence(*lengths)
    cuts = word_cuts(ids, words, SEP)
    settle = settle_point(cuts, [2] * len(ids), lookahead_ids=lookahead, enough_frames=enough, most_held_ids=most_held)
    assert settle == 0 or settle in cuts
    assert settle <= max(0, len(ids) - lookahead)
    # The text left unsettled is exactly the words after the settle point.
    text = " ".join(w.text for w in words)
    assert unsettled_text(text, words, settle).split() == [w.text for w in words if w.end > settle]

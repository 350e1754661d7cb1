"""Text chunker and speech cleanup: examples, properties, the async driver and bad input."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from voxflow.streaming.chunker import (
    FLUSH,
    ChunkerClosed,
    ChunkerError,
    ChunkerOptions,
    ChunkerOverflow,
    Cut,
    Flush,
    TextChunk,
    TextChunker,
    chunk_stream,
)
from voxflow.streaming.text_cleanup import clean_for_speech


def feed(fragments: Iterable[str], options: ChunkerOptions = ChunkerOptions()) -> list[TextChunk]:
    chunker = TextChunker(options)
    chunks = [chunk for fragment in fragments for chunk in chunker.push(fragment)]
    return chunks + chunker.end()


def texts(chunks: list[TextChunk]) -> list[str]:
    return [chunk.text for chunk in chunks]


def tokens(text: str) -> list[str]:
    """Split the way an LLM tokenizer roughly does: each piece carries its leading space."""
    return re.findall(r"\s*\S+", text)


def word_list(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def spoken_words(text: str) -> int:
    return sum(any(ch.isalnum() for ch in token) for token in text.split())


# -- chunking examples --------------------------------------------------------------------------


def test_a_short_first_clause_is_not_spoken_alone() -> None:
    # "Happy birthday," alone would be said before the rest of its sentence exists.
    chunker = TextChunker()
    assert chunker.push("Happy") == []
    assert chunker.push(" birthday,") == []
    assert chunker.push(" Emma") == []
    assert chunker.push("!") == [TextChunk("Happy birthday, Emma!", 0, False, Cut.SENTENCE)]


@pytest.mark.parametrize("reply", ["Sure!", "Happy birthday, Emma!", "Got it, thanks.", "Not a problem."])
def test_short_replies_are_one_chunk(reply: str) -> None:
    assert [text for text in texts(feed(tokens(reply))) if text] == [reply]


def test_the_first_chunk_waits_for_three_words_across_a_comma() -> None:
    chunker = TextChunker()
    assert chunker.push("Hello there, how") == []
    assert chunker.push(" are you") == [TextChunk("Hello there, how", 0, False, Cut.WORD)]
    assert chunker.pending_text == "are you"


def test_first_chunk_is_cut_after_three_complete_words() -> None:
    chunker = TextChunker()
    for fragment in ["The", " quick", " brown"]:
        assert chunker.push(fragment) == []  # "brown" could still continue
    assert chunker.push(" fox") == [TextChunk("The quick brown", 0, False, Cut.WORD)]
    assert chunker.pending_text == "fox"


def test_words_split_across_fragments_are_never_cut() -> None:
    chunker = TextChunker(ChunkerOptions(first_chunk_words=3))
    assert chunker.push("It is incred") == []
    assert chunker.push("ible") == []
    assert texts(chunker.push(" and")) == ["It is incredible"]


def test_later_chunks_are_cut_at_every_clause_and_every_four_words() -> None:
    text = (
        "Sure, I can help. First, open the settings menu, then pick the display tab, and finally "
        "choose a theme you like best, because the default one is rather dull."
    )
    assert [(chunk.text, chunk.cut) for chunk in feed(tokens(text))] == [
        ("Sure, I can", Cut.WORD),  # the first chunk: three words, not the one-word clause
        ("help.", Cut.SENTENCE),  # a sentence end cuts however short the chunk
        ("First,", Cut.CLAUSE),  # later chunks: every clause, however short
        ("open the settings menu,", Cut.CLAUSE),
        ("then pick the display", Cut.WORD),  # a long clause after four words
        ("tab,", Cut.CLAUSE),
        ("and finally choose a", Cut.WORD),
        ("theme you like best,", Cut.CLAUSE),
        ("because the default one", Cut.WORD),
        ("is rather dull.", Cut.SENTENCE),  # the final chunk from end()
    ]


@pytest.mark.parametrize(
    ("later_chunk_words", "expected"),
    [
        (2, ["One two", "three four", "five six", "seven eight", "nine."]),
        (3, ["One two", "three four five", "six seven eight", "nine."]),
        (10, ["One two", "three four five six seven eight nine."]),
    ],
)
def test_later_chunk_words_is_configurable(later_chunk_words: int, expected: list[str]) -> None:
    options = ChunkerOptions(first_chunk_words=2, later_chunk_words=later_chunk_words)
    assert texts(feed(tokens("One two three four five six seven eight nine."), options)) == expected


def test_size_rules_restart_after_a_flush() -> None:
    chunker = TextChunker()
    assert texts(chunker.push("Okay, here we go now and then")) == ["Okay, here we"]
    assert texts(chunker.flush()) == ["go now and then"]
    # a first-chunk cut again: three words, where a later chunk would have ended at "Again,"
    assert texts(chunker.push("Again, some more words now")) == ["Again, some more"]


# Each tricky token sits where a false boundary would show as a cut: a sentence end cuts even a
# short first chunk, and a later chunk is cut at any boundary before its fourth word.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pi is about 3.14 and more text follows here.", ["Pi is about", "3.14 and more text", "follows here."]),
        ("So we need 1,000 at 12:30 or so.", ["So we need", "1,000 at 12:30 or", "so."]),
        ("Use e.g. the big one, for example.", ["Use e.g. the", "big one,", "for example."]),
        ("Ask Dr. Smith about it, then leave.", ["Ask Dr. Smith", "about it,", "then leave."]),
        ("Go to https://example.com/a?b=1, now.", ["Go to example.com,", "now."]),
        ("Okay. See https://example.com/a?b=1 now, please.", ["Okay.", "See example.com now,", "please."]),
    ],
)
def test_numbers_abbreviations_and_urls_are_not_boundaries(text: str, expected: list[str]) -> None:
    assert texts(feed(tokens(text))) == expected


def test_period_waits_for_the_next_fragment() -> None:
    chunker = TextChunker()
    assert chunker.push("Yes.") == []  # could still become "Yes.5" or the like
    assert texts(chunker.push(" No")) == ["Yes."]
    assert chunker.push(" it costs 3.") == []
    assert texts(chunker.push("50 each")) == ["No it costs 3.50"]  # four words, not a sentence end at "3."
    assert texts(chunker.end()) == ["each"]


def test_closing_quotes_and_markers_stay_with_their_sentence() -> None:
    chunks = feed(tokens('He said "stop." Then **it ended.** And more.'))
    assert texts(chunks) == ['He said "stop."', "Then it ended.", "And more."]
    # in a later chunk, where a clause cuts however short: the markers do not hide the ":"
    assert texts(feed(tokens("Okay. **Note:** this is it"))) == ["Okay.", "Note:", "this is it"]


def test_line_breaks_end_headings_and_list_items() -> None:
    chunks = feed(["# Shopping list\n\n- eggs", " and milk\n- bread\n1. first\n2. second"])
    assert texts(chunks) == ["Shopping list", "eggs and milk", "bread", "first", "second"]


def test_markdown_split_across_fragments_is_removed() -> None:
    chunks = feed(["This", " is", " *", "*really", " bold", "*", "*", " and", " `co", "de`", " text."])
    assert " ".join(texts(chunks)) == "This is really bold and code text."


def test_links_are_not_cut_inside() -> None:
    # in a later chunk, which would otherwise end at "Hello," and again after four words
    chunks = feed(tokens("See this. [Hello, my dear old world](https://x.com/a?b=1) is a site."))
    assert texts(chunks) == ["See this.", "Hello, my dear old world", "is a site."]
    assert "x.com" not in " ".join(texts(chunks))


def test_cjk_characters_count_as_words_and_cjk_punctuation_cuts() -> None:
    chunks = feed(["你好世界", "，今天天气", "很好。我们去", "公园吧！"])
    # three characters for the first chunk, then every CJK clause and every four characters
    assert texts(chunks) == ["你好世", "界，", "今天天气", "很好。", "我们去公", "园吧！", ""]


def test_mixed_latin_and_cjk() -> None:
    assert texts(feed(["我用Python写代码。好"], ChunkerOptions(first_chunk_words=3))) == ["我用Python", "写代码。", "好"]


def test_hard_word_limit_cuts_at_a_word_boundary() -> None:
    options = ChunkerOptions(first_chunk_words=2, later_chunk_words=10, max_words=5)
    chunks = feed(tokens("a b c d e f g h i j k l"), options)
    assert texts(chunks) == ["a b", "c d e f g", "h i j k l"]


def test_hard_char_limit_cuts_before_the_overflowing_word() -> None:
    options = ChunkerOptions(first_chunk_words=1, max_chars=12)
    chunks = feed(tokens("go alpha beta gamma delta epsilon"), options)
    assert texts(chunks) == ["go", "alpha beta", "gamma delta", "epsilon"]


def test_over_long_word_is_emitted_whole() -> None:
    long_word = "x" * 50
    options = ChunkerOptions(first_chunk_words=1, max_chars=20)
    assert texts(feed(["go ", long_word[:30], long_word[30:], " on"], options)) == ["go", long_word, "on"]


# -- flush, end and state ----------------------------------------------------------------------


def test_flush_returns_partial_words_as_a_final_chunk() -> None:
    chunker = TextChunker()
    chunker.push("Hi")
    assert chunker.flush() == [TextChunk("Hi", 0, True, Cut.SENTENCE)]
    assert chunker.pending_text == ""
    chunker.push(" wor")
    assert chunker.flush() == [TextChunk("wor", 1, True, Cut.SENTENCE)]
    assert chunker.flush() == []


def test_end_closes_the_chunker() -> None:
    chunker = TextChunker()
    chunker.push("Last words")
    assert chunker.end() == [TextChunk("Last words", 0, True, Cut.SENTENCE)]
    with pytest.raises(ChunkerClosed) as caught:
        chunker.push("more")
    assert isinstance(caught.value, ChunkerError) and isinstance(caught.value, ValueError)
    assert caught.value.code == "chunker_closed"
    assert chunker.end() == []


def test_unspeakable_chunks_are_not_emitted() -> None:
    chunker = TextChunker()
    assert chunker.push("😀 **") == []
    assert chunker.flush() == []
    assert chunker.push("Then words.") == []
    assert chunker.end() == [TextChunk("Then words.", 0, True, Cut.SENTENCE)]


@pytest.mark.parametrize(
    "bad",
    [
        {"later_chunk_words": 0},
        {"later_chunk_words": -1},
        {"max_words": 0},
        {"max_chars": 0},
        {"first_chunk_words": 0},
        {"stall_timeout_s": 0.0},
    ],
)
def test_options_are_validated(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ChunkerOptions(**bad)  # type: ignore[arg-type]


# -- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fragment", ["", "   ", "\n\t \n"])
def test_empty_and_blank_input_yields_nothing(fragment: str) -> None:
    chunker = TextChunker()
    assert chunker.push(fragment) == []
    assert chunker.end() == []


@pytest.mark.parametrize("fragment", [None, 42, b"bytes", ["list"]])
def test_non_string_fragments_are_rejected(fragment: object) -> None:
    with pytest.raises(TypeError):
        TextChunker().push(fragment)  # type: ignore[arg-type]


def test_lone_surrogates_and_control_characters_are_dropped() -> None:
    chunks = feed(["Hi\ud800", " the\x00re", "\x07 you\x1b", "\udfff\x7f"])
    assert texts(chunks) == ["Hi there you"]
    texts(chunks)[0].encode("utf-8")  # speakable text must be encodable


def test_oversized_fragment_raises_and_leaves_the_chunker_usable() -> None:
    chunker = TextChunker()
    chunker.push("Kept")
    with pytest.raises(ChunkerOverflow, match="20000") as caught:
        chunker.push("a" * 100_000)
    assert caught.value.code == "chunker_overflow"
    assert texts(chunker.end()) == ["Kept"]


def test_buffer_limit_counts_text_still_buffered() -> None:
    chunker = TextChunker(ChunkerOptions(max_buffer_chars=100))
    chunker.push("x" * 90)  # one unfinished word, nothing can be emitted
    with pytest.raises(ChunkerOverflow):
        chunker.push("y" * 20)
    assert chunker.pending_text == "x" * 90


@pytest.mark.parametrize(
    "text",
    [
        "word " * 4_000,  # many chunks
        "x" * 19_999,  # one word that never ends
        "你好。" * 6_666,
    ],
)
def test_single_character_fragments_scale_linearly(text: str) -> None:
    chunker = TextChunker()
    began = time.perf_counter()
    chunks = [chunk for ch in text for chunk in chunker.push(ch)] + chunker.end()
    assert time.perf_counter() - began < 2.0
    assert "".join(word_list(" ".join(texts(chunks)))) == "".join(word_list(text))


# -- speech cleanup ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "spoken"),
    [
        ("**bold** and __strong__ with _em_ and *it*", "bold and strong with em and it"),
        ("# Heading\n## Sub", "Heading Sub"),
        ("- one\n* two\n+ three\n1. four\n2) five", "one two three four five"),
        ("Call `run_job()` now", "Call run job() now"),
        ("```python\nprint(1)\n```", "print(1)"),
        ("See [the docs](https://x.com/a) first", "See the docs first"),
        ("![a cat](cat.png) sleeps", "a cat sleeps"),
        ("Visit https://www.example.com/path?q=1.", "Visit example.com."),
        ("at www.python.org today", "at python.org today"),
        ("Great 😀👍🏽 job ❤️ 1️⃣", "Great job 1"),
        ("Pi is 3.14, about 1,000 at 12:30", "Pi is 3.14, about 1,000 at 12:30"),
        ("2 * 3 is six", "2 * 3 is six"),
        ("你好，世界。", "你好，世界。"),
        ("a\x00b\x07c\ud800d\u200be", "abcde"),
        ("  lots \n\n of\t space  ", "lots of space"),
        (", and then", "and then"),
        ("---", ""),
        ("!!! ...", ""),
        ("🎉🎉", ""),
        ("It is 25°C", "It is 25°C"),
    ],
)
def test_clean_for_speech(raw: str, spoken: str) -> None:
    assert clean_for_speech(raw) == spoken


def test_line_markers_only_count_at_line_starts() -> None:
    assert clean_for_speech("2. Then", at_line_start=False) == "2. Then"
    assert clean_for_speech("2. Then\n3. Next", at_line_start=False) == "2. Then Next"
    assert clean_for_speech("C# and #tags stay") == "C# and #tags stay"


def test_clean_for_speech_is_linear_on_large_input() -> None:
    text = "**word** [link](http://x.com) 😀 `code` " * 5_000
    began = time.perf_counter()
    cleaned = clean_for_speech(text)
    assert time.perf_counter() - began < 2.0
    assert cleaned.split()[:4] == ["word", "link", "code", "word"]


# -- properties ---------------------------------------------------------------------------------

_WORD = st.text("abcdefghijklmnopqrstuvwxyz0123456789", min_size=1, max_size=8)
_PUNCT = st.sampled_from(list(".,;:!?"))
_SPACE = st.sampled_from([" ", " ", " ", "  ", "\n"])
_MESSY = st.lists(st.one_of(_WORD, _PUNCT, _SPACE), max_size=120).map("".join)
_LETTERS = st.text("abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=8)
_PROSE_TOKEN = st.one_of(
    st.tuples(_LETTERS, st.sampled_from(["", "", ",", ".", "!", "?", ";", ":"])).map("".join),
    st.sampled_from(["3.14", "1,000", "12:30", "42", "e.g.", "i.e.", "Dr."]),
)
_PROSE = st.lists(st.tuples(_PROSE_TOKEN, _SPACE), min_size=1, max_size=80).map(
    lambda pairs: "".join(token + space for token, space in pairs).rstrip()
)
_OPTIONS = st.builds(
    ChunkerOptions,
    first_chunk_words=st.integers(1, 6),
    later_chunk_words=st.integers(1, 20),
    max_words=st.integers(2, 40),
    max_chars=st.integers(10, 300),
)


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


def check_limits(chunks: list[TextChunk], options: ChunkerOptions) -> None:
    for chunk in chunks:
        assert (chunk.text or chunk.final) and chunk.text == chunk.text.strip()
        single_word = len(chunk.text.split()) == 1
        assert spoken_words(chunk.text) <= options.max_words
        assert len(chunk.text) <= options.max_chars or single_word, chunk


@settings(deadline=None, max_examples=300)
@given(text=_MESSY, cuts=st.lists(st.integers(0, 10_000), max_size=40), options=_OPTIONS)
def test_property_words_survive_in_order_within_limits(text: str, cuts: list[int], options: ChunkerOptions) -> None:
    chunker = TextChunker(options)
    pushed = [chunk for fragment in split_at(text, cuts) for chunk in chunker.push(fragment)]
    ended = chunker.end()
    chunks = pushed + ended
    # (a) every word comes out once, in order, and (b) unsplit: a split word would show as two
    assert word_list(" ".join(texts(chunks))) == word_list(clean_for_speech(text))
    # (c) nothing is left behind, and only end() produces the final chunk
    assert chunker.pending_text == ""
    assert [chunk.index for chunk in chunks] == list(range(len(chunks)))
    assert not any(chunk.final for chunk in pushed) and all(chunk.final for chunk in ended) and len(ended) <= 1
    # (d) size limits, an early first chunk, and later chunks no longer than later_chunk_words
    check_limits(chunks, options)
    if pushed:
        assert spoken_words(pushed[0].text) <= options.first_chunk_words
    assert all(spoken_words(chunk.text) <= options.later_chunk_words for chunk in pushed[1:])


@settings(deadline=None, max_examples=300)
@given(text=_PROSE, cuts=st.lists(st.integers(0, 10_000), max_size=40), options=_OPTIONS)
def test_property_prose_tokens_are_never_split(text: str, cuts: list[int], options: ChunkerOptions) -> None:
    chunks = feed(split_at(text, cuts), options)
    assert " ".join(texts(chunks)).split() == text.split()
    check_limits(chunks, options)


_CJK_PIECES = [*"你好世界天气很公园我们的", *"。！？，、；：", "abc", "Python", "3.14", " "]
_CJK_TEXT = st.lists(st.sampled_from(_CJK_PIECES), max_size=120)


@settings(deadline=None, max_examples=200)
@given(text=_CJK_TEXT.map("".join), cuts=st.lists(st.integers(0, 10_000), max_size=30), options=_OPTIONS)
def test_property_cjk_keeps_every_character(text: str, cuts: list[int], options: ChunkerOptions) -> None:
    chunks = feed(split_at(text, cuts), options)
    # repeated punctuation may be dropped after a cut ("你。" then "。"); characters never are
    assert [ch for chunk in chunks for ch in chunk.text if ch.isalnum()] == [ch for ch in text if ch.isalnum()]
    for chunk in chunks:  # each CJK character is a word, and so is each run of Latin text
        assert len(re.findall(r"[\u4e00-\u9fff]|[A-Za-z0-9.]+", chunk.text)) <= options.max_words


@settings(deadline=None)
@given(
    text=st.text(st.characters(exclude_categories=()), max_size=200),  # surrogates and controls included
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
)
def test_property_any_text_is_handled(text: str, cuts: list[int]) -> None:
    chunks = feed(split_at(text, cuts))
    for chunk in chunks:
        chunk.text.encode("utf-8")
        # nothing unspeakable is left: cleaning again changes nothing
        assert clean_for_speech(chunk.text, at_line_start=False) == chunk.text


# -- async driver -------------------------------------------------------------------------------


async def collect(source: AsyncIterator[str | Flush], options: ChunkerOptions) -> list[TextChunk]:
    return [chunk async for chunk in chunk_stream(source, options)]


async def test_a_stall_hands_out_the_buffered_text_as_a_pause_before_the_source_resumes() -> None:
    resumed = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        for fragment in ["Hello", " there", " my"]:
            yield fragment
        await asyncio.sleep(0.3)
        resumed.set()
        yield " friend."

    seen: list[tuple[TextChunk, bool]] = []
    async for chunk in chunk_stream(source(), ChunkerOptions(stall_timeout_s=0.05)):
        seen.append((chunk, resumed.is_set()))
    assert seen == [
        (TextChunk("Hello there my", 0, False, Cut.PAUSE), False),  # the utterance stays open
        (TextChunk("friend.", 1, True, Cut.SENTENCE), True),
    ]


async def test_flush_sentinel_and_exhaustion() -> None:
    async def source() -> AsyncIterator[str | Flush]:
        yield "Hi"
        yield FLUSH
        yield " there"

    assert await collect(source(), ChunkerOptions()) == [
        TextChunk("Hi", 0, True, Cut.SENTENCE),
        TextChunk("there", 1, True, Cut.SENTENCE),
    ]


async def test_source_errors_propagate() -> None:
    async def source() -> AsyncIterator[str]:
        yield "Hello"
        raise RuntimeError("llm went away")

    with pytest.raises(RuntimeError, match="llm went away"):
        await collect(source(), ChunkerOptions())


async def test_non_string_from_the_source_is_rejected() -> None:
    async def source() -> AsyncIterator[str]:
        yield 7  # type: ignore[misc]

    with pytest.raises(TypeError):
        await collect(source(), ChunkerOptions())


async def test_closing_early_cancels_the_pending_source_call() -> None:
    source_cancelled = asyncio.Event()

    async def source() -> AsyncIterator[str]:
        yield "Hello there"
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            source_cancelled.set()
            raise
        yield " never"

    async with aclosing(chunk_stream(source(), ChunkerOptions(stall_timeout_s=0.05))) as stream:
        async for chunk in stream:
            assert chunk.text == "Hello there"
            break
    assert source_cancelled.is_set()
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_cancelling_the_consumer_leaves_no_tasks() -> None:
    async def source() -> AsyncIterator[str]:
        yield "Waiting"
        await asyncio.sleep(30)
        yield " never"

    consumer = asyncio.ensure_future(collect(source(), ChunkerOptions(stall_timeout_s=0.05)))
    await asyncio.sleep(0.2)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    assert asyncio.all_tasks() == {asyncio.current_task()}


def test_closing_an_utterance_whose_text_is_out_emits_an_empty_final_chunk() -> None:
    chunker = TextChunker()
    chunks = chunker.push("Hello there, my friend. ")
    assert chunks and not any(c.final for c in chunks)
    assert chunker.utterance_open
    closing = chunker.flush()
    assert [(c.text, c.final) for c in closing] == [("", True)]
    assert not chunker.utterance_open
    assert chunker.flush() == []  # nothing new since: no marker


async def test_a_stall_after_text_is_out_is_reported_once_and_keeps_the_utterance_open() -> None:
    async def source():
        yield "Hello there friend. "
        await asyncio.sleep(0.3)
        yield "More."

    options = ChunkerOptions(stall_timeout_s=0.05)
    got = [(c.text, c.final, c.cut) async for c in chunk_stream(source(), options)]
    assert got == [
        ("Hello there friend.", False, Cut.SENTENCE),
        ("", False, Cut.PAUSE),  # one pause, not one per timeout
        ("More.", True, Cut.SENTENCE),  # the end closes the utterance the pause kept open
    ]


def test_pause_reports_text_once_and_restarts_the_size_rules() -> None:
    chunker = TextChunker()
    assert chunker.pause() == []  # nothing said, nothing to report
    assert texts(chunker.push("One two three four five")) == ["One two three"]
    assert chunker.pause() == [TextChunk("four five", 1, False, Cut.PAUSE)]
    assert chunker.pause() == []
    # a first chunk again: three words, where a later chunk would have ended at "Six,"
    assert texts(chunker.push("Six, seven eight nine ten")) == ["Six, seven eight"]
    assert chunker.end() == [TextChunk("nine ten", 3, True, Cut.SENTENCE)]


def test_a_pause_inside_a_link_keeps_the_link_whole() -> None:
    # Tokens stalled mid-URL: saying "the link" now and "com/a)" later would read the URL out.
    chunker = TextChunker()
    assert texts(chunker.push("Sure, this is [the link](https://exam")) == ["Sure, this is"]
    # The stream still learns of the stall (an empty pause chunk), once.
    assert chunker.pause() == [TextChunk("", 1, False, Cut.PAUSE)]
    assert chunker.pause() == []
    spoken = texts(chunker.push("ple.com/a) you asked for. ") + chunker.end())
    assert " ".join(spoken).split() == "the link you asked for.".split()


def test_a_pause_says_what_precedes_a_link_and_keeps_the_link() -> None:
    chunker = TextChunker()
    assert texts(chunker.push("One two three four [a")) == ["One two three"]
    assert chunker.pause() == [TextChunk("four", 1, False, Cut.PAUSE)]
    assert texts(chunker.push(" b](x) c")) == []
    assert texts(chunker.end()) == ["a b c"]

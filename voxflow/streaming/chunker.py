"""Incremental text chunker: LLM token fragments in, speakable chunks out.

The first chunk of an utterance is cut after a few words, or at the sentence's end if that
comes first, so audio can start quickly. A short first clause ("Happy birthday,") is not cut
on its own: its words would be spoken before the rest of the sentence exists. Later chunks end
at every clause or sentence boundary and every few words: the stream gathers them and decides
how much to say at once (docs/ARCHITECTURE.md). A hard size limit bounds every chunk. Each
chunk says how it was cut, so the stream knows whether the sentence goes on (hold back a
lookahead), ended, or paused.

The scanner walks each character once and remembers where it stopped, so pushing text costs
time linear in its length however it is split into fragments. Positions are offsets in the whole
stream (not in the buffer), which lets the buffer drop emitted text without renumbering.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Final

from ..errors import VoxflowError
from .text_cleanup import clean_for_speech


@dataclass(frozen=True)
class ChunkerOptions:
    first_chunk_words: int = 3
    # Later chunks end at every clause or sentence boundary, and inside a long clause after
    # this many words: the stream, not the chunker, decides how much text to say at once, so
    # it must see words as soon as they are complete.
    later_chunk_words: int = 4
    clause_cuts: bool = True  # off: only sentence ends and the size caps cut (whole-text rendering)
    max_words: int = 40
    max_chars: int = 300
    stall_timeout_s: float = 0.25
    max_buffer_chars: int = 20_000  # push beyond this raises ChunkerOverflow (a bounded buffer)

    def __post_init__(self) -> None:
        counts = (self.first_chunk_words, self.later_chunk_words, self.max_words, self.max_chars, self.max_buffer_chars)
        if min(counts) < 1:
            raise ValueError("chunker word and character limits must be positive")
        if self.stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be positive")


class Cut(enum.IntEnum):
    """Where a chunk ends, by strength of the boundary."""

    WORD = 0  # inside a clause (first chunk, size cap): the sentence goes on
    CLAUSE = 1  # after , ; : -- the sentence goes on
    SENTENCE = 2  # after . ! ? or a line break: nothing later changes how it is said
    PAUSE = 3  # the text stalled: say all of it when the listener needs it; the sentence may go on


@dataclass(frozen=True)
class TextChunk:
    text: str  # cleaned, speakable text; empty only in a final or pause chunk
    index: int  # 0, 1, 2... per chunker
    final: bool  # emitted by flush()/end(): the utterance closes and all its audio is released
    cut: Cut = Cut.WORD


class ChunkerError(VoxflowError, ValueError):
    code = "chunker_error"


class ChunkerClosed(ChunkerError):
    code = "chunker_closed"


class ChunkerOverflow(ChunkerError):
    code = "chunker_overflow"


class Flush:
    """Type of the FLUSH sentinel an async fragment source yields to ask for a flush."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FLUSH"


FLUSH: Final = Flush()

# Boundary strengths, as the cuts they make; a sentence end always allows a cut.
_NONE, _CLAUSE, _SENTENCE = Cut.WORD, Cut.CLAUSE, Cut.SENTENCE

_SENTENCE_PUNCT = frozenset(".!?…")
_CLAUSE_PUNCT = frozenset(",;:")
# After a letter these cannot be part of a number or a time ("1,000", "12:30"), so they cut at
# once instead of waiting for the next fragment to show a space. ":" and "." always wait
# ("http://", "3.14", "e.g.").
_IMMEDIATE = frozenset(",;!?")
_CJK_PUNCT = {**dict.fromkeys("。！？", _SENTENCE), **dict.fromkeys("，、；：", _CLAUSE)}
# May sit between a sentence's final punctuation and the space after it: '"Done."' or '**Note:**'.
_CLOSERS = frozenset("\"')]}»”’*_`")
_OPENERS = "\"'([{“‘*_`"
_URL_PREFIXES = ("http://", "https://", "www.")
_ABBREVIATIONS = frozenset({"Mr.", "Mrs.", "Ms.", "Dr.", "Prof.", "Sr.", "Jr.", "St.", "vs.", "cf.", "approx."})

# Markdown link states: a cut inside "[text](url)" would leave both halves unreadable.
_NO_LINK, _LINK_TEXT, _LINK_CLOSED, _LINK_URL = range(4)
_MAX_LINK_TEXT = 200  # an unmatched "[" must not suppress boundaries for the rest of the reply


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (
        0x3040 <= cp <= 0x30FF  # kana
        or 0x3400 <= cp <= 0x4DBF
        or 0x4E00 <= cp <= 0x9FFF
        or 0xF900 <= cp <= 0xFAFF
        or 0xFF66 <= cp <= 0xFF9F  # half-width katakana
        or 0x20000 <= cp <= 0x2FFFF
    )


def _is_abbreviation(token: str) -> bool:
    """True for dotted abbreviations like "e.g." / "U.S.", initials like "J.", and common titles."""
    token = token.lstrip(_OPENERS)
    if token in _ABBREVIATIONS:
        return True
    letters = token.split(".")[:-1]
    if not token.endswith(".") or not letters or not all(len(p) == 1 and p.isalpha() for p in letters):
        return False
    return len(letters) > 1 or (token[0].isupper() and token != "I.")  # "... than I." ends a sentence


class TextChunker:
    """Pure, synchronous chunker: push fragments, get the chunks that became ready.

    A final chunk (from flush or end) closes an utterance, so the chunk after it is cut early
    again: the listener is waiting for audio once more.
    """

    def __init__(self, options: ChunkerOptions = ChunkerOptions()) -> None:
        self._opts = options
        self._buf = ""  # stream text from offset _base on; everything before it was emitted
        self._base = 0
        self._pos = 0  # next stream offset to scan
        self._closed = False
        self._out: list[TextChunk] = []
        self._index = 0
        self._run = 0  # chunks since the last final or pause one; picks the size rules
        self._open = False  # chunks went out since the last final one: a flush must close them
        self._line_has_content = False
        # the chunk being built
        self._start = 0  # its first non-space offset (leading whitespace is skipped)
        self._words = 0
        self._last_word_end = -1  # where a forced cut may go
        self._at_line_start = True
        # the whitespace-delimited token being scanned (CJK characters are tokens of their own)
        self._token_start = -1
        self._token_has_alnum = False
        self._token_at_line_start = False
        # sentence or clause punctuation that still needs a following space to count
        self._pending = _NONE
        self._pending_at = -1
        self._link = _NO_LINK
        self._link_start = -1

    @property
    def pending_text(self) -> str:
        return self._buf[self._start - self._base :]

    @property
    def utterance_open(self) -> bool:
        """Text came in since the last final or pause chunk: a stall has something to report."""
        return self._run > 0 or bool(self.pending_text)

    def push(self, fragment: str) -> list[TextChunk]:
        if not isinstance(fragment, str):
            raise TypeError(f"fragment must be str, not {type(fragment).__name__}")
        if self._closed:
            raise ChunkerClosed("the chunker has ended; no more text can be pushed")
        buffered = len(self._buf) - (self._start - self._base)
        if buffered + len(fragment) > self._opts.max_buffer_chars:
            raise ChunkerOverflow(
                f"{buffered + len(fragment)} buffered characters would exceed the limit of "
                f"{self._opts.max_buffer_chars}; push smaller fragments"
            )
        self._buf += fragment
        end = self._base + len(self._buf)
        while self._pos < end:
            self._step(self._pos, self._buf[self._pos - self._base])
            self._pos += 1
        if self._start > self._base:
            self._buf = self._buf[self._start - self._base :]
            self._base = self._start
        return self._take()

    def flush(self) -> list[TextChunk]:
        return self._emit_all(final=True, cut=Cut.SENTENCE)

    def pause(self) -> list[TextChunk]:
        """The text stalled: everything buffered, as a non-final chunk that says so.

        The next chunk is cut early again, like an utterance's first: the listener may be
        waiting. A pause chunk is emitted even without text, so the stream learns of the stall.
        Inside a markdown link it stops where the link starts and keeps the link until it
        closes: a cut there would speak the URL's tail ("com slash a") once the rest arrived.
        """
        if not self._in_link():
            return self._emit_all(final=False, cut=Cut.PAUSE)
        cut_at = max(self._link_start, self._start)
        self._emit(cut_at, final=False, cut=Cut.PAUSE, always=self._run > 0)
        if cut_at > self._start:
            self._start, self._at_line_start = cut_at, False
        self._run = 0
        return self._take()

    def _emit_all(self, *, final: bool, cut: Cut) -> list[TextChunk]:
        end = self._base + len(self._buf)
        self._emit(end, final=final, cut=cut, always=self._open if final else self._run > 0)
        self._run = 0
        self._buf, self._base = "", end
        self._start = end
        self._token_start = -1
        self._pending = _NONE
        self._link = _NO_LINK
        return self._take()

    def end(self) -> list[TextChunk]:
        chunks = self.flush()
        self._closed = True
        return chunks

    # -- scanning ---------------------------------------------------------------------------

    def _step(self, i: int, ch: str) -> None:
        if ch.isspace():
            self._space(i, ch)
            return
        self._enforce_max_chars(i)
        # A word, CJK characters included, is complete once the next character shows it, so
        # punctuation that follows a word is still cut together with it.
        cjk_kind = _CJK_PUNCT.get(ch)
        if cjk_kind is not None or _is_cjk(ch):
            self._end_token(i)  # CJK ends a run of Latin text without a space
            if cjk_kind is None:
                self._maybe_cut(i, _NONE)
            self._single_char_token(i, alnum=cjk_kind is None)
            if cjk_kind is not None:
                self._maybe_cut(i + 1, cjk_kind)
        else:
            if ch.isalnum() and self._token_start < 0:
                self._maybe_cut(i, _NONE)
            self._text_char(i, ch)

    def _space(self, i: int, ch: str) -> None:
        kind = _NONE
        if self._pending and not self._pending_is_abbreviation():
            kind = self._pending
        self._pending = _NONE
        if self._token_start >= 0:
            self._end_token(i)
        if ch == "\n":
            kind = _SENTENCE  # headings and list items end at the line break
            self._line_has_content = False
        if ch == "\n" or self._link != _LINK_TEXT:
            self._link = _NO_LINK
        self._maybe_cut(i, kind)
        if self._start == i:
            self._start = i + 1

    def _text_char(self, i: int, ch: str) -> None:
        if self._token_start < 0:
            self._begin_token(i)
        self._token_has_alnum = self._token_has_alnum or ch.isalnum()
        self._track_link(i, ch)
        if ch in _SENTENCE_PUNCT or ch in _CLAUSE_PUNCT:
            kind = _SENTENCE if ch in _SENTENCE_PUNCT else _CLAUSE
            if ch in _IMMEDIATE and self._follows_letter(i) and not self._in_link() and not self._in_url():
                self._pending = _NONE
                self._end_token(i + 1)
                self._maybe_cut(i + 1, kind)
            else:
                self._pending = max(self._pending, kind)
                self._pending_at = i
        elif ch not in _CLOSERS:
            self._pending = _NONE

    def _single_char_token(self, i: int, *, alnum: bool) -> None:
        self._pending = _NONE
        self._begin_token(i)
        self._token_has_alnum = alnum
        if self._link == _LINK_CLOSED:
            self._link = _NO_LINK
        self._end_token(i + 1)

    def _begin_token(self, i: int) -> None:
        self._token_start = i
        self._token_has_alnum = False
        self._token_at_line_start = not self._line_has_content
        self._line_has_content = True
        if self._start == i:
            self._at_line_start = self._token_at_line_start

    def _end_token(self, end: int) -> None:
        if self._token_start < 0:
            return
        if self._token_has_alnum:
            self._words += 1
        self._last_word_end = end
        self._token_start = -1

    def _track_link(self, i: int, ch: str) -> None:
        if ch == "[":
            self._link, self._link_start = _LINK_TEXT, i
        elif self._link == _LINK_TEXT:
            if ch == "]":
                self._link = _LINK_CLOSED
            elif i - self._link_start > _MAX_LINK_TEXT:
                self._link = _NO_LINK
        elif self._link == _LINK_CLOSED:
            self._link = _LINK_URL if ch == "(" else _NO_LINK
        elif self._link == _LINK_URL and ch == ")":
            self._link = _NO_LINK

    def _in_link(self) -> bool:
        return self._link in (_LINK_TEXT, _LINK_URL)

    def _follows_letter(self, i: int) -> bool:
        return i > self._token_start and self._buf[i - 1 - self._base].isalpha()

    def _in_url(self) -> bool:
        head = self._buf[self._token_start - self._base : self._token_start - self._base + 8]
        return head.lower().startswith(_URL_PREFIXES)

    def _pending_is_abbreviation(self) -> bool:
        token = self._buf[self._token_start - self._base : self._pending_at + 1 - self._base]
        numbered_item = self._token_at_line_start and token[:-1].isdigit() and token[-1] == "."
        return numbered_item or _is_abbreviation(token)

    # -- cutting ----------------------------------------------------------------------------

    def _maybe_cut(self, at: int, kind: Cut) -> None:
        """Cut before `at` if the chunk is full, or if `kind` of boundary is enough at this size."""
        if self._words == 0:
            return
        opts = self._opts
        full = self._words >= opts.max_words or at - self._start >= opts.max_chars
        if not full:
            if self._in_link():
                return
            if self._run == 0:
                wanted = kind == _SENTENCE or self._words >= opts.first_chunk_words
            else:
                clause = kind == _CLAUSE and opts.clause_cuts
                wanted = kind == _SENTENCE or clause or self._words >= opts.later_chunk_words
            if not wanted:
                return
        self._emit(at, final=False, cut=kind)
        self._start = at

    def _enforce_max_chars(self, i: int) -> None:
        # Checked before every non-space character joins the chunk, so the cut comes before the
        # one that would overflow it; with no earlier word end the chunk is a single over-long
        # word, cut when it completes.
        if i + 1 - self._start <= self._opts.max_chars or self._last_word_end <= self._start:
            return
        self._emit(self._last_word_end, final=False, cut=Cut.WORD)
        if self._token_start >= 0:
            self._start = self._token_start
            self._at_line_start = self._token_at_line_start
        else:
            self._start = i

    def _emit(self, end: int, *, final: bool, cut: Cut, always: bool = False) -> None:
        raw = self._buf[self._start - self._base : end - self._base]
        text = clean_for_speech(raw, at_line_start=self._at_line_start)
        # A final chunk is emitted even without text when earlier chunks left the utterance
        # open: the engine needs the signal to close it and release the audio it holds. So is
        # a pause chunk after text: the engine must learn that it may say everything now.
        if text or always:
            self._out.append(TextChunk(text, self._index, final, cut))
            self._index += 1
            self._run += 1
            self._open = not final
        self._words = 0
        self._last_word_end = -1

    def _take(self) -> list[TextChunk]:
        out, self._out = self._out, []
        return out


async def chunk_stream(
    fragments: AsyncIterator[str | Flush], options: ChunkerOptions = ChunkerOptions()
) -> AsyncIterator[TextChunk]:
    """Chunk an async fragment source; when it stalls, a pause chunk carries what is buffered.

    One `__anext__` of the source stays outstanding across stall timeouts: cancelling it to
    retry would throw into the source generator and finish it. Consumers that stop early should
    close this generator (e.g. with contextlib.aclosing) so the outstanding call is cancelled.
    """
    chunker = TextChunker(options)
    source = aiter(fragments)
    next_item: asyncio.Future[str | Flush] | None = None
    try:
        while True:
            if next_item is None:
                next_item = asyncio.ensure_future(anext(source))
            # With no utterance open there is nothing to say on a stall: wait without a deadline.
            timeout = options.stall_timeout_s if chunker.utterance_open else None
            done, _ = await asyncio.wait((next_item,), timeout=timeout)
            if not done:
                for chunk in chunker.pause():
                    yield chunk
                continue
            finished, next_item = next_item, None
            try:
                item = finished.result()
            except StopAsyncIteration:
                break
            for chunk in chunker.flush() if isinstance(item, Flush) else chunker.push(item):
                yield chunk
        for chunk in chunker.end():
            yield chunk
    finally:
        if next_item is not None:
            await discard(next_item)


async def discard(pending: asyncio.Future[object]) -> None:
    """Cancel an outstanding call and wait for it; an exception it ended with is dropped.

    For the one `__anext__` kept outstanding across timeouts, on the way out.
    """
    pending.cancel()
    await asyncio.wait((pending,))
    if not pending.cancelled():
        pending.exception()  # retrieved, so asyncio does not log it as lost

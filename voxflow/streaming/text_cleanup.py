"""Turn the markdown-flavoured text an LLM writes into text a phonemizer can speak.

Markup is dropped rather than read out, links and URLs shrink to something a listener can
follow, and characters with no sound (emoji, control and format characters, lone surrogates)
disappear. Numbers stay as digits: the phonemizer knows how to say them.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import urlsplit

_FENCE = re.compile(r"`{3,}[^\s`]*")  # the fence and its language tag, e.g. ```python
_LINK = re.compile(r"!?\[([^\]\n]*)\]\([^)\s]*\)")
# A link whose "[text" went out with the previous chunk: only "](url)" is left here.
_LINK_TAIL = re.compile(r"\]\([^)\s]*\)?")
_RULE = re.compile(r"(?m)^[ \t]*(?:[-*_][ \t]*){3,}$")
_LINE_MARKER = re.compile(r"(?m)^[ \t]*(?:#{1,6}|>+|[-*+•]|\d{1,3}[.)])(?=[ \t]|$)[ \t]*")
# `*` is left out so that "**https://x.com**" keeps its emphasis markers outside the URL.
_URL = re.compile(r"(?i)(?<![\w@])(?:https?://|www\.)[^\s<>\"'`()\[\]*]+")
_URL_TRAILER = ".,;:!?"
_DOUBLE_MARKER = re.compile(r"\*{2,}|_{2,}|~{2,}")
# A lone `*` between spaces is more likely multiplication than emphasis.
_STAR = re.compile(r"(?<!\s)\*|\*(?!\s)")
_EDGE_UNDERSCORE = re.compile(r"(?<!\w)_|_(?!\w)")
_LEFTOVER = re.compile(r"[\[\]`]")
_SPACES = re.compile(r"\s+")
# Punctuation a chunk can inherit from the cut before it; it has nothing to say on its own.
_LEADING_PUNCT = re.compile(r"^[\s,;:.!?…、，；：。！？)\]}」』）】》]+")

_DROP_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "So"})
_KEEP_SYMBOLS = frozenset("°")  # "So", but "25°" should still be read as degrees


def _is_emoji_modifier(cp: int) -> bool:
    return (
        0xFE00 <= cp <= 0xFE0F  # variation selectors (text / emoji presentation)
        or 0xE0100 <= cp <= 0xE01EF
        or 0x1F3FB <= cp <= 0x1F3FF  # skin tones
        or cp == 0x20E3  # combining keycap
    )


class _SpeechTable(dict[int, int | str | None]):
    """str.translate table computed per code point on first use, so any text can go through it."""

    _MAX_SIZE = 8192  # adversarial text could name every code point; keep the cache bounded

    def __missing__(self, cp: int) -> int | str | None:
        ch = chr(cp)
        value: int | str | None = cp
        if ch == "\n":
            pass  # line starts matter for list and heading markers
        elif ch.isspace():
            value = " "
        elif ch not in _KEEP_SYMBOLS and (unicodedata.category(ch) in _DROP_CATEGORIES or _is_emoji_modifier(cp)):
            value = None
        if len(self) >= self._MAX_SIZE:
            self.clear()
        self[cp] = value
        return value


_TABLE = _SpeechTable()


def _host(url: str) -> str:
    try:
        host = urlsplit(url if "://" in url else "//" + url).hostname
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return ""
    return host.removeprefix("www.") if host else ""


def _url_to_host(match: re.Match[str]) -> str:
    url = match.group()
    core = url.rstrip(_URL_TRAILER)  # "see https://x.com." ends a sentence, not the URL
    return _host(core) + url[len(core) :]


def _strip_line_markup(text: str) -> str:
    return _LINE_MARKER.sub("", _RULE.sub("", text))


def clean_for_speech(text: str, *, at_line_start: bool = True) -> str:
    """Return the speakable part of `text`, whitespace collapsed; "" when nothing is left to say.

    at_line_start=False tells that `text` continues a line begun earlier (a chunk cut mid-line),
    so a leading "2." or "-" there is part of the sentence, not a list marker.
    """
    text = text.translate(_TABLE)
    text = _FENCE.sub(" ", text)
    text = _LINK.sub(r"\1", text)
    text = _LINK_TAIL.sub("", text)
    if at_line_start:
        text = _strip_line_markup(text)
    else:
        head, newline, rest = text.partition("\n")
        text = head + newline + _strip_line_markup(rest)
    text = _URL.sub(_url_to_host, text)
    text = _DOUBLE_MARKER.sub("", text)
    text = _STAR.sub("", text)
    text = _EDGE_UNDERSCORE.sub("", text).replace("_", " ")
    text = _LEFTOVER.sub("", text)
    text = _LEADING_PUNCT.sub("", _SPACES.sub(" ", text).strip())
    return text if any(ch.isalnum() for ch in text) else ""

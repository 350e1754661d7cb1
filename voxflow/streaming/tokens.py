"""Replay text the way a chat LLM streams it: sub-word tokens with leading spaces, paced."""

from __future__ import annotations

import asyncio
import re
import time
from typing import AsyncIterator, Iterable

# Runs of letters/digits, single other symbols, each keeping its leading whitespace, like
# BPE vocabularies do; long words are then cut into pieces of about four characters.
_PIECE = re.compile(r"\s*(?:\w+|[^\w\s])|\s+")
_MAX_TOKEN_LETTERS = 4


def gpt_like_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for match in _PIECE.finditer(text):
        piece = match.group()
        stripped = piece.lstrip()
        lead = piece[: len(piece) - len(stripped)]
        if len(stripped) <= _MAX_TOKEN_LETTERS + 2:
            tokens.append(piece)
            continue
        parts = [stripped[i : i + _MAX_TOKEN_LETTERS] for i in range(0, len(stripped), _MAX_TOKEN_LETTERS)]
        tokens.append(lead + parts[0])
        tokens.extend(parts[1:])
    return tokens


async def paced(tokens: Iterable[str], tokens_per_second: float) -> AsyncIterator[str]:
    """Yield tokens on a fixed schedule (no drift: each is due at start + i / rate)."""
    start = time.perf_counter()
    for i, token in enumerate(tokens):
        delay = start + i / tokens_per_second - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        yield token

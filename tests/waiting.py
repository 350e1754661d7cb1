"""Waiting in a test for something another task or thread makes true, with a bound on the hang."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(condition: Callable[[], object], timeout: float, poll: float = 0.005) -> None:
    """Return once condition() is truthy; TimeoutError after `timeout` seconds (bounds a hang only)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(poll)

"""API keys and per-key request rates, shared by the HTTP and WebSocket adapters (pure logic)."""

from __future__ import annotations

import hmac
import time
from collections import OrderedDict
from typing import Mapping

from ..errors import VoxflowError


class Unauthorized(VoxflowError):
    code = "unauthorized"


class RateLimited(VoxflowError):
    code = "rate_limited"


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The key a client sent: `Authorization: Bearer KEY` (OpenAI style) or `xi-api-key` (ElevenLabs)."""
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return headers.get("xi-api-key")


def check_key(keys: tuple[str, ...], key: str | None) -> None:
    """No keys configured: open. Otherwise the key must match one (in constant time)."""
    if not keys:
        return
    if key is None or not any(hmac.compare_digest(key.encode(), k.encode()) for k in keys):
        raise Unauthorized("missing or invalid API key (Authorization: Bearer KEY or xi-api-key)")


class RateLimiter:
    """Token bucket per client identity: `rate` requests per second with bursts of 2 x rate.

    Remembers at most `max_clients` identities (least recently seen forgotten first), so a
    stream of new identities cannot grow it without bound.
    """

    def __init__(self, rate: float, max_clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(1.0, 2 * rate)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, identity: str, now: float | None = None) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(identity, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[identity] = (tokens, now)
            raise RateLimited(f"more than {self.rate:g} requests per second; slow down")
        self._buckets[identity] = (tokens - 1, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

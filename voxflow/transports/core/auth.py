"""Where a client puts its API key, and per-client request rates (pure logic; admission.py uses both)."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Mapping

from ...errors import VoxflowError


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


class RateLimiter:
    """Token bucket per client identity: `rate` units per second with bursts of 2 x rate (at
    least 1). A unit is a request by default; `cost` spends more or less (seconds of audio).

    Remembers at most `max_clients` identities (least recently seen forgotten first), so a
    stream of new identities cannot grow it without bound.
    """

    def __init__(self, rate: float, max_clients: int = 10_000, unit: str = "requests") -> None:
        self.rate = rate
        self.unit = unit
        self.burst = max(1.0, 2 * rate)
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, identity: str, now: float | None = None, cost: float = 1.0) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(identity, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < cost:
            self._buckets[identity] = (tokens, now)
            raise RateLimited(f"more than {self.rate:g} {self.unit} per second; slow down")
        self._buckets[identity] = (tokens - cost, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)

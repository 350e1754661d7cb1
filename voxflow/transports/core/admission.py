"""Who may open what, for every carrier: identity, authentication before counting, caps, draining.

Every carrier admits its clients here and nowhere else:

1. `identify` checks the key a client presented (constant time) and names the client: the key
   where keys are configured, else its address (a client-chosen key must not let it escape its
   address's limits). The address is the connection's peer, or, where that peer is one of
   `trusted_proxies`, the client that proxy names in X-Forwarded-For (`client_address`); from
   any other peer the header is ignored, so a client cannot name itself.
2. `admit(identity, pool)` counts the client against its pool — a global cap and a cap per
   identity — and returns a `Ticket` that gives the place back exactly once. Nothing is counted
   before the key is checked, so clients without a key cannot take the places of those with one.
   Clients still to send their key (the ElevenLabs protocol allows it in the first message) wait
   in the small `handshake` pool, for at most `auth_timeout_seconds`.
3. While the server drains, `admit` refuses with `draining`.

Per-identity caps bind keys and non-loopback addresses. Without keys on a loopback bind every
client is a local process sharing 127.0.0.1, so only the global caps apply there.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
from collections import Counter
from dataclasses import dataclass
from typing import Mapping, Sequence

from ...config import ServerConfig, proxy_networks
from ...errors import AtCapacity, VoxflowError
from .auth import RateLimiter, Unauthorized


# The header a reverse proxy names the client in; believed only from `trusted_proxies`.
FORWARDED_FOR = "x-forwarded-for"


class Draining(VoxflowError):
    code = "draining"


@dataclass(frozen=True)
class Identity:
    """A client as the limits see it: `name` is its key (where keys are required) or its address."""

    name: str
    peer: str
    keyed: bool

    @property
    def capped(self) -> bool:
        """Whether per-identity caps apply (see the module docstring)."""
        return self.keyed or not is_loopback(self.peer)


@dataclass(frozen=True)
class PoolLimits:
    total: int
    per_identity: int


def pool_limits(config: ServerConfig, max_conversations: int) -> dict[str, PoolLimits]:
    """The pools every carrier draws from, with their caps from the configuration."""
    return {
        "socket": PoolLimits(config.max_sockets, config.max_sockets_per_identity),  # native and ElevenLabs WebSockets
        "handshake": PoolLimits(config.max_unauthenticated_sockets, config.max_unauthenticated_per_address),
        "http_stream": PoolLimits(config.max_http_streams, config.max_http_streams_per_identity),
        "webrtc": PoolLimits(config.max_webrtc_sessions, config.max_webrtc_sessions_per_identity),
        "wyoming": PoolLimits(config.max_wyoming_connections, config.max_wyoming_per_address),
        "conversation": PoolLimits(max_conversations, config.max_conversations_per_identity),
        # MQTT requests in flight; the identity is the device (or Hermes site) that asked.
        "mqtt": PoolLimits(config.mqtt_max_in_flight, config.mqtt_max_per_device),
        "watermark_check": PoolLimits(config.max_watermark_checks, config.max_watermark_checks),
    }


class Ticket:
    """One admitted place in a pool; `release` gives it back (only the first call counts)."""

    def __init__(self, admission: Admission, pool: str, identity: Identity) -> None:
        self.pool = pool
        self.identity = identity
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release(self)
            self._admission = None

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Admission:
    def __init__(self, config: ServerConfig, limits: Mapping[str, PoolLimits]) -> None:
        self.keys = config.api_keys
        self.trusted_proxies = proxy_networks(config.trusted_proxies)
        self.limits = dict(limits)
        self.limiter = RateLimiter(config.requests_per_second)
        self.draining = False
        self._totals: Counter[str] = Counter()
        self._per_identity: Counter[tuple[str, str]] = Counter()
        self._released = asyncio.Event()

    def identify(self, key: str | None, peer: str | None, forwarded_for: Sequence[str] = ()) -> Identity:
        """Check a presented key (raises Unauthorized) and name the client. `forwarded_for`: the
        connection's X-Forwarded-For header lines, in order (see `client_address`)."""
        peer = self.client_address(peer, forwarded_for)
        if not self.keys:
            return self.anonymous(peer)
        # Compared as UTF-8 bytes: a key that cannot be encoded (a lone surrogate) is simply wrong.
        given = (key or "").encode("utf-8", "replace")
        if key is None or not any(hmac.compare_digest(given, k.encode()) for k in self.keys):
            raise Unauthorized("missing or invalid API key (Authorization: Bearer KEY or xi-api-key)")
        return Identity(key, peer, keyed=True)

    def device(self, name: str) -> Identity:
        """A client its carrier names itself (an MQTT device or Hermes site, behind the broker's
        own authentication): per-client caps bind it."""
        return Identity(f"device:{name}", f"device:{name}", keyed=True)

    def anonymous(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> Identity:
        """A client known only by its address (it has not sent its key yet)."""
        peer = self.client_address(peer, forwarded_for) or "unknown"
        return Identity(peer, peer, keyed=False)

    def client_address(self, peer: str | None, forwarded_for: Sequence[str] = ()) -> str | None:
        """The address a client connects from: the connection's peer, unless that peer is a
        trusted proxy. Then X-Forwarded-For is read from its right end, where each proxy appends
        the peer it saw: the first hop that is not itself a trusted proxy is the client.
        Everything to its left was written by the client and is never believed.
        """
        if not forwarded_for or not self._trusted(peer):
            return peer
        hops = [hop.strip() for line in forwarded_for for hop in line.split(",")]
        nearest = peer
        for hop in reversed(hops):
            if (address := _address(hop)) is None:
                # A trusted proxy appends addresses only: this came from beyond it.
                return nearest
            if not self._trusted(hop):
                return str(address)
            nearest = hop
        return nearest

    def _trusted(self, peer: str | None) -> bool:
        address = _address(peer)
        return address is not None and any(address in network for network in self.trusted_proxies)

    def check_new_work(self, identity: Identity) -> None:
        """New work on an admitted connection (a context, a request): not while draining, and
        one request's worth of the identity's rate limit. Raises Draining or RateLimited."""
        if self.draining:
            raise Draining("the server is shutting down; no new work")
        self.limiter.check(identity.name)

    def admit(self, identity: Identity, pool: str, *, rate: bool = True) -> Ticket:
        """A place in `pool` for this client, or a typed refusal: draining, rate_limited, limit_exceeded.

        Synchronous, so no other admission runs between the count and the add.
        """
        if rate:
            self.check_new_work(identity)
        elif self.draining:
            raise Draining("the server is shutting down; no new work")
        limits = self.limits[pool]
        if self.at_capacity(pool):
            raise AtCapacity(f"at most {limits.total} {pool.replace('_', ' ')} places on this server; try again later")
        if identity.capped and self._per_identity[pool, identity.name] >= limits.per_identity:
            raise AtCapacity(f"at most {limits.per_identity} {pool.replace('_', ' ')} places per client; close one first")
        self._totals[pool] += 1
        self._per_identity[pool, identity.name] += 1
        return Ticket(self, pool, identity)

    def _release(self, ticket: Ticket) -> None:
        self._totals[ticket.pool] -= 1
        key = (ticket.pool, ticket.identity.name)
        self._per_identity[key] -= 1
        if not self._per_identity[key]:
            del self._per_identity[key]
        self._released.set()

    async def until_empty(self, pool: str) -> None:
        """Returns once no place in `pool` is taken (a drain waits for in-flight requests)."""
        while self._totals[pool]:
            self._released.clear()
            await self._released.wait()

    def at_capacity(self, pool: str) -> bool:
        """Whether `pool` would refuse the next client, whoever it is."""
        return self._totals[pool] >= self.limits[pool].total

    def counts(self) -> dict[str, int]:
        """Places in use per pool (for /health: a leak shows here)."""
        return {pool: self._totals[pool] for pool in self.limits}


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An IP address, IPv4-mapped IPv6 ones as IPv4; None for anything else."""
    try:
        address = ipaddress.ip_address(text or "")
    except ValueError:
        return None
    return (address.ipv4_mapped or address) if isinstance(address, ipaddress.IPv6Address) else address


def is_loopback(peer: str) -> bool:
    """Whether an address (or host name) is this machine's own."""
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return peer == "localhost"

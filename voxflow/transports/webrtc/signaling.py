"""Offer checks and ICE settings, before and around aiortc.

aiortc's SDP parser assumes a well-formed offer and fails on garbage with whatever exception
the first bad line causes, so an offer is checked here first and refused with a clear code.
"""

from __future__ import annotations

import re

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer

from ...errors import InvalidRequest

MAX_SDP_CHARS = 64_000  # a browser offer is a few kB
_LINE = re.compile(r"[a-z]=[^\r\n]*")
_MEDIA = re.compile(r"m=(\S+) (\d+)(?:/\d+)? (\S+)(?: \S+)+")


class InvalidSdp(InvalidRequest):
    code = "invalid_sdp"


class NoAudio(InvalidRequest):
    code = "no_audio"


def check_offer(body: object) -> str:
    """A POSTed {"sdp", "type": "offer"} -> its SDP, or InvalidSdp / NoAudio."""
    if not isinstance(body, dict) or body.get("type") != "offer" or not isinstance(body.get("sdp"), str):
        raise InvalidSdp('expected a JSON object {"sdp": "<offer SDP>", "type": "offer"}')
    sdp = body["sdp"]
    if "audio" not in media_kinds(sdp):
        raise NoAudio("the offer has no audio m-line; add an audio transceiver (sendrecv) before creating it")
    return sdp


def media_kinds(sdp: str) -> tuple[str, ...]:
    """The media kinds of an SDP's m-lines, in order, once its line structure (RFC 4566) checks out."""
    if len(sdp) > MAX_SDP_CHARS:
        raise InvalidSdp(f"SDP of {len(sdp)} characters; at most {MAX_SDP_CHARS}")
    lines = [line for line in re.split(r"\r?\n", sdp) if line]
    if not lines or lines[0] != "v=0":
        raise InvalidSdp("SDP must start with v=0")
    media = []
    for number, line in enumerate(lines, 1):
        if not _LINE.fullmatch(line):
            raise InvalidSdp(f"SDP line {number} is not <letter>=<value>: {line[:80]!r}")
        if line.startswith("m="):
            match = _MEDIA.fullmatch(line)
            if match is None:
                raise InvalidSdp(f"SDP line {number} is not a media line (m=<media> <port> <proto> <formats>): {line[:80]!r}")
            media.append(match.group(1))
    for required in ("o=", "s="):
        if not any(line.startswith(required) for line in lines):
            raise InvalidSdp(f"SDP has no {required} line")
    if not media:
        raise InvalidSdp("SDP has no media sections")
    return tuple(media)


def ice_configuration(ice_servers: tuple[str, ...]) -> RTCConfiguration:
    """An explicit server list, even when empty: aiortc's default is a public STUN server."""
    return RTCConfiguration(iceServers=[RTCIceServer(urls=url) for url in ice_servers])


_LOOPBACK = "127.0.0.1"
_host_addresses = aioice.ice.get_host_addresses


def _with_loopback(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _host_addresses(use_ipv4=use_ipv4, use_ipv6=use_ipv6)
    if use_ipv4 and _LOOPBACK not in addresses:
        addresses.append(_LOOPBACK)
    return addresses


def enable_loopback_candidates() -> None:
    """Make aioice offer 127.0.0.1 as a host candidate, which it leaves out on its own.

    aioice looks the addresses up through a module-level function, so this holds for every
    peer connection in the process from now on; extra candidates do not break other peers.
    """
    aioice.ice.get_host_addresses = _with_loopback

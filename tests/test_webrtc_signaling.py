"""Offer checks before aiortc sees an offer, and the ICE configuration (no network)."""

from __future__ import annotations

import pytest

from voxflow.transports.webrtc.signaling import (
    MAX_SDP_CHARS,
    InvalidSdp,
    NoAudio,
    check_offer,
    ice_configuration,
    media_kinds,
)

# The shape of a browser offer: one audio transceiver and the data channel.
BROWSER_OFFER = "\r\n".join([
    "v=0",
    "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
    "s=-",
    "t=0 0",
    "a=group:BUNDLE 0 1",
    "m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8",
    "c=IN IP4 0.0.0.0",
    "a=mid:0",
    "a=sendrecv",
    "a=rtpmap:111 opus/48000/2",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel",
    "c=IN IP4 0.0.0.0",
    "a=mid:1",
    "a=sctp-port:5000",
    "",
])
DATA_ONLY_OFFER = "\r\n".join([
    "v=0", "o=- 1 1 IN IP4 0.0.0.0", "s=-", "t=0 0",
    "m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "a=mid:0", "",
])


def offer(sdp: object, kind: object = "offer") -> dict:
    return {"sdp": sdp, "type": kind}


def test_a_browser_offer_passes_whole():
    assert check_offer(offer(BROWSER_OFFER)) == BROWSER_OFFER
    assert media_kinds(BROWSER_OFFER) == ("audio", "application")


def test_bare_newlines_are_accepted():
    assert media_kinds(BROWSER_OFFER.replace("\r\n", "\n")) == ("audio", "application")


def test_an_offer_without_audio_is_no_audio():
    with pytest.raises(NoAudio) as caught:
        check_offer(offer(DATA_ONLY_OFFER))
    assert caught.value.code == "no_audio"


@pytest.mark.parametrize("body", [
    None,
    [],
    "v=0",
    {"sdp": BROWSER_OFFER},  # no type
    offer(BROWSER_OFFER, "answer"),
    offer(BROWSER_OFFER, None),
    offer(None),
    offer(42),
])
def test_a_body_of_the_wrong_shape_is_invalid_sdp(body):
    with pytest.raises(InvalidSdp) as caught:
        check_offer(body)
    assert caught.value.code == "invalid_sdp"


@pytest.mark.parametrize("sdp", [
    "",
    "hello",
    "not sdp at all\r\nm=audio 9 RTP/AVP 0",
    BROWSER_OFFER.replace("v=0", "v=1"),  # the first line must be v=0
    BROWSER_OFFER.replace("a=mid:0", "mid:0"),  # a line without <letter>=
    BROWSER_OFFER.replace("a=mid:0", "A=mid:0"),
    BROWSER_OFFER.replace("m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8", "m=audio"),  # a media line without port/proto/formats
    BROWSER_OFFER.replace("m=audio 9 UDP/TLS/RTP/SAVPF", "m=audio nine UDP/TLS/RTP/SAVPF"),
    BROWSER_OFFER.replace("o=- 4611731400430051336 2 IN IP4 127.0.0.1\r\n", ""),  # no o=
    "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n",  # no media at all
    BROWSER_OFFER + "a=" + "x" * MAX_SDP_CHARS,  # too large
])
def test_malformed_sdp_is_invalid_sdp(sdp):
    with pytest.raises(InvalidSdp):
        check_offer(offer(sdp))


def test_the_ice_server_list_is_explicit_even_when_empty():
    # None would make aiortc fall back to a public STUN server.
    assert ice_configuration(()).iceServers == []
    servers = ice_configuration(("stun:stun.example.net:3478", "turn:turn.example.net"))
    assert [s.urls for s in servers.iceServers] == ["stun:stun.example.net:3478", "turn:turn.example.net"]

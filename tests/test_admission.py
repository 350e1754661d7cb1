"""Admission: keys checked before counting, global and per-client caps, draining, tickets."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from voxflow.config import ServerConfig, load_settings
from voxflow.errors import AtCapacity, InvalidRequest
from voxflow.transports.core.admission import Admission, Draining, PoolLimits
from voxflow.transports.core.auth import RateLimited, Unauthorized

KEYS = ServerConfig(api_keys=("good", "other"), requests_per_second=0)


def admission(config: ServerConfig = KEYS, total: int = 3, per_identity: int = 2) -> Admission:
    return Admission(config, {"socket": PoolLimits(total, per_identity)})


@pytest.mark.parametrize("key", [None, "", "goo", "good ", "\ud800", "x" * 10_000])
def test_a_wrong_or_missing_key_is_refused_before_anything_is_counted(key):
    a = admission()
    with pytest.raises(Unauthorized):
        a.identify(key, "10.0.0.1")
    assert a.counts() == {"socket": 0}


def test_with_keys_the_key_is_the_identity_and_caps_bind_it():
    a = admission()
    good = a.identify("good", "10.0.0.1")
    tickets = [a.admit(good, "socket"), a.admit(a.identify("good", "10.0.0.2"), "socket")]
    with pytest.raises(AtCapacity, match="per client"):
        a.admit(good, "socket")  # a second address does not give the key more places
    other = a.admit(a.identify("other", "10.0.0.1"), "socket")
    with pytest.raises(AtCapacity, match="on this server"):
        a.admit(a.identify("other", "10.0.0.1"), "socket")
    for ticket in [*tickets, other]:
        ticket.release()
        ticket.release()  # only the first release counts
    assert a.counts() == {"socket": 0}


def test_without_keys_the_address_is_the_identity_and_loopback_shares_only_the_global_cap():
    a = admission(ServerConfig(requests_per_second=0), total=3, per_identity=1)
    remote = a.identify("chosen-by-the-client", "10.0.0.7")
    assert remote.name == "10.0.0.7"
    a.admit(remote, "socket")
    with pytest.raises(AtCapacity):
        a.admit(a.identify("another-choice", "10.0.0.7"), "socket")
    local = a.identify(None, "127.0.0.1")
    a.admit(local, "socket")
    a.admit(local, "socket")  # local processes share 127.0.0.1: only the total binds
    with pytest.raises(AtCapacity):
        a.admit(local, "socket")


def test_draining_refuses_new_places_and_new_work():
    a = admission()
    good = a.identify("good", "10.0.0.1")
    a.draining = True
    with pytest.raises(Draining):
        a.admit(good, "socket")
    with pytest.raises(Draining):
        a.check_new_work(good)


def test_places_and_work_spend_the_rate_limit():
    a = admission(replace(KEYS, requests_per_second=1))  # bursts of 2
    good = a.identify("good", "10.0.0.1")
    with a.admit(good, "socket"):
        a.check_new_work(good)
        with pytest.raises(RateLimited):
            a.check_new_work(good)
    assert a.counts() == {"socket": 0}


async def test_until_empty_returns_when_the_last_place_is_given_back():
    a = admission()
    ticket = a.admit(a.identify("good", "10.0.0.1"), "socket")
    waiter = asyncio.create_task(a.until_empty("socket"))
    await asyncio.sleep(0.05)
    assert not waiter.done()
    ticket.release()
    await asyncio.wait_for(waiter, timeout=5)


BEHIND_PROXY = ServerConfig(requests_per_second=0, trusted_proxies=("10.0.0.5", "10.1.0.0/16"))


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "client"),
    [
        ("10.0.0.5", ["203.0.113.7"], "203.0.113.7"),  # the proxy names the client
        ("10.0.0.5", ["198.51.100.1, 203.0.113.7"], "203.0.113.7"),  # what the client wrote itself is not believed
        ("10.0.0.5", ["198.51.100.1", "203.0.113.7"], "203.0.113.7"),  # nor on a header line of its own
        ("10.0.0.5", ["203.0.113.7, 10.1.2.3"], "203.0.113.7"),  # through two trusted proxies
        ("10.0.0.5", ["10.1.2.3"], "10.1.2.3"),  # nothing but proxies: the farthest one
        ("10.0.0.5", ["203.0.113.7, not-an-address"], "10.0.0.5"),  # no address after the proxy: the proxy
        ("10.0.0.5", [], "10.0.0.5"),  # no header: the proxy itself
        ("10.0.0.5", ["2001:DB8::1"], "2001:db8::1"),
        ("::ffff:10.0.0.5", ["203.0.113.7"], "203.0.113.7"),  # the proxy as an IPv4-mapped address
        ("203.0.113.9", ["198.51.100.1"], "203.0.113.9"),  # from any other peer the header is ignored
        ("10.2.0.1", ["198.51.100.1"], "10.2.0.1"),
    ],
)
def test_x_forwarded_for_names_the_client_only_from_a_trusted_proxy(peer, forwarded_for, client):
    a = admission(BEHIND_PROXY)
    assert a.identify(None, peer, forwarded_for).name == client
    assert a.anonymous(peer, forwarded_for).name == client


def test_without_trusted_proxies_the_header_is_ignored_even_from_loopback():
    a = admission(ServerConfig(requests_per_second=0))
    spoofed = a.identify(None, "127.0.0.1", ["203.0.113.7"])
    assert spoofed.name == "127.0.0.1" and not spoofed.capped


def test_clients_behind_a_trusted_proxy_each_get_their_own_caps():
    a = admission(BEHIND_PROXY, total=3, per_identity=1)
    first = a.identify("chosen-by-the-client", "10.0.0.5", ["203.0.113.7"])
    a.admit(first, "socket")
    with pytest.raises(AtCapacity, match="per client"):
        a.admit(a.identify(None, "10.0.0.5", ["198.51.100.1, 203.0.113.7"]), "socket")
    a.admit(a.identify(None, "10.0.0.5", ["203.0.113.8"]), "socket")  # another client, another cap


def test_trusted_proxies_must_be_addresses_or_networks():
    with pytest.raises(InvalidRequest, match="trusted_proxies"):
        load_settings(env={"VOXFLOW_TRUSTED_PROXIES": "10.0.0.0/8,proxy.example"})
    with pytest.raises(InvalidRequest, match="trusted_proxies"):
        Admission(replace(ServerConfig(), trusted_proxies=("10.0.0.0/33",)), {})
    settings = load_settings(env={"VOXFLOW_TRUSTED_PROXIES": "10.0.0.5, 10.1.0.0/16"})
    assert settings.server.trusted_proxies == ("10.0.0.5", "10.1.0.0/16")

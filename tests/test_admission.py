"""Admission: keys checked before counting, global and per-client caps, draining, tickets."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from voxflow.config import ServerConfig
from voxflow.errors import AtCapacity
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

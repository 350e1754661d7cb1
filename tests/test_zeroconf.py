"""Home Assistant's discovery of the Wyoming server over mDNS: announced with a real AsyncZeroconf
and resolved by a second, real Zeroconf instance, both on loopback only (nothing reaches the
LAN), as Home Assistant resolves it; and the settings an announcement is refused for."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import ifaddr
import pytest
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from zeroconf import ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from server_harness import free_port, run_server
from voxflow.config import ServerConfig, check_zeroconf, load_settings
from voxflow.errors import InvalidRequest
from voxflow.streaming.engine import Engine
from voxflow.transports.zeroconf_announce import SERVICE_TYPE, advertised_address, announced, default_name, lan_address

LOOPBACK = "127.0.0.1"
RESOLVE_MS = 3000


def unique_name() -> str:
    """Other test runs on this machine share loopback: a name of its own keeps this run's apart."""
    return f"voxflow-test-{uuid.uuid4().hex[:10]}"


class Seen:
    """The service changes a browser reports, by instance name."""

    def __init__(self) -> None:
        self.changes: list[tuple[str, ServiceStateChange]] = []
        self._changed = asyncio.Event()

    def handler(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        self.changes.append((name, state_change))
        self._changed.set()

    async def wait_for(self, name: str, change: ServiceStateChange, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while (name, change) not in self.changes:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def resolver() -> AsyncIterator[tuple[AsyncZeroconf, Seen]]:
    """A second Zeroconf on loopback, browsing for Wyoming services as Home Assistant does."""
    zeroconf = AsyncZeroconf(interfaces=[LOOPBACK])
    seen = Seen()
    browser = AsyncServiceBrowser(zeroconf.zeroconf, SERVICE_TYPE, handlers=[seen.handler])
    try:
        yield zeroconf, seen
    finally:
        await browser.async_cancel()
        await zeroconf.async_close()


async def resolve(zeroconf: AsyncZeroconf, name: str, timeout_ms: int = RESOLVE_MS) -> AsyncServiceInfo | None:
    info = AsyncServiceInfo(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}")
    return info if await info.async_request(zeroconf.zeroconf, timeout_ms) else None


async def test_an_announcement_resolves_then_its_goodbye_removes_it() -> None:
    name, port = unique_name(), free_port()
    full_name = f"{name}.{SERVICE_TYPE}"
    async with resolver() as (zeroconf, seen):
        async with announced(name, LOOPBACK, port) as registered:
            assert registered.name == full_name
            found = await resolve(zeroconf, name)
            assert found is not None, "the announced service did not resolve"
            assert found.name == full_name
            assert found.port == port
            assert found.parsed_addresses() == [LOOPBACK]
            assert found.server == f"{name}.local."
            await seen.wait_for(full_name, ServiceStateChange.Added)
        # The goodbye: a browser is told at once, not when the records' TTL runs out.
        await seen.wait_for(full_name, ServiceStateChange.Removed)
    async with resolver() as (fresh, _):
        assert await resolve(fresh, name, timeout_ms=1500) is None


async def test_the_wyoming_server_is_announced_when_asked_and_home_assistant_can_use_it(engine: Engine) -> None:
    """What Home Assistant does: browse, resolve, connect to the announced address and port, describe."""
    name, wyoming_port = unique_name(), free_port()
    full_name = f"{name}.{SERVICE_TYPE}"
    options = {"wyoming_url": f"tcp://{LOOPBACK}:{wyoming_port}", "zeroconf": True,
               "zeroconf_name": name, "zeroconf_address": LOOPBACK}
    async with resolver() as (zeroconf, seen):
        with contextlib.ExitStack() as stack:
            # Started off this loop, whose resolver must keep answering meanwhile.
            await asyncio.to_thread(stack.enter_context, run_server(engine, **options))
            found = await resolve(zeroconf, name)
            assert found is not None, "the Wyoming server was not announced"
            assert (found.parsed_addresses(), found.port) == ([LOOPBACK], wyoming_port)
            async with AsyncTcpClient(found.parsed_addresses()[0], found.port) as client:
                await client.write_event(Describe().event())
                event = await asyncio.wait_for(client.read_event(), 30)
            assert event is not None and Info.is_type(event.type)
            assert Info.from_event(event).tts[0].voices
            await asyncio.to_thread(stack.close)
        await seen.wait_for(full_name, ServiceStateChange.Removed)


async def test_no_announcement_by_default(engine: Engine) -> None:
    name, wyoming_port = unique_name(), free_port()
    # Everything an announcement would use, but zeroconf itself left at its default.
    options = {"wyoming_url": f"tcp://{LOOPBACK}:{wyoming_port}", "zeroconf_name": name, "zeroconf_address": LOOPBACK}
    assert ServerConfig().zeroconf is False
    async with resolver() as (zeroconf, _):
        with contextlib.ExitStack() as stack:
            await asyncio.to_thread(stack.enter_context, run_server(engine, **options))
            assert await resolve(zeroconf, name, timeout_ms=1500) is None
            await asyncio.to_thread(stack.close)


# -- which address, which name --------------------------------------------------------------------


def zeroconf_config(wyoming_url: str = "tcp://0.0.0.0:10200", **options: object) -> ServerConfig:
    return replace(ServerConfig(), wyoming_url=wyoming_url, zeroconf=True, **options)


def test_the_address_announced() -> None:
    assert advertised_address(zeroconf_config(zeroconf_address="192.0.2.7"), "0.0.0.0") == "192.0.2.7"
    assert advertised_address(zeroconf_config(), "198.51.100.4") == "198.51.100.4"
    # A wildcard host: the address of the interface mDNS leaves by, one of this machine's own.
    own = {ip.ip for adapter in ifaddr.get_adapters() for ip in adapter.ips if ip.is_IPv4}
    for wildcard in ("0.0.0.0", "::"):
        address = advertised_address(zeroconf_config(), wildcard)
        assert address == lan_address()
        assert address in own and not ipaddress.ip_address(address).is_loopback


def test_the_default_name_is_voxflow_and_the_host() -> None:
    name = default_name()
    assert name == f"voxflow-{socket.gethostname().split('.')[0]}"[:63]
    check_zeroconf(zeroconf_config(zeroconf_name=name))  # an mDNS label as it is


@pytest.mark.parametrize("options", [
    {"wyoming_url": "tcp://0.0.0.0:10200"},
    {"wyoming_url": "tcp://[::]:10200"},
    {"wyoming_url": "tcp://192.0.2.7:10200"},
    {"wyoming_url": "tcp://127.0.0.1:10200", "zeroconf_address": "127.0.0.1"},  # Home Assistant on this machine
    {"wyoming_url": "tcp://127.0.0.1:10200", "zeroconf_address": "192.0.2.7"},  # something forwards to it
    {"wyoming_url": "tcp://localhost:10200", "zeroconf_address": "fd00::7"},
    {"zeroconf_name": "Living room speaker"},
])
def test_announcements_home_assistant_can_use_are_accepted(options: dict[str, str]) -> None:
    check_zeroconf(zeroconf_config(**options))


@pytest.mark.parametrize(("options", "message"), [
    ({"wyoming_url": ""}, "needs wyoming_url tcp://HOST:PORT"),
    ({"wyoming_url": "unix:///run/voxflow.sock"}, "needs wyoming_url tcp://HOST:PORT"),
    ({"wyoming_url": "tcp://127.0.0.1:10200"}, "127.0.0.1, which no other machine can reach"),
    ({"wyoming_url": "tcp://[::1]:10200"}, "::1, which no other machine can reach"),
    ({"wyoming_url": "tcp://localhost:10200"}, "localhost, which no other machine can reach"),
    ({"wyoming_url": "tcp://voxbox.lan:10200"}, "'voxbox.lan' is a name"),
    ({"zeroconf_address": "0.0.0.0"}, "not an address a client can connect to"),
    ({"zeroconf_address": "voxbox.lan"}, "not an address a client can connect to"),
    ({"zeroconf_address": "::1"}, "mDNS does not work on IPv6's loopback"),
    ({"zeroconf_name": "x" * 64}, "at most 63 bytes"),
    ({"zeroconf_name": "voxflow.kitchen"}, "without dots"),
    ({"zeroconf_name": "bad\nname"}, "printable"),
])
def test_announcements_home_assistant_could_not_use_are_refused(options: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidRequest, match=re.escape(message)):
        check_zeroconf(zeroconf_config(**options))


def test_load_settings_checks_the_announcement() -> None:
    with pytest.raises(InvalidRequest, match="no other machine can reach"):
        load_settings(env={}, server={"zeroconf": True, "wyoming_url": "tcp://127.0.0.1:10200"})
    settings = load_settings(env={"VOXFLOW_ZEROCONF": "true", "VOXFLOW_ZEROCONF_ADDRESS": "127.0.0.1"},
                             server={"wyoming_url": "tcp://127.0.0.1:10200"})
    assert (settings.server.zeroconf, settings.server.zeroconf_address) == (True, "127.0.0.1")


def test_serve_refuses_an_announcement_of_a_loopback_wyoming_server() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXFLOW_")}
    proc = subprocess.run(
        [sys.executable, "-m", "voxflow.cli", "serve", "--port", str(free_port()),
         "--wyoming", f"tcp://127.0.0.1:{free_port()}", "--zeroconf"],
        env=env, capture_output=True, timeout=120, check=False,
    )
    assert proc.returncode == 2
    assert b"voxflow: error [invalid_request]: zeroconf: the Wyoming server listens on 127.0.0.1" in proc.stderr
    assert b"--zeroconf-address" in proc.stderr
    assert b"Traceback" not in proc.stderr and b"serving on" not in proc.stdout

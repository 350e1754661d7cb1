"""Home Assistant's discovery of the Wyoming server: an mDNS (zeroconf) service of type
`_wyoming._tcp.local.`, as wyoming-piper announces itself. Home Assistant offers a discovered
server for setup with one click, then connects to the announced address and port.

Off by default (ServerConfig.zeroconf): Wyoming has no authentication, so telling every machine
on the LAN about the server is the user's decision. `config.check_zeroconf` has already refused
an announcement that only this machine could use, unless its address was given explicitly.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
import socket
from collections.abc import AsyncIterator

from zeroconf import InterfaceChoice
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from ..config import WILDCARD_HOSTS, ServerConfig
from ..errors import InvalidRequest

SERVICE_TYPE = "_wyoming._tcp.local."
_MDNS_GROUP = "224.0.0.251"
_MDNS_PORT = 5353
_LOGGER = logging.getLogger(__name__)


def default_name() -> str:
    return f"voxflow-{socket.gethostname().split('.')[0]}"[:63]


def lan_address() -> str:
    """The address this machine sends mDNS from, which is the one its LAN neighbours reach it at."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((_MDNS_GROUP, _MDNS_PORT))  # a UDP connect sends nothing: it only picks the route
        except OSError as exc:
            raise InvalidRequest(
                f"zeroconf: this machine has no route for multicast, so its LAN address is unknown ({exc}); "
                "give the address to announce (zeroconf_address / --zeroconf-address)"
            ) from exc
        return str(probe.getsockname()[0])


def advertised_address(config: ServerConfig, host: str) -> str:
    """The address Home Assistant will connect to for a Wyoming server listening on `host`."""
    if config.zeroconf_address:
        return config.zeroconf_address
    return lan_address() if host in WILDCARD_HOSTS else host


def _host_label(name: str) -> str:
    """The SRV record's target host: an instance name may hold spaces, a host name may not."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", name).strip("-")[:63] or "voxflow"


@contextlib.asynccontextmanager
async def announced(name: str, address: str, port: int) -> AsyncIterator[AsyncServiceInfo]:
    """The Wyoming service announced as `name` at address:port while the block runs; on the way
    out its goodbye tells resolvers to forget it at once rather than when its records expire."""
    # A loopback address means something to this machine only: it is announced on loopback
    # alone, never onto the LAN. Any other goes out on every interface, as wyoming-piper's does.
    interfaces = [address] if ipaddress.ip_address(address).is_loopback else InterfaceChoice.All
    zeroconf = AsyncZeroconf(interfaces=interfaces)
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", port=port, parsed_addresses=[address],
        server=f"{_host_label(name)}.local.",
    )
    try:
        # Another server already announcing this name gets this one renamed ("name-2"), as
        # two devices of one model do on a LAN, rather than a server that fails to start.
        await (await zeroconf.async_register_service(info, allow_name_change=True))
        _LOGGER.info("Wyoming server announced over zeroconf as %r at %s:%d", info.name, address, port)
        yield info
    finally:
        await zeroconf.async_close()


def announce_wyoming(config: ServerConfig, host: str, port: int) -> contextlib.AbstractAsyncContextManager[AsyncServiceInfo]:
    """The announcement ServerConfig asks for, of a Wyoming server listening on host:port."""
    return announced(config.zeroconf_name or default_name(), advertised_address(config, host), port)

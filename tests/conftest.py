"""Fixtures shared by the test modules."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so a fresh clone's CI sees what the last
# run saw (without it, each run without an example database draws new ones).
settings.register_profile("deterministic", derandomize=True)
settings.load_profile("deterministic")

from mosquitto_harness import Broker, start_mosquitto
from server_harness import RunningServer, run_server
from voxflow.config import EngineConfig
from voxflow.streaming.engine import Engine


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """One engine for the whole run: loading the voice costs seconds, so it is shared.

    The engine keeps no event loop of its own (streams bind to the loop running when they
    are opened), so tests on different loops can share it.
    """
    eng = Engine(EngineConfig())
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(scope="session")
def server(engine: Engine) -> Iterator[RunningServer]:
    """A live server with default settings (no keys, cache off), shared by the server tests.

    Tests that need other settings start their own with `server_harness.run_server`.
    """
    with run_server(engine) as running:
        yield running


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Broker]:
    """One mosquitto broker for the run; fails (not skips) where mosquitto is not installed.

    Tests that stop or restart a broker start their own with `mosquitto_harness.start_mosquitto`.
    """
    broker = start_mosquitto()
    try:
        yield broker
    finally:
        broker.stop()
        shutil.rmtree(broker.directory, ignore_errors=True)

"""Fixtures for the link tests: real mosquitto brokers on free loopback ports."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hw.mosquitto import Broker


def _run(broker: Broker) -> Iterator[Broker]:
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        assert not broker.running, "mosquitto outlived its fixture"


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One anonymous plain-MQTT broker shared by the tests (each uses its own site)."""
    yield from _run(Broker.plain(tmp_path_factory.mktemp("mosquitto")))


@pytest.fixture(scope="session")
def mosquitto_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """contrib/mosquitto's configuration: TLS, client certificates, the ACL; ``.pki`` signs."""
    yield from _run(Broker.secure(tmp_path_factory.mktemp("mosquitto-tls")))


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker for one test alone, to kill and restart."""
    yield from _run(Broker.plain(tmp_path / "broker"))

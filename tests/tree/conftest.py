"""A system of servers with real stores: a top Enterprise Server served on a real TCP
listener (its AgentOps), children attached to it through that link."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import hw
from agent.messages import Action
from agent.ops import AgentOps
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device, Site, stop_processes
from tests.tree.test_system_daemons import System


@dataclass
class Served:
    device: Device
    url: str


@pytest.fixture
def system(tmp_path: Path) -> Iterator[System]:
    """A system of real ``licagent`` daemons and tools (:class:`System`), stopped after."""
    s = System(tmp_path)
    try:
        yield s
    finally:
        stop_processes(s.procs, 30)


@pytest.fixture
def serve() -> Iterator[object]:
    """serve(device) -> its tcp:// URL on loopback (stopped after the test)."""
    listeners = []

    def start(device: Device) -> Served:
        lst = hw.listen("tcp://127.0.0.1:0", AgentOps(device.agent))
        lst.start()
        listeners.append(lst)
        return Served(device, lst.address)

    yield start
    for lst in listeners:
        lst.stop()


def activate(dev: Device, *, inherit: bool = False, demo: bool = False, **grants: int) -> bytes:
    """Request, issue (inheritable: inherit = COUNT) and apply; the response's bytes."""
    req = dev.agent.request(Action.ACTIVATE, grants)
    resp = dev.vendor.issue(req, [Grant(f, c, inherit=c if inherit else 0, demo=demo,
                                        not_after=dev.clock() + 90 * 86400 if demo else None)
                                  for f, c in grants.items()], now=dev.clock())
    dev.agent.apply(resp)
    return resp


def reclaim(dev: Device, *features: str, force: bool = False) -> bytes:
    """Reclaim through the vendor; the receipt's bytes."""
    req = dev.agent.request(Action.RECLAIM, features, force=force)
    resp = dev.vendor.issue(req, removes=features, now=dev.clock())
    res, _w = dev.agent.apply(resp)
    return res.receipt


def top(site: Site) -> Device:
    return site.device("Enterprise-Server", macs=(f"52:54:00:00:10:{site.n + 1:02x}",))

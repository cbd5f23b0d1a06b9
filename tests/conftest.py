"""Shared fixtures: a vendor (signing simulator), devices with their own stores, a settable clock."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import settings

from agent.cose import SigningKey
from agent.durable import FileOps
from agent.identity import HardwareFacts
from agent.messages import Action
from agent.service import Agent
from agent.store import SLOTS
from hw.facts import StaticFactsProvider
from simulators.licensing_server.vendor import Grant, Vendor

# Tests never assert wall-clock times: no hypothesis deadline (a loaded machine made
# per-example deadlines fail tests that were right).
settings.register_profile("project", deadline=None)
settings.load_profile("project")

T0 = 1_800_000_000  # 2027-01-15, a fixed "now" for deterministic tests


@dataclass
class Clock:
    """A clock the test moves by hand."""

    t: int = T0

    def __call__(self) -> int:
        return self.t


@dataclass
class Device:
    """One simulated server: a real store in a real directory, fed by a settable clock."""

    directory: Path
    clock: Clock
    facts: StaticFactsProvider
    agent: Agent
    vendor: Vendor

    def request(self, action: Action = Action.ACTIVATE, features: Iterable[str] = ()) -> bytes:
        return self.agent.request(action, features)

    def activate(self, **grants: int) -> bytes:
        """Request, issue and apply an activation; returns the response bytes."""
        req = self.request(Action.ACTIVATE, grants)
        resp = self.vendor.issue(req, [Grant(f, c) for f, c in grants.items()], now=self.clock())
        self.agent.apply(resp)
        return resp

    def store_bytes(self) -> dict[str, bytes | None]:
        """Every state slot's exact bytes, to compare the store before and after a refusal."""
        out: dict[str, bytes | None] = {}
        for n in SLOTS:
            p = self.directory / n
            out[n] = p.read_bytes() if p.exists() else None
        return out

    def leftovers(self) -> list[str]:
        """Temporary files left in the store directory (there must be none)."""
        return [n for n in os.listdir(self.directory) if ".tmp" in n]


@dataclass
class Site:
    vendor: Vendor
    root: Path
    clock: Clock = field(default_factory=Clock)
    n: int = 0

    def device(
        self, model: str = "AS-P", serial: str | None = None,
        macs: tuple[str, ...] | None = None, ops: FileOps | None = None,
    ) -> Device:
        self.n += 1
        serial = serial or f"SN-{self.n:06d}"
        macs = macs if macs is not None else (f"00:80:f4:00:00:{self.n:02x}",)
        facts = StaticFactsProvider(HardwareFacts(model=model, serial=serial, macs=macs))
        d = self.root / f"dev{self.n}"
        agent = Agent(d, facts, clock=self.clock, ops=ops)
        agent.init(model, serial, [self.vendor.public])
        return Device(d, self.clock, facts, agent, self.vendor)


@pytest.fixture
def vendor() -> Vendor:
    return Vendor(SigningKey.generate())


@pytest.fixture
def site(tmp_path: Path, vendor: Vendor) -> Site:
    return Site(vendor, tmp_path)


@pytest.fixture
def device(site: Site) -> Device:
    return site.device()


@pytest.fixture
def no_thread_outlives_its_test() -> Iterator[None]:
    """Every thread a test starts ends with it (modules opt in with ``usefixtures``)."""
    before = set(threading.enumerate())
    yield
    for t in set(threading.enumerate()) - before:
        t.join(timeout=5)
        assert not t.is_alive(), f"thread {t.name} outlived its test"


def stop_processes(procs: Iterable[subprocess.Popen[bytes]], wait: float) -> None:
    """Kill what still runs of ``procs``, reap each and close its stdout pipe."""
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=wait)
        assert p.stdout is not None
        p.stdout.close()

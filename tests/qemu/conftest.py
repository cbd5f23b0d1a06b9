"""Fixtures for the tests against the agent inside an emulated arm64 server (QEMU).

These tests boot real guests (qemu-system-aarch64, TCG) from the image
`make qemu-image` builds, so they run only under `make test-qemu`
(LICQEMU_TESTS=1); a plain `make test` reports them as skipped.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.store import SLOTS
from hw.backends.qemu import QemuGuest, default_image_dir, load_manifest
from simulators.licensing_server.vendor import Vendor
from tests.conftest import Clock

HERE = Path(__file__).resolve().parent
#: where the guest keeps its store (simulators/qemu/guest-init)
GUEST_STATE = "/var/lib/licagent/state"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests `qemu`; skip them unless LICQEMU_TESTS=1 (`make test-qemu`)."""
    run = os.environ.get("LICQEMU_TESTS") == "1"
    skip = pytest.mark.skip(reason="boots QEMU guests: run with `make test-qemu`")
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.qemu)
            if not run:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def qemu_image() -> Path:
    image = default_image_dir()
    load_manifest(image)  # a clear error when `make qemu-image` has not run
    return image


@dataclass
class Checked:
    licensed: bool


class GuestAgent:
    """The guest's own store, read by the guest's own `licagent` on its service console."""

    def __init__(self, guest: QemuGuest) -> None:
        self.guest = guest

    def status(self) -> dict[str, Any]:
        rc, out = self.guest.run("licagent", "status", "--state", GUEST_STATE, "--json")
        assert rc == 0, out
        result: dict[str, Any] = json.loads(out)
        return result

    def check(self, feature: str) -> Checked:
        rc, out = self.guest.run("licagent", "check", "--state", GUEST_STATE, feature)
        assert rc in (0, 1), out
        return Checked(rc == 0)

    def journal_verifies(self) -> bool:
        rc, _out = self.guest.run("licagent", "journal", "--state", GUEST_STATE, "--verify")
        return rc == 0


@dataclass
class GuestDevice:
    """The contract suite's Device, for a server that lives inside a QEMU guest."""

    guest: QemuGuest
    clock: Clock
    vendor: Vendor

    @property
    def agent(self) -> GuestAgent:
        return GuestAgent(self.guest)

    def store_bytes(self) -> dict[str, bytes | None]:
        """Each state slot's SHA-256 as the guest reads it (compared before and after)."""
        out: dict[str, bytes | None] = {}
        for n in SLOTS:
            rc, text = self.guest.run("sha256sum", f"{GUEST_STATE}/{n}")
            out[n] = text.split()[0].encode() if rc == 0 and text.split() else None
        return out


def boot(tmp: Path, vendor: Vendor, image: Path, name: str = "state.img",
         time: str | None = None, serial: str = "AS-P-QEMU-0001") -> QemuGuest:
    trust = tmp / "vendor.pub"
    trust.write_bytes(vendor.public.to_pem())
    guest = QemuGuest(tmp / name, image, trust=trust, serial=serial, time=time,
                      console=tmp / "console.log")
    guest.start()
    return guest


@pytest.fixture
def guest_factory(tmp_path: Path, qemu_image: Path) -> Iterator[Any]:
    """Boot guests on demand; every one still running at the end is shut down."""
    started: list[QemuGuest] = []

    def make(vendor: Vendor, **kw: Any) -> QemuGuest:
        g = boot(tmp_path, vendor, qemu_image, **kw)
        started.append(g)
        return g

    yield make
    for g in started:
        g.stop()
    # nothing leaked: every qemu process has been reaped
    assert all(g.proc is None for g in started)

"""``create-request`` with license information: one opening of the store, the same outcome.

The link operation reads this device's features out of the vendor-signed license
information and signs a request for them. It does both on one opening of the store
(``Agent.request_from_license_info``); what it signs, journals and refuses is what
``features_from_license_info`` followed by ``request`` gives, on two copies of one store.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.errors import LicensingError
from agent.messages import Action, License, Revocation
from agent.ops import AgentOps
from agent.service import Agent
from agent.store import Store
from tests.agent.test_crash import state_of
from tests.conftest import Device, Site


class CountingAgent(Agent):
    """The real agent, counting how often an operation opens its store."""

    opened = 0

    @contextmanager
    def _open(self) -> Iterator[tuple[Store, int]]:
        type(self).opened += 1
        with super()._open() as got:
            yield got


def _copy(dev: Device, tmp: Path, name: str) -> CountingAgent:
    shutil.copytree(dev.directory, tmp / name)
    return CountingAgent(tmp / name, dev.agent.facts, clock=dev.agent.clock)


def _outcome(call: Any) -> tuple[str, Any]:
    try:
        return "ok", call()
    except LicensingError as err:
        return type(err).__name__, str(err)


def _infos(dev: Device) -> dict[str, bytes]:
    me = dev.agent.status()["device_id"]
    now = dev.clock()
    v = dev.vendor
    return {
        "install": v.license_info({me: ([], [License("bacnet", 2), License("modbus", 1)])}, now),
        "reclaim": v.license_info({me: ([License("knx", 2)], [])}, now),
        "nothing": v.license_info({"0" * 64: ([], [License("bacnet", 1)])}, now),
        "expired": v.license_info({me: ([], [License("bacnet", 1)])}, now - 40 * 86400),
        "revoked": v.license_info({me: ([], [])}, now,
                                  revoked=(Revocation(me, now, "RMA 7: dead"),)),
        "forged": dev.vendor.license_info({me: ([], [])}, now)[:-3] + b"\0\0\0",
    }


@pytest.mark.parametrize("which", ["install", "reclaim", "nothing", "expired", "revoked",
                                   "forged"])
def test_one_opening_gives_what_two_give(site: Site, tmp_path: Path, which: str) -> None:
    dev = site.device()
    dev.activate(knx=2)
    info = _infos(dev)[which]
    action = Action.RECLAIM if which == "reclaim" else Action.ACTIVATE
    asked = [] if action is Action.RECLAIM else ["extra"]
    one, two = _copy(dev, tmp_path, "one"), _copy(dev, tmp_path, "two")

    CountingAgent.opened = 0
    got_one = _outcome(lambda: AgentOps(one)("create-request", {
        "action": action.value, "features": asked, "license_info": info}).file)
    assert CountingAgent.opened == 1

    def separately() -> bytes:
        features = [*asked, *two.features_from_license_info(info, action)]
        return two.request(action, features)

    CountingAgent.opened = 0
    got_two = _outcome(separately)
    assert got_one[0] == got_two[0]
    if got_one[0] != "ok":
        assert got_one[1] == got_two[1]  # the same refusal, word for word
    a, b = state_of(tmp_path / "one"), state_of(tmp_path / "two")
    # the same decision (a request's nonce is fresh randomness: not the bytes)
    assert (a.sequence, a.licenses, dict(a.extra), len(a.outstanding)) == \
        (b.sequence, b.licenses, dict(b.extra), len(b.outstanding))
    assert [o.features for o in a.outstanding] == [o.features for o in b.outstanding]
    if which in ("install", "reclaim"):
        assert got_one[0] == "ok"
        assert len(a.outstanding) == 1 + len(dev.agent.state()[0].outstanding)

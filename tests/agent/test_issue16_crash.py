"""Crash safety of the state changes issue 16 adds: a simulated crash at every FileOps call
of a transfer out, a transfer in, a revocation dropping the licenses, and a certified time
resetting the clock mark. A fresh process finds exactly the old or exactly the new state
(the journal record is the commit point and is replayed: ``protocol.replay_event``), and
the device goes on.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import RevokedError
from agent.messages import Action, Revocation
from agent.protocol import AgentState
from agent.service import Agent
from agent.store import JOURNAL_FILE
from simulators.licensing_server.vendor import Grant
from tests.agent.test_crash import CrashOps, SimulatedCrash, state_of
from tests.conftest import T0, Device, Site

Op = Callable[[Agent], object]


def logical(st: AgentState) -> tuple[object, ...]:
    """What a commit decides (a transfer id is fresh randomness, so not the bytes)."""
    return (st.sequence, st.licenses, st.clock_hwm, len(st.transfers_in),
            tuple(f for f, _ in st.evidence), dict(st.extra), len(st.outstanding))


def _revoke(dev: Device) -> Op:
    info = dev.vendor.license_info({dev.agent.status()["device_id"]: ([], [])}, now=dev.clock(),
                                   revoked=(Revocation(dev.agent.status()["device_id"],
                                                       dev.clock(), "RMA 1: dead"),))

    def op(agent: Agent) -> object:
        try:
            return agent.features_from_license_info(info, Action.ACTIVATE)
        except RevokedError:
            return None
    return op


def _setup(site: Site, which: str) -> tuple[Device, Op]:
    dev = site.device()
    dev.activate(knx=2)
    req = dev.request(Action.ACTIVATE, ["modbus"])
    dev.agent.apply(dev.vendor.issue(req, [Grant("modbus", 3, transferable=True)],
                                     now=dev.clock()))
    if which == "transfer-out":
        to = site.device().agent.status()["device_id"]
        return dev, lambda a: a.transfer_out(["modbus"], to)
    if which == "transfer-in":
        new = site.device()
        data = dev.agent.transfer_out(["modbus"], new.agent.status()["device_id"])
        return new, lambda a: a.apply_transfer(data)
    if which == "revoked":
        return dev, _revoke(dev)
    # clock: one reading in 2038 pushed the mark; the clock is right again
    site.clock.t = 2_147_483_000
    dev.agent.check("knx")
    site.clock.t = T0 + 60
    creq = dev.request(Action.CLOCK)
    resp = dev.vendor.issue(creq, now=dev.clock())
    return dev, lambda a: a.apply(resp)


@pytest.mark.parametrize("which", ["transfer-out", "transfer-in", "revoked", "clock"])
def test_crash_at_every_call_of_an_issue_16_change(site: Site, tmp_path: Path,
                                                    which: str) -> None:
    dev, op = _setup(site, which)
    pristine = tmp_path / "pristine"
    shutil.copytree(dev.directory, pristine)
    old = logical(state_of(pristine))
    ref = tmp_path / "reference"
    shutil.copytree(pristine, ref)
    counter = CrashOps()
    op(Agent(ref, dev.facts, clock=dev.clock, ops=counter))
    new = logical(state_of(ref))
    assert new != old
    total = len(counter.calls)
    assert total >= 12
    seen = set()
    for k in range(1, total + 1):
        d = tmp_path / f"k{k}"
        shutil.copytree(pristine, d)
        ops = CrashOps(k)
        with pytest.raises(SimulatedCrash):
            op(Agent(d, dev.facts, clock=dev.clock, ops=ops))
        ops.die()
        # a dead process's writes are in the page cache: a whole record is committed
        expect_new = ops.done("write", re.escape(JOURNAL_FILE) + "$")
        got = logical(state_of(d))
        assert got == (new if expect_new else old), f"{which}: crash at call {k}/{total}"
        seen.add(expect_new)
        # ... and goes on: a fresh agent serves the store (check, then a new request)
        agent = Agent(d, dev.facts, clock=dev.clock)
        agent.check("knx")
        if which == "clock":  # the certified time again: applied now, or the same receipt
            op(agent)
            assert logical(state_of(d))[:3] == new[:3]
        if which != "revoked":
            agent.request(Action.ACTIVATE, ["bacnet"])
        else:
            if not expect_new:
                op(agent)  # sees the revocation now: drops the licenses
            assert agent.status()["licenses"] == []
            with pytest.raises(RevokedError):
                agent.request(Action.ACTIVATE, ["bacnet"])
        shutil.rmtree(d)
    assert seen == {False, True}  # the loop covered the commit point

"""Issue 15 item 5: a hypothesis state machine over one floating pool on a real store.

Checkouts (leased and borrowed), renewals, returns, clock jumps both ways, restarts, a
crash at a random file call of a checkout, and the vendor raising the count. A small
model (the seats out with their ends, the clock mark) predicts every outcome down to the
refusal class; after every step the store is opened afresh from disk and must hold
exactly the model's seats, and never more seats out than the license's count.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from agent import errors, seats
from agent.cose import SigningKey
from agent.service import Agent
from agent.store import Store
from simulators.licensing_server.vendor import Grant, Vendor
from tests.agent.test_crash import CrashOps, SimulatedCrash
from tests.conftest import Device, Site

EXAMPLES = max(1, int(os.environ.get("FUZZ_EXAMPLES", "200")) // 4)
VENDOR = Vendor(SigningKey.generate())


class SeatMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="licagent-seats-"))
        self.site = Site(VENDOR, self.root)
        self.device: Device = self.site.device()
        self.clock = self.site.clock
        self.count = 2
        self.grant(self.count)
        # the model: seat id -> (until, borrowed); the tokens the clients hold
        self.out: dict[bytes, tuple[int, bool]] = {}
        self.tokens: list[bytes] = []
        self.hwm = self.clock()
        self.agent = self.device.agent

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def grant(self, count: int) -> None:
        req = self.device.request(features=["editor"])
        self.device.agent.apply(self.device.vendor.issue(
            req, [Grant("editor", count, floating=True)], now=self.clock()))

    @property
    def t(self) -> int:
        return max(self.clock(), self.hwm)

    def live(self) -> dict[bytes, tuple[int, bool]]:
        return {k: v for k, v in self.out.items() if v[0] > self.t}

    # ------------------------------------------------------------ rules

    @rule(client=st.sampled_from(["ws-1", "ws-2", "laptop"]),
          lease=st.sampled_from([10, 60, 300]),
          borrow=st.sampled_from([None, None, 3600, 48 * 3600]))
    def checkout(self, client: str, lease: int, borrow: int | None) -> None:
        t, live = self.t, self.live()
        if len(live) >= self.count:
            try:
                self.agent.seat_checkout("editor", client, lease, borrow)
            except errors.NoSeatError as err:
                assert err.next_free == min(u for u, _b in live.values())
                return
            raise AssertionError("a seat was given beyond the count")
        seat, token = self.agent.seat_checkout("editor", client, lease, borrow)
        assert seat.until == t + (borrow if borrow is not None else lease)
        assert seat.borrowed == (borrow is not None)
        self.out = {**live, seat.id: (seat.until, seat.borrowed)}
        self.tokens.append(token)
        self.hwm = t

    @precondition(lambda self: bool(self.tokens))
    @rule(pick=st.integers(min_value=0), lease=st.sampled_from([10, 300]))
    def renew(self, pick: int, lease: int) -> None:
        token = self.tokens[pick % len(self.tokens)]
        sid = seats.read_token(token).seat.id
        t, live = self.t, self.live()
        if sid not in live:
            expect: type[errors.LicensingError] = errors.SeatNotOutError
        elif live[sid][1]:
            expect = errors.UsageError
        else:
            seat, _new = self.agent.seat_renew(token, lease)
            assert seat.until == max(live[sid][0], t + lease)
            self.out = {**live, sid: (seat.until, False)}
            self.hwm = t
            return
        try:
            self.agent.seat_renew(token, lease)
        except expect:
            return
        raise AssertionError(f"renew did not raise {expect.__name__}")

    @precondition(lambda self: bool(self.tokens))
    @rule(pick=st.integers(min_value=0))
    def give_back(self, pick: int) -> None:
        token = self.tokens[pick % len(self.tokens)]
        sid = seats.read_token(token).seat.id
        t, live = self.t, self.live()
        if sid in live:
            self.agent.seat_return(token)
            self.out = {k: v for k, v in live.items() if k != sid}
            self.hwm = t
        else:
            try:
                self.agent.seat_return(token)
            except errors.SeatNotOutError:
                return
            raise AssertionError("a seat not out was returned")

    @rule(step=st.sampled_from([1, 9, 10, 59, 60, 299, 300, 301, 3600, 48 * 3600, 5 * 86400]))
    def clock_forward(self, step: int) -> None:
        self.clock.t += step

    @rule(step=st.sampled_from([1, 60, 300, 3600, 86400]))
    def clock_back(self, step: int) -> None:
        self.clock.t -= step

    @rule()
    def restart(self) -> None:
        self.agent = Agent(self.device.directory, self.device.facts, clock=self.clock)

    @rule(k=st.integers(min_value=1, max_value=40), client=st.sampled_from(["ws-1", "laptop"]))
    def crash_in_checkout(self, k: int, client: str) -> None:
        t, live = self.t, self.live()
        ops = CrashOps(k)
        crashed = False
        try:
            seat, token = Agent(self.device.directory, self.device.facts, clock=self.clock,
                                ops=ops).seat_checkout("editor", client)
        except SimulatedCrash:
            crashed = True
            ops.die()
        except errors.NoSeatError:
            assert len(live) >= self.count
            return
        self.agent = Agent(self.device.directory, self.device.facts, clock=self.clock)
        if not crashed:
            self.out = {**live, seat.id: (seat.until, False)}
            self.tokens.append(token)
            self.hwm = t
            return
        # the crash left the old pool or the pool with the new seat, nothing else
        now_out = {s.id: (s.until, s.borrowed) for s in self.agent.seat_list()[0]}
        new = set(now_out) - set(live)
        assert {k: now_out.get(k) for k in live} == live
        assert not new or (len(new) == 1 and len(live) < self.count)
        if new:
            (sid,) = new
            assert now_out[sid] == (t + seats.DEFAULT_LEASE, False)
            self.out = {**live, sid: now_out[sid]}
            self.hwm = t

    @precondition(lambda self: self.count < 5 and self.clock() >= self.hwm)
    @rule()
    def vendor_raises_the_count(self) -> None:
        self.count += 1
        self.grant(self.count)
        # applying commits the clock mark too
        self.hwm = max(self.hwm, self.clock())

    # ------------------------------------------------------------ invariants

    @invariant()
    def the_store_holds_the_model_and_never_more_than_the_count(self) -> None:
        fresh = Agent(self.device.directory, self.device.facts, clock=self.clock)
        out, pools = fresh.seat_list()
        assert {s.id: (s.until, s.borrowed) for s in out} == self.live()
        (pool,) = pools
        assert pool.count == self.count and pool.out == len(out) <= self.count
        assert Store.open(self.device.directory, None).state.clock_hwm == self.hwm


SeatMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestSeatMachine = SeatMachine.TestCase

"""Issue 14: the grant rules as a hypothesis state machine over the pure protocol.

One top server with an inheritable license of COUNT slots, four children attached to it;
hypothesis renews children in any order, moves the clock, recalls, reclaims (forced, so
leases run on), and children that stop renewing. After every step:

* grants-within-count: never more than COUNT children can use the feature, and the parent
  never records more than COUNT live grants;
* inherited-within-lease: a child uses the feature only inside a lease it was granted, and
  no lease is longer than the configured one;
* reclaimed-not-inherited: after the reclaim, no grant is issued, and a child uses the
  feature only through a grant issued before it, at most one lease past it;
* recalled-not-granted: after a recall no child that held nothing gets a grant.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from agent import inherit, tree
from agent.cose import SigningKey
from agent.messages import Action, TrustKey
from agent.protocol import (
    DEFAULT_LIMITS,
    AgentState,
    apply_response,
    create_request,
    make_device_info,
    new_state,
)
from agent.record import replace
from simulators.licensing_server.vendor import Grant, Vendor

T0 = 1_800_000_000
DAY = 86400
LEASE = 2 * DAY
LIMITS = replace(DEFAULT_LIMITS, grant_lease=LEASE)
N_CHILDREN = 4
HOST = "00" * 32


def _server(model: str, vendor: Vendor, n: int) -> tuple[AgentState, SigningKey]:
    key = SigningKey.generate()
    st_ = new_state(key.public, model, f"SN-{n}", [f"serial:SN-{n}"], [TrustKey(vendor.public)],
                    T0)
    return st_, key


class GrantRules(RuleBasedStateMachine):
    @initialize(count=st.integers(1, 3))
    def setup(self, count: int) -> None:
        self.vendor = Vendor(SigningKey.generate())
        self.now = T0
        self.count = count
        self.parent, self.pkey = _server("Enterprise-Server", self.vendor, 0)
        new, req, _r = create_request(self.parent, Action.ACTIVATE, ["F"], b"\x01" * 16, T0,
                                      self.pkey)
        resp = self.vendor.issue(req, [Grant("F", count, inherit=count)], now=T0)
        self.parent = apply_response(new, resp, T0, self.pkey).state
        link = tree.ParentLink(self.parent.device_id, self.parent.device_key,
                               "Enterprise-Server", None, 1, T0)
        self.children: list[tuple[AgentState, SigningKey]] = []
        for i in range(N_CHILDREN):
            c, k = _server("AS-P", self.vendor, i + 1)
            c = replace(c, system=tree.apply_event(c.system, "attach",
                                                   {"parent": link.to_cbor()}))
            self.children.append((c, k))
        self.reclaimed_at: int | None = None
        self.recalled_at: int | None = None
        self.ever_held: set[int] = set()
        self.n_request = 2

    # ------------------------------------------------------------ rules

    def _at_now(self, s: AgentState) -> AgentState:
        return replace(s, clock_hwm=max(s.clock_hwm, self.now))

    @rule(i=st.integers(0, N_CHILDREN - 1))
    def renew(self, i: int) -> None:
        child, ckey = self.children[i]
        child = self._at_now(child)
        self.parent = self._at_now(self.parent)
        info, _ = make_device_info(child, {}, HOST, self.now, ckey)
        issued = inherit.issue_grants(self.parent, info, None, {}, self.now, self.pkey, LIMITS)
        if self.reclaimed_at is not None:
            assert issued.files == (), "a grant after the reclaim"
        if self.recalled_at is not None and i not in self._holders_at_recall:
            assert issued.files == (), "a new grant after the recall"
        self.parent = replace(self.parent, system=tree.apply_event(
            self.parent.system, "grant-issue", issued.event))
        good = [inherit.verify_grant(child, f, self.now, LIMITS) for f in issued.files]
        if good:
            self.ever_held.add(i)
        if issued.recalled:
            ret, feats = inherit.make_return(child, issued.recalled, ckey, self.now)
            child = replace(child, system=tree.apply_event(
                child.system, "grant-return", {"side": "child", "features": list(feats),
                                               "return": ret}))
            back = inherit.read_return(self.parent, ret)
            self.parent = replace(self.parent, system=tree.apply_event(
                self.parent.system, "grant-return", {"child_id": back.child_id,
                                                     "features": list(back.features),
                                                     "return": ret}))
        child = replace(child, system=tree.apply_event(child.system, "grant-install", {
            "parent_id": self.parent.device_id, "grants": [g.to_cbor() for g in good]}))
        self.children[i] = (child, ckey)

    @rule(dt=st.integers(0, 3 * DAY))
    def advance(self, dt: int) -> None:
        self.now += dt

    @precondition(lambda self: self.recalled_at is None and self.reclaimed_at is None)
    @rule()
    def recall(self) -> None:
        self._holders_at_recall = {
            i for i, (c, _k) in enumerate(self.children)
            if any(g.child_id == c.device_id for g in self.parent.system.granted)}
        self.parent = replace(self.parent, system=tree.apply_event(
            self.parent.system, "grant-recall", {"features": ["F"]}))
        self.recalled_at = self.now

    @precondition(lambda self: self.reclaimed_at is None)
    @rule()
    def reclaim_forced(self) -> None:
        self.parent = self._at_now(self.parent)
        nonce = self.n_request.to_bytes(16, "big")
        self.n_request += 1
        new, req, _r = create_request(self.parent, Action.RECLAIM, ["F"], nonce, self.now,
                                      self.pkey)
        resp = self.vendor.issue(req, removes=["F"], now=self.now)
        live = inherit.holders(self.parent, ["F"], self.now)
        res = apply_response(new, resp, self.now, self.pkey)
        rc_leases = {(x["child_id"], x["lease_until"])
                     for x in _receipt(res.receipt, self.vendor).leases}
        assert rc_leases == {(g.child_id, g.until) for g in live}
        self.parent = res.state
        self.reclaimed_at = self.now

    # ------------------------------------------------------------ invariants

    def _using(self) -> list[tuple[int, AgentState]]:
        return [(i, c) for i, (c, _k) in enumerate(self.children)
                if inherit.check_units(c, "F", self.now, 1, LIMITS).licensed]

    @invariant()
    def grants_within_count(self) -> None:
        if not hasattr(self, "parent"):
            return
        assert len(self._using()) <= self.count
        assert len(self.parent.system.active_grants("F", self.now)) <= self.count
        slots = [g.slot for g in self.parent.system.active_grants("F", self.now)]
        assert len(slots) == len(set(slots)) and all(0 <= s < self.count for s in slots)

    @invariant()
    def inherited_within_lease(self) -> None:
        if not hasattr(self, "parent"):
            return
        for _i, c in self._using():
            live = [g for g in c.system.inherited if g.feature == "F"]
            assert any(g.issued <= self.now <= g.lease_until for g in live)
            assert all(g.lease_until - g.issued <= LEASE for g in live)

    @invariant()
    def reclaimed_not_inherited(self) -> None:
        if not hasattr(self, "parent") or self.reclaimed_at is None:
            return
        for _i, c in self._using():
            assert all(g.issued <= self.reclaimed_at for g in c.system.inherited)
            assert self.now <= self.reclaimed_at + LEASE


def _receipt(data: bytes, vendor: Vendor) -> Any:
    from agent.formats import verify_receipt

    return verify_receipt(data, [vendor.public])


TestGrantRules = GrantRules.TestCase
TestGrantRules.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)

"""Model-based test of one device over many operations, on a real store on disk.

A hypothesis ``RuleBasedStateMachine`` drives requests, vendor answers,
applies, replays, stale answers, clock jumps and restarts. A small model
(feature -> License, the sequence, outstanding nonces, the clock high-water
mark, the applied history) predicts every outcome, down to the refusal class.
After every step the store is re-read from disk and compared with the model,
and its journal must verify.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from agent import errors
from agent.cose import SigningKey, decode_sign1, strict_loads
from agent.formats import verify_receipt
from agent.messages import (
    Action,
    ChangeOp,
    License,
    LicenseChange,
    Request,
    Response,
    decode_payload,
    state_digest,
)
from agent.protocol import AgentState, Limits
from agent.service import Agent
from agent.store import Store
from simulators.licensing_server.vendor import DAY, Grant, Vendor
from tests.conftest import Device, Site

LIMITS = Limits()
FEATURES = ("bacnet", "modbus", "lon", "mqtt")
EXAMPLES = max(1, int(os.environ.get("FUZZ_EXAMPLES", "200")) // 4)
VENDOR = Vendor(SigningKey.generate())

forward_steps = st.one_of(
    st.sampled_from([1, 60, 299, 300, 301, 3599, 3600, 3601, DAY, 7 * DAY, 30 * DAY + 1,
                     400 * DAY]),
    st.integers(min_value=1, max_value=40 * DAY),
)
back_steps = st.one_of(
    st.sampled_from([1, 60, 299, 300, 301, 3600, DAY, 30 * DAY]),
    st.integers(min_value=1, max_value=2 * DAY),
)
feature_lists = st.lists(st.sampled_from(FEATURES), min_size=1, max_size=3, unique=True)
optional_times = st.one_of(st.none(), st.integers(min_value=-DAY, max_value=60 * DAY))


def parse_response(data: bytes) -> Response:
    payload = decode_payload(
        strict_loads(decode_sign1(data, max_size=LIMITS.max_file).payload,
                     max_size=LIMITS.max_file),
        Response,
    )
    assert isinstance(payload, Response)
    return payload


@dataclass(frozen=True)
class Sent:
    """A response the vendor signed, with its decoded payload."""

    data: bytes
    response: Response

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.data).digest()


class DeviceMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="licagent-sm-"))
        self.site = Site(VENDOR, self.root)
        self.device: Device = self.site.device()
        self.clock = self.site.clock
        # the model
        self.sequence = 0
        self.licenses: dict[str, License] = {}
        self.outstanding: list[Request] = []
        self.hwm = self.clock()
        self.history: list[Sent] = []  # every applied response, oldest first
        self.issued: list[Sent] = []  # signed by the vendor, never applied
        # what the device remembers about applied responses (bounded)
        self.applied_memory: list[tuple[bytes, bytes]] = []  # (nonce, digest)
        self.max_sequence_seen = 0
        self.journal_len = 0
        self.seen_unlicensed: set[tuple[str, object]] = set()

    def teardown(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ model helpers

    @property
    def now(self) -> int:
        return self.clock()

    def clock_is_set_back(self) -> bool:
        return self.now + LIMITS.clock_tolerance < self.hwm

    def expected_apply(self, sent: Sent) -> type[errors.LicensingError] | str:
        """What applying ``sent`` must do now: "applied", "idempotent" or the refusal class."""
        r = sent.response
        if self.history and self.history[-1].digest == sent.digest:
            return "idempotent"
        if any(n == r.nonce or d == sent.digest for n, d in self.applied_memory):
            return errors.AlreadyAppliedError
        if r.base_sequence < self.sequence:
            return errors.StaleError
        if r.base_sequence > self.sequence:
            return errors.TooNewError
        req = next((q for q in self.outstanding if q.nonce == r.nonce), None)
        if req is None:
            return errors.UnknownRequestError
        model_digest = state_digest(self.licenses.values())
        if r.base_digest != model_digest or req.state_digest != model_digest:
            return errors.StaleError
        if self.clock_is_set_back():
            return errors.ClockSetBackError
        if self.now < r.not_before:
            return errors.NotYetValidError
        if max(self.now, self.hwm) > r.expires:  # a clock within tolerance gains nothing
            return errors.ExpiredError
        return "applied"

    def model_apply(self, sent: Sent) -> None:
        for ch in sent.response.changes:
            if ch.op is ChangeOp.REMOVE:
                del self.licenses[ch.feature]
            else:
                assert (ch.feature in self.licenses) == (ch.op is ChangeOp.UPDATE)
                self.licenses[ch.feature] = ch.license()
        self.sequence = sent.response.sequence
        self.outstanding = []
        self.history.append(sent)
        self.applied_memory = [*self.applied_memory, (sent.response.nonce, sent.digest)][
            -LIMITS.max_applied_history:]
        self.hwm = max(self.hwm, self.now)
        if sent in self.issued:
            self.issued.remove(sent)

    def do_apply(self, sent: Sent) -> None:
        """Apply through the agent and compare the outcome with the model's prediction."""
        expected = self.expected_apply(sent)
        event(f"apply: {expected if isinstance(expected, str) else expected.__name__}")
        before = self.device.store_bytes()
        try:
            res, warn = self.device.agent.apply(sent.data)
        except errors.LicensingError as exc:
            assert not isinstance(expected, str), f"expected {expected}, got {exc!r}"
            assert type(exc) is expected, f"expected {expected.__name__}, got {exc!r}"
            assert self.device.store_bytes() == before
            return
        assert expected in ("applied", "idempotent"), f"expected {expected}, but it applied"
        assert warn is None
        if expected == "idempotent":
            assert res.already_applied
            assert self.device.store_bytes() == before
            return
        assert not res.already_applied
        self.model_apply(sent)
        rc = verify_receipt(res.receipt, [VENDOR.public])
        assert rc.response == sent.data
        assert {lic.feature: lic for lic in rc.licenses} == self.licenses

    def changes_for(self, req: Request, data: st.DataObject) -> tuple[LicenseChange, ...] | None:
        """The vendor's answer to ``req``, with drawn counts and validity; None if nothing."""
        installed = {lic.feature: lic for lic in req.licenses}
        grants: list[Grant] = []
        if req.action is Action.RECLAIM:
            return VENDOR.changes_for(req, [], [])
        feats = req.features or (tuple(installed) if req.action is Action.RENEW else ())
        for f in feats:
            count = (installed[f].count if req.action is Action.RENEW
                     else data.draw(st.integers(min_value=0, max_value=50), label="count"))
            na = data.draw(optional_times, label="not_after offset")
            nb = data.draw(st.one_of(st.none(), st.integers(min_value=-DAY, max_value=2 * DAY)),
                           label="not_before offset")
            not_after = None if na is None else self.now + na
            not_before = None if nb is None else self.now + nb
            if not_before is not None and not_after is not None and not_after < not_before:
                not_after = not_before
            grace = data.draw(st.sampled_from([0, 1, 3600, DAY]), label="grace")
            grants.append(Grant(f, count, not_after, not_before, grace))
        if not grants:
            return None
        return VENDOR.changes_for(req, grants, [])

    def issue(self, req: Request, data: st.DataObject) -> Sent | None:
        changes = self.changes_for(req, data)
        if changes is None:
            return None
        valid_for = data.draw(st.sampled_from([3600, DAY, 30 * DAY]), label="valid_for")
        resp = VENDOR.response_for(req, changes, self.now, valid_for)
        sent = Sent(VENDOR.sign(resp), resp)
        assert parse_response(sent.data) == resp
        self.issued.append(sent)
        return sent

    # ------------------------------------------------------------ rules

    @initialize(feats=feature_lists, data=st.data())
    def first_activation(self, feats: list[str], data: st.DataObject) -> None:
        self.request(Action.ACTIVATE, feats)
        self.issue_and_apply_newest(data)

    @rule(action=st.sampled_from([Action.ACTIVATE, Action.ACTIVATE, Action.RENEW, Action.RECLAIM]),
          feats=st.one_of(feature_lists, feature_lists, feature_lists, st.just([])))
    def request(self, action: Action, feats: list[str]) -> None:
        installed = set(self.licenses)
        usage = action in (Action.RENEW, Action.RECLAIM) and (
            any(f not in installed for f in feats) or (action is Action.RECLAIM and not installed)
        )
        before = self.device.store_bytes()
        try:
            data = self.device.request(action, feats)
        except errors.UsageError:
            assert usage
            assert self.device.store_bytes() == before
            return
        except errors.ClockSetBackError:  # issue 16: a request that would be refused is not made
            assert not usage and self.clock_is_set_back()
            assert self.device.store_bytes() == before
            return
        assert not usage and not self.clock_is_set_back()
        req = VENDOR.read_request(data)
        assert req.sequence == self.sequence
        assert req.action is action and req.features == tuple(feats)
        assert {lic.feature: lic for lic in req.licenses} == self.licenses
        self.outstanding = [*self.outstanding, req][-LIMITS.max_outstanding:]
        self.hwm = max(self.hwm, self.now)

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def issue_and_apply_newest(self, data: st.DataObject) -> None:
        sent = self.issue(self.outstanding[-1], data)
        if sent is not None:
            self.do_apply(sent)

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data())
    def issue_for_any_outstanding(self, data: st.DataObject) -> None:
        self.issue(data.draw(st.sampled_from(self.outstanding), label="request"), data)

    @precondition(lambda self: self.issued)
    @rule(data=st.data())
    def apply_issued(self, data: st.DataObject) -> None:
        """Apply any response the vendor signed: current, stale, lost from the outstanding set."""
        self.do_apply(data.draw(st.sampled_from(self.issued), label="response"))

    @rule(data=st.data())
    def two_answers_then_stale(self, data: st.DataObject) -> None:
        """Answers to two outstanding requests: once one is applied, the other is stale."""
        while len(self.outstanding) < 2:
            self.request(Action.ACTIVATE, data.draw(feature_lists, label="features"))
        first, second = data.draw(st.permutations(self.outstanding), label="order")[:2]
        a, b = self.issue(first, data), self.issue(second, data)
        if a is None or b is None:
            return
        applies = self.expected_apply(a) == "applied"
        self.do_apply(a)
        if applies:
            assert self.expected_apply(b) is errors.StaleError
        self.do_apply(b)

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def replay(self, data: st.DataObject) -> None:
        """Any earlier response is refused as a replay, unless it is the latest (idempotent)."""
        sent = data.draw(st.sampled_from(self.history), label="replayed")
        expected = self.expected_apply(sent)
        if sent is self.history[-1]:
            assert expected == "idempotent"
        else:
            assert expected in (errors.AlreadyAppliedError, errors.StaleError)
        self.do_apply(sent)

    @rule(dt=forward_steps)
    def clock_forward(self, dt: int) -> None:
        self.clock.t += dt

    @rule(dt=back_steps)
    def clock_back(self, dt: int) -> None:
        self.clock.t -= dt

    @rule(data=st.data(), delta=st.sampled_from([-1, 0, 1]))
    def check_at_an_edge(self, data: st.DataObject, delta: int) -> None:
        """Check every feature one second before, at, or after an instant where it flips."""
        clock_edges = [self.hwm - LIMITS.clock_tolerance, self.hwm,
                       self.hwm + LIMITS.hwm_persist_interval]
        license_edges: list[int] = []
        for lic in self.licenses.values():
            license_edges += [t for t in (lic.not_before, lic.not_after) if t is not None]
            if lic.not_after is not None:
                license_edges.append(lic.not_after + lic.grace)
        edges = st.sampled_from(clock_edges)
        if license_edges:
            edges = st.one_of(st.sampled_from(license_edges), st.sampled_from(license_edges),
                              edges)
        self.clock.t = data.draw(edges, label="edge") + delta
        for f in FEATURES:
            self.check(f)

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), delta=st.sampled_from([-1, 0, 1]))
    def apply_at_an_edge(self, data: st.DataObject, delta: int) -> None:
        """Apply a fresh answer one second before, at, or after an end of its validity window."""
        sent = self.issue(self.outstanding[-1], data)
        if sent is None:
            return
        r = sent.response
        self.clock.t = data.draw(st.sampled_from([r.not_before, r.expires]), label="edge") + delta
        self.do_apply(sent)

    @precondition(lambda self: self.clock_is_set_back())
    @rule(dt=st.integers(min_value=0, max_value=600))
    def clock_corrected(self, dt: int) -> None:
        """The operator (or NTP) puts the clock right again."""
        self.clock.t = self.hwm + dt

    @precondition(lambda self: self.outstanding)
    @rule(data=st.data(), extra=st.integers(min_value=1, max_value=30 * DAY))
    def set_back_then_apply(self, data: st.DataObject, extra: int) -> None:
        """With the clock set back beyond the tolerance, even a correct answer is refused."""
        saved = self.clock.t
        self.clock.t = self.hwm - LIMITS.clock_tolerance - extra
        assert self.clock_is_set_back()
        sent = self.issue(self.outstanding[-1], data)
        if sent is not None:
            assert self.expected_apply(sent) is errors.ClockSetBackError
            self.do_apply(sent)
        self.clock.t = saved

    def licensed_at(self, feature: str, t: int) -> bool:
        """Whether ``feature`` is licensed at time ``t``, by the model."""
        lic = self.licenses.get(feature)
        return (
            lic is not None and lic.count > 0
            and (lic.not_before is None or t >= lic.not_before)
            and (lic.not_after is None or t <= lic.not_after + lic.grace)
        )

    @staticmethod
    def phase(lic: License, t: int) -> str:
        if lic.not_before is not None and t < lic.not_before:
            return "not yet valid"
        if lic.not_after is not None and t > lic.not_after:
            return "in grace" if t <= lic.not_after + lic.grace else "expired"
        return "valid"

    @rule(feature=st.sampled_from(FEATURES))
    def check(self, feature: str) -> None:
        res = self.device.agent.check(feature)
        t = max(self.now, self.hwm)
        lic = self.licenses.get(feature)
        licensed = self.licensed_at(feature, t)
        assert res.licensed == licensed, res.message
        if lic is not None and not licensed:
            self.seen_unlicensed.add((feature, lic))
        # item 6: a license once seen expired (or not valid) stays so whatever the clock reads
        assert not (res.licensed and (feature, lic) in self.seen_unlicensed
                    and lic is not None and lic.not_after is not None
                    and self.hwm > lic.not_after + lic.grace), res.message
        event(f"check: licensed={licensed} in_grace={res.in_grace} set_back={res.clock_set_back}")
        assert res.clock_set_back == self.clock_is_set_back()
        if res.licensed:
            assert lic is not None
            assert res.in_grace == (lic.not_after is not None and t > lic.not_after)
            # a clock set back never extends a license past the latest time already seen
            assert lic.not_after is None or lic.not_after + lic.grace >= self.hwm
        # the mark moves (and is saved) when the license's phase differs between the mark
        # and now (the answer depended on it), else hourly
        if self.now > self.hwm and lic is not None and lic.count > 0 and (
                self.phase(lic, self.now) != self.phase(lic, self.hwm)):
            self.hwm = self.now
        if self.now > self.hwm + LIMITS.hwm_persist_interval:
            self.hwm = self.now

    @rule()
    def restart(self) -> None:
        """A new agent process on the same directory: everything comes from disk."""
        dev = self.device
        dev.agent = Agent(dev.directory, dev.facts, clock=self.clock)

    # ------------------------------------------------------------ invariants

    @invariant()
    def disk_matches_model(self) -> None:
        store = Store.open(self.device.directory)
        st_: AgentState = store.state
        assert store.report.warnings == []
        assert st_.sequence >= self.max_sequence_seen
        self.max_sequence_seen = st_.sequence
        assert st_.sequence == self.sequence
        assert {lic.feature: lic for lic in st_.licenses} == self.licenses
        assert [o.nonce for o in st_.outstanding] == [q.nonce for q in self.outstanding]
        assert st_.clock_hwm == self.hwm
        assert [(a.nonce, a.response_digest) for a in st_.applied] == self.applied_memory
        assert (st_.last_receipt is None) == (not self.history)
        # re-loading gives the same state, and the agent (with its binding check) agrees
        assert Store.open(self.device.directory).state == st_
        assert AgentState.from_cbor(strict_loads(st_.encode(), max_size=1 << 20)) == st_
        assert self.device.agent.state()[0] == st_
        # the journal verifies, only grows, and has no torn tail
        rep = store.journal.read()
        assert rep.torn_tail == 0
        assert len(rep.entries) >= self.journal_len
        self.journal_len = len(rep.entries)
        assert self.device.leftovers() == []


DeviceMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestDeviceMachine = DeviceMachine.TestCase

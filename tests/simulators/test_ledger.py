"""The licensing server's SQLite ledger, driven by real device stores.

Unit tests walk the contract of docs/licensing-api.md one decision at a time;
a hypothesis state machine then mixes entitlements, assignments, activations,
reclaims and receipts delivered on time, late, twice or never, across ledger
restarts, and checks after every step that no more is granted than entitled,
that a reclaimed license is free again only once its receipt is verified, and
that a receipt is accepted once.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agent import errors
from agent.cose import SigningKey, canonical, decode_sign1, strict_loads
from agent.digest import sha256
from agent.messages import (
    Action,
    ChangeOp,
    License,
    LicenseInfo,
    Payload,
    Response,
    decode_payload,
)
from simulators.licensing_server.ledger import Ledger, NotEntitledError
from simulators.licensing_server.vendor import DAY, Grant, Vendor
from tests.conftest import T0, Device, Site
from tests.support.postgres import PostgresServer

E, P = "ORDER-1", "BMS-Pro"


def payload(data: bytes, cls: type[Payload]) -> Any:
    env = decode_sign1(data, max_size=16 * 1024 * 1024)
    return decode_payload(strict_loads(env.payload, max_size=16 * 1024 * 1024), cls)


def changes(resp: bytes) -> list[tuple[str, str, int]]:
    r = payload(resp, Response)
    return [(c.op.value, c.feature, c.count) for c in r.changes]


def site_info(*device_files: bytes) -> bytes:
    return canonical({"v": 1, "kind": "site-info", "site": "plant", "created": T0,
                      "devices": list(device_files), "failed": []})


def dev_id(d: Device) -> str:
    return str(d.agent.status()["device_id"])


def held(d: Device) -> dict[str, int]:
    return {x["feature"]: x["count"] for x in d.agent.status()["licenses"]}


@pytest.fixture
def ledger(ledger_db: str, vendor: Vendor) -> Iterable[Ledger]:
    """A new ledger on each backend (tests/simulators/conftest.py: SQLite and PostgreSQL)."""
    led = Ledger(ledger_db, vendor, clock=lambda: T0)
    yield led
    led.close()


def activate(led: Ledger, d: Device, *features: str) -> bytes:
    """Request, answer, apply and confirm an activation; returns the receipt."""
    resp = led.answer_request(d.request(Action.ACTIVATE, features))
    res, _ = d.agent.apply(resp)
    led.accept_receipt(res.receipt)
    return res.receipt


# ---------------------------------------------------------------- entitlements and assignments


def test_entitle_adds_to_an_entitlement(ledger: Ledger) -> None:
    ledger.entitle(E, P, {"bacnet": 5})
    ent = ledger.entitle(E, P, {"bacnet": 3, "modbus": 2}, until=T0 + 365 * DAY)
    feats = {f["feature"]: f for f in ent["products"][0]["features"]}
    assert feats["bacnet"]["count"] == 8 and feats["modbus"]["count"] == 2
    assert feats["bacnet"]["until"] == feats["modbus"]["until"] is not None
    assert ledger.free(E, "bacnet") == 8


@pytest.mark.parametrize("args", [
    ("", P, {"f": 1}), (E, "bad\tname", {"f": 1}), (E, "P" * 129, {"f": 1}), (E, P, {}), (E, P, {"-x": 1}),
    (E, P, {"f": -1}), (E, P, {"f": True}), (E, P, {"f": 2**32}),
])
def test_entitle_refuses_nonsense(ledger: Ledger, args: tuple[Any, ...]) -> None:
    with pytest.raises(errors.UsageError):
        ledger.entitle(*args)
    assert ledger.report()["entitlements"] == []


def test_assign_never_exceeds_the_entitlement(ledger: Ledger, site: Site) -> None:
    a, b = site.device(), site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    assert ledger.assign(E, dev_id(a), "bacnet", 3)["free"] == 2
    with pytest.raises(NotEntitledError) as exc:
        ledger.assign(E, dev_id(b), "bacnet", 3)
    assert exc.value.exit_code == 6 and "at most 2" in str(exc.value)
    ledger.assign(E, dev_id(b), "bacnet", 2)
    assert ledger.free(E, "bacnet") == 0
    ledger.assign(E, dev_id(a), "bacnet", 1)  # lowering before activation frees at once
    assert ledger.free(E, "bacnet") == 2


def test_assign_refuses_unknown_or_ambiguous(ledger: Ledger, site: Site) -> None:
    d = dev_id(site.device())
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.entitle(E, "Addon", {"bacnet": 5})
    ledger.entitle("ORDER-2", P, {"bacnet": 5})
    for ent, dev, feat in [("NOPE", d, "bacnet"), (E, d, "lon"), (E, "x" * 64, "bacnet")]:
        with pytest.raises(errors.UsageError):
            ledger.assign(ent, dev, feat, 1)
    with pytest.raises(errors.UsageError, match="name the product"):
        ledger.assign(E, d, "bacnet", 1)
    ledger.assign(E, d, "bacnet", 1, product="Addon")
    with pytest.raises(errors.UsageError, match="assigned from ORDER-1/Addon"):
        ledger.assign("ORDER-2", d, "bacnet", 1)


# ---------------------------------------------------------------- requests


def test_activation_round_trip(ledger: Ledger, site: Site) -> None:
    d = site.device()
    ledger.entitle(E, P, {"bacnet": 5, "modbus": 2}, until=T0 + 365 * DAY)
    ledger.assign(E, dev_id(d), "bacnet", 3)
    resp = ledger.answer_request(d.request(Action.ACTIVATE))
    assert changes(resp) == [("add", "bacnet", 3)]
    assert payload(resp, Response).changes[0].not_after == T0 + 365 * DAY
    res, _ = d.agent.apply(resp)
    assert held(d) == {"bacnet": 3}
    rc = ledger.accept_receipt(res.receipt)
    assert rc.device_id == dev_id(d) and rc.sequence == 1 and rc.freed == ()
    rep = ledger.report()
    assert rep["installed"][dev_id(d)][0]["count"] == 3
    assert rep["open_responses"] == 0 and rep["pending_reclaims"] == []
    with pytest.raises(errors.AlreadyAppliedError):
        ledger.accept_receipt(res.receipt)
    # an expansion: more assigned, the same feature updated in one round trip
    ledger.assign(E, dev_id(d), "bacnet", 5)
    resp = ledger.answer_request(d.request(Action.ACTIVATE))
    assert changes(resp) == [("update", "bacnet", 5)]


def test_activation_names_features_and_refuses_when_nothing_waits(ledger: Ledger,
                                                                  site: Site) -> None:
    d = site.device()
    ledger.entitle(E, P, {"bacnet": 5, "modbus": 2})
    with pytest.raises(errors.UsageError, match="nothing to activate"):
        ledger.answer_request(d.request(Action.ACTIVATE))
    ledger.assign(E, dev_id(d), "bacnet", 1)
    ledger.assign(E, dev_id(d), "modbus", 1)
    assert changes(ledger.answer_request(d.request(Action.ACTIVATE, ["modbus"]))) == [
        ("add", "modbus", 1)]
    ops = ledger.operations()
    assert [(o["kind"], o["outcome"].split(":")[0]) for o in ops if o["kind"] == "request"] == [
        ("request", "refused"), ("request", "ok")]


def test_the_same_request_gets_the_same_response(ledger: Ledger, site: Site) -> None:
    d = site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(d), "bacnet", 2)
    req = d.request(Action.ACTIVATE)
    first = ledger.answer_request(req)
    assert ledger.answer_request(req, now=T0 + 60) == first
    assert ledger.report()["open_responses"] == 1
    assert ledger.operations()[-1]["outcome"] == "repeated"


def test_unverifiable_request_is_refused_and_recorded(ledger: Ledger, site: Site) -> None:
    d = site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(d), "bacnet", 2)
    req = bytearray(d.request(Action.ACTIVATE))
    req[-1] ^= 1  # the signature
    with pytest.raises(errors.TrustError):
        ledger.answer_request(bytes(req))
    with pytest.raises(errors.MalformedError):
        ledger.answer_request(b"\xa0")
    with pytest.raises(errors.MalformedError):
        ledger.answer_request(b"\x00" * (64 * 1024 + 1))
    assert [o["outcome"] for o in ledger.operations()][-2:] == ["refused: untrusted",
                                                                "refused: malformed"]
    assert ledger.report()["devices"] == []


def test_request_on_a_state_the_device_has_left_is_stale(ledger: Ledger, site: Site) -> None:
    d = site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(d), "bacnet", 2)
    old = d.request(Action.ACTIVATE)
    activate(ledger, d)
    ledger.assign(E, dev_id(d), "bacnet", 3)
    with pytest.raises(errors.StaleError):
        ledger.answer_request(old)


def test_renew_moves_licenses_to_the_entitlement_end(ledger: Ledger, site: Site) -> None:
    d = site.device()
    ledger.entitle(E, P, {"bacnet": 5}, until=T0 + 30 * DAY)
    ledger.assign(E, dev_id(d), "bacnet", 2)
    activate(ledger, d)
    with pytest.raises(errors.UsageError, match="nothing to renew"):
        ledger.answer_request(d.request(Action.RENEW))
    ledger.entitle(E, P, {"bacnet": 0}, until=T0 + 395 * DAY)
    resp = ledger.answer_request(d.request(Action.RENEW))
    ch = payload(resp, Response).changes
    assert [(c.op, c.count, c.not_after) for c in ch] == [(ChangeOp.UPDATE, 2, T0 + 395 * DAY)]


def test_a_failure_while_answering_leaves_no_trace(ledger_db: str, site: Site) -> None:
    """One transaction per operation: a crash between deciding and recording changes nothing."""

    class CrashingVendor(Vendor):
        def sign(self, payload: Payload) -> bytes:
            raise RuntimeError("power cut")

    d = site.device()
    led = Ledger(ledger_db, site.vendor, clock=lambda: T0)
    led.entitle(E, P, {"bacnet": 5})
    led.assign(E, dev_id(d), "bacnet", 2)
    before = led.report()
    with pytest.raises(RuntimeError):
        led.answer_request(d.request(Action.ACTIVATE), vendor=CrashingVendor(site.vendor.key))
    assert led.report() == before  # no device view, no response, no operation
    led.close()


# ---------------------------------------------------------------- reclaims and receipts


def test_reclaimed_license_is_free_only_after_its_receipt(ledger: Ledger, site: Site) -> None:
    a, b = site.device(), site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(a), "bacnet", 5)
    activate(ledger, a)
    resp = ledger.answer_request(a.request(Action.RECLAIM, ["bacnet"]))
    assert changes(resp) == [("remove", "bacnet", 0)]
    assert ledger.free(E, "bacnet") == 0
    res, _ = a.agent.apply(resp)
    assert held(a) == {}
    assert ledger.free(E, "bacnet") == 0  # applied, but the ledger has no proof yet
    assert [p["count"] for p in ledger.report()["pending_reclaims"]] == [5]
    with pytest.raises(NotEntitledError):
        ledger.assign(E, dev_id(b), "bacnet", 1)
    rc = ledger.accept_receipt(res.receipt)
    assert rc.freed == (("bacnet", 5),)
    assert ledger.free(E, "bacnet") == 5
    rep = ledger.report()
    assert rep["pending_reclaims"] == [] and rep["assignments"] == []
    with pytest.raises(errors.AlreadyAppliedError):
        ledger.accept_receipt(res.receipt)
    ledger.assign(E, dev_id(b), "bacnet", 5)


def test_release_lowered_assignment_keeps_counting_until_the_receipt(ledger: Ledger,
                                                                      site: Site) -> None:
    """Even with the assignment lowered first, a later request does not free the license."""
    a = site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(a), "bacnet", 4)
    activate(ledger, a)
    ledger.assign(E, dev_id(a), "bacnet", 0)
    assert ledger.free(E, "bacnet") == 1  # still installed
    # the license information lists it for reclaim
    li = payload(ledger.license_info(site_info(a.agent.info()[0])), LicenseInfo)
    assert [x.feature for x in li.for_device(dev_id(a)).reclaim] == ["bacnet"]
    resp = ledger.answer_request(a.request(Action.RECLAIM))  # names nothing: the list
    res, _ = a.agent.apply(resp)
    # the device moves on and says so in a signed file, but that is no receipt
    ledger.observe_device_info(a.agent.info()[0])
    assert ledger.free(E, "bacnet") == 1
    assert ledger.accept_receipt(res.receipt).freed == (("bacnet", 4),)
    assert ledger.free(E, "bacnet") == 5


def test_partial_release_shrinks_the_license(ledger: Ledger, site: Site) -> None:
    a = site.device()
    ledger.entitle(E, P, {"bacnet": 5, "modbus": 1})
    ledger.assign(E, dev_id(a), "bacnet", 5)
    activate(ledger, a)
    ledger.assign(E, dev_id(a), "bacnet", 2)
    ledger.assign(E, dev_id(a), "modbus", 1)  # waiting: installed by the same response
    resp = ledger.answer_request(a.request(Action.RECLAIM, ["bacnet"]))
    assert changes(resp) == [("update", "bacnet", 2), ("add", "modbus", 1)]
    res, _ = a.agent.apply(resp)
    assert held(a) == {"bacnet": 2, "modbus": 1}
    assert ledger.free(E, "bacnet") == 0
    assert ledger.accept_receipt(res.receipt).freed == (("bacnet", 3),)
    assert ledger.free(E, "bacnet") == 3


def test_late_receipts_are_accepted_in_any_order(ledger: Ledger, site: Site) -> None:
    a = site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(a), "bacnet", 5)
    r1, _ = a.agent.apply(ledger.answer_request(a.request(Action.ACTIVATE)))
    r2, _ = a.agent.apply(ledger.answer_request(a.request(Action.RECLAIM, ["bacnet"])))
    assert ledger.free(E, "bacnet") == 0
    assert ledger.accept_receipt(r2.receipt).freed == (("bacnet", 5),)
    assert ledger.free(E, "bacnet") == 5
    assert ledger.accept_receipt(r1.receipt).sequence == 1  # late, still accepted once
    assert ledger.report()["installed"] == {}  # the older receipt does not roll the view back
    assert ledger.free(E, "bacnet") == 5


def test_receipt_for_a_response_the_ledger_did_not_issue(ledger: Ledger, site: Site,
                                                        tmp_path: Path) -> None:
    d = site.device()
    resp = site.vendor.issue(d.request(Action.ACTIVATE, ["bacnet"]), [Grant("bacnet", 1)], now=T0)
    res, _ = d.agent.apply(resp)
    with pytest.raises(errors.UnknownRequestError):
        ledger.accept_receipt(res.receipt)
    other = Ledger(tmp_path / "other.db", Vendor(SigningKey.generate()))
    with pytest.raises(errors.TrustError):
        other.accept_receipt(res.receipt, now=T0)
    other.close()


def test_sibling_responses_are_superseded_by_the_one_applied(ledger: Ledger,
                                                             site: Site) -> None:
    a = site.device()
    ledger.entitle(E, P, {"bacnet": 5, "modbus": 1})
    ledger.assign(E, dev_id(a), "bacnet", 5)
    activate(ledger, a)
    reclaim = ledger.answer_request(a.request(Action.RECLAIM, ["bacnet"]))
    ledger.assign(E, dev_id(a), "modbus", 1)
    add = ledger.answer_request(a.request(Action.ACTIVATE, ["modbus"]))
    assert changes(add) == [("add", "modbus", 1)]
    assert len(ledger.report()["pending_reclaims"]) == 1
    res, _ = a.agent.apply(add)
    ledger.accept_receipt(res.receipt)
    # the reclaim can never be applied now: nothing waits for its receipt
    assert ledger.report()["pending_reclaims"] == []
    assert ledger.free(E, "bacnet") == 0  # still installed and assigned
    with pytest.raises(errors.SequenceError):
        a.agent.apply(reclaim)


# ---------------------------------------------------------------- license information


def test_license_info_lists_reclaims_and_installs(ledger: Ledger, site: Site) -> None:
    a, b, c = site.device(), site.device(), site.device()
    ledger.entitle(E, P, {"bacnet": 5, "modbus": 2}, until=T0 + 365 * DAY)
    ledger.assign(E, dev_id(a), "bacnet", 2)
    activate(ledger, a)
    ledger.assign(E, dev_id(a), "bacnet", 0)
    ledger.assign(E, dev_id(b), "modbus", 2)
    bogus = bytearray(c.agent.info()[0])
    bogus[-1] ^= 1
    data = ledger.license_info(site_info(a.agent.info()[0], b.agent.info()[0], bytes(bogus)))
    info = payload(data, LicenseInfo)
    assert info.issued == T0 and info.expires > T0
    assert {e.device_id for e in info.entries} == {dev_id(a), dev_id(b)}
    ea, eb = info.for_device(dev_id(a)), info.for_device(dev_id(b))
    assert [(x.feature, x.count) for x in ea.reclaim] == [("bacnet", 2)] and ea.install == ()
    assert eb.reclaim == () and eb.install == (License("modbus", 2, None, T0 + 365 * DAY),)
    # the device accepts it: vendor-signed, and it finds its entry
    assert a.agent.features_from_license_info(data, Action.RECLAIM) == ["bacnet"]
    only_b = payload(ledger.license_info(site_info(a.agent.info()[0], b.agent.info()[0]),
                                         [dev_id(b)]), LicenseInfo)
    assert [e.device_id for e in only_b.entries] == [dev_id(b)]
    with pytest.raises(errors.UsageError):
        ledger.license_info(site_info(a.agent.info()[0]), [dev_id(c)])
    with pytest.raises(errors.MalformedError):
        ledger.license_info(site_info(bytes(bogus)))
    with pytest.raises(errors.MalformedError):
        ledger.license_info(canonical({"v": 1, "kind": "something"}))
    assert ledger.report()["devices"][0]["source"] == "device-info"


def test_ledger_survives_a_restart_between_upload_and_confirm(ledger_db: str,
                                                              site: Site) -> None:
    a = site.device()
    led = Ledger(ledger_db, site.vendor, clock=lambda: T0)
    led.entitle(E, P, {"bacnet": 5})
    led.assign(E, dev_id(a), "bacnet", 5)
    activate(led, a)
    up = led.upload([a.request(Action.RECLAIM, ["bacnet"]), b"junk"])
    assert set(up.responses) == {dev_id(a)} and set(up.errors) == {"#1"}
    led.close()
    res, _ = a.agent.apply(up.responses[dev_id(a)])
    led = Ledger(ledger_db, site.vendor, clock=lambda: T0)
    assert led.free(E, "bacnet") == 0
    out = led.confirm([res.receipt, res.receipt])
    assert [x["freed"] for x in out["accepted"]] == [[{"feature": "bacnet", "count": 5}]]
    assert [(x["index"], x["reason"]) for x in out["refused"]] == [(1, "replay")]
    assert led.free(E, "bacnet") == 5
    kinds = [o["kind"] for o in led.operations()]
    led.close()
    if led.path is not None:
        with sqlite3.connect(led.path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert kinds == ["entitle", "assign", "request", "receipt", "request", "request",
                     "receipt", "receipt"]


def test_upload_verifies_each_request_once(ledger: Ledger, site: Site,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """upload reads a request once and answers from what it read (no second verification)."""
    a, b = site.device(), site.device()
    ledger.entitle(E, P, {"bacnet": 5})
    ledger.assign(E, dev_id(a), "bacnet", 2)
    ledger.assign(E, dev_id(b), "bacnet", 2)
    reqs = [a.request(Action.ACTIVATE), b.request(Action.ACTIVATE)]
    calls: list[bytes] = []
    real = Vendor.read_request

    def counted(data: bytes) -> Any:
        calls.append(data)
        return real(data)

    monkeypatch.setattr(Vendor, "read_request", staticmethod(counted))
    up = ledger.upload(reqs)
    assert set(up.responses) == {dev_id(a), dev_id(b)} and not up.errors
    assert calls == reqs
    calls.clear()
    again = ledger.upload(reqs)  # answered again: the same responses, still one read each
    assert again.responses == up.responses and calls == reqs
    calls.clear()
    big = ledger.upload([b"x" * (64 * 1024 + 1)])  # too large: refused unread
    assert big.errors["#0"]["reason"] == "malformed" and calls == []


def test_report_reads_what_each_device_may_hold_once(ledger: Ledger,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    devs = [f"{i:064x}" for i in (1, 2)]
    ledger.entitle(E, P, {"bacnet": 5, "modbus": 5})
    ledger.entitle("ORDER-2", P, {"trend": 5})
    for d in devs:
        for e, f in ((E, "bacnet"), (E, "modbus"), ("ORDER-2", "trend")):
            ledger.assign(e, d, f, 1)
    calls: list[str] = []
    real = Ledger._may_hold

    def counted(tx: Any, dev: str) -> dict[str, int]:
        calls.append(dev)
        return real(tx, dev)

    monkeypatch.setattr(Ledger, "_may_hold", staticmethod(counted))
    rep = ledger.report()
    assert sorted(calls) == devs
    assert [f["used"] for e in rep["entitlements"] for p in e["products"]
            for f in p["features"]] == [2, 2, 2]


# ---------------------------------------------------------------- the state machine

FEATURES = ("bacnet", "modbus")
N_DEVICES = 3
EXAMPLES = max(1, int(os.environ.get("FUZZ_EXAMPLES", "200")) // 5)
VENDOR = Vendor(SigningKey.generate())


@dataclass
class Issued:
    """A response the ledger signed, as the test knows it."""

    device: int
    request: bytes
    data: bytes
    base_sequence: int
    base: dict[str, int]  # the request's licenses
    result: dict[str, int]  # after applying it
    receipt: bytes | None = None  # once applied
    accepted: bool = False  # its receipt was accepted
    withheld: bool = False  # its receipt is never delivered
    superseded: bool = False  # another response on the same state was applied

    @property
    def reductions(self) -> dict[str, int]:
        return {f: n - self.result.get(f, 0) for f, n in self.base.items()
                if self.result.get(f, 0) < n}


@dataclass
class Model:
    entitled: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FEATURES, 0))
    issued: list[Issued] = field(default_factory=list)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="ledger-sm-"))
        self.site = Site(VENDOR, self.root)
        self.devices = [self.site.device() for _ in range(N_DEVICES)]
        self.ids = [dev_id(d) for d in self.devices]
        self.db = self.new_ledger_db()
        self.ledger = Ledger(self.db, VENDOR, clock=self.site.clock)
        self.model = Model()

    def new_ledger_db(self) -> str:
        """Where this example's ledger lives: an SQLite file."""
        return str(self.root / "ledger.db")

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------ helpers

    def actual(self, i: int) -> dict[str, int]:
        return held(self.devices[i])

    def sequence(self, i: int) -> int:
        return self.devices[i].agent.state()[0].sequence

    def in_play(self, r: Issued) -> bool:
        """The ledger has not seen the end of it: no receipt accepted, not superseded."""
        return not r.accepted and not r.superseded

    def applicable(self, r: Issued) -> bool:
        st_, _w, _n = self.devices[r.device].agent.state()
        nonce = payload(r.data, Response).nonce
        return (r.receipt is None and r.base_sequence == st_.sequence
                and any(o.nonce == nonce for o in st_.outstanding))

    def issue(self, i: int, action: Action, features: Iterable[str],
              via_upload: bool) -> Issued | None:
        """Have device ``i`` sign a request and the ledger answer it; None if nothing to do."""
        d = self.devices[i]
        try:
            req = d.request(action, features)
        except errors.UsageError:
            return None  # the device itself refuses (reclaim of what it does not hold)
        frees = {f: self.ledger.free(E, f) for f in FEATURES}
        try:
            if via_upload:
                up = self.ledger.upload([req])
                if self.ids[i] not in up.responses:
                    err = up.errors[self.ids[i]]
                    assert err["reason"] == "usage", err
                    raise errors.UsageError(err["message"])
                data = up.responses[self.ids[i]]
            else:
                data = self.ledger.answer_request(req)
        except errors.UsageError:
            event(f"{action.value}: nothing to do")
            return None
        event(f"{action.value}: answered")
        resp = payload(data, Response)
        base = {lic.feature: lic.count for lic in d.agent.state()[0].licenses}
        result = dict(base)
        for c in resp.changes:
            if c.op is ChangeOp.REMOVE:
                result.pop(c.feature)
            else:
                result[c.feature] = c.count
        r = Issued(i, req, data, resp.base_sequence, base, result)
        self.model.issued.append(r)
        for f in FEATURES:  # answering never frees anything
            assert self.ledger.free(E, f) <= frees[f]
        return r

    def apply_on_device(self, r: Issued) -> bool:
        ok = self.applicable(r)
        try:
            res, _ = self.devices[r.device].agent.apply(r.data)
        except errors.SequenceError:
            assert not ok
            event("apply: refused by the device")
            return False
        assert ok and not res.already_applied
        r.receipt = res.receipt
        return True

    def deliver(self, r: Issued, riding_along: bool) -> None:
        """On time or late: whenever it comes, a genuine receipt is accepted, once."""
        assert r.receipt is not None and not r.accepted
        frees = {f: self.ledger.free(E, f) for f in FEATURES}
        if riding_along:
            out = self.ledger.upload([], [r.receipt]).receipts
        else:
            out = self.ledger.confirm([r.receipt])
        assert out["refused"] == [], out
        (acc,) = out["accepted"]
        assert acc["device_id"] == self.ids[r.device]
        assert {x["feature"]: x["count"] for x in acc["freed"]} == r.reductions
        r.accepted = True
        event("receipt: freed" if r.reductions else "receipt")
        for other in self.model.issued:
            if other is not r and other.device == r.device \
                    and other.base_sequence == r.base_sequence:
                assert other.receipt is None
                other.superseded = True
        for f in FEATURES:
            assert self.ledger.free(E, f) >= frees[f]

    def settle(self, r: Issued, when: str) -> None:
        if when == "now":
            self.deliver(r, riding_along=False)
        elif when == "never":
            r.withheld = True
            event("receipt withheld")

    # ------------------------------------------------------------ rules

    @initialize(bacnet=st.integers(1, 6), modbus=st.integers(0, 3))
    def buy(self, bacnet: int, modbus: int) -> None:
        self.ledger.entitle(E, P, {"bacnet": bacnet, "modbus": modbus})
        self.model.entitled.update(bacnet=bacnet, modbus=modbus)

    @rule(feature=st.sampled_from(FEATURES), n=st.integers(0, 3))
    def entitle(self, feature: str, n: int) -> None:
        self.ledger.entitle(E, P, {feature: n})
        self.model.entitled[feature] += n

    @rule(i=st.integers(0, N_DEVICES - 1), feature=st.sampled_from(FEATURES),
          n=st.integers(0, 5))
    def assign(self, i: int, feature: str, n: int) -> None:
        free_before = self.ledger.free(E, feature)
        try:
            out = self.ledger.assign(E, self.ids[i], feature, n)
        except NotEntitledError:
            event("assign refused")
            assert n > free_before
            assert self.ledger.free(E, feature) == free_before
            return
        event("assign")
        assert out["free"] == self.ledger.free(E, feature) >= 0

    @rule(i=st.integers(0, N_DEVICES - 1), feature=st.sampled_from(FEATURES),
          n=st.integers(1, 4), name_it=st.booleans(),
          when=st.sampled_from(["now", "now", "later", "never"]))
    def activate_round_trip(self, i: int, feature: str, n: int, name_it: bool,
                            when: str) -> None:
        """Assign, request, answer, apply; the receipt comes now, later or never."""
        try:
            self.ledger.assign(E, self.ids[i], feature, n)
        except NotEntitledError:
            event("activate: not entitled")
        r = self.issue(i, Action.ACTIVATE, [feature] if name_it else [], via_upload=False)
        if r is not None and self.apply_on_device(r):
            self.settle(r, when)

    def held_pairs(self) -> list[tuple[int, str]]:
        return [(i, f) for i in range(N_DEVICES) for f in sorted(self.actual(i))]

    @precondition(lambda self: self.held_pairs())
    @rule(data=st.data(), release_first=st.booleans(), via_upload=st.booleans(),
          when=st.sampled_from(["now", "now", "later", "never"]))
    def reclaim_round_trip(self, data: st.DataObject, release_first: bool, via_upload: bool,
                           when: str) -> None:
        """Reclaim a feature (named, or released first and taken from the license info)."""
        i, feature = data.draw(st.sampled_from(self.held_pairs()), label="device, feature")
        if release_first:
            self.ledger.assign(E, self.ids[i], feature, 0)
            info = self.ledger.license_info(site_info(self.devices[i].agent.info()[0]))
            names = self.devices[i].agent.features_from_license_info(info, Action.RECLAIM)
            assert feature in names
        else:
            names = [feature]
        r = self.issue(i, Action.RECLAIM, names, via_upload)
        assert r is not None, "a reclaim of an installed feature is always answered"
        assert feature in r.reductions
        if self.apply_on_device(r):
            self.settle(r, when)

    @rule(i=st.integers(0, N_DEVICES - 1),
          action=st.sampled_from([Action.ACTIVATE, Action.RECLAIM, Action.RENEW]),
          features=st.lists(st.sampled_from(FEATURES), max_size=2, unique=True),
          via_upload=st.booleans())
    def request_only(self, i: int, action: Action, features: list[str], via_upload: bool) -> None:
        """A response that stays in a drawer for now (applied later, or never)."""
        self.issue(i, action, features, via_upload)

    @precondition(lambda self: any(r.receipt is None for r in self.model.issued))
    @rule(data=st.data(), when=st.sampled_from(["now", "later", "never"]))
    def apply_late(self, data: st.DataObject, when: str) -> None:
        waiting = [r for r in self.model.issued if r.receipt is None]
        r = data.draw(st.sampled_from(waiting), label="response")
        if self.apply_on_device(r):
            event("applied late")
            self.settle(r, when)

    @precondition(lambda self: any(r.receipt and not r.accepted and not r.withheld
                                   for r in self.model.issued))
    @rule(data=st.data(), riding_along=st.booleans())
    def deliver_late(self, data: st.DataObject, riding_along: bool) -> None:
        ready = [r for r in self.model.issued if r.receipt and not r.accepted and not r.withheld]
        self.deliver(data.draw(st.sampled_from(ready), label="receipt"), riding_along)
        event("receipt delivered late")

    @precondition(lambda self: any(r.accepted for r in self.model.issued))
    @rule(data=st.data())
    def deliver_twice(self, data: st.DataObject) -> None:
        r = data.draw(st.sampled_from([r for r in self.model.issued if r.accepted]))
        assert r.receipt is not None
        before = self.ledger.report()
        with pytest.raises(errors.AlreadyAppliedError):
            self.ledger.accept_receipt(r.receipt)
        after = self.ledger.report()
        assert after["operations"] == before["operations"] + 1  # the refusal is recorded
        assert {**after, "operations": 0} == {**before, "operations": 0}

    @precondition(lambda self: self.model.issued)
    @rule(data=st.data())
    def upload_the_same_request_again(self, data: st.DataObject) -> None:
        """A retried upload gets the very same response, and issues nothing new."""
        r = data.draw(st.sampled_from(self.model.issued))
        before = self.ledger.report()["open_responses"]
        assert self.ledger.answer_request(r.request) == r.data
        assert self.ledger.report()["open_responses"] == before

    @rule(i=st.integers(0, N_DEVICES - 1))
    def device_info(self, i: int) -> None:
        self.ledger.observe_device_info(self.devices[i].agent.info()[0])

    @rule()
    def restart(self) -> None:
        self.ledger.close()
        self.ledger = Ledger(self.db, VENDOR, clock=self.site.clock)

    # ------------------------------------------------------------ invariants

    @invariant()
    def never_more_granted_than_entitled(self) -> None:
        """What devices hold, or may still apply from responses not yet applied, fits."""
        for f in FEATURES:
            total = 0
            for i in range(N_DEVICES):
                may = self.actual(i).get(f, 0)
                for r in self.model.issued:
                    if r.device == i and self.applicable(r):
                        may = max(may, r.result.get(f, 0))
                total += may
            assert total <= self.model.entitled[f], (f, total, self.model.entitled[f])

    @invariant()
    def reclaimed_licenses_are_free_only_after_their_receipt(self) -> None:
        """free <= entitled - what is held - what responses took away without a verified receipt."""
        for f in FEATURES:
            counted = 0
            for i in range(N_DEVICES):
                n = self.actual(i).get(f, 0)
                for r in self.model.issued:
                    if r.device == i and self.in_play(r) and f in r.reductions:
                        n = max(n, r.base[f])
                counted += n
            free = self.ledger.free(E, f)
            assert 0 <= free <= self.model.entitled[f] - counted, (f, free, counted)

    @invariant()
    def pending_reclaims_are_exactly_the_unconfirmed_removals(self) -> None:
        want = sorted((sha256(r.data).hex(), f, n) for r in self.model.issued
                      if self.in_play(r) for f, n in r.reductions.items())
        got = sorted((p["response_digest"], p["feature"], p["count"])
                     for p in self.ledger.report()["pending_reclaims"])
        assert got == want


LedgerMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestLedgerMachine = LedgerMachine.TestCase


class PostgresLedgerMachine(LedgerMachine):
    """The same machine, each example on a new database of a real PostgreSQL server."""

    server: ClassVar[PostgresServer | None] = None

    def new_ledger_db(self) -> str:
        assert self.server is not None
        return self.server.database()


def test_the_ledger_machine_on_postgresql(postgres: PostgresServer) -> None:
    """The accounting invariants hold on PostgreSQL too (fewer examples: a database each)."""
    PostgresLedgerMachine.server = postgres
    try:
        run_state_machine_as_test(PostgresLedgerMachine, settings=settings(
            max_examples=max(1, EXAMPLES // 4), stateful_step_count=30, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))
    finally:
        PostgresLedgerMachine.server = None

"""The ledger's accounting rules on their own: plain records in, decisions out, no storage.

Each rule is checked on a few named cases, then hypothesis checks the
properties the ledger relies on: an accepted assignment fits its stock, a
device may hold at least what it is known to hold, a response grants no more
than is assigned, and what it takes away is exactly what it removes or shrinks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import errors, messages
from agent.cose import ALG_EDDSA, PublicKey
from agent.digest import sha256
from agent.formats import read_device_info
from agent.messages import Action, ChangeOp, License, LicenseChange, Request, state_digest
from simulators.licensing_server import rules
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.ledger_sqlite import SqliteStorage
from simulators.licensing_server.rules import (
    MAX_COUNT,
    Assignment,
    KnownDevice,
    NotEntitledError,
    OpenResponse,
    ResponseStatus,
    Stock,
    target,
)
from simulators.licensing_server.storage import LedgerStorage
from tests.conftest import T0, Site

KEY = PublicKey(ALG_EDDSA, bytes(range(32)))
DEV = sha256(KEY.raw).hex()
FEATURES = ("bacnet", "modbus", "trend")
E, P = "ORDER-1", "BMS-Pro"


def request(action: Action, held: dict[str, int] | None = None, features: tuple[str, ...] = (),
            sequence: int = 3, until: int | None = None) -> Request:
    lics = tuple(License(f, n, None, until) for f, n in sorted((held or {}).items()))
    return Request(device_id=DEV, device_key=KEY, model="AS-P", nonce=b"n" * 16,
                   sequence=sequence, state_digest=state_digest(lics), action=action,
                   features=features, licenses=lics, created=T0)


def targets(**counts: int) -> dict[str, License]:
    return {f: target(f, n, T0 + 100) for f, n in counts.items()}


def after(req: Request, changes: tuple[LicenseChange, ...]) -> dict[str, int]:
    return {f: lic.count for f, lic in rules.apply_changes(req.licenses, changes).items()}


counts = st.dictionaries(st.sampled_from(FEATURES), st.integers(0, 6), max_size=3)
held_counts = st.dictionaries(st.sampled_from(FEATURES), st.integers(1, 6), max_size=3)


# ---------------------------------------------------------------- checks of what is asked


@pytest.mark.parametrize(("check", "value"), [
    (lambda v: rules.check_name(v, "entitlement"), ""),
    (lambda v: rules.check_name(v, "product"), "bad\nname"),
    (lambda v: rules.check_name(v, "product"), "x" * (rules.NAME_MAX + 1)),
    (lambda v: rules.check_name(v, "product"), "right\u202eto left"),
    (lambda v: rules.check_name(v, "product"), "trailing "),
    (lambda v: rules.check_name(v, "product"), 7),
    (rules.check_feature, "-x"),
    (rules.check_feature, 7),
    (rules.check_count, -1),
    (rules.check_count, True),
    (rules.check_count, 2**32),
    (rules.check_count, 1.0),
    (rules.check_device_id, "A" * 64),
    (rules.check_device_id, "a" * 63),
])
def test_nonsense_is_a_usage_error(check: Any, value: object) -> None:
    with pytest.raises(errors.UsageError):
        check(value)


def test_checks_return_what_they_accept() -> None:
    assert rules.check_name("ORDER-1/a:b+c", "entitlement") == "ORDER-1/a:b+c"
    for free_text in ("PO 4711 (Plant 3)", "Lizenz für Gebäude Süd", "-leading is fine",
                      "x" * rules.NAME_MAX):
        assert rules.check_name(free_text, "product") == free_text
    assert rules.check_feature("bacnet.v2") == "bacnet.v2"
    assert rules.check_count(MAX_COUNT) == MAX_COUNT
    assert rules.check_device_id(DEV) == DEV
    with pytest.raises(errors.UsageError, match="count of bacnet must be"):
        rules.check_count(-1, "count of bacnet")


@pytest.mark.parametrize(("check", "shared", "value"), [
    (rules.check_feature, messages.valid_feature, "-x"),
    (rules.check_count, messages.valid_count, 2**32),
    (rules.check_count, messages.valid_count, True),
])
def test_the_checks_shared_with_the_messages_say_the_same(check: Any, shared: Any,
                                                          value: object) -> None:
    with pytest.raises(errors.MalformedError) as malformed:
        shared(value)
    with pytest.raises(errors.UsageError) as usage:
        check(value)
    assert str(usage.value) == str(malformed.value)
    assert rules.MAX_COUNT == messages.MAX_COUNT
    with pytest.raises(errors.UsageError, match=r"device ID 'A+' must be 64 lowercase hex"):
        rules.check_device_id("A" * 64)


# ---------------------------------------------------------------- entitlements and assignments


def test_a_purchase_adds_and_moves_the_end_only_when_given() -> None:
    new = rules.add_to_stock(None, E, P, "bacnet", 5, None)
    assert new == Stock(E, P, "bacnet", 5, None)
    more = rules.add_to_stock(Stock(E, P, "bacnet", 5, T0), E, P, "bacnet", 3, None)
    assert (more.count, more.until) == (8, T0)
    moved = rules.add_to_stock(more, E, P, "bacnet", 0, T0 + 1)
    assert (moved.count, moved.until) == (8, T0 + 1)
    with pytest.raises(errors.UsageError, match=f"would hold {MAX_COUNT + 1} of bacnet"):
        rules.add_to_stock(Stock(E, P, "bacnet", MAX_COUNT), E, P, "bacnet", 1, None)


def test_the_product_is_the_one_named_or_the_only_one() -> None:
    assert rules.choose_product(E, "bacnet", [P], None) == P
    assert rules.choose_product(E, "bacnet", ["A", P], P) == P
    with pytest.raises(errors.UsageError, match="holds no bacnet"):
        rules.choose_product(E, "bacnet", [], None)
    with pytest.raises(errors.UsageError, match=f"product X of entitlement {E} holds no"):
        rules.choose_product(E, "bacnet", [P], "X")
    with pytest.raises(errors.UsageError, match="in products A, B: name the product"):
        rules.choose_product(E, "bacnet", ["A", "B"], None)


def test_assignment_refusals_say_how_much_is_left() -> None:
    stock = Stock(E, P, "bacnet", 5)
    assert rules.check_assignable(stock, DEV, 3, None, others=0, held=0) == 2
    with pytest.raises(NotEntitledError, match="5 are used by other devices: cannot assign 1 "
                                               r"\(at most 0 here\)") as exc:
        rules.check_assignable(stock, DEV, 1, None, others=5, held=0)
    assert exc.value.exit_code == 6 and exc.value.reason == "not-entitled"
    with pytest.raises(NotEntitledError, match="this device may hold 2: cannot assign 4 "
                                               r"\(at most 3 here\)"):
        rules.check_assignable(stock, DEV, 4, None, others=2, held=2)
    elsewhere = Assignment(DEV, "bacnet", "ORDER-2", P, 1)
    with pytest.raises(errors.UsageError, match="assigned from ORDER-2/BMS-Pro"):
        rules.check_assignable(stock, DEV, 1, elsewhere, others=0, held=0)


@given(total=st.integers(0, 20), others=st.integers(0, 20), held=st.integers(0, 20),
       count=st.integers(0, 20))
def test_an_accepted_assignment_fits_its_stock(total: int, others: int, held: int,
                                               count: int) -> None:
    stock = Stock(E, P, "bacnet", total)
    fits = others + max(count, held) <= total
    try:
        free = rules.check_assignable(stock, DEV, count, None, others=others, held=held)
    except NotEntitledError as err:
        assert not fits
        # the "at most" it names is itself assignable (when anything is)
        at_most = int(str(err).rsplit("at most ", 1)[1].split()[0])
        if others + held <= total:
            assert rules.check_assignable(stock, DEV, at_most, None, others, held) == 0
        return
    assert fits and free == total - others - max(count, held) >= 0


def test_may_hold_counts_open_responses_and_their_reclaims() -> None:
    assert rules.may_hold({"bacnet": 2}, None, [OpenResponse(b"r", 9, {"bacnet": 7})]) \
        == {"bacnet": 2}  # an unknown device: what it was seen holding
    grow = OpenResponse(b"g", 4, {"bacnet": 5, "modbus": 1})
    assert rules.may_hold({"bacnet": 2}, 4, [grow]) == {"bacnet": 5, "modbus": 1}
    assert rules.may_hold({"bacnet": 2}, 5, [grow]) == {"bacnet": 2}  # on a state left behind
    take = OpenResponse(b"t", 3, {"bacnet": 1}, {"bacnet": 4})
    assert rules.may_hold({}, 5, [take]) == {"bacnet": 5}  # counted until its receipt


@given(installed=counts, seq=st.integers(0, 5),
       opens=st.lists(st.tuples(st.integers(0, 6), counts, held_counts), max_size=4))
def test_a_device_may_hold_at_least_what_it_holds(
        installed: dict[str, int], seq: int,
        opens: list[tuple[int, dict[str, int], dict[str, int]]]) -> None:
    responses = [OpenResponse(bytes([i]), b, res, rc) for i, (b, res, rc) in enumerate(opens)]
    hold = rules.may_hold(installed, seq, responses)
    for f, n in installed.items():
        assert hold[f] >= n
    for r in responses:
        for f, n in r.reclaims.items():
            assert hold[f] >= r.result.get(f, 0) + n
        if r.base_sequence >= seq:
            assert all(hold[f] >= n for f, n in r.result.items())
    # one more open response never lowers anything
    more = rules.may_hold(installed, seq, [*responses, OpenResponse(b"x", seq, {"trend": 1})])
    assert all(more[f] >= n for f, n in hold.items())


def test_used_and_released() -> None:
    assert rules.used([(3, 0), (1, 4), (0, 0)]) == 7
    assert rules.used([]) == 0
    assert rules.released(["bacnet", "modbus"], {"bacnet": 1}) == ["modbus"]


# ---------------------------------------------------------------- devices


def test_a_device_view_only_moves_forward() -> None:
    first = rules.seen_state("device-info", DEV, KEY, "AS-P", "SN-1", 3, (), T0)
    assert rules.observe(None, first) == ("new", first)
    older = rules.seen_state("request", DEV, KEY, "AS-P", None, 2, (), T0 + 1)
    assert rules.observe(first, older) == ("older", None)
    lic = License("bacnet", 1)
    newer = rules.seen_state("receipt", DEV, PublicKey(ALG_EDDSA, bytes(32)), "AS-B", None, 3,
                             (lic,), T0 + 2)
    outcome, view = rules.observe(first, newer)
    assert outcome == "updated" and view == KnownDevice(
        DEV, KEY, "AS-B", "SN-1", 3, state_digest([lic]), "receipt", T0 + 2)


def test_license_information_is_for_the_latest_verified_state(site: Site) -> None:
    a, b = site.device(), site.device()
    old = read_device_info(a.agent.info()[0])
    a.activate(bacnet=1)
    new = read_device_info(a.agent.info()[0])
    other = read_device_info(b.agent.info()[0])
    infos = rules.latest_infos([new, other, old])
    assert list(infos) == [new.device_id, other.device_id] and infos[new.device_id] is new
    assert rules.wanted_devices(infos, 3, None) == sorted(infos)
    assert rules.wanted_devices(infos, 3, [other.device_id] * 2) == [other.device_id]
    with pytest.raises(errors.UsageError, match="is not in the site information"):
        rules.wanted_devices(infos, 3, [DEV])
    with pytest.raises(errors.MalformedError, match="none of the 2 device-information"):
        rules.wanted_devices({}, 2, None)


# ---------------------------------------------------------------- what a response may grant


@given(installed=held_counts, assigned=counts)
def test_the_plan_reclaims_the_excess_and_installs_the_missing(
        installed: dict[str, int], assigned: dict[str, int]) -> None:
    lics = {f: License(f, n) for f, n in installed.items()}
    reclaim, install = rules.plan(lics, targets(**assigned))
    assert [x.feature for x in reclaim] == sorted(f for f, n in installed.items()
                                                  if n > assigned.get(f, 0))
    assert [(x.feature, x.count) for x in install] == sorted(
        (f, n) for f, n in assigned.items() if n > installed.get(f, 0))
    assert all(x.not_after == T0 + 100 for x in install)


def test_request_repeats_and_stale_requests() -> None:
    req = request(Action.ACTIVATE, sequence=3)
    assert rules.check_request(req, b"d", None, None) is False
    assert rules.check_request(req, b"d", None, 3) is False
    assert rules.check_request(req, b"d", b"d", 9) is True  # answered again, whatever came since
    with pytest.raises(errors.SequenceError, match="same nonce"):
        rules.check_request(req, b"d", b"e", None)
    with pytest.raises(errors.StaleError, match="has reached sequence 4"):
        rules.check_request(req, b"d", None, 4)


def test_activate_installs_what_is_assigned_and_named() -> None:
    req = request(Action.ACTIVATE, {"bacnet": 1}, features=("bacnet",))
    ch = rules.decide(req, targets(bacnet=3, modbus=2))
    assert ch == (LicenseChange(ChangeOp.UPDATE, "bacnet", 3, None, T0 + 100, 0),)
    with pytest.raises(errors.UsageError, match="nothing to activate: anything"):
        rules.decide(request(Action.ACTIVATE, {"bacnet": 3}), targets(bacnet=3))


def test_renew_moves_the_end_and_reclaim_shrinks_or_removes() -> None:
    ch = rules.decide(request(Action.RENEW, {"bacnet": 2}, until=T0), targets(bacnet=2))
    assert ch == (LicenseChange(ChangeOp.UPDATE, "bacnet", 2, None, T0 + 100, 0),)
    with pytest.raises(errors.UsageError, match="nothing to renew"):
        rules.decide(request(Action.RENEW, {"bacnet": 2}, until=T0 + 100), targets(bacnet=2))
    ch = rules.decide(request(Action.RECLAIM, {"bacnet": 4, "modbus": 1}),
                      targets(bacnet=1, trend=2))
    assert [(c.op, c.feature, c.count) for c in ch] == [
        (ChangeOp.UPDATE, "bacnet", 1), (ChangeOp.REMOVE, "modbus", 0),
        (ChangeOp.ADD, "trend", 2)]
    with pytest.raises(errors.UsageError, match="cannot reclaim modbus"):
        rules.decide(request(Action.RECLAIM, {"bacnet": 1}, features=("modbus",)), {})
    with pytest.raises(errors.UsageError, match="nothing to reclaim"):
        rules.decide(request(Action.RECLAIM, {"bacnet": 1}), targets(bacnet=1))


@given(action=st.sampled_from(list(Action)), held=held_counts, assigned=counts,
       named=st.lists(st.sampled_from(FEATURES), max_size=2, unique=True))
def test_a_response_grants_no_more_than_is_assigned(
        action: Action, held: dict[str, int], assigned: dict[str, int],
        named: list[str]) -> None:
    req = request(action, held, tuple(named))
    try:
        ch = rules.decide(req, targets(**assigned))
    except errors.UsageError:
        return
    if action is Action.CLOCK:  # issue 16: a certified time changes no license
        assert ch == ()
        return
    assert ch, "a decision changes something or refuses"
    assert len({c.feature for c in ch}) == len(ch)
    result = after(req, ch)
    for c in ch:
        before, now = held.get(c.feature, 0), result.get(c.feature, 0)
        if now < before:
            assert action is Action.RECLAIM  # only a reclaim takes anything away
        if now != before and c.op is not ChangeOp.REMOVE:
            assert now == assigned[c.feature]  # grows or shrinks exactly to the assignment
        if action is Action.ACTIVATE and named:
            assert c.feature in named
    taken = dict(rules.reclaims({x.feature: x for x in req.licenses},
                                rules.apply_changes(req.licenses, ch)))
    assert taken == {f: n - result.get(f, 0) for f, n in held.items() if result.get(f, 0) < n}
    assert all(n > 0 for n in taken.values())


# ---------------------------------------------------------------- receipts


@pytest.mark.parametrize(("seen", "status", "error"), [
    (True, ResponseStatus.OPEN, errors.AlreadyAppliedError),
    (False, None, errors.UnknownRequestError),
    (False, ResponseStatus.CONFIRMED, errors.AlreadyAppliedError),
    (False, ResponseStatus.SUPERSEDED, errors.StaleError),
])
def test_a_receipt_is_accepted_once_for_an_open_response(
        seen: bool, status: ResponseStatus | None, error: type[Exception]) -> None:
    with pytest.raises(error):
        rules.check_receipt(seen, status)


def test_a_receipt_for_an_open_response_passes() -> None:
    rules.check_receipt(False, ResponseStatus.OPEN)
    assert [s.value for s in ResponseStatus] == ["open", "confirmed", "superseded"]  # the schema


# ---------------------------------------------------------------- the storage seam


def test_the_ledger_runs_on_any_storage_given(tmp_path: Path, site: Site) -> None:
    """Ledger.over takes a storage object: a second storage is a new adapter."""
    storage: LedgerStorage = SqliteStorage(tmp_path / "l.db")
    with Ledger.over(storage, site.vendor, clock=lambda: T0) as led:
        assert led.path is None
        d = site.device()
        dev = read_device_info(d.agent.info()[0]).device_id
        led.entitle(E, P, {"bacnet": 2})
        assert led.assign(E, dev, "bacnet", 2)["free"] == 0
        d.agent.apply(led.answer_request(d.request(Action.ACTIVATE)))
        assert led.report()["open_responses"] == 1
    with Ledger(tmp_path / "l.db", site.vendor) as led:  # the same file, opened by path
        assert [o["kind"] for o in led.operations()] == ["entitle", "assign", "request"]

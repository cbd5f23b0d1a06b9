"""Issue 15: the seat pool of a floating license on the agent.

The pure rules (agent.seats), the store (seats survive a reopen, a crash at every file
call of a checkout leaves exactly the old or the new pool, journaled as ``seat``), and
the formats (a license without ``floating`` and a state without seats encode as before).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path

import pytest

from agent import seats
from agent.cose import canonical
from agent.errors import (
    NoSeatError,
    NotLicensedError,
    SeatNotOutError,
    UsageError,
)
from agent.messages import ChangeOp, License, LicenseChange
from agent.record import replace
from agent.service import Agent
from agent.store import JOURNAL_FILE, Store
from simulators.licensing_server.vendor import Grant
from tests.agent.test_crash import CrashOps, SimulatedCrash, lose_unsynced, state_of
from tests.conftest import T0, Device

POOL = (License("editor", 2, floating=True), License("bacnet", 5))
ID = [bytes([i]) * 16 for i in range(10)]


# ---------------------------------------------------------------- the pure rules


def test_checkout_up_to_count_then_no_seat_naming_the_next_free() -> None:
    s1, a = seats.checkout(POOL, (), "editor", "ws-1", T0, ID[1])
    s2, b = seats.checkout(POOL, s1, "editor", "ws-2", T0 + 10, ID[2], lease=60)
    assert (a.until, b.until) == (T0 + 300, T0 + 70)
    with pytest.raises(NoSeatError) as exc:
        seats.checkout(POOL, s2, "editor", "ws-3", T0 + 20, ID[3])
    assert exc.value.exit_code == 9
    assert str(exc.value).startswith("no seat free: 2 of 2 out; next free at "
                                      "2027-01-15T08:01:10Z")
    # a lease not renewed lapses: its seat is free again without a return
    s3, _c = seats.checkout(POOL, s2, "editor", "ws-3", T0 + 70, ID[3])
    assert sorted(x.client for x in s3) == ["ws-1", "ws-3"]
    assert seats.pools(POOL, s3, T0 + 70) == [seats.Pool("editor", 2, 2, T0 + 300)]


def test_refusals_of_the_rules() -> None:
    with pytest.raises(UsageError, match="not a floating one"):
        seats.checkout(POOL, (), "bacnet", "ws", T0, ID[1])
    with pytest.raises(NotLicensedError, match="not installed"):
        seats.checkout(POOL, (), "modbus", "ws", T0, ID[1])
    expired = (License("editor", 2, not_after=T0 - 1, floating=True),)
    with pytest.raises(NotLicensedError, match=r"not licensed now \(valid - to "
                       r"2027-01-15T07:59:59Z, count 2\)"):
        seats.checkout(expired, (), "editor", "ws", T0, ID[1])
    for bad in ("", "x" * 129, "two\nlines"):
        with pytest.raises(UsageError, match="client name"):
            seats.checkout(POOL, (), "editor", bad, T0, ID[1])
    with pytest.raises(UsageError, match="a lease must be"):
        seats.checkout(POOL, (), "editor", "ws", T0, ID[1], lease=1)
    with pytest.raises(SeatNotOutError) as exc:
        seats.renew(POOL, (), ID[1], T0)
    assert exc.value.exit_code == 6


def test_renew_return_borrow_and_the_license_end() -> None:
    ending = (License("editor", 1, not_after=T0 + 100, floating=True),)
    s, a = seats.checkout(ending, (), "editor", "ws", T0, ID[1])
    assert a.until == T0 + 100  # never past the license's end
    s, a = seats.checkout(POOL, (), "editor", "ws", T0, ID[1])
    s, r = seats.renew(POOL, s, ID[1], T0 + 200)
    assert r.until == T0 + 500 and r.since == T0 and len(s) == 1
    s, back = seats.give_back(s, ID[1], T0 + 201)
    assert s == () and back.client == "ws"
    s, b = seats.checkout(POOL, (), "editor", "laptop", T0, ID[2], borrow=48 * 3600)
    assert b.borrowed and b.until == T0 + 48 * 3600
    with pytest.raises(UsageError, match="borrowed"):
        seats.renew(POOL, s, ID[2], T0 + 1)


def test_redo_reproduces_each_change() -> None:
    s1, a = seats.checkout(POOL, (), "editor", "ws-1", T0, ID[1])
    s2, b = seats.renew(POOL, s1, ID[1], T0 + 100)
    s3, _ = seats.give_back(s2, ID[1], T0 + 150)
    assert seats.redo((), {"op": "checkout", "seat": a.to_cbor(), "t": T0}, T0) == s1
    assert seats.redo(s1, {"op": "renew", "seat": b.to_cbor(), "t": T0 + 100}, T0) == s2
    assert seats.redo(s2, {"op": "return", "id": ID[1], "t": T0 + 150}, T0) == s3


def test_formats_without_seats_stay_byte_identical(device: Device) -> None:
    lic = License("bacnet", 3, None, T0, 0)
    assert canonical(lic.to_cbor()) == canonical(
        {"feature": "bacnet", "count": 3, "not_before": None, "not_after": T0, "grace": 0})
    assert License.from_cbor(License("e", 1, floating=True).to_cbor()).floating
    with pytest.raises(Exception, match="floating must be true"):
        License.from_cbor({"feature": "e", "count": 1, "floating": False})
    change = LicenseChange(ChangeOp.ADD, "e", 2, floating=True)
    assert LicenseChange.from_cbor(change.to_cbor()) == change
    assert "seats" not in state_of(device.directory).to_cbor()


# ---------------------------------------------------------------- the store


def floating(device: Device, count: int = 2) -> None:
    req = device.request(features=["editor"])
    device.agent.apply(device.vendor.issue(req, [Grant("editor", count, floating=True)],
                                           now=device.clock()))


def test_seats_are_journaled_and_survive_a_reopen(device: Device) -> None:
    floating(device)
    seat, token = device.agent.seat_checkout("editor", "ws-1")
    fresh = Agent(device.directory, device.facts, clock=device.clock)
    out, pools = fresh.seat_list()
    assert [s.id for s in out] == [seat.id] and pools[0].out == 1
    last = fresh.journal().entries[-1]
    assert last.event == "seat" and last.data["op"] == "checkout"
    assert seats.read_token(token, Store.open(device.directory, None).key.public).seat == seat
    # a clock set back never lengthens a lease: the seat lapses at the mark's time
    device.clock.t += 400
    fresh.seat_list()
    device.agent.seat_checkout("editor", "ws-2")  # commits the mark
    device.clock.t -= 350
    out, _ = Agent(device.directory, device.facts, clock=device.clock).seat_list()
    assert [s.client for s in out] == ["ws-2"]


@pytest.mark.parametrize("mode", ["process-crash", "power-loss"])
def test_crash_at_every_call_of_a_checkout(device: Device, tmp_path: Path, mode: str) -> None:
    floating(device, count=1)
    device.agent.seat_checkout("editor", "ws-0", lease=60)
    device.clock.t += 61  # ws-0 lapsed: the one seat is free, once
    pristine = tmp_path / "pristine"
    shutil.copytree(device.directory, pristine)
    ref = tmp_path / "ref"
    shutil.copytree(pristine, ref)
    counter = CrashOps()
    Agent(ref, device.facts, clock=device.clock, ops=counter).seat_checkout("editor", "ws-1")
    total = len(counter.calls)
    rng = random.Random(mode)
    outcomes = []
    for k in range(1, total + 1):
        d = tmp_path / f"k{k}"
        shutil.copytree(pristine, d)
        ops = CrashOps(k)
        with pytest.raises(SimulatedCrash):
            Agent(d, device.facts, clock=device.clock, ops=ops).seat_checkout("editor", "ws-1")
        ops.die()
        j_re = re.escape(JOURNAL_FILE) + "$"
        if mode == "power-loss":
            lose_unsynced(d, pristine, ops, rng)
            committed = ops.done("fsync", j_re)
        else:
            committed = ops.done("write", j_re)
        agent = Agent(d, device.facts, clock=device.clock)
        out, _pools = agent.seat_list()
        where = f"crash at {k}/{total} {ops.crashed} {mode}"
        assert [s.client for s in out] == (["ws-1"] if committed else []), where
        # ... and the pool never gives more than its one seat
        if committed:
            with pytest.raises(NoSeatError):
                agent.seat_checkout("editor", "ws-2")
        else:
            agent.seat_checkout("editor", "ws-2")
        assert agent.seat_list()[1][0].out == 1, where
        outcomes.append(committed)
        shutil.rmtree(d)
    assert outcomes[0] is False and outcomes[-1] is True


def test_a_reclaimed_pool_is_checked_by_the_license(device: Device) -> None:
    floating(device)
    req = device.request(features=["editor"])
    device.agent.apply(device.vendor.issue(req, [Grant("editor", 1, floating=True)],
                                           now=device.clock()))
    device.agent.seat_checkout("editor", "ws-1")
    with pytest.raises(NoSeatError, match="1 of 1 out"):
        device.agent.seat_checkout("editor", "ws-2")
    st = state_of(device.directory)
    assert replace(st, seats=()).encode() != st.encode()


# ---------------------------------------------------------------- borrowed tokens (item 4)


def test_a_borrowed_token_and_the_attacks_on_its_chain(device: Device) -> None:
    from agent.cose import SigningKey, decode_sign1, sign1, strict_loads
    from agent.errors import ExpiredError, MalformedError, TrustError

    floating(device)
    node_req = device.request(features=["bacnet"])
    node_locked = device.vendor.issue(node_req, [Grant("bacnet", 3)], now=device.clock())
    device.agent.apply(node_locked)
    seat, token = device.agent.seat_checkout("editor", "laptop-7", borrow=48 * 3600)
    vendor = device.vendor.public
    good = seats.verify_borrowed(token, vendor, T0 + 3600)
    assert good.seat == seat and good.license is not None
    with pytest.raises(ExpiredError):
        seats.verify_borrowed(token, vendor, seat.until)
    with pytest.raises(TrustError, match="not by the trusted vendor key"):
        seats.verify_borrowed(token, SigningKey.generate().public, T0)
    payload = strict_loads(decode_sign1(token, max_size=65536).payload, max_size=65536)

    def forged(key: SigningKey, **change: object) -> bytes:
        m = {**payload, **change}
        return sign1(canonical(m), key, seats.SEAT_TOKEN_TYPE)

    # another machine lifts the vendor's license into a token it signs itself
    thief = SigningKey.generate()
    with pytest.raises(TrustError, match="issued to device"):
        seats.verify_borrowed(forged(thief, device_id=thief.public.kid.hex(),
                                     device_key=thief.public.raw), vendor, T0)
    # a longer borrow signed by anyone but the device: refused
    with pytest.raises(TrustError):
        seats.verify_borrowed(forged(thief, until=seat.until + 86400), vendor, T0)
    # the same bytes with one payload byte changed: the device's signature fails
    env = decode_sign1(token, max_size=65536)
    moved = canonical({**payload, "until": seat.until + 1})
    assert len(moved) == len(env.payload)
    with pytest.raises(TrustError):
        seats.verify_borrowed(token.replace(env.payload, moved), vendor, T0)
    # even with the device's own key (stolen): a node-locked license is no proof, and a
    # borrow past the license's end is refused
    key = Store.open(device.directory, None).key
    with pytest.raises(TrustError, match="does not install editor as a floating"):
        seats.verify_borrowed(forged(key, license=node_locked), vendor, T0)
    with pytest.raises(TrustError, match="carries no vendor-signed license"):
        seats.verify_borrowed(sign1(
            canonical({k: v for k, v in payload.items() if k != "license"}), key,
            seats.SEAT_TOKEN_TYPE), vendor, T0)
    with pytest.raises(MalformedError, match="not a seat token"):
        seats.verify_borrowed(node_locked, vendor, T0)


# ---------------------------------------------------------------- reclaim (item 6)


def test_reclaim_refused_while_seats_are_out_unless_forced(device: Device) -> None:
    from agent.errors import SeatsOutError
    from agent.formats import verify_receipt
    from agent.messages import Action, SeatOut

    floating(device)
    _anna, anna_token = device.agent.seat_checkout("editor", "ws-anna")
    device.agent.seat_checkout("editor", "laptop-7", borrow=7200)
    before = device.store_bytes()
    with pytest.raises(SeatsOutError) as exc:
        device.agent.request(Action.RECLAIM, ["editor"])
    assert exc.value.exit_code == 9
    assert str(exc.value) == (
        "cannot reclaim editor: 2 seat(s) out: ws-anna until 2027-01-15T08:05:00Z, laptop-7 "
        "until 2027-01-15T10:00:00Z (borrowed); have them returned, or give --force (the "
        "receipt then records them; the last ends at 2027-01-15T10:00:00Z)")
    with pytest.raises(SeatsOutError):
        device.agent.request(Action.RECLAIM, [])  # everything installed, editor included
    assert device.store_bytes() == before  # nothing changed (the refusal is journaled)
    req = device.agent.request(Action.RECLAIM, ["editor"], force=True)
    res, _w = device.agent.apply(device.vendor.issue(req, [], ["editor"], now=device.clock()))
    receipt = verify_receipt(res.receipt, [device.vendor.public])
    assert receipt.seats_out == (SeatOut("editor", "ws-anna", T0 + 300),
                                 SeatOut("editor", "laptop-7", T0 + 7200, True))
    assert receipt.seats_end == T0 + 7200
    # no seat outlives the recorded end: none renewed, none checked out, all lapse by then
    with pytest.raises(NotLicensedError):
        device.agent.seat_checkout("editor", "ws-ben")
    with pytest.raises(NotLicensedError):
        device.agent.seat_renew(anna_token)
    device.clock.t = T0 + 7199
    assert [s.client for s in device.agent.seat_list()[0]] == ["laptop-7"]
    device.clock.t = receipt.seats_end
    assert device.agent.seat_list() == ((), [])


def test_a_pool_cut_below_its_seats_out_renews_none_until_it_fits(device: Device) -> None:
    floating(device, count=3)
    tokens = [device.agent.seat_checkout("editor", f"ws-{i}")[1] for i in range(3)]
    req = device.request(features=["editor"])
    res, _w = device.agent.apply(device.vendor.issue(
        req, [Grant("editor", 1, floating=True)], now=device.clock()))
    from agent.formats import verify_receipt

    assert [s.client for s in verify_receipt(res.receipt, [device.vendor.public]).seats_out] == ["ws-0", "ws-1", "ws-2"]
    with pytest.raises(SeatNotOutError, match="now has 1 seat"):
        device.agent.seat_renew(tokens[0])
    with pytest.raises(NoSeatError, match="3 of 1 out"):
        device.agent.seat_checkout("editor", "ws-3")
    device.agent.seat_return(tokens[0])
    device.agent.seat_return(tokens[1])
    device.clock.t += 10
    assert device.agent.seat_renew(tokens[2])[0].until == device.clock() + 300  # fits again


def test_the_agent_serves_at_most_max_seats_out() -> None:
    big = (License("editor", seats.MAX_SEATS_OUT + 10, floating=True),)
    out = tuple(seats.Seat("editor", T0 + 300 + i, i.to_bytes(16, "big"), f"c{i}", T0)
                for i in range(seats.MAX_SEATS_OUT))
    with pytest.raises(NoSeatError, match=f"{seats.MAX_SEATS_OUT} of {seats.MAX_SEATS_OUT}"):
        seats.checkout(big, out, "editor", "one-more", T0, ID[1])
    # the slot holding them all stays under its limit
    from agent.store import MAX_SLOT

    assert len(canonical([s.to_cbor() for s in out])) < MAX_SLOT // 2

"""Outstanding requests kept per origin, and replaced requests named on apply (issue 13, item 8).

The pure core: which request a newer one drops, what is remembered of it, and that
a state without the new fields (every store written before them) reads and
re-encodes byte for byte as it was.
"""

from __future__ import annotations

import os

import pytest

from agent.cose import SigningKey, strict_loads
from agent.errors import UnknownRequestError
from agent.messages import Action, TrustKey
from agent.protocol import (
    DEFAULT_LIMITS,
    MAX_ORIGIN,
    AgentState,
    Limits,
    apply_response,
    create_request,
    new_state,
)
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import T0, Device

LIM = Limits(max_outstanding=3, max_outstanding_total=5, max_dropped_history=4)


def fresh() -> tuple[AgentState, SigningKey]:
    key = SigningKey.generate()
    vendor = SigningKey.generate()
    return new_state(key.public, "AS-P", "SN-1", ["serial=SN-1"], [TrustKey(vendor.public)],
                     T0), key


def ask(st: AgentState, key: SigningKey, origin: str | None, t: int = T0,
        limits: Limits = LIM) -> tuple[AgentState, bytes]:
    st, data, _req = create_request(st, Action.ACTIVATE, ["bacnet"], os.urandom(16), t, key,
                                    limits, origin)
    return st, data


def test_a_newer_request_drops_only_the_oldest_of_its_own_origin() -> None:
    st, key = fresh()
    st, _op = ask(st, key, "tls cert CN=admin sha256:00")
    nonces = []
    for i in range(6):
        st, _ = ask(st, key, "tcp 192.0.2.7", T0 + i)
        nonces.append(st.outstanding[-1].nonce)
    assert [o.origin for o in st.outstanding].count("tcp 192.0.2.7") == LIM.max_outstanding
    assert st.outstanding[0].origin == "tls cert CN=admin sha256:00"  # the operator's stays
    assert [d.nonce for d in st.dropped] == nonces[:3]
    assert [d.at for d in st.dropped] == [T0 + 3, T0 + 4, T0 + 5]  # when each was replaced


def test_over_the_total_the_largest_origin_loses_its_oldest() -> None:
    st, key = fresh()
    st, _ = ask(st, key, None)  # the local command line
    for peer in ("a", "b"):
        for _ in range(2):
            st, _ = ask(st, key, f"tcp {peer}")
    assert len(st.outstanding) == LIM.max_outstanding_total
    st, _ = ask(st, key, "tcp c")  # six in all: one must go, from a largest origin (a)
    assert len(st.outstanding) == LIM.max_outstanding_total
    assert [o.origin for o in st.outstanding] == [None, "tcp a", "tcp b", "tcp b", "tcp c"]
    assert len(st.dropped) == 1


def test_over_the_total_anonymous_peers_go_first() -> None:
    """Thirty-two anonymous addresses with one request each cannot push out the requests of
    the command line or of a certificate holder through the total bound."""
    limits = Limits(max_outstanding=8, max_outstanding_total=4)
    st, key = fresh()
    st, _ = ask(st, key, None, limits=limits)
    st, _ = ask(st, key, "tls cert CN=admin sha256:00", limits=limits)
    for i in range(32):
        st, _ = ask(st, key, f"tcp 192.0.2.{i}", T0 + i, limits=limits)
    assert [o.origin for o in st.outstanding] == [
        None, "tls cert CN=admin sha256:00", "tcp 192.0.2.30", "tcp 192.0.2.31"]
    assert len(st.dropped) == 30


def test_dropped_history_is_bounded() -> None:
    st, key = fresh()
    for i in range(20):
        st, _ = ask(st, key, "tcp x", T0 + i)
    assert len(st.dropped) == LIM.max_dropped_history
    assert len(st.outstanding) == LIM.max_outstanding


def test_long_origin_is_cut() -> None:
    st, key = fresh()
    st, _ = ask(st, key, "tls cert CN=" + "x" * 1000)
    origin = st.outstanding[-1].origin
    assert origin is not None and len(origin) == MAX_ORIGIN and origin.endswith("…")


def test_apply_of_a_replaced_request_says_so_and_when(device: Device) -> None:
    req = device.agent.request(Action.ACTIVATE, ["bacnet"], origin="tcp 192.0.2.7")
    device.clock.t += 3600
    for _ in range(DEFAULT_LIMITS.max_outstanding):
        device.agent.request(Action.ACTIVATE, ["x"], origin="tcp 192.0.2.7")
    resp = device.vendor.issue(req, [Grant("bacnet", 1)], now=device.clock())
    before = device.store_bytes()
    with pytest.raises(UnknownRequestError) as err:
        device.agent.apply(resp)
    msg = str(err.value)
    assert "was replaced by a newer one at 2027-01-15T09:00:00Z" in msg, msg
    assert "create a new request" in msg
    assert device.store_bytes() == before
    # an apply clears what was remembered, with the outstanding requests
    st, _w, _now = device.agent.state()
    good = device.vendor.issue(device.agent.request(Action.ACTIVATE, ["modbus"]),
                               [Grant("modbus", 1)], now=device.clock())
    assert st.dropped
    res, _warn = device.agent.apply(good)
    assert res.state.dropped == () and res.state.outstanding == ()


def test_only_a_dropped_request_is_said_to_be_replaced() -> None:
    """In the pure core: a response to a dropped request names the replacement; one to a
    request this state never had keeps the plain message."""
    vendor = Vendor(SigningKey.generate())
    key = SigningKey.generate()
    st0 = new_state(key.public, "AS-P", "SN-1", ["serial=SN-1"], [TrustKey(vendor.public)], T0)
    never, never_req = ask(st0, key, "tcp x")  # a fork of the state: never recorded below
    st, first = ask(st0, key, "tcp x")
    for i in range(LIM.max_outstanding):
        st, _ = ask(st, key, "tcp x", T0 + 60 + i)
    for req, expect in ((first, "was replaced by a newer one at 2027-01-15T08:01:02Z"),
                        (never_req, "which is not an outstanding request")):
        resp = vendor.issue(req, [Grant("bacnet", 1)], now=T0 + 100)
        with pytest.raises(UnknownRequestError, match=expect):
            apply_response(st, resp, T0 + 100, key, LIM)
    assert never.outstanding  # (the fork itself had it)


# ---------------------------------------------------------------- the state format


def test_state_without_the_new_fields_reads_and_reencodes_unchanged(device: Device) -> None:
    """A store written before origins were kept: no "origin" in outstanding requests, no
    "dropped"; it decodes, and a state that uses neither encodes to the same bytes."""
    device.agent.request(Action.ACTIVATE, ["bacnet"])  # local: no origin
    st, _w, _now = device.agent.state()
    m = strict_loads(st.encode(), max_size=1 << 20)
    assert "dropped" not in m
    assert all("origin" not in o for o in m["outstanding"])
    assert set(m["outstanding"][0]) == {"nonce", "sequence", "state_digest", "action",
                                        "features", "created"}
    again = AgentState.from_cbor(m)
    assert again == st and again.encode() == st.encode()


def test_state_with_origin_and_dropped_round_trips(device: Device) -> None:
    for _ in range(DEFAULT_LIMITS.max_outstanding + 2):
        device.agent.request(Action.ACTIVATE, ["bacnet"], origin="tcp 192.0.2.7")
    st, _w, _now = device.agent.state()
    m = strict_loads(st.encode(), max_size=1 << 20)
    assert m["outstanding"][0]["origin"] == "tcp 192.0.2.7"
    assert m["dropped"] == [[d.nonce, d.at] for d in st.dropped] and len(m["dropped"]) == 2
    assert AgentState.from_cbor(m) == st
    status = device.agent.status()
    assert {o["origin"] for o in status["outstanding_requests"]} == {"tcp 192.0.2.7"}


@pytest.mark.parametrize("bad", [{"origin": 7}, {"dropped": [[b"x", "soon"]]}])
def test_state_with_a_mistyped_new_field_is_malformed(device: Device, bad: dict) -> None:  # type: ignore[type-arg]
    from agent.errors import MalformedError

    device.agent.request(Action.ACTIVATE, ["bacnet"])
    st, _w, _now = device.agent.state()
    m = strict_loads(st.encode(), max_size=1 << 20)
    if "origin" in bad:
        m["outstanding"][0]["origin"] = bad["origin"]
    else:
        m["dropped"] = bad["dropped"]
    with pytest.raises(MalformedError):
        AgentState.from_cbor(m)

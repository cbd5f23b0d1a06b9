"""Issue 15 item 7: licsim's client load on floating seats and the invariant seats-within-count."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.errors import UsageError
from simulators.fleet import Fleet, parse_scenario


def scenario(**clients: Any) -> dict[str, Any]:
    return {
        "site": "seats",
        "seed": 15,
        "servers": [
            {"model": "Edge-Server", "count": 2, "links": ["tcp"],
             "licenses": {"editor": 3, "bacnet-ip": 10}},
            {"model": "AS-P", "count": 1, "links": ["tcp"], "licenses": {"bacnet-ip": 5}},
        ],
        "clients": {"count": 16, "feature": "editor", "hold_seconds": 0.1, **clients},
    }


def test_clients_exhaust_the_pools_and_seats_stay_within_count(tmp_path: Path) -> None:
    with Fleet.from_scenario(scenario(), tmp_path / "fleet") as f:
        f.run(duration=4)
        s = f.summary()
        by_op = s.to_json()["operations"]["by_op"]
        assert s.ok, s.to_text()
    inv = {i.name: i for i in s.invariants}
    assert inv["seats-within-count"].held, inv["seats-within-count"].detail
    assert "2 server(s) replayed" in inv["seats-within-count"].detail
    # 16 clients on 2 pools of 3: they were served, and found the pools full
    assert f.ops["seat-checkout"] > 6 and f.ops["seat-no-seat"] > 0, dict(f.ops)
    assert f.ops["seat-return"] == f.ops["seat-checkout"] and not f.op_failures["seat"]
    assert by_op["seat-checkout"] == {"ok": f.ops["seat-checkout"], "failed": 0}


def test_a_pool_overrun_in_the_journal_breaks_the_invariant(tmp_path: Path) -> None:
    """The invariant can fail: a seat record past the count (forged into the journal
    through the store's own commit, as a buggy agent would write it) is named."""
    from agent import seats
    from agent.record import replace
    from agent.store import Store, store_lock

    with Fleet.from_scenario(scenario(count=1), tmp_path / "fleet") as f:
        srv = next(s for s in f.servers if "editor" in f.entitled[s.name])
        with store_lock(srv.state_dir):
            store = Store.open(srv.state_dir, None)
            t = srv.now()
            pool = store.state.seats
            for i in range(4):  # one more than the 3 licensed, bypassing the rules
                seat = seats.Seat("editor", t + 300, bytes([i]) * 16, f"rogue-{i}", t)
                pool = (*pool, seat)
                store.commit(replace(store.state, seats=pool), "seat",
                             {"op": "checkout", "seat": seat.to_cbor(), "t": t}, t)
        inv = {i.name: i for i in f.invariants()}
    assert not inv["seats-within-count"].held
    assert "4 seats of editor out, 3 licensed" in inv["seats-within-count"].detail


def test_clients_need_a_feature_some_server_holds() -> None:
    with pytest.raises(UsageError, match=r"\[clients\] feature: trend-log is in no"):
        parse_scenario(scenario(feature="trend-log"))
    with pytest.raises(UsageError, match=r"\[clients\]: unknown key seats"):
        parse_scenario({**scenario(), "clients": {"seats": 3}})

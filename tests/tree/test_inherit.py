"""Issue 14 items 1-3: the system tree, inherited licenses and centralized reclaim, with real
stores and the parent served on a real TCP listener on loopback."""

from __future__ import annotations

from typing import Any

import pytest

from agent import inherit
from agent.cose import SigningKey, decode_sign1, sign1
from agent.errors import (
    ExpiredError,
    GrantsHeldError,
    LicensingError,
    MalformedError,
    NotTopServerError,
    TrustError,
    UsageError,
    WrongDeviceError,
)
from agent.formats import identify, verify_receipt
from agent.messages import Action
from apps.licagent.relation import renew_once
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Site
from tests.tree.conftest import activate, reclaim, top

DAY = 86400


def grant_files(site: Site, parent: Any, child: Any) -> list[bytes]:
    """The grants the parent hands ``child`` now (the parent's side of a renewal)."""
    info, _i = child.agent.info()
    issued, _st = parent.agent.renew_child(info, None, {})
    return list(issued.files)


def test_children_inherit_up_to_count_and_status_names_the_source(site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=2)
    url = serve(p).url
    kids = [site.device() for _ in range(3)]
    outs = [renew_once(k.agent, url) for k in kids]
    assert [o.installed for o in outs] == [("SNMP",), ("SNMP",), ()]
    assert "all 2 inheritance slot(s) are held" in outs[2].refused[0]
    assert kids[0].agent.check("SNMP").licensed and kids[1].agent.check("SNMP").licensed
    assert not kids[2].agent.check("SNMP").licensed
    lic = kids[0].agent.status()["licenses"]
    assert lic == [{"feature": "SNMP", "count": 1, "not_before": None, "not_after": None,
                    "grace_seconds": 0, "licensed_now": True, "source": "inherited",
                    "parent": p.agent.state()[0].device_id,
                    "lease_until": "2027-01-22T08:00:00Z"}]  # T0 + 7 days, the default lease
    assert p.agent.status()["licenses"][0]["source"] == "own"
    # a renewal keeps the same slot: still two holders, never three
    for k in kids:
        renew_once(k.agent, url)
    st = p.agent.state()[0]
    assert sorted(g.slot for g in st.system.granted) == [0, 1]


def test_lease_ends_on_a_child_that_never_hears_again_and_a_clock_set_back_does_not_revive(
        site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=1)
    kid = site.device()
    renew_once(kid.agent, serve(p).url)
    site.clock.t += 7 * DAY - 1
    assert kid.agent.check("SNMP").licensed
    site.clock.t += 2
    r = kid.agent.check("SNMP")
    assert not r.licensed
    assert "lease ended at 2027-01-22T08:00:00Z" in r.message
    site.clock.t -= 3 * DAY  # wound back: the high-water mark keeps the lease ended
    assert not kid.agent.check("SNMP").licensed


def test_an_ended_lease_frees_its_slot_for_another_child(site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=1)
    url = serve(p).url
    a, b = site.device(), site.device()
    assert renew_once(a.agent, url).installed == ("SNMP",)
    assert renew_once(b.agent, url).installed == ()
    site.clock.t += 7 * DAY + 1  # a never renewed
    assert renew_once(b.agent, url).installed == ("SNMP",)
    assert not a.agent.check("SNMP").licensed
    assert renew_once(a.agent, url).installed == ()  # the slot is b's now


def test_grant_attacks_are_refused_on_the_child(site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=3)
    url = serve(p).url
    a, b = site.device(), site.device()
    renew_once(a.agent, url)
    renew_once(b.agent, url)
    files_a = grant_files(site, p, a)
    assert identify(files_a[0]) == "grant"  # named in refusals ("X is a grant file")
    st_b, _w, now = b.agent.state()
    lim = b.agent.limits
    # a's grant given to b: for another child
    with pytest.raises(WrongDeviceError, match="is for child"):
        inherit.verify_grant(st_b, files_a[0], now, lim)
    # one flipped byte anywhere in the signed part
    st_a = a.agent.state()[0]
    bad = bytearray(files_a[0])
    bad[len(bad) // 2] ^= 1
    with pytest.raises(LicensingError):
        inherit.verify_grant(st_a, bytes(bad), now, lim)
    # a grant by another Enterprise Server (not a's parent), with a genuine vendor license
    other = top(site)
    activate(other, inherit=True, SNMP=1)
    info, _i = a.agent.info()
    forged, _st = other.agent.renew_child(info, None, {})
    with pytest.raises(WrongDeviceError, match="not this server's parent"):
        inherit.verify_grant(st_a, forged.files[0], now, lim)
    # the parent itself signs a grant whose license was never inheritable, or comes from
    # another vendor, or gives more than its slots or a lease too long
    with p.agent._open() as (store, _now):  # the parent's own device key
        pkey = store.key
    g = inherit.Grant.decode(decode_sign1(files_a[0], max_size=1 << 20).payload)
    plain = p.agent.request(Action.ACTIVATE, ["BACNET"])
    resp_plain = p.vendor.issue(plain, [Grant("BACNET", 1)], now=site.clock())
    p.agent.apply(resp_plain)
    stranger = Vendor(SigningKey.generate())
    req = p.agent.request(Action.ACTIVATE, ["OTHER"])
    resp_other = stranger.issue(req, [Grant("OTHER", 1, inherit=1)], now=site.clock())

    def signed(**over: Any) -> bytes:
        fields = {k: getattr(g, k) for k in ("parent_id", "parent_key", "child_id", "feature",
                                             "slot", "count", "issued", "lease_until",
                                             "license")}
        fields.update(over)
        return sign1(inherit.Grant(**fields).encode(), pkey, inherit.GRANT_CONTENT_TYPE)

    cases: list[tuple[dict[str, Any], type[LicensingError], str]] = [
        ({"feature": "BACNET", "license": resp_plain}, TrustError, "does not make"),
        ({"feature": "OTHER", "license": resp_other}, TrustError, "does not trust"),
        ({"slot": 3}, TrustError, "slot 3"),
        ({"count": 5}, MalformedError, "gives 5 units"),
        ({"lease_until": g.issued + 40 * DAY}, TrustError, "more than 31 days"),
        ({"issued": now - 10 * DAY, "lease_until": now - 1}, ExpiredError, "ended at"),
    ]
    for over, exc, text in cases:
        with pytest.raises(exc, match=text):
            inherit.verify_grant(st_a, signed(**over), now, lim)
    assert inherit.verify_grant(st_a, signed(), now, lim).feature == "SNMP"  # the control


def test_reclaim_takes_grants_back_first_and_the_receipt_proves_the_returns(
        site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=2)
    url = serve(p).url
    a, b, c = site.device(), site.device(), site.device()
    for k in (a, b):
        renew_once(k.agent, url)
    before = p.store_bytes()
    with pytest.raises(GrantsHeldError) as ei:
        reclaim(p, "SNMP")
    assert ei.value.exit_code == 1
    msg = str(ei.value)
    ids = [k.agent.state()[0].device_id[:12] for k in (a, b)]
    assert all(i in msg for i in ids) and "--force" in msg and "\n" not in msg
    assert p.store_bytes() != before  # the recall itself is committed
    assert p.agent.state()[0].outstanding == ()  # no request was made
    # the recall reaches the children at their next renewal; no slot goes to a third one
    assert renew_once(c.agent, url).installed == ()
    for k in (a, b):
        assert renew_once(k.agent, url).returned == ("SNMP",)
        assert not k.agent.check("SNMP").licensed
    rc = verify_receipt(reclaim(p, "SNMP"), [site.vendor.public])
    assert [x.feature for x in rc.removed] == ["SNMP"]
    assert len(rc.returns) == 2 and rc.leases == ()
    for ret in rc.returns:  # each return is the child's own signed statement
        gr = inherit.GrantReturn.decode(decode_sign1(ret, max_size=1 << 16).payload)
        assert gr.features == ("SNMP",) and gr.child_id[:12] in ids
    assert p.agent.state()[0].system.granted == ()


def test_forced_reclaim_records_running_leases_which_end_on_the_children(
        site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=2)
    url = serve(p).url
    a = site.device()
    renew_once(a.agent, url)
    rc = verify_receipt(reclaim(p, "SNMP", force=True), [site.vendor.public])
    a_id = a.agent.state()[0].device_id
    assert rc.leases == ({"child_id": a_id, "feature": "SNMP",
                          "lease_until": site.clock() + 7 * DAY},)
    assert a.agent.check("SNMP").licensed  # the lease runs on: the child heard nothing
    renew_once(a.agent, url)  # the parent no longer holds it: the next renewal drops it
    assert not a.agent.check("SNMP").licensed
    # a child cut off never renews: its lease still ends
    p2 = top(site)
    activate(p2, inherit=True, F=1)
    b = site.device()
    renew_once(b.agent, serve(p2).url)
    reclaim(p2, "F", force=True)
    site.clock.t += 7 * DAY + 1
    assert not b.agent.check("F").licensed


def test_demo_licenses_live_on_the_top_server_and_are_taken_back_the_same_way(
        site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, demo=True, DEMO=1)
    url = serve(p).url
    kid = site.device()
    renew_once(kid.agent, url)
    assert kid.agent.check("DEMO").licensed
    with pytest.raises(GrantsHeldError):
        reclaim(p, "DEMO")
    renew_once(kid.agent, url)
    reclaim(p, "DEMO")
    # a demo license on a child server is refused, its store unchanged
    req = kid.agent.request(Action.ACTIVATE, ["DEMO2"])
    resp = kid.vendor.issue(req, [Grant("DEMO2", 1, not_after=site.clock() + DAY, demo=True)],
                            now=site.clock())
    before = kid.store_bytes()
    with pytest.raises(NotTopServerError, match="demo licenses live on the top server") as ei:
        kid.agent.apply(resp)
    assert ei.value.exit_code == 5 and kid.store_bytes() == before


def test_the_tree_has_one_parent_three_levels_and_enterprise_servers_as_parents(
        site: Site, serve: Any) -> None:
    ec = top(site)
    es = top(site)
    asp = site.device()
    renew_once(es.agent, serve(ec).url)
    renew_once(asp.agent, serve(es).url)
    assert es.agent.state()[0].system.depth == 1
    assert asp.agent.state()[0].system.depth == 2
    # a fourth level: a server under the automation server's level is refused
    leaf = site.device()
    with pytest.raises(LicensingError, match=r"cannot have child servers|is an AS-P") as ei:
        renew_once(leaf.agent, serve(asp).url)
    assert ei.value.exit_code == 5
    es2 = top(site)
    renew_once(es2.agent, serve(es).url)  # an ES at level 2 ...
    with pytest.raises(LicensingError, match="third level") as ei:
        renew_once(site.device().agent, serve(es2).url)  # ... has no children
    with pytest.raises(LicensingError, match="cannot be a child"):
        renew_once(ec.agent, serve(es).url)  # a cycle: ec under its own child
    # moved: attached to another parent, the grants of the old one are dropped
    activate(ec, inherit=True, X=1)
    renew_once(asp.agent, serve(ec).url)
    assert asp.agent.state()[0].system.parent.device_id == ec.agent.state()[0].device_id


def test_use_and_check_count_add_own_and_inherited(site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=2)
    kid = site.device()
    activate(kid, SNMP=2)
    renew_once(kid.agent, serve(p).url)
    assert kid.agent.check_count("SNMP", 3).licensed
    r = kid.agent.check_count("SNMP", 4)
    assert not r.licensed and "4 units asked, 3 licensed" in r.message
    kid.agent.use("SNMP", 3)
    row = inherit.feature_rows(kid.agent.state()[0], site.clock())[0]
    assert row == {"feature": "SNMP", "required": 3, "licensed": 3, "inherited": 1,
                   "available": 0, "granted": 0}
    with pytest.raises(UsageError):
        kid.agent.check_count("SNMP", 0)


def test_grants_survive_an_older_slot_put_back(site: Site, serve: Any) -> None:
    """A crash between the journal record and the slot, or an older slot restored: the
    catch-up replays grant-issue, so a slot handed out is never handed out twice."""
    p = top(site)
    activate(p, inherit=True, SNMP=1)
    url = serve(p).url
    old = p.store_bytes()
    a, b = site.device(), site.device()
    renew_once(a.agent, url)
    for name, data in old.items():
        if data is not None:
            (p.directory / name).write_bytes(data)
    assert [g.child_id for g in p.agent.state()[0].system.granted] == [
        a.agent.state()[0].device_id]
    assert renew_once(b.agent, url).installed == ()


def test_https_carries_the_tree_and_a_bad_count_is_one_clear_refusal(site: Site,
                                                                      tmp_path: Any) -> None:
    """https:// carries renew-grants and check --count (tests/hw/test_contract.py runs the
    whole tree over it); a count in the URL that is not a whole number from 1 is refused
    with exit code 2 and one line, never answered as if for one unit."""
    import http.client
    import json
    import ssl

    import hw
    from agent.ops import AgentOps
    from agent.rpc import CheckArgs, Op
    from tests.support.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    p = top(site)
    activate(p, inherit=True, SNMP=1)
    lst = hw.listen(f"https://127.0.0.1:0?cert={pki.server_cert}&key={pki.server_key}",
                    AgentOps(p.agent))
    lst.start()
    try:
        url = f"{lst.address}?ca={pki.ca_cert}"
        kid = site.device()
        assert renew_once(kid.agent, url).installed == ("SNMP",)
        with hw.connect(url) as c:
            assert c.typed(Op.CHECK_FEATURE, CheckArgs("SNMP", 2).to_wire()).licensed is False
            assert c.typed(Op.CHECK_FEATURE, CheckArgs("SNMP", 1).to_wire()).licensed is True
        host, port = lst.address.removeprefix("https://").rsplit(":", 1)
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        for bad in ("0", "-1", "two", "99999999999"):
            conn = http.client.HTTPSConnection(host, int(port), context=ctx, timeout=10)
            try:
                conn.request("GET", f"/v1/check/SNMP?count={bad}")
                resp = conn.getresponse()
                body = json.loads(resp.read())
            finally:
                conn.close()
            assert (resp.status, body["code"], body["reason"]) == (400, 2, "usage"), bad
            assert "\n" not in body["message"] and "count" in body["message"]
    finally:
        lst.stop()


def test_a_parent_keeps_at_most_max_children_within_its_slot(site: Site, serve: Any) -> None:
    """Each child is a record in the parent's state slot: its report is kept small and the
    number of children bounded, so the slot stays far below the store's 1 MiB cap."""
    from agent import store as store_mod
    from agent.cose import canonical

    big = {"serial": "S" * 40, "features": [{"feature": f"F{i}", "required": 1, "licensed": 1,
                                             "inherited": 0, "available": 0}
                                            for i in range(30)],
           "children": [{"device_id": "0" * 64}] * 10}
    kept = inherit._kept_report(big)
    assert len(canonical(kept)) <= inherit.MAX_REPORT and "children" not in kept
    p = top(site)
    activate(p, inherit=True, SNMP=2)
    kids = []
    for _ in range(20):
        k = site.device()
        kids.append(k)
        info, _i = k.agent.info()
        p.agent.renew_child(info, None, big)
    per_child = max((p.directory / n).stat().st_size for n in store_mod.SLOTS) / 20
    assert per_child * inherit.MAX_CHILDREN < store_mod.MAX_SLOT * 0.9, per_child
    # the bound itself: a parent that keeps MAX_CHILDREN refuses a new one, not a known one
    import agent.inherit as inh

    old = inh.MAX_CHILDREN
    inh.MAX_CHILDREN = 20
    try:
        k = site.device()
        info, _i = k.agent.info()
        with pytest.raises(UsageError, match="already keeps 20 child servers"):
            p.agent.renew_child(info, None, {})
        info, _i = kids[0].agent.info()
        issued, _st = p.agent.renew_child(info, None, {})  # a known child still renews
        assert issued.event["child"]["device_id"] == kids[0].agent.state()[0].device_id
    finally:
        inh.MAX_CHILDREN = old


def test_a_count_check_past_a_lease_moves_the_clock_mark_too(site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=1)
    kid = site.device()
    activate(kid, SNMP=1)
    renew_once(kid.agent, serve(p).url)
    assert kid.agent.check_count("SNMP", 2).licensed
    site.clock.t += 7 * DAY + 1
    assert not kid.agent.check_count("SNMP", 2).licensed  # the lease ended: 1 unit left
    site.clock.t -= 2 * DAY  # wound back: the count check committed the mark
    r = kid.agent.check_count("SNMP", 2)
    assert not r.licensed and r.clock_set_back


def test_a_license_updated_to_fewer_children_never_renews_a_slot_beyond_it(
        site: Site, serve: Any) -> None:
    p = top(site)
    activate(p, inherit=True, SNMP=3)
    url = serve(p).url
    kids = [site.device() for _ in range(3)]
    for k in kids:
        renew_once(k.agent, url)
    req = p.agent.request(Action.RENEW, ["SNMP"])
    p.agent.apply(p.vendor.issue(req, [Grant("SNMP", 1, inherit=1)], now=site.clock()))
    outs = [renew_once(k.agent, url) for k in kids]
    assert sum(bool(o.installed) for o in outs) == 1  # only slot 0 is renewed
    using = [k for k in kids if k.agent.check("SNMP").licensed]
    assert len(using) == 1
    assert [g.slot for g in p.agent.state()[0].system.granted] == [0]

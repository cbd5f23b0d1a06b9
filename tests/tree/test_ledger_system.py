"""Issue 14 item 3: the licensing server's ledger records the system from every step: a
server's signed device information, its signed request (which names its parent), and a top
server's receipt carrying its children's signed grant returns; ``licserver report`` shows
the system and the returns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import inherit
from agent.cose import SigningKey, sign1
from agent.errors import GrantsHeldError, TrustError, WrongDeviceError
from agent.formats import verify_receipt
from agent.messages import Action
from apps.licagent.relation import renew_once
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, Site
from tests.tree.conftest import activate, top
from tests.tree.test_system_daemons import until
from tests.tree.test_workflow_tree import tree_site  # noqa: F401 (a fixture)

BIN = Path(sys.executable).parent


def report_text(db: Path) -> str:
    env = dict(os.environ, LICSERVER_TIME=str(T0))
    p = subprocess.run([str(BIN / "licserver"), "report", "--db", str(db)], env=env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_the_ledger_records_the_system_from_every_step(site: Site, serve: Any,
                                                      tmp_path: Path) -> None:
    ec = top(site)
    es = site.device("Enterprise-Server", macs=("52:54:00:00:20:01",))
    as1, as2 = site.device(), site.device()
    ids = {n: d.agent.state()[0].device_id for n, d in
           (("ec", ec), ("es", es), ("as1", as1), ("as2", as2))}
    activate(ec, inherit=True, SNMP=2)
    ec_url = serve(ec).url
    for kid in (es, as2):
        assert renew_once(kid.agent, ec_url).installed == ("SNMP",)
    renew_once(as1.agent, serve(es).url)
    db = tmp_path / "ledger.db"
    ledger = Ledger(db, vendor=site.vendor, clock=site.clock)
    try:
        # step 1: a server's signed device information names its parent
        ledger.observe_device_info(as1.agent.info()[0])
        assert ledger.parent_of(ids["as1"]) == ids["es"]
        # steps 3-4: a request names its parent too (the ledger never saw es's information)
        ledger.entitle("E-1", "BMS", {"bacnet": 5})
        ledger.assign("E-1", ids["es"], "bacnet", 1)
        req = es.agent.request(Action.ACTIVATE, ["bacnet"])
        assert Vendor.read_request(req).parent == ids["ec"]
        es.agent.apply(ledger.answer_request(req))
        assert ledger.parent_of(ids["es"]) == ids["ec"]
        # a server standing alone writes no parent: its request is as before issue 14
        assert Vendor.read_request(ec.agent.request(Action.ACTIVATE, ["bacnet"])).parent is None

        # steps 5-6: a reclaim on the top server takes the grants back first; its receipt
        # carries both children's signed returns, recorded by the ledger (as2: unseen so far)
        assert ledger.parent_of(ids["as2"]) is None
        with pytest.raises(GrantsHeldError):
            ec.agent.request(Action.RECLAIM, ["SNMP"])
        for kid in (es, as2):
            assert renew_once(kid.agent, ec_url).returned == ("SNMP",)
        res, _w = ec.agent.apply(ledger.answer_request(ec.agent.request(Action.RECLAIM,
                                                                         ["SNMP"])))
        rc = verify_receipt(res.receipt, [site.vendor.public])
        assert len(rc.returns) == 2
        ledger.accept_receipt(res.receipt)
        assert ledger.parent_of(ids["as2"]) == ids["ec"]
        rep = ledger.report()
        assert rep["systems"] == [{"top": ids["ec"], "servers": sorted(
            [{"device_id": ids["es"], "parent": ids["ec"]},
             {"device_id": ids["as1"], "parent": ids["es"]},
             {"device_id": ids["as2"], "parent": ids["ec"]}], key=lambda d: d["device_id"])}]
        got = sorted((g["child"], g["detail"]) for g in rep["grant_returns"])
        assert got == sorted(
            (ids[n], f"SNMP returned by {ids[n]} to {ids['ec']} (its signed return, "
                     f"sequence {rc.sequence})") for n in ("es", "as2"))
        ops = [o for o in ledger.operations() if o["kind"] == "receipt"]
        assert ops[-1]["detail"].endswith("; 2 grant return(s)"), ops[-1]
    finally:
        ledger.close()
    text = report_text(db)
    assert f"top server {ids['ec'][:12]}…: 3 server(s) under it" in text, text
    assert f"device {ids['as2'][:12]}… under {ids['ec'][:12]}…" in text, text
    assert "grant returns (each child's signed return, carried in its parent's receipt)" in text
    assert f"SNMP returned by {ids['es']} to {ids['ec']}" in text


def test_a_return_in_a_receipt_must_be_the_child_s_own_and_addressed_to_that_server(
        site: Site, serve: Any) -> None:
    """What the ledger reads from a receipt's returns (agent.inherit.read_receipt_return):
    a return addressed to another server, or signed by a key that is not the child's, is
    refused; a genuine one is read."""
    ec = top(site)
    activate(ec, inherit=True, SNMP=1)
    kid = site.device()
    url = serve(ec).url
    renew_once(kid.agent, url)
    with pytest.raises(GrantsHeldError):
        ec.agent.request(Action.RECLAIM, ["SNMP"])
    st = kid.agent.state()[0]
    ec_id = ec.agent.state()[0].device_id
    ret, _f = inherit.make_return(st, ["SNMP"], _kid_key(kid),
                                  site.clock())
    assert inherit.read_receipt_return(ret, ec_id).child_id == st.device_id
    with pytest.raises(WrongDeviceError, match="addressed to"):
        inherit.read_receipt_return(ret, "ab" * 32)
    payload = inherit.GrantReturn.decode(_payload(ret))
    other = SigningKey.generate()
    forged = sign1(payload.encode(), other, inherit.RETURN_CONTENT_TYPE)
    with pytest.raises(TrustError, match="not signed by the key of the child"):
        inherit.read_receipt_return(forged, ec_id)
    # a key of its own for a made-up child ID: the ID is not the key's
    fake = inherit.GrantReturn(st.device_id, other.public, ec_id, ("SNMP",), (), site.clock())
    with pytest.raises(TrustError):
        inherit.read_receipt_return(sign1(fake.encode(), other, inherit.RETURN_CONTENT_TYPE),
                                    ec_id)


def _payload(data: bytes) -> bytes:
    from agent.cose import decode_sign1

    return decode_sign1(data, max_size=1 << 16).payload


def _kid_key(dev: Any) -> SigningKey:
    with dev.agent._open() as (store, _now):
        return store.key  # type: ignore[no-any-return]



def test_activate_and_reclaim_in_one_go_through_the_top_server(tree_site: Any,  # noqa: F811
                                                               tmp_path: Path) -> None:
    """``licadmin activate --tree`` and ``reclaim --tree`` (all six steps in one go) reach
    every server through the top server alone, and the ledger records the system."""
    import hw

    s, urls, ledger, lic = tree_site
    os.chdir(tmp_path)
    ids = s.ids
    Path("assign.csv").write_text("".join(f"{d},bacnet=1\n" for d in ids.values()))
    s.run("licadmin", "assign", "--licensing-server", lic.url, "--entitlement", "E-1",
              "--devices-from", "assign.csv")
    out = s.run("licadmin", "activate", "--server", urls["ec"], "--tree", "--licensing-server",
                lic.url, "--work-dir", "act", "--yes", "--json").stdout
    res = json.loads(out[out.index("{"):])
    assert res["exit_code"] == 0, out
    for name in ("ec", "es", "as1"):
        with hw.connect(urls[name], timeout=10) as c:
            assert c.check("bacnet").licensed, name
    assert ledger.free("E-1", "bacnet") == 7
    rep = ledger.report()
    assert {(x["device_id"], x["parent"]) for sy in rep["systems"] for x in sy["servers"]} == {
        (ids["es"], ids["ec"]), (ids["as1"], ids["es"])}
    # es's newest report (its license now in it) is too big for the top to keep with its
    # own children: as1 is found and reached by asking es itself, through the top
    from agent.rpc import Op

    def es_report_without_children() -> bool:
        with hw.connect(urls["ec"], timeout=10) as c:
            (es,) = c.typed(Op.GET_TREE).to_wire()["children"]
        return bool(es["features"]) and es["children"] == []

    until("the top keeps es's report without its children", es_report_without_children)
    # and back: the reclaim in one go through the top server frees all three
    for d in ids.values():
        ledger.assign("E-1", d, "bacnet", 0)
    out = s.run("licadmin", "reclaim", "--server", urls["ec"], "--tree", "--licensing-server",
                lic.url, "--work-dir", "rec", "--json").stdout
    assert json.loads(out[out.index("{"):])["exit_code"] == 0, out
    for name in ("ec", "es", "as1"):
        with hw.connect(urls[name], timeout=10) as c:
            assert not c.check("bacnet").licensed, name
    assert ledger.free("E-1", "bacnet") == 10

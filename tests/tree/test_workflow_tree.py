"""Issue 14 item 5: the site workflow through the top server (``--tree``).

Real ``licagent run`` daemons over tcp: a top server, an Enterprise Server under it and an
automation server under that. ``licadmin`` is given the top server's URL only; the servers
under it are reached through it (``relay``: the top passes each operation on over the
link the child reported, and the child's answer back unchanged, so every file stays
signed by the device it describes). The real licensing server (in-process, real HTTP)
issues, and counts, the licenses.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import hw
from agent.cose import SigningKey
from agent.formats import SiteInfo, read_device_info
from agent.rpc import Op, RelayArgs, RemoteError
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.server import LicensingServer, serve
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0
from tests.tree.test_system_daemons import System, until


@pytest.fixture
def tree_site(tmp_path: Path) -> Iterator[tuple[System, dict[str, str], Ledger, LicensingServer]]:
    from tests.conftest import stop_processes

    s = System(tmp_path)
    try:
        for name, model in (("ec", "Enterprise-Server"), ("es", "Enterprise-Server"),
                            ("as1", "AS-P")):
            s.init(name, model)
        urls: dict[str, str] = {}
        _p, urls["ec"] = s.daemon("ec", "--listen", "tcp://127.0.0.1:0")
        _p, urls["es"] = s.daemon("es", "--listen", "tcp://127.0.0.1:0", "--parent", urls["ec"],
                                  "--renew-every", "1")
        _p, urls["as1"] = s.daemon("as1", "--listen", "tcp://127.0.0.1:0", "--parent",
                                   urls["es"], "--renew-every", "1")

        def sees_all() -> bool:
            with hw.connect(urls["ec"], timeout=10) as c:
                top = c.typed(Op.GET_TREE).to_wire()
            kids = top["children"]
            return len(kids) == 1 and len(kids[0].get("children", [])) == 1

        until("the top server sees its grandchild", sees_all)
        vendor = Vendor(SigningKey.from_pem((tmp_path / "vendor" / "vendor.key").read_bytes()))
        ledger = Ledger(tmp_path / "ledger.db", vendor=vendor, clock=lambda: T0)
        lic = serve(ledger)
        ledger.entitle("E-1", "BMS", {"bacnet": 10})
        s.env["LICADMIN_TOKEN"] = ledger.create_token("tree", "vendor-admin")
        try:
            yield s, urls, ledger, lic
        finally:
            lic.close()
            ledger.close()
    finally:
        stop_processes(s.procs, 30)


def admin(s: System, *args: str, code: int = 0) -> str:
    p = s.run("licadmin", *args, code=code)
    return p.stdout + p.stderr


def test_the_whole_workflow_through_the_top_server_only(tree_site: tuple[
        System, dict[str, str], Ledger, LicensingServer], tmp_path: Path) -> None:
    s, urls, ledger, lic = tree_site
    top = urls["ec"]
    os.chdir(tmp_path)
    out = admin(s, "gather", "--server", top, "--tree", "--out", "site.info", "--verbose")
    assert "(via " in out, out
    bundle = SiteInfo.decode(Path("site.info").read_bytes())
    got = {read_device_info(d).device_id for d in bundle.devices}  # each self-signed
    assert got == set(s.ids.values())
    Path("assign.csv").write_text("".join(f"{d},bacnet=2\n" for d in s.ids.values()))
    admin(s, "assign", "--licensing-server", lic.url, "--entitlement", "E-1",
          "--devices-from", "assign.csv")
    admin(s, "license-info", "--licensing-server", lic.url, "--site-info", "site.info",
          "--out", "li.cbor")
    # the licensing server recorded the system from the servers' own signed information
    ids = s.ids
    rep = json.loads(s.run("licserver", "report", "--db", str(tmp_path / "ledger.db"),
                           "--json").stdout)
    assert rep["systems"] == [{"top": ids["ec"], "servers": sorted(
        [{"device_id": ids["es"], "parent": ids["ec"]},
         {"device_id": ids["as1"], "parent": ids["es"]}], key=lambda d: d["device_id"])}]
    text = s.run("licserver", "report", "--db", str(tmp_path / "ledger.db")).stdout
    assert f"top server {ids['ec'][:12]}…: 2 server(s) under it" in text, text
    assert f"device {ids['as1'][:12]}… under {ids['es'][:12]}…" in text, text
    out = admin(s, "requests", "--server", top, "--tree", "--license-info", "li.cbor",
                "--out-dir", "requests")
    assert sorted(p.name for p in Path("requests").iterdir()) == sorted(
        f"{d}.req" for d in s.ids.values()), out
    admin(s, "upload", "--licensing-server", lic.url, "--requests", "requests",
          "--out-dir", "responses")
    out = admin(s, "send", "--server", top, "--tree", "--responses", "responses",
                "--receipts-out", "receipts", "--json")
    summary = json.loads(out[:out.rindex("}") + 1])
    assert {r["device_id"] for r in summary["results"] if r["status"] == "ok"} == set(
        s.ids.values()), out
    admin(s, "confirm", "--licensing-server", lic.url, "--receipts", "receipts")
    # every server holds what was assigned, asked on its own link (not through the top)
    for name in ("ec", "es", "as1"):
        with hw.connect(urls[name], timeout=10) as c:
            assert c.check("bacnet").licensed, name
    assert ledger.free("E-1", "bacnet") == 4
    # the grandchild's answer went through both parents
    assert f"relay ok get-info to={s.ids['as1'][:12]}" in (tmp_path / "es.log").read_text()


def test_relay_refuses_strangers_and_operations_outside_the_site_steps(tree_site: tuple[
        System, dict[str, str], Ledger, LicensingServer]) -> None:
    s, urls, _ledger, _lic = tree_site
    with hw.connect(urls["ec"], timeout=10) as c:
        with pytest.raises(RemoteError) as err:
            c.call(Op.RELAY, RelayArgs("ab" * 32, "get-info", {}).to_wire())
        assert err.value.exit_code == 5 and "is not under this server" in str(err.value)
        # check-feature, renew-grants, read-journal ... are not relayed
        for op in ("check-feature", "renew-grants", "read-journal", "relay"):
            with pytest.raises(RemoteError) as err:
                c.call(Op.RELAY, {"device_id": s.ids["as1"], "op": op, "args": {}})
            assert err.value.exit_code == 2 and f"relay: {op} is not relayed" in str(
                err.value), op
        # a relayed refusal is the child's own, with its code
        with pytest.raises(RemoteError) as err:
            c.call(Op.RELAY, RelayArgs(s.ids["as1"], "apply-response",
                                       {"file": b"not a response"}).to_wire())
        assert err.value.exit_code == 3
    # a server that is not a top server: gather --tree of a leaf gathers the leaf only
    out = admin(s, "gather", "--server", urls["as1"], "--tree", "--out", "leaf.info")
    assert len(SiteInfo.decode(Path("leaf.info").read_bytes()).devices) == 1, out
    # a dead top server (SIGKILL): one line naming it, exit 1, nothing written
    s.procs[0].kill()
    s.procs[0].wait()
    out = admin(s, "gather", "--server", urls["ec"], "--tree", "--out", "dead.info",
                "--timeout", "2", code=1)
    assert out.count("\n") == 1 and f"cannot connect to {urls['ec']}" in out, out
    assert not Path("dead.info").exists()


def test_demo_licenses_never_count_and_never_go_to_a_child_the_ledger_knows(tree_site: tuple[
        System, dict[str, str], Ledger, LicensingServer], tmp_path: Path) -> None:
    s, urls, ledger, lic = tree_site
    os.chdir(tmp_path)
    key = str(tmp_path / "vendor" / "vendor.key")
    admin(s, "gather", "--server", urls["ec"], "--tree", "--out", "site.info")
    Path("assign.csv").write_text(f"{s.ids['ec']},bacnet=2\n")
    admin(s, "assign", "--licensing-server", lic.url, "--entitlement", "E-1",
          "--devices-from", "assign.csv")
    admin(s, "license-info", "--licensing-server", lic.url, "--site-info", "site.info",
          "--out", "li.cbor")  # the ledger now knows the system
    assert ledger.parent_of(s.ids["es"]) == s.ids["ec"]
    # a demo license for the Enterprise Server, a child: refused, nothing written
    admin(s, "request", "--server", urls["es"], "activate", "--feature", "trend",
          "--out", "es.req")
    p = s.run("licserver", "issue", "--key", key, "--request", "es.req", "--grant", "trend=5",
              "--demo", "--db", str(tmp_path / "ledger.db"), "--out", "es.resp", code=5)
    assert p.stderr.count("\n") == 1 and "is a child server of" in p.stderr, p.stderr
    assert s.ids["es"][:12] in p.stderr and not Path("es.resp").exists()
    # the top server takes it; the ledger never counts it nor asks for it back
    admin(s, "request", "--server", urls["ec"], "activate", "--feature", "bacnet",
          "--out", "ec.req")
    s.run("licserver", "issue", "--key", key, "--request", "ec.req", "--grant", "bacnet=7",
          "--demo", "--db", str(tmp_path / "ledger.db"), "--out", "ec.resp")
    admin(s, "apply", "--server", urls["ec"], "ec.resp")
    free = ledger.free("E-1", "bacnet")
    admin(s, "gather", "--server", urls["ec"], "--tree", "--out", "site2.info")
    out = admin(s, "license-info", "--licensing-server", lic.url, "--site-info", "site2.info",
                "--out", "li2.cbor")
    # seen installed (7 units), it is not reclaimed as unassigned, and the entitlement
    # still lends only the 2 assigned (counted, the demo would have used 7 of 10)
    assert "0 server(s) with licenses to reclaim" in out, out
    assert ledger.free("E-1", "bacnet") == free == 8
    assert ledger.report()["installed"].get(s.ids["ec"], []) == []

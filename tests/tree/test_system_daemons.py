"""Issue 14, "done when": a three-level system of real ``licagent run`` daemons over tcp and
mqtt (a real mosquitto), driven with the real ``licserver``, ``licagent`` and ``licadmin``
commands: activation on the top server, inheritance by children, ``licadmin tree``, a
reclaim that takes the grants back, a child cut off past its lease, and a forced reclaim.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import hw
from agent.cose import PublicKey
from agent.formats import SiteInfo, read_device_info, verify_receipt
from tests.conftest import T0
from tests.hw.mosquitto import Broker

BIN = Path(sys.executable).parent
WAIT = 60.0  # an upper bound for a renewal to land; never asserted as a time
DAY = 86400


class System:
    """Stores, facts and daemons under one folder; the vendor is the real licserver."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = dict(os.environ, LICAGENT_TIME=str(T0), LICSERVER_TIME=str(T0))
        for k in ("NOTIFY_SOCKET", "LICAGENT_FACTS"):
            self.env.pop(k, None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.run("licserver", "keygen", "--out", str(root / "vendor"))
        self.ids: dict[str, str] = {}
        self.n = 0

    def run(self, tool: str, *args: str, code: int = 0, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / tool), *args], env=env or self.env, capture_output=True,
                           text=True, timeout=120, check=False)
        assert p.returncode == code, (tool, args, p.returncode, p.stdout, p.stderr)
        return p

    def store(self, name: str) -> list[str]:
        return ["--state", str(self.root / name), "--facts", str(self.root / f"{name}.json")]

    def init(self, name: str, model: str) -> None:
        self.n += 1
        mac = f"52:54:00:00:14:{self.n:02x}" if model == "Enterprise-Server" else \
            f"00:80:f4:00:14:{self.n:02x}"
        (self.root / f"{name}.json").write_text(json.dumps(
            {"model": model, "serial": f"SN-{name}", "macs": [mac]}))
        out = self.run("licagent", "init", *self.store(name), "--model", model, "--trust",
                       str(self.root / "vendor" / "vendor.pub")).stdout
        self.ids[name] = out.split("device_id ")[1].split()[0]

    def activate(self, name: str, grant: str) -> None:
        req, resp = self.root / f"{name}.req", self.root / f"{name}.resp"
        feature = grant.split("=")[0]
        self.run("licagent", "request", *self.store(name), "activate", "--feature", feature,
                 "--out", str(req))
        self.run("licserver", "issue", "--key", str(self.root / "vendor" / "vendor.key"),
                 "--request", str(req), "--grant", grant, "--inherit", "--out", str(resp))
        self.run("licagent", "apply", *self.store(name), str(resp))

    def daemon(self, name: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
        with open(self.root / f"{name}.log", "ab") as log:
            proc = subprocess.Popen([str(BIN / "licagent"), "run", *self.store(name), *args],
                                    env=self.env, stdout=subprocess.PIPE, stderr=log)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening "), (line, (self.root / f"{name}.log").read_text())
        return proc, line.split()[1]

    def reclaim_via(self, url: str, feature: str, *flags: str, code: int = 0
                    ) -> subprocess.CompletedProcess[str]:
        req = self.root / f"reclaim-{feature}.req"
        p = self.run("licadmin", "request", "--server", url, "reclaim", "--feature", feature,
                     "--out", str(req), *flags, code=code)
        if code:
            return p
        resp = self.root / f"reclaim-{feature}.resp"
        self.run("licserver", "issue", "--key", str(self.root / "vendor" / "vendor.key"),
                 "--request", str(req), "--remove", feature, "--out", str(resp))
        return self.run("licadmin", "apply", "--server", url, str(resp), "--receipt-out",
                        str(self.root / f"reclaim-{feature}.receipt"))


def licensed(url: str, feature: str) -> bool:
    with hw.connect(url, timeout=10) as c:
        return bool(c.check(feature).licensed)


def until(what: str, cond: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.2)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker.plain(tmp_path / "broker")
    with b:
        yield b


def test_three_level_system_over_tcp_and_mqtt(system: System, broker: Broker) -> None:
    s = system
    for name, model in (("ec", "Enterprise-Server"), ("es", "Enterprise-Server"),
                        ("as1", "AS-P"), ("as2", "AS-B")):
        s.init(name, model)
    s.activate("ec", "SNMP=2")  # the top server: two children may inherit SNMP
    s.activate("es", "PROTO=1")  # the Enterprise Server's own, for its automation server
    mqtt = f"{broker.url}/site"
    _ec, ec_url = s.daemon("ec", "--listen", "tcp://127.0.0.1:0")
    es, es_url = s.daemon("es", "--listen", "tcp://127.0.0.1:0", "--listen", mqtt,
                          "--parent", ec_url, "--renew-every", "1")
    es_mqtt = f"{mqtt}/{s.ids['es']}"
    as1, as1_url = s.daemon("as1", "--listen", mqtt, "--parent", es_mqtt, "--renew-every", "1")
    _as2, as2_url = s.daemon("as2", "--listen", "tcp://127.0.0.1:0", "--parent", ec_url,
                            "--renew-every", "1")
    assert as1_url == f"{mqtt}/{s.ids['as1']}"

    # inheritance: level 1 and level 2, each through its own parent, over tcp and mqtt
    until("es inherits SNMP", lambda: licensed(es_url, "SNMP"))
    until("as2 inherits SNMP", lambda: licensed(as2_url, "SNMP"))
    until("as1 inherits PROTO over mqtt", lambda: licensed(as1_url, "PROTO"))
    assert not licensed(as1_url, "SNMP")  # not its parent's license: no chain
    st = json.loads(s.run("licagent", "status", *s.store("as2"), "--json").stdout)
    (lic,) = st["licenses"]
    assert (lic["source"], lic["parent"], lic["lease_until"]) == (
        "inherited", s.ids["ec"], "2027-01-22T08:00:00Z")
    s.run("licagent", "use", *s.store("as2"), "SNMP=1")
    assert s.run("licagent", "check", *s.store("as2"), "SNMP", "--count", "2",
                 code=1).returncode == 1

    # the tree through the top server; every server reachable on its own link
    def tree() -> dict[str, object]:
        out = json.loads(s.run("licadmin", "tree", "--server", ec_url, "--json").stdout)
        assert set(out) == {"servers", "totals"}
        return out

    until("as1 reported through es", lambda: len(tree()["servers"]) == 4)  # type: ignore[arg-type]
    t = tree()
    by_id = {x["device_id"]: x for x in t["servers"]}  # type: ignore[union-attr,index]
    assert {k: (v["parent"], v["model"], v["reachable"]) for k, v in by_id.items()} == {
        s.ids["ec"]: (None, "Enterprise-Server", True),
        s.ids["es"]: (s.ids["ec"], "Enterprise-Server", True),
        s.ids["as1"]: (s.ids["es"], "AS-P", True),
        s.ids["as2"]: (s.ids["ec"], "AS-B", True)}
    for srv in by_id.values():
        for f in srv["features"]:
            assert set(f) == {"feature", "required", "licensed", "inherited", "available"}
    assert t["totals"] == [  # type: ignore[index]
        {"feature": "PROTO", "required": 0, "licensed": 2, "inherited": 1, "available": 1},
        {"feature": "SNMP", "required": 1, "licensed": 4, "inherited": 2, "available": 1}]
    text = s.run("licadmin", "tree", "--server", ec_url).stdout
    assert "SN-as1  AS-P" in text and "system: 4 server(s)" in text

    # a reclaim on the top server takes the grants back first
    p = s.reclaim_via(ec_url, "SNMP", code=1)
    assert "grants-held" in p.stderr and s.ids["es"][:12] in p.stderr \
        and s.ids["as2"][:12] in p.stderr and p.stderr.count("\n") == 1
    until("es gave SNMP back", lambda: not licensed(es_url, "SNMP"))
    until("as2 gave SNMP back", lambda: not licensed(as2_url, "SNMP"))
    s.reclaim_via(ec_url, "SNMP")
    vendor_pub = PublicKey.from_pem((s.root / "vendor" / "vendor.pub").read_bytes())
    rc = verify_receipt((s.root / "reclaim-SNMP.receipt").read_bytes(), [vendor_pub])
    assert [x.feature for x in rc.removed] == ["SNMP"] and len(rc.returns) == 2
    assert rc.leases == ()

    # the parent of as1 dies (SIGKILL): as1 keeps PROTO until its lease ends, then says why
    es.send_signal(signal.SIGKILL)
    es.wait(timeout=30)
    time.sleep(2)  # as1's renewals fail meanwhile
    assert licensed(as1_url, "PROTO")
    as1.send_signal(signal.SIGTERM)
    assert as1.wait(timeout=30) == 0
    later = dict(s.env, LICAGENT_TIME=str(T0 + 7 * DAY + 60))
    p = s.run("licagent", "check", *s.store("as1"), "PROTO", code=1, env=later)
    assert "lease ended at 2027-01-22T08:00:00Z" in p.stdout + p.stderr

    # a forced reclaim on es (back up, as1 renewing again at a later clock)
    s.env = later
    es, es_url = s.daemon("es", "--listen", "tcp://127.0.0.1:0", "--listen", mqtt,
                          "--parent", ec_url, "--renew-every", "1")
    as1, as1_url = s.daemon("as1", "--listen", mqtt, "--parent", es_mqtt, "--renew-every", "1")
    until("as1 inherits PROTO again", lambda: licensed(as1_url, "PROTO"))
    # (without --force it would be refused and recalled, as SNMP above: forced, at once)
    s.reclaim_via(es_url, "PROTO", "--force")
    rc = verify_receipt((s.root / "reclaim-PROTO.receipt").read_bytes(), [vendor_pub])
    assert rc.leases == ({"child_id": s.ids["as1"], "feature": "PROTO",
                          "lease_until": T0 + 14 * DAY + 60},)
    until("as1 drops PROTO at its next renewal", lambda: not licensed(as1_url, "PROTO"))


def test_a_system_whose_top_server_listens_on_https_only(system: System, tmp_path: Path) -> None:
    """The top server has only an https:// listener: its children renew, inherit and return
    over it, licadmin sees the tree, asks --count, and gathers the system through it."""
    from tests.support.pki import make_pki

    s = system
    pki = make_pki(tmp_path / "pki")
    for name, model in (("es", "Enterprise-Server"), ("as1", "AS-P"), ("as2", "AS-B")):
        s.init(name, model)
    s.activate("es", "SNMP=2")
    _es, es_url = s.daemon("es", "--listen",
                           f"https://127.0.0.1:0?cert={pki.server_cert}&key={pki.server_key}")
    assert es_url.startswith("https://")
    top = f"{es_url}?ca={pki.ca_cert}"
    kids = {}
    for name in ("as1", "as2"):
        _p, kids[name] = s.daemon(name, "--listen", "tcp://127.0.0.1:0", "--parent", top,
                                  "--renew-every", "1")
    for name, url in kids.items():
        until(f"{name} inherits SNMP over https", lambda url=url: licensed(url, "SNMP"))

    s.run("licadmin", "use", "--server", top, "SNMP=2")
    assert "licensed" in s.run("licadmin", "check", "--server", top, "SNMP", "--count",
                               "2").stdout
    s.run("licadmin", "check", "--server", top, "SNMP", "--count", "3", code=1)

    def servers() -> int:
        out = json.loads(s.run("licadmin", "tree", "--server", top, "--json").stdout)
        return len(out["servers"])

    until("both children in the tree", lambda: servers() == 3)
    out = json.loads(s.run("licadmin", "tree", "--server", top, "--json").stdout)
    assert {x["device_id"]: x["parent"] for x in out["servers"]} == {
        s.ids["es"]: None, s.ids["as1"]: s.ids["es"], s.ids["as2"]: s.ids["es"]}
    # the site step through the top server: relayed over https to each child
    s.run("licadmin", "gather", "--server", top, "--tree", "--out", str(tmp_path / "site.info"))
    bundle = SiteInfo.decode((tmp_path / "site.info").read_bytes())
    assert {read_device_info(d).device_id for d in bundle.devices} == set(s.ids.values())

    # a reclaim recalls the grants; the children give them back over https
    s.reclaim_via(top, "SNMP", code=1)
    for name, url in kids.items():
        until(f"{name} gave SNMP back over https", lambda url=url: not licensed(url, "SNMP"))
    s.reclaim_via(top, "SNMP")
    vendor_pub = PublicKey.from_pem((s.root / "vendor" / "vendor.pub").read_bytes())
    rc = verify_receipt((s.root / "reclaim-SNMP.receipt").read_bytes(), [vendor_pub])
    assert len(rc.returns) == 2 and rc.leases == ()

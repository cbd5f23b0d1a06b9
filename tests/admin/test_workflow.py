"""The site workflow of ``licadmin`` (issue 5) as real subprocesses against a small real site.

The site: three agents with their own stores, served by this test process over
tcp://, a pty (serial://) and a USB-stick mailbox (usbdrop://), plus the
licensing server simulator on loopback in a thread. Every ``licadmin`` call is
a real process; files travel through real folders.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.cose import SigningKey
from agent.formats import read_device_info, verify_receipt
from agent.ops import AgentOps
from hw import listen
from hw.link import Listener
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.server import LicensingServer, serve
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Device, Site

BIN = Path(sys.executable).parent
PARTIAL = 10
#: the commands that print one line per server with --verbose
STEPS = frozenset({"gather", "license-info", "requests", "upload", "send", "confirm",
                   "activate", "reclaim"})


@dataclass
class Served:
    """One server of the site: a device and the listener that serves it."""

    name: str
    device: Device
    scheme: str
    listener: Listener
    url: str = ""

    @property
    def device_id(self) -> str:
        return str(self.device.agent.status()["device_id"])

    def licenses(self) -> dict[str, int]:
        return {x["feature"]: x["count"] for x in self.device.agent.status()["licenses"]}

    def stop(self) -> None:
        self.listener.stop()

    def restart(self, stick: Path) -> None:
        """Serve again (a tcp server comes back on a new port)."""
        self.listener = _listener(self.scheme, self.device, stick)
        self.listener.start()
        self.url = self.listener.address


def _listener(scheme: str, device: Device, stick: Path) -> Listener:
    ops = AgentOps(device.agent)
    if scheme == "tcp":
        lst: Listener = listen("tcp://127.0.0.1:0", ops)
    elif scheme == "pty":
        lst = listen("pty://", ops)
    else:
        lst = listen(f"usbdrop://{stick}?always=1&poll=0.05", ops)
    return lst


@dataclass
class WorkSite:
    root: Path
    site: Site
    servers: list[Served]
    env: dict[str, str]
    stick: Path
    ledger: Ledger | None = None
    licserver: LicensingServer | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def licensing(self) -> str:
        assert self.licserver is not None
        return self.licserver.url

    @property
    def ledger_(self) -> Ledger:
        assert self.ledger is not None
        return self.ledger

    def start_licensing(self) -> None:
        """The licensing server on its ledger file (again, after a restart: a new port)."""
        self.ledger = Ledger(self.root / "ledger.db", vendor=self.site.vendor,
                             clock=self.site.clock)
        if "token" not in self.extra:  # the ledger keeps it across restarts
            self.extra["token"] = self.ledger.create_token("site-tests", "vendor-admin")
            self.env["LICADMIN_TOKEN"] = self.extra["token"]
        self.licserver = serve(self.ledger)

    def stop_licensing(self) -> None:
        if self.licserver is not None:
            self.licserver.close()
            self.licserver = None
        if self.ledger is not None:
            self.ledger.close()
            self.ledger = None

    def by_name(self, name: str) -> Served:
        return next(s for s in self.servers if s.name == name)

    def online(self, command: str, *args: str, code: int | None = 0
               ) -> subprocess.CompletedProcess[str]:
        return self.run(command, "--licensing-server", self.licensing, *args, code=code)

    def run(self, *args: str, code: int | None = 0, verbose: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """A licadmin process; the steps with --verbose (these tests read per-server lines)."""
        if verbose and args and args[0] in STEPS:
            args = (args[0], "--verbose", *args[1:])
        p = subprocess.run([str(BIN / "licadmin"), *args], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=60, check=False)
        if code is not None:
            assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
        return p

    def server_args(self, *which: Served) -> list[str]:
        out: list[str] = []
        for s in which or tuple(self.servers):
            out += ["--server", s.url]
        return out

    def write_toml(self, name: str = "site.toml") -> str:
        lines = ['site = "plant 3"']
        for s in self.servers:
            lines += ["[[server]]", f'url = "{s.url}"', f'name = "{s.name}"']
        (self.root / name).write_text("\n".join(lines) + "\n")
        return name


def start_site(tmp_path: Path, vendor: Vendor) -> WorkSite:
    site = Site(vendor, tmp_path / "devices")
    site.root.mkdir()
    stick = tmp_path / "stick"
    servers = []
    for name, model, scheme in (("asp-1", "AS-P", "tcp"), ("asb-1", "AS-B", "pty"),
                                ("edge-1", "Edge-Server", "usbdrop")):
        dev = site.device(model)
        lst = _listener(scheme, dev, stick)
        lst.start()
        servers.append(Served(name, dev, scheme, lst, lst.address))
    env = dict(os.environ, LICAGENT_TIME=str(site.clock.t))
    return WorkSite(tmp_path, site, servers, env, stick)


@pytest.fixture
def ws(tmp_path: Path, vendor: Vendor) -> Iterator[WorkSite]:
    before = set(threading.enumerate())
    w = start_site(tmp_path, vendor)
    try:
        yield w
    finally:
        w.stop_licensing()
        for s in w.servers:
            s.stop()
    for t in set(threading.enumerate()) - before:
        t.join(timeout=5)
        assert not t.is_alive(), f"thread {t.name} outlived the site"


# ---------------------------------------------------------------- gather (no licensing server)


def test_gather_over_tcp_pty_usbdrop_lists_the_unreachable_and_exits_partial(
        ws: WorkSite) -> None:
    dead = "tcp://127.0.0.1:1"
    p = ws.run("gather", *ws.server_args(), "--server", dead, "--out", "site.info", code=PARTIAL)
    assert f"FAILED  {dead}: transport: cannot connect" in p.stdout
    for s in ws.servers:
        assert f"ok      {s.url} device {s.device_id[:12]}" in p.stdout
    assert "wrote site information of 3 server(s) to site.info; 1 failed" in p.stdout
    assert p.stdout.rstrip().endswith("rerun gather for the failed ones")
    shown = json.loads(ws.run("show", "site.info", "--json").stdout)
    assert shown["kind"] == "site-info" and shown["signature"]["verified"] is True
    assert {d["device_id"] for d in shown["content"]["devices"]} == {
        s.device_id for s in ws.servers}
    assert shown["content"]["failed"][0]["server"] == dead
    # --json: one document for scripts, nothing else on stdout
    summary = json.loads(ws.run("gather", *ws.server_args(), "--server", dead, "--out",
                                "again.info", "--json", code=PARTIAL).stdout)
    assert summary["exit_code"] == PARTIAL and summary["devices"] == 3
    assert [r["status"] for r in summary["results"]] == ["ok", "ok", "ok", "failed"]
    assert summary["results"][3]["code"] == 1 and summary["results"][3]["reason"] == "transport"


def test_gather_from_a_servers_file_names_the_site_and_refuses_bad_files(ws: WorkSite) -> None:
    toml = ws.write_toml()
    out = ws.run("gather", "--servers", toml, "--out", "site.info").stdout
    for s in ws.servers:
        assert f"ok      {s.name} device {s.device_id[:12]}" in out
    assert json.loads(ws.run("show", "site.info", "--json").stdout)["content"]["site"] == "plant 3"
    # every device in the bundle carries its own verified signature
    from agent.formats import SiteInfo

    bundle = SiteInfo.decode((ws.root / "site.info").read_bytes())
    assert sorted(read_device_info(d).device_id for d in bundle.devices) == sorted(
        s.device_id for s in ws.servers)
    (ws.root / "bad.toml").write_text('[[server]]\nurl = "tcp://x:1"\nport = 3\n')
    assert "server 1 has unknown key port" in ws.run("gather", "--servers", "bad.toml", "--out",
                                                     "x", code=2).stderr
    (ws.root / "bad2.toml").write_text("[[server]\n")
    assert "not valid TOML" in ws.run("gather", "--servers", "bad2.toml", "--out", "x",
                                      code=2).stderr
    assert "not both" in ws.run("gather", "--servers", toml, *ws.server_args(), "--out", "x",
                                code=2).stderr
    # nobody answers: nothing written, the failure's own exit code
    p = ws.run("gather", "--server", "tcp://127.0.0.1:1", "--out", "none.info", code=1)
    assert "not written" in p.stdout and not (ws.root / "none.info").exists()
    # the same device twice (two links to one agent) is gathered once
    twice = listen("tcp://127.0.0.1:0", AgentOps(ws.servers[0].device.agent))
    twice.start()
    try:
        p = ws.run("gather", *ws.server_args(ws.servers[0]), "--server", twice.address,
                   "--out", "dup.info")
    finally:
        twice.stop()
    assert (f"note: {twice.address} is the same device as {ws.servers[0].url}: gathered once"
            in p.stdout)
    assert "wrote site information of 1 server(s)" in p.stdout


def test_gather_on_a_terminal_draws_a_progress_bar(ws: WorkSite) -> None:
    master, slave = pty.openpty()
    try:
        # the bar goes to stderr when stderr is a terminal; stdout stays plain
        proc = subprocess.Popen([str(BIN / "licadmin"), "gather", *ws.server_args(), "--server",
                                 "tcp://127.0.0.1:1", "--out", "tty.info"],
                                cwd=ws.root, env=ws.env, stderr=slave,
                                stdout=subprocess.PIPE)
        os.close(slave)
        out = b""
        while True:
            r, _w, _x = select.select([master], [], [], 30)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=30) == PARTIAL
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        proc.stdout.close()
    finally:
        os.close(master)
    text = out.decode()
    assert "\rgather [" in text and "] 0/4" in text and "] 4/4" in text
    assert "#" * 30 in text
    assert text.endswith("\r\x1b[K")  # the bar is wiped at the end of the step
    # stdout: one line per outcome class, a table of the failures only, no bar
    assert "\r" not in stdout and "ok      " not in stdout
    assert "gather: gathered 3\ngather: FAILED   1\n" in stdout
    table = stdout[stdout.index("SERVER "):].splitlines()
    assert table[0].split() == ["SERVER", "RESULT", "DETAIL"]
    assert table[1].split()[:4] == ["tcp://127.0.0.1:1", "FAILED", "transport:", "cannot"]
    assert "wrote site information of 3 server(s)" in stdout


# ---------------------------------------------------------------- show


def test_show_prints_every_kind_with_signer_and_verdict(ws: WorkSite) -> None:
    s = ws.servers[0]
    vendor = ws.site.vendor
    (ws.root / "vendor.pub").write_bytes(vendor.public.to_pem())
    other = SigningKey.generate()
    (ws.root / "other.pub").write_bytes(other.public.to_pem())
    ws.run("info", "--server", s.url, "--out", "dev.info")
    ws.run("request", "--server", s.url, "activate", "--feature", "bacnet", "--out", "a.req")
    (ws.root / "a.resp").write_bytes(vendor.issue((ws.root / "a.req").read_bytes(),
                                                  [Grant("bacnet", 4)], now=ws.site.clock.t))
    ws.run("apply", "--server", s.url, "a.resp", "--receipt-out", "a.receipt")
    (ws.root / "li.cbor").write_bytes(vendor.license_info(
        {s.device_id: ([], [])}, ws.site.clock.t))
    from agent.messages import TrustKey

    (ws.root / "trust.upd").write_bytes(vendor.trust_update([TrustKey(vendor.public)], 1,
                                                            ws.site.clock.t))
    ws.run("gather", *ws.server_args(s), "--out", "site.info")
    kinds = {"dev.info": "device-info", "a.req": "request", "a.resp": "response",
             "a.receipt": "receipt", "li.cbor": "license-info", "trust.upd": "trust-update",
             "site.info": "site-info", "vendor.pub": "public-key"}
    for name, kind in kinds.items():
        d = json.loads(ws.run("show", name, "--json").stdout)
        assert d["kind"] == kind, name
        text = ws.run("show", name).stdout
        assert text.startswith(f"{name}: {kind}\n"), text
        if kind in ("device-info", "request", "receipt"):
            assert d["signer"] == {"by": "device", "device_id": s.device_id,
                                   "kid": s.device_id, "alg": "EdDSA"}
            assert d["signature"]["verified"] is True
            assert f"  signer          device {s.device_id}" in text
            assert "  signature       OK: verifies with the device key the file carries" in text
        elif kind in ("response", "license-info", "trust-update"):
            assert d["signer"]["by"] == "vendor" and d["signer"]["kid"] == vendor.public.kid.hex()
            assert d["signature"] == {"verified": None, "detail": "vendor signature not checked "
                                                                  "(give --trust VENDOR_PUB)"}
            good = json.loads(ws.run("show", name, "--json", "--trust", "vendor.pub").stdout)
            assert good["signature"]["verified"] is True
            bad = ws.run("show", name, "--trust", "other.pub", code=4).stdout
            assert "signature       FAILED: signed by vendor key" in bad
    req = json.loads(ws.run("show", "a.req", "--json").stdout)["content"]
    assert req["action"] == "activate" and req["features"] == ["bacnet"]
    rc = json.loads(ws.run("show", "a.receipt", "--json", "--trust", "vendor.pub").stdout)
    assert "genuine receipt" in rc["signature"]["detail"]
    assert rc["content"]["applied"] == [{"op": "add", "feature": "bacnet", "count": 4,
                                         "not_before": None, "not_after": None, "grace": 0}]
    assert rc["content"]["response"]["signer"]["kid"] == vendor.public.kid.hex()
    assert "add bacnet count 4" in ws.run("show", "a.resp").stdout
    # a file altered after signing is reported, exit 4; something else entirely, exit 3
    data = bytearray((ws.root / "a.req").read_bytes())
    data[-1] ^= 1
    (ws.root / "tampered.req").write_bytes(bytes(data))
    assert "signature       FAILED: DOES NOT VERIFY" in ws.run("show", "tampered.req", code=4).stdout
    (ws.root / "junk").write_bytes(b"\xff\x00junk")
    assert "expected a file of this project" in ws.run("show", "junk", code=3).stderr
    assert "no such file" in ws.run("show", "nope", code=2).stderr


# ---------------------------------------------------------------- with the licensing server

YEAR = 365 * 86400


@pytest.fixture
def lws(ws: WorkSite) -> WorkSite:
    """The site plus a licensing server holding entitlement E-100 (bacnet 10, modbus 4)."""
    ws.start_licensing()
    ws.ledger_.entitle("E-100", "BMS-Pro", {"bacnet": 10, "modbus": 4},
                       until=ws.site.clock.t + YEAR)
    return ws


ASSIGNED = {"asp-1": {"bacnet": 3}, "asb-1": {"bacnet": 2, "modbus": 1}, "edge-1": {"bacnet": 1}}


def result_table(out: str) -> dict[str, str]:
    """The rows of the result table, by first column, with runs of spaces squeezed."""
    lines = out[out.index("\nSERVER ") + 1:].splitlines()
    assert lines[0].split() == ["SERVER", "DEVICE", "RESULT", "DETAIL"]
    rows = {}
    for line in lines[1:]:
        if line.startswith(("wrote ", "partial:", "not sent:", "note:", "send:", "SERVER ")):
            break
        rows[line.split()[0]] = " ".join(line.split())
    return rows


def assign_all(w: WorkSite) -> None:
    for name, feats in ASSIGNED.items():
        s = w.by_name(name)
        args = [a for f, n in feats.items() for a in ("--feature", f"{f}={n}")]
        out = w.online("assign", "--entitlement", "E-100", "--device", s.device_id, *args).stdout
        for f, n in feats.items():
            assert f"assigned {f}={n} of entitlement E-100 (BMS-Pro) to device {s.device_id}" \
                in out


def installed(w: WorkSite) -> dict[str, dict[str, int]]:
    """What the ledger believes each server holds, by server name."""
    rep = w.ledger_.report()["installed"]
    return {s.name: {x["feature"]: x["count"] for x in rep.get(s.device_id, [])}
            for s in w.servers}


def activate_all(w: WorkSite) -> None:
    assign_all(w)
    out = w.online("activate", "--servers", w.write_toml()).stdout
    assert "files of every step" not in out  # all went well: the temporary folder is gone
    assert {s.name: s.licenses() for s in w.servers} == ASSIGNED


def test_activation_step_by_step_over_tcp_pty_and_usbdrop(lws: WorkSite) -> None:
    w = lws
    assign_all(w)
    toml = w.write_toml()
    w.run("gather", "--servers", toml, "--out", "site.info")
    out = w.online("license-info", "--site-info", "site.info", "--out", "li.cbor").stdout
    asb = w.by_name("asb-1")
    assert f"device {asb.device_id[:12]}…: reclaim nothing; install bacnet=2, modbus=1" in out
    assert "wrote license information for 3 server(s) to li.cbor" in out
    out = w.run("requests", "--license-info", "li.cbor", "--servers", toml,
                "--out-dir", "requests").stdout
    assert out.count("ok      ") == 3 and "wrote 3 request(s) to requests" in out
    assert f"ok      asb-1 device {asb.device_id[:12]}…: activate bacnet, modbus on sequence 0\n" \
        in out
    assert sorted(p.name for p in (w.root / "requests").iterdir()) == sorted(
        f"{s.device_id}.req" for s in w.servers)
    out = w.online("upload", "--requests", "requests", "--out-dir", "responses").stdout
    assert "wrote 3 response(s) to responses" in out
    assert f"ok      request device {asb.device_id[:12]}…: response: sequence 0 -> 1: " \
        f"add bacnet=2, add modbus=1\n" in out
    assert all(s.licenses() == {} for s in w.servers)  # nothing reaches a server by itself
    out = w.run("send", "--responses", "responses", "--servers", toml,
                "--receipts-out", "receipts").stdout
    rows = result_table(out)
    assert rows["asb-1"] == f"asb-1 {asb.device_id[:12]}… applied sequence 0 -> 1: " \
        f"add bacnet, add modbus"
    assert rows["edge-1"].endswith("applied sequence 0 -> 1: add bacnet")
    assert len(rows) == 3
    assert {s.name: s.licenses() for s in w.servers} == ASSIGNED
    for s in w.servers:
        rc = verify_receipt((w.root / "receipts" / f"{s.device_id}.receipt").read_bytes(),
                            [w.site.vendor.public])
        assert rc.device_id == s.device_id and rc.sequence == 1
    out = w.online("confirm", "--receipts", "receipts").stdout
    assert "3 receipt(s) from receipts: 3 confirmed" in out
    assert installed(w) == ASSIGNED and w.ledger_.report()["pending_reclaims"] == []
    assert w.ledger_.free("E-100", "bacnet") == 4 and w.ledger_.free("E-100", "modbus") == 3
    # every step is safe to repeat: same receipts, nothing counted twice
    out = w.run("send", "--responses", "responses", "--servers", toml,
                "--receipts-out", "receipts").stdout
    assert sum("already applied" in r for r in result_table(out).values()) == 3
    assert "3 already confirmed" in w.online("confirm", "--receipts", "receipts").stdout
    assert installed(w) == ASSIGNED and w.ledger_.free("E-100", "bacnet") == 4
    # --json summaries for scripts
    summary = json.loads(w.online("confirm", "--receipts", "receipts", "--json").stdout)
    assert summary["exit_code"] == 0 and len(summary["results"]) == 3
    # the licensing server refuses more than the entitlement holds
    err = w.online("assign", "--entitlement", "E-100", "--device", asb.device_id,
                   "--feature", "bacnet=9", code=6).stderr
    assert "holds 10 of bacnet" in err


def test_reclaim_waits_for_its_receipt_which_also_rides_along_an_upload(lws: WorkSite) -> None:
    w = lws
    activate_all(w)
    asb, asp = w.by_name("asb-1"), w.by_name("asp-1")
    toml = w.write_toml()
    # release asb-1's bacnet: the ledger wants it back before anyone else may have it
    w.online("assign", "--entitlement", "E-100", "--device", asb.device_id,
             "--feature", "bacnet=0")
    w.run("gather", "--servers", toml, "--out", "site.info")
    out = w.online("license-info", "--site-info", "site.info", "--out", "li.cbor").stdout
    assert f"device {asb.device_id[:12]}…: reclaim bacnet=2; install nothing" in out
    out = w.run("requests", "--license-info", "li.cbor", "--servers", toml,
                "--out-dir", "requests").stdout
    assert out.count("\nskipped ") + out.startswith("skipped ") == 2
    assert "nothing to reclaim or install" in out
    assert [p.name for p in (w.root / "requests").iterdir()] == [f"{asb.device_id}.req"]
    out = w.online("upload", "--requests", "requests", "--out-dir", "responses").stdout
    assert "response: sequence 1 -> 2: remove bacnet" in out
    pending = w.ledger_.report()["pending_reclaims"]
    assert [(p["device_id"], p["feature"], p["count"]) for p in pending] == [
        (asb.device_id, "bacnet", 2)]
    assert w.ledger_.free("E-100", "bacnet") == 4  # not free before the receipt
    # the two servers with no response are listed as missed: never exit 0 (item 12)
    out = w.run("send", "--responses", "responses", "--servers", toml, "--receipts-out",
                "receipts", code=PARTIAL).stdout
    assert sum(line.startswith("MISSED  ") for line in out.splitlines()) == 2
    assert re.search(r"^send: MISSED +2$", out, re.M)
    assert asb.licenses() == {"modbus": 1}
    # the licensing server restarts between upload and confirm: nothing is forgotten
    w.stop_licensing()
    w.start_licensing()
    assert len(w.ledger_.report()["pending_reclaims"]) == 1
    out = w.online("confirm", "--receipts", "receipts").stdout
    assert f"ok      receipt device {asb.device_id[:12]}…: sequence 2: freed bacnet=2" in out
    assert w.ledger_.report()["pending_reclaims"] == []
    assert w.ledger_.free("E-100", "bacnet") == 6
    assert installed(w)["asb-1"] == {"modbus": 1}
    # the freed licenses go elsewhere; the next upload carries the receipts again, harmlessly
    w.online("assign", "--entitlement", "E-100", "--device", asp.device_id,
             "--feature", "bacnet=5")
    w.run("gather", "--server", asp.url, "--out", "site2.info")
    w.online("license-info", "--site-info", "site2.info", "--out", "li2.cbor")
    (w.root / "round2").mkdir()
    w.run("requests", "--license-info", "li2.cbor", "--server", asp.url,
          "--out-dir", "round2/requests")
    out = w.online("upload", "--requests", "round2/requests", "--out-dir", "round2/responses",
                   "--receipts", "receipts").stdout
    assert "response: sequence 1 -> 2: update bacnet=5" in out
    assert "1 receipt(s) from receipts rode along: 1 already confirmed" in out
    w.run("send", "--responses", "round2/responses", "--server", asp.url,
          "--receipts-out", "round2/receipts")
    assert asp.licenses() == {"bacnet": 5}
    # a receipts folder beside the requests rides along by itself
    out = w.online("upload", "--requests", "round2/requests", "--out-dir",
                   "round2/responses").stdout
    assert f"ok      receipt device {asp.device_id[:12]}…: sequence 2: freed nothing" in out
    assert "rode along: 1 confirmed" in out
    assert installed(w)["asp-1"] == {"bacnet": 5} and w.ledger_.free("E-100", "bacnet") == 4


def test_one_go_reclaim_of_named_features_keeps_its_work_dir(lws: WorkSite) -> None:
    w = lws
    activate_all(w)
    edge = w.by_name("edge-1")
    out = w.online("reclaim", *w.server_args(), "--feature", "modbus", "--work-dir", "work",
                   code=0).stdout
    assert "== step 1/6: gather server information" in out and "== step 6/6: confirm" in out
    assert "files of every step are in work" in out
    assert w.by_name("asb-1").licenses() == {"bacnet": 2}
    assert w.by_name("asp-1").licenses() == {"bacnet": 3}
    assert "none of modbus is installed" in out
    assert w.ledger_.report()["pending_reclaims"] == []
    assert w.ledger_.free("E-100", "modbus") == 4
    for sub in ("site-info.cbor", "license-info.cbor", "requests", "responses", "receipts"):
        assert (w.root / "work" / sub).exists()
    summary = json.loads(w.online("reclaim", "--server", edge.url, "--feature", "bacnet",
                                  "--json").stdout)
    assert summary["exit_code"] == 0 and summary["work_dir"] is None
    assert [s["command"] for s in summary["steps"]] == [
        "gather", "license-info", "requests", "upload", "send", "confirm"]
    assert edge.licenses() == {} and w.ledger_.free("E-100", "bacnet") == 5
    # the same work folder again: only what this run made is uploaded; old receipts ride along
    w.online("assign", "--entitlement", "E-100", "--device", edge.device_id,
             "--feature", "bacnet=2")
    out = w.online("activate", *w.server_args(), "--work-dir", "work").stdout
    assert out.count("ok      request device") == 1
    assert f"ok      request device {edge.device_id[:12]}…: response: sequence 2 -> 3: " \
        f"add bacnet=2" in out
    assert "rode along: 1 already confirmed" in out
    assert edge.licenses() == {"bacnet": 2} and installed(w)["edge-1"] == {"bacnet": 2}


def test_a_server_that_goes_away_before_send_is_listed_and_a_rerun_completes(
        lws: WorkSite) -> None:
    w = lws
    assign_all(w)
    toml = w.write_toml()
    w.run("gather", "--servers", toml, "--out", "site.info")
    w.online("license-info", "--site-info", "site.info", "--out", "li.cbor")
    w.run("requests", "--license-info", "li.cbor", "--servers", toml, "--out-dir", "requests")
    w.online("upload", "--requests", "requests", "--out-dir", "responses")
    asp = w.by_name("asp-1")
    before = asp.device.store_bytes()
    asp.stop()
    p = w.run("send", "--responses", "responses", *w.server_args(), "--receipts-out",
              "receipts", code=PARTIAL)
    rows = result_table(p.stdout)
    assert f"{asp.url} - FAILED transport: cannot connect" in rows[asp.url]
    for s in w.servers[1:]:
        assert "applied sequence 0 -> 1" in rows[s.url]
    # asp-1's response is not sent either: listed as missed
    assert "partial: 2 of 4 not done" in p.stdout
    assert "missed not sent: no server given answered" in rows[f"{asp.device_id}.resp"]
    assert asp.device.store_bytes() == before and asp.device.leftovers() == []
    assert (w.root / "responses" / f"{asp.device_id}.resp").exists()  # nothing lost
    assert not (w.root / "receipts" / f"{asp.device_id}.receipt").exists()
    asp.restart(w.stick)
    out = w.run("send", "--responses", "responses", *w.server_args(), "--receipts-out",
                "receipts").stdout
    rows = result_table(out)
    assert rows[asp.url].endswith("applied sequence 0 -> 1: add bacnet")
    assert [rows[s.url].split()[2:4] for s in w.servers[1:]] == [["already", "applied"]] * 2
    assert {s.name: s.licenses() for s in w.servers} == ASSIGNED
    assert "3 confirmed" in w.online("confirm", "--receipts", "receipts").stdout
    assert installed(w) == ASSIGNED


def test_a_response_carried_to_the_wrong_server_is_never_applied(lws: WorkSite) -> None:
    w = lws
    assign_all(w)
    asp, asb = w.by_name("asp-1"), w.by_name("asb-1")
    w.run("gather", *w.server_args(asp), "--out", "site.info")
    w.online("license-info", "--site-info", "site.info", "--out", "li.cbor")
    w.run("requests", "--license-info", "li.cbor", *w.server_args(asp), "--out-dir", "requests")
    w.online("upload", "--requests", "requests", "--out-dir", "responses")
    # asp-1's response, renamed as if it were asb-1's, carried to asb-1
    (w.root / "wrong").mkdir()
    (w.root / "wrong" / f"{asb.device_id}.resp").write_bytes(
        (w.root / "responses" / f"{asp.device_id}.resp").read_bytes())
    before = asb.device.store_bytes()
    out = w.run("send", "--responses", "wrong", *w.server_args(asb), "--receipts-out",
                "receipts", code=PARTIAL).stdout
    assert f"holds the response for device {asp.device_id[:12]}…, not the one its name says" \
        in out
    # nothing sent is no success (issue 13, item 12): both sides listed as missed, exit 10
    assert f"MISSED  {asb.url} device {asb.device_id[:12]}…: no response for this device" in out
    assert result_table(out)[f"{asb.device_id}.resp"] == (
        f"{asb.device_id}.resp {asp.device_id[:12]}… missed not sent: no server given "
        f"answered as device {asp.device_id[:12]}…")
    assert asb.device.store_bytes() == before and asb.licenses() == {}
    assert list((w.root / "receipts").iterdir()) == []
    # forced by hand, the server itself refuses it (exit 5) and stays unchanged
    err = w.run("apply", "--server", asb.url, f"wrong/{asb.device_id}.resp", code=5).stderr
    assert "wrong-device" in err and asb.device.store_bytes() == before
    # carried to the right server it applies
    w.run("send", "--responses", "wrong", *w.server_args(asp), "--receipts-out", "receipts")
    assert asp.licenses() == {"bacnet": 3}


def test_stale_license_information_and_stale_responses_are_refused_losing_nothing(
        lws: WorkSite) -> None:
    w = lws
    activate_all(w)
    asb, asp = w.by_name("asb-1"), w.by_name("asp-1")
    # license information that wants asb-1's bacnet back...
    w.online("assign", "--entitlement", "E-100", "--device", asb.device_id,
             "--feature", "bacnet=0")
    w.run("gather", *w.server_args(asb, asp), "--out", "site.info")
    w.online("license-info", "--site-info", "site.info", "--out", "old-li.cbor")
    # ...goes stale: the reclaim happens another way first
    w.online("reclaim", "--server", asb.url)
    assert asb.licenses() == {"modbus": 1}
    before = asb.device.store_bytes()
    p = w.run("requests", "--license-info", "old-li.cbor", *w.server_args(asb, asp),
              "--out-dir", "requests", code=2)
    assert "usage: cannot reclaim bacnet: not installed on this device" in p.stdout
    assert "skipped" in p.stdout  # asp-1: nothing listed for it
    assert asb.device.store_bytes() == before
    assert not (w.root / "requests" / f"{asb.device_id}.req").exists()
    # a response that the device's own progress made stale is refused at send (exit 6)
    w.online("assign", "--entitlement", "E-100", "--device", asp.device_id,
             "--feature", "modbus=1")
    w.run("gather", *w.server_args(asp), "--out", "site2.info")
    w.online("license-info", "--site-info", "site2.info", "--out", "li2.cbor")
    w.run("requests", "--license-info", "li2.cbor", *w.server_args(asp), "--out-dir", "req2")
    w.online("upload", "--requests", "req2", "--out-dir", "resp2")
    w.online("activate", "--server", asp.url)  # meanwhile asp-1 moves on
    assert asp.licenses() == {"bacnet": 3, "modbus": 1}
    before = asp.device.store_bytes()
    p = w.run("send", "--responses", "resp2", *w.server_args(asp), "--receipts-out", "rc2",
              code=6)
    assert "stale: response builds on sequence 1, but the device is already at 2" in p.stdout
    assert asp.device.store_bytes() == before
    assert (w.root / "resp2" / f"{asp.device_id}.resp").exists()
    # the ledger counted nothing twice
    assert installed(w) == {"asp-1": {"bacnet": 3, "modbus": 1}, "asb-1": {"modbus": 1},
                            "edge-1": {"bacnet": 1}}
    assert w.ledger_.free("E-100", "modbus") == 2 and w.ledger_.free("E-100", "bacnet") == 6
    assert w.ledger_.report()["pending_reclaims"] == []


def test_one_go_with_the_licensing_server_unreachable_keeps_what_it_gathered(
        ws: WorkSite) -> None:
    p = ws.run("activate", *ws.server_args(), "--licensing-server", "http://127.0.0.1:1",
               code=1)
    assert "FAILED  licensing server: transport: cannot connect to the licensing server" \
        in p.stdout
    table = p.stdout[p.stdout.index("STEP "):].splitlines()
    assert table[0].split() == ["STEP", "SERVER", "RESULT", "DETAIL"]
    assert table[1].split()[:5] == ["license-info", "licensing", "server", "FAILED",
                                    "transport:"]
    assert "failed: 1 failure(s), listed above" in p.stdout
    work = Path(p.stdout.rsplit("files of every step are in ", 1)[1].split(";")[0])
    try:
        assert (work / "site-info.cbor").is_file()
        assert "rerun the failed steps with them" in p.stdout
    finally:
        shutil.rmtree(work)
    assert all(s.licenses() == {} for s in ws.servers)


def test_each_server_is_handed_only_its_own_license_information(lws: WorkSite) -> None:
    """Step 2 writes the site's file and, beside it, each server's own (the site's file grows
    with the site and would not fit a frame); step 3 hands a server only its own."""
    from agent.cose import decode_sign1, strict_loads
    from agent.messages import LicenseInfo, decode_payload

    w = lws
    assign_all(w)
    toml = w.write_toml()
    w.run("gather", "--servers", toml, "--out", "site.info")
    out = w.online("license-info", "--site-info", "site.info", "--out", "li.cbor").stdout
    assert "each server's own to li.cbor.d" in out
    own = w.root / "li.cbor.d"
    assert sorted(p.name for p in own.iterdir()) == sorted(f"{s.device_id}.cbor"
                                                          for s in w.servers)
    for s in w.servers:
        env = decode_sign1((own / f"{s.device_id}.cbor").read_bytes(), max_size=1 << 20)
        info = decode_payload(strict_loads(env.payload, max_size=1 << 20), LicenseInfo)
        assert isinstance(info, LicenseInfo)
        assert [e.device_id for e in info.entries] == [s.device_id]
    # a damaged own file reaches only its own server, which refuses it; the others go on
    asb = w.by_name("asb-1")
    path = own / f"{asb.device_id}.cbor"
    good = path.read_bytes()
    path.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    p = w.run("requests", "--license-info", "li.cbor", "--servers", toml, "--out-dir", "r1",
              code=10)
    assert f"FAILED  asb-1 device {asb.device_id[:12]}…: untrusted: signature does not verify" \
        in p.stdout
    assert "ok      asp-1" in p.stdout and "ok      edge-1" in p.stdout
    # another server's file under this server's name: refused before it is sent
    path.write_bytes((own / f"{w.by_name('asp-1').device_id}.cbor").read_bytes())
    p = w.run("requests", "--license-info", "li.cbor", "--servers", toml, "--out-dir", "r2",
              code=10)
    assert "FAILED  asb-1" in p.stdout and "does not match li.cbor" in p.stdout
    path.write_bytes(good)
    w.run("requests", "--license-info", "li.cbor", "--servers", toml, "--out-dir", "r3")


def test_one_go_exit_code_is_the_exit_code_of_all_its_outcomes() -> None:
    """OneGo._final is outcome.exit_code over every step's outcomes, in every case: the rule
    it spelled out (0 when every step is 0; partial when anything succeeded; else the
    first failing step's code) gives the same codes."""
    import itertools
    from typing import Any, cast

    from apps.licadmin.onego import OneGo
    from apps.licadmin.outcome import EXIT_PARTIAL, FAILED, OK, SKIPPED, Outcome, StepResult

    def spelled_out(steps: list[StepResult]) -> int:
        codes = [s.code for s in steps]
        if all(c == 0 for c in codes):
            return 0
        if any(o.status == OK for s in steps for o in s.outcomes):
            return EXIT_PARTIAL
        return next(c for c in codes if c != 0)

    kinds = [(OK, 0), (SKIPPED, 0), (FAILED, 2), (FAILED, 3)]
    step_shapes = [combo for n in range(3) for combo in itertools.product(kinds, repeat=n)]
    none = cast(Any, None)
    cases = 0
    for shape in itertools.product(step_shapes, repeat=2):
        steps = [StepResult(f"step{i}", [Outcome(f"s{j}", status=st, code=c)
                                          for j, (st, c) in enumerate(outs)])
                 for i, outs in enumerate(shape)]
        go = OneGo([], none, none, none, "auto", steps=steps)
        assert go._final() == spelled_out(steps), shape
        cases += 1
    assert cases == 21 * 21

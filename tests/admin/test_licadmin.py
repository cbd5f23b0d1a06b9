"""``licadmin`` as a real subprocess against an https:// listener served by this test process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.cose import SigningKey
from agent.formats import read_device_info, verify_receipt
from agent.identity import HardwareFacts
from agent.messages import Action
from agent.ops import AgentOps
from agent.service import Agent
from hw import listen
from hw.facts import StaticFactsProvider, load_facts_file
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import T0
from tests.support.pki import Pki, make_pki

BIN = Path(sys.executable).parent


@dataclass
class AdminSite:
    root: Path
    vendor: Vendor
    agent: Agent
    pki: Pki
    server: str  # the URL licadmin is given
    env: dict[str, str]

    def run(self, tool: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
        return p

    def admin(self, command: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return self.run("licadmin", command, "--server", self.server, *args, code=code)

    def issue(self, request: str, out: str, *grants: Grant) -> None:
        data = self.vendor.issue((self.root / request).read_bytes(), grants, now=T0)
        (self.root / out).write_bytes(data)


@pytest.fixture
def adm(tmp_path: Path) -> Iterator[AdminSite]:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps({"model": "AS-B", "serial": "SN-ADM-1",
                                 "macs": ["00:80:f4:aa:cc:01"]}))
    vendor = Vendor(SigningKey.generate())
    agent = Agent(tmp_path / "s", load_facts_file(facts), clock=lambda: T0)
    agent.init("AS-B", None, [vendor.public])
    pki = make_pki(tmp_path / "pki")
    lst = listen(f"https://127.0.0.1:0?cert={pki.server_cert}&key={pki.server_key}"
                 f"&ca={pki.ca_cert}", AgentOps(agent))
    lst.start()
    try:
        server = f"{lst.address}?ca={pki.ca_cert}&cert={pki.client_cert}&key={pki.client_key}"
        env = dict(os.environ, LICAGENT_FACTS=str(facts), LICAGENT_TIME=str(T0))
        yield AdminSite(tmp_path, vendor, agent, pki, server, env)
    finally:
        lst.stop()


def test_info_out_is_the_signed_device_information(adm: AdminSite) -> None:
    out = adm.admin("info", "--out", "dev.info").stdout
    device_id = adm.agent.status()["device_id"]
    assert out == f"wrote device information of {device_id} to dev.info\n"
    info = read_device_info((adm.root / "dev.info").read_bytes())
    assert (info.device_id, info.model, info.serial) == (device_id, "AS-B", "SN-ADM-1")
    shown = json.loads(adm.admin("info", "--json").stdout)
    assert shown["device_id"] == device_id and shown["kind"] == "device-info"
    assert not [n for n in os.listdir(adm.root) if ".tmp" in n]


def test_activation_round_trip_and_status_matches_licagent(adm: AdminSite) -> None:
    out = adm.admin("request", "activate", "--feature", "bacnet", "--feature", "modbus",
                    "--out", "r1").stdout
    assert out == "wrote activate request to r1\n"
    adm.issue("r1", "p1", Grant("bacnet", 10, T0 + 86400 * 365), Grant("modbus", 2))
    out = adm.admin("apply", "p1", "--receipt-out", "rc1").stdout
    assert "applied response: sequence 0 -> 1: add bacnet, add modbus" in out
    assert "wrote receipt to rc1" in out
    rc = verify_receipt((adm.root / "rc1").read_bytes(), [adm.vendor.public])
    assert rc.sequence == 1
    assert "already applied" in adm.admin("apply", "p1").stdout
    assert adm.admin("check", "bacnet").stdout.strip()
    adm.admin("check", "not-installed", code=1)
    # an outstanding request too, so that every part of the status is compared
    adm.admin("request", "activate", "--feature", "lon", "--out", "r2")
    remote = json.loads(adm.admin("status", "--json").stdout)
    local = json.loads(adm.run("licagent", "status", "--state", "s", "--json").stdout)
    assert remote == local
    assert remote["sequence"] == 1 and len(remote["outstanding_requests"]) == 1
    text = adm.admin("status").stdout
    assert text.startswith(f"device {local['device_id']} (AS-B), sequence 1")
    assert "bacnet" in text and "outstanding activate request" in text


def test_refusals_keep_licagent_exit_codes(adm: AdminSite, tmp_path: Path) -> None:
    # a response for another device: exit 5
    other = Agent(tmp_path / "other", StaticFactsProvider(HardwareFacts(
        model="AS-B", serial="SN-ADM-2", macs=("00:80:f4:aa:cc:02",))), clock=lambda: T0)
    other.init("AS-B", None, [adm.vendor.public])
    (adm.root / "other.req").write_bytes(other.request(Action.ACTIVATE, ["a"]))
    adm.issue("other.req", "other.resp", Grant("a", 1))
    err = adm.admin("apply", "other.resp", code=5).stderr
    assert err.startswith("licadmin: wrong-device: ") and "response is for device" in err
    # malformed file: 3; a missing local file: 2; reclaim of nothing installed: 2
    (adm.root / "junk").write_bytes(b"\xff\x00junk")
    adm.admin("apply", "junk", code=3)
    assert "no such file" in adm.admin("apply", "nope", code=2).stderr
    adm.admin("request", "reclaim", "--feature", "x", "--out", "r", code=2)
    assert not (adm.root / "r").exists()
    adm.admin("request", "activate", "--out", "no/such/folder/r", code=2)


def test_link_failures_exit_1_with_a_message(adm: AdminSite) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    p = adm.run("licadmin", "status", "--server", f"https://127.0.0.1:{closed}?ca={adm.pki.ca_cert}",
                code=1)
    assert p.stderr.startswith("licadmin: transport: cannot connect to ")
    assert "connection refused" in p.stderr
    with socket.socket() as mute:  # TCP accepted by the backlog, never a TLS answer
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        p = adm.run("licadmin", "check", "--timeout", "0.3", "--server",
                    f"https://127.0.0.1:{mute.getsockname()[1]}?ca={adm.pki.ca_cert}", "x", code=1)
    assert "no answer from" in p.stderr and "within 0.3 s" in p.stderr
    no_cert = adm.server.split("&cert=")[0]
    assert "client certificate" in adm.run("licadmin", "status", "--server", no_cert,
                                           code=1).stderr
    # usage: unknown scheme, unknown option, bad timeout
    assert "unknown link scheme" in adm.run("licadmin", "status", "--server", "gopher://x:1",
                                            code=2).stderr
    assert "bogus" in adm.run("licadmin", "status", "--server", adm.server + "&bogus=1",
                              code=2).stderr
    adm.admin("status", "--timeout", "0", code=2)

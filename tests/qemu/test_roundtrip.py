"""Activation and reclaim with licadmin + licserver on the host, the agent inside the guest.

The same site workflow as `make run` (simulators/site_demo.py): a licensing
server (`licserver serve`, SQLite ledger) and `licadmin activate` / `licadmin
reclaim`, here against one emulated arm64 server reached over its serial
console (a host pty) and over its LAN port forwarded to loopback.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hw.backends.qemu import QemuGuest
from tests.qemu.conftest import GUEST_STATE, GuestAgent

BIN = Path(sys.executable).parent


def tool(*argv: str, expect: int = 0) -> str:
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True,
                       check=False, timeout=600)
    assert p.returncode == expect, f"{argv}: exit {p.returncode}\n{p.stdout}{p.stderr}"
    return p.stdout


@pytest.fixture
def licensing_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    tool("licserver", "keygen", "--out", str(tmp_path / "vendor"))
    tool("licserver", "entitle", "--db", str(tmp_path / "ledger.db"), "--entitlement", "E-1",
         "--product", "AS-P-bundle", "--feature", "bacnet-ip=100", "--feature",
         "trend-log=10")
    tool("licserver", "token", "create", "--db", str(tmp_path / "ledger.db"), "--role",
         "site-admin", "--entitlement", "E-1", "--out", str(tmp_path / "site.token"))
    os.environ["LICADMIN_TOKEN"] = (tmp_path / "site.token").read_text().strip()
    proc = subprocess.Popen([str(BIN / "licserver"), "serve", "--db", str(tmp_path / "ledger.db"),
                             "--key", str(tmp_path / "vendor/vendor.key"), "--port", "0",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    url = ""
    deadline = time.monotonic() + 30
    buf = b""
    while not url and time.monotonic() < deadline:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
            for line in buf.decode().splitlines():
                if line.startswith("serving "):
                    url = line.split()[1]
    assert url, buf
    try:
        yield url, tmp_path / "vendor/vendor.pub"
    finally:
        proc.terminate()
        proc.wait(15)
        proc.stdout.close()
        os.environ.pop("LICADMIN_TOKEN", None)


def test_activation_over_serial_and_reclaim_over_lan(
    licensing_server: tuple[str, Path], tmp_path: Path, qemu_image: Path,
) -> None:
    url, vendor_pub = licensing_server
    guest = QemuGuest(tmp_path / "as-p.img", qemu_image, trust=vendor_pub,
                      serial="AS-P-21480199", console=tmp_path / "console.log")
    guest.start()
    try:
        serial, lan = guest.serial_url, f"{guest.tcp_url}?timeout=15"
        st = json.loads(tool("licadmin", "status", "--server", serial, "--json"))
        device = st["device_id"]
        assert st["sequence"] == 0 and st["licenses"] == []
        tool("licadmin", "assign", "--licensing-server", url, "--entitlement", "E-1",
             "--device", device, "--feature", "bacnet-ip=40", "--feature", "trend-log=5")

        # activation, steps 1-6, over the serial console
        tool("licadmin", "activate", "--server", serial, "--licensing-server", url,
             "--work-dir", str(tmp_path / "activate"), "--timeout", "15")
        tool("licadmin", "check", "--server", lan, "bacnet-ip")
        inside = GuestAgent(guest).status()  # the guest's store, read in the guest
        assert inside["sequence"] == 1
        assert {(x["feature"], x["count"]) for x in inside["licenses"]} == {
            ("bacnet-ip", 40), ("trend-log", 5)}

        # reclaim with confirmation, steps 1-6, over the forwarded LAN port
        tool("licadmin", "assign", "--licensing-server", url, "--entitlement", "E-1",
             "--device", device, "--feature", "bacnet-ip=0", "--feature", "trend-log=0")
        tool("licadmin", "reclaim", "--server", lan, "--licensing-server", url,
             "--work-dir", str(tmp_path / "reclaim"), "--timeout", "15")
        receipts = list((tmp_path / "reclaim/receipts").iterdir())
        assert len(receipts) == 1
        tool("licserver", "verify-receipt", "--trust", str(vendor_pub), str(receipts[0]))
        tool("licadmin", "check", "--server", serial, "bacnet-ip", expect=1)
        inside = GuestAgent(guest).status()
        assert inside["sequence"] == 2 and inside["licenses"] == []
        assert GuestAgent(guest).journal_verifies()
        report = json.loads(tool("licserver", "report", "--db", str(tmp_path / "ledger.db"),
                                 "--json"))
        assert "E-1" in json.dumps(report)
    finally:
        assert guest.stop(), "the guest did not power off cleanly"
    # the store survives a clean shutdown and the next boot
    guest.start()
    try:
        rc, out = guest.run("licagent", "status", "--state", GUEST_STATE, "--json")
        assert rc == 0 and json.loads(out)["sequence"] == 2
    finally:
        guest.stop()


def test_licadmin_boots_the_guest_from_a_qemu_url(tmp_path: Path, qemu_image: Path) -> None:
    tool("licserver", "keygen", "--out", str(tmp_path / "vendor"))
    state = tmp_path / "as-b.img"
    base = f"qemu://arm64?image={qemu_image}&state={state}"
    first = json.loads(tool("licadmin", "status", "--json", "--server",
                            f"{base}&trust={tmp_path}/vendor/vendor.pub&model=AS-B"
                            "&serial=AS-B-33020077&link=serial"))
    assert first["model"] == "AS-B" and first["serial"] == "AS-B-33020077"
    # the same state disk, booted again, over the LAN port: the same server, still bound
    again = json.loads(tool("licadmin", "status", "--json", "--server", f"{base}&link=tcp"))
    assert again["device_id"] == first["device_id"] and again["sequence"] == 0
    tool("licadmin", "check", "--server", f"{base}&link=tcp", "bacnet-ip", expect=1)

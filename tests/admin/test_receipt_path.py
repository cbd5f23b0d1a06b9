"""One receipt path (issue 13, item 13): ``licagent apply --receipt-out`` and ``licadmin send``.

Everything real: ``licserver serve`` on a free loopback port over an SQLite
ledger, ``licagent`` and ``licadmin`` as subprocesses, ``licagent run`` on
127.0.0.1 for ``licadmin send``. A receipt the technician wrote with
``licagent apply --receipt-out`` (under a name of their own) is confirmed by the
licensing server and frees the reclaim, byte for byte the receipt ``licadmin
send`` writes for the same apply; a tampered one, or one the device key signed
that does not prove its reclaim, is refused with the same reason, message and
exit code by ``licserver verify-receipt``, ``licadmin confirm``, the HTTP API
and ``licadmin show --trust``: all of them call ``agent.formats.verify_receipt``.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cose import SigningKey, decode_sign1, sign1, strict_loads
from agent.errors import LicensingError, TrustError
from agent.formats import RECEIPT_MAX, verify_receipt
from agent.messages import Kind, Receipt, decode_payload
from agent.record import replace
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, Site, stop_processes
from tests.simulators.test_licserver_http import BIN, WAIT, Licserver

E, P = "E-13", "BACnet-bundle"


class Tools:
    """The command-line tools in ``root``, with one simulated server's facts and a fixed clock."""

    def __init__(self, root: Path, facts: Path) -> None:
        self.root = root
        self.env = dict(os.environ, LICAGENT_FACTS=str(facts), LICAGENT_TIME=str(T0),
                        LICSERVER_TIME=str(T0))
        self.procs: list[subprocess.Popen[bytes]] = []

    def __call__(self, tool: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == code, (tool, args, p.returncode, p.stdout, p.stderr)
        assert "Traceback" not in p.stderr
        return p

    def daemon(self, state: Path) -> str:
        """``licagent run`` on a free loopback port; its URL once it listens."""
        proc = subprocess.Popen([str(BIN / "licagent"), "run", "--state", str(state),
                                 "--listen", "tcp://127.0.0.1:0"], cwd=self.root, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        assert proc.stdout is not None
        buf, deadline = b"", time.monotonic() + WAIT
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, "licagent run printed nothing"
            if select.select([proc.stdout], [], [], left)[0]:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"licagent run exited with {proc.wait(WAIT)}"
                buf += chunk
        line = buf.decode().splitlines()[0]
        assert line.startswith("listening tcp://127.0.0.1:"), line
        return line.split(" ", 1)[1]


@pytest.fixture
def licserver(tmp_path: Path, vendor: Vendor) -> Iterator[Licserver]:
    ls = Licserver(tmp_path, vendor)
    try:
        yield ls
    finally:
        ls.close()


@pytest.fixture
def tools(tmp_path: Path, licserver: Licserver) -> Iterator[Tools]:
    facts = tmp_path / "as-p-01.json"
    facts.write_text(json.dumps({"model": "AS-P", "serial": "SN-RCPT-1",
                                 "macs": ["00:80:f4:13:00:01"]}))
    t = Tools(tmp_path, facts)
    try:
        yield t
    finally:
        stop_processes(t.procs, WAIT)


def _receipt(data: bytes) -> Receipt:
    env = decode_sign1(data, max_size=1 << 20)
    return decode_payload(strict_loads(env.payload, max_size=1 << 20), Receipt)


def test_receipt_from_licagent_apply_is_confirmed_like_one_from_send(
        tools: Tools, licserver: Licserver, vendor: Vendor) -> None:
    (tools.root / "vendor.pub").write_bytes(vendor.public.to_pem())
    licserver.run("entitle", "--db", str(licserver.db), "--entitlement", E, "--product", P,
                  "--feature", "bacnet=10", "--until", "2027-12-31")
    _proc, url = licserver.start()
    tools.env["LICADMIN_TOKEN"] = licserver.token
    tools("licagent", "init", "--state", "as-p-01", "--model", "AS-P", "--trust", "vendor.pub")
    dev = json.loads(tools("licagent", "status", "--state", "as-p-01", "--json").stdout)[
        "device_id"]
    for d in ("requests", "requests2", "mine", "bad"):
        (tools.root / d).mkdir()

    # activation, then the reclaim whose receipt is the proof the ledger waits for
    tools("licadmin", "assign", "--licensing-server", url, "--entitlement", E, "--device", dev,
          "--feature", "bacnet=10")
    tools("licagent", "request", "--state", "as-p-01", "activate", "--feature", "bacnet",
          "--out", "requests/as-p-01.req")
    tools("licadmin", "upload", "--requests", "requests", "--licensing-server", url,
          "--out-dir", "responses")
    tools("licagent", "apply", "--state", "as-p-01", f"responses/{dev}.resp",
          "--receipt-out", "mine/as-p-01.activate.receipt")
    tools("licadmin", "assign", "--licensing-server", url, "--entitlement", E, "--device", dev,
          "--feature", "bacnet=0")
    tools("licagent", "request", "--state", "as-p-01", "reclaim", "--feature", "bacnet",
          "--out", "requests2/as-p-01.req")
    tools("licadmin", "upload", "--requests", "requests2", "--licensing-server", url,
          "--out-dir", "responses2")
    tools("licagent", "apply", "--state", "as-p-01", f"responses2/{dev}.resp",
          "--receipt-out", "mine/as-p-01.reclaim.receipt")
    mine = (tools.root / "mine/as-p-01.reclaim.receipt").read_bytes()
    report = json.loads(licserver.run("report", "--db", str(licserver.db), "--json"))
    assert [r["device_id"] for r in report["pending_reclaims"]] == [dev]

    # licadmin send of the same response through the daemon writes the very same receipt
    server = tools.daemon(tools.root / "as-p-01")
    out = tools("licadmin", "send", "--responses", "responses2", "--server", server,
                "--receipts-out", "sent").stdout
    assert "already applied" in out
    assert (tools.root / "sent" / f"{dev}.receipt").read_bytes() == mine

    # tampered: a flipped bit, and a receipt the device key signed that hides the reclaim
    flipped = bytearray(mine)
    flipped[-3] ^= 0x40
    key = SigningKey.from_pem((tools.root / "as-p-01/device.key").read_bytes())
    rc = _receipt(mine)
    assert [lic.feature for lic in rc.removed] == ["bacnet"]
    forged = sign1(replace(rc, removed=()).encode(), key, Kind.RECEIPT.content_type)
    client = licserver.client(url)
    big = mine + bytes(RECEIPT_MAX + 1 - len(mine))
    for name, data, code, reason, message in [
        ("flipped", bytes(flipped), 4, "untrusted", "signature does not verify"),
        ("forged", forged, 4, "untrusted",
         "receipt does not prove the removals the response asked for"),
        ("padded", mine + b"\0", 3, "malformed", "1 trailing bytes after the CBOR item"),
        ("big", big, 3, "malformed",
         f"input is {RECEIPT_MAX + 1} bytes, larger than the {RECEIPT_MAX}-byte limit"),
    ]:
        path = tools.root / "bad" / f"{name}.receipt"
        for old in (tools.root / "bad").iterdir():
            old.unlink()
        path.write_bytes(data)
        with pytest.raises(LicensingError, match=re.escape(message)) as caught:
            verify_receipt(data, [vendor.public])
        assert (caught.value.exit_code, caught.value.reason) == (code, reason)
        err = tools("licserver", "verify-receipt", "--trust", "vendor.pub", str(path),
                    code=code).stderr
        assert err.strip() == f"licserver: {reason}: {message}"
        out = tools("licadmin", "confirm", "--verbose", "--receipts", "bad", "--licensing-server", url,
                    code=code).stdout
        assert f"{name}.receipt: {reason}: {message}" in out
        answer = client.confirm([data])
        assert answer.accepted == []
        assert [(r["code"], r["reason"], r["message"]) for r in answer.refused] == [
            (code, reason, message)]
        if code == 4:  # show describes what decodes; the signature verdict is verify_receipt's
            shown = tools("licadmin", "show", str(path), "--trust", "vendor.pub", "--json",
                          code=4).stdout
            assert message in json.loads(shown)["signature"]["detail"]
    # nothing of it reached the ledger
    report = json.loads(licserver.run("report", "--db", str(licserver.db), "--json"))
    assert [r["device_id"] for r in report["pending_reclaims"]] == [dev]

    # the genuine ones, as licagent wrote them: verified, confirmed, the reclaim freed
    ok = tools("licserver", "verify-receipt", "--trust", "vendor.pub",
               "mine/as-p-01.reclaim.receipt").stdout
    assert f"genuine receipt from device {dev}: sequence 2, removed bacnet=10" in ok
    out = tools("licadmin", "confirm", "--verbose", "--receipts", "mine", "--licensing-server", url).stdout
    assert "freed bacnet=10" in out and "2 receipt(s) from mine" in out
    report = json.loads(licserver.run("report", "--db", str(licserver.db), "--json"))
    assert report["pending_reclaims"] == []
    (feature,) = report["entitlements"][0]["products"][0]["features"]
    assert (feature["assigned"], feature["used"], feature["free"]) == (0, 0, 10)
    # ... and send's copy is now the same receipt the ledger has seen: accepted once only
    again = tools("licadmin", "confirm", "--verbose", "--receipts", "sent", "--licensing-server", url).stdout
    assert "accepted before" in again


def test_send_refuses_a_receipt_that_does_not_carry_the_response_it_sent(
        site: Site, tmp_path: Path) -> None:
    """licadmin's own check is the same function, anchored on the exact response it sent."""
    a = site.device()
    resp = a.activate(bacnet=1)
    receipt = a.agent.state()[0].last_receipt
    assert receipt is not None
    assert verify_receipt(receipt, response=resp).device_id == a.agent.state()[0].device_id
    other = site.device().activate(bacnet=2)
    with pytest.raises(TrustError, match="does not carry the response file that was sent"):
        verify_receipt(receipt, response=other)

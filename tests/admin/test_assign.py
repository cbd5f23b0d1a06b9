"""``licadmin assign`` in bulk against a real ``licserver serve`` (issue 13, item 14).

Every call is a real process: ``licserver keygen``, ``entitle`` and ``serve`` on a
free loopback port, ``licadmin assign`` with ``--device``, a CSV or a SITE_INFO file.
The server logs one line per HTTP exchange on stderr, which is how the tests see that
300 assignments travel in ONE request; the ledger's operations count shows ONE
transaction. Entitlement and product names are free text as vendors write them.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.formats import SiteInfo
from tests.conftest import Site

BIN = Path(sys.executable).parent
WAIT = 60.0  # an upper bound for a process; never asserted as a time
ENT = "PO 4711 (Plant 3, hall A)"
PROD = "EcoStruxure BMS Pro (perpetual)"


def run(cwd: Path, *argv: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True,
                       text=True, timeout=WAIT, check=False)
    assert p.returncode == code, (argv, p.returncode, p.stdout, p.stderr)
    return p


@dataclass
class LicServer:
    root: Path
    proc: subprocess.Popen[bytes]
    url: str

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(run(self.root, "licserver", "report", "--db",
                                             "ledger.db", "--json").stdout)
        return out

    def assign(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return run(self.root, "licadmin", "assign", "--licensing-server", self.url,
                   "--token-file", "vendor-admin.token", *args, code=code)

    def stop(self) -> str:
        """SIGTERM; the server's stderr (one line per exchange)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        _out, err = self.proc.communicate(timeout=WAIT)
        return err.decode()


@pytest.fixture
def licserver(tmp_path: Path) -> Iterator[LicServer]:
    run(tmp_path, "licserver", "keygen", "--out", "vendor")
    run(tmp_path, "licserver", "entitle", "--db", "ledger.db", "--entitlement", ENT,
        "--product", PROD, "--feature", "bacnet-ip=1000", "--feature", "trend-log=300")
    run(tmp_path, "licserver", "token", "create", "--db", "ledger.db", "--role", "vendor-admin",
        "--out", "vendor-admin.token")
    proc = subprocess.Popen([str(BIN / "licserver"), "serve", "--db", "ledger.db", "--key",
                             "vendor/vendor.key", "--port", "0"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    srv = LicServer(tmp_path, proc, line.split()[1] if line.startswith("serving ") else "")
    try:
        assert srv.url.startswith("http://127.0.0.1:"), line
        yield srv
    finally:
        srv.stop()


def device_ids(n: int) -> list[str]:
    return [secrets.token_hex(32) for _ in range(n)]


def write_csv(path: Path, rows: list[str]) -> None:
    path.write_text("device,feature=count\n# one server a row\n" + "\n".join(rows) + "\n")


def exchanges(stderr: str, path: str) -> int:
    return sum(1 for line in stderr.splitlines() if f" POST {path} " in line)


def test_300_assignments_from_a_csv_in_one_request_and_one_transaction(
        tmp_path: Path, licserver: LicServer) -> None:
    devs = device_ids(150)
    write_csv(tmp_path / "site.csv", [f"{d},bacnet-ip=5,trend-log=2" for d in devs])
    ops_before = licserver.report()["operations"]
    t0 = time.monotonic()
    out = licserver.assign("--entitlement", ENT, "--devices-from", "site.csv").stdout
    took = time.monotonic() - t0  # reported by tests/bench, never asserted here
    assert out.splitlines() == [
        f"assigned bacnet-ip to 150 device(s), 750 in all, of entitlement {ENT} ({PROD}); "
        "250 left unassigned",
        f"assigned trend-log to 150 device(s), 300 in all, of entitlement {ENT} ({PROD}); "
        "0 left unassigned",
        "300 assignment(s) for 150 device(s), made in one transaction"], took
    rep = licserver.report()
    assert len(rep["assignments"]) == 300
    assert {a["device_id"] for a in rep["assignments"]} == set(devs)
    assert rep["operations"] == ops_before + 1  # one ledger transaction
    feats = {f["feature"]: f for f in rep["entitlements"][0]["products"][0]["features"]}
    assert (feats["bacnet-ip"]["assigned"], feats["bacnet-ip"]["free"]) == (750, 250)
    assert (feats["trend-log"]["assigned"], feats["trend-log"]["free"]) == (300, 0)
    assert exchanges(licserver.stop(), "/v1/assignments") == 1  # one HTTP request


def test_one_assignment_too_many_refuses_all_and_names_it(
        tmp_path: Path, licserver: LicServer) -> None:
    devs = device_ids(201)
    write_csv(tmp_path / "site.csv", [f"{d},bacnet-ip=5" for d in devs])  # 1005 > 1000
    before = licserver.report()
    p = licserver.assign("--entitlement", ENT, "--devices-from", "site.csv", code=6)
    assert p.stdout == ""
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith(f"licadmin: not-entitled: assignment #201 of 201 (device "
                               f"{devs[200][:12]}…, bacnet-ip=5): entitlement {ENT} ({PROD}) "
                               "holds 1000 of bacnet-ip; 1000 are used by other devices")
    assert "none of the 201 assignments was made" in p.stderr
    after = licserver.report()
    assert after["assignments"] == before["assignments"] == []
    assert after["entitlements"] == before["entitlements"]
    assert after["operations"] == before["operations"] + 1  # the refusal is recorded


def test_site_info_assigns_every_gathered_server_and_reports_the_others(
        tmp_path: Path, licserver: LicServer, site: Site) -> None:
    devices = [site.device() for _ in range(3)]
    infos = [d.agent.info()[0] for d in devices]
    ids = [str(d.agent.status()["device_id"]) for d in devices]
    bundle = SiteInfo("Plant 3", 1_800_000_000, (*infos, infos[0]),  # one gathered twice
                      (("tcp://10.1.4.99:7700", "connection refused"),))
    (tmp_path / "site-info.cbor").write_bytes(bundle.encode())
    p = licserver.assign("--entitlement", ENT, "--devices-from", "site-info.cbor",
                         "--feature", "bacnet-ip=10", "--json", code=10)
    j = json.loads(p.stdout)
    assert j["exit_code"] == 10
    assert [a["device_id"] for a in j["assignments"]] == ids
    assert j["not_gathered"] == [{"server": "tcp://10.1.4.99:7700",
                                  "error": "connection refused"}]
    assert len(licserver.report()["assignments"]) == 3
    text = licserver.assign("--entitlement", ENT, "--devices-from", "site-info.cbor",
                            "--feature", "bacnet-ip=12", code=10).stdout
    assert "3 assignment(s) for 3 device(s), made in one transaction" in text
    assert "partial: 1 server(s) of the SITE_INFO file were not gathered" in text
    assert "tcp://10.1.4.99:7700 (connection refused)" in text


def test_a_forged_device_file_in_site_info_refuses_the_whole_command(
        tmp_path: Path, licserver: LicServer, site: Site) -> None:
    infos = [site.device().agent.info()[0] for _ in range(2)]
    forged = bytearray(infos[1])
    forged[-5] ^= 0x01  # inside the signature
    (tmp_path / "si.cbor").write_bytes(SiteInfo("x", 1, (infos[0], bytes(forged))).encode())
    p = licserver.assign("--entitlement", ENT, "--devices-from", "si.cbor", "--feature",
                         "bacnet-ip=1", code=4)
    assert p.stderr.count("\n") == 1 and "device-information file #2" in p.stderr
    assert "si.cbor" in p.stderr
    assert licserver.report()["assignments"] == []


@pytest.mark.parametrize(("content", "args", "code", "message"), [
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary", (), 3, "neither a SITE_INFO file"),
    (b"0123,bacnet-ip=1\n", (), 3, "line 1: '0123' is not a device ID"),
    (b"%s\n" % secrets.token_hex(32).encode(), (), 2, "has no FEATURE=COUNT"),
    (b"%s,bacnet-ip=many\n" % secrets.token_hex(32).encode(), (), 2,
     "expected FEATURE=COUNT"),
    (b"%s,bacnet-ip=1\n" % secrets.token_hex(32).encode(), ("--feature", "x=1"), 2,
     "leave --feature out"),
    (b"# nothing\n\n", (), 2, "no DEVICE_ID,FEATURE=COUNT row"),
    (b"\xa1\x01\x02", (), 3, "not a SITE_INFO file"),
])
def test_bad_device_files_get_one_line_and_change_nothing(
        tmp_path: Path, licserver: LicServer, content: bytes, args: tuple[str, ...],
        code: int, message: str) -> None:
    (tmp_path / "in.csv").write_bytes(content)
    p = licserver.assign("--entitlement", ENT, "--devices-from", "in.csv", *args, code=code)
    assert p.stderr.count("\n") == 1 and message in p.stderr, p.stderr
    assert "Traceback" not in p.stderr and "in.csv" in p.stderr
    assert licserver.report()["assignments"] == []


def test_a_device_and_feature_twice_in_one_command_is_refused(
        tmp_path: Path, licserver: LicServer) -> None:
    d = device_ids(2)
    write_csv(tmp_path / "dup.csv", [f"{d[0]},bacnet-ip=1", f"{d[1]},bacnet-ip=1",
                                     f"{d[0]},bacnet-ip=3"])
    p = licserver.assign("--entitlement", ENT, "--devices-from", "dup.csv", code=2)
    assert "assignment #3 of 3" in p.stderr and "the same device and feature as " \
        "assignment #1" in p.stderr
    assert licserver.report()["assignments"] == []


def test_free_text_names_are_accepted_as_written_and_hostile_ones_refused(
        tmp_path: Path, licserver: LicServer) -> None:
    name = "Rahmenvertrag Süd (2026/27) \u2013 Los 3"
    run(tmp_path, "licserver", "entitle", "--db", "ledger.db", "--entitlement", name,
        "--product", "Edge Server Standard (subscription, 3 yr)", "--feature", "modbus=4")
    dev = device_ids(1)[0]
    out = licserver.assign("--entitlement", name, "--device", dev, "--feature",
                           "modbus=4").stdout
    assert out == (f"assigned modbus=4 of entitlement {name} (Edge Server Standard "
                   f"(subscription, 3 yr)) to device {dev}; 0 left unassigned\n")
    text = run(tmp_path, "licserver", "report", "--db", "ledger.db").stdout
    assert f"  {name} / Edge Server Standard (subscription, 3 yr)" in text
    for bad, why in [("x" * 129, "129 characters long: at most 128"),
                     ("PO 1\nforged line", "U+000A"),
                     ("PO \u202egnp.exe", "U+202E"),
                     (" PO 1", "starts or ends with a space"),
                     ("   ", "is empty")]:
        for flag in ("--entitlement", "--product"):
            argv = {"--entitlement": bad, "--product": "P"} if flag == "--entitlement" \
                else {"--entitlement": "E", "--product": bad}
            p = run(tmp_path, "licserver", "entitle", "--db", "ledger.db", *[
                x for k, v in argv.items() for x in (k, v)], "--feature", "a=1", code=2)
            assert p.stderr.count("\n") == 1 and why in p.stderr, p.stderr
        p = licserver.assign("--entitlement", bad, "--device", dev, "--feature", "modbus=1",
                             code=2)
        assert p.stderr.count("\n") == 1 and why in p.stderr, p.stderr
    assert len(licserver.report()["entitlements"]) == 2  # nothing was recorded


def test_the_batch_body_is_checked_like_the_single_one(licserver: LicServer) -> None:
    import http.client

    host, port = licserver.url.removeprefix("http://").split(":")
    token = (licserver.root / "vendor-admin.token").read_text().strip()

    def post(body: bytes) -> tuple[int, dict[str, Any]]:
        conn = http.client.HTTPConnection(host, int(port), timeout=WAIT)
        try:
            conn.request("POST", "/v1/assignments", body=body,
                         headers={"Content-Type": "application/json",
                                  "Authorization": f"Bearer {token}"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    dev = device_ids(1)[0]
    st, ans = post(json.dumps({"assignments": [
        {"entitlement": ENT, "device_id": dev, "feature": "bacnet-ip", "count": 2}]}).encode())
    assert st == 200 and ans["assignments"][0]["free"] == 998
    st, ans = post(b'{"assignments": []}')
    assert st == 400 and "nothing to assign" in ans["message"]
    st, ans = post(json.dumps({"assignments": [
        {"entitlement": ENT, "device_id": dev, "feature": "bacnet-ip", "count": 2},
        {"entitlement": ENT, "device_id": dev, "feature": "trend-log"}]}).encode())
    assert st == 400 and ans["message"].startswith("assignment #2: the body of assignments "
                                                   "lacks count")
    st, ans = post(json.dumps({"assignments": [
        {"entitlement": ENT, "device_id": dev, "feature": "trend-log", "count": "3"}]}).encode())
    assert st == 400 and ans["reason"] == "usage"
    assert [a["count"] for a in licserver.report()["assignments"]] == [2]


def test_any_devices_file_is_read_or_refused_with_one_of_the_projects_errors(
        tmp_path: Path) -> None:
    """Fuzz the --devices-from reader: bytes, CSV-like text and CBOR maps alike."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from agent.errors import LicensingError
    from apps.licadmin.assign import plan

    dev = "ab" * 32
    csv_like = st.lists(st.sampled_from([dev, "device", "#", ",", "=", "bacnet-ip=3", "x=",
                                         "\n", "\r\n", '"', " ", "\x00", "é", "=9" * 3]),
                        max_size=30).map(lambda parts: "".join(parts).encode())
    cbor_like = st.binary(max_size=64).map(lambda b: b"\xa5" + b)
    path = tmp_path / "devices"

    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(st.one_of(st.binary(max_size=200), csv_like, cbor_like),
           st.sampled_from([(), ("bacnet-ip=1",)]))
    def check(data: bytes, feats: tuple[str, ...]) -> None:
        path.write_bytes(data)
        try:
            p = plan("E", None, [], str(path), feats)
        except LicensingError as err:
            assert "\n" not in str(err).strip()
            return
        assert p.assignments and all(a.device_id == dev for a in p.assignments)

    check()

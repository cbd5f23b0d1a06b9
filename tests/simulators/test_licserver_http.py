"""The licensing server's HTTP API (docs/licensing-api.md): in a thread, and as ``licserver serve``.

Everything is real: an SQLite ledger file, an HTTP server on 127.0.0.1,
devices with their own stores, and ``licserver`` subprocesses that are
stopped, killed and restarted on the same ledger between upload and confirm.
"""

from __future__ import annotations

import http.client
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.cose import canonical
from agent.messages import Action, LicenseInfo, Response
from agent.rpc import RemoteError, TransportError
from apps.licensing_client import LicensingClient
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.server import LicensingServer, ServerLimits, serve
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, Device, Site, stop_processes
from tests.simulators.test_ledger import payload, site_info

BIN = Path(sys.executable).parent
WAIT = 20.0  # an upper bound for start-up and shutdown; never asserted as a time
E, P = "ORDER-7", "BMS-Pro"


#: the vendor-admin token of each running test server, by port (see :func:`serving`)
TOKENS: dict[int, str] = {}
ANONYMOUS = ""


def serving(led: Ledger, vendor: Vendor, **kw: Any) -> LicensingServer:
    """``serve`` with a vendor-admin token made in its ledger, used by :func:`raw` and
    :func:`admin_client`."""
    token = led.create_token(f"vendor-{len(TOKENS)}", "vendor-admin")
    srv = serve(led, vendor, **kw)
    TOKENS[srv.port] = token
    return srv


def admin_client(srv: LicensingServer) -> LicensingClient:
    return LicensingClient(srv.url, token=TOKENS[srv.port])


@pytest.fixture
def server(ledger_db: str, vendor: Vendor) -> Iterator[tuple[Ledger, LicensingServer]]:
    """The server in a thread over a ledger on each backend (SQLite, PostgreSQL)."""
    led = Ledger(ledger_db, vendor, clock=lambda: T0)
    with serving(led, vendor) as srv:
        yield led, srv
    led.close()


@pytest.fixture
def client(server: tuple[Ledger, LicensingServer]) -> LicensingClient:
    return admin_client(server[1])


def dev_id(d: Device) -> str:
    return str(d.agent.status()["device_id"])


def raw(srv: LicensingServer, method: str, path: str, body: bytes | None = None,
        headers: dict[str, str] | None = None, token: str | None = None
        ) -> tuple[int, dict[str, str], bytes]:
    """One exchange, with the server's vendor-admin token unless ``token`` is given
    (:data:`ANONYMOUS`: none)."""
    token = TOKENS[srv.port] if token is None else token
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=WAIT)
    try:
        conn.request(method, path, body=body, headers=sent)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


# ---------------------------------------------------------------- the workflow over HTTP


def test_every_endpoint_through_the_client(client: LicensingClient, site: Site) -> None:
    a, b = site.device(), site.device()
    assert client.health() == {"ok": True}
    ent = client.entitle(E, P, {"bacnet": 5, "modbus": 1}, until="2027-12-31")
    assert ent["products"][0]["features"][0] == {
        "feature": "bacnet", "count": 5, "until": "2027-12-31T23:59:59Z", "assigned": 0,
        "used": 0, "free": 5}
    assert client.assign(E, dev_id(a), "bacnet", 3)["free"] == 2
    client.assign(E, dev_id(b), "modbus", 1)

    # step 2: license information for the gathered servers
    li = client.license_info(site_info(a.agent.info()[0], b.agent.info()[0]))
    info = payload(li, LicenseInfo)
    assert {e.device_id: [x.feature for x in e.install] for e in info.entries} == {
        dev_id(a): ["bacnet"], dev_id(b): ["modbus"]}
    assert a.agent.features_from_license_info(li, Action.ACTIVATE) == ["bacnet"]
    only_b = payload(client.license_info(site_info(a.agent.info()[0], b.agent.info()[0]),
                                         [dev_id(b)]), LicenseInfo)
    assert [e.device_id for e in only_b.entries] == [dev_id(b)]

    # step 4: upload both requests, get both responses; step 5-6: apply and confirm
    reqs = [d.request(Action.ACTIVATE, d.agent.features_from_license_info(li, Action.ACTIVATE))
            for d in (a, b)]
    up = client.upload(reqs)
    assert set(up["responses"]) == {dev_id(a), dev_id(b)} and up["errors"] == {}
    receipts = [d.agent.apply(up["responses"][dev_id(d)])[0].receipt for d in (a, b)]
    out = client.confirm(receipts)
    assert sorted(x["device_id"] for x in out["accepted"]) == sorted([dev_id(a), dev_id(b)])
    assert out["refused"] == []

    # a reclaim; its receipt rides along with the next upload
    client.assign(E, dev_id(a), "bacnet", 0)
    rq = a.request(Action.RECLAIM)
    resp = client.upload([rq])["responses"][dev_id(a)]
    assert [c.op.value for c in payload(resp, Response).changes] == ["remove"]
    rc = a.agent.apply(resp)[0].receipt
    rep = client.report()
    assert [(p["feature"], p["count"]) for p in rep["pending_reclaims"]] == [("bacnet", 3)]
    assert rep["entitlements"][0]["products"][0]["features"][0]["free"] == 2
    up = client.upload([], [rc, rc])
    assert up["responses"] == {} and up["errors"] == {}
    assert up["receipts"]["accepted"] == [
        {"device_id": dev_id(a), "sequence": 2, "freed": [{"feature": "bacnet", "count": 3}]}]
    assert [(r["index"], r["code"], r["reason"]) for r in up["receipts"]["refused"]] == [
        (1, 6, "replay")]
    rep = client.report()
    assert rep["pending_reclaims"] == [] and rep["installed"].get(dev_id(a)) is None
    assert rep["installed"][dev_id(b)][0]["feature"] == "modbus"
    assert rep["entitlements"][0]["products"][0]["features"][0]["free"] == 5
    assert rep["operations"] > 10


def test_refusals_carry_the_exit_codes(server: tuple[Ledger, LicensingServer],
                                       client: LicensingClient, site: Site) -> None:
    _led, srv = server
    a, b = site.device(), site.device()
    client.entitle(E, P, {"bacnet": 2})
    client.assign(E, dev_id(a), "bacnet", 2)
    with pytest.raises(RemoteError) as exc:
        client.assign(E, dev_id(b), "bacnet", 1)
    assert (exc.value.exit_code, exc.value.reason) == (6, "not-entitled")
    status, _h, body = raw(srv, "POST", "/v1/assignments", json.dumps(
        {"entitlement": E, "device_id": dev_id(b), "feature": "bacnet", "count": 1}).encode())
    assert status == 409 and json.loads(body)["code"] == 6
    with pytest.raises(RemoteError) as exc:
        client.assign("NOPE", dev_id(b), "bacnet", 1)
    assert exc.value.exit_code == 2

    # a request that does not verify, and one with nothing to activate: errors, not a failure
    bad = bytearray(a.request(Action.ACTIVATE))
    bad[-1] ^= 1
    up = client.upload([bytes(bad), b.request(Action.ACTIVATE), b"\x00"])
    assert up["responses"] == {}
    assert {k: (v["code"], v["reason"]) for k, v in up["errors"].items()} == {
        "#0": (4, "untrusted"), dev_id(b): (2, "usage"), "#2": (3, "malformed")}
    out = client.confirm([b"\xa0", bytes(bad)])
    assert [(r["index"], r["code"]) for r in out["refused"]] == [(0, 3), (1, 3)]
    with pytest.raises(RemoteError) as exc:
        client.license_info(site_info(bytes(bad)))
    assert exc.value.exit_code == 3

    cases: list[tuple[str, str, bytes | None, dict[str, str], int, int]] = [
        ("GET", "/v1/nothing", None, {}, 404, 2),
        ("GET", "/v1/requests", None, {}, 405, 2),
        ("POST", "/v1/report", b"{}", {}, 405, 2),
        ("POST", "/v1/requests", b"\xff", {}, 400, 3),
        ("POST", "/v1/requests", canonical({"requests": "x"}), {}, 400, 3),
        ("POST", "/v1/requests", canonical({"requests": [], "extra": 1}), {}, 400, 2),
        ("POST", "/v1/receipts", canonical({}), {}, 400, 2),
        ("POST", "/v1/assignments", b"not json", {}, 400, 3),
        ("POST", "/v1/assignments", b'{"entitlement": "E"}', {}, 400, 2),
        ("POST", "/v1/entitlements", json.dumps(
            {"entitlement": E, "product": P, "features": {"x": 1}, "until": "soon"}).encode(),
         {}, 400, 2),
        ("POST", "/v1/license-info", canonical({"site_info": "text"}), {}, 400, 3),
        ("POST", "/v1/receipts", b"x" * 10, {"Content-Length": "-1"}, 400, 2),
    ]
    for method, path, sent, headers, status, code in cases:
        st, hdrs, answer = raw(srv, method, path, sent, headers)
        err = json.loads(answer)
        assert (st, err["code"]) == (status, code), (method, path, err)
        assert hdrs["Content-Type"] == "application/json" and err["message"]
    _st, hdrs, _ = raw(srv, "GET", "/v1/requests")
    assert hdrs["Allow"] == "POST"
    # no Content-Length at all
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=WAIT)
    conn.putrequest("POST", "/v1/receipts")
    conn.putheader("Authorization", f"Bearer {TOKENS[srv.port]}")
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 411 and json.loads(resp.read())["code"] == 2
    conn.close()


def test_body_size_caps(tmp_path: Path, vendor: Vendor) -> None:
    led = Ledger(tmp_path / "l.db", vendor, clock=lambda: T0)
    limits = ServerLimits(max_json_body=100, max_files_body=1000, max_files=2,
                          max_assignments_body=100)
    with serving(led, vendor, limits=limits) as srv:
        st, _h, data = raw(srv, "POST", "/v1/receipts", canonical({"receipts": [b"x" * 2000]}))
        assert st == 413 and json.loads(data)["reason"] == "too-large"
        st, _h, data = raw(srv, "POST", "/v1/assignments", b" " * 101)
        assert st == 413
        st, _h, data = raw(srv, "POST", "/v1/entitlements", b" " * 101)
        assert st == 413
        st, _h, data = raw(srv, "POST", "/v1/receipts", canonical({"receipts": [b""] * 3}))
        assert st == 400 and "at most 2" in json.loads(data)["message"]
        assert admin_client(srv).health() == {"ok": True}
    led.close()


def test_concurrent_uploads_are_each_answered(client: LicensingClient, site: Site) -> None:
    devices = [site.device() for _ in range(6)]
    client.entitle(E, P, {"bacnet": 6})
    for d in devices:
        client.assign(E, dev_id(d), "bacnet", 1)
    reqs = [d.request(Action.ACTIVATE) for d in devices]
    answers: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def upload(req: bytes) -> None:
        try:
            answers.append(client.upload([req]))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=upload, args=(r,)) for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert errors == [] and len(answers) == 6
    answered = {dev for ans in answers for dev in ans["responses"]}
    assert answered == {dev_id(d) for d in devices}
    assert all(ans["errors"] == {} for ans in answers)
    assert client.report()["open_responses"] == 6


def test_client_explains_an_unreachable_server(server: tuple[Ledger, LicensingServer]) -> None:
    _led, srv = server
    url = srv.url
    srv.close()
    with pytest.raises(TransportError, match="connection refused"):
        LicensingClient(url).health()
    with pytest.raises(Exception, match="expected http"):
        LicensingClient("ftp://x")


# ---------------------------------------------------------------- licserver as a process


class Licserver:
    """``licserver`` subprocesses on one ledger (a file, or ``db``: a PostgreSQL URL), with a
    vendor key on disk."""

    def __init__(self, root: Path, vendor: Vendor, db: str | None = None) -> None:
        self.root = root
        self.db = db or str(root / "ledger.db")
        self.key = root / "vendor.key"
        self.key.write_bytes(vendor.key.to_pem())
        self.env = dict(os.environ, LICSERVER_TIME=str(T0))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = root / "licserver.log"
        self._token: str | None = None

    @property
    def token(self) -> str:
        """A vendor-admin token of the ledger (``licserver token create``, made once)."""
        if self._token is None:
            out = self.root / "vendor-admin.token"
            self.run("token", "create", "--db", str(self.db), "--role", "vendor-admin",
                     "--out", str(out))
            self._token = out.read_text().strip()
        return self._token

    def client(self, url: str) -> LicensingClient:
        return LicensingClient(url, token=self.token)

    def run(self, *args: str, code: int = 0) -> str:
        p = subprocess.run([str(BIN / "licserver"), *args], env=self.env, capture_output=True,
                           text=True, timeout=60, check=False)
        assert p.returncode == code, p.stderr
        return p.stdout

    def start(self, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``licserver serve`` on a free port; returns it and its URL once it serves.

        ``extra``: further options (``--cert``, ``--tls-key``)."""
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(
                [str(BIN / "licserver"), "serve", "--db", str(self.db), "--key", str(self.key),
                 "--port", "0", *extra], env=self.env, stdout=subprocess.PIPE, stderr=log)
        self.procs.append(proc)
        assert proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + WAIT
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            assert left > 0, "licserver serve printed nothing"
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                assert chunk, f"licserver exited with {proc.wait(WAIT)}: {self.log.read_text()}"
                buf += chunk
        line = buf.decode().splitlines()[0]
        assert line.startswith(("serving http://127.0.0.1:", "serving https://127.0.0.1:")), line
        return proc, line.split(" ", 1)[1]

    def close(self) -> None:
        stop_processes(self.procs, WAIT)


@pytest.fixture
def licserver(tmp_path: Path, vendor: Vendor, ledger_db: str) -> Iterator[Licserver]:
    """On each backend: an SQLite file, a PostgreSQL database."""
    ls = Licserver(tmp_path, vendor, ledger_db)
    try:
        yield ls
    finally:
        ls.close()


def test_restart_between_upload_and_confirm_keeps_the_ledger(licserver: Licserver,
                                                             site: Site) -> None:
    a, b = site.device(), site.device()
    out = licserver.run("entitle", "--db", str(licserver.db), "--entitlement", E, "--product", P,
                        "--feature", "bacnet=4", "--feature", "modbus=1", "--until", "2027-12-31")
    assert "bacnet now 4 (free 4), until 2027-12-31T23:59:59Z" in out
    licserver.run("entitle", "--db", str(licserver.db), "--entitlement", E, "--product", P,
                  "--feature", "bacnet=x", code=2)

    proc, url = licserver.start()
    client = licserver.client(url)
    client.assign(E, dev_id(a), "bacnet", 4)
    up = client.upload([a.request(Action.ACTIVATE)])
    client.confirm([a.agent.apply(up["responses"][dev_id(a)])[0].receipt])
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0  # a clean stop

    # upload a reclaim, then the server dies hard before the receipt comes back
    proc, url = licserver.start()
    client = licserver.client(url)
    req = a.request(Action.RECLAIM, ["bacnet"])
    resp = client.upload([req])["responses"][dev_id(a)]
    proc.kill()
    assert proc.wait(WAIT) == -signal.SIGKILL
    receipt = a.agent.apply(resp)[0].receipt

    proc, url = licserver.start()
    client = licserver.client(url)
    assert client.upload([req])["responses"][dev_id(a)] == resp  # the same answer again
    # another process records a purchase while the server runs on the same ledger
    licserver.run("entitle", "--db", str(licserver.db), "--entitlement", "ORDER-8",
                  "--product", P, "--feature", "lon=2")
    assert [e["entitlement"] for e in client.report()["entitlements"]] == [E, "ORDER-8"]
    with pytest.raises(RemoteError) as exc:
        client.assign(E, dev_id(b), "bacnet", 1)  # still pending: not free
    assert exc.value.exit_code == 6
    assert client.confirm([receipt])["accepted"][0]["freed"] == [
        {"feature": "bacnet", "count": 4}]
    client.assign(E, dev_id(b), "bacnet", 4)
    assert client.confirm([receipt])["refused"][0]["reason"] == "replay"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(WAIT) == 0

    rep = json.loads(licserver.run("report", "--db", str(licserver.db), "--json"))
    assert rep["pending_reclaims"] == [] and rep["open_responses"] == 0
    assert [(x["device_id"], x["count"]) for x in rep["assignments"]] == [(dev_id(b), 4)]
    feats = {f["feature"]: f for f in rep["entitlements"][0]["products"][0]["features"]}
    assert (feats["bacnet"]["used"], feats["bacnet"]["free"]) == (4, 0)
    text = licserver.run("report", "--db", str(licserver.db))
    assert "ORDER-7 / BMS-Pro" in text and f"bacnet=4 to device {dev_id(b)[:12]}" in text
    assert "awaiting confirmation" in text
    log = licserver.log.read_text()
    assert "POST /v1/requests 200" in log and "licserver: stopped" in log
    licserver.run("report", "--db", str(licserver.root / "missing.db"), code=2)


def test_serve_refuses_a_port_in_use(licserver: Licserver) -> None:
    proc, url = licserver.start()
    port = url.rsplit(":", 1)[1]
    p = subprocess.run([str(BIN / "licserver"), "serve", "--db", str(licserver.db), "--key",
                        str(licserver.key), "--port", port], env=licserver.env,
                       capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 2 and "cannot listen" in p.stderr
    proc.terminate()
    assert proc.wait(WAIT) == 0


def test_a_site_larger_than_one_call_goes_in_batches(tmp_path: Path, vendor: Vendor, site: Site,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """More files than the server takes per call (here 2) are sent in batches and merged;
    a refusal keeps its position in the whole list."""
    import apps.licensing_client as client_mod

    led = Ledger(tmp_path / "l.db", vendor, clock=lambda: T0)
    with serving(led, vendor, limits=ServerLimits(max_files=2)) as srv:
        monkeypatch.setattr(client_mod, "BATCH_FILES", 2)
        client = admin_client(srv)
        devices = [site.device() for _ in range(4)]
        client.entitle(E, P, {"bacnet": 4})
        for d in devices:
            client.assign(E, dev_id(d), "bacnet", 1)
        reqs = [d.request(Action.ACTIVATE) for d in devices]
        bad = bytearray(reqs[2])
        bad[-1] ^= 1
        up = client.upload([reqs[0], reqs[1], reqs[3], bytes(bad), reqs[2]])
        assert set(up["responses"]) == {dev_id(d) for d in devices}
        assert {k: v["reason"] for k, v in up["errors"].items()} == {"#3": "untrusted"}
        receipts = [d.agent.apply(bytes(up["responses"][dev_id(d)]))[0].receipt for d in devices]
        out = client.confirm([receipts[0], b"\xa0", *receipts[1:]])
        assert sorted(a["device_id"] for a in out["accepted"]) == sorted(dev_id(d) for d in devices)
        assert [r["index"] for r in out["refused"]] == [1]
    led.close()

"""Issue 18, item 1: bearer tokens and roles on the licensing server, and HTTPS.

Everything real: SQLite ledger files, ``licserver`` and ``licadmin`` processes,
HTTP and HTTPS on 127.0.0.1 with a CA and certificate made for the test, and
devices with their own stores.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.messages import Action
from agent.rpc import RemoteError, TransportError
from apps.licensing_client import LicensingClient, read_token
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.server import LicensingServer, serve, tls_context
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, Site
from tests.simulators.test_ledger import dev_id, site_info
from tests.simulators.test_licserver_http import BIN, WAIT, Licserver
from tests.support.pki import make_pki

E1, E2, P = "PO-1 (Plant 1)", "PO-2 (Plant 2)", "BMS-Pro"

#: every route of docs/licensing-api.md with the method it takes
ROUTES = [("POST", "/v1/license-info"), ("POST", "/v1/requests"), ("POST", "/v1/receipts"),
          ("POST", "/v1/assignments"), ("POST", "/v1/entitlements"), ("GET", "/v1/report"),
          ("GET", "/v1/health"), ("GET", "/v1/no-such-route")]


@pytest.fixture
def ledger(ledger_db: str, vendor: Vendor) -> Iterator[Ledger]:
    """A ledger on each backend (SQLite, PostgreSQL) holding two entitlements."""
    led = Ledger(ledger_db, vendor, clock=lambda: T0)
    led.entitle(E1, P, {"bacnet": 10})
    led.entitle(E2, P, {"bacnet": 10})
    yield led
    led.close()


@pytest.fixture
def server(ledger: Ledger, vendor: Vendor) -> Iterator[LicensingServer]:
    with serve(ledger, vendor) as srv:
        yield srv


def exchange(srv: LicensingServer, method: str, path: str, auth: str | None,
             body: bytes = b"{}") -> tuple[int, dict[str, str], dict[str, object]]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=WAIT)
    try:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        conn.request(method, path, body=body if method == "POST" else None, headers=headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read())
    finally:
        conn.close()


def test_every_route_refuses_an_anonymous_or_unknown_caller_with_401(
        ledger: Ledger, server: LicensingServer) -> None:
    live = ledger.create_token("vendor", "vendor-admin")
    for method, path in ROUTES:
        for auth in (None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer lst_not-a-token",
                     f"Bearer {live}x", "Bearer " + "a" * 5000):
            status, headers, err = exchange(server, method, path, auth)
            assert status == 401, (method, path, auth)
            assert headers["WWW-Authenticate"] == 'Bearer realm="licserver"'
            assert (err["code"], err["reason"]) == (4, "unauthenticated")
    # nothing was recorded or created by any of them
    assert ledger.report()["entitlements"][0]["products"][0]["features"][0]["assigned"] == 0
    # the same routes with the token: none is a 401 (the health route answers)
    for method, path in ROUTES:
        status, _h, _err = exchange(server, method, path, f"Bearer {live}")
        assert status != 401, (method, path)
    assert exchange(server, "GET", "/v1/health", f"bearer {live}")[0] == 200


def test_an_anonymous_upload_gets_its_401_not_a_reset(ledger: Ledger,
                                                      server: LicensingServer) -> None:
    """A body within the drain limit is read and dropped, so the client sees the answer."""
    with pytest.raises(RemoteError) as exc:
        LicensingClient(server.url).upload([b"\x00" * 200_000])
    assert (exc.value.exit_code, exc.value.reason) == (4, "unauthenticated")
    assert "--token-file" in str(exc.value) and "LICADMIN_TOKEN" in str(exc.value)


def test_a_site_admin_is_held_to_its_entitlements(ledger: Ledger, server: LicensingServer,
                                                  site: Site) -> None:
    mine, theirs, fresh = site.device(), site.device(), site.device()
    vendor = LicensingClient(server.url, token=ledger.create_token("vendor", "vendor-admin"))
    plant1 = LicensingClient(server.url, token=ledger.create_token("plant1", "site-admin", [E1]))

    # its own entitlement: yes; the other one, and recording purchases: 403
    assert plant1.assign(E1, dev_id(mine), "bacnet", 2)["free"] == 8
    vendor.assign(E2, dev_id(theirs), "bacnet", 3)
    with pytest.raises(RemoteError) as exc:
        plant1.assign(E2, dev_id(fresh), "bacnet", 1)
    assert (exc.value.exit_code, exc.value.reason) == (4, "forbidden")
    assert E2 in str(exc.value) and E1 in str(exc.value)
    status, _h, err = exchange(server, "POST", "/v1/assignments",
                               f"Bearer {plant1.token}", json.dumps({"assignments": [
                                   {"entitlement": E1, "device_id": dev_id(fresh),
                                    "feature": "bacnet", "count": 1},
                                   {"entitlement": E2, "device_id": dev_id(fresh),
                                    "feature": "bacnet", "count": 1}]}).encode())
    assert status == 403 and "none of the 2 assignments was made" in str(err["message"])
    with pytest.raises(RemoteError) as exc:
        plant1.entitle(E1, P, {"bacnet": 1000})
    assert exc.value.reason == "forbidden" and "vendor-admin" in str(exc.value)
    assert ledger.free(E1, "bacnet") == 8 and ledger.free(E2, "bacnet") == 7

    # the workflow on a device of another entitlement: 403 for license info, a
    # per-file refusal in an upload or a confirm; its own devices go through
    both = site_info(mine.agent.info()[0], theirs.agent.info()[0])
    with pytest.raises(RemoteError) as exc:
        plant1.license_info(both)
    assert exc.value.reason == "forbidden" and dev_id(theirs)[:12] in str(exc.value)
    plant1.license_info(both, [dev_id(mine)])
    up = plant1.upload([mine.request(Action.ACTIVATE), theirs.request(Action.ACTIVATE)])
    assert set(up["responses"]) == {dev_id(mine)}
    assert (up["errors"][dev_id(theirs)]["code"],
            up["errors"][dev_id(theirs)]["reason"]) == (4, "forbidden")
    resp = vendor.upload([theirs.request(Action.ACTIVATE)])["responses"][dev_id(theirs)]
    receipt = theirs.agent.apply(resp)[0].receipt
    out = plant1.confirm([receipt, mine.agent.apply(up["responses"][dev_id(mine)])[0].receipt])
    assert [(r["index"], r["reason"]) for r in out["refused"]] == [(0, "forbidden")]
    assert [a["device_id"] for a in out["accepted"]] == [dev_id(mine)]
    assert vendor.confirm([receipt])["accepted"][0]["device_id"] == dev_id(theirs)

    # its report: its entitlement, its assignments and devices, no tokens
    rep = plant1.report()
    assert [e["entitlement"] for e in rep["entitlements"]] == [E1]
    assert {a["device_id"] for a in rep["assignments"]} == {dev_id(mine)}
    assert [d["device_id"] for d in rep["devices"]] == [dev_id(mine)]
    assert set(rep["installed"]) == {dev_id(mine)} and rep["tokens"] == []
    full = vendor.report()
    assert [e["entitlement"] for e in full["entitlements"]] == [E1, E2]
    assert [(t["name"], t["role"], t["entitlements"]) for t in full["tokens"]] == [
        ("plant1", "site-admin", [E1]), ("vendor", "vendor-admin", [])]


def test_token_refusals_name_what_was_wrong(ledger: Ledger) -> None:
    cases = [(("x", "site-admin", ()), "needs the entitlements"),
             (("x", "vendor-admin", (E1,)), "covers every entitlement"),
             (("x", "site-admin", ("PO-9",)), "no entitlement PO-9"),
             (("x", "root", ()), "expected vendor-admin or site-admin"),
             (("", "vendor-admin", ()), "token name")]
    for (name, role, ents), text in cases:
        with pytest.raises(Exception, match=text) as exc:
            ledger.create_token(name, role, ents)
        assert getattr(exc.value, "exit_code", None) == 2
    ledger.create_token("a", "vendor-admin")
    with pytest.raises(Exception, match="exists already"):
        ledger.create_token("a", "site-admin", [E1])
    with pytest.raises(Exception, match="no token named 'b'"):
        ledger.revoke_token("b")
    assert [t["name"] for t in ledger.report()["tokens"]] == ["a"]


@pytest.fixture
def licserver(tmp_path: Path, vendor: Vendor, ledger_db: str) -> Iterator[Licserver]:
    """On each backend: an SQLite file, a PostgreSQL database."""
    ls = Licserver(tmp_path, vendor, ledger_db)
    try:
        yield ls
    finally:
        ls.close()


def stored_bytes(db: str) -> bytes:
    """Everything the ledger stores: the SQLite file (and WAL), or every PostgreSQL table row
    as the server returns it."""
    if "://" not in db:
        subprocess.run([str(BIN / "licserver"), "report", "--db", db], check=True,
                       capture_output=True, timeout=60)  # the WAL checkpointed into the file
        return b"".join(p.read_bytes() for p in Path(db).parent.glob(Path(db).name + "*"))
    import psycopg

    out = b""
    with psycopg.connect(db) as conn:
        tables = [r[0] for r in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        for t in tables:
            for row in conn.execute(f'SELECT * FROM "{t}"'):  # names read from the catalog
                for v in row:
                    out += v if isinstance(v, bytes) else str(v).encode()
    return out


def licadmin(cwd: Path, *args: str, env: dict[str, str] | None = None,
             code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(BIN / "licadmin"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=60, check=False, env=env or dict(os.environ))
    assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
    return p


def test_tokens_from_the_command_line_stored_as_a_hash_and_revoked_while_serving(
        licserver: Licserver, site: Site, tmp_path: Path) -> None:
    db = str(licserver.db)
    licserver.run("entitle", "--db", db, "--entitlement", E1, "--product", P,
                  "--feature", "bacnet=5")
    out = licserver.run("token", "create", "--db", db, "--role", "site-admin",
                        "--entitlement", E1, "--out", str(tmp_path / "plant1.token"))
    assert out == (f"token plant1 (site-admin for {E1}) written to {tmp_path / 'plant1.token'} "
                   "(mode 0600); the ledger keeps only its SHA-256\n")
    tok_file = tmp_path / "plant1.token"
    assert tok_file.stat().st_mode & 0o777 == 0o600
    secret = read_token(str(tok_file))
    assert secret is not None and secret.startswith("lst_") and len(secret) == 47
    # the ledger holds the SHA-256, never the secret
    assert secret.encode() not in stored_bytes(db)
    assert hashlib.sha256(secret.encode()).digest() in stored_bytes(db)
    # refusals: no overwrite, an unknown entitlement; nothing created
    licserver.run("token", "create", "--db", db, "--role", "site-admin", "--entitlement", E1,
                  "--out", str(tok_file), code=2)
    licserver.run("token", "create", "--db", db, "--role", "site-admin", "--entitlement", "PO-9",
                  "--out", str(tmp_path / "other.token"), code=2)
    assert not (tmp_path / "other.token").exists()
    licserver.run("token", "create", "--db", db, "--role", "vendor-admin", "--name", "ops",
                  "--out", str(tmp_path / "ops.token"))

    dev = site.device()
    proc, url = licserver.start()
    env = dict(os.environ, LICADMIN_TOKEN="")
    # no token at all: the server's 401 (exit 4) says how to give one
    p = licadmin(tmp_path, "assign", "--licensing-server", url, "--entitlement", E1,
                 "--device", dev_id(dev), "--feature", "bacnet=1", env=env, code=4)
    assert "bearer token" in p.stderr and "--token-file" in p.stderr
    # the file, and the environment variable
    licadmin(tmp_path, "assign", "--licensing-server", url, "--token-file", str(tok_file),
             "--entitlement", E1, "--device", dev_id(dev), "--feature", "bacnet=1", env=env)
    env["LICADMIN_TOKEN"] = secret
    p = licadmin(tmp_path, "assign", "--licensing-server", url, "--entitlement", E1,
                 "--device", dev_id(dev), "--feature", "bacnet=2", env=env)
    assert "3 left unassigned" in p.stdout
    # a token file that is not one
    (tmp_path / "bad.token").write_text("one\ntwo\n")
    p = licadmin(tmp_path, "assign", "--licensing-server", url, "--token-file",
                 str(tmp_path / "bad.token"), "--entitlement", E1, "--device", dev_id(dev),
                 "--feature", "bacnet=2", env=env, code=2)
    assert "bad.token is not a token file" in p.stderr

    # revoked by another process while the server runs: refused from the next request
    assert "revoked: refused from now on" in licserver.run(
        "token", "revoke", "--db", db, "--name", "plant1")
    p = licadmin(tmp_path, "assign", "--licensing-server", url, "--entitlement", E1,
                 "--device", dev_id(dev), "--feature", "bacnet=3", env=env, code=4)
    assert "'plant1' was revoked" in p.stderr
    assert "already revoked" in licserver.run("token", "revoke", "--db", db, "--name", "plant1")
    licserver.run("token", "revoke", "--db", db, "--name", "nobody", code=2)
    assert licserver.client(url).report()["assignments"][0]["count"] == 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0

    text = licserver.run("report", "--db", db)
    assert f"  plant1: site-admin for {E1}, created " in text and ", revoked " in text
    assert "  ops: vendor-admin, created " in text and text.count(", live") == 2
    rep = json.loads(licserver.run("report", "--db", db, "--json"))
    assert [(t["name"], t["role"], t["revoked"] is not None) for t in rep["tokens"]] == [
        ("ops", "vendor-admin", False), ("plant1", "site-admin", True),
        ("vendor-admin", "vendor-admin", False)]
    log = licserver.log.read_text()
    assert " plant1 POST /v1/assignments 200 " in log and " - POST /v1/assignments 401 " in log


def test_https_with_the_licensing_ca(licserver: Licserver, site: Site, tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    other = make_pki(tmp_path / "other-pki", "elsewhere")
    db = str(licserver.db)
    licserver.run("entitle", "--db", db, "--entitlement", E1, "--product", P,
                  "--feature", "bacnet=5")
    tok = tmp_path / "plant1.token"
    licserver.run("token", "create", "--db", db, "--role", "site-admin", "--entitlement", E1,
                  "--out", str(tok))
    # --cert without its key, and a key that is not the certificate's
    p = subprocess.run([str(BIN / "licserver"), "serve", "--db", db, "--key", str(licserver.key),
                        "--port", "0", "--cert", str(pki.server_cert)], capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 2 and "--tls-key" in p.stderr
    p = subprocess.run([str(BIN / "licserver"), "serve", "--db", db, "--key", str(licserver.key),
                        "--port", "0", "--cert", str(pki.server_cert), "--tls-key",
                        str(other.server_key)], capture_output=True, text=True, timeout=60,
                       check=False)
    assert p.returncode == 2 and "matching key" in p.stderr

    proc, url = licserver.start("--cert", str(pki.server_cert), "--tls-key",
                                str(pki.server_key))
    assert url.startswith("https://127.0.0.1:")
    dev = site.device()
    env = dict(os.environ, LICADMIN_TOKEN="")
    args = ["assign", "--licensing-server", url, "--token-file", str(tok), "--entitlement", E1,
            "--device", dev_id(dev), "--feature", "bacnet=1"]
    licadmin(tmp_path, *args, "--licensing-ca", str(pki.ca_cert), env=env)
    # the wrong CA, or none (the system's CAs do not know the site CA): refused, exit 1
    for extra in (["--licensing-ca", str(other.ca_cert)], []):
        p = licadmin(tmp_path, *args, *extra, env=env, code=1)
        assert "is not who it claims" in p.stderr and "--licensing-ca" in p.stderr
    p = licadmin(tmp_path, *args, "--licensing-ca", str(tmp_path / "missing.pem"), env=env,
                 code=2)
    assert "--licensing-ca" in p.stderr
    # plain HTTP to the HTTPS port gets no answer from the API
    plain = LicensingClient(url.replace("https://", "http://"), token=read_token(str(tok)))
    with pytest.raises((TransportError, RemoteError)):
        plain.health()
    client = LicensingClient(url, token=read_token(str(tok)), ca=str(pki.ca_cert))
    assert client.report()["assignments"][0]["count"] == 1
    assert client.health() == {"ok": True}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT) == 0
    assert "TLS handshake failed" in licserver.log.read_text()


def test_the_in_process_server_serves_https(ledger: Ledger, vendor: Vendor,
                                            tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with serve(ledger, vendor, tls=tls_context(str(pki.server_cert),
                                               str(pki.server_key))) as srv:
        assert srv.url.startswith("https://")
        token = ledger.create_token("vendor", "vendor-admin")
        assert LicensingClient(srv.url, token=token, ca=str(pki.ca_cert)).health() == {
            "ok": True}
        ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
        conn = http.client.HTTPSConnection(srv.host, srv.port, timeout=WAIT, context=ctx)
        conn.request("GET", "/v1/report")
        assert conn.getresponse().status == 401
        conn.close()


def test_a_version_1_ledger_gains_the_tokens_table(tmp_path: Path, vendor: Vendor) -> None:
    """An existing ledger file keeps opening: schema 1 (no tokens) is migrated to 2."""
    import sqlite3

    db = tmp_path / "old.db"
    with Ledger(db, vendor, clock=lambda: T0) as led:
        led.entitle(E1, P, {"bacnet": 3})
    con = sqlite3.connect(db)
    con.execute("DROP TABLE tokens")
    con.execute("PRAGMA user_version=1")
    con.commit()
    con.close()
    with Ledger(db, vendor, clock=lambda: T0) as led:
        assert led.free(E1, "bacnet") == 3
        token = led.create_token("ops", "vendor-admin")
        assert led.authenticate(token).name == "ops"
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == 2
    con.close()

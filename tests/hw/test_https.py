"""The https:// backend against a real TLS listener on 127.0.0.1: endpoints, error mapping, limits."""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.errors import UsageError
from agent.formats import read_device_info
from agent.messages import Action
from agent.ops import AgentOps
from agent.rpc import Op, RemoteError, TransportError
from hw import connect, listen
from hw.backends.https import HttpsListener
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device, Site
from tests.support.pki import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server_url(pki: Pki, port: int = 0, ca: bool = True) -> str:
    url = f"https://127.0.0.1:{port}?cert={pki.server_cert}&key={pki.server_key}"
    return url + (f"&ca={pki.ca_cert}" if ca else "")


def _client_url(address: str, pki: Pki, cert: bool = True) -> str:
    url = f"{address}?ca={pki.ca_cert}"
    return url + (f"&cert={pki.client_cert}&key={pki.client_key}" if cert else "")


def _ssl_context(pki: Pki, cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert:
        ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx


@pytest.fixture
def served(device: Device, pki: Pki) -> Iterator[tuple[HttpsListener, list[str]]]:
    lines: list[str] = []
    lst = listen(_server_url(pki), AgentOps(device.agent), log=lines.append,
                 access_log=lines.append)
    lst.start()
    try:
        yield lst, lines
    finally:
        lst.stop()
    assert not _server_threads()


def _server_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("https-") or "process_request" in t.name]


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def _get(lst: HttpsListener, pki: Pki, path: str, method: str = "GET", body: bytes | None = None,
         headers: Mapping[str, str] | None = None) -> tuple[int, Mapping[str, str], bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", _port(lst.address), timeout=10,
                                       context=_ssl_context(pki))
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        r = conn.getresponse()
        return r.status, dict(r.headers), r.read()
    finally:
        conn.close()


def test_status_json_with_urllib(served: tuple[HttpsListener, list[str]], device: Device,
                                 pki: Pki) -> None:
    lst, lines = served
    assert lst.address.startswith("https://127.0.0.1:") and _port(lst.address) != 0
    with urllib.request.urlopen(f"{lst.address}/v1/status", timeout=10,
                                context=_ssl_context(pki)) as r:
        assert r.headers["Content-Type"] == "application/json"
        assert json.loads(r.read()) == device.agent.status()
    assert any(" cn=admin GET /v1/status 200 " in line for line in lines)


def test_full_activation_through_the_client(served: tuple[HttpsListener, list[str]],
                                            device: Device, pki: Pki) -> None:
    lst, _ = served
    with connect(_client_url(lst.address, pki)) as c:
        assert c.call("hello")["device_id"] == device.agent.status()["device_id"]
        info = read_device_info(c.info())
        assert info.device_id == device.agent.status()["device_id"]
        req = c.request("activate", ["bacnet", "modbus"])
        resp = device.vendor.issue(req, [Grant("bacnet", 3), Grant("modbus", 1)],
                                   now=device.clock())
        out = c.apply(resp)
        assert out["sequence"] == 1 and out["base_sequence"] == 0
        assert not out["already_applied"] and sorted(out["changes"]) == ["add bacnet", "add modbus"]
        assert isinstance(out["receipt"], bytes) and out["warning"] is None
        again = c.apply(resp)
        assert again["already_applied"] and again["receipt"] == out["receipt"]
        assert c.check("bacnet")["licensed"] is True
        assert c.check("nothing here/..")["licensed"] is False  # quoted into one path segment
        st = c.status()
        assert st.to_wire() == device.agent.status() and st["sequence"] == 1
        li = c.license_info()
        assert li["sequence"] == 1 and isinstance(li["state_digest"], bytes)
        kinds = [e["event"] for e in c.journal()["entries"]]
        assert kinds.count("apply") == 1 and isinstance(c.journal()["entries"][0]["digest"], bytes)


def test_endpoints_for_plain_http_clients(served: tuple[HttpsListener, list[str]],
                                          device: Device, pki: Pki) -> None:
    lst, _ = served
    status, headers, body = _get(lst, pki, "/v1/info")
    assert status == 200 and headers["Content-Type"] == "application/cbor"
    assert read_device_info(body).device_id == headers["X-Device-Id"]
    status, headers, body = _get(lst, pki, "/v1/request", "POST",
                                 json.dumps({"action": "activate", "features": ["x"]}).encode())
    assert status == 200 and headers["Content-Type"] == "application/cbor"
    assert device.vendor.read_request(body).features == ("x",)
    status, headers, body = _get(lst, pki, "/v1/apply", "POST",
                                 device.vendor.issue(body, [Grant("x", 2)], now=device.clock()))
    assert status == 200 and headers["X-Already-Applied"] == "false"
    assert headers["X-Sequence"] == "1" and json.loads(headers["X-Changes"]) == ["add x"]
    status, _, body = _get(lst, pki, "/v1/check/x")
    assert status == 200 and json.loads(body)["licensed"] is True
    status, _, body = _get(lst, pki, "/v1/check/y")
    assert status == 200 and json.loads(body)["licensed"] is False
    status, _, body = _get(lst, pki, "/v1/license-info")
    assert json.loads(body)["licenses"][0]["feature"] == "x"
    status, _, body = _get(lst, pki, "/v1/journal")
    assert status == 200 and [e["event"] for e in json.loads(body)["entries"]][-1] == "apply"
    # refusals are JSON with licagent's exit code
    for method, path, want_status, want_code in [
        ("GET", "/v2/status", 404, 2),
        ("POST", "/v1/status", 405, 2),
        ("DELETE", "/v1/status", 501, 2),
    ]:
        status, headers, body = _get(lst, pki, path, method, b"" if method == "POST" else None)
        err = json.loads(body)
        assert (status, err["code"]) == (want_status, want_code), (path, body)
        assert err["message"]
    status, _, body = _get(lst, pki, "/v1/request", "POST", b"{not json")
    assert status == 400 and json.loads(body)["code"] == 3
    status, _, body = _get(lst, pki, "/v1/request", "POST",
                           json.dumps({"action": "reclaim", "features": ["zzz"]}).encode())
    assert status == 400 and json.loads(body)["reason"] == "usage"
    status, _, body = _get(lst, pki, "/v1/apply", "POST", b"\xff\x00junk")
    assert status == 400 and json.loads(body)["code"] == 3


def test_wrong_device_maps_to_exit_5(served: tuple[HttpsListener, list[str]], device: Device,
                                     site: Site, pki: Pki) -> None:
    lst, _ = served
    other = site.device()
    resp = other.vendor.issue(other.request(Action.ACTIVATE, ["a"]), [Grant("a", 1)],
                              now=other.clock())
    before = device.store_bytes()
    with connect(_client_url(lst.address, pki)) as c:
        with pytest.raises(RemoteError) as ei:
            c.apply(resp)
        assert ei.value.exit_code == 5 and ei.value.reason == "wrong-device"
        # the connection stays usable after a refusal
        assert c.status()["sequence"] == 0
    assert device.store_bytes() == before
    status, _, body = _get(lst, pki, "/v1/apply", "POST", resp)
    assert status == 409 and json.loads(body)["code"] == 5


def test_oversized_body_gets_413_unread(served: tuple[HttpsListener, list[str]], pki: Pki) -> None:
    lst, _ = served
    conn = http.client.HTTPSConnection("127.0.0.1", _port(lst.address), timeout=10,
                                       context=_ssl_context(pki))
    try:
        conn.putrequest("POST", "/v1/apply")
        conn.putheader("Content-Length", str(300 * 1024))
        conn.endheaders()  # the body is never sent: the server must answer from the headers
        r = conn.getresponse()
        err = json.loads(r.read())
        assert r.status == 413 and err["code"] == 3 and "262144-byte limit" in err["message"]
        assert r.headers["Connection"] == "close"
    finally:
        conn.close()
    conn = http.client.HTTPSConnection("127.0.0.1", _port(lst.address), timeout=10,
                                       context=_ssl_context(pki))
    try:
        conn.putrequest("POST", "/v1/apply")
        conn.endheaders()
        r = conn.getresponse()
        assert r.status == 411 and json.loads(r.read())["code"] == 2
    finally:
        conn.close()


def test_client_certificate_required_when_ca_given(served: tuple[HttpsListener, list[str]],
                                                   pki: Pki, tmp_path: Path) -> None:
    lst, lines = served
    with connect(_client_url(lst.address, pki, cert=False)) as c, \
            pytest.raises(TransportError) as ei:
        c.status()
    assert ei.value.exit_code == 1 and "client certificate" in str(ei.value)
    with pytest.raises(OSError):  # plain urllib without a certificate is refused the same way
        urllib.request.urlopen(f"{lst.address}/v1/status", timeout=10,
                               context=_ssl_context(pki, cert=False)).read()
    # a client that does not know the site CA refuses the server
    other = make_pki(tmp_path / "other")
    with connect(f"{lst.address}?ca={other.ca_cert}") as c, pytest.raises(TransportError) as ei:
        c.status()
    assert "cannot verify the TLS certificate" in str(ei.value)
    assert any("TLS handshake failed" in line for line in lines)


def test_no_ca_means_no_client_certificate(device: Device, pki: Pki) -> None:
    lst = listen(_server_url(pki, ca=False), AgentOps(device.agent))
    lst.start()
    try:
        with connect(_client_url(lst.address, pki, cert=False)) as c:
            assert c.status()["sequence"] == 0
    finally:
        lst.stop()


def test_unknown_options_and_bad_urls_refused(device: Device, pki: Pki) -> None:
    handler = AgentOps(device.agent)
    with pytest.raises(UsageError, match="bogus"):
        listen(_server_url(pki) + "&bogus=1", handler)
    with pytest.raises(UsageError, match="verify"):
        connect(f"https://127.0.0.1:1?ca={pki.ca_cert}&verify=no")
    with pytest.raises(UsageError, match="certificate and key"):
        listen("https://127.0.0.1:0", handler)
    with pytest.raises(UsageError, match="port"):
        connect("https://127.0.0.1")
    with pytest.raises(UsageError, match="no path"):
        connect("https://127.0.0.1:1/api")
    with pytest.raises(UsageError, match="cannot load the TLS files"):
        listen(f"https://127.0.0.1:0?cert={pki.server_cert}&key=/nonexistent", handler)


def test_connection_refused_and_timeout_are_transport_errors(pki: Pki) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with connect(f"https://127.0.0.1:{port}?ca={pki.ca_cert}") as c, \
            pytest.raises(TransportError, match="connection refused"):
        c.status()
    with socket.socket() as mute:  # accepts TCP (backlog) but never speaks TLS
        mute.bind(("127.0.0.1", 0))
        mute.listen(1)
        url = f"https://127.0.0.1:{mute.getsockname()[1]}?ca={pki.ca_cert}"
        with connect(url, timeout=0.3) as c, pytest.raises(TransportError, match="no answer"):
            c.status()


def test_twenty_concurrent_clients(device: Device, pki: Pki) -> None:
    # all twenty come from 127.0.0.1: the per-address limit (8) is raised
    lst = listen(_server_url(pki), AgentOps(device.agent), max_per_peer=20)
    lst.start()
    try:
        _twenty_clients(lst, device, pki)
    finally:
        lst.stop()


def _twenty_clients(lst: HttpsListener, device: Device, pki: Pki) -> None:
    device.activate(bacnet=1)
    errors: list[BaseException] = []
    results: list[Any] = []

    def client() -> None:
        try:
            with connect(_client_url(lst.address, pki)) as c:
                for _ in range(3):
                    results.append((c.status()["sequence"], c.check("bacnet")["licensed"]))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results == [(1, True)] * 60


def test_busy_server_answers_503(pki: Pki) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow(op: str, _args: Mapping[str, Any]) -> Any:
        if op == "get-status":
            entered.set()
            release.wait(10)
        return {"sequence": 0}

    lst = listen(_server_url(pki), slow, max_pending=1, busy_wait=0.05)
    lst.start()
    try:
        first: list[Any] = []

        def hold_the_slot() -> None:
            with connect(_client_url(lst.address, pki)) as c:
                first.append(c.call(Op.GET_STATUS))  # the fake's raw answer

        t = threading.Thread(target=hold_the_slot)
        t.start()
        assert entered.wait(10)
        with connect(_client_url(lst.address, pki)) as c, pytest.raises(RemoteError) as ei:
            c.license_info()
        assert ei.value.exit_code == 1 and ei.value.reason == "busy"
        release.set()
        t.join(10)
        assert first == [{"sequence": 0}]
    finally:
        release.set()
        lst.stop()


def test_stop_ends_kept_alive_connections(device: Device, pki: Pki) -> None:
    lst = listen(_server_url(pki), AgentOps(device.agent))
    lst.start()
    port = _port(lst.address)
    with connect(_client_url(lst.address, pki)) as c:
        assert c.status()["sequence"] == 0  # this connection now idles, kept alive
        lst.stop()  # must not wait for the idle connection's timeout
        assert not _server_threads()
        again = listen(_server_url(pki, port), AgentOps(device.agent))
        again.start()
        try:
            # the kept-alive connection was closed by the old server: a new one is opened
            assert c.status()["sequence"] == 0
        finally:
            again.stop()
        with pytest.raises(TransportError):
            c.status()


def test_connections_over_the_limit_are_closed(device: Device, pki: Pki) -> None:
    lst = listen(_server_url(pki), AgentOps(device.agent), max_clients=1)
    lst.start()
    try:
        with connect(_client_url(lst.address, pki)) as first:
            assert first.status()["sequence"] == 0  # holds the only connection slot
            with connect(_client_url(lst.address, pki)) as second, \
                    pytest.raises(TransportError):
                second.status()
            assert first.status()["sequence"] == 0
        with connect(_client_url(lst.address, pki)) as third:
            for _ in range(50):  # the first connection's thread ends soon after its close
                try:
                    assert third.status()["sequence"] == 0
                    break
                except TransportError:
                    threading.Event().wait(0.05)
            else:
                pytest.fail("the connection slot was never given back")
    finally:
        lst.stop()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_reads_status(served: tuple[HttpsListener, list[str]], device: Device,
                           pki: Pki) -> None:
    lst, _ = served
    p = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body", "--cacert", str(pki.ca_cert),
         "--cert", str(pki.client_cert), "--key", str(pki.client_key),
         f"{lst.address}/v1/status"],
        capture_output=True, text=True, timeout=30, check=False)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == device.agent.status()
    p = subprocess.run(
        ["curl", "--silent", "--cacert", str(pki.ca_cert), "--cert", str(pki.client_cert),
         "--key", str(pki.client_key), "--data", '{"action": "reclaim", "features": ["zzz"]}',
         f"{lst.address}/v1/request", "--write-out", "\n%{http_code}"],
        capture_output=True, text=True, timeout=30, check=False)
    body, code = p.stdout.rsplit("\n", 1)
    assert code == "400" and json.loads(body)["reason"] == "usage"

"""Cheap peers against tcp:// and tls:// listeners, on real loopback sockets (issue 13, item 8).

Slowloris (a byte a second), TLS handshakes never finished, idle connections that
never say hello, one address opening many connections, and anonymous requests that
try to push an operator's outstanding request out of the device.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from agent.cose import canonical
from agent.errors import UnknownRequestError
from agent.ops import AgentOps
from agent.protocol import DEFAULT_LIMITS
from agent.rpc import RemoteError
from hw import connect, listen
from hw.backends.tcp import TcpListener
from hw.framing import encode_frame
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device
from tests.hw.test_tcp import (
    WAIT,
    closed_by_server,
    hello_frame,
    q,
    raw,
    tls_client_url,
    tls_server_url,
    wait_until,
)
from tests.support.pki import Pki, make_pki

pytestmark = pytest.mark.usefixtures("no_thread_outlives_its_test")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@contextmanager
def served(device: Device, url: str, **ctx: Any) -> Iterator[tuple[TcpListener, list[str]]]:
    lines: list[str] = []
    lst = listen(url, AgentOps(device.agent), log=lines.append, **ctx)
    assert isinstance(lst, TcpListener)
    lst.start()
    try:
        yield lst, lines
    finally:
        lst.stop()


def trickle(s: socket.socket, data: bytes, every: float = 1.0) -> int:
    """Send ``data`` one byte every ``every`` seconds until the server closes the connection;
    returns how many bytes went out before it did (len(data) if it never did)."""
    for i, b in enumerate(data):
        try:
            s.sendall(bytes([b]))
        except OSError:  # reset by the server
            return i
        s.settimeout(every)
        try:
            if s.recv(4096) == b"":
                return i + 1  # closed after this byte
        except TimeoutError:
            continue
        except OSError:
            return i + 1
    return len(data)


def status_frame(rid: int = 8) -> bytes:
    return encode_frame(canonical({"v": 1, "id": rid, "op": "get-status", "args": {}}))


def said_hello(s: socket.socket) -> None:
    """Say hello on a raw connection and read its answer (the session is admitted)."""
    s.sendall(hello_frame())
    s.settimeout(WAIT)
    got = b""
    while got.count(b"\x00") < 2:
        chunk = s.recv(4096)
        assert chunk, "closed before answering hello"
        got += chunk


# ---------------------------------------------------------------- slowloris


def test_byte_a_second_request_is_dropped_while_a_good_client_is_served(device: Device) -> None:
    """A peer in session that trickles its next request a byte a second misses the frame
    deadline and is dropped; a good client is served all along."""
    url = "tcp://127.0.0.1:0" + q(frame_timeout=2)
    with served(device, url) as (lst, lines), raw(lst.address) as slow:
        said_hello(slow)
        wait_until(lambda: lst.sessions == 1, "the slow peer is in session")
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(trickle(slow, status_frame() * 3)))
        t.start()
        try:
            while t.is_alive():  # served while the slow peer trickles
                with connect(lst.address) as good:
                    assert good.status()["sequence"] == 0
                t.join(timeout=0.5)
        finally:
            t.join(timeout=WAIT * 6)
        assert result and result[0] < len(status_frame() * 3), "the trickling peer was never cut"
        assert lst.dropped == 1
        assert any("a frame took longer than 2 s" in line for line in lines), lines
        wait_until(lambda: lst.connections == 0, "the slow peer's connection is gone")


def test_byte_a_second_before_hello_is_dropped(device: Device) -> None:
    """Before its hello a trickling peer misses the hello deadline, even sending only
    delimiters (which never make a frame, so never count as a request)."""
    url = "tcp://127.0.0.1:0" + q(hello_timeout=2)
    with served(device, url) as (lst, lines):
        with raw(lst.address) as s:
            assert trickle(s, b"\x00" * 60) < 60
        with raw(lst.address) as s:
            assert trickle(s, hello_frame()) < len(hello_frame())
        assert sum("no hello within 2 s" in line for line in lines) == 2, lines
        with connect(lst.address) as good:
            assert good.status()["sequence"] == 0


def test_delimiters_alone_after_hello_do_not_keep_a_session(device: Device) -> None:
    url = "tcp://127.0.0.1:0" + q(idle_timeout=2)
    with served(device, url) as (lst, lines), raw(lst.address) as s:
        said_hello(s)
        assert trickle(s, b"\x00" * 60) < 60
        assert any("no request for 2 s" in line for line in lines), lines


def test_tls_handshake_never_finished_is_dropped(device: Device, pki: Pki) -> None:
    with served(device, tls_server_url(pki, hello_timeout=1.5)) as (lst, lines):
        with raw(lst.address) as silent:
            assert closed_by_server(silent)  # connected, never a ClientHello
        # a ClientHello's first bytes, a byte a second: the handshake never completes
        with raw(lst.address) as slow:
            assert trickle(slow, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 4) < 44
        with connect(tls_client_url(lst.address, pki)) as good:
            assert good.status()["sequence"] == 0
        wait_until(lambda: lst.connections == 0, "the stalled handshakes are gone")
        assert sum("TLS handshake failed" in line for line in lines) == 2, lines


# ---------------------------------------------------------------- slots before hello


def test_idle_connections_do_not_count_against_max_clients(device: Device) -> None:
    """max_clients=1 and five connections that never say hello: a real client still gets in."""
    url = "tcp://127.0.0.1:0" + q(max_clients=1, max_per_peer=20)
    with served(device, url) as (lst, _lines):
        idle = [raw(lst.address) for _ in range(5)]
        try:
            wait_until(lambda: lst.connections == 5, "the idle peers are accepted")
            assert lst.sessions == 0
            with connect(lst.address) as good:
                assert good.status()["sequence"] == 0
                assert lst.sessions == 1
                with connect(lst.address) as second, pytest.raises(RemoteError) as err:
                    second.status()  # the one session slot is taken by a real client
                assert err.value.reason == "busy" and "max_clients" in str(err.value)
        finally:
            for s in idle:
                s.close()


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
def test_a_flood_of_idle_connections_does_not_lock_out_a_real_client(
        device: Device, pki: Pki, scheme: str) -> None:
    """Sixty connections that never finish a TLS handshake or never say hello, with room
    for eight pending: the oldest are closed to make room, and a real client is served."""
    opts = {"max_pending": 8, "max_per_peer": 100, "max_clients": 4}
    url = (f"tcp://127.0.0.1:0{q(**opts)}" if scheme == "tcp"
           else tls_server_url(pki, **opts))
    with served(device, url) as (lst, _lines):
        idle = [raw(lst.address) for _ in range(60)]
        try:
            wait_until(lambda: lst.evicted >= 52, "the oldest idle peers are closed")
            assert lst.connections <= 8 and lst.sessions == 0
            assert closed_by_server(idle[0])  # the first ones are gone
            client_url = lst.address if scheme == "tcp" else tls_client_url(lst.address, pki)
            clients = [connect(client_url) for _ in range(4)]
            try:
                for c in clients:
                    assert c.status()["sequence"] == 0
                assert lst.sessions == 4
            finally:
                for c in clients:
                    c.close()
        finally:
            for s in idle:
                s.close()


# ---------------------------------------------------------------- per-peer limit


def test_per_peer_limit(device: Device) -> None:
    """max_per_peer=2: a new connection from the address closes its oldest pending one; once
    both are in session, a third is refused busy, naming the address and the option."""
    url = "tcp://127.0.0.1:0" + q(max_per_peer=2)
    with served(device, url) as (lst, lines):
        assert lst.config.max_per_peer == 2
        first_idle, second_idle = raw(lst.address), raw(lst.address)
        try:
            wait_until(lambda: lst.connections == 2, "two idle peers accepted")
            with connect(lst.address) as a:
                assert a.status()["sequence"] == 0
                assert closed_by_server(first_idle)  # made room for a
                with connect(lst.address) as b:
                    assert b.status()["sequence"] == 0
                    assert closed_by_server(second_idle)  # made room for b
                    with connect(lst.address) as c, pytest.raises(RemoteError) as err:
                        c.status()
                    assert err.value.reason == "busy"
                    assert "too many connections from 127.0.0.1" in str(err.value)
                    assert "max_per_peer" in str(err.value)
                    assert a.check("x")["licensed"] is False  # the two were not disturbed
            assert lst.evicted == 2
            assert sum("max_per_peer" in line for line in lines) >= 3
        finally:
            first_idle.close()
            second_idle.close()


def test_per_peer_default_and_from_context(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as (lst, _):
        assert lst.config.max_per_peer == 8
    with served(device, "tcp://127.0.0.1:0", max_per_peer=3) as (lst, _):
        assert lst.config.max_per_peer == 3
    with served(device, "tcp://127.0.0.1:0?max_per_peer=5", max_per_peer=3) as (lst, _):
        assert lst.config.max_per_peer == 5


# ---------------------------------------------------------------- outstanding requests


def anonymous_requests(address: str, n: int) -> None:
    for _ in range(n):
        with connect(address) as c:
            c.request("activate", ["attacker"])


def test_anonymous_requests_cannot_push_out_an_operator_request(device: Device,
                                                                pki: Pki) -> None:
    """The operator asks over tls:// with a client certificate; twenty anonymous
    create-request calls over tcp:// follow; the vendor's response still applies."""
    ops = AgentOps(device.agent)
    plain = listen("tcp://127.0.0.1:0", ops)
    secure = listen(tls_server_url(pki), ops)
    plain.start()
    secure.start()
    try:
        operator_url = tls_client_url(secure.address, pki)
        with connect(operator_url) as op:
            req = op.request("activate", ["bacnet"])
        anonymous_requests(plain.address, 2 * DEFAULT_LIMITS.max_outstanding + 4)
        st = device.agent.status()
        origins = [o.get("origin", "") for o in st["outstanding_requests"]]
        assert sum(o.startswith("tls cert CN=admin sha256:") for o in origins) == 1
        assert sum(o == "tcp 127.0.0.1" for o in origins) == DEFAULT_LIMITS.max_outstanding
        resp = device.vendor.issue(req, [Grant("bacnet", 2)], now=device.clock())
        with connect(operator_url) as op:
            assert op.apply(resp)["sequence"] == 1
            assert op.check("bacnet")["licensed"] is True
    finally:
        plain.stop()
        secure.stop()


def test_local_request_survives_anonymous_requests(device: Device) -> None:
    """The operator's request made with the local command line is no anonymous peer's to drop."""
    req = device.request()
    with served(device, "tcp://127.0.0.1:0") as (lst, _):
        anonymous_requests(lst.address, DEFAULT_LIMITS.max_outstanding + 1)
        resp = device.vendor.issue(req, [Grant("bacnet", 1)], now=device.clock())
        with connect(lst.address) as c:
            assert c.apply(resp)["sequence"] == 1


def test_same_origin_replacement_is_said_on_apply(device: Device) -> None:
    """Operator and attacker on one address (one origin): the operator's request is replaced,
    and applying its response says so, with the time in ISO 8601; the store is unchanged."""
    with served(device, "tcp://127.0.0.1:0") as (lst, _):
        with connect(lst.address) as c:
            req = c.request("activate", ["bacnet"])
        anonymous_requests(lst.address, DEFAULT_LIMITS.max_outstanding)
        resp = device.vendor.issue(req, [Grant("bacnet", 1)], now=device.clock())
        before = device.store_bytes()
        with connect(lst.address) as c, pytest.raises(RemoteError) as err:
            c.apply(resp)
        assert err.value.exit_code == UnknownRequestError.exit_code
        assert err.value.reason == UnknownRequestError.reason
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(device.clock()))
        assert f"request {req_nonce(req)}… was replaced by a newer one at {when}" in str(err.value)
        assert device.store_bytes() == before


def req_nonce(req: bytes) -> str:
    from agent.messages import Request
    from agent.protocol import self_signed_payload

    payload, _key = self_signed_payload(req, Request)
    return payload.nonce.hex()[:12]


# ---------------------------------------------------------------- https://


@contextmanager
def https_served(device: Device, pki: Pki, **ctx: Any) -> Iterator[tuple[Any, list[str]]]:
    from hw.backends.https import HttpsListener

    lines: list[str] = []
    url = f"https://127.0.0.1:0?cert={pki.server_cert}&key={pki.server_key}&ca={pki.ca_cert}"
    lst = listen(url, AgentOps(device.agent), log=lines.append, **ctx)
    assert isinstance(lst, HttpsListener)
    lst.start()
    try:
        yield lst, lines
    finally:
        lst.stop()


def https_client(address: str, pki: Pki) -> Any:
    return connect(f"{address}?ca={pki.ca_cert}&cert={pki.client_cert}&key={pki.client_key}")


def tls_raw(address: str, pki: Pki) -> socket.socket:
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    return ctx.wrap_socket(raw(address.replace("https://", "tcp://")),
                           server_hostname="127.0.0.1")


def test_https_request_a_byte_a_second_is_dropped(device: Device, pki: Pki) -> None:
    with https_served(device, pki, idle_timeout=2) as (lst, lines), \
            tls_raw(lst.address, pki) as slow:
        request = b"GET /v1/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"x" * 40
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(trickle(slow, request)))
        t.start()
        try:
            while t.is_alive():  # served all along
                with https_client(lst.address, pki) as good:
                    assert good.status()["sequence"] == 0
                t.join(timeout=0.5)
        finally:
            t.join(timeout=WAIT * 6)
        assert result and result[0] < len(request), "the trickling client was never cut"
        assert any("no complete request within 2 s" in line for line in lines), lines
        assert lst.dropped == 1


def test_https_handshakes_never_finished_do_not_lock_out_a_real_client(device: Device,
                                                                      pki: Pki) -> None:
    with https_served(device, pki, max_clients=2, max_handshakes=8, max_per_peer=100,
                      handshake_timeout=1.5) as (lst, lines):
        idle = [raw(lst.address.replace("https://", "tcp://")) for _ in range(40)]
        try:
            assert closed_by_server(idle[0])  # made room for newer ones
            with https_client(lst.address, pki) as a, https_client(lst.address, pki) as b:
                assert a.status()["sequence"] == 0 and b.status()["sequence"] == 0
            # and the rest are dropped at their handshake deadline
            assert closed_by_server(idle[-1])
        finally:
            for s in idle:
                s.close()
        made_room = sum("TLS handshakes under way" in line for line in lines)
        too_slow = sum("no TLS handshake within 1.5 s" in line for line in lines)
        assert made_room >= 1 and too_slow >= 1, lines
        assert made_room + too_slow == 40 == lst.dropped, lines


def test_https_per_peer_limit(device: Device, pki: Pki) -> None:
    with https_served(device, pki, max_per_peer=2, handshake_timeout=60) as (lst, lines):
        idle = raw(lst.address.replace("https://", "tcp://"))
        try:
            with https_client(lst.address, pki) as a, https_client(lst.address, pki) as b:
                assert a.status()["sequence"] == 0
                assert b.status()["sequence"] == 0  # the second from there: the idle one goes
                assert closed_by_server(idle)
                assert lst.dropped == 1
                from agent.rpc import TransportError

                with https_client(lst.address, pki) as c, pytest.raises(TransportError):
                    c.status()
                assert a.check("x")["licensed"] is False
        finally:
            idle.close()
        assert any("max_per_peer" in line and "refused" in line for line in lines), lines


def test_https_requests_carry_the_client_certificate_as_origin(device: Device,
                                                               pki: Pki) -> None:
    with https_served(device, pki) as (lst, _lines), https_client(lst.address, pki) as c:
        c.request("activate", ["bacnet"])
    (o,) = device.agent.status()["outstanding_requests"]
    assert o["origin"].startswith("https cert CN=admin sha256:")

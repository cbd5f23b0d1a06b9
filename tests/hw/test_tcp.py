"""tcp:// and tls:// on real loopback sockets: round trips, mutual TLS, limits and hostile peers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from agent.cose import canonical
from agent.errors import AddressInUseError, UsageError
from agent.ops import AgentOps
from agent.rpc import RemoteError, TransportError
from hw import connect, listen
from hw.backends.tcp import TcpListener
from hw.framing import encode_frame
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device
from tests.support.pki import Pki, make_pki

WAIT = 10.0  # generous bound for anything that must happen "soon"; never asserted as a time


def q(**opts: object) -> str:
    return "?" + urlencode({k: str(v) for k, v in opts.items()}, safe="/")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other-pki"), site="elsewhere")


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    yield
    left = [t.name for t in threading.enumerate()
            if t.name.split(" ")[0] in ("accept", "serve", "refuse")]
    assert not left, f"listener threads still running: {left}"


@contextmanager
def served(device: Device, url: str, **ctx: Any) -> Iterator[TcpListener]:
    lst = listen(url, AgentOps(device.agent), **ctx)
    assert isinstance(lst, TcpListener)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()


def tls_server_url(pki: Pki, **extra: object) -> str:
    return "tls://127.0.0.1:0" + q(cert=pki.server_cert, key=pki.server_key, ca=pki.ca_cert,
                                  **extra)


def tls_client_url(address: str, pki: Pki, cert: bool = True) -> str:
    if cert:
        return address + q(ca=pki.ca_cert, cert=pki.client_cert, key=pki.client_key)
    return address + q(ca=pki.ca_cert)


def wait_until(cond: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < deadline, f"gave up waiting: {what}"
        time.sleep(0.01)


def activate_and_check(device: Device, url: str) -> None:
    with connect(url) as c:
        st = c.status()
        assert st["sequence"] == 0 and st["device_id"] == device.agent.status()["device_id"]
        req = c.request("activate", ["bacnet"])
        resp = device.vendor.issue(req, [Grant("bacnet", 3)], now=device.clock())
        out = c.apply(resp)
        assert out["sequence"] == 1 and not out["already_applied"]
        assert c.apply(resp)["already_applied"] is True
        assert c.check("bacnet")["licensed"] is True
        assert c.check("modbus")["licensed"] is False
    assert device.agent.status()["sequence"] == 1


# ---------------------------------------------------------------- round trips


def test_tcp_round_trip(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst:
        assert lst.address.startswith("tcp://127.0.0.1:") and not lst.address.endswith(":0")
        activate_and_check(device, lst.address)


def test_tls_round_trip_with_client_certificate(device: Device, pki: Pki) -> None:
    with served(device, tls_server_url(pki)) as lst:
        assert lst.address.startswith("tls://127.0.0.1:")
        activate_and_check(device, tls_client_url(lst.address, pki))
        cert, key = pki.client("device-42")
        with connect(lst.address + q(ca=pki.ca_cert, cert=cert, key=key)) as c:
            assert c.check("bacnet")["licensed"] is True


def test_tls_without_client_ca_serves_any_client(device: Device, pki: Pki) -> None:
    url = "tls://127.0.0.1:0" + q(cert=pki.server_cert, key=pki.server_key)
    with served(device, url) as lst, connect(lst.address + q(ca=pki.ca_cert)) as c:
        assert c.status()["sequence"] == 0


def test_tls_client_certificate_optional(device: Device, pki: Pki) -> None:
    with served(device, tls_server_url(pki, require_client_cert="false")) as lst:
        with connect(tls_client_url(lst.address, pki, cert=False)) as c:
            assert c.status()["sequence"] == 0
        with connect(tls_client_url(lst.address, pki)) as c:
            assert c.status()["sequence"] == 0


def test_tls_refuses_client_without_certificate(device: Device, pki: Pki) -> None:
    with served(device, tls_server_url(pki)) as lst:
        with pytest.raises(TransportError), connect(tls_client_url(lst.address, pki, False),
                                                    timeout=0.5, tries=2) as c:
            c.status()
        with connect(tls_client_url(lst.address, pki)) as c:  # the listener is unharmed
            assert c.status()["sequence"] == 0


def test_tls_refuses_wrong_ca(device: Device, pki: Pki, other_pki: Pki) -> None:
    with served(device, tls_server_url(pki)) as lst:
        # the client does not trust the server's CA
        with pytest.raises(TransportError, match="TLS handshake"):
            connect(tls_client_url(lst.address, other_pki))
        # the server does not trust the client's CA
        url = lst.address + q(ca=pki.ca_cert, cert=other_pki.client_cert,
                              key=other_pki.client_key)
        with pytest.raises(TransportError), connect(url, timeout=0.5, tries=2) as c:
            c.status()
        with connect(tls_client_url(lst.address, pki)) as c:
            assert c.status()["sequence"] == 0


# ---------------------------------------------------------------- usage errors


@pytest.mark.parametrize(("url", "named"), [
    ("tcp://127.0.0.1:1?bogus=1", "bogus"),
    ("tcp://127.0.0.1:1?ca=/x", "ca"),  # a tls:// option on tcp://
    ("tls://127.0.0.1:1?colour=red", "colour"),
    ("tcp://127.0.0.1:1?timeout=soon", "timeout"),
    ("tcp://127.0.0.1", "port"),
    ("tls://127.0.0.1:1?key=/x", "cert"),
])
def test_connect_refuses_bad_options(url: str, named: str) -> None:
    with pytest.raises(UsageError, match=named):
        connect(url)


@pytest.mark.parametrize(("url", "named"), [
    ("tcp://127.0.0.1:0?backlog=5", "backlog"),
    ("tcp://127.0.0.1:0?max_clients=0", "max_clients"),
    ("tcp://127.0.0.1:0?idle_timeout=-1", "idle_timeout"),
    ("tls://127.0.0.1:0", "cert"),
    ("tls://127.0.0.1:0?cert=/nonexistent.pem&key=/nonexistent.key", "cannot load"),
])
def test_listen_refuses_bad_options(device: Device, url: str, named: str) -> None:
    with pytest.raises(UsageError, match=named):
        listen(url, AgentOps(device.agent))


def test_tls_require_client_cert_needs_ca(device: Device, pki: Pki) -> None:
    url = "tls://127.0.0.1:0" + q(cert=pki.server_cert, key=pki.server_key,
                                  require_client_cert="true")
    with pytest.raises(UsageError, match="ca="):
        listen(url, AgentOps(device.agent))


def test_connect_to_nothing_is_a_transport_error(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst:
        address = lst.address
    with pytest.raises(TransportError, match="cannot connect"):
        connect(address)


def test_address_in_use_is_reported(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst:
        with pytest.raises(AddressInUseError, match=r"cannot listen .* address already in use"
                           ) as caught:
            served_again = listen(lst.address, AgentOps(device.agent))
            served_again.start()
        assert caught.value.exit_code == 2  # as licserver serve and licsim (README)


# ---------------------------------------------------------------- many clients, limits


def test_forty_concurrent_clients(device: Device) -> None:
    device.activate(bacnet=3)
    n = 40
    barrier = threading.Barrier(n, timeout=WAIT)
    results: list[tuple[int, bool]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    # all forty come from 127.0.0.1: the per-address limit (8 by default) is raised
    with served(device, "tcp://127.0.0.1:0?max_per_peer=40") as lst:
        def client() -> None:
            try:
                with connect(lst.address) as c:
                    c.status()
                    barrier.wait()  # all 40 connected and greeted at once
                    seq = c.status()["sequence"]
                    ok = c.check("bacnet")["licensed"]
                    with lock:
                        results.append((seq, ok))
            except BaseException as exc:
                with lock:
                    errors.append(exc)

        threads = [threading.Thread(target=client) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
    assert not errors
    assert results == [(1, True)] * n


def test_over_max_clients_is_refused_busy_others_complete(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0?max_clients=3") as lst:
        clients = [connect(lst.address) for _ in range(3)]
        try:
            for c in clients:
                assert c.status()["sequence"] == 0  # each is being served now
            with connect(lst.address) as extra, pytest.raises(RemoteError) as err:
                extra.status()
            assert err.value.reason == "busy" and err.value.exit_code == 1
            assert "try again later" in str(err.value)
            for c in clients:  # the three were not stalled by the refusal
                assert c.check("bacnet")["licensed"] is False
            clients.pop().close()
            wait_until(lambda: lst.connections < 3, "a slot is free again")
            with connect(lst.address) as late:
                assert late.status()["sequence"] == 0
        finally:
            for c in clients:
                c.close()


def test_tls_over_max_clients_is_refused_busy(device: Device, pki: Pki) -> None:
    with served(device, tls_server_url(pki, max_clients=1)) as lst:
        with connect(tls_client_url(lst.address, pki)) as first:
            assert first.status()["sequence"] == 0
            with connect(tls_client_url(lst.address, pki)) as extra, \
                    pytest.raises(RemoteError, match="busy"):
                extra.status()
            assert first.check("x")["licensed"] is False


def test_max_clients_default_from_context(device: Device) -> None:
    """The daemon's max_clients is the default; the URL's own option wins over it."""
    with served(device, "tcp://127.0.0.1:0", max_clients=1) as lst:
        assert lst.config.max_clients == 1
    with served(device, "tcp://127.0.0.1:0?max_clients=5", max_clients=1) as lst:
        assert lst.config.max_clients == 5
    with served(device, "tcp://127.0.0.1:0") as lst:
        assert lst.config.max_clients == 64


# ---------------------------------------------------------------- hostile peers


def raw(address: str) -> socket.socket:
    host, port = address.removeprefix("tcp://").removeprefix("tls://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=WAIT)
    return s


def hello_frame(rid: int = 7) -> bytes:
    return encode_frame(canonical({"v": 1, "id": rid, "op": "hello",
                                   "args": {"versions": [1]}}))


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed ``s`` (EOF or reset), reading and dropping any data."""
    s.settimeout(WAIT)
    try:
        while s.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_garbage_sender_is_dropped_others_unharmed(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst:
        with connect(lst.address) as bystander:
            assert bystander.status()["sequence"] == 0
            with raw(lst.address) as g:
                g.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\x00" + bytes(range(256)) * 4)
                assert closed_by_server(g)
            assert bystander.check("bacnet")["licensed"] is False
        with connect(lst.address) as after:
            assert after.status()["sequence"] == 0
        wait_until(lambda: lst.connections == 0, "every connection is gone")


def test_endless_garbage_without_delimiter_does_not_stall_others(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst, raw(lst.address) as g:
        g.sendall(b"\xff" * 200_000)  # no frame ever ends: buffered up to the frame limit only
        with connect(lst.address) as c:
            assert c.status()["sequence"] == 0


def test_disconnect_mid_frame_does_not_harm_next_client(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst:
        with raw(lst.address) as s:
            frame = hello_frame()
            s.sendall(frame[: len(frame) // 2])
        with raw(lst.address) as s:  # and one that leaves after its request, before the answer
            s.sendall(hello_frame())
            s.sendall(encode_frame(canonical({"v": 1, "id": 8, "op": "get-status", "args": {}})))
        with connect(lst.address) as c:
            assert c.status()["sequence"] == 0
        wait_until(lambda: lst.connections == 0, "the broken connections are cleaned up")


def test_plain_bytes_to_tls_listener_do_not_harm_next_client(device: Device, pki: Pki) -> None:
    with served(device, tls_server_url(pki)) as lst:
        with raw(lst.address) as s:
            s.sendall(hello_frame())  # not a TLS ClientHello
            assert closed_by_server(s)
        with raw(lst.address):
            pass  # connects and leaves before any handshake
        with connect(tls_client_url(lst.address, pki)) as c:
            assert c.status()["sequence"] == 0


def test_stop_does_not_wait_for_a_peer_stalled_in_the_tls_handshake(device: Device,
                                                                    pki: Pki) -> None:
    with served(device, tls_server_url(pki)) as lst, raw(lst.address) as s:
        wait_until(lambda: lst.connections == 1, "the silent peer is admitted")
        lst.stop()  # leaves no thread behind (checked after every test)
        assert closed_by_server(s)


def test_silent_peer_is_dropped_after_idle_timeout(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0?idle_timeout=0.3") as lst, raw(lst.address) as s:
        assert closed_by_server(s)
        wait_until(lambda: lst.connections == 0, "the idle connection is gone")


def test_stop_closes_connections_and_listening_socket(device: Device) -> None:
    with served(device, "tcp://127.0.0.1:0") as lst:
        c = connect(lst.address, timeout=0.5, tries=1)
        assert c.status()["sequence"] == 0
        address = lst.address
    try:
        with pytest.raises(TransportError):
            c.status()
    finally:
        c.close()
    with pytest.raises(TransportError):
        connect(address)


def test_tls_client_certificate_files_are_checked(pki: Pki, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(UsageError, match="cannot load"):
        connect("tls://127.0.0.1:1" + q(ca=bad))

"""``tcp://HOST:PORT`` and ``tls://HOST:PORT``: the RPC over a LAN socket, optionally mutual TLS.

Client options: ``timeout`` (seconds per try and for connecting), and for
``tls://`` ``ca`` (the CA that signed the server's certificate; the system CAs
if absent), ``cert`` and ``key`` (the client certificate to present).

Listener options: ``max_clients`` (sessions served at once, default 64),
``max_per_peer`` (connections from one source address, default 8),
``max_pending`` (connections not yet through their TLS handshake and ``hello``,
default 64), ``hello_timeout`` (seconds from connecting to an answered
``hello``, TLS handshake included, default 10), ``frame_timeout`` (seconds from
a request's first byte to its last, default 30), ``idle_timeout`` (seconds
between two requests, default 300), and for ``tls://`` ``cert`` and ``key``
(the server certificate, required), ``ca`` (the CA of client certificates) and
``require_client_cert`` (default true when ``ca`` is given).

One thread accepts; each connection is served by its own thread running
:func:`hw.link.serve_stream`, and the TLS handshake happens in that thread, so
a silent or slow peer never stalls the others.

Cheap peers: a connection counts against ``max_clients`` only once its TLS
handshake is done and its ``hello`` answered; until then it is *pending*, and
must get there within ``hello_timeout``. When ``max_pending`` connections are
pending, a new one makes the oldest pending one close; when ``max_per_peer``
connections from one address are open, a new one from there closes that
address's oldest pending one, or, if all of them are in session, is refused.
So idle or trickling peers cannot hold the slots a real client needs, and a
peer sending a byte a second misses ``frame_timeout`` (or, sending only
delimiters, ``idle_timeout``) and is dropped.

Busy refusal: a ``hello`` beyond ``max_clients`` is answered with an RPC error
(reason ``busy``, exit code 1, "try again later") and the connection closed;
so is one from an address over ``max_per_peer`` (by a short-lived thread with a
hard deadline); the client sees a :class:`~hw.rpc.RemoteError` saying so
instead of a bare reset. If even the refusers are all busy (a flood), the
connection is closed at once.

Each connection's requests carry its origin (:func:`agent.rpc.for_origin`):
``tcp HOST``, ``tls HOST``, or ``tls cert CN=NAME sha256:FINGERPRINT`` for a
client certificate, so outstanding requests are kept per peer.

A TCP or TLS peer cannot lose sync or suffer line noise, so a frame that fails
its checksum or is not an RPC message means a confused or hostile peer: the
connection is dropped at the first one.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agent.errors import LicensingError, UsageError, listen_error
from agent.record import field, record
from agent.rpc import Handler, RpcAnswer, TransportError, decode_message, for_origin
from hw.framing import Frame, FrameDecoder, encode_frame
from hw.link import (
    Link,
    LinkURL,
    Listener,
    SessionDeadlines,
    StreamClient,
    netloc,
    serve_stream,
)
from hw.tls import client_context, origin_of, server_context

if TYPE_CHECKING:
    import ssl

__all__ = [
    "DEFAULT_MAX_CLIENTS",
    "SocketLink",
    "TcpListener",
    "connect",
    "listen",
]


DEFAULT_MAX_CLIENTS = 64
DEFAULT_MAX_PER_PEER = 8
DEFAULT_MAX_PENDING = 64
DEFAULT_IDLE_TIMEOUT = 300.0
#: the TLS handshake and the first hello must be done within this many seconds
DEFAULT_HELLO_TIMEOUT = 10.0
#: a request's frame must arrive whole within this many seconds (80 KiB at 2.7 KiB/s)
DEFAULT_FRAME_TIMEOUT = 30.0
REFUSE_DEADLINE = 2.0
MAX_REFUSERS = 8
#: a peer that does not take our answer within this many seconds is dropped
WRITE_TIMEOUT = 10.0
#: connections the kernel holds until accept(); those over max_clients are then refused
LISTEN_BACKLOG = 128

CLIENT_OPTIONS = {"tcp": ("timeout",), "tls": ("timeout", "ca", "cert", "key")}
_SESSION_OPTIONS = ("max_clients", "max_per_peer", "max_pending", "hello_timeout",
                    "frame_timeout", "idle_timeout")
LISTEN_OPTIONS = {
    "tcp": _SESSION_OPTIONS,
    "tls": (*_SESSION_OPTIONS, "cert", "key", "ca", "require_client_cert"),
}



# ---------------------------------------------------------------- options


def _host(url: LinkURL) -> str:
    if not url.host:
        raise UsageError(f"{url.text}: a host is needed ({url.scheme}://HOST:PORT)")
    return url.host


def _url_of(scheme: str, sockname: tuple[Any, ...]) -> str:
    return f"{scheme}://{netloc(str(sockname[0]), int(sockname[1]))}"


# ---------------------------------------------------------------- the stream


class SocketLink(Link):
    """A connected (TLS) socket as a :class:`~hw.link.Link`.

    Args:
        sock: a connected socket, already through its TLS handshake if any.
        peer: the other end's address, for messages.
    """

    def __init__(self, sock: socket.socket, peer: str = "") -> None:
        self.sock = sock
        self.peer = peer
        # ssl is imported only when a tls:// link exists (it costs ~5 MB of RSS on a
        # controller that serves plain tcp:// and serial only)
        ssl_mod = sys.modules.get("ssl")
        self._quiet: tuple[type[BaseException], ...] = (TimeoutError, BlockingIOError)
        if ssl_mod is not None and isinstance(sock, ssl_mod.SSLSocket):
            self._quiet += (ssl_mod.SSLWantReadError,)

    def _write(self, data: bytes) -> None:
        self.sock.settimeout(WRITE_TIMEOUT)
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise TransportError(f"the peer took no data for {WRITE_TIMEOUT:g} s") from exc

    def _read(self, timeout: float) -> bytes:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except self._quiet:
            return b""
        except ValueError as exc:  # an SSL socket closed under us
            raise TransportError(f"read failed: {exc}") from exc
        if not data:
            raise TransportError("the connection was closed by the other end")
        return data

    def _close(self) -> None:
        _close_socket(self.sock)


def _close_socket(sock: socket.socket) -> None:
    try:
        # bypass SSLSocket.shutdown: no close_notify exchange with a peer that may be gone
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


# ---------------------------------------------------------------- client side


def connect(url: LinkURL, timeout: float = 2.0, tries: int = 4, **_ctx: Any) -> StreamClient:
    """Connect to a ``tcp://`` or ``tls://`` listener.

    Raises:
        UsageError: an unknown or bad option, unreadable TLS files.
        TransportError: nothing listens there, or the TLS handshake failed.
    """
    url.check_options(CLIENT_OPTIONS[url.scheme])
    host, port = _host(url), url.need_port()
    timeout = url.seconds("timeout", timeout)
    ctx = client_context(url) if url.scheme == "tls" else None
    try:
        sock = socket.create_connection((host, port), timeout=max(timeout, 1.0))
    except OSError as exc:
        raise TransportError(f"cannot connect to {url.text}: {exc}") from exc
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=host)
    except OSError as exc:  # ssl.SSLError is an OSError
        sock.close()
        raise TransportError(f"TLS handshake with {url.text} failed: {exc}") from exc
    return StreamClient(SocketLink(sock, peer=url.text), timeout=timeout, tries=tries)


# ---------------------------------------------------------------- server side


@record(frozen=True)
class ListenConfig:
    """The listener's settings, read from its URL (and the daemon's defaults)."""

    host: str
    port: int
    max_clients: int
    idle_timeout: float
    tls: ssl.SSLContext | None
    max_per_peer: int = DEFAULT_MAX_PER_PEER
    max_pending: int = DEFAULT_MAX_PENDING
    hello_timeout: float = DEFAULT_HELLO_TIMEOUT
    frame_timeout: float = DEFAULT_FRAME_TIMEOUT


def _server_context(url: LinkURL) -> ssl.SSLContext:
    return server_context(url, "tls://HOST:PORT?cert=PATH&key=PATH",
                          url.flag("require_client_cert", bool(url.option("ca"))))


def _busy_reply(decoder: FrameDecoder, data: bytes, message: str) -> bytes | None:
    """The error answer to the first RPC request in ``data``, if it is there yet."""
    for ev in decoder.feed(data):
        if not isinstance(ev, Frame):
            return b""  # not a client of ours: just close
        try:
            msg = decode_message(ev.payload, 4096)
        except LicensingError:
            return b""
        return encode_frame(RpcAnswer.refusal(msg.id, 1, "busy", message).encode())
    return None


@record
class _Conn:
    """One accepted connection: its socket (the TLS one once wrapped), the address it
    comes from, and how far it got."""

    sock: socket.socket
    host: str
    #: through its TLS handshake: a stop lets its operation in progress finish
    serving: bool = False
    #: through its hello: counted against max_clients
    admitted: bool = False
    #: closed to make room for a newer connection (counted nowhere any more)
    evicted: bool = False
    #: when it was accepted (time.monotonic): the hello deadline counts from here
    accepted: float = field(default_factory=time.monotonic)


def _shutdown(sock: socket.socket) -> None:
    """Wake up a thread blocked on ``sock`` (its own thread closes it)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class TcpListener(Listener):
    """Accepts connections on one address and serves each in its own thread."""

    def __init__(self, url: LinkURL, handler: Handler, config: ListenConfig,
                 log: Callable[[str], None] | None = None) -> None:
        self.url = url
        self.handler = handler
        self.config = config
        self.log = log or (lambda _line: None)
        self.stop_event = threading.Event()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._accepter: threading.Thread | None = None
        self._conns: dict[threading.Thread, _Conn] = {}
        self._refusers: set[threading.Thread] = set()
        #: connections dropped by :meth:`cut` (a link fault), over the listener's life
        self.cuts = 0
        #: pending connections closed to make room for newer ones (max_pending, max_per_peer)
        self.evicted = 0
        #: connections dropped for missing a deadline (hello, frame, idle)
        self.dropped = 0

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        cfg = self.config
        # an ASCII name goes in as bytes: a str would load the IDNA codec (and with it
        # unicodedata, ~250 KB of the daemon's memory) for every listener
        host: str | bytes = cfg.host.encode("ascii") if cfg.host.isascii() else cfg.host
        try:
            infos = socket.getaddrinfo(host, cfg.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError as exc:
            raise UsageError(f"{self.url.text}: cannot resolve {cfg.host}: {exc}") from exc
        family, _type, _proto, _name, addr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise listen_error(self.url.text, exc) from exc
        # accept() wakes up this often to notice stop() where shutdown() does not wake it
        sock.settimeout(0.2)
        self._sock = sock
        self.address = _url_of(self.url.scheme, sock.getsockname())
        self._accepter = threading.Thread(target=self._accept_loop, daemon=True,
                                          name=f"accept {self.address}")
        self._accepter.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._sock is not None:
            _shutdown(self._sock)  # wakes accept() at once on Linux
        if self._accepter is not None:
            self._accepter.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        with self._lock:
            threads = [*self._conns, *self._refusers]
            handshaking = [c.sock for c in self._conns.values() if not c.serving]
        for s in handshaking:  # nothing in progress there: do not wait for their timeout
            _shutdown(s)
        # serve_stream notices the event within its poll; an operation in progress finishes
        deadline = time.monotonic() + 10
        for t in threads:
            t.join(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:
            stuck = [c.sock for c in self._conns.values()]
        for s in stuck:  # a peer that will not take our last answer: cut it off
            _shutdown(s)
        for t in threads:
            t.join(timeout=1)

    def cut(self) -> int:
        """Fault hook: shut down every admitted connection; the listener keeps accepting."""
        with self._lock:
            socks = [c.sock for c in self._conns.values()]
        for s in socks:
            _shutdown(s)
        self.cuts += len(socks)
        return len(socks)

    @property
    def connections(self) -> int:
        """Connections open now, in session or pending (those refused as busy not counted)."""
        with self._lock:
            return sum(1 for c in self._conns.values() if not c.evicted)

    @property
    def sessions(self) -> int:
        """Connections through their TLS handshake and ``hello`` (counted in max_clients)."""
        with self._lock:
            return sum(1 for c in self._conns.values() if c.admitted and not c.evicted)

    # ------------------------------------------------------------ threads

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self.stop_event.is_set():
            try:
                conn, peer = self._sock.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                if self.stop_event.is_set():
                    return
                # EMFILE and friends: back off instead of spinning, keep serving the others
                self.log(f"{self.address}: accept failed: {exc}")
                self.stop_event.wait(0.5)
                continue
            name = _url_of(self.url.scheme, peer).split("://", 1)[1]
            try:
                self._admit(conn, name, str(peer[0]))
            except (OSError, RuntimeError) as exc:  # a peer already gone; no thread to spare
                self.log(f"{self.address}: {name}: not admitted: {exc}")
                conn.close()

    def _evict(self, victim: _Conn, peer: str, why: str) -> None:
        """Close a pending connection to make room (under the lock); its thread ends."""
        victim.evicted = True
        _shutdown(victim.sock)
        self.evicted += 1
        self.log(f"{self.address}: a pending connection from {victim.host} closed: {why} "
                 f"(for {peer})")

    def _admit(self, conn: socket.socket, peer: str, host: str) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cfg = self.config
        with self._lock:
            live = [c for c in self._conns.values() if not c.evicted]
            mine = [c for c in live if c.host == host]
            refuse = None
            if len(mine) >= cfg.max_per_peer:
                waiting = [c for c in mine if not c.admitted]
                if waiting:
                    self._evict(waiting[0], peer, f"{cfg.max_per_peer} connections from "
                                                  f"{host} (max_per_peer)")
                    live.remove(waiting[0])
                else:
                    refuse = (f"too many connections from {host}: {cfg.max_per_peer} are in "
                              f"session (max_per_peer); try again later")
            if refuse is None:
                pending = [c for c in live if not c.admitted]
                if len(pending) >= cfg.max_pending:
                    self._evict(pending[0], peer, f"{cfg.max_pending} connections without "
                                                  f"hello (max_pending)")
            if refuse is not None and len(self._refusers) >= MAX_REFUSERS:
                self.log(f"{self.address}: {peer}: closed at once, {refuse}; "
                         f"refusals pending")
                conn.close()
                return
            if refuse is not None:
                t = threading.Thread(target=self._refuse, args=(conn, peer, refuse),
                                     daemon=True, name=f"refuse {peer}")
                self._refusers.add(t)
            else:
                t = threading.Thread(target=self._serve, args=(conn, peer), daemon=True,
                                     name=f"serve {peer}")
                self._conns[t] = _Conn(conn, host)
            try:
                t.start()
            except RuntimeError:
                self._refusers.discard(t)
                self._conns.pop(t, None)
                raise

    def _handshake(self, conn: socket.socket, timeout: float,
                   record: _Conn | None = None) -> socket.socket:
        """The TLS handshake (for tls://), bounded by ``timeout``; closes ``conn`` if it fails."""
        if self.config.tls is None:
            return conn
        conn.settimeout(max(timeout, 0.001))
        try:
            tls = self.config.tls.wrap_socket(conn, server_side=True,
                                              do_handshake_on_connect=False)
        except (OSError, ValueError):
            _close_socket(conn)
            raise
        if record is not None:
            with self._lock:
                record.sock = tls  # conn is detached now: stop() must reach the TLS socket
                if record.evicted:  # evicted while we were wrapping: the shutdown missed it
                    _shutdown(tls)
        try:
            tls.do_handshake()
        except BaseException:
            _close_socket(tls)
            raise
        return tls

    def _admit_session(self, record: _Conn, peer: str) -> str | None:
        """``admit`` of the session: count it against max_clients once its hello succeeds."""
        cfg = self.config
        with self._lock:
            if record.evicted:
                return "the connection was closed to make room"
            inside = sum(1 for c in self._conns.values() if c.admitted and not c.evicted)
            if inside >= cfg.max_clients:
                self.log(f"{self.address}: {peer}: refused, {cfg.max_clients} clients connected")
                return (f"server busy: {cfg.max_clients} clients are connected "
                        f"(max_clients); try again later")
            record.admitted = True
            return None

    def _serve(self, conn: socket.socket, peer: str) -> None:
        me = threading.current_thread()
        cfg = self.config
        with self._lock:
            record = self._conns[me]
        host = record.host
        try:
            try:
                conn = self._handshake(conn, cfg.hello_timeout, record)
            except (OSError, ValueError) as exc:
                if not self.stop_event.is_set() and not record.evicted:
                    self.log(f"{self.address}: {peer}: TLS handshake failed: {exc}")
                return
            link = SocketLink(conn, peer=peer)
            with self._lock:
                record.serving = True
            origin = origin_of(self.url.scheme, conn, host)

            def dropped(n: int) -> None:
                self.log(f"{self.address}: {peer}: {n} corrupt frame(s); dropping the connection")
                link.close()

            limits = SessionDeadlines(hello=cfg.hello_timeout, frame=cfg.frame_timeout,
                                      idle=cfg.idle_timeout)
            try:
                why = serve_stream(link, for_origin(self.handler, origin), self.stop_event,
                                   on_corrupt=dropped, deadlines=limits,
                                   admit=lambda: self._admit_session(record, peer),
                                   since=record.accepted)
                # (a refused hello was logged by _admit_session, an eviction by _evict)
                if why is not None and not record.evicted and not why.startswith("refused"):
                    self.dropped += 1
                    self.log(f"{self.address}: {peer}: {why}")
            except Exception as exc:  # a failing handler must not take the listener down
                self.log(f"{self.address}: {peer}: connection dropped: {exc!r}")
            finally:
                link.close()
        finally:
            with self._lock:
                self._conns.pop(me, None)

    def _refuse(self, conn: socket.socket, peer: str, message: str) -> None:
        deadline = time.monotonic() + REFUSE_DEADLINE
        self.log(f"{self.address}: {peer}: refused, {message}")
        try:
            conn = self._handshake(conn, REFUSE_DEADLINE)
            decoder = FrameDecoder(4096)
            while time.monotonic() < deadline and not self.stop_event.is_set():
                conn.settimeout(max(0.01, min(0.2, deadline - time.monotonic())))
                try:
                    data = conn.recv(4096)
                except TimeoutError:
                    continue
                if not data:
                    break
                reply = _busy_reply(decoder, data, message)
                if reply is not None:
                    conn.settimeout(max(0.01, deadline - time.monotonic()))
                    conn.sendall(reply)
                    break
        except (OSError, ValueError):
            pass
        finally:
            _close_socket(conn)
            with self._lock:
                self._refusers.discard(threading.current_thread())


def listen(url: LinkURL, handler: Handler, max_clients: int | None = None,
           log: Callable[[str], None] | None = None, max_per_peer: int | None = None,
           **_ctx: Any) -> TcpListener:
    """A not yet started listener for ``tcp://HOST:PORT`` or ``tls://HOST:PORT`` (port 0: any).

    Args:
        max_clients: the default when the URL has no ``max_clients`` option.
        max_per_peer: the default when the URL has no ``max_per_peer`` option.
        log: called with one line for each refused or dropped connection.

    Raises:
        UsageError: an unknown or bad option, missing or unreadable TLS files.
    """
    url.check_options(LISTEN_OPTIONS[url.scheme])
    config = ListenConfig(
        host=_host(url),
        port=url.need_port(),
        max_clients=url.whole("max_clients", max_clients or DEFAULT_MAX_CLIENTS),
        idle_timeout=url.seconds("idle_timeout", DEFAULT_IDLE_TIMEOUT),
        tls=_server_context(url) if url.scheme == "tls" else None,
        max_per_peer=url.whole("max_per_peer", max_per_peer or DEFAULT_MAX_PER_PEER),
        max_pending=url.whole("max_pending", DEFAULT_MAX_PENDING),
        hello_timeout=url.seconds("hello_timeout", DEFAULT_HELLO_TIMEOUT),
        frame_timeout=url.seconds("frame_timeout", DEFAULT_FRAME_TIMEOUT),
    )
    return TcpListener(url, handler, config, log)

"""The paho side of ``mqtt://``: one epoll thread driving many paho clients, and one kept-connected session.

One thread, many clients: paho's own ``loop_start`` makes a thread per client
and waits with ``select()``, which fails for descriptors above 1023, so a
process holding a thousand simulated devices could not use it. Here
:class:`MqttLoop` drives any number of paho clients from one thread with epoll
(paho's external-loop callbacks). Each listener or client of
:mod:`hw.backends.mqtt` makes its own loop unless one is passed in (``loop=``,
e.g. a fleet simulator's); operations run in that loop's thread, one at a time.

:class:`Session` is one paho client that the loop keeps connected, reconnecting
with :class:`~hw.backends.mqtt_contract.Backoff`; its owner (listener, client,
site session) sets hooks for connecting, messages and losing the connection.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) and 1.6 (Debian bookworm) both work.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as _paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as _PahoProperties

from agent.rpc import TransportError
from hw.backends.mqtt_contract import MAX_PACKET, Backoff, Log
from hw.backends.mqtt_props import FastProperties, install
from hw.link import netloc

if TYPE_CHECKING:
    import ssl

__all__ = [
    "CLEAN_START_FIRST_ONLY",
    "MISC_INTERVAL",
    "MqttLoop",
    "Session",
    "own_loop",
    "publish_props",
    "wait_connected",
]

# paho 2.x and 1.6 differ in constructor and callback signatures; everything paho is
# reached through this untyped alias and the few adapters below.
_paho: Any = _paho_client
_Properties: Any = _PahoProperties
install()  # paho's decoder makes properties without rebuilding its tables each time
try:
    from paho.mqtt.enums import CallbackAPIVersion as _CallbackAPIVersion

    _VERSION2: Any = _CallbackAPIVersion.VERSION2
except ImportError:  # paho-mqtt 1.6
    _VERSION2 = None

#: a broker session that starts clean once, then resumes (paho's MQTT_CLEAN_START_FIRST_ONLY)
CLEAN_START_FIRST_ONLY: Any = _paho.MQTT_CLEAN_START_FIRST_ONLY

#: loop_misc (keepalive pings, ping timeouts) runs this often for every client
MISC_INTERVAL = 1.0

#: bytes asked of a socket at once (paho asks for one packet's pieces, a few bytes each)
RECV_SIZE = 256 * 1024
#: the most bytes of queued packets joined into one send
SEND_JOIN = 256 * 1024
_PUBLISH, _DISCONNECT = 0x30, 0xE0


class _Client(_paho.Client):  # type: ignore[misc]  # (paho's class, untyped)
    """paho's client reading its socket in large pieces and writing its queue in few sends.

    paho reads each packet with at least three ``recv`` calls (its type byte, each byte
    of its length, the rest) and writes each queued packet with a ``send`` of its own: a
    site session of 10,000 devices hears and sends several packets per device. Here
    ``_sock_recv`` serves paho's small reads from one large ``recv`` of what has
    arrived (:meth:`buffered` tells the loop that bytes wait there, which epoll cannot
    see), and ``_packet_write`` joins the packets waiting to go into one send. paho
    reads and writes the same bytes in the same order, and decides everything else.
    """

    _rbuf = b""
    _rpos = 0
    _rsock: Any = None

    def _sock_recv(self, bufsize: int) -> bytes:
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf) or self._rsock is not self._sock:
            self._rbuf, self._rpos, self._rsock = b"", 0, None  # never a closed socket's bytes
            buf = super()._sock_recv(RECV_SIZE)  # raises as paho expects (would block, lost)
            if len(buf) <= bufsize:
                return bytes(buf)
            self._rsock, pos = self._sock, 0
        out = buf[pos:pos + bufsize]
        pos += len(out)
        if pos >= len(buf):
            self._rbuf, self._rpos = b"", 0
        else:
            self._rbuf, self._rpos = buf, pos
        return bytes(out)

    def buffered(self) -> bool:
        """Whether bytes already received wait for paho to read them."""
        return self._rpos < len(self._rbuf) and self._rsock is self._sock

    def _packet_write(self) -> Any:
        q = self._out_packet
        if len(q) > 1:
            taken: list[Any] = []
            size = 0
            while q and size < SEND_JOIN:
                p = q[0]
                cmd = p["command"] & 0xF0
                if p["pos"] or cmd == _DISCONNECT or (cmd == _PUBLISH and p["qos"] == 0):
                    break  # paho acts when these are written: left to it, one by one
                taken.append(q.popleft())
                size += len(p["packet"])
            if len(taken) > 1:
                joined = b"".join(bytes(p["packet"]) for p in taken)
                # paho does nothing once a packet of this kind is written (a QoS 1
                # publish is done at its PUBACK): the joined bytes go as one packet
                q.appendleft({"command": 0x40, "mid": 0, "qos": 1, "pos": 0,
                              "to_process": len(joined), "packet": joined, "info": None})
            elif taken:
                q.appendleft(taken[0])
        return super()._packet_write()


# ---------------------------------------------------------------- the event loop


class _Timer:
    __slots__ = ("cancelled", "fn")

    def __init__(self, fn: Callable[[], None]) -> None:
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class MqttLoop:
    """One thread driving many paho clients with epoll (paho's external-loop interface).

    Create it, :meth:`start` it, pass it as ``loop=`` to :func:`hw.backends.mqtt.listen`
    (or :func:`~hw.backends.mqtt.connect`), and :meth:`stop` it after its listeners.
    Without one, each listener or client makes and owns its own.

    Args:
        name: the thread's name.
        log: receives a line for each internal error (the loop itself never dies of one).
    """

    def __init__(self, name: str = "mqtt-loop", log: Log | None = None) -> None:
        self.name = name
        self.log: Log = log or (lambda _line: None)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: deque[Callable[[], None]] = deque()
        self._dirty: set[Session] = set()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._sessions: set[Session] = set()
        self._thread: threading.Thread | None = None
        self._ident: int | None = None
        self._stopping = False
        self._closed = False

    # ------------------------------------------------------------ any thread

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the thread; sessions still open are cut off (close them first)."""
        if self._thread is None or self._closed:
            return
        with self._lock:
            self._stopping = True
        self._wake()
        self._thread.join(timeout=30)
        self._closed = True
        for s in list(self._sessions):
            s.abandon()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop thread."""
        with self._lock:
            if self._stopping:
                raise TransportError("the MQTT loop has been stopped")
            self._calls.append(fn)
        self._wake()

    def in_loop(self) -> bool:
        return threading.get_ident() == self._ident

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # already woken, or closing

    def _want_write(self, s: Session) -> None:
        with self._lock:
            self._dirty.add(s)
        if not self.in_loop():
            self._wake()

    # ------------------------------------------------------------ loop thread

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        t = _Timer(fn)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), t))
        return t

    def _register(self, s: Session, sock: Any) -> None:
        try:
            # requests and answers are small and wait for each other: no Nagle delay
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        try:
            self._sel.register(sock, selectors.EVENT_READ, s)
        except (KeyError, ValueError, OSError) as exc:
            self.log(f"mqtt: cannot watch a socket: {exc}")
            return
        s.sock, s.events = sock, selectors.EVENT_READ
        self._dirty.add(s)

    def _unregister(self, s: Session, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        if s.sock is sock:
            s.sock, s.events = None, 0

    def _update(self, s: Session) -> None:
        """Write what is queued if the socket takes it now; watch for writability otherwise."""
        sock = s.sock
        if sock is None or s.client.socket() is not sock:
            return
        if s.client.want_write():
            s.client.loop_write()  # usually all of it at once: no epoll round trip per packet
            if s.sock is not sock or s.client.socket() is not sock:
                return
        want = selectors.EVENT_READ | (selectors.EVENT_WRITE if s.client.want_write() else 0)
        if want != s.events:
            try:
                self._sel.modify(sock, want, s)
                s.events = want
            except (KeyError, ValueError, OSError):
                pass

    def _run(self) -> None:
        self._ident = threading.get_ident()
        next_misc = time.monotonic() + MISC_INTERVAL
        while True:
            with self._lock:
                if self._stopping:
                    break
                calls, self._calls = self._calls, deque()
                dirty, self._dirty = self._dirty, set()
            for fn in calls:
                self._guard(fn)
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _at, _n, t = heapq.heappop(self._timers)
                if not t.cancelled:
                    self._guard(t.fn)
            if now >= next_misc:
                next_misc = now + MISC_INTERVAL
                for s in list(self._sessions):
                    if s.client.socket() is not None:
                        self._guard(s.client.loop_misc)
                        dirty.add(s)
            with self._lock:
                dirty |= self._dirty
                self._dirty = set()
                pending = bool(self._calls)
            for s in dirty:
                self._guard(functools.partial(self._update, s))
            timeout = 0.0 if pending else max(0.0, min(
                next_misc, self._timers[0][0] if self._timers else next_misc) - time.monotonic())
            try:
                events = self._sel.select(timeout)
            except OSError as exc:
                self.log(f"mqtt: select failed: {exc}")
                events = []
            for key, mask in events:
                if key.data is None:
                    self._drain()
                    continue
                self._guard(functools.partial(self._service, key.data, key.fileobj, mask))

    def _service(self, s: Session, sock: Any, mask: int) -> None:
        c = s.client
        if mask & selectors.EVENT_READ and c.socket() is sock:
            c.loop_read()
            # bytes read ahead, or whole decrypted TLS records, that epoll cannot see
            while c.socket() is sock and (c.buffered() or (
                    getattr(sock, "pending", None) and sock.pending() > 0)):
                c.loop_read()
        self._update(s)  # writes, whether or not this was a write event

    def _drain(self) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _guard(self, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:
            self.log(f"mqtt: internal error in the MQTT loop: {exc!r}")


# ---------------------------------------------------------------- one paho client


def _reason(rc: Any) -> tuple[int, str]:
    """(value, name) of a paho reason code, int or object, 2.x or 1.6."""
    value = getattr(rc, "value", rc)
    try:
        return int(value), str(rc)
    except (TypeError, ValueError):
        return 0x80, str(rc)


class Session:
    """One paho client kept connected by an :class:`MqttLoop`, reconnecting with back-off.

    The owner sets the hooks ``on_up`` (connected: subscribe, publish presence),
    ``on_message`` and ``on_down``; they run in the loop thread.
    """

    def __init__(self, loop: MqttLoop, client_id: str, host: str, port: int, keepalive: int,
                 tls: ssl.SSLContext | None, clean_start: Any, session_expiry: int = 0,
                 will: tuple[str, bytes] | None = None, log: Log | None = None) -> None:
        self.loop = loop
        self.client_id = client_id
        self.broker = netloc(host, port)
        self.log: Log = log or (lambda _line: None)
        if _VERSION2 is not None:
            c = _Client(_VERSION2, client_id=client_id, protocol=_paho.MQTTv5)
        else:
            c = _Client(client_id=client_id, protocol=_paho.MQTTv5)
        self.client: Any = c
        if tls is not None:
            c.tls_set_context(tls)
        if will is not None:
            c.will_set(will[0], will[1], qos=1, retain=True)
        c.max_inflight_messages_set(100)
        c.on_socket_open = lambda _c, _u, sock: self.loop._register(self, sock)
        c.on_socket_close = lambda _c, _u, sock: self._socket_closed(sock)
        c.on_socket_register_write = lambda _c, _u, _sock: self.loop._want_write(self)
        c.on_socket_unregister_write = lambda _c, _u, _sock: self.loop._want_write(self)
        c.on_connect = self._connected
        c.on_disconnect = self._disconnected
        c.on_message = lambda _c, _u, msg: self.on_message(msg)
        c.on_subscribe = lambda *_a: self.on_subscribed()
        c.on_publish = self._published
        props = _Properties(PacketTypes.CONNECT)
        # the broker must not send us more than a message of the RPC's size: an oversized
        # request is dropped there instead of being buffered here
        props.MaximumPacketSize = MAX_PACKET
        if session_expiry:
            props.SessionExpiryInterval = session_expiry
        c.connect_async(host, port, keepalive, clean_start=clean_start, properties=props)
        self.backoff = Backoff()
        self.sock: Any = None
        self.events = 0
        self.up = False
        self.up_since = 0.0
        self.closing = False
        self.closed = threading.Event()
        self.first = threading.Event()  # the first attempt's outcome is known
        self.first_error: str | None = None
        self.refused: str | None = None
        self.last_error: str | None = None
        self.ever_up = False
        self._timer: _Timer | None = None
        self.on_up: Callable[[bool], None] = lambda _again: None
        self.on_down: Callable[[str], None] = lambda _why: None
        self.on_message: Callable[[Any], None] = lambda _msg: None
        self.on_subscribed: Callable[[], None] = lambda: None
        #: (message ID, None or the broker's reason for refusing it), for QoS 1 publishes
        self.on_published: Callable[[int, str | None], None] = lambda _mid, _why: None

    # -- any thread

    def open(self) -> None:
        def begin() -> None:
            self.loop._sessions.add(self)
            self._attempt()
        self.loop.call_soon(begin)

    def close(self, last: tuple[str, bytes] | None = None, wait: float = 2.0) -> None:
        """Publish ``last`` (retained, QoS 1) if connected, disconnect, and stop reconnecting."""
        if self.closed.is_set():
            return
        if last is not None and self.up:
            try:
                info = self.client.publish(last[0], last[1], qos=1, retain=True)
                info.wait_for_publish(wait)
            except (ValueError, RuntimeError):
                pass  # not connected after all: the Last Will says the same
        try:
            self.loop.call_soon(self._begin_close)
        except TransportError:
            self.abandon()
            return
        if not self.closed.wait(wait + 1) and not self.loop.in_loop():
            self.abandon()

    def abandon(self) -> None:
        """Cut the connection without a goodbye (the loop is gone)."""
        self.closing = True
        sock = self.client.socket()
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass
        self.closed.set()

    # -- loop thread

    def _begin_close(self) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self.client.socket() is None:
            self._finish_close()
            return
        self.client.disconnect()  # paho closes the socket once DISCONNECT is written
        self.loop._dirty.add(self)
        self.loop.call_later(1.0, self._finish_close)

    def _finish_close(self) -> None:
        sock = self.client.socket()
        if sock is not None:
            self.loop._unregister(self, sock)
            try:
                sock.close()
            except OSError:
                pass
        self.loop._sessions.discard(self)
        self.closed.set()

    def _attempt(self) -> None:
        self._timer = None
        if self.closing:
            return
        try:
            self.client.reconnect()
        except (OSError, ValueError) as exc:  # ssl.SSLError and refused connections are OSErrors
            why = f"cannot reach the MQTT broker {self.broker}: {exc}"
            self.last_error = why
            if not self.first.is_set():
                self.first_error = why
                self.first.set()
            self._retry(why)

    def _retry(self, why: str) -> None:
        if self.closing:
            return
        delay = self.backoff.next_delay()
        self.log(f"mqtt: {why}; trying again in {delay:.1f} s")
        self._timer = self.loop.call_later(delay, self._attempt)

    def _socket_closed(self, sock: Any) -> None:
        self.loop._unregister(self, sock)
        if self.closing:
            self.loop.call_later(0, self._finish_close)

    def _connected(self, _c: Any, _u: Any, _flags: Any, rc: Any, _props: Any = None) -> None:
        value, name = _reason(rc)
        if value >= 0x80 or (0 < value < 6):
            self.refused = f"the MQTT broker {self.broker} refused the connection: {name}"
            self.last_error = self.refused
            if not self.first.is_set():
                self.first_error = self.refused
                self.first.set()
            return  # paho closes the connection; _disconnected schedules the retry
        again = self.ever_up
        self.up, self.ever_up, self.up_since = True, True, time.monotonic()
        self.refused = None
        self.on_up(again)
        self.first.set()

    def _disconnected(self, *args: Any) -> None:
        value, name = _reason(args[-2] if len(args) >= 4 else args[-1])
        detail = f" ({name})" if value not in (0, 0x80) else ""  # 0x80: paho's "connection lost"
        was_up = self.up
        self.up = False
        if was_up:
            self.backoff.connection_ended(time.monotonic() - self.up_since)
        if self.closing:
            return
        if self.refused is not None:
            why = self.refused
        elif was_up:
            why = f"the connection to the MQTT broker {self.broker} was lost{detail}"
        else:
            why = f"the MQTT broker {self.broker} closed the connection before accepting it{detail}"
        self.last_error = why
        if not self.first.is_set():
            self.first_error = why
            self.first.set()
        if was_up:
            self.on_down(why)
        self._retry(why)

    def _published(self, *args: Any) -> None:
        refused = None
        if len(args) >= 4:  # paho 2.x tells the PUBACK reason code; 1.6 does not
            value, name = _reason(args[3])
            if value >= 0x80:
                refused = name
        self.on_published(int(args[2]), refused)


def publish_props(correlation: bytes, reply_to: str | None = None,
                  expiry: int | None = None) -> Any:
    """The MQTT 5 properties of a PUBLISH: correlation data, response topic, message expiry."""
    props = FastProperties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    if reply_to is not None:
        props.ResponseTopic = reply_to
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


def own_loop(loop: MqttLoop | None, name: str, log: Log | None) -> tuple[MqttLoop, bool]:
    """``(loop, False)`` for a given loop; else a new, started one and True (stop it after use)."""
    if loop is not None:
        return loop, False
    own = MqttLoop(name=name, log=log)
    own.start()
    return own, True


def wait_connected(s: Session, timeout: float) -> None:
    """Wait for the first attempt's outcome; raise its failure as a TransportError."""
    if not s.first.wait(timeout):
        raise TransportError(f"no answer from the MQTT broker {s.broker} within {timeout:g} s")
    if not s.up:
        hint = ""
        if s.refused is None and "before accepting" in (s.first_error or ""):
            hint = ("; an mqtts:// broker that requires client certificates closes the "
                    "connection like this: add ?cert=FILE&key=FILE")
        raise TransportError(f"{s.first_error or 'not connected'}{hint}")


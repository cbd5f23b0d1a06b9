"""``mqtt://`` and ``mqtts://``: the RPC through an MQTT 5 broker, for sites that reach their servers that way.

Addressing (the contract with ``licadmin`` and ``licagent``)::

    mqtt://HOST[:PORT]/SITE              the agent's --listen URL; for discover() (licadmin gather)
    mqtt://HOST[:PORT]/SITE/DEVICE_ID    one device, for connect() (info, status, request, apply, check)
    mqtts://...?ca=FILE&cert=FILE&key=FILE   the same over TLS with a client certificate

PORT defaults to 1883 (``mqtt``) and 8883 (``mqtts``). Options: ``ca``, ``cert``
and ``key`` (``mqtts`` only; a device's certificate has its device ID as common
name, the administration tool's has ``admin``), ``keepalive`` (seconds, both
sides, default 30; the broker announces a silent device offline after 1.5 x
keepalive), and for clients ``timeout`` (seconds per try, default the caller's
``timeout``, else 10), ``presence_timeout`` (how long to wait for the device's
presence, default :data:`PRESENCE_TIMEOUT` = 10 s).

Topic layout per site and device (``SITE`` and ``DEVICE_ID`` are one topic level
each; ``_admin`` is reserved)::

    lic/SITE/DEVICE_ID/presence         retained JSON {"device_id", "model", "online", "versions"},
                                        QoS 1; the Last Will is the same with "online": false
    lic/SITE/DEVICE_ID/req              requests, QoS 1, MQTT 5 response topic + correlation data
    lic/SITE/DEVICE_ID/resp/CLIENT_ID   the answers, QoS 1, correlation data echoed
    lic/SITE/_admin/CLIENT_ID           discover()'s own end-of-list marker

A device publishes only under its own ``lic/SITE/DEVICE_ID/`` (the example
broker ACL in ``contrib/mosquitto/acl`` enforces that by certificate name), and
the listener answers only on response topics of that form.

Requests and answers are the CBOR maps of :mod:`hw.rpc` without the byte framing
(MQTT frames each message and TCP/TLS protect it)::

    {"v": 1, "id": uint, "op": tstr, "args": {...}}
    {"v": 1, "id": uint, "ok": true, "result": any} / {... "ok": false, "error": {...}}

Each request is self-contained (no session, no hello needed first). Both sides
announce a maximum packet size (:data:`MAX_PACKET`) when connecting, so the broker
drops an oversized message instead of delivering it.

Duplicates are harmless: QoS 1 may deliver a request twice, and a client that
hears nothing sends it again with the same correlation data. The listener keeps
the answers to its last :data:`REMEMBER` requests by (response topic,
correlation data) and answers a repeat from that memory without running the
operation again. Applying the same response twice is idempotent in the core
anyway (``already_applied``). Requests carry a message expiry of the client's
whole retry budget, so a broker never delivers one after its sender gave up.

Reconnecting: every broker connection (agent or client) is re-established after
a broker restart or network loss with exponential back-off and jitter
(:data:`RECONNECT_MIN` doubling up to :data:`RECONNECT_MAX`; reset once a
connection has lasted :data:`STABLE_AFTER`). On every (re)connection the agent
subscribes again and publishes its presence again, since a broker without
persistence forgets retained messages. The agent's broker session outlives a
short disconnection (:data:`SESSION_EXPIRY`), so requests sent meanwhile are
delivered when it returns; a broker restart without persistence loses them, and
the client's resend covers that. A client waiting for an answer sends the
request again, with the same correlation data, as soon as the device's presence
reappears, and fails with a :class:`~hw.rpc.TransportError` that says the
operation may or may not have run when the device does not come back within the
presence timeout or does not answer within its tries.

One thread, many clients: paho's own ``loop_start`` makes a thread per client
and waits with ``select()``, which fails for descriptors above 1023, so a
process holding a thousand simulated devices could not use it. Here
:class:`MqttLoop` drives any number of paho clients from one thread with epoll
(paho's external-loop callbacks). Each listener or client makes its own loop
unless one is passed in (``loop=``, e.g. a fleet simulator's); operations run in
that loop's thread, one at a time.

paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``) and 1.6 (Debian bookworm) both work.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import json
import math
import os
import random
import selectors
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as _paho_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as _PahoProperties

from agent.errors import MalformedError, UsageError
from agent.record import field, record
from agent.rpc import (
    PROTOCOL_VERSIONS,
    Handler,
    Op,
    RpcAnswer,
    RpcRequest,
    TransportError,
    answer,
    decode_message,
)
from hw.framing import DEFAULT_MAX_FRAME
from hw.link import LinkURL, Listener, ServerClient, netloc, parse_url
from hw.tls import client_context

if TYPE_CHECKING:
    import ssl

__all__ = [
    "DISCOVER_TIMEOUT",
    "PRESENCE_TIMEOUT",
    "AnswerMemory",
    "Backoff",
    "MqttClient",
    "MqttListener",
    "MqttLoop",
    "MqttSite",
    "Presence",
    "RequestServer",
    "SITE_WINDOW",
    "answer_request",
    "connect",
    "decode_presence",
    "decode_reply",
    "discover",
    "encode_presence",
    "listen",
    "presence_topic",
    "request_topic",
    "response_topic",
]

Log = Callable[[str], None]

# paho 2.x and 1.6 differ in constructor and callback signatures; everything paho is
# reached through this untyped alias and the few adapters below.
_paho: Any = _paho_client
_Properties: Any = _PahoProperties
try:
    from paho.mqtt.enums import CallbackAPIVersion as _CallbackAPIVersion

    _VERSION2: Any = _CallbackAPIVersion.VERSION2
except ImportError:  # paho-mqtt 1.6
    _VERSION2 = None

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
CLIENT_OPTIONS = {"mqtt": ("timeout", "presence_timeout", "keepalive"),
                  "mqtts": ("timeout", "presence_timeout", "keepalive", "ca", "cert", "key")}
LISTEN_OPTIONS = {"mqtt": ("keepalive",), "mqtts": ("keepalive", "ca", "cert", "key")}

#: seconds a client waits for the addressed device's presence before giving up
PRESENCE_TIMEOUT = 10.0
#: seconds discover() waits for the broker to list a site's presence messages
DISCOVER_TIMEOUT = 10.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_TRIES = 3
DEFAULT_KEEPALIVE = 30
#: reconnect back-off: the first delay, the cap, and the uptime that resets it
RECONNECT_MIN = 0.5
RECONNECT_MAX = 30.0
STABLE_AFTER = 10.0
#: how long start() waits for the first connection before serving in the background
START_WAIT = 5.0
#: answers a listener remembers for repeated requests
REMEMBER = 256
#: how long a broker keeps an agent's subscription and queued requests while it is away
SESSION_EXPIRY = 600
MAX_CORRELATION = 64
#: the largest MQTT packet we accept (the RPC's message limit plus topic and properties)
MAX_PACKET = DEFAULT_MAX_FRAME + 8192
MAX_PRESENCE = 4096
#: loop_misc (keepalive pings, ping timeouts) runs this often for every client
MISC_INTERVAL = 1.0
_RESERVED = "_admin"


# ---------------------------------------------------------------- topics and addresses


def _check_level(what: str, value: str, url: str = "") -> str:
    bad = (not value or any(c in value for c in "/+#\0") or value.startswith("$")
           or value == _RESERVED or len(value.encode()) > 256)
    if bad:
        where = f"{url}: " if url else ""
        raise UsageError(f"{where}{what} {value!r} cannot be an MQTT topic level "
                         f"(it must be non-empty, without / + # or a leading $, and not {_RESERVED})")
    return value


def presence_topic(site: str, device_id: str) -> str:
    return f"lic/{site}/{device_id}/presence"


def request_topic(site: str, device_id: str) -> str:
    return f"lic/{site}/{device_id}/req"


def response_topic(site: str, device_id: str, client_id: str) -> str:
    return f"lic/{site}/{device_id}/resp/{client_id}"


def _marker_topic(site: str, client_id: str) -> str:
    return f"lic/{site}/{_RESERVED}/{client_id}"


def _address(url: LinkURL) -> tuple[str, str | None]:
    """``(site, device_id or None)`` from the URL's path."""
    parts = url.path.strip("/").split("/") if url.path.strip("/") else []
    if not 1 <= len(parts) <= 2:
        raise UsageError(f"{url.text}: expected {url.scheme}://HOST:PORT/SITE (a whole site) or "
                         f"{url.scheme}://HOST:PORT/SITE/DEVICE_ID (one device)")
    site = _check_level("site", parts[0], url.text)
    dev = _check_level("device ID", parts[1], url.text) if len(parts) == 2 else None
    return site, dev


def _host_port(url: LinkURL) -> tuple[str, int]:
    if not url.host:
        raise UsageError(f"{url.text}: a broker host is needed ({url.scheme}://HOST:PORT/SITE)")
    return url.host, url.port if url.port is not None else DEFAULT_PORTS[url.scheme]


def _keepalive(url: LinkURL) -> int:
    return url.whole("keepalive", DEFAULT_KEEPALIVE, 5, 65535)


def _tls_context(url: LinkURL) -> ssl.SSLContext | None:
    return client_context(url) if url.scheme == "mqtts" else None


# ---------------------------------------------------------------- presence (no I/O)


@record(frozen=True)
class Presence:
    """What a device's retained presence message says."""

    device_id: str
    model: str
    online: bool


def encode_presence(p: Presence) -> bytes:
    return json.dumps({"device_id": p.device_id, "model": p.model, "online": p.online,
                       "versions": list(PROTOCOL_VERSIONS)}, sort_keys=True).encode()


def decode_presence(topic: str, payload: bytes) -> Presence | None:
    """The presence on ``topic``, or None if it is empty, malformed or names another device."""
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != "lic" or parts[3] != "presence" or not payload:
        return None
    if len(payload) > MAX_PRESENCE:
        return None
    try:
        doc = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    dev, model, online = doc.get("device_id"), doc.get("model"), doc.get("online")
    if dev != parts[2] or not isinstance(model, str) or not isinstance(online, bool):
        return None
    return Presence(dev, model, online)


# ---------------------------------------------------------------- requests (no I/O)


class AnswerMemory:
    """The answers to recent requests by (response topic, correlation data), oldest dropped.

    Bounded by count and by bytes; thread-safe. One per listener, or one shared by
    a whole fleet of simulated devices (the response topic names the device, so
    keys never collide).
    """

    def __init__(self, count: int = REMEMBER, size: int = 64 * 1024 * 1024) -> None:
        self.count, self.size = max(1, count), size
        self.bytes = 0
        self._lock = threading.Lock()
        self._recent: OrderedDict[tuple[str, bytes], bytes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._recent)

    def get(self, key: tuple[str, bytes]) -> bytes | None:
        with self._lock:
            out = self._recent.get(key)
            if out is not None:
                self._recent.move_to_end(key)
            return out

    def put(self, key: tuple[str, bytes], answer: bytes) -> None:
        with self._lock:
            old = self._recent.pop(key, None)
            if old is not None:
                self.bytes -= len(old)
            self._recent[key] = answer
            self.bytes += len(answer)
            while len(self._recent) > self.count or (self.bytes > self.size
                                                     and len(self._recent) > 1):
                _k, gone = self._recent.popitem(last=False)
                self.bytes -= len(gone)


#: what :func:`answer_request` did with a request
HANDLED, REPEAT, DROPPED = "handled", "repeat", "dropped"


def answer_request(handler: Handler, site: str, device_id: str, payload: bytes, reply_to: Any,
                   correlation: Any, memory: AnswerMemory, max_payload: int = DEFAULT_MAX_FRAME,
                   log: Log | None = None) -> tuple[str, bytes | None]:
    """What device ``device_id`` answers to a request: ``(HANDLED | REPEAT | DROPPED, answer)``.

    Runs ``handler`` at most once per (``reply_to``, ``correlation``) that
    ``memory`` still holds; a repeat gets the first answer again. The answer
    (None when dropped) is published on ``reply_to`` with ``correlation``.
    """
    say: Log = log or (lambda _line: None)
    prefix = f"lic/{site}/{device_id}/resp/"
    if (not isinstance(reply_to, str) or not reply_to.startswith(prefix)
            or any(c in reply_to[len(prefix):] for c in "/+#\0")
            or len(reply_to) == len(prefix)):
        say(f"mqtt: request without a usable response topic dropped "
            f"(expected {prefix}CLIENT_ID, got {str(reply_to)[:120]!r})")
        return DROPPED, None
    if not isinstance(correlation, bytes) or not 0 < len(correlation) <= MAX_CORRELATION:
        say("mqtt: request without correlation data dropped")
        return DROPPED, None
    key = (reply_to, correlation)
    cached = memory.get(key)
    if cached is not None:
        return REPEAT, cached
    try:
        msg = decode_message(payload, max_payload)
    except MalformedError as exc:
        say(f"mqtt: unreadable request dropped: {exc}")
        return DROPPED, None
    if not isinstance(msg, RpcRequest):
        say("mqtt: a message that is not an RPC request dropped")
        return DROPPED, None
    out = answer(handler, msg, max_payload, say).encode_within(max_payload + 1024, "message")
    memory.put(key, out)
    return HANDLED, out


@record
class RequestServer:
    """A device's answers to RPC requests arriving by MQTT; remembers recent ones.

    Args:
        handler: ``handler(op, args) -> result``; raises LicensingError to answer an error.
        site, device_id: whose requests these are (answers go only under its topics).
        max_payload: largest request accepted.
        remember: how many answers are kept for repeated requests (when no ``memory``).
        log: receives a line for each dropped request and internal error.
        memory: where answers are remembered (default: its own, of ``remember`` answers).
    """

    handler: Handler
    site: str
    device_id: str
    max_payload: int = DEFAULT_MAX_FRAME
    remember: int = REMEMBER
    log: Log = field(default=lambda _line: None)
    handled: int = 0
    repeats: int = 0
    dropped: int = 0
    memory: AnswerMemory | None = None

    def __post_init__(self) -> None:
        if self.memory is None:
            self.memory = AnswerMemory(self.remember)

    def answer(self, payload: bytes, reply_to: Any, correlation: Any) -> bytes | None:
        """The answer to publish on ``reply_to``, or None to drop the request.

        Runs the handler at most once per (``reply_to``, ``correlation``) among
        the last :attr:`remember` requests; a repeat gets the first answer again.
        """
        assert self.memory is not None
        what, out = answer_request(self.handler, self.site, self.device_id, payload, reply_to,
                                   correlation, self.memory, self.max_payload, self.log)
        if what == HANDLED:
            self.handled += 1
        elif what == REPEAT:
            self.repeats += 1
        else:
            self.dropped += 1
        return out


def decode_reply(payload: bytes, rid: int, max_payload: int = DEFAULT_MAX_FRAME) -> Any:
    """The result in an answer to request ``rid``.

    Raises:
        RemoteError: the device answered with an error.
        TransportError: the answer is unreadable or for another request.
    """
    try:
        msg = decode_message(payload, max_payload + 1024)
    except MalformedError as exc:
        raise TransportError(f"unreadable answer: {exc}") from exc
    if not isinstance(msg, RpcAnswer) or msg.id != rid:
        raise TransportError("the answer is not an RPC answer to this request")
    return msg.value()


# ---------------------------------------------------------------- reconnect back-off (no I/O)


class Retry:
    """When a client (re)sends a request and when it gives up: one rule for every client.

    A request goes out as soon as the device is online; again, with the same
    correlation data, when the device's presence comes back (``came_back``
    changes) or after ``timeout`` seconds without an answer, ``tries`` times in
    all; the client gives up when the device stays absent ``presence_timeout``
    seconds. :meth:`step` decides; it does no I/O and keeps no clock.
    """

    SEND, WAIT, ABSENT, EXHAUSTED = "send", "wait", "absent", "exhausted"

    def __init__(self, timeout: float, tries: int, presence_timeout: float) -> None:
        self.timeout, self.max_tries, self.presence_timeout = timeout, tries, presence_timeout
        self.tries = 0
        self.next_try = 0.0
        self.seen_back: object = None
        self.absent_since: float | None = None

    def step(self, now: float, online: bool, came_back: object) -> tuple[str, float]:
        """(SEND, 0), (WAIT, seconds), (ABSENT, 0) or (EXHAUSTED, 0) at ``now``."""
        if not online:
            self.absent_since = self.absent_since or now
            if now - self.absent_since >= self.presence_timeout:
                return self.ABSENT, 0.0
            return self.WAIT, self.absent_since + self.presence_timeout - now
        self.absent_since = None
        if self.seen_back != came_back:
            self.seen_back = came_back  # it is (back) online
        elif now < self.next_try:
            return self.WAIT, self.next_try - now
        elif self.tries >= self.max_tries:
            return self.EXHAUSTED, 0.0
        self.tries += 1 if now >= self.next_try else 0
        self.next_try = now + self.timeout
        return self.SEND, 0.0


@record
class Backoff:
    """Exponential back-off with jitter: min, 2 x min, ... up to max, each x [0.5, 1.5)."""

    minimum: float = RECONNECT_MIN
    maximum: float = RECONNECT_MAX
    stable_after: float = STABLE_AFTER
    failures: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self) -> float:
        base = min(self.maximum, self.minimum * 2 ** min(self.failures, 30))
        self.failures += 1
        return float(base * self.rng.uniform(0.5, 1.5))

    def connection_ended(self, lasted: float) -> None:
        """A connection that lasted long enough starts the back-off afresh."""
        if lasted >= self.stable_after:
            self.failures = 0


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

    Create it, :meth:`start` it, pass it as ``loop=`` to :func:`listen`
    (or :func:`connect`), and :meth:`stop` it after its listeners. Without one,
    each listener or client makes and owns its own.

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
        self._dirty: set[_Session] = set()
        self._timers: list[tuple[float, int, _Timer]] = []
        self._seq = itertools.count()
        self._sessions: set[_Session] = set()
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

    def _want_write(self, s: _Session) -> None:
        with self._lock:
            self._dirty.add(s)
        if not self.in_loop():
            self._wake()

    # ------------------------------------------------------------ loop thread

    def call_later(self, delay: float, fn: Callable[[], None]) -> _Timer:
        t = _Timer(fn)
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._seq), t))
        return t

    def _register(self, s: _Session, sock: Any) -> None:
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

    def _unregister(self, s: _Session, sock: Any) -> None:
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError, OSError):
            pass
        if s.sock is sock:
            s.sock, s.events = None, 0

    def _update(self, s: _Session) -> None:
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

    def _service(self, s: _Session, sock: Any, mask: int) -> None:
        c = s.client
        if mask & selectors.EVENT_READ and c.socket() is sock:
            c.loop_read()
            # TLS may hold whole decrypted records that epoll cannot see
            while c.socket() is sock and getattr(sock, "pending", None) and sock.pending() > 0:
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


class _Session:
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
            c = _paho.Client(_VERSION2, client_id=client_id, protocol=_paho.MQTTv5)
        else:
            c = _paho.Client(client_id=client_id, protocol=_paho.MQTTv5)
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


def _publish_props(correlation: bytes, reply_to: str | None = None,
                   expiry: int | None = None) -> Any:
    props = _Properties(PacketTypes.PUBLISH)
    props.CorrelationData = correlation
    if reply_to is not None:
        props.ResponseTopic = reply_to
    if expiry is not None:
        props.MessageExpiryInterval = expiry
    return props


def _own_loop(loop: MqttLoop | None, name: str, log: Log | None) -> tuple[MqttLoop, bool]:
    if loop is not None:
        return loop, False
    own = MqttLoop(name=name, log=log)
    own.start()
    return own, True


# ---------------------------------------------------------------- agent side


class MqttListener(Listener):
    """A device's side of ``mqtt://HOST:PORT/SITE``: presence, requests, answers.

    Args:
        url: the listen URL (site form).
        handler: ``(op, args) -> result``, e.g. :class:`agent.ops.AgentOps`; its
            ``hello`` answer gives the device ID and model.
        log: receives a line for each connection change and dropped request.
        loop: an :class:`MqttLoop` shared with other listeners (default: its own).
    """

    def __init__(self, url: LinkURL, handler: Handler, log: Log | None = None,
                 loop: MqttLoop | None = None) -> None:
        url.check_options(LISTEN_OPTIONS[url.scheme])
        site, dev = _address(url)
        if dev is not None:
            raise UsageError(f"{url.text}: an agent listens on a site, {url.scheme}://HOST:PORT/"
                             f"{site}; its device ID comes from its license store")
        self.url = url
        self.site = site
        self.host, self.port = _host_port(url)
        self.keepalive = _keepalive(url)
        self.tls = _tls_context(url)
        self.handler = handler
        self.log: Log = log or (lambda _line: None)
        self._given_loop = loop
        self._loop: MqttLoop | None = None
        self._own = False
        self._session: _Session | None = None
        self.server: RequestServer | None = None
        self.device_id = ""
        self.model = ""
        self._presence_mids: set[int] = set()
        self._announced = threading.Event()

    def start(self) -> None:
        if self._session is not None:
            raise UsageError(f"{self.url.text} is already being served")
        hello = self.handler(Op.HELLO, {"versions": list(PROTOCOL_VERSIONS)}) or {}
        dev, model = hello.get("device_id"), hello.get("model", "")
        if not isinstance(dev, str):
            raise UsageError(f"{self.url.text}: the agent did not say its device ID")
        self.device_id = _check_level("device ID", dev, self.url.text)
        self.model = str(model)
        self.server = RequestServer(self.handler, self.site, self.device_id, log=self.log)
        self.address = (f"{self.url.scheme}://{netloc(self.host, self.port)}/"
                        f"{self.site}/{self.device_id}")
        loop, self._own = _own_loop(self._given_loop, f"mqtt {self.device_id[:12]}", self.log)
        self._loop = loop
        s = _Session(loop, f"licagent-{self.site}-{self.device_id}", self.host, self.port,
                     self.keepalive, self.tls, _paho.MQTT_CLEAN_START_FIRST_ONLY,
                     session_expiry=SESSION_EXPIRY, will=(self._presence_topic,
                                                          self._presence(False)),
                     log=self.log)
        s.on_up = self._up
        s.on_message = self._message
        s.on_published = self._published
        self._session = s
        try:
            s.open()
        except BaseException:
            self.stop()
            raise
        s.first.wait(START_WAIT)
        if s.up:  # ready means announced: a client may find the presence from now on
            self._announced.wait(START_WAIT)
        if s.refused is not None and not s.up:
            err = s.refused
            self.stop()
            raise TransportError(f"{err} (for {self.address}: an mqtts:// broker needs this "
                                 f"device's certificate, with its device ID as common name)")
        if not s.up:
            self.log(f"mqtt: {s.last_error or 'no answer from the MQTT broker yet'}; "
                     f"serving {self.address} once it is reachable")

    def stop(self) -> None:
        s, self._session = self._session, None
        if s is not None:
            s.close(last=(self._presence_topic, self._presence(False)))
        if self._own and self._loop is not None:
            self._loop.stop()
        self._loop = None

    @property
    def connected(self) -> bool:
        """Whether the broker connection is up right now."""
        return self._session is not None and self._session.up

    # -- loop thread

    @property
    def _presence_topic(self) -> str:
        return presence_topic(self.site, self.device_id)

    def _presence(self, online: bool) -> bytes:
        return encode_presence(Presence(self.device_id, self.model, online))

    def _up(self, again: bool) -> None:
        assert self._session is not None
        c = self._session.client
        # subscribe before announcing: the broker handles both in order, so a client
        # that sees the presence can send a request at once
        c.subscribe(request_topic(self.site, self.device_id), qos=1)
        info = c.publish(self._presence_topic, self._presence(True), qos=1, retain=True)
        self._presence_mids = {info.mid}
        if again:
            self.log(f"mqtt: reconnected to {self._session.broker}; presence of "
                     f"{self.device_id[:12]} published again")

    def _message(self, msg: Any) -> None:
        if self.server is None or self._session is None:
            return
        props = getattr(msg, "properties", None)
        reply_to = getattr(props, "ResponseTopic", None)
        corr = getattr(props, "CorrelationData", None)
        if msg.topic != request_topic(self.site, self.device_id):
            return
        out = self.server.answer(bytes(msg.payload), reply_to, corr)
        if out is not None:
            assert isinstance(corr, bytes)  # answer() checked it
            self._session.client.publish(reply_to, out, qos=1,
                                         properties=_publish_props(corr))

    def _published(self, mid: int, refused: str | None) -> None:
        if mid not in self._presence_mids:
            return
        self._announced.set()  # or refused: either way start() need not wait longer
        if refused is not None:
            self.log(f"mqtt: the broker refused this device's presence on {self._presence_topic}"
                     f" ({refused}): its client certificate's common name must be the device ID "
                     f"{self.device_id}")


def listen(url: LinkURL, handler: Handler, log: Log | None = None, loop: MqttLoop | None = None,
           **_ctx: Any) -> MqttListener:
    """The agent side of ``mqtt://HOST:PORT/SITE`` (not yet started); other ``ctx`` is ignored."""
    return MqttListener(url, handler, log=log, loop=loop)


# ---------------------------------------------------------------- client side


def _wait_connected(s: _Session, timeout: float) -> None:
    """Wait for the first attempt's outcome; raise its failure as a TransportError."""
    if not s.first.wait(timeout):
        raise TransportError(f"no answer from the MQTT broker {s.broker} within {timeout:g} s")
    if not s.up:
        hint = ""
        if s.refused is None and "before accepting" in (s.first_error or ""):
            hint = ("; an mqtts:// broker that requires client certificates closes the "
                    "connection like this: add ?cert=FILE&key=FILE")
        raise TransportError(f"{s.first_error or 'not connected'}{hint}")


class MqttClient(ServerClient):
    """The operations of one device through the broker (``mqtt://HOST:PORT/SITE/DEVICE_ID``).

    Connecting waits for the device's presence (up to ``presence_timeout``).
    Each call publishes the request with a fresh correlation data, waits
    ``timeout`` seconds per try and sends it again, with the same correlation
    data, after each timeout (``tries`` in all) and at once whenever the
    device's presence reappears (it reconnected, or we did).
    """

    def __init__(self, url: LinkURL, timeout: float = DEFAULT_TIMEOUT, tries: int = DEFAULT_TRIES,
                 presence_timeout: float = PRESENCE_TIMEOUT, loop: MqttLoop | None = None) -> None:
        url.check_options(CLIENT_OPTIONS[url.scheme])
        site, dev = _address(url)
        if dev is None:
            raise UsageError(f"{url.text} names a whole site; add the device ID "
                             f"({url.scheme}://HOST:PORT/{site}/DEVICE_ID), or list the site's "
                             f"devices with licadmin gather")
        self.url = url
        self.site, self.device_id = site, dev
        self.host, self.port = _host_port(url)
        self.timeout = url.seconds("timeout", timeout)
        self.tries = max(1, tries)
        self.presence_timeout = url.seconds("presence_timeout", presence_timeout)
        self.client_id = "licadmin-" + os.urandom(8).hex()
        self.reply_topic = response_topic(site, dev, self.client_id)
        self.where = f"device {dev} at site {site} on {netloc(self.host, self.port)}"
        self._cond = threading.Condition()
        self._replies: dict[bytes, bytes] = {}
        self._waiting: set[bytes] = set()
        self._presence: Presence | None = None
        self._online: bool | None = None  # None: not known since the (re)connection
        self._came_back = 0  # counts the device's presence turning online
        self._next_id = int.from_bytes(os.urandom(4), "big") % (2**31) + 1
        self._closed = False
        self.hello_result: dict[str, Any] | None = None
        tls = _tls_context(url)
        self._loop, self._own = _own_loop(loop, f"licadmin-mqtt {dev[:12]}", None)
        s = _Session(self._loop, self.client_id, self.host, self.port, _keepalive(url), tls,
                     _paho.MQTT_CLEAN_START_FIRST_ONLY, session_expiry=60)
        s.on_up = self._up
        s.on_down = self._down
        s.on_message = self._message
        self._session = s
        try:
            s.open()
            _wait_connected(s, max(self.timeout, 5.0))
            self._wait_presence()
        except BaseException:
            self.close()
            raise

    # -- any thread

    def _wait_presence(self) -> None:
        deadline = time.monotonic() + self.presence_timeout
        with self._cond:
            while self._online is not True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            p = self._presence
        if p is not None and p.online:
            return
        if p is not None:
            raise TransportError(f"{self.where} is offline (its presence says online: false) and "
                                 f"did not come online within {self.presence_timeout:g} s")
        raise TransportError(
            f"{self.where} did not announce itself within {self.presence_timeout:g} s (no presence "
            f"on {presence_topic(self.site, self.device_id)}): is its licagent running with "
            f"--listen {self.url.scheme}://HOST:PORT/{self.site}, and is the device ID right? "
            f"`licadmin gather --server {self.url.scheme}://HOST:PORT/{self.site}` lists the site's devices;"
            f" wait longer with ?presence_timeout=SECONDS")

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        if self._closed:
            raise TransportError("the MQTT client is closed")
        rid = self._next_id
        self._next_id = (self._next_id % (2**32 - 1)) + 1
        payload = RpcRequest(rid, op, dict(args or {})).encode()
        if len(payload) > DEFAULT_MAX_FRAME + 1024:
            raise MalformedError(f"request of {len(payload)} bytes exceeds the message limit")
        corr = os.urandom(16)
        expiry = math.ceil(self.timeout * self.tries + self.presence_timeout)
        props = _publish_props(corr, self.reply_topic, expiry)
        topic = request_topic(self.site, self.device_id)
        maybe = (f"the operation may or may not have run there ({Op.APPLY_RESPONSE} can safely "
                 f"be sent again; status shows the device's sequence)")
        with self._cond:
            self._waiting.add(corr)
        try:
            retry = Retry(self.timeout, self.tries, self.presence_timeout)
            while True:
                with self._cond:
                    now = time.monotonic()
                    if corr in self._replies:
                        answer = self._replies.pop(corr)
                        break
                    if self._closed:
                        raise TransportError(f"{op}: the client was closed; {maybe}")
                    what, wait = retry.step(now, self._online is True, self._came_back)
                    if what == Retry.ABSENT:
                        gone = ("went offline (presence online: false)"
                                if self._online is False else
                                "was lost with the broker connection")
                        raise TransportError(
                            f"{op}: {self.where} {gone} and did not come back within "
                            f"{self.presence_timeout:g} s; {maybe}")
                    if what == Retry.EXHAUSTED:
                        raise TransportError(
                            f"{op}: no answer from {self.where} after {retry.tries} tries of "
                            f"{self.timeout:g} s; {maybe}")
                    if what == Retry.WAIT:
                        self._cond.wait(max(0.001, wait))
                        continue
                self._session.client.publish(topic, payload, qos=1, properties=props)
        finally:
            with self._cond:
                self._waiting.discard(corr)
                self._replies.pop(corr, None)
        result = decode_reply(answer, rid)
        if op == Op.HELLO and isinstance(result, dict):
            self.hello_result = result
        return result

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._session.close()
        if self._own:
            self._loop.stop()

    # -- loop thread

    def _up(self, _again: bool) -> None:
        self._session.client.subscribe([(self.reply_topic, 1),
                                        (presence_topic(self.site, self.device_id), 1)])

    def _down(self, _why: str) -> None:
        with self._cond:
            self._online = None  # the broker may have forgotten everything: wait to hear again
            self._cond.notify_all()

    def _message(self, msg: Any) -> None:
        if msg.topic == self.reply_topic:
            corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
            with self._cond:
                if isinstance(corr, bytes) and corr in self._waiting:
                    self._replies[corr] = bytes(msg.payload)
                    self._cond.notify_all()
            return
        p = decode_presence(msg.topic, bytes(msg.payload))
        if p is None or p.device_id != self.device_id:
            return
        with self._cond:
            if p.online and self._online is not True:
                self._came_back += 1
            self._presence, self._online = p, p.online
            self._cond.notify_all()


def connect(url: LinkURL, timeout: float = DEFAULT_TIMEOUT, tries: int = DEFAULT_TRIES,
            loop: MqttLoop | None = None, **_ctx: Any) -> MqttClient:
    """A client of one device, ``mqtt://HOST:PORT/SITE/DEVICE_ID``, once its presence is seen.

    Raises:
        UsageError: a bad option, path or TLS file.
        TransportError: the broker is unreachable or refuses us, or the device's
            presence did not appear within ``presence_timeout``.
    """
    return MqttClient(url, timeout=timeout, tries=tries, loop=loop)


# ---------------------------------------------------------------- a whole site


def discover(url: str | LinkURL, timeout: float = DISCOVER_TIMEOUT,
             loop: MqttLoop | None = None, **_ctx: Any) -> list[tuple[str, str, bool]]:
    """The devices of a site from their retained presence: ``[(device_id, model, online)]``.

    Subscribes to ``lic/SITE/+/presence``, then sends itself a marker message;
    the broker delivers the marker after every retained presence message, so
    its arrival means the list is complete. Sorted by device ID.

    Raises:
        UsageError: not a site URL (``mqtt://HOST:PORT/SITE``), or a bad option.
        TransportError: the broker is unreachable or refused us, the connection
            was lost meanwhile, or the list did not arrive within ``timeout``.
    """
    parsed = parse_url(url) if isinstance(url, str) else url
    if parsed.scheme not in DEFAULT_PORTS:
        raise UsageError(f"{parsed.text}: discover() needs an mqtt:// or mqtts:// site URL")
    parsed.check_options(CLIENT_OPTIONS[parsed.scheme])
    site, dev = _address(parsed)
    if dev is not None:
        raise UsageError(f"{parsed.text} names one device; a site is "
                         f"{parsed.scheme}://HOST:PORT/{site}")
    host, port = _host_port(parsed)
    timeout = parsed.seconds("timeout", timeout)
    client_id = "licadmin-" + os.urandom(8).hex()
    marker = os.urandom(16)
    found: dict[str, Presence] = {}
    done = threading.Event()
    lost: list[str] = []
    own_loop, own = _own_loop(loop, "licadmin-mqtt discover", None)
    s = _Session(own_loop, client_id, host, port, _keepalive(parsed), _tls_context(parsed),
                 True)

    def up(_again: bool) -> None:
        # QoS 0: retained messages then skip the broker's per-client queue limit for QoS 1
        s.client.subscribe([(f"lic/{site}/+/presence", 0), (_marker_topic(site, client_id), 0)])

    def message(msg: Any) -> None:
        if msg.topic == _marker_topic(site, client_id):
            if bytes(msg.payload) == marker:
                done.set()
            return
        p = decode_presence(msg.topic, bytes(msg.payload))
        if p is not None and not done.is_set():
            found[p.device_id] = p

    def down(why: str) -> None:
        lost.append(why)
        done.set()

    s.on_up = up
    s.on_subscribed = lambda: s.client.publish(_marker_topic(site, client_id), marker, qos=0)
    s.on_message = message
    s.on_down = down
    try:
        s.open()
        deadline = time.monotonic() + timeout
        _wait_connected(s, timeout)
        if not done.wait(max(0.0, deadline - time.monotonic())):
            raise TransportError(
                f"the MQTT broker {s.broker} did not list the presence of site {site} within "
                f"{timeout:g} s (the broker may refuse this client reading "
                f"lic/{site}/+/presence or {_marker_topic(site, client_id)})")
        if lost:
            raise TransportError(f"{lost[0]} while listing site {site}; try again")
        return sorted((p.device_id, p.model, p.online) for p in found.values())
    finally:
        s.close()
        if own:
            own_loop.stop()


# ---------------------------------------------------------------- a whole site, one session

#: requests a site session keeps in flight at once (licadmin's site commands)
SITE_WINDOW = 256


class _SiteCall:
    __slots__ = ("answer", "cond", "device_id")

    def __init__(self, device_id: str, lock: threading.Lock) -> None:
        self.device_id = device_id
        self.cond = threading.Condition(lock)
        self.answer: bytes | None = None


class MqttSite:
    """Every device of ``mqtt://HOST:PORT/SITE`` through ONE broker session.

    Lists the site as :func:`discover` does (retained presence, then its own
    marker), and then carries any number of requests to any of its devices at
    once: answers come back on one subscription, ``lic/SITE/+/resp/CLIENT_ID``,
    matched by correlation data. :meth:`client` gives one device's
    :class:`~hw.link.ServerClient`, with :class:`MqttClient`'s retry rules
    (``timeout`` per try, ``tries``, sent again at once when the device's
    presence comes back, ``presence_timeout`` while it is away). Thread-safe:
    ``licadmin`` runs up to :data:`SITE_WINDOW` operations at once on it,
    where one :class:`MqttClient` per device would open a broker session each.

    Raises (constructor): as :func:`discover`.
    """

    def __init__(self, url: str | LinkURL, timeout: float = DEFAULT_TIMEOUT,
                 tries: int = DEFAULT_TRIES, presence_timeout: float = PRESENCE_TIMEOUT,
                 discover_timeout: float = DISCOVER_TIMEOUT, loop: MqttLoop | None = None) -> None:
        parsed = parse_url(url) if isinstance(url, str) else url
        if parsed.scheme not in DEFAULT_PORTS:
            raise UsageError(f"{parsed.text}: a site session needs an mqtt:// or mqtts:// site URL")
        parsed.check_options(CLIENT_OPTIONS[parsed.scheme])
        site, dev = _address(parsed)
        if dev is not None:
            raise UsageError(f"{parsed.text} names one device; a site is "
                             f"{parsed.scheme}://HOST:PORT/{site}")
        self.url = parsed
        self.site = site
        self.host, self.port = _host_port(parsed)
        self.timeout = parsed.seconds("timeout", timeout)
        self.tries = max(1, tries)
        self.presence_timeout = parsed.seconds("presence_timeout", presence_timeout)
        discover_timeout = parsed.seconds("timeout", discover_timeout)
        self.client_id = "licadmin-" + os.urandom(8).hex()
        self._lock = threading.Lock()
        self._listed = threading.Event()
        self._marker = os.urandom(16)
        self._presence: dict[str, Presence] = {}
        self._online: dict[str, bool] = {}  # absent: not known since the (re)connection
        self._came_back: dict[str, int] = {}
        self._calls: dict[bytes, _SiteCall] = {}
        self._lost: list[str] = []
        self._closed = False
        self._loop, self._own = _own_loop(loop, f"licadmin-mqtt {site[:12]}", None)
        s = _Session(self._loop, self.client_id, self.host, self.port, _keepalive(parsed),
                     _tls_context(parsed), True)
        s.on_up = self._up
        s.on_down = self._down
        s.on_message = self._message
        s.on_subscribed = lambda: s.client.publish(_marker_topic(site, self.client_id),
                                                   self._marker, qos=0)
        self._session = s
        try:
            s.open()
            deadline = time.monotonic() + discover_timeout
            _wait_connected(s, discover_timeout)
            if not self._listed.wait(max(0.0, deadline - time.monotonic())):
                raise TransportError(
                    f"the MQTT broker {s.broker} did not list the presence of site {site} within "
                    f"{discover_timeout:g} s (the broker may refuse this client reading "
                    f"lic/{site}/+/presence or {_marker_topic(site, self.client_id)})")
            if self._lost:
                raise TransportError(f"{self._lost[0]} while listing site {site}; try again")
        except BaseException:
            self.close()
            raise

    def devices(self) -> list[tuple[str, str, bool]]:
        """``[(device_id, model, online)]`` as the broker listed them, sorted by device ID."""
        with self._lock:
            return sorted((p.device_id, p.model, p.online) for p in self._presence.values())

    def client(self, device_id: str) -> ServerClient:
        """One device of the site; closing it leaves the session open."""
        _check_level("device ID", device_id, self.url.text)
        return _SiteDevice(self, device_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for call in self._calls.values():
                call.cond.notify_all()
        self._session.close()
        if self._own:
            self._loop.stop()

    def __enter__(self) -> MqttSite:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # -- any thread

    def call(self, device_id: str, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """One operation on one device (see :meth:`MqttClient.call`)."""
        if self._closed:
            raise TransportError("the MQTT site session is closed")
        where = f"device {device_id} at site {self.site} on {self._session.broker}"
        rid = int.from_bytes(os.urandom(4), "big") % (2**31) + 1
        payload = RpcRequest(rid, op, dict(args or {})).encode()
        if len(payload) > DEFAULT_MAX_FRAME + 1024:
            raise MalformedError(f"request of {len(payload)} bytes exceeds the message limit")
        corr = os.urandom(16)
        expiry = math.ceil(self.timeout * self.tries + self.presence_timeout)
        props = _publish_props(corr, response_topic(self.site, device_id, self.client_id),
                               expiry)
        topic = request_topic(self.site, device_id)
        maybe = (f"the operation may or may not have run there ({Op.APPLY_RESPONSE} can safely "
                 f"be sent again; status shows the device's sequence)")
        call = _SiteCall(device_id, self._lock)
        with self._lock:
            self._calls[corr] = call
        try:
            retry = Retry(self.timeout, self.tries, self.presence_timeout)
            while True:
                with self._lock:
                    now = time.monotonic()
                    if call.answer is not None:
                        answer = call.answer
                        break
                    if self._closed:
                        raise TransportError(f"{op}: the site session was closed; {maybe}")
                    online = self._online.get(device_id)
                    what, wait = retry.step(now, online is True,
                                            self._came_back.get(device_id, 0))
                    if what == Retry.ABSENT:
                        if device_id not in self._presence:
                            gone = "did not announce itself (no presence)"
                        elif online is False:
                            gone = "went offline (presence online: false)"
                        else:
                            gone = "was lost with the broker connection"
                        raise TransportError(
                            f"{op}: {where} {gone} and did not come back within "
                            f"{self.presence_timeout:g} s; {maybe}")
                    if what == Retry.EXHAUSTED:
                        raise TransportError(
                            f"{op}: no answer from {where} after {retry.tries} tries of "
                            f"{self.timeout:g} s; {maybe}")
                    if what == Retry.WAIT:
                        call.cond.wait(max(0.001, wait))
                        continue
                self._session.client.publish(topic, payload, qos=1, properties=props)
        finally:
            with self._lock:
                self._calls.pop(corr, None)
        return decode_reply(answer, rid)

    # -- loop thread

    def _up(self, _again: bool) -> None:
        self._session.client.subscribe([
            (f"lic/{self.site}/+/presence", 0),
            (f"lic/{self.site}/+/resp/{self.client_id}", 1),
            (_marker_topic(self.site, self.client_id), 0)])

    def _down(self, why: str) -> None:
        with self._lock:
            if not self._listed.is_set():
                self._lost.append(why)
                self._listed.set()
            self._online.clear()  # the broker may have forgotten everything: wait to hear again
            for call in self._calls.values():
                call.cond.notify_all()

    def _message(self, msg: Any) -> None:
        topic = msg.topic
        if topic.endswith(f"/resp/{self.client_id}"):
            corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
            if not isinstance(corr, bytes):
                return
            with self._lock:
                call = self._calls.get(corr)
                # the answer must come from the device asked (its topic level)
                if call is not None and topic == response_topic(self.site, call.device_id,
                                                                self.client_id):
                    call.answer = bytes(msg.payload)
                    call.cond.notify_all()
            return
        if topic == _marker_topic(self.site, self.client_id):
            if bytes(msg.payload) == self._marker:
                self._listed.set()
            return
        p = decode_presence(topic, bytes(msg.payload))
        if p is None:
            return
        with self._lock:
            if p.online and self._online.get(p.device_id) is not True:
                self._came_back[p.device_id] = self._came_back.get(p.device_id, 0) + 1
            self._presence[p.device_id] = p
            self._online[p.device_id] = p.online
            for call in self._calls.values():
                if call.device_id == p.device_id:
                    call.cond.notify_all()


class _SiteDevice(ServerClient):
    """One device of an :class:`MqttSite` (closing it leaves the site session open)."""

    def __init__(self, site: MqttSite, device_id: str) -> None:
        self.site, self.device_id = site, device_id

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        return self.site.call(self.device_id, op, args)

"""The MQTT device contract: topics, presence, request answering, answer memory, retry and back-off.

Pure (no paho, no sockets, no clock of its own): everything both ends of an
``mqtt://`` link must agree on, used alike by the agent's backend
(:mod:`hw.backends.mqtt`, on paho) and by the fleet simulator's lean engine
(:mod:`simulators.mqttlite`, on its own codec), so the two cannot drift apart.

Topic layout per site and device (``SITE`` and ``DEVICE_ID`` are one topic level
each; ``_admin`` is reserved)::

    lic/SITE/DEVICE_ID/presence         retained JSON {"device_id", "model", "online", "versions"},
                                        QoS 1; the Last Will is the same with "online": false
    lic/SITE/DEVICE_ID/req              requests, QoS 1, MQTT 5 response topic + correlation data
    lic/SITE/DEVICE_ID/resp/CLIENT_ID   the answers, QoS 1, correlation data echoed
    lic/SITE/_admin/CLIENT_ID           discover()'s own end-of-list marker

A device publishes only under its own ``lic/SITE/DEVICE_ID/`` (the example
broker ACL in ``contrib/mosquitto/acl`` enforces that by certificate name), and
a device answers only on response topics of that form.

Requests and answers are the CBOR messages of :mod:`agent.rpc` without the byte
framing (MQTT frames each message and TCP/TLS protect it)::

    {"v": 1, "id": uint, "op": tstr, "args": {...}}
    {"v": 1, "id": uint, "ok": true, "result": any} / {... "ok": false, "error": {...}}

Each request is self-contained (no session, no hello needed first). Both sides
announce a maximum packet size (:data:`MAX_PACKET`) when connecting, so the broker
drops an oversized message instead of delivering it.

Duplicates are harmless: QoS 1 may deliver a request twice, and a client that
hears nothing sends it again with the same correlation data. A device keeps
the answers to its last :data:`REMEMBER` requests by (response topic,
correlation data) in an :class:`AnswerMemory` and answers a repeat from it
without running the operation again (:func:`answer_request`). Applying the same
response twice is idempotent in the core anyway (``already_applied``). Requests
carry a message expiry of the client's whole retry budget
(:func:`request_expiry`), so a broker never delivers one after its sender gave up.

Reconnecting: every broker connection (device or client) is re-established
after a broker restart or network loss with exponential back-off and jitter
(:class:`Backoff`: :data:`RECONNECT_MIN` doubling up to :data:`RECONNECT_MAX`;
reset once a connection has lasted :data:`STABLE_AFTER`). On every
(re)connection a device subscribes again and publishes its presence again,
since a broker without persistence forgets retained messages. A device's broker
session outlives a short disconnection (:data:`SESSION_EXPIRY`), so requests
sent meanwhile are delivered when it returns. A client sends a request again
by one rule (:class:`Retry`): after each try's timeout, and at once when the
device's presence comes back.
"""

from __future__ import annotations

import json
import math
import random
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import MalformedError, UsageError
from agent.record import field, record
from agent.rpc import (
    MESSAGE_SLACK,
    PROTOCOL_VERSIONS,
    Handler,
    RpcAnswer,
    RpcRequest,
    TransportError,
    answer,
    decode_message,
)
from hw.framing import DEFAULT_MAX_FRAME

__all__ = [
    "DEFAULT_KEEPALIVE",
    "DEFAULT_TIMEOUT",
    "DEFAULT_TRIES",
    "DISCOVER_TIMEOUT",
    "DROPPED",
    "HANDLED",
    "MAX_CORRELATION",
    "MAX_PACKET",
    "MAX_PRESENCE",
    "PRESENCE_TIMEOUT",
    "RECONNECT_MAX",
    "RECONNECT_MIN",
    "REMEMBER",
    "REPEAT",
    "RESERVED",
    "SESSION_EXPIRY",
    "STABLE_AFTER",
    "AnswerMemory",
    "Backoff",
    "Log",
    "Presence",
    "RequestServer",
    "Retry",
    "answer_request",
    "check_level",
    "decode_presence",
    "decode_reply",
    "device_client_id",
    "encode_presence",
    "encode_request",
    "marker_topic",
    "presence_topic",
    "request_expiry",
    "request_topic",
    "is_response_topic",
    "response_topic",
]

Log = Callable[[str], None]

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
#: answers a listener remembers for repeated requests
REMEMBER = 256
#: how long a broker keeps an agent's subscription and queued requests while it is away
SESSION_EXPIRY = 600
MAX_CORRELATION = 64
#: the largest MQTT packet we accept (the RPC's message limit plus topic and properties)
MAX_PACKET = DEFAULT_MAX_FRAME + 8192
MAX_PRESENCE = 4096
#: the topic level no site or device may take (discover()'s marker lives under it)
RESERVED = "_admin"


# ---------------------------------------------------------------- topics


def check_level(what: str, value: str, url: str = "") -> str:
    """``value`` if it can be one topic level (a site or device ID); else UsageError."""
    bad = (not value or any(c in value for c in "/+#\0") or value.startswith("$")
           or value == RESERVED or len(value.encode()) > 256)
    if bad:
        where = f"{url}: " if url else ""
        raise UsageError(f"{where}{what} {value!r} cannot be an MQTT topic level "
                         f"(it must be non-empty, without / + # or a leading $, and not {RESERVED})")
    return value


def presence_topic(site: str, device_id: str) -> str:
    return f"lic/{site}/{device_id}/presence"


def request_topic(site: str, device_id: str) -> str:
    return f"lic/{site}/{device_id}/req"


def response_topic(site: str, device_id: str, client_id: str) -> str:
    return f"lic/{site}/{device_id}/resp/{client_id}"


def is_response_topic(topic: str, site: str, client_id: str) -> bool:
    """Is ``topic`` an answer to ``client_id`` from any device of ``site``?"""
    parts = topic.split("/")
    return (len(parts) == 5 and parts[0] == "lic" and parts[1] == site and parts[3] == "resp"
            and parts[4] == client_id)


def marker_topic(site: str, client_id: str) -> str:
    """Where discover() sends itself the marker that ends a site's list of presence."""
    return f"lic/{site}/{RESERVED}/{client_id}"


def device_client_id(site: str, device_id: str) -> str:
    """The MQTT client ID of a device's broker session (one per device and site)."""
    return f"licagent-{site}-{device_id}"


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
    except (ValueError, RecursionError):  # RecursionError: nesting too deep
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
    prefix = response_topic(site, device_id, "")
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
    out = answer(handler, msg, max_payload, lambda line: say(f"mqtt: {line}")).encode_within(
        max_payload + MESSAGE_SLACK, "message")
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


def encode_request(rid: int, op: str, args: Mapping[str, Any] | None) -> bytes:
    """The bytes of request ``rid``; MalformedError if they exceed the message limit."""
    payload = RpcRequest(rid, op, dict(args or {})).encode()
    if len(payload) > DEFAULT_MAX_FRAME + MESSAGE_SLACK:
        raise MalformedError(f"request of {len(payload)} bytes exceeds the message limit")
    return payload


def request_expiry(timeout: float, tries: int, presence_timeout: float) -> int:
    """A request's message expiry (seconds): the client's whole retry budget."""
    return math.ceil(timeout * tries + presence_timeout)


def decode_reply(payload: bytes, rid: int, max_payload: int = DEFAULT_MAX_FRAME) -> Any:
    """The result in an answer to request ``rid``.

    Raises:
        RemoteError: the device answered with an error.
        TransportError: the answer is unreadable or for another request.
    """
    try:
        msg = decode_message(payload, max_payload + MESSAGE_SLACK)
    except MalformedError as exc:
        raise TransportError(f"unreadable answer: {exc}") from exc
    if not isinstance(msg, RpcAnswer) or msg.id != rid:
        raise TransportError("the answer is not an RPC answer to this request")
    return msg.value()


# ---------------------------------------------------------------- resending and reconnecting (no I/O)


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

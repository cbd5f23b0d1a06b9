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
``timeout``, else 10; listing a site, the longest wait for the next retained presence or
the marker that ends the list), ``presence_timeout`` (how long to wait for the device's
presence, default :data:`PRESENCE_TIMEOUT` = 10 s).

The device contract (topics, presence, request answering and the answer memory,
the resend rule, back-off, limits) is :mod:`hw.backends.mqtt_contract`, shared
with the fleet simulator's engine (:mod:`simulators.mqttlite`); the paho event
loop and its sessions are :mod:`hw.backends.mqtt_loop`. Here: the agent's
:class:`MqttListener`, the client of one device (:class:`MqttClient`),
:func:`discover`, and the site session (:class:`MqttSite`). Both clients carry a
call through one call loop (:class:`_InFlight`): a client waiting for an answer
sends the request again, with the same correlation data, as soon as the
device's presence reappears, and fails with a :class:`~agent.rpc.TransportError`
that says the operation may or may not have run when the device does not come
back within the presence timeout or does not answer within its tries.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from agent.errors import UsageError
from agent.rpc import (
    Handler,
    Op,
    TransportError,
    first_request_id,
    for_origin,
    hello_args,
    next_request_id,
)
from hw.backends.mqtt_contract import (
    DEFAULT_KEEPALIVE,
    DEFAULT_TIMEOUT,
    DEFAULT_TRIES,
    DISCOVER_TIMEOUT,
    PRESENCE_TIMEOUT,
    SESSION_EXPIRY,
    Log,
    Presence,
    RequestServer,
    Retry,
    check_level,
    decode_presence,
    decode_reply,
    device_client_id,
    encode_presence,
    encode_request,
    is_response_topic,
    marker_topic,
    presence_topic,
    request_expiry,
    request_topic,
    response_topic,
)
from hw.backends.mqtt_loop import (
    CLEAN_START_FIRST_ONLY,
    MqttLoop,
    Session,
    own_loop,
    publish_props,
    wait_connected,
)
from hw.link import LinkURL, Listener, ServerClient, netloc, parse_url
from hw.tls import client_context

if TYPE_CHECKING:
    import ssl

__all__ = [
    # the client defaults and the loop type of this backend's signatures
    # (their homes: hw.backends.mqtt_contract and hw.backends.mqtt_loop)
    "DEFAULT_TIMEOUT",
    "DISCOVER_TIMEOUT",
    "PRESENCE_TIMEOUT",
    "MqttLoop",
    # this module's own
    "SITE_WINDOW",
    "MqttClient",
    "MqttListener",
    "MqttSite",
    "connect",
    "discover",
    "listen",
]

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}
CLIENT_OPTIONS = {"mqtt": ("timeout", "presence_timeout", "keepalive"),
                  "mqtts": ("timeout", "presence_timeout", "keepalive", "ca", "cert", "key")}
LISTEN_OPTIONS = {"mqtt": ("keepalive",), "mqtts": ("keepalive", "ca", "cert", "key")}

#: how long start() waits for the first connection before serving in the background
START_WAIT = 5.0


# ---------------------------------------------------------------- addresses


def _address(url: LinkURL) -> tuple[str, str | None]:
    """``(site, device_id or None)`` from the URL's path."""
    parts = url.path.strip("/").split("/") if url.path.strip("/") else []
    if not 1 <= len(parts) <= 2:
        raise UsageError(f"{url.text}: expected {url.scheme}://HOST:PORT/SITE (a whole site) or "
                         f"{url.scheme}://HOST:PORT/SITE/DEVICE_ID (one device)")
    site = check_level("site", parts[0], url.text)
    dev = check_level("device ID", parts[1], url.text) if len(parts) == 2 else None
    return site, dev


def _host_port(url: LinkURL) -> tuple[str, int]:
    if not url.host:
        raise UsageError(f"{url.text}: a broker host is needed ({url.scheme}://HOST:PORT/SITE)")
    return url.host, url.port if url.port is not None else DEFAULT_PORTS[url.scheme]


def _keepalive(url: LinkURL) -> int:
    return url.whole("keepalive", DEFAULT_KEEPALIVE, 5, 65535)


def _tls_context(url: LinkURL) -> ssl.SSLContext | None:
    return client_context(url) if url.scheme == "mqtts" else None


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
        self.handler = for_origin(handler, url.scheme)  # requests kept apart from other links
        self.log: Log = log or (lambda _line: None)
        self._given_loop = loop
        self._loop: MqttLoop | None = None
        self._own = False
        self._session: Session | None = None
        self.server: RequestServer | None = None
        self.device_id = ""
        self.model = ""
        self._presence_mids: set[int] = set()
        self._announced = threading.Event()

    def start(self) -> None:
        if self._session is not None:
            raise UsageError(f"{self.url.text} is already being served")
        hello = self.handler(Op.HELLO, hello_args()) or {}
        dev, model = hello.get("device_id"), hello.get("model", "")
        if not isinstance(dev, str):
            raise UsageError(f"{self.url.text}: the agent did not say its device ID")
        self.device_id = check_level("device ID", dev, self.url.text)
        self.model = str(model)
        self.server = RequestServer(self.handler, self.site, self.device_id, log=self.log)
        self.address = (f"{self.url.scheme}://{netloc(self.host, self.port)}/"
                        f"{self.site}/{self.device_id}")
        loop, self._own = own_loop(self._given_loop, f"mqtt {self.device_id[:12]}", self.log)
        self._loop = loop
        s = Session(loop, device_client_id(self.site, self.device_id), self.host, self.port,
                     self.keepalive, self.tls, CLEAN_START_FIRST_ONLY,
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
        if out is not None and isinstance(corr, bytes):  # answer() dropped any other
            self._session.client.publish(reply_to, out, qos=1,
                                         properties=publish_props(corr))

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


# ---------------------------------------------------------------- the one call loop


class _Call:
    """One request in flight: the device asked, and its answer once it arrives."""

    __slots__ = ("answer", "cond", "device_id")

    def __init__(self, device_id: str, lock: threading.Lock) -> None:
        self.device_id = device_id
        self.cond = threading.Condition(lock)
        self.answer: bytes | None = None


class _InFlight:
    """The requests one client's broker session has in flight, and the presence it heard.

    :class:`MqttClient` (one device) and :class:`MqttSite` (every device of a
    site) both carry their calls through :meth:`call`: build the request,
    publish it, wait for the answer or for the device's presence, send it
    again by the :class:`~hw.backends.mqtt_contract.Retry` rule, decode the
    answer. The loop thread reports what it hears with :meth:`answered`,
    :meth:`heard` and :meth:`lost`. Thread-safe.
    """

    def __init__(self, session: Session, site: str, timeout: float, tries: int,
                 presence_timeout: float, what: str) -> None:
        self.session = session
        self.site = site
        self.what = what  # "client" or "site session", for the closed messages
        self._next_id = first_request_id()
        self.timeout, self.tries, self.presence_timeout = timeout, tries, presence_timeout
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # any presence or connection change
        self.presence: dict[str, Presence] = {}
        self.online: dict[str, bool] = {}  # absent: not known since the (re)connection
        self.came_back: dict[str, int] = {}  # counts each device's presence turning online
        self.calls: dict[bytes, _Call] = {}
        self.closed = False

    # -- any thread

    def call(self, device_id: str, op: str, args: Mapping[str, Any] | None) -> Any:
        """The result of ``op`` on ``device_id`` (the request ID is this session's next).

        Raises:
            RemoteError: the device answered with an error.
            TransportError: no answer within the tries, the device stayed away
                longer than the presence timeout, or the client was closed.
            MalformedError: the request exceeds the message limit.
        """
        with self.lock:
            if self.closed:
                raise TransportError(f"the MQTT {self.what} is closed")
            rid, self._next_id = self._next_id, next_request_id(self._next_id)
        closed = f"the {self.what} was closed"
        where = f"device {device_id} at site {self.site} on {self.session.broker}"
        payload = encode_request(rid, op, args)
        corr = os.urandom(16)
        props = publish_props(corr, response_topic(self.site, device_id, self.session.client_id),
                              request_expiry(self.timeout, self.tries, self.presence_timeout))
        topic = request_topic(self.site, device_id)
        maybe = (f"the operation may or may not have run there ({Op.APPLY_RESPONSE} can safely "
                 f"be sent again; status shows the device's sequence)")
        call = _Call(device_id, self.lock)
        with self.lock:
            self.calls[corr] = call
        try:
            retry = Retry(self.timeout, self.tries, self.presence_timeout)
            while True:
                with self.lock:
                    now = time.monotonic()
                    if call.answer is not None:
                        answer = call.answer
                        break
                    if self.closed:
                        raise TransportError(f"{op}: {closed}; {maybe}")
                    online = self.online.get(device_id)
                    what, wait = retry.step(now, online is True, self.came_back.get(device_id, 0))
                    if what == Retry.ABSENT:
                        if device_id not in self.presence:
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
                self.session.client.publish(topic, payload, qos=1, properties=props)
        finally:
            with self.lock:
                self.calls.pop(corr, None)
        return decode_reply(answer, rid)

    def wait_online(self, device_id: str, timeout: float) -> Presence | None:
        """Wait up to ``timeout`` for the device to be online; its last presence heard."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.online.get(device_id) is not True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.changed.wait(left)
            return self.presence.get(device_id)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._wake_all()

    # -- loop thread

    def answered(self, topic: str, msg: Any) -> None:
        """An answer arrived on one of our response topics."""
        corr = getattr(getattr(msg, "properties", None), "CorrelationData", None)
        if not isinstance(corr, bytes):
            return
        with self.lock:
            call = self.calls.get(corr)
            # the answer must come from the device asked (its topic level)
            if call is not None and topic == response_topic(self.site, call.device_id,
                                                            self.session.client_id):
                call.answer = bytes(msg.payload)
                call.cond.notify_all()

    def heard(self, p: Presence) -> None:
        """A device's presence arrived."""
        with self.lock:
            if p.online and self.online.get(p.device_id) is not True:
                self.came_back[p.device_id] = self.came_back.get(p.device_id, 0) + 1
            self.presence[p.device_id] = p
            self.online[p.device_id] = p.online
            self.changed.notify_all()
            for call in self.calls.values():
                if call.device_id == p.device_id:
                    call.cond.notify_all()

    def lost(self) -> None:
        """The broker connection went down: the broker may have forgotten everything."""
        with self.lock:
            self.online.clear()  # wait to hear again
            self._wake_all()

    def _wake_all(self) -> None:
        self.changed.notify_all()
        for call in self.calls.values():
            call.cond.notify_all()


# ---------------------------------------------------------------- client side


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
        self.hello_result: dict[str, Any] | None = None
        tls = _tls_context(url)
        self._loop, self._own = own_loop(loop, f"licadmin-mqtt {dev[:12]}", None)
        s = Session(self._loop, self.client_id, self.host, self.port, _keepalive(url), tls,
                    CLEAN_START_FIRST_ONLY, session_expiry=60)
        s.on_up = self._up
        s.on_down = self._down
        s.on_message = self._message
        self._session = s
        self._in_flight = _InFlight(s, site, self.timeout, self.tries, self.presence_timeout,
                                    "client")
        try:
            s.open()
            wait_connected(s, max(self.timeout, 5.0))
            self._wait_presence()
        except BaseException:
            self.close()
            raise

    # -- any thread

    def _wait_presence(self) -> None:
        p = self._in_flight.wait_online(self.device_id, self.presence_timeout)
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
        result = self._in_flight.call(self.device_id, op, args)
        if op == Op.HELLO and isinstance(result, dict):
            self.hello_result = result
        return result

    def close(self) -> None:
        self._in_flight.close()
        self._session.close()
        if self._own:
            self._loop.stop()

    # -- loop thread

    def _up(self, _again: bool) -> None:
        self._session.client.subscribe([(self.reply_topic, 1),
                                        (presence_topic(self.site, self.device_id), 1)])

    def _down(self, _why: str) -> None:
        self._in_flight.lost()

    def _message(self, msg: Any) -> None:
        if msg.topic == self.reply_topic:
            self._in_flight.answered(msg.topic, msg)
            return
        p = decode_presence(msg.topic, bytes(msg.payload))
        if p is not None and p.device_id == self.device_id:
            self._in_flight.heard(p)


def connect(url: LinkURL, timeout: float = DEFAULT_TIMEOUT, tries: int = DEFAULT_TRIES,
            loop: MqttLoop | None = None, presence_timeout: float = PRESENCE_TIMEOUT,
            **_ctx: Any) -> MqttClient:
    """A client of one device, ``mqtt://HOST:PORT/SITE/DEVICE_ID``, once its presence is seen.

    Raises:
        UsageError: a bad option, path or TLS file.
        TransportError: the broker is unreachable or refuses us, or the device's
            presence did not appear within ``presence_timeout``.
    """
    return MqttClient(url, timeout=timeout, tries=tries, presence_timeout=presence_timeout,
                      loop=loop)


# ---------------------------------------------------------------- a whole site


def discover(url: str | LinkURL, timeout: float = DISCOVER_TIMEOUT,
             loop: MqttLoop | None = None, **_ctx: Any) -> list[tuple[str, str, bool]]:
    """The devices of a site from their retained presence: ``[(device_id, model, online)]``.

    A :class:`MqttSite` that lists the site and closes: it subscribes to
    ``lic/SITE/+/presence``, then sends itself a marker message; the broker
    delivers the marker after every retained presence message, so its arrival
    means the list is complete. Sorted by device ID.

    Raises:
        UsageError: not a site URL (``mqtt://HOST:PORT/SITE``), or a bad option.
        TransportError: the broker is unreachable or refused us, the connection
            was lost meanwhile, or the list did not arrive within ``timeout``.
    """
    with MqttSite(url, discover_timeout=timeout, loop=loop, purpose="discover()") as site:
        return site.devices()


# ---------------------------------------------------------------- a whole site, one session

#: requests a site session keeps in flight at once (licadmin's site commands)
SITE_WINDOW = 256


class MqttSite:
    """Every device of ``mqtt://HOST:PORT/SITE`` through ONE broker session.

    Lists the site as :func:`discover` does (retained presence, then its own
    marker), and then carries any number of requests to any of its devices at
    once: answers come back on one subscription, ``lic/SITE/+/resp/CLIENT_ID``,
    matched by correlation data. :meth:`client` gives one device's
    :class:`~hw.link.ServerClient`, with :class:`MqttClient`'s retry rules
    (the same call loop: ``timeout`` per try, ``tries``, sent again at once when
    the device's presence comes back, ``presence_timeout`` while it is away).
    Thread-safe: ``licadmin`` runs up to :data:`SITE_WINDOW` operations at once
    on it, where one :class:`MqttClient` per device would open a broker session each.

    Raises (constructor): as :func:`discover`.
    """

    def __init__(self, url: str | LinkURL, timeout: float = DEFAULT_TIMEOUT,
                 tries: int = DEFAULT_TRIES, presence_timeout: float = PRESENCE_TIMEOUT,
                 discover_timeout: float = DISCOVER_TIMEOUT, loop: MqttLoop | None = None,
                 purpose: str = "a site session") -> None:
        parsed = parse_url(url) if isinstance(url, str) else url
        if parsed.scheme not in DEFAULT_PORTS:
            raise UsageError(f"{parsed.text}: {purpose} needs an mqtt:// or mqtts:// site URL")
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
        self._listed = threading.Event()
        self._retained = 0  # retained presence messages heard (one loop thread counts them)
        self._marker = os.urandom(16)
        self._lost: list[str] = []
        self._loop, self._own = own_loop(loop, f"licadmin-mqtt {site[:12]}", None)
        s = Session(self._loop, self.client_id, self.host, self.port, _keepalive(parsed),
                    _tls_context(parsed), True)
        s.on_up = self._up
        s.on_down = self._down
        s.on_message = self._message
        s.on_subscribed = lambda: s.client.publish(marker_topic(site, self.client_id),
                                                   self._marker, qos=0)
        self._session = s
        self._in_flight = _InFlight(s, site, self.timeout, self.tries, self.presence_timeout,
                                    "site session")
        try:
            s.open()
            deadline = time.monotonic() + discover_timeout
            wait_connected(s, discover_timeout)
            if not self._wait_listed(deadline, discover_timeout):
                raise TransportError(
                    f"the MQTT broker {s.broker} did not list the presence of site {site} within "
                    f"{discover_timeout:g} s (the broker may refuse this client reading "
                    f"{presence_topic(site, '+')} or {marker_topic(site, self.client_id)})")
            if self._lost:
                raise TransportError(f"{self._lost[0]} while listing site {site}; try again")
        except BaseException:
            self.close()
            raise

    def _wait_listed(self, deadline: float, timeout: float) -> bool:
        """Wait for the marker that ends the list; a list still arriving is not stuck.

        The broker sends every retained presence before the marker; a large site through a
        busy broker (10,000 devices bridged to headquarters, ten sites at once) may take
        longer than ``timeout`` to list while retained presence keeps coming. Each retained
        presence heard moves the deadline to ``timeout`` after it, so the time allowed is
        the longest silence, not the whole listing. Retained messages are the broker's
        finite store, so this ends.
        """
        heard = self._retained
        while not self._listed.wait(max(0.0, min(deadline - time.monotonic(), 0.5))):
            if self._retained != heard:
                heard = self._retained
                deadline = max(deadline, time.monotonic() + timeout)
            elif time.monotonic() >= deadline:
                return False
        return True

    def devices(self) -> list[tuple[str, str, bool]]:
        """``[(device_id, model, online)]`` as the broker listed them, sorted by device ID."""
        with self._in_flight.lock:
            return sorted((p.device_id, p.model, p.online)
                          for p in self._in_flight.presence.values())

    def client(self, device_id: str) -> ServerClient:
        """One device of the site; closing it leaves the session open."""
        check_level("device ID", device_id, self.url.text)
        return _SiteDevice(self, device_id)

    def close(self) -> None:
        self._in_flight.close()
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
        return self._in_flight.call(device_id, op, args)

    # -- loop thread

    def _up(self, _again: bool) -> None:
        self._session.client.subscribe([
            (presence_topic(self.site, "+"), 0),
            (response_topic(self.site, "+", self.client_id), 1),
            (marker_topic(self.site, self.client_id), 0)])

    def _down(self, why: str) -> None:
        with self._in_flight.lock:
            if not self._listed.is_set():
                self._lost.append(why)
                self._listed.set()
        self._in_flight.lost()

    def _message(self, msg: Any) -> None:
        topic = msg.topic
        if is_response_topic(topic, self.site, self.client_id):
            self._in_flight.answered(topic, msg)
            return
        if topic == marker_topic(self.site, self.client_id):
            if bytes(msg.payload) == self._marker:
                self._listed.set()
            return
        p = decode_presence(topic, bytes(msg.payload))
        if p is not None:
            if getattr(msg, "retain", False):
                self._retained += 1  # the list is still arriving (_wait_listed)
            self._in_flight.heard(p)


class _SiteDevice(ServerClient):
    """One device of an :class:`MqttSite` (closing it leaves the site session open)."""

    def __init__(self, site: MqttSite, device_id: str) -> None:
        self.site, self.device_id = site, device_id
        # the session publishes to this device's request topic and takes an answer only from
        # its response topic (_InFlight.answered), so the caller needs no hello to know it
        self.routed_device = device_id

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        return self.site.call(self.device_id, op, args)

"""Thousands of simulated devices, each with its own MQTT session, on one asyncio loop.

:class:`DeviceEngine` speaks the device side of the ``mqtt://`` contract,
:mod:`hw.backends.mqtt_contract` (topics, retained presence with a Last Will,
MQTT 5 response topic + correlation data, QoS 1, duplicates answered from
memory, reconnecting with back-off, maximum packet size), with the sans-IO codec
of :mod:`simulators.mqttlite.codec` instead of paho, so that
:class:`hw.backends.mqtt.MqttClient`, ``discover()`` and ``licadmin`` talk to
its devices exactly as to ``licagent``.

Design, for memory (paho costs about 20 KiB per client): one event loop thread
for every connection (asyncio transports on epoll), one small ``__slots__``
object per device and per connection, topics and presence built when needed,
one bounded answer memory for the whole engine instead of one per device.
Handlers (``(op, args) -> result``, e.g. :class:`agent.ops.AgentOps`; apply
does fsyncs) run on a small thread pool, one request at a time per device,
and their answers are published from the loop. Connections are opened by a
pump that keeps at most ``max_connecting`` handshakes in progress, so ten
thousand devices (or all of them after a broker restart, each after its own
back-off) never swamp the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from agent.rpc import Handler, TransportError
from hw.backends.mqtt_contract import (
    DROPPED,
    HANDLED,
    MAX_PACKET,
    REPEAT,
    SESSION_EXPIRY,
    AnswerMemory,
    Backoff,
    Log,
    Presence,
    answer_request,
    check_level,
    device_client_id,
    encode_presence,
    presence_topic,
    request_topic,
)
from hw.framing import DEFAULT_MAX_FRAME
from hw.link import netloc
from simulators.mqttlite import codec as c
from simulators.mqttlite.limits import CapacityError, check_capacity, raise_fd_limit

__all__ = ["DeviceEngine"]


# device states
WAITING, QUEUED, OPENING, HANDSHAKE, UP, GONE = range(6)
_CONNECTING = (OPENING, HANDSHAKE)

#: seconds for TCP connect, and for CONNACK + presence PUBACK after it
CONNECT_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 15.0
#: requests waiting behind a running one, per device
MAX_QUEUE = 32
#: how often keep-alive is looked after (every connection, one pass)
TICK = 1.0
#: log lines passed on per second at most
LOG_BURST = 20


class _Conn(asyncio.Protocol):
    """One TCP connection of one device (a new one per reconnection)."""

    __slots__ = ("decoder", "dev", "engine", "rx", "transport", "tx")

    def __init__(self, engine: DeviceEngine, dev: _Dev) -> None:
        self.engine, self.dev = engine, dev
        self.transport: asyncio.Transport | None = None
        self.decoder = c.Decoder(MAX_PACKET)
        self.rx = self.tx = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not isinstance(transport, asyncio.Transport):  # a stream socket's always is
            raise TypeError(f"an MQTT session needs a stream transport, not {transport!r}")
        self.transport = transport
        self.rx = self.tx = time.monotonic()
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.rx = time.monotonic()
        try:
            packets = self.decoder.feed(data)
        except c.CodecError as exc:
            self.engine._protocol_error(self, f"malformed data from the broker: {exc}")
            return
        for p in packets:
            if self.dev.conn is not self:
                return
            self.engine._packet(self, p)

    def connection_lost(self, exc: Exception | None) -> None:
        self.engine._lost(self, exc)

    def send(self, p: c.Packet, max_packet: int | None = None) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.transport.write(c.encode(p, max_packet))
        self.tx = time.monotonic()


class _Dev:
    """One simulated device: identity, handler, connection state. Kept small on purpose."""

    __slots__ = ("busy", "conn", "ever_up", "failures", "handler", "id", "index", "model", "pid",
                 "presence_pid", "queue", "state", "timer", "up_since")

    def __init__(self, device_id: str, model: str, handler: Handler, index: int) -> None:
        self.id, self.model, self.handler, self.index = device_id, model, handler, index
        self.conn: _Conn | None = None
        self.state = WAITING
        self.failures = 0
        self.up_since = 0.0
        self.pid = 0
        self.presence_pid = 0
        self.busy = False
        self.queue: deque[tuple[bytes, Any, Any]] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.ever_up = False

    def next_pid(self) -> int:
        self.pid = self.pid % 0xFFFF + 1
        return self.pid


class DeviceEngine:
    """Simulated devices on one broker site, each with its own MQTT session.

    Args:
        host, port: the broker.
        site: the site (topic level ``lic/SITE/...``).
        keepalive: MQTT keep-alive in seconds (the broker announces a silent
            device offline after 1.5 x keepalive).
        log: receives a line for each connection change and dropped request.
        workers: threads running handlers.
        max_connecting: connection handshakes in progress at once.
        sources: local source addresses to spread connections over (see
            :func:`simulators.mqttlite.check_capacity`); default the kernel's choice.
        remember: answers kept for repeated requests, for the whole engine.
    """

    def __init__(self, host: str, port: int, site: str, *, keepalive: int = 60,
                 log: Log | None = None, workers: int = 4, max_connecting: int = 64,
                 sources: Sequence[str] | None = None, remember: int = 4096) -> None:
        self.host, self.port = host, port
        self.site = check_level("site", site)
        if not 5 <= keepalive <= 65535:
            raise ValueError("keepalive must be 5 to 65535 seconds")
        self.keepalive = keepalive
        self._log: Log = log or (lambda _line: None)
        self._said = 0
        self._quiet_since = 0.0
        self._suppressed = 0
        self.workers = workers
        self.max_connecting = max(1, max_connecting)
        self.sources = tuple(s for s in (sources or ()) if s)
        self.memory = AnswerMemory(remember, size=32 * 1024 * 1024)
        self._backoff = Backoff()
        self._devices: dict[str, _Dev] = {}
        self._pending: deque[_Dev] = deque()
        self._connecting = 0
        self._ready = 0
        self._n = 0
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._tick: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # connections being opened
        self._broker_max = c.ABSOLUTE_MAX
        self._fd_room = 0
        self._stopped = False
        self.counts = {"reconnects": 0, "requests": 0, "repeats": 0, "dropped": 0,
                       "published": 0, "connect_failures": 0, "lost": 0}

    def log(self, line: str) -> None:
        """Pass ``line`` on, at most :data:`LOG_BURST` lines a second (a broker restart would
        otherwise bring one line per device); then say how many were left out."""
        now = time.monotonic()
        if now - self._quiet_since >= 1.0:
            if self._suppressed:
                self._log(f"mqtt: ({self._suppressed} similar lines left out)")
            self._quiet_since, self._said, self._suppressed = now, 0, 0
        if self._said >= LOG_BURST:
            self._suppressed += 1
            return
        self._said += 1
        self._log(line)

    # ------------------------------------------------------------ any thread

    def add(self, device_id: str, model: str, handler: Handler) -> None:
        """A new device; it connects and announces itself (at once if started, else on start)."""
        check_level("device ID", device_id)
        if self._stopped:
            raise TransportError("the device engine has been stopped")
        if device_id in self._devices:
            raise ValueError(f"device {device_id} is already in this engine")
        if self._loop is not None and len(self._devices) >= self._fd_room:
            check_capacity(len(self._devices) + 1, broker_host=self.host,
                           sources=self.sources or None)
            raise CapacityError(f"no descriptor left for device {len(self._devices) + 1}: "
                                f"{self._fd_room} fit in this process")
        dev = _Dev(device_id, model, handler, self._n)
        self._n += 1
        self._devices[device_id] = dev
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._queue, dev)

    def remove(self, device_id: str, graceful: bool = True) -> None:
        """Take a device away: ``graceful`` publishes its offline presence and disconnects;
        otherwise the socket is cut, as at power loss, and the broker publishes its Last Will."""
        dev = self._devices.pop(device_id, None)
        if dev is None:
            raise KeyError(device_id)
        if self._loop is None:
            return
        self._in_loop(functools.partial(self._close_dev, dev, graceful))

    def drop_connection(self, device_id: str) -> None:
        """A link fault: the connection is cut; the device reconnects with back-off and
        announces itself again."""
        dev = self._devices[device_id]

        def cut() -> None:
            if dev.conn is not None and dev.conn.transport is not None:
                dev.conn.transport.abort()
        if self._loop is not None:
            self._in_loop(cut)

    def start(self) -> None:
        if self._loop is not None:
            return
        raise_fd_limit()
        plan = check_capacity(len(self._devices), broker_host=self.host,
                              sources=self.sources or None)
        self._fd_room = plan.fd_room
        if not self.sources and len(plan.sources) > 1:
            self.sources = plan.sources  # more connections than one address has ports
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mqttlite-op")
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name=f"mqttlite {self.site}", daemon=True)
        self._thread.start()
        started.wait()

        def begin() -> None:
            for dev in list(self._devices.values()):
                self._queue(dev)
            self._tick = loop.call_later(TICK, self._keepalive)
        loop.call_soon_threadsafe(begin)

    def stop(self, graceful: bool = True, timeout: float = 30.0) -> None:
        """Take every device away (see :meth:`remove`) and end the loop and its threads."""
        loop = self._loop
        if loop is None or self._stopped:
            return
        self._stopped = True
        devs = list(self._devices.values())
        self._devices.clear()

        def close_all() -> None:
            if self._tick is not None:
                self._tick.cancel()
            for d in devs:
                self._close_dev(d, graceful)
            for t in list(self._tasks):
                t.cancel()  # closes a socket still connecting
        self._in_loop(close_all)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (self._tasks or
                                                any(d.conn is not None for d in devs)):
            time.sleep(0.02)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def wait_ready(self, count: int, timeout: float) -> int:
        """Wait until ``count`` devices are connected and announced; returns how many are."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._ready < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.5))
            return self._ready

    def stats(self) -> dict[str, int]:
        """connected, connecting, devices, reconnects, requests, repeats, dropped, published,
        connect_failures, lost, remembered."""
        return {"devices": len(self._devices), "connected": self._ready,
                "connecting": self._connecting, **self.counts,
                "remembered": len(self.memory)}

    @property
    def url(self) -> str:
        """The site URL clients use (``licadmin gather --server URL``); a device is URL/ID."""
        return f"mqtt://{netloc(self.host, self.port)}/{self.site}"

    def ready(self, device_id: str) -> bool:
        d = self._devices.get(device_id)
        return d is not None and d.state == UP

    def __len__(self) -> int:
        return len(self._devices)

    def __enter__(self) -> DeviceEngine:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _in_loop(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the loop thread and wait for it (directly when already there)."""
        loop = self._loop
        assert loop is not None
        if self._thread is threading.current_thread():
            fn()
            return
        done = threading.Event()
        err: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:  # handed to the caller
                err.append(exc)
            finally:
                done.set()
        try:
            loop.call_soon_threadsafe(run)
        except RuntimeError as exc:  # the loop is closed
            raise TransportError("the device engine has been stopped") from exc
        done.wait()
        if err:
            raise err[0]

    # ------------------------------------------------------------ loop thread: connecting

    def _set_state(self, dev: _Dev, new: int) -> None:
        old = dev.state
        if old == new:
            return
        dev.state = new
        if old in _CONNECTING and new not in _CONNECTING:
            self._connecting -= 1
            assert self._loop is not None
            self._loop.call_soon(self._pump)
        elif new in _CONNECTING and old not in _CONNECTING:
            self._connecting += 1
        if old == UP or new == UP:
            with self._cond:
                self._ready += 1 if new == UP else -1
                self._cond.notify_all()

    def _queue(self, dev: _Dev) -> None:
        dev.timer = None
        if dev.state != WAITING:
            return
        dev.state = QUEUED
        self._pending.append(dev)
        self._pump()

    def _pump(self) -> None:
        assert self._loop is not None
        while self._pending and self._connecting < self.max_connecting:
            dev = self._pending.popleft()
            if dev.state != QUEUED:
                continue
            self._set_state(dev, OPENING)
            task = self._loop.create_task(self._open(dev))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, dev: _Dev) -> None:
        assert self._loop is not None
        local = (self.sources[dev.index % len(self.sources)], 0) if self.sources else None
        try:
            _tr, conn = await asyncio.wait_for(self._loop.create_connection(
                functools.partial(_Conn, self, dev), self.host, self.port, local_addr=local),
                CONNECT_TIMEOUT)
        except Exception as exc:  # refused, unreachable, timed out, a bad source address
            self.counts["connect_failures"] += 1
            if dev.state == OPENING:
                self._retry(dev, f"cannot reach the MQTT broker {self.host}:{self.port}: "
                                 f"{exc or type(exc).__name__}")
            return
        if dev.state != OPENING:  # removed meanwhile
            if conn.transport is not None:
                conn.transport.abort()
            return
        dev.conn = conn
        self._set_state(dev, HANDSHAKE)
        offline = encode_presence(Presence(dev.id, dev.model, False))
        conn.send(c.Connect(
            device_client_id(self.site, dev.id), self.keepalive, clean_start=not dev.ever_up,
            properties={c.P_SESSION_EXPIRY: SESSION_EXPIRY, c.P_MAX_PACKET_SIZE: MAX_PACKET},
            will=c.Will(presence_topic(self.site, dev.id), offline, qos=1, retain=True)))
        dev.timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_timeout, dev, conn)

    def _handshake_timeout(self, dev: _Dev, conn: _Conn) -> None:
        dev.timer = None
        if dev.conn is conn and dev.state == HANDSHAKE and conn.transport is not None:
            self.log(f"mqtt: no answer from the MQTT broker {self.host}:{self.port} to device "
                     f"{dev.id[:12]}'s connection within {HANDSHAKE_TIMEOUT:g} s")
            conn.transport.abort()

    def _retry(self, dev: _Dev, why: str) -> None:
        assert self._loop is not None
        self._set_state(dev, WAITING)
        b = self._backoff  # the contract's back-off; the failure count is the device's
        b.failures = dev.failures
        delay = b.next_delay()
        dev.failures = b.failures
        if dev.failures <= 1 or dev.failures % 8 == 0:
            self.log(f"mqtt: device {dev.id[:12]}: {why}; trying again in {delay:.1f} s")
        dev.timer = self._loop.call_later(delay, self._queue, dev)

    def _lost(self, conn: _Conn, exc: Exception | None) -> None:
        dev = conn.dev
        conn.transport = None
        if dev.conn is not conn:
            return
        dev.conn = None
        if dev.timer is not None:
            dev.timer.cancel()
            dev.timer = None
        if dev.state == GONE:
            return
        was_up = dev.state == UP
        if was_up:
            self.counts["lost"] += 1
            self._backoff.failures = dev.failures
            self._backoff.connection_ended(time.monotonic() - dev.up_since)
            dev.failures = self._backoff.failures
            why = f"the connection to the MQTT broker was lost{f' ({exc})' if exc else ''}"
        else:
            why = "the MQTT broker closed the connection before accepting it"
        self._retry(dev, why)

    def _protocol_error(self, conn: _Conn, why: str) -> None:
        self.log(f"mqtt: device {conn.dev.id[:12]}: {why}; reconnecting")
        if conn.transport is not None:
            conn.transport.abort()

    def _close_dev(self, dev: _Dev, graceful: bool) -> None:
        if dev.timer is not None:
            dev.timer.cancel()
            dev.timer = None
        was_up = dev.state == UP
        self._set_state(dev, GONE)
        conn = dev.conn
        if conn is None or conn.transport is None:
            dev.conn = None
            return
        if graceful and was_up:
            offline = encode_presence(Presence(dev.id, dev.model, False))
            conn.send(c.Publish(presence_topic(self.site, dev.id), offline, qos=1, retain=True,
                                packet_id=dev.next_pid()))
            self.counts["published"] += 1
            # a normal DISCONNECT: no Last Will, and the broker forgets the session at once
            conn.send(c.Disconnect(0, {c.P_SESSION_EXPIRY: 0}))
            conn.transport.close()
        else:
            conn.transport.abort()

    def _keepalive(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        ping_after, dead_after = self.keepalive * 0.75, self.keepalive * 1.5 + 5
        for dev in list(self._devices.values()):
            conn = dev.conn
            if conn is None or conn.transport is None or dev.state not in (HANDSHAKE, UP):
                continue
            if now - conn.rx > dead_after:
                self._protocol_error(conn, f"the broker has been silent for {now - conn.rx:.0f} s")
            elif now - conn.tx >= ping_after:
                conn.send(c.Pingreq())
        self._tick = self._loop.call_later(TICK, self._keepalive)

    # ------------------------------------------------------------ loop thread: packets

    def _packet(self, conn: _Conn, p: c.Packet) -> None:
        dev = conn.dev
        if isinstance(p, c.Publish):
            if p.qos == 1:
                conn.send(c.Puback(p.packet_id))
            elif p.qos == 2:
                self._protocol_error(conn, "a QoS 2 message (we subscribe with QoS 1)")
                return
            self._request(dev, p)
        elif isinstance(p, c.Puback):
            if p.packet_id == dev.presence_pid and dev.state == HANDSHAKE:
                dev.presence_pid = 0
                if p.reason >= 0x80:
                    self.log(f"mqtt: the broker refused the presence of device {dev.id[:12]} "
                             f"(reason {p.reason:#x}): a device certificate must name it")
                self._announced(dev)
        elif isinstance(p, c.Connack):
            if dev.state != HANDSHAKE:
                self._protocol_error(conn, "an unexpected CONNACK")
            elif p.reason >= 0x80:
                self.log(f"mqtt: the MQTT broker {self.host}:{self.port} refused device "
                         f"{dev.id[:12]}: reason {p.reason:#x}")
                if conn.transport is not None:
                    conn.transport.abort()
            else:
                self._broker_max = int(p.properties.get(c.P_MAX_PACKET_SIZE, self._broker_max))
                server_keepalive = p.properties.get(c.P_SERVER_KEEP_ALIVE)
                if isinstance(server_keepalive, int) and 0 < server_keepalive < self.keepalive:
                    self.keepalive = server_keepalive  # the broker's word is final (MQTT 5)
                # subscribe before announcing: the broker handles both in order, so a client
                # that sees the presence can send a request at once
                conn.send(c.Subscribe(dev.next_pid(), ((request_topic(self.site, dev.id), 1),)))
                dev.presence_pid = dev.next_pid()
                online = encode_presence(Presence(dev.id, dev.model, True))
                conn.send(c.Publish(presence_topic(self.site, dev.id), online, qos=1,
                                    retain=True, packet_id=dev.presence_pid))
                self.counts["published"] += 1
        elif isinstance(p, c.Suback):
            if any(r >= 0x80 for r in p.reasons):
                self.log(f"mqtt: the broker refused device {dev.id[:12]}'s subscription to "
                         f"{request_topic(self.site, dev.id)} (reason {p.reasons[0]:#x})")
        elif isinstance(p, c.Disconnect):
            self.log(f"mqtt: the broker disconnected device {dev.id[:12]} "
                     f"(reason {p.reason:#x})")
        elif not isinstance(p, c.Pingresp):
            self._protocol_error(conn, f"an unexpected {type(p).__name__} from the broker")

    def _announced(self, dev: _Dev) -> None:
        if dev.timer is not None:
            dev.timer.cancel()
            dev.timer = None
        again = dev.ever_up
        dev.ever_up = True
        dev.up_since = time.monotonic()
        self._set_state(dev, UP)
        if again:
            self.counts["reconnects"] += 1
            self.log(f"mqtt: reconnected to {self.host}:{self.port}; presence of "
                     f"{dev.id[:12]} published again")

    def _request(self, dev: _Dev, p: c.Publish) -> None:
        if p.topic != request_topic(self.site, dev.id) or dev.state == GONE:
            return
        item = (p.payload, p.properties.get(c.P_RESPONSE_TOPIC),
                p.properties.get(c.P_CORRELATION_DATA))
        if dev.busy:
            if dev.queue is None:
                dev.queue = deque()
            if len(dev.queue) >= MAX_QUEUE:
                self.counts["dropped"] += 1
                return
            dev.queue.append(item)
            return
        self._run(dev, item)

    def _run(self, dev: _Dev, item: tuple[bytes, Any, Any]) -> None:
        assert self._loop is not None and self._pool is not None
        dev.busy = True
        payload, reply_to, corr = item
        fut = self._loop.run_in_executor(
            self._pool, answer_request, dev.handler, self.site, dev.id, payload, reply_to, corr,
            self.memory, DEFAULT_MAX_FRAME, self.log)
        fut.add_done_callback(functools.partial(self._answered, dev, reply_to, corr))

    def _answered(self, dev: _Dev, reply_to: Any, corr: Any, fut: asyncio.Future[Any]) -> None:
        dev.busy = False
        if not fut.cancelled():
            exc = fut.exception()
            if exc is not None:
                self.counts["dropped"] += 1
                self.log(f"mqtt: device {dev.id[:12]}: internal error: {exc!r}")
            else:
                what, out = fut.result()
                self.counts[{HANDLED: "requests", REPEAT: "repeats", DROPPED: "dropped"}[what]] += 1
                conn = dev.conn
                if out is not None and conn is not None and dev.state in (HANDSHAKE, UP):
                    try:
                        conn.send(c.Publish(reply_to, out, qos=1, packet_id=dev.next_pid(),
                                            properties={c.P_CORRELATION_DATA: corr}),
                                  self._broker_max)
                        self.counts["published"] += 1
                    except c.CodecError as err:
                        self.counts["dropped"] += 1
                        self.log(f"mqtt: device {dev.id[:12]}: answer not sent: {err}")
        if dev.queue:
            item = dev.queue.popleft()
            if not dev.queue:
                dev.queue = None
            if dev.state != GONE:
                self._run(dev, item)

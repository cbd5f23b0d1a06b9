"""The fleet's link kinds: one class per kind serves the servers, reaches them and breaks them.

Each kind of link (``tcp``, ``pty``, ``sim``, ``usbdrop``, ``mqtt``) is one small
:class:`FleetLink` subclass, registered by name in :data:`LINK_KINDS`; the fleet
looks a kind up instead of testing ``link == ...``. A kind knows how to serve one
server on it, how the fleet's client connects, when the fleet waits for it to be
ready, and carries its own fault hook (:meth:`FleetLink.inject`), which uses the
link's own fault seam: ``tcp`` and ``sim`` drop their connections with the
listener's :meth:`hw.link.Listener.cut`, ``sim`` puts the load's line faults on the
client's URL (the ``sim://`` fault injector), ``pty`` writes noise on the line from
the cable's end, ``mqtt`` drops the engine's connection, ``usbdrop`` pulls the stick.

Threads stay as few as the hw backends allow:

* ``mqtt``: :class:`simulators.mqttlite.DeviceEngine`, every server's own MQTT
  session on ONE asyncio loop thread (about 2 KiB a session, where a paho client
  costs about 20 KiB), speaking the ``mqtt://`` contract of ``hw.backends.mqtt_contract``.
* ``usbdrop``: one mailbox folder per server, all polled by ONE thread
  (:class:`MailboxPoller` calls each listener's ``poll_once``).
* ``tcp``, ``pty``, ``sim``: the hw listeners as ``licagent run`` uses them
  (an accept thread per tcp listener, a thread per pty, a thread per sim line).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import hw
from agent.errors import LicensingError
from agent.rpc import Handler
from hw.backends.serialport import PtyListener
from hw.backends.sim import SimFabric
from hw.link import Listener, parse_url
from simulators.fleet.server import SimServer
from simulators.mqttlite import DeviceEngine

__all__ = ["LINK_KINDS", "FleetLink", "MailboxPoller", "ServedLinks", "wait_until"]


Log = Callable[[str], None]
#: records one check a fault makes: ``(name, held, detail)``
Check = Callable[[str, bool, str], None]


def wait_until(fn: Callable[[], bool], timeout: float) -> bool:
    """Poll ``fn`` every 0.1 s until it is true (True) or ``timeout`` passed (False)."""
    deadline = time.monotonic() + timeout
    while True:
        if fn():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def answers(url: str, timeout: float) -> bool:
    """One ``hello`` on a fresh connection to ``url``, no retry."""
    try:
        with hw.connect(url, timeout=timeout, tries=1) as c:
            c.hello()
        return True
    except LicensingError:
        return False


class MailboxPoller:
    """One thread that polls every server's USB mailbox folder in turn."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.mailboxes: dict[str, Any] = {}  # server name -> MailboxListener (never started)
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def add(self, name: str, listener: Any) -> None:
        with self.lock:
            self.mailboxes[name] = listener
        if self.thread is None:
            self.thread = threading.Thread(target=self._run, name="fleet-usbdrop", daemon=True)
            self.thread.start()

    def remove(self, name: str) -> Any:
        with self.lock:
            return self.mailboxes.pop(name, None)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            # the lock is held for the whole round, so a mailbox removed (a stick pulled)
            # is not polled once more after remove() returns
            with self.lock:
                for box in self.mailboxes.values():
                    box.poll_once()  # never raises
            self.stop_event.wait(self.interval)

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=30)
            self.thread = None


class FleetLink:
    """One kind of link of one fleet: serves servers on it, connects to them, breaks it.

    Subclasses implement :meth:`serve`; the other hooks have the defaults of a plain
    listener link (tcp, sim: a fault cuts the listener's connections).

    Args:
        links: the fleet's links (its folder, log, MQTT engine and load options).
    """

    #: the name a scenario uses (a key of :data:`simulators.fleet.models.LINKS`)
    name: ClassVar[str]
    #: file descriptors one server served on this kind holds in the fleet's process
    fds: ClassVar[int] = 0
    #: the fleet keeps its client open between operations (False: given back after each)
    keeps_client: ClassVar[bool] = True
    #: what the default fault hook's cut closed, in the fault's record ("3 connection(s) cut")
    cut_what: ClassVar[str] = "connection(s) cut"

    def __init__(self, links: ServedLinks) -> None:
        self.links = links
        self.listeners: dict[str, Listener] = {}  # server name -> its listener

    def serve(self, name: str, device_id: str, model: str, handler: Handler) -> str:
        """Serve one server on this link; returns the URL a client uses."""
        raise NotImplementedError

    def _listen(self, name: str, lst: Listener) -> str:
        lst.start()
        self.listeners[name] = lst
        return lst.address

    def inject(self, srv: SimServer, noise: bytes, check: Check) -> str:
        """The fault hook: make this link of ``srv`` fail the way it fails in the field.

        Args:
            srv: the server.
            noise: random bytes with frame delimiters, for links that carry line noise.
            check: records what must hold while the fault lasts.

        Returns:
            what was done, for the fault's record.
        """
        return f"{self.listeners[srv.name].cut()} {self.cut_what}"

    @property
    def load_faults(self) -> str:
        """URL options of the faults the load's client line carries ("" none)."""
        return ""

    def connect(self, url: str, timeout: float, line_faults: str = "") -> Any:
        """The fleet's client on ``url``; ``timeout`` bounds one call, retries included."""
        return hw.connect(url, timeout=timeout / 4, tries=4)

    def close_clients(self) -> None:
        """The fleet's clients are closed: release what they shared."""

    def wait_ready(self, servers: list[SimServer], timeout: float) -> list[str]:
        """Wait until ``servers`` are ready on this link as a group; returns what is not."""
        return []

    def needs_hello(self, servers: list[SimServer]) -> list[SimServer]:
        """The servers whose readiness is then proven by a ``hello`` round trip."""
        return servers

    def corrupt_frames(self) -> int:
        return sum(lst.corrupt_frames for lst in self.listeners.values())

    def stop(self) -> None:
        for lst in self.listeners.values():
            try:
                lst.stop()
            except Exception as exc:
                self.links.log(f"stopping {lst.address} failed: {exc!r}")
        self.listeners.clear()


class TcpLink(FleetLink):
    """The LAN port; a fault closes the server's open connections."""

    name = "tcp"
    fds = 1
    cut_what = "tcp connection(s) closed"

    def serve(self, name: str, device_id: str, model: str, handler: Handler) -> str:
        n = self.links.tcp_sessions  # issue 15: [clients] all connect from 127.0.0.1
        url = f"tcp://127.0.0.1:0?max_per_peer={n}&max_clients={n}" if n else "tcp://127.0.0.1:0"
        return self._listen(name, hw.listen(url, handler, log=self.links.log))


class PtyLink(FleetLink):
    """The serial console (a pseudo-terminal); a fault is line noise from the cable."""

    name = "pty"
    fds = 1
    keeps_client = False  # a console is closed again so other tools can open it

    def serve(self, name: str, device_id: str, model: str, handler: Handler) -> str:
        return self._listen(name, hw.listen("pty://", handler))

    def inject(self, srv: SimServer, noise: bytes, check: Check) -> str:
        # bytes the server must resynchronise after
        lst = self.listeners[srv.name]
        assert isinstance(lst, PtyListener)
        path = lst.path
        fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            n = os.write(fd, noise)
        finally:
            os.close(fd)
        return f"{n} bytes of line noise on {path}"


class SimLink(FleetLink):
    """An in-process ``sim://`` line: the load's client carries ``[load] sim_line`` faults
    (the sim backend's fault injector); a fault cuts every line (the listener's own hook)."""

    name = "sim"
    cut_what = "simulated line(s) cut"

    def __init__(self, links: ServedLinks) -> None:
        super().__init__(links)
        self.fabric = SimFabric()

    def serve(self, name: str, device_id: str, model: str, handler: Handler) -> str:
        return self._listen(name, hw.listen(f"sim://{name}", handler, fabric=self.fabric))

    @property
    def load_faults(self) -> str:
        return self.links.sim_line

    def connect(self, url: str, timeout: float, line_faults: str = "") -> Any:
        if line_faults:
            url += "?" + line_faults
        return hw.connect(url, fabric=self.fabric, timeout=timeout / 4, tries=4)


class UsbdropLink(FleetLink):
    """The USB device port as a mailbox folder; a fault pulls the stick, then puts it back."""

    name = "usbdrop"

    def __init__(self, links: ServedLinks) -> None:
        super().__init__(links)
        self.mailboxes = MailboxPoller()

    def serve(self, name: str, device_id: str, model: str, handler: Handler) -> str:
        folder = self.links.workdir / "usb" / name
        folder.mkdir(parents=True, exist_ok=True)
        url = f"usbdrop://{folder}?always=1"
        self.mailboxes.add(name, hw.listen(url, handler, log=lambda _line: None))
        return url

    def inject(self, srv: SimServer, noise: bytes, check: Check) -> str:
        box = self.mailboxes.remove(srv.name)  # the stick is out: its mailbox is not polled
        try:
            out = not answers(srv.addresses[self.name], 0.5)
            check("pulled-stick-unreachable", out,
                  "no answer while the stick is out" if out else "answered anyway")
        finally:
            if box is not None:  # put back: polled again
                self.mailboxes.add(srv.name, box)
        return "USB stick pulled, put back"

    def connect(self, url: str, timeout: float, line_faults: str = "") -> Any:
        return hw.connect(url, timeout=timeout)

    def mailbox_ready(self, srv: SimServer) -> bool:
        """The server's mailbox has been polled: its device information is on the stick."""
        return (self.links.workdir / "usb" / srv.name / srv.device_id
                / "device-info.cbor").is_file()

    def wait_ready(self, servers: list[SimServer], timeout: float) -> list[str]:
        if wait_until(lambda: all(self.mailbox_ready(s) for s in servers), timeout):
            return []
        return [f"{s.name} usbdrop (no device-info.cbor on its stick)"
                for s in servers if not self.mailbox_ready(s)]

    def needs_hello(self, servers: list[SimServer]) -> list[SimServer]:
        # a round trip costs a poll cycle over every mailbox, so not one per server
        return servers[:1]

    def stop(self) -> None:
        self.mailboxes.stop()


class MqttLink(FleetLink):
    """The site broker, every session on the fleet's one engine; a fault drops a session's
    broker connection (the engine's own hook)."""

    name = "mqtt"
    fds = 1

    def __init__(self, links: ServedLinks) -> None:
        super().__init__(links)
        self.client_loop: Any = None  # hw.backends.mqtt_loop.MqttLoop of the fleet's clients

    @property
    def engine(self) -> DeviceEngine:
        assert self.links.mqtt is not None, "mqtt is served by the fleet's engine"
        return self.links.mqtt

    def serve(self, name: str, device_id: str, model: str, handler: Handler) -> str:
        self.engine.add(device_id, model, handler)
        return f"{self.engine.url}/{device_id}"

    def inject(self, srv: SimServer, noise: bytes, check: Check) -> str:
        if self.engine.ready(srv.device_id):
            self.engine.drop_connection(srv.device_id)
            return "broker connection dropped; the server reconnects with back-off"
        return "not connected at that moment; nothing to drop"

    def connect(self, url: str, timeout: float, line_faults: str = "") -> Any:
        if self.client_loop is None:
            from hw.backends.mqtt_loop import MqttLoop

            self.client_loop = MqttLoop("fleet-clients")
            self.client_loop.start()
        return hw.connect(url, loop=self.client_loop, timeout=timeout / 3, tries=3)

    def close_clients(self) -> None:
        if self.client_loop is not None:
            self.client_loop.stop()
            self.client_loop = None

    def sessions_connected(self, n: int, timeout: float) -> bool:
        return self.engine.wait_ready(n, timeout) >= n

    def connected(self) -> str:
        return str(self.engine.stats().get("connected", "?"))

    def listed_online(self, servers: list[SimServer], timeout: float) -> str | None:
        """Wait until every server's presence is listed online; None, or what is missing."""
        from hw.backends.mqtt import discover

        assert self.links.broker_url is not None
        want = {s.device_id for s in servers}
        deadline = time.monotonic() + timeout
        while True:
            try:
                online = {d for d, _m, up in discover(f"{self.links.broker_url}/{self.links.site}",
                                                      timeout=max(5.0, len(servers) / 500))
                          if up}
            except LicensingError as exc:
                online = set()
                self.links.log(f"discover failed: {exc}")
            missing = want - online
            if not missing:
                return None
            if time.monotonic() > deadline:
                return f"mqtt: {len(missing)} device(s) not listed online"
            time.sleep(0.2)

    def wait_ready(self, servers: list[SimServer], timeout: float) -> list[str]:
        n = len(servers)
        if not self.sessions_connected(n, timeout):
            return [f"mqtt: {self.connected()} of {n} connected"]
        missing = self.listed_online(servers, timeout)
        return [missing] if missing else []

    def needs_hello(self, servers: list[SimServer]) -> list[SimServer]:
        return []  # listed online is the proof

    def stop(self) -> None:
        if self.links.mqtt is not None:
            self.links.mqtt.stop()


#: every link kind by name, in the order the fleet waits for them to be ready
LINK_KINDS: Mapping[str, type[FleetLink]] = {
    k.name: k for k in (MqttLink, UsbdropLink, TcpLink, PtyLink, SimLink)}


class ServedLinks:
    """The fleet's link kinds, one :class:`FleetLink` each, and what they share.

    Args:
        workdir: the fleet's folder (mailboxes go to ``workdir/usb/NAME``); the fleet's
            own :attr:`Fleet.workdir` is this one.
        log: one line per link event.
        sim_line: URL options of the faults on the load's ``sim://`` lines.
    """

    def __init__(self, workdir: Path, log: Log, sim_line: str = "",
                 tcp_sessions: int | None = None) -> None:
        self.workdir = workdir
        #: sessions a tcp listener takes from one address (None: the listener's default);
        #: the seat clients of a scenario (issue 15) all come from the loopback address
        self.tcp_sessions = tcp_sessions
        self.mqtt: DeviceEngine | None = None  # the MQTT engine, once start_mqtt() ran
        self.log = log
        self.sim_line = sim_line
        self.broker_url: str | None = None
        self.site = ""
        #: the two kinds the fleet also reaches by type (the sim fabric, the MQTT sessions)
        self.sim_link = SimLink(self)
        self.mqtt_link = MqttLink(self)
        typed: dict[str, FleetLink] = {k.name: k for k in (self.sim_link, self.mqtt_link)}
        self.kinds: dict[str, FleetLink] = {name: typed.get(name) or cls(self)
                                            for name, cls in LINK_KINDS.items()}

    def kind(self, link: str) -> FleetLink:
        try:
            return self.kinds[link]
        except KeyError:  # the scenario checked the links
            raise LicensingError(f"no such link {link!r}") from None

    @property
    def fabric(self) -> SimFabric:
        """The sim:// lines of the fleet (their fault counters)."""
        return self.sim_link.fabric

    def start_mqtt(self, broker_url: str, site: str) -> DeviceEngine:
        """The fleet's MQTT side: one engine for every server's session."""
        self.broker_url, self.site = broker_url, site
        u = parse_url(broker_url)
        engine = DeviceEngine(u.host or "127.0.0.1", u.port or 1883, site, log=self.log)
        engine.start()
        self.mqtt = engine
        return engine

    def serve(self, name: str, device_id: str, model: str, link: str, handler: Handler) -> str:
        """Serve one server on one link; returns the URL a client uses."""
        return self.kind(link).serve(name, device_id, model, handler)

    def fault(self, srv: SimServer, link: str, noise: bytes, check: Check) -> str:
        """Make one link of one server fail through that link's fault hook."""
        return self.kind(link).inject(srv, noise, check)

    def in_use(self, servers: Iterable[SimServer]) -> list[tuple[FleetLink, list[SimServer]]]:
        """Each kind some server is served on, with those servers, in :data:`LINK_KINDS` order."""
        servers = list(servers)
        return [(k, on) for k in self.kinds.values()
                if (on := [s for s in servers if k.name in s.links])]

    def corrupt_frames(self) -> int:
        return sum(k.corrupt_frames() for k in self.kinds.values())

    def close_clients(self) -> None:
        for k in self.kinds.values():
            k.close_clients()

    def stop(self) -> None:
        for k in reversed(self.kinds.values()):  # the MQTT engine last
            k.stop()

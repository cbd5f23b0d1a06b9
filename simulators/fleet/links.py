"""Serving the fleet's servers on their links, with as few threads as the hw backends allow.

* ``mqtt``: :class:`simulators.mqttlite.DeviceEngine`, every server's own MQTT
  session on ONE asyncio loop thread (about 2 KiB a session, where a paho client
  costs about 20 KiB), speaking the ``mqtt://`` contract of ``hw.backends.mqtt``.
* ``usbdrop``: one mailbox folder per server, all polled by ONE thread
  (:class:`MailboxPoller` calls each listener's ``poll_once``).
* ``tcp``, ``pty``, ``sim``: the hw listeners as ``licagent run`` uses them
  (an accept thread per tcp listener, a thread per pty, a thread per sim line).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import hw
from agent.errors import LicensingError
from hw.link import Listener, parse_url
from simulators.mqttlite import DeviceEngine

__all__ = ["MailboxPoller", "ServedLinks", "start_mqtt"]

Handler = Callable[[str, Mapping[str, Any]], Any]
Log = Callable[[str], None]


def start_mqtt(broker_url: str, site: str, log: Log | None = None) -> DeviceEngine:
    """The fleet's MQTT side: one engine for every server's session."""
    u = parse_url(broker_url)
    engine = DeviceEngine(u.host or "127.0.0.1", u.port or 1883, site, log=log)
    engine.start()
    return engine


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


class ServedLinks:
    """The listeners of the whole fleet, and the link faults that act on them.

    Args:
        workdir: the fleet's folder (mailboxes go to ``workdir/usb/NAME``).
        mqtt: the MQTT engine, when a server has the mqtt link.
        log: one line per link event.
    """

    def __init__(self, workdir: Path, mqtt: DeviceEngine | None, log: Log) -> None:
        from hw.backends.sim import SimFabric

        self.workdir = workdir
        self.mqtt = mqtt
        self.log = log
        self.fabric = SimFabric()
        self.mailboxes = MailboxPoller()
        self.listeners: dict[tuple[str, str], Listener] = {}  # (server, link) -> listener
        self.pulled: dict[str, Any] = {}  # server name -> its mailbox while the stick is out

    def serve(self, name: str, device_id: str, model: str, link: str, handler: Handler) -> str:
        """Serve one server on one link; returns the URL a client uses."""
        if link == "mqtt":
            assert self.mqtt is not None
            self.mqtt.add(device_id, model, handler)
            return f"{self.mqtt.url}/{device_id}"
        if link == "usbdrop":
            folder = self.workdir / "usb" / name
            folder.mkdir(parents=True, exist_ok=True)
            url = f"usbdrop://{folder}?always=1"
            box = hw.listen(url, handler, log=lambda _line: None)
            self.mailboxes.add(name, box)
            return url
        if link == "tcp":
            lst: Listener = hw.listen("tcp://127.0.0.1:0", handler, log=self.log)
        elif link == "pty":
            lst = hw.listen("pty://", handler)
        elif link == "sim":
            lst = hw.listen(f"sim://{name}", handler, fabric=self.fabric)
        else:  # the scenario checked the links
            raise LicensingError(f"no such link {link!r}")
        lst.start()
        self.listeners[(name, link)] = lst
        return lst.address

    def fault(self, name: str, device_id: str, link: str, noise: bytes) -> str:
        """Make one link of one server fail; returns what was done."""
        if link == "mqtt":
            assert self.mqtt is not None
            if self.mqtt.ready(device_id):
                self.mqtt.drop_connection(device_id)
                return "broker connection dropped; the server reconnects with back-off"
            return "not connected at that moment; nothing to drop"
        if link == "usbdrop":
            box = self.mailboxes.remove(name)
            if box is not None:
                self.pulled[name] = box
            return "USB stick pulled"
        lst = self.listeners[(name, link)]
        if link == "tcp":
            import socket

            conns = [c.sock for c in list(getattr(lst, "_conns", {}).values())]
            for sock in conns:
                try:
                    socket.socket.shutdown(sock, socket.SHUT_RDWR)
                except OSError:
                    pass
            return f"{len(conns)} tcp connection(s) closed"
        if link == "pty":
            # line noise from the console cable: bytes the server must resynchronise after
            path = lst.address.removeprefix("serial://")
            fd = os.open(path, os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                n = os.write(fd, noise)
            finally:
                os.close(fd)
            return f"{n} bytes of line noise on {path}"
        if link == "sim":
            ends = list(getattr(lst, "ends", []))
            for e in ends:
                e.close()
            return f"{len(ends)} simulated line(s) cut"
        raise LicensingError(f"no link fault for {link!r}")

    def mailbox_ready(self, name: str, device_id: str) -> bool:
        """The server's mailbox has been polled: its device information is on the stick."""
        return (self.workdir / "usb" / name / device_id / "device-info.cbor").is_file()

    def heal(self, name: str) -> None:
        """Put a pulled USB stick back (its mailbox is polled again)."""
        box = self.pulled.pop(name, None)
        if box is not None:
            self.mailboxes.add(name, box)

    def corrupt_frames(self) -> int:
        return sum(int(getattr(lst, "corrupt_frames", 0)) for lst in self.listeners.values())

    def stop(self) -> None:
        self.mailboxes.stop()
        for lst in self.listeners.values():
            try:
                lst.stop()
            except Exception as exc:
                self.log(f"stopping {lst.address} failed: {exc!r}")
        self.listeners.clear()
        if self.mqtt is not None:
            self.mqtt.stop()

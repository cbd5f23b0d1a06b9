"""``serial://PORT`` (pyserial, both ends) and ``pty://`` (a real pseudo-terminal the agent serves on).

``serial:///dev/ttyUSB0?baud=115200`` opens a port through pyserial. As a
client it takes ``baud``, ``timeout`` (seconds per try) and ``tries``; as a
listener (the agent answering on its console or USB CDC port) it takes
``baud`` and ``reopen`` (seconds between attempts to open the port again after
it disappeared, e.g. a USB CDC gadget unplugged and plugged back).

``pty://`` creates a pseudo-terminal pair with :func:`os.openpty` and serves
on the master; its :attr:`~hw.link.Listener.address` is
``serial:///dev/pts/N``, which any serial client (this module, ``screen``,
``socat``) opens like a real port. Linux reports EIO on the master while no
one has the slave open; the listener treats that as "cable unplugged", waits,
and starts a fresh session when a client opens the slave again.
"""

from __future__ import annotations

import abc
import errno
import math
import os
import select
import threading
import time
import tty
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote, urlsplit

from agent.errors import UsageError
from agent.rpc import Handler, TransportError, for_origin
from hw.link import Link, LinkURL, Listener, StreamClient, serve_stream

__all__ = [
    "DEFAULT_BAUD",
    "FdLink",
    "PtyListener",
    "SerialLink",
    "SerialListener",
    "connect",
    "listen",
    "open_serial",
]

DEFAULT_BAUD = 115200
#: seconds a write may wait for the other side to drain before the link counts as stalled
WRITE_TIMEOUT = 5.0
_CLIENT_OPTIONS = ("baud", "timeout", "tries")
_SERIAL_LISTEN_OPTIONS = ("baud", "reopen")



# ---------------------------------------------------------------- links


class SerialLink(Link):
    """A pyserial port as a link; ``serial`` is the open :class:`serial.Serial`."""

    def __init__(self, port: Any) -> None:
        self.serial = port

    def _write(self, data: bytes) -> None:
        self.serial.write(data)  # SerialException is an OSError: Link.write wraps it

    def _read(self, timeout: float) -> bytes:
        ser = self.serial
        fileno = getattr(ser, "fileno", None)
        if fileno is not None:
            # POSIX: wait here, then take what is there without blocking (the port's
            # own timeout stays 0, so no tcsetattr per read)
            ready, _, _ = select.select([fileno()], [], [], timeout)
            if not ready:
                return b""
            return bytes(ser.read(max(1, ser.in_waiting)))
        if ser.timeout != timeout:  # pragma: no cover - Windows
            ser.timeout = timeout
        data = bytes(ser.read(1))
        if data:
            data += bytes(ser.read(ser.in_waiting))
        return data

    def _close(self) -> None:
        self.serial.close()


class FdLink(Link):
    """A raw file descriptor as a link (the master side of a pty).

    :meth:`read` raises :class:`~hw.rpc.TransportError` when the other side of
    the pty is closed (EIO), like any link whose peer went away.

    Args:
        fd: a non-blocking descriptor.
        owns: close ``fd`` when the link is closed.
        write_timeout: seconds a write may wait for the other side to drain.
    """

    def __init__(self, fd: int, owns: bool = False, write_timeout: float = WRITE_TIMEOUT) -> None:
        self.fd = fd
        self.owns = owns
        self.write_timeout = write_timeout
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        deadline = time.monotonic() + self.write_timeout
        out = select.poll()
        out.register(self.fd, select.POLLOUT)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                n = 0
            if n:
                view = view[n:]
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransportError(f"write stalled for {self.write_timeout:g} s: "
                                     "nobody reads the other end")
            out.poll(min(left, 0.05) * 1000)

    def _read(self, timeout: float) -> bytes:
        if not self._poll.poll(timeout * 1000):
            return b""
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno == errno.EIO:
                raise TransportError("the other end of the pty is closed") from exc
            raise
        if not data:
            raise TransportError("end of stream")
        return data

    def _close(self) -> None:
        if self.owns:
            os.close(self.fd)


def open_serial(port: str, baud: int = DEFAULT_BAUD) -> SerialLink:
    """Open ``port`` through pyserial (8N1, no flow control, exclusive).

    Raises:
        TransportError: the port does not exist or cannot be opened.
    """
    import serial  # pyserial, only when a serial link is used

    try:
        ser = serial.Serial(port, baudrate=baud, timeout=0, write_timeout=WRITE_TIMEOUT,
                            exclusive=True)
    except (OSError, ValueError) as exc:  # SerialException is an OSError
        raise TransportError(f"cannot open serial port {port}: {exc} "
                             "(check the path, its permissions, and that nothing else "
                             "holds it open)") from exc
    return SerialLink(ser)


# ---------------------------------------------------------------- options


def _port(url: LinkURL) -> str:
    # not url.host: urlsplit lower-cases it, and serial://COM3 must stay COM3
    parts = urlsplit(url.text)
    port = unquote(parts.netloc + parts.path)
    if not port:
        raise UsageError(f"{url.text}: which port? e.g. serial:///dev/ttyUSB0 or serial://COM3")
    return port


def _number(url: LinkURL, name: str, kind: type[int] | type[float], default: Any,
            low: float) -> Any:
    text = url.option(name)
    if text is None:
        return default
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value < low:
        raise UsageError(f"{url.scheme}:// option {name}={text!r} must be a number >= {low:g}")
    return value


def _baud(url: LinkURL) -> int:
    baud: int = _number(url, "baud", int, DEFAULT_BAUD, 1)
    return baud


# ---------------------------------------------------------------- listeners


class _ServingListener(Listener):
    """A listener whose single thread serves one link at a time, opening it again when it fails."""

    def __init__(self, handler: Handler, retry: float, poll: float = 0.2) -> None:
        self.handler = handler
        self.retry = retry
        self.poll = poll
        self.stop_event = threading.Event()
        self.thread: threading.Thread | None = None

    def _serve(self, link: Link) -> None:
        serve_stream(link, for_origin(self.handler, f"serial {self.address}"), self.stop_event,
                     poll=self.poll,
                     on_corrupt=self._count_corrupt)

    def _spawn(self, name: str) -> None:
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    @abc.abstractmethod
    def _run(self) -> None: ...

    def _join(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(timeout=5)


class PtyListener(_ServingListener):
    """Serves on the master of a fresh pty; clients open ``address`` (the slave) as a serial port."""

    def __init__(self, handler: Handler, hangup_poll: float = 0.02) -> None:
        super().__init__(handler, hangup_poll)
        self.master: int | None = None
        self.path = ""

    def start(self) -> None:
        if self.thread is not None:
            raise UsageError(f"{self.address} is already being served")
        master, slave = os.openpty()
        try:
            tty.setraw(slave)  # no echo, no line editing, 8 bits through
            self.path = os.ttyname(slave)
        except BaseException:
            os.close(master)
            raise
        finally:
            # the listener keeps no slave open, so the pty behaves like a port whose
            # other end comes and goes (and stale answers are not left queued for it)
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        self.address = f"serial://{self.path}"
        self._spawn(f"pty-{os.path.basename(self.path)}")

    def _run(self) -> None:
        assert self.master is not None
        link = FdLink(self.master)
        while not self.stop_event.is_set():
            # returns when stopped or when the client closed the slave (EIO); each
            # client then starts with a fresh decoder and RPC session
            self._serve(link)
            self.stop_event.wait(self.retry)

    def stop(self) -> None:
        self._join()
        if self.master is not None:
            os.close(self.master)
            self.master = None


class SerialListener(_ServingListener):
    """The agent answering on a serial port; reopens the port after it disappears."""

    def __init__(self, port: str, baud: int, handler: Handler, reopen: float = 0.5,
                 opener: Callable[[str, int], Link] = open_serial) -> None:
        super().__init__(handler, reopen)
        self.port = port
        self.baud = baud
        self.opener = opener
        self.address = f"serial://{port}"
        #: how many times the port was opened (1 + the reopens after it disappeared)
        self.opened = 0
        self._first: Link | None = None

    def start(self) -> None:
        if self.thread is not None:
            raise UsageError(f"{self.address} is already being served")
        # fail now, with the reason, if the port is missing when the daemon starts
        self._first = self.opener(self.port, self.baud)
        self.opened = 1
        self._spawn(f"serial-{os.path.basename(self.port)}")

    def _run(self) -> None:
        link, self._first = self._first, None
        while not self.stop_event.is_set():
            if link is None:
                try:
                    link = self.opener(self.port, self.baud)
                except TransportError:
                    self.stop_event.wait(self.retry)
                    continue
                self.opened += 1
            try:
                self._serve(link)
            finally:
                link.close()
                link = None
            self.stop_event.wait(self.retry)

    def stop(self) -> None:
        self._join()
        if self._first is not None:  # never started serving
            self._first.close()
            self._first = None


# ---------------------------------------------------------------- backend entry points


def listen(url: LinkURL, handler: Handler, **_ctx: Any) -> Listener:
    if url.scheme == "pty":
        url.check_options(())
        if _port_or_none(url):
            raise UsageError(f"{url.text}: pty:// takes no path; the listener creates the pty "
                             "and reports its serial:///dev/pts/N address")
        return PtyListener(handler)
    url.check_options(_SERIAL_LISTEN_OPTIONS)
    reopen: float = _number(url, "reopen", float, 0.5, 0.01)
    return SerialListener(_port(url), _baud(url), handler, reopen=reopen)


def _port_or_none(url: LinkURL) -> str:
    parts = urlsplit(url.text)
    return unquote(parts.netloc + parts.path).strip("/")


def connect(url: LinkURL, timeout: float = 2.0, tries: int = 4, **_ctx: Any) -> StreamClient:
    """A client over a serial port; ``pty:///dev/pts/N`` is the same as ``serial:///dev/pts/N``."""
    url.check_options(_CLIENT_OPTIONS)
    if url.scheme == "pty" and not _port_or_none(url):
        raise UsageError("pty:// needs the pty's path to connect (the serial:///dev/pts/N "
                         "address its listener reports)")
    timeout = _number(url, "timeout", float, timeout, 0.001)
    tries = _number(url, "tries", int, tries, 1)
    return StreamClient(open_serial(_port(url), _baud(url)), timeout=timeout, tries=tries)

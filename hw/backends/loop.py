"""``loop://NAME``: an in-process connected pair of byte pipes (pyserial's ``loop://`` in spirit).

The daemon side (``listen``) registers NAME in a :class:`LoopFabric` passed in
by the caller (no global registry of live objects); ``connect`` with the same
fabric opens a pipe pair and serves the other end in a thread of the listener.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import UsageError
from agent.rpc import TransportError
from hw.link import Link, LinkURL, Listener, StreamClient, serve_stream

__all__ = ["LoopFabric", "PipeEnd", "connect", "listen", "pipe_pair"]


class _Pipe:
    """One direction: a bounded byte buffer with a condition variable."""

    def __init__(self, limit: int = 1 << 20) -> None:
        self.buf = bytearray()
        self.cond = threading.Condition()
        self.closed = False
        self.limit = limit


class PipeEnd(Link):
    def __init__(self, rx: _Pipe, tx: _Pipe) -> None:
        self.rx, self.tx = rx, tx

    def _write(self, data: bytes) -> None:
        with self.tx.cond:
            if self.tx.closed:
                raise TransportError("the other end closed the loop")
            if len(self.tx.buf) + len(data) > self.tx.limit:
                raise TransportError("loop buffer full")
            self.tx.buf += data
            self.tx.cond.notify_all()

    def _read(self, timeout: float) -> bytes:
        with self.rx.cond:
            if not self.rx.buf and not self.rx.closed:
                self.rx.cond.wait(timeout)
            if self.rx.buf:
                data = bytes(self.rx.buf)
                self.rx.buf.clear()
                return data
            if self.rx.closed:
                raise TransportError("the other end closed the loop")
            return b""

    def _close(self) -> None:
        for p in (self.rx, self.tx):
            with p.cond:
                p.closed = True
                p.cond.notify_all()


def pipe_pair() -> tuple[PipeEnd, PipeEnd]:
    a, b = _Pipe(), _Pipe()
    return PipeEnd(a, b), PipeEnd(b, a)


class LoopFabric:
    """Where loop:// listeners are found by name; one per test, daemon or fleet."""

    def __init__(self) -> None:
        self.listeners: dict[str, LoopListener] = {}
        self.lock = threading.Lock()


class InProcessListener(Listener):
    """A listener found by name in an in-process fabric (``loop://``, ``sim://``): each
    connection is served by :func:`hw.link.serve_stream` in its own thread."""

    scheme = "loop"

    def __init__(self, name: str, handler: Callable[[str, Mapping[str, Any]], Any],
                 fabric: Any) -> None:
        self.name = name
        self.handler = handler
        self.fabric = fabric
        self.address = f"{self.scheme}://{name}"
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        self.ends: list[Link] = []
        self.cuts = 0  # connections closed by cut()

    def start(self) -> None:
        with self.fabric.lock:
            if self.name in self.fabric.listeners:
                raise UsageError(f"{self.address} is already being served")
            self.fabric.listeners[self.name] = self

    def _serve(self, end: Link, n: int | None = None, **kwargs: Any) -> None:
        """Serve the server's ``end`` of a new connection in a thread of its own."""
        if self.stop_event.is_set():
            raise TransportError(f"{self.address} is stopped")
        t = threading.Thread(target=serve_stream, args=(end, self.handler, self.stop_event),
                             kwargs=kwargs, daemon=True,
                             name=f"{self.scheme}-{self.name}" + ("" if n is None else f"-{n}"))
        with self.fabric.lock:
            self.ends.append(end)
            self.threads.append(t)
        t.start()

    def cut(self) -> int:
        """Fault hook: close the server end of every connection served so far, as a pulled
        cable would; clients see the line closed and connect again. Keeps listening.

        Returns:
            how many connections were cut since the last cut (each counted in ``cuts``).
        """
        with self.fabric.lock:
            ends, self.ends = self.ends, []
            self.threads = [t for t in self.threads if t.is_alive()]
            self.cuts += len(ends)
        for e in ends:
            e.close()
        return len(ends)

    def stop(self) -> None:
        self.stop_event.set()
        with self.fabric.lock:
            if self.fabric.listeners.get(self.name) is self:
                del self.fabric.listeners[self.name]
            ends, self.ends = self.ends, []
        for e in ends:
            e.close()
        for t in self.threads:
            t.join(timeout=5)


class LoopListener(InProcessListener):
    def accept(self) -> PipeEnd:
        if self.stop_event.is_set():
            raise TransportError(f"loop://{self.name} is stopped")
        client, server = pipe_pair()
        self._serve(server)
        return client


def link_name(url: LinkURL) -> str:
    """NAME of ``loop://NAME`` or ``sim://NAME``."""
    name = (url.host + url.path).strip("/")
    if not name:
        raise UsageError(f"{url.scheme}:// needs a name: {url.scheme}://NAME")
    return name


def listen(url: LinkURL, handler: Callable[[str, Mapping[str, Any]], Any],
           fabric: LoopFabric | None = None, **_ctx: Any) -> LoopListener:
    url.check_options(())
    if fabric is None:
        raise UsageError("loop:// is in-process only: pass a LoopFabric (fabric=...)")
    return LoopListener(link_name(url), handler, fabric)


def connect(url: LinkURL, fabric: LoopFabric | None = None, timeout: float = 2.0,
            tries: int = 4, **_ctx: Any) -> StreamClient:
    url.check_options(())
    if fabric is None:
        raise UsageError("loop:// is in-process only: pass a LoopFabric (fabric=...)")
    with fabric.lock:
        lst = fabric.listeners.get(link_name(url))
    if lst is None:
        raise TransportError(f"nothing is listening on {url.text}")
    return StreamClient(lst.accept(), timeout=timeout, tries=tries)

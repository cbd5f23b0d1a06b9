"""Links: URL parsing, the byte-stream base class, and the RPC client and server loops over a stream.

A backend that carries bytes (loop, pty, serial, tcp, tls, sim) implements
:class:`Link`'s two hooks ``_write`` and ``_read``; the public methods own
timeouts, size caps and error wrapping (the python-can/python-tuf
template-method shape). :class:`StreamClient` and :func:`serve_stream` then
run the sans-IO :mod:`hw.rpc` over it.
"""

from __future__ import annotations

import abc
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from agent.errors import MalformedError, UsageError
from agent.record import field, record
from agent.rpc import (
    OPERATIONS,
    ApplyArgs,
    ApplyResult,
    CheckArgs,
    FeatureCheck,
    HelloResult,
    InfoResult,
    JournalResult,
    LicenseInfoResult,
    Op,
    RequestResult,
    SeatCheckoutArgs,
    SeatListArgs,
    SeatListResult,
    SeatResult,
    SeatTokenArgs,
    StatusResult,
    TransportError,
    hello_args,
)
from hw.rpc import RpcClient, RpcServer

__all__ = [
    "Link",
    "LinkURL",
    "Listener",
    "ServerClient",
    "SessionClient",
    "SessionDeadlines",
    "StreamClient",
    "parse_url",
    "netloc",
    "serve_stream",
]


_D = TypeVar("_D", float, None)
_INF, _NAN = float("inf"), float("nan")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def netloc(host: str, port: int) -> str:
    """``HOST:PORT`` as a URL writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@record(frozen=True)
class LinkURL:
    """A parsed link URL: ``scheme://host:port/path?option=value``."""

    text: str
    scheme: str
    host: str
    port: int | None
    path: str
    options: Mapping[str, str] = field(default_factory=dict)

    def option(self, name: str, default: str | None = None) -> str | None:
        return self.options.get(name, default)

    def seconds(self, name: str, default: _D, high: float = _INF) -> float | _D:
        """Option ``name`` as seconds above 0 (and at most ``high``), ``default`` if absent."""
        raw = self.options.get(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = _NAN
        if not 0 < value <= high or value == _INF:  # also false for nan
            limit = "" if high == _INF else f" and at most {high:g}"
            raise UsageError(f"{self.text}: option {name}={raw!r} must be a number of seconds "
                             f"above 0{limit}")
        return value

    def whole(self, name: str, default: int, low: int = 1, high: int | None = None) -> int:
        """Option ``name`` as a whole number from ``low`` (to ``high``), ``default`` if absent."""
        raw = self.options.get(name)
        if raw is None:
            return default
        if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= (high or int(raw)):
            upto = "" if high is None else f" to {high}"
            raise UsageError(f"{self.text}: option {name}={raw!r} must be a whole number "
                             f"from {low}{upto}")
        return int(raw)

    def flag(self, name: str, default: bool) -> bool:
        """Option ``name`` as true (1, true, yes, on) or false (0, false, no, off)."""
        raw = self.options.get(name)
        if raw is None:
            return default
        if raw.lower() in _TRUE:
            return True
        if raw.lower() in _FALSE:
            return False
        raise UsageError(f"{self.text}: option {name}={raw!r} must be true or false (1 or 0)")

    def check_options(self, allowed: Iterable[str]) -> None:
        """Refuse any option this backend does not know, naming it."""
        allowed_set = set(allowed)
        unknown = sorted(set(self.options) - allowed_set)
        if unknown:
            known = ", ".join(sorted(allowed_set)) or "none"
            raise UsageError(
                f"{self.scheme}:// does not take option {', '.join(unknown)} (it takes: {known})"
            )

    def need_port(self) -> int:
        if self.port is None:
            raise UsageError(f"{self.text}: a port is needed ({self.scheme}://HOST:PORT)")
        return self.port


def parse_url(text: str) -> LinkURL:
    """Split a link URL; the scheme decides which backend handles it."""
    if "://" not in text:
        raise UsageError(f"{text!r} is not a link URL (expected SCHEME://..., e.g. tcp://HOST:PORT)")
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError as exc:
        raise UsageError(f"{text}: bad port: {exc}") from exc
    options: dict[str, str] = {}
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in options:
            raise UsageError(f"{text}: option {k} given twice")
        options[k] = v
    return LinkURL(
        text=text,
        scheme=parts.scheme.lower(),
        host=parts.hostname or "",
        port=port,
        path=unquote(parts.path),
        options=options,
    )


# ---------------------------------------------------------------- byte streams


class Link(abc.ABC):
    """A bidirectional byte stream (client or server end)."""

    closed = False

    def write(self, data: bytes) -> None:
        if self.closed:
            raise TransportError("link is closed")
        try:
            self._write(data)
        except TransportError:
            raise
        except OSError as exc:
            raise TransportError(f"write failed: {exc}") from exc

    def read(self, timeout: float) -> bytes:
        """Whatever bytes arrive within ``timeout`` seconds (b"" if none).

        Raises:
            TransportError: the other end is gone.
        """
        if self.closed:
            raise TransportError("link is closed")
        try:
            return self._read(max(0.0, timeout))
        except TransportError:
            raise
        except OSError as exc:
            raise TransportError(f"read failed: {exc}") from exc

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    @abc.abstractmethod
    def _write(self, data: bytes) -> None: ...

    @abc.abstractmethod
    def _read(self, timeout: float) -> bytes: ...

    def _close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> Link:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


# ---------------------------------------------------------------- client side


class ServerClient(abc.ABC):
    """What the administration tool can ask a server, whatever the link."""

    #: the device ID this client's address routes by, when the link itself guarantees that
    #: only that device answers (a device of an MQTT site session: requests go to its topic,
    #: answers are matched on its topic); None when only ``hello`` can tell
    routed_device: str | None = None

    @abc.abstractmethod
    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        """Run one operation; raise RemoteError/TransportError on failure."""

    def close(self) -> None:  # noqa: B027 - optional hook
        pass

    def __enter__(self) -> ServerClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # typed conveniences shared by every backend: the answer read with the operation table
    def typed(self, op: Op, args: Mapping[str, Any] | None = None) -> Any:
        """Run ``op`` and read its answer into the result record of :data:`OPERATIONS`.

        Raises:
            TransportError: the answer does not have the shape the operation promises.
        """
        raw = self.call(op, args)
        try:
            return OPERATIONS[op].result(raw)
        except MalformedError as exc:
            raise TransportError(f"{op}: {exc}") from exc

    def hello(self) -> HelloResult:
        result: HelloResult = self.typed(Op.HELLO, hello_args())
        return result

    def info(self) -> bytes:
        result: InfoResult = self.typed(Op.GET_INFO)
        return result.file

    def status(self) -> StatusResult:
        result: StatusResult = self.typed(Op.GET_STATUS)
        return result

    def license_info(self) -> LicenseInfoResult:
        result: LicenseInfoResult = self.typed(Op.GET_LICENSE_INFO)
        return result

    def request(self, action: str, features: Iterable[str] = (),
                license_info: bytes | None = None, force: bool = False,
                transfer_to: str | None = None) -> bytes:
        args: dict[str, Any] = {"action": action, "features": list(features)}
        if license_info is not None:
            args["license_info"] = license_info
        if force:  # issue 15: reclaim floating licenses with seats out (issue 14: grants held)
            args["force"] = True
        if transfer_to is not None:  # issue 16: a rehost's transfer-out
            args["transfer_to"] = transfer_to
        result: RequestResult = self.typed(Op.CREATE_REQUEST, args)
        return result.file

    def apply(self, response: bytes) -> ApplyResult:
        result: ApplyResult = self.typed(Op.APPLY_RESPONSE, ApplyArgs(response).to_wire())
        return result

    def check(self, feature: str) -> FeatureCheck:
        result: FeatureCheck = self.typed(Op.CHECK_FEATURE, CheckArgs(feature).to_wire())
        return result

    def journal(self) -> JournalResult:
        result: JournalResult = self.typed(Op.READ_JOURNAL)
        return result

    # issue 15: floating seats
    def seat_checkout(self, feature: str, client: str, borrow_seconds: int | None = None,
                      lease_seconds: int | None = None) -> SeatResult:
        args = SeatCheckoutArgs(feature, client, borrow_seconds, lease_seconds).to_wire()
        result: SeatResult = self.typed(Op.SEAT_CHECKOUT, args)
        return result

    def seat_renew(self, token: bytes, lease_seconds: int | None = None) -> SeatResult:
        result: SeatResult = self.typed(Op.SEAT_RENEW,
                                        SeatTokenArgs(token, lease_seconds).to_wire())
        return result

    def seat_return(self, token: bytes) -> SeatResult:
        result: SeatResult = self.typed(Op.SEAT_RETURN, SeatTokenArgs(token).to_wire())
        return result

    def seat_list(self) -> SeatListResult:
        """Every seat out, page after page (each page a snapshot of its own), and the pools
        as the last page saw them."""
        seats: list[dict[str, Any]] = []
        offset: int | None = 0
        while offset is not None:
            page: SeatListResult = self.typed(Op.SEAT_LIST, SeatListArgs(offset).to_wire())
            seats += page.seats
            if page.next is not None and page.next <= offset:
                raise TransportError("the seat-list answer's next page does not move on")
            offset = page.next
        return SeatListResult(seats, page.pools)


class SessionClient(ServerClient):
    """A client of a server that keeps a session: it says ``hello`` once, before its first
    operation (the template: a backend implements :meth:`_exchange`, one request and its
    answer)."""

    #: the answer to the session's ``hello``, once it was said
    hello_result: dict[str, Any] | None = None

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        if self.hello_result is None and op != Op.HELLO:
            self.hello_result = self._exchange(Op.HELLO, hello_args())
        return self._exchange(op, args or {})

    @abc.abstractmethod
    def _exchange(self, op: str, args: Mapping[str, Any]) -> Any:
        """One request and its answer's result; RemoteError/TransportError on failure."""


class StreamClient(SessionClient):
    """The RPC client over a byte-stream link, with timeouts and retries.

    Args:
        link: an open link.
        timeout: seconds to wait for each try.
        tries: how many times one request is sent before giving up.
        clock: monotonic seconds (injectable for tests).

    Attributes:
        deadline: a time on ``clock`` after which no answer is waited for (a whole
            job's time limit, such as ``licadmin --timeout``); None: only the tries.
    """

    deadline: float | None = None

    def __init__(self, link: Link, timeout: float = 2.0, tries: int = 4,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.link = link
        self.rpc = RpcClient(timeout=timeout, tries=tries)
        self.clock = clock

    def _exchange(self, op: str, args: Mapping[str, Any]) -> Any:
        rid, frame = self.rpc.start(op, args, self.clock())
        self.link.write(frame)
        while True:
            now = self.clock()
            if self.deadline is not None and now >= self.deadline:
                self.rpc.abandon(rid)
                raise TransportError(f"{op}: no answer within the time allowed")
            resend, failed = self.rpc.due(now)
            for f in failed:
                if f.id == rid:
                    raise TransportError(f"{op}: {f.error}")
            for fr in resend:
                self.link.write(fr)
            deadline = self.rpc.next_deadline()
            wait = 0.05 if deadline is None else max(0.001, min(deadline - now, 0.5))
            if self.deadline is not None:
                wait = max(0.001, min(wait, self.deadline - now))
            data = self.link.read(wait)
            if not data:
                continue
            for res in self.rpc.receive(data):
                if res.id == rid:
                    if res.error is not None:
                        raise res.error
                    return res.result

    def close(self) -> None:
        self.link.close()


# ---------------------------------------------------------------- server side


@record(frozen=True)
class SessionDeadlines:
    """How long a peer of a stream session may take (None: no limit), so that a peer
    trickling a byte a second, or never finishing its TLS handshake, is dropped.

    Attributes:
        hello: seconds from the start of the session to its admitted ``hello``.
        frame: seconds from a frame's first byte to its last (a whole request).
        idle: seconds from one complete frame to the next (bytes that never make a
            frame, such as delimiters alone, do not count).
    """

    hello: float | None = None
    frame: float | None = None
    idle: float | None = None


def serve_stream(
    link: Link,
    handler: Callable[[str, Mapping[str, Any]], Any],
    stop: threading.Event,
    poll: float = 0.2,
    on_corrupt: Callable[[int], None] | None = None,
    deadlines: SessionDeadlines | None = None,
    admit: Callable[[], str | None] | None = None,
    clock: Callable[[], float] = time.monotonic,
    since: float | None = None,
) -> str | None:
    """Answer RPC requests arriving on ``link`` until ``stop`` is set or the link closes.

    Args:
        deadlines: time limits on the peer; one that is exceeded ends the session.
        admit: see :class:`hw.rpc.RpcServer`; a refused session ends once its answer is sent.
        since: when the session began on ``clock`` (e.g. before a TLS handshake), if
            earlier than now: the ``hello`` deadline counts from there.

    Returns:
        why the session ended when a deadline or ``admit`` ended it (a line for the
        log), else None.
    """
    server = RpcServer(handler, admit=admit)
    limits = deadlines or SessionDeadlines()
    seen = 0
    start = last_frame = clock()
    if since is not None:
        start = min(start, since)
    frame_since: float | None = None
    while not stop.is_set():
        try:
            data = link.read(poll)
        except TransportError:
            return None
        now = clock()
        if data:
            frames = server.frames
            replies = server.receive(data)
            if server.frames != frames:
                last_frame = now
                frame_since = now if server.mid_frame else None
            elif server.mid_frame and frame_since is None:
                frame_since = now
            for reply in replies:
                try:
                    link.write(reply)
                except TransportError:
                    return None
            if on_corrupt is not None and server.corrupt_frames != seen:
                on_corrupt(server.corrupt_frames - seen)
                seen = server.corrupt_frames
            if server.refused:
                return "refused: the server is busy"
        why = _late(limits, server.admitted, now - start, now - last_frame,
                    None if frame_since is None else now - frame_since)
        if why is not None:
            return why
    return None


def _late(limits: SessionDeadlines, admitted: bool, age: float, idle: float,
          in_frame: float | None) -> str | None:
    """Which deadline of ``limits`` a session has missed, if any."""
    if limits.hello is not None and not admitted and age > limits.hello:
        return f"no hello within {limits.hello:g} s; dropped"
    if limits.frame is not None and in_frame is not None and in_frame > limits.frame:
        return f"a frame took longer than {limits.frame:g} s to arrive; dropped"
    if limits.idle is not None and idle > limits.idle:
        return f"no request for {limits.idle:g} s; dropped"
    return None


class Listener(abc.ABC):
    """The server end of one ``--listen URL``: serves until stopped."""

    #: the address clients use (a chosen port, a pty path), filled in by start()
    address: str = ""
    #: frames that failed their checksum or were not RPC messages (line noise); stays 0
    #: on links that carry no frames
    corrupt_frames: int = 0

    def _count_corrupt(self, n: int) -> None:
        """``on_corrupt`` of :func:`serve_stream`: count line noise in ``corrupt_frames``."""
        self.corrupt_frames += n

    @abc.abstractmethod
    def start(self) -> None:
        """Begin serving in background threads; return once ready."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop accepting, finish or abort in-flight work, release every resource."""

    def cut(self) -> int:
        """Fault hook: drop every connection served now, as a pulled cable would, and keep
        listening (clients see the link closed and connect again).

        Returns:
            how many connections were cut.

        Raises:
            UsageError: this kind of link has no connections to cut.
        """
        raise UsageError(f"{type(self).__name__} has no connections to cut")


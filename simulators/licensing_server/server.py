"""The licensing server's HTTP API over a :class:`~simulators.licensing_server.ledger.Ledger`.

Endpoints, bodies and answers are those of docs/licensing-api.md: files
travel as CBOR (``application/cbor``), records as JSON. A refusal is a JSON
``{"code", "reason", "message"}`` with ``licagent``'s exit code and the HTTP
status that fits it (``hw.backends.https.HTTP_STATUS``). Plain HTTP, bound to
loopback by default: the simulator stands in for the vendor's service and
is not meant to face a network.

Each connection is served by its own thread and closed after one exchange
(HTTP/1.0), so :meth:`LicensingServer.close` returns promptly; the ledger
serialises the operations themselves.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from agent.cli import parse_time
from agent.cose import canonical, strict_loads
from agent.errors import LicensingError, MalformedError, UsageError
from hw.backends.https import HTTP_STATUS, HttpRefusal
from simulators.licensing_server.ledger import SITE_INFO_MAX, Ledger
from simulators.licensing_server.vendor import Vendor

__all__ = ["LicensingServer", "ServerLimits", "serve"]

CBOR = "application/cbor"
JSON = "application/json"

Log = Callable[[str], None]


def _quiet(_line: str) -> None:
    pass


@dataclass(frozen=True)
class ServerLimits:
    """Caps on what one HTTP exchange may carry."""

    #: ``/v1/license-info``: a SITE_INFO bundle (16 MiB) inside a small map
    max_license_info_body: int = SITE_INFO_MAX + 64 * 1024
    #: ``/v1/requests`` and ``/v1/receipts``: many files of at most 64 / 256 KiB
    max_files_body: int = 32 * 1024 * 1024
    #: files in one upload or confirm
    max_files: int = 1000
    #: the JSON endpoints
    max_json_body: int = 64 * 1024
    #: connections served at once
    max_clients: int = 64
    #: seconds a client may take to send its request
    idle_timeout: float = 30.0


@dataclass
class _Answer:
    body: bytes
    content_type: str
    status: int = 200
    headers: Mapping[str, str] | None = None


def _json(obj: Any, status: int = 200) -> _Answer:
    return _Answer(json.dumps(obj, indent=2).encode() + b"\n", JSON, status)


def _files(obj: Mapping[str, Any], key: str, limit: int, required: bool = True) -> list[bytes]:
    if key not in obj:
        if required:
            raise UsageError(f"the body lacks {key!r} (a list of files as byte strings)")
        return []
    v = obj[key]
    if not isinstance(v, list) or not all(isinstance(x, bytes) for x in v):
        raise MalformedError(f"{key!r} must be a list of files (CBOR byte strings)")
    if len(v) > limit:
        raise UsageError(f"{len(v)} files in {key!r}: at most {limit} per call")
    return v


def _fields(obj: object, what: str, required: set[str], optional: set[str] | None = None
            ) -> Mapping[str, Any]:
    optional = optional or set()
    if not isinstance(obj, dict):
        raise MalformedError(f"the body of {what} must be a map")
    keys = {k for k in obj if isinstance(k, str)}
    if len(keys) != len(obj):
        raise MalformedError(f"the body of {what} has a non-text key")
    missing = sorted(required - keys)
    if missing:
        raise UsageError(f"the body of {what} lacks {', '.join(missing)}")
    extra = sorted(keys - required - optional)
    if extra:
        raise UsageError(f"unknown field {', '.join(extra)} in the body of {what} (fields: "
                         f"{', '.join(sorted(required | optional))})")
    return obj


class _Handler(BaseHTTPRequestHandler):
    """One connection, one exchange: route, answer, log one line."""

    server: _HTTPServer
    protocol_version = "HTTP/1.0"
    server_version = "licserver/1"
    sys_version = ""

    def _routes(self) -> Mapping[str, Mapping[str, Callable[[], _Answer]]]:
        return {
            "/v1/license-info": {"POST": self._license_info},
            "/v1/requests": {"POST": self._requests},
            "/v1/receipts": {"POST": self._receipts},
            "/v1/assignments": {"POST": self._assignments},
            "/v1/entitlements": {"POST": self._entitlements},
            "/v1/report": {"GET": self._report},
            "/v1/health": {"GET": self._health},
        }

    # -- routes

    def _license_info(self) -> _Answer:
        body = self._cbor(self.server.limits.max_license_info_body)
        m = _fields(body, "license-info", {"site_info"}, {"devices"})
        site = m["site_info"]
        if not isinstance(site, bytes):
            raise MalformedError("site_info must be the SITE_INFO file as a byte string")
        devices = m.get("devices")
        if devices is not None and (not isinstance(devices, list)
                                    or not all(isinstance(d, str) for d in devices)):
            raise MalformedError("devices must be a list of device IDs")
        srv = self.server
        return _Answer(srv.ledger.license_info(site, devices or None, vendor=srv.vendor), CBOR)

    def _requests(self) -> _Answer:
        lim = self.server.limits
        m = _fields(self._cbor(lim.max_files_body), "requests", {"requests"}, {"receipts"})
        reqs = _files(m, "requests", lim.max_files)
        rcs = _files(m, "receipts", lim.max_files, required=False)
        res = self.server.ledger.upload(reqs, rcs, vendor=self.server.vendor)
        return _Answer(canonical(res.to_cbor()), CBOR)

    def _receipts(self) -> _Answer:
        lim = self.server.limits
        m = _fields(self._cbor(lim.max_files_body), "receipts", {"receipts"})
        rcs = _files(m, "receipts", lim.max_files)
        return _json(self.server.ledger.confirm(rcs, vendor=self.server.vendor))

    def _assignments(self) -> _Answer:
        m = _fields(self._json_body(), "assignments", {"entitlement", "device_id", "feature",
                                                       "count"}, {"product"})
        return _json(self.server.ledger.assign(m["entitlement"], m["device_id"], m["feature"],
                                               m["count"], m.get("product")))

    def _entitlements(self) -> _Answer:
        m = _fields(self._json_body(), "entitlements", {"entitlement", "product", "features"},
                    {"until"})
        features = m["features"]
        if not isinstance(features, dict):
            raise UsageError('features must be an object {"FEATURE": COUNT, ...}')
        until = m.get("until")
        if until is not None and not isinstance(until, str):
            raise UsageError("until must be an ISO 8601 date or date-time, or null")
        return _json(self.server.ledger.entitle(m["entitlement"], m["product"], features,
                                                parse_time(until) if until else None))

    def _report(self) -> _Answer:
        return _json(self.server.ledger.report())

    def _health(self) -> _Answer:
        return _json({"ok": True})

    # -- bodies

    def _body(self, limit: int) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise HttpRefusal(411, 2, "usage", "send the body with a Content-Length "
                                            "(chunked transfer is not accepted)")
        raw = self.headers.get("Content-Length")
        if raw is None:
            raise HttpRefusal(411, 2, "usage", "a body with a Content-Length is needed")
        try:
            length = int(raw)
        except ValueError:
            length = -1
        if length < 0:
            raise HttpRefusal(400, 2, "usage", f"bad Content-Length {raw!r}")
        if length > limit:
            raise HttpRefusal(413, 3, "too-large",
                           f"the body of {length} bytes exceeds the {limit}-byte limit of "
                           f"{self._path}")
        data = self.rfile.read(length)
        if len(data) != length:
            raise HttpRefusal(400, 3, "malformed", "the body ended before its Content-Length")
        return data

    def _cbor(self, limit: int) -> Any:
        return strict_loads(self._body(limit), max_size=limit)

    def _json_body(self) -> Any:
        data = self._body(self.server.limits.max_json_body)
        try:
            return json.loads(data)
        except ValueError as exc:
            raise MalformedError(f"the body is not JSON: {exc}") from exc

    # -- the exchange

    @property
    def _path(self) -> str:
        return urlsplit(self.path).path

    def _dispatch(self) -> None:
        try:
            routes = self._routes().get(self._path, {})
            route = routes.get(self.command)
            if route is None:
                if routes:
                    raise HttpRefusal(405, 2, "usage", f"{self.command} is not allowed on "
                                   f"{self._path}", {"Allow": ", ".join(sorted(routes))})
                raise HttpRefusal(404, 2, "usage", f"no such endpoint {self._path} (see "
                                                "docs/licensing-api.md)")
            answer = route()
        except HttpRefusal as r:
            answer = self._error(r.status, r.code, r.reason, str(r), r.headers)
        except LicensingError as err:
            answer = self._error(HTTP_STATUS.get(err.exit_code, 500), err.exit_code, err.reason,
                                 str(err))
        except Exception as exc:  # a bug must not kill the connection thread silently
            self.server.log(f"internal error on {self.command} {self._path}: "
                            f"{type(exc).__name__}: {exc}")
            answer = self._error(500, 1, "internal", "internal error in the licensing server; "
                                                     "see its log")
        self._send(answer)

    do_GET = _dispatch
    do_POST = _dispatch
    do_PUT = _dispatch
    do_DELETE = _dispatch

    @staticmethod
    def _error(status: int, code: int, reason: str, message: str,
               headers: Mapping[str, str] | None = None) -> _Answer:
        body = json.dumps({"code": code, "reason": reason, "message": message}).encode() + b"\n"
        return _Answer(body, JSON, status, headers)

    def _send(self, answer: _Answer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (answer.headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(answer.body)
        except OSError:
            pass  # the client went away; its loss
        self.server.log(f"{self.client_address[0]} {self.command} {self._path} "
                        f"{answer.status} {len(answer.body)}")

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors the base class finds (bad request line, unknown method) as JSON too."""
        self.close_connection = True
        phrase = message or explain or http.client.responses.get(code, "error")
        self._send(self._error(code, 2, "usage", phrase))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # _send logs one line per exchange

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.client_address[0]} {format % args}")


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection, joined on close; at most ``max_clients`` at once."""

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], ledger: Ledger, vendor: Vendor | None,
                 limits: ServerLimits, log: Log) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.ledger = ledger
        self.vendor = vendor
        self.limits = limits
        self.log = log
        self._slots = threading.BoundedSemaphore(limits.max_clients)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.log(f"{client_address[0]} refused: {self.limits.max_clients} connections "
                     "already open")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.limits.idle_timeout)
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class LicensingServer:
    """A running licensing server: :attr:`url` to reach it, :meth:`close` to stop it.

    Made by :func:`serve`; a context manager.
    """

    def __init__(self, httpd: _HTTPServer) -> None:
        self._httpd = httpd
        host, port = httpd.server_address[:2]
        self.host, self.port = str(host), int(port)
        shown = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{shown}:{self.port}"
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"licserver {self.url}")
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        """Stop accepting, finish the exchanges in progress, release the port."""
        if self._closed:
            return
        self._closed = True
        self._httpd.shutdown()
        self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> LicensingServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def serve(ledger: Ledger, vendor: Vendor | None = None, host: str = "127.0.0.1", port: int = 0,
          limits: ServerLimits | None = None, log: Log | None = None) -> LicensingServer:
    """Serve the HTTP API of ``ledger`` on ``host:port`` (0: any free port) in a thread.

    Args:
        vendor: signs license information and responses and verifies receipts
            (default: the ledger's own).
        log: called with one line per exchange and per problem (default: silent).

    Returns:
        The running server; its :attr:`~LicensingServer.url` has the real port.

    Raises:
        UsageError: the address cannot be bound.
    """
    try:
        httpd = _HTTPServer((host, port), ledger, vendor or ledger.vendor,
                            limits or ServerLimits(), log or _quiet)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    return LicensingServer(httpd)

"""The licensing server's HTTP API over a :class:`~simulators.licensing_server.ledger.Ledger`.

Endpoints, bodies and answers are those of docs/licensing-api.md: files
travel as CBOR (``application/cbor``), records as JSON. A refusal is a JSON
``{"code", "reason", "message"}`` with ``licagent``'s exit code and the HTTP
status that fits it (``hw.backends.https.HTTP_STATUS``). Bound to loopback by
default; HTTPS when given a certificate (``licserver serve --cert --key``).

Every route asks for a bearer token (``Authorization: Bearer TOKEN``) the ledger
holds and has not revoked: without one the answer is HTTP 401; a site
administrator's token outside its entitlements, or on a vendor-only route, gets
HTTP 403 (docs/licensing-api.md, "Authentication").

Each connection is served by its own thread and closed after one exchange
(HTTP/1.0), so :meth:`LicensingServer.close` returns promptly; the ledger
serialises the operations themselves.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from typing import Any

from agent.cose import canonical, strict_loads
from agent.errors import MalformedError, UsageError, listen_error
from agent.formats import SITE_INFO_MAX
from apps.licensing_api import (
    AssignmentBatch,
    AssignmentQuery,
    EntitlementQuery,
    LicenseInfoQuery,
    PerDeviceLicenseInfo,
    body_fields,
    body_files,
)
from hw.httpjson import CBOR, Answer, HttpRefusal, JsonHandler, Route, json_answer
from hw.link import netloc
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.rules import ForbiddenError, NotAuthenticatedError, Role, Token
from simulators.licensing_server.vendor import Vendor

__all__ = ["LicensingServer", "ServerLimits", "serve", "tls_context"]

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
    #: ``/v1/assignments``: up to AssignmentBatch.MAX assignments of about 150 bytes
    max_assignments_body: int = 12 * 1024 * 1024
    #: connections served at once
    max_clients: int = 64
    #: seconds a client may take to send its request (and its TLS handshake)
    idle_timeout: float = 30.0
    #: the most of a refused anonymous request's body read (and dropped) before answering
    #: 401, so the client reads the answer rather than a reset connection
    max_unauthenticated_body: int = 1024 * 1024


class _Handler(JsonHandler):
    """One connection, one exchange: route, answer, log one line."""

    server: _HTTPServer
    protocol_version = "HTTP/1.0"
    server_version = "licserver/1"
    sys_version = ""

    NOT_FOUND_HINT = "(see docs/licensing-api.md)"
    WHO = "the licensing server"

    token: Token | None = None

    @property
    def _scope(self) -> frozenset[str] | None:
        assert self.token is not None  # before_route authenticated
        return self.token.scope

    def before_route(self) -> None:
        """Every route: a live bearer token, else HTTP 401 (the body drained if small)."""
        auth = self.headers.get("Authorization", "")
        scheme, _, secret = auth.partition(" ")
        try:
            self.token = self.server.ledger.authenticate(
                secret.strip() if scheme.lower() == "bearer" else None)
        except NotAuthenticatedError as err:
            n = self.content_length() or 0
            if n <= self.server.limits.max_unauthenticated_body:
                self.rfile.read(n)
            else:
                self.close_connection = True
            raise HttpRefusal(401, err.exit_code, err.reason, str(err),
                              {"WWW-Authenticate": 'Bearer realm="licserver"'}) from None

    def _vendor_only(self, what: str) -> None:
        assert self.token is not None
        if self.token.role is not Role.VENDOR_ADMIN:
            raise ForbiddenError(f"{what} needs a vendor-admin token; {self.token.name!r} is "
                                 f"a {self.token.role.value} token")

    def routes(self, path: str) -> Mapping[str, Route]:
        return {
            "/v1/license-info": {"POST": self._license_info},
            "/v1/requests": {"POST": self._requests},
            "/v1/receipts": {"POST": self._receipts},
            "/v1/assignments": {"POST": self._assignments},
            "/v1/entitlements": {"POST": self._entitlements},
            "/v1/report": {"GET": self._report},
            "/v1/health": {"GET": self._health},
        }.get(path, {})

    # -- routes

    def _license_info(self) -> Answer:
        q = LicenseInfoQuery.from_body(self._cbor(self.server.limits.max_license_info_body))
        srv = self.server
        whole, one = srv.ledger.license_info_files(q.site_info, q.devices or None,
                                                   vendor=srv.vendor, per_device=q.per_device,
                                                   scope=self._scope)
        if not q.per_device:
            return Answer(whole, CBOR)
        return Answer(PerDeviceLicenseInfo(whole, one).encode(), CBOR)

    def _requests(self) -> Answer:
        lim = self.server.limits
        m = body_fields(self._cbor(lim.max_files_body), "requests", {"requests"}, {"receipts"})
        reqs = body_files(m, "requests", lim.max_files)
        rcs = body_files(m, "receipts", lim.max_files, required=False)
        res = self.server.ledger.upload(reqs, rcs, vendor=self.server.vendor,
                                        scope=self._scope)
        return Answer(canonical(res.to_wire()), CBOR)

    def _receipts(self) -> Answer:
        lim = self.server.limits
        m = body_fields(self._cbor(lim.max_files_body), "receipts", {"receipts"})
        rcs = body_files(m, "receipts", lim.max_files)
        return json_answer(self.server.ledger.confirm(rcs, vendor=self.server.vendor,
                                                      scope=self._scope).to_wire())

    def _assignments(self) -> Answer:
        body = self._json_body(self.server.limits.max_assignments_body)
        if AssignmentBatch.is_batch(body):
            batch = AssignmentBatch.from_body(body)
            return json_answer({"assignments": self.server.ledger.assign_many(
                batch.assignments, scope=self._scope)})
        q = AssignmentQuery.from_body(body)
        return json_answer(self.server.ledger.assign(q.entitlement, q.device_id, q.feature,
                                                     q.count, q.product, scope=self._scope))

    def _entitlements(self) -> Answer:
        self._vendor_only("recording a purchase")
        q = EntitlementQuery.from_body(self._json_body())
        return json_answer(self.server.ledger.entitle(q.entitlement, q.product, q.features,
                                                      q.until_time()))

    def _report(self) -> Answer:
        return json_answer(self.server.ledger.report(self._scope))

    def _health(self) -> Answer:
        return json_answer({"ok": True})

    # -- bodies

    def _cbor(self, limit: int) -> Any:
        return strict_loads(self.read_body(limit, f" of {self._path}"), max_size=limit)

    def _json_body(self, limit: int | None = None) -> Any:
        data = self.read_body(limit or self.server.limits.max_json_body, f" of {self._path}")
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise MalformedError(f"the body is not JSON: {exc}") from exc

    # -- the exchange

    def after_send(self, answer: Answer) -> None:
        who = self.token.name if self.token is not None else "-"
        self.server.log(f"{self.client_address[0]} {who} {self.command} {self._path} "
                        f"{answer.status} {len(answer.body)}")

    do_GET = JsonHandler.dispatch
    do_POST = JsonHandler.dispatch
    do_PUT = JsonHandler.dispatch
    do_DELETE = JsonHandler.dispatch


class _HTTPServer(ThreadingHTTPServer):
    """Threads per connection, joined on close; at most ``max_clients`` at once."""

    daemon_threads = False
    block_on_close = True
    # socketserver's listen backlog is 5: fifty sites connecting at once on a busy machine
    # overflowed it and a client saw "connection reset by peer"; max_clients still bounds
    # the connections served at once
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], ledger: Ledger, vendor: Vendor | None,
                 limits: ServerLimits, log: Log, tls: ssl.SSLContext | None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.tls = tls
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

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is None:
            return sock, addr
        # the handshake happens in the connection's own thread, under its timeout
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.limits.idle_timeout)
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.do_handshake()
                except (OSError, ssl.SSLError) as exc:
                    self.log(f"{client_address[0]} TLS handshake failed: {exc}")
                    self.shutdown_request(request)
                    return
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
        scheme = "http" if httpd.tls is None else "https"
        self.url = f"{scheme}://{netloc(self.host, self.port)}"
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
          limits: ServerLimits | None = None, log: Log | None = None,
          tls: ssl.SSLContext | None = None) -> LicensingServer:
    """Serve the HTTP API of ``ledger`` on ``host:port`` (0: any free port) in a thread.

    Every route asks for a bearer token of the ledger's (:meth:`Ledger.create_token`).

    Args:
        vendor: signs license information and responses and verifies receipts
            (default: the ledger's own).
        log: called with one line per exchange and per problem (default: silent).
        tls: a server context (:func:`tls_context`): HTTPS instead of HTTP.

    Returns:
        The running server; its :attr:`~LicensingServer.url` has the real port.

    Raises:
        UsageError: the address cannot be bound.
    """
    try:
        httpd = _HTTPServer((host, port), ledger, vendor or ledger.vendor,
                            limits or ServerLimits(), log or _quiet, tls)
    except OSError as exc:
        raise listen_error(f"{host}:{port}", exc) from exc
    return LicensingServer(httpd)


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The HTTPS server context of ``licserver serve --cert FILE --key FILE`` (TLS 1.2 or later).

    Raises:
        UsageError: a file cannot be read, or the key does not match the certificate.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {exc.filename}: no such file (--cert and --tls-key name the "
                         "server's PEM certificate and its key)") from exc
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"--cert {cert} --tls-key {key}: not a PEM certificate and its matching "
                         f"key: {exc}") from exc
    return ctx

"""``https://HOST:PORT``: the server operations as an HTTPS API, for site tools and ``curl``.

Options (both sides): ``?cert=FILE&key=FILE`` is this end's certificate and
key (required for a listener; a client certificate for ``connect``);
``?ca=FILE`` is the CA to verify the other end with. A listener given ``ca``
requires a client certificate signed by it; a client without ``ca`` verifies
the server against the system's trust store. Port 0 lets the listener choose;
:attr:`HttpsListener.address` then holds the real URL. ``listen`` also takes
the keyword settings of :class:`HttpsListener` (``log``, ``access_log``,
``max_body``, ``max_clients``, ``max_pending``, ``busy_wait``, ``idle_timeout``,
``max_per_peer``, ``max_handshakes``, ``handshake_timeout``).

Cheap peers: a connection counts against ``max_clients`` only once its TLS
handshake is done, which must happen within ``handshake_timeout`` (10 s) in all;
at most ``max_handshakes`` (64) handshakes are under way (a new connection closes
the oldest) and at most ``max_per_peer`` (8) connections come from one address (a
new one closes that address's oldest handshake, or is closed if there is none).
Each request, from the end of the previous answer to its last body byte, must
arrive within ``idle_timeout`` (30 s) in all, so a client sending a byte a second
is dropped. A watchdog thread enforces both deadlines.

Endpoints (files travel as ``application/cbor``, everything else as JSON;
a client that sends ``Accept: application/cbor`` gets the structured results
as CBOR instead, with byte strings kept as bytes rather than hex):

=========================  ========================================================
``GET  /v1/hello``         ``{"version": 1, "device_id": ..., "model": ...}``
``GET  /v1/status``        the dict of ``licagent status --json``
``GET  /v1/info``          the signed device-information file (header ``X-Device-Id``)
``GET  /v1/license-info``  installed licenses, sequence and state digest (JSON)
``POST /v1/request``       body ``{"action": "activate|reclaim|renew", "features": [...],
                           "license_info": BASE64}`` as JSON (or the same map as CBOR,
                           ``license_info`` as bytes, with ``Content-Type: application/cbor``;
                           any other type is read as JSON, so ``curl --data`` works);
                           answer: the signed request file
``POST /v1/apply``         body: the vendor's response file; answer: the signed receipt,
                           with headers ``X-Already-Applied`` (``true``/``false``),
                           ``X-Sequence``, ``X-Base-Sequence``, ``X-Changes`` (a JSON list
                           such as ``["add bacnet"]``) and ``X-Warning`` (a JSON string) if any
``GET  /v1/check/FEATURE`` ``{"feature", "licensed", "message", "in_grace", "clock_set_back"}``,
                           always HTTP 200: the answer is the ``licensed`` flag
``GET  /v1/journal``       ``{"entries": [...], "torn_tail": n, "verified": true}``
``POST /v1/seat/...``      issue 15's floating seats: ``checkout``, ``renew``, ``return``
                           (body: the CBOR argument map); ``GET /v1/seat/list?offset=N``
``POST /v1/tree/renew``    issue 14's system tree: ``renew-grants``, the body its CBOR
                           argument map; likewise ``POST /v1/tree/return``
                           (``return-grants``), ``POST /v1/use`` (``use-feature``) and
                           ``POST /v1/relay`` (``relay``); ``GET /v1/tree`` (``get-tree``);
                           ``GET /v1/check/FEATURE?count=N`` asks for N units
=========================  ========================================================

A refusal is a JSON body ``{"code": EXIT_CODE, "reason": ..., "message": ...}``
carrying ``licagent``'s exit code, with an HTTP status that fits it: 400 usage
or malformed, 403 trust, 409 wrong device or sequence, 422 validity, 500
storage or other failure, 404/405 unknown path or method, 411 no
Content-Length, 413 body over the limit (256 KiB by default), 503 busy (every
operation slot stayed taken for ``busy_wait`` seconds; ``Retry-After`` says
when to try again). :class:`HttpsClient` maps these back to
:class:`~hw.rpc.RemoteError` so ``licadmin`` exits with the same codes.

Example: ``curl --cacert ca.pem --cert client.pem --key client.key
https://127.0.0.1:8443/v1/status``.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from agent.cose import canonical, jsonable, strict_loads
from agent.errors import MalformedError, UsageError, listen_error
from agent.record import record
from agent.rpc import Handler, Op, RemoteError, RpcError, TransportError, for_origin, wire
from hw.httpjson import CBOR, HTTP_STATUS, JSON, Answer, HttpRefusal, JsonHandler, Route
from hw.link import LinkURL, Listener, ServerClient, netloc
from hw.tls import client_context, origin_of, server_context

__all__ = [
    "DEFAULT_MAX_BODY",
    "HTTP_STATUS",
    "HttpRefusal",
    "refusal_from_body",
    "HttpsClient",
    "HttpsListener",
    "connect",
    "listen",
]

OPTIONS = ("ca", "cert", "key")
DEFAULT_MAX_BODY = 256 * 1024
#: the largest answer a client reads (a long journal is the biggest)
MAX_ANSWER = 16 * 1024 * 1024

#: licagent exit code -> HTTP status of the refusal

Log = Callable[[str], None]




def _check_path(url: LinkURL) -> None:
    if url.path not in ("", "/"):
        raise UsageError(f"{url.text}: https:// takes no path (https://HOST:PORT?ca=...)")
    if not url.host:
        raise UsageError(f"{url.text}: a host is needed (https://HOST:PORT)")


# ---------------------------------------------------------------- server side


class _RequestHandler(JsonHandler):
    """One connection: parses requests, routes them, answers, logs one line per request."""

    server: _TlsHTTPServer
    protocol_version = "HTTP/1.1"
    server_version = "licagent-https/1"
    sys_version = ""

    # -- routing table: path -> method -> route

    def routes(self, path: str) -> Mapping[str, Route]:
        table: dict[str, dict[str, Callable[[], Answer]]] = {
            "/v1/hello": {"GET": self._hello},
            "/v1/status": {"GET": self._status_route},
            "/v1/info": {"GET": self._info},
            "/v1/license-info": {"GET": self._license_info},
            "/v1/request": {"POST": self._request},
            "/v1/apply": {"POST": self._apply},
            "/v1/journal": {"GET": self._journal},
            # issue 15: floating seats (the body is the operation's CBOR argument map)
            "/v1/seat/checkout": {"POST": lambda: self._seat(Op.SEAT_CHECKOUT)},
            "/v1/seat/renew": {"POST": lambda: self._seat(Op.SEAT_RENEW)},
            "/v1/seat/return": {"POST": lambda: self._seat(Op.SEAT_RETURN)},
            "/v1/seat/list": {"GET": self._seat_list},
            # issue 14: the system tree (the body is the operation's CBOR argument map)
            "/v1/tree/renew": {"POST": lambda: self._cbor_op(Op.RENEW_GRANTS)},
            "/v1/tree/return": {"POST": lambda: self._cbor_op(Op.RETURN_GRANTS)},
            "/v1/use": {"POST": lambda: self._cbor_op(Op.USE_FEATURE)},
            "/v1/relay": {"POST": lambda: self._cbor_op(Op.RELAY)},
            "/v1/tree": {"GET": lambda: self._structured(self._op(Op.GET_TREE, {}))},
        }
        if path.startswith("/v1/check/"):
            return {"GET": self._check}
        return table.get(path, {})

    def _hello(self) -> Answer:
        return self._structured({"version": 1, **(self._op(Op.HELLO, {}) or {})})

    def _status_route(self) -> Answer:
        return self._structured(self._op(Op.GET_STATUS, {}))

    def _info(self) -> Answer:
        res = self._op(Op.GET_INFO, {})
        return Answer(bytes(res["file"]), CBOR, headers={"X-Device-Id": str(res.get("device_id", ""))})

    def _license_info(self) -> Answer:
        return self._structured(self._op(Op.GET_LICENSE_INFO, {}))

    def _request(self) -> Answer:
        args = self._request_args(self.read_body(self.server.max_body))
        return Answer(bytes(self._op(Op.CREATE_REQUEST, args)["file"]), CBOR)

    def _apply(self) -> Answer:
        res = self._op(Op.APPLY_RESPONSE, {"file": self.read_body(self.server.max_body)})
        headers = {
            "X-Already-Applied": "true" if res["already_applied"] else "false",
            "X-Sequence": str(res["sequence"]),
            "X-Base-Sequence": str(res["base_sequence"]),
            "X-Changes": json.dumps(list(res.get("changes", []))),
        }
        if res.get("warning"):
            headers["X-Warning"] = json.dumps(str(res["warning"]))
        return Answer(bytes(res["receipt"]), CBOR, headers=headers)

    def _check(self) -> Answer:
        raw = self._path[len("/v1/check/"):]
        if not raw or "/" in raw:  # an encoded %2F is part of the name, a bare / is not
            raise HttpRefusal(404, 2, "usage", "name one feature: GET /v1/check/FEATURE")
        feature = unquote(raw)
        args: dict[str, Any] = {"feature": feature}
        counts = parse_qs(urlsplit(self.path).query).get("count")
        if counts:  # issue 14: how many units are asked for (absent: one)
            raw_count = counts[-1]
            if not raw_count.isdigit() or len(raw_count) > 10:
                raise HttpRefusal(400, 2, "usage", "count must be a whole number from 1")
            args["count"] = int(raw_count)
        return self._structured(self._op(Op.CHECK_FEATURE, args))

    def _journal(self) -> Answer:
        return self._structured(self._op(Op.READ_JOURNAL, {}))

    def _seat_list(self) -> Answer:
        raw = (parse_qs(urlsplit(self.path).query).get("offset") or ["0"])[-1]
        if not raw.isdigit() or len(raw) > 9:
            raise HttpRefusal(400, 2, "usage", "offset must be a whole number")
        return self._structured(self._op(Op.SEAT_LIST, {"offset": int(raw)}))

    def _seat(self, op: str) -> Answer:
        return self._cbor_op(op)

    def _cbor_op(self, op: str) -> Answer:
        """An operation whose body is its CBOR argument map (seats, the system tree)."""
        args = strict_loads(self.read_body(self.server.max_body), max_size=self.server.max_body)
        if not isinstance(args, dict):
            raise MalformedError(f"the {op} request body must be a CBOR map of arguments")
        return self._structured(self._op(op, args))

    # -- helpers

    def _wants_cbor(self) -> bool:
        return CBOR in self.headers.get("Accept", "")

    def _structured(self, result: Any) -> Answer:
        result = wire(result)
        if self._wants_cbor():
            return Answer(canonical(result), CBOR)
        return Answer(json.dumps(jsonable(result), indent=2).encode() + b"\n", JSON)

    def _op(self, op: str, args: Mapping[str, Any]) -> Any:
        srv = self.server
        srv.deadline(self.connection, None)  # the request is in: the operation takes its time
        if not srv.slots.acquire(timeout=srv.busy_wait):
            raise HttpRefusal(503, 1, "busy", "the server is busy with other requests; "
                                           "try again in a moment", {"Retry-After": "1"})
        try:
            origin = origin_of("https", self.connection, str(self.client_address[0]))
            return for_origin(srv.handler, origin)(op, args)
        finally:
            srv.slots.release()

    def _request_args(self, body: bytes) -> dict[str, Any]:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype == CBOR:
            obj = strict_loads(body, max_size=self.server.max_body)
        else:
            try:
                obj = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise MalformedError(f"the request body is not JSON: {exc}") from exc
        if not isinstance(obj, dict):
            raise MalformedError('the request body must be a map: {"action": ..., "features": [...]}')
        unknown = sorted(map(repr, set(obj) - {"action", "features", "license_info", "force"}))
        if unknown:
            raise UsageError(f"unknown field {', '.join(unknown)} in the request body "
                             "(fields: action, features, license_info, force)")
        args: dict[str, Any] = {"action": obj.get("action"), "features": obj.get("features", [])}
        if "force" in obj:  # issue 15: reclaim a pool with seats out
            args["force"] = obj["force"]
        if "license_info" in obj:
            li = obj["license_info"]
            if isinstance(li, str):
                try:
                    li = base64.b64decode(li, validate=True)
                except (binascii.Error, ValueError) as exc:
                    raise MalformedError("license_info must be base64 in a JSON body") from exc
            args["license_info"] = li
        return args

    # -- the request cycle

    NOT_FOUND_HINT = "(see GET /v1/status, /v1/info, ...)"
    WHO = "the license agent"

    def before_route(self) -> None:
        if self.command != "POST" and (self.content_length() or 0) > 0:
            self.close_connection = True  # a body we will not read

    def send_answer(self, answer: Answer) -> None:
        if self.server.stopping.is_set():
            self.close_connection = True
        super().send_answer(answer)

    do_GET = JsonHandler.dispatch
    do_POST = JsonHandler.dispatch

    def handle_one_request(self) -> None:
        self._status = None
        # the next request, idle wait included, must be in within idle_timeout in all
        self.server.deadline(self.connection, self.server.idle_timeout)
        super().handle_one_request()
        if self._status is not None:
            self.server.access_log(f"{self.client_address[0]} {self._peer()}{self.command or '-'} "
                            f"{getattr(self, 'path', '-')} {self._status} {self._sent}")

    def _peer(self) -> str:
        sock = self.connection
        if not isinstance(sock, ssl.SSLSocket):
            return ""
        cert: Any = sock.getpeercert() or {}
        for rdn in cert.get("subject", ()):
            for k, v in rdn:
                if k == "commonName":
                    return f"cn={v} "
        return ""


@record
class _Watched:
    """One connection the watchdog keeps an eye on."""

    host: str
    #: time.monotonic() after which it is dropped (None: no limit now)
    deadline: float | None
    #: still in its TLS handshake (not yet counted against max_clients)
    handshaking: bool = True
    #: closed by the watchdog or to make room
    closed: bool = False


class _TlsHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that does the TLS handshake in each connection's thread.

    Wrapping in the accepting thread would let one slow handshake stall every
    other client. Connection threads are not daemons and are joined on close.
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, address: tuple[str, int], context: ssl.SSLContext, handler: Handler,
                 log: Log, access_log: Log, max_body: int, max_clients: int, max_pending: int,
                 busy_wait: float, idle_timeout: float, max_per_peer: int = 8,
                 max_handshakes: int = 64, handshake_timeout: float = 10.0) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.context = context
        self.handler = handler
        self.log = log
        self.access_log = access_log
        self.max_body = max_body
        self.max_clients = max_clients
        self.busy_wait = busy_wait
        self.idle_timeout = idle_timeout
        self.max_per_peer = max_per_peer
        self.max_handshakes = max_handshakes
        self.handshake_timeout = handshake_timeout
        self.slots = threading.BoundedSemaphore(max_pending)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.watched: dict[socket.socket, _Watched] = {}
        #: connections closed by the watchdog (a deadline) or to make room
        self.dropped = 0
        super().__init__(address, _RequestHandler)

    def process_request(self, request: Any, client_address: Any) -> None:
        host = str(client_address[0])
        with self.lock:
            mine = [s for s, w in self.watched.items() if w.host == host and not w.closed]
            refuse = self.stopping.is_set()
            if len(mine) >= self.max_per_peer and not refuse:
                waiting = [s for s in mine if self.watched[s].handshaking]
                if waiting:
                    self._close(waiting[0], f"{self.max_per_peer} connections from {host} "
                                            f"(max_per_peer)")
                else:
                    refuse = True
                    self.log(f"{host} refused: {self.max_per_peer} connections from it are "
                             f"open (max_per_peer)")
            if not refuse:
                shaking = [s for s, w in self.watched.items() if w.handshaking and not w.closed]
                if len(shaking) >= self.max_handshakes:
                    self._close(shaking[0], f"{self.max_handshakes} TLS handshakes under way")
                self.watched[request] = _Watched(
                    host, time.monotonic() + self.handshake_timeout)
        if refuse:
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def _close(self, sock: socket.socket, why: str) -> None:
        """Drop a watched connection (under the lock); its own thread cleans up."""
        w = self.watched[sock]
        w.closed = True
        self.dropped += 1
        self.log(f"{w.host} dropped: {why}")
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass

    def watch(self) -> None:
        """Drop every connection past its deadline (the watchdog thread calls this)."""
        now = time.monotonic()
        with self.lock:
            for sock, w in list(self.watched.items()):
                if w.closed or w.deadline is None or now <= w.deadline:
                    continue
                self._close(sock, f"no TLS handshake within {self.handshake_timeout:g} s"
                            if w.handshaking else
                            f"no complete request within {self.idle_timeout:g} s")

    def deadline(self, sock: socket.socket, seconds: float | None) -> None:
        """From now, ``sock`` has ``seconds`` to send its request (None: no limit)."""
        with self.lock:
            w = self.watched.get(sock)
            if w is not None:
                w.deadline = None if seconds is None else time.monotonic() + seconds

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(self.idle_timeout)
        conn: ssl.SSLSocket | None = None
        try:
            conn = self.context.wrap_socket(request, server_side=True,
                                            do_handshake_on_connect=False)
            with self.lock:  # the raw socket is detached now: watch the TLS one
                w = self.watched.pop(request, None)
                if w is not None:
                    self.watched[conn] = w
                    if w.closed:
                        socket.socket.shutdown(conn, socket.SHUT_RDWR)
            conn.do_handshake()
        except (OSError, ValueError) as exc:
            with self.lock:
                w = self.watched.pop(conn if conn is not None else request, None)
            if w is not None and not w.closed:
                self.log(f"{client_address[0]} TLS handshake failed: {exc}")
            if conn is not None:
                conn.close()
            return
        with self.lock:
            w = self.watched.pop(conn, None)
            full = self.active >= self.max_clients or self.stopping.is_set()
            if w is not None and not w.closed and not full:
                self.active += 1
                w.handshaking, w.deadline = False, None
                self.watched[conn] = w
        if w is None or w.closed or full:
            if full and w is not None and not w.closed:
                self.log(f"{client_address[0]} refused: {self.max_clients} connections "
                         f"already open")
            conn.close()
            return
        try:
            if not self.stopping.is_set():
                _RequestHandler(conn, client_address, self)
        finally:
            with self.lock:
                self.watched.pop(conn, None)
                self.active -= 1
            conn.close()

    def wake_connections(self) -> None:
        """Unblock every connection thread waiting for its client (stop)."""
        with self.lock:
            conns = list(self.watched)
        for c in conns:
            try:
                socket.socket.shutdown(c, socket.SHUT_RDWR)
            except OSError:
                pass


class HttpsListener(Listener):
    """Serves the operations of ``handler`` over HTTPS until stopped.

    Args:
        url: ``https://HOST:PORT?cert=&key=[&ca=]``.
        handler: ``(op, args) -> result``, e.g. :class:`agent.ops.AgentOps`.
        log: receives one line for each refused or failed connection and internal error.
        access_log: receives one line per request (peer, method, path, status, size).
        max_body: largest request body accepted (larger: 413).
        max_clients: connections served at once; more are closed at once.
        max_pending: operations running or queued at once; beyond, a request
            waits up to ``busy_wait`` seconds for a slot, then gets 503.
        idle_timeout: seconds a connection may stay silent (handshake, keep-alive).
    """

    def __init__(self, url: LinkURL, handler: Handler, context: ssl.SSLContext,
                 log: Log | None = None, access_log: Log | None = None,
                 max_body: int = DEFAULT_MAX_BODY,
                 max_clients: int = 64, max_pending: int = 16, busy_wait: float = 10.0,
                 idle_timeout: float = 30.0, max_per_peer: int = 8, max_handshakes: int = 64,
                 handshake_timeout: float = 10.0) -> None:
        self.url = url
        self.handler = handler
        self.context = context
        self.log: Log = log or (lambda _line: None)
        self.access_log: Log = access_log or (lambda _line: None)
        self.max_body = max_body
        self.max_clients = max_clients
        self.max_pending = max_pending
        self.busy_wait = busy_wait
        self.idle_timeout = idle_timeout
        self.max_per_peer = max_per_peer
        self.max_handshakes = max_handshakes
        self.handshake_timeout = handshake_timeout
        self._server: _TlsHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise UsageError(f"{self.url.text} is already being served")
        try:
            server = _TlsHTTPServer(
                (self.url.host, self.url.need_port()), self.context, self.handler, self.log,
                self.access_log, self.max_body, self.max_clients, self.max_pending, self.busy_wait,
                self.idle_timeout, self.max_per_peer, self.max_handshakes,
                self.handshake_timeout)
        except OSError as exc:
            raise listen_error(f"{self.url.host}:{self.url.port}", exc) from exc
        host, port = server.server_address[:2]
        self.address = f"https://{netloc(str(host), int(port))}"
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"https-{port}", daemon=True)
        self._thread.start()

        def watchdog() -> None:
            while not server.stopping.wait(0.2):
                server.watch()

        self._watchdog = threading.Thread(target=watchdog, name=f"https-watchdog-{port}",
                                          daemon=True)
        self._watchdog.start()

    @property
    def dropped(self) -> int:
        """Connections closed for a missed deadline or to make room, so far."""
        return self._server.dropped if self._server is not None else 0

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        server.shutdown()  # the accept loop ends
        server.wake_connections()  # keep-alive connections stop waiting for a next request
        server.server_close()  # closes the socket and joins every connection thread
        if self._thread is not None:
            self._thread.join()
            self._thread = None


def _server_context(url: LinkURL) -> ssl.SSLContext:
    return server_context(url, "https://HOST:PORT?cert=FILE&key=FILE[&ca=FILE]")


def listen(url: LinkURL, handler: Handler, **ctx: Any) -> HttpsListener:
    """The daemon side of ``https://HOST:PORT?cert=&key=[&ca=]``, not yet started."""
    url.check_options(OPTIONS)
    _check_path(url)
    url.need_port()
    known = {"log", "access_log", "max_body", "max_clients", "max_pending", "busy_wait",
             "idle_timeout", "max_per_peer", "max_handshakes", "handshake_timeout"}
    return HttpsListener(url, handler, _server_context(url),
                         **{k: v for k, v in ctx.items() if k in known and v is not None})


# ---------------------------------------------------------------- client side


class HttpsClient(ServerClient):
    """The operations over one kept-alive HTTPS connection.

    A call that fails because the server had closed an idle kept-alive
    connection is sent once more on a new one (nothing had reached the agent).

    Args:
        url: ``https://HOST:PORT[?ca=&cert=&key=]``.
        context: TLS settings verifying the server.
        timeout: seconds for connecting and for each answer.
    """

    def __init__(self, url: LinkURL, context: ssl.SSLContext, timeout: float = 10.0) -> None:
        self.url = url
        self.context = context
        self.timeout = timeout
        self.where = f"https://{netloc(url.host, url.need_port())}"
        self._conn: http.client.HTTPSConnection | None = None
        self._ops: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            Op.HELLO: lambda _a: self._structured("GET", "/v1/hello"),
            Op.GET_INFO: self._info,
            Op.GET_STATUS: lambda _a: self._structured("GET", "/v1/status"),
            Op.GET_LICENSE_INFO: lambda _a: self._structured("GET", "/v1/license-info"),
            Op.CREATE_REQUEST: self._request,
            Op.APPLY_RESPONSE: self._apply,
            Op.CHECK_FEATURE: self._check,
            Op.READ_JOURNAL: lambda _a: self._structured("GET", "/v1/journal"),
            # issue 15: floating seats
            Op.SEAT_CHECKOUT: lambda a: self._structured("POST", "/v1/seat/checkout", a),
            Op.SEAT_RENEW: lambda a: self._structured("POST", "/v1/seat/renew", a),
            Op.SEAT_RETURN: lambda a: self._structured("POST", "/v1/seat/return", a),
            Op.SEAT_LIST: lambda a: self._structured(
                "GET", f"/v1/seat/list?offset={int(a.get('offset', 0))}"),
            # issue 14: the system tree
            Op.RENEW_GRANTS: lambda a: self._structured("POST", "/v1/tree/renew", a),
            Op.RETURN_GRANTS: lambda a: self._structured("POST", "/v1/tree/return", a),
            Op.USE_FEATURE: lambda a: self._structured("POST", "/v1/use", a),
            Op.RELAY: lambda a: self._structured("POST", "/v1/relay", a),
            Op.GET_TREE: lambda _a: self._structured("GET", "/v1/tree"),
        }

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        fn = self._ops.get(op)
        if fn is None:
            raise UsageError(f"unknown operation {op!r}")
        return fn(args or {})

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- operations

    def _info(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        body, headers = self._exchange("GET", "/v1/info")
        return {"file": body, "device_id": headers.get("X-Device-Id", "")}

    def _request(self, args: Mapping[str, Any]) -> dict[str, Any]:
        body, _h = self._exchange("POST", "/v1/request", canonical(dict(args)),
                                  {"Content-Type": CBOR})
        return {"file": body}

    def _apply(self, args: Mapping[str, Any]) -> dict[str, Any]:
        file = args.get("file")
        if not isinstance(file, bytes):
            raise UsageError("argument 'file' must be a byte string (the file's content)")
        body, h = self._exchange("POST", "/v1/apply", file, {"Content-Type": CBOR})
        try:
            changes = json.loads(h.get("X-Changes", "[]"))
            warning = json.loads(h["X-Warning"]) if h.get("X-Warning") else None
            return {
                "receipt": body,
                "already_applied": h.get("X-Already-Applied") == "true",
                "sequence": int(h.get("X-Sequence", "")),
                "base_sequence": int(h.get("X-Base-Sequence", "")),
                "changes": [str(c) for c in changes],
                "warning": warning,
            }
        except (ValueError, TypeError, RecursionError) as exc:
            raise TransportError(f"{self.where} answered apply without readable "
                                 f"X-Sequence/X-Changes headers: {exc}") from exc

    def _check(self, args: Mapping[str, Any]) -> Any:
        feature = args.get("feature")
        if not isinstance(feature, str) or not feature:
            raise UsageError("feature must be a name")
        count = args.get("count", 1)
        if type(count) is not int or not 1 <= count < 2**32:
            raise UsageError("count must be a whole number from 1")
        query = f"?count={count}" if count != 1 else ""  # issue 14: units asked for
        return self._structured("GET", "/v1/check/" + quote(feature, safe="") + query)

    # -- HTTP

    def _structured(self, method: str, path: str,
                    args: Mapping[str, Any] | None = None) -> Any:
        body, headers = self._exchange(
            method, path, None if args is None else canonical(dict(args)),
            None if args is None else {"Content-Type": CBOR}, accept=CBOR)
        if headers.get("Content-Type", "").split(";")[0].strip() != CBOR:
            raise TransportError(f"{self.where}{path} did not answer in CBOR")
        try:
            return strict_loads(body, max_size=MAX_ANSWER)
        except MalformedError as exc:
            raise TransportError(f"{self.where}{path}: unreadable answer: {exc}") from exc

    def _exchange(self, method: str, path: str, body: bytes | None = None,
                  headers: Mapping[str, str] | None = None,
                  accept: str = "*/*") -> tuple[bytes, http.client.HTTPMessage]:
        """One request and its answer; refusals become RemoteError, failures TransportError."""
        hdrs = {"Accept": accept, **(headers or {})}
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(method, path, body=body, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read(MAX_ANSWER + 1)
                if len(data) > MAX_ANSWER:
                    self.close()
                    raise TransportError(f"{self.where}{path}: answer larger than {MAX_ANSWER} bytes")
                if resp.will_close:
                    self.close()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError,
                    ssl.SSLEOFError) as exc:
                self.close()
                if reused and attempt == 1:
                    continue  # the server had closed the idle connection: try a fresh one
                raise TransportError(self._explain(exc)) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise TransportError(self._explain(exc)) from exc
            if resp.status >= 300:
                raise self._refusal(resp.status, resp.reason, data)
            return data, resp.headers
        raise AssertionError("unreachable")

    def _connection(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(
                self.url.host, self.url.need_port(), timeout=self.timeout, context=self.context)
        return self._conn

    def _explain(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionRefusedError):
            return (f"cannot connect to {self.where}: connection refused "
                    "(is the license agent listening there?)")
        if isinstance(exc, TimeoutError):
            return f"no answer from {self.where} within {self.timeout:g} s"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"cannot verify the TLS certificate of {self.where}: {exc.verify_message} "
                    "(give the site CA with ?ca=FILE)")
        if isinstance(exc, ssl.SSLError):
            hint = ""
            if not self.url.option("cert"):
                # TLS 1.3 servers refuse a missing client certificate only after the handshake
                hint = "; the server may require a client certificate: add ?cert=FILE&key=FILE"
            return f"TLS with {self.where} failed ({exc.reason or exc.strerror or exc}){hint}"
        if isinstance(exc, http.client.RemoteDisconnected | ConnectionResetError | BrokenPipeError):
            return (f"{self.where} closed the connection without an answer "
                    "(a refused client certificate ends TLS like this too)")
        return f"talking to {self.where} failed: {exc}"

    def _refusal(self, status: int, phrase: str, data: bytes) -> RemoteError:
        return refusal_from_body(self.where, status, phrase, data)


def refusal_from_body(where: str, status: int, phrase: str, data: bytes) -> RemoteError:
    """The RemoteError an HTTP error answer stands for: its JSON ``code``/``reason``/
    ``message`` (licagent's exit codes), or a plain HTTP failure (exit 1)."""
    try:
        err = json.loads(data)
    except (ValueError, RecursionError):
        err = None
    if not isinstance(err, dict) or not isinstance(err.get("message"), str):
        text = data[:200].decode("utf-8", "replace").strip()
        return RemoteError(1, "http", f"{where} answered HTTP {status} {phrase}"
                                      + (f": {text}" if text else ""))
    return RpcError.from_wire(err).exception()


def connect(url: LinkURL, timeout: float = 10.0, **_ctx: Any) -> HttpsClient:
    """A client of ``https://HOST:PORT[?ca=&cert=&key=]``; connects at the first call."""
    url.check_options(OPTIONS)
    _check_path(url)
    url.need_port()
    return HttpsClient(url, client_context(url), timeout=timeout)

"""What the two HTTP servers share: routing, bodies with a Content-Length, JSON refusals.

The agent's ``https://`` listener (:mod:`hw.backends.https`) and the licensing
server simulator (:mod:`simulators.licensing_server.server`) answer the same
way: a route per path and method, files as CBOR and records as JSON, every
refusal a JSON ``{"code", "reason", "message"}`` with ``licagent``'s exit code
and the HTTP status that fits it (:data:`HTTP_STATUS`), and one log line per
exchange. :class:`JsonHandler` is that request cycle; a server subclasses it
with its routes.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler
from typing import Any
from urllib.parse import urlsplit

from agent.errors import LicensingError
from agent.rpc import RpcError

__all__ = ["CBOR", "HTTP_STATUS", "JSON", "Answer", "HttpRefusal", "JsonHandler", "Route"]

CBOR = "application/cbor"
JSON = "application/json"

#: licagent exit code -> HTTP status of the refusal
HTTP_STATUS: Mapping[int, int] = {1: 500, 2: 400, 3: 400, 4: 403, 5: 409, 6: 409, 7: 422, 8: 500,
                                 9: 503}  # 9: no seat free (issue 15)


class HttpRefusal(Exception):
    """An HTTP-level refusal raised inside a request handler (status, exit code, reason)."""

    def __init__(self, status: int, code: int, reason: str, message: str,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.reason = status, code, reason
        self.headers = dict(headers or {})


class Answer:
    """What a route returns: body, content type, status and extra headers."""

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(self, body: bytes, content_type: str, status: int = 200,
                 headers: Mapping[str, str] | None = None) -> None:
        self.body, self.content_type, self.status = body, content_type, status
        self.headers = dict(headers or {})


def json_answer(obj: Any, status: int = 200) -> Answer:
    """``obj`` as indented JSON."""
    return Answer(json.dumps(obj, indent=2).encode() + b"\n", JSON, status)


Route = Callable[[], Answer]


class JsonHandler(BaseHTTPRequestHandler):
    """The request cycle: route, answer (errors as JSON), one log line.

    Subclasses give :meth:`routes` (method -> route for a path), the texts
    :attr:`NOT_FOUND_HINT` and :attr:`WHO` (named in internal-error answers),
    and a ``server`` with ``log(line)``.
    """

    NOT_FOUND_HINT = ""
    WHO = "the server"
    server: Any

    _status: int | None = None
    _sent = 0

    def routes(self, path: str) -> Mapping[str, Route]:
        raise NotImplementedError

    @property
    def _path(self) -> str:
        return urlsplit(self.path).path

    def before_route(self) -> None:
        """Checks before routing (e.g. a body that will not be read)."""

    def after_send(self, answer: Answer) -> None:
        """Called once the answer is written (logging)."""

    def dispatch(self) -> None:
        try:
            self.before_route()
            routes = self.routes(self._path)
            route = routes.get(self.command)
            if route is None:
                if routes:
                    raise HttpRefusal(405, 2, "usage", f"{self.command} is not allowed on "
                                      f"{self._path}", {"Allow": ", ".join(sorted(routes))})
                raise HttpRefusal(404, 2, "usage",
                                  f"no such endpoint {self._path} {self.NOT_FOUND_HINT}".strip())
            answer = route()
        except HttpRefusal as r:
            answer = self.error_answer(r.status, r.code, r.reason, str(r), r.headers)
        except LicensingError as err:
            answer = self.error_answer(HTTP_STATUS.get(err.exit_code, 500), err.exit_code,
                                       err.reason, str(err))
        except Exception as exc:  # a bug in a route must not kill the connection thread
            self.server.log(f"internal error on {self.command} {self._path}: "
                            f"{type(exc).__name__}: {exc}")
            answer = self.error_answer(500, 1, "internal", f"internal error in {self.WHO}; "
                                                           "see its log")
        self.send_answer(answer)

    @staticmethod
    def error_answer(status: int, code: int, reason: str, message: str,
                     headers: Mapping[str, str] | None = None) -> Answer:
        body = json.dumps(RpcError(code, reason, message).to_wire()).encode() + b"\n"
        return Answer(body, JSON, status, headers)

    def send_answer(self, answer: Answer) -> None:
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in answer.headers.items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        try:
            if self.command != "HEAD":
                self.wfile.write(answer.body)
        except OSError:
            self.close_connection = True  # the client went away; its loss
        self._status, self._sent = answer.status, len(answer.body)
        self.after_send(answer)

    def content_length(self) -> int | None:
        """The request's Content-Length, None without one; a bad one is refused."""
        raw = self.headers.get("Content-Length")
        if raw is None:
            return None
        try:
            n = int(raw)
        except ValueError:
            n = -1
        if n < 0:
            self.close_connection = True
            raise HttpRefusal(400, 2, "usage", f"bad Content-Length {raw!r}")
        return n

    def read_body(self, limit: int, where: str = "") -> bytes:
        """The request body, at most ``limit`` bytes, sent with a Content-Length."""
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            raise HttpRefusal(411, 2, "usage", "send the body with a Content-Length "
                                               "(chunked transfer is not accepted)")
        length = self.content_length()
        if length is None:
            raise HttpRefusal(411, 2, "usage", "a body with a Content-Length is needed")
        if length > limit:
            self.close_connection = True  # the body stays unread
            raise HttpRefusal(413, 3, "too-large", f"the body of {length} bytes exceeds the "
                                                   f"{limit}-byte limit{where}")
        data = self.rfile.read(length)
        if len(data) != length:
            self.close_connection = True
            raise HttpRefusal(400, 3, "malformed", "the body ended before its Content-Length")
        return data

    def send_error(self, code: int, message: str | None = None,
                   explain: str | None = None) -> None:
        """Errors the base class finds (bad request line, unknown method) as JSON too."""
        self.close_connection = True
        phrase = message or explain or http.client.responses.get(code, "error")
        self.send_answer(self.error_answer(code, 2, "usage", phrase))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        pass  # one line per exchange comes from after_send

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log(f"{self.client_address[0]} {format % args}")

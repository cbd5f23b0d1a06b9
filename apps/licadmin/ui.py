"""``licadmin ui``: the administration tool as a local web application.

The standard library's ``http.server`` (the request cycle of :mod:`hw.httpjson`), on
loopback only. Who may use it: whoever holds the access token printed in the start URL
(``http://127.0.0.1:PORT/?token=...``, as notebook servers do). The first visit with it
sets a ``SameSite=Strict`` HttpOnly cookie and redirects to a URL without it. Every
request needs that cookie (or the token), and a ``Host`` naming this loopback address
(no DNS rebinding); every state-changing request is a ``POST`` that also carries the
CSRF field of the page it came from, and is refused when its ``Origin`` (or
``Sec-Fetch-Site``) says another site sent it. Pages are plain HTML with one local style
sheet: no script, nothing from the Internet (``Content-Security-Policy: default-src
'self'``).

Every action calls the command line's own step functions (:mod:`apps.licadmin.ui_flow`);
the Rehost and Seat pools screens live in modules of their own (:mod:`ui_rehost`,
:mod:`ui_seats`), asked for their routes in turn. An exception no route expected is one
line in the browser and its traceback in the log (standard error).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import secrets
import signal
import socket
import sys
import threading
import traceback
from collections.abc import Callable, Mapping
from email.parser import BytesParser
from email.policy import HTTP
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from agent.errors import EXIT_OK, LicensingError, UsageError, listen_error
from agent.formats import DEVICE_FILE_MAX
from apps.common import one_line, read_input
from apps.licadmin import inventory, online, ui_rehost, ui_seats, ui_system
from apps.licadmin.runner import DEFAULT_JOBS, DEFAULT_TIMEOUT, open_client
from apps.licadmin.ui_flow import STEPS, Site, cli_line
from apps.licadmin.ui_pages import (
    Routes,
    flow_page,
    journal_page,
    layout,
    licenses_page,
    servers_page,
)
from hw.httpjson import Answer, HttpRefusal, JsonHandler, Route

__all__ = ["UiServer", "add_parser", "parse_multipart", "run_ui"]

STATIC = Path(__file__).with_name("ui_static")
STATIC_TYPES = {".css": "text/css; charset=utf-8"}
COOKIE = "licadmin_ui"
HTML = "text/html; charset=utf-8"
#: the largest form a browser may post: a site's response files at once
MAX_FORM = 64 * 1024 * 1024
DEFAULT_LISTEN = "127.0.0.1:8470"
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'none'; object-src 'none'; "
                               "frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make form posts say Origin: null
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` on loopback (127.0.0.0/8 or ::1, ``[::1]:PORT``); anything else exit 2."""
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port <= 65535:
        raise UsageError(f"--listen {text}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise UsageError(f"--listen {text}: licadmin ui serves on loopback only (127.0.0.0/8 "
                         f"or ::1): its pages change licenses on the site's servers")
    return host, port


def parse_multipart(ctype: str, body: bytes
                    ) -> tuple[dict[str, list[str]], list[tuple[str, str, bytes]]]:
    """A ``multipart/form-data`` body: its text fields, and its files as (field, file name,
    exact bytes); a file chosen with an empty name (no file) is left out.

    Raises:
        HttpRefusal: not a multipart body (400).
    """
    msg = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + ctype.encode("latin-1", "replace") + b"\r\n\r\n" + body)
    if not msg.is_multipart():
        raise HttpRefusal(400, 2, "usage", "the form is not multipart/form-data")
    fields: dict[str, list[str]] = {}
    files: list[tuple[str, str, bytes]] = []
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        data = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(data, bytes):
            continue
        if filename is not None:
            if filename:
                files.append((name, filename, data))
        else:
            fields.setdefault(name, []).append(data.decode("utf-8", "replace"))
    return fields, files


class UiServer(ThreadingHTTPServer):
    """The HTTP server of ``licadmin ui``: the site, the access token, the flash line."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], site: Site, token: str | None = None,
                 log: Any = None) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.site = site
        self.token = token or secrets.token_urlsafe(32)
        self.csrf = hmac.new(self.token.encode(), b"csrf", "sha256").hexdigest()
        self.flash: tuple[str, str] | None = None
        self._log = log
        try:
            super().__init__(address, _Handler)
        except OSError as exc:
            raise listen_error(f"{address[0]}:{address[1]}", exc) from exc
        host, port = str(self.server_address[0]), int(self.server_address[1])
        shown = f"[{host}]" if ":" in host else host
        self.origin = f"http://{shown}:{port}"
        self.hosts = {f"{shown}:{port}", f"localhost:{port}"}
        #: the origins of this server's own pages (as opened by address or as localhost)
        self.origins = {f"http://{h}" for h in self.hosts}

    @property
    def url(self) -> str:
        """The start URL, with the access token."""
        return f"{self.origin}/?token={quote(self.token)}"

    def log(self, line: str) -> None:
        """A line of the UI log; inside an ``except`` block, with the traceback."""
        if sys.exc_info()[0] is not None:
            line += "\n" + traceback.format_exc().rstrip()
        if self._log is not None:
            self._log(line)


class _Handler(JsonHandler):
    WHO = "licadmin ui"
    NOT_FOUND_HINT = "(open the URL licadmin ui printed)"
    server: UiServer
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        with self.server.site.one_view():
            self.dispatch()

    def do_HEAD(self) -> None:
        with self.server.site.one_view():
            self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    # ------------------------------------------------------------ who may ask

    def _cookie(self) -> str:
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == COOKIE:
                return value
        return ""

    def _query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.path).query)

    def before_route(self) -> None:
        if (self.headers.get("Host") or "") not in self.server.hosts:
            raise HttpRefusal(421, 4, "unauthenticated",
                              f"this page was asked for as host "
                              f"{one_line(self.headers.get('Host') or '(none)')!r}: open "
                              f"{self.server.origin} (the URL licadmin ui printed)")
        token = self.server.token
        given = self._query().get("token", [""])[0]
        if given and hmac.compare_digest(given.encode(), token.encode()):
            return  # the start URL: routes() sets the cookie and redirects
        if not hmac.compare_digest(self._cookie().encode(), token.encode()):
            raise HttpRefusal(403, 4, "unauthenticated",
                              "no access token: open the URL licadmin ui printed when it "
                              "started (it carries the token)")
        if self.command == "POST":
            self._check_same_site()

    def _check_same_site(self) -> None:
        origin = self.headers.get("Origin")
        if origin is not None and origin not in self.server.origins:
            raise HttpRefusal(403, 4, "unauthenticated",
                              f"a form sent from {one_line(origin)} was refused: only pages "
                              f"of {self.server.origin} may change anything")
        fetch_site = self.headers.get("Sec-Fetch-Site")
        if fetch_site is not None and fetch_site not in ("same-origin", "none"):
            raise HttpRefusal(403, 4, "unauthenticated",
                              f"a request from another site ({one_line(fetch_site)}) was "
                              f"refused")

    def _form(self) -> tuple[dict[str, list[str]], list[tuple[str, str, bytes]]]:
        """A posted form's fields, and its files as (field, file name, bytes); the CSRF
        field checked before anything else is looked at."""
        ctype = self.headers.get("Content-Type") or ""
        body = self.read_body(MAX_FORM, " of a form")
        fields: dict[str, list[str]] = {}
        files: list[tuple[str, str, bytes]] = []
        if ctype.startswith("application/x-www-form-urlencoded"):
            fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        elif ctype.startswith("multipart/form-data"):
            fields, files = parse_multipart(ctype, body)
        else:
            raise HttpRefusal(415, 2, "usage", "send a form (application/x-www-form-"
                                               "urlencoded or multipart/form-data)")
        given = (fields.get("csrf") or [""])[0]
        if not hmac.compare_digest(given.encode(), self.server.csrf.encode()):
            raise HttpRefusal(403, 4, "unauthenticated",
                              "the form carries no valid CSRF field (sent from another "
                              "page?): nothing was changed; reload the page and try again")
        return fields, files

    # ------------------------------------------------------------ answers

    def send_answer(self, answer: Answer) -> None:
        for k, v in SECURITY_HEADERS.items():
            answer.headers.setdefault(k, v)
        super().send_answer(answer)

    def error_answer(self, status: int, code: int, reason: str,  # type: ignore[override]
                     message: str, headers: Mapping[str, str] | None = None) -> Answer:
        """A refusal as a page with the command line's one line (``licadmin: REASON: ...``)."""
        line = f"licadmin: {reason}: {one_line(message)}"
        page = layout("Refused", "", "", ("error", line))
        return Answer(page.encode(), HTML, status, headers)

    def _page(self, title: str, body: str, current: str) -> Answer:
        flash, self.server.flash = self.server.flash, None
        site = self.server.site
        if flash is None and site.failure is not None:
            flash, site.failure = ("error", site.failure), None
        return Answer(layout(title, body, current, flash, site.shown_job(),
                             self.server.csrf).encode(),
                      HTML, 200)

    def _redirect(self, to: str, cookie: bool = False) -> Answer:
        headers = {"Location": to}
        if cookie:
            headers["Set-Cookie"] = (f"{COOKIE}={self.server.token}; HttpOnly; "
                                     f"SameSite=Strict; Path=/")
        return Answer(b"", HTML, 303, headers)

    def after_send(self, answer: Answer) -> None:
        self.server.log(f"{self.command} {urlsplit(self.path).path} {answer.status}")

    # ------------------------------------------------------------ for the screen modules

    def query(self) -> dict[str, list[str]]:
        return self._query()

    def form(self) -> tuple[dict[str, list[str]], list[tuple[str, str, bytes]]]:
        return self._form()

    def page(self, title: str, body: str, current: str) -> Answer:
        return self._page(title, body, current)

    def acted(self, to: str, fn: Callable[[], Any]) -> Answer:
        return self._acted(to, fn)

    def download(self, data: bytes, name: str) -> Answer:
        return Answer(data, "application/octet-stream", 200, {
            "Content-Disposition": f'attachment; filename="{name}"'})

    # ------------------------------------------------------------ routes

    SCREENS: tuple[Routes, ...] = (ui_rehost.routes, ui_seats.routes)

    def routes(self, path: str) -> Mapping[str, Route]:
        if self._query().get("token") and self.command in ("GET", "HEAD"):
            return {"GET": lambda: self._redirect(path if path != "/" else "/servers",
                                                  cookie=True),
                    "HEAD": lambda: self._redirect("/servers", cookie=True)}
        get: dict[str, Route] = {
            "/": lambda: self._redirect("/servers"),
            "/servers": self._servers,
            "/licenses": self._licenses,
            "/flow": self._flow,
            "/journal": self._journal,
        }
        post: dict[str, Route] = {
            "/servers/read": self._read_servers,
            "/flow/start": self._start_flow,
            "/stop": self._stop,
            "/flow/upload/license-info": self._upload_license_info,
            "/flow/upload/responses": self._upload_responses,
        }
        for screen in self.SCREENS:
            own = screen(self, path)
            if own:
                return own
        if path in get:
            return {"GET": get[path], "HEAD": get[path]}
        if path in post:
            return {"POST": post[path]}
        if path.startswith("/flow/run/") and path[10:] in STEPS:
            step = path[10:]
            return {"POST": lambda: self._run_step(step)}
        if path.startswith("/files/"):
            rel = unquote(path[7:])
            return {"GET": lambda: self._download(rel)}
        if path.startswith("/static/"):
            name = path[8:]
            return {"GET": lambda: self._static(name)}
        return {}

    def _acted(self, to: str, fn: Any) -> Answer:
        """Run a state-changing action; its refusal becomes the next page's one line."""
        try:
            said = fn()
        except LicensingError as err:
            self.server.flash = ("error", cli_line(err))
        else:
            if isinstance(said, str) and said:
                self.server.flash = ("note", said)
        return self._redirect(to)

    def _servers(self) -> Answer:
        site = self.server.site
        if site.views is None and not site.busy():
            site.read_servers()  # reading status changes nothing on a server
        return self._page("Servers", servers_page(site, self.server.csrf,
                                                  ui_system.place(site))
                          + ui_system.servers_section(site), "/servers")

    def _read_servers(self) -> Answer:
        self._form()
        return self._acted("/servers", self.server.site.read_servers)

    def _licenses(self) -> Answer:
        site = self.server.site
        if site.views is None and not site.busy():
            site.read_servers()
        report, error = None, ""
        if site.licensing is not None:
            try:
                report = site.licensing.report()  # type: ignore[attr-defined]
            except LicensingError as err:
                error = cli_line(err)
        return self._page("Show Licenses", licenses_page(site, report, error)
                          + ui_system.licenses_section(site), "/licenses")

    def _flow(self) -> Answer:
        q = self._query()
        mode = (q.get("mode") or ["activate"])[0]
        new = bool(q.get("new")) or "mode" in q
        title = "Reclaim" if mode == "reclaim" else "Activate"
        state = self.server.site.flow.state()
        if state is not None and not new:
            title = "Reclaim" if state["mode"] == "reclaim" else "Activate"
        return self._page(title, flow_page(self.server.site, self.server.csrf,
                                           mode if mode in ("activate", "reclaim")
                                           else "activate", new),
                          "/flow?mode=reclaim" if title == "Reclaim" else "/flow")

    def _start_flow(self) -> Answer:
        fields, _files = self._form()
        site = self.server.site

        def start() -> None:
            if site.busy():
                raise UsageError("a step is still running: wait for it to finish")
            site.new_flow((fields.get("mode") or [""])[0], fields.get("server", []),
                          (fields.get("features") or [""])[0].split(","),
                          (fields.get("force") or [""])[0] == "1")
            site.run_step("gather")

        return self._acted("/flow", start)

    def _run_step(self, step: str) -> Answer:
        fields, _files = self._form()
        allow = (fields.get("allow_reclaim") or [""])[0] == "1"
        return self._acted("/flow",
                           lambda: self.server.site.run_step(step, allow_reclaim=allow))

    def _stop(self) -> Answer:
        self._form()
        job = self.server.site.job

        def stop() -> str:
            if job is None or not job.running:
                return "nothing is running"
            job.stop.request("stop")
            return "stopping: no new server is started; the ones in flight finish"

        return self._acted("/flow", stop)

    def _upload_license_info(self) -> Answer:
        _fields, files = self._form()

        def put() -> str:
            if len(files) != 1:
                raise UsageError("choose one license information file")
            _n, name, data = files[0]
            return self.server.site.flow.put_license_info(name, data)

        return self._acted("/flow", put)

    def _upload_responses(self) -> Answer:
        _fields, files = self._form()
        return self._acted("/flow", lambda: self.server.site.flow.put_responses(
            [(name, data) for _n, name, data in files]))

    def _download(self, rel: str) -> Answer:
        path = self.server.site.flow.file_path(rel)
        data = read_input(str(path), 16 * 1024 * 1024 if "/" not in rel else DEVICE_FILE_MAX)
        return self.download(data, path.name)

    def _static(self, name: str) -> Answer:
        if name not in {p.name for p in STATIC.iterdir()} or name.startswith("."):
            raise HttpRefusal(404, 2, "usage", f"no such file {one_line(name)}")
        ctype = STATIC_TYPES.get(Path(name).suffix, "application/octet-stream")
        return Answer((STATIC / name).read_bytes(), ctype, 200,
                      {"Cache-Control": "no-cache"})

    def _journal(self) -> Answer:
        site = self.server.site
        raw = (self._query().get("server") or [""])[0]
        index: int | None = None
        entries: list[dict[str, Any]] | None = None
        error = ""
        if raw:
            if not raw.isdigit() or int(raw) >= len(site.servers):
                raise HttpRefusal(404, 2, "usage", f"no server {one_line(raw)} in the site")
            index = int(raw)
            try:
                with open_client(site.servers[index].url, site.timeout) as client:
                    entries = client.journal().entries
            except LicensingError as err:
                error = cli_line(err)
        return self._page("Journal", journal_page(site, index, entries, error), "/journal")


# ---------------------------------------------------------------- the command


def add_parser(sub: Any, timeout_type: Any, jobs_type: Any) -> None:
    sp = sub.add_parser(
        "ui", help="the administration tool in a browser (a local web application)",
        description="Serve the administration screens on loopback: Servers, Show Licenses, "
                    "the guided activation and reclaim, rehost, seat pools, each server's "
                    "journal. Open the URL printed at start (it carries the access token).")
    sp.add_argument("--servers", required=True, metavar="FILE.toml",
                    help='the site\'s servers: [[server]] tables with url = "..." and an '
                         'optional name = "..."')
    sp.add_argument("--licensing-server", metavar="URL",
                    help="the licensing server (without it, the online steps are done by "
                         "carrying their files to a computer that is online)")
    sp.add_argument("--token-file", metavar="FILE",
                    help="the licensing server's bearer token; default: LICADMIN_TOKEN")
    sp.add_argument("--licensing-ca", metavar="FILE",
                    help="PEM CA to verify an https:// licensing server with")
    sp.add_argument("--listen", default=DEFAULT_LISTEN, metavar="127.0.0.1:PORT",
                    help=f"loopback address and port to serve on (default {DEFAULT_LISTEN}; "
                         f"port 0: any free port)")
    sp.add_argument("--work-dir", default="licadmin-ui", metavar="DIR",
                    help="where each flow keeps the files of its steps (default: "
                         "licadmin-ui in the current folder)")
    sp.add_argument("--timeout", type=timeout_type, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"the total time allowed per server (default {DEFAULT_TIMEOUT:g})")
    sp.add_argument("--jobs", type=jobs_type, default=DEFAULT_JOBS, metavar="N",
                    help=f"servers handled at once (default {DEFAULT_JOBS})")


def run_ui(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; exit 0."""
    host, port = parse_listen(args.listen)
    servers, site_name = inventory.servers_from([], args.servers, args.timeout)
    licensing: online.Licensing | None = None
    if args.licensing_server:
        from apps.licadmin import licensing_access

        licensing = licensing_access.client_from(args)
    work = Path(args.work_dir)
    if not work.absolute().parent.is_dir():
        raise UsageError(f"cannot use --work-dir {args.work_dir}: its folder does not exist")
    work.mkdir(exist_ok=True)
    site = Site(servers, site_name, licensing, work, args.timeout, args.jobs)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    server = UiServer((host, port), site, log=log)
    stopping = threading.Event()

    def stop(signum: int, _frame: Any) -> None:
        name = signal.Signals(signum).name
        job = site.job
        if job is not None and job.running:
            job.stop.request(name)  # a second signal stops waiting for the servers in flight
        if not stopping.is_set():
            stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    print(f"licadmin ui: serving {len(servers)} server(s) at {server.origin}; open this URL "
          f"(it carries the access token):", flush=True)
    print(f"  {server.url}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
        if site.busy():
            # like Ctrl-C in a site step: no further server; the ones in flight finish and
            # the step's outcome (interrupted for the others) is written to flow.json
            print("licadmin ui: stopping: waiting for the servers in flight (send the signal "
                  "again to stop waiting)", flush=True)
            while site.busy() and not (site.job is not None and site.job.stop.hard):
                site.wait(0.2)
            site.wait(1.0)  # the step's outcome being written
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        server.server_close()
        inventory.close_servers(servers)
    print("licadmin ui: stopped", flush=True)
    return EXIT_OK

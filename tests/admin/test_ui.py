"""``licadmin ui`` staged attacks over real HTTP (issue 19, item 1): a real ``licadmin ui``
process on loopback, three real ``licagent run`` daemons behind it.

Without the token nothing is served; a page asked for under another host name (DNS
rebinding) is refused; a state-changing request without the page's CSRF field, or sent
from another origin, changes nothing; downloads reach only the flow's own files; a
non-loopback address is refused at start with one line and exit 2.

The screens of items 1-3 over the same real processes: Seat pools (list, a seat returned
by its token file, the reclaim flow's --force box), Rehost (online, in the folder
``licadmin rehost`` finishes, and offline with its hops carried as files), the system
tree against ``licadmin tree --json``; a bug is one line in the browser and a traceback
in the UI log.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from simulators.licensing_server.vendor import Vendor
from tests.conftest import stop_processes
from tests.simulators.test_licserver_http import BIN
from tests.support.uisite import BOUNDARY, UiSite, multipart_body


@pytest.fixture
def ui(tmp_path: Path, vendor: Vendor) -> Iterator[UiSite]:
    s = UiSite(tmp_path, vendor)
    try:
        s.start(licensing=False)
        s.start_ui()
        yield s
    finally:
        s.close()


def _ask(s: UiSite, method: str, path: str, body: bytes = b"",
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    u = urlsplit(s.ui_url)
    conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=30)
    try:
        conn.request(method, path, body=body or None, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode(errors="replace")
    finally:
        conn.close()


def _cookie(s: UiSite) -> str:
    status, headers, _ = _ask(s, "GET", "/?" + urlsplit(s.ui_url).query)
    assert status == 303 and headers["location"] == "/servers"
    cookie = headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    return cookie.split(";")[0]


def _csrf(s: UiSite, cookie: str) -> str:
    _st, _h, page = _ask(s, "GET", "/flow", headers={"Cookie": cookie})
    m = re.search(r'name="csrf" value="([0-9a-f]{64})"', page)
    assert m, page
    return m.group(1)


def _start_form(s: UiSite, csrf: str | None) -> bytes:
    from urllib.parse import urlencode

    fields = [("mode", "activate"), *[("server", u) for u in s.urls.values()],
              ("features", "")]
    if csrf is not None:
        fields.append(("csrf", csrf))
    return urlencode(fields).encode()


FORM = "application/x-www-form-urlencoded"


def test_without_the_token_nothing_is_served(ui: UiSite) -> None:
    for path in ("/", "/servers", "/flow", "/journal?server=0", "/static/ui.css",
                 "/files/site-info.cbor", "/?token=wrong"):
        status, headers, page = _ask(ui, "GET", path)
        assert status == 403, (path, status)
        assert "licadmin: unauthenticated: no access token: open the URL licadmin ui " \
               "printed" in page
        assert "set-cookie" not in headers
    status, _h, _ = _ask(ui, "POST", "/flow/start", _start_form(ui, None),
                         {"Content-Type": FORM})
    assert status == 403
    assert not (ui.root / "work/flow").exists()
    # with the cookie the start URL sets, the same pages are served, with a strict policy
    cookie = _cookie(ui)
    status, headers, page = _ask(ui, "GET", "/servers", headers={"Cookie": cookie})
    assert status == 200 and "<h1>Servers</h1>" in page
    assert "default-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    # no asset from elsewhere: every src and href is a path of this server
    assert not re.search(r'(src|href)="(?!/|#)', page), page


def test_another_host_name_is_refused(ui: UiSite) -> None:
    """DNS rebinding: evil.example resolving to 127.0.0.1 gets nothing, cookie or not."""
    cookie = _cookie(ui)
    port = urlsplit(ui.ui_url).port
    for host in (f"evil.example:{port}", "127.0.0.1:1", ""):
        status, _h, page = _ask(ui, "GET", "/servers", headers={"Cookie": cookie,
                                                                "Host": host})
        assert status == 421, (host, status)
        assert "licadmin: unauthenticated: this page was asked for as host" in page


def test_forms_without_csrf_or_from_another_origin_change_nothing(ui: UiSite) -> None:
    cookie = _cookie(ui)
    csrf = _csrf(ui, cookie)
    origin = ui.ui_url.split("/?")[0]
    attempts = [
        ("no CSRF field", _start_form(ui, None), {}),
        ("a wrong CSRF field", _start_form(ui, "0" * 64), {}),
        ("another origin", _start_form(ui, csrf), {"Origin": "http://evil.example"}),
        ("another site", _start_form(ui, csrf), {"Sec-Fetch-Site": "cross-site"}),
        ("an opaque origin", _start_form(ui, csrf), {"Origin": "null"}),
    ]
    for what, body, extra in attempts:
        status, _h, page = _ask(ui, "POST", "/flow/start", body,
                                {"Cookie": cookie, "Content-Type": FORM, **extra})
        assert status == 403, (what, status)
        assert "licadmin: unauthenticated: " in page, what
        assert not (ui.root / "work/flow").exists(), what
    # a GET never changes anything
    status, _h, _ = _ask(ui, "GET", "/flow/start", headers={"Cookie": cookie})
    assert status == 405
    assert not (ui.root / "work/flow").exists()
    # the same form from the page itself starts the flow (so the refusals above were real)
    status, headers, _ = _ask(ui, "POST", "/flow/start", _start_form(ui, csrf),
                              {"Cookie": cookie, "Content-Type": FORM, "Origin": origin,
                               "Sec-Fetch-Site": "same-origin"})
    assert status == 303 and headers["location"] == "/flow"
    assert (ui.root / "work/flow/flow.json").is_file()
    # the same page opened as localhost is the same server
    port = urlsplit(ui.ui_url).port
    status, headers, _ = _ask(ui, "POST", "/stop", f"csrf={csrf}".encode(),
                              {"Cookie": cookie, "Content-Type": FORM,
                               "Host": f"localhost:{port}",
                               "Origin": f"http://localhost:{port}"})
    assert status == 303


def test_downloads_reach_only_the_flow_s_own_files(ui: UiSite) -> None:
    cookie = _cookie(ui)
    csrf = _csrf(ui, cookie)
    _ask(ui, "POST", "/flow/start", _start_form(ui, csrf),
         {"Cookie": cookie, "Content-Type": FORM})
    for _ in range(600):
        st, _h, _page = _ask(ui, "GET", "/files/site-info.cbor", headers={"Cookie": cookie})
        if st == 200:
            break
        time.sleep(0.1)
    assert st == 200
    (ui.root / "work/flow/requests").mkdir()
    (ui.root / "work/flow/requests/.hidden.req").write_bytes(b"x")
    for path in ("/files/../servers.toml", "/files/..%2f..%2fservers.toml",
                 "/files/requests/..%2f..%2f..%2fservers.toml", "/files/flow.json",
                 "/files/requests/.hidden.req", "/files/%2fetc%2fpasswd",
                 "/static/..%2fui.py", "/static/../ui.py"):
        status, _h, page = _ask(ui, "GET", path, headers={"Cookie": cookie})
        assert status in (400, 404), (path, status)
        assert "licadmin: usage: no such" in page, (path, page)


def test_only_loopback_addresses_are_served(tmp_path: Path) -> None:
    (tmp_path / "servers.toml").write_text('[[server]]\nurl = "tcp://127.0.0.1:9"\n')
    for listen, line in (
            ("0.0.0.0:0", "licadmin: usage: --listen 0.0.0.0:0: licadmin ui serves on "
                          "loopback only (127.0.0.0/8 or ::1): its pages change licenses on "
                          "the site's servers"),
            ("192.0.2.1:8470", "licadmin: usage: --listen 192.0.2.1:8470: licadmin ui serves "
                               "on loopback only (127.0.0.0/8 or ::1): its pages change "
                               "licenses on the site's servers"),
            ("127.0.0.1", "licadmin: usage: --listen 127.0.0.1: expected HOST:PORT, e.g. "
                          "127.0.0.1:8470")):
        p = subprocess.run([str(BIN / "licadmin"), "ui", "--servers", "servers.toml",
                            "--listen", listen], cwd=tmp_path, capture_output=True,
                           text=True, timeout=60, check=False)
        assert (p.returncode, p.stderr, p.stdout) == (2, line + "\n", "")


def test_one_step_at_a_time_and_a_huge_form_is_not_read(ui: UiSite) -> None:
    """While a step runs (a server held with SIGSTOP), another is refused with one line and
    changes nothing; a form larger than the limit is refused before its body is read."""
    import signal

    cookie = _cookie(ui)
    csrf = _csrf(ui, cookie)
    held = ui.daemons["AS-B roof"]
    held.send_signal(signal.SIGSTOP)
    try:
        status, _h, _ = _ask(ui, "POST", "/flow/start", _start_form(ui, csrf),
                             {"Cookie": cookie, "Content-Type": FORM})
        assert status == 303
        flow = (ui.root / "work/flow/flow.json").read_bytes()
        for path, body in (("/flow/run/gather", b""), ("/flow/start", _start_form(ui, csrf))):
            status, headers, _ = _ask(ui, "POST", path, body or f"csrf={csrf}".encode(),
                                      {"Cookie": cookie, "Content-Type": FORM})
            assert (status, headers["location"]) == (303, "/flow")
            _st, _h, page = _ask(ui, "GET", "/flow", headers={"Cookie": cookie})
            m = re.search(r'<p id="error" class="error" role="alert">([^<]*)</p>', page)
            assert m and m.group(1).startswith("licadmin: usage: "), page
            assert "still running" in m.group(1)
            assert (ui.root / "work/flow/flow.json").read_bytes() == flow
            assert not list((ui.root / "work").glob("flow-*"))  # no new flow either
        status, _h, page = _ask(ui, "POST", "/flow/run/requests", b"",
                                {"Cookie": cookie, "Content-Type": FORM,
                                 "Content-Length": str(100 * 1024 * 1024)})
        assert status == 413 and "licadmin: too-large: the body of 104857600 bytes" in page
    finally:
        held.send_signal(signal.SIGCONT)


def _results(s: UiSite) -> dict[str, Any]:
    import json

    d = json.loads((s.root / "work/flow/flow.json").read_text())
    return dict(d["results"])


def _run_step(s: UiSite, cookie: str, csrf: str, step: str) -> dict[str, Any]:
    """POST the step's form, then wait for its outcome in flow.json."""
    before = _results(s).get(step)
    status, _h, _ = _ask(s, "POST", f"/flow/run/{step}", f"csrf={csrf}".encode(),
                         {"Cookie": cookie, "Content-Type": FORM})
    assert status == 303
    return _wait_result(s, step, before)


def _wait_result(s: UiSite, step: str, before: Any = None) -> dict[str, Any]:
    # a guard against a hang, not a time limit: a full `make test` beside other builds has
    # seen a three-server upload take more than two minutes at a load average above 30
    deadline = time.monotonic() + 600
    while True:
        now = _results(s).get(step) if (s.root / "work/flow/flow.json").is_file() else None
        if now is not None and now != before:
            return dict(now)
        assert time.monotonic() < deadline, f"{step} did not finish"
        time.sleep(0.1)


def _wait_file(path: Path) -> None:
    deadline = time.monotonic() + 120
    while not path.is_file():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_licadmin_ui_stopped_or_killed_in_the_middle_of_send(tmp_path: Path,
                                                             vendor: Vendor) -> None:
    """SIGTERM while a server is in flight: the others are not started, the one in flight
    finishes, the outcome is written, exit 0. SIGKILL while a server is in flight: started
    again, the same step finishes the site (a server that applied its response answers it
    again with the same receipt). Nothing issued is lost; the ledger ends with all three installed."""
    import signal

    s = UiSite(tmp_path, vendor)
    try:
        s.start()
        s.assign(1)
        s.start_ui("--jobs", "1", "--timeout", "60")
        cookie = _cookie(s)
        csrf = _csrf(s, cookie)
        status, _h, _ = _ask(s, "POST", "/flow/start", _start_form(s, csrf),
                             {"Cookie": cookie, "Content-Type": FORM})
        assert status == 303
        _wait_result(s, "gather")
        for step in ("license-info", "requests", "upload"):
            assert _run_step(s, cookie, csrf, step)["code"] == 0
        north, south, roof = (s.devices[n] for n in ("AS-P north", "AS-P south", "AS-B roof"))
        receipts = s.root / "work/flow/receipts"

        # SIGTERM with the second server held in flight
        s.daemons["AS-P south"].send_signal(signal.SIGSTOP)
        _ask(s, "POST", "/flow/run/send", f"csrf={csrf}".encode(),
             {"Cookie": cookie, "Content-Type": FORM})
        _wait_file(receipts / f"{north}.receipt")
        assert s.ui_proc is not None
        s.ui_proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        s.daemons["AS-P south"].send_signal(signal.SIGCONT)
        assert s.ui_proc.wait(60) == 0  # one signal: it waited for south
        s.ui_proc = None
        sent = {r["server"]: (r["result"], r["detail"]) for r in _results(s)["send"]["rows"]}
        assert sent["AS-P north"][0] == sent["AS-P south"][0] == "applied"
        assert sent["AS-B roof"] == ("interrupted", "not started: interrupted")
        assert s.holdings("AS-B roof") == {}

        # SIGKILL with the third server held in flight: its apply lands, its receipt not
        s.start_ui("--jobs", "1", "--timeout", "60")
        cookie = _cookie(s)
        csrf = _csrf(s, cookie)
        s.daemons["AS-B roof"].send_signal(signal.SIGSTOP)
        written = {d: (receipts / f"{d}.receipt").stat().st_ino for d in (north, south)}
        _ask(s, "POST", "/flow/run/send", f"csrf={csrf}".encode(),
             {"Cookie": cookie, "Content-Type": FORM})
        deadline = time.monotonic() + 60
        # north and south written again (atomically: a new inode each), so roof is next
        while any((receipts / f"{d}.receipt").stat().st_ino == ino
                  for d, ino in written.items()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # roof's apply on its way (not asserted: either way must finish)
        assert s.ui_proc is not None
        s.ui_proc.send_signal(signal.SIGKILL)
        s.ui_proc.wait(30)
        s.daemons["AS-B roof"].send_signal(signal.SIGCONT)
        assert not (receipts / f"{roof}.receipt").exists()
        s.start_ui("--jobs", "1", "--timeout", "60")
        cookie = _cookie(s)
        csrf = _csrf(s, cookie)
        rows = {r["server"]: r["result"] for r in _run_step(s, cookie, csrf, "send")["rows"]}
        assert rows["AS-P north"] == rows["AS-P south"] == "already applied"
        assert rows["AS-B roof"] in ("applied", "already applied")
        assert sorted(p.name for p in receipts.iterdir()) == sorted(
            f"{d}.receipt" for d in (north, south, roof))
        confirmed = _run_step(s, cookie, csrf, "confirm")["rows"]
        assert [r["result"] for r in confirmed] == ["confirmed"] * 3
        assert set(s.report()["installed"]) == {north, south, roof}
    finally:
        s.close()



# ---------------------------------------------------------------- issue 19 items 1-3

def _multipart(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]
               ) -> tuple[bytes, dict[str, str]]:
    return multipart_body(fields, files), {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}


def _post(s: UiSite, cookie: str, path: str, fields: list[tuple[str, str]],
          files: list[tuple[str, str, bytes]] | None = None) -> str:
    """POST a form the way the page does; the Location it redirects to."""
    from urllib.parse import urlencode

    if files is None:
        body, headers = urlencode(fields).encode(), {"Content-Type": FORM}
    else:
        body, headers = _multipart(fields, files)
    status, h, page = _ask(s, "POST", path, body, {"Cookie": cookie, **headers})
    assert status == 303, (path, status, page)
    return h["location"]


def _idle_page(s: UiSite, cookie: str, path: str) -> str:
    """GET ``path`` once no job runs any more (the page shows no progress bar)."""
    deadline = time.monotonic() + 120
    while True:
        status, _h, page = _ask(s, "GET", path, headers={"Cookie": cookie})
        assert status == 200, (path, status, page)
        if 'id="progress"' not in page:
            return page
        assert time.monotonic() < deadline, f"{path}: the job never finished"
        time.sleep(0.1)


def _page_with(s: UiSite, cookie: str, path: str, text: str) -> str:
    """GET ``path`` once idle, again until it shows ``text``: a screen's body can be built
    just before its job ends and the page's frame just after (no progress bar, and the body
    still the running one's); flash lines are read from the first page, not through this."""
    deadline = time.monotonic() + 120
    while True:
        page = _idle_page(s, cookie, path)
        if text in page:
            return page
        assert time.monotonic() < deadline, page
        time.sleep(0.1)


def _said(page: str, ident: str) -> str:
    import html

    m = re.search(rf'<p id="{ident}" class="\w+" role="\w+">([^<]*)</p>', page)
    assert m, page
    return html.unescape(m.group(1))


def _cells(page: str, table_id: str) -> list[list[str]]:
    import html

    m = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', page, re.S)
    assert m, (table_id, page)
    return [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
             for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", m.group(1), re.S)]


@pytest.fixture
def online_ui(tmp_path: Path, vendor: Vendor) -> Iterator[UiSite]:
    s = UiSite(tmp_path, vendor)
    try:
        s.start()
        yield s
    finally:
        s.close()


def _floating(s: UiSite, name: str, count: int) -> None:
    """``editor`` with ``count`` floating seats on ``name``: the command line's steps."""
    url = s.urls[name]
    s.tool("licadmin", "request", "--server", url, "activate", "--feature", "editor", "--out",
           "fl.req")
    s.licserver.run("issue", "--key", str(s.licserver.key), "--request", str(s.root / "fl.req"),
                    "--grant", f"editor={count}", "--floating", "--out", str(s.root / "fl.resp"))
    s.tool("licadmin", "apply", "--server", url, "fl.resp")


def test_seat_pools_listed_and_a_seat_returned_by_its_token(online_ui: UiSite) -> None:
    s = online_ui
    _floating(s, "AS-P north", 2)
    url = s.urls["AS-P north"]
    for ws in ("ws-1", "ws-2"):
        s.tool("licadmin", "seat", "checkout", "--server", url, "editor", "--client", ws,
               "--out", f"{ws}.seat")
    s.start_ui()
    cookie = _cookie(s)
    csrf = _csrf(s, cookie)
    _st, _h, page = _ask(s, "GET", "/seats?server=0", headers={"Cookie": cookie})
    assert _cells(page, "pools") == [["editor", "2", "2", "0"]]
    cli = json.loads(s.tool("licadmin", "seat", "list", "--server", url, "--json").stdout)
    # the same seats as the command line, in the screen's order (feature, since, client)
    assert [(r[0], r[1], r[2], r[3], r[4]) for r in _cells(page, "seats")] == sorted(
        ((x["feature"], x["client"], x["since"], x["until"], "leased") for x in cli["seats"]),
        key=lambda t: (t[0], t[2], t[1]))
    # a file that is no seat token: the command line's line, and nothing changes
    (s.root / "junk.seat").write_bytes(b"\xa1\x01\x02")
    line = s.tool("licadmin", "seat", "return", "--server", url, "junk.seat",
                  code=3).stderr.strip()
    to = _post(s, cookie, "/seats/return", [("csrf", csrf), ("server", "0")],
               [("token", "junk.seat", b"\xa1\x01\x02")])
    assert to == "/seats?server=0"
    _st, _h, page = _ask(s, "GET", to, headers={"Cookie": cookie})
    assert _said(page, "error") == line
    # without the page's CSRF field: refused, the seat stays out
    body, headers = _multipart([("server", "0")],
                               [("token", "ws-1.seat", (s.root / "ws-1.seat").read_bytes())])
    status, _h, _ = _ask(s, "POST", "/seats/return", body, {"Cookie": cookie, **headers})
    assert status == 403
    assert _cells(_ask(s, "GET", "/seats?server=0", headers={"Cookie": cookie})[2],
                  "pools") == [["editor", "2", "2", "0"]]
    # the token file uploaded: the seat is free at once, the line is licadmin seat return's
    to = _post(s, cookie, "/seats/return", [("csrf", csrf), ("server", "0")],
               [("token", "ws-1.seat", (s.root / "ws-1.seat").read_bytes())])
    _st, _h, page = _ask(s, "GET", to, headers={"Cookie": cookie})
    assert _said(page, "note") == "returned seat of editor for ws-1"
    assert _cells(page, "pools") == [["editor", "2", "1", "1"]]
    assert [r[1] for r in _cells(page, "seats")] == ["ws-2"]
    # returned once: the command line finds it gone too
    assert s.tool("licadmin", "seat", "return", "--server", url, "ws-1.seat",
                  code=None).returncode != 0
    # a server without floating licenses, and a server index that does not exist
    _st, _h, page = _ask(s, "GET", "/seats?server=2", headers={"Cookie": cookie})
    assert _cells(page, "pools") == [["none"]]
    status, _h, page = _ask(s, "GET", "/seats?server=9", headers={"Cookie": cookie})
    assert status == 400 and "licadmin: usage: no server 9 in the site" in page


def test_reclaim_with_seats_out_needs_the_force_box(online_ui: UiSite) -> None:
    """The reclaim flow refuses a floating license with seats out, as licadmin requests
    does (exit 9); with "reclaim even while seats are out" (--force) it goes through."""
    s = online_ui
    _floating(s, "AS-P north", 2)
    s.tool("licadmin", "seat", "checkout", "--server", s.urls["AS-P north"], "editor",
           "--client", "ws-1", "--out", "ws-1.seat")
    s.start_ui()
    cookie = _cookie(s)
    csrf = _csrf(s, cookie)
    north = s.urls["AS-P north"]
    for force, want in ((False, "FAILED"), (True, "reclaim")):
        fields = [("csrf", csrf), ("mode", "reclaim"), ("server", north),
                  ("features", "editor")] + ([("force", "1")] if force else [])
        _post(s, cookie, "/flow/start", fields)
        _wait_result(s, "gather")
        assert _run_step(s, cookie, csrf, "license-info")["code"] == 0
        row = _run_step(s, cookie, csrf, "requests")["rows"][0]
        assert row["result"] == want, row
        if not force:
            assert row["code"] == 9 and "ws-1" in row["detail"], row
    assert json.loads((s.root / "work/flow/flow.json").read_text())["force"] is True


def _rehost_id(location: str) -> str:
    m = re.fullmatch(r"/rehost\?id=(rehost-[0-9a-f]{12})", location)
    assert m, location
    return m.group(1)


def test_rehost_screen_moves_the_licenses_as_licadmin_rehost_does(online_ui: UiSite) -> None:
    s = online_ui
    north, roof = s.devices["AS-P north"], s.devices["AS-B roof"]
    s.tool("licadmin", "assign", "--licensing-server", s.licensing, "--entitlement", "E-UI",
           "--device", north, "--feature", "bacnet=2")
    s.tool("licadmin", "activate", "--servers", "servers.toml", "--licensing-server",
           s.licensing, "--yes", "--timeout", "5")
    assert s.holdings("AS-P north") == {"bacnet": 2}
    s.start_ui()
    cookie = _cookie(s)
    csrf = _csrf(s, cookie)
    src, dst = s.urls["AS-P north"], s.urls["AS-B roof"]
    # the same server twice: one line, nothing started
    assert _post(s, cookie, "/rehost/start", [("csrf", csrf), ("from", src), ("to", src),
                                              ("features", "")]) == "/rehost"
    page = _idle_page(s, cookie, "/rehost")
    assert _said(page, "error") == ("licadmin: usage: the old and the new server are the "
                                    "same: choose the new server as the one the licenses "
                                    "move to")
    assert not (s.root / "work/rehost").exists()
    ident = _rehost_id(_post(s, cookie, "/rehost/start", [("csrf", csrf), ("from", src),
                                                         ("to", dst), ("features", "")]))
    page = _page_with(s, cookie, f"/rehost?id={ident}", "Done: the licenses are on the new server")
    assert [r[3] for r in _cells(page, "rehost-steps")] == ["done"] * 8
    assert s.holdings("AS-P north") == {} and s.holdings("AS-B roof") == {"bacnet": 2}
    moves = s.report()["moves"]
    assert len(moves) == 1, moves
    # the same folder as the command line's: licadmin rehost finds every step done
    folder = f"work/rehost/{ident}"
    out = s.tool("licadmin", "rehost", "--from", src, "--to", dst, "--licensing-server",
                 s.licensing, "--work-dir", folder).stdout
    assert out.count("done before") == 8, out
    assert f"moved bacnet=2 from {north[:12]}… to {roof[:12]}…" in out
    # each step's file is downloadable, byte for byte; nothing else is
    for name in ("plan.json", "out.req", "out.receipt", "in.resp"):
        status, h, _ = _ask(s, "GET", f"/rehost/files/{ident}/{name}",
                            headers={"Cookie": cookie})
        assert status == 200 and f'filename="{name}"' in h["content-disposition"]
        assert int(h["content-length"]) == (s.root / folder / name).stat().st_size
    for path in (f"/rehost/files/{ident}/outcome.json", f"/rehost/files/{ident}/..%2f..%2fflow",
                 "/rehost/files/rehost-0123456789ab/plan.json", "/rehost/files/../servers.toml",
                 f"/rehost/files/{ident}/../../servers.toml"):
        status, _h, page = _ask(s, "GET", path, headers={"Cookie": cookie})
        assert status in (400, 404), (path, status)
        assert "licadmin: usage: no " in page, (path, page)


def test_rehost_offline_hops_carried_as_files(tmp_path: Path, vendor: Vendor) -> None:
    """licadmin ui without a licensing server: the rehost stops at each hop to it, its
    request is downloaded and its response uploaded (a wrong one refused), each receipt is
    confirmed on the command line elsewhere; the licenses end on the new server."""
    s = UiSite(tmp_path, vendor)
    try:
        s.start()
        north, roof = s.devices["AS-P north"], s.devices["AS-B roof"]
        s.tool("licadmin", "assign", "--licensing-server", s.licensing, "--entitlement",
               "E-UI", "--device", north, "--feature", "bacnet=1")
        s.tool("licadmin", "activate", "--servers", "servers.toml", "--licensing-server",
               s.licensing, "--yes", "--timeout", "5")
        s.start_ui(online=False)
        cookie = _cookie(s)
        csrf = _csrf(s, cookie)
        src, dst = s.urls["AS-P north"], s.urls["AS-B roof"]
        ident = _rehost_id(_post(s, cookie, "/rehost/start", [
            ("csrf", csrf), ("from", src), ("to", dst), ("features", "bacnet")]))
        view = f"/rehost?id={ident}"
        office = s.root / "office"

        def carry_request(name: str, dev: str) -> bytes:
            page = _idle_page(s, cookie, view)
            assert "no licensing server given: download the request file" in page, page
            status, _h, _ = _ask(s, "GET", f"/rehost/files/{ident}/{name}",
                                 headers={"Cookie": cookie})
            assert status == 200
            req = (s.root / f"work/rehost/{ident}/{name}").read_bytes()
            shutil.rmtree(office, ignore_errors=True)
            (office / "req").mkdir(parents=True)
            (office / f"req/{dev}.req").write_bytes(req)
            s.tool("licadmin", "upload", "--requests", "office/req", "--out-dir",
                   "office/resp", "--licensing-server", s.licensing)
            return (office / f"resp/{dev}.resp").read_bytes()

        def carry_receipt(name: str, dev: str) -> None:
            _page_with(s, cookie, view, "run licadmin confirm --receipts DIR")
            (office / "rc").mkdir(exist_ok=True)
            (office / f"rc/{dev}.receipt").write_bytes(
                (s.root / f"work/rehost/{ident}/{name}").read_bytes())
            s.tool("licadmin", "confirm", "--receipts", "office/rc", "--licensing-server",
                   s.licensing)
            _post(s, cookie, "/rehost/confirmed", [("csrf", csrf), ("id", ident)])
            _post(s, cookie, "/rehost/run", [("csrf", csrf), ("id", ident)])

        out_resp = carry_request("out.req", north)
        # the response for another device is refused and nothing is taken
        _post(s, cookie, "/rehost/upload", [("csrf", csrf), ("id", ident)],
              [("file", "x.resp", b"not a response")])
        assert _said(_idle_page(s, cookie, view), "error").startswith("licadmin: malformed: ")
        assert not (s.root / f"work/rehost/{ident}/out.resp").exists()
        _post(s, cookie, "/rehost/upload", [("csrf", csrf), ("id", ident)],
              [("file", f"{north}.resp", out_resp)])
        _post(s, cookie, "/rehost/run", [("csrf", csrf), ("id", ident)])
        carry_receipt("out.receipt", north)
        assert s.holdings("AS-P north") == {}
        in_resp = carry_request("in.req", roof)
        _post(s, cookie, "/rehost/upload", [("csrf", csrf), ("id", ident)],
              [("file", f"{north}.resp", out_resp)])  # the old server's: wrong device
        page = _idle_page(s, cookie, view)
        assert _said(page, "error") == (
            f"licadmin: usage: {north}.resp answers device {north[:12]}…, this step waits "
            f"for the response to in.req of device {roof[:12]}…: nothing was taken")
        _post(s, cookie, "/rehost/upload", [("csrf", csrf), ("id", ident)],
              [("file", f"{roof}.resp", in_resp)])
        _post(s, cookie, "/rehost/run", [("csrf", csrf), ("id", ident)])
        carry_receipt("in.receipt", roof)
        _page_with(s, cookie, view, "Done: the licenses are on the new server")
        assert s.holdings("AS-B roof") == {"bacnet": 1} and s.holdings("AS-P north") == {}
        assert set(s.report()["installed"]) == {roof}
    finally:
        s.close()


def test_the_system_tree_on_servers_and_show_licenses(tmp_path: Path) -> None:
    """A top Enterprise Server lending snmp to two children (real daemons): the Servers
    screen shows the system, Show Licenses its numbers, the same as licadmin tree --json."""
    from tests.support.uisite import lend_snmp, start_ui_of
    from tests.tree.test_system_daemons import System, until

    sy = System(tmp_path)
    try:
        urls = lend_snmp(sy)
        es_url = urls["es"]

        def inherited() -> bool:
            top = json.loads(sy.run("licadmin", "tree", "--server", es_url,
                                    "--json").stdout)
            return sum(f["inherited"] for f in top["totals"]) == 2

        until("both children inherit snmp", inherited)
        cli = json.loads(sy.run("licadmin", "tree", "--server", es_url, "--json").stdout)
        s = UiSite.__new__(UiSite)
        s.ui_url = start_ui_of(sy, tmp_path, [("ES", es_url), ("ASP", urls["asp"]),
                                              ("ASB", urls["asb"])])
        cookie = _cookie(s)
        page = _idle_page(s, cookie, "/servers")
        page = _idle_page(s, cookie, "/servers")  # read: now with the systems
        assert [r[6] for r in _cells(page, "servers")] == [
            "top of 3 server(s)", "under ES", "under ES"]
        shown = _cells(page, "system-0")
        named = {sy.ids["es"]: "ES", sy.ids["asp"]: "ASP", sy.ids["asb"]: "ASB"}
        assert [(r[0], r[2], r[3]) for r in shown] == [("ES", sy.ids["es"], "yes")] + [
            (f"{named[x['device_id']]} (level 2)", x["device_id"], "yes")
            for x in cli["servers"][1:]]
        assert {x["device_id"] for x in cli["servers"][1:]} == {sy.ids["asp"], sy.ids["asb"]}
        _st, _h, page = _ask(s, "GET", "/licenses", headers={"Cookie": cookie})
        got = _cells(page, "system-licenses-0")
        want = []
        for srv in cli["servers"]:
            for f in srv["features"]:
                want.append([f["feature"]] + [str(f[k]) for k in
                                              ("required", "licensed", "inherited",
                                               "available")])
        want += [[t["feature"]] + [str(t[k]) for k in ("required", "licensed", "inherited",
                                                       "available")] for t in cli["totals"]]
        assert [r[1:] for r in got] == want
        assert got[-1][0] == "system total" and got[-1][1:] == ["snmp", "0", "4", "2", "2"]
    finally:
        stop_processes(sy.procs, 30)


def test_a_bug_is_one_line_in_the_browser_and_a_traceback_in_the_log(ui: UiSite) -> None:
    """A flow.json that is a folder (no code path expects it) makes the page fail: the
    browser gets one line, the UI log the traceback."""
    cookie = _cookie(ui)
    (ui.root / "work/flow/flow.json").mkdir(parents=True)
    status, _h, page = _ask(ui, "GET", "/flow", headers={"Cookie": cookie})
    assert status == 500
    assert "licadmin: internal: internal error in licadmin ui; see its log" in page
    log = (ui.root / "ui.log").read_text()
    assert "internal error on GET /flow: IsADirectoryError" in log
    assert "Traceback (most recent call last):" in log and "read_bytes" in log


def test_every_form_of_the_new_screens_needs_the_csrf_field(ui: UiSite) -> None:
    """Rehost and Seat pools: without the page's CSRF field, or sent from another origin,
    each POST is refused and nothing is written."""
    cookie = _cookie(ui)
    csrf = _csrf(ui, cookie)
    src, dst = ui.urls["AS-P north"], ui.urls["AS-B roof"]
    forms = {"/rehost/start": [("from", src), ("to", dst), ("features", "")],
             "/rehost/run": [("id", "rehost-0123456789ab")],
             "/rehost/upload": [("id", "rehost-0123456789ab")],
             "/rehost/confirmed": [("id", "rehost-0123456789ab")],
             "/seats/return": [("server", "0")]}
    for path, fields in forms.items():
        for extra_fields, headers in (([], {}), ([("csrf", "0" * 64)], {}),
                                      ([("csrf", csrf)], {"Origin": "http://evil.example"})):
            body, h = _multipart(fields + extra_fields, [("token", "t.seat", b"\xa0")])
            status, _h, page = _ask(ui, "POST", path, body, {"Cookie": cookie, **h, **headers})
            assert status == 403, (path, headers, status)
            assert "licadmin: unauthenticated: " in page
    assert not (ui.root / "work/rehost").exists()
    # a GET changes nothing either
    for path in forms:
        assert _ask(ui, "GET", path, headers={"Cookie": cookie})[0] == 405, path

"""``licadmin ui`` staged attacks over real HTTP (issue 19, item 1): a real ``licadmin ui``
process on loopback, three real ``licagent run`` daemons behind it.

Without the token nothing is served; a page asked for under another host name (DNS
rebinding) is refused; a state-changing request without the page's CSRF field, or sent
from another origin, changes nothing; downloads reach only the flow's own files; a
non-loopback address is refused at start with one line and exit 2.
"""

from __future__ import annotations

import http.client
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from simulators.licensing_server.vendor import Vendor
from tests.simulators.test_licserver_http import BIN
from tests.support.uisite import UiSite


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
    deadline = time.monotonic() + 120
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


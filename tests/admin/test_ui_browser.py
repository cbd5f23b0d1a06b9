"""``licadmin ui`` in a real browser (issue 19): headless Chromium (Debian's ``chromium`` and
``chromium-driver``, through Selenium) against three ``licagent run`` daemons and a
``licserver serve``, every one a real process on loopback.

A complete reclaim of the three-server site through the guided flow, with a browser
refresh and a restart of ``licadmin ui`` in the middle (nothing lost: the step's files
are on disk); an activation with one server unreachable (the outcome tables say which,
with the command line's own line); a rehost chosen from the keyboard, a seat returned by
its token file, the system tree of an Enterprise Server and two children; keyboard,
label and CSRF-field checks on every screen. With ``SCREENSHOTS=DIR``
(``make screenshots``) each screen is saved as a PNG there.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from simulators.licensing_server.vendor import Vendor
from tests.support.uisite import NAMES, UiSite, browser

SHOTS = os.environ.get("SCREENSHOTS")
STEP_WAIT = 90.0  # an upper bound for a step over three loopback servers; never asserted


@pytest.fixture
def site(tmp_path: Path, vendor: Vendor) -> Iterator[UiSite]:
    s = UiSite(tmp_path, vendor)
    try:
        s.start()
        yield s
    finally:
        s.close()


@pytest.fixture
def driver(tmp_path: Path) -> Iterator[Any]:
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    d = browser(downloads)
    try:
        yield d
    finally:
        d.quit()


def by(kind: str) -> Any:
    from selenium.webdriver.common.by import By

    return getattr(By, kind)


def settled(d: Any) -> None:
    """Wait until no job runs (the page stops showing a progress bar)."""
    from selenium.webdriver.support.ui import WebDriverWait

    def idle(drv: Any) -> bool:
        try:
            return (drv.execute_script("return document.readyState") == "complete"
                    and not drv.find_elements(by("ID"), "progress"))
        except Exception:  # the page refreshed under us
            return False

    WebDriverWait(d, STEP_WAIT, poll_frequency=0.2).until(idle)


def rows(d: Any, table_id: str) -> list[list[str]]:
    t = d.find_element(by("ID"), table_id)
    return [[c.text for c in r.find_elements(by("TAG_NAME"), "td")]
            for r in t.find_elements(by("CSS_SELECTOR"), "tbody tr")]


def shot(d: Any, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        height = d.execute_script("return document.body.scrollHeight")
        frame = d.execute_script("return window.outerHeight - window.innerHeight")
        d.set_window_size(1366, max(700, min(int(height) + int(frame) + 20, 2600)))
        d.save_screenshot(str(Path(SHOTS) / f"ui-{name}.png"))
        d.set_window_size(1366, 900)


def submit(d: Any, element: Any, *keys: str) -> None:
    """Click ``element`` (or type ``keys`` into it); wait for the next page and its job."""
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    old = d.find_element(by("TAG_NAME"), "html")
    if keys:
        element.send_keys(*keys)
    else:
        element.click()
    WebDriverWait(d, STEP_WAIT).until(expected_conditions.staleness_of(old))
    settled(d)


def run(d: Any, step: str) -> None:
    submit(d, d.find_element(by("ID"), f"run-{step}"))
    assert not d.find_elements(by("ID"), "error"), d.find_element(by("ID"), "error").text


def no_error(d: Any) -> None:
    errors = d.find_elements(by("CSS_SELECTOR"), "[role=alert]")
    assert not errors, [e.text for e in errors]


def test_complete_reclaim_of_a_three_server_site(site: UiSite, driver: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    s, d = site, driver
    s.assign(1)
    s.tool("licadmin", "activate", "--servers", "servers.toml", "--licensing-server",
           s.licensing, "--yes", "--timeout", "5")
    assert all(s.holdings(n) == {"bacnet": 1} for n in NAMES)
    s.start_ui()
    d.get(s.ui_url)
    # the token leaves the address bar at once (a cookie carries it from here)
    assert d.current_url.endswith("/servers") and "token" not in d.current_url
    settled(d)
    d.refresh()
    got = rows(d, "servers")
    assert [r[0] for r in got] == list(NAMES)
    assert [r[2] for r in got] == [s.devices[n] for n in NAMES]
    assert [r[1] for r in got] == ["AS-P", "AS-P", "AS-B"]
    assert all(r[4] == "yes" and r[5] == "1" for r in got), got
    shot(d, "servers")

    d.find_element(by("LINK_TEXT"), "Show Licenses").click()
    settled(d)
    per_server = rows(d, "licenses")
    assert [(r[0], r[1], r[2], r[5]) for r in per_server] == [
        (n, "bacnet", "1", "licensed") for n in NAMES]
    assert rows(d, "site") == [["bacnet", "3", "3", "0"]]
    shot(d, "licenses")

    # Reclaim, typed from the keyboard: the features field, then Enter submits the form
    d.find_element(by("LINK_TEXT"), "Reclaim").click()
    assert d.find_element(by("ID"), "mode-reclaim").is_selected()
    shot(d, "flow-start")
    submit(d, d.find_element(by("ID"), "features"), "bacnet", Keys.ENTER)
    no_error(d)
    assert [r[2] for r in rows(d, "outcome-gather")] == ["gathered"] * 3
    run(d, "license-info")
    run(d, "requests")
    assert [r[2] for r in rows(d, "outcome-requests")] == ["reclaim"] * 3
    # a refresh, then licadmin ui stopped and started again: the flow is where it was
    d.refresh()
    settled(d)
    assert s.stop_ui() == 0
    d.get(s.start_ui())
    settled(d)
    d.find_element(by("LINK_TEXT"), "Reclaim").click()
    d.get(d.current_url.split("?")[0])  # the current flow, not a new one
    assert "reclaim" in d.find_element(by("ID"), "flow-mode").text
    links = d.find_elements(by("CSS_SELECTOR"), "#step-requests .files a")
    assert sorted(a.text for a in links) == sorted(f"{dev}.req" for dev in s.devices.values())
    assert d.find_element(by("ID"), "run-upload").get_attribute("class") == "primary"
    run(d, "upload")
    assert [r[2] for r in rows(d, "outcome-upload")] == ["answered"] * 3
    run(d, "send")
    sent = rows(d, "outcome-send")
    assert [r[0] for r in sent] == list(NAMES)
    assert [r[2] for r in sent] == ["applied"] * 3
    assert all("remove bacnet" in r[3] for r in sent), sent
    run(d, "confirm")
    assert [r[2] for r in rows(d, "outcome-confirm")] == ["confirmed"] * 3
    shot(d, "flow-reclaim-done")
    # the servers hold nothing, the ledger has the three licenses back
    assert all(s.holdings(n) == {} for n in NAMES)
    report = s.report()
    assert not report["installed"] and not report["pending_reclaims"]
    feature = report["entitlements"][0]["products"][0]["features"][0]
    assert feature["feature"] == "bacnet" and feature["count"] == 3

    # each server's journal, read over its link
    d.find_element(by("LINK_TEXT"), "Journal").click()
    d.find_element(by("LINK_TEXT"), NAMES[1]).click()
    events = [r[2] for r in rows(d, "journal")]
    assert events.count("apply") == 2, events  # the activation and the reclaim
    shot(d, "journal")


def test_activation_with_one_server_unreachable(site: UiSite, driver: Any) -> None:
    s, d = site, driver
    s.assign(1)
    s.kill_daemon(NAMES[2])
    # what the command line says about the dead server, for the same step
    cli = s.tool("licadmin", "gather", "--servers", "servers.toml", "--out", "cli.cbor",
                 "--timeout", "5", code=10).stdout
    cli_row = next(line for line in cli.splitlines() if line.startswith(NAMES[2]))
    s.start_ui()
    d.get(s.ui_url)
    settled(d)
    d.refresh()
    reach = {r[0]: r[4] for r in rows(d, "servers")}
    assert reach[NAMES[0]] == reach[NAMES[1]] == "yes"
    assert reach[NAMES[2]].startswith("no: transport: "), reach

    d.find_element(by("LINK_TEXT"), "Activate").click()
    submit(d, d.find_element(by("ID"), "start-button"))
    gathered = {r[0]: r for r in rows(d, "outcome-gather")}
    assert [gathered[n][2] for n in NAMES] == ["gathered", "gathered", "FAILED"]
    detail = gathered[NAMES[2]][3]
    assert detail.startswith("transport: ") and detail in cli_row, (detail, cli_row)
    assert "gather: FAILED 1" in d.find_element(by("ID"), "step-gather").text
    for step in ("license-info", "requests", "upload", "send", "confirm"):
        run(d, step)
    sent = rows(d, "outcome-send")
    assert [(r[0], r[2]) for r in sent] == [(NAMES[0], "applied"), (NAMES[1], "applied")]
    shot(d, "flow-activate-partial")
    # the step list marks gather as not fully done
    marks = [li.get_attribute("class")
             for li in d.find_elements(by("CSS_SELECTOR"), "ol.steps li")]
    assert marks == ["failed", "done", "done", "done", "done", "done"], marks
    # and says so to a screen reader, not only with a colour and a sign
    said = [li.get_attribute("textContent")
            for li in d.find_elements(by("CSS_SELECTOR"), "ol.steps li")]
    assert said[0] == "1. Gather server information (not all done)"
    assert said[5] == "6. Confirm (done)"
    assert s.holdings(NAMES[0]) == s.holdings(NAMES[1]) == {"bacnet": 1}
    assert set(s.report()["installed"]) == {s.devices[NAMES[0]], s.devices[NAMES[1]]}
    # the dead server's journal: the command line's line for the same failure
    d.find_element(by("LINK_TEXT"), "Journal").click()
    d.find_element(by("LINK_TEXT"), NAMES[2]).click()
    shown = d.find_element(by("ID"), "journal-error").text
    cli = s.tool("licadmin", "status", "--server", s.urls[NAMES[2]], "--timeout", "5",
                 code=1).stderr.strip()
    assert shown.startswith("licadmin: transport: ") and shown == cli, (shown, cli)


def test_keyboard_and_labels(site: UiSite, driver: Any) -> None:
    from selenium.webdriver.common.keys import Keys

    s, d = site, driver
    s.start_ui()
    d.get(s.ui_url)
    settled(d)
    base = s.ui_url.split("/?")[0]
    for path in ("/servers", "/licenses", "/flow", "/flow?mode=reclaim", "/journal",
                 "/journal?server=1", "/rehost", "/seats", "/seats?server=0"):
        d.get(base + path)
        settled(d)
        # the first Tab reaches the skip link, and Enter on it moves to the content
        d.find_element(by("TAG_NAME"), "body").send_keys(Keys.TAB)
        active = d.switch_to.active_element
        assert active.text == "Skip to the content", (path, active.text)
        active.send_keys(Keys.ENTER)
        assert d.switch_to.active_element.get_attribute("id") == "main"
        assert len(d.find_elements(by("TAG_NAME"), "h1")) == 1
        # every visible control has a label that names it
        for el in d.find_elements(by("CSS_SELECTOR"), "input:not([type=hidden]), select"):
            ident = el.get_attribute("id")
            assert ident and d.find_elements(by("CSS_SELECTOR"), f"label[for='{ident}']"), path
        for b in d.find_elements(by("TAG_NAME"), "button"):
            assert b.text.strip(), path
        # every form that changes something carries the page's CSRF field
        for f in d.find_elements(by("CSS_SELECTOR"), "form"):
            assert f.get_attribute("method") == "post", path
            assert f.find_elements(by("CSS_SELECTOR"), "input[type=hidden][name=csrf]"), path
        # nothing from elsewhere: every asset is this server's own
        for el in d.find_elements(by("CSS_SELECTOR"), "[src], link[href], script"):
            src = el.get_attribute("src") or el.get_attribute("href") or ""
            assert src.startswith(s.ui_url.split("/?")[0]), src
    # the start form, driven by Tab and Space only
    d.get(base + "/flow?new=1")
    d.find_element(by("ID"), "mode-activate").send_keys(Keys.TAB)
    box = d.switch_to.active_element
    assert box.get_attribute("id") == "srv-0" and box.is_selected()
    box.send_keys(Keys.SPACE)
    assert not d.find_element(by("ID"), "srv-0").is_selected()


def _downloaded(folder: Path, name: str) -> bytes:
    """A file the browser downloaded into ``folder`` (waits for it to be complete)."""
    import time

    deadline = time.monotonic() + STEP_WAIT
    path = folder / name
    while not path.is_file() or list(folder.glob("*.crdownload")):
        assert time.monotonic() < deadline, f"{name} was not downloaded"
        time.sleep(0.1)
    return path.read_bytes()


def test_offline_hops_as_file_downloads_and_uploads(site: UiSite, driver: Any,
                                                   tmp_path: Path) -> None:
    """licadmin ui without a licensing server: every online step is a file carried to the
    command line on a computer that is online, and back; the same files as the CLI's."""
    s, d = site, driver
    s.assign(1)
    s.start_ui(online=False)
    downloads = tmp_path / "downloads"
    d.get(s.ui_url)
    settled(d)
    d.find_element(by("LINK_TEXT"), "Activate").click()
    submit(d, d.find_element(by("ID"), "start-button"))
    assert not d.find_elements(by("ID"), "run-license-info")
    assert "No licensing server given" in d.find_element(by("ID"), "step-license-info").text
    # step 1's SITE_INFO, downloaded, is the file on disk; the office's licadmin answers it
    d.find_element(by("LINK_TEXT"), "SITE_INFO (site-info.cbor)").click()
    site_info = _downloaded(downloads, "site-info.cbor")
    assert site_info == (s.root / "work/flow/site-info.cbor").read_bytes()
    (s.root / "office").mkdir()
    (s.root / "office/site-info.cbor").write_bytes(site_info)
    s.tool("licadmin", "license-info", "--site-info", "office/site-info.cbor", "--out",
           "office/license-info.cbor", "--licensing-server", s.licensing)
    # a wrong file is refused with the command line's line, and nothing is taken
    d.find_element(by("ID"), "file-license-info").send_keys(str(s.root / "vendor.pub"))
    submit(d, d.find_element(by("ID"), "upload-license-info"))
    cli = s.tool("licadmin", "requests", "--servers", "servers.toml", "--license-info",
                 "vendor.pub", "--out-dir", "cli-requests", code=3).stderr.strip()
    assert d.find_element(by("ID"), "error").text == cli
    assert cli == ("licadmin: malformed: vendor.pub is a PEM public key, expected a "
                   "license-info file")
    assert not (s.root / "work/flow/license-info.cbor").exists()
    d.find_element(by("ID"), "file-license-info").send_keys(
        str(s.root / "office/license-info.cbor"))
    submit(d, d.find_element(by("ID"), "upload-license-info"))
    no_error(d)
    run(d, "requests")
    (s.root / "office/requests").mkdir()
    for dev in s.devices.values():
        d.find_element(by("LINK_TEXT"), f"{dev}.req").click()
        (s.root / f"office/requests/{dev}.req").write_bytes(_downloaded(downloads,
                                                                        f"{dev}.req"))
    s.tool("licadmin", "upload", "--requests", "office/requests", "--out-dir",
           "office/responses", "--licensing-server", s.licensing)
    # a request file offered as a response: refused, with the name the browser gave
    d.find_element(by("ID"), "file-responses").send_keys(
        str(s.root / f"office/requests/{s.devices[NAMES[0]]}.req"))
    submit(d, d.find_element(by("ID"), "upload-responses"))
    assert d.find_element(by("ID"), "error").text == (
        f"licadmin: malformed: {s.devices[NAMES[0]]}.req is a request file, expected a "
        f"response file")
    assert not (s.root / "work/flow/responses").exists()
    responses = sorted((s.root / "office/responses").iterdir())
    d.find_element(by("ID"), "file-responses").send_keys("\n".join(str(p) for p in responses))
    submit(d, d.find_element(by("ID"), "upload-responses"))
    no_error(d)
    run(d, "send")
    assert [r[2] for r in rows(d, "outcome-send")] == ["applied"] * 3
    (s.root / "office/receipts").mkdir()
    for dev in s.devices.values():
        d.find_element(by("LINK_TEXT"), f"{dev}.receipt").click()
        (s.root / f"office/receipts/{dev}.receipt").write_bytes(
            _downloaded(downloads, f"{dev}.receipt"))
    out = s.tool("licadmin", "confirm", "--receipts", "office/receipts",
                 "--licensing-server", s.licensing).stdout
    assert "3 confirmed" in out, out
    assert all(s.holdings(n) == {"bacnet": 1} for n in NAMES)
    assert set(s.report()["installed"]) == set(s.devices.values())


def _progress(d: Any) -> tuple[str, str, str] | None:
    try:
        bar = d.find_element(by("ID"), "progress")
        return (bar.get_attribute("value"), bar.get_attribute("max"),
                d.find_element(by("ID"), "progress-text").text)
    except Exception:  # between two pages
        return None


def test_refresh_and_stop_in_the_middle_of_a_step(site: UiSite, driver: Any) -> None:
    """A server that stops answering (SIGSTOP) holds a step: the progress bar says how far it
    is, a refresh loses nothing, and Stop starts no further server, like Ctrl-C."""
    import signal

    from selenium.webdriver.support.ui import WebDriverWait

    s, d = site, driver
    s.assign(1)
    s.start_ui("--timeout", "60", "--jobs", "1")
    d.get(s.ui_url)
    settled(d)
    held = s.daemons[NAMES[1]]
    held.send_signal(signal.SIGSTOP)
    try:
        d.find_element(by("LINK_TEXT"), "Activate").click()
        d.find_element(by("ID"), "start-button").click()
        want = ("1", "3", "1 of 3 server(s) done")
        WebDriverWait(d, STEP_WAIT, 0.2).until(lambda drv: _progress(drv) == want)
        shot(d, "flow-progress")
        d.refresh()
        assert _progress(d) == want
        submit_stop = d.find_element(by("CSS_SELECTOR"), ".job button")
        assert submit_stop.text == "Stop after the servers in flight"
        submit_stop.click()

        def noted(drv: Any) -> bool:
            # the click does not wait for the next page, which refreshes itself each second
            # while the step runs: look for the line until a page shows it
            try:
                return any("stopping: no new server is started" in n.text
                           for n in drv.find_elements(by("ID"), "note"))
            except Exception:  # the page refreshed under us
                return False

        WebDriverWait(d, STEP_WAIT, 0.1).until(noted)
    finally:
        held.send_signal(signal.SIGCONT)
    settled(d)
    got = {r[0]: r[2] for r in rows(d, "outcome-gather")}
    assert got == {NAMES[0]: "gathered", NAMES[1]: "gathered", NAMES[2]: "interrupted"}
    # running the step again finishes it
    run(d, "gather")
    assert [r[2] for r in rows(d, "outcome-gather")] == ["gathered"] * 3


def test_activate_reclaims_only_what_the_technician_allowed(site: UiSite, driver: Any) -> None:
    """The license information of an activation lists a reclaim: the requests step refuses
    until "allow these reclaims" is ticked (the browser's --yes), then reclaims that one."""
    from selenium.webdriver.common.keys import Keys

    s, d = site, driver
    s.assign(1)
    s.tool("licadmin", "activate", "--servers", "servers.toml", "--licensing-server",
           s.licensing, "--yes", "--timeout", "5")
    north = s.devices[NAMES[0]]
    s.tool("licadmin", "assign", "--licensing-server", s.licensing, "--entitlement", "E-UI",
           "--device", north, "--feature", "bacnet=0")
    s.start_ui()
    d.get(s.ui_url)
    settled(d)
    d.find_element(by("LINK_TEXT"), "Activate").click()
    submit(d, d.find_element(by("ID"), "start-button"))
    run(d, "license-info")
    assert (f"device {north[:12]}…: reclaim bacnet=1; install nothing"
            in d.find_element(by("ID"), "step-license-info").text)
    submit(d, d.find_element(by("ID"), "run-requests"))
    assert d.find_element(by("ID"), "error").text == (
        "licadmin: usage: activate would reclaim installed licenses from 1 server(s) (listed "
        "above) that you did not ask to reclaim: nothing was changed; tick \"allow these "
        "reclaims\" to allow it")
    assert not (s.root / "work/flow/requests").exists()
    d.find_element(by("ID"), "allow-reclaim").send_keys(Keys.SPACE)
    run(d, "requests")
    assert [r[2] for r in rows(d, "outcome-requests")] == ["reclaim", "skipped", "skipped"]
    for step in ("upload", "send", "confirm"):
        run(d, step)
    assert s.holdings(NAMES[0]) == {}
    assert s.holdings(NAMES[1]) == s.holdings(NAMES[2]) == {"bacnet": 1}
    assert north not in s.report()["installed"]


def test_rehost_from_the_keyboard(site: UiSite, driver: Any) -> None:
    """The Rehost screen: old and new server chosen with the arrow keys, started with
    Enter; the licenses move and every step's file is listed for download."""
    from selenium.webdriver.common.keys import Keys

    s, d = site, driver
    north = s.devices[NAMES[0]]
    s.tool("licadmin", "assign", "--licensing-server", s.licensing, "--entitlement", "E-UI",
           "--device", north, "--feature", "bacnet=2")
    s.tool("licadmin", "activate", "--servers", "servers.toml", "--licensing-server",
           s.licensing, "--yes", "--timeout", "5")
    s.start_ui()
    d.get(s.ui_url)
    settled(d)
    d.find_element(by("LINK_TEXT"), "Rehost").click()
    shot(d, "rehost-start")
    old = d.find_element(by("ID"), "from")
    assert old.get_attribute("value") == s.urls[NAMES[0]]
    to = d.find_element(by("ID"), "to")
    to.send_keys(Keys.ARROW_DOWN)  # from AS-P south to AS-B roof
    assert to.get_attribute("value") == s.urls[NAMES[2]]
    submit(d, d.find_element(by("ID"), "rehost-features"), "bacnet", Keys.ENTER)
    no_error(d)
    assert "Done: the licenses are on the new server" in d.find_element(
        by("ID"), "rehost-done").text
    steps = rows(d, "rehost-steps")
    assert [r[1] for r in steps] == ["out.req", "out.resp", "out.receipt", "out.confirmed",
                                     "in.req", "in.resp", "in.receipt", "in.confirmed"]
    assert [r[3] for r in steps] == ["done"] * 8
    assert len(d.find_elements(by("CSS_SELECTOR"), "#rehost-steps a[download]")) == 8
    lines = d.find_element(by("ID"), "rehost-lines").text
    assert f"moved bacnet=2 from {north[:12]}…" in lines, lines
    shot(d, "rehost-done")
    assert s.holdings(NAMES[0]) == {} and s.holdings(NAMES[2]) == {"bacnet": 2}


def test_seat_pools_and_a_seat_returned(site: UiSite, driver: Any, tmp_path: Path) -> None:
    s, d = site, driver
    url = s.urls[NAMES[0]]
    s.tool("licadmin", "request", "--server", url, "activate", "--feature", "editor", "--out",
           "fl.req")
    s.licserver.run("issue", "--key", str(s.licserver.key), "--request", str(s.root / "fl.req"),
                    "--grant", "editor=3", "--floating", "--out", str(s.root / "fl.resp"))
    s.tool("licadmin", "apply", "--server", url, "fl.resp")
    for ws in ("ws-1", "ws-2"):
        s.tool("licadmin", "seat", "checkout", "--server", url, "editor", "--client", ws,
               "--out", f"{ws}.seat")
    s.start_ui()
    d.get(s.ui_url)
    settled(d)
    d.find_element(by("LINK_TEXT"), "Seat pools").click()
    d.find_element(by("LINK_TEXT"), NAMES[0]).click()
    assert rows(d, "pools") == [["editor", "3", "2", "1"]]
    # both checked out at the same (test) time: the screen orders them by client then
    assert [r[1] for r in rows(d, "seats")] == ["ws-1", "ws-2"]
    shot(d, "seats")
    d.find_element(by("ID"), "file-token").send_keys(str(s.root / "ws-2.seat"))
    submit(d, d.find_element(by("ID"), "return-seat"))
    assert d.find_element(by("ID"), "note").text == "returned seat of editor for ws-2"
    assert rows(d, "pools") == [["editor", "3", "1", "2"]]


def test_the_system_tree_in_the_browser(tmp_path: Path, driver: Any) -> None:
    """A top Enterprise Server and two children inheriting from it (real daemons): the
    Servers screen shows the system, Show Licenses its required / licensed / available."""
    import json

    from tests.conftest import stop_processes
    from tests.support.uisite import lend_snmp, start_ui_of
    from tests.tree.test_system_daemons import System, until

    sy = System(tmp_path)
    try:
        urls = lend_snmp(sy)
        es_url = urls["es"]
        sy.run("licagent", "use", *sy.store("asp"), "snmp=1")

        def system() -> dict[str, Any]:
            out = sy.run("licadmin", "tree", "--server", es_url, "--json").stdout
            return dict(json.loads(out))

        until("both children inherit snmp, asp requires it",
              lambda: system()["totals"][0]["inherited"] == 2
              and system()["totals"][0]["required"] == 1)
        url = start_ui_of(sy, tmp_path, [("Enterprise Server", es_url),
                                         ("AS-P hall", urls["asp"]),
                                         ("AS-B hall", urls["asb"])], 'site = "Campus 14"\n\n')
        d = driver
        d.get(url)
        settled(d)
        d.refresh()
        assert [r[6] for r in rows(d, "servers")] == [
            "top of 3 server(s)", "under Enterprise Server", "under Enterprise Server"]
        assert [r[3] for r in rows(d, "system-0")] == ["yes"] * 3
        shot(d, "servers-system")
        d.find_element(by("LINK_TEXT"), "Show Licenses").click()
        settled(d)
        got = rows(d, "system-licenses-0")
        cli = system()
        assert got[-1] == ["system total", "snmp"] + [
            str(cli["totals"][0][k]) for k in ("required", "licensed", "inherited",
                                               "available")]
        assert got[-1][2] == "1"  # what licagent use recorded on the AS-P
        # each server's rows are licadmin tree's too
        assert [r[1:] for r in got[:-1]] == [
            [f["feature"]] + [str(f[k]) for k in ("required", "licensed", "inherited",
                                                  "available")]
            for srv in cli["servers"] for f in srv["features"]]
        shot(d, "licenses-system")
    finally:
        stop_processes(sy.procs, 30)

"""A real site for ``licadmin ui`` tests: three ``licagent run`` daemons, ``licserver serve``,
``licadmin ui`` itself, all subprocesses on loopback, and headless Chromium from Debian's
``chromium`` / ``chromium-driver`` packages driven by Selenium (never a downloaded driver).
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, stop_processes
from tests.simulators.test_licserver_http import BIN, WAIT, Licserver

CHROMIUM = Path(os.environ.get("LICADMIN_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LICADMIN_CHROMEDRIVER", "/usr/bin/chromedriver"))
E, P = "E-UI", "BACnet-bundle"
NAMES = ("AS-P north", "AS-P south", "AS-B roof")


#: the multipart boundary Chromium-like forms of the tests use
BOUNDARY = "----licadminFormBoundary7MA4YWxkTrZu0gW"


def multipart_body(fields: list[tuple[str, str]], files: list[tuple[str, str, bytes]]
                   ) -> bytes:
    """What Chromium sends for a form with these fields and files (boundary BOUNDARY)."""
    out = b""
    for name, value in fields:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                f"{value}\r\n").encode()
    for name, filename, data in files:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; "
                f"filename=\"{filename}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                ).encode() + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def need_browser() -> None:
    """The browser tests need Debian's chromium and chromium-driver (``make chromium``)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail("selenium is missing: make venv installs it (pyproject test extra)")
    if not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()):
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing: run make chromium "
                    f"(apt-get install chromium chromium-driver)")


def _first_line(proc: subprocess.Popen[bytes], what: str, lines: int = 1) -> list[str]:
    assert proc.stdout is not None
    buf, deadline = b"", time.monotonic() + WAIT
    while buf.count(b"\n") < lines:
        left = deadline - time.monotonic()
        assert left > 0, f"{what} printed nothing"
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, f"{what} exited with {proc.wait(WAIT)}"
            buf += chunk
    return buf.decode().splitlines()


class UiSite:
    """The site, its licensing server and ``licadmin ui``, in ``root``."""

    def __init__(self, root: Path, vendor: Vendor) -> None:
        self.root = root
        self.vendor = vendor
        self.env = dict(os.environ, LICAGENT_TIME=str(T0), LICSERVER_TIME=str(T0),
                        LICADMIN_TIME=str(T0))
        self.procs: list[subprocess.Popen[bytes]] = []
        self.daemons: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        self.devices: dict[str, str] = {}
        self.licserver = Licserver(root, vendor)
        self.licensing = ""
        self.ui_proc: subprocess.Popen[bytes] | None = None
        self.ui_url = ""
        self.held: list[socket.socket] = []
        (root / "vendor.pub").write_bytes(vendor.public.to_pem())

    def tool(self, tool: str, *args: str, code: int | None = 0,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command line tool; its exit code must be ``code`` (None: any)."""
        p = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=env or self.env,
                           capture_output=True, text=True, timeout=120, check=False)
        assert code is None or p.returncode == code, (tool, args, p.returncode, p.stdout,
                                                      p.stderr)
        assert "Traceback" not in p.stderr
        return p

    def start(self, licensing: bool = True) -> None:
        """Three stores and their daemons; the licensing server with bacnet=3 entitled."""
        for k, name in enumerate(NAMES, 1):
            facts = self.root / f"facts-{k}.json"
            facts.write_text(json.dumps({"model": name.split()[0], "serial": f"SN-UI-{k}",
                                         "macs": [f"00:80:f4:19:00:0{k}"]}))
            env = dict(self.env, LICAGENT_FACTS=str(facts))
            state = f"store-{k}"
            self.tool("licagent", "init", "--state", state, "--model", name.split()[0],
                      "--trust", "vendor.pub", env=env)
            self.devices[name] = json.loads(self.tool("licagent", "status", "--state", state,
                                                      "--json", env=env).stdout)["device_id"]
            proc = subprocess.Popen([str(BIN / "licagent"), "run", "--state", state,
                                     "--listen", "tcp://127.0.0.1:0"], cwd=self.root, env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            self.procs.append(proc)
            self.daemons[name] = proc
            line = _first_line(proc, "licagent run")[0]
            assert line.startswith("listening tcp://127.0.0.1:"), line
            self.urls[name] = line.split(" ", 1)[1]
        self.write_servers()
        if licensing:
            self.licserver.run("entitle", "--db", self.licserver.db, "--entitlement", E,
                               "--product", P, "--feature", "bacnet=3", "--until", "2027-12-31")
            _proc, self.licensing = self.licserver.start()
            self.env["LICADMIN_TOKEN"] = self.licserver.token

    def write_servers(self) -> None:
        lines = ['site = "Plant 19"']
        for name in NAMES:
            lines += ["", "[[server]]", f'url = "{self.urls[name]}"', f'name = "{name}"']
        (self.root / "servers.toml").write_text("\n".join(lines) + "\n")

    def assign(self, count: int) -> None:
        devs = [a for d in self.devices.values() for a in ("--device", d)]
        self.tool("licadmin", "assign", "--licensing-server", self.licensing, "--entitlement",
                  E, *devs, "--feature", f"bacnet={count}")

    def kill_daemon(self, name: str) -> None:
        """The server goes away for good (SIGKILL): its port refuses connections."""
        proc = self.daemons[name]
        proc.send_signal(signal.SIGKILL)
        proc.wait(WAIT)
        # keep its port bound (never listening) so that no other process on this machine
        # takes it: connections to it are refused for the rest of the test
        port = int(self.urls[name].rsplit(":", 1)[1])
        hold = socket.socket()
        hold.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        hold.bind(("127.0.0.1", port))
        self.held.append(hold)

    def holdings(self, name: str) -> dict[str, int]:
        out = self.tool("licadmin", "status", "--server", self.urls[name], "--json").stdout
        return {x["feature"]: x["count"] for x in json.loads(out)["licenses"]}

    def report(self) -> dict[str, Any]:
        return dict(json.loads(self.licserver.run("report", "--db", self.licserver.db,
                                                  "--json")))

    def start_ui(self, *extra: str, online: bool = True) -> str:
        """``licadmin ui`` on a free loopback port; the start URL it prints (with the token)."""
        args = [str(BIN / "licadmin"), "ui", "--servers", "servers.toml", "--listen",
                "127.0.0.1:0", "--work-dir", "work", "--timeout", "5", *extra]
        if self.licensing and online:
            args += ["--licensing-server", self.licensing]
        proc = subprocess.Popen(args, cwd=self.root, env=self.env, stdout=subprocess.PIPE,
                                stderr=open(self.root / "ui.log", "ab"))
        self.procs.append(proc)
        self.ui_proc = proc
        lines = _first_line(proc, "licadmin ui", 2)
        assert lines[0].startswith("licadmin ui: serving 3 server(s) at http://127.0.0.1:"), lines
        url = lines[1].strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/\?token=[A-Za-z0-9_-]{40,}", url), url
        self.ui_url = url
        return url

    def stop_ui(self) -> int:
        """SIGTERM: ``licadmin ui`` stops and exits 0."""
        assert self.ui_proc is not None
        self.ui_proc.send_signal(signal.SIGTERM)
        code = self.ui_proc.wait(WAIT)
        self.ui_proc = None
        return code

    def close(self) -> None:
        for hold in self.held:
            hold.close()
        stop_processes(self.procs, WAIT)
        self.licserver.close()


def browser(download_dir: Path) -> Any:
    """Headless Chromium through Debian's chromedriver (Selenium never fetches a driver)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    need_browser()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--window-size=1366,900", "--no-first-run", "--disable-extensions",
              "--disable-background-networking", "--disable-component-update",
              "--disable-sync", "--metrics-recording-only", "--no-default-browser-check"):
        opts.add_argument(a)
    opts.add_experimental_option("prefs", {"download.default_directory": str(download_dir),
                                           "download.prompt_for_download": False})
    service = Service(executable_path=str(CHROMEDRIVER), log_output=subprocess.DEVNULL)
    driver = webdriver.Chrome(options=opts, service=service)
    driver.set_page_load_timeout(60)
    return driver


def clean_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def lend_snmp(sy: Any) -> dict[str, str]:
    """In ``sy`` (a :class:`tests.tree.test_system_daemons.System`): a top Enterprise Server
    ``es`` holding snmp=2 and an AS-P ``asp`` and an AS-B ``asb`` under it, each a real
    ``licagent run`` on loopback (the children renew every second); their URLs by name."""
    sy.init("es", "Enterprise-Server")
    sy.init("asp", "AS-P")
    sy.init("asb", "AS-B")
    sy.activate("es", "snmp=2")
    urls = {"es": sy.daemon("es", "--listen", "tcp://127.0.0.1:0")[1]}
    for name in ("asp", "asb"):
        urls[name] = sy.daemon(name, "--listen", "tcp://127.0.0.1:0", "--parent", urls["es"],
                               "--renew-every", "1")[1]
    return urls


def start_ui_of(sy: Any, root: Path, servers: list[tuple[str, str]], head: str = "") -> str:
    """``licadmin ui`` (a subprocess of ``sy``, stopped with it) on ``servers`` (name, URL),
    ``head`` first in its servers.toml; the URL it printed."""
    (root / "servers.toml").write_text(head + "".join(
        f'[[server]]\nurl = "{u}"\nname = "{n}"\n\n' for n, u in servers))
    proc = subprocess.Popen(
        [str(BIN / "licadmin"), "ui", "--servers", "servers.toml", "--listen", "127.0.0.1:0",
         "--work-dir", "work"], cwd=root, env=sy.env, stdout=subprocess.PIPE,
        stderr=open(root / "ui.log", "ab"))
    sy.procs.append(proc)
    return _first_line(proc, "licadmin ui", 2)[1].strip()

"""A user's bad day with ``licadmin`` (issue 13, items 10, 11, 12, 17, 18), all real.

The site is ``licsim``: 300 simulated servers (each a real license store)
served over real tcp:// sockets by a separate process, trusting a vendor key
this test also gives an in-process licensing server. A slow link is a real
TCP relay on loopback that holds every chunk for a while (:class:`SlowLinks`),
so that a real ``licadmin`` process is still in the middle of the site when a
real SIGINT or SIGTERM reaches it.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.cose import SigningKey
from agent.formats import SiteInfo, read_device_info
from agent.messages import Response
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.server import LicensingServer, serve
from simulators.licensing_server.vendor import Vendor

BIN = Path(sys.executable).parent
T_RESP = 1_800_000_000  # any time: the server never answers
WAIT = 180.0  # an upper bound for a step; never asserted as a time
PARTIAL, INTERRUPTED, USAGE = 10, 130, 2


class SlowLinks:
    """One loopback relay per server that holds each chunk ``delay`` seconds (settable)."""

    def __init__(self, targets: list[tuple[str, int]], delay: float) -> None:
        self.delay = delay
        self.accepted = 0  # connections relayed so far
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self.ports: list[int] = []
        self._threads: list[threading.Thread] = []
        for target in targets:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            s.listen(16)
            s.settimeout(0.2)
            self._socks.append(s)
            self.ports.append(s.getsockname()[1])
            t = threading.Thread(target=self._accept, args=(s, target), daemon=True)
            t.start()
            self._threads.append(t)

    def _accept(self, lsock: socket.socket, target: tuple[str, int]) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = lsock.accept()
            except (TimeoutError, OSError):
                continue
            self.accepted += 1
            try:
                up = socket.create_connection(target, timeout=5)
            except OSError:
                conn.close()
                continue
            for a, b in ((conn, up), (up, conn)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if self.delay:
                    time.sleep(self.delay)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def wait_accepted(self, n: int) -> None:
        """Until ``n`` connections came through (licadmin is in the middle of the site)."""
        deadline = time.monotonic() + WAIT
        while self.accepted < n:
            assert time.monotonic() < deadline, self.accepted
            time.sleep(0.02)

    def close(self) -> None:
        self._stop.set()
        for s in self._socks:
            s.close()
        for t in self._threads:
            t.join(timeout=2)


@dataclass
class Fleet:
    """licsim's servers, a licensing server, and the files licadmin reads."""

    root: Path
    proc: subprocess.Popen[bytes]
    urls: list[str]
    names: list[str]
    vendor: Vendor
    ledger: Ledger
    licserver: LicensingServer
    slow: SlowLinks | None = None
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))

    @property
    def licensing(self) -> str:
        return self.licserver.url

    def servers_file(self, name: str, urls: list[str]) -> str:
        lines = ['site = "bad-day"']
        for url, n in zip(urls, self.names, strict=True):
            lines += ["[[server]]", f'url = "{url}"', f'name = "{n}"']
        (self.root / name).write_text("\n".join(lines) + "\n")
        return name

    def slowed(self, delay: float) -> str:
        """A servers file reaching every server through a slow relay."""
        self.slow = SlowLinks([_host_port(u) for u in self.urls], delay)
        return self.servers_file("slow.toml", [f"tcp://127.0.0.1:{p}" for p in self.slow.ports])

    def run(self, *args: str, code: int | None = 0, stdin: int | None = None
            ) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / "licadmin"), *args], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=WAIT, check=False,
                           stdin=subprocess.DEVNULL if stdin is None else stdin)
        if code is not None:
            assert p.returncode == code, (p.returncode, p.stdout[-3000:], p.stderr[-3000:])
        return p

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([str(BIN / "licadmin"), *args], cwd=self.root, env=self.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, bufsize=1)

    def holdings(self) -> dict[str, dict[str, int]]:
        """What every server holds now, by name (a fast gather over the direct links)."""
        self.run("gather", "--servers", "servers.toml", "--out", "now.cbor", "--jobs", "16")
        bundle = SiteInfo.decode((self.root / "now.cbor").read_bytes())
        by_id = {}
        for d in bundle.devices:
            info = read_device_info(d)
            by_id[info.device_id] = {x.feature: x.count for x in info.licenses}
        out = {}
        for line in (self.root / "ids.txt").read_text().splitlines():
            name, dev = line.split(" = ")
            out[name] = by_id[dev]
        return out

    def assign_all(self, count: int, only: list[str] | None = None) -> None:
        rows = [f"{d},bacnet={count}" for n, d in self.ids().items()
                if only is None or n in only]
        (self.root / "assign.csv").write_text("\n".join(rows) + "\n")
        self.run("assign", "--licensing-server", self.licensing, "--entitlement", "E-1",
                 "--devices-from", "assign.csv")

    def ids(self) -> dict[str, str]:
        return dict(line.split(" = ") for line in
                    (self.root / "ids.txt").read_text().splitlines())


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.split("://", 1)[1].split("/", 1)[0].rsplit(":", 1)
    return host, int(port)


def start_fleet(root: Path, count: int, link: str = "tcp", broker: str = "") -> Fleet:
    """licsim's ``count`` servers on ``link`` (an MQTT fleet uses the ``broker`` URL)."""
    key = SigningKey.generate()
    (root / "vendor.key").write_bytes(key.to_pem())
    os.chmod(root / "vendor.key", 0o600)
    (root / "s.toml").write_text('site = "bad-day"\nvendor_key = "vendor.key"\n'
                                 + (f'[broker]\nurl = "{broker}"\n' if broker else "")
                                 + f'[[servers]]\nmodel = "AS-P"\ncount = {count}\n'
                                 f'links = ["{link}"]\n')
    proc = subprocess.Popen([str(BIN / "licsim"), "run", "s.toml", "--urls", "servers.toml",
                             "--workdir", "fleet"], cwd=root, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    out = b""
    deadline = time.monotonic() + WAIT
    assert proc.stdout is not None
    while b"\nready" not in b"\n" + out and time.monotonic() < deadline:
        r, _w, _x = select.select([proc.stdout], [], [], 0.5)
        if r:
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, proc.stderr.read() if proc.stderr else b""
            out += chunk
    text = (root / "servers.toml").read_text()
    urls = re.findall(r'url = "([^"]+)"', text)
    names = [n.split()[0] for n in re.findall(r'name = "([^"]+)"', text)]
    assert len(urls) == count
    vendor = Vendor(key)
    ledger = Ledger(root / "ledger.db", vendor=vendor)
    licserver = serve(ledger)
    ledger.entitle("E-1", "BMS", {"bacnet": 1000})
    fleet = Fleet(root, proc, urls, names, vendor, ledger, licserver)
    fleet.env["LICADMIN_TOKEN"] = ledger.create_token("bad-day", "vendor-admin")
    fleet.servers_file("servers.toml", urls)
    # which device is which server
    p = fleet.run("gather", "--servers", "servers.toml", "--out", "ids.cbor", "--jobs", "16",
                  "--json")
    results = json.loads(p.stdout)["results"]
    (root / "ids.txt").write_text("\n".join(f"{r['server']} = {r['device_id']}"
                                            for r in results) + "\n")
    return fleet


def stop_fleet(fleet: Fleet) -> None:
    if fleet.slow is not None:
        fleet.slow.close()
    fleet.licserver.close()
    fleet.ledger.close()
    fleet.proc.send_signal(signal.SIGTERM)
    try:
        fleet.proc.communicate(timeout=WAIT)
    except subprocess.TimeoutExpired:
        fleet.proc.kill()
        fleet.proc.communicate()


@pytest.fixture
def fleet300(tmp_path: Path) -> Iterator[Fleet]:
    f = start_fleet(tmp_path, 300)
    try:
        yield f
    finally:
        stop_fleet(f)


@pytest.fixture
def fleet4(tmp_path: Path) -> Iterator[Fleet]:
    f = start_fleet(tmp_path, 4)
    try:
        yield f
    finally:
        stop_fleet(f)


def _read_until(proc: subprocess.Popen[str], pattern: str, times: int = 1) -> str:
    """Read ``proc``'s stdout until ``pattern`` has started ``times`` lines."""
    assert proc.stdout is not None
    seen, text = 0, ""
    deadline = time.monotonic() + WAIT
    while seen < times and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        text += line
        if line.startswith(pattern):
            seen += 1
    assert seen >= times, text
    return text


def _finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=WAIT)
    return proc.returncode, out, err


def _resume(fleet: Fleet, out: str) -> list[str]:
    """The command licadmin printed to finish the rest, as arguments."""
    cmd = out.split("finish them with:\n", 1)[1].splitlines()[0].strip()
    args = shlex.split(cmd)
    assert args[0] == "licadmin"
    return args[1:]


# ---------------------------------------------------------------- item 10: Ctrl-C


def test_sigint_during_send_stops_starting_servers_and_the_printed_command_finishes(
        fleet300: Fleet) -> None:
    f = fleet300
    f.assign_all(1)
    f.run("gather", "--servers", "servers.toml", "--out", "site.cbor", "--jobs", "16")
    f.run("license-info", "--licensing-server", f.licensing, "--site-info", "site.cbor",
          "--out", "li.cbor")
    f.run("requests", "--servers", "servers.toml", "--license-info", "li.cbor",
          "--out-dir", "requests", "--jobs", "16")
    f.run("upload", "--licensing-server", f.licensing, "--requests", "requests",
          "--out-dir", "responses")
    slow = f.slowed(0.05)
    proc = f.start("send", "--servers", slow, "--responses", "responses",
                   "--receipts-out", "receipts", "--jobs", "4", "--verbose")
    _read_until(proc, "ok      ", 10)
    proc.send_signal(signal.SIGINT)
    code, out, err = _finish(proc)
    assert code == INTERRUPTED, (out[-2000:], err)
    assert "SIGINT: interrupted: no new server will be started" in err
    done = int(re.search(r"interrupted: (\d+) of 300 server\(s\) done", out).group(1))
    assert 10 <= done < 300
    # exactly the servers said done hold their license and have their receipt
    receipts = list((f.root / "receipts").glob("*.receipt"))
    held = f.holdings()
    assert len(receipts) == done == sum(1 for h in held.values() if h == {"bacnet": 1})
    rest = (f.root / "receipts.rest.toml").read_text()
    assert rest.count("[[server]]") == 300 - done
    # the rest, in the file, are exactly the servers that hold nothing yet
    rest_names = set(re.findall(r'name = "([^"]+)"', rest))
    assert rest_names == {n for n, h in held.items() if h == {}}
    assert re.search(r"^send: INTERRUPTED +\d+$", out, re.M)
    f.slow.delay = 0  # type: ignore[union-attr]  # the link is back to normal
    again = f.run(*_resume(f, out))
    assert "send: applied " in again.stdout and "interrupted" not in again.stdout
    assert all(h == {"bacnet": 1} for h in f.holdings().values())
    assert len(list((f.root / "receipts").glob("*.receipt"))) == 300


def test_sigterm_during_a_mass_reclaim_reclaims_nothing_more_and_the_rest_finishes(
        fleet300: Fleet) -> None:
    """The issue's case: a mass reclaim interrupted early must not reclaim all 300."""
    f = fleet300
    f.assign_all(1)
    f.run("activate", "--servers", "servers.toml", "--licensing-server", f.licensing,
          "--jobs", "16")
    assert all(h == {"bacnet": 1} for h in f.holdings().values())
    f.assign_all(0)
    slow = f.slowed(0.05)
    proc = f.start("reclaim", "--servers", slow, "--licensing-server", f.licensing,
                   "--jobs", "4", "--verbose", "--work-dir", "work")
    _read_until(proc, "ok      ", 10)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == INTERRUPTED, (out[-2000:], err)
    assert "SIGTERM: interrupted" in err
    assert "== step 3/6" not in out  # no server was asked for anything more
    assert all(h == {"bacnet": 1} for h in f.holdings().values())
    assert "interrupted: 0 of 300 server(s) done" in out
    assert (f.root / "work" / "rest.toml").read_text().count("[[server]]") == 300
    f.slow.delay = 0  # type: ignore[union-attr]
    args = _resume(f, out)
    assert args[:1] == ["reclaim"] and "--work-dir" in args
    f.run(*args)
    assert all(h == {} for h in f.holdings().values())
    assert f.ledger.free("E-1", "bacnet") == 1000


def test_a_second_sigint_stops_waiting_and_lists_what_may_have_run(fleet4: Fleet) -> None:
    f = fleet4
    slow = f.slowed(1.0)
    proc = f.start("gather", "--servers", slow, "--out", "site.cbor", "--jobs", "2",
                   "--timeout", "60")
    assert f.slow is not None
    f.slow.wait_accepted(2)  # both jobs are now waiting on the slow link
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    code, out, err = _finish(proc)
    assert code == INTERRUPTED, (out, err)
    assert "SIGINT again: not waiting for the servers in flight" in err
    assert out.count("still running when interrupted: it may have run there") == 2
    assert out.count("not started: interrupted") == 2
    f.slow.delay = 0  # type: ignore[union-attr]
    args = _resume(f, out)
    assert "--append" in args
    f.run(*args)
    assert len(SiteInfo.decode((f.root / "site.cbor").read_bytes()).devices) == 4


# ---------------------------------------------------------------- item 11: no silent removal


def test_activate_never_reclaims_unasked_dry_run_yes_and_terminal(fleet4: Fleet) -> None:
    f = fleet4
    f.assign_all(2)
    f.run("activate", "--servers", "servers.toml", "--licensing-server", f.licensing)
    names = sorted(f.ids())
    # one server's licenses go back, another gets more, the others stay
    f.assign_all(0, only=[names[0]])
    f.assign_all(5, only=[names[1]])
    before = f.holdings()
    dry = f.run("activate", "--servers", "servers.toml", "--licensing-server", f.licensing,
                "--dry-run")
    assert f"plan: {names[0]}: reclaim bacnet=2\n" in dry.stdout
    assert f"plan: {names[1]}: update bacnet 2 -> 5\n" in dry.stdout
    assert f"plan: {names[2]}: nothing to do\n" in dry.stdout
    assert "dry run: nothing was changed on any server" in dry.stdout
    js = json.loads(f.run("activate", "--servers", "servers.toml", "--licensing-server",
                          f.licensing, "--dry-run", "--json").stdout)
    plan = {p["server"]: p for p in js["plan"]}
    assert plan[names[0]]["reclaim"] == ["bacnet=2"] and plan[names[1]]["update"]
    assert f.holdings() == before
    # no --yes and no terminal: refused, exit 2, nothing changed
    p = f.run("activate", "--servers", "servers.toml", "--licensing-server", f.licensing,
              code=USAGE)
    assert p.stderr.strip().endswith("rerun with --yes to allow it, or --dry-run to see the "
                                      "whole plan")
    assert "activate would reclaim installed licenses from 1 server(s)" in p.stderr
    assert f"plan: {names[0]}: reclaim bacnet=2" in p.stdout
    assert f.holdings() == before
    # on a terminal, "n" refuses and "y" goes on
    for answer, code in ((b"n\n", USAGE), (b"y\n", 0)):
        master, slave = pty.openpty()
        try:
            proc = subprocess.Popen([str(BIN / "licadmin"), "activate", "--servers",
                                     "servers.toml", "--licensing-server", f.licensing],
                                    cwd=f.root, env=f.env, stdin=slave, stderr=slave,
                                    stdout=subprocess.PIPE)
            os.close(slave)
            seen = b""
            while b"Reclaim them? [y/N]" not in seen:
                r, _w, _x = select.select([master], [], [], WAIT)
                assert r, seen
                seen += os.read(master, 4096)
            os.write(master, answer)
            assert proc.wait(timeout=WAIT) == code
            if proc.stdout is not None:
                proc.stdout.close()
        finally:
            os.close(master)
        if code == USAGE:
            assert f.holdings() == before
    after = f.holdings()
    assert after[names[0]] == {} and after[names[1]] == {"bacnet": 5}
    # --yes: no question asked
    f.assign_all(1, only=[names[2]])
    f.assign_all(0, only=[names[3]])
    f.run("activate", "--servers", "servers.toml", "--licensing-server", f.licensing, "--yes")
    after = f.holdings()
    assert after[names[2]] == {"bacnet": 1} and after[names[3]] == {}


# ---------------------------------------------------------------- items 12, 17, 18


def test_dead_and_silent_servers_cost_the_timeout_and_never_exit_0(fleet4: Fleet) -> None:
    f = fleet4
    silent = socket.socket()  # accepts, never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        quiet = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        p = f.run("gather", "--servers", "servers.toml", "--out", "s.cbor", code=None)
        assert p.returncode == 0
        # the summary: one line per outcome class, no per-server lines, no table
        assert p.stdout.splitlines()[0] == "gather: gathered 4"
        assert "SERVER" not in p.stdout and "tcp://" not in p.stdout
        # a silent server fails within its --timeout, named by its URL, the others done
        p = f.run("gather", "--server", f.urls[0], "--server", quiet, "--out", "s.cbor",
                  "--timeout", "2", code=PARTIAL)
        assert re.search(r"^gather: FAILED +1$", p.stdout, re.M)
        row = next(x for x in p.stdout.splitlines() if x.startswith(quiet))
        assert "FAILED  transport:" in row and "(the 2 s allowed per server, --timeout, ran out)" \
            in row
        # no server answered: a failure, not an empty success
        p = f.run("gather", "--server", quiet, "--server", "tcp://127.0.0.1:1", "--out",
                  "none.cbor", "--timeout", "2", code=1)
        assert "no server answered: none.cbor not written" in p.stdout
        assert not (f.root / "none.cbor").exists()
        # one server: the same total time; an apply that got no answer says what to do
        # a well-formed response (the file is checked for its kind before any link is used)
        (f.root / "r.resp").write_bytes(Vendor(SigningKey.generate()).sign(Response(
            device_id="0" * 64, nonce=bytes(16), base_sequence=0, base_digest=bytes(32),
            sequence=1, changes=(), issued=T_RESP, not_before=T_RESP, expires=T_RESP + 86_400)))
        p = f.run("apply", "--server", quiet, "--timeout", "2", "r.resp", code=1)
        assert "(the 2 s allowed per server, --timeout, ran out); the response may or may " \
               "not have been applied: sending it again is safe" in p.stderr
    finally:
        silent.close()
    help_text = f.run("send", "--help").stdout
    assert "the total time allowed per server" in " ".join(help_text.split())
    assert "(default 15)" in " ".join(help_text.split())


def test_send_with_a_dead_server_and_a_missing_response_exits_partial(fleet4: Fleet) -> None:
    f = fleet4
    f.assign_all(1)
    names = sorted(f.ids())
    f.run("gather", "--servers", "servers.toml", "--out", "site.cbor")
    f.run("license-info", "--licensing-server", f.licensing, "--site-info", "site.cbor",
          "--out", "li.cbor")
    f.run("requests", "--servers", "servers.toml", "--license-info", "li.cbor",
          "--out-dir", "requests")
    f.run("upload", "--licensing-server", f.licensing, "--requests", "requests",
          "--out-dir", "responses")
    ids = f.ids()
    (f.root / "responses" / f"{ids[names[3]]}.resp").unlink()  # lost on the way
    p = f.run("send", "--servers", "servers.toml", "--responses", "responses",
              "--receipts-out", "receipts", code=PARTIAL)
    assert re.search(r"^send: applied +3$", p.stdout, re.M)
    assert re.search(r"^send: MISSED +1$", p.stdout, re.M)
    assert re.search(rf"^{names[3]} +MISSED +no response for this device", p.stdout, re.M)
    js = json.loads(f.run("send", "--servers", "servers.toml", "--responses", "responses",
                          "--receipts-out", "receipts", "--json", code=PARTIAL).stdout)
    assert js["exit_code"] == PARTIAL and js["interrupted"] is False and js["resume"] is None
    missed = [r for r in js["results"] if r["status"] == "missed"]
    assert [(r["server"], r["code"]) for r in missed] == [(names[3], PARTIAL)]


def test_sigterm_during_requests_with_json_names_the_rest_and_the_command(
        fleet4: Fleet) -> None:
    f = fleet4
    f.assign_all(1)
    f.run("gather", "--servers", "servers.toml", "--out", "site.cbor")
    f.run("license-info", "--licensing-server", f.licensing, "--site-info", "site.cbor",
          "--out", "li.cbor")
    slow = f.slowed(0.3)
    proc = f.start("requests", "--servers", slow, "--license-info", "li.cbor", "--out-dir",
                   "requests", "--jobs", "1", "--json")
    assert f.slow is not None
    f.slow.wait_accepted(1)  # the first server is in flight
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == INTERRUPTED, (out, err)
    doc = json.loads(out)
    assert doc["exit_code"] == INTERRUPTED and doc["interrupted"] is True
    statuses = [r["status"] for r in doc["results"]]
    assert statuses.count("interrupted") >= 1 and set(statuses) <= {"ok", "interrupted"}
    made = len(list((f.root / "requests").glob("*.req")))
    assert made == statuses.count("ok")
    assert doc["resume"].startswith("licadmin requests ")
    assert doc["resume"].endswith("--servers requests.rest.toml")
    f.slow.delay = 0  # type: ignore[union-attr]
    f.run(*shlex.split(doc["resume"])[1:])
    assert len(list((f.root / "requests").glob("*.req"))) == 4


def test_every_site_step_of_activate_draws_its_bar_on_a_terminal(fleet4: Fleet) -> None:
    f = fleet4
    f.assign_all(1)
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([str(BIN / "licadmin"), "activate", "--servers", "servers.toml",
                                 "--licensing-server", f.licensing], cwd=f.root, env=f.env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        while True:
            r, _w, _x = select.select([master], [], [], WAIT)
            if not r:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=WAIT) == 0
        assert proc.stdout is not None
        stdout = proc.stdout.read().decode()
        proc.stdout.close()
    finally:
        os.close(master)
    bar = seen.decode()
    for step in ("gather", "requests", "send"):
        assert f"\r{step} [{'#' * 30}] 4/4" in bar, bar
    # stdout: the steps' summaries by outcome class, no bar, no per-server line
    assert "\r" not in stdout and "as-p-0001" not in stdout
    for line in ("gather: gathered 4", "requests: activate 4", "send: applied 4",
                 "confirm: confirmed 4"):
        assert line in stdout, stdout

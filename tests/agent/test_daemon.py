"""``licagent run`` as a real subprocess: readiness, activation over TCP, signals, restarts, config."""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import hw
from agent.cose import SigningKey, canonical
from agent.errors import LicensingError, UsageError
from agent.identity import FactsProvider, HardwareFacts
from agent.rpc import ApplyResult, RemoteError
from apps.licagent.daemon import Daemon, DaemonConfig, load_config, resolve_config, sd_notify
from hw.framing import encode_frame
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import T0, Device, stop_processes

BIN = Path(sys.executable).parent
WAIT = 20.0  # an upper bound for start-up and shutdown; never asserted as a time


class Agentd:
    """One store directory and the ``licagent run`` processes started on it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.vendor = Vendor(SigningKey.generate())
        (root / "vendor.pub").write_bytes(self.vendor.public.to_pem())
        self.facts = root / "facts.json"
        self.facts.write_text(json.dumps({"model": "AS-P", "serial": "SN1",
                                          "macs": ["00:80:f4:00:00:01"]}))
        self.state = root / "state"
        self.env = dict(os.environ, LICAGENT_TIME=str(T0))
        self.env.pop("NOTIFY_SOCKET", None)
        self.env.pop("LICAGENT_FACTS", None)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.log = root / "licagent.log"
        p = subprocess.run(
            [str(BIN / "licagent"), "init", "--state", str(self.state), "--facts",
             str(self.facts), "--model", "AS-P", "--trust", str(root / "vendor.pub")],
            env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == 0, p.stderr

    def start(self, *args: str, notify: str | None = None,
              store_flags: bool = True) -> subprocess.Popen[bytes]:
        env = dict(self.env)
        if notify is not None:
            env["NOTIFY_SOCKET"] = notify
        flags = ["--state", str(self.state), "--facts", str(self.facts)] if store_flags else []
        with open(self.log, "ab") as log:
            proc = subprocess.Popen([str(BIN / "licagent"), "run", *flags, *args],
                                    env=env, stdout=subprocess.PIPE, stderr=log)
        self.procs.append(proc)
        return proc

    def log_text(self) -> str:
        return self.log.read_text()

    def close(self) -> None:
        stop_processes(self.procs, WAIT)


def read_line(proc: subprocess.Popen[bytes], buf: bytearray) -> str:
    """The next line the daemon prints on stdout (within a bounded wait)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + WAIT
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        assert left > 0, "the daemon printed no line"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"the daemon exited with {proc.wait(timeout=WAIT)} before printing"
            buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    buf[:] = rest
    return line.decode()


def listening(proc: subprocess.Popen[bytes], n: int = 1) -> list[str]:
    buf = bytearray()
    out = []
    for _ in range(n):
        line = read_line(proc, buf)
        assert line.startswith("listening "), line
        out.append(line.split(" ", 1)[1])
    return out


@pytest.fixture
def agentd(tmp_path: Path) -> Iterator[Agentd]:
    d = Agentd(tmp_path)
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def abstract_notify() -> Iterator[tuple[str, socket.socket]]:
    name = f"licagent-test-{uuid.uuid4().hex}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(WAIT)
    try:
        yield "@" + name, s
    finally:
        s.close()


def stop(proc: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=WAIT)


# ---------------------------------------------------------------- the daemon


def test_activate_over_tcp_sigterm_mid_load_and_restart(
    agentd: Agentd, abstract_notify: tuple[str, socket.socket]
) -> None:
    notify_name, notify = abstract_notify
    proc = agentd.start("--listen", "tcp://127.0.0.1:0", notify=notify_name)
    (address,) = listening(proc)
    assert address.startswith("tcp://127.0.0.1:") and not address.endswith(":0")
    ready = notify.recv(4096).decode()
    assert "READY=1" in ready.splitlines() and address in ready

    with hw.connect(address) as c:
        assert c.status()["sequence"] == 0
        req = c.request("activate", ["bacnet"])
        resp = agentd.vendor.issue(req, [Grant("bacnet", 3), Grant("modbus", 1)], now=T0)
        out = c.apply(resp)
        assert out["sequence"] == 1 and not out["already_applied"]
        assert c.check("bacnet")["licensed"] is True
        before = c.license_info()

    # hammer the daemon from several connections, then SIGTERM it in the middle
    calls = [0]
    ended: list[BaseException] = []
    lock = threading.Lock()
    go = threading.Event()

    def hammer(op: str) -> None:
        try:
            with hw.connect(address, timeout=1.0, tries=2) as h:
                while True:
                    r = h.check("bacnet") if op == "check" else h.status()
                    assert r["licensed"] if op == "check" else r["sequence"] == 1
                    with lock:
                        calls[0] += 1
                        if calls[0] >= 60:
                            go.set()
        except LicensingError as exc:  # the daemon went away: expected, the test ends
            with lock:
                ended.append(exc)

    threads = [threading.Thread(target=hammer, args=(op,)) for op in ("check",) * 3 + ("status",)]
    for t in threads:
        t.start()
    assert go.wait(WAIT), "the hammering clients made no progress"
    assert stop(proc) == 0
    for t in threads:
        t.join(timeout=WAIT)
    assert len(ended) == len(threads)  # every client saw the end cleanly, none hung
    assert "STOPPING=1" in notify.recv(4096).decode()
    log = agentd.log_text()
    assert "SIGTERM received, stopping" in log and log.rstrip().endswith("stopped")
    assert f"{address} apply-response ok sequence=1 applied" in log
    assert f"{address} check-feature ok feature=bacnet licensed=True" in log

    # a restart on the same store: nothing lost
    proc = agentd.start("--listen", "tcp://127.0.0.1:0", notify=notify_name)
    (address2,) = listening(proc)
    with hw.connect(address2) as c:
        after = c.license_info()
        assert after["sequence"] == 1
        assert after["licenses"] == before["licenses"]
        assert after["state_digest"] == before["state_digest"]
        assert c.check("modbus")["licensed"] is True
        assert c.apply(resp)["already_applied"] is True
    assert stop(proc, signal.SIGINT) == 0

    v = subprocess.run([str(BIN / "licagent"), "journal", "--verify", "--state",
                        str(agentd.state), "--facts", str(agentd.facts)],
                       env=agentd.env, capture_output=True, text=True, timeout=60, check=False)
    assert v.returncode == 0 and "journal OK" in v.stdout, v.stderr


def test_many_clients_and_hostile_peers(agentd: Agentd, tmp_path: Path) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(WAIT)
    try:
        # every client comes from 127.0.0.1: the per-address limit (8) is raised
        url = "tcp://127.0.0.1:0?max_per_peer=32"
        proc = agentd.start("--listen", url, "--listen", url, notify=str(notify_path))
        first, second = listening(proc, 2)
        assert first != second
        assert notify.recv(4096).startswith(b"READY=1")
    finally:
        notify.close()

    host, port = first.removeprefix("tcp://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT) as g:
        g.sendall(b"\x00\x17garbage\x00" + bytes(range(1, 256)) + b"\x00")
        g.settimeout(WAIT)
        try:
            while g.recv(4096):
                pass
        except ConnectionResetError:
            pass
    with socket.create_connection((host, int(port)), timeout=WAIT) as s:
        frame = encode_frame(canonical({"v": 1, "id": 9, "op": "hello",
                                        "args": {"versions": [1]}}))
        s.sendall(frame[:5])  # and gone, mid-frame

    n = 34
    barrier = threading.Barrier(n, timeout=WAIT)
    good: list[str] = []
    bad: list[BaseException] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        try:
            with hw.connect(first if i % 2 else second) as c:
                c.status()
                barrier.wait()  # all connected at once
                assert c.status()["sequence"] == 0
                assert c.check(f"feature-{i}")["licensed"] is False
                with lock:
                    good.append(c.status()["device_id"])
        except BaseException as exc:
            with lock:
                bad.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    assert not bad
    assert len(good) == n and len(set(good)) == 1
    assert stop(proc, signal.SIGINT) == 0
    assert "corrupt frame" in agentd.log_text()


def test_config_file_with_flag_override(agentd: Agentd) -> None:
    cfg = agentd.root / "licagent.toml"
    cfg.write_text(
        '# relative paths are relative to this file\n'
        'state = "state"\nfacts = "facts.json"\n'
        'listen = ["tcp://127.0.0.1:0"]\nmax_clients = 1\nlog_level = "debug"\n')
    # --max-clients overrides the file's 1; state, facts and listen come from the file
    proc = agentd.start("--config", str(cfg), "--max-clients", "2", store_flags=False)
    (address,) = listening(proc)
    a, b, extra = hw.connect(address), hw.connect(address), hw.connect(address)
    try:
        assert a.status()["sequence"] == 0
        assert b.status()["sequence"] == 0
        with pytest.raises(RemoteError) as err:
            extra.status()
        assert err.value.reason == "busy"
        assert a.check("bacnet")["licensed"] is False
    finally:
        for c in (a, b, extra):
            c.close()
    assert stop(proc) == 0
    log = agentd.log_text()
    assert f"{address} hello ok" in log  # log_level = "debug" from the file
    assert "refused" in log and "2 clients connected" in log


@pytest.mark.parametrize(("text", "named"), [
    ('state = "s"\nlisten = ["tcp://127.0.0.1:0"]\ncolour = "red"\n', "colour"),
    ('state = "s"\nlisten = "tcp://127.0.0.1:0"\nmax_clients = "many"\n', "max_clients"),
    ('state = "s"\nlisten = "tcp://127.0.0.1:0"\nmax_per_peer = 0\n', "max_per_peer"),
    ('state = "s"\nlisten = [1]\n', "listen"),
    ('state = "s"\nlog_level = "loud"\nlisten = []\n', "log_level"),
    ('state = \n', "not valid TOML"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, named: str) -> None:
    cfg = tmp_path / "licagent.toml"
    cfg.write_text(text)
    with pytest.raises(UsageError, match=named):
        load_config(cfg)


def test_max_per_peer_from_the_config_file_reaches_each_listener(tmp_path: Path,
                                                                 device: Device) -> None:
    cfg = tmp_path / "licagent.toml"
    cfg.write_text('state = "s"\nlisten = ["tcp://127.0.0.1:0", "tls://127.0.0.1:0?cert=x"]\n'
                   'max_per_peer = 2\n')
    assert load_config(cfg)["max_per_peer"] == 2
    config = DaemonConfig(device.directory, ("tcp://127.0.0.1:0",
                                             "tcp://127.0.0.1:0?max_per_peer=5"),
                          max_per_peer=2)
    daemon = Daemon(device.agent, config, logging.getLogger("test"))
    daemon.start()
    try:
        assert [lst.config.max_per_peer for lst in daemon.listeners] == [2, 5]  # type: ignore[attr-defined]
    finally:
        daemon.stop()


def test_daemon_keeps_requests_per_origin(device: Device) -> None:
    """Through the daemon's gate: eight anonymous create-request calls over tcp:// leave
    the operator's request (made on the command line) applicable, and the log names them."""
    operator = device.request(features=["bacnet"])
    lines: list[str] = []

    class Lines(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log = logging.getLogger(f"test-origin-{uuid.uuid4().hex}")
    log.setLevel(logging.INFO)
    log.addHandler(Lines())
    daemon = Daemon(device.agent, DaemonConfig(device.directory, ("tcp://127.0.0.1:0",)), log)
    (address,) = daemon.start()
    try:
        for _ in range(8):
            with hw.connect(address) as c:
                c.request("activate", ["x"])
        resp = device.vendor.issue(operator, [Grant("bacnet", 1)], now=device.clock())
        with hw.connect(address) as c:
            assert c.apply(resp)["sequence"] == 1
    finally:
        daemon.stop()
    assert sum("create-request ok action=activate features=x origin=tcp 127.0.0.1" in line
               for line in lines) == 8, lines


def test_config_resolution(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "licagent.toml"
    cfg.parent.mkdir()
    cfg.write_text('state = "../var"\nlisten = "tcp://127.0.0.1:0"\nlog_level = "WARNING"\n')
    c = resolve_config(cfg)
    assert c.state == cfg.parent / "../var" and c.listen == ("tcp://127.0.0.1:0",)
    assert c.log_level == "warning" and c.max_clients is None and c.facts is None
    c = resolve_config(cfg, state="/srv/s", listen=["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"],
                       max_clients=7, log_level="error", facts="f.json")
    assert c.state == Path("/srv/s") and c.listen == ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2")
    assert (c.max_clients, c.log_level, c.facts) == (7, "error", Path("f.json"))
    with pytest.raises(UsageError, match="--listen"):
        resolve_config(state="/srv/s")
    with pytest.raises(UsageError, match="--state"):
        resolve_config(listen=["tcp://127.0.0.1:0"])
    with pytest.raises(UsageError, match="cannot read config"):
        resolve_config(tmp_path / "missing.toml")


def test_bad_start_exits_with_its_code(agentd: Agentd) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "licagent"), "run", *args], env=agentd.env,
                              capture_output=True, text=True, timeout=60, check=False)

    p = run("--state", str(agentd.state), "--facts", str(agentd.facts),
            "--listen", "tcp://127.0.0.1:0?bogus=1")
    assert p.returncode == 2 and "bogus" in p.stderr
    p = run("--state", str(agentd.state), "--facts", str(agentd.facts))
    assert p.returncode == 2 and "--listen" in p.stderr
    p = run("--state", str(agentd.root / "nothing"), "--facts", str(agentd.facts),
            "--listen", "tcp://127.0.0.1:0")
    assert p.returncode != 0 and p.stdout == ""
    cfg = agentd.root / "bad.toml"
    cfg.write_text('listen = ["tcp://127.0.0.1:0"]\nport = 7700\n')
    p = run("--config", str(cfg))
    assert p.returncode == 2 and "unknown key port" in p.stderr


def test_sd_notify(tmp_path: Path, abstract_notify: tuple[str, socket.socket]) -> None:
    assert sd_notify("READY=1", environ={}) is False
    name, s = abstract_notify
    assert sd_notify("READY=1\nSTATUS=x", environ={"NOTIFY_SOCKET": name}) is True
    assert s.recv(4096) == b"READY=1\nSTATUS=x"
    path = tmp_path / "n.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as p:
        p.bind(str(path))
        assert sd_notify("STOPPING=1", environ={"NOTIFY_SOCKET": str(path)}) is True
        assert p.recv(4096) == b"STOPPING=1"
    with pytest.raises(OSError):
        sd_notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "nobody.sock")})
    with pytest.raises(OSError, match="neither"):
        sd_notify("READY=1", environ={"NOTIFY_SOCKET": "vsock:2:1234"})


# ---------------------------------------------------------------- stopping, in process


class HeldFacts:
    """Hardware facts that, once ``hold`` is set, make the next operation wait for ``release``."""

    def __init__(self, inner: FactsProvider) -> None:
        self.inner = inner
        self.hold = threading.Event()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.simulated = inner.simulated
        self.origin = inner.origin

    def read(self) -> HardwareFacts:
        if self.hold.is_set() and not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(WAIT)
        return self.inner.read()


def test_stop_lets_the_apply_in_progress_finish_and_starts_no_other(device: Device) -> None:
    held = HeldFacts(device.agent.facts)
    device.agent.facts = held
    cfg = DaemonConfig(state=device.directory, listen=("tcp://127.0.0.1:0",))
    daemon = Daemon(device.agent, cfg, logging.getLogger("test-daemon"))
    (address,) = daemon.start()
    applier, late = hw.connect(address, timeout=WAIT, tries=1), hw.connect(address,
                                                                           timeout=WAIT, tries=1)
    outcome: dict[str, object] = {}
    try:
        req = applier.request("activate", ["bacnet"])
        resp = device.vendor.issue(req, [Grant("bacnet", 3)], now=device.clock())
        late.status()  # connected and greeted
        held.hold.set()

        def apply() -> None:
            outcome["apply"] = applier.apply(resp)

        def request() -> None:
            try:
                outcome["late"] = late.request("activate", ["modbus"])
            except LicensingError as exc:
                outcome["late"] = exc

        a = threading.Thread(target=apply)
        a.start()
        assert held.entered.wait(WAIT)  # the apply is in progress, inside the store operation
        stopper = threading.Thread(target=daemon.stop)
        stopper.start()
        for _ in range(int(WAIT / 0.01)):
            if daemon.stopping:
                break
            time.sleep(0.01)
        assert daemon.stopping
        c = threading.Thread(target=request)  # arrives while stopping: must not start
        c.start()
        stopper.join(0.3)
        assert stopper.is_alive()  # stop waits for the apply in progress
        held.release.set()
        for t in (a, stopper, c):
            t.join(timeout=WAIT)
            assert not t.is_alive()
    finally:
        held.release.set()
        daemon.stop()
        applier.close()
        late.close()
    result = outcome["apply"]
    assert isinstance(result, ApplyResult) and result["sequence"] == 1
    assert isinstance(outcome["late"], LicensingError)  # "shutting down", or the link closed
    st = device.agent.status()
    assert st["sequence"] == 1 and st["outstanding_requests"] == []
    with pytest.raises(LicensingError):
        hw.connect(address)


def test_pty_and_tcp_listeners_of_one_daemon_share_one_store(agentd: Agentd) -> None:
    """A field engineer on the serial console and a site tool on the LAN see the same server;
    SIGTERM and a restart lose nothing."""
    proc = agentd.start("--listen", "pty://", "--listen", "tcp://127.0.0.1:0")
    serial_url, tcp_url = listening(proc, 2)
    assert serial_url.startswith("serial:///dev/pts/") and tcp_url.startswith("tcp://127.0.0.1:")
    with hw.connect(serial_url, timeout=2.0) as console:
        req = console.request("activate", ["bacnet"])
        resp = agentd.vendor.issue(req, [Grant("bacnet", 4)], now=T0)
        out = console.apply(resp)
        assert out["sequence"] == 1
    with hw.connect(tcp_url) as lan:
        assert lan.check("bacnet")["licensed"] is True
        before = lan.status()
    assert stop(proc) == 0
    proc2 = agentd.start("--listen", "pty://")
    (serial2,) = listening(proc2)
    with hw.connect(serial2, timeout=2.0) as console:
        after = console.status()
        assert after["sequence"] == before["sequence"] == 1
        assert after["licenses"] == before["licenses"]
        assert console.apply(resp)["already_applied"] is True
    assert stop(proc2) == 0
    log = agentd.log_text()
    assert "apply-response" in log and "check-feature" in log


def test_release_free_memory_uses_glibc_when_present() -> None:
    import os

    from apps.licagent.daemon import release_free_memory

    glibc = False
    try:
        glibc = bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        pass
    blocks = [bytes(4096) for _ in range(2000)]  # ~8 MB of heap, then freed
    del blocks
    assert release_free_memory() is glibc
    assert release_free_memory() is glibc  # loaded once, callable again


def test_heap_trimmed_at_most_once_an_interval_and_after_a_burst(device: Device) -> None:
    """Issue 17: ``malloc_trim`` walks the whole heap, so the daemon trims after an
    operation only if the last trim is at least TRIM_INTERVAL old, and when idle after a
    burst (the serve loop's :meth:`Daemon.trim_when_idle`), never during an operation."""
    import time

    from apps.licagent.daemon import TRIM_INTERVAL

    log = logging.getLogger(f"test-trim-{uuid.uuid4().hex}")
    daemon = Daemon(device.agent, DaemonConfig(device.directory, ("tcp://127.0.0.1:0",)), log)
    daemon.run_op("test", "get-status", {})
    first = daemon._trimmed_at
    assert first > 0 and not daemon._untrimmed  # the first operation trims
    for _ in range(20):
        daemon.run_op("test", "check-feature", {"feature": "x"})
    assert daemon._trimmed_at == first and daemon._untrimmed  # a burst: not each time
    with daemon._gate:  # an operation is running: the idle trim waits for it
        time.sleep(TRIM_INTERVAL)
        daemon.trim_when_idle()
        assert daemon._untrimmed
    daemon.trim_when_idle()
    assert daemon._trimmed_at > first and not daemon._untrimmed
    daemon.trim_when_idle()  # nothing ran since: nothing to do
    assert not daemon._untrimmed


def test_daemon_keeps_its_store_open_and_sees_a_cli_beside_it(agentd: Agentd,
                                                              tmp_path: Path) -> None:
    """Issue 17, item 2: the daemon keeps its store open between requests; a real
    ``licagent`` process applying a response and a slot put back beside it are seen by
    its next answer (revalidated under the lock), never an answer from the kept state."""
    proc = agentd.start("--listen", "tcp://127.0.0.1:0")
    (address,) = listening(proc)
    env = dict(agentd.env, LICAGENT_FACTS=str(agentd.facts))

    def cli(*args: str) -> None:
        p = subprocess.run([str(BIN / "licagent"), *args[:1], "--state", str(agentd.state),
                            *args[1:]], env=env, capture_output=True, text=True,
                           timeout=60, check=False)
        assert p.returncode == 0, p.stderr

    with hw.connect(address) as c:
        req = c.request("activate", ["bacnet"])
        c.apply(agentd.vendor.issue(req, [Grant("bacnet", 3)], now=T0))
        assert c.check("modbus")["licensed"] is False
        saved = {n: (agentd.state / n).read_bytes() for n in ("state.0", "state.1")}
        # a CLI process beside the daemon: request, then apply its response
        cli("request", "activate", "--feature", "modbus", "--out", str(tmp_path / "r.cbor"))
        resp = agentd.vendor.issue((tmp_path / "r.cbor").read_bytes(), [Grant("modbus", 2)],
                                   now=T0)
        (tmp_path / "resp.cbor").write_bytes(resp)
        cli("apply", str(tmp_path / "resp.cbor"))
        assert c.check("modbus")["licensed"] is True
        st = c.status()
        assert st["sequence"] == 2
        assert {lic["feature"] for lic in st["licenses"]} == {"bacnet", "modbus"}
        # the older slots put back: the daemon replays the journal, as a fresh open does
        for n, b in saved.items():
            (agentd.state / n).write_bytes(b)
        assert c.check("modbus")["licensed"] is True
        assert c.status()["sequence"] == 2
        # the journal emptied under it: refused as a fresh process refuses, never answered
        # from memory; then put back, answered again
        j = agentd.state / "journal.log"
        whole = j.read_bytes()
        j.write_bytes(b"")
        fresh = subprocess.run([str(BIN / "licagent"), "check", "--state", str(agentd.state),
                                "modbus"], env=env, capture_output=True, text=True,
                               timeout=60, check=False)
        assert fresh.returncode == 8, fresh.stderr
        with pytest.raises(RemoteError) as err:
            c.check("modbus")
        assert err.value.exit_code == 8
        j.write_bytes(whole)
        assert c.check("modbus")["licensed"] is True

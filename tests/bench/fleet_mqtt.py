"""Benchmark: 10,000 simulated servers on one mosquitto, each with its own session and real store.

``fleet_rows()`` returns rows for the README table written by ``tests/bench/run.py``.
Run alone with ``python tests/bench/fleet_mqtt.py [N]``. Needs ``mosquitto`` (``make broker``).

1. A real mosquitto on a loopback port, its descriptor limit raised (it needs one per client).
2. N license stores provisioned in /dev/shm by two worker processes, all trusting one vendor
   key; each store also signs an activation request, and the vendor answers it (the response
   files for step 6).
3. A fleet process (this file with ``--serve``) measures its RSS, creates N
   ``AgentOps(Agent(store))`` handlers (nothing of the store is kept in memory: each
   operation opens it), hands them to one :class:`simulators.mqttlite.DeviceEngine`, waits
   until all are announced and measures RSS again.
4. ``licadmin gather --server mqtt://127.0.0.1:PORT/SITE`` as a subprocess, timed.
5. ``licadmin send`` of the N responses over the same site URL (N applies with fsyncs).
6. For comparison, ``licadmin gather`` of a few hundred servers each named by its own
   device URL (one paho broker session per server, as before the site session).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["fleet_rows"]

N = 10_000
SITE = "bench-fleet"
OLD_PATH_SAMPLE = 300
GATHER_GOAL = 30.0
MEMORY_GOAL = 16.0
BIN = Path(sys.executable).parent
MODELS = ("AS-P", "AS-B", "Edge-Server")


def _provision(args: tuple[str, str, int, int]) -> list[tuple[str, str, str, str, str]]:
    """In a worker process: stores ``lo..hi-1`` under ``root``; their response files."""
    root_s, vendor_pem, lo, hi = args
    from agent.cose import SigningKey
    from agent.identity import HardwareFacts
    from agent.messages import Action
    from agent.service import Agent
    from hw.facts import StaticFactsProvider
    from simulators.licensing_server.vendor import Grant, Vendor

    root = Path(root_s)
    vendor = Vendor(SigningKey.from_pem(vendor_pem.encode()))
    out = []
    for i in range(lo, hi):
        model = MODELS[i % 3]
        serial = f"{model[:2]}-{21_000_000 + i}"
        mac = f"00:80:f4:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
        facts = StaticFactsProvider(HardwareFacts(model=model, serial=serial, macs=(mac,)))
        agent = Agent(root / "stores" / f"d{i}", facts)
        agent.init(model, serial, [vendor.public])
        req = agent.request(Action.ACTIVATE, [])
        resp = vendor.issue(req, [Grant("bacnet-ip", 100)], now=int(time.time()))
        dev = agent.status()["device_id"]
        (root / "responses" / f"{dev}.resp").write_bytes(resp)
        out.append((str(agent.directory), model, serial, mac, dev))
    return out


def provision(root: Path, n: int) -> tuple[list[tuple[str, str, str, str, str]], float]:
    from agent.cose import SigningKey

    (root / "stores").mkdir(parents=True)
    (root / "responses").mkdir()
    pem = SigningKey.generate().to_pem().decode()
    t = time.perf_counter()
    chunks = [(str(root), pem, lo, min(n, lo + 500)) for lo in range(0, n, 500)]
    with ProcessPoolExecutor(2) as pool:
        devices = [d for part in pool.map(_provision, chunks) for d in part]
    return devices, time.perf_counter() - t


# ---------------------------------------------------------------- the fleet process


def _rss_kib() -> int:
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0])


LIGHT = """
import gc, hashlib, json, sys, time
sys.path.insert(0, {root!r})
from simulators.mqttlite import DeviceEngine
class Light:
    __slots__ = ("d",)
    def __init__(self, n):
        self.d = hashlib.sha256(b"light-%d" % n).hexdigest()
    def __call__(self, op, args):
        return {{"device_id": self.d, "model": "AS-B"}}
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
e = DeviceEngine("127.0.0.1", {port}, "bench-light", max_connecting=128)
e.start()
gc.collect()
before = rss()
for i in range({n}):
    h = Light(i)
    e.add(h.d, "AS-B", h)
ready = e.wait_ready({n}, 300)
time.sleep(1.0)
print(json.dumps({{"ready": ready, "per": (rss() - before) / {n}}}))
e.stop()
"""


def serve(port: int, devices_file: str) -> None:
    """The fleet process: one engine, one AgentOps per store; commands on stdin."""
    import gc

    from agent.identity import HardwareFacts
    from agent.ops import AgentOps
    from agent.service import Agent
    from hw.facts import StaticFactsProvider
    from simulators.mqttlite import DeviceEngine, check_capacity

    devices = json.loads(Path(devices_file).read_text())
    plan = check_capacity(len(devices))
    engine = DeviceEngine("127.0.0.1", port, SITE, max_connecting=128)
    engine.start()
    gc.collect()
    before = _rss_kib()
    t = time.perf_counter()
    for directory, model, serial, mac, dev in devices:
        facts = StaticFactsProvider(HardwareFacts(model=model, serial=serial, macs=(mac,)))
        engine.add(dev, model, AgentOps(Agent(Path(directory), facts)))
    ready = engine.wait_ready(len(devices), 300)
    took = time.perf_counter() - t
    time.sleep(1.0)
    after = _rss_kib()
    print(json.dumps({"ready": ready, "seconds": took, "rss_before": before, "rss_after": after,
                      "plan": plan.describe()}), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "stats":
            print(json.dumps({**engine.stats(), "rss": _rss_kib()}), flush=True)
        elif cmd.startswith("recover "):  # the broker was killed: wait for all to be back
            lost_before = int(cmd.split()[1])
            while engine.stats()["lost"] < lost_before + len(devices):
                time.sleep(0.01)
            ok = engine.wait_ready(len(devices), 300)
            print(json.dumps({**engine.stats(), "ready": ok}), flush=True)
        elif cmd == "stop":
            break
    t = time.perf_counter()
    engine.stop()
    print(json.dumps({"stopped": time.perf_counter() - t}), flush=True)


class _Fleet:
    def __init__(self, port: int, devices_file: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), str(devices_file)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        self.first = self.read()

    def read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fleet process ended (exit {self.proc.wait()})")
        result: dict[str, Any] = json.loads(line)
        return result

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.ask("stop")
                self.proc.wait(timeout=120)
            except (RuntimeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _licadmin(*argv: str) -> tuple[float, int, dict[str, Any]]:
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "licadmin"), *argv, "--json"], capture_output=True, text=True,
                       timeout=900, check=False)
    took = time.perf_counter() - t
    try:
        doc: dict[str, Any] = json.loads(p.stdout)
    except ValueError:
        doc = {"error": (p.stdout + p.stderr)[-2000:]}
    return took, p.returncode, doc


def fleet_rows(n: int = N) -> list[tuple[str, str, str]]:
    from simulators.mqttlite.limits import fd_limit_of, raise_fd_limit
    from tests.hw.mosquitto import Broker

    raise_fd_limit()  # mosquitto inherits it: it needs one descriptor per client too
    root = Path(tempfile.mkdtemp(prefix="licbench-fleet-", dir="/dev/shm"))
    rows: list[tuple[str, str, str]] = []
    broker = Broker.plain(root / "broker")
    broker.start()
    fleet: _Fleet | None = None
    try:
        assert broker.proc is not None
        broker_fds = fd_limit_of(broker.proc.pid)
        devices, prov = provision(root, n)
        devices_file = root / "devices.json"
        devices_file.write_text(json.dumps(devices))
        fleet = _Fleet(broker.port, devices_file)
        f = fleet.first
        if f["ready"] != n:
            raise RuntimeError(f"only {f['ready']} of {n} simulated servers connected")
        per = (f["rss_after"] - f["rss_before"]) / n
        rows.append((f"simulated servers connected: {n:,} on one mosquitto (mqttlite engine)",
                     f"{n / f['seconds']:,.0f} per s",
                     f"{f['seconds']:.1f} s until every presence was acknowledged; one process, "
                     f"one event loop, one session each; broker descriptor limit {broker_fds}; "
                     f"stores provisioned in {prov:.1f} s (2 processes, /dev/shm)"))
        rows.append(("memory per simulated server (session + AgentOps + Agent)",
                     f"{per:.1f} KiB",
                     f"RSS {f['rss_before'] / 1024:.0f} MiB before the first server, "
                     f"{f['rss_after'] / 1024:.0f} MiB with {n:,} connected (goal at most "
                     f"{MEMORY_GOAL:g} KiB; paho: about 20.7 KiB per session alone)"))
        url = f"{broker.url}/{SITE}"
        took, code, doc = _licadmin("gather", "--server", url, "--out", str(root / "site.info"))
        got = doc.get("devices", 0)
        site_rate = got / max(took, 1e-9)
        rows.append((f"`licadmin gather` over MQTT from {n:,} servers", f"{took:.1f} s",
                     f"exit {code}; {got:,} device information files verified, "
                     f"{doc.get('failed', '?')} failed; one broker session, up to 256 requests "
                     f"in flight (goal at most {GATHER_GOAL:g} s)"))
        took, code, doc = _licadmin("send", "--server", url, "--responses",
                                    str(root / "responses"), "--receipts-out",
                                    str(root / "receipts"))
        applied = sum(1 for r in doc.get("results", []) if r.get("status") == "ok")
        failed = sum(1 for r in doc.get("results", []) if r.get("status") == "failed")
        st = fleet.ask("stats")
        rows.append((f"`licadmin send` (apply) over MQTT to {n:,} servers", f"{took:.1f} s",
                     f"exit {code}; {applied:,} applied with receipts, {failed} failed; each "
                     f"apply verifies, fsyncs and journals (tmpfs); fleet: "
                     f"{st['requests']:,} operations, {st['repeats']} answered from memory, "
                     f"{st['dropped']} dropped, {st['reconnects']} reconnects, RSS now "
                     f"{st['rss'] / 1024:.0f} MiB"))
        lost = int(st["lost"])
        t = time.perf_counter()
        broker.kill()  # no persistence: every session and retained presence is gone
        broker.start()
        back = fleet.ask(f"recover {lost}")
        rows.append((f"broker killed and restarted under {n:,} servers",
                     f"{time.perf_counter() - t:.1f} s",
                     f"from the kill until all {back['ready']:,} had reconnected (back-off "
                     f"0.25-0.75 s, then at most 128 handshakes at once) and their presence "
                     f"was acknowledged again; {back['connect_failures']} refused attempts "
                     f"retried"))
        sample = devices[:OLD_PATH_SAMPLE]
        toml = "".join(f'[[server]]\nurl = "{url}/{d[4]}"\n' for d in sample)
        (root / "sample.toml").write_text(toml)
        took, code, doc = _licadmin("gather", "--servers", str(root / "sample.toml"), "--out",
                                    str(root / "sample.info"), "--jobs", "64")
        rows.append((f"`licadmin gather` of {len(sample)} servers named one by one (a broker "
                     f"session each)", f"{took:.1f} s",
                     f"exit {code}; {doc.get('devices', 0)} gathered with --jobs 64: "
                     f"{len(sample) / took:.0f} servers per s, where the site session above "
                     f"did {site_rate:.0f} per s"))
        fleet.stop()
        fleet = None
        out = subprocess.run([sys.executable, "-c", LIGHT.format(root=str(ROOT), port=broker.port,
                                                                   n=n)],
                             capture_output=True, text=True, check=True, timeout=600).stdout
        light = json.loads(out)
        rows.append(("memory per MQTT session alone (mqttlite engine, trivial handler)",
                     f"{light['per']:.1f} KiB",
                     f"RSS delta / {n:,} sessions ({light['ready']:,} connected) on one "
                     f"engine; the same measure with paho listeners is the 'memory per "
                     f"connected simulated device' row above"))
    finally:
        if fleet is not None:
            fleet.stop()
        broker.stop()
        shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(int(sys.argv[2]), sys.argv[3])
        sys.exit(0)
    for row in fleet_rows(int(sys.argv[1]) if len(sys.argv) > 1 else N):
        print(" | ".join(row))

"""Benchmarks of mqtt://: round trips through a real mosquitto, memory per device, the daemon's RSS.

``mqtt_rows()`` returns rows for the README table written by ``tests/bench/run.py``.
Run alone with ``python tests/bench/mqtt.py``. Needs ``mosquitto`` (``make broker``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.packettypes import PacketTypes  # noqa: E402
from paho.mqtt.properties import Properties  # noqa: E402

import hw  # noqa: E402
from agent.cose import SigningKey, canonical  # noqa: E402
from agent.identity import HardwareFacts  # noqa: E402
from agent.ops import AgentOps  # noqa: E402
from agent.service import Agent  # noqa: E402
from hw.facts import StaticFactsProvider  # noqa: E402
from simulators.licensing_server.vendor import Vendor  # noqa: E402
from tests.hw.mosquitto import Broker  # noqa: E402

__all__ = ["mqtt_rows"]

#: goals from issue 4
RTT_GOAL = 1.5
RSS_GOAL = 1.15
ROUNDS = 400
#: what our client sends for a hello, so that both carry the same bytes
HELLO = canonical({"v": 1, "id": 1, "op": "hello", "args": {"versions": [1]}})
DEVICES = 500


def _median_ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[int(len(xs) * 0.95) - 1]
    return f"{statistics.median(xs) * 1e3:.2f} ms (p95 {p95 * 1e3:.2f} ms)"


def _timed(fn: Callable[[], object], n: int) -> list[float]:
    for _ in range(20):  # warm up
        fn()
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


class _InMemoryDevice:
    """A simulated device answering from memory, as in a fleet simulator."""

    def __call__(self, op: str, _args: Mapping[str, Any]) -> Any:
        return {"device_id": "be" * 32, "model": "AS-B"}


class _RawPair:
    """The floor: two bare paho clients, request and answer with MQTT 5 properties, QoS 1."""

    def __init__(self, port: int) -> None:
        def client(name: str) -> Any:
            c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=name, protocol=paho.MQTTv5)
            # as hw.backends.mqtt does: without it, Nagle and delayed ACKs add ~40 ms a hop
            c.on_socket_open = lambda _c, _u, sock: sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            c.connect("127.0.0.1", port)
            c.loop_start()
            return c

        self.got = threading.Event()
        self.responder = client("raw-responder")
        self.requester = client("raw-requester")

        def answer(c: Any, _u: Any, msg: Any) -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = msg.properties.CorrelationData
            c.publish(msg.properties.ResponseTopic, msg.payload, qos=1, properties=props)

        self.responder.on_message = answer
        self.requester.on_message = lambda _c, _u, _m: self.got.set()
        subs = [self.responder.subscribe("raw/req", qos=1), self.requester.subscribe("raw/resp", qos=1)]
        assert all(rc == 0 for rc, _mid in subs)
        time.sleep(0.5)  # both SUBACKs are long back by then; the measure starts after warm-up
        self.props = Properties(PacketTypes.PUBLISH)
        self.props.ResponseTopic = "raw/resp"
        self.props.CorrelationData = b"0123456789abcdef"

    def round_trip(self) -> None:
        self.got.clear()
        self.requester.publish("raw/req", HELLO, qos=1, properties=self.props)
        if not self.got.wait(10):
            raise RuntimeError("the raw pair got no answer")

    def close(self) -> None:
        for c in (self.requester, self.responder):
            c.disconnect()
            c.loop_stop()


def _rss_kib(pid: int | None = None) -> int:
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0])


FLEET = """
import hashlib, sys, time
sys.path.insert(0, {root!r})
from hw.backends.mqtt import discover
from hw.backends.mqtt_loop import MqttLoop
import hw
class Light:
    def __init__(self, n):
        self.d = hashlib.sha256(b"bench-%d" % n).hexdigest()
    def __call__(self, op, args):
        return {{"device_id": self.d, "model": "AS-B"}}
def rss():
    return int(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
loop = MqttLoop(); loop.start()
warm = hw.listen("{url}/warm", Light(-1), loop=loop); warm.start()  # every import and cache done
time.sleep(0.3)
before = rss()
ls = [hw.listen("{url}/fleet", Light(i), loop=loop) for i in range({n})]
for l in ls:
    l.start()
assert all(l.connected for l in ls)
time.sleep(0.5)
after = rss()
print(before, after, len(discover("{url}/fleet", timeout=30)))
for l in ls + [warm]:
    l.stop()
loop.stop()
"""

BARE = """
import cbor2, cryptography, ssl
import paho.mqtt.client
from cryptography.hazmat.primitives.asymmetric import ed25519
ed25519.Ed25519PrivateKey.generate().sign(b"x")
import time; time.sleep(1.0)
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""


def _daemon_rss(tmp: Path, url: str) -> tuple[int, int]:
    """(the daemon's RSS with one mqtt:// listener, bare Python's with the same libraries), KiB."""
    bare = statistics.median(int(subprocess.run(
        [sys.executable, "-c", BARE], capture_output=True, text=True, check=True).stdout)
        for _ in range(3))
    bin_dir = Path(sys.executable).parent
    vendor = Vendor(SigningKey.generate())
    (tmp / "vendor.pub").write_bytes(vendor.public.to_pem())
    facts = tmp / "facts.json"
    facts.write_text(json.dumps({"model": "AS-P", "serial": "B1", "macs": ["00:80:f4:00:00:01"]}))
    env = dict(os.environ, LICAGENT_FACTS=str(facts))
    env.pop("NOTIFY_SOCKET", None)
    subprocess.run([str(bin_dir / "licagent"), "init", "--state", str(tmp / "d"), "--model",
                    "AS-P", "--trust", str(tmp / "vendor.pub")], env=env, check=True,
                   capture_output=True)
    rss = []
    for _ in range(3):
        proc = subprocess.Popen([str(bin_dir / "licagent"), "run", "--state", str(tmp / "d"),
                                 "--listen", f"{url}/bench-daemon"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("listening "):
            proc.kill()
            raise RuntimeError(f"licagent run did not start: {line!r}")
        with hw.connect(line.split(" ", 1)[1].strip()) as c:  # serve a few operations first
            for _ in range(20):
                c.status()
        time.sleep(1.0)
        rss.append(_rss_kib(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        proc.stdout.close()
    return int(statistics.median(rss)), int(bare)


def mqtt_rows() -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="licbench-mqtt-"))
    broker = Broker.plain(tmp / "broker")
    broker.start()
    try:
        facts = StaticFactsProvider(HardwareFacts(model="AS-P", serial="B1",
                                                  macs=("00:80:f4:00:00:01",)))
        vendor = Vendor(SigningKey.generate())
        agent = Agent(tmp / "s", facts)
        agent.init("AS-P", "B1", [vendor.public])
        light = hw.listen(f"{broker.url}/bench", _InMemoryDevice())
        real = hw.listen(f"{broker.url}/bench", AgentOps(agent))
        light.start()
        real.start()
        raw = _RawPair(broker.port)
        try:
            with hw.connect(light.address) as cl, hw.connect(real.address) as cr:
                def hello_light() -> object:
                    return cl.call("hello", {"versions": [1]})

                def hello_real() -> object:
                    return cr.call("hello", {"versions": [1]})

                # interleaved, so that all see the same machine at the same time
                ours, store, status, floor = [], [], [], []
                for _ in range(ROUNDS // 100):
                    ours += _timed(hello_light, 100)
                    floor += _timed(raw.round_trip, 100)
                    store += _timed(hello_real, 100)
                    status += _timed(cr.status, 100)
        finally:
            raw.close()
            light.stop()
            real.stop()
        base = statistics.median(floor)
        rows.append(("get-identity (hello) through mosquitto, simulated device", _median_ms(ours),
                     f"{ROUNDS} round trips; {statistics.median(ours) / base:.2f}x the raw paho "
                     f"pair (goal at most {RTT_GOAL})"))
        rows.append(("raw paho request/response pair, same broker and run", _median_ms(floor),
                     "two bare paho clients (TCP_NODELAY), MQTT 5 response topic + correlation "
                     "data, QoS 1, the same request bytes echoed"))
        rows.append(("get-identity through mosquitto, device with a real store", _median_ms(store),
                     f"{statistics.median(store) / base:.2f}x the raw pair; the agent reads and "
                     f"checks its store for each hello"))
        rows.append(("get-status through mosquitto, device with a real store", _median_ms(status),
                     f"{statistics.median(status) / base:.2f}x the raw pair"))

        out = subprocess.run([sys.executable, "-c", FLEET.format(root=str(ROOT), url=broker.url,
                                                                   n=DEVICES)],
                             capture_output=True, text=True, check=True, timeout=300).stdout
        before, after, found = (int(x) for x in out.split())
        rows.append(("memory per connected simulated device", f"{(after - before) / DEVICES:.1f} KiB",
                     f"RSS delta / {DEVICES} listeners on one MqttLoop (one thread, one socket "
                     f"each); discover() found {found}"))

        daemon, bare = _daemon_rss(tmp, broker.url)
        rows.append(("daemon idle RSS with an mqtt:// listener", f"{daemon / 1024:.1f} MiB",
                     f"bare Python with cbor2, cryptography, ssl and paho imported and one "
                     f"signature: {bare / 1024:.1f} MiB; ratio {daemon / bare:.2f} "
                     f"(goal at most {RSS_GOAL})"))
    finally:
        broker.stop()
    return rows


if __name__ == "__main__":
    for row in mqtt_rows():
        print(" | ".join(row))

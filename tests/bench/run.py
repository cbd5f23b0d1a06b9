"""`make bench`: measure the core's costs and write the results table into README.md."""

from __future__ import annotations

import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent import protocol  # noqa: E402
from agent.cose import ALG_EDDSA, ALG_ES256, SigningKey, decode_sign1  # noqa: E402
from agent.identity import HardwareFacts  # noqa: E402
from agent.messages import Action  # noqa: E402
from agent.service import Agent  # noqa: E402
from hw.facts import StaticFactsProvider  # noqa: E402
from simulators.licensing_server.vendor import Grant, Vendor  # noqa: E402


def timed(fn: Callable[[], object], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[int(len(xs) * 0.95) - 1] if len(xs) >= 20 else xs[-1]
    return f"{statistics.median(xs) * 1e3:.2f} ms (p95 {p95 * 1e3:.2f} ms)"


BARE = """
import cbor2, serial, cryptography
from cryptography.hazmat.primitives.asymmetric import ed25519
ed25519.Ed25519PrivateKey.generate().sign(b"x")
import time; time.sleep(0.5)
print(open("/proc/self/status").read().split("VmRSS:")[1].split()[0])
"""


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


def daemon_rows(tmp: Path, fjson: Path) -> list[tuple[str, str, str]]:
    """The daemon's start-to-ready time and idle memory against a bare Python floor."""
    import signal
    import socket

    bare = int(subprocess.run([sys.executable, "-c", BARE], capture_output=True, text=True,
                              check=True).stdout)
    readies: list[float] = []
    rss: list[int] = []
    for i in range(5):
        sock_path = tmp / f"notify{i}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        s.bind(str(sock_path))
        s.settimeout(30)
        env = dict(os.environ, LICAGENT_FACTS=str(fjson), NOTIFY_SOCKET=str(sock_path))
        t = time.perf_counter()
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "licagent"), "run", "--state", str(tmp / "s"),
             "--listen", "pty://", "--listen", "tcp://127.0.0.1:0"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while b"READY=1" not in s.recv(4096):
            pass
        readies.append(time.perf_counter() - t)
        time.sleep(1.0)
        rss.append(rss_kib(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        s.close()
    r = statistics.median(rss)
    return [
        ("daemon start to READY=1 (serial + LAN listeners)", ms(readies),
         "5 starts; goal under 300 ms"),
        ("daemon idle RSS (pty + tcp listeners)", f"{r / 1024:.1f} MiB",
         f"bare Python with cbor2, cryptography, pyserial and one signature: "
         f"{bare / 1024:.1f} MiB; ratio {r / bare:.2f} (goal at most 1.15)"),
    ]


def write_ratios(text: str, load: tuple[float, float]) -> None:
    """The ratios and growth tables (issue 17) into README.md, with the date and the load."""
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    text += (f"\n\nMeasured by `make bench` on {stamp}, {os.cpu_count()}-core machine (floors "
             f"in the same run, alternating); load average {load[0]:.1f} at the start, "
             f"{load[1]:.1f} at the end.\n")
    readme = ROOT / "README.md"
    s = readme.read_text()
    s = re.sub(r"<!-- bench-ratios:start -->.*<!-- bench-ratios:end -->",
               lambda _m: f"<!-- bench-ratios:start -->\n{text}<!-- bench-ratios:end -->", s,
               flags=re.S)
    readme.write_text(s)


def main() -> int:
    from tests.bench.ratios import main as ratios

    # each row as this project / floor / ratio, floors measured alternating in this run;
    # the machine's load said beside them (other work shares its cores)
    start = os.getloadavg()[0]
    text = ratios()
    write_ratios(text, (start, os.getloadavg()[0]))
    if "--ratios" in sys.argv:  # `make bench-ratios`: only these (a minute, not an hour)
        return 0
    rows: list[tuple[str, str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="licbench-"))
    facts = StaticFactsProvider(HardwareFacts(model="AS-P", serial="B1", macs=("00:80:f4:00:00:01",)))
    now = [1_800_000_000]
    vendor = Vendor(SigningKey.generate())
    agent = Agent(tmp / "s", facts, clock=lambda: now[0])
    agent.init("AS-P", "B1", [vendor.public])

    # full apply through the store (verify, decode, check, two fsyncs, journal append)
    def one_apply() -> None:
        req = agent.request(Action.ACTIVATE, [])
        resp = vendor.issue(req, [Grant(f"f{now[0] % 1000}", 1)], now=now[0])
        t = time.perf_counter()
        agent.apply(resp)
        lat.append(time.perf_counter() - t)
        now[0] += 1

    lat: list[float] = []
    for _ in range(200):
        one_apply()
    rows.append(("apply a response (verify + persist + journal), in process", ms(lat),
                 "200 applies, each with fsync of slot, directory and journal"))

    # the pure core alone, no I/O
    st = agent.state()[0]
    key = SigningKey.from_pem((tmp / "s" / "device.key").read_bytes())
    st2, reqb, _ = protocol.create_request(st, Action.ACTIVATE, [], os.urandom(16), now[0], key)
    resp = vendor.issue(reqb, [Grant("zz", 1)], now=now[0])
    xs = timed(lambda: protocol.apply_response(st2, resp, now[0], key), 500)
    rows.append(("apply_response, pure core (no I/O)", ms(xs), "500 runs"))

    xs = timed(lambda: agent.check("f0"), 500)
    rows.append(("check a feature, in process (load + MAC + binding)", ms(xs), "500 runs"))

    for name, alg in (("Ed25519", ALG_EDDSA), ("ES256", ALG_ES256)):
        v = Vendor(SigningKey.generate(alg))
        data = v.sign(protocol.Response(
            device_id="0" * 64, nonce=bytes(16), base_sequence=0, base_digest=bytes(32),
            sequence=1, changes=(), issued=0, not_before=0, expires=1))
        env = decode_sign1(data, max_size=65536)
        xs = timed(lambda env=env, v=v: env.verify_with(v.public), 2000)  # type: ignore[misc]
        rows.append((f"COSE_Sign1 verify, {name}", f"{1 / statistics.median(xs):,.0f} per s",
                     f"{len(data)}-byte response"))

    # licagent check as a subprocess: what the server software pays per call
    fjson = tmp / "facts.json"
    fjson.write_text(json.dumps({"model": "AS-P", "serial": "B1", "macs": ["00:80:f4:00:00:01"]}))
    env = dict(os.environ, LICAGENT_FACTS=str(fjson), LICAGENT_TIME=str(now[0]))
    licagent = Path(sys.executable).parent / "licagent"
    walls = []
    for _ in range(15):
        t = time.perf_counter()
        subprocess.run([str(licagent), "check", "--state", str(tmp / "s"), "f0"], env=env,
                       check=True, capture_output=True)
        walls.append(time.perf_counter() - t)
    rows.append(("`licagent check` as a subprocess (start-up included)", ms(walls), "15 runs"))
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rows.append(("peak RSS of a `licagent check` process", f"{r0 / 1024:.1f} MiB",
                 "ru_maxrss of the children"))
    size = sum(p.stat().st_size for p in (tmp / "s").iterdir())
    rows.append(("store size after 200 applies (slots + journal)", f"{size / 1024:.0f} KiB",
                 "journal dominates (each `apply` record carries its response, so a crash or "
                 "an older slot can be replayed); slots hold the last 32 applied response "
                 "digests"))

    rows += daemon_rows(tmp, fjson)
    from tests.bench.assign import assign_rows

    rows += assign_rows()
    from tests.bench.workers import workers_rows

    rows += workers_rows()  # issue 18: 10,000 requests, one worker and two on PostgreSQL
    from tests.bench.journal import journal_rows

    rows += journal_rows()
    from tests.bench.seats import seats_rows

    rows += seats_rows()  # issue 15: checkouts per second through one agent, memory per seat
    from tests.bench.hal import framing_rows

    rows += framing_rows()
    from tests.bench.mqtt import mqtt_rows

    rows += mqtt_rows()
    from tests.bench.fleet_mqtt import fleet_rows

    rows += fleet_rows()
    from tests.bench.licsim_scale import licsim_rows

    rows += licsim_rows()
    from tests.bench.licsim_sites import sites_rows

    rows += sites_rows()  # stretch: 50,000 servers as five licsim processes and brokers
    from tests.bench.bridged_sites import bridged_rows

    rows += bridged_rows()  # issue 18: 100,000 servers as 10 sites bridged to headquarters
    from tests.bench.tree_system import system_rows

    rows += system_rows()  # issue 14: 1 top server and 1,000 children inheriting
    from tests.bench.qemu import qemu_rows

    rows += qemu_rows()  # the agent in the emulated arm64 server (after `make qemu-image`)

    table = ["| measure | result | notes |", "|---|---|---|"]
    table += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    text = "\n".join(table) + f"\n\nMeasured by `make bench` on {stamp}, 2-core machine.\n"
    print(text)
    readme = ROOT / "README.md"
    s = readme.read_text()
    s = re.sub(r"<!-- bench:start -->.*<!-- bench:end -->",
               f"<!-- bench:start -->\n{text}<!-- bench:end -->", s, flags=re.S)
    readme.write_text(s)
    return 0


if __name__ == "__main__":
    sys.exit(main())

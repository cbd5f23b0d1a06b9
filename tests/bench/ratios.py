"""Issue 17: each cost as this project / its floor / the ratio, floors measured in the same run.

Every measure alternates with its floor, one run of each in turn, so that drift in
the machine (two cores shared with other work) hits both alike; the ratio is of the
medians. Rows are ``(measure, this project, floor, ratio, goal, notes)``.

- apply (verify, persist, journal) in process, the store kept open as the daemon
  keeps it, on disk and on tmpfs. Floor: one signature verify of the same bytes,
  one decode of the payload, one atomic write of a slot-sized file (temporary file,
  fsync, rename, fsync of the directory) and one journal-sized append with fsync.
- the growth table: apply and request at 10, 1,000, 10,000 and 100,000 journal
  records, on tmpfs (goal: the 100,000 figure at most 1.2x the 10 figure).
- ``licagent check`` and ``status`` as processes against a Python that imports
  cbor2 and cryptography's Ed25519 (the bare import floor); the project's modules
  compiled to bytecode first, as an installed package is.
- ``journal --verify`` of 10,000 records against reading the file and doing the
  same decode, MAC and hash per record.
- the daemon's ``check-feature`` and ``get-status`` over TCP against the same
  daemon with an empty handler (:mod:`tests.bench.daemon_rpc`).

Run alone: ``.venv/bin/python tests/bench/ratios.py`` (prints both tables).
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.cose import SigningKey, decode_sign1, strict_loads  # noqa: E402
from agent.digest import hmac_sha256, sha256  # noqa: E402
from agent.durable import FileOps, atomic_write  # noqa: E402
from agent.identity import HardwareFacts  # noqa: E402
from agent.messages import Action  # noqa: E402
from agent.service import Agent  # noqa: E402
from agent.store import Store  # noqa: E402
from hw.facts import StaticFactsProvider  # noqa: E402
from simulators.licensing_server.vendor import Grant, Vendor  # noqa: E402

T0 = 1_800_000_000
Row = tuple[str, str, str, float, float, str]


class _NoSync(FileOps):
    """Only to fill a long history quickly before measuring (never used while measuring)."""

    def fsync(self, fd: int) -> None:
        pass


def _ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


class _Device:
    """A real store with ``records`` journal records (its head at the end, as after a commit)."""

    def __init__(self, root: Path, records: int, vendor: Vendor) -> None:
        self.vendor = vendor
        self.now = T0
        hw = HardwareFacts(model="AS-P", serial=f"SN-R{records}", macs=("00:80:f4:00:00:09",))
        self.agent = Agent(root / f"s{records}", StaticFactsProvider(hw), clock=lambda: self.now,
                           keep_open=True)
        self.agent.init("AS-P", hw.serial, [vendor.public])
        for i in range(4):  # a few licenses installed
            self.apply(self.response(f"f{i}"))
        store = Store.open(self.agent.directory, None, ops=_NoSync())
        for i in range(max(records - store.journal.head().count, 0)):
            store.journal.append("reapply", {"sequence": 0, "i": i}, T0 + i)
        store.save(store.state)

    def response(self, feature: str) -> bytes:
        req = self.agent.request(Action.ACTIVATE, [feature])
        return self.vendor.issue(req, [Grant(feature, 1)], now=self.now)

    def apply(self, resp: bytes) -> float:
        t = time.perf_counter()
        self.agent.apply(resp)
        took = time.perf_counter() - t
        self.now += 1
        return took

    def request(self) -> float:
        t = time.perf_counter()
        self.agent.request(Action.ACTIVATE, ["g"])
        return time.perf_counter() - t


def _apply_floor(directory: Path, resp: bytes, vendor: Vendor, slot: bytes, record: int) -> float:
    t = time.perf_counter()
    env = decode_sign1(resp, max_size=65536)
    strict_loads(env.verify_with(vendor.public), max_size=65536)
    atomic_write(FileOps(), directory / "floor.slot", slot)
    fd = os.open(directory / "floor.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, b"j" * record)
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t


def apply_rows(runs: int = 200) -> list[Row]:
    rows: list[Row] = []
    places = [("disk", None)]
    if Path("/dev/shm").is_dir():
        places.append(("tmpfs", "/dev/shm"))
    for where, base in places:
        vendor = Vendor(SigningKey.generate())
        with tempfile.TemporaryDirectory(prefix="bench-apply-", dir=base) as tmp:
            dev = _Device(Path(tmp), 10, vendor)
            d = dev.agent.directory
            got, floor = [], []
            for i in range(runs):
                resp = dev.response(f"f{i % 12}")
                slot = (d / "state.0").read_bytes()
                record = len(resp) + 300  # an apply record carries the response and details
                if i % 2:
                    got.append(dev.apply(resp))
                    floor.append(_apply_floor(Path(tmp), resp, vendor, slot, record))
                else:
                    floor.append(_apply_floor(Path(tmp), resp, vendor, slot, record))
                    got.append(dev.apply(resp))
        a, f = _ms(got), _ms(floor)
        rows.append((f"apply a response in process ({where}), the store kept open",
                     f"{a:.2f} ms", f"{f:.2f} ms", a / f, 2.0,
                     f"median of {runs}, alternating with the floor: one verify of the same "
                     f"bytes, one payload decode, one atomic slot-sized write (fsync, rename, "
                     f"directory fsync), one journal-sized append with fsync"))
    return rows


SIZES = (10, 1_000, 10_000, 100_000)


def growth_rows(runs: int = 60) -> tuple[list[Row], list[tuple[int, float, float]]]:
    """apply and request at each history length (interleaved), on tmpfs: there a cost
    that grew with the history would not hide behind the disk's fsync times."""
    vendor = Vendor(SigningKey.generate())
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="bench-growth-", dir=base) as tmp:
        devs = {n: _Device(Path(tmp), n, vendor) for n in SIZES}
        count = {n: dev.agent.journal(entries=False).records for n, dev in devs.items()}
        apply: dict[int, list[float]] = {n: [] for n in SIZES}
        request: dict[int, list[float]] = {n: [] for n in SIZES}
        for i in range(runs):
            for n, dev in devs.items():
                apply[n].append(dev.apply(dev.response(f"f{i % 12}")))
                request[n].append(dev.request())
    table = [(count[n], _ms(apply[n]), _ms(request[n])) for n in SIZES]
    small, big = SIZES[0], SIZES[-1]
    rows: list[Row] = [
        (f"apply with {count[big]:,} journal records against {count[small]}",
         f"{_ms(apply[big]):.2f} ms", f"{_ms(apply[small]):.2f} ms",
         _ms(apply[big]) / _ms(apply[small]), 1.2,
         f"median of {runs} each (the history grows by 3 records a run), sizes interleaved, "
         f"on tmpfs (no fsync time to hide a growth); see the growth table"),
        (f"request with {count[big]:,} journal records against {count[small]}",
         f"{_ms(request[big]):.2f} ms", f"{_ms(request[small]):.2f} ms",
         _ms(request[big]) / _ms(request[small]), 1.2,
         f"median of {runs} each, sizes interleaved, on tmpfs"),
    ]
    return rows, table


BARE = "import cbor2\nfrom cryptography.hazmat.primitives.asymmetric import ed25519\n"


def process_rows(runs: int = 21) -> list[Row]:
    subprocess.run([sys.executable, "-m", "compileall", "-q", "agent", "apps", "hw"],
                   cwd=ROOT, check=True, capture_output=True)
    with tempfile.TemporaryDirectory(prefix="bench-proc-") as tmp:
        hw = HardwareFacts(model="AS-P", serial="SN-P", macs=("00:80:f4:00:00:0a",))
        d = Path(tmp) / "s"
        Agent(d, StaticFactsProvider(hw), clock=lambda: T0).init(
            "AS-P", hw.serial, [Vendor(SigningKey.generate()).public])
        facts = Path(tmp) / "facts.json"
        facts.write_text(json.dumps(hw.as_dict()))
        env = dict(os.environ, LICAGENT_FACTS=str(facts), LICAGENT_TIME=str(T0))
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        licagent = str(Path(sys.executable).parent / "licagent")
        cmds = {"floor": [sys.executable, "-c", BARE],
                "check": [licagent, "check", "--state", str(d), "f0"],
                "status": [licagent, "status", "--state", str(d)]}
        out: dict[str, list[float]] = {k: [] for k in cmds}
        for _ in range(runs):
            for k, c in cmds.items():
                t = time.perf_counter()
                subprocess.run(c, env=env, capture_output=True, check=False)
                out[k].append(time.perf_counter() - t)
    f = _ms(out["floor"])
    return [(f"`licagent {k}` as a process", f"{_ms(out[k]):.1f} ms", f"{f:.1f} ms",
             _ms(out[k]) / f, 1.5,
             f"median of {runs}, alternating with the floor: a Python that imports cbor2 "
             f"and cryptography's Ed25519 (bytecode compiled, as installed)")
            for k in ("check", "status")]


def verify_rows(records: int = 10_000, runs: int = 15) -> list[Row]:
    vendor = Vendor(SigningKey.generate())
    with tempfile.TemporaryDirectory(prefix="bench-verify-") as tmp:
        dev = _Device(Path(tmp), records, vendor)
        dev.agent.keep_open = False  # as the command: the store opened from scratch
        path = dev.agent.directory / "journal.log"
        key = Store.open(dev.agent.directory, None).journal.mac_key

        def floor() -> int:
            data = path.read_bytes()
            off = n = 0
            while off < len(data):
                (length,) = struct.unpack_from(">I", data, off)
                raw = data[off + 4:off + 4 + length]
                strict_loads(raw, max_size=1 << 20)
                hmac_sha256(key, raw)
                sha256(raw)
                off += 4 + length
                n += 1
            return n

        got, fl = [], []
        for _ in range(runs):
            t = time.perf_counter()
            n1 = dev.agent.journal(entries=False).records
            got.append(time.perf_counter() - t)
            t = time.perf_counter()
            n2 = floor()
            fl.append(time.perf_counter() - t)
        assert n1 == n2, (n1, n2)
    a, f = _ms(got), _ms(fl)
    return [(f"`journal --verify` of {n1:,} records (store open included)", f"{a:.1f} ms",
             f"{f:.1f} ms", a / f, 1.5,
             f"median of {runs}, alternating with the floor: read the file, then per record "
             f"the same strict decode, one HMAC-SHA256 and one SHA-256")]


FLEET = 10_000
FLEET_MEMORY_GOAL = 16.0  # KiB per server


def fleet_memory(n: int = FLEET) -> dict[str, float]:
    """``licsim run`` with ``n`` servers (stores on /dev/shm, each its own MQTT session on
    licsim's own mosquitto) until ``ready``, then SIGTERM: its JSON summary's memory."""
    import shutil
    import signal

    from simulators.mqttlite.limits import raise_fd_limit

    raise_fd_limit()  # licsim and its mosquitto inherit it: one descriptor per session each
    base = "/dev/shm" if Path("/dev/shm").is_dir() else None
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-", dir=base))
    try:
        asp = asb = n * 2 // 5
        (root / "fleet.toml").write_text(
            f'site = "bench-fleet"\nseed = 7\n[broker]\nstart = true\n'
            f'[[servers]]\nmodel = "AS-P"\ncount = {asp}\nlinks = ["mqtt"]\n'
            f'[[servers]]\nmodel = "AS-B"\ncount = {asb}\nlinks = ["mqtt"]\n'
            f'[[servers]]\nmodel = "Edge-Server"\ncount = {n - asp - asb}\nlinks = ["mqtt"]\n')
        summary = root / "summary.json"
        t = time.perf_counter()
        sim = subprocess.Popen([str(Path(sys.executable).parent / "licsim"), "run",
                                str(root / "fleet.toml"), "--workdir", str(root / "fleet"),
                                "--summary-json", str(summary)],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            line = sim.stdout.readline() if sim.stdout is not None else ""
            ready = time.perf_counter() - t
            if not line.startswith("ready"):
                raise RuntimeError(f"licsim did not get ready: {line!r} (exit {sim.poll()})")
        finally:
            if sim.poll() is None:
                sim.send_signal(signal.SIGTERM)
            sim.wait(timeout=600)
        mem = json.loads(summary.read_text())["memory"]
        return {"servers": n, "ready_s": ready, "per_server_kib": mem["per_server_kib"],
                "rss_start_kib": mem["rss_start_kib"], "rss_ready_kib": mem["rss_ready_kib"]}
    finally:
        shutil.rmtree(root, ignore_errors=True)


Growth = list[tuple[int, float, float]]


def ratio_rows() -> tuple[list[Row], Growth, dict[str, float]]:
    from tests.bench.daemon_rpc import rpc_rows

    rows = apply_rows()
    growth, table = growth_rows()
    rows += growth
    rows += process_rows()
    rows += verify_rows()
    rows += rpc_rows()
    return rows, table, fleet_memory()


def render(rows: list[Row], table: Growth, fleet: dict[str, float] | None = None) -> str:
    out = ["| measure | this project | floor | ratio (goal) | notes |", "|---|---|---|---|---|"]
    met = 0
    for name, got, floor, ratio, goal, notes in rows:
        mark = "meets" if ratio <= goal else "OVER"
        met += ratio <= goal
        out.append(f"| {name} | {got} | {floor} | {ratio:.2f} (at most {goal:g}: {mark}) "
                   f"| {notes} |")
    out += ["", "| journal records at the start | apply | request | apply against the first |",
            "|---|---|---|---|"]
    base = table[0][1]
    out += [f"| {n:,} | {a:.2f} ms | {r:.2f} ms | {a / base:.2f} |" for n, a, r in table]
    if fleet is not None:
        per = fleet["per_server_kib"]
        met += per <= FLEET_MEMORY_GOAL
        mark = "meets" if per <= FLEET_MEMORY_GOAL else "OVER"
        out += ["", "| fleet | memory per server (goal) | notes |", "|---|---|---|",
                f"| `licsim run`, {int(fleet['servers']):,} servers, each its own MQTT session "
                f"| {per:.1f} KiB (at most {FLEET_MEMORY_GOAL:g}: {mark}) | licsim's resident "
                f"memory {fleet['rss_start_kib'] / 1024:.0f} MiB at start, "
                f"{fleet['rss_ready_kib'] / 1024:.0f} MiB with every server ready "
                f"({fleet['ready_s']:.0f} s to `ready`, stores on /dev/shm) |"]
    goals = len(rows) + (fleet is not None)
    out += ["", f"Goals met: {met} of {goals}."]
    return "\n".join(out)


def main() -> str:
    rows, table, fleet = ratio_rows()
    text = render(rows, table, fleet)
    print(text)
    return text


if __name__ == "__main__":
    main()

"""Floating seats through one agent (issue 15, item 7): checkouts per second, memory per seat.

A real ``licagent run`` serves a pool of 4096 seats over ``tcp://127.0.0.1``; one client
process checks seats out one after the other (each a journal record and a slot write,
fsynced), first with the pool empty, then with 2,000 seats out; the same client's
``check-feature`` on the same connection (no store write) is the floor measured in the
same run. The daemon's resident memory with 2,000 seats out against none gives the
memory per seat out; the store's slot size the bytes per seat.

Run alone: ``.venv/bin/python tests/bench/seats.py`` (prints the rows).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hw  # noqa: E402
from agent.cose import SigningKey  # noqa: E402
from agent.seats import MAX_SEATS_OUT  # noqa: E402
from agent.store import SLOTS  # noqa: E402
from simulators.licensing_server.vendor import Grant, Vendor  # noqa: E402

T0 = 1_800_000_000
BIN = Path(sys.executable).parent
HELD = 2000
RUNS = 300


def _rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])


def _rate(fn: object, n: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - t)
    return 1.0 / statistics.median(times), times


def seats_rows() -> list[tuple[str, str, str]]:
    vendor = Vendor(SigningKey.generate())
    with tempfile.TemporaryDirectory(prefix="bench-seats-") as tmp:
        root = Path(tmp)
        (root / "vendor.pub").write_bytes(vendor.public.to_pem())
        facts = root / "facts.json"
        facts.write_text(json.dumps({"model": "Edge-Server", "serial": "SN-SEATS",
                                     "macs": ["00:80:f4:00:15:01"]}))
        env = dict(os.environ, LICAGENT_TIME=str(T0))
        state = root / "state"
        subprocess.run([str(BIN / "licagent"), "init", "--state", str(state), "--facts",
                        str(facts), "--model", "Edge-Server", "--trust",
                        str(root / "vendor.pub")], env=env, check=True, capture_output=True)
        proc = subprocess.Popen([str(BIN / "licagent"), "run", "--state", str(state),
                                 "--facts", str(facts), "--listen", "tcp://127.0.0.1:0"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().split()[1]
            with hw.connect(url) as c:
                req = c.request("activate", ["editor", "bacnet"])
                c.apply(vendor.issue(req, [Grant("editor", MAX_SEATS_OUT, floating=True)],
                                     now=T0))
                for _ in range(20):  # warm up
                    c.seat_return(c.seat_checkout("editor", "warm").token)
                    c.check("editor")
                time.sleep(0.5)
                rss_empty = _rss_kib(proc.pid)
                n = [0]

                def checkout() -> None:
                    n[0] += 1
                    c.seat_checkout("editor", f"ws-{n[0]}")

                def check() -> None:
                    c.check("editor")

                ck, fl = [], []
                for _ in range(RUNS):  # alternating with the floor
                    ck.append(_rate(checkout, 1)[1][0])
                    fl.append(_rate(check, 1)[1][0])
                while n[0] < HELD:
                    checkout()
                time.sleep(0.5)
                rss_held = _rss_kib(proc.pid)
                slot = max((state / s).stat().st_size for s in SLOTS)
                ck_held = [_rate(checkout, 1)[1][0] for _ in range(100)]
                out = c.seat_list().pools[0]["out"]
                assert out == HELD + len(ck_held), out
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    empty = 1.0 / statistics.median(ck)
    floor = 1.0 / statistics.median(fl)
    held = 1.0 / statistics.median(ck_held)
    per_seat = (rss_held - rss_empty) * 1024 / HELD
    return [
        ("seat checkouts through one agent (tcp, one client)", f"{empty:,.0f} per s",
         f"median of {RUNS} checkouts with the pool empty, each a journal record and a slot "
         f"write with fsync; floor: check-feature on the same connection, {floor:,.0f} per s "
         f"(ratio {floor / empty:.1f}); with {HELD:,} seats out {held:,.0f} per s (the slot "
         f"holding them is rewritten each time)"),
        ("memory per seat out (daemon RSS)", f"{per_seat:,.0f} B",
         f"RSS {rss_empty / 1024:.1f} MiB with none out, {rss_held / 1024:.1f} MiB with "
         f"{HELD:,} out; the slot holds {slot / HELD:,.0f} B per seat ({slot / 1024:,.0f} "
         f"KiB); at most {MAX_SEATS_OUT:,} seats out per agent"),
    ]


if __name__ == "__main__":
    for row in seats_rows():
        print(f"| {' | '.join(row)} |")

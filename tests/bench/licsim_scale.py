"""Benchmark: one `licsim` process with 10,000 servers on its own mosquitto, driven by licadmin.

``licsim_rows()`` returns rows for the README table written by ``tests/bench/run.py``.
Run alone with ``python tests/bench/licsim_scale.py [N]``. Needs ``mosquitto`` (``make broker``).

1. ``licsim run`` (a subprocess) with N servers (AS-P, AS-B, Edge Server) on the mqtt link,
   stores in /dev/shm; the ``ready`` line gives the broker URL.
2. ``licadmin gather --server mqtt://BROKER/SITE``, timed (goal: 30 s for 10,000).
3. The licensing server (in this process, ledger in /dev/shm) with one entitlement and an
   assignment per server, then ``licadmin activate --server mqtt://BROKER/SITE``: gather,
   license information, a request from every server, upload, a response applied on every
   server, receipts confirmed: the whole workflow, timed.
4. SIGTERM; licsim's JSON summary gives its memory per server beyond its start (goal at
   most 16 KiB), what the servers served, and its invariants.

Floors, measured in this process just before and just after each timed command (the
machine is shared: the two are averaged): the same operations as licsim's servers run
them, one after the other, without MQTT: ``get-info`` on a server plus the verification
licadmin makes of its answer (the gather floor), and ``apply-response`` on a server
(verify, persist, journal: the apply floor), on FLOOR_SAMPLE servers provisioned like
licsim's (stores in /dev/shm), scaled to N.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["licsim_rows"]

N = 10_000
SITE = "bench-licsim"
BIN = Path(sys.executable).parent
GATHER_GOAL = 5.0
ACTIVATE_GOAL = 20.0
MEMORY_GOAL = 16.0
#: servers the floors are measured on (scaled to N)
FLOOR_SAMPLE = 400


class _Floors:
    """Per-server costs of licsim's own operations, without MQTT, in this process."""

    def __init__(self, root: Path, n: int = FLOOR_SAMPLE) -> None:
        from collections import Counter

        from agent.cose import SigningKey
        from simulators.fleet.models import make_facts
        from simulators.fleet.server import ServerHandler, SimServer
        from simulators.licensing_server.vendor import Vendor

        self.vendor = Vendor(SigningKey.generate())
        self.handlers = []
        for i in range(n):
            facts = make_facts("AS-P", 7, i + 1)
            srv = SimServer(f"floor-{i}", "AS-P", root / f"floor-{i}", facts, ("mqtt",))
            srv.agent().init("AS-P", facts.serial, [self.vendor.public])
            self.handlers.append(ServerHandler(srv, Counter()))

    def gather(self) -> float:
        """Seconds per server: get-info there, and licadmin's check of its signature."""
        from agent.formats import read_device_info

        t = time.perf_counter()
        for h in self.handlers:
            read_device_info(h("get-info", {}).file)
        return (time.perf_counter() - t) / len(self.handlers)

    def apply(self) -> float:
        """Seconds per server: apply-response there (verify, persist, journal), on a request
        made beforehand (not timed) and a response signed beforehand (not timed)."""
        from simulators.licensing_server.vendor import Grant

        files = []
        for h in self.handlers:
            req = h("create-request", {"action": "activate", "features": []}).file
            files.append(self.vendor.issue(req, [Grant("bacnet-ip", 1)],
                                           now=int(time.time())))
        t = time.perf_counter()
        for h, f in zip(self.handlers, files, strict=True):
            h("apply-response", {"file": f})
        return (time.perf_counter() - t) / len(self.handlers)


def _scenario(n: int) -> str:
    asp, asb = n * 2 // 5, n * 2 // 5
    edge = n - asp - asb
    return (f'site = "{SITE}"\nseed = 11\n[broker]\nstart = true\n'
            f'[[servers]]\nmodel = "AS-P"\ncount = {asp}\nlinks = ["mqtt"]\n'
            f'[[servers]]\nmodel = "AS-B"\ncount = {asb}\nlinks = ["mqtt"]\n'
            f'[[servers]]\nmodel = "Edge-Server"\ncount = {edge}\nlinks = ["mqtt"]\n')


def _licadmin(*argv: str, timeout: float = 1800) -> tuple[float, int, str]:
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "licadmin"), *argv], capture_output=True, text=True,
                       timeout=timeout, check=False)
    return time.perf_counter() - t, p.returncode, p.stdout + p.stderr


def licsim_rows(n: int = N) -> list[tuple[str, str, str]]:
    from agent.cose import SigningKey
    from agent.formats import SiteInfo, read_device_info
    from apps.licensing_api import AssignmentQuery
    from simulators.licensing_server.ledger import Ledger
    from simulators.licensing_server.server import serve
    from simulators.licensing_server.vendor import Vendor
    from simulators.mqttlite.limits import raise_fd_limit

    raise_fd_limit()  # licsim and its mosquitto inherit it: one descriptor per session each
    root = Path(tempfile.mkdtemp(prefix="licbench-licsim-", dir="/dev/shm"))
    rows: list[tuple[str, str, str]] = []
    scenario = root / "fleet.toml"
    scenario.write_text(_scenario(n))
    summary_file = root / "summary.json"
    t0 = time.perf_counter()
    sim = subprocess.Popen([str(BIN / "licsim"), "run", str(scenario), "--workdir",
                            str(root / "fleet"), "--summary-json", str(summary_file)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    licensing = None
    ledger = None
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"licsim did not get ready: {line!r} (exit {sim.poll()})")
        ready_wall = time.perf_counter() - t0
        broker = line.split(" broker ")[1].split()[0]
        site_url = f"{broker}/{SITE}"

        floors = _Floors(root / "floors")
        gather_floor = floors.gather()
        took, code, out = _licadmin("gather", "--server", site_url, "--out",
                                    str(root / "site.info"))
        gather_floor = (gather_floor + floors.gather()) / 2 * n
        devices = []
        for d in SiteInfo.decode((root / "site.info").read_bytes()).devices:
            devices.append(read_device_info(d).device_id)
        rows.append((f"`licadmin gather` over MQTT from a `licsim` fleet of {n:,}",
                     f"{took:.1f} s",
                     f"exit {code}; {len(devices):,} device information files verified "
                     f"(goal at most {GATHER_GOAL:g} s: {'met' if took <= GATHER_GOAL else 'not met'}); {took / gather_floor:.1f} x its floor "
                     f"measured before and after it ({gather_floor:.1f} s: get-info on "
                     f"{FLOOR_SAMPLE} of licsim's servers one after the other in one process, "
                     f"and the check of each answer's signature, scaled to {n:,})"))

        vendor = Vendor(SigningKey.from_pem((root / "fleet" / "vendor" / "vendor.key")
                                            .read_bytes()))
        ledger = Ledger(root / "ledger.db", vendor)
        ledger.entitle("E-BENCH", "BMS-Site", {"bacnet-ip": n})
        ledger.assign_many([AssignmentQuery("E-BENCH", dev, "bacnet-ip", 1) for dev in devices])
        licensing = serve(ledger, vendor)
        (root / "site.token").write_text(ledger.create_token("bench", "site-admin",
                                                             ["E-BENCH"]) + "\n")
        apply_floor = floors.apply()
        took, code, out = _licadmin("activate", "--server", site_url, "--licensing-server",
                                    licensing.url, "--token-file", str(root / "site.token"),
                                    "--work-dir", str(root / "activate"))
        apply_floor = (apply_floor + floors.apply()) / 2 * n
        installed = ledger.report()["installed"]
        done = sum(1 for d in devices if any(x["feature"] == "bacnet-ip"
                                             for x in installed.get(d, [])))
        rows.append((f"`licadmin activate` over MQTT: {n:,} servers, steps 1 to 6",
                     f"{took:.1f} s",
                     f"exit {code}; {done:,} activations applied and confirmed (receipts "
                     f"verified by the ledger), {len(devices) - done:,} not; gather, license "
                     f"information (one signed file per server), requests, upload in batches "
                     f"of 1000, send, confirm (goal at most {ACTIVATE_GOAL:g} s: "
                     f"{'met' if took <= ACTIVATE_GOAL else 'not met'}); "
                     f"{took / apply_floor:.1f} x the apply floor measured before and after "
                     f"it ({apply_floor:.1f} s: apply-response on {FLOOR_SAMPLE} of licsim's "
                     f"servers one after the other in one process, scaled to {n:,})"))
        if code != 0:
            print(out[-3000:], file=sys.stderr)
    finally:
        if sim.poll() is None:
            sim.send_signal(signal.SIGTERM)
        try:
            sim.wait(timeout=600)
        except subprocess.TimeoutExpired:
            sim.kill()
            sim.wait()
        if licensing is not None:
            licensing.close()
        if ledger is not None:
            ledger.close()
    s: dict[str, Any] = json.loads(summary_file.read_text())
    mem = s["memory"]
    held = sum(1 for i in s["invariants"] if i["held"])
    rows.insert(0, (f"`licsim run`: {n:,} servers on one mosquitto, each its own MQTT session",
                    f"{s['connect']['seconds']:.1f} s to `ready`",
                    f"{s['connect']['rate_per_s']:,.0f} servers per s, stores provisioned in "
                    f"{s['connect']['provision_seconds']:.1f} s (/dev/shm); "
                    f"{ready_wall:.1f} s from the command to its `ready` line"))
    rows.insert(1, ("`licsim` memory per simulated server beyond its start",
                    f"{mem['per_server_kib']:.1f} KiB",
                    f"RSS {mem['rss_start_kib'] / 1024:.0f} MiB at start, "
                    f"{mem['rss_ready_kib'] / 1024:.0f} MiB with {n:,} ready, peak "
                    f"{mem['peak_kib'] / 1024:.0f} MiB (goal at most {MEMORY_GOAL:g} KiB)"))
    served = s["operations"]["served_by_servers"]
    rows.append((f"`licsim` summary after the workflow over {n:,} servers",
                 f"{held} of {len(s['invariants'])} invariants held",
                 "operations served: " + ", ".join(f"{op} {k:,}" for op, k in sorted(
                     served.items())) + f"; messages lost {s['messages']['lost']}, "
                 f"answered twice from memory {s['messages']['duplicated']}"))
    shutil.rmtree(root, ignore_errors=True)
    return rows


if __name__ == "__main__":
    for row in licsim_rows(int(sys.argv[1]) if len(sys.argv) > 1 else N):
        print(" | ".join(row))

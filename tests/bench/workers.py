"""The licensing server's upload of 10,000 requests on PostgreSQL, one worker against two.

Real parts only: a PostgreSQL server (tests/support/postgres.py), `licserver serve`
processes on one database, 8 client threads uploading batches of 250 requests spread over
the workers. The requests are signed by 10,000 device keys with the device's own pure
protocol code (no stores on disk). Reports requests per second and the ratio of two
workers to one (a measured ratio, not a goal: writes run side by side as SERIALIZABLE
transactions, a collision is run again).

Run alone: `.venv/bin/python tests/bench/workers.py [N]` (prints the rows).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent import protocol  # noqa: E402
from agent.cose import SigningKey  # noqa: E402
from agent.messages import Action, TrustKey  # noqa: E402
from apps.licensing_api import AssignmentQuery  # noqa: E402
from apps.licensing_client import LicensingClient  # noqa: E402
from simulators.licensing_server.ledger import Ledger  # noqa: E402
from tests.support.postgres import PostgresServer  # noqa: E402

BIN = Path(sys.executable).parent
T0 = 1_800_000_000
BATCH = 250
CLIENTS = 8


def _requests(n: int, vendor_pub: SigningKey) -> list[tuple[str, bytes]]:
    out = []
    for i in range(n):
        key = SigningKey.generate()
        state = protocol.new_state(key.public, "AS-P", f"SN-{i:06d}", [f"mac:{i:012x}"],
                                   [TrustKey(vendor_pub.public)], T0, simulated=True)
        _new, data, _req = protocol.create_request(state, Action.ACTIVATE, (), os.urandom(16),
                                                   T0, key)
        out.append((state.device_id, data))
    return out


def _serve(root: Path, db: str) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen([str(BIN / "licserver"), "serve", "--db", db, "--key",
                             str(root / "vendor" / "vendor.key"), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, LICSERVER_TIME=str(T0)))
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("serving "), line
    return proc, line.split()[1]


def _run(root: Path, server: PostgresServer, vendor: SigningKey,
         reqs: list[tuple[str, bytes]], workers: int) -> float:
    """Requests per second of one whole upload through ``workers`` processes."""
    db = server.database()
    with Ledger(db, clock=lambda: T0) as led:
        led.entitle("E-BENCH", "BMS-Site", {"bacnet-ip": len(reqs)})
        for i in range(0, len(reqs), 5000):
            led.assign_many([AssignmentQuery("E-BENCH", dev, "bacnet-ip", 1)
                             for dev, _ in reqs[i:i + 5000]])
        token = led.create_token("bench", "vendor-admin")
    procs = [_serve(root, db) for _ in range(workers)]
    batches = [[data for _dev, data in reqs[i:i + BATCH]] for i in range(0, len(reqs), BATCH)]
    answered: list[int] = []
    lock = threading.Lock()

    def client(k: int) -> None:
        c = LicensingClient(procs[k % workers][1], token=token, timeout=600)
        for b in batches[k::CLIENTS]:
            up = c.upload(b)
            with lock:
                answered.append(len(up["responses"]))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    took = time.perf_counter() - t
    for p, _url in procs:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=60)
    if sum(answered) != len(reqs):
        raise RuntimeError(f"{sum(answered)} of {len(reqs)} requests answered")
    return len(reqs) / took


def workers_rows(n: int = 10_000) -> list[tuple[str, str, str]]:
    server = PostgresServer().start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
            root = Path(tmp)
            subprocess.run([str(BIN / "licserver"), "keygen", "--out", str(root / "vendor")],
                           check=True, capture_output=True)
            vendor = SigningKey.from_pem((root / "vendor" / "vendor.key").read_bytes())
            reqs = _requests(n, vendor)
            one = _run(root, server, vendor, reqs, 1)
            two = _run(root, server, vendor, reqs, 2)
    finally:
        server.stop()
    how = (f"{n:,} activation requests in batches of {BATCH} from {CLIENTS} client threads, "
           "`licserver serve` on a real PostgreSQL (loopback, fsync off), every request "
           "answered")
    return [(f"licensing server upload of {n:,} requests, 1 worker on PostgreSQL",
             f"{one:.0f} requests/s", how),
            (f"licensing server upload of {n:,} requests, 2 workers on one PostgreSQL",
             f"{two:.0f} requests/s ({two / one:.2f} x one worker)",
             how + "; SERIALIZABLE transactions side by side, a collision run again")]


if __name__ == "__main__":
    for row in workers_rows(int(sys.argv[1]) if len(sys.argv) > 1 else 10_000):
        print(" | ".join(row))

"""`licadmin assign` of 300 assignments (150 servers x 2 features) from a CSV, against a real
`licserver serve` on a loopback port: the whole command, process start-up included.

Run alone: `.venv/bin/python tests/bench/assign.py` (prints the rows).
"""

from __future__ import annotations

import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(cwd: Path, *argv: str) -> None:
    subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, check=True,
                   capture_output=True, timeout=120)


def assign_rows(runs: int = 5) -> list[tuple[str, str, str]]:
    walls = []
    with tempfile.TemporaryDirectory(prefix="bench-assign-") as tmp:
        root = Path(tmp)
        _run(root, "licserver", "keygen", "--out", "vendor")
        _run(root, "licserver", "token", "create", "--db", "ledger.db", "--role",
             "vendor-admin", "--out", "vendor-admin.token")
        srv = subprocess.Popen([str(BIN / "licserver"), "serve", "--db", "ledger.db", "--key",
                                "vendor/vendor.key", "--port", "0", "--quiet"], cwd=root,
                               stdout=subprocess.PIPE)
        try:
            assert srv.stdout is not None
            url = srv.stdout.readline().decode().split()[1]
            for i in range(runs):
                ent = f"PO {i} (bench)"
                _run(root, "licserver", "entitle", "--db", "ledger.db", "--entitlement", ent,
                     "--product", "BMS Pro (perpetual)", "--feature", "bacnet-ip=1000",
                     "--feature", "trend-log=1000")
                rows = [f"{secrets.token_hex(32)},bacnet-ip=5,trend-log=2" for _ in range(150)]
                (root / "site.csv").write_text("\n".join(rows) + "\n")
                t = time.perf_counter()
                _run(root, "licadmin", "assign", "--licensing-server", url, "--token-file",
                     "vendor-admin.token", "--entitlement", ent,
                     "--devices-from", "site.csv")
                walls.append(time.perf_counter() - t)
        finally:
            srv.send_signal(signal.SIGTERM)
            srv.communicate(timeout=60)
    return [("`licadmin assign` of 300 assignments (150 servers x 2 features, a CSV)",
             f"{statistics.median(walls) * 1e3:.0f} ms (max {max(walls) * 1e3:.0f} ms)",
             f"{runs} runs, the whole command with process start-up, against `licserver serve` "
             "on loopback; one HTTP request, one ledger transaction (goal well under 5 s)")]


if __name__ == "__main__":
    for row in assign_rows():
        print(" | ".join(row))

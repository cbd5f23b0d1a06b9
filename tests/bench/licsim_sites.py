"""Benchmark (stretch): 50,000 simulated servers as five sites, each a `licsim` process with its own broker.

``sites_rows()`` returns rows for the README table written by ``tests/bench/run.py``.
Run alone with ``python tests/bench/licsim_sites.py [SITES] [PER_SITE]``.

One process cannot hold 50,000 sessions here (20,000 descriptors per process, and the
broker needs one per client as well), so the fleet is split as ``licsim``'s capacity
check advises: five ``licsim run`` processes started together, each with 10,000 servers
on the mqtt link and its own mosquitto. Once every one has printed ``ready``, each site is
gathered with ``licadmin gather --server mqtt://BROKER/SITE``, the five at once, and the
resident memory of every licsim and mosquitto process is added up.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["sites_rows"]

BIN = Path(sys.executable).parent
SITES = 5
PER_SITE = 10_000


def _rss_kib(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(x) for x in text.split()]


def _gather(url: str, out: Path) -> tuple[float, int, str]:
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "licadmin"), "gather", "--server", url, "--out", str(out)],
                       capture_output=True, text=True, timeout=1800, check=False)
    return time.perf_counter() - t, p.returncode, p.stdout.splitlines()[-1] if p.stdout else ""


def sites_rows(sites: int = SITES, per_site: int = PER_SITE) -> list[tuple[str, str, str]]:
    from simulators.mqttlite.limits import raise_fd_limit

    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="licbench-sites-", dir="/dev/shm"))
    procs: list[subprocess.Popen[str]] = []
    total = sites * per_site
    try:
        t0 = time.perf_counter()
        for i in range(sites):
            sc = root / f"site{i}.toml"
            sc.write_text(f'site = "plant-{i}"\nseed = {100 + i}\n[broker]\nstart = true\n'
                          f'[[servers]]\nmodel = "AS-P"\ncount = {per_site // 2}\n'
                          f'links = ["mqtt"]\n[[servers]]\nmodel = "AS-B"\n'
                          f'count = {per_site - per_site // 2}\nlinks = ["mqtt"]\n')
            procs.append(subprocess.Popen(
                [str(BIN / "licsim"), "run", str(sc), "--workdir", str(root / f"fleet{i}"),
                 "--summary-json", str(root / f"summary{i}.json")],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        urls = []
        for i, p in enumerate(procs):
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"licsim of site {i} did not get ready: {line!r}")
            urls.append(f"{line.split(' broker ')[1].split()[0]}/plant-{i}")
        ready = time.perf_counter() - t0
        time.sleep(2.0)
        rss = 0
        for p in procs:
            rss += _rss_kib(p.pid) + sum(_rss_kib(c) for c in _children(p.pid))
        t = time.perf_counter()
        with ThreadPoolExecutor(sites) as pool:
            results = list(pool.map(lambda a: _gather(*a),
                                    [(u, root / f"site{i}.info") for i, u in enumerate(urls)]))
        wall = time.perf_counter() - t
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=600)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    summaries: list[dict[str, Any]] = [json.loads((root / f"summary{i}.json").read_text())
                                       for i in range(sites)]
    shutil.rmtree(root, ignore_errors=True)
    ok = sum(1 for _t, code, _last in results if code == 0)
    held = all(s["ok"] for s in summaries)
    per = [s["memory"]["per_server_kib"] for s in summaries]
    return [
        (f"stretch: {total:,} servers as {sites} sites, each a `licsim` process with its own "
         f"mosquitto", f"{ready:.1f} s until all {sites} printed `ready`",
         f"resident memory of the {sites} licsim and {sites} mosquitto processes together "
         f"{rss / 1024:.0f} MiB ({rss / total:.1f} KiB per server, brokers included); licsim "
         f"alone {min(per):.1f} to {max(per):.1f} KiB per server beyond its start"),
        (f"stretch: `licadmin gather` of the {sites} sites at once", f"{wall:.1f} s",
         f"{ok} of {sites} exited 0; per site "
         + ", ".join(f"{t:.1f} s" for t, _c, _l in results)
         + f"; every licsim's invariants held: {'yes' if held else 'NO'}"),
    ]


if __name__ == "__main__":
    args = [int(x) for x in sys.argv[1:3]]
    for row in sites_rows(*args):
        print(" | ".join(row))

"""Benchmark (issue 18, item 5): 100,000 simulated servers as 10 sites, each a `licsim` process
with its own mosquitto bridged over TLS to one headquarters mosquitto; every site gathered
with `licadmin` through headquarters.

``bridged_rows()`` returns rows for the README table written by ``tests/bench/run.py``.
Run alone with ``python tests/bench/bridged_sites.py [SITES] [PER_SITE]``.

Headquarters runs the repository's broker configuration (contrib/mosquitto/mosquitto.conf:
TLS, client certificates, ACL) on loopback; each licsim run has ``[broker] bridge_to``, so
its own broker carries ``lic/SITE/#`` to headquarters with the bridge's certificate. Once
every site printed ``ready`` and headquarters lists every server, the ten sites are
gathered at once, each by its own ``licadmin gather --server mqtts://HQ/SITE?...`` (each
with a certificate of its own: one certificate, one session at headquarters). Memory is
the resident memory of every licsim and site mosquitto and of headquarters, added up.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.bench.licsim_sites import _children, _rss_kib  # noqa: E402

__all__ = ["bridged_rows"]

BIN = Path(sys.executable).parent
SITES = 10
PER_SITE = 10_000
GATHER_GOAL = 120.0
MEMORY_GOAL_KIB = 16.0


def _gather(url: str, out: Path) -> tuple[float, int, str]:
    """One site's ``licadmin gather``: seconds, exit code, and its last line (stderr on a
    failure)."""
    t = time.perf_counter()
    p = subprocess.run([str(BIN / "licadmin"), "gather", "--server", url, "--out", str(out)],
                       capture_output=True, text=True, timeout=1800, check=False)
    text = p.stdout if p.returncode == 0 else (p.stderr or p.stdout)
    return time.perf_counter() - t, p.returncode, (text.strip().splitlines() or [""])[-1]


def bridged_rows(sites: int = SITES, per_site: int = PER_SITE) -> list[tuple[str, str, str]]:
    from hw.backends.mqtt import discover
    from simulators.mqttlite.limits import raise_fd_limit
    from tests.hw.mosquitto import Broker

    raise_fd_limit()
    root = Path(tempfile.mkdtemp(prefix="licbench-bridged-", dir="/dev/shm"))
    names = [f"plant-{i}" for i in range(sites)]
    hq = Broker.secure(root / "hq")
    pki = hq.pki
    assert pki is not None
    acl = root / "hq" / "acl"
    acl.write_text(acl.read_text() + "".join(
        f"\nuser bridge-{n}\ntopic readwrite lic/{n}/#\n"
        f"\nuser admin-{n}\ntopic write lic/+/+/req\ntopic read lic/+/+/presence\n"
        f"topic read lic/+/+/resp/+\ntopic readwrite lic/+/_admin/#\n" for n in names))
    hq.start()
    procs: list[subprocess.Popen[str]] = []
    total = sites * per_site
    try:
        t0 = time.perf_counter()
        for i, n in enumerate(names):
            cert, key = pki.client(f"bridge-{n}")
            sc = root / f"{n}.toml"
            sc.write_text(f'site = "{n}"\nseed = {300 + i}\n[broker]\nstart = true\n'
                          f'bridge_to = "mqtts://127.0.0.1:{hq.port}?ca={pki.ca_cert}'
                          f'&cert={cert}&key={key}"\n'
                          f'[[servers]]\nmodel = "AS-P"\ncount = {per_site // 2}\n'
                          f'links = ["mqtt"]\n[[servers]]\nmodel = "AS-B"\n'
                          f'count = {per_site - per_site // 2}\nlinks = ["mqtt"]\n')
            procs.append(subprocess.Popen(
                [str(BIN / "licsim"), "run", str(sc), "--workdir", str(root / f"fleet{i}")],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
        for i, p in enumerate(procs):
            assert p.stdout is not None
            line = p.stdout.readline()
            if not line.startswith("ready"):
                raise RuntimeError(f"licsim of site {names[i]} did not get ready: {line!r}")
        urls = []
        for n in names:
            cert, key = pki.client(f"admin-{n}")
            url = f"mqtts://127.0.0.1:{hq.port}/{n}?ca={pki.ca_cert}&cert={cert}&key={key}"
            # the default ?timeout: ten gathers at once make headquarters send 100,000
            # retained presences, and a listing waits as long as they keep coming
            deadline = time.monotonic() + 600
            while len(discover(url, timeout=30)) < per_site:  # every presence bridged
                if time.monotonic() > deadline:
                    raise RuntimeError(f"headquarters does not list all of {n}")
                time.sleep(1)
            urls.append(url)
        ready = time.perf_counter() - t0
        rss = _rss_kib(hq.proc.pid) if hq.proc is not None else 0
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
        hq.stop()
        shutil.rmtree(root, ignore_errors=True)
    ok = sum(1 for _t, code, _last in results if code == 0)
    per = rss / total
    return [
        (f"{total:,} servers as {sites} sites, each a `licsim` with its own mosquitto bridged "
         "over TLS to headquarters",
         f"{per:.1f} KiB per server (goal at most {MEMORY_GOAL_KIB:g})",
         f"resident memory of the {sites} licsim, {sites} site mosquitto and the headquarters "
         f"mosquitto together: {rss / 1024:.0f} MiB; {ready:.1f} s until headquarters listed "
         "every server"),
        (f"`licadmin gather` of the {sites} sites at once through headquarters",
         f"{wall:.1f} s (goal at most {GATHER_GOAL:g} s: "
         f"{'met' if wall <= GATHER_GOAL and ok == sites else 'not met'})",
         f"{ok} of {sites} exited 0 (the default ?timeout: a listing waits while presence "
         f"keeps coming); per site "
         + ", ".join(f"{t:.1f} s" + ("" if c == 0 else f" (exit {c}: {last[:160]})")
                     for t, c, last in results)),
    ]


if __name__ == "__main__":
    args = [int(x) for x in sys.argv[1:3]]
    for row in bridged_rows(*args):
        print(" | ".join(row))

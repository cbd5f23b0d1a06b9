"""`make run`: a local site of agent daemons and a licensing server, through the whole workflow.

Four simulated automation servers (AS-P, AS-B, Edge Server) run as real
`licagent run` subprocesses on loopback, `licserver serve` keeps the ledger,
and `licadmin` takes the site through activation, a subscription expansion
that needs a reclaim, and a reclaim with confirmation. Nothing is left running.
"""

from __future__ import annotations

import json
import os
import select
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
SERVERS = [
    ("as-p-01", "AS-P", "AS-P-21480137", ["00:80:f4:12:34:01"]),
    ("as-p-02", "AS-P", "AS-P-21480138", ["00:80:f4:12:34:02"]),
    ("as-b-01", "AS-B", "AS-B-33020042", ["00:80:f4:12:35:02"]),
    ("edge-01", "Edge-Server", "ES-5CG1234XYZ", ["52:54:00:ab:cd:01", "52:54:00:ab:cd:02"]),
]


class Site:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen[bytes]] = []
        self.failures = 0

    def run(self, *argv: str, expect: int = 0, show: bool = True) -> str:
        shown = " ".join(shlex.quote(a.replace(str(self.root) + "/", "")) for a in argv)
        p = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=self.root,
                           capture_output=True, text=True, check=False, timeout=120)
        if show:
            print(f"  $ {shown}")
            for line in (p.stdout + p.stderr).strip().splitlines():
                print(f"    {line}")
        if p.returncode != expect:
            print(f"    [exit {p.returncode}, expected {expect}: UNEXPECTED]")
            if not show:
                print(f"  $ {shown}\n{p.stdout}{p.stderr}")
            self.failures += 1
        return p.stdout

    def start(self, *argv: str, prefix: str) -> str:
        """Start a long-running tool; return the rest of its first line starting with prefix."""
        proc = subprocess.Popen([str(BIN / argv[0]), *argv[1:]], cwd=self.root,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        assert proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.decode().splitlines():
                    if line.startswith(prefix):
                        return line[len(prefix):].strip()
        raise RuntimeError(f"{argv[0]} did not start: {buf.decode()}")

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def step(title: str) -> None:
    print(f"\n== {title}")


def main() -> int:
    t0 = time.monotonic()
    root = Path(os.environ.get("DEMO_DIR") or tempfile.mkdtemp(prefix="licsite-"))
    root.mkdir(parents=True, exist_ok=True)
    site = Site(root)
    try:
        return _run(site, root, t0)
    finally:
        site.stop_all()


def _run(site: Site, root: Path, t0: float) -> int:
    print(f"A local site of four automation servers and a licensing server, in {root}")
    step("Vendor: signing key, and a purchase recorded as entitlement E-1001")
    site.run("licserver", "keygen", "--out", f"{root}/vendor")
    site.run("licserver", "entitle", "--db", f"{root}/ledger.db", "--entitlement", "E-1001",
             "--product", "BO-site-bundle", "--feature", "bacnet-ip=300",
             "--feature", "trend-log=100", "--feature", "web-station=25", "--until", "2027-12-31")
    token = f"{root}/vendor-admin.token"
    site.run("licserver", "token", "create", "--db", f"{root}/ledger.db", "--role",
             "vendor-admin", "--out", token)
    url = site.start("licserver", "serve", "--db", f"{root}/ledger.db", "--key",
                     f"{root}/vendor/vendor.key", "--port", "0", "--quiet", prefix="serving ")
    print(f"  licensing server at {url}")
    online = ["--licensing-server", url, "--token-file", token]

    step("Provision the servers and start their agent daemons on loopback")
    urls: dict[str, str] = {}
    toml = ['site = "demo-site"']
    for name, model, serial, macs in SERVERS:
        facts = root / f"{name}.facts.json"
        facts.write_text(json.dumps({"model": model, "serial": serial, "macs": macs}))
        site.run("licagent", "init", "--state", f"{root}/{name}", "--facts", str(facts),
                 "--model", model, "--serial", serial, "--trust", f"{root}/vendor/vendor.pub",
                 show=False)
        urls[name] = site.start("licagent", "run", "--state", f"{root}/{name}", "--facts",
                                str(facts), "--listen", "tcp://127.0.0.1:0", prefix="listening ")
        toml += ["", "[[server]]", f'name = "{name}"', f'url = "{urls[name]}"']
        print(f"  {name:<8} {model:<12} {urls[name]}")
    (root / "site.toml").write_text("\n".join(toml) + "\n")
    ids = {n: json.loads(site.run("licadmin", "status", "--server", u, "--json",
                                  show=False))["device_id"] for n, u in urls.items()}

    step("Online: assign licenses from E-1001 to each server")
    plan = {"as-p-01": ["bacnet-ip=100", "trend-log=50"], "as-p-02": ["bacnet-ip=100"],
            "as-b-01": ["bacnet-ip=50", "trend-log=20"], "edge-01": ["web-station=25"]}
    for name, feats in plan.items():
        args = [a for f in feats for a in ("--feature", f)]
        site.run("licadmin", "assign", *online, "--entitlement", "E-1001",
                 "--device", ids[name], *args)

    step("Activation, steps 1 to 6 one by one (offline site, online office)")
    w = root / "activate"
    w.mkdir()
    site.run("licadmin", "gather", "--servers", "site.toml", "--out", f"{w}/site.info")
    site.run("licadmin", "license-info", "--site-info", f"{w}/site.info", *online,
             "--out", f"{w}/license.info")
    site.run("licadmin", "requests", "--license-info", f"{w}/license.info", "--servers",
             "site.toml", "--out-dir", f"{w}/requests")
    site.run("licadmin", "upload", "--requests", f"{w}/requests", *online,
             "--out-dir", f"{w}/responses")
    site.run("licadmin", "send", "--responses", f"{w}/responses", "--servers", "site.toml",
             "--receipts-out", f"{w}/receipts")
    site.run("licadmin", "confirm", "--receipts", f"{w}/receipts", *online)
    site.run("licadmin", "check", "--server", urls["as-p-01"], "bacnet-ip")

    step("Subscription expansion: as-p-02 moves from 100 to 250 BACnet/IP points (E-1002)")
    site.run("licserver", "entitle", "--db", f"{root}/ledger.db", "--entitlement", "E-1002",
             "--product", "BACnet-IP-expansion", "--feature", "bacnet-ip=250",
             "--until", "2028-12-31")
    site.run("licadmin", "assign", *online, "--entitlement", "E-1001",
             "--device", ids["as-p-02"], "--feature", "bacnet-ip=0")
    site.run("licadmin", "reclaim", "--server", urls["as-p-02"], *online,
             "--work-dir", f"{root}/expand")
    site.run("licadmin", "assign", *online, "--entitlement", "E-1002",
             "--device", ids["as-p-02"], "--feature", "bacnet-ip=250")
    site.run("licadmin", "activate", "--server", urls["as-p-02"], *online,
             "--work-dir", f"{root}/expand2")

    step("Reclaim with confirmation: as-b-01 is being replaced")
    site.run("licadmin", "assign", *online, "--entitlement", "E-1001",
             "--device", ids["as-b-01"], "--feature", "bacnet-ip=0", "--feature", "trend-log=0")
    site.run("licadmin", "reclaim", "--server", urls["as-b-01"], *online,
             "--work-dir", f"{root}/reclaim")
    site.run("licadmin", "check", "--server", urls["as-b-01"], "bacnet-ip", expect=1)

    step("Each server's licenses")
    print(f"  {'server':<9} {'feature':<13} {'count':>5}  until")
    for name, u in urls.items():
        st = json.loads(site.run("licadmin", "status", "--server", u, "--json", show=False))
        for lic in st["licenses"] or [{"feature": "-", "count": 0, "not_after": None}]:
            print(f"  {name:<9} {lic['feature']:<13} {lic['count']:>5}  "
                  f"{lic['not_after'] or 'perpetual'}")
    step("The ledger")
    site.run("licserver", "report", "--db", f"{root}/ledger.db")

    elapsed = time.monotonic() - t0
    print()
    if site.failures:
        print(f"site demo finished with {site.failures} unexpected result(s) in {elapsed:.0f} s")
        return 1
    print(f"site demo finished in {elapsed:.0f} s: activation, expansion and reclaim complete; "
          f"every daemon and the licensing server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())

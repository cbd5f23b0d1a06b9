"""`make run`: the whole offline activation and reclaim round trip on three simulated servers.

Every step runs the real command-line tools in subprocesses, as a field
engineer would, and prints the command and what it said.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

SERVERS = [
    ("as-p-01", "AS-P", "AS-P-21480137", ["00:80:f4:12:34:01"]),
    ("as-b-01", "AS-B", "AS-B-33020042", ["00:80:f4:12:35:02"]),
    ("edge-01", "Edge-Server", "ES-5CG1234XYZ", ["52:54:00:ab:cd:01", "52:54:00:ab:cd:02"]),
]

TOOLS = {"licagent": "apps.licagent.cli", "licserver": "simulators.licensing_server.cli"}


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.failures = 0

    def run(self, *argv: str, facts: Path | None = None, expect: int = 0) -> str:
        tool, *rest = argv
        env = dict(os.environ)
        if facts is not None:
            env["LICAGENT_FACTS"] = str(facts)
        shown = " ".join(shlex.quote(a.replace(str(self.root) + "/", "")) for a in argv)
        prefix = f"LICAGENT_FACTS={facts.name} " if facts is not None else ""
        print(f"  $ {prefix}{shown}")
        proc = subprocess.run(
            [sys.executable, "-m", TOOLS[tool], *rest], cwd=self.root, env=env,
            capture_output=True, text=True, check=False,
        )
        for line in (proc.stdout + proc.stderr).strip().splitlines():
            print(f"    {line}")
        mark = "ok" if proc.returncode == expect else "UNEXPECTED"
        print(f"    [exit {proc.returncode}, expected {expect}: {mark}]")
        if proc.returncode != expect:
            self.failures += 1
        return proc.stdout


def step(title: str) -> None:
    print(f"\n== {title}")


def main() -> int:
    keep = os.environ.get("DEMO_DIR")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="licdemo-"))
    root.mkdir(parents=True, exist_ok=True)
    d = Demo(root)
    for sub in ("vendor", "site", "requests", "responses", "receipts", "hw"):
        (root / sub).mkdir(exist_ok=True)
    print(f"Offline license activation and reclaim, in {root}")

    step("Vendor: create the licensing server's signing key")
    d.run("licserver", "keygen", "--out", f"{root}/vendor")

    step("Provision three simulated servers (each gets its own device key and trusted store)")
    facts: dict[str, Path] = {}
    for name, model, serial, macs in SERVERS:
        f = root / "hw" / f"{name}.json"
        f.write_text(json.dumps({"model": model, "serial": serial, "macs": macs}))
        facts[name] = f
        d.run("licagent", "init", "--state", f"{root}/{name}", "--model", model,
              "--serial", serial, "--trust", f"{root}/vendor/vendor.pub", facts=f)

    step("Step 1 (offline, at the site): gather server information")
    for name, *_ in SERVERS:
        d.run("licagent", "info", "--state", f"{root}/{name}", "--out",
              f"{root}/site/{name}.info", facts=facts[name])

    grants = {
        "as-p-01": ["bacnet-ip=200", "trend-log=50@2027-12-31"],
        "as-b-01": ["bacnet-ip=50", "modbus=10"],
        "edge-01": ["web-station=25", "ews-api=1@2027-06-30"],
    }
    step("Step 3 (offline): each server signs its own activation request")
    for name, *_ in SERVERS:
        feats = [g.split("=")[0] for g in grants[name]]
        args = [a for f in feats for a in ("--feature", f)]
        d.run("licagent", "request", "--state", f"{root}/{name}", "activate", *args,
              "--out", f"{root}/requests/{name}.req", facts=facts[name])

    step("Step 4 (online): upload the requests; the licensing server answers each")
    for name, *_ in SERVERS:
        args = [a for g in grants[name] for a in ("--grant", g)]
        d.run("licserver", "issue", "--key", f"{root}/vendor/vendor.key", "--request",
              f"{root}/requests/{name}.req", *args, "--out", f"{root}/responses/{name}.resp")

    step("Step 5 (offline): send the responses back; each server verifies and applies its own")
    for name, *_ in SERVERS:
        d.run("licagent", "apply", "--state", f"{root}/{name}", f"{root}/responses/{name}.resp",
              "--receipt-out", f"{root}/receipts/{name}.activate.receipt", facts=facts[name])
    d.run("licagent", "status", "--state", f"{root}/as-p-01", facts=facts["as-p-01"])
    d.run("licagent", "check", "--state", f"{root}/as-p-01", "bacnet-ip", facts=facts["as-p-01"])
    d.run("licagent", "check", "--state", f"{root}/as-p-01", "modbus", facts=facts["as-p-01"],
          expect=1)

    step("A response carried to the wrong server is refused, and nothing changes")
    d.run("licagent", "apply", "--state", f"{root}/as-b-01", f"{root}/responses/as-p-01.resp",
          facts=facts["as-b-01"], expect=5)
    step("Applying the same response twice is a harmless no-op")
    d.run("licagent", "apply", "--state", f"{root}/as-p-01", f"{root}/responses/as-p-01.resp",
          facts=facts["as-p-01"])

    step("Reclaim, step 1 (offline): the AS-B is being replaced; gather its information again")
    d.run("licagent", "info", "--state", f"{root}/as-b-01", "--out",
          f"{root}/site/as-b-01.info", facts=facts["as-b-01"])
    step("Reclaim, step 2 (online): download license information (what is to be reclaimed)")
    d.run("licserver", "license-info", "--key", f"{root}/vendor/vendor.key", "--device-info",
          f"{root}/site/as-b-01.info", "--out", f"{root}/site/reclaim.licinfo")
    step("Reclaim, step 3 (offline): the server checks it and signs its reclaim request")
    d.run("licagent", "request", "--state", f"{root}/as-b-01", "reclaim", "--license-info",
          f"{root}/site/reclaim.licinfo", "--out", f"{root}/requests/as-b-01.reclaim.req",
          facts=facts["as-b-01"])
    step("Reclaim, steps 4 and 5: upload, answer, apply")
    d.run("licserver", "issue", "--key", f"{root}/vendor/vendor.key", "--request",
          f"{root}/requests/as-b-01.reclaim.req", "--remove", "bacnet-ip", "--remove", "modbus",
          "--out", f"{root}/responses/as-b-01.reclaim.resp")
    d.run("licagent", "apply", "--state", f"{root}/as-b-01",
          f"{root}/responses/as-b-01.reclaim.resp", "--receipt-out",
          f"{root}/receipts/as-b-01.reclaim.receipt", facts=facts["as-b-01"])
    d.run("licagent", "check", "--state", f"{root}/as-b-01", "bacnet-ip", facts=facts["as-b-01"],
          expect=1)
    step("Step 6 (online): the vendor verifies the receipt, the proof that the licenses left")
    d.run("licserver", "verify-receipt", "--trust", f"{root}/vendor/vendor.pub",
          f"{root}/receipts/as-b-01.reclaim.receipt")

    step("Replaying the old activation on the reclaimed server is refused (no resurrection)")
    d.run("licagent", "apply", "--state", f"{root}/as-b-01", f"{root}/responses/as-b-01.resp",
          facts=facts["as-b-01"], expect=6)
    step("The audit journal of the reclaimed server verifies")
    d.run("licagent", "journal", "--state", f"{root}/as-b-01", "--verify",
          facts=facts["as-b-01"])

    print()
    if d.failures:
        print(f"demo finished with {d.failures} unexpected result(s)")
        return 1
    print("demo finished: activation and reclaim round trip complete, every step as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmarks of the agent inside the emulated arm64 server (qemu://, `make qemu-image`).

``qemu_rows()`` returns rows for the README table written by ``tests/bench/run.py``:
guest boot to agent-ready, and the latency of one apply-response over the LAN port
with the agent in the guest against the same operation on a host daemon, as a
ratio; plus `licagent status` start-up under qemu-aarch64 user-mode emulation.
Run alone with ``python tests/bench/qemu.py``. Without a built image the rows say so.
"""

from __future__ import annotations

import json
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
from agent.errors import UsageError  # noqa: E402
from hw.backends.qemu import QemuGuest, default_image_dir, load_manifest  # noqa: E402
from simulators.licensing_server.vendor import Grant, Vendor  # noqa: E402

__all__ = ["qemu_rows"]

BIN = Path(sys.executable).parent
APPLIES = 20


def _ms(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e3:.1f} ms (max {max(xs) * 1e3:.1f} ms)"


def apply_latencies(url: str, vendor: Vendor, n: int = APPLIES) -> list[float]:
    """n request/issue/apply rounds over ``url``; the seconds each apply-response took."""
    out = []
    with hw.connect(f"{url}?timeout=30") as c:
        c.status()  # hello done before timing
        for i in range(n):
            req = c.request("activate", [f"feature-{i}"])
            resp = vendor.issue(req, [Grant(f"feature-{i}", 1)], now=int(time.time()))
            t = time.perf_counter()
            c.apply(resp)
            out.append(time.perf_counter() - t)
    return out


def host_daemon_latencies(tmp: Path, vendor: Vendor) -> list[float]:
    facts = tmp / "facts.json"
    facts.write_text(json.dumps({"model": "AS-P", "serial": "HOST-1",
                                 "macs": ["00:80:f4:00:00:01"]}))
    subprocess.run([str(BIN / "licagent"), "init", "--state", str(tmp / "host"), "--facts",
                    str(facts), "--model", "AS-P", "--serial", "HOST-1", "--trust",
                    str(tmp / "vendor.pub")], check=True, capture_output=True)
    proc = subprocess.Popen([str(BIN / "licagent"), "run", "--state", str(tmp / "host"),
                             "--facts", str(facts), "--listen", "tcp://127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        url = line.split()[1]
        return apply_latencies(url, vendor)
    finally:
        proc.terminate()
        proc.wait(15)
        if proc.stdout is not None:
            proc.stdout.close()


def user_mode_status(image: Path, tmp: Path) -> list[float]:
    """`licagent status` wall time under qemu-aarch64 -L ROOTFS (the fast lane)."""
    rootfs = Path(load_manifest(image)["rootfs"])
    facts = tmp / "facts.json"
    launcher = (f"import sys; sys.path.insert(0, {str(rootfs / 'opt/licagent')!r}); "
                "from apps.licagent.cli import main; sys.exit(main())")
    base = ["qemu-aarch64", "-L", str(rootfs), str(rootfs / "usr/bin/python3"), "-c", launcher]
    subprocess.run([*base, "init", "--state", str(tmp / "um"), "--facts", str(facts), "--model",
                    "AS-P", "--serial", "HOST-1", "--trust", str(tmp / "vendor.pub")],
                   check=True, capture_output=True)
    out = []
    for _ in range(5):
        t = time.perf_counter()
        subprocess.run([*base, "status", "--state", str(tmp / "um"), "--facts", str(facts)],
                       check=True, capture_output=True)
        out.append(time.perf_counter() - t)
    return out


def qemu_rows() -> list[tuple[str, str, str]]:
    image = default_image_dir()
    try:
        load_manifest(image)
    except UsageError:
        return [("qemu:// guest boot to agent ready", "not measured",
                 "no guest image: run `make qemu-image`")]
    vendor = Vendor(SigningKey.generate())
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="licbench-qemu-") as d:
        tmp = Path(d)
        (tmp / "vendor.pub").write_bytes(vendor.public.to_pem())
        guest = QemuGuest(tmp / "state.img", image, trust=tmp / "vendor.pub",
                          serial="AS-P-BENCH-1")
        boots = []
        first = 0.0
        for i in range(4):
            guest.start()
            if i == 0:
                first = guest.ready_seconds
            else:
                boots.append(guest.ready_seconds)
            if i < 3:
                guest.stop()
        try:
            in_guest = apply_latencies(guest.tcp_url, vendor)
        finally:
            guest.stop()
        on_host = host_daemon_latencies(tmp, vendor)
        um = user_mode_status(image, tmp)
    ratio = statistics.median(in_guest) / statistics.median(on_host)
    rows.append(("qemu:// guest boot to agent ready", f"{statistics.median(boots):.2f} s",
                 f"qemu-system-aarch64 -M virt -cpu cortex-a57 (TCG, 1 vCPU); median of "
                 f"{len(boots)} boots; the first boot, which provisions the store, "
                 f"{first:.2f} s"))
    rows.append(("apply a response, agent in the arm64 guest", _ms(in_guest),
                 f"over the forwarded LAN port, {APPLIES} applies; "
                 f"{ratio:.1f}x the same operation on a host daemon ({_ms(on_host)})"))
    rows.append(("`licagent status` under qemu-aarch64 user mode", _ms(um),
                 "start-up included, 5 runs; the test lane without a guest kernel"))
    return rows


if __name__ == "__main__":
    for row in qemu_rows():
        print(" | ".join(row))
    sys.exit(0)

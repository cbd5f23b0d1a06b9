"""``licsim run`` as a real subprocess: the ready line, --duration, SIGTERM, the summary JSON, exit codes.

And a full activation round trip of ``licadmin`` against fleet servers, with
``licserver serve`` holding the ledger: the test bench use of the simulator.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hw.mosquitto import mosquitto_path

BIN = Path(sys.executable).parent
WAIT = 120.0  # an upper bound for a step; never asserted as a time

SCENARIO = """\
site = "plant-7"
seed = 5
{extra}
[broker]
start = true

[[servers]]
model = "AS-P"
count = 4
links = ["tcp", "pty", "usbdrop", "mqtt"]
licenses = {{ bacnet-ip = 100 }}

[[servers]]
model = "AS-B"
count = 4
links = ["tcp", "pty", "usbdrop", "mqtt"]

[[servers]]
model = "Edge-Server"
count = 4
links = ["tcp", "mqtt"]

[load]
rate = 40

[faults]
seed = 9
every = 0.2
count = 6
kinds = ["power-loss", "link", "clock-jump", "nic-replaced", "clone-store", "reclaim"]
schedule = [{{ kind = "broker-restart", at = 0.1 }}]
"""


class Licsim:
    """One ``licsim run`` process; reads its stdout line by line."""

    def __init__(self, cwd: Path, *args: str) -> None:
        self.proc = subprocess.Popen([str(BIN / "licsim"), "run", *args], cwd=cwd,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.out = b""

    def wait_for(self, prefix: str) -> str:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            for line in self.out.decode(errors="replace").splitlines(keepends=True):
                if line.startswith(prefix) and line.endswith("\n"):
                    return line.strip()
            r, _w, _x = select.select([self.proc.stdout], [], [], 0.5)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                self.out += chunk
        raise AssertionError(f"no line starting {prefix!r}: {self.out.decode()} "
                             f"{self.finish()[1]}")

    def finish(self) -> tuple[int, str]:
        out, err = self.proc.communicate(timeout=WAIT)
        self.out += out
        return self.proc.returncode, err.decode(errors="replace")

    def kill(self) -> None:
        """SIGTERM (licsim removes its folder and stops its broker), SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


@pytest.fixture
def licsim(tmp_path: Path) -> Iterator[list[Licsim]]:
    mosquitto_path()
    started: list[Licsim] = []
    yield started
    for p in started:
        p.kill()


def test_run_for_a_duration_with_faults_and_load_writes_the_summary(
        tmp_path: Path, licsim: list[Licsim]) -> None:
    (tmp_path / "s.toml").write_text(SCENARIO.format(extra=""))
    p = Licsim(tmp_path, "s.toml", "--duration", "2", "--summary-json", "sum.json")
    licsim.append(p)
    ready = p.wait_for("ready")
    assert ready.startswith("ready 12 servers site plant-7 (mqtt 12, pty 8, tcp 12, usbdrop 8)")
    code, err = p.finish()
    assert code == 0, (p.out.decode(), err)
    s = json.loads((tmp_path / "sum.json").read_text())
    assert s["ok"] is True
    assert s["servers"]["started"] == 12
    assert s["servers"]["by_model"] == {"AS-P": 4, "AS-B": 4, "Edge-Server": 4}
    assert s["servers"]["by_link"] == {"tcp": 12, "pty": 8, "usbdrop": 8, "mqtt": 12}
    assert s["operations"]["done"] > 0 and s["latency_ms"]["count"] == s["operations"]["done"]
    assert set(s["operations"]["by_op"]) <= {"status", "check", "info"}
    assert s["faults"]["by_kind"]["broker-restart"] == 1
    assert s["faults"]["injected"] >= 2
    assert all(f["held"] for f in s["faults"]["log"])
    assert all(i["held"] for i in s["invariants"])
    assert {"lost", "duplicated"} <= set(s["messages"])
    text = p.out.decode()
    assert "invariants:" in text and text.rstrip().endswith("all invariants held")
    assert "broker-restart" in text
    # the temporary working folder is gone, no broker is left running
    workdir = ready.split(" workdir ")[1]
    assert not Path(workdir).exists()


def test_sigterm_stops_the_fleet_and_still_reports(tmp_path: Path, licsim: list[Licsim]) -> None:
    (tmp_path / "s.toml").write_text(SCENARIO.format(extra='state_dir = "fleet"'))
    p = Licsim(tmp_path, "s.toml", "--summary-json", "sum.json", "--urls", "servers.toml")
    licsim.append(p)
    p.wait_for("ready")
    servers = (tmp_path / "servers.toml").read_text()
    assert servers.count("[[server]]") == 12 + 8 + 8 + 12
    p.proc.send_signal(signal.SIGTERM)
    code, err = p.finish()
    assert code == 0, (p.out.decode(), err)
    assert "SIGTERM received, stopped" in p.out.decode()
    assert json.loads((tmp_path / "sum.json").read_text())["ok"] is True
    assert (tmp_path / "fleet" / "servers").is_dir()  # state_dir is kept
    # a second run finds the same servers in state_dir (same device IDs)
    p2 = Licsim(tmp_path, "s.toml", "--duration", "0", "--summary-json", "sum2.json")
    licsim.append(p2)
    assert p2.finish()[0] == 0
    assert json.loads((tmp_path / "sum2.json").read_text())["ok"] is True


@pytest.mark.parametrize(("text", "message"), [
    ('site = "x"\ncolour = 1\n[[servers]]\nmodel = "AS-P"\n', "unknown key colour"),
    ('[[servers]]\nmodel = "Edge-Server"\nlinks = ["tcp", "pty"]\n',
     "a Edge-Server has no pty link"),
    ('[[servers]]\nmodel = "AS-Q"\n', "unknown model 'AS-Q'"),
    ('[[servers]]\nmodel = "AS-P"\nlinks = ["modbus"]\n', "unknown link 'modbus'"),
    ("[[servers]\n", "is not valid TOML"),
])
def test_bad_scenarios_are_usage_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "s.toml").write_text(text)
    p = subprocess.run([str(BIN / "licsim"), "run", "s.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=WAIT, check=False)
    assert p.returncode == 2, p
    assert message in p.stderr and p.stderr.startswith("licsim: usage: ")
    assert "ready" not in p.stdout


def test_missing_scenario_and_bad_flags_exit_2(tmp_path: Path) -> None:
    p = subprocess.run([str(BIN / "licsim"), "run", "nope.toml"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=WAIT, check=False)
    assert p.returncode == 2 and "cannot read scenario nope.toml" in p.stderr
    p = subprocess.run([str(BIN / "licsim"), "run", "nope.toml", "--duration", "x"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=WAIT, check=False)
    assert p.returncode == 2


# ---------------------------------------------------------------- a test bench round trip


def _run(cwd: Path, *argv: str, code: int = 0) -> str:
    p = subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True,
                       text=True, timeout=WAIT, check=False)
    assert p.returncode == code, (argv, p.returncode, p.stdout, p.stderr)
    return p.stdout


def test_activation_round_trip_with_licadmin_and_licserver(tmp_path: Path,
                                                           licsim: list[Licsim]) -> None:
    _run(tmp_path, "licserver", "keygen", "--out", "vendor")
    (tmp_path / "s.toml").write_text(
        'site = "bench"\nseed = 2\ntrust = "vendor/vendor.pub"\n'
        'vendor_key = "vendor/vendor.key"\n[broker]\nstart = true\n'
        '[[servers]]\nmodel = "AS-P"\ncount = 2\nlinks = ["tcp", "mqtt"]\n'
        '[[servers]]\nmodel = "AS-B"\ncount = 1\nlinks = ["pty"]\n'
        '[[servers]]\nmodel = "Edge-Server"\ncount = 1\nlinks = ["mqtt"]\n')
    sim = Licsim(tmp_path, "s.toml", "--urls", "servers.toml", "--summary-json", "sum.json")
    licsim.append(sim)
    sim.wait_for("ready")
    _run(tmp_path, "licserver", "entitle", "--db", "ledger.db", "--entitlement", "E-1",
         "--product", "bench", "--feature", "bacnet-ip=500", "--until", "2099-12-31")
    srv = subprocess.Popen([str(BIN / "licserver"), "serve", "--db", "ledger.db", "--key",
                            "vendor/vendor.key", "--port", "0", "--quiet"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert srv.stdout is not None
        line = srv.stdout.readline().decode()
        assert line.startswith("serving "), line
        url = line.split()[1]
        # one URL per server: the AS-Ps over tcp, the AS-B's console, the Edge Server by mqtt
        want = {"as-p-0001 tcp", "as-p-0002 tcp", "as-b-0001 pty", "edge-server-0001 mqtt"}
        servers = [u for u, name in _urls(tmp_path / "servers.toml").items() if name in want]
        assert len(servers) == 4
        for u in servers:
            dev = json.loads(_run(tmp_path, "licadmin", "status", "--server", u, "--json"))
            _run(tmp_path, "licadmin", "assign", "--licensing-server", url, "--entitlement",
                 "E-1", "--device", dev["device_id"], "--feature", "bacnet-ip=100")
        args = [a for u in servers for a in ("--server", u)]
        _run(tmp_path, "licadmin", "activate", *args, "--licensing-server", url,
             "--work-dir", "act")
        for u in servers:
            _run(tmp_path, "licadmin", "check", "--server", u, "bacnet-ip")
        assert len(list((tmp_path / "act" / "receipts").iterdir())) == 4
    finally:
        srv.send_signal(signal.SIGTERM)
        srv.communicate(timeout=WAIT)
    sim.proc.send_signal(signal.SIGTERM)
    code, err = sim.finish()
    assert code == 0, (sim.out.decode(), err)
    s = json.loads((tmp_path / "sum.json").read_text())
    assert s["ok"] is True
    ent = next(i for i in s["invariants"] if i["name"] == "within-entitlement")
    assert "issued outside the fleet, not checked: bacnet-ip" in ent["detail"]


def _urls(path: Path) -> dict[str, str]:
    import tomllib

    data = tomllib.loads(path.read_text())
    return {s["url"]: s["name"] for s in data["server"]}

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
optional = {optional}
schedule = [{{ kind = "broker-restart", at = 0.1, optional = {optional} }}]
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
    (tmp_path / "s.toml").write_text(SCENARIO.format(extra="", optional="false"))
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
    # every fault due within the 2 s was injected, however long the earlier ones took
    assert s["faults"]["injected"] == 7 and s["faults"]["not_injected"] == 0
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
    # the faults are optional: a run stopped before them is still a good run
    (tmp_path / "s.toml").write_text(SCENARIO.format(extra='state_dir = "fleet"',
                                                     optional="true"))
    p = Licsim(tmp_path, "s.toml", "--summary-json", "sum.json", "--urls", "servers.toml")
    licsim.append(p)
    p.wait_for("ready")
    servers = (tmp_path / "servers.toml").read_text()
    assert servers.count("[[server]]") == 12 + 8 + 8 + 12
    p.proc.send_signal(signal.SIGTERM)
    code, err = p.finish()
    assert code == 0, (p.out.decode(), err)
    assert "SIGTERM received, stopped" in p.out.decode()
    s = json.loads((tmp_path / "sum.json").read_text())
    assert s["ok"] is True
    # never silently: each fault not reached is listed, as optional
    missed = [f for f in s["faults"]["log"] if not f["injected"]]
    assert s["faults"]["optional_not_injected"] == len(missed) >= 6
    assert all("the run was stopped at" in f["detail"] and f["optional"] for f in missed)
    assert "skipped (optional)" in p.out.decode()
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
    ('[broker]\nurl = "mqtt://127.0.0.1:1"\nstart = true\n[[servers]]\nmodel = "AS-P"\n',
     "exclude each other"),
    ('[[servers]]\nmodel = "AS-P"\n[[faults]]\nkind = "link"\noptional = "yes"\n',
     "[[faults]] #1 optional: must be true or false"),
    # a fault that could never be injected is refused before anything starts
    ('[[servers]]\nmodel = "AS-P"\nlinks = ["tcp"]\n[[faults]]\nkind = "broker-restart"\n',
     "[[faults]] #1 kind: broker-restart restarts licsim's own broker, and this fleet has none"),
    ('[broker]\nurl = "mqtt://127.0.0.1:1"\n[[servers]]\nmodel = "AS-P"\nlinks = ["mqtt"]\n'
     '[faults]\ncount = 1\nevery = 1\nkinds = ["link", "broker-restart"]\n',
     "[faults] kinds: broker-restart restarts"),
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


# ---------------------------------------------------------------- no fault dropped silently

UNFIT = """\
site = "unfit"
seed = 3

[[servers]]
model = "AS-P"
count = 2
links = ["tcp"]
licenses = {{ bacnet-ip = 10 }}

[[servers]]
model = "Edge-Server"
count = 1
links = ["tcp"]

[faults]
every = 5
count = 2
kinds = ["clock-jump"]
optional = {opt}
schedule = [
  {{ kind = "nic-replaced", at = 0.1, server = "as-p-0001" }},
  {{ kind = "nic-replaced", at = 0.1, server = "as-p-0099", optional = {opt} }},
  {{ kind = "reclaim", at = 0.2, server = "edge-server-0001", optional = {opt} }},
  {{ kind = "link", at = 0.3, server = "edge-server-0001", link = "pty", optional = true }},
  {{ kind = "clock-jump", at = 30, optional = {opt} }},
]
"""


def test_faults_that_cannot_be_injected_are_listed_and_fail_the_run(
        tmp_path: Path, licsim: list[Licsim]) -> None:
    (tmp_path / "s.toml").write_text(UNFIT.format(opt="false"))
    p = Licsim(tmp_path, "s.toml", "--duration", "1", "--summary-json", "sum.json")
    licsim.append(p)
    code, err = p.finish()
    assert code == 1, (p.out.decode(), err)
    s = json.loads((tmp_path / "sum.json").read_text())
    assert s["ok"] is False
    assert (s["faults"]["injected"], s["faults"]["not_injected"],
            s["faults"]["optional_not_injected"]) == (1, 5, 1)
    missed = {(f["kind"], f["server"]): f["detail"] for f in s["faults"]["log"]
              if not f["injected"]}
    assert "no server 'as-p-0099' in this fleet" in missed["nic-replaced", "as-p-0099"]
    assert "nothing installed to reclaim" in missed["reclaim", "edge-server-0001"]
    assert "it has no pty link" in missed["link", "edge-server-0001"]
    assert missed["clock-jump", None].startswith("not reached: due at 30 s, but the run "
                                                 "ended at")
    assert [f["detail"].split(", but")[0] for f in s["faults"]["log"]
            if f["kind"] == "random"] == ["not reached: random fault 1 of 2, due at 5 s",
                                          "not reached: random fault 2 of 2, due at 10 s"]
    broken = [i for i in s["invariants"] if not i["held"]]
    assert [i["name"] for i in broken] == ["faults-injected"]
    assert broken[0]["detail"].startswith("5 of the scenario's 7 fault(s) not injected")
    text = p.out.decode()
    assert text.count(" NOT INJECTED  ") == 5 and text.count(" skipped (optional)  ") == 1
    assert "faults: 1 injected; nic-replaced 1; 5 NOT INJECTED; 1 optional not injected" in text
    assert text.rstrip().endswith("NOT OK: 5 fault(s) of the scenario not injected "
                                  "(listed above)")


def test_optional_faults_may_go_uninjected(tmp_path: Path, licsim: list[Licsim]) -> None:
    (tmp_path / "s.toml").write_text(UNFIT.format(opt="true"))
    p = Licsim(tmp_path, "s.toml", "--duration", "1", "--summary-json", "sum.json")
    licsim.append(p)
    code, err = p.finish()
    assert code == 0, (p.out.decode(), err)
    s = json.loads((tmp_path / "sum.json").read_text())
    assert s["ok"] is True and s["faults"]["optional_not_injected"] == 6
    inv = next(i for i in s["invariants"] if i["name"] == "faults-injected")
    assert inv["held"] and inv["detail"] == ("every fault of the scenario was injected (1 of 7; "
                                             "6 optional not injected)")
    assert p.out.decode().count("skipped (optional)") == 6


def test_the_example_scenario_does_what_its_comments_say(tmp_path: Path,
                                                         licsim: list[Licsim]) -> None:
    """Runs the command on the example's first line, as written, and checks its comments."""
    import re

    from simulators.fleet import load_scenario

    root = Path(__file__).parents[2]
    example = root / "simulators" / "fleet" / "examples" / "plant.toml"
    text = example.read_text()
    command = text.splitlines()[0].removeprefix("# ").split()
    assert command[:2] == ["licsim", "run"]
    sc = load_scenario(example)
    every, count = sc.random_faults.every, sc.random_faults.count
    # the comments' claims, against the scenario
    assert f"every = {every:g}" in text and "one random fault every half second" in text
    assert every == 0.5 and count == 12 and "twelve in all" in text
    assert "two faults on a schedule and twelve\n# at random" in text
    assert f"(at {every:.1f} s, {2 * every:.1f} s, ... {every * count:.1f} s)" in text
    assert f"The last random fault is due {every * count:g} s after ready" in text
    assert "two faults on a schedule" in text and len(sc.schedule) == 2
    duration = float(command[command.index("--duration") + 1])
    assert duration > every * count
    models = {g.model: g for g in sc.servers}
    assert models["AS-P"].licenses == {"bacnet-ip": 200, "trend-log": 50}
    assert re.search(r'model = "Edge-Server" +# a PC/VM: tcp, mqtt \(and sim\) only', text)
    (tmp_path / "simulators").symlink_to(root / "simulators")
    p = Licsim(tmp_path, *command[2:])
    licsim.append(p)
    code, err = p.finish()
    assert code == 0, (p.out.decode(), err)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["ok"] is True and s["servers"]["started"] == sc.total == 20
    assert s["faults"]["injected"] == count + len(sc.schedule)
    assert s["faults"]["not_injected"] == s["faults"]["optional_not_injected"] == 0
    first = s["faults"]["log"][:3]
    assert any(f["kind"] == "power-loss" and f["server"] == "as-p-0001"
               and "write step 6" in f["detail"] for f in first)
    assert s["load"]["target_per_s"] == 50


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
    _run(tmp_path, "licserver", "token", "create", "--db", "ledger.db", "--role", "site-admin",
         "--entitlement", "E-1", "--out", "site.token")
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
            _run(tmp_path, "licadmin", "assign", "--licensing-server", url, "--token-file",
                 "site.token", "--entitlement",
                 "E-1", "--device", dev["device_id"], "--feature", "bacnet-ip=100")
        args = [a for u in servers for a in ("--server", u)]
        _run(tmp_path, "licadmin", "activate", *args, "--licensing-server", url,
             "--token-file", "site.token",
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

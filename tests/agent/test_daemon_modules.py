"""The daemon's memory goal, held by its import set: a test fails when ``licagent run`` loads a
module that is not in the listed budget (tests/agent/daemon_modules.txt).

Idle RSS of the daemon must stay within 1.15x a bare Python with the same third-party
imports and one signature (``make bench`` measures it). Every module loaded costs resident
memory, so a new import on the daemon's path (argparse, dataclasses, json, asyncio, ...)
is caught here, by name, long before a benchmark run. Growing the budget is a decision:
add the module to the list only after ``make bench`` shows the goal still holds.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import hw
from tests.agent.test_daemon import WAIT, Agentd, listening

BUDGET = Path(__file__).with_name("daemon_modules.txt")

#: ``licagent run`` exactly as the console script runs it, writing its modules at exit
WRAPPER = (
    "import atexit, sys\n"
    "out = sys.argv.pop(1)\n"
    "atexit.register(lambda: open(out, 'w').write('\\n'.join(sorted(sys.modules)) + '\\n'))\n"
    "from apps.licagent.cli import main\n"
    "sys.exit(main())\n"
)


def budget() -> set[str]:
    return {line.strip() for line in BUDGET.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def daemon_modules(tmp_path: Path) -> set[str]:
    """The modules of a daemon serving pty + tcp after it answered real operations."""
    d = Agentd(tmp_path)
    out = tmp_path / "modules.txt"
    try:
        with open(d.log, "ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", WRAPPER, str(out), "run", "--state", str(d.state),
                 "--facts", str(d.facts), "--listen", "tcp://127.0.0.1:0", "--listen", "pty://"],
                env=d.env, stdout=subprocess.PIPE, stderr=log)
        d.procs.append(proc)
        addresses = listening(proc, 2)
        tcp = next(a for a in addresses if a.startswith("tcp://"))
        with hw.connect(tcp) as c:
            assert c.status()["sequence"] == 0
            assert c.check("bacnet")["licensed"] is False
            assert len(c.info()) > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
    finally:
        d.close()
    # how the package is installed (an editable finder) is not the daemon's own import
    return {m for m in out.read_text().split() if not m.startswith("__editable__")}


def test_the_daemon_loads_only_its_module_budget(tmp_path: Path) -> None:
    loaded = daemon_modules(tmp_path)
    assert "apps.licagent.daemon" in loaded and "hw.backends.tcp" in loaded  # it really ran
    extra = sorted(loaded - budget())
    assert not extra, (
        f"licagent run now imports {len(extra)} module(s) beyond its budget: {', '.join(extra)}. "
        "Keep them off the daemon's path (import lazily where only a tool needs them), or, "
        "if they are needed, add them to tests/agent/daemon_modules.txt after `make bench` "
        "shows the daemon's idle RSS still within 1.15x its floor.")


def test_the_budget_forbids_what_the_daemon_must_never_load() -> None:
    never = {"argparse", "dataclasses", "inspect", "ast", "tomllib", "asyncio",
             "paho", "simulators", "apps.licadmin", "sqlite3", "http.client"}
    assert not never & budget()
    assert socket  # the daemon serves sockets: a module the budget must hold
    assert "socket" in budget()

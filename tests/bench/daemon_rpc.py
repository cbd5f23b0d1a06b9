"""The daemon's answers over TCP against the same RPC stack with an empty handler (issue 17, item 2).

Two daemon processes serve the same store over ``tcp://127.0.0.1``, both built
exactly as ``licagent run`` builds its daemon (listener, sessions, framing, the
operation gate, the log line per operation, ``malloc_trim``, the operation table
:class:`agent.ops.AgentOps`): one with the real agent (it keeps its store open and
revalidates it under the lock on every request), one whose agent answers with what
it computed once at start (no store work at all: the floor). One client process calls ``check-feature`` and
``get-status`` on each in turn, so drift in the machine hits both alike.

Run alone: ``.venv/bin/python tests/bench/daemon_rpc.py`` (prints the rows).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

T0 = 1_800_000_000

SERVER = r"""
import io, os, sys, threading
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from agent.service import Agent
from apps.common import facts_provider
from apps.licagent.daemon import Daemon, DaemonConfig, make_logger

mode, state = sys.argv[2], Path(sys.argv[3])
agent = Agent(state, facts_provider(None), clock=lambda: int(os.environ["LICAGENT_TIME"]),
              keep_open=True)
cfg = DaemonConfig(state=state, listen=("tcp://127.0.0.1:0",))
daemon = Daemon(agent, cfg, make_logger("info", open(os.devnull, "w")))
if mode == "empty":
    # the same AgentOps (argument checks, result records) over an agent doing no store
    # work: its answers computed once, here, by the real one
    from agent.ops import AgentOps
    canned = {"check": agent.check("f0"), "status": agent.status(), "state": agent.state()}

    class NoStore(Agent):
        def check(self, feature, count=1):
            return canned["check"]

        def status(self):
            return canned["status"]

        def state(self):
            return canned["state"]

    daemon.ops = AgentOps(NoStore(state, agent.facts), log=daemon._note)
(address,) = daemon.start()
print(address, flush=True)
sys.stdin.read()  # until the bench closes it
daemon.stop()
"""


def _store(tmp: Path) -> tuple[Path, dict[str, str]]:
    from agent.cose import SigningKey
    from agent.identity import HardwareFacts
    from agent.messages import Action
    from agent.service import Agent
    from hw.facts import StaticFactsProvider
    from simulators.licensing_server.vendor import Grant, Vendor

    hw = HardwareFacts(model="AS-P", serial="SN-RPC", macs=("00:80:f4:00:00:07",))
    vendor = Vendor(SigningKey.generate())
    agent = Agent(tmp / "s", StaticFactsProvider(hw), clock=lambda: T0, keep_open=True)
    agent.init("AS-P", hw.serial, [vendor.public])
    for i in range(20):  # a realistic store: 20 licenses, a history of applies
        req = agent.request(Action.ACTIVATE, [f"f{i}"])
        agent.apply(vendor.issue(req, [Grant(f"f{i}", i + 1)], now=T0))
    facts = tmp / "facts.json"
    facts.write_text(json.dumps(hw.as_dict()))
    return tmp / "s", dict(os.environ, LICAGENT_FACTS=str(facts), LICAGENT_TIME=str(T0 + 60))


def rpc_rows(calls: int = 1000) -> list[tuple[str, str, str]]:
    import hw

    with tempfile.TemporaryDirectory(prefix="bench-rpc-") as tmp:
        state, env = _store(Path(tmp))
        procs, clients = {}, {}
        try:
            for mode in ("real", "empty"):
                procs[mode] = subprocess.Popen(
                    [sys.executable, "-c", SERVER, str(ROOT), mode, str(state)], env=env,
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                address = procs[mode].stdout.readline().strip()  # type: ignore[union-attr]
                clients[mode] = hw.connect(address)
            out: dict[tuple[str, str], list[float]] = {}
            ops: Mapping[str, Any] = {"check-feature": lambda c: c.check("f0"),
                                      "get-status": lambda c: c.status()}
            for op, call in ops.items():
                for mode in clients:
                    call(clients[mode])  # the session's hello, warm caches
                for _ in range(calls):
                    for mode, client in clients.items():
                        t = time.perf_counter()
                        call(client)
                        out.setdefault((op, mode), []).append(time.perf_counter() - t)
        finally:
            for c in clients.values():
                c.close()
            for p in procs.values():
                p.stdin.close()  # type: ignore[union-attr]
                p.wait(timeout=30)
    rows = []
    for op in ("check-feature", "get-status"):
        real = statistics.median(out[(op, "real")]) * 1e3
        floor = statistics.median(out[(op, "empty")]) * 1e3
        rows.append((f"daemon `{op}` over tcp (store kept open, revalidated per request)",
                     f"{real:.3f} ms", f"{floor:.3f} ms", real / floor, 1.5,
                     f"median of {calls} alternating calls; floor: the same daemon, listener, "
                     f"RPC stack and operation table over an agent that does no store work (its "
                     f"answer computed once)"))
    return rows  # type: ignore[return-value]


if __name__ == "__main__":
    for row in rpc_rows():
        print(" | ".join(str(x) for x in row))

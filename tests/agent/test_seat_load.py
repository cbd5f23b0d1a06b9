"""Issue 15 item 5: never more seats out than licensed, with real processes.

200 client processes (``tests/support/seat_load.py``) check out, renew and return seats of
one pool through a real ``licagent run`` over TCP, all at once; some are killed with
SIGKILL at random moments. Then the daemon is killed with SIGKILL and restarted (the seats
out survive it), restarted with its clock jumped past the leases (the dead clients' seats
are free), and with its clock set back (no lease comes back or grows). Three witnesses
agree that the count was never exceeded: the clients' own log (each note written after
the grant and before the return), the daemon's journal replayed record by record, and
the pool as listed after each step.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import hw
from agent import seats
from agent.rpc import RemoteError
from agent.store import Store
from simulators.licensing_server.vendor import Grant
from tests.agent.test_daemon import WAIT, Agentd, listening, read_line
from tests.conftest import T0, stop_processes

COUNT = 20
CLIENTS = 200
KILLED = 10
ROOT = Path(__file__).parents[2]
# 200 clients connect at once: as many may be pending (before their hello) as are served,
# or the listener closes the oldest pending one (its defence against slow peers)
URL = "tcp://127.0.0.1:0?max_per_peer=256&max_clients=256&max_pending=256"


@pytest.fixture
def agentd(tmp_path: Path) -> Iterator[Agentd]:
    d = Agentd(tmp_path)
    try:
        yield d
    finally:
        d.close()


def start(d: Agentd, at: int) -> tuple[subprocess.Popen[bytes], str]:
    d.env["LICAGENT_TIME"] = str(at)
    proc = d.start("--listen", URL)
    (address,) = listening(proc)
    return proc, address


def out_now(address: str) -> dict[str, str]:
    with hw.connect(address) as c:
        lst = c.seat_list()
    assert lst.pools[0]["out"] == len(lst.seats) <= lst.pools[0]["count"]
    return {f"{s['client']} {s['until']}": s["client"] for s in lst.seats}


def log_holders_max(log: Path) -> tuple[int, set[str]]:
    """The most seats the clients' log shows held at once, and those never released."""
    held: set[str] = set()
    most = 0
    for line in log.read_text().splitlines():
        sign, sid, _name = line.split(" ")
        if sign == "+":
            assert sid not in held, f"seat {sid} granted twice"
            held.add(sid)
            most = max(most, len(held))
        else:
            held.remove(sid)
    return most, held


def journal_max(state: Path, count: int) -> int:
    """Replay every ``seat`` record of the journal: the most seats out after any of them."""
    entries = Store.open(state, None).journal.read().entries
    pool: tuple[seats.Seat, ...] = ()
    most = 0
    for e in entries:
        if e.event == "seat":
            pool = seats.redo(pool, e.data, e.time)
            n = len(seats.live(pool, e.data["t"]))
            assert n <= count, f"journal record {e.n}: {n} seats out of {count}"
            most = max(most, n)
    return most


def test_200_clients_sigkill_restart_and_clock_jumps(agentd: Agentd, tmp_path: Path) -> None:
    proc, address = start(agentd, T0)
    with hw.connect(address) as c:
        req = c.request("activate", ["editor"])
        c.apply(agentd.vendor.issue(req, [Grant("editor", COUNT, floating=True)], now=T0))

    log, go = tmp_path / "holders.log", tmp_path / "go"
    log.touch()
    clients = [subprocess.Popen(
        [sys.executable, "-m", "tests.support.seat_load", address, f"ws-{i:03d}", str(log),
         str(go), "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for i in range(CLIENTS)]
    try:
        for p in clients:  # every client connected before any starts
            assert read_line(p, bytearray()) == "ready"
        go.touch()
        rng = random.Random(15)
        victims = rng.sample(clients, KILLED)
        for v in victims:
            time.sleep(rng.uniform(0, 0.2))
            v.kill()
        codes = [p.wait(timeout=600) for p in clients]
    finally:
        stop_processes(clients, WAIT)
    errors = [p.stderr.read().decode() for p in clients
              if p.returncode != 0 and p not in victims and p.stderr is not None]
    assert not errors, errors[:3]
    assert codes.count(-signal.SIGKILL) == KILLED

    most, never_returned = log_holders_max(log)
    listed = out_now(address)
    # the dead clients' seats are still out (their leases have not lapsed), nobody else's
    assert set(listed.values()) <= {f"ws-{clients.index(v):03d}" for v in victims}
    assert len(never_returned) <= len(listed) <= KILLED
    grants = log.read_text().count("+ ")
    assert grants >= 2 * (CLIENTS - KILLED)

    # SIGKILL the daemon, restart it: the seats out survived
    proc.kill()
    proc.wait(timeout=WAIT)
    proc, address = start(agentd, T0)
    assert out_now(address) == listed

    # the clock jumps past the leases: the dead clients' seats are free again
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=WAIT)
    proc, address = start(agentd, T0 + seats.DEFAULT_LEASE + 1)
    assert out_now(address) == {}
    with hw.connect(address) as c:
        for i in range(COUNT):
            c.seat_checkout("editor", f"late-{i}")
        with pytest.raises(RemoteError) as exc:
            c.seat_checkout("editor", "one-too-many")
        assert exc.value.exit_code == 9
    after_jump = out_now(address)

    # and set back to the start: no lease comes back, none grows, no seat is added
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=WAIT)
    proc, address = start(agentd, T0)
    assert out_now(address) == after_jump
    with hw.connect(address) as c, pytest.raises(RemoteError) as exc:
        c.seat_checkout("editor", "back-in-time")
    assert exc.value.exit_code == 9
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=WAIT)

    jm = journal_max(agentd.state, COUNT)
    print(f"\n{CLIENTS} clients, {grants} checkouts, at most {most} held at once by the log, "
          f"{jm} by the journal, of {COUNT}")
    assert most <= COUNT and jm == COUNT

"""Issue 15: client load on the fleet's floating seats, and the invariant ``seats-within-count``.

``[clients] count, feature, hold_seconds`` in a scenario: ``count`` editors and clients,
each on its own thread and connection, check out a seat of ``feature`` from a server that
holds it (floating: the fleet issues ``feature`` with ``floating`` wherever a
``[[servers]] licenses`` table names it), hold it ``hold_seconds`` (renewing at a third of
the lease when they hold longer), return it, and start again; when no seat is free (exit
9) they wait a moment and try again. The invariant replays each server's journal record
by record: after every seat record, the seats out of each feature are at most the count
its license had then.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent import seats
from agent.errors import LicensingError
from simulators.fleet.report import Invariant
from simulators.fleet.server import SimServer

__all__ = ["CLIENT_KEYS", "ClientsSpec", "SeatLoad", "seats_within_count"]

CLIENT_KEYS = ("count", "feature", "hold_seconds")
SEATS_WITHIN_COUNT = "seats-within-count"
#: the lease the fleet's clients ask for (the agent's minimum: short, so a client cut off
#: by a fault frees its seat soon)
LEASE = 30


@dataclass(frozen=True)
class ClientsSpec:
    count: int = 0
    feature: str = ""
    hold_seconds: float = 5.0


class SeatLoad:
    """``spec.count`` client threads on the fleet's servers holding ``spec.feature``.

    Args:
        spec: the scenario's ``[clients]``.
        servers: the servers (with the link each client uses) holding the feature.
        connect: ``connect(server, link)`` -> a client (closed by the thread).
        log: one line per unexpected failure.
    """

    def __init__(self, spec: ClientsSpec, servers: Sequence[tuple[SimServer, str]],
                 connect: Callable[[SimServer, str], Any], seed: int,
                 log: Callable[[str], None]) -> None:
        self.spec, self.servers, self.connect, self.log = spec, list(servers), connect, log
        self.seed = seed
        self.stats: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []

    def count(self, what: str) -> None:
        with self.lock:
            self.stats[what] += 1

    def start(self) -> None:
        if not self.servers or self.spec.count <= 0:
            return
        for i in range(self.spec.count):
            t = threading.Thread(target=self._client, args=(i,), name=f"seat-client-{i}",
                                 daemon=True)
            self.threads.append(t)
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        self.threads = []

    def _client(self, i: int) -> None:
        rng = random.Random(f"{self.seed}/seat-client/{i}")
        name = f"client-{i:04d}"
        srv, link = self.servers[i % len(self.servers)]
        c: Any = None
        try:
            while not self.stop_event.is_set():
                try:
                    if c is None:
                        c = self.connect(srv, link)
                    self._round(c, name, rng)
                except LicensingError as exc:
                    if exc.exit_code == 9:
                        self.count("seat-no-seat")
                        self.stop_event.wait(rng.uniform(0.02, 0.2))
                        continue
                    self.count("seat-failures")
                    self.log(f"seat client {name} {srv.name} {link}: {exc.reason}: "
                             f"{str(exc)[:160]}")
                    if c is not None:
                        _close(c)
                        c = None
                    self.stop_event.wait(rng.uniform(0.1, 0.5))
        finally:
            if c is not None:
                _close(c)

    def _round(self, c: Any, name: str, rng: random.Random) -> None:
        res = c.seat_checkout(self.spec.feature, name, None, LEASE)
        self.count("seat-checkout")
        token = res.token
        try:
            end = time.monotonic() + self.spec.hold_seconds * rng.uniform(0.5, 1.5)
            while not self.stop_event.wait(max(0.0, min(LEASE / 3, end - time.monotonic()))):
                if time.monotonic() >= end:
                    break
                token = c.seat_renew(token, LEASE).token
                self.count("seat-renew")
        finally:
            c.seat_return(token)
            self.count("seat-return")


def _close(c: Any) -> None:
    try:
        c.close()
    except Exception:
        pass


def seats_within_count(servers: Sequence[SimServer]) -> Invariant:
    """After every seat record of every server's journal, no pool has more seats out than
    its license's count at that moment; nor now."""
    problems: list[str] = []
    checked = records = 0
    for srv in servers:
        try:
            entries = srv.agent().journal().entries
        except LicensingError as exc:
            problems.append(f"{srv.name}: journal: {exc}")
            continue
        counts: dict[str, int] = {}
        pool: tuple[seats.Seat, ...] = ()
        mine = 0
        for e in entries:
            if e.event == "apply" and isinstance(e.data, dict):
                for ch in e.data.get("changes", ()):
                    if isinstance(ch, dict):
                        counts[ch["feature"]] = (0 if ch.get("op") == "remove" else
                                                 int(ch.get("count", 0)))
            elif e.event == "seat" and isinstance(e.data, dict):
                mine += 1
                pool = seats.redo(pool, e.data, e.time)
                if e.data.get("op") == "checkout":
                    t = e.data.get("t", e.time)
                    for feature, n in Counter(s.feature for s in seats.live(pool, t)).items():
                        if n > counts.get(feature, 0):
                            problems.append(f"{srv.name}: journal record {e.n}: {n} seats of "
                                            f"{feature} out, {counts.get(feature, 0)} licensed")
        if mine:
            checked += 1
            records += mine
    return Invariant(SEATS_WITHIN_COUNT, not problems, "; ".join(problems[:5]) or
                     f"never more seats out than licensed: {records} seat record(s) of "
                     f"{checked} server(s) replayed")

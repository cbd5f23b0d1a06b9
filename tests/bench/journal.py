"""Journal appends cost the same with 10 records or 10,000 (issue 13, item 5).

Two real stores, one with a journal of 10 records and one of 10,000 (the store's own
MAC-protected records, its slot re-saved so its head is at the end, as after any
commit), then the same operations on each: a bare ``Journal.append`` after the store
is opened, and a whole ``licagent request`` in process (open, check the head record,
append, fsync, write the slot). The ratio of the medians is the result; before the
head existed, every append verified the whole chain first (the last row measures
that full verification, what ``journal --verify`` still does).

Run alone: ``.venv/bin/python tests/bench/journal.py`` (prints the rows).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from agent.cose import SigningKey  # noqa: E402
from agent.identity import HardwareFacts  # noqa: E402
from agent.messages import Action  # noqa: E402
from agent.service import Agent  # noqa: E402
from agent.store import Store  # noqa: E402
from hw.facts import StaticFactsProvider  # noqa: E402
from simulators.licensing_server.vendor import Vendor  # noqa: E402

T0 = 1_800_000_000
SIZES = (10, 10_000)


def _store(root: Path, records: int) -> Agent:
    hw = HardwareFacts(model="AS-P", serial=f"SN-J{records}", macs=("00:80:f4:00:00:01",))
    agent = Agent(root / f"s{records}", StaticFactsProvider(hw), clock=lambda: T0)
    agent.init("AS-P", None, [Vendor(SigningKey.generate()).public])
    store = Store.open(agent.directory, None)
    for i in range(records - 1):  # a year of history: reapplies, refusals, clock marks...
        store.journal.append("reapply", {"sequence": 0, "i": i}, T0 + i)
    store.save(store.state)  # the head moves to the end, as after any commit
    assert len(store.journal.read().entries) == records
    return agent


def _median_ms(xs: list[float]) -> float:
    return statistics.median(xs) * 1e3


def journal_rows(runs: int = 200) -> list[tuple[str, str, str]]:
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    append: dict[int, list[float]] = {}
    request: dict[int, list[float]] = {}
    verify: dict[int, list[float]] = {}
    count: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-journal-", dir=base) as tmp:
        agents = {n: _store(Path(tmp), n) for n in SIZES}
        for n in SIZES:
            append[n], request[n], verify[n] = [], [], []
        for i in range(runs):  # the sizes interleaved, so drift in the machine hits both
            for n, agent in agents.items():
                store = Store.open(agent.directory, None)
                t = time.perf_counter()
                store.journal.append("reapply", {"sequence": 0, "bench": i}, T0 + n + i)
                append[n].append(time.perf_counter() - t)
                # as after a commit: the slot names the journal as this append left it (a
                # record left past the head changes the file, so the next open would verify
                # the whole chain once: store.Store.open)
                store.save(store.state)
                t = time.perf_counter()
                agent.request(Action.ACTIVATE, [f"f{i % 5}"])
                request[n].append(time.perf_counter() - t)
        for n, agent in agents.items():
            for _ in range(5):
                t = time.perf_counter()
                count[n] = len(Store.open(agent.directory, None).journal.read().entries)
                verify[n].append(time.perf_counter() - t)
    small, big = SIZES
    where = "tmpfs" if base else "the temporary folder"
    a_ratio = _median_ms(append[big]) / _median_ms(append[small])
    r_ratio = _median_ms(request[big]) / _median_ms(request[small])
    return [
        (f"journal append, {big:,} records against {small}",
         f"{_median_ms(append[big]):.3f} ms against {_median_ms(append[small]):.3f} ms "
         f"(ratio {a_ratio:.2f})",
         f"median of {runs} appends with fsync on {where}, each after a store open; "
         f"constant time: the chain's end is kept from the head check (goal ratio near 1)"),
        (f"`request` in process, journal of {big:,} records against {small}",
         f"{_median_ms(request[big]):.2f} ms against {_median_ms(request[small]):.2f} ms "
         f"(ratio {r_ratio:.2f})",
         f"median of {runs}: open (head record checked), sign, journal append, slot write"),
        (f"full journal verification ({count[big]:,} records)",
         f"{_median_ms(verify[big]):.0f} ms",
         f"`journal --verify`'s walk over every MAC and link, after the runs above; what each "
         f"append cost before slots recorded the head ({count[small]:,} records: "
         f"{_median_ms(verify[small]):.1f} ms)"),
    ]


if __name__ == "__main__":
    for row in journal_rows():
        print(" | ".join(row))

"""Issue 18 item 3: several processes on one PostgreSQL ledger, in the storage layer itself.

Every write runs ``SERIALIZABLE`` and is run again when PostgreSQL reports that it
collided with another (``PostgresStorage.run``). These tests drive the ledger
directly (no HTTP: tests/simulators/test_licserver_workers.py does it through
``licserver serve``) from real processes, each with its own connection, on one
real PostgreSQL server (tests/support/postgres.py):

- a collision is rolled back and run again, and the second run sees what the
  other committed (no update is lost);
- processes racing for one stock never over-assign it;
- one request raced from several processes gets one response, the same bytes to all;
- one receipt raced from several processes is credited once;
- a process killed with SIGKILL in the middle of a transaction leaves nothing of
  it, and the retry is idempotent.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest

from agent import errors
from agent.messages import Action
from apps.licensing_api import AssignmentQuery
from simulators.licensing_server.ledger import Ledger, NotEntitledError
from simulators.licensing_server.ledger_postgres import PostgresStorage
from simulators.licensing_server.rules import Stock
from simulators.licensing_server.storage import LedgerTransaction
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, Site
from tests.simulators.test_ledger import dev_id
from tests.support.postgres import PostgresServer

E, P = "PO-RACE", "BMS-Pro"
WAIT = 120.0  # an upper bound for a join; never asserted as a time
FORK = multiprocessing.get_context("fork")


@pytest.fixture
def db(postgres: PostgresServer, vendor: Vendor) -> Iterator[str]:
    url = postgres.database()
    with Ledger(url, vendor, clock=lambda: T0) as led:
        led.entitle(E, P, {"bacnet": 50, "modbus": 100, "trend": 20_000})
    yield url


def rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql))  # the test's own fixed statements


def _in_processes(n: int, target: Callable[..., Any], *args: Any) -> list[dict[str, Any]]:
    """``target(i, start, out, *args)`` in ``n`` forked processes released at once."""
    start, out = FORK.Event(), FORK.Queue()
    procs = [FORK.Process(target=target, args=(i, start, out, *args)) for i in range(n)]
    for p in procs:
        p.start()
    start.set()
    results = [out.get(timeout=WAIT) for _ in procs]
    for p in procs:
        p.join(WAIT)
        assert p.exitcode == 0
    errs = [r["error"] for r in results if "error" in r]
    assert errs == []
    return sorted(results, key=lambda r: int(r["i"]))


def _reporting(body: Callable[..., None]) -> Callable[..., None]:
    """A process's target: runs ``body(res, i, *args)`` once released, puts ``res``."""
    def run(i: int, start: Any, out: Any, *args: Any) -> None:
        res: dict[str, Any] = {"i": i}
        try:
            start.wait(WAIT)
            body(res, i, *args)
        except BaseException as exc:  # reported to the test, which fails on it
            res["error"] = f"{type(exc).__name__}: {exc}"
        out.put(res)
    return run


# ------------------------------------------------------------------ the retry itself

def test_a_collision_is_rolled_back_and_run_again_and_no_update_is_lost(db: str) -> None:
    """Two storages (two connections) read one stock, then both write it lowered by one:
    PostgreSQL fails the later writer, which runs again and lowers what the first wrote."""
    both_read = threading.Barrier(2)
    runs = [0, 0]

    def take_one(k: int) -> Callable[[LedgerTransaction], int]:
        def body(tx: LedgerTransaction) -> int:
            runs[k] += 1
            stock = tx.stock(E, P, "modbus")
            assert stock is not None
            if runs[k] == 1:
                both_read.wait(WAIT)  # each has read the same count before either writes
            tx.save_stock(Stock(stock.entitlement, stock.product, stock.feature,
                                stock.count - 1, stock.until))
            return stock.count - 1
        return body

    stores = [PostgresStorage(db), PostgresStorage(db)]
    answers: list[int] = []

    def worker(k: int) -> None:
        answers.append(stores[k].run("take one", take_one(k)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    for s in stores:
        s.close()
    assert sorted(answers) == [98, 99]  # the second saw the first's write
    assert sorted(runs) == [1, 2]  # exactly one of them ran twice
    assert rows(db, "SELECT count FROM features WHERE feature = 'modbus'") == [(98,)]


def test_a_refusal_inside_a_run_is_not_retried_and_writes_nothing(db: str) -> None:
    runs = 0

    def body(tx: LedgerTransaction) -> None:
        nonlocal runs
        runs += 1
        tx.add_entitlement("PO-NEVER", P, T0)
        raise errors.UsageError("refused by the rules")

    store = PostgresStorage(db)
    with pytest.raises(errors.UsageError):
        store.run("refused", body)
    store.close()
    assert runs == 1
    assert rows(db, "SELECT id FROM entitlements WHERE id = 'PO-NEVER'") == []


# ------------------------------------------------------------------ races between processes

@_reporting
def _assign(res: dict[str, Any], i: int, url: str, devices: list[str], vendor: Vendor) -> None:
    won = lost = 0
    with Ledger(url, vendor, clock=lambda: T0) as led:
        for dev in devices[i::8]:
            try:
                led.assign(E, dev, "bacnet", 1)
                won += 1
            except NotEntitledError:
                lost += 1
    res.update(won=won, lost=lost)


def test_processes_racing_for_one_stock_never_over_assign(db: str, vendor: Vendor) -> None:
    devices = [os.urandom(32).hex() for _ in range(80)]  # 80 wanted, 50 in stock
    results = _in_processes(8, _assign, db, devices, vendor)
    assert sum(r["won"] for r in results) == 50
    assert sum(r["lost"] for r in results) == 30
    assert rows(db, "SELECT count(*), sum(count) FROM assignments WHERE feature = 'bacnet'"
                ) == [(50, 50)]
    with Ledger(db, vendor, clock=lambda: T0) as led:
        assert led.free(E, "bacnet") == 0
        ops = led.operations()
    assert sum(1 for o in ops if o["kind"] == "assign" and o["outcome"] == "ok") == 50
    assert sum(1 for o in ops if o["kind"] == "assign"
               and o["outcome"] == "refused: not-entitled") == 30


@_reporting
def _answer(res: dict[str, Any], _i: int, url: str, req: bytes, vendor: Vendor) -> None:
    with Ledger(url, vendor, clock=lambda: T0) as led:
        res["response"] = led.answer_request(req)


def test_one_request_raced_from_six_processes_gets_one_response(db: str, vendor: Vendor,
                                                                site: Site) -> None:
    d = site.device()
    with Ledger(db, vendor, clock=lambda: T0) as led:
        led.assign(E, dev_id(d), "modbus", 5)
    req = d.request(Action.ACTIVATE)
    results = _in_processes(6, _answer, db, req, vendor)
    assert len({r["response"] for r in results}) == 1  # the same bytes to every process
    assert rows(db, "SELECT count(*) FROM responses") == [(1,)]
    outcomes = sorted(o for (o,) in rows(db, "SELECT outcome FROM operations "
                                             "WHERE kind = 'request'"))
    assert outcomes == ["ok"] + ["repeated"] * 5
    d.agent.apply(results[0]["response"])
    assert {x["feature"]: x["count"] for x in d.agent.status()["licenses"]} == {"modbus": 5}


@_reporting
def _confirm(res: dict[str, Any], _i: int, url: str, receipt: bytes, vendor: Vendor) -> None:
    with Ledger(url, vendor, clock=lambda: T0) as led:
        try:
            res["freed"] = led.accept_receipt(receipt).freed
        except errors.AlreadyAppliedError as err:
            res["refused"] = err.reason


def test_one_receipt_raced_from_six_processes_is_credited_once(db: str, vendor: Vendor,
                                                               site: Site) -> None:
    d = site.device()
    me = dev_id(d)
    with Ledger(db, vendor, clock=lambda: T0) as led:
        led.assign(E, me, "modbus", 30)
        led.accept_receipt(d.agent.apply(led.answer_request(d.request(Action.ACTIVATE)))[0]
                           .receipt)
        led.assign(E, me, "modbus", 0)  # release: the reclaim's receipt frees the 30
        receipt = d.agent.apply(led.answer_request(d.request(Action.RECLAIM)))[0].receipt
        assert led.free(E, "modbus") == 70  # still counted until the receipt arrives
    results = _in_processes(6, _confirm, db, receipt, vendor)
    credited = [r["freed"] for r in results if "freed" in r]
    assert credited == [(("modbus", 30),)]
    assert sorted(r["refused"] for r in results if "refused" in r) == ["replay"] * 5
    assert rows(db, "SELECT count(*) FROM receipts_seen") == [(2,)]  # activation's + this
    with Ledger(db, vendor, clock=lambda: T0) as led:
        assert led.free(E, "modbus") == 100  # freed once


# ------------------------------------------------------------------ SIGKILL mid-transaction

def _assign_all(url: str, devices: list[str], vendor: Vendor) -> None:
    with Ledger(url, vendor, clock=lambda: T0) as led:
        led.assign_many([AssignmentQuery(E, dev, "trend", 1) for dev in devices])
    os._exit(0)


def _written_not_committed(url: str) -> bool:
    """Whether a ledger connection is inside a transaction that has written (PostgreSQL
    gave it a transaction ID), not yet committed."""
    return bool(rows(url, "SELECT 1 FROM pg_stat_activity WHERE application_name = "
                          "'licserver' AND backend_xid IS NOT NULL"))


def test_a_process_killed_inside_a_transaction_leaves_nothing_of_it(db: str,
                                                                    vendor: Vendor) -> None:
    """One ``assign_many`` of 20,000 is one transaction: killed once it has written and
    before its commit, none of it is kept, the stock is untouched, and running it again
    (twice) makes all of it once."""
    devices = [os.urandom(32).hex() for _ in range(20_000)]
    proc = FORK.Process(target=_assign_all, args=(db, devices, vendor))
    proc.start()
    deadline = time.monotonic() + WAIT
    while not _written_not_committed(db):
        assert proc.is_alive(), "the transaction ended before it could be interrupted"
        assert time.monotonic() < deadline, "the transaction never started"
        time.sleep(0.002)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(WAIT)
    assert proc.exitcode == -signal.SIGKILL
    assert rows(db, "SELECT count(*) FROM assignments") == [(0,)]
    assert rows(db, "SELECT count(*) FROM operations WHERE kind = 'assign'") == [(0,)]

    with Ledger(db, vendor, clock=lambda: T0) as led:
        assert led.free(E, "trend") == 20_000
        led.assign_many([AssignmentQuery(E, dev, "trend", 1) for dev in devices])
        led.assign_many([AssignmentQuery(E, dev, "trend", 1) for dev in devices])  # again
        assert led.free(E, "trend") == 0
    assert rows(db, "SELECT count(*), sum(count) FROM assignments") == [(20_000, 20_000)]


@_reporting
def _upload(res: dict[str, Any], _i: int, url: str, reqs: list[bytes], vendor: Vendor) -> None:
    with Ledger(url, vendor, clock=lambda: T0) as led:
        up = led.upload(reqs)
        res["responses"] = dict(up.responses)


def test_a_process_killed_mid_upload_loses_nothing_and_the_retry_is_idempotent(
        db: str, vendor: Vendor, site: Site) -> None:
    devices = [site.device() for _ in range(40)]
    ids = [dev_id(d) for d in devices]
    with Ledger(db, vendor, clock=lambda: T0) as led:
        led.assign_many([AssignmentQuery(E, dev, "modbus", 1) for dev in ids])
    reqs = [d.request(Action.ACTIVATE) for d in devices]
    start, out = FORK.Event(), FORK.Queue()
    proc = FORK.Process(target=_upload, args=(0, start, out, db, reqs, vendor))
    proc.start()
    start.set()
    deadline = time.monotonic() + WAIT
    while rows(db, "SELECT count(*) FROM responses")[0][0] < 3:
        assert proc.is_alive(), "the upload ended before it could be interrupted"
        assert time.monotonic() < deadline, "the upload never reached the ledger"
        time.sleep(0.002)
    assert proc.pid is not None
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(WAIT)
    assert proc.exitcode == -signal.SIGKILL
    committed = {r[0]: bytes(r[1]) for r in rows(db, "SELECT device_id, file FROM responses")}
    assert 3 <= len(committed) < len(ids)
    # every committed response has its operation; no half-written request anywhere
    assert rows(db, "SELECT count(*) FROM operations WHERE kind = 'request'") == [
        (len(committed),)]

    # the client's retry, from two processes at once: what was answered is answered the
    # same, the rest once
    results = _in_processes(2, _upload, db, reqs, vendor)
    assert results[0]["responses"] == results[1]["responses"]
    answered = results[0]["responses"]
    assert set(answered) == set(ids)
    for dev, file in committed.items():
        assert answered[dev] == file
    assert rows(db, "SELECT device_id, count(*) FROM responses GROUP BY device_id "
                    "HAVING count(*) <> 1") == []
    with Ledger(db, vendor, clock=lambda: T0) as led:
        assert led.free(E, "modbus") == 100 - len(ids)

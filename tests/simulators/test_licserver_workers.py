"""Issue 18, item 3: several ``licserver serve`` workers on one PostgreSQL database act as one.

Everything real: a PostgreSQL server (tests/support/postgres.py), two or three
``licserver serve`` processes on one database, 50 sites as 50 forked processes
talking HTTP to both workers at once, and a worker killed with SIGKILL in the
middle of an upload.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from agent.messages import Action
from agent.rpc import RemoteError, TransportError
from apps.licensing_api import AssignmentQuery
from apps.licensing_client import LicensingClient
from simulators.licensing_server.vendor import Vendor
from tests.conftest import Device, Site
from tests.simulators.test_ledger import dev_id
from tests.simulators.test_licserver_http import WAIT, Licserver
from tests.support.postgres import PostgresServer

E, P = "PO-50 (fifty sites)", "BMS-Pro"
SITES = 50


class Workers:
    """``licserver serve`` processes on one PostgreSQL database, and a vendor-admin token."""

    def __init__(self, ls: Licserver, n: int) -> None:
        self.ls = ls
        self.procs_urls = [ls.start() for _ in range(n)]
        self.token = ls.token

    @property
    def urls(self) -> list[str]:
        return [u for _p, u in self.procs_urls]

    def client(self, i: int) -> LicensingClient:
        return LicensingClient(self.urls[i % len(self.urls)], token=self.token, timeout=WAIT)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.ls.db) as conn:
            return list(conn.execute(sql))  # the test's own fixed statements


@pytest.fixture
def workers(tmp_path: Path, vendor: Vendor, postgres: PostgresServer) -> Iterator[Workers]:
    ls = Licserver(tmp_path, vendor, postgres.database())
    try:
        ls.run("entitle", "--db", ls.db, "--entitlement", E, "--product", P,
               "--feature", f"bacnet={SITES - 10}", "--feature", "modbus=100")
        yield Workers(ls, 2)
    finally:
        ls.close()


def _site(dev: Device, i: int, urls: list[str], token: str, start: Any, out: Any) -> None:
    """One site, in its own process: assign on one worker, upload on the other, apply,
    confirm; each retried on the other worker to show the retry changes nothing."""
    res: dict[str, Any] = {"i": i}
    try:
        here = LicensingClient(urls[i % 2], token=token, timeout=WAIT)
        there = LicensingClient(urls[(i + 1) % 2], token=token, timeout=WAIT)
        me = dev_id(dev)
        start.wait(WAIT)
        try:
            here.assign(E, me, "bacnet", 1)
            res["assigned"] = True
        except RemoteError as err:
            res["assigned"] = False
            res["refusal"] = (err.exit_code, err.reason)
        if res["assigned"]:
            req = dev.request(Action.ACTIVATE)
            first = there.upload([req])["responses"][me]
            again = here.upload([req])["responses"][me]
            res["same_response"] = first == again
            receipt = dev.agent.apply(first)[0].receipt
            ok = here.confirm([receipt])
            twice = there.confirm([receipt])
            res["accepted"] = [a["device_id"] for a in ok["accepted"]] == [me]
            res["replay"] = [r["reason"] for r in twice["refused"]]
    except BaseException as exc:  # reported to the test, which fails on it
        res["error"] = f"{type(exc).__name__}: {exc}"
    out.put(res)


def test_fifty_sites_at_once_on_two_workers_never_over_assign(workers: Workers,
                                                              site: Site) -> None:
    devices = [site.device() for _ in range(SITES)]
    ctx = multiprocessing.get_context("fork")
    start, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_site, args=(d, i, workers.urls, workers.token, start, out))
             for i, d in enumerate(devices)]
    for p in procs:
        p.start()
    start.set()  # all 50 at once
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(WAIT)
        assert p.exitcode == 0
    assert [r for r in results if "error" in r] == []
    won = [r for r in results if r["assigned"]]
    lost = [r for r in results if not r["assigned"]]
    # exactly what the entitlement holds, no more: the others refused with not-entitled
    assert len(won) == SITES - 10 and len(lost) == 10
    assert {r["refusal"] for r in lost} == {(6, "not-entitled")}
    assert all(r["same_response"] and r["accepted"] and r["replay"] == ["replay"]
               for r in won)

    rep = workers.client(0).report()
    feat = {f["feature"]: f for f in rep["entitlements"][0]["products"][0]["features"]}
    assert (feat["bacnet"]["assigned"], feat["bacnet"]["used"], feat["bacnet"]["free"]) == (
        SITES - 10, SITES - 10, 0)
    assert rep["open_responses"] == 0 and rep["pending_reclaims"] == []
    # one response per device, one receipt per response, in the database itself
    assert workers.rows("SELECT device_id, count(*) FROM responses GROUP BY device_id "
                        "HAVING count(*) <> 1") == []
    assert workers.rows("SELECT count(*), count(DISTINCT response_digest) FROM "
                        "receipts_seen") == [(SITES - 10, SITES - 10)]
    assert len(rep["installed"]) == SITES - 10


def test_one_receipt_sent_to_both_workers_at_once_frees_its_licenses_once(
        workers: Workers, site: Site) -> None:
    devices = [site.device() for _ in range(6)]
    admin = workers.client(0)
    admin.assign_many([AssignmentQuery(E, dev_id(d), "modbus", 10) for d in devices])
    for d in devices:
        resp = admin.upload([d.request(Action.ACTIVATE)])["responses"][dev_id(d)]
        admin.confirm([d.agent.apply(resp)[0].receipt])
    # release everything; the reclaim's receipt goes to both workers at the same moment
    admin.assign_many([AssignmentQuery(E, dev_id(d), "modbus", 0) for d in devices])
    receipts = []
    for d in devices:
        resp = workers.client(1).upload([d.request(Action.RECLAIM)])["responses"][dev_id(d)]
        receipts.append(d.agent.apply(resp)[0].receipt)
    before = admin.report()["entitlements"][0]["products"][0]["features"]
    assert {f["feature"]: f["free"] for f in before}["modbus"] == 100 - 60  # still pending

    answers: list[Any] = []
    gate = threading.Barrier(4)

    def confirm(i: int) -> None:
        gate.wait(WAIT)
        answers.append(workers.client(i).confirm(receipts))

    threads = [threading.Thread(target=confirm, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    accepted = [a for ans in answers for a in ans["accepted"]]
    refused = [r for ans in answers for r in ans["refused"]]
    assert sorted(a["device_id"] for a in accepted) == sorted(dev_id(d) for d in devices)
    assert all(a["freed"] == [{"feature": "modbus", "count": 10}] for a in accepted)
    assert len(refused) == 3 * len(devices) and {r["reason"] for r in refused} == {"replay"}
    after = admin.report()["entitlements"][0]["products"][0]["features"]
    modbus = {f["feature"]: f for f in after}["modbus"]
    assert (modbus["used"], modbus["free"]) == (0, 100)  # freed once, not four times


def test_a_worker_killed_mid_upload_loses_nothing_and_the_retry_is_idempotent(
        workers: Workers, site: Site) -> None:
    devices = [site.device() for _ in range(100)]
    ids = [dev_id(d) for d in devices]
    admin = workers.client(0)
    admin.assign_many([AssignmentQuery(E, dev, "modbus", 1) for dev in ids])
    reqs = [d.request(Action.ACTIVATE) for d in devices]
    proc, _url = workers.procs_urls[0]
    failed: list[BaseException] = []

    def upload() -> None:
        try:
            admin.upload(reqs)
        except (TransportError, RemoteError) as exc:
            failed.append(exc)

    t = threading.Thread(target=upload)
    t.start()
    deadline = time.monotonic() + WAIT
    while workers.rows("SELECT count(*) FROM responses")[0][0] < 5:
        assert time.monotonic() < deadline, "the upload never reached the ledger"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # in the middle: some requests answered, not all
    assert proc.wait(WAIT) == -signal.SIGKILL
    t.join(WAIT)
    assert len(failed) == 1  # the client saw its connection die, not an answer
    committed = dict((r[0], bytes(r[1])) for r in workers.rows(
        "SELECT device_id, file FROM responses"))
    assert 5 <= len(committed) < len(reqs)

    # the retry on the other worker: the same response for what was answered, the rest new
    up = workers.client(1).upload(reqs)
    assert set(up["responses"]) == set(ids) and up["errors"] == {}
    for dev, file in committed.items():
        assert up["responses"][dev] == file
    assert workers.rows("SELECT device_id, count(*) FROM responses GROUP BY device_id "
                        "HAVING count(*) <> 1") == []
    # and a restarted worker serves the same ledger
    proc2, url2 = workers.ls.start()
    again = LicensingClient(url2, token=workers.token, timeout=WAIT).upload(reqs)
    assert again["responses"] == up["responses"]
    rep = workers.client(1).report()
    assert rep["open_responses"] == len(ids)
    modbus = {f["feature"]: f for f in rep["entitlements"][0]["products"][0]["features"]}
    assert (modbus["modbus"]["used"], modbus["modbus"]["free"]) == (100, 0)
    proc2.send_signal(signal.SIGTERM)
    assert proc2.wait(WAIT) == 0

"""A bad day on an MQTT site (issue 13, item 12): a real mosquitto restarted in the middle
of ``licadmin send`` and ``activate``, and a device absent from the site's presence.

licsim's servers talk to a real mosquitto (no persistence: a restart forgets every
retained presence until the devices come back). ``licadmin`` reaches the broker
through a slow loopback relay, so that the restart lands while operations are in
flight. Whatever happens, ``licadmin`` exits 0 only when every device was done.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.admin.test_bad_day import (
    INTERRUPTED,
    PARTIAL,
    Fleet,
    SlowLinks,
    _finish,
    _read_until,
    start_fleet,
    stop_fleet,
)
from tests.hw.mosquitto import Broker, mosquitto_path

pytestmark = pytest.mark.skipif(mosquitto_path() is None, reason="mosquitto is not installed")

N = 6


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker.plain(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def mfleet(tmp_path: Path, broker: Broker) -> Iterator[Fleet]:
    f = start_fleet(tmp_path, N, link="mqtt", broker=broker.url)
    try:
        yield f
    finally:
        stop_fleet(f)


def _site(f: Fleet, relay: SlowLinks | None, broker: Broker) -> str:
    port = relay.ports[0] if relay is not None else broker.port
    return f"mqtt://127.0.0.1:{port}/bad-day"


def _prepare(f: Fleet, broker: Broker) -> None:
    f.assign_all(1)
    site = _site(f, None, broker)
    f.run("gather", "--server", site, "--out", "site.cbor")
    f.run("license-info", "--licensing-server", f.licensing, "--site-info", "site.cbor",
          "--out", "li.cbor")
    f.run("requests", "--server", site, "--license-info", "li.cbor", "--out-dir", "requests")
    f.run("upload", "--licensing-server", f.licensing, "--requests", "requests",
          "--out-dir", "responses")


def _device_file(f: Fleet, port: int, name: str = "devices.toml") -> str:
    """A servers file naming each device by its own URL through ``port``."""
    lines = ['site = "bad-day"']
    for n, d in sorted(f.ids().items()):
        lines += ["[[server]]", f'url = "mqtt://127.0.0.1:{port}/bad-day/{d}"', f'name = "{n}"']
    (f.root / name).write_text("\n".join(lines) + "\n")
    return name


def test_broker_restart_in_the_middle_of_send_never_exits_0_with_work_left(
        mfleet: Fleet, broker: Broker) -> None:
    f = mfleet
    _prepare(f, broker)
    relay = SlowLinks([("127.0.0.1", broker.port)], 0.2)
    try:
        proc = f.start("send", "--servers", _device_file(f, relay.ports[0]), "--responses",
                       "responses", "--receipts-out", "receipts", "--verbose", "--jobs", "1")
        first = _read_until(proc, "ok      ")  # one device done, the next in flight
        broker.restart()
        code, out, err = _finish(proc)
        out = first + out
    finally:
        relay.close()
    receipts = list((f.root / "receipts").glob("*.receipt"))
    not_done = re.findall(r"^(?:FAILED|MISSED|STOPPED) ", out, re.M)
    # exit 0 only when every device applied its response; else 10, each one listed
    assert code in (0, PARTIAL), (out, err)
    assert (code == 0) == (len(receipts) == N) == (not not_done), (out, err)
    assert len(receipts) + len(not_done) == N, out
    # a second send (the broker is up) finishes the rest, never applying anything twice
    p = f.run("send", "--server", _site(f, None, broker), "--responses", "responses",
              "--receipts-out", "receipts", "--json", code=None)
    again = json.loads(p.stdout)["results"]
    assert p.returncode == 0, [r for r in again if r["status"] != "ok"]
    assert all(r["status"] == "ok" for r in again) and len(again) == N
    assert all(h == {"bacnet": 1} for h in f.holdings().values())


def test_broker_restart_during_activate_and_sigint_after_it(
        mfleet: Fleet, broker: Broker) -> None:
    f = mfleet
    f.assign_all(1)
    relay = SlowLinks([("127.0.0.1", broker.port)], 0.3)
    try:
        proc = f.start("activate", "--server", _site(f, relay, broker), "--licensing-server",
                       f.licensing, "--work-dir", "work", "--timeout", "20")
        _read_until(proc, "== step 3/6")
        broker.restart()
        code, out, err = _finish(proc)
    finally:
        relay.close()
    held = f.holdings()
    done = sum(1 for h in held.values() if h == {"bacnet": 1})
    assert code in (0, PARTIAL), (out, err)
    assert (code == 0) == (done == N), (out, err)
    if code:
        assert re.search(r"^STEP +SERVER +RESULT +DETAIL$", out, re.M)
    # finish: activate again against the broker (nothing is installed twice)
    f.run("activate", "--server", _site(f, None, broker), "--licensing-server", f.licensing)
    assert all(h == {"bacnet": 1} for h in f.holdings().values())
    # Ctrl-C while an MQTT site is being gathered: 130 and the rest by device URL
    relay = SlowLinks([("127.0.0.1", broker.port)], 0.5)
    try:
        proc = f.start("gather", "--server", _site(f, relay, broker), "--out", "g.cbor",
                       "--jobs", "1")
        relay.wait_accepted(1)  # listing the site: the handler is in place
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        code, out, err = _finish(proc)
    finally:
        relay.close()
    assert code == INTERRUPTED, (out, err)
    if "interrupted while listing the servers" not in err:
        rest = (f.root / "g.cbor.rest.toml").read_text()
        assert "url = \"mqtt://127.0.0.1:" in rest and "/bad-day/" in rest


def test_a_device_absent_from_presence_is_waited_for_then_reported(
        mfleet: Fleet, broker: Broker) -> None:
    f = mfleet
    ghost = "ab" * 32
    urls = [f"mqtt://127.0.0.1:{broker.port}/bad-day/{d}" for d in f.ids().values()]
    lines = ['site = "bad-day"']
    for u in [*urls, f"mqtt://127.0.0.1:{broker.port}/bad-day/{ghost}"]:
        lines += ["[[server]]", f'url = "{u}"']
    (f.root / "with-ghost.toml").write_text("\n".join(lines) + "\n")
    p = f.run("gather", "--servers", "with-ghost.toml", "--out", "g.cbor", "--timeout", "3",
              code=PARTIAL)
    assert re.search(rf"^gather: gathered +{N}$", p.stdout, re.M)
    row = next(x for x in p.stdout.splitlines() if ghost in x and "FAILED" in x)
    assert "did not announce itself within 3 s (no presence" in row  # --timeout 3
    # a site with no device at all is a failure, not an empty success
    p = f.run("gather", "--server", f"mqtt://127.0.0.1:{broker.port}/empty-site", "--out",
              "e.cbor", "--timeout", "3", code=1)
    assert "no device of the site has announced itself" in p.stderr

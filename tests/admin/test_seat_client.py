"""Issue 15 item 3: SeatClient checks out, renews in the background, returns on exit; a
client process killed with SIGKILL gives its seat back when its lease lapses."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.errors import NoSeatError
from agent.ops import AgentOps
from agent.rpc import RemoteError
from apps.seat_client import SeatClient
from hw import listen
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device

WAIT = 30.0  # an upper bound for a background renewal to happen; never asserted as a time


@pytest.fixture
def served(device: Device) -> Iterator[tuple[str, Device]]:
    req = device.request(features=["editor"])
    device.agent.apply(device.vendor.issue(req, [Grant("editor", 2, floating=True)],
                                           now=device.clock()))
    lst = listen("tcp://127.0.0.1:0", AgentOps(device.agent))
    lst.start()
    try:
        yield lst.address, device
    finally:
        lst.stop()


def out(device: Device) -> list[str]:
    return sorted(s.client for s in device.agent.seat_list()[0])


def wait_for(cond: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_with_block_checks_out_renews_and_returns(served: tuple[str, Device]) -> None:
    url, device = served
    with SeatClient(url, "editor", client="ws-anna", lease=60, renew_every=0.05) as seat:
        assert out(device) == ["ws-anna"] and seat.seat is not None
        first_until = seat.seat.until
        device.clock.t += 50  # the server's clock moves: the next renewal reaches further
        wait_for(lambda: seat.seat is not None and seat.seat.until > first_until,
                 "no background renewal")
        device.clock.t += 30  # past the first lease's end: still held thanks to the renewal
        assert out(device) == ["ws-anna"] and not seat.lost.is_set()
    assert out(device) == [] and seat.lost.is_set()  # returned on exit


def test_no_seat_free_is_raised_from_with_and_a_refused_renewal_sets_lost(
        served: tuple[str, Device]) -> None:
    url, device = served
    with SeatClient(url, "editor", client="a"), SeatClient(url, "editor", client="b"):
        with pytest.raises(RemoteError) as exc, SeatClient(url, "editor", client="c"):
            pass
        assert exc.value.exit_code == NoSeatError.exit_code == 9
    lagging = SeatClient(url, "editor", client="late", lease=10, renew_every=0.05)
    with lagging:
        device.clock.t += 11  # the lease lapses before any renewal reaches the server
        wait_for(lagging.lost.is_set, "the refused renewal was not noticed")
        assert lagging.error is not None and lagging.error.reason == "seat-not-out"
    assert out(device) == []


def test_a_killed_client_frees_its_seat_when_its_lease_lapses(served: tuple[str, Device]) -> None:
    url, device = served
    script = textwrap.dedent(f"""
        import sys, time
        from apps.seat_client import SeatClient
        with SeatClient({url!r}, "editor", client="doomed", lease=60):
            print("holding", flush=True)
            time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
        proc.kill()  # SIGKILL: no return
        proc.wait(timeout=WAIT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out(device) == ["doomed"]
    device.clock.t += 59
    assert out(device) == ["doomed"]
    device.clock.t += 1
    assert out(device) == []
    with SeatClient(url, "editor", client="a"), SeatClient(url, "editor", client="b"):
        assert out(device) == ["a", "b"]


def test_the_readme_client_in_five_lines_runs(served: tuple[str, Device]) -> None:
    url, device = served
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("An editor uses the Python client", 1)[1].split("```python\n", 1)[1]
    code = block.split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 5 and "SeatClient(" in code
    held: list[list[str]] = []
    exec(code.replace("tcp://10.1.4.20:7700", url),
         {"run_the_editor": lambda: held.append(out(device))})
    assert held == [["ws-anna"]] and out(device) == []

"""Item 6: once a check has seen a license expired, no earlier clock makes it licensed again.

The clock high-water mark is committed (a ``clock`` journal record, then the slot)
whenever a check's answer depended on it, not only when it moved by an hour; a clock
set back is named with ISO 8601 dates and a way to recover. Driven through the real
``licagent`` command line with a staged clock (``LICAGENT_TIME``).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from agent.messages import Action
from agent.store import SLOTS, Store
from apps.licagent.cli import main as licagent_main
from simulators.licensing_server.vendor import Grant
from tests.conftest import T0, Device


def iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


class Cli:
    def __init__(self, device: Device, facts: Path, capsys: pytest.CaptureFixture[str],
                 monkeypatch: pytest.MonkeyPatch) -> None:
        self.device, self.facts, self.capsys, self.mp = device, facts, capsys, monkeypatch

    def __call__(self, t: int, *argv: str) -> tuple[int, str, str]:
        self.mp.setenv("LICAGENT_TIME", str(t))
        code = licagent_main([*argv, "--state", str(self.device.directory),
                              "--facts", str(self.facts)])
        out = self.capsys.readouterr()
        return code, out.out, out.err


@pytest.fixture
def cli(device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> Cli:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(device.facts.read().as_dict()))
    return Cli(device, facts, capsys, monkeypatch)


def install(device: Device, feature: str, not_after: int, grace: int = 0) -> None:
    req = device.request(Action.ACTIVATE, [feature])
    device.agent.apply(device.vendor.issue(
        req, [Grant(feature, 5, not_after=not_after, grace=grace)], now=device.clock()))


def journal(device: Device) -> list[tuple[str, object]]:
    return [(e.event, e.data) for e in Store.open(device.directory, None).journal.read().entries]


def test_a_license_seen_expired_stays_expired_whatever_the_clock_reads(
    device: Device, cli: Cli,
) -> None:
    install(device, "bacnet", not_after=T0 + 100)
    assert cli(T0 + 50, "check", "bacnet")[0] == 0
    # seen expired 200 s later: well within the hour the old rule waited before saving
    code, out, _ = cli(T0 + 200, "check", "bacnet")
    assert code == 1 and "bacnet: expired" in out
    assert journal(device)[-1] == ("clock", {"clock_hwm": T0 + 200, "feature": "bacnet",
                                             "decided": "expired"})
    assert Store.open(device.directory, None).state.clock_hwm == T0 + 200

    # every earlier clock: within the tolerance, just before the end, long before
    for t in (T0 + 150, T0 + 100, T0 + 50, T0 - 86_400):
        code, out, err = cli(t, "check", "bacnet")
        assert code == 1, (t, out)
        assert err == ""
    code, out, _ = cli(T0 - 86_400, "check", "bacnet")
    assert "clock set back" in out and iso(T0 - 86_400) in out and iso(T0 + 200) in out
    # status agrees and says the clock is set back
    code, out, _ = cli(T0 - 86_400, "status", "--json")
    st = json.loads(out)
    assert st["clock_set_back"] is True and st["clock_high_water"] == iso(T0 + 200)
    assert [lic["licensed_now"] for lic in st["licenses"]] == [False]


def test_one_write_per_edge(device: Device, cli: Cli) -> None:
    """The mark is saved when the answer depended on it, then not again for every check."""
    install(device, "bacnet", not_after=T0 + 100, grace=50)
    n = len(journal(device))
    assert cli(T0 + 120, "check", "bacnet")[0] == 0  # in grace: an edge
    assert journal(device)[-1][1] == {"clock_hwm": T0 + 120, "feature": "bacnet",
                                      "decided": "in-grace"}
    assert cli(T0 + 200, "check", "bacnet")[0] == 1  # past grace: the next edge
    assert journal(device)[-1][1] == {"clock_hwm": T0 + 200, "feature": "bacnet",
                                      "decided": "expired"}
    slots = {p: (device.directory / p).read_bytes() for p in SLOTS}
    for t in (T0 + 210, T0 + 300, T0 + 1000):  # nothing new to decide
        assert cli(t, "check", "bacnet")[0] == 1
    assert len(journal(device)) == n + 2
    assert {p: (device.directory / p).read_bytes() for p in SLOTS} == slots
    # a feature that is not installed decides nothing about time
    assert cli(T0 + 2000, "check", "modbus")[0] == 1
    assert len(journal(device)) == n + 2


def test_the_mark_survives_a_damaged_newest_slot(device: Device, cli: Cli) -> None:
    """The mark is a committed state like any other: its journal record replays it."""
    install(device, "bacnet", not_after=T0 + 100)
    assert cli(T0 + 200, "check", "bacnet")[0] == 1
    s = Store.open(device.directory, None)
    slot = device.directory / SLOTS[s.slot]
    slot.write_bytes(os.urandom(slot.stat().st_size))
    assert Store.open(device.directory, None).state.clock_hwm == T0 + 200
    assert cli(T0 + 50, "check", "bacnet")[0] == 1


def test_a_clock_set_back_is_refused_with_iso_dates_and_a_way_back(
    device: Device, cli: Cli, tmp_path: Path,
) -> None:
    device.activate(knx=1)
    req = device.request(Action.ACTIVATE, ["bacnet"])
    resp = tmp_path / "bacnet.resp"
    resp.write_bytes(device.vendor.issue(req, [Grant("bacnet", 2)], now=device.clock()))
    before = {p: (device.directory / p).read_bytes() for p in SLOTS}
    back = T0 - 2 * 86_400
    code, _out, err = cli(back, "apply", str(resp))
    assert code == 7
    line = err.strip()
    assert "\n" not in line and line.startswith("licagent: clock-set-back: ")
    assert iso(back) in line and iso(T0) in line
    assert "set the system clock to the right time" in line
    assert str(back) not in line  # dates, never raw POSIX seconds
    assert {p: (device.directory / p).read_bytes() for p in SLOTS} == before
    # the way back works: the clock put right, the same response applies
    assert cli(T0 + 10, "apply", str(resp))[0] == 0


def test_a_window_passed_over_between_two_checks_is_not_revived(
    device: Device, cli: Cli,
) -> None:
    """A license valid from T0+100 to T0+200, first checked at T0+300: not yet valid at the
    mark and expired now are both "not licensed", but the mark must still move, or a clock
    set to T0+150 would find it licensed."""
    req = device.request(Action.ACTIVATE, ["bacnet"])
    device.agent.apply(device.vendor.issue(
        req, [Grant("bacnet", 5, not_before=T0 + 100, not_after=T0 + 200)], now=device.clock()))
    code, out, _ = cli(T0 + 300, "check", "bacnet")
    assert code == 1 and "expired" in out
    assert journal(device)[-1][1] == {"clock_hwm": T0 + 300, "feature": "bacnet",
                                      "decided": "expired"}
    for t in (T0 + 150, T0 + 100):
        code, out, _ = cli(t, "check", "bacnet")
        assert code == 1 and "expired" in out, (t, out)

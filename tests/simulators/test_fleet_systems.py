"""Issue 14 item 7: licsim ``[[systems]]`` (an Enterprise Server and its children over real
tcp links), the faults parent-offline, parent-reclaim and child-moved, and the invariants
grants-within-count, inherited-within-lease and reclaimed-not-inherited."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import UsageError
from simulators.fleet import Fleet
from simulators.fleet.scenario import FaultSpec, parse_scenario

BIN = Path(sys.executable).parent


def _scenario(**extra: object) -> dict[str, object]:
    return {"site": "sys", "seed": 7,
            "systems": [{"name": "north", "children": 4, "links": ["tcp"],
                         "licenses": {"SNMP": 3, "LON": 1}, "lease": 3600},
                        {"name": "south", "children": 2, "child_model": "AS-B",
                         "links": ["tcp"], "licenses": {"SNMP": 2}}],
            **extra}


def test_systems_inherit_and_hold_their_invariants_through_the_three_faults(
        tmp_path: Path) -> None:
    with Fleet.from_scenario(_scenario(), tmp_path / "fleet") as fleet:
        assert fleet.ready
        north, _south = fleet.systems
        assert north.top.model == "Enterprise-Server" and len(north.children) == 4
        uses = {c.name: {x["feature"] for x in c.agent().status()["licenses"]
                         if x.get("source") == "inherited" and x["licensed_now"]}
                for c in north.children}
        assert sum("SNMP" in v for v in uses.values()) == 3  # COUNT, not the 4 children
        assert sum("LON" in v for v in uses.values()) == 1
        assert all(i.held for i in fleet.invariants()), fleet.invariants()

        off = fleet.inject(FaultSpec("parent-offline", server="north"))
        assert off["held"] and off["injected"], off
        assert {c["name"] for c in off["checks"]} == {
            "inherited-ends-with-lease", "says-why", "inherited-again"}
        rec = fleet.inject(FaultSpec("parent-reclaim", server="north"))
        assert rec["held"], rec
        assert "LON reclaimed from north-top" in rec["detail"]
        moved = fleet.inject(FaultSpec("child-moved", server="south"))
        assert moved["held"], moved
        assert len(fleet.systems[0].children) == 5 and len(fleet.systems[1].children) == 1
        inv = {i.name: i for i in fleet.invariants()}
        for name in ("grants-within-count", "inherited-within-lease",
                     "reclaimed-not-inherited", "within-entitlement", "stores-verify"):
            assert inv[name].held, inv[name]
        summary = fleet.summary().to_json()
    assert summary["servers"]["started"] == 8
    assert summary["servers"]["by_model"]["Enterprise-Server"] == 2


def test_the_invariants_catch_a_child_using_a_reclaimed_license(tmp_path: Path) -> None:
    """A child that never heard of the reclaim (not renewed) still holds its lease: legal;
    one whose store says it uses the reclaimed license past the reclaim is reported."""
    sc = _scenario(systems=[{"name": "solo", "children": 1, "licenses": {"SNMP": 1}}])
    with Fleet.from_scenario(sc, tmp_path / "fleet") as fleet:
        (run,) = fleet.systems
        run.reclaimed.add("SNMP")  # the fleet believes SNMP left, the child still uses it
        inv = {i.name: i for i in fleet.invariants()}
        assert not inv["reclaimed-not-inherited"].held
        assert "solo-0001: SNMP" in inv["reclaimed-not-inherited"].detail


@pytest.mark.parametrize(("change", "message"), [
    ({"systems": [{"name": "a", "children": 0}]}, "[[systems]] #1 children: must be a whole "
                                                  "number of at least 1"),
    ({"systems": [{"name": "a", "links": ["pty"]}]}, "a Enterprise-Server has no pty link"),
    ({"systems": [{"name": "a", "colour": 1}]}, "unknown key colour"),
    ({"systems": [{"name": "a"}, {"name": "a"}]}, "two systems are named 'a'"),
])
def test_system_scenario_errors_name_the_key(change: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_scenario(_scenario(**change))


def test_random_faults_draw_system_kinds_only_with_systems() -> None:
    plain = parse_scenario({"servers": [{"model": "AS-P"}], "faults": {"count": 1,
                                                                       "every": 1}})
    assert not {"parent-offline", "parent-reclaim", "child-moved"} & set(
        plain.random_faults.kinds)
    with_sys = parse_scenario(_scenario(faults={"count": 1, "every": 1}))
    assert {"parent-offline", "parent-reclaim", "child-moved"} <= set(
        with_sys.random_faults.kinds)


def test_licsim_runs_a_system_scenario_with_scheduled_faults(tmp_path: Path) -> None:
    scen = tmp_path / "systems.toml"
    scen.write_text('''site = "sys"
seed = 3
[[systems]]
name = "a"
children = 3
licenses = { SNMP = 2 }
lease = 600
[[systems]]
name = "b"
children = 2
licenses = { SNMP = 1 }
[[faults]]
kind = "parent-offline"
at = 0.1
server = "a"
[[faults]]
kind = "child-moved"
at = 0.2
server = "a"
[[faults]]
kind = "parent-reclaim"
at = 0.3
server = "b"
''')
    out = tmp_path / "summary.json"
    p = subprocess.run([str(BIN / "licsim"), "run", str(scen), "--duration", "2",
                        "--summary-json", str(out)], capture_output=True, text=True,
                       timeout=300, check=False)
    assert p.returncode == 0, (p.stdout, p.stderr)
    summary = json.loads(out.read_text())
    names = {i["name"]: i["held"] for i in summary["invariants"]}
    for n in ("grants-within-count", "inherited-within-lease", "reclaimed-not-inherited",
              "faults-injected"):
        assert names[n] is True, summary["invariants"]
    log = summary["faults"]["log"]
    assert [f["kind"] for f in log] == ["parent-offline", "child-moved", "parent-reclaim"]
    assert all(f["held"] and f["injected"] for f in log), log
    assert summary["ok"] is True

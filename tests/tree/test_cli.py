"""Issue 14 from the command line: ``licagent attach`` (over a shared usbdrop:// folder and
over tcp), ``licagent use``, ``check --count``, and the refusals with their one line and
exit code, the store unchanged."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.tree.test_system_daemons import System


def _files(s: System, name: str) -> dict[str, bytes]:
    d = s.root / name
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def test_attach_over_a_shared_usbdrop_folder_then_use_and_check_count(system: System) -> None:
    s = system
    s.init("top", "Enterprise-Server")
    s.init("kid", "AS-P")
    s.activate("top", "SNMP=1")
    stick = s.root / "stick"
    _top, _url = s.daemon("top", "--listen", f"usbdrop://{stick}?always=1&poll=0.1")
    out = s.run("licagent", "attach", *s.store("kid"), "--parent",
                f"usbdrop://{stick}").stdout.splitlines()
    assert out == [f"attached to parent {s.ids['top']} at usbdrop://{stick}",
                   "inherited: SNMP"]
    st = json.loads(s.run("licagent", "status", *s.store("kid"), "--json").stdout)
    assert [(x["feature"], x["source"], x["parent"]) for x in st["licenses"]] == [
        ("SNMP", "inherited", s.ids["top"])]
    assert s.run("licagent", "check", *s.store("kid"), "SNMP").stdout.startswith(
        "SNMP: licensed, count 1 (inherited 1 from parent")
    p = s.run("licagent", "check", *s.store("kid"), "SNMP", "--count", "2", code=1)
    assert "SNMP: not licensed: 2 units asked, 1 licensed" in p.stdout
    assert s.run("licagent", "use", *s.store("kid"), "SNMP=1").stdout == "SNMP: 1 required\n"
    before = _files(s, "kid")
    p = s.run("licagent", "use", *s.store("kid"), "SNMP", code=2)
    assert p.stderr == "licagent: usage: 'SNMP': expected FEATURE=COUNT, e.g. bacnet-ip=1\n"
    assert _files(s, "kid") == before


def test_refusals_name_the_thing_with_their_exit_code(system: System) -> None:
    s = system
    s.init("top", "Enterprise-Server")
    s.init("asp", "AS-P")
    s.init("kid", "AS-B")
    s.activate("top", "SNMP=2")
    _t, top_url = s.daemon("top", "--listen", "tcp://127.0.0.1:0")
    _a, asp_url = s.daemon("asp", "--listen", "tcp://127.0.0.1:0")
    before = _files(s, "kid")
    # an automation server has no children
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", asp_url, code=5)
    assert p.stderr.startswith("licagent: not-top-server: this server is an AS-P; only an "
                               "Enterprise-Server has child servers")
    assert p.stderr.count("\n") == 1 and _files(s, "kid") == before
    # a parent that is not listening: a transport failure, nothing recorded
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", "tcp://127.0.0.1:9",
              code=1)
    assert p.stderr.startswith("licagent: transport: ") and _files(s, "kid") == before
    # attached; then the top server's reclaim is refused while the child holds a grant
    s.run("licagent", "attach", *s.store("kid"), "--parent", top_url)
    p = s.run("licadmin", "request", "--server", top_url, "reclaim", "--feature", "SNMP",
              "--out", str(s.root / "r.req"), code=1)
    assert p.stderr.startswith(f"licadmin: grants-held: 1 grant(s) still held by child "
                               f"servers: {s.ids['kid'][:12]}… (SNMP, lease until "
                               f"2027-01-22T08:00:00Z)")
    assert not (s.root / "r.req").exists()
    # licserver: --demo needs a grant
    p = s.run("licserver", "issue", "--key", str(s.root / "vendor" / "vendor.key"),
              "--request", str(s.root / "top.req"), "--demo", "--remove", "SNMP",
              "--out", str(s.root / "x.resp"), code=2)
    assert "--demo needs --grant" in p.stderr


def test_the_parent_daemon_s_lease_flag_and_the_config_keys(system: System) -> None:
    s = system
    s.init("top", "Enterprise-Server")
    s.init("kid", "AS-P")
    s.activate("top", "SNMP=1")
    conf = s.root / "top.toml"
    conf.write_text('listen = ["tcp://127.0.0.1:0"]\nlease = 3600\n')
    _t, url = s.daemon("top", "--config", str(conf))
    s.run("licagent", "attach", *s.store("kid"), "--parent", url)
    st = json.loads(s.run("licagent", "status", *s.store("kid"), "--json").stdout)
    assert st["licenses"][0]["lease_until"] == "2027-01-15T09:00:00Z"  # T0 + 3600 s
    bad = s.root / "bad.toml"
    bad.write_text('state = "top"\nlisten = ["tcp://127.0.0.1:0"]\nrenew_every = 0\n')
    p = s.run("licagent", "run", "--config", str(bad), code=2)
    assert "bad.toml: renew_every must be seconds between renewals with the parent (a whole number), not 0" in p.stderr
    p = s.run("licagent", "run", *s.store("top"), "--listen", "tcp://127.0.0.1:0",
              "--lease", "0", code=2)
    assert p.stderr == "licagent: usage: --lease 0: must be at least 1\n"


def test_licadmin_use_over_tcp_reaches_the_tree(system: System) -> None:
    s = system
    s.init("top", "Enterprise-Server")
    s.activate("top", "SNMP=2")
    _t, url = s.daemon("top", "--listen", "tcp://127.0.0.1:0")
    assert s.run("licadmin", "use", "--server", url, "SNMP=1").stdout == "SNMP: 1 required\n"
    p = s.run("licadmin", "use", "--server", url, "bad name=1", code=2)
    assert p.stderr.startswith("licadmin: usage: feature name 'bad name' is not valid")
    out = json.loads(s.run("licadmin", "tree", "--server", url, "--json").stdout)
    assert out["totals"] == [{"feature": "SNMP", "required": 1, "licensed": 2,
                              "inherited": 0, "available": 1}]
    p = s.run("licadmin", "check", "--server", url, "SNMP", "--count", "3", code=1)
    assert "SNMP: 3 units asked, 2 licensed" in p.stdout


def _stand_in_children(parent: object, like: object, n: int, now: int) -> None:
    """``n`` children with genuine self-signed device information (each its own key and
    device ID) renewed on ``parent``'s store directly: how 1,000 children are had in
    seconds rather than the minutes of 1,000 initialised stores (tests/bench/tree_system.py
    measures that)."""
    from agent import protocol
    from agent.cose import SigningKey
    from agent.record import replace

    st = like.agent.state()[0]  # type: ignore[attr-defined]
    hw_map = like.agent.hardware().as_dict()  # type: ignore[attr-defined]
    hw_map["model"] = st.model
    for i in range(n):
        key = SigningKey.generate()
        info, _i = protocol.make_device_info(
            replace(st, device_id=key.public.kid.hex(), device_key=key.public), hw_map,
            f"{i:064x}", now, key)
        parent.agent.renew_child(info, None, {})  # type: ignore[attr-defined]


@pytest.mark.slow
def test_at_the_children_cap_a_new_child_hears_one_line_and_nothing_changes(
        system: System, site: Any) -> None:
    """A parent keeping MAX_CHILDREN (1,000) child servers refuses a 1,001st with one line
    and exit code 2 (on the child's ``licagent attach``, over a real tcp link); neither
    store changes; a child it already keeps still renews."""
    import hw
    from agent import inherit
    from agent.ops import AgentOps
    from apps.licagent.relation import renew_once
    from tests.tree.conftest import activate, top

    s = system
    p = top(site)
    activate(p, inherit=True, SNMP=1)
    known = site.device()
    lst = hw.listen("tcp://127.0.0.1:0", AgentOps(p.agent))
    lst.start()
    try:
        assert renew_once(known.agent, lst.address).installed == ("SNMP",)
        _stand_in_children(p, known, inherit.MAX_CHILDREN - 1, site.clock())
        assert len(p.agent.state()[0].system.children) == inherit.MAX_CHILDREN == 1000
        s.init("kid", "AS-P")
        parent_before, kid_before = _files_of(p.directory), _files(s, "kid")
        r = s.run("licagent", "attach", *s.store("kid"), "--parent", lst.address, code=2)
        kid_id = s.ids["kid"]
        assert r.stderr == (f"licagent: usage: this server already keeps 1000 child servers, "
                            f"the most one parent keeps; attach {kid_id[:12]}… to another "
                            f"Enterprise Server\n")
        assert r.stdout == ""
        assert _files_of(p.directory) == parent_before  # nothing recorded on the parent
        assert _files(s, "kid") == kid_before  # nor on the child: not attached
        st = json.loads(s.run("licagent", "status", *s.store("kid"), "--json").stdout)
        assert st["licenses"] == []
        # a child the parent already keeps is no new child: it still renews, keeps its grant
        out = renew_once(known.agent, lst.address)
        assert out.installed == ("SNMP",) and out.refused == ()
        assert len(p.agent.state()[0].system.children) == 1000
    finally:
        lst.stop()


def _files_of(d: Path) -> dict[str, bytes]:
    return {q.name: q.read_bytes() for q in sorted(d.iterdir()) if q.is_file()}

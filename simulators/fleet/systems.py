"""Issue 14 in the fleet: ``[[systems]]`` (an Enterprise Server and its children), their
three faults and the three invariants of inherited licenses.

A system's top server (``NAME-top``, an ``Enterprise-Server``) is activated with its
licenses marked inheritable (COUNT children each); every child (``NAME-NNNN``) attaches
to it over the top's first link, through the same code as ``licagent attach``
(:func:`apps.licagent.relation.renew_once`) and so over a real link. The faults:

* ``parent-offline``: the top is not heard from past the lease (the whole system's clock
  moves past it, the children do not renew): every child loses the inherited licenses
  and ``check`` says the lease ended; the top back, the children inherit again;
* ``parent-reclaim``: one inheritable license is reclaimed on the top (forced, its receipt
  naming the leases still running); the children lose it at their next renewal;
* ``child-moved``: a child is attached to another system's top; it inherits from that
  one only.

Invariants: ``grants-within-count`` (no top has more live grants of a feature than its
COUNT, and no more children use it), ``inherited-within-lease`` (every inherited license a
child uses comes from the parent it is attached to, inside a lease no longer than the
system's), ``reclaimed-not-inherited`` (no child uses a license reclaimed from its top).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import LicensingError
from agent.messages import Action
from simulators.fleet.models import make_facts
from simulators.fleet.report import Invariant
from simulators.fleet.scenario import FaultSpec, SystemSpec
from simulators.fleet.server import SimServer
from simulators.licensing_server.vendor import Grant

# the fleet (simulators.fleet.fleet.Fleet) and its fault records are passed in; this module
# imports neither, so that the fleet may import it
Fleet = Any
FaultRecord = dict[str, Any]

__all__ = ["SystemRun", "attach_children", "fault_child_moved", "fault_parent_offline",
           "fault_parent_reclaim", "provision_systems", "system_invariants"]

SUBSCRIPTION = 365 * 86400


@dataclass
class SystemRun:
    """One system of the fleet as it stands: its top, its children, what was reclaimed."""

    spec: SystemSpec
    top: SimServer
    children: list[SimServer] = field(default_factory=list)
    reclaimed: set[str] = field(default_factory=set)

    def parent_url(self) -> str:
        return self.top.addresses[self.top.links[0]]


def provision_systems(fleet: Fleet, index: int) -> list[SystemRun]:
    """Make each system's servers (not yet served); ``index`` is the last server number."""
    runs = []
    for spec in fleet.scenario.systems:
        index += 1
        top = _server(fleet, f"{spec.name}-top", "Enterprise-Server", spec.links, index)
        top.lease = spec.lease
        if spec.licenses:
            _activate_inheritable(fleet, top, dict(spec.licenses))
        fleet.entitled[top.name] = dict(spec.licenses)
        run = SystemRun(spec, top)
        for i in range(spec.children):
            index += 1
            child = _server(fleet, f"{spec.name}-{i + 1:04d}", spec.child_model, spec.links,
                            index)
            fleet.entitled[child.name] = {}
            run.children.append(child)
        runs.append(run)
    return runs


def _server(fleet: Fleet, name: str, model: str, links: tuple[str, ...], index: int
            ) -> SimServer:
    from agent.errors import UsageError

    if name in fleet.by_name:
        raise UsageError(f"scenario: two servers would be named {name}; give the systems "
                         f"other names")
    facts = make_facts(model, fleet.scenario.seed, index)
    srv = SimServer(name, model, fleet.workdir / "servers" / name, facts, links)
    agent = srv.agent()
    if not (srv.state_dir / "device.key").exists():
        agent.init(model, facts.serial, fleet.trust)
    srv.device_id = str(agent.status()["device_id"])
    fleet.servers.append(srv)
    fleet.by_name[name] = srv
    return srv


def _activate_inheritable(fleet: Fleet, top: SimServer, licenses: dict[str, int]) -> None:
    assert fleet.vendor is not None
    agent = top.agent()
    req = agent.request(Action.ACTIVATE, list(licenses))
    now = top.now()
    agent.apply(fleet.vendor.issue(req, [Grant(f, n, not_after=now + SUBSCRIPTION, inherit=n)
                                         for f, n in licenses.items()], now=now))


def _renew(child: SimServer, run: SystemRun) -> Any:
    from apps.licagent.relation import renew_once

    own = child.addresses.get(child.links[0])
    return renew_once(child.agent(), run.parent_url(), own, timeout=10.0)


def attach_children(fleet: Fleet) -> None:
    """Every child attaches to its top (once the tops are served)."""
    for run in fleet.systems:
        fleet.log(f"system {run.spec.name}: attaching {len(run.children)} children")
        inherited = 0
        for child in run.children:
            inherited += bool(_renew(child, run).installed)
        fleet.log(f"system {run.spec.name}: {len(run.children)} children attached to "
                  f"{run.top.name}, {inherited} inherit")


# ---------------------------------------------------------------- faults


def _pick_system(fleet: Fleet, fault: FaultSpec, rec: FaultRecord,
                 want: Any = lambda _r: True) -> SystemRun:
    runs: list[SystemRun] = [
        r for r in fleet.systems if want(r)
        and (fault.server is None or fault.server in (r.spec.name, r.top.name))]
    if not runs:
        raise fleet.NoFit(f"skipped: no system of this fleet fits a {fault.kind} fault")
    run: SystemRun = fleet.rng.choice(runs)
    rec["server"] = run.top.name
    return run


def _uses(child: SimServer, feature: str) -> bool:
    st = child.agent().status()
    return any(x["feature"] == feature and x.get("source") == "inherited" and x["licensed_now"]
               for x in st["licenses"])


def fault_parent_offline(fleet: Fleet, fault: FaultSpec, rec: FaultRecord) -> None:
    run = _pick_system(fleet, fault, rec, lambda r: bool(r.children))
    jump = run.spec.lease + 60
    for srv in (run.top, *run.children):
        srv.clock_offset += jump
    held = [c for c in run.children
            if any(x.get("source") == "inherited" for x in c.agent().status()["licenses"])]
    lost, why = [], []
    for c in held:
        feats = [x["feature"] for x in c.agent().status()["licenses"]
                 if x.get("source") == "inherited"]
        for f in feats:
            r = c.agent().check(f)
            lost.append(not r.licensed)
            why.append("lease ended" in r.message)
    fleet._check(rec, "inherited-ends-with-lease", all(lost),
                 f"{len(held)} child(ren) held inherited licenses; "
                 f"{sum(lost)} of {len(lost)} ended after {jump} s without the parent")
    fleet._check(rec, "says-why", all(why), "check names the ended lease" if all(why)
                 else "a check did not say the lease ended")
    back = sum(bool(_renew(c, run).installed) for c in run.children)
    expect = min(len(run.children), min(
        (n for f, n in run.spec.licenses.items() if f not in run.reclaimed), default=0))
    fleet._check(rec, "inherited-again", back >= expect,
                 f"the parent back: {back} child(ren) inherit again (at least {expect})")
    rec["detail"] = (f"{run.top.name} not heard from for {jump} s (lease {run.spec.lease} s); "
                     f"{len(run.children)} children")


def fault_parent_reclaim(fleet: Fleet, fault: FaultSpec, rec: FaultRecord) -> None:
    assert fleet.vendor is not None
    run = _pick_system(fleet, fault, rec,
                       lambda r: bool(set(r.spec.licenses) - r.reclaimed))
    feature = sorted(set(run.spec.licenses) - run.reclaimed)[0]
    agent = run.top.agent()
    req = agent.request(Action.RECLAIM, [feature], force=True)
    res, _w = agent.apply(fleet.vendor.issue(req, removes=[feature], now=run.top.now()))
    from agent.formats import verify_receipt

    rc = verify_receipt(res.receipt, fleet.trust)
    run.reclaimed.add(feature)
    fleet.reclaimed.setdefault(run.top.name, set()).add(feature)
    for c in run.children:
        _renew(c, run)
    still = [c.name for c in run.children if _uses(c, feature)]
    fleet._check(rec, "reclaimed-not-inherited", not still,
                 f"{feature} gone from every child at its next renewal" if not still
                 else f"still used by {', '.join(still[:5])}")
    rec["detail"] = (f"{feature} reclaimed from {run.top.name} (forced: the receipt names "
                     f"{len(rc.leases)} lease(s) still running)")


def fault_child_moved(fleet: Fleet, fault: FaultSpec, rec: FaultRecord) -> None:
    if len(fleet.systems) < 2:
        raise fleet.NoFit("skipped: child-moved needs two systems")
    src = _pick_system(fleet, fault, rec, lambda r: bool(r.children))
    dst = fleet.rng.choice([r for r in fleet.systems if r is not src])
    child = fleet.rng.choice(src.children)
    rec["server"] = child.name
    out = _renew(child, dst)
    src.children.remove(child)
    dst.children.append(child)
    st = child.agent().state()[0]
    parent = st.system.parent
    ok = parent is not None and parent.device_id == dst.top.device_id
    fleet._check(rec, "attached-to-new-parent", ok,
                 f"{child.name} now under {dst.top.name}" if ok else "parent not changed")
    foreign = [g.feature for g in st.system.inherited if g.parent_id != dst.top.device_id]
    fleet._check(rec, "inherits-from-new-parent-only", not foreign,
                 f"inherits {', '.join(out.installed) or 'nothing'} from {dst.top.name}"
                 if not foreign else f"still holds {', '.join(foreign)} from its old parent")
    rec["detail"] = f"{child.name} moved from {src.top.name} to {dst.top.name}"


# ---------------------------------------------------------------- invariants


def system_invariants(systems: Sequence[SystemRun]) -> list[Invariant]:
    """The three invariants of inherited licenses over every system now."""
    if not systems:
        return []
    over: list[str] = []
    outside: list[str] = []
    revived: list[str] = []
    for run in systems:
        try:
            top = run.top.agent().state()
        except LicensingError as exc:
            over.append(f"{run.top.name}: {exc.reason}")
            continue
        tst, _w, tnow = top
        t = max(tnow, tst.clock_hwm)
        users: dict[str, int] = {}
        for c in run.children:
            try:
                cst, _w2, cnow = c.agent().state()
            except LicensingError as exc:
                outside.append(f"{c.name}: {exc.reason}")
                continue
            ct = max(cnow, cst.clock_hwm)
            parent = cst.system.parent
            for g in cst.system.inherited:
                if not g.valid_at(ct):
                    continue
                users[g.feature] = users.get(g.feature, 0) + 1
                if parent is None or g.parent_id != parent.device_id or \
                        g.lease_until - g.issued > run.spec.lease or ct > g.lease_until:
                    outside.append(f"{c.name}: {g.feature}")
                if g.feature in run.reclaimed:
                    revived.append(f"{c.name}: {g.feature}")
        for f, n in run.spec.licenses.items():
            live = len(tst.system.active_grants(f, t))
            if live > n or users.get(f, 0) > n:
                over.append(f"{run.top.name}: {f} {live} grants, {users.get(f, 0)} users > {n}")
    n_children = sum(len(r.children) for r in systems)
    return [
        Invariant("grants-within-count", not over, "; ".join(over[:5]) or
                  f"no top server grants more children than COUNT ({len(systems)} systems)"),
        Invariant("inherited-within-lease", not outside, "; ".join(outside[:5]) or
                  f"every inherited license in use is inside its lease from the child's own "
                  f"parent ({n_children} children)"),
        Invariant("reclaimed-not-inherited", not revived, "; ".join(revived[:5]) or
                  "no child uses a license reclaimed from its top server"),
    ]

"""The fleet's invariants: what must hold in every store, and what each fault checked.

Pure over what the fleet knows (its servers, what it issued and reclaimed, its
fault records); each server's store is opened read-only through its agent.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set

from agent.errors import LicensingError
from simulators.fleet.faults import FaultRecord
from simulators.fleet.report import Invariant
from simulators.fleet.server import SimServer

__all__ = ["FAULTS_INJECTED", "check_invariants", "faults_injected"]


def check_invariants(servers: Sequence[SimServer], ready: bool, not_ready: Sequence[str],
                     entitled: Mapping[str, Mapping[str, int]],
                     reclaimed: Mapping[str, Set[str]],
                     faults: Sequence[FaultRecord]) -> list[Invariant]:
    """Check every server's store now, and fold in what each fault checked.

    Args:
        servers: the fleet's servers.
        ready: every server answered on every link at start; ``not_ready`` says which did not.
        entitled: server name -> feature -> the count the fleet issued.
        reclaimed: server name -> the features reclaimed from it.
        faults: the fault records (their ``checks``).
    """
    out = [Invariant("all-reachable-at-start", ready,
                     "every server answered on every link" if ready
                     else "; ".join(not_ready[:5]))]
    bad: dict[str, list[str]] = {"stores-verify": [], "journals-verify": [],
                                 "within-entitlement": [], "reclaimed-gone": []}
    external: set[str] = set()
    for srv in servers:
        try:
            st = srv.agent().status()
        except LicensingError as exc:
            bad["stores-verify"].append(f"{srv.name}: {exc.reason}: {exc}")
            continue
        try:
            srv.agent().journal()
        except LicensingError as exc:
            bad["journals-verify"].append(f"{srv.name}: {exc}")
        ent = entitled.get(srv.name, {})
        for lic in st["licenses"]:
            if lic.get("source", "own") != "own":
                continue  # inherited from a parent (issue 14): checked by the system invariants
            if lic["feature"] not in ent:
                external.add(lic["feature"])  # issued by a licensing server, not by us
            elif lic["count"] > ent[lic["feature"]]:
                bad["within-entitlement"].append(
                    f"{srv.name}: {lic['feature']} {lic['count']} > {ent[lic['feature']]}")
        for f in reclaimed.get(srv.name, ()):
            if any(lic["feature"] == f and lic.get("source", "own") == "own"
                   for lic in st["licenses"]):
                bad["reclaimed-gone"].append(f"{srv.name}: {f}")
    what = {"stores-verify": "every store opens, verifies its MAC and its hardware binding",
            "journals-verify": "every journal's hash chain and MACs verify",
            "within-entitlement": "no installed count above what the server was issued",
            "reclaimed-gone": "no reclaimed license is installed again"}
    if external:
        what["within-entitlement"] += (f"; features issued outside the fleet, not "
                                       f"checked: {', '.join(sorted(external))}")
    for name, problems in bad.items():
        out.append(Invariant(name, not problems, "; ".join(problems[:5]) or
                             f"{what[name]} ({len(servers)} servers)"))
    by_check: dict[str, list[tuple[bool, str]]] = {}
    for rec in faults:
        for chk in rec["checks"]:
            by_check.setdefault(f"{rec['kind']}: {chk['name']}", []).append(
                (chk["held"], f"{rec['server']}: {chk['detail']}"))
    for name, results in by_check.items():
        broken = [d for h, d in results if not h]
        out.append(Invariant(name, not broken, "; ".join(broken[:5]) or
                             f"held in {len(results)} fault(s)"))
    planned = [r for r in faults if r.get("planned")]
    if planned:
        out.append(faults_injected(planned))
    return out


#: the check that no fault of the scenario was dropped silently
FAULTS_INJECTED = "faults-injected"


def faults_injected(planned: Sequence[FaultRecord]) -> Invariant:
    """Every fault the scenario planned was injected, unless it is marked optional."""
    missing = [r for r in planned if not r["injected"] and not r.get("optional")]
    skipped = sum(1 for r in planned if not r["injected"] and r.get("optional"))
    done = sum(1 for r in planned if r["injected"])
    if missing:
        detail = (f"{len(missing)} of the scenario's {len(planned)} fault(s) not injected "
                  "(mark a fault optional = true if it may be): "
                  + "; ".join(f"{r['kind']} {r['server'] or '-'}: {r['detail'].strip()}"
                              for r in missing[:5])
                  + (f"; and {len(missing) - 5} more" if len(missing) > 5 else ""))
    else:
        detail = (f"every fault of the scenario was injected ({done} of {len(planned)}"
                  + (f"; {skipped} optional not injected" if skipped else "") + ")")
    return Invariant(FAULTS_INJECTED, not missing, detail)

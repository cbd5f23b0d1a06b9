"""Benchmark (issue 14): a system of 1 top server and 1,000 children brought to inherited
licenses, in one licsim fleet over real tcp links.

``system_rows()`` returns the README row written by ``tests/bench/run.py``. Run alone with
``python tests/bench/tree_system.py [CHILDREN]``. Measured: the time from an empty folder
to every child holding a verified grant (provisioning the 1,001 stores, serving them, each
child's renewal with the top: device information, grant signed by the top, the chain
verified on the child), the attach phase alone, and the fleet process's resident memory
per server once they are all attached.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

__all__ = ["system_rows"]

CHILDREN = 1000


def measure(children: int = CHILDREN) -> dict[str, float]:
    from simulators.fleet import Fleet
    from simulators.fleet.fleet import rss_kib

    sc = {"site": "bench", "seed": 14,
          "systems": [{"name": "plant", "children": children, "links": ["tcp"],
                       "licenses": {"SNMP": children}}]}
    with tempfile.TemporaryDirectory(prefix="licsim-tree-") as tmp:
        rss0 = rss_kib()
        t0 = time.perf_counter()
        marks: dict[str, float] = {}

        def log(line: str) -> None:
            if "children attached" in line:
                marks["attached"] = time.perf_counter()
            elif line.split(" ", 1)[-1].startswith("provisioned"):
                marks["provisioned"] = time.perf_counter()
            elif "children" in line and "attaching" in line:
                marks["attaching"] = time.perf_counter()

        fleet = Fleet.from_scenario(sc, Path(tmp) / "fleet", log=log)
        fleet.start(ready_timeout=600)
        try:
            t1 = time.perf_counter()
            (run,) = fleet.systems
            inheriting = sum(
                1 for c in run.children
                if any(g.feature == "SNMP" for g in c.agent().state()[0].system.inherited))
            rss = rss_kib()
            inv = {i.name: i.held for i in fleet.invariants()}
        finally:
            fleet.stop()
    return {"children": children, "inheriting": inheriting, "total_s": t1 - t0,
            "attach_s": marks.get("attached", t1) - marks.get("attaching", t0),
            "kib_per_server": (rss - rss0) / (children + 1),
            "invariants_held": float(all(inv.values()))}


def system_rows() -> list[tuple[str, str, str]]:
    m = measure()
    return [(f"a system of 1 Enterprise Server and {int(m['children']):,} children brought to "
             f"inherited licenses (licsim `[[systems]]`, tcp)",
             f"{m['total_s']:.1f} s in all, {m['attach_s']:.1f} s of attaching; "
             f"{m['kib_per_server']:.1f} KiB per server",
             f"{int(m['inheriting']):,} of {int(m['children']):,} children hold a verified "
             f"grant; invariants {'held' if m['invariants_held'] else 'BROKEN'}; one process")]


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else CHILDREN
    print(measure(n))

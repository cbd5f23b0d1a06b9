"""``licadmin tree --server TOP_URL [--json]`` (issue 14): the system under a top server.

The top server answers ``get-tree`` with its own node and what each child last reported
(its features and its own children). Each child that said where it listens is asked
directly too: reachable, its live answer is shown; otherwise its last report, marked
unreachable. Per server and feature: required, licensed (own + inherited), inherited and
available; the totals roll the system up (each column summed: a unit a parent lends to a
child is counted once as the child's inherited unit and once less as the parent's
available one, so the system's available is its own licenses less what it requires).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import LicensingError
from agent.rpc import Op, TreeResult
from apps.common import print_json

__all__ = ["FEATURE_KEYS", "collect", "show"]

#: the keys of each feature row in the JSON (a contract)
FEATURE_KEYS = ("feature", "required", "licensed", "inherited", "available")
MAX_LEVELS = 3


def _node(report: Mapping[str, Any], parent: str | None, reachable: bool,
          url: str | None) -> dict[str, Any]:
    feats = [{k: f.get(k, 0) if k != "feature" else f.get("feature") for k in FEATURE_KEYS}
             for f in report.get("features", []) if isinstance(f, dict)]
    serial = report.get("serial")
    dev = str(report.get("device_id", ""))
    return {"name": serial if isinstance(serial, str) else (url or dev[:12]),
            "device_id": dev, "model": report.get("model"), "parent": parent,
            "reachable": reachable, "url": url, "features": feats}


def collect(top: Mapping[str, Any], ask: Callable[[str], Mapping[str, Any] | None]
            ) -> dict[str, Any]:
    """The system as ``{"servers": [...], "totals": [...]}``.

    ``ask(url)`` is a child's live ``get-tree`` answer, or None when it cannot be reached.
    """
    servers: list[dict[str, Any]] = []

    def walk(report: Mapping[str, Any], parent: str | None, reachable: bool,
             url: str | None, level: int) -> None:
        node = _node(report, parent, reachable, url)
        servers.append(node)
        if level >= MAX_LEVELS:
            return
        for child in report.get("children", []):
            if not isinstance(child, dict):
                continue
            curl = child.get("url") if isinstance(child.get("url"), str) else None
            live = ask(curl) if curl else None
            walk(live if live is not None else child, node["device_id"], live is not None,
                 curl, level + 1)

    walk(top, None, True, None, 1)
    totals: dict[str, dict[str, Any]] = {}
    for s in servers:
        for f in s["features"]:
            t = totals.setdefault(f["feature"], {k: 0 for k in FEATURE_KEYS} | {
                "feature": f["feature"]})
            for k in FEATURE_KEYS[1:]:
                t[k] += f[k] if type(f[k]) is int else 0
    return {"servers": servers, "totals": [totals[k] for k in sorted(totals)]}


def show(client: Any, open_client: Callable[[str], Any], as_json: bool) -> int:
    """Print the system under the server ``client`` talks to; exit 0."""
    top = client.typed(Op.GET_TREE).to_wire()

    def ask(url: str) -> Mapping[str, Any] | None:
        try:
            with open_client(url) as c:
                result: TreeResult = c.typed(Op.GET_TREE)
                return result.to_wire()
        except LicensingError:
            return None

    system = collect(top, ask)
    if as_json:
        print_json(system)
        return 0
    depth = {None: -1}
    for s in system["servers"]:
        level = depth.get(s["parent"], -1) + 1
        depth[s["device_id"]] = level
        pad = "  " * level
        print(f"{pad}{s['name']}  {s['model']}  {s['device_id'][:12]}  "
              f"{'reachable' if s['reachable'] else 'NOT REACHABLE (last report)'}")
        for f in s["features"]:
            print(f"{pad}    {f['feature']:<16} required {f['required']:<4} licensed "
                  f"{f['licensed']:<4} inherited {f['inherited']:<4} available {f['available']}")
    print(f"system: {len(system['servers'])} server(s)")
    for f in system["totals"]:
        print(f"    {f['feature']:<16} required {f['required']:<4} licensed {f['licensed']:<4} "
              f"inherited {f['inherited']:<4} available {f['available']}")
    return 0

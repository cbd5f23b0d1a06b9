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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from agent.errors import LicensingError
from agent.rpc import Op, RelayArgs, TreeResult
from apps.common import print_json
from hw.link import ServerClient

__all__ = ["FEATURE_KEYS", "Relay", "collect", "expand", "show"]

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


# ------------------------------------------------ issue 14 item 5: the workflow through the top


class _Relayed(ServerClient):
    """One server under the top server, asked through it (``relay``): every answer is the
    server's own, its files signed by the server itself, so the top cannot alter them."""

    def __init__(self, top: ServerClient, device_id: str) -> None:
        self.top = top
        self.device_id = device_id

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        return self.top.call(Op.RELAY, RelayArgs(self.device_id, str(op), dict(args or {})
                                                 ).to_wire())

    def close(self) -> None:
        self.top.close()


class Relay:
    """The ``via`` of a :class:`ServerRef` reached through a top server (runner)."""

    def __init__(self, url: str, connect: Callable[[str], ServerClient]) -> None:
        self.url = url
        self.connect = connect

    def client(self, device_id: str) -> ServerClient:
        return _Relayed(self.connect(self.url), device_id)

    def close(self) -> None:
        pass


def expand(servers: Sequence[Any], connect: Callable[[str], ServerClient]) -> list[Any]:
    """``--tree``: each top server followed by every server under it, reached through it.

    Raises:
        LicensingError: a top server cannot be asked for its tree.
    """
    out: list[Any] = []
    for ref in servers:
        out.append(ref)
        with connect(ref.url) as client:
            top = client.typed(Op.GET_TREE).to_wire()
        _walk(top, ref, Relay(ref.url, connect), out, 1)
    return out


def _walk(report: Mapping[str, Any], ref: Any, via: Relay, out: list[Any], level: int) -> None:
    from apps.licadmin.inventory import ServerRef

    if level >= MAX_LEVELS:
        return
    for child in report.get("children", []):
        if isinstance(child, dict) and isinstance(child.get("device_id"), str):
            dev = child["device_id"]
            serial = child.get("serial")
            name = serial if isinstance(serial, str) else dev[:12]
            out.append(ServerRef(ref.url, f"{name} (via {ref.label})", via=via, device=dev))
            _walk(_own_tree(child, via, level), ref, via, out, level + 1)


def _own_tree(child: Mapping[str, Any], via: Relay, level: int) -> Mapping[str, Any]:
    """An Enterprise Server under the top, asked for its own tree through the top: the
    report its parent keeps of it may have lost its children (a report is kept within
    agent.inherit.MAX_REPORT bytes; the features go in first). Unreachable: the last
    report, as the top heard it."""
    from agent.inherit import PARENT_MODELS

    if child.get("model") not in PARENT_MODELS or level + 1 >= MAX_LEVELS:
        return child
    try:
        with via.client(str(child["device_id"])) as c:
            own: TreeResult = c.typed(Op.GET_TREE)
            return own.to_wire()
    except LicensingError:
        return child

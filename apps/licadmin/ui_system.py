"""The system tree (issue 14) on the Servers and Show Licenses screens of ``licadmin ui``.

What ``licadmin tree --server TOP_URL`` prints, as tables: each server under a top server
of the site (reachable, or its last report), and per server and feature required,
licensed (own + inherited), inherited and available, with the system's totals. Read with
the servers (:meth:`apps.licadmin.ui_flow.Site.read_servers`, :func:`apps.licadmin.tree.collect`).
"""

from __future__ import annotations

from typing import Any

from apps.licadmin.tree import FEATURE_KEYS
from apps.licadmin.ui_flow import Site
from apps.licadmin.ui_pages import e, table

__all__ = ["licenses_section", "place", "servers_section"]


def _levels(system: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    depth: dict[Any, int] = {None: -1}
    out = []
    for s in system["servers"]:
        level = depth.get(s["parent"], -1) + 1
        depth[s["device_id"]] = level
        out.append((level, s))
    return out


def _labels(site: Site) -> dict[str, str]:
    """Device ID to the name the site's file gives the server (if it lists it)."""
    return {v.status.device_id: site.servers[k].label
            for k, v in enumerate(site.views or []) if v.status is not None}


def _name(level: int, s: dict[str, Any], labels: dict[str, str]) -> str:
    # the site's name for it, else its serial; indented with no-break spaces, and said as
    # "level N" to a screen reader
    return ("\u00a0\u00a0" * level + e(labels.get(s["device_id"], s["name"]))
            + (f'<span class="sr"> (level {level + 1})</span>' if level else ""))


def place(site: Site) -> list[str]:
    """Each site server's place in a system: "top of N server(s)", "under NAME", or "-"."""
    ids = [v.status.device_id if v.status is not None else None for v in site.views or []]
    said = ["-"] * len(site.servers)
    labels = _labels(site)
    for k, system in site.systems:
        said[k] = f"top of {len(system['servers'])} server(s)"
        names = {s["device_id"]: labels.get(s["device_id"], s["name"])
                 for s in system["servers"]}
        for s in system["servers"][1:]:
            for j, dev in enumerate(ids):
                if dev == s["device_id"] and said[j] == "-":
                    said[j] = f"under {names.get(s['parent'], s['parent'][:12])}"
    return said


def servers_section(site: Site) -> str:
    out = ""
    labels = _labels(site)
    for k, system in site.systems:
        rows = [(_name(level, s, labels), s["model"] or "-", s["device_id"],
                 "yes" if s["reachable"] else "no: its last report to its parent",
                 s["url"] or "-")
                for level, s in _levels(system)]
        out += table(f"System under {site.servers[k].label}: {len(rows)} server(s)",
                     ("Server", "Model", "Device ID", "Reachable", "Link"), rows,
                     f"system-{k}", raw=frozenset({0}))
    return out


def licenses_section(site: Site) -> str:
    out = ""
    labels = _labels(site)
    for k, system in site.systems:
        rows = []
        for level, s in _levels(system):
            feats = s["features"] or [dict.fromkeys(FEATURE_KEYS, "")]
            for n, f in enumerate(feats):
                rows.append((_name(level, s, labels) if n == 0 else "",
                             f["feature"] or "(none)",
                             *(f[key] for key in FEATURE_KEYS[1:])))
        for t in system["totals"]:
            rows.append(("<strong>system total</strong>", t["feature"],
                         *(t[key] for key in FEATURE_KEYS[1:])))
        out += table(f"System under {site.servers[k].label}: required, licensed (own + "
                     f"inherited), inherited and available, per server and in total",
                     ("Server", "Feature", "Required", "Licensed", "Inherited", "Available"),
                     rows, f"system-licenses-{k}", raw=frozenset({0}))
    return out

"""The fleet's own clients (load, reachability checks): one per server and link, reused."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from simulators.fleet.links import ServedLinks
from simulators.fleet.server import SimServer

__all__ = ["MAX_CLIENTS", "FleetClients"]

#: clients the fleet keeps open at once (load over many servers reuses the recent ones)
MAX_CLIENTS = 64


class FleetClients:
    """The fleet's clients, the least recently used closed past :data:`MAX_CLIENTS`.

    Each link kind connects its own client (:meth:`simulators.fleet.links.FleetLink.connect`).
    """

    def __init__(self, links: ServedLinks) -> None:
        self.links = links
        self.open: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def get(self, server: SimServer, link: str, timeout: float, faulty: bool = True) -> Any:
        """The client of ``server`` on ``link``; ``timeout`` bounds one call, retries included.

        ``faulty``: on sim:// the load's line carries ``[load] sim_line`` faults; the
        reachability checks use a clean line.
        """
        kind = self.links.kind(link)
        line_faults = kind.load_faults if faulty else ""
        key = (server.name, link + ("+faults" if line_faults else ""))
        c = self.open.get(key)
        if c is not None:
            self.open.move_to_end(key)
            return c
        while len(self.open) >= MAX_CLIENTS:  # the least recently used goes
            _k, old = self.open.popitem(last=False)
            try:
                old.close()
            except Exception:
                pass
        c = kind.connect(server.addresses[link], timeout, line_faults)
        self.open[key] = c
        return c

    def has(self, server: SimServer, link: str) -> bool:
        return any(k in self.open for k in ((server.name, link), (server.name, link + "+faults")))

    def release(self, server: SimServer, link: str) -> None:
        """Done for now: a link kind that does not keep its client (a console) closes it."""
        if not self.links.kind(link).keeps_client:
            self.drop(server, link)

    def drop(self, server: SimServer, link: str) -> None:
        for key in ((server.name, link), (server.name, link + "+faults")):
            c = self.open.pop(key, None)
            if c is None:
                continue
            try:
                c.close()
            except Exception:
                pass

    def close(self) -> None:
        for key in list(self.open):
            c = self.open.pop(key)
            try:
                c.close()
            except Exception:
                pass
        self.links.close_clients()

"""One simulated server: paths, facts and IDs only; its store is opened per operation.

A :class:`SimServer` keeps no agent, key or store in memory (the goal is a few
KiB per server at 10,000 servers): each operation makes an
:class:`agent.service.Agent` over the server's directory, with the server's
hardware facts and clock, and :class:`ServerHandler` runs it through the
agent's operation table (:class:`agent.ops.AgentOps`), as ``licagent run`` does.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.durable import FileOps
from agent.identity import HardwareFacts
from agent.ops import AgentOps
from agent.service import Agent
from hw.facts import StaticFactsProvider

__all__ = ["ServerHandler", "SimServer"]


class SimServer:
    """A simulated automation server of the fleet.

    Attributes:
        name: ``as-p-0001`` style name, unique in the fleet.
        model: AS-P, AS-B or Edge-Server.
        directory: the server's folder (its store is ``directory/state``).
        facts: the hardware facts it reports now (a replaced network card changes them).
        device_id: the SHA-256 of its device key, filled in after provisioning.
        links: the links it is served on.
        addresses: link -> the URL a client uses (filled in once served).
        clock_offset: seconds added to the wall clock (clock-jump faults).
    """

    __slots__ = ("addresses", "clock_offset", "device_id", "directory", "facts", "lease",
                 "links", "model", "name")

    def __init__(self, name: str, model: str, directory: Path, facts: HardwareFacts,
                 links: tuple[str, ...]) -> None:
        self.name = name
        self.model = model
        self.directory = str(directory)
        self.facts = facts
        self.links = links
        self.device_id = ""
        self.addresses: dict[str, str] = {}
        self.clock_offset = 0
        self.lease: int | None = None  # issue 14: a system's top server grants this long

    @property
    def state_dir(self) -> Path:
        return Path(self.directory) / "state"

    def now(self) -> int:
        return int(time.time()) + self.clock_offset

    def agent(self, ops: FileOps | None = None, facts: HardwareFacts | None = None,
              directory: Path | None = None) -> Agent:
        """An agent over this server's store (or ``directory``) as this hardware sees it now."""
        if self.lease is None:
            return Agent(directory or self.state_dir, StaticFactsProvider(facts or self.facts),
                         clock=self.now, ops=ops)
        from agent.protocol import DEFAULT_LIMITS
        from agent.record import replace

        return Agent(directory or self.state_dir, StaticFactsProvider(facts or self.facts),
                     clock=self.now, ops=ops,
                     limits=replace(DEFAULT_LIMITS, grant_lease=self.lease))

    def __repr__(self) -> str:
        return f"SimServer({self.name}, {self.model}, {self.device_id[:12]})"


class ServerHandler:
    """The ``(op, args) -> result`` a listener calls for one server; counts what it served."""

    __slots__ = ("counts", "server")

    def __init__(self, server: SimServer, counts: Counter[str]) -> None:
        self.server = server
        self.counts = counts

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        result = AgentOps(self.server.agent())(op, args)
        self.counts[op] += 1
        return result


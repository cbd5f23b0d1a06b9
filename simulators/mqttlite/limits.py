"""Can this process hold N broker sessions? File descriptors and loopback ports, checked up front.

Every simulated device holds one TCP connection: one file descriptor here and
one in the broker (mosquitto too is bound by its RLIMIT_NOFILE), and one local
port per source address (``/proc/sys/net/ipv4/ip_local_port_range``; every
connection goes to the same broker address and port, so each needs its own
local port). :func:`check_capacity` raises the soft descriptor limit to the
hard one, then either returns a :class:`CapacityPlan` that fits or raises
:class:`CapacityError` with a plan that would (more processes and brokers, or
more source addresses), so that a fleet never fails half-way with
"address not available" or "too many open files".
"""

from __future__ import annotations

import ipaddress
import math
import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import UsageError

__all__ = ["CapacityError", "CapacityPlan", "check_capacity", "fd_limit_of", "port_range",
           "raise_fd_limit"]

#: descriptors kept free for everything else the process opens (stores, logs, pipes)
FD_RESERVE = 256
#: local ports per source address left for other connections and TIME_WAIT after reconnects
PORT_MARGIN = 2000


class CapacityError(UsageError):
    """The requested number of sessions does not fit; the message says what would."""


@dataclass(frozen=True)
class CapacityPlan:
    """How ``sessions`` broker sessions fit into this process."""

    sessions: int
    fd_soft: int
    fd_hard: int
    fds_in_use: int
    fd_room: int
    ports_per_source: int
    sources: tuple[str, ...]
    broker_fd_limit: int | None = None

    def source_for(self, i: int) -> str:
        """The source address of session ``i`` (round robin)."""
        return self.sources[i % len(self.sources)]

    def describe(self) -> str:
        broker = (f", broker descriptor limit {self.broker_fd_limit}"
                  if self.broker_fd_limit is not None else "")
        return (f"{self.sessions} session(s) fit: descriptor limit {self.fd_soft} (hard "
                f"{self.fd_hard}), {self.fds_in_use} in use, room for {self.fd_room}; "
                f"{self.ports_per_source} usable local ports per source address, "
                f"source address(es) {', '.join(self.sources)}{broker}")


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; returns (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft, hard


def fd_limit_of(pid: int) -> int | None:
    """Another process's soft descriptor limit (e.g. the broker's), from /proc; None if unknown."""
    try:
        for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return None if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        pass
    return None


def port_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range (32768-60999 when it cannot be read)."""
    try:
        lo, hi = (int(x) for x in Path(path).read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def _fds_in_use() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 64


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_capacity(n_sessions: int, *, broker_host: str = "127.0.0.1",
                   sources: Sequence[str] | None = None, broker_fd_limit: int | None = None,
                   reserve: int = FD_RESERVE, raise_limit: bool = True) -> CapacityPlan:
    """Check that ``n_sessions`` broker connections fit in this process, before opening any.

    Args:
        n_sessions: how many device sessions this process will hold.
        broker_host: where they connect (a loopback broker allows extra source
            addresses 127.0.0.2, 127.0.0.3, ... without any set-up).
        sources: source addresses to spread the sessions over (default: one,
            the kernel's choice; more are planned on loopback when needed).
        broker_fd_limit: the broker's descriptor limit, if known (:func:`fd_limit_of`).
        reserve: descriptors kept for everything else.
        raise_limit: raise the soft descriptor limit to the hard one first.

    Raises:
        CapacityError: it does not fit; the message gives the numbers and a plan.
    """
    if n_sessions < 0:
        raise UsageError("the number of sessions cannot be negative")
    if raise_limit:
        soft, hard = raise_fd_limit()
    else:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft == resource.RLIM_INFINITY:
        soft = hard
    in_use = _fds_in_use()
    room = soft - in_use - reserve
    lo, hi = port_range()
    per_source = max(0, hi - lo + 1 - PORT_MARGIN)
    loopback = _is_loopback(broker_host)
    need_sources = max(1, math.ceil(n_sessions / per_source)) if per_source else 1
    given = tuple(sources) if sources else ()
    if len(given) >= need_sources:
        chosen = given or ("127.0.0.1" if loopback else "",)
    elif loopback:
        chosen = given + tuple(f"127.0.0.{i}" for i in range(len(given) + 1, need_sources + 1)
                               if f"127.0.0.{i}" not in given)
        chosen = chosen[:max(need_sources, len(given))]
    else:
        chosen = given or ("",)
    problems: list[str] = []
    per_process = min(hard - in_use - reserve,
                      (broker_fd_limit - reserve) if broker_fd_limit is not None else hard)
    if n_sessions > room:
        problems.append(f"{n_sessions} sessions need {n_sessions} descriptors here but only "
                        f"{max(room, 0)} are free (limit {soft}, hard limit {hard}, {in_use} in "
                        f"use, {reserve} kept for files and pipes)")
    if broker_fd_limit is not None and n_sessions > broker_fd_limit - 64:
        problems.append(f"the broker's descriptor limit is {broker_fd_limit} and it needs one "
                        f"per client (raise it, e.g. `ulimit -n` before starting mosquitto, or "
                        f"LimitNOFILE= in its systemd unit)")
    if not loopback and per_source and n_sessions > per_source * max(1, len(given)):
        problems.append(f"{n_sessions} connections to {broker_host} need "
                        f"{math.ceil(n_sessions / per_source)} source addresses ({per_source} "
                        f"local ports each, range {lo}-{hi}) but {max(1, len(given))} given")
    if problems:
        procs = max(2, math.ceil(n_sessions / max(1, per_process)))
        each = math.ceil(n_sessions / procs)
        plan = (f"plan: split the fleet into {procs} processes of at most {each} sessions, each "
                f"with its own broker (one site per process and broker), e.g. {procs} licsim "
                f"runs on different broker ports")
        if need_sources > 1:
            plan += (f"; spread each process's connections over source addresses "
                     f"{', '.join(chosen[:3])}{' ...' if len(chosen) > 3 else ''} "
                     f"({per_source} usable local ports each)")
        raise CapacityError("cannot hold the requested fleet in this process: "
                            + "; ".join(problems) + ". " + plan)
    return CapacityPlan(n_sessions, soft, hard, in_use, room, per_source, tuple(chosen),
                        broker_fd_limit)

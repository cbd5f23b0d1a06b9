"""The run's summary: servers, connect rate, operations, latency, messages, faults, invariants."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Invariant", "Latency", "Summary"]

#: latency samples kept (reservoir sampling beyond this)
MAX_SAMPLES = 100_000


@dataclass(frozen=True)
class Invariant:
    name: str
    held: bool
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "held": self.held, "detail": self.detail}


@dataclass
class Latency:
    """Round-trip times in seconds; percentiles by nearest rank."""

    samples: list[float] = field(default_factory=list)
    count: int = 0
    _rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, seconds: float) -> None:
        self.count += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(seconds)
        else:
            j = self._rng.randrange(self.count)
            if j < MAX_SAMPLES:
                self.samples[j] = seconds

    def percentiles_ms(self) -> dict[str, float | int | None]:
        s = sorted(self.samples)
        if not s:
            return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None}

        def rank(p: float) -> float:
            return round(s[min(len(s) - 1, max(0, int(p * len(s) + 0.999999) - 1))] * 1000, 3)

        return {"count": self.count, "p50": rank(0.50), "p90": rank(0.90), "p99": rank(0.99),
                "max": round(s[-1] * 1000, 3)}


@dataclass
class Summary:
    site: str
    seed: int
    workdir: str
    servers: int
    by_model: dict[str, int]
    by_link: dict[str, int]
    ready: bool
    ready_seconds: float
    run_seconds: float
    ops: dict[str, int]
    op_failures: dict[str, int]
    served: dict[str, int]
    latency: Latency
    messages: dict[str, int]
    faults: list[dict[str, Any]]
    invariants: list[Invariant]
    broker: str | None = None
    link_latency: dict[str, Latency] = field(default_factory=dict)
    provision_seconds: float = 0.0
    load_rate: float = 0.0
    memory: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Every invariant held."""
        return all(i.held for i in self.invariants)

    def to_json(self) -> dict[str, Any]:
        fault_kinds: dict[str, int] = {}
        for f in self.faults:
            if f.get("injected", True):
                fault_kinds[f["kind"]] = fault_kinds.get(f["kind"], 0) + 1
        return {
            "site": self.site,
            "seed": self.seed,
            "workdir": self.workdir,
            "broker": self.broker,
            "servers": {"started": self.servers, "by_model": self.by_model,
                        "by_link": self.by_link, "ready": self.ready},
            "connect": {"seconds": round(self.ready_seconds, 3),
                        "provision_seconds": round(self.provision_seconds, 3),
                        "rate_per_s": round(self.servers / self.ready_seconds, 1)
                        if self.ready_seconds > 0 else None},
            "run_seconds": round(self.run_seconds, 3),
            "load": {"target_per_s": self.load_rate,
                     "achieved_per_s": round(sum(self.ops.values()) / self.run_seconds, 1)
                     if self.run_seconds > 0 else None},
            "operations": {"done": sum(self.ops.values()),
                           "failed": sum(self.op_failures.values()),
                           "by_op": {op: {"ok": self.ops.get(op, 0),
                                          "failed": self.op_failures.get(op, 0)}
                                     for op in sorted({*self.ops, *self.op_failures})},
                           "served_by_servers": self.served},
            "latency_ms": self.latency.percentiles_ms(),
            "latency_ms_by_link": {k: v.percentiles_ms()
                                   for k, v in sorted(self.link_latency.items())},
            "memory": {**self.memory, "per_server_kib": self._per_server()},
            "messages": self.messages,
            "faults": {"injected": sum(fault_kinds.values()), "by_kind": fault_kinds,
                       "not_injected": self._not_injected(optional=False),
                       "optional_not_injected": self._not_injected(optional=True),
                       "log": self.faults},
            "invariants": [i.to_json() for i in self.invariants],
            "ok": self.ok,
        }

    def _not_injected(self, optional: bool) -> int:
        """Faults of the scenario that could not be injected (``optional`` ones or the others)."""
        return sum(1 for f in self.faults if f.get("planned") and not f.get("injected", True)
                   and bool(f.get("optional")) is optional)

    def _per_server(self) -> float | None:
        """Resident memory per server beyond the process's start (at start()), once ready."""
        start, ready = self.memory.get("rss_start_kib", 0), self.memory.get("rss_ready_kib", 0)
        if not (start and ready and self.servers):
            return None
        return round((ready - start) / self.servers, 2)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=2, sort_keys=False, default=str)

    def to_text(self) -> str:
        j = self.to_json()
        lat = j["latency_ms"]
        lines = [
            f"fleet {self.site} (seed {self.seed}): {self.servers} servers "
            f"({', '.join(f'{m} {n}' for m, n in self.by_model.items())}); links "
            f"{', '.join(f'{k} {n}' for k, n in sorted(self.by_link.items()))}",
            f"  connect: all reachable {'yes' if self.ready else 'NO'} after "
            f"{self.ready_seconds:.2f} s (provisioning {self.provision_seconds:.2f} s)"
            + (f" ({j['connect']['rate_per_s']} servers/s)" if j["connect"]["rate_per_s"] else ""),
            f"  run: {self.run_seconds:.1f} s; operations {j['operations']['done']} done, "
            f"{j['operations']['failed']} failed"
            + (f" ({j['load']['achieved_per_s']}/s of {self.load_rate:g}/s asked)"
               if self.load_rate else "")
            + "".join(f"; {op} {v['ok']}/{v['failed']}"
                      for op, v in j["operations"]["by_op"].items()),
        ]
        if lat["count"]:
            lines.append(f"  latency: p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} "
                         f"ms, max {lat['max']} ms ({lat['count']} round trips)")
            for link, v in j["latency_ms_by_link"].items():
                lines.append(f"    {link:<8} p50 {v['p50']} ms, p90 {v['p90']} ms, p99 "
                             f"{v['p99']} ms, max {v['max']} ms ({v['count']})")
        if self.served:
            lines.append("  served to outside clients and licsim's own: "
                         + ", ".join(f"{op} {n}" for op, n in sorted(self.served.items())))
        mem = j["memory"]
        if mem.get("per_server_kib") is not None:
            lines.append(f"  memory: {mem['rss_start_kib'] / 1024:.1f} MiB at start, "
                         f"{mem['rss_ready_kib'] / 1024:.1f} MiB with every server ready = "
                         f"{mem['per_server_kib']} KiB per server; peak {mem['peak_kib'] / 1024:.1f} MiB")
        m = self.messages
        lines.append(f"  messages: {m['lost']} lost, {m['duplicated']} duplicated, "
                     f"{m['corrupt_frames']} corrupt frames resynchronised, "
                     f"{m.get('reconnects', 0)} client reconnects after a link fault")
        fj = j["faults"]
        lines.append(f"  faults: {fj['injected']} injected"
                     + "".join(f"; {k} {n}" for k, n in fj["by_kind"].items())
                     + (f"; {fj['not_injected']} NOT INJECTED" if fj["not_injected"] else "")
                     + (f"; {fj['optional_not_injected']} optional not injected"
                        if fj["optional_not_injected"] else ""))
        for f in self.faults:
            lines.append(f"    {f['time']:8.3f} s {f['kind']:<14} {f['server'] or '-':<16} "
                         f"{_fault_outcome(f)}  {f['detail'].strip()[:200]}")
        held = sum(1 for i in self.invariants if i.held)
        lines.append(f"  invariants: {held} of {len(self.invariants)} held")
        for i in self.invariants:
            lines.append(f"    {'held  ' if i.held else 'BROKEN'} {i.name}: {i.detail[:300]}")
        broken = [i for i in self.invariants if not i.held]
        if not broken:
            lines.append("all invariants held")
        elif [i.name for i in broken] == ["faults-injected"]:
            lines.append(f"NOT OK: {fj['not_injected']} fault(s) of the scenario not injected "
                         "(listed above)")
        else:
            lines.append("INVARIANT BROKEN")
        return "\n".join(lines)


def _fault_outcome(f: dict[str, Any]) -> str:
    if not f.get("injected", True):
        if not f.get("planned"):
            return "skipped"
        return "skipped (optional)" if f.get("optional") else "NOT INJECTED"
    return "held" if f["held"] else "BROKEN"

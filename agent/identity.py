"""Hardware facts, host ID and tolerant binding of a store to the hardware it lives on.

The facts come from a :class:`FactsProvider`; ``hw.facts`` implements one that
reads Linux sysfs/DMI/device tree and one that takes the facts as given (for
simulated servers and tests).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from agent.digest import Sha256
from agent.record import field, record

__all__ = [
    "BindingCheck",
    "FactsProvider",
    "HardwareFacts",
    "check_binding",
    "host_id",
]


@record(frozen=True)
class HardwareFacts:
    """What the hardware says about itself.

    Each field is optional because real machines leave some of them empty
    (a VM has no board serial, a container has no DMI).
    """

    model: str | None = None
    serial: str | None = None
    macs: tuple[str, ...] = ()
    board: str | None = None
    firmware: str | None = None
    machine_id: str | None = None
    usb: tuple[str, ...] = field(default=())

    def binding_facts(self) -> tuple[str, ...]:
        """The facts the store is bound to, as sorted ``kind=value`` strings.

        Firmware and USB devices are left out: they change in normal service
        (a firmware upgrade, a laptop plugged in) and say nothing about whether
        this is the same box.
        """
        out: list[str] = []
        if self.model:
            out.append(f"model={self.model}")
        if self.serial:
            out.append(f"serial={self.serial}")
        if self.board:
            out.append(f"board={self.board}")
        if self.machine_id:
            out.append(f"machine-id={self.machine_id}")
        out.extend(f"mac={m.lower()}" for m in self.macs)
        return tuple(sorted(set(out)))

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "serial": self.serial,
            "macs": list(self.macs),
            "board": self.board,
            "firmware": self.firmware,
            "machine_id": self.machine_id,
            "usb": list(self.usb),
        }


class FactsProvider(Protocol):
    """Where hardware facts come from (implemented in ``hw.facts``)."""

    def read(self) -> HardwareFacts: ...


def host_id(facts: Iterable[str]) -> str:
    """Stable host ID: lowercase hex SHA-256 over the sorted binding facts."""
    h = Sha256()
    for f in sorted(set(facts)):
        h.update(f.encode("utf-8") + b"\n")
    return h.hexdigest()


@record(frozen=True)
class BindingCheck:
    """Outcome of comparing the bound facts with the hardware's facts now."""

    matched: int
    total: int
    ok: bool
    changed: bool
    missing: tuple[str, ...]
    added: tuple[str, ...]


def _votes(fact: str) -> int:
    """How much one matching fact counts: a serial number twice, a MAC or machine ID once.

    Model and board name are the same on every unit of a model, so they are
    no evidence that this is the same unit and get no vote.
    """
    if fact.startswith("serial="):
        return 2
    if fact.startswith(("mac=", "machine-id=")):
        return 1
    return 0


def check_binding(bound: Iterable[str], current: Iterable[str]) -> BindingCheck:
    """Tolerant binding: the model must hold, and a strict majority of the unit's own facts.

    Votes: serial number 2, each MAC address 1, machine ID 1. Replacing one
    network card of a box bound to ``{serial, mac}`` keeps 2 of 3 votes, so the
    store stays valid and re-binds itself; the same store copied to another box
    of the same model (even one cloned from the same image, with the same
    machine ID) keeps at most a minority and is refused.

    Args:
        bound: facts recorded in the store at provisioning or the last re-bind.
        current: facts the hardware reports now.
    """
    b = set(bound)
    c = set(current)
    if not any(f.startswith("model=") for f in c):
        # the Linux provider cannot know our product names: an absent model is unknown, not changed
        c |= {f for f in b if f.startswith("model=")}
    total = sum(_votes(f) for f in b)
    matched = sum(_votes(f) for f in b & c)
    bound_models = {f for f in b if f.startswith("model=")}
    model_ok = bound_models <= c
    ok = model_ok and (total == 0 or matched * 2 > total)
    missing = tuple(sorted(b - c))
    added = tuple(sorted(c - b))
    return BindingCheck(
        matched=matched, total=total, ok=ok, changed=bool(missing or added),
        missing=missing, added=added,
    )

"""Hardware facts, host ID and tolerant binding of a store to the hardware it lives on.

The facts come from a :class:`FactsProvider`; ``hw.facts`` implements one that
reads Linux sysfs/DMI/device tree and one that takes the facts as given (for
simulated servers and tests). Facts given as data are a test hook, and test hooks
are attack surface: a store bound to real hardware never accepts them
(:func:`check_facts_source`), and a binding must hold at least one fact that tells
this unit from another of its model (:func:`require_identifying`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from agent.digest import Sha256
from agent.errors import FactsOverrideError, NoIdentityError
from agent.record import field, record

__all__ = [
    "BindingCheck",
    "FactsProvider",
    "HardwareFacts",
    "binding_refusal",
    "check_binding",
    "check_facts_source",
    "host_id",
    "identifying_votes",
    "require_identifying",
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
        kept: tuple[str, ...] | None = self.__dict__.get("_binding")
        if kept is not None:  # the facts are immutable: computed once per instance
            return kept
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
        got = tuple(sorted(set(out)))
        self.__dict__["_binding"] = got
        return got

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

    @property
    def simulated(self) -> bool:
        """True if the facts are given as data (a facts file), not read from this machine."""
        ...

    @property
    def origin(self) -> str:
        """Where the facts come from, for messages (``this machine``, ``facts file F``)."""
        ...

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


def identifying_votes(facts: Iterable[str]) -> int:
    """The votes of the facts that tell one unit from another (serial, MACs, machine ID)."""
    return sum(_votes(f) for f in set(facts))


def require_identifying(binding: Iterable[str], origin: str) -> None:
    """Refuse to bind a store to facts that every other unit of the model could report too.

    A binding of model and board name only holds on every box of the model, so a
    copy of the store would run anywhere (and re-bind itself there).

    Raises:
        NoIdentityError: no serial number, MAC address or machine ID among ``binding``.
    """
    if identifying_votes(binding) == 0:
        raise NoIdentityError(
            f"refusing to bind the store: {origin} reports no serial number, no MAC address "
            f"and no machine ID, so a copy of the store could not be told from the original "
            f"on any other server; nothing was written. Give the server an identity (for a "
            f"simulated server: serial, macs or machine_id in its facts file)"
        )


def check_facts_source(store_simulated: bool, facts_simulated: bool, directory: object) -> None:
    """Refuse facts given as data for a store bound to this machine's own hardware.

    ``--facts`` / ``LICAGENT_FACTS`` / the daemon's ``facts =`` exist for simulated
    servers. A store initialised from real facts publishes those facts in its own
    device-information file; accepting an override would let a copy of it answer
    "licensed" anywhere, given the first server's facts.

    Raises:
        FactsOverrideError: the store was bound to real hardware and the facts are given.
    """
    if facts_simulated and not store_simulated:
        raise FactsOverrideError(
            f"the license store in {directory} is bound to the hardware it was initialised "
            f"on; a hardware facts override (--facts, LICAGENT_FACTS or the daemon's facts =) "
            f"is accepted only by a store initialised with one (a simulated server): run "
            f"without it"
        )


def check_binding(bound: Iterable[str], current: Iterable[str]) -> BindingCheck:
    """Tolerant binding: the model must hold, and a strict majority of the unit's own facts.

    Votes: serial number 2, each MAC address 1, machine ID 1. Replacing one
    network card of a box bound to ``{serial, mac}`` keeps 2 of 3 votes, so the
    store stays valid and re-binds itself; the same store copied to another box
    of the same model (even one cloned from the same image, with the same
    machine ID) keeps at most a minority and is refused.

    A binding with no identifying fact at all (a store made before ``init``
    refused such bindings) never holds: it could not tell this unit from any
    other, and re-binding it would follow a copy to any server.

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
    ok = model_ok and matched * 2 > total > 0
    missing = tuple(sorted(b - c))
    added = tuple(sorted(c - b))
    return BindingCheck(
        matched=matched, total=total, ok=ok, changed=bool(missing or added),
        missing=missing, added=added,
    )


def binding_refusal(chk: BindingCheck) -> str:
    """The one line that says why a binding does not hold (``CopiedStoreError``'s message)."""
    if chk.total == 0:
        return ("this license store is bound to no serial number, MAC address or machine ID, "
                "so it cannot tell its own hardware from any other and is refused rather than "
                "re-bound here; re-provision the server (licagent init) and ask the vendor to "
                "re-issue")
    return (f"this license store belongs to other hardware: only {chk.matched} of "
            f"{chk.total} identifying facts match (missing: {', '.join(chk.missing)}). "
            f"A store copied to another server is refused; ask the vendor to re-issue.")

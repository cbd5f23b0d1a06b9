"""The system tree a server keeps in its state (issue 14): its parent, the grants it holds
and the grants it handed out, as data with one pure transition per journaled event.

Pure: no I/O, no clock, no signature work (that is :mod:`agent.inherit`). Every change
of this part of the state is an event ``(name, data)`` that :func:`apply_event` turns
into the next :class:`SystemState`; the service commits the event to the journal and
the store's catch-up after a crash redoes it with the very same function, so a grant
handed out, returned or recalled is never lost nor revived by a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from agent.cose import PublicKey
from agent.errors import MalformedError
from agent.messages import ChangeOp, LicenseChange
from agent.record import field, record, replace

__all__ = [
    "EVENTS",
    "MAX_DEPTH",
    "Child",
    "GrantOut",
    "Inherited",
    "ParentLink",
    "SystemState",
    "after_changes",
    "apply_event",
]

#: the tree has at most three levels: depth 0 (Enterprise Central or a lone Enterprise
#: Server), 1 (an Enterprise Server under it), 2 (an automation server)
MAX_DEPTH = 2

#: the journal events whose effect is :func:`apply_event`
EVENTS = frozenset({"attach", "grant-install", "grant-issue", "grant-recall",
                    "grant-return", "use"})


def _key_cbor(prefix: str, key: PublicKey) -> dict[str, Any]:
    return {f"{prefix}_alg": key.alg, f"{prefix}_key": key.raw}


def _key_of(m: Mapping[str, Any], prefix: str) -> PublicKey:
    return PublicKey(m[f"{prefix}_alg"], m[f"{prefix}_key"])


@record(frozen=True)
class ParentLink:
    """The parent this server is attached to (``licagent attach`` / ``run --parent``).

    ``depth`` is this server's own level in the tree (the parent's plus one).
    """

    device_id: str
    key: PublicKey
    model: str
    url: str | None
    depth: int
    attached: int

    def to_cbor(self) -> dict[str, Any]:
        return {"device_id": self.device_id, **_key_cbor("parent", self.key),
                "model": self.model, "url": self.url, "depth": self.depth,
                "attached": self.attached}

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> ParentLink:
        return cls(m["device_id"], _key_of(m, "parent"), m["model"], m["url"], m["depth"],
                   m["attached"])


@record(frozen=True)
class Inherited:
    """A grant this server holds: verified when installed (agent.inherit.verify_grant),
    kept with the exact file so that it can be shown and returned."""

    feature: str
    parent_id: str
    count: int
    slot: int
    issued: int
    lease_until: int
    not_before: int | None
    not_after: int | None
    grace: int
    demo: bool
    file: bytes

    def to_cbor(self) -> dict[str, Any]:
        return {"feature": self.feature, "parent_id": self.parent_id, "count": self.count,
                "slot": self.slot, "issued": self.issued, "lease_until": self.lease_until,
                "not_before": self.not_before, "not_after": self.not_after,
                "grace": self.grace, "demo": self.demo, "file": self.file}

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> Inherited:
        return cls(m["feature"], m["parent_id"], m["count"], m["slot"], m["issued"],
                   m["lease_until"], m["not_before"], m["not_after"], m["grace"],
                   m["demo"] is True, m["file"])

    def valid_at(self, t: int) -> bool:
        """Inside its lease and its license's window (``t`` is already max(clock, mark))."""
        if t > self.lease_until or self.count <= 0:
            return False
        if self.not_before is not None and t < self.not_before:
            return False
        return self.not_after is None or t <= self.not_after + self.grace


@record(frozen=True)
class GrantOut:
    """A grant this server handed to a child: one of the license's ``inherit`` slots."""

    child_id: str
    feature: str
    slot: int
    issued: int
    until: int
    recalled: bool = False

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"child_id": self.child_id, "feature": self.feature,
                               "slot": self.slot, "issued": self.issued, "until": self.until}
        if self.recalled:
            out["recalled"] = True
        return out

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> GrantOut:
        return cls(m["child_id"], m["feature"], m["slot"], m["issued"], m["until"],
                   m.get("recalled") is True)


@record(frozen=True)
class Child:
    """A child server as it last renewed: its key (to verify its returns), where it
    listens, and what it reported (its part of the tree)."""

    device_id: str
    key: PublicKey
    model: str
    url: str | None
    seen: int
    report: Mapping[str, Any] = field(default_factory=dict)

    def to_cbor(self) -> dict[str, Any]:
        return {"device_id": self.device_id, **_key_cbor("child", self.key),
                "model": self.model, "url": self.url, "seen": self.seen,
                "report": dict(self.report)}

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> Child:
        return cls(m["device_id"], _key_of(m, "child"), m["model"], m["url"], m["seen"],
                   m.get("report", {}))


@record(frozen=True)
class SystemState:
    """This server's place in the system tree; empty for a server that stands alone."""

    parent: ParentLink | None = None
    inherited: tuple[Inherited, ...] = ()
    children: tuple[Child, ...] = ()
    granted: tuple[GrantOut, ...] = ()
    #: children's signed grant returns, kept until the reclaim's receipt carries them
    returned: tuple[tuple[str, bytes], ...] = ()
    #: feature -> the vendor response that set it, for each inheritable own license
    proofs: Mapping[str, bytes] = field(default_factory=dict)
    #: feature -> units the host application reports it needs (``licagent use``)
    required: Mapping[str, int] = field(default_factory=dict)
    #: features whose grants are being taken back (a reclaim asked): granted to no child
    #: until the license leaves or comes again
    recalled: tuple[str, ...] = ()

    def empty(self) -> bool:
        return (self.parent is None and not self.inherited and not self.children
                and not self.granted and not self.returned and not self.proofs
                and not self.required and not self.recalled)

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.parent is not None:
            out["parent"] = self.parent.to_cbor()
        if self.inherited:
            out["inherited"] = [g.to_cbor() for g in self.inherited]
        if self.children:
            out["children"] = [c.to_cbor() for c in self.children]
        if self.granted:
            out["granted"] = [g.to_cbor() for g in self.granted]
        if self.returned:
            out["returned"] = [[f, r] for f, r in self.returned]
        if self.proofs:
            out["proofs"] = dict(self.proofs)
        if self.required:
            out["required"] = dict(self.required)
        if self.recalled:
            out["recalled"] = list(self.recalled)
        return out

    @classmethod
    def from_cbor(cls, m: object) -> SystemState:
        """From the store's CBOR (MAC-checked) or a journal record's data."""
        if m is None:
            return EMPTY
        if not isinstance(m, dict):
            raise MalformedError("the system part of the state must be a map")
        try:
            p = m.get("parent")
            return cls(
                parent=None if p is None else ParentLink.from_cbor(p),
                inherited=tuple(Inherited.from_cbor(g) for g in m.get("inherited", ())),
                children=tuple(Child.from_cbor(c) for c in m.get("children", ())),
                granted=tuple(GrantOut.from_cbor(g) for g in m.get("granted", ())),
                returned=tuple((f, r) for f, r in m.get("returned", ())),
                proofs=dict(m.get("proofs", {})),
                required=dict(m.get("required", {})),
                recalled=tuple(m.get("recalled", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedError(f"the system part of the state has the wrong shape: "
                                 f"{exc!r}") from exc

    @property
    def depth(self) -> int:
        return 0 if self.parent is None else self.parent.depth

    def active_grants(self, feature: str, t: int) -> list[GrantOut]:
        """Grants of ``feature`` whose lease has not ended at ``t``."""
        return [g for g in self.granted if g.feature == feature and g.until >= t]


EMPTY = SystemState()


def _upsert(items: Iterable[Any], new: Any, same: Any) -> tuple[Any, ...]:
    return (*(x for x in items if not same(x, new)), new)


def apply_event(sys_: SystemState, event: str, data: Mapping[str, Any]) -> SystemState:
    """The system state after one journaled event (pure; the same live and in replay).

    Raises:
        MalformedError: the data does not have the event's shape.
    """
    try:
        return _EVENT_STEPS[event](sys_, data)
    except (KeyError, TypeError, ValueError) as exc:
        raise MalformedError(f"{event} record has the wrong shape: {exc!r}") from exc


def _attach(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    parent = ParentLink.from_cbor(d["parent"])
    keep = s.inherited if s.parent is not None and s.parent.device_id == parent.device_id else ()
    return replace(s, parent=parent, inherited=keep)


def _install(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    """The parent's answer is the whole set it grants now: the features it names replace
    the ones held from that parent; the others from it are dropped."""
    grants = tuple(Inherited.from_cbor(g) for g in d["grants"])
    parent_id = d["parent_id"]
    kept = tuple(g for g in s.inherited if g.parent_id != parent_id)
    return replace(s, inherited=tuple(sorted((*kept, *grants), key=lambda g: g.feature)))


def _issue(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    child = Child.from_cbor(d["child"])
    children = _upsert(s.children, child, lambda a, b: a.device_id == b.device_id)
    granted = s.granted
    for g in (GrantOut.from_cbor(x) for x in d["grants"]):
        granted = _upsert(granted, g, lambda a, b: (a.child_id, a.feature) == (b.child_id,
                                                                             b.feature))
    dropped = set(d.get("dropped", ()))
    granted = tuple(g for g in granted if not (g.child_id == child.device_id
                                               and g.feature in dropped))
    expired_before = d.get("expired_before")
    if type(expired_before) is int:  # leases that ended free their slots
        granted = tuple(g for g in granted if g.until >= expired_before)
    return replace(s, children=tuple(sorted(children, key=lambda c: c.device_id)),
                   granted=tuple(sorted(granted, key=lambda g: (g.feature, g.slot))))


def _recall(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    feats = set(d["features"])
    return replace(s, granted=tuple(replace(g, recalled=True) if g.feature in feats else g
                                    for g in s.granted),
                   recalled=tuple(sorted({*s.recalled, *feats})))


def _return(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    child, feats, file = d["child_id"], set(d["features"]), d["return"]
    if not isinstance(file, bytes):
        raise TypeError("a grant return record carries the return file")
    granted = tuple(g for g in s.granted if not (g.child_id == child and g.feature in feats))
    returned = (*s.returned, *((f, file) for f in sorted(feats)))
    return replace(s, granted=granted, returned=returned,
                   inherited=s.inherited)


def _return_child(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    feats = set(d["features"])
    return replace(s, inherited=tuple(g for g in s.inherited if g.feature not in feats))


def _event_return(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    # one event name for both ends: the parent records the child's return, the child
    # records what it gave back
    return _return_child(s, d) if d.get("side") == "child" else _return(s, d)


def _use(s: SystemState, d: Mapping[str, Any]) -> SystemState:
    feature, count = d["feature"], d["count"]
    if type(count) is not int or count < 0:
        raise ValueError("a use record's count must be a whole number")
    required = {k: v for k, v in s.required.items() if k != feature}
    if count:
        required[feature] = count
    return replace(s, required=dict(sorted(required.items())))


_EVENT_STEPS = {
    "attach": _attach,
    "grant-install": _install,
    "grant-issue": _issue,
    "grant-recall": _recall,
    "grant-return": _event_return,
    "use": _use,
}


def after_changes(sys_: SystemState, changes: Iterable[LicenseChange], response: bytes,
                  t: int) -> tuple[SystemState, tuple[bytes, ...], tuple[dict[str, Any], ...]]:
    """What a vendor response does to the tree part: the proof of each inheritable license
    it sets kept (the response itself), and for each license that leaves (removed, or no
    longer inheritable) the children's returns and the leases still running at ``t``, both
    for the receipt; the grants of those features are forgotten (their leases end them).
    """
    proofs = dict(sys_.proofs)
    gone: set[str] = set()
    recalled = set(sys_.recalled)
    for ch in changes:
        recalled.discard(ch.feature)  # the license left or came again: the recall is over
        if ch.op is not ChangeOp.REMOVE and ch.inherit > 0:
            proofs[ch.feature] = response
        else:
            if ch.feature in proofs or any(g.feature == ch.feature for g in sys_.granted):
                gone.add(ch.feature)
            proofs.pop(ch.feature, None)
    if not gone and proofs == sys_.proofs and recalled == set(sys_.recalled):
        return sys_, (), ()
    returns = tuple(dict.fromkeys(r for f, r in sys_.returned if f in gone))
    leases = tuple({"child_id": g.child_id, "feature": g.feature, "lease_until": g.until}
                   for g in sys_.granted if g.feature in gone and g.until >= t)
    new = replace(sys_, proofs=dict(sorted(proofs.items())),
                  granted=tuple(g for g in sys_.granted if g.feature not in gone),
                  returned=tuple((f, r) for f, r in sys_.returned if f not in gone),
                  recalled=tuple(sorted(recalled)))
    return new, returns, leases

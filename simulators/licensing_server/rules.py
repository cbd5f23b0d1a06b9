"""The ledger's accounting rules, pure: plain records in, decisions out (no storage, no clock).

What an entitlement allows, what an assignment uses, what a device may hold,
what a response may grant, and how a verified receipt is reconciled
(docs/licensing-api.md). :class:`~simulators.licensing_server.ledger.Ledger`
reads the records from its storage, asks these functions, and writes back
what they decide; a refusal is an exception raised here with the message the
caller sees. Time, where a rule needs it, is passed in.

The terms. An **assignment** gives a device a *target* count of one feature
from one product of one entitlement (one assignment per device and feature).
What a device **may hold** of a feature is the larger of the ledger's view of
it and the result of every response still open on that view's state; an
assignment **uses** ``max(target, may hold)`` of its entitlement's feature. The
sum of what assignments use never exceeds what the entitlement holds.
"""

from __future__ import annotations

import enum
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from agent.cose import PublicKey
from agent.errors import (
    AlreadyAppliedError,
    MalformedError,
    RestoredError,
    SequenceError,
    StaleError,
    TrustError,
    UnknownRequestError,
    UsageError,
)
from agent.formats import iso
from agent.messages import (
    MAX_COUNT,
    Action,
    ChangeOp,
    DeviceInfo,
    License,
    LicenseChange,
    Request,
    state_digest,
    valid_count,
    valid_device_id,
    valid_feature,
)

__all__ = [
    "MAX_COUNT",
    "NAME_MAX",
    "Assignment",
    "ForbiddenError",
    "KnownDevice",
    "NotAuthenticatedError",
    "NotEntitledError",
    "OpenResponse",
    "ResponseStatus",
    "Role",
    "Stock",
    "Token",
    "add_to_stock",
    "apply_changes",
    "check_assignable",
    "check_count",
    "check_device_id",
    "check_feature",
    "check_name",
    "check_receipt",
    "check_request",
    "check_scope",
    "choose_product",
    "decide",
    "latest_infos",
    "may_hold",
    "observe",
    "plan",
    "reclaims",
    "released",
    "seen_state",
    "target",
    "used",
    "wanted_devices",
]

#: the longest entitlement or product name, in characters (free text as vendors write it)
NAME_MAX = 128
#: Unicode categories a name may not hold: control and format characters (bidi overrides),
#: surrogates, private use, unassigned code points, line and paragraph separators; a name
#: is shown on one line of a report or a log, so nothing in it may start another or reorder it
_NAME_BANNED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class NotEntitledError(SequenceError):
    """The entitlement does not hold enough of a feature for what was asked (HTTP 409)."""

    reason = "not-entitled"


class NotAuthenticatedError(TrustError):
    """No bearer token, or one the ledger does not hold or has revoked (HTTP 401, exit 4)."""

    reason = "unauthenticated"


class ForbiddenError(TrustError):
    """The token's role may not do this, or not with this entitlement or device (HTTP 403)."""

    reason = "forbidden"


class Role(enum.StrEnum):
    """What a token may do: the vendor's staff everything, a site's administrator its own."""

    VENDOR_ADMIN = "vendor-admin"  # every route, every entitlement, tokens in the report
    SITE_ADMIN = "site-admin"  # the site workflow on its entitlements and their devices


@dataclass(frozen=True)
class Token:
    """A bearer token as the ledger keeps it: never the secret, only its SHA-256.

    ``entitlements``: for a site administrator, the entitlements it may use
    (sorted); empty for a vendor administrator.
    """

    name: str
    role: Role
    entitlements: tuple[str, ...]
    digest: bytes
    created: int
    revoked: int | None = None

    @property
    def scope(self) -> frozenset[str] | None:
        """The entitlements this token may touch; None: all of them."""
        return None if self.role is Role.VENDOR_ADMIN else frozenset(self.entitlements)


def check_scope(scope: frozenset[str] | None, entitlements: Iterable[str], what: str) -> None:
    """Refuse (ForbiddenError) unless every entitlement named lies within ``scope``.

    ``what`` names the thing refused (``device 1a2b…``, ``entitlement E-1``).
    """
    if scope is None:
        return
    outside = sorted(set(entitlements) - scope)
    if outside:
        raise ForbiddenError(f"{what}: this token may not use entitlement "
                             f"{', '.join(outside)} (it is limited to "
                             f"{', '.join(sorted(scope)) or 'none'})")


class ResponseStatus(enum.StrEnum):
    """Where an issued response stands (the ``responses.status`` column)."""

    OPEN = "open"  # issued, no receipt verified, may still be applied
    CONFIRMED = "confirmed"  # its receipt was verified
    SUPERSEDED = "superseded"  # another response on the same state was applied


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Stock:
    """What one product of an entitlement holds of one feature, and until when (None: perpetual)."""

    entitlement: str
    product: str
    feature: str
    count: int
    until: int | None = None


@dataclass(frozen=True)
class Assignment:
    """A device's target count of one feature, from one product of one entitlement."""

    device_id: str
    feature: str
    entitlement: str
    product: str
    count: int


@dataclass(frozen=True)
class KnownDevice:
    """The ledger's verified view of a device: its latest state seen, and where from."""

    device_id: str
    key: PublicKey
    model: str
    serial: str | None
    sequence: int
    digest: bytes
    source: str
    updated: int


@dataclass(frozen=True)
class OpenResponse:
    """An issued response whose receipt is not verified yet.

    ``result`` is what the device holds once it applies it; ``reclaims`` what it
    takes away (feature -> count), pending until the receipt is verified.
    """

    digest: bytes
    base_sequence: int
    result: Mapping[str, int] = field(default_factory=dict)
    reclaims: Mapping[str, int] = field(default_factory=dict)


def target(feature: str, count: int, until: int | None = None) -> License:
    """An assignment as a device should hold it: the count, ending when the entitlement does.

    A device's targets are such licenses, per feature (``not_after`` is the stock's end).
    """
    return License(feature, count, None, until, 0)


# ---------------------------------------------------------------- checks of what is asked


def check_name(v: object, what: str) -> str:
    """An entitlement or product name: free text as vendors write it (spaces, parentheses,
    any script), 1 to :data:`NAME_MAX` characters, no control or format characters, no
    line breaks, no space at either end. UsageError names what is wrong in one line."""
    if not isinstance(v, str):
        raise UsageError(f"{what} name must be text, not {type(v).__name__}")
    shown = ascii(v[:40]) + ("…" if len(v) > 40 else "")
    if not v.strip():
        raise UsageError(f"{what} name is empty: give 1 to {NAME_MAX} characters")
    if len(v) > NAME_MAX:
        raise UsageError(f"{what} name {shown} is {len(v)} characters long: at most {NAME_MAX}")
    bad = next((c for c in v if unicodedata.category(c) in _NAME_BANNED), None)
    if bad is not None:
        raise UsageError(f"{what} name {shown} holds the control or format character "
                         f"U+{ord(bad):04X}: names are one line of printable text")
    if v != v.strip():
        raise UsageError(f"{what} name {shown} starts or ends with a space")
    return v


def check_feature(v: object) -> str:
    """A feature name as a license carries it (:func:`agent.messages.valid_feature`)."""
    try:
        return valid_feature(v)
    except MalformedError as exc:  # the same words, as a refusal of what was asked
        raise UsageError(str(exc)) from None


def check_count(v: object, what: str = "count") -> int:
    """A count, 0 to :data:`MAX_COUNT` (:func:`agent.messages.valid_count`)."""
    try:
        return valid_count(v, what)
    except MalformedError as exc:  # the same words, as a refusal of what was asked
        raise UsageError(str(exc)) from None


def check_device_id(v: object) -> str:
    """A device ID (:func:`agent.messages.valid_device_id`), the refusal naming the value."""
    try:
        return valid_device_id(v)
    except MalformedError:
        raise UsageError(f"device ID {v!r} must be 64 lowercase hex digits") from None


# ---------------------------------------------------------------- entitlements and assignments


def add_to_stock(current: Stock | None, entitlement: str, product: str, feature: str,
                 count: int, until: int | None) -> Stock:
    """A purchase of ``count`` more: counts add up, ``until`` replaces the end (None keeps it).

    Raises:
        UsageError: the product would hold more than :data:`MAX_COUNT`.
    """
    if current is None:
        return Stock(entitlement, product, feature, count, until)
    total = current.count + count
    if total > MAX_COUNT:
        raise UsageError(f"{entitlement}/{product} would hold {total} of {feature}; "
                         f"at most {MAX_COUNT}")
    return Stock(entitlement, product, feature, total, current.until if until is None else until)


def choose_product(entitlement: str, feature: str, holding: Sequence[str],
                   product: str | None) -> str:
    """The product an assignment draws ``feature`` from, given the products ``holding`` it.

    Raises:
        UsageError: the named product holds no such feature, none does, or several
            do and none was named.
    """
    if product is not None:
        if product not in holding:
            raise UsageError(f"product {product} of entitlement {entitlement} holds no "
                             f"{feature}")
        return product
    if not holding:
        raise UsageError(f"entitlement {entitlement} holds no {feature}")
    if len(holding) > 1:
        raise UsageError(f"entitlement {entitlement} holds {feature} in products "
                         f"{', '.join(holding)}: name the product")
    return holding[0]


def check_assignable(stock: Stock, device_id: str, count: int, current: Assignment | None,
                     others: int, held: int) -> int:
    """Whether ``device_id`` may be assigned ``count`` of ``stock``; what stays free if so.

    Args:
        current: the device's assignment of this feature today, from any entitlement.
        others: what the other devices' assignments of ``stock`` use.
        held: what the device may hold of the feature (:func:`may_hold`).

    Raises:
        UsageError: the device has the feature assigned from another entitlement or product.
        NotEntitledError: the entitlement does not hold enough.
    """
    if current is not None and (current.entitlement, current.product) != (stock.entitlement,
                                                                          stock.product):
        raise UsageError(
            f"device {device_id[:12]}… has {stock.feature} assigned from "
            f"{current.entitlement}/{current.product}; assign 0 there and reclaim it first")
    need = max(count, held)
    if others + need > stock.count:
        free = max(0, stock.count - others - held)
        raise NotEntitledError(
            f"entitlement {stock.entitlement} ({stock.product}) holds {stock.count} of "
            f"{stock.feature}; {others} are used by other devices"
            + (f" and this device may hold {held}" if held else "")
            + f": cannot assign {count} (at most {held + free} here)")
    return stock.count - others - need


def may_hold(installed: Mapping[str, int], known_sequence: int | None,
             open_responses: Iterable[OpenResponse]) -> dict[str, int]:
    """Per feature, the most a device may hold, or must be counted as holding.

    That is the largest of: its known state (``installed`` at ``known_sequence``,
    None if the device is unknown); the result of each open response on that
    state (it may have been applied); and what each open response removes,
    from the moment it is issued until its receipt is verified.
    """
    out = dict(installed)
    if known_sequence is None:
        return out

    def at_least(f: str, n: int) -> None:
        out[f] = max(out.get(f, 0), n)

    for resp in open_responses:
        if resp.base_sequence >= known_sequence:
            for f, n in resp.result.items():
                at_least(f, n)
        for f, n in resp.reclaims.items():
            at_least(f, resp.result.get(f, 0) + n)
    return out


def used(assignments: Iterable[tuple[int, int]]) -> int:
    """What assignments use of one feature: the sum of ``max(target, may hold)`` over them."""
    return sum(max(target, held) for target, held in assignments)


def released(zero_assigned: Iterable[str], hold: Mapping[str, int]) -> list[str]:
    """The features assigned 0 that the device no longer may hold anything of (to forget)."""
    return [f for f in zero_assigned if hold.get(f, 0) == 0]


# ---------------------------------------------------------------- devices


def observe(known: KnownDevice | None, seen: KnownDevice) -> tuple[str, KnownDevice | None]:
    """Adopt a verified state ``seen`` if it is at least as new as the ``known`` one.

    Returns:
        ``("older", None)`` when the ledger already knows a later state; else
        ``("new" | "updated", the view to store)``. An unknown serial keeps the
        known one; the key stays the one first seen.
    """
    if known is not None and seen.sequence < known.sequence:
        return "older", None
    if known is None:
        return "new", seen
    serial = seen.serial if seen.serial is not None else known.serial
    return "updated", KnownDevice(known.device_id, known.key, seen.model, serial, seen.sequence,
                                  seen.digest, seen.source, seen.updated)


def seen_state(source: str, device_id: str, key: PublicKey, model: str, serial: str | None,
               sequence: int, licenses: Iterable[License], now: int) -> KnownDevice:
    """A verified state of a device as seen at ``now`` through ``source``."""
    return KnownDevice(device_id, key, model, serial, sequence, state_digest(licenses), source,
                       now)


def latest_infos(infos: Iterable[DeviceInfo]) -> dict[str, DeviceInfo]:
    """Per device (in the order first seen), its device information with the highest sequence.

    Of two with the same sequence, the later one counts.
    """
    out: dict[str, DeviceInfo] = {}
    for info in infos:
        prev = out.get(info.device_id)
        if prev is None or info.sequence >= prev.sequence:
            out[info.device_id] = info
    return out


def wanted_devices(infos: Mapping[str, DeviceInfo], files: int,
                   devices: Sequence[str] | None) -> list[str]:
    """The devices license information is asked for (all in the bundle, sorted, if none named).

    Raises:
        MalformedError: no device-information file of the ``files`` verified.
        UsageError: a named device is not in the bundle.
    """
    if not infos:
        raise MalformedError(f"none of the {files} device-information file(s) in "
                             "the site information verifies")
    wanted = list(dict.fromkeys(devices or ()))
    unknown = [d for d in wanted if d not in infos]
    if unknown:
        raise UsageError(f"device {', '.join(d[:12] + '…' for d in unknown)} is not in "
                         f"the site information")
    return wanted or sorted(infos)


# ---------------------------------------------------------------- what a response may grant


def plan(installed: Mapping[str, License], targets: Mapping[str, License]
         ) -> tuple[list[License], list[License]]:
    """(installed licenses to reclaim, licenses to install) for one device's license information.

    reclaim: installed beyond what is assigned (lowered, released, or never
    assigned); install: assigned and not installed, or installed with a smaller count.
    """
    reclaim = [lic for f, lic in sorted(installed.items())
               if lic.count > (targets[f].count if f in targets else 0)]
    install = [t for f, t in sorted(targets.items())
               if t.count > 0 and (f not in installed or installed[f].count < t.count)]
    return reclaim, install


def check_request(req: Request, request_digest: bytes, answered_digest: bytes | None,
                  known_sequence: int | None) -> bool:
    """Whether a verified request is answered again (True), or anew (False).

    Args:
        answered_digest: the digest of the request with the same nonce answered
            before, None if none was.
        known_sequence: the latest sequence of the device the ledger knows.

    Raises:
        SequenceError: another request with the same nonce was answered.
        StaleError: the device has left the state the request was made on.
    """
    if answered_digest is not None:
        if answered_digest != request_digest:
            raise SequenceError("a different request with the same nonce was answered "
                                "before; create a new request")
        return True
    if known_sequence is not None and req.sequence < known_sequence:
        raise StaleError(f"the request was made on sequence {req.sequence}, but the "
                         f"device has reached sequence {known_sequence}; create a new request")
    return False


def check_restore(req: Request, head_sequence: int | None, head_applied_at: int | None
                  ) -> None:
    """Issue 16: a request made on an older state than the latest one a verified receipt
    proves, and made after that state was reached (both by the device's own clock): the
    device went back, its store restored from a backup. (A request made before and
    uploaded late is only stale: :func:`check_request`.)

    Raises:
        RestoredError: with what happened and what to do.
    """
    if head_sequence is None or head_applied_at is None or req.sequence >= head_sequence:
        return
    if req.created <= head_applied_at:  # made before (or in the same second): only late
        return
    raise RestoredError(
        f"device {req.device_id[:12]}… made this request on sequence {req.sequence} at "
        f"{iso(req.created)}, after it had reached sequence {head_sequence} at "
        f"{iso(head_applied_at)} (its receipt was verified here): its license store was "
        "restored from an older backup; restore the newest backup, or make a reclaim request "
        "(licadmin reclaim, or licagent request reclaim): it is answered with what brings "
        "the server back to the state its receipt proved, then activate it again; this is "
        "flagged in the report")


def decide_restored(req: Request, head: Mapping[str, License]) -> tuple[LicenseChange, ...]:
    """Issue 16: the answer to a reclaim from a restored store: back to at most what its
    latest verified receipt proves (``head``): what it holds beyond is removed or lowered;
    nothing is added (an activation afterwards installs what is assigned)."""
    out = []
    for lic in req.licenses:
        h = head.get(lic.feature)
        if h is None or h.count == 0:
            out.append(LicenseChange(ChangeOp.REMOVE, lic.feature))
        elif lic != h and lic.count >= h.count:
            out.append(LicenseChange(ChangeOp.UPDATE, h.feature, h.count, h.not_before,
                                     h.not_after, h.grace, transferable=h.transferable))
    return tuple(out)


def decide(req: Request, targets: Mapping[str, License]) -> tuple[LicenseChange, ...]:
    """The changes a response to ``req`` makes, given the device's assignments.

    activate: install what is assigned and not installed (or installed with a
    smaller count), limited to the features the request names if it names any.
    renew: move installed, assigned licenses to their entitlement's current end.
    reclaim: remove the named features (or, naming none, those beyond their
    assignment; a license still partly assigned shrinks to its assignment), and
    install what waits for the device in the same response.

    Raises:
        UsageError: nothing to do for this request.
    """
    dev = req.device_id
    installed = {x.feature: x for x in req.licenses}
    named = set(req.features)
    changes: list[LicenseChange] = []

    def target(f: str) -> int:
        return targets[f].count if f in targets else 0

    def grow(features: Iterable[str]) -> None:
        for f in sorted(features):
            t = targets[f]
            have = installed.get(f)
            if t.count == 0 or (have is not None and have.count >= t.count):
                continue
            op = ChangeOp.ADD if have is None else ChangeOp.UPDATE
            changes.append(LicenseChange(op, f, t.count, t.not_before, t.not_after, 0,
                                         transferable=t.transferable))

    if req.action is Action.CLOCK:  # issue 16: a certified time, no license changes
        return ()
    if req.action is Action.ACTIVATE:
        grow([f for f in targets if not named or f in named])
        if not changes:
            what = ", ".join(sorted(named)) or "anything"
            raise UsageError(f"nothing to activate: {what} is not assigned to device "
                             f"{dev[:12]}… beyond what it holds (licadmin assign first)")
    elif req.action is Action.RENEW:
        for f in sorted(named or installed):
            have = installed.get(f)
            if have is None or target(f) == 0:
                continue
            until = targets[f].not_after
            tr = targets[f].transferable  # issue 16
            if (have.not_after != until or have.not_before is not None or have.grace
                    or have.transferable != tr):
                changes.append(LicenseChange(ChangeOp.UPDATE, f, have.count, None, until, 0,
                                             transferable=tr))
        if not changes:
            raise UsageError(f"nothing to renew on device {dev[:12]}…: its assigned licenses "
                             "already end when their entitlements do")
    else:
        gone = named or {f for f, lic in installed.items() if lic.count > target(f)}
        if not gone:
            raise UsageError(f"nothing to reclaim on device {dev[:12]}…: name the features "
                             "or lower their assignment first")
        for f in sorted(gone):
            have = installed.get(f)
            if have is None:
                raise UsageError(f"cannot reclaim {f}: device {dev[:12]}… does not hold it")
            n = target(f)
            if 0 < n < have.count:  # still partly assigned: shrink to the assignment
                changes.append(LicenseChange(ChangeOp.UPDATE, f, n, None, targets[f].not_after,
                                             0))
            else:
                changes.append(LicenseChange(ChangeOp.REMOVE, f))
        grow([f for f in targets if f not in gone])
    return tuple(changes)


def decide_rehost(req: Request, old: Mapping[str, Assignment | None],
                  new: Mapping[str, Assignment | None]) -> tuple[LicenseChange, ...]:
    """Issue 16: the changes of a rehost's transfer-out (a reclaim naming ``transfer_to``).

    Every named feature (naming none: every installed one) is removed from the old
    device; its count goes to the new device once the old device's receipt proves the
    removal. ``old``/``new``: each feature's assignment to the old and the new device.

    Raises:
        UsageError: a feature not installed, not assigned to the old device, or held by
            the new device from another entitlement or product.
    """
    dev, to = req.device_id, req.transfer_to
    assert to is not None
    installed = {x.feature: x for x in req.licenses}
    moving = sorted(req.features or installed)
    if not moving:
        raise UsageError(f"nothing to move: device {dev[:12]}… holds no licenses")
    for f in moving:
        if f not in installed:
            raise UsageError(f"cannot move {f}: device {dev[:12]}… does not hold it")
        a = old.get(f)
        if a is None or a.count == 0:
            raise UsageError(f"cannot move {f}: it is not assigned to device {dev[:12]}… in "
                             "this ledger, so there is no entitlement to move")
        b = new.get(f)
        if b is not None and (b.entitlement, b.product) != (a.entitlement, a.product):
            raise UsageError(f"cannot move {f} to device {to[:12]}…: it holds {f} from "
                             f"{b.entitlement}/{b.product}, the licenses to move are from "
                             f"{a.entitlement}/{a.product}")
    return tuple(LicenseChange(ChangeOp.REMOVE, f) for f in moving)


def apply_changes(base: Iterable[License], changes: Iterable[LicenseChange]
                  ) -> dict[str, License]:
    """What a device holds (feature -> license) once it applies ``changes`` to ``base``."""
    out = {x.feature: x for x in base}
    for ch in changes:
        if ch.op is ChangeOp.REMOVE:
            out.pop(ch.feature, None)
        else:
            out[ch.feature] = ch.license()
    return out


def reclaims(base: Mapping[str, License], result: Mapping[str, License]
             ) -> list[tuple[str, int]]:
    """What a response takes away, per feature (sorted): counted until its receipt is verified."""
    out = []
    for f, lic in sorted(base.items()):
        after = result[f].count if f in result else 0
        if after < lic.count:
            out.append((f, lic.count - after))
    return out


# ---------------------------------------------------------------- receipts


def check_receipt(seen_before: bool, status: ResponseStatus | None) -> None:
    """Whether a verified receipt may be accepted, given the response it answers.

    Args:
        seen_before: this very receipt was accepted.
        status: the response's status, None if this ledger did not issue it (to
            that device).

    Raises:
        AlreadyAppliedError: this receipt, or one for the same response, was accepted.
        UnknownRequestError: the ledger did not issue the response.
        StaleError: another response on the same state was applied.
    """
    if seen_before:
        raise AlreadyAppliedError("this receipt was accepted before")
    if status is None:
        raise UnknownRequestError("the receipt answers a response this licensing server "
                                  "did not issue")
    if status is ResponseStatus.CONFIRMED:
        raise AlreadyAppliedError("a receipt for this response was accepted before")
    if status is ResponseStatus.SUPERSEDED:
        raise StaleError("the device applied another response on the same state; this "
                         "receipt contradicts the one accepted")

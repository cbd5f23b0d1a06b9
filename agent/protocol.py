"""The device side of the license protocol, with no I/O: bytes, state and ``now`` in; new state out.

Everything that decides whether a file is accepted lives here, so that it can
be tested exhaustively without disks, clocks or links. The store
(:mod:`agent.store`) persists the :class:`AgentState` values this module
returns; the CLI and daemon only move bytes.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from functools import cached_property
from typing import Any, TypeVar

from agent import seats
from agent.cose import (
    Encoded,
    PublicKey,
    Sign1,
    SigningKey,
    canonical,
    decode_sign1,
    encoded_array,
    sign1,
    strict_loads,
)
from agent.digest import sha256
from agent.errors import (
    AlreadyAppliedError,
    ClockSetBackError,
    ExpiredError,
    MalformedError,
    NotYetValidError,
    RevokedError,
    StaleError,
    TooNewError,
    TrustError,
    UnknownRequestError,
    UsageError,
    WrongDeviceError,
)
from agent.messages import (
    MAX_LIST,
    NONCE_LEN,
    Action,
    ChangeOp,
    DeviceInfo,
    Kind,
    License,
    LicenseChange,
    LicenseInfo,
    Payload,
    Receipt,
    Request,
    Response,
    Revocation,
    Transfer,
    TransferReceipt,
    TrustKey,
    TrustUpdate,
    decode_payload,
    encoded_licenses,
    licenses_from,
    sort_licenses,
    sorted_state_digest,
    state_digest,
)
from agent.record import field, record, replace
from agent.seats import Seat
from agent.tree import EMPTY as EMPTY_SYSTEM
from agent.tree import EVENTS as SYSTEM_EVENTS
from agent.tree import SystemState, after_changes, apply_event

__all__ = [
    "AgentState",
    "ApplyResult",
    "CheckResult",
    "Limits",
    "Outstanding",
    "Applied",
    "Dropped",
    "apply_response",
    "apply_trust_update",
    "check_feature",
    "licensed_at",
    "clock_edge",
    "create_request",
    "make_device_info",
    "new_state",
    "observe_clock",
    "read_signed",
    "replay_event",
    "roll_forward",
    "self_signed_payload",
    "verify_self_signed",
    "verify_vendor_file",
]

AGENT_VERSION = "0.1.0"

_P = TypeVar("_P", bound=Payload)
#: the payloads signed by the device key they carry
_S = TypeVar("_S", Request, Receipt, DeviceInfo, Transfer, TransferReceipt)


@record(frozen=True)
class Limits:
    """Every bound the protocol enforces, in one place."""

    max_file: int = 64 * 1024
    #: outstanding requests kept per origin (a newer one drops the oldest of its own origin)
    max_outstanding: int = 8
    #: outstanding requests kept over all origins
    max_outstanding_total: int = 32
    #: requests dropped unanswered that are remembered, to say so on apply
    max_dropped_history: int = 32
    max_applied_history: int = 32
    #: the clock may step back this much (NTP slew, RTC drift) before it counts as set back
    clock_tolerance: int = 300
    #: without an apply, the clock high-water mark is persisted at most this often
    hwm_persist_interval: int = 3600
    #: issue 14: how long a grant to a child server lasts (renewed by the live relation)
    grant_lease: int = 7 * 86400


DEFAULT_LIMITS = Limits()


#: longest origin kept with an outstanding request (a longer one is cut)
MAX_ORIGIN = 200


@record(frozen=True)
class Outstanding:
    """A request this device signed and is waiting for an answer to.

    ``origin`` says who asked for it (the link kind and the peer's address or client
    certificate, e.g. ``tcp 192.0.2.7``); None for the local command line and for
    requests recorded before origins were kept. A newer request drops only an older
    one of its own origin, so an anonymous peer cannot push an operator's request out.
    """

    nonce: bytes
    sequence: int
    state_digest: bytes
    action: Action
    features: tuple[str, ...]
    created: int
    origin: str | None = None

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "nonce": self.nonce, "sequence": self.sequence, "state_digest": self.state_digest,
            "action": self.action.value, "features": list(self.features),
            "created": self.created,
        }
        if self.origin is not None:  # absent, the entry is byte for byte the older format
            out["origin"] = self.origin
        return out

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> Outstanding:
        origin = m.get("origin")
        if origin is not None and not isinstance(origin, str):
            raise TypeError("an outstanding request's origin must be text")
        return cls(m["nonce"], m["sequence"], m["state_digest"], Action(m["action"]),
                   tuple(m["features"]), m["created"], origin)


@record(frozen=True)
class Dropped:
    """A request dropped unanswered to make room for a newer one (kept, bounded, to say so
    when its response arrives)."""

    nonce: bytes
    at: int

    def to_cbor(self) -> list[Any]:
        return [self.nonce, self.at]

    @classmethod
    def from_cbor(cls, v: list[Any]) -> Dropped:
        if not isinstance(v[0], bytes) or type(v[1]) is not int:
            raise TypeError("a dropped request is [nonce, time]")
        return cls(v[0], v[1])


@record(frozen=True)
class Applied:
    """A response that was applied: kept (bounded) to name replays precisely."""

    nonce: bytes
    sequence: int
    response_digest: bytes

    def to_cbor(self) -> list[Any]:
        return [self.nonce, self.sequence, self.response_digest]

    @cached_property
    def encoded(self) -> Encoded:
        """``to_cbor()`` in canonical CBOR, encoded once: a state carries the same entries
        from apply to apply."""
        return Encoded(canonical(self.to_cbor()))

    @classmethod
    def from_cbor(cls, v: list[Any]) -> Applied:
        return cls(v[0], v[1], v[2])


@record(frozen=True)
class AgentState:
    """Everything the trusted store holds besides the private key."""

    device_id: str
    device_key: PublicKey
    model: str
    serial: str | None
    binding: tuple[str, ...]
    trust: tuple[TrustKey, ...]
    trust_version: int = 0
    sequence: int = 0
    licenses: tuple[License, ...] = ()
    outstanding: tuple[Outstanding, ...] = ()
    applied: tuple[Applied, ...] = ()
    last_receipt: bytes | None = None
    clock_hwm: int = 0
    created: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: bound to hardware facts given as data (--facts), not read from this machine;
    #: only such a store accepts facts given that way later (identity.check_facts_source)
    simulated: bool = False
    #: requests dropped unanswered since the last apply, oldest first
    dropped: tuple[Dropped, ...] = ()
    #: issue 15: the seats of floating licenses out to clients (agent.seats), sorted
    seats: tuple[Seat, ...] = ()
    #: issue 14: the system tree (parent, grants held and handed out); absent when empty
    system: SystemState = EMPTY_SYSTEM
    # issue 16 (direct transfer): per transferable license, the vendor response that
    # installed it (the evidence a transfer file carries); the IDs of transfers applied here
    evidence: tuple[tuple[str, bytes], ...] = ()
    transfers_in: tuple[bytes, ...] = ()

    @cached_property
    def digest(self) -> bytes:
        """The state digest of the licenses, computed once per state (it is immutable)."""
        return state_digest(self.licenses)

    @property
    def last_applied(self) -> Applied | None:
        return self.applied[-1] if self.applied else None

    def to_cbor(self) -> dict[str, Any]:
        return self._map([k.to_cbor() for k in self.trust],
                         [lic.to_cbor() for lic in self.licenses],
                         [a.to_cbor() for a in self.applied])

    def _map(self, trust: Any, licenses: Any, applied: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device_id": self.device_id,
            "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw,
            "model": self.model,
            "serial": self.serial,
            "binding": list(self.binding),
            "trust": trust,
            "trust_version": self.trust_version,
            "sequence": self.sequence,
            "licenses": licenses,
            "outstanding": [o.to_cbor() for o in self.outstanding],
            "applied": applied,
            "last_receipt": self.last_receipt,
            "clock_hwm": self.clock_hwm,
            "created": self.created,
            "extra": dict(self.extra),
            "simulated": self.simulated,
        }
        if self.dropped:  # absent when empty: such a state is byte for byte the older format
            out["dropped"] = [d.to_cbor() for d in self.dropped]
        if self.seats:  # issue 15: absent when none is out
            out["seats"] = [x.to_cbor() for x in self.seats]
        if not self.system.empty():  # issue 14, likewise
            out["system"] = self.system.to_cbor()
        if self.evidence:  # issue 16: likewise
            out["evidence"] = [[f, data] for f, data in self.evidence]
        if self.transfers_in:
            out["transfers_in"] = list(self.transfers_in)
        return out

    def encode(self) -> bytes:
        """``to_cbor()`` in canonical CBOR; each license as encoded once (the same bytes)."""
        return canonical(self._map(encoded_array(k.encoded for k in self.trust),
                                   encoded_licenses(self.licenses),
                                   encoded_array(a.encoded for a in self.applied)))

    @classmethod
    def from_cbor(cls, m: Mapping[str, Any]) -> AgentState:
        """Rebuild from the store's CBOR (already MAC-checked, so trusted in shape)."""
        try:
            return cls(
                device_id=m["device_id"],
                device_key=PublicKey(m["device_alg"], m["device_key"]),
                model=m["model"],
                serial=m["serial"],
                binding=tuple(m["binding"]),
                trust=tuple(TrustKey.from_cbor(k) for k in m["trust"]),
                trust_version=m["trust_version"],
                sequence=m["sequence"],
                licenses=licenses_from(m["licenses"]),
                outstanding=tuple(Outstanding.from_cbor(o) for o in m["outstanding"]),
                applied=tuple(Applied.from_cbor(a) for a in m["applied"]),
                last_receipt=m["last_receipt"],
                clock_hwm=m["clock_hwm"],
                created=m["created"],
                extra=m.get("extra", {}),
                # a store written before the mark was bound to whatever it was given: treat
                # it as real hardware, so that a facts override can never unlock it
                simulated=m.get("simulated", False) is True,
                dropped=tuple(Dropped.from_cbor(d) for d in m.get("dropped", ())),
                seats=tuple(Seat.from_cbor(x) for x in m.get("seats", ())),  # issue 15
                system=SystemState.from_cbor(m.get("system")),  # issue 14
                evidence=tuple((str(f), bytes(d)) for f, d in m.get("evidence", ())),
                transfers_in=tuple(bytes(t) for t in m.get("transfers_in", ())),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise MalformedError(f"stored state has the wrong shape: {exc}") from exc


def evolve(state: AgentState, **changes: Any) -> AgentState:
    """``replace(state, **changes)`` keeping the state digest already computed when the
    licenses are not among the changes (the digest is of the licenses alone)."""
    new = replace(state, **changes)
    digest = state.__dict__.get("digest")
    if digest is not None and "licenses" not in changes:
        new.__dict__["digest"] = digest
    return new


def new_state(
    key: PublicKey,
    model: str,
    serial: str | None,
    binding: Iterable[str],
    trust: Iterable[TrustKey],
    now: int,
    simulated: bool = False,
) -> AgentState:
    """The state of a freshly provisioned device: no licenses, sequence 0.

    ``simulated``: the binding comes from facts given as data, not from this machine.
    """
    trust_t = tuple(trust)
    if not trust_t:
        raise UsageError("at least one trusted vendor key is needed")
    return AgentState(
        device_id=key.kid.hex(),
        device_key=key,
        model=model,
        serial=serial,
        binding=tuple(sorted(set(binding))),
        trust=trust_t,
        clock_hwm=now,
        created=now,
        simulated=simulated,
    )


# ---------------------------------------------------------------- clock


def observe_clock(state: AgentState, now: int, limits: Limits = DEFAULT_LIMITS) -> tuple[AgentState, bool]:
    """Advance the clock high-water mark; say whether it is worth persisting now.

    Only forward movement of more than ``hwm_persist_interval`` is worth a
    write, so that frequent ``check`` calls do not wear out flash storage.
    """
    if now > state.clock_hwm + limits.hwm_persist_interval:
        return evolve(state, clock_hwm=now), True
    return state, False


def clock_set_back(state: AgentState, now: int, limits: Limits = DEFAULT_LIMITS) -> bool:
    return now + limits.clock_tolerance < state.clock_hwm


def clock_edge(state: AgentState, feature: str, now: int,
               limits: Limits = DEFAULT_LIMITS) -> str | None:
    """What a check of ``feature`` at ``now`` decided that the high-water mark does not yet
    prove, or None.

    When the license's phase at ``now`` (not yet valid, licensed, in grace, expired)
    differs from its phase at ``clock_hwm``, the mark must move to ``now`` and be persisted
    at once: a clock set earlier afterwards then still sees the same answer (every check
    uses ``max(now, clock_hwm)``). Phases, not just licensed or not, so that a license
    whose whole window lies between the mark and ``now`` is not revived either. One
    write per edge: once the mark is past it, later checks agree with it.
    """
    if now <= state.clock_hwm:
        return None
    lic = next((x for x in state.licenses if x.feature == feature), None)
    if lic is None or lic.count <= 0:
        return None
    at_now = _phase(lic, now)
    return None if _phase(lic, state.clock_hwm) == at_now else at_now


def _phase(lic: License, t: int) -> str:
    if lic.not_before is not None and t < lic.not_before:
        return "not-yet-valid"
    if lic.not_after is not None and t > lic.not_after:
        return "in-grace" if t <= lic.not_after + lic.grace else "expired"
    return "licensed"


def clock_set_back_message(state: AgentState, now: int) -> str:
    """One line: what the clock reads, the latest time seen (ISO 8601), and how to recover."""
    return (f"the clock reads {_iso(now)}, earlier than {_iso(state.clock_hwm)} already "
            f"seen: clock set back; {CLOCK_RECOVERY}; if {_iso(state.clock_hwm)} itself was "
            f"wrong (a clock that ran ahead) and the clock is right now, recover with a "
            f"vendor-certified time: `licagent request clock --out FILE` (or `licadmin "
            f"request --server URL clock`), have it answered by the licensing server "
            f"(licadmin upload), and apply the answer")


# ---------------------------------------------------------------- verification


def read_signed(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Sign1:
    """Size-cap and parse the COSE envelope of a file (no verification yet)."""
    return decode_sign1(data, max_size=limits.max_file)


def _trusted_key(state: AgentState, kid: bytes, now: int) -> PublicKey:
    for tk in state.trust:
        if tk.kid == kid:
            if tk.not_before is not None and now < tk.not_before:
                raise TrustError(f"vendor key {kid.hex()[:16]} is not valid before "
                                 f"{_iso(tk.not_before)}")
            if tk.not_after is not None and now > tk.not_after:
                raise TrustError(f"vendor key {kid.hex()[:16]} expired at {_iso(tk.not_after)}")
            return tk.key
    raise TrustError(f"file is signed by key {kid.hex()[:16]}…, which this device does not trust")


def verify_vendor_file(
    state: AgentState, data: bytes, now: int, expect: type[_P],
    limits: Limits = DEFAULT_LIMITS,
) -> tuple[_P, Sign1]:
    """Size cap, signature with a trusted vendor key over the exact bytes, then decode.

    Raises:
        MalformedError, TrustError: the file is not acceptable at all.
    """
    env = read_signed(data, limits)
    # the kind first: a request given where a response belongs is named as such, not as a
    # file signed by an untrusted key (the header is not trusted for anything else)
    if env.content_type is not None and env.content_type != expect.KIND.content_type:
        got = env.content_type.removeprefix("application/vnd.bms-license.").removesuffix("+cbor")
        raise MalformedError(f"this is a {got} file, expected a {expect.KIND.value} file"
                             if got in {k.value for k in Kind} else
                             f"expected a {expect.KIND.value} file, the header says "
                             f"{env.content_type!r}")
    key = _trusted_key(state, env.kid, max(now, state.clock_hwm))
    payload_bytes = env.verify_with(key)
    payload = decode_payload(strict_loads(payload_bytes, max_size=limits.max_file), expect)
    return payload, env


# ---------------------------------------------------------------- requests


def create_request(
    state: AgentState,
    action: Action,
    features: Iterable[str],
    nonce: bytes,
    now: int,
    key: SigningKey,
    limits: Limits = DEFAULT_LIMITS,
    origin: str | None = None,
    transfer_to: str | None = None,
) -> tuple[AgentState, bytes, Request]:
    """Sign a request on top of the current state and remember it as outstanding.

    ``nonce`` must be fresh randomness from the caller (16 bytes). ``origin`` names
    who asked (see :class:`Outstanding`); when more than ``max_outstanding`` requests
    of that origin are outstanding, its oldest is dropped, and when more than
    ``max_outstanding_total`` are, the oldest of the origin holding the most. A dropped
    request is remembered, so that applying its response says it was replaced.
    ``transfer_to`` (issue 16, rehost): a reclaim whose licenses are to move to that device.

    Raises:
        UsageError: reclaim or renew of a feature that is not installed.
    """
    if len(nonce) != NONCE_LEN:
        raise UsageError(f"nonce must be {NONCE_LEN} bytes")
    if key.public != state.device_key:
        raise UsageError("signing key does not belong to this device")
    feats = tuple(dict.fromkeys(features))
    installed = {lic.feature for lic in state.licenses}
    if action in (Action.RECLAIM, Action.RENEW):
        unknown = [f for f in feats if f not in installed]
        if unknown:
            raise UsageError(
                f"cannot {action.value} {', '.join(unknown)}: not installed on this device "
                f"(installed: {', '.join(sorted(installed)) or 'nothing'})"
            )
        if action is Action.RECLAIM and not installed:
            raise UsageError("nothing to reclaim: no licenses are installed")
    if transfer_to is not None:  # issue 16
        _check_transfer_to(state, action, transfer_to)
    if state.extra.get("revoked"):  # issue 16
        raise RevokedError(revoked_message(state))
    if action is Action.CLOCK:  # issue 16: the way back from a clock that ran ahead
        if feats:
            raise UsageError("a clock request names no feature: it asks only for the time")
    elif clock_set_back(state, now, limits):  # a request now would be refused when answered
        raise ClockSetBackError(clock_set_back_message(state, now))
    req = Request(
        device_id=state.device_id,
        device_key=state.device_key,
        model=state.model,
        nonce=nonce,
        sequence=state.sequence,
        state_digest=state.digest,
        action=action,
        features=feats,
        licenses=state.licenses,
        created=now,
        transfer_to=transfer_to,
        parent=state.system.parent.device_id if state.system.parent is not None else None,
    )
    data = sign1(req.encode(), key, Kind.REQUEST.content_type)
    if origin is not None and len(origin) > MAX_ORIGIN:
        origin = origin[:MAX_ORIGIN - 1] + "…"
    kept, dropped = _make_room(
        [*state.outstanding,
         Outstanding(nonce, state.sequence, state.digest, action, feats, now, origin)],
        limits)
    new = evolve(
        state,
        outstanding=tuple(kept),
        dropped=(*state.dropped, *(Dropped(o.nonce, now) for o in dropped)
                 )[-limits.max_dropped_history:] if dropped else state.dropped,
        clock_hwm=max(state.clock_hwm, now),
    )
    return new, data, req


def revoke(state: AgentState, rev: Revocation) -> AgentState:
    """Issue 16: the state of a device the vendor declared dead: no licenses, no outstanding
    request, and the revocation kept (``extra["revoked"]``) to say why from now on."""
    return replace(state, licenses=(), outstanding=(), dropped=(),
                   extra={**state.extra, "revoked": {"at": rev.revoked_at,
                                                     "reason": rev.reason}})


def revoked_message(state: AgentState) -> str:
    """Issue 16: why a revoked device holds nothing and asks for nothing."""
    r = state.extra.get("revoked") or {}
    return (f"device {state.device_id[:12]}… was declared dead by the vendor at "
            f"{_iso(int(r.get('at', 0)))} ({r.get('reason', '')}): its licenses went back to "
            f"the entitlement and were removed here; give the new server its licenses "
            f"(licadmin activate), this one gets none")


def _check_transfer_to(state: AgentState, action: Action, transfer_to: str) -> None:
    """Issue 16: a rehost is a reclaim naming another device."""
    if action is not Action.RECLAIM:
        raise UsageError(f"--transfer-to is for a reclaim, not {action.value}")
    if not re.fullmatch(r"[0-9a-f]{64}", transfer_to):
        raise UsageError(f"--transfer-to {transfer_to[:80]!r}: expected a device ID "
                         "(64 lowercase hex digits, licadmin info shows it)")
    if transfer_to == state.device_id:
        raise UsageError("--transfer-to names this device itself: give the new server's "
                         "device ID")


def _make_room(out: list[Outstanding], limits: Limits
               ) -> tuple[list[Outstanding], list[Outstanding]]:
    """``out`` (oldest first, the newest last) within the limits, and what had to go."""
    newest = out[-1]
    dropped: list[Outstanding] = []
    mine = [o for o in out if o.origin == newest.origin]
    for victim in mine[:max(0, len(mine) - limits.max_outstanding)]:
        out.remove(victim)
        dropped.append(victim)
    while len(out) > limits.max_outstanding_total:
        # peers known only by their address go first, then the origin holding the most
        pool = [o for o in out if _anonymous(o.origin)] or out
        counts: dict[str | None, int] = {}
        for o in pool:
            counts[o.origin] = counts.get(o.origin, 0) + 1
        most = max(counts.values())
        victim = next(o for o in pool if counts[o.origin] == most)
        out.remove(victim)
        dropped.append(victim)
    return out, dropped


def _anonymous(origin: str | None) -> bool:
    """A network peer known only by its address (``tcp HOST``, ``tls HOST``, ``https HOST``):
    not the command line, not a client certificate, not a serial line, stick or broker."""
    if origin is None:
        return False
    kind, _, rest = origin.partition(" ")
    return kind in ("tcp", "tls", "https") and not rest.startswith("cert ")


#: how to recover from a clock set back, in every message that reports one
CLOCK_RECOVERY = ("set the system clock to the right time (NTP, or date -s) and run the "
                  "command again; nothing was changed")


def _iso(t: int) -> str:
    """POSIX seconds as ISO 8601 UTC (a formatting function: no clock is read)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# ---------------------------------------------------------------- responses


@record(frozen=True)
class ApplyResult:
    """What applying a response did."""

    state: AgentState
    receipt: bytes
    response: Response
    already_applied: bool
    removed: tuple[License, ...] = ()


def _apply_changes(
    licenses: tuple[License, ...], changes: Iterable[LicenseChange]
) -> tuple[tuple[License, ...], tuple[License, ...]]:
    by_name = {lic.feature: lic for lic in licenses}
    removed: list[License] = []
    for ch in changes:
        have = by_name.get(ch.feature)
        if ch.op is ChangeOp.ADD:
            if have is not None:
                raise MalformedError(f"response adds {ch.feature}, which is already installed")
            by_name[ch.feature] = ch.license()
        elif ch.op is ChangeOp.UPDATE:
            if have is None:
                raise MalformedError(f"response updates {ch.feature}, which is not installed")
            by_name[ch.feature] = ch.license()
        else:
            if have is None:
                raise MalformedError(f"response removes {ch.feature}, which is not installed")
            removed.append(by_name.pop(ch.feature))
    return sort_licenses(by_name.values()), tuple(removed)


def apply_response(
    state: AgentState,
    data: bytes,
    now: int,
    key: SigningKey,
    limits: Limits = DEFAULT_LIMITS,
) -> ApplyResult:
    """Verify a response file and compute the state after applying it, plus a signed receipt.

    The order is the one the update-security frameworks use: cap the size,
    verify the signature over the exact bytes with a trusted key, decode,
    then check binding, chain position and time. Nothing is persisted here.

    Raises:
        MalformedError, TrustError, WrongDeviceError, SequenceError subclasses,
        ValidityError subclasses: the refusal classes of docs/protocol.md.
    """
    resp, _env = verify_vendor_file(state, data, now, Response, limits)
    if resp.device_id != state.device_id:
        raise WrongDeviceError(
            f"response is for device {resp.device_id[:12]}…, this device is "
            f"{state.device_id[:12]}…"
        )
    digest = sha256(data)
    last = state.last_applied
    if last is not None and last.response_digest == digest and state.last_receipt is not None:
        return ApplyResult(state, state.last_receipt, resp, already_applied=True)
    for a in state.applied:
        if a.nonce == resp.nonce or a.response_digest == digest:
            raise AlreadyAppliedError(
                f"response was already applied (it made sequence {a.sequence}; the device is "
                f"now at {state.sequence})"
            )
    if resp.base_sequence < state.sequence:
        raise StaleError(
            f"response builds on sequence {resp.base_sequence}, but the device is already at "
            f"{state.sequence}: it is older than the installed state"
        )
    if resp.base_sequence > state.sequence:
        raise TooNewError(
            f"response builds on sequence {resp.base_sequence}, but the device is at "
            f"{state.sequence}: an earlier response is missing"
        )
    pending = next((o for o in state.outstanding if o.nonce == resp.nonce), None)
    if pending is None:
        gone = next((d for d in reversed(state.dropped) if d.nonce == resp.nonce), None)
        if gone is not None:
            raise UnknownRequestError(
                f"request {resp.nonce.hex()[:12]}… was replaced by a newer one at "
                f"{_iso(gone.at)}: more than {limits.max_outstanding} requests from one origin "
                f"(or {limits.max_outstanding_total} in all) were waiting; create a new request "
                f"and have it answered"
            )
        raise UnknownRequestError(
            f"response answers request nonce {resp.nonce.hex()[:12]}…, which is not an "
            f"outstanding request of this device"
        )
    if resp.base_digest != state.digest or pending.state_digest != resp.base_digest:
        raise StaleError(
            "response was issued against a different installed state (state digest differs)"
        )
    if (resp.time is not None) != (pending.action is Action.CLOCK):  # issue 16
        raise MalformedError("a certified time answers a clock request, and only it does")
    if resp.time is not None:
        return _apply_certified_time(state, data, resp, now, key, limits)
    if clock_set_back(state, now, limits):
        raise ClockSetBackError(clock_set_back_message(state, now))
    if now < resp.not_before:
        raise NotYetValidError(f"response is not valid before {_iso(resp.not_before)} "
                               f"(the clock reads {_iso(now)})")
    latest = max(now, state.clock_hwm)  # a clock stepped back within tolerance gains nothing
    if latest > resp.expires:
        raise ExpiredError(f"response expired at {_iso(resp.expires)} (now {_iso(latest)})")
    if state.system.parent is not None and any(c.demo for c in resp.changes):  # issue 14
        from agent.errors import NotTopServerError

        raise NotTopServerError(
            f"response installs a demo license ({', '.join(c.feature for c in resp.changes if c.demo)}), "
            f"but this server is attached to parent {state.system.parent.device_id[:12]}…: demo "
            f"licenses live on the top server only")
    licenses, removed = _apply_changes(state.licenses, resp.changes)
    system, returns, leases = after_changes(state.system, resp.changes, data, latest)
    if len(licenses) > MAX_LIST:
        raise MalformedError(
            f"response would leave {len(licenses)} licenses installed; at most {MAX_LIST}"
        )
    new_digest = sorted_state_digest(licenses)  # _apply_changes sorted them, one per feature
    receipt = Receipt(
        device_id=state.device_id,
        device_key=state.device_key,
        response=data,
        response_digest=digest,
        sequence=resp.sequence,
        state_digest=new_digest,
        applied=resp.changes,
        removed=removed,
        licenses=licenses,
        applied_at=now,
        seats_out=seats.still_out(licenses, state.seats, latest),  # issue 15, item 6
        returns=returns,
        leases=leases,
    )
    receipt_bytes = sign1(receipt.encode(), key, Kind.RECEIPT.content_type)
    applied = (*state.applied, Applied(resp.nonce, resp.sequence, digest))
    new = replace(
        state,
        sequence=resp.sequence,
        licenses=licenses,
        outstanding=(),
        dropped=(),  # a response to any of them would now be stale
        applied=applied[-limits.max_applied_history:],
        last_receipt=receipt_bytes,
        clock_hwm=max(state.clock_hwm, now),
        system=system,
        evidence=_evidence(state.evidence, resp.changes, data),
    )
    new.__dict__["digest"] = new_digest  # the cached property, already computed above
    return ApplyResult(new, receipt_bytes, resp, already_applied=False, removed=removed)


def _evidence(kept: tuple[tuple[str, bytes], ...], changes: Iterable[LicenseChange],
              response: bytes) -> tuple[tuple[str, bytes], ...]:
    """Issue 16: the vendor response each transferable license was installed by."""
    ev = dict(kept)
    for c in changes:
        if c.op is not ChangeOp.REMOVE and c.transferable:
            ev[c.feature] = response
        else:
            ev.pop(c.feature, None)
    return tuple(sorted(ev.items()))


def _apply_certified_time(state: AgentState, data: bytes, resp: Response, now: int,
                          key: SigningKey, limits: Limits) -> ApplyResult:
    """Issue 16: a vendor-certified time answering this device's own outstanding ``clock``
    request (so it cannot be replayed) resets a high-water mark pushed into the future,
    once the clock agrees with it; the chain moves one link, changing no license."""
    assert resp.time is not None
    if abs(now - resp.time) > limits.clock_tolerance:
        raise ClockSetBackError(
            f"the vendor certifies the time was {_iso(resp.time)} when it answered; this "
            f"clock reads {_iso(now)}: set the system clock to the right time (NTP, or "
            f"date -s) and apply this file again (valid until {_iso(resp.expires)}); "
            f"nothing was changed")
    if now > resp.expires:
        raise ExpiredError(f"response expired at {_iso(resp.expires)} (now {_iso(now)})")
    receipt = Receipt(
        device_id=state.device_id, device_key=state.device_key, response=data,
        response_digest=sha256(data), sequence=resp.sequence, state_digest=state.digest,
        applied=(), removed=(), licenses=state.licenses, applied_at=now)
    receipt_bytes = sign1(receipt.encode(), key, Kind.RECEIPT.content_type)
    applied = (*state.applied, Applied(resp.nonce, resp.sequence, receipt.response_digest))
    new = replace(state, sequence=resp.sequence, outstanding=(), dropped=(),
                  applied=applied[-limits.max_applied_history:], last_receipt=receipt_bytes,
                  clock_hwm=max(now, resp.time))
    return ApplyResult(new, receipt_bytes, resp, already_applied=False)


def roll_forward(state: AgentState, applies: Iterable[Mapping[str, Any]]) -> AgentState:
    """Redo journaled applies that a damaged or lost state slot no longer holds.

    ``applies`` are the data of the journal's ``apply`` entries (authentic: the
    journal is MAC-protected with a key derived from the device key). Those
    with a sequence above the state's are replayed in order; each must land
    exactly on the state digest the journal recorded.

    Raises:
        IntegrityError: the journal and the state do not fit together.
    """
    from agent.errors import IntegrityError

    for entry in applies:
        try:
            seq = entry["sequence"]
            if not isinstance(seq, int) or seq <= state.sequence:
                continue
            if seq != state.sequence + 1:
                raise IntegrityError(
                    f"journal jumps from sequence {state.sequence} to {seq}: cannot recover"
                )
            changes = tuple(LicenseChange.from_cbor(c) for c in entry["changes"])
            licenses, _removed = _apply_changes(state.licenses, changes)
            if state_digest(licenses).hex() != entry["state_digest"]:
                raise IntegrityError(f"journaled apply of sequence {seq} does not reproduce "
                                     f"its recorded state digest")
            nonce = bytes.fromhex(entry["nonce"])
            rdigest = bytes.fromhex(entry.get("response_digest", "00" * 32))
        except (KeyError, TypeError, ValueError, MalformedError) as exc:
            raise IntegrityError(f"journal entry cannot be replayed: {exc}") from exc
        state = replace(
            state, sequence=seq, licenses=licenses, outstanding=(),
            applied=(*state.applied, Applied(nonce, seq, rdigest))[-DEFAULT_LIMITS.max_applied_history:],
            last_receipt=None,
        )
    return state


def replay_event(state: AgentState, event: str, data: Any, time_: int, key: SigningKey,
                 limits: Limits = DEFAULT_LIMITS) -> AgentState:
    """Redo one journaled commit on the state before it (the store's catch-up after a crash).

    ``data`` and ``time_`` are the journal record's (authentic: MAC-protected with a key
    derived from the device key). Each state-changing event is redone at the protocol
    level with the inputs it recorded and must reproduce what it recorded (sequence,
    state digest, nonce); events that change nothing (``refused``, ``reapply``,
    ``recovered``, ``init``...) leave the state as it is.

    Raises:
        IntegrityError: the record does not fit this state.
    """
    from agent.errors import IntegrityError, LicensingError

    try:
        if event == "request":
            new, _signed, req = create_request(
                state, Action(data["action"]), data["features"], bytes.fromhex(data["nonce"]),
                time_, key, limits, data.get("origin"), data.get("transfer_to"))
            if req.sequence != data["sequence"]:
                raise IntegrityError(f"request recorded at sequence {data['sequence']}, the "
                                     f"state is at {req.sequence}")
            return new
        if event == "apply":
            if "response" not in data:  # journaled before records carried the response
                new = roll_forward(state, [data])
            else:
                res = apply_response(state, data["response"], time_, key, limits)
                new = res.state
            if new.sequence != data["sequence"] or new.digest.hex() != data["state_digest"]:
                raise IntegrityError(f"apply of sequence {data['sequence']} does not "
                                     f"reproduce its recorded state digest")
            return new
        if event == "trust-update":
            new, upd = apply_trust_update(state, data["update"], time_, limits)
            if upd.version != data["version"]:
                raise IntegrityError("trust update does not reproduce its recorded version")
            return new
        if event == "rebind":
            binding = data["binding"]
            if not isinstance(binding, list) or not all(isinstance(f, str) for f in binding):
                raise IntegrityError("rebind record has no binding")
            return evolve(state, binding=tuple(binding))
        if event == "seat":  # issue 15: a checkout, renew, return or drop of seats
            return evolve(state, seats=seats.redo(state.seats, data, time_),
                          clock_hwm=max(state.clock_hwm, data.get("t", time_)))
        if event in SYSTEM_EVENTS:  # issue 14: the tree's own events, one pure step each
            return evolve(state, system=apply_event(state.system, event, data))
        if event == "transfer-out":  # issue 16: the licenses left for another server
            gone = set(data["features"])
            left = sort_licenses(x for x in state.licenses if x.feature not in gone)
            new = replace(state, sequence=state.sequence + 1, licenses=left, outstanding=(),
                          dropped=(), last_receipt=None,
                          clock_hwm=max(state.clock_hwm, time_),
                          evidence=tuple(e for e in state.evidence if e[0] not in gone))
            if new.sequence != data["sequence"] or new.digest.hex() != data["state_digest"]:
                raise IntegrityError("transfer-out does not reproduce its recorded state")
            return new
        if event == "transfer-in":  # issue 16: licenses that came from another server
            t, _k = self_signed_payload(data["transfer"], Transfer,
                                        replace(limits, max_file=256 * 1024))
            new = replace(state, sequence=state.sequence + 1,
                          licenses=sort_licenses((*state.licenses, *t.moved)), outstanding=(),
                          dropped=(), last_receipt=None, clock_hwm=max(state.clock_hwm, time_),
                          transfers_in=(*state.transfers_in, t.id))
            if new.sequence != data["sequence"] or new.digest.hex() != data["state_digest"]:
                raise IntegrityError("transfer-in does not reproduce its recorded state")
            return new
        if event == "revoked":  # issue 16
            return revoke(state, Revocation(state.device_id, data["at"], data["reason"]))
        if event == "clock":
            mark = data["clock_hwm"]
            if type(mark) is not int:
                raise IntegrityError("clock record has no time")
            return evolve(state, clock_hwm=max(state.clock_hwm, mark))
    except IntegrityError:
        raise
    except (LicensingError, KeyError, TypeError, ValueError) as exc:
        raise IntegrityError(f"{type(exc).__name__}: {exc}") from exc
    return state


# ---------------------------------------------------------------- trust rotation


def apply_trust_update(
    state: AgentState, data: bytes, now: int, limits: Limits = DEFAULT_LIMITS
) -> tuple[AgentState, TrustUpdate]:
    """Replace the trusted vendor keys with a set signed by a currently trusted key."""
    payload, _env = verify_vendor_file(state, data, now, TrustUpdate, limits)
    if payload.version <= state.trust_version:
        raise StaleError(
            f"trust update version {payload.version} is not newer than the installed "
            f"version {state.trust_version}"
        )
    return replace(state, trust=payload.keys, trust_version=payload.version,
                   clock_hwm=max(state.clock_hwm, now)), payload


# ---------------------------------------------------------------- license checks


@record(frozen=True)
class CheckResult:
    feature: str
    licensed: bool
    message: str
    license: License | None = None
    in_grace: bool = False
    clock_set_back: bool = False
    #: said alongside the answer (e.g. the clock mark could not be saved)
    warnings: tuple[str, ...] = ()


def licensed_at(lic: License, t: int) -> bool:
    """Whether ``lic`` licenses its feature at ``t`` (already the later of the clock and the
    high-water mark): what :func:`check_feature` answers for it, without its message."""
    if lic.count <= 0 or (lic.not_before is not None and t < lic.not_before):
        return False
    return lic.not_after is None or t <= lic.not_after + lic.grace


def check_feature(
    state: AgentState, feature: str, now: int, limits: Limits = DEFAULT_LIMITS
) -> CheckResult:
    """Is ``feature`` licensed at ``now``?

    A clock set back never extends a license: the time used is the later of
    ``now`` and the highest time the device has seen.
    """
    back = clock_set_back(state, now, limits)
    t = max(now, state.clock_hwm)
    lic = next((x for x in state.licenses if x.feature == feature), None)
    note = (f" (clock set back: it reads {_iso(now)}; using the latest time seen, "
            f"{_iso(state.clock_hwm)}; {CLOCK_RECOVERY})") if back else ""
    if lic is None:
        return CheckResult(feature, False, f"{feature}: not licensed{note}", None, False, back)
    if lic.count <= 0:
        return CheckResult(feature, False, f"{feature}: count is 0{note}", lic, False, back)
    if lic.not_before is not None and t < lic.not_before:
        return CheckResult(feature, False, f"{feature}: not valid yet{note}", lic, False, back)
    if lic.not_after is not None and t > lic.not_after:
        if t <= lic.not_after + lic.grace:
            return CheckResult(
                feature, True,
                f"{feature}: licensed, count {lic.count}, IN GRACE PERIOD (expired, grace "
                f"ends in {lic.not_after + lic.grace - t} s){note}",
                lic, True, back,
            )
        return CheckResult(feature, False, f"{feature}: expired{note}", lic, False, back)
    return CheckResult(feature, True, f"{feature}: licensed, count {lic.count}{note}", lic,
                       False, back)


# ---------------------------------------------------------------- device information


def make_device_info(
    state: AgentState, hardware: Mapping[str, Any], host: str, now: int, key: SigningKey
) -> tuple[bytes, DeviceInfo]:
    info = DeviceInfo(
        device_id=state.device_id,
        device_key=state.device_key,
        model=state.model,
        serial=state.serial,
        host_id=host,
        hardware=hardware,
        licenses=state.licenses,
        sequence=state.sequence,
        state_digest=state.digest,
        created=now,
        agent_version=AGENT_VERSION,
        parent=state.system.parent.device_id if state.system.parent is not None else None,
    )
    return sign1(info.encode(), key, Kind.DEVICE_INFO.content_type), info


def verify_self_signed(data: bytes, limits: Limits = DEFAULT_LIMITS
                       ) -> tuple[Request | Receipt | DeviceInfo | Transfer | TransferReceipt,
                                  PublicKey]:
    """Verify a file signed by the device key that it carries (request, receipt, device info).

    The key is inside the payload, so the payload is decoded (strictly, size
    capped) before the signature check; the key is then bound to the kid in
    the protected header and to the device ID (both its SHA-256).

    Raises:
        MalformedError, TrustError: not such a file, or its signature does not hold.
    """
    return _self_signed(data, None, limits)


def self_signed_payload(data: bytes, expect: type[_S],
                        limits: Limits = DEFAULT_LIMITS) -> tuple[_S, PublicKey]:
    """:func:`verify_self_signed` for one expected kind, typed as that kind."""
    payload, key = _self_signed(data, expect, limits)
    if not isinstance(payload, expect):  # decode_payload refused any other kind already
        raise MalformedError(f"expected a {expect.KIND.value} file")
    return payload, key


def _self_signed(data: bytes, expect: type[Payload] | None, limits: Limits
                 ) -> tuple[Request | Receipt | DeviceInfo | Transfer | TransferReceipt,
                            PublicKey]:
    env = read_signed(data, limits)
    payload = decode_payload(strict_loads(env.payload, max_size=limits.max_file), expect)
    if not isinstance(payload, Request | Receipt | DeviceInfo | Transfer | TransferReceipt):
        raise MalformedError(f"a {payload.KIND.value} file is not signed by a device")
    key = payload.device_key
    if env.kid != key.kid:
        raise TrustError("file's kid does not match the device key inside it")
    if payload.device_id != key.kid.hex():
        raise TrustError("device_id is not the SHA-256 of the device key")
    env.verify_with(key)
    return payload, key


def license_info_for(info: LicenseInfo, device_id: str) -> Any:
    return info.for_device(device_id)

"""The signed files of the protocol as frozen dataclasses with explicit CBOR encode/decode.

Every file is a COSE_Sign1 whose payload is a CBOR map with text keys; the
``kind`` key says which of the classes below it is. Decoding validates types,
ranges and sizes and raises :class:`~agent.errors.MalformedError` on anything
else. See docs/protocol.md for the CDDL.
"""

from __future__ import annotations

import enum
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any, ClassVar, TypeVar, overload

from agent.cose import Encoded, PublicKey, canonical, encoded_array
from agent.digest import sha256
from agent.errors import MalformedError
from agent.record import record

__all__ = [
    "MAX_COUNT",
    "MAX_SEQUENCE",
    "MAX_TIME",
    "Action",
    "ChangeOp",
    "DeviceInfo",
    "Kind",
    "License",
    "LicenseChange",
    "LicenseInfo",
    "LicenseInfoEntry",
    "Receipt",
    "Request",
    "Response",
    "Revocation",
    "TrustKey",
    "Transfer",
    "TransferReceipt",
    "TrustUpdate",
    "decode_payload",
    "encoded_licenses",
    "sort_licenses",
    "sorted_state_digest",
    "state_digest",
    "valid_count",
    "valid_device_id",
    "valid_feature",
]

FORMAT_VERSION = 1
#: sequence numbers are unsigned and stay below 2**63 so base+1 never overflows a uint64
MAX_SEQUENCE = 2**63 - 1
MAX_TIME = 2**40  # seconds since the epoch; far beyond any real date, far below overflow
MAX_COUNT = 2**32 - 1  # a license's count
MAX_LIST = 256
MAX_TEXT = 256
FEATURE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,63}")
_DEVICE_ID_RE = re.compile(r"[0-9a-f]{64}")
NONCE_LEN = 16


class Kind(enum.StrEnum):
    DEVICE_INFO = "device-info"
    LICENSE_INFO = "license-info"
    REQUEST = "request"
    RESPONSE = "response"
    RECEIPT = "receipt"
    TRUST_UPDATE = "trust-update"
    # issue 16: direct transfer at the site
    TRANSFER = "transfer"
    TRANSFER_RECEIPT = "transfer-receipt"

    @property
    def content_type(self) -> str:
        return f"application/vnd.bms-license.{self.value}+cbor"


class Action(enum.StrEnum):
    ACTIVATE = "activate"
    RECLAIM = "reclaim"
    RENEW = "renew"
    #: issue 16: ask the vendor for a certified time (a clock that ran ahead), nothing else
    CLOCK = "clock"


class ChangeOp(enum.StrEnum):
    ADD = "add"
    UPDATE = "update"
    REMOVE = "remove"


# ---------------------------------------------------------------- field checks

def _map(obj: object, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict):
        raise MalformedError(f"{what} must be a map")
    for k in obj:
        if not isinstance(k, str):
            raise MalformedError(f"{what} has a non-text key")
    return obj


def _keys(m: Mapping[str, Any], what: str, required: Sequence[str],
          optional: Sequence[str] = ()) -> None:
    # the common case first, without building sets: every required key there and each other
    # key an optional one (counted: the lists name each key once, a map holds it once)
    if all(k in m for k in required) and len(m) == len(required) + sum(
            1 for k in optional if k in m):
        return
    req = set(required)
    allowed = req | set(optional)
    missing = req - m.keys()
    if missing:
        raise MalformedError(f"{what} lacks {', '.join(sorted(missing))}")
    extra = m.keys() - allowed
    if extra:
        raise MalformedError(f"{what} has unknown field {', '.join(sorted(extra))}")


def _uint(v: object, what: str, maximum: int = MAX_SEQUENCE) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > maximum:
        raise MalformedError(f"{what} must be an integer from 0 to {maximum}")
    return v


def _time(v: object, what: str) -> int:
    return _uint(v, what, MAX_TIME)


def _opt_time(v: object, what: str) -> int | None:
    return None if v is None else _time(v, what)


def _text(v: object, what: str, maximum: int = MAX_TEXT) -> str:
    if not isinstance(v, str) or len(v) > maximum:
        raise MalformedError(f"{what} must be text of at most {maximum} characters")
    return v


def _bytes(v: object, what: str, length: int | None = None, maximum: int = 1024) -> bytes:
    if not isinstance(v, bytes):
        raise MalformedError(f"{what} must be a byte string")
    if length is not None and len(v) != length:
        raise MalformedError(f"{what} must be {length} bytes")
    if len(v) > maximum:
        raise MalformedError(f"{what} is longer than {maximum} bytes")
    return v


def _list(v: object, what: str, maximum: int = MAX_LIST) -> list[Any]:
    if not isinstance(v, list):
        raise MalformedError(f"{what} must be an array")
    if len(v) > maximum:
        raise MalformedError(f"{what} has more than {maximum} entries")
    return v


def _device_id(v: object, what: str = "device_id") -> str:
    if not isinstance(v, str) or not _DEVICE_ID_RE.fullmatch(v):
        raise MalformedError(f"{what} must be 64 lowercase hex digits")
    return v


def _feature(v: object) -> str:
    if not isinstance(v, str) or not FEATURE_RE.fullmatch(v):
        raise MalformedError(f"feature name {v!r} is not valid (letters, digits, ._:/-, max 64)")
    return v


def valid_count(v: object, what: str = "count") -> int:
    """A license count, 0 to :data:`MAX_COUNT` (MalformedError naming ``what`` if not)."""
    return _uint(v, what, MAX_COUNT)


valid_device_id = _device_id  # the checks of a device ID and a feature name, for others to share
valid_feature = _feature


def _enum(cls: type[E], v: object, what: str) -> E:
    try:
        return cls(v)
    except ValueError as exc:
        raise MalformedError(f"{what} {v!r} is not one of {', '.join(e.value for e in cls)}") from exc


E = TypeVar("E", bound=enum.Enum)


def _pubkey(m: Mapping[str, Any], prefix: str = "device") -> PublicKey:
    alg = m[f"{prefix}_alg"]
    raw = m[f"{prefix}_key"]
    if not isinstance(alg, int) or isinstance(alg, bool):
        raise MalformedError(f"{prefix}_alg must be an integer")
    return PublicKey(alg, _bytes(raw, f"{prefix}_key", maximum=65))


# ---------------------------------------------------------------- licenses


@record(frozen=True, order=True)
class License:
    """One installed license: a feature, how many, and when it is valid.

    ``not_before``/``not_after`` are POSIX seconds (UTC) or None for open-ended;
    ``grace`` seconds extend ``not_after`` for ``check`` with a warning.
    """

    feature: str
    count: int
    not_before: int | None = None
    not_after: int | None = None
    grace: int = 0
    #: issue 15: served as COUNT floating seats by the agent that holds it (agent.seats)
    floating: bool = False
    # issue 14: child servers that may inherit this license (0: none) and a demo license;
    # written only when not the default, so every older license encodes byte for byte
    inherit: int = 0
    demo: bool = False
    #: issue 16: may move to another server directly (a transfer file); written only when true
    transferable: bool = False

    def __post_init__(self) -> None:
        _feature(self.feature)
        _uint(self.inherit, "inherit", MAX_COUNT)
        _uint(self.count, "count", MAX_COUNT)
        _opt_time(self.not_before, "not_before")
        _opt_time(self.not_after, "not_after")
        _uint(self.grace, "grace", 366 * 86400)
        if (
            self.not_before is not None
            and self.not_after is not None
            and self.not_after < self.not_before
        ):
            raise MalformedError(f"license {self.feature} ends before it starts")

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "feature": self.feature,
            "count": self.count,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "grace": self.grace,
        }
        if self.floating:  # issue 15: written only when set (older files stay byte-identical)
            out["floating"] = True
        if self.inherit:  # issue 14
            out["inherit"] = self.inherit
        if self.demo:
            out["demo"] = True
        if self.transferable:  # issue 16: absent when false (digests stay as they were)
            out["transferable"] = True
        return out

    @cached_property
    def encoded(self) -> Encoded:
        """``to_cbor()`` in canonical CBOR, encoded once (the license is immutable): the
        state, its digest and each receipt carry it as these very bytes."""
        return Encoded(canonical(self.to_cbor()))

    @classmethod
    def from_cbor(cls, obj: object) -> License:
        m = _map(obj, "license")
        _keys(m, "license", ["feature", "count"],
              ["not_before", "not_after", "grace", "floating", "inherit", "demo",
               "transferable"])
        if "floating" in m and m["floating"] is not True:  # issue 15: true or absent
            raise MalformedError("license floating must be true when present")
        demo = m.get("demo", False)
        if demo is not False and demo is not True:
            raise MalformedError("demo must be true or false")
        tr = m.get("transferable", False)  # issue 16
        if "transferable" in m and tr is not True:
            raise MalformedError("transferable is written only as true")
        return cls(
            feature=_feature(m["feature"]),
            count=_uint(m["count"], "count", MAX_COUNT),
            not_before=_opt_time(m.get("not_before"), "not_before"),
            not_after=_opt_time(m.get("not_after"), "not_after"),
            grace=_uint(m.get("grace", 0), "grace", 366 * 86400),
            floating="floating" in m,
            inherit=_uint(m.get("inherit", 0), "inherit", MAX_COUNT),  # issue 14
            demo=demo,
            transferable=tr,
        )


def _licenses(v: object, what: str = "licenses") -> tuple[License, ...]:
    items = tuple(License.from_cbor(x) for x in _list(v, what))
    names = [lic.feature for lic in items]
    if len(set(names)) != len(names):
        raise MalformedError(f"{what} names a feature twice")
    return sort_licenses(items)


def _feature_of(lic: License) -> str:
    return lic.feature


def sort_licenses(items: Iterable[License]) -> tuple[License, ...]:
    """Licenses in the order of their fields (feature first), sorted by the feature string.

    A feature is installed once, so its name alone decides the order, without the
    generic field-by-field comparison; a list naming a feature twice (never a state)
    falls back to it, so the result is the same either way.
    """
    items = tuple(items)
    out = sorted(items, key=_feature_of)
    for a, b in itertools.pairwise(out):
        if a.feature == b.feature:
            return tuple(sorted(items))
    return tuple(out)


#: the last tuple of licenses digested and its digest: a state and the states made from it
#: by a request, a clock mark or a re-bind share the very same (immutable) tuple
_LAST_DIGEST: list[tuple[Any, bytes]] = [(None, b"")]  # one tuple: swapped atomically


def state_digest(licenses: Iterable[License]) -> bytes:
    """SHA-256 over the canonical CBOR of the installed licenses, sorted by feature."""
    last = _LAST_DIGEST[0]
    if licenses is last[0]:
        return last[1]
    ordered = sort_licenses(licenses)
    if type(licenses) is tuple and all(type(lic) is License for lic in licenses):
        # a state's licenses are sorted already: the array as the state and its receipt
        # encode it next (encoded_licenses), made once for all three
        if len(ordered) == len(licenses) and all(
                a is b for a, b in zip(ordered, licenses, strict=True)):
            return sorted_state_digest(licenses)
        digest = sha256(encoded_array(lic.encoded for lic in ordered).data)
        _LAST_DIGEST[0] = (licenses, digest)  # held: its id cannot be reused meanwhile
        return digest
    return sha256(encoded_array(lic.encoded for lic in ordered).data)


def sorted_state_digest(licenses: tuple[License, ...]) -> bytes:
    """:func:`state_digest` of licenses that :func:`sort_licenses` returned, each feature
    once (an apply's new licenses), without sorting and comparing them again."""
    last = _LAST_DIGEST[0]
    if licenses is last[0]:
        return last[1]
    digest = sha256(encoded_licenses(licenses).data)
    _LAST_DIGEST[0] = (licenses, digest)  # held: its id cannot be reused meanwhile
    return digest


#: the last tuple of licenses encoded as an array, and that array (as :data:`_LAST_DIGEST`)
_LAST_ENCODED: list[tuple[Any, Encoded]] = [(None, Encoded(b""))]


def encoded_licenses(licenses: tuple[License, ...]) -> Encoded:
    """``encoded_array`` of the licenses' encodings, in their order; the last tuple's
    remembered (an apply digests, saves and signs a receipt of the same tuple)."""
    last = _LAST_ENCODED[0]
    if licenses is last[0]:
        return last[1]
    enc = encoded_array(lic.encoded for lic in licenses)
    if type(licenses) is tuple:
        _LAST_ENCODED[0] = (licenses, enc)  # held: its id cannot be reused meanwhile
    return enc


@record(frozen=True)
class LicenseChange:
    """One change a response makes: add a new feature, update one, or remove one."""

    op: ChangeOp
    feature: str
    count: int = 0
    not_before: int | None = None
    not_after: int | None = None
    grace: int = 0
    floating: bool = False  # issue 15
    inherit: int = 0  # issue 14, as License's
    demo: bool = False
    transferable: bool = False  # issue 16

    def __post_init__(self) -> None:
        self.license()  # validates the fields

    def license(self) -> License:
        """The license this change installs (made and checked once: the change is immutable)."""
        lic: License | None = self.__dict__.get("_license")
        if lic is None:
            lic = License(self.feature, self.count, self.not_before, self.not_after, self.grace,
                          floating=self.floating, inherit=self.inherit, demo=self.demo,
                          transferable=self.transferable)
            self.__dict__["_license"] = lic
        return lic

    def to_cbor(self) -> dict[str, Any]:
        if self.op is ChangeOp.REMOVE:
            return {"op": self.op.value, "feature": self.feature}
        return {"op": self.op.value, **self.license().to_cbor()}

    @classmethod
    def from_cbor(cls, obj: object) -> LicenseChange:
        m = _map(obj, "change")
        op = _enum(ChangeOp, m.get("op"), "change op")
        if op is ChangeOp.REMOVE:
            _keys(m, "remove change", ["op", "feature"])
            return cls(op, _feature(m["feature"]))
        lic = License.from_cbor({k: v for k, v in m.items() if k != "op"})
        change = cls.__new__(cls)
        change.__dict__["_license"] = lic  # made and checked just now: not made again
        change.__init__(op, lic.feature, lic.count, lic.not_before,  # type: ignore[misc]
                        lic.not_after, lic.grace, lic.floating, lic.inherit, lic.demo,
                        lic.transferable)
        return change


# ---------------------------------------------------------------- payloads


class Payload:
    """Base of the signed payloads: ``kind`` dispatch and encoding."""

    KIND: ClassVar[Kind]

    def fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def wire_fields(self) -> dict[str, Any]:
        """:meth:`fields` as :meth:`encode` writes them (parts may be pre-encoded)."""
        return self.fields()

    def encode(self) -> bytes:
        return canonical({"v": FORMAT_VERSION, "kind": self.KIND.value, **self.wire_fields()})


@record(frozen=True)
class Revocation:
    """Issue 16: the vendor declared a device dead (RMA); carried, signed, in later vendor
    files (responses, license information) for the site."""

    device_id: str
    revoked_at: int
    reason: str

    def to_cbor(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "revoked_at": self.revoked_at,
                "reason": self.reason}

    @classmethod
    def from_cbor(cls, obj: object) -> Revocation:
        m = _map(obj, "revocation")
        _keys(m, "revocation", ["device_id", "revoked_at", "reason"])
        return cls(_device_id(m["device_id"]), _time(m["revoked_at"], "revoked_at"),
                   _text(m["reason"], "reason"))


def _revocations(m: Mapping[str, Any]) -> tuple[Revocation, ...]:
    """Issue 16: the optional ``revoked`` list of a vendor file (absent: none)."""
    if "revoked" not in m:
        return ()
    items = tuple(Revocation.from_cbor(x) for x in _list(m["revoked"], "revoked"))
    if not items:
        raise MalformedError("revoked is written only when it names a device")
    return items


def _revoked_field(revoked: tuple[Revocation, ...]) -> dict[str, Any]:
    return {"revoked": [r.to_cbor() for r in revoked]} if revoked else {}


def revocation_of(revoked: Iterable[Revocation], device_id: str) -> Revocation | None:
    """Issue 16: the revocation of ``device_id`` among ``revoked``, if any."""
    return next((r for r in revoked if r.device_id == device_id), None)


@record(frozen=True)
class Request(Payload):
    """A device asks the vendor for a change, on top of its exact current state."""

    KIND: ClassVar[Kind] = Kind.REQUEST
    device_id: str
    device_key: PublicKey
    model: str
    nonce: bytes
    sequence: int
    state_digest: bytes
    action: Action
    features: tuple[str, ...]
    licenses: tuple[License, ...]
    created: int
    #: issue 16 (rehost): a reclaim whose licenses move to this device; absent otherwise
    transfer_to: str | None = None
    #: issue 14 item 3: the parent server's device ID, for a server attached under one
    #: (absent for a server that stands alone: every older request stays byte-identical)
    parent: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device_id": self.device_id,
            "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw,
            "model": self.model,
            "nonce": self.nonce,
            "sequence": self.sequence,
            "state_digest": self.state_digest,
            "action": self.action.value,
            "features": list(self.features),
            "licenses": [lic.to_cbor() for lic in self.licenses],
            "created": self.created,
        }
        if self.transfer_to is not None:  # issue 16: written only when set
            out["transfer_to"] = self.transfer_to
        if self.parent is not None:  # issue 14 item 3: written only when attached
            out["parent"] = self.parent
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Request:
        _keys(m, "request", ["v", "kind", "device_id", "device_alg", "device_key", "model",
                             "nonce", "sequence", "state_digest", "action", "features",
                             "licenses", "created"], ["transfer_to", "parent"])
        to = m.get("transfer_to")  # issue 16
        return cls(
            device_id=_device_id(m["device_id"]),
            device_key=_pubkey(m),
            model=_text(m["model"], "model", 32),
            nonce=_bytes(m["nonce"], "nonce", NONCE_LEN),
            sequence=_uint(m["sequence"], "sequence"),
            state_digest=_bytes(m["state_digest"], "state_digest", 32),
            action=_enum(Action, m["action"], "action"),
            features=tuple(_feature(f) for f in _list(m["features"], "features")),
            licenses=_licenses(m["licenses"]),
            created=_time(m["created"], "created"),
            transfer_to=None if to is None else _transfer_to(to, m),
            parent=_device_id(m["parent"], "parent") if "parent" in m else None,
        )


def _transfer_to(v: object, m: Mapping[str, Any]) -> str:
    """Issue 16: the device a reclaim moves licenses to (another device, in a reclaim)."""
    to = _device_id(v, "transfer_to")
    if to == m.get("device_id"):
        raise MalformedError("transfer_to names the device itself")
    if "action" in m and m["action"] != Action.RECLAIM.value:
        raise MalformedError("transfer_to is only for a reclaim")
    return to


@record(frozen=True)
class Response(Payload):
    """The vendor's answer to one request: the next link of the device's chain."""

    KIND: ClassVar[Kind] = Kind.RESPONSE
    device_id: str
    nonce: bytes
    base_sequence: int
    base_digest: bytes
    sequence: int
    changes: tuple[LicenseChange, ...]
    issued: int
    not_before: int
    expires: int
    #: issue 16 (rehost): the device the removed licenses go to; absent otherwise
    transfer_to: str | None = None
    #: issue 16: devices of the site the vendor declared dead; absent when none
    revoked: tuple[Revocation, ...] = ()
    #: issue 16: the vendor-certified time, answering a ``clock`` request; absent otherwise
    time: int | None = None

    def __post_init__(self) -> None:
        if self.time is not None and self.changes:
            raise MalformedError("a response certifying the time changes no license")
        if self.sequence != self.base_sequence + 1:
            raise MalformedError(
                f"response sequence {self.sequence} must be base sequence "
                f"{self.base_sequence} + 1"
            )
        if self.expires < self.not_before:
            raise MalformedError("response expires before it becomes valid")
        names = [c.feature for c in self.changes]
        if len(set(names)) != len(names):
            raise MalformedError("response changes a feature twice")

    def fields(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "nonce": self.nonce,
            "base_sequence": self.base_sequence,
            "base_digest": self.base_digest,
            "sequence": self.sequence,
            "changes": [c.to_cbor() for c in self.changes],
            "issued": self.issued,
            "not_before": self.not_before,
            "expires": self.expires,
            **({} if self.transfer_to is None else {"transfer_to": self.transfer_to}),
            **_revoked_field(self.revoked),
            **({} if self.time is None else {"time": self.time}),
        }

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Response:
        _keys(m, "response", ["v", "kind", "device_id", "nonce", "base_sequence", "base_digest",
                              "sequence", "changes", "issued", "not_before", "expires"],
              ["transfer_to", "revoked", "time"])
        to = m.get("transfer_to")  # issue 16
        base = _uint(m["base_sequence"], "base_sequence", MAX_SEQUENCE - 1)
        return cls(
            device_id=_device_id(m["device_id"]),
            nonce=_bytes(m["nonce"], "nonce", NONCE_LEN),
            base_sequence=base,
            base_digest=_bytes(m["base_digest"], "base_digest", 32),
            sequence=_uint(m["sequence"], "sequence"),
            changes=tuple(LicenseChange.from_cbor(c) for c in _list(m["changes"], "changes")),
            issued=_time(m["issued"], "issued"),
            not_before=_time(m["not_before"], "not_before"),
            expires=_time(m["expires"], "expires"),
            transfer_to=None if to is None else _transfer_to(to, m),
            revoked=_revocations(m),
            time=_opt_time(m.get("time"), "time") if "time" in m else None,
        )


@record(frozen=True)
class SeatOut:
    """Issue 15: a seat of a floating license still out when a receipt removed or cut its
    license (a reclaim given ``--force``): it runs to ``until`` and is never renewed."""

    feature: str
    client: str
    until: int
    borrowed: bool = False

    def to_cbor(self) -> dict[str, Any]:
        return {"feature": self.feature, "client": self.client, "until": self.until,
                "borrowed": self.borrowed}

    @classmethod
    def from_cbor(cls, obj: object) -> SeatOut:
        m = _map(obj, "seat out")
        _keys(m, "seat out", ["feature", "client", "until", "borrowed"])
        client = m["client"]
        if not isinstance(client, str) or not 0 < len(client) <= 128:
            raise MalformedError("seat out client must be a name")
        if not isinstance(m["borrowed"], bool):
            raise MalformedError("seat out borrowed must be true or false")
        return cls(_feature(m["feature"]), client, _time(m["until"], "until"), m["borrowed"])


@record(frozen=True)
class Receipt(Payload):
    """Signed by the device after applying a response; proof of what it now holds.

    ``response`` is the exact response file that was applied, so the vendor can
    check that its own key signed it; ``removed`` lists the licenses that left
    the device (the proof of a reclaim) and ``state_digest`` the state after.
    """

    KIND: ClassVar[Kind] = Kind.RECEIPT
    device_id: str
    device_key: PublicKey
    response: bytes
    response_digest: bytes
    sequence: int
    state_digest: bytes
    applied: tuple[LicenseChange, ...]
    removed: tuple[License, ...]
    licenses: tuple[License, ...]
    applied_at: int
    #: issue 15: seats still out of the licenses this receipt removed or cut (written
    #: with ``seats_end``, the last one's end, only when there are any)
    seats_out: tuple[SeatOut, ...] = ()

    @property
    def seats_end(self) -> int | None:
        return max((s.until for s in self.seats_out), default=None)
    #: issue 14: the children's signed grant returns for the licenses that left, and the
    #: leases still running on children after a forced reclaim ({"child_id", "feature",
    #: "lease_until"}); written only when not empty
    returns: tuple[bytes, ...] = ()
    leases: tuple[Mapping[str, Any], ...] = ()

    def fields(self) -> dict[str, Any]:
        return self._optional(self._fields())

    def _optional(self, out: dict[str, Any]) -> dict[str, Any]:
        """The optional keys, written only when set (both encodings add them alike)."""
        if self.seats_out:
            out["seats_out"] = [s.to_cbor() for s in self.seats_out]
            out["seats_end"] = self.seats_end
        if self.returns:  # issue 14
            out["returns"] = list(self.returns)
        if self.leases:
            out["leases"] = [dict(x) for x in self.leases]
        return out

    def _fields(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw,
            "response": self.response,
            "response_digest": self.response_digest,
            "sequence": self.sequence,
            "state_digest": self.state_digest,
            "applied": [c.to_cbor() for c in self.applied],
            "removed": [lic.to_cbor() for lic in self.removed],
            "licenses": [lic.to_cbor() for lic in self.licenses],
            "applied_at": self.applied_at,
        }

    def wire_fields(self) -> dict[str, Any]:
        # the installed licenses as encoded once (the same bytes: Encoded)
        return self._optional({
            "device_id": self.device_id,
            "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw,
            "response": self.response,
            "response_digest": self.response_digest,
            "sequence": self.sequence,
            "state_digest": self.state_digest,
            "applied": [c.to_cbor() for c in self.applied],
            "removed": encoded_array(lic.encoded for lic in self.removed),
            "licenses": encoded_licenses(self.licenses),
            "applied_at": self.applied_at,
        })

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Receipt:
        _keys(m, "receipt", ["v", "kind", "device_id", "device_alg", "device_key", "response",
                             "response_digest", "sequence", "state_digest", "applied",
                             "removed", "licenses", "applied_at"],
              ["seats_out", "seats_end", "returns", "leases"])
        seats_out = tuple(SeatOut.from_cbor(x) for x in _list(m.get("seats_out", []),
                                                                "seats_out"))
        if ("seats_out" in m) != ("seats_end" in m) or ("seats_out" in m and (
                not seats_out or m["seats_end"] != max(x.until for x in seats_out))):
            raise MalformedError("receipt seats_end must be the last end of its seats_out")
        return cls(
            device_id=_device_id(m["device_id"]),
            device_key=_pubkey(m),
            response=_bytes(m["response"], "response", maximum=64 * 1024),
            response_digest=_bytes(m["response_digest"], "response_digest", 32),
            sequence=_uint(m["sequence"], "sequence"),
            state_digest=_bytes(m["state_digest"], "state_digest", 32),
            applied=tuple(LicenseChange.from_cbor(c) for c in _list(m["applied"], "applied")),
            removed=_licenses(m["removed"], "removed"),
            licenses=_licenses(m["licenses"]),
            applied_at=_time(m["applied_at"], "applied_at"),
            seats_out=seats_out,
            returns=tuple(_bytes(r, "returns", maximum=80 * 1024)
                          for r in _list(m.get("returns", []), "returns")),
            leases=tuple(_lease(x) for x in _list(m.get("leases", []), "leases")),
        )


def _lease(obj: object) -> dict[str, Any]:
    """One lease still running on a child after a forced reclaim (issue 14)."""
    m = _map(obj, "lease")
    _keys(m, "lease", ["child_id", "feature", "lease_until"])
    return {"child_id": _device_id(m["child_id"], "child_id"), "feature": _feature(m["feature"]),
            "lease_until": _time(m["lease_until"], "lease_until")}


@record(frozen=True)
class DeviceInfo(Payload):
    """Who a server is and what it holds: step 1 of the workflow."""

    KIND: ClassVar[Kind] = Kind.DEVICE_INFO
    device_id: str
    device_key: PublicKey
    model: str
    serial: str | None
    host_id: str
    hardware: Mapping[str, Any]
    licenses: tuple[License, ...]
    sequence: int
    state_digest: bytes
    created: int
    agent_version: str = "0"
    #: issue 14 item 5: the parent server's device ID, for a server attached under one
    #: (absent for a server that stands alone: every older file stays byte-identical)
    parent: str | None = None

    def fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "device_id": self.device_id,
            "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw,
            "model": self.model,
            "serial": self.serial,
            "host_id": self.host_id,
            "hardware": dict(self.hardware),
            "licenses": [lic.to_cbor() for lic in self.licenses],
            "sequence": self.sequence,
            "state_digest": self.state_digest,
            "created": self.created,
            "agent_version": self.agent_version,
        }
        if self.parent is not None:  # issue 14 item 5
            out["parent"] = self.parent
        return out

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> DeviceInfo:
        _keys(m, "device-info", ["v", "kind", "device_id", "device_alg", "device_key", "model",
                                 "serial", "host_id", "hardware", "licenses", "sequence",
                                 "state_digest", "created", "agent_version"], ["parent"])
        hw = _map(m["hardware"], "hardware")
        return cls(
            device_id=_device_id(m["device_id"]),
            device_key=_pubkey(m),
            model=_text(m["model"], "model", 32),
            serial=None if m["serial"] is None else _text(m["serial"], "serial", 64),
            host_id=_device_id(m["host_id"], "host_id"),
            hardware=_hardware(hw),
            licenses=_licenses(m["licenses"]),
            sequence=_uint(m["sequence"], "sequence"),
            state_digest=_bytes(m["state_digest"], "state_digest", 32),
            created=_time(m["created"], "created"),
            agent_version=_text(m["agent_version"], "agent_version", 32),
            parent=_device_id(m["parent"], "parent") if "parent" in m else None,
        )


def _hardware(m: Mapping[str, Any]) -> dict[str, Any]:
    if len(m) > 16:
        raise MalformedError("hardware has too many fields")
    out: dict[str, Any] = {}
    for k, v in m.items():
        if v is None or isinstance(v, str):
            out[k] = None if v is None else _text(v, f"hardware.{k}")
        elif isinstance(v, list):
            out[k] = [_text(x, f"hardware.{k}") for x in _list(v, f"hardware.{k}", 64)]
        else:
            raise MalformedError(f"hardware.{k} must be text, null or a list of text")
    return out


@record(frozen=True)
class LicenseInfoEntry:
    """For one server: the installed licenses to reclaim and the ones to install."""

    device_id: str
    reclaim: tuple[License, ...] = ()
    install: tuple[License, ...] = ()

    def to_cbor(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "reclaim": [lic.to_cbor() for lic in self.reclaim],
            "install": [lic.to_cbor() for lic in self.install],
        }

    @classmethod
    def from_cbor(cls, obj: object) -> LicenseInfoEntry:
        m = _map(obj, "license-info entry")
        _keys(m, "license-info entry", ["device_id", "reclaim", "install"])
        return cls(
            device_id=_device_id(m["device_id"]),
            reclaim=_licenses(m["reclaim"], "reclaim"),
            install=_licenses(m["install"], "install"),
        )


@record(frozen=True)
class LicenseInfo(Payload):
    """Vendor-signed: for one or many servers, what is to be reclaimed or installed."""

    KIND: ClassVar[Kind] = Kind.LICENSE_INFO
    entries: tuple[LicenseInfoEntry, ...]
    issued: int
    expires: int
    #: issue 16: devices of the site the vendor declared dead; absent when none
    revoked: tuple[Revocation, ...] = ()

    def fields(self) -> dict[str, Any]:
        return {
            "entries": [e.to_cbor() for e in self.entries],
            "issued": self.issued,
            "expires": self.expires,
            **_revoked_field(self.revoked),
        }

    def for_device(self, device_id: str) -> LicenseInfoEntry | None:
        for e in self.entries:
            if e.device_id == device_id:
                return e
        return None

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> LicenseInfo:
        _keys(m, "license-info", ["v", "kind", "entries", "issued", "expires"], ["revoked"])
        entries = tuple(
            LicenseInfoEntry.from_cbor(e) for e in _list(m["entries"], "entries", 100_000)
        )
        return cls(entries=entries, issued=_time(m["issued"], "issued"),
                   expires=_time(m["expires"], "expires"), revoked=_revocations(m))


@record(frozen=True)
class TrustKey:
    """A vendor key the device trusts, with its validity window."""

    key: PublicKey
    not_before: int | None = None
    not_after: int | None = None

    @property
    def kid(self) -> bytes:
        return self.key.kid

    def to_cbor(self) -> dict[str, Any]:
        return {
            "alg": self.key.alg,
            "key": self.key.raw,
            "not_before": self.not_before,
            "not_after": self.not_after,
        }

    @cached_property
    def encoded(self) -> Encoded:
        """``to_cbor()`` in canonical CBOR, encoded once (the key is immutable)."""
        return Encoded(canonical(self.to_cbor()))

    @classmethod
    def from_cbor(cls, obj: object) -> TrustKey:
        m = _map(obj, "trusted key")
        _keys(m, "trusted key", ["alg", "key"], ["not_before", "not_after"])
        return cls(
            key=PublicKey(*_alg_key(m)),
            not_before=_opt_time(m.get("not_before"), "not_before"),
            not_after=_opt_time(m.get("not_after"), "not_after"),
        )


def _alg_key(m: Mapping[str, Any]) -> tuple[int, bytes]:
    alg = m["alg"]
    if not isinstance(alg, int) or isinstance(alg, bool):
        raise MalformedError("alg must be an integer")
    return alg, _bytes(m["key"], "key", maximum=65)


@record(frozen=True)
class TrustUpdate(Payload):
    """Key rotation: the complete new set of vendor keys, signed by a currently trusted key."""

    KIND: ClassVar[Kind] = Kind.TRUST_UPDATE
    version: int
    keys: tuple[TrustKey, ...]
    issued: int

    def fields(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "keys": [k.to_cbor() for k in self.keys],
            "issued": self.issued,
        }

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> TrustUpdate:
        _keys(m, "trust-update", ["v", "kind", "version", "keys", "issued"])
        keys = tuple(TrustKey.from_cbor(k) for k in _list(m["keys"], "keys", 16))
        if not keys:
            raise MalformedError("a trust update must name at least one key")
        return cls(version=_uint(m["version"], "version"), keys=keys,
                   issued=_time(m["issued"], "issued"))


# ---------------------------------------------------------------- issue 16: direct transfer


@record(frozen=True)
class Transfer(Payload):
    """Signed by the old server: transferable licenses it removed, for one named new server.

    ``evidence`` holds, per license, the vendor response that installed it on the old
    server (the new server verifies the vendor's signature on it); ``sequence`` and
    ``state_digest`` are the old server's state after the removal, ``licenses`` what it
    still holds; ``id`` is fresh randomness, so a transfer applies once.
    """

    KIND: ClassVar[Kind] = Kind.TRANSFER
    device_id: str
    device_key: PublicKey
    transfer_to: str
    id: bytes
    moved: tuple[License, ...]
    evidence: tuple[bytes, ...]
    sequence: int
    state_digest: bytes
    licenses: tuple[License, ...]
    created: int

    def fields(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw, "transfer_to": self.transfer_to, "id": self.id,
            "moved": [lic.to_cbor() for lic in self.moved], "evidence": list(self.evidence),
            "sequence": self.sequence, "state_digest": self.state_digest,
            "licenses": [lic.to_cbor() for lic in self.licenses], "created": self.created,
        }

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> Transfer:
        _keys(m, "transfer", ["v", "kind", "device_id", "device_alg", "device_key",
                              "transfer_to", "id", "moved", "evidence", "sequence",
                              "state_digest", "licenses", "created"])
        moved = _licenses(m["moved"], "moved")
        evidence = tuple(_bytes(e, "evidence", maximum=64 * 1024)
                         for e in _list(m["evidence"], "evidence"))
        if not moved or len(evidence) != len(moved):
            raise MalformedError("a transfer moves at least one license, each with its evidence")
        return cls(
            device_id=_device_id(m["device_id"]), device_key=_pubkey(m),
            transfer_to=_transfer_to(m["transfer_to"], m), id=_bytes(m["id"], "id", NONCE_LEN),
            moved=moved, evidence=evidence, sequence=_uint(m["sequence"], "sequence"),
            state_digest=_bytes(m["state_digest"], "state_digest", 32),
            licenses=_licenses(m["licenses"]), created=_time(m["created"], "created"),
        )


@record(frozen=True)
class TransferReceipt(Payload):
    """Signed by the new server after applying a transfer: the exact transfer file, and its
    state after (the vendor reconciles the move from it)."""

    KIND: ClassVar[Kind] = Kind.TRANSFER_RECEIPT
    device_id: str
    device_key: PublicKey
    transfer: bytes
    sequence: int
    state_digest: bytes
    licenses: tuple[License, ...]
    applied_at: int

    def fields(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id, "device_alg": self.device_key.alg,
            "device_key": self.device_key.raw, "transfer": self.transfer,
            "sequence": self.sequence, "state_digest": self.state_digest,
            "licenses": [lic.to_cbor() for lic in self.licenses], "applied_at": self.applied_at,
        }

    @classmethod
    def from_map(cls, m: Mapping[str, Any]) -> TransferReceipt:
        _keys(m, "transfer-receipt", ["v", "kind", "device_id", "device_alg", "device_key",
                                      "transfer", "sequence", "state_digest", "licenses",
                                      "applied_at"])
        return cls(
            device_id=_device_id(m["device_id"]), device_key=_pubkey(m),
            transfer=_bytes(m["transfer"], "transfer", maximum=256 * 1024),
            sequence=_uint(m["sequence"], "sequence"),
            state_digest=_bytes(m["state_digest"], "state_digest", 32),
            licenses=_licenses(m["licenses"]), applied_at=_time(m["applied_at"], "applied_at"),
        )


_BY_KIND: dict[Kind, Any] = {
    Kind.REQUEST: Request,
    Kind.RESPONSE: Response,
    Kind.RECEIPT: Receipt,
    Kind.DEVICE_INFO: DeviceInfo,
    Kind.LICENSE_INFO: LicenseInfo,
    Kind.TRUST_UPDATE: TrustUpdate,
    Kind.TRANSFER: Transfer,  # issue 16
    Kind.TRANSFER_RECEIPT: TransferReceipt,
}

P = TypeVar("P", bound=Payload)


@overload
def decode_payload(obj: object, expect: type[P]) -> P: ...
@overload
def decode_payload(obj: object, expect: None = None) -> Payload: ...
def decode_payload(obj: object, expect: type[Payload] | None = None) -> Payload:
    """Turn a decoded payload map into its record; refuse the wrong kind.

    With ``expect``, the result is typed as that payload class (and is one).
    """
    m = _map(obj, "payload")
    v = m.get("v")
    if type(v) is not int or v != FORMAT_VERSION:
        raise MalformedError(f"unsupported format version {v!r} (this agent reads 1)")
    kind = _enum(Kind, m.get("kind"), "kind")
    cls = _BY_KIND[kind]
    if expect is not None and cls is not expect:
        raise MalformedError(f"expected a {expect.KIND.value} file, got a {kind.value} file")
    result: Payload = cls.from_map(m)
    return result


def licenses_from(seq: Sequence[object]) -> tuple[License, ...]:
    return _licenses(list(seq))


"""The licensing server's HTTP API bodies (docs/licensing-api.md): one home for both ends.

``licadmin``'s client (:mod:`apps.licensing_client`) writes the request bodies and reads
the answers; ``licserver serve`` (``simulators/licensing_server``) reads the request
bodies and writes the answers, with the same records, so the two cannot drift apart.
Each record has its encoding and one validating decoder; a body that does not have the
documented shape is a :class:`~agent.errors.MalformedError` (or a ``UsageError`` for a
missing or unknown request field), never a ``KeyError`` further on; an answer's error
reads after "the server answered ...".

The answers are typed records that also read as their documented maps
(:class:`agent.record.WireView`), which is what the JSON and CBOR bodies are.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from agent.cose import canonical
from agent.errors import LicensingError, MalformedError, UsageError
from agent.record import WireView
from agent.rpc import RpcError
from apps.common import parse_time

__all__ = [
    "AssignmentBatch",
    "AssignmentQuery",
    "Confirmation",
    "EntitlementQuery",
    "LicenseInfoQuery",
    "PerDeviceLicenseInfo",
    "UploadAnswer",
    "body_fields",
    "body_files",
    "files_body",
    "refusal",
]


def refusal(err: LicensingError) -> dict[str, Any]:
    """The ``{"code", "reason", "message"}`` of a refusal, as the API writes it."""
    return RpcError.of(err).to_wire()


def body_fields(obj: object, what: str, required: set[str], optional: set[str] | None = None
                ) -> Mapping[str, Any]:
    """A request body as a map with text keys, all of ``required``, none unknown.

    Raises:
        MalformedError: not a map, or a key that is not text.
        UsageError: a field missing or unknown (naming the fields there are).
    """
    optional = optional or set()
    if not isinstance(obj, dict):
        raise MalformedError(f"the body of {what} must be a map")
    keys = {k for k in obj if isinstance(k, str)}
    if len(keys) != len(obj):
        raise MalformedError(f"the body of {what} has a non-text key")
    missing = sorted(required - keys)
    if missing:
        raise UsageError(f"the body of {what} lacks {', '.join(missing)}")
    extra = sorted(keys - required - optional)
    if extra:
        raise UsageError(f"unknown field {', '.join(extra)} in the body of {what} (fields: "
                         f"{', '.join(sorted(required | optional))})")
    return obj


def body_files(obj: Mapping[str, Any], key: str, limit: int, required: bool = True
               ) -> list[bytes]:
    """The list of files (CBOR byte strings) under ``key``, at most ``limit`` of them."""
    if key not in obj:
        if required:
            raise UsageError(f"the body lacks {key!r} (a list of files as byte strings)")
        return []
    v = obj[key]
    if not isinstance(v, list) or not all(isinstance(x, bytes) for x in v):
        raise MalformedError(f"{key!r} must be a list of files (CBOR byte strings)")
    if len(v) > limit:
        raise UsageError(f"{len(v)} files in {key!r}: at most {limit} per call")
    return v


# ---------------------------------------------------------------- POST /v1/license-info


@dataclass(frozen=True)
class LicenseInfoQuery:
    """The body of ``POST /v1/license-info``: a SITE_INFO bundle, whom to answer for, and
    whether each device also gets a file naming only itself."""

    site_info: bytes
    devices: tuple[str, ...] = ()
    per_device: bool = False

    def encode(self) -> bytes:
        body: dict[str, Any] = {"site_info": self.site_info}
        if self.devices:
            body["devices"] = list(self.devices)
        if self.per_device:
            body["per_device"] = True
        return canonical(body)

    @classmethod
    def from_body(cls, obj: object) -> LicenseInfoQuery:
        m = body_fields(obj, "license-info", {"site_info"}, {"devices", "per_device"})
        site = m["site_info"]
        if not isinstance(site, bytes):
            raise MalformedError("site_info must be the SITE_INFO file as a byte string")
        devices = m.get("devices")
        if devices is not None and (not isinstance(devices, list)
                                    or not all(isinstance(d, str) for d in devices)):
            raise MalformedError("devices must be a list of device IDs")
        per_device = m.get("per_device", False)
        if not isinstance(per_device, bool):
            raise MalformedError("per_device must be true or false")
        return cls(site, tuple(devices or ()), per_device)


@dataclass(frozen=True)
class PerDeviceLicenseInfo:
    """The answer to a ``per_device`` query: the site's signed file and each device's own."""

    license_info: bytes
    per_device: dict[str, bytes]

    def encode(self) -> bytes:
        return canonical({"license_info": self.license_info, "per_device": self.per_device})

    @classmethod
    def from_body(cls, obj: object) -> PerDeviceLicenseInfo:
        one = obj.get("per_device") if isinstance(obj, dict) else None
        whole = obj.get("license_info") if isinstance(obj, dict) else None
        if (not isinstance(whole, bytes) or not isinstance(one, dict)
                or not all(isinstance(k, str) and isinstance(v, bytes) for k, v in one.items())):
            raise MalformedError("something other than {license_info: bytes, "
                                 "per_device: {device: bytes}}")
        return cls(whole, dict(one))


# ---------------------------------------------------------------- POST /v1/assignments, /v1/entitlements
# JSON bodies. from_body checks their shape; the values (names, counts, the device ID)
# are the ledger's to check, with the refusals it gives any caller.


@dataclass(frozen=True)
class AssignmentQuery:
    """The body of ``POST /v1/assignments``: COUNT of FEATURE of an entitlement to a device
    (from ``product``, needed only when several products of the entitlement hold it)."""

    entitlement: str
    device_id: str
    feature: str
    count: int
    product: str | None = None

    def encode(self) -> bytes:
        return json.dumps(self.to_map()).encode()

    @classmethod
    def from_body(cls, obj: object) -> AssignmentQuery:
        m = body_fields(obj, "assignments", {"entitlement", "device_id", "feature", "count"},
                        {"product"})
        return cls(m["entitlement"], m["device_id"], m["feature"], m["count"], m.get("product"))

    def to_map(self) -> dict[str, Any]:
        body: dict[str, Any] = {"entitlement": self.entitlement, "device_id": self.device_id,
                                "feature": self.feature, "count": self.count}
        if self.product is not None:
            body["product"] = self.product
        return body


@dataclass(frozen=True)
class AssignmentBatch:
    """The batch form of ``POST /v1/assignments``: ``{"assignments": [* AssignmentQuery]}``,
    made in one ledger transaction, all or none; the answer is ``{"assignments": [...]}``,
    one answer per assignment, in order (the single form's answer each)."""

    assignments: tuple[AssignmentQuery, ...]

    #: the most assignments one call may carry (licadmin refuses more before sending)
    MAX: ClassVar[int] = 50_000

    def encode(self) -> bytes:
        return json.dumps({"assignments": [q.to_map() for q in self.assignments]},
                          separators=(",", ":")).encode()

    @staticmethod
    def is_batch(obj: object) -> bool:
        """Whether a ``POST /v1/assignments`` body is the batch form."""
        return isinstance(obj, dict) and "assignments" in obj

    @classmethod
    def from_body(cls, obj: object) -> AssignmentBatch:
        m = body_fields(obj, "assignments", {"assignments"})
        rows = m["assignments"]
        if not isinstance(rows, list):
            raise MalformedError("assignments must be a list of {entitlement, device_id, "
                                 "feature, count[, product]}")
        if not rows:
            raise UsageError("assignments is empty: nothing to assign")
        if len(rows) > cls.MAX:
            raise UsageError(f"{len(rows)} assignments in one call: at most {cls.MAX}")
        out = []
        for i, row in enumerate(rows, 1):
            try:
                out.append(AssignmentQuery.from_body(row))
            except (MalformedError, UsageError) as err:
                raise type(err)(f"assignment #{i}: {err}") from None
        return cls(tuple(out))

    @staticmethod
    def answers(obj: object, n: int) -> list[dict[str, Any]]:
        """The answer ``{"assignments": [n objects]}``; MalformedError otherwise."""
        rows = obj.get("assignments") if isinstance(obj, dict) else None
        if (not isinstance(rows, list) or len(rows) != n
                or not all(isinstance(r, dict) for r in rows)):
            raise MalformedError(f"something other than {{assignments: [{n} objects]}}")
        return rows


@dataclass(frozen=True)
class EntitlementQuery:
    """The body of ``POST /v1/entitlements``: a purchase of ``features`` (name -> count) for a
    product of an entitlement, ending ``until`` (ISO 8601 text; None: perpetual)."""

    entitlement: str
    product: str
    features: dict[str, int]
    until: str | None = None

    def encode(self) -> bytes:
        return json.dumps({"entitlement": self.entitlement, "product": self.product,
                           "features": dict(self.features), "until": self.until}).encode()

    @classmethod
    def from_body(cls, obj: object) -> EntitlementQuery:
        m = body_fields(obj, "entitlements", {"entitlement", "product", "features"}, {"until"})
        features = m["features"]
        if not isinstance(features, dict):
            raise UsageError('features must be an object {"FEATURE": COUNT, ...}')
        until = m.get("until")
        if until is not None and not isinstance(until, str):
            raise UsageError("until must be an ISO 8601 date or date-time, or null")
        return cls(m["entitlement"], m["product"], features, until)

    def until_time(self) -> int | None:
        """``until`` in POSIX seconds (None, or empty text: perpetual); UsageError if unreadable."""
        return parse_time(self.until) if self.until else None


# ---------------------------------------------------------------- receipts and requests


def _maps(obj: object, what: str) -> list[dict[str, Any]]:
    if not isinstance(obj, list) or not all(isinstance(x, dict) for x in obj):
        raise MalformedError(f"a body whose {what} is not a list of objects")
    return list(obj)


@dataclass
class Confirmation(WireView):
    """The answer of ``POST /v1/receipts`` (and the ``receipts`` of an upload).

    ``accepted``: ``[{"device_id", "sequence", "freed": [{"feature", "count"}]}]``;
    ``refused``: ``[{"index", "code", "reason", "message"}]``, ``index`` being the
    receipt's position in what was sent.
    """

    KEYS: ClassVar[tuple[str, ...]] = ("accepted", "refused")
    accepted: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)

    def accept(self, device_id: str, sequence: int, freed: Iterable[tuple[str, int]]) -> None:
        self.accepted.append({"device_id": device_id, "sequence": sequence,
                              "freed": [{"feature": f, "count": c} for f, c in freed]})

    def refuse(self, index: int, err: LicensingError) -> None:
        self.refused.append({"index": index, **refusal(err)})

    def merge(self, part: Confirmation, offset: int) -> None:
        """Add the answer to a batch that started at receipt ``offset``."""
        self.accepted.extend(part.accepted)
        self.refused.extend({**r, "index": int(r.get("index", 0)) + offset}
                            for r in part.refused)

    @classmethod
    def from_body(cls, obj: object) -> Confirmation:
        if not isinstance(obj, dict):
            raise MalformedError("something other than an object")
        refused = _maps(obj.get("refused", []), "refused")
        if not all(type(r.get("index", 0)) is int for r in refused):
            raise MalformedError("a refused receipt whose index is not a whole number")
        return cls(_maps(obj.get("accepted", []), "accepted"), refused)


@dataclass
class UploadAnswer(WireView):
    """The answer of ``POST /v1/requests``.

    ``responses``: ``{device_id: signed response file}``; ``errors``: ``{key: {"code",
    "reason", "message"}}`` where ``key`` is the device ID of a request that verified,
    else ``"#INDEX"`` (its position in what was sent); ``receipts``: the verdicts on the
    receipts that came along (confirmed before any request was answered).
    """

    KEYS: ClassVar[tuple[str, ...]] = ("responses", "errors", "receipts")
    responses: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    receipts: Confirmation = field(default_factory=Confirmation)

    def to_wire(self) -> dict[str, Any]:
        """The documented map, the nested :class:`Confirmation` as its map too."""
        return {**super().to_wire(), "receipts": self.receipts.to_wire()}


    def merge(self, part: UploadAnswer, offset: int) -> None:
        """Add the answer to a batch of requests that started at request ``offset``."""
        self.responses.update(part.responses)
        for key, err in part.errors.items():
            if key.startswith("#") and key[1:].isdigit():
                key = f"#{int(key[1:]) + offset}"  # its position in the whole upload
            self.errors[key] = err

    @classmethod
    def from_body(cls, obj: object) -> UploadAnswer:
        if not isinstance(obj, dict):
            raise MalformedError("something other than a map")
        responses, errors = obj.get("responses", {}), obj.get("errors", {})
        if not isinstance(responses, dict) or not all(
                isinstance(k, str) and isinstance(v, bytes) for k, v in responses.items()):
            raise MalformedError("responses other than {device ID: response file}")
        if not isinstance(errors, dict) or not all(
                isinstance(k, str) and isinstance(v, dict) for k, v in errors.items()):
            raise MalformedError("errors other than {key: refusal}")
        return cls(dict(responses), dict(errors),
                   Confirmation.from_body(obj.get("receipts", {})))


def files_body(key: str, files: Sequence[bytes]) -> bytes:
    """``{"requests": [...]}`` or ``{"receipts": [...]}``: files as CBOR byte strings."""
    return canonical({key: [bytes(f) for f in files]})

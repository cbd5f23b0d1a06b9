"""The vendor's signing side: turns verified device requests into signed responses.

:class:`Vendor` is also the signing simulator the tests use to stage attacks
(python-tuf's RepositorySimulator idea): sign for another device, late, stale,
with the wrong key, by overriding fields of an otherwise correct response.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.cose import PublicKey, SigningKey, decode_sign1, sign1, strict_loads
from agent.errors import MalformedError, TrustError, UsageError
from agent.messages import (
    Action,
    ChangeOp,
    License,
    LicenseChange,
    LicenseInfo,
    LicenseInfoEntry,
    Payload,
    Request,
    Response,
    Revocation,
    TrustKey,
    TrustUpdate,
    decode_payload,
    state_digest,
)
from agent.protocol import self_signed_payload

__all__ = ["DAY", "Grant", "Vendor"]

DAY = 86400


@dataclass(frozen=True)
class Grant:
    """FEATURE=COUNT[@EXPIRY] from the command line."""

    feature: str
    count: int
    not_after: int | None = None
    not_before: int | None = None
    grace: int = 0
    floating: bool = False  # issue 15: served as COUNT floating seats by the device
    inherit: int = 0  # issue 14: child servers that may inherit it
    demo: bool = False
    transferable: bool = False  # issue 16: --transferable at issue


class Vendor:
    """Signs responses, license information and trust updates with one vendor key."""

    def __init__(self, key: SigningKey) -> None:
        self.key = key

    @property
    def public(self) -> PublicKey:
        return self.key.public

    @staticmethod
    def read_request(data: bytes) -> Request:
        """Verify a request file (signed by the device key it carries) and decode it."""
        payload, _key = self_signed_payload(data, Request)
        if state_digest(payload.licenses) != payload.state_digest:
            raise MalformedError("request's license list does not match its state digest")
        return payload

    @staticmethod
    def read_response(data: bytes, key: PublicKey) -> Response:
        """Issue 16: verify a response file with this vendor key (a transfer's evidence)."""
        env = decode_sign1(data, max_size=64 * 1024)
        if env.kid != key.kid:
            raise TrustError("the evidence is not signed by this vendor's key")
        return decode_payload(strict_loads(env.verify_with(key), max_size=64 * 1024), Response)

    def changes_for(
        self, req: Request, grants: Iterable[Grant], removes: Iterable[str]
    ) -> tuple[LicenseChange, ...]:
        installed = {lic.feature: lic for lic in req.licenses}
        changes: list[LicenseChange] = []
        for g in grants:
            op = ChangeOp.UPDATE if g.feature in installed else ChangeOp.ADD
            changes.append(LicenseChange(op, g.feature, g.count, g.not_before, g.not_after,
                                         g.grace, floating=g.floating, inherit=g.inherit,
                                         demo=g.demo, transferable=g.transferable))
        rem = list(removes)
        if not changes and not rem and req.action is Action.RECLAIM:
            rem = list(req.features) or list(installed)
        for f in rem:
            if f not in installed:
                raise UsageError(f"cannot remove {f}: the device does not have it installed")
            changes.append(LicenseChange(ChangeOp.REMOVE, f))
        if not changes:
            raise UsageError("nothing to issue: give --grant FEATURE=COUNT or --remove FEATURE")
        return tuple(changes)

    def response_for(
        self,
        req: Request,
        changes: Iterable[LicenseChange],
        now: int,
        valid_for: int = 30 * DAY,
        **overrides: Any,
    ) -> Response:
        """The correct response to ``req``; ``overrides`` replace fields (to stage attacks)."""
        fields: dict[str, Any] = dict(
            device_id=req.device_id,
            nonce=req.nonce,
            base_sequence=req.sequence,
            base_digest=req.state_digest,
            sequence=req.sequence + 1,
            changes=tuple(changes),
            issued=now,
            not_before=max(0, now - 300),
            expires=now + valid_for,
        )
        fields.update(overrides)
        if "base_sequence" in overrides and "sequence" not in overrides:
            fields["sequence"] = fields["base_sequence"] + 1
        return Response(**fields)

    def sign(self, payload: Payload) -> bytes:
        return sign1(payload.encode(), self.key, payload.KIND.content_type)

    def issue(
        self, request: bytes, grants: Iterable[Grant] = (), removes: Iterable[str] = (),
        now: int = 0, valid_for: int = 30 * DAY,
    ) -> bytes:
        req = self.read_request(request)
        if req.action is Action.CLOCK:  # issue 16: the certified time, nothing else
            return self.sign(self.response_for(req, (), now, valid_for, time=now))
        return self.sign(self.response_for(req, self.changes_for(req, grants, removes), now,
                                           valid_for))

    def trust_update(self, keys: Iterable[TrustKey], version: int, now: int) -> bytes:
        return self.sign(TrustUpdate(version=version, keys=tuple(keys), issued=now))

    def license_info(
        self, entries: Mapping[str, tuple[Iterable[License], Iterable[License]]], now: int,
        valid_for: int = 30 * DAY, revoked: tuple[Revocation, ...] = (),
    ) -> bytes:
        """Sign license information: per device ID, (licenses to reclaim, licenses to install)."""
        info = LicenseInfo(
            entries=tuple(
                LicenseInfoEntry(dev, tuple(sorted(rc)), tuple(sorted(inst)))
                for dev, (rc, inst) in sorted(entries.items())
            ),
            issued=now,
            expires=now + valid_for,
            revoked=revoked,  # issue 16
        )
        return self.sign(info)

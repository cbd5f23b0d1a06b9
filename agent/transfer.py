"""Direct transfer at the site (issue 16, item 2): the device's decisions, no I/O.

A license issued transferable (``"transferable": true``) may move from one server to
another named server without a trip to the vendor:

* :func:`transfer_out` (old server): remove the licenses, move one link along its own
  chain, and sign a ``transfer`` file naming the new server, carrying the vendor
  response that installed each license (the evidence) and a fresh ``id``.
* :func:`apply_transfer` (new server): verify the old server's signature, that it is
  the named server, the vendor's signature on each evidence (for the old server, with
  exactly that license), that the ``id`` was never applied here; install the licenses,
  move one link, and sign a ``transfer-receipt``.

Both files are receipts: the vendor reconciles the move from them later (``licadmin
confirm``). A license received by transfer carries no evidence here, so it moves on
only through the vendor (a rehost).
"""

from __future__ import annotations

from agent.cose import SigningKey, sign1
from agent.errors import (
    AlreadyAppliedError,
    ClockSetBackError,
    LicensingError,
    MalformedError,
    RevokedError,
    TrustError,
    UsageError,
    WrongDeviceError,
)
from agent.messages import (
    MAX_LIST,
    NONCE_LEN,
    ChangeOp,
    Kind,
    License,
    Response,
    Transfer,
    TransferReceipt,
    sort_licenses,
    state_digest,
)
from agent.protocol import (
    DEFAULT_LIMITS,
    AgentState,
    Limits,
    _iso,
    clock_set_back,
    clock_set_back_message,
    revoked_message,
    self_signed_payload,
    verify_vendor_file,
)
from agent.record import replace

__all__ = ["MAX_TRANSFERS_IN", "apply_transfer", "applied_before", "transfer_out",
           "transferred_before"]

#: transfers remembered on the new server (each applies once); beyond it, the vendor's way
MAX_TRANSFERS_IN = 256


def transfer_out(state: AgentState, features: list[str], to: str, tid: bytes, now: int,
                 key: SigningKey, limits: Limits = DEFAULT_LIMITS
                 ) -> tuple[AgentState, bytes, Transfer]:
    """Remove transferable licenses for the server ``to``; the new state and the signed file.

    Raises:
        UsageError: nothing named, a feature not installed, not transferable, or received
            by transfer; ``to`` this device itself.
        RevokedError, ClockSetBackError: this device is revoked, or its clock set back.
    """
    if len(tid) != NONCE_LEN:
        raise UsageError(f"transfer id must be {NONCE_LEN} bytes")
    if key.public != state.device_key:
        raise UsageError("signing key does not belong to this device")
    if state.extra.get("revoked"):
        raise RevokedError(revoked_message(state))
    if clock_set_back(state, now, limits):
        raise ClockSetBackError(clock_set_back_message(state, now))
    if to == state.device_id:
        raise UsageError("--to names this device itself: give the new server's device ID")
    feats = list(dict.fromkeys(features))
    if not feats:
        raise UsageError("name the licenses to transfer: --feature F (repeat for each)")
    have = {lic.feature: lic for lic in state.licenses}
    evidence = dict(state.evidence)
    moved: list[License] = []
    for f in feats:
        lic = have.get(f)
        if lic is None:
            raise UsageError(f"cannot transfer {f}: not installed on this device")
        if not lic.transferable:
            raise UsageError(f"cannot transfer {f}: its license was not issued transferable "
                             "(move it with licadmin rehost, through the licensing server)")
        if f not in evidence:
            raise UsageError(f"cannot transfer {f}: it came here by transfer; it moves on only "
                             "through the licensing server (licadmin rehost)")
        moved.append(lic)
    left = sort_licenses(lic for lic in state.licenses if lic.feature not in feats)
    seq = state.sequence + 1
    t = Transfer(device_id=state.device_id, device_key=state.device_key, transfer_to=to,
                 id=tid, moved=sort_licenses(moved),
                 evidence=tuple(evidence[lic.feature] for lic in sort_licenses(moved)),
                 sequence=seq, state_digest=state_digest(left), licenses=left, created=now)
    data = sign1(t.encode(), key, Kind.TRANSFER.content_type)
    new = replace(state, sequence=seq, licenses=left, outstanding=(), dropped=(),
                  last_receipt=data, clock_hwm=max(state.clock_hwm, now),
                  evidence=tuple((f, e) for f, e in state.evidence if f not in feats))
    return new, data, t


def _check_evidence(state: AgentState, t: Transfer, lic: License, ev: bytes, now: int,
                    limits: Limits) -> None:
    resp, _env = verify_vendor_file(state, ev, now, Response, limits)
    if resp.device_id != t.device_id:
        raise TrustError(f"the evidence of {lic.feature} was issued to device "
                         f"{resp.device_id[:12]}…, not to the sender {t.device_id[:12]}…")
    ch = next((c for c in resp.changes if c.feature == lic.feature), None)
    if ch is None or ch.op is ChangeOp.REMOVE or ch.license() != lic:
        raise TrustError(f"the evidence does not install {lic.feature} as transferred")
    if not lic.transferable:
        raise TrustError(f"{lic.feature} was not issued transferable")


def apply_transfer(state: AgentState, data: bytes, now: int, key: SigningKey,
                   limits: Limits = DEFAULT_LIMITS
                   ) -> tuple[AgentState, bytes, Transfer]:
    """Verify a transfer file and install its licenses here; the new state and the receipt.

    Raises:
        MalformedError, TrustError: not a genuine transfer, or evidence not the vendor's.
        WrongDeviceError: the transfer names another server.
        AlreadyAppliedError: this transfer was applied here.
        UsageError: a feature already installed here, or too many transfers.
        RevokedError, ClockSetBackError: as for a response.
    """
    lim = replace(limits, max_file=max(limits.max_file, 256 * 1024))
    t, _k = self_signed_payload(data, Transfer, lim)
    if t.transfer_to != state.device_id:
        raise WrongDeviceError(f"transfer is for device {t.transfer_to[:12]}…, this device is "
                               f"{state.device_id[:12]}…")
    if t.id in state.transfers_in:
        raise AlreadyAppliedError(f"transfer {t.id.hex()[:12]}… from device "
                                  f"{t.device_id[:12]}… was already applied here")
    if state.extra.get("revoked"):
        raise RevokedError(revoked_message(state))
    if clock_set_back(state, now, limits):
        raise ClockSetBackError(clock_set_back_message(state, now))
    for lic, ev in zip(t.moved, t.evidence, strict=True):
        _check_evidence(state, t, lic, ev, now, limits)
        if lic.not_after is not None and max(now, state.clock_hwm) > lic.not_after + lic.grace:
            raise MalformedError(f"{lic.feature} expired at {_iso(lic.not_after)}")
    have = {lic.feature for lic in state.licenses}
    clash = sorted(have.intersection(lic.feature for lic in t.moved))
    if clash:
        raise UsageError(f"this device already holds {', '.join(clash)}: a transfer adds "
                         "licenses, it does not merge them (reclaim them here first)")
    if len(state.transfers_in) >= MAX_TRANSFERS_IN:
        raise UsageError(f"{MAX_TRANSFERS_IN} transfers were applied here; move licenses "
                         "through the licensing server (licadmin rehost)")
    licenses = sort_licenses((*state.licenses, *t.moved))
    if len(licenses) > MAX_LIST:
        raise MalformedError(f"the transfer would leave {len(licenses)} licenses installed")
    seq = state.sequence + 1
    rc = TransferReceipt(device_id=state.device_id, device_key=state.device_key,
                         transfer=data, sequence=seq, state_digest=state_digest(licenses),
                         licenses=licenses, applied_at=now)
    receipt = sign1(rc.encode(), key, Kind.TRANSFER_RECEIPT.content_type)
    new = replace(state, sequence=seq, licenses=licenses, outstanding=(), dropped=(),
                  last_receipt=receipt, clock_hwm=max(state.clock_hwm, now),
                  transfers_in=(*state.transfers_in, t.id))
    return new, receipt, t


def _file_limits(limits: Limits) -> Limits:
    return replace(limits, max_file=max(limits.max_file, 256 * 1024))


def transferred_before(state: AgentState, features: list[str], to: str,
                       limits: Limits = DEFAULT_LIMITS) -> bytes | None:
    """The transfer file this device signed last, if it moved exactly ``features`` to ``to``.

    A transfer asked again (``licadmin transfer`` rerun after the old server's answer was
    lost) gets the same file back, so the licenses are never stranded: the file is the
    device's last receipt, and none of the features is installed any more.
    """
    feats = set(features)
    if not state.last_receipt or not feats or any(lic.feature in feats
                                                  for lic in state.licenses):
        return None
    try:
        t, _k = self_signed_payload(state.last_receipt, Transfer, _file_limits(limits))
    except LicensingError:
        return None  # the last receipt is of another kind: no transfer to hand back
    if (t.device_id != state.device_id or t.transfer_to != to
            or {lic.feature for lic in t.moved} != feats):
        return None
    return state.last_receipt


def applied_before(state: AgentState, data: bytes,
                   limits: Limits = DEFAULT_LIMITS) -> tuple[bytes, Transfer] | None:
    """The transfer receipt this device signed last and its transfer, if it was for exactly
    ``data``.

    A transfer applies once; asked again while its receipt is still the last one (the
    answer was lost), the same receipt is handed back instead of a refusal.
    """
    if not state.last_receipt:
        return None
    try:
        rc, _k = self_signed_payload(state.last_receipt, TransferReceipt, _file_limits(limits))
    except LicensingError:
        return None
    if rc.device_id != state.device_id or rc.transfer != data:
        return None
    t, _k = self_signed_payload(data, Transfer, _file_limits(limits))
    return state.last_receipt, t

"""The agent's operations on one state directory: the pure protocol joined to the store.

This is the layer the ``licagent`` CLI and (later) the daemon call. Each
operation takes the store lock, loads the last good state, checks the
hardware binding, runs the pure protocol step and persists the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent import protocol
from agent.cose import PublicKey, SigningKey
from agent.durable import FileOps
from agent.errors import ExpiredError, LicensingError, RevokedError, StorageError, UsageError
from agent.formats import iso
from agent.identity import FactsProvider, HardwareFacts, host_id, require_identifying
from agent.journal import JournalReport
from agent.messages import Action, LicenseInfo, Revocation, TrustKey, TrustUpdate, revocation_of
from agent.protocol import DEFAULT_LIMITS, ApplyResult, CheckResult, Limits
from agent.record import record, replace
from agent.store import KeptLock, OpenStore, Store, store_lock

__all__ = ["Agent", "status_dict"]

MODELS = ("AS-P", "AS-B", "Edge-Server")


def status_dict(state: protocol.AgentState, now: int, warnings: Iterable[str] = ()) -> dict[str, Any]:
    """The JSON of ``licagent status --json`` (and ``licadmin status --json``)."""
    latest = max(now, state.clock_hwm)  # as check_feature: a clock set back gains nothing
    return {
        "device_id": state.device_id,
        "model": state.model,
        "serial": state.serial,
        "sequence": state.sequence,
        "state_digest": state.digest.hex(),
        "licenses": [
            {
                "feature": lic.feature,
                "count": lic.count,
                "not_before": iso(lic.not_before),
                "not_after": iso(lic.not_after),
                "grace_seconds": lic.grace,
                "licensed_now": protocol.licensed_at(lic, latest),
            }
            for lic in state.licenses
        ],
        "outstanding_requests": [
            {"nonce": o.nonce.hex(), "action": o.action.value, "features": list(o.features),
             "sequence": o.sequence, "created": iso(o.created),
             **({"origin": o.origin} if o.origin is not None else {})}
            for o in state.outstanding
        ],
        "trusted_keys": [
            {"kid": k.kid.hex(), "alg": k.key.alg_name, "not_before": iso(k.not_before),
             "not_after": iso(k.not_after)}
            for k in state.trust
        ],
        "clock_high_water": iso(state.clock_hwm),
        "clock_set_back": protocol.clock_set_back(state, now),
        "warnings": list(warnings) + ([protocol.revoked_message(state)]  # issue 16
                                      if state.extra.get("revoked") else []),
    }


def _wall_clock() -> int:
    return int(time.time())


@record
class Agent:
    """Operations on the license store in ``directory``.

    Args:
        directory: the state directory.
        facts: where hardware facts come from (``hw.facts`` providers).
        clock: returns POSIX seconds; the only source of time.
        ops: file syscalls (fault injection in tests).
        keep_open: keep the opened store between operations (the daemon): each
            operation, under the store lock, compares the files with what they held
            after the last one (:class:`agent.store.OpenStore`) and opens the store
            from scratch only if another process changed them.
    """

    directory: Path
    facts: FactsProvider
    clock: Callable[[], int] = _wall_clock
    ops: FileOps | None = None
    limits: Limits = DEFAULT_LIMITS
    keep_open: bool = False

    def hardware(self) -> HardwareFacts:
        return self.facts.read()

    @contextmanager
    def _open(self) -> Iterator[tuple[Store, int]]:
        now = self.clock()
        lock = store_lock(self.directory)
        if self.keep_open:  # the lock file stays open too (verified after each flock)
            kept_lock: KeptLock | None = self.__dict__.get("_lock")
            if kept_lock is None:
                kept_lock = self.__dict__.setdefault("_lock", KeptLock(self.directory))
            lock = kept_lock.hold()
        with lock as writable:
            if not self.keep_open:
                yield Store.open(
                    self.directory, self.hardware().binding_facts(), ops=self.ops, now=now,
                    facts_simulated=self.facts.simulated, writable=writable,
                    limits=self.limits,
                ), now
                return
            kept: OpenStore | None = self.__dict__.pop("_kept", None)
            store = kept.reuse(writable) if kept is not None else None
            facts = self.hardware().binding_facts()
            if store is None:
                store = Store.open(
                    self.directory, facts, ops=self.ops, now=now,
                    facts_simulated=self.facts.simulated, writable=writable, limits=self.limits,
                )
                # a store whose opening warned (a damaged copy, a replay) is not kept: the
                # next operation opens it again and says so again, as a fresh process would
                clean = not store.report.warnings
            else:
                # the files are byte for byte those a fresh open read: the facts' source
                # and the binding are checked again, as Store.open does each time
                store.check_hardware(facts, self.facts.simulated, now)
                clean = True
            yield store, now
            # only after a whole operation (an exception drops the kept store: the next
            # operation opens from scratch), with the lock still held
            if clean:
                self.__dict__["_kept"] = (kept.after(store) if kept is not None
                                          else OpenStore.snapshot(store))

    # ------------------------------------------------------------ operations

    def init(self, model: str, serial: str | None, trust: Iterable[PublicKey],
             alg: int | None = None) -> Store:
        now = self.clock()
        hw = self.hardware()
        if hw.model and hw.model != model:
            raise UsageError(f"the hardware reports model {hw.model}, not {model}")
        if model not in MODELS:
            raise UsageError(f"unknown model {model!r}: one of {', '.join(MODELS)}")
        # Bind only to what the hardware itself reports, so that every later read agrees;
        # a serial typed at provisioning names the device but is no hardware fact.
        hw = replace(hw, model=model)
        require_identifying(hw.binding_facts(), self.facts.origin)
        key = SigningKey.generate() if alg is None else SigningKey.generate(alg)
        state = protocol.new_state(
            key.public, model, serial or hw.serial, hw.binding_facts(),
            [TrustKey(k) for k in trust], now, simulated=self.facts.simulated,
        )
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise StorageError(f"cannot create the store folder {self.directory}: "
                               f"{exc.strerror or exc}") from exc
        with store_lock(self.directory):
            return Store.create(self.directory, key, state, self.ops)

    def state(self) -> tuple[protocol.AgentState, list[str], int]:
        with self._open() as (store, now):
            return store.state, store.report.warnings, now

    def status(self) -> dict[str, Any]:
        st, warnings, now = self.state()
        return status_dict(st, now, warnings)

    def info(self) -> tuple[bytes, Any]:
        with self._open() as (store, now):
            hw = self.hardware()
            hw_map = hw.as_dict()
            hw_map["model"] = store.state.model
            data, info = protocol.make_device_info(
                store.state, hw_map, host_id(store.state.binding), now, store.key
            )
            return data, info

    def request(self, action: Action, features: Iterable[str], origin: str | None = None,
                transfer_to: str | None = None) -> bytes:
        """Sign a request and keep it outstanding; ``origin`` names the peer that asked
        (:class:`agent.protocol.Outstanding`), None for the local command line;
        ``transfer_to`` (issue 16): a reclaim whose licenses move to that device."""
        with self._open() as (store, now):
            store.require_writable("create a request")
            new, data, req = protocol.create_request(
                store.state, action, features, os.urandom(16), now, store.key, self.limits,
                origin, transfer_to,
            )
            store.commit(new, "request", {"action": action.value, "nonce": req.nonce.hex(),
                                          "sequence": req.sequence,
                                          "features": list(req.features),
                                          **({"origin": origin} if origin else {}),
                                          **({"transfer_to": transfer_to} if transfer_to
                                             else {})}, now)
            return data

    def apply(self, data: bytes) -> tuple[ApplyResult, str | None]:
        """Verify and apply a response; returns the result and a journal warning if any."""
        with self._open() as (store, now):
            store.require_writable("apply a response")
            try:
                res = protocol.apply_response(store.state, data, now, store.key, self.limits)
            except LicensingError as err:
                store.record_refusal(err, "apply", now)
                raise
            if res.already_applied:
                try:
                    store.journal.append("reapply", {"sequence": res.response.sequence}, now)
                except LicensingError:
                    pass
                return res, None
            warn = store.commit(res.state, "apply", {
                "sequence": res.state.sequence,
                "nonce": res.response.nonce.hex(),
                "response_digest": res.state.applied[-1].response_digest.hex(),
                "state_digest": res.state.digest.hex(),
                "changes": [c.to_cbor() for c in res.response.changes],
                "removed": [lic.feature for lic in res.removed],
                "response": data,  # what a replay after a crash redoes (protocol.replay_event)
                # issue 16: a vendor-certified time moved the clock mark (maybe back)
                **({"clock_hwm": {"from": iso(store.state.clock_hwm),
                                  "to": iso(res.state.clock_hwm)}}
                   if res.response.time is not None else {}),
            }, now)
            return res, warn

    def check(self, feature: str) -> CheckResult:
        """Is ``feature`` licensed now? Moves the clock mark when the answer depended on it.

        The mark is committed (a ``clock`` journal record, then the slot) whenever the
        answer at ``now`` differs from the answer at the mark (a license seen expired),
        and at most hourly otherwise. If it cannot be saved (a read-only file system, a
        full disk) the answer stands and says so in ``warnings``.
        """
        with self._open() as (store, now):
            res = protocol.check_feature(store.state, feature, now, self.limits)
            edge = protocol.clock_edge(store.state, feature, now, self.limits)
            new, persist = protocol.observe_clock(store.state, now, self.limits)
            if edge is not None:
                new, persist = replace(store.state, clock_hwm=now), True
            if not persist:
                return res
            detail: dict[str, Any] = {"clock_hwm": now}
            if edge is not None:
                detail |= {"feature": feature, "decided": edge}
            why = (f"{self.directory} is on a read-only file system" if not store.writable
                   else "")
            if store.writable:
                try:
                    store.commit(new, "clock", detail, now)
                except StorageError as exc:
                    why = str(exc)
            if why:
                return replace(res, warnings=(
                    f"the clock high-water mark ({iso(now)}) could not be saved: {why}",))
            return res

    def trust_update(self, data: bytes) -> TrustUpdate:
        with self._open() as (store, now):
            store.require_writable("install a trust update")
            try:
                new, upd = protocol.apply_trust_update(store.state, data, now, self.limits)
            except LicensingError as err:
                store.record_refusal(err, "trust-update", now)
                raise
            store.commit(new, "trust-update", {"version": upd.version,
                                               "kids": [k.kid.hex() for k in upd.keys],
                                               "update": data}, now)
            return upd

    def features_from_license_info(self, data: bytes, action: Action) -> list[str]:
        """This device's features in vendor-signed license information (reclaim or install list).

        Raises:
            UsageError: the license information names nothing for this device.
        """
        with self._open() as (store, now):
            lim = replace(self.limits, max_file=16 * 1024 * 1024)
            info, _env = protocol.verify_vendor_file(store.state, data, now, LicenseInfo, lim)
            self._drop_if_revoked(store, info.revoked, now)  # issue 16
            if now > info.expires:
                raise ExpiredError(f"license information expired at {iso(info.expires)}")
            entry = info.for_device(store.state.device_id)
            if entry is None:
                raise UsageError(
                    f"license information names nothing for device {store.state.device_id[:12]}…"
                )
            lics = entry.reclaim if action is Action.RECLAIM else entry.install
            return [lic.feature for lic in lics]

    def transfer_out(self, features: Iterable[str], to: str) -> bytes:
        """Issue 16: remove transferable licenses for the server ``to``; the signed transfer
        file (also kept as the last receipt)."""
        from agent.transfer import transfer_out

        with self._open() as (store, now):
            store.require_writable("transfer licenses")
            try:
                new, data, t = transfer_out(store.state, list(features), to, os.urandom(16),
                                            now, store.key, self.limits)
            except LicensingError as err:
                store.record_refusal(err, "transfer-out", now)
                raise
            store.commit(new, "transfer-out", {
                "features": [lic.feature for lic in t.moved], "to": to, "id": t.id.hex(),
                "sequence": new.sequence, "state_digest": new.digest.hex()}, now)
            return data

    def apply_transfer(self, data: bytes) -> tuple[bytes, Any]:
        """Issue 16: verify and apply a transfer file; the signed transfer-receipt and the
        transfer."""
        from agent.transfer import apply_transfer

        with self._open() as (store, now):
            store.require_writable("apply a transfer")
            try:
                new, receipt, t = apply_transfer(store.state, data, now, store.key, self.limits)
            except LicensingError as err:
                store.record_refusal(err, "transfer-in", now)
                raise
            store.commit(new, "transfer-in", {
                "from": t.device_id, "features": [lic.feature for lic in t.moved],
                "id": t.id.hex(), "transfer": data, "sequence": new.sequence,
                "state_digest": new.digest.hex()}, now)
            return receipt, t

    @staticmethod
    def _drop_if_revoked(store: Store, revoked: Iterable[Revocation], now: int) -> None:
        """Issue 16: a verified vendor file says this device is dead: drop its licenses
        (journalled) and refuse with why. A device already revoked refuses again."""
        rev = revocation_of(revoked, store.state.device_id)
        if rev is None:
            return
        new = store.state
        if not new.extra.get("revoked"):
            store.require_writable("drop the licenses of a revoked device")
            dropped = [lic.feature for lic in new.licenses]
            new = protocol.revoke(new, rev)
            store.commit(new, "revoked",
                         {"at": rev.revoked_at, "reason": rev.reason, "dropped": dropped}, now)
        raise RevokedError(protocol.revoked_message(new))

    def journal(self, entries: bool = True) -> JournalReport:
        """The verified journal; ``entries=False`` verifies it all and keeps only the count."""
        with self._open() as (store, _now):
            return store.journal.read(entries)

"""The agent's operations on one state directory: the pure protocol joined to the store.

This is the layer the ``licagent`` CLI and (later) the daemon call. Each
operation takes the store lock, loads the last good state, checks the
hardware binding, runs the pure protocol step and persists the result.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

from agent import protocol, seats, tree
from agent.cose import PublicKey, SigningKey
from agent.durable import FileOps
from agent.errors import ExpiredError, LicensingError, RevokedError, StorageError, UsageError
from agent.formats import iso
from agent.identity import FactsProvider, HardwareFacts, host_id, require_identifying
from agent.journal import JournalReport
from agent.messages import (
    Action,
    DeviceInfo,
    LicenseInfo,
    Revocation,
    TrustKey,
    TrustUpdate,
    revocation_of,
)
from agent.protocol import DEFAULT_LIMITS, ApplyResult, CheckResult, Limits
from agent.record import record, replace
from agent.store import KeptLock, OpenStore, Store, store_lock

__all__ = ["Agent", "status_dict"]

MODELS = ("AS-P", "AS-B", "Edge-Server", "Enterprise-Server")


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
                "source": "own",  # issue 14: own, or inherited (below)
            }
            for lic in state.licenses
        ] + _inherited_status(state, now),
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


def _inherited_status(state: protocol.AgentState, now: int) -> list[dict[str, Any]]:
    if not state.system.inherited:
        return []
    from agent import inherit

    return inherit.status_licenses(state, now)


def _wall_clock() -> int:
    return int(time.time())


class _KeptOperation:
    """One operation of an agent that keeps its store open (the daemon): the lock file
    stays open too (verified after each flock), and the store is reused while its files
    hold what they held after the last operation (:class:`agent.store.OpenStore`).

    A class rather than a generator: it is on each of the daemon's requests.
    """

    __slots__ = ("agent", "clean", "kept", "lock", "store")

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def __enter__(self) -> tuple[Store, int]:
        agent = self.agent
        now = agent.clock()
        held = agent.__dict__
        lock: KeptLock | None = held.get("_lock")
        if lock is None:
            lock = held.setdefault("_lock", KeptLock(agent.directory))
        writable = lock.acquire()
        try:
            kept: OpenStore | None = held.pop("_kept", None)
            store = kept.reuse(writable) if kept is not None else None
            facts = agent.hardware().binding_facts()
            if store is None:
                store = Store.open(
                    agent.directory, facts, ops=agent.ops, now=now,
                    facts_simulated=agent.facts.simulated, writable=writable,
                    limits=agent.limits,
                )
                # a store whose opening warned (a damaged copy, a replay) is not kept: the
                # next operation opens it again and says so again, as a fresh process would
                clean = not store.report.warnings
            else:
                # the files are byte for byte those a fresh open read: the facts' source
                # and the binding are checked again, as Store.open does each time
                store.check_hardware(facts, agent.facts.simulated, now)
                clean = True
        except BaseException:
            lock.release()
            raise
        self.lock, self.kept, self.store, self.clean = lock, kept, store, clean
        return store, now

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            # only after a whole operation (an exception drops the kept store: the next
            # operation opens from scratch), with the lock still held
            if exc_type is None and self.clean:
                kept, store = self.kept, self.store
                self.agent.__dict__["_kept"] = (kept.after(store) if kept is not None
                                                else OpenStore.snapshot(store))
        finally:
            self.lock.release()


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

    def _open(self) -> AbstractContextManager[tuple[Store, int]]:
        """``with self._open() as (store, now)``: the store under its lock for one operation."""
        if self.keep_open:
            return _KeptOperation(self)
        return self._open_fresh()

    @contextmanager
    def _open_fresh(self) -> Iterator[tuple[Store, int]]:
        now = self.clock()
        with store_lock(self.directory) as writable:
            yield Store.open(
                self.directory, self.hardware().binding_facts(), ops=self.ops, now=now,
                facts_simulated=self.facts.simulated, writable=writable, limits=self.limits,
            ), now

    # ------------------------------------------------------------ operations

    def init(self, model: str, serial: str | None, trust: Iterable[PublicKey],
             alg: int | None = None, key_store: str | None = None) -> Store:
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
        key: SigningKey
        if key_store is not None:  # issue 16 item 6: the key is made inside a TPM (ES256)
            from agent.store import KEY_FILE, TPM_FILE
            from agent.tpm import create_key

            if any(os.path.lexists(self.directory / n) for n in (KEY_FILE, TPM_FILE)):
                raise UsageError(f"{self.directory} already holds a license store; "
                                 f"refusing to overwrite it")
            key = create_key(key_store)
        else:
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
                force: bool = False, transfer_to: str | None = None) -> bytes:
        """Sign a request and keep it outstanding; ``origin`` names the peer that asked
        (:class:`agent.protocol.Outstanding`), None for the local command line;
        ``transfer_to`` (issue 16): a reclaim whose licenses move to that device.

        Raises:
            SeatsOutError: a reclaim of a floating license whose seats are out, without
                ``force`` (issue 15; exit 9).
            GrantsHeldError: a reclaim of licenses that child servers still hold grants of
                (the grants are recalled; issue 14), without ``force``.
        """
        with self._open() as (store, now):
            return self._request_in(store, now, action, list(features), origin, force,
                                    transfer_to)

    def request_from_license_info(self, action: Action, features: Iterable[str],
                                  license_info: bytes, origin: str | None = None,
                                  force: bool = False, transfer_to: str | None = None
                                  ) -> tuple[bytes, list[str]]:
        """:meth:`features_from_license_info`, then :meth:`request` with those features
        added, on one opening of the store (the link's ``create-request`` with license
        information); the request and every feature asked.

        Raises: as the two do, in that order.
        """
        with self._open() as (store, now):
            features = [*features, *self._features_in(store, now, license_info, action)]
            return self._request_in(store, now, action, features, origin, force,
                                    transfer_to), features

    def _request_in(self, store: Store, now: int, action: Action, features: list[str],
                    origin: str | None, force: bool, transfer_to: str | None) -> bytes:
        store.require_writable("create a request")
        if action is Action.RECLAIM and not force:  # issue 15, item 6
            try:
                seats.check_reclaim(store.state.licenses, store.state.seats, features,
                                    max(now, store.state.clock_hwm))
            except LicensingError as err:
                store.record_refusal(err, "request", now)
                raise
        if action is Action.RECLAIM and store.state.system.granted and not force:
            from agent import inherit

            wanted = features or [lic.feature for lic in store.state.licenses]
            held = inherit.holders(store.state, wanted, max(now, store.state.clock_hwm))
            if held:
                feats = sorted({g.feature for g in held})
                store.commit(replace(store.state, system=tree.apply_event(
                    store.state.system, "grant-recall", {"features": feats})),
                    "grant-recall", {"features": feats}, now)
                raise inherit.held_refusal(store.state, held, "")
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

    def check(self, feature: str, count: int = 1) -> CheckResult:
        """Is ``feature`` licensed now (``count`` units, own and inherited; issue 14)? Moves
        the clock mark when the answer depended on it.

        The mark is committed (a ``clock`` journal record, then the slot) whenever the
        answer at ``now`` differs from the answer at the mark (a license seen expired),
        and at most hourly otherwise. If it cannot be saved (a read-only file system, a
        full disk) the answer stands and says so in ``warnings``.
        """
        with self._open() as (store, now):
            res = protocol.check_feature(store.state, feature, now, self.limits)
            edge = protocol.clock_edge(store.state, feature, now, self.limits)
            if count != 1 or (not res.licensed and store.state.system.inherited):  # issue 14
                from agent import inherit

                res = inherit.check_units(store.state, feature, now, count, self.limits)
                edge = edge or inherit.grant_edge(store.state, feature, now)
            new, persist = protocol.observe_clock(store.state, now, self.limits)
            if edge is not None:
                new, persist = protocol.evolve(store.state, clock_hwm=now), True
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
            return self._features_in(store, now, data, action)

    def _features_in(self, store: Store, now: int, data: bytes, action: Action) -> list[str]:
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
        return self.transfer_out_again(features, to, again_ok=False)[0]

    def transfer_out_again(self, features: Iterable[str], to: str, again_ok: bool = True
                           ) -> tuple[bytes, bool]:
        """:meth:`transfer_out`; with ``again_ok``, the same transfer asked again (its file
        still the last receipt) gets the same file back, nothing changed: the ``transfer``
        operation of a link, so that a lost answer strands nothing. Second: whether so."""
        from agent.transfer import transfer_out, transferred_before

        features = list(features)
        with self._open() as (store, now):
            again = transferred_before(store.state, features, to, self.limits) \
                if again_ok else None
            if again is not None:
                return again, True
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
            return data, False

    def apply_transfer(self, data: bytes) -> tuple[bytes, Any]:
        """Issue 16: verify and apply a transfer file; the signed transfer-receipt and the
        transfer. Applied before: refused (replay, exit 6)."""
        receipt, t, _again = self.apply_transfer_again(data, again_ok=False)
        return receipt, t

    def apply_transfer_again(self, data: bytes, again_ok: bool = True
                             ) -> tuple[bytes, Any, bool]:
        """:meth:`apply_transfer`; with ``again_ok``, a transfer applied here whose receipt
        is still the last one gets that receipt back, nothing changed (the link's
        ``apply-transfer``, like ``apply-response``). Third: whether so."""
        from agent.transfer import applied_before, apply_transfer

        with self._open() as (store, now):
            again = applied_before(store.state, data, self.limits) if again_ok else None
            if again is not None:
                return again[0], again[1], True
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
            return receipt, t, False

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

    # ------------------------------------------------------------ issue 15: floating seats

    def _seat_change(self, what: str,
                     change: Callable[[protocol.AgentState, int], tuple[tuple[seats.Seat, ...],
                                                                        seats.Seat]],
                     borrow_proof: bool = False) -> tuple[seats.Seat, bytes]:
        """Run one seat rule at ``t`` (the later of the clock and the mark), journal it
        (event ``seat``), save it, and sign the seat's token."""
        with self._open() as (store, now):
            store.require_writable(f"{what} a seat")
            t = max(now, store.state.clock_hwm)
            new_seats, seat = change(store.state, t)
            detail: dict[str, Any] = {"op": what, "t": t}
            detail |= {"id": seat.id} if what == "return" else {"seat": seat.to_cbor()}
            store.commit(replace(store.state, seats=new_seats, clock_hwm=t), "seat", detail, now)
            proof = self._license_proof(store, seat.feature) if borrow_proof else None
            key = store.key
            token = seats.SeatToken(seat, store.state.device_id, key.public.alg,
                                    key.public.raw, proof)
            return seat, seats.sign_token(token, key)

    def _license_proof(self, store: Store, feature: str) -> bytes | None:
        """The vendor-signed response that last set ``feature`` here (a borrowed token's
        chain to the vendor), from the journal's apply records; None if none is kept."""
        found = None
        for e in store.journal.read(True).entries:
            if e.event == "apply" and isinstance(e.data, dict):
                if any(isinstance(c, dict) and c.get("feature") == feature
                       for c in e.data.get("changes", ())):
                    resp = e.data.get("response")
                    found = resp if isinstance(resp, bytes) else None
        return found

    def seat_checkout(self, feature: str, client: str, lease: int | None = None,
                      borrow: int | None = None) -> tuple[seats.Seat, bytes]:
        """Check out one seat of the floating license ``feature`` for ``client``.

        Raises:
            NoSeatError: all seats are out (exit 9).
        """
        def change(st: protocol.AgentState, t: int) -> tuple[tuple[seats.Seat, ...], seats.Seat]:
            return seats.checkout(st.licenses, st.seats, feature, client, t, os.urandom(16),
                                  lease or seats.DEFAULT_LEASE, borrow)
        return self._seat_change("checkout", change, borrow_proof=borrow is not None)

    def seat_renew(self, token: bytes, lease: int | None = None) -> tuple[seats.Seat, bytes]:
        """Renew the seat of ``token`` (signed by this device's key: checked first)."""
        def change(st: protocol.AgentState, t: int) -> tuple[tuple[seats.Seat, ...], seats.Seat]:
            sid = seats.read_token(token, st.device_key).seat.id
            return seats.renew(st.licenses, st.seats, sid, t, lease or seats.DEFAULT_LEASE)
        return self._seat_change("renew", change)

    def seat_return(self, token: bytes) -> seats.Seat:
        """Return the seat of ``token`` (signed by this device's key: checked first)."""
        def change(st: protocol.AgentState, t: int) -> tuple[tuple[seats.Seat, ...], seats.Seat]:
            return seats.give_back(st.seats, seats.read_token(token, st.device_key).seat.id, t)
        seat, _token = self._seat_change("return", change)
        return seat

    def seat_list(self) -> tuple[tuple[seats.Seat, ...], list[seats.Pool]]:
        """The seats out now and every floating license's pool."""
        with self._open() as (store, now):
            t = max(now, store.state.clock_hwm)
            st = store.state
            return seats.live(st.seats, t), seats.pools(st.licenses, st.seats, t)
    # ------------------------------------------------------------ issue 14: the system tree

    def _tree_event(self, store: Store, event: str, data: dict[str, Any], now: int) -> None:
        new = replace(store.state, system=tree.apply_event(store.state.system, event, data))
        store.commit(new, event, data, now)

    def attach(self, parent_info: bytes, url: str | None, parent_depth: int) -> tree.ParentLink:
        """Record the parent this server is attached to (its signed device information)."""
        from agent import inherit

        info, _key = protocol.self_signed_payload(parent_info, DeviceInfo)
        with self._open() as (store, now):
            store.require_writable("attach to a parent")
            link = inherit.parent_link(info, url, parent_depth, now, store.state)
            self._tree_event(store, "attach", {"parent": link.to_cbor()}, now)
            return link

    def renew_child(self, info: bytes, url: str | None, report: dict[str, Any]
                    ) -> tuple[Any, protocol.AgentState]:
        """The parent's side of a child's renewal: grants by the rules, committed."""
        from agent import inherit

        with self._open() as (store, now):
            store.require_writable("grant licenses to a child")
            issued = inherit.issue_grants(store.state, info, url, report, now, store.key,
                                          self.limits)
            self._tree_event(store, "grant-issue", issued.event, now)
            return issued, store.state

    def install_grants(self, parent_id: str, files: Iterable[bytes], recalled: Iterable[str]
                       ) -> tuple[list[str], list[str], bytes | None]:
        """The child's side: verify each grant, keep those that hold, and sign the return of
        the recalled ones. Returns (installed features, refused lines, the return file)."""
        from agent import inherit

        with self._open() as (store, now):
            store.require_writable("install inherited licenses")
            parent = store.state.system.parent
            if parent is None or parent.device_id != parent_id:
                raise UsageError("this server is not attached to that parent "
                                 "(licagent attach --parent URL first)")
            good: list[tree.Inherited] = []
            refused: list[str] = []
            for f in files:
                try:
                    good.append(inherit.verify_grant(store.state, f, now, self.limits))
                except LicensingError as err:
                    refused.append(f"{err.reason}: {err}")
            # a return even for a grant no longer held (a return lost on the way before):
            # the parent then frees the slot at once instead of at the lease's end
            back = sorted(set(recalled))
            ret = None
            if back:
                ret, feats = inherit.make_return(store.state, back, store.key, now)
                self._tree_event(store, "grant-return", {"side": "child",
                                                        "features": list(feats), "return": ret},
                                 now)
            self._tree_event(store, "grant-install", {
                "parent_id": parent_id, "grants": [g.to_cbor() for g in good]}, now)
            return [g.feature for g in good], refused, ret

    # ------------------------------------------------ issue 14 item 2: a carried USB stick

    def attach_request(self) -> bytes:
        """The child's signed attach request (agent.carried), to be carried to the parent."""
        from agent import carried

        info, _i = self.info()
        report = self.tree_report()
        with self._open() as (store, now):
            return carried.make_request(store.state.device_id, info, report, store.key, now)

    def answer_attach(self, request: bytes) -> tuple[bytes, Any]:
        """The parent's side of a carried attach: the renewal's rules for the request's
        child, committed, and the signed answer. Returns (answer file, the issued grants)."""
        from agent import carried, inherit
        from agent.digest import sha256

        req, _info = carried.read_request(request)
        with self._open() as (store, now):
            store.require_writable("answer an attach request")
            issued = inherit.issue_grants(store.state, req.info, None, dict(req.report), now,
                                          store.key, self.limits)
            self._tree_event(store, "grant-issue", issued.event, now)
            st = store.state
            hw_map = self.hardware().as_dict()
            hw_map["model"] = st.model
            parent_info, _p = protocol.make_device_info(st, hw_map, host_id(st.binding), now,
                                                        store.key)
            answer = carried.AttachAnswer(st.device_id, req.child_id, sha256(request),
                                          parent_info, st.system.depth, tuple(issued.files),
                                          tuple(issued.recalled), tuple(issued.refused), now)
            return carried.sign_answer(answer, store.key), issued

    def apply_attach_answer(self, answer: bytes, request: bytes, url: str
                            ) -> tuple[str, list[str], list[str], bytes | None]:
        """The child applies the parent's answer from the stick: checked in full first
        (agent.carried.read_answer), then the parent recorded and the grants installed.
        Returns (parent device ID, installed, refused lines, the signed return of the
        recalled features, for the parent, or None)."""
        from agent import carried

        with self._open() as (store, now):
            ans, parent = carried.read_answer(answer, request, store.state.device_id,
                                              store.state.system,
                                              max(now, store.state.clock_hwm))
        self.attach(ans.parent_info, url, ans.depth)
        installed, refused, ret = self.install_grants(parent.device_id, ans.grants,
                                                      ans.recalled)
        return parent.device_id, installed, [*ans.refused, *refused], ret

    def accept_return(self, data: bytes) -> list[str]:
        """The parent records a child's signed return of its grants."""
        from agent import inherit

        with self._open() as (store, now):
            store.require_writable("record a grant return")
            ret = inherit.read_return(store.state, data)
            self._tree_event(store, "grant-return", {"child_id": ret.child_id,
                                                    "features": list(ret.features),
                                                    "return": data}, now)
            return list(ret.features)

    def use(self, feature: str, count: int) -> None:
        """Record what the host application needs of ``feature`` (0 forgets it)."""
        from agent.messages import MAX_COUNT, valid_feature

        try:
            valid_feature(feature)
        except LicensingError as exc:  # a name typed by an operator: a usage error
            raise UsageError(str(exc)) from exc
        if not 0 <= count <= MAX_COUNT:
            raise UsageError(f"count {count} must be from 0 to {MAX_COUNT}")
        with self._open() as (store, now):
            store.require_writable("record a required count")
            self._tree_event(store, "use", {"feature": feature, "count": count}, now)

    def check_count(self, feature: str, count: int) -> CheckResult:
        """Are ``count`` units of ``feature`` licensed, own and inherited together?"""
        if count < 1:
            raise UsageError(f"--count {count}: must be at least 1")
        return self.check(feature, count)  # the clock mark's path, grants included

    def tree_report(self) -> dict[str, Any]:
        from agent import inherit

        with self._open() as (store, now):
            return inherit.tree_report(store.state, now)

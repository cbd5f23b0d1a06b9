"""The licensing server's ledger: entitlements, assignments and what each device holds.

:class:`Ledger` is the API the licensing server, ``licserver`` and the tests
use. It runs each operation as one storage transaction: it reads plain records
from the storage (:mod:`~simulators.licensing_server.storage`, in SQLite
:mod:`~simulators.licensing_server.ledger_sqlite`), asks the pure accounting
rules (:mod:`~simulators.licensing_server.rules`) what to decide, writes back
what they decided, and has the :class:`~simulators.licensing_server.vendor.Vendor`
sign what goes out.

Every public operation also appends its row to ``operations``: a crash or a
restart leaves each operation either wholly recorded or not at all. A refused
operation is rolled back and then recorded on its own. Time is passed in
(``now``) or read from the ``clock`` given to :class:`Ledger`, so tests set it.
The accounting itself (what an assignment uses, what a device may hold, when a
reclaimed license is free again) is described in the rules module and
docs/licensing-api.md.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from agent.digest import sha256
from agent.errors import (
    AlreadyAppliedError,
    LicensingError,
    MalformedError,
    RestoredError,
    RevokedError,
    SequenceError,
    StorageError,
    TrustError,
    UsageError,
)
from agent.formats import (
    RECEIPT_MAX,
    SiteInfo,
    identify,
    iso,
    peek_payload,
    read_device_info,
    verify_receipt,
)
from agent.messages import (
    MAX_LIST,
    MAX_TIME,
    Action,
    ChangeOp,
    DeviceInfo,
    Kind,
    License,
    Receipt,
    Request,
    Response,
    Revocation,
    Transfer,
    TransferReceipt,
)
from agent.protocol import Limits, self_signed_payload, verify_self_signed
from apps.licensing_api import AssignmentQuery, Confirmation, UploadAnswer, refusal
from simulators.licensing_server import rules
from simulators.licensing_server.ledger_sqlite import SqliteStorage
from simulators.licensing_server.rules import (
    Assignment,
    NotAuthenticatedError,
    NotEntitledError,
    ResponseStatus,
    Role,
    Stock,
    Token,
)
from simulators.licensing_server.storage import (
    ChainHead,
    IssuedResponse,
    LedgerStorage,
    LedgerTransaction,
    Operation,
    RevocationRow,
)
from simulators.licensing_server.vendor import DAY, Vendor

__all__ = [
    "LICENSE_INFO_VALID",
    "RESPONSE_VALID",
    "TOKEN_PREFIX",
    "Ledger",
    "NotEntitledError",
    "ReceiptResult",
    "is_url",
    "open_storage",
]

REQUEST_MAX = 64 * 1024
#: a bearer token: this prefix, then 43 characters of base64url (256 random bits)
TOKEN_PREFIX = "lst_"
TOKEN_MAX = 256

Scope = frozenset[str] | None  # the entitlements a caller may touch; None: every one
RESPONSE_VALID = 30 * DAY
_R = TypeVar("_R")
LICENSE_INFO_VALID = 30 * DAY


@dataclass(frozen=True)
class ReceiptResult:
    """An accepted receipt: the device, the sequence it reached, the licenses it freed."""

    device_id: str
    sequence: int
    freed: tuple[tuple[str, int], ...] = ()


def _wall_clock() -> int:
    return int(time.time())


class _Holds(dict[str, dict[str, int]]):
    """What each device may hold (:meth:`Ledger._may_hold`), read once per device.

    Only for reads within one transaction that writes nothing in between.
    """

    def __init__(self, tx: LedgerTransaction) -> None:
        super().__init__()
        self._tx = tx

    def __missing__(self, dev: str) -> dict[str, int]:
        hold = self[dev] = Ledger._may_hold(self._tx, dev)
        return hold


class _StockUse:
    """What the assignments of one stock use (:func:`rules.used`), kept up to date in memory.

    ``targets``: device -> assigned count; ``holds``: what each device may hold,
    as read in the same transaction.
    """

    def __init__(self, targets: dict[str, int], holds: _Holds, feature: str) -> None:
        self._targets = targets
        self._holds = holds
        self._feature = feature
        self._total = sum(self._use(d) for d in targets)

    def _use(self, dev: str) -> int:
        return rules.used([(self._targets[dev], self._holds[dev].get(self._feature, 0))])

    def others(self, dev: str) -> int:
        """What every device but ``dev`` uses."""
        return self._total - (self._use(dev) if dev in self._targets else 0)

    def set(self, dev: str, count: int) -> None:
        self._total = self.others(dev)
        self._targets[dev] = count
        self._total += self._use(dev)

    def drop(self, dev: str) -> None:
        self._total = self.others(dev)
        self._targets.pop(dev, None)


def open_storage(db: Path | str) -> LedgerStorage:
    """The storage ``db`` names: ``postgresql://...`` (or ``postgres://``) a PostgreSQL
    database (:mod:`~simulators.licensing_server.ledger_postgres`, imported only then),
    anything else an SQLite file.

    Raises:
        UsageError: another ``SCHEME://``.
        StorageError: the database cannot be opened.
    """
    text = str(db)
    scheme, sep, _rest = text.partition("://")
    if not sep:
        return SqliteStorage(Path(db))
    if scheme.lower() in ("postgresql", "postgres"):
        from simulators.licensing_server.ledger_postgres import PostgresStorage

        return PostgresStorage(text)
    raise UsageError(f"--db {scheme}://...: not a ledger this licserver opens (an SQLite file "
                     "path, or postgresql://USER@HOST:PORT/DATABASE)")


def is_url(db: Path | str) -> bool:
    """Whether ``db`` names a database server rather than a file."""
    return "://" in str(db)


class Ledger:
    """The ledger in one SQLite file or a PostgreSQL database; safe to share between threads
    (operations serialise; on PostgreSQL also between processes).

    Args:
        path: the SQLite file (created with its schema if missing), or a
            ``postgresql://`` URL (the schema created in an empty database).
        vendor: signs license information and responses; verifies receipts against its key.
        clock: POSIX seconds for operations not given ``now``.
        response_valid: how long a response may be applied (seconds).

    :meth:`over` opens the same ledger on another storage.
    """

    path: Path | None  # the SQLite file; None on another storage

    def __init__(self, path: Path | str, vendor: Vendor | None = None,
                 clock: Callable[[], int] = _wall_clock,
                 response_valid: int = RESPONSE_VALID) -> None:
        self.path = None if is_url(path) else Path(path)
        self._setup(open_storage(path), vendor, clock, response_valid)

    @classmethod
    def over(cls, storage: LedgerStorage, vendor: Vendor | None = None,
             clock: Callable[[], int] = _wall_clock,
             response_valid: int = RESPONSE_VALID) -> Ledger:
        """The ledger on another storage (a ``LedgerStorage``); closing the ledger closes it."""
        led = cls.__new__(cls)
        led.path = None
        led._setup(storage, vendor, clock, response_valid)
        return led

    def _setup(self, storage: LedgerStorage, vendor: Vendor | None, clock: Callable[[], int],
               response_valid: int) -> None:
        self.vendor = vendor
        self.clock = clock
        self.response_valid = response_valid
        self._storage = storage

    def close(self) -> None:
        self._storage.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ operations

    def _operation(self, body: Callable[[LedgerTransaction, dict[str, Any]], _R], kind: str,
                   now: int, device_id: str | None = None) -> _R:
        """``body`` as one transaction recorded in ``operations``; a refusal is recorded
        after the rollback.

        ``body`` may set ``rec["device_id"]``, ``rec["outcome"]`` and ``rec["detail"]``.
        The storage may run it more than once (a conflict with another worker on
        PostgreSQL: :meth:`~simulators.licensing_server.storage.LedgerStorage.run`),
        each time from a fresh ``rec`` and on a rolled-back transaction; only the
        last run's answer and record count.
        """
        rec: dict[str, Any] = {}

        def attempt(tx: LedgerTransaction) -> _R:
            rec.clear()
            rec.update(device_id=device_id, outcome="ok", detail="")
            out = body(tx, rec)
            tx.record(Operation(now, kind, rec["device_id"], rec["outcome"], rec["detail"]))
            return out

        try:
            return self._storage.run(kind, attempt)
        except LicensingError as err:
            if isinstance(err, StorageError):
                raise
            refused = Operation(now, kind, rec.get("device_id", device_id),
                                f"refused: {err.reason}", str(err)[:1000])
            try:
                self._storage.run(kind, lambda tx: tx.record(refused))
            except LicensingError:
                pass  # the refusal itself is what the caller must see
            raise

    def _answering(self, req: Request, data: bytes, now: int, signer: Vendor, scope: Scope
                   ) -> Callable[[LedgerTransaction, dict[str, Any]], bytes]:
        """The body of a request's operation (:meth:`_answer` on this request)."""
        return lambda tx, rec: self._answer(tx, rec, req, data, now, signer, scope)

    def _now(self, now: int | None) -> int:
        return self.clock() if now is None else now

    def _vendor(self, vendor: Vendor | None) -> Vendor:
        v = vendor or self.vendor
        if v is None:
            raise UsageError("this ledger was opened without the vendor key (give --key)")
        return v

    # ------------------------------------------------------------ accounting, read through tx

    @staticmethod
    def _may_hold(tx: LedgerTransaction, dev: str) -> dict[str, int]:
        installed = {f: lic.count for f, lic in tx.installed(dev).items()}
        seq = tx.device_sequence(dev)
        return rules.may_hold(installed, seq, tx.open_responses(dev) if seq is not None else ())

    def _used(self, tx: LedgerTransaction, stock: Stock, exclude: str | None = None,
              assignments: Sequence[Assignment] | None = None,
              holds: _Holds | None = None) -> int:
        """What the assignments of one stock use: sum of max(target, may hold).

        ``holds``: what each device may hold, as already read in this transaction.
        """
        if assignments is None:
            assignments = tx.assignments_of(stock)
        if holds is None:
            holds = _Holds(tx)
        return rules.used((a.count, holds[a.device_id].get(stock.feature, 0))
                          for a in assignments if a.device_id != exclude)

    @staticmethod
    def _drop_released(tx: LedgerTransaction, dev: str, hold: Mapping[str, int]) -> None:
        """Forget assignments of 0 that the device no longer may hold anything of.

        ``hold``: what it may hold (:meth:`_may_hold`; assignments do not change it).
        """
        for f in rules.released(tx.zero_assigned(dev), hold):
            tx.drop_assignment(dev, f)

    @staticmethod
    def _observe(tx: LedgerTransaction, seen: rules.KnownDevice,
                 licenses: Sequence[License], known: rules.KnownDevice | None = None) -> str:
        """Adopt a verified state of a device if it is at least as new as the one known.

        ``known``: the device as this transaction already read it (else read here).
        """
        outcome, view = rules.observe(known or tx.device(seen.device_id), seen)
        if view is not None:
            tx.save_device(view)
            # issue 14: a demo license is the vendor's gift to a top server: it never
            # counts against an entitlement (nor is it reclaimed as unassigned)
            tx.set_installed(view.device_id, tuple(x for x in licenses if not x.demo))
        return outcome

    # ------------------------------------------------------------ entitlements

    def entitle(self, entitlement: str, product: str, features: Mapping[str, int],
                until: int | None = None, now: int | None = None,
                transferable: bool = False) -> dict[str, Any]:
        """Record a purchase: add ``features`` (name -> count) to a product of an entitlement.

        Counts add to what the product already holds; ``until`` (POSIX seconds, the
        subscription end) replaces the end of the features named, None keeps it
        (perpetual for a new feature).

        Returns:
            The entitlement as in :meth:`report`.
        """
        now = self._now(now)
        rules.check_name(entitlement, "entitlement")
        rules.check_name(product, "product")
        if not features:
            raise UsageError("name at least one feature: --feature FEATURE=COUNT")
        feats = {rules.check_feature(f): rules.check_count(n, f"count of {f}")
                 for f, n in features.items()}
        if until is not None and not 0 <= until <= MAX_TIME:
            raise UsageError("until must be a time from 1970 to 2^40 seconds")
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> dict[str, Any]:
            tx.add_entitlement(entitlement, product, now)
            for f, n in sorted(feats.items()):
                tx.save_stock(rules.add_to_stock(tx.stock(entitlement, product, f),
                                                 entitlement, product, f, n, until))
                if transferable:  # issue 16: issued transferable from now on
                    tx.set_transferable(entitlement, product, f)
            rec["detail"] = (f"{entitlement}/{product}: "
                             + ", ".join(f"+{n} {f}" for f, n in sorted(feats.items()))
                             + (f" until {iso(until)}" if until is not None else ""))
            return self._entitlement_json(tx, entitlement)
        return self._operation(_body, "entitle", now)

    def assign(self, entitlement: str, device_id: str, feature: str, count: int,
               product: str | None = None, now: int | None = None,
               scope: Scope = None) -> dict[str, Any]:
        """Assign ``count`` of ``feature`` of ``entitlement`` to a device (the total, not a delta).

        Lowering the count (0 releases) takes effect for accounting only once the
        device no longer may hold more (a reclaim and its receipt). A device holds
        each feature from one entitlement and product at a time.

        Returns:
            ``{"entitlement", "product", "device_id", "feature", "count", "until", "free"}``.

        Raises:
            NotEntitledError: the entitlement does not hold enough (HTTP 409).
            UsageError: unknown entitlement or feature, ambiguous product, or the
                device already holds the feature from another entitlement.
        """
        return self.assign_many([AssignmentQuery(entitlement, device_id, feature, count,
                                                 product)], now, scope)[0]

    def assign_many(self, wanted: Sequence[AssignmentQuery], now: int | None = None,
                    scope: Scope = None) -> list[dict[str, Any]]:
        """Make every assignment of ``wanted`` in ONE transaction, or none of them.

        Each is what :meth:`assign` makes, in order (a later one sees the earlier
        ones). The accounting of each stock is read once and kept up to date in
        memory, so the cost grows with the number of assignments, not its square.

        Returns:
            One :meth:`assign` answer per assignment, in order.

        Raises:
            UsageError, NotEntitledError: as :meth:`assign`; with more than one
                assignment the message names the one refused (its position from 1,
                device and feature) and says that none was made. A device and feature
                named twice is a UsageError.
        """
        now = self._now(now)
        if not wanted:
            raise UsageError("no assignment asked for")
        many = len(wanted) > 1
        seen: dict[tuple[str, str], int] = {}
        for i, q in enumerate(wanted, 1):
            with self._naming(q, i, len(wanted) if many else 0):
                rules.check_name(q.entitlement, "entitlement")
                if q.product is not None:
                    rules.check_name(q.product, "product")
                rules.check_device_id(q.device_id)
                rules.check_feature(q.feature)
                rules.check_count(q.count)
                rules.check_scope(scope, [q.entitlement], f"entitlement {q.entitlement}")
                first = seen.setdefault((q.device_id, q.feature), i)
                if first != i:
                    raise UsageError(f"the same device and feature as assignment #{first}: "
                                     "give each device's total once")
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> list[dict[str, Any]]:
            holds = _Holds(tx)  # assignments do not change what a device may hold
            uses: dict[tuple[str, str, str], _StockUse] = {}
            out = []
            for i, q in enumerate(wanted, 1):
                with self._naming(q, i, len(wanted) if many else 0):
                    out.append(self._assign_one(tx, q, holds, uses))
            rec["detail"] = ("; ".join(f"{a['entitlement']}/{a['product']}: "
                                       f"{a['feature']}={a['count']}"
                                       + (f" to {a['device_id'][:12]}" if many else "")
                                       for a in out))[:900]
            if many:
                rec["detail"] = f"{len(out)} assignments: " + rec["detail"]
            return out
        return self._operation(_body, "assign", now, None if many else wanted[0].device_id)

    @staticmethod
    @contextmanager
    def _naming(q: AssignmentQuery, i: int, of: int) -> Iterator[None]:
        """In a batch (``of`` > 0), a refusal names the assignment and says none was made."""
        try:
            yield
        except (UsageError, NotEntitledError, rules.ForbiddenError) as err:
            if not of:
                raise
            dev = q.device_id[:12] + "…" if isinstance(q.device_id, str) else repr(q.device_id)
            raise type(err)(f"assignment #{i} of {of} (device {dev}, {q.feature}={q.count}): "
                            f"{err}; none of the {of} assignments was made") from None

    def _assign_one(self, tx: LedgerTransaction, q: AssignmentQuery, holds: _Holds,
                    uses: dict[tuple[str, str, str], _StockUse]) -> dict[str, Any]:
        dev, feature, count = q.device_id, q.feature, q.count
        self._refuse_revoked(tx, dev)  # issue 16
        if not tx.has_entitlement(q.entitlement):
            raise UsageError(f"no entitlement {q.entitlement} in the ledger "
                             "(licserver entitle records one)")
        holding = {s.product: s for s in tx.stocks(q.entitlement, feature=feature)}
        product = rules.choose_product(q.entitlement, feature, list(holding), q.product)
        stock = holding[product]
        key = (stock.entitlement, stock.product, stock.feature)
        use = uses.get(key)
        if use is None:
            use = uses[key] = _StockUse(
                {a.device_id: a.count for a in tx.assignments_of(stock)}, holds, feature)
        hold = holds[dev]
        free = rules.check_assignable(stock, dev, count, tx.assignment(dev, feature),
                                      others=use.others(dev), held=hold.get(feature, 0))
        tx.save_assignment(Assignment(dev, feature, q.entitlement, product, count))
        use.set(dev, count)
        self._drop_released(tx, dev, hold)
        if count == 0 and hold.get(feature, 0) == 0:
            use.drop(dev)  # released and forgotten
        return {"entitlement": q.entitlement, "product": product, "device_id": dev,
                "feature": feature, "count": count, "until": iso(stock.until), "free": free}

    # ------------------------------------------------------------ devices

    def observe_device_info(self, data: bytes, now: int | None = None) -> DeviceInfo:
        """Verify a device-information file and update the ledger's view of that device."""
        now = self._now(now)
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> DeviceInfo:
            info = read_device_info(data)
            rec["device_id"] = info.device_id
            self._refuse_revoked(tx, info.device_id)  # issue 16
            rec["outcome"] = self._observe(tx, self._seen_info(info, now), info.licenses)
            tx.set_parent(info.device_id, info.parent, info.created)  # issue 14 item 3
            rec["detail"] = f"sequence {info.sequence}"
            return info
        return self._operation(_body, "device-info", now)

    @staticmethod
    def _seen_info(info: DeviceInfo, now: int) -> rules.KnownDevice:
        return rules.seen_state("device-info", info.device_id, info.device_key, info.model,
                                info.serial, info.sequence, info.licenses, now)

    # ------------------------------------------------------------ step 2: license information

    def license_info(self, site_info: bytes, devices: Sequence[str] | None = None,
                     now: int | None = None, vendor: Vendor | None = None,
                     scope: Scope = None) -> bytes:
        """Verify the device files of a SITE_INFO bundle, update the ledger, sign license info.

        Per device: ``reclaim`` = installed licenses beyond what is assigned (the
        assignment was lowered or released, or never existed); ``install`` = the
        assigned licenses not installed, or installed with a smaller count.

        Raises:
            MalformedError: no device-information file in the bundle verifies.
            UsageError: ``devices`` names a device the bundle does not hold.
        """
        return self.license_info_files(site_info, devices, now, vendor, per_device=False,
                                       scope=scope)[0]

    def license_info_files(self, site_info: bytes, devices: Sequence[str] | None = None,
                           now: int | None = None, vendor: Vendor | None = None,
                           per_device: bool = True, scope: Scope = None
                           ) -> tuple[bytes, dict[str, bytes]]:
        """:meth:`license_info`, plus (``per_device``) one signed file per device naming only it.

        A server is handed only its own file in step 3: the whole site's file grows
        with the site (about 120 bytes a server) and would not fit a serial frame
        or an MQTT message beyond a few hundred servers.
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        files = SiteInfo.decode(site_info).devices
        verified: list[DeviceInfo] = []
        for f in files:
            try:
                verified.append(read_device_info(f))
            except LicensingError:
                continue
        infos = rules.latest_infos(verified)
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> tuple[bytes, dict[str, bytes]]:
            wanted = rules.wanted_devices(infos, len(files), devices)
            for dev in wanted:
                self._check_device(tx, dev, scope)
            dead = {d for d in infos if tx.revocation(d) is not None}  # issue 16
            for info in infos.values():
                if info.device_id not in dead:  # a dead device's licenses stay returned
                    self._observe(tx, self._seen_info(info, now), info.licenses)
            for dev in wanted:  # issue 14 item 5: the system, as each server's signed info says
                tx.set_parent(dev, infos[dev].parent, infos[dev].created)
            entries: dict[str, tuple[list[License], list[License]]] = {}
            for dev in wanted:
                entries[dev] = (([*infos[dev].licenses], []) if dev in dead
                                else rules.plan(tx.installed(dev), tx.targets(dev)))
            revoked = self._revoked_for(tx, wanted)
            rec["detail"] = (f"{len(entries)} device(s) of {len(files)} file(s); "
                             + "; ".join(f"{d[:12]}: reclaim {len(r)}, install {len(i)}"
                                         for d, (r, i) in entries.items())[:800])
            whole = signer.license_info(entries, now, LICENSE_INFO_VALID, revoked)
            one = ({dev: signer.license_info({dev: plan}, now, LICENSE_INFO_VALID, revoked)
                    for dev, plan in entries.items()} if per_device else {})
            return whole, one
        return self._operation(_body, "license-info", now)

    # ------------------------------------------------------------ step 4: requests

    def answer_request(self, data: bytes, now: int | None = None,
                       vendor: Vendor | None = None, scope: Scope = None) -> bytes:
        """Verify a request and sign the response the ledger decides; record it as issued.

        What the response changes is :func:`~simulators.licensing_server.rules.decide`'s
        answer. The same request sent again gets the same response.

        Raises:
            MalformedError, TrustError: the request does not verify.
            StaleError: the ledger knows a later state of the device.
            UsageError: nothing to do for this request.
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        if len(data) > REQUEST_MAX:
            raise MalformedError(f"request file larger than {REQUEST_MAX} bytes")
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> bytes:
            return self._answer(tx, rec, Vendor.read_request(data), data, now, signer, scope)
        return self._operation(_body, "request", now)

    def _answer(self, tx: LedgerTransaction, rec: dict[str, Any], req: Request, data: bytes,
                now: int, signer: Vendor, scope: Scope = None) -> bytes:
        """:meth:`answer_request` for a request already verified (``req`` read from ``data``)."""
        dev = rec["device_id"] = req.device_id
        self._check_device(tx, dev, scope)
        self._refuse_revoked(tx, dev)  # issue 16
        rec["detail"] = f"{req.action.value} on sequence {req.sequence}"
        rdigest = sha256(data)
        prev = tx.response_to(dev, req.nonce)
        head = tx.chain_head(dev) if prev is None else None  # issue 16: a restored store
        restored = False
        try:
            rules.check_restore(req, head.sequence if head else None,
                                head.applied_at if head else None)
        except RestoredError:
            if req.action is not Action.RECLAIM or req.transfer_to is not None:
                raise
            restored = True  # the way back: answered, and flagged
        if rules.check_request(req, rdigest, None if prev is None else prev.request_digest,
                               None if restored else tx.device_sequence(dev)):
            assert prev is not None  # answered again: the same response
            rec["outcome"] = "repeated"
            return prev.file
        self._observe(tx, rules.seen_state("request", dev, req.device_key, req.model, None,
                                           req.sequence, req.licenses, now), req.licenses)
        tx.set_parent(dev, req.parent, req.created)  # issue 14 item 3: as the request says
        revoked = self._revoked_for(tx, [dev])  # issue 16: travels in every vendor file
        if restored:
            changes = rules.decide_restored(req, tx.installed(dev))
            resp = signer.response_for(req, changes, now, self.response_valid, revoked=revoked)
            rec["outcome"] = "restored"
        elif req.transfer_to is None:
            changes = rules.decide(req, self._targets(tx, dev))
            resp = signer.response_for(req, changes, now, self.response_valid, revoked=revoked,
                                       **({"time": now} if req.action is Action.CLOCK else {}))
        else:  # issue 16: a rehost's transfer-out; the new device gets them on its receipt
            to = req.transfer_to
            self._check_device(tx, to, scope)
            self._refuse_revoked(tx, to, "the new server of a rehost")
            feats = [x.feature for x in req.licenses]
            changes = rules.decide_rehost(req, {f: tx.assignment(dev, f) for f in feats},
                                          {f: tx.assignment(to, f) for f in feats})
            resp = signer.response_for(req, changes, now, self.response_valid, transfer_to=to,
                                       revoked=revoked)
            rec["detail"] = f"rehost to {to[:12]}, " + rec["detail"]
        file = signer.sign(resp)
        digest = sha256(file)
        base = {x.feature: x for x in req.licenses}
        result = rules.apply_changes(req.licenses, changes)
        tx.add_response(IssuedResponse(digest, dev, req.nonce, rdigest, req.action.value,
                                       req.sequence, resp.sequence,
                                       tuple(result.values()), file, now, resp.expires))
        ents = tx.entitlements_of(dev)
        tx.add_reclaims(digest, dev, [(f, n, ents.get(f))
                                      for f, n in rules.reclaims(base, result)])
        rec["detail"] += ": " + (", ".join(
            f"{c.op.value} {c.feature}" + ("" if c.op is ChangeOp.REMOVE else f"={c.count}")
            for c in changes))
        return file

    # ------------------------------------------------------------ steps 5-6: receipts

    def accept_receipt(self, data: bytes, now: int | None = None,
                       vendor: Vendor | None = None, scope: Scope = None) -> ReceiptResult:
        """Verify a receipt for a response this ledger issued; accept it once; free its reclaims.

        Raises:
            MalformedError, TrustError: the receipt does not verify.
            UnknownRequestError: the response inside was not issued by this ledger.
            AlreadyAppliedError: this receipt (or one for the same response) was accepted.
            StaleError: the device applied another response on the same state.
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> ReceiptResult:
            rc = verify_receipt(data, [signer.public])  # size cap, signatures, consistency
            dev = rec["device_id"] = rc.device_id
            self._check_device(tx, dev, scope)
            self._refuse_revoked(tx, dev)  # issue 16
            rec["detail"] = f"sequence {rc.sequence}"
            digest = sha256(data)
            seen_before = tx.receipt_seen(digest)
            found = None if seen_before else tx.response_status(rc.response_digest, dev)
            rules.check_receipt(seen_before, None if found is None else found[0])
            assert found is not None  # the rules refuse a receipt for an unknown response
            base = found[1]
            tx.set_status(rc.response_digest, ResponseStatus.CONFIRMED)
            tx.add_receipt(digest, rc.response_digest, dev, rc.sequence, now)
            tx.set_chain_head(ChainHead(dev, rc.sequence, rc.state_digest, rc.applied_at))
            # every other answer to the same state can no longer be applied
            for other in tx.open_on(dev, base):
                tx.set_status(other, ResponseStatus.SUPERSEDED)
                tx.drop_reclaims(other)
            freed = tx.reclaims(rc.response_digest)
            tx.drop_reclaims(rc.response_digest)
            moved = self._move(tx, rc, freed, now)  # issue 16: a rehost's transfer-out
            known = tx.device(dev)
            self._observe(tx, rules.seen_state("receipt", dev, rc.device_key,
                                               known.model if known else "?", None,
                                               rc.sequence, rc.licenses, now), rc.licenses,
                          known)
            # release the assignment down to what the device kept, or may hold by now
            # (a later state the ledger already knows, another open response)
            hold = self._may_hold(tx, dev)
            for f, _n in freed:
                tx.lower_assignment(dev, f, hold.get(f, 0))
            self._drop_released(tx, dev, hold)
            rec["detail"] += ": freed " + (", ".join(f"{f}={n}" for f, n in freed) or "nothing")
            rec["detail"] += self._record_children(tx, rc, now)  # issue 14 item 3
            if moved:
                rec["detail"] += f"; moved to {moved[:12]}"
            return ReceiptResult(dev, rc.sequence, tuple(freed))
        return self._operation(_body, "receipt", now)

    @staticmethod
    def _move(tx: LedgerTransaction, rc: Receipt, freed: Sequence[tuple[str, int]],
              now: int) -> str | None:
        """Issue 16: a verified receipt of a rehost's transfer-out moves what it freed to the
        device its response names (that device's assignment grows by the count), and the
        ledger records the move; the new device's response is issued only from here on.

        Returns:
            The new device's ID, None for a receipt of another response.
        """
        resp, _kid = peek_payload(rc.response, Response, RECEIPT_MAX)  # verified already
        to = resp.transfer_to
        if to is None:
            return None
        parts = []
        for f, n in freed:
            a = tx.assignment(rc.device_id, f)
            if a is None:  # refused when the transfer-out was issued; kept safe anyway
                continue
            b = tx.assignment(to, f)
            tx.save_assignment(Assignment(to, f, a.entitlement, a.product,
                                          (b.count if b is not None else 0) + n))
            parts.append(f"{f}={n}")
        tx.record(Operation(now, "rehost", rc.device_id, "moved",
                            f"{', '.join(parts) or 'nothing'} from {rc.device_id} to {to} "
                            f"(transfer-out receipt, sequence {rc.sequence})"))
        return to

    @staticmethod
    def _record_children(tx: LedgerTransaction, rc: Receipt, now: int) -> str:
        """Issue 14 item 3: a top server's receipt of a reclaim carries its children's signed
        grant returns and the leases a forced reclaim left running: each names a child of
        the receipt's device, recorded as its parent relation (unless a newer signed file
        said otherwise) and, for a return, as a ``grant-return`` operation. A return that
        does not verify is left out (the receipt itself stays good: it is the device's)."""
        from agent.inherit import read_receipt_return

        dev, bad = rc.device_id, 0
        for data in rc.returns:
            try:
                ret = read_receipt_return(data, dev)
            except LicensingError:
                bad += 1
                continue
            tx.set_parent(ret.child_id, dev, ret.returned)
            tx.record(Operation(now, "grant-return", ret.child_id, "recorded",
                                f"{', '.join(ret.features)} returned by {ret.child_id} to "
                                f"{dev} (its signed return, sequence {rc.sequence})"))
        for lease in rc.leases:
            tx.set_parent(str(lease["child_id"]), dev, rc.applied_at)
        extra = f"; {len(rc.returns) - bad} grant return(s)" if rc.returns else ""
        return extra + (f", {bad} not verified (left out)" if bad else "")

    def confirm(self, receipts: Sequence[bytes], now: int | None = None,
                vendor: Vendor | None = None, scope: Scope = None) -> Confirmation:
        """Accept each receipt on its own; ``{"accepted": [...], "refused": [...]}``.

        ``refused`` entries are ``{"index", "code", "reason", "message"}``.
        """
        out = Confirmation()
        for i, data in enumerate(receipts):
            try:
                kind = identify(data)
                rc = (self.accept_transfer(data, now, vendor, scope)  # issue 16
                      if kind in (Kind.TRANSFER.value, Kind.TRANSFER_RECEIPT.value)
                      else self.accept_receipt(data, now, vendor, scope))
                out.accept(rc.device_id, rc.sequence, rc.freed)
            except StorageError:
                raise
            except LicensingError as err:
                out.refuse(i, err)
        return out

    def upload(self, requests: Sequence[bytes], receipts: Sequence[bytes] = (),
               now: int | None = None, vendor: Vendor | None = None,
               scope: Scope = None) -> UploadAnswer:
        """Confirm the receipts first, then answer each request (each its own operation)."""
        res = UploadAnswer(receipts=self.confirm(receipts, now, vendor, scope))
        for i, data in enumerate(requests):
            key = f"#{i}"
            try:
                req = None
                if len(data) <= REQUEST_MAX:  # a larger one is refused unread
                    try:
                        req = Vendor.read_request(data)
                    except LicensingError:
                        pass
                if req is None:  # answer_request refuses it and records the refusal
                    res.responses[key] = self.answer_request(data, now, vendor, scope)
                    continue
                if req.device_id in res.responses or req.device_id in res.errors:
                    raise UsageError(f"another request of device {req.device_id[:12]}… is in "
                                     "this upload; send one per device")
                key = req.device_id
                at, signer = self._now(now), self._vendor(vendor)
                res.responses[key] = self._operation(
                    self._answering(req, data, at, signer, scope), "request", at)
            except StorageError:
                raise
            except LicensingError as err:
                res.errors[key] = refusal(err)
        return res

    # ------------------------------------------------------------ revocations (issue 16)

    def revoke_device(self, device_id: str, reason: str, now: int | None = None
                      ) -> dict[str, Any]:
        """Declare a device dead (RMA): its assignments return to their entitlements, its open
        responses can no longer be confirmed, and from now on every vendor file for its site
        carries the signed revocation; the device gets nothing more.

        Returns:
            ``{"device_id", "reason", "revoked", "returned": {feature: count},
            "entitlements": [...]}``.

        Raises:
            UsageError: a bad device ID or reason, a device the ledger does not know, or one
                revoked already.
        """
        now = self._now(now)
        rules.check_device_id(device_id)
        if not isinstance(reason, str) or not reason.strip() or len(reason) > 256:
            raise UsageError("--reason: say why, in 1 to 256 characters (e.g. \"RMA 4711: "
                             "power supply failed\")")
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> dict[str, Any]:
            prev = tx.revocation(device_id)
            if prev is not None:
                raise UsageError(f"device {device_id[:12]}… was revoked already at "
                                 f"{iso(prev.time)} ({prev.reason})")
            ents = tx.entitlements_of(device_id)
            if tx.device(device_id) is None and not ents:
                raise UsageError(f"no device {device_id[:12]}… in the ledger (licserver "
                                 "report lists the devices it knows)")
            returned = {f: lic.count for f, lic in tx.targets(device_id).items() if lic.count}
            for f in ents:
                tx.drop_assignment(device_id, f)
            for o in tx.open_responses(device_id):
                tx.set_status(o.digest, ResponseStatus.SUPERSEDED)
                tx.drop_reclaims(o.digest)
            tx.set_installed(device_id, ())
            site = tuple(sorted(set(ents.values())))
            tx.add_revocation(RevocationRow(device_id, reason, now, site))
            rec["outcome"] = "revoked"
            rec["detail"] = (f"{reason}; returned "
                             + (", ".join(f"{f}={n}" for f, n in sorted(returned.items()))
                                or "nothing") + f" to {', '.join(site) or 'no entitlement'}")
            return {"device_id": device_id, "reason": reason, "revoked": iso(now),
                    "returned": returned, "entitlements": list(site)}
        return self._operation(_body, "revoke", now, device_id)

    @staticmethod
    def _targets(tx: LedgerTransaction, dev: str) -> dict[str, License]:
        """The device's assigned licenses, marked transferable where their feature is."""
        out = tx.targets(dev)
        for f, t in out.items():
            a = tx.assignment(dev, f)
            if a is not None and tx.transferable(a.entitlement, a.product, f):
                out[f] = License(t.feature, t.count, t.not_before, t.not_after, t.grace,
                                 transferable=True)
        return out

    def accept_transfer(self, data: bytes, now: int | None = None,
                        vendor: Vendor | None = None, scope: Scope = None) -> ReceiptResult:
        """Issue 16: reconcile a direct transfer from the new server's transfer receipt (it
        carries the old server's signed transfer, which carries the vendor's evidence): the
        assignment moves from the old server to the new one, once per transfer; both
        servers' states are adopted. The old server's transfer file alone updates only its
        state (its assignment still counts until the receipt arrives).

        Raises:
            MalformedError, TrustError: a file that does not verify, evidence not signed by
                this vendor for the old server, a receipt of another server than named.
            AlreadyAppliedError: this transfer was reconciled before.
            SequenceError: the old server's assignment does not hold what it moved (a
                second transfer of the same licenses: flagged in the operations).
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        lim = Limits(max_file=256 * 1024)
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> ReceiptResult:
            payload, _k = verify_self_signed(data, lim)
            if isinstance(payload, Transfer):
                t, rc = payload, None
            elif isinstance(payload, TransferReceipt):
                rc = payload
                t, _k2 = self_signed_payload(rc.transfer, Transfer, lim)
                if t.transfer_to != rc.device_id:
                    raise TrustError(f"transfer receipt of device {rc.device_id[:12]}… for a "
                                     f"transfer to {t.transfer_to[:12]}…")
            else:
                raise MalformedError(f"a {payload.KIND.value} file is not a transfer")
            old, new = t.device_id, t.transfer_to
            rec["device_id"] = old
            for d in (old, new):
                self._check_device(tx, d, scope)
                self._refuse_revoked(tx, d)
            for lic, ev in zip(t.moved, t.evidence, strict=True):
                resp = Vendor.read_response(ev, signer.public)
                ch = next((c for c in resp.changes if c.feature == lic.feature), None)
                if (resp.device_id != old or ch is None or ch.op is ChangeOp.REMOVE
                        or ch.license() != lic or not lic.transferable):
                    raise TrustError(f"the evidence of {lic.feature} is not this vendor's "
                                     f"transferable license for device {old[:12]}…")
            known = tx.device(old)
            self._observe(tx, rules.seen_state("transfer", old, t.device_key,
                                               known.model if known else "?", None,
                                               t.sequence, t.licenses, now), t.licenses, known)
            if rc is None:
                rec["detail"] = f"transfer out to {new[:12]} seen; waiting for its receipt"
                return ReceiptResult(old, t.sequence)
            if tx.transfer_seen(t.id):
                raise AlreadyAppliedError(f"transfer {t.id.hex()[:12]}… was reconciled before")
            parts = []
            for lic in t.moved:
                a = tx.assignment(old, lic.feature)
                if a is None or a.count < lic.count:
                    raise SequenceError(
                        f"flagged: device {old[:12]}… transferred {lic.feature}={lic.count} to "
                        f"{new[:12]}…, but holds no such assignment any more (moved or "
                        "transferred before): the same licenses went to two servers")
                b = tx.assignment(new, lic.feature)
                if b is not None and (b.entitlement, b.product) != (a.entitlement, a.product):
                    raise UsageError(f"device {new[:12]}… holds {lic.feature} from another "
                                     "entitlement")
                tx.save_assignment(Assignment(old, lic.feature, a.entitlement, a.product,
                                              a.count - lic.count))
                tx.save_assignment(Assignment(new, lic.feature, a.entitlement, a.product,
                                              (b.count if b else 0) + lic.count))
                parts.append(f"{lic.feature}={lic.count}")
            knew = tx.device(new)
            self._observe(tx, rules.seen_state("transfer-receipt", new, rc.device_key,
                                               knew.model if knew else "?", None,
                                               rc.sequence, rc.licenses, now), rc.licenses, knew)
            tx.add_transfer(t.id, old, new, now)
            tx.set_chain_head(ChainHead(new, rc.sequence, rc.state_digest, rc.applied_at))
            tx.record(Operation(now, "rehost", old, "moved",
                                f"{', '.join(parts)} from {old} to {new} (direct transfer "
                                f"{t.id.hex()[:12]}, both receipts)"))
            rec["detail"] = f"moved {', '.join(parts)} to {new[:12]}"
            return ReceiptResult(new, rc.sequence)
        return self._operation(_body, "transfer", now)

    @staticmethod
    def _refuse_revoked(tx: LedgerTransaction, dev: str, what: str = "device") -> None:
        r = tx.revocation(dev)
        if r is not None:
            raise RevokedError(f"{what} {dev[:12]}… was declared dead at {iso(r.time)} "
                               f"({r.reason}); the licensing server does nothing for it "
                               "(its licenses went back to the entitlement)")

    @staticmethod
    def _revoked_for(tx: LedgerTransaction, devices: Sequence[str]) -> tuple[Revocation, ...]:
        """The revocations a vendor file for ``devices`` carries: of those devices, and of
        every device that held licenses of the same entitlements (the site); the latest
        :data:`MAX_LIST`."""
        every = tx.revocations()
        if not every:
            return ()
        mine = set(devices)
        ents = {e for d in mine for e in tx.entitlements_of(d).values()}
        out = [Revocation(r.device_id, r.time, r.reason) for r in every
               if r.device_id in mine or ents.intersection(r.entitlements)]
        return tuple(out[-MAX_LIST:])

    # ------------------------------------------------------------ tokens

    @staticmethod
    def _check_device(tx: LedgerTransaction, dev: str, scope: Scope) -> None:
        """A caller limited to ``scope`` may act on a device only if every assignment of it is
        from an entitlement in the scope (a device assigned nothing yet is anyone's)."""
        if scope is not None:
            rules.check_scope(scope, tx.entitlements_of(dev).values(), f"device {dev[:12]}…")

    def create_token(self, name: str, role: Role | str, entitlements: Sequence[str] = (),
                     now: int | None = None) -> str:
        """Make a bearer token; the ledger keeps only its SHA-256.

        Args:
            role: ``vendor-admin`` (everything) or ``site-admin`` (limited to
                ``entitlements``, at least one, each already in the ledger).

        Returns:
            The secret: shown once, never stored.

        Raises:
            UsageError: bad name or role, a name already taken, entitlements missing or
                unknown, or entitlements given to a vendor-admin token.
        """
        now = self._now(now)
        rules.check_name(name, "token name")
        try:
            r = Role(role)
        except ValueError:
            raise UsageError(f"role {role!r}: expected vendor-admin or site-admin") from None
        ents = tuple(sorted(set(entitlements)))
        for e in ents:
            rules.check_name(e, "entitlement")
        if r is Role.VENDOR_ADMIN and ents:
            raise UsageError("a vendor-admin token covers every entitlement; --entitlement is "
                             "for site-admin tokens")
        if r is Role.SITE_ADMIN and not ents:
            raise UsageError("a site-admin token needs the entitlements it may use: "
                             "--entitlement ID (repeat for each)")
        secret = TOKEN_PREFIX + secrets.token_urlsafe(32)
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> None:
            if tx.token_named(name) is not None:
                raise UsageError(f"a token named {name!r} exists already (choose another "
                                 "--name; revoked names stay taken)")
            for e in ents:
                if not tx.has_entitlement(e):
                    raise UsageError(f"no entitlement {e} in the ledger (licserver entitle "
                                     "records one)")
            tx.add_token(Token(name, r, ents, sha256(secret.encode()), now))
            rec["detail"] = f"created {name} ({r.value}" + (
                f": {', '.join(ents)})" if ents else ")")
        self._operation(_body, "token", now)
        return secret

    def revoke_token(self, name: str, now: int | None = None) -> Token:
        """Revoke a token by name: from now on it is refused (HTTP 401).

        Returns:
            The token as it was (``revoked`` set if it already was revoked).

        Raises:
            UsageError: no token of that name.
        """
        now = self._now(now)
        def _body(tx: LedgerTransaction, rec: dict[str, Any]) -> Token:
            tok = tx.token_named(name)
            if tok is None:
                raise UsageError(f"no token named {name!r} in the ledger "
                                 "(licserver report lists them)")
            tx.revoke_token(name, now)
            rec["detail"] = f"revoked {name}" + (" (already revoked)" if tok.revoked else "")
            return tok
        return self._operation(_body, "token", now)

    def authenticate(self, secret: str | None) -> Token:
        """The live token a bearer secret stands for.

        Raises:
            NotAuthenticatedError: no secret, or one the ledger does not hold or revoked.
        """
        if not secret:
            raise NotAuthenticatedError("this licensing server answers only with a bearer "
                                        "token (licadmin --token-file FILE or LICADMIN_TOKEN; "
                                        "licserver token create makes one)")
        if len(secret) > TOKEN_MAX:
            raise NotAuthenticatedError("the bearer token is not one this server issued")
        with self._storage.snapshot() as tx:
            tok = tx.token(sha256(secret.encode()))
        if tok is None:
            raise NotAuthenticatedError("the bearer token is not one this server issued")
        if tok.revoked is not None:
            raise NotAuthenticatedError(f"the bearer token {tok.name!r} was revoked at "
                                        f"{iso(tok.revoked)}")
        return tok

    # ------------------------------------------------------------ report

    def _entitlement_json(self, tx: LedgerTransaction, entitlement: str,
                          holds: _Holds | None = None) -> dict[str, Any]:
        if holds is None:
            holds = _Holds(tx)
        products = []
        for p in tx.products(entitlement):
            feats = []
            for s in tx.stocks(entitlement, product=p):
                drawing = tx.assignments_of(s)
                assigned = sum(a.count for a in drawing)
                used = self._used(tx, s, assignments=drawing, holds=holds)
                feats.append({"feature": s.feature, "count": s.count, "until": iso(s.until),
                              "assigned": assigned, "used": used, "free": s.count - used})
            products.append({"product": p, "features": feats})
        return {"entitlement": entitlement, "products": products}

    def parent_of(self, device_id: str) -> str | None:
        """Issue 14: the parent the device's newest signed information named, or None."""
        with self._storage.snapshot() as tx:
            return dict(tx.parents()).get(device_id)

    def free(self, entitlement: str, feature: str, product: str | None = None) -> int:
        """What is left of a feature of an entitlement (summed over its products)."""
        with self._storage.snapshot() as tx:
            holds = _Holds(tx)
            return sum(s.count - self._used(tx, s, holds=holds)
                       for s in tx.stocks(entitlement, product=product, feature=feature))

    def report(self, scope: Scope = None) -> dict[str, Any]:
        """Entitlements, assignments, installed licenses per device, pending reclaims, devices,
        tokens.

        The shape is documented in :meth:`LicensingClient.report
        <apps.licensing_client.LicensingClient.report>`. With a ``scope`` (a site
        administrator's entitlements), only those entitlements, their assignments and the
        devices they are assigned to, and no tokens.
        """
        with self._storage.snapshot() as tx:
            holds = _Holds(tx)  # each device's, read once for the whole report
            ents = [self._entitlement_json(tx, e, holds) for e in tx.entitlements()
                    if scope is None or e in scope]
            assignments = [
                {"entitlement": a.entitlement, "product": a.product, "device_id": a.device_id,
                 "feature": a.feature, "count": a.count} for a in tx.assignments()
                if scope is None or a.entitlement in scope]
            mine = {a["device_id"] for a in assignments}

            def shown(dev: str) -> bool:
                return scope is None or dev in mine

            installed: dict[str, list[dict[str, Any]]] = {}
            for row in (r for r in tx.all_installed() if shown(r.device_id)):
                installed.setdefault(row.device_id, []).append(
                    {"feature": row.feature, "count": row.count,
                     "not_before": iso(row.not_before), "not_after": iso(row.not_after),
                     "grace": row.grace})
            pending = [
                {"response_digest": p.response_digest.hex(), "device_id": p.device_id,
                 "sequence": p.sequence, "feature": p.feature, "count": p.count,
                 "entitlement": p.entitlement, "issued": iso(p.issued)}
                for p in tx.pending_reclaims() if shown(p.device_id)]
            devices = [{"device_id": d.device_id, "model": d.model, "serial": d.serial,
                        "sequence": d.sequence, "state_digest": d.digest.hex(),
                        "source": d.source, "updated": iso(d.updated)}
                       for d in tx.devices() if shown(d.device_id)]
            return {"entitlements": ents, "assignments": assignments, "installed": installed,
                    "pending_reclaims": pending, "devices": devices,
                    "tokens": [] if scope is not None else [
                        {"name": t.name, "role": t.role.value,
                         "entitlements": list(t.entitlements), "created": iso(t.created),
                         "revoked": iso(t.revoked)} for t in tx.tokens()],
                    "systems": _systems(tx.parents(), shown),  # issue 14 item 5
                    "open_responses": tx.count_open_responses(),
                    "operations": tx.count_operations(),
                    # issue 16: devices declared dead, oldest first
                    "revocations": [{"device_id": r.device_id, "reason": r.reason,
                                     "revoked": iso(r.time),
                                     "entitlements": list(r.entitlements)}
                                    for r in tx.revocations()
                                    if scope is None or scope.intersection(r.entitlements)],
                    # issue 16: requests refused as made from a store restored from a backup
                    "restores": [{"time": iso(o.time), "device_id": o.device_id,
                                  "detail": o.detail}
                                 for o in sorted(
                                     tx.operations_of("request", 1000, "refused: restored")
                                     + tx.operations_of("request", 1000, "restored"),
                                     key=lambda o: o.n)
                                 if o.device_id is None or shown(o.device_id)],
                    # issue 16: licenses moved by a rehost (from, to, what), oldest first
                    "moves": [{"time": iso(o.time), "from": o.device_id, "detail": o.detail}
                              for o in tx.operations_of("rehost", 1000)
                              if o.device_id is None or shown(o.device_id)],
                    # issue 14 item 3: children's signed grant returns, from receipts
                    "grant_returns": [{"time": iso(o.time), "child": o.device_id,
                                       "detail": o.detail}
                                      for o in tx.operations_of("grant-return", 1000)
                                      if o.device_id is None or shown(o.device_id)]}

    def operations(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest operations, oldest first."""
        with self._storage.snapshot() as tx:
            ops = tx.operations(limit)
        return [{"n": o.n, "time": iso(o.time), "kind": o.kind, "device_id": o.device_id,
                 "outcome": o.outcome, "detail": o.detail} for o in ops]


def _systems(parents: list[tuple[str, str | None]], shown: Callable[[str], bool]
             ) -> list[dict[str, Any]]:
    """Issue 14 item 5: each top server with the servers under it (device ID and parent),
    from the parents the servers' signed device information named; a server whose parent
    the ledger has not seen is shown under that parent as its top."""
    up = dict(parents)

    def top(dev: str) -> str:
        seen = {dev}
        while (p := up.get(dev)) is not None and p not in seen:
            seen.add(p)
            dev = p
        return dev

    systems: dict[str, list[dict[str, Any]]] = {}
    for dev, parent in sorted(parents):
        if parent is not None and shown(dev):
            systems.setdefault(top(dev), []).append({"device_id": dev, "parent": parent})
    return [{"top": t, "servers": systems[t]} for t in sorted(systems)]

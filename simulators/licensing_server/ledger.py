"""The licensing server's ledger: entitlements, assignments and what each device holds, in SQLite.

Every public operation is one SQLite transaction (WAL, ``synchronous=FULL``)
that also appends its row to ``operations``: a crash or a restart leaves
each operation either wholly recorded or not at all. A refused operation is
rolled back and then recorded on its own. Time is passed in (``now``) or
read from the ``clock`` given to :class:`Ledger`, so tests set it.

Accounting (docs/licensing-api.md). An **assignment** gives a device a
*target* count of one feature from one product of one entitlement (one
assignment per device and feature). What a device *may hold* of a feature is
the larger of the ledger's verified view of it (device information, a
request, or a receipt, whichever has the highest sequence) and the result of
every response still open on that view's state (issued, receipt not yet
verified, and built on a state the device has not provably left). An
assignment uses ``max(target, may hold)`` of its entitlement's feature, so a
license a response takes away keeps counting until the device's receipt for
that response is verified; then the assignment is released down to what the
device kept. The sum of what assignments use never exceeds what the
entitlement holds.
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.cose import PublicKey, canonical, strict_loads
from agent.digest import sha256
from agent.errors import (
    AlreadyAppliedError,
    LicensingError,
    MalformedError,
    SequenceError,
    StaleError,
    StorageError,
    UnknownRequestError,
    UsageError,
)
from agent.formats import (
    RECEIPT_MAX,
    SITE_INFO_MAX,
    SiteInfo,
    iso,
    read_device_info,
    verify_receipt,
)
from agent.messages import (
    FEATURE_RE,
    Action,
    ChangeOp,
    DeviceInfo,
    License,
    LicenseChange,
    Request,
    licenses_from,
    state_digest,
)
from simulators.licensing_server.vendor import DAY, Vendor

__all__ = [
    "LICENSE_INFO_VALID",
    "RESPONSE_VALID",
    "SITE_INFO_MAX",
    "Ledger",
    "NotEntitledError",
    "ReceiptResult",
    "UploadResult",
]

SCHEMA_VERSION = 1
REQUEST_MAX = 64 * 1024
RESPONSE_VALID = 30 * DAY
LICENSE_INFO_VALID = 30 * DAY
MAX_COUNT = 2**32 - 1
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,63}")

_SCHEMA = """
CREATE TABLE entitlements (
    id        TEXT PRIMARY KEY,
    created   INTEGER NOT NULL
);
CREATE TABLE products (
    entitlement TEXT NOT NULL REFERENCES entitlements(id),
    product     TEXT NOT NULL,
    PRIMARY KEY (entitlement, product)
);
CREATE TABLE features (
    entitlement TEXT NOT NULL,
    product     TEXT NOT NULL,
    feature     TEXT NOT NULL,
    count       INTEGER NOT NULL CHECK (count >= 0),
    until       INTEGER,
    PRIMARY KEY (entitlement, product, feature),
    FOREIGN KEY (entitlement, product) REFERENCES products(entitlement, product)
);
CREATE TABLE devices (
    id        TEXT PRIMARY KEY,
    alg       INTEGER NOT NULL,
    key       BLOB NOT NULL,
    model     TEXT NOT NULL,
    serial    TEXT,
    sequence  INTEGER NOT NULL,
    digest    BLOB NOT NULL,
    source    TEXT NOT NULL,
    updated   INTEGER NOT NULL
);
CREATE TABLE assignments (
    device_id   TEXT NOT NULL,
    feature     TEXT NOT NULL,
    entitlement TEXT NOT NULL,
    product     TEXT NOT NULL,
    count       INTEGER NOT NULL CHECK (count >= 0),
    PRIMARY KEY (device_id, feature),
    FOREIGN KEY (entitlement, product, feature) REFERENCES features(entitlement, product, feature)
);
CREATE TABLE installed (
    device_id   TEXT NOT NULL REFERENCES devices(id),
    feature     TEXT NOT NULL,
    count       INTEGER NOT NULL,
    not_before  INTEGER,
    not_after   INTEGER,
    grace       INTEGER NOT NULL,
    PRIMARY KEY (device_id, feature)
);
CREATE TABLE responses (
    digest         BLOB PRIMARY KEY,
    device_id      TEXT NOT NULL REFERENCES devices(id),
    nonce          BLOB NOT NULL,
    request_digest BLOB NOT NULL,
    action         TEXT NOT NULL,
    base_sequence  INTEGER NOT NULL,
    sequence       INTEGER NOT NULL,
    result         BLOB NOT NULL,
    file           BLOB NOT NULL,
    issued         INTEGER NOT NULL,
    expires        INTEGER NOT NULL,
    status         TEXT NOT NULL CHECK (status IN ('open', 'confirmed', 'superseded')),
    UNIQUE (device_id, nonce)
);
CREATE TABLE pending_reclaims (
    response_digest BLOB NOT NULL REFERENCES responses(digest),
    device_id       TEXT NOT NULL,
    feature         TEXT NOT NULL,
    count           INTEGER NOT NULL CHECK (count > 0),
    entitlement     TEXT,
    PRIMARY KEY (response_digest, feature)
);
CREATE TABLE receipts_seen (
    digest          BLOB PRIMARY KEY,
    response_digest BLOB NOT NULL UNIQUE REFERENCES responses(digest),
    device_id       TEXT NOT NULL,
    sequence        INTEGER NOT NULL,
    accepted        INTEGER NOT NULL
);
CREATE TABLE operations (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    time      INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    device_id TEXT,
    outcome   TEXT NOT NULL,
    detail    TEXT NOT NULL
);
CREATE INDEX responses_by_device ON responses(device_id, status);
"""


class NotEntitledError(SequenceError):
    """The entitlement does not hold enough of a feature for what was asked (HTTP 409)."""

    reason = "not-entitled"


@dataclass(frozen=True)
class ReceiptResult:
    """An accepted receipt: the device, the sequence it reached, the licenses it freed."""

    device_id: str
    sequence: int
    freed: tuple[tuple[str, int], ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "sequence": self.sequence,
                "freed": [{"feature": f, "count": c} for f, c in self.freed]}


@dataclass
class UploadResult:
    """What one upload answered: responses by device, refusals by key, receipt verdicts."""

    responses: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    receipts: dict[str, list[dict[str, Any]]] = field(
        default_factory=lambda: {"accepted": [], "refused": []})

    def to_cbor(self) -> dict[str, Any]:
        return {"responses": dict(self.responses), "errors": dict(self.errors),
                "receipts": {k: list(v) for k, v in self.receipts.items()}}


def refusal(err: LicensingError) -> dict[str, Any]:
    """The ``{"code", "reason", "message"}`` of a refusal."""
    return {"code": err.exit_code, "reason": err.reason, "message": str(err)}


def _name(v: object, what: str) -> str:
    if not isinstance(v, str) or not NAME_RE.fullmatch(v):
        raise UsageError(f"{what} {v!r} is not valid: 1 to 64 letters, digits or ._:/+- "
                         "(starting with a letter or digit)")
    return v


def _feature(v: object) -> str:
    if not isinstance(v, str) or not FEATURE_RE.fullmatch(v):
        raise UsageError(f"feature name {v!r} is not valid (letters, digits, ._:/-, max 64)")
    return v


def _count(v: object, what: str = "count") -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_COUNT:
        raise UsageError(f"{what} must be an integer from 0 to {MAX_COUNT}")
    return v


def _device_id(v: object) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
        raise UsageError(f"device ID {v!r} must be 64 lowercase hex digits")
    return v


def _wall_clock() -> int:
    return int(time.time())


def _encode_licenses(lics: Iterable[License]) -> bytes:
    return canonical([x.to_cbor() for x in sorted(lics)])


def _decode_licenses(data: bytes) -> tuple[License, ...]:
    obj = strict_loads(data, max_size=1024 * 1024)
    assert isinstance(obj, list)
    return licenses_from(obj)


def _apply(base: Iterable[License], changes: Iterable[LicenseChange]) -> dict[str, License]:
    out = {x.feature: x for x in base}
    for ch in changes:
        if ch.op is ChangeOp.REMOVE:
            out.pop(ch.feature, None)
        else:
            out[ch.feature] = ch.license()
    return out


class Ledger:
    """The ledger in one SQLite file; safe to share between threads (operations serialise).

    Args:
        path: the database file (created with its schema if missing).
        vendor: signs license information and responses; verifies receipts against its key.
        clock: POSIX seconds for operations not given ``now``.
        response_valid: how long a response may be applied (seconds).
    """

    def __init__(self, path: Path | str, vendor: Vendor | None = None,
                 clock: Callable[[], int] = _wall_clock,
                 response_valid: int = RESPONSE_VALID) -> None:
        self.path = Path(path)
        self.vendor = vendor
        self.clock = clock
        self.response_valid = response_valid
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the ledger {self.path}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StorageError(f"the ledger {self.path} has schema version {version}; "
                                   f"this licserver reads {SCHEMA_VERSION}")

    # ------------------------------------------------------------ transactions

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One operation: BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot start a transaction on {self.path}: {exc}") from exc
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise StorageError(f"cannot commit to the ledger {self.path}: {exc}") from exc

    @contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read (one WAL snapshot) even while another process writes."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the ledger {self.path}: {exc}") from exc

    @contextmanager
    def _operation(self, kind: str, now: int, device_id: str | None = None
                   ) -> Iterator[tuple[sqlite3.Connection, dict[str, Any]]]:
        """A transaction recorded in ``operations``; a refusal is recorded after the rollback.

        The body may set ``rec["device_id"]``, ``rec["outcome"]`` and ``rec["detail"]``.
        """
        rec: dict[str, Any] = {"device_id": device_id, "outcome": "ok", "detail": ""}
        try:
            with self._tx() as db:
                yield db, rec
                self._record(db, now, kind, rec)
        except LicensingError as err:
            if isinstance(err, StorageError):
                raise
            try:
                with self._tx() as db:
                    self._record(db, now, kind, {"device_id": rec["device_id"],
                                                 "outcome": f"refused: {err.reason}",
                                                 "detail": str(err)[:1000]})
            except (LicensingError, sqlite3.Error):
                pass  # the refusal itself is what the caller must see
            raise
        except sqlite3.Error as exc:
            raise StorageError(f"ledger {self.path}: {kind} failed: {exc}") from exc

    @staticmethod
    def _record(db: sqlite3.Connection, now: int, kind: str, rec: Mapping[str, Any]) -> None:
        db.execute("INSERT INTO operations (time, kind, device_id, outcome, detail) "
                   "VALUES (?, ?, ?, ?, ?)",
                   (now, kind, rec["device_id"], rec["outcome"], rec["detail"]))

    def _now(self, now: int | None) -> int:
        return self.clock() if now is None else now

    def _vendor(self, vendor: Vendor | None) -> Vendor:
        v = vendor or self.vendor
        if v is None:
            raise UsageError("this ledger was opened without the vendor key (give --key)")
        return v

    # ------------------------------------------------------------ entitlements

    def entitle(self, entitlement: str, product: str, features: Mapping[str, int],
                until: int | None = None, now: int | None = None) -> dict[str, Any]:
        """Record a purchase: add ``features`` (name -> count) to a product of an entitlement.

        Counts add to what the product already holds; ``until`` (POSIX seconds, the
        subscription end) replaces the end of the features named, None keeps it
        (perpetual for a new feature).

        Returns:
            The entitlement as in :meth:`report`.
        """
        now = self._now(now)
        _name(entitlement, "entitlement")
        _name(product, "product")
        if not features:
            raise UsageError("name at least one feature: --feature FEATURE=COUNT")
        feats = {_feature(f): _count(n, f"count of {f}") for f, n in features.items()}
        if until is not None and not 0 <= until <= 2**40:
            raise UsageError("until must be a time from 1970 to 2^40 seconds")
        with self._operation("entitle", now) as (db, rec):
            db.execute("INSERT OR IGNORE INTO entitlements (id, created) VALUES (?, ?)",
                       (entitlement, now))
            db.execute("INSERT OR IGNORE INTO products (entitlement, product) VALUES (?, ?)",
                       (entitlement, product))
            for f, n in sorted(feats.items()):
                row = db.execute("SELECT count, until FROM features WHERE entitlement=? AND "
                                 "product=? AND feature=?", (entitlement, product, f)).fetchone()
                if row is None:
                    db.execute("INSERT INTO features VALUES (?, ?, ?, ?, ?)",
                               (entitlement, product, f, n, until))
                    continue
                total = row[0] + n
                if total > MAX_COUNT:
                    raise UsageError(f"{entitlement}/{product} would hold {total} of {f}; "
                                     f"at most {MAX_COUNT}")
                db.execute("UPDATE features SET count=?, until=? WHERE entitlement=? AND "
                           "product=? AND feature=?",
                           (total, row[1] if until is None else until, entitlement, product, f))
            rec["detail"] = (f"{entitlement}/{product}: "
                             + ", ".join(f"+{n} {f}" for f, n in sorted(feats.items()))
                             + (f" until {iso(until)}" if until is not None else ""))
            return self._entitlement_json(db, entitlement)

    def assign(self, entitlement: str, device_id: str, feature: str, count: int,
               product: str | None = None, now: int | None = None) -> dict[str, Any]:
        """Assign ``count`` of ``feature`` of ``entitlement`` to a device (the total, not a delta).

        Lowering the count (0 releases) takes effect for accounting only once the
        device no longer may hold more (a reclaim and its receipt). A device holds
        each feature from one entitlement and product at a time.

        Returns:
            ``{"entitlement", "product", "device_id", "feature", "count", "free"}``.

        Raises:
            NotEntitledError: the entitlement does not hold enough (HTTP 409).
            UsageError: unknown entitlement or feature, ambiguous product, or the
                device already holds the feature from another entitlement.
        """
        now = self._now(now)
        _name(entitlement, "entitlement")
        dev = _device_id(device_id)
        _feature(feature)
        _count(count)
        with self._operation("assign", now, dev) as (db, rec):
            if db.execute("SELECT 1 FROM entitlements WHERE id=?", (entitlement,)).fetchone() is None:
                raise UsageError(f"no entitlement {entitlement} in the ledger "
                                 "(licserver entitle records one)")
            rows = db.execute("SELECT product FROM features WHERE entitlement=? AND feature=? "
                              "ORDER BY product", (entitlement, feature)).fetchall()
            products = [r[0] for r in rows]
            if product is not None:
                if product not in products:
                    raise UsageError(f"product {product} of entitlement {entitlement} holds no "
                                     f"{feature}")
            elif not products:
                raise UsageError(f"entitlement {entitlement} holds no {feature}")
            elif len(products) > 1:
                raise UsageError(f"entitlement {entitlement} holds {feature} in products "
                                 f"{', '.join(products)}: name the product")
            else:
                product = products[0]
            cur = db.execute("SELECT entitlement, product, count FROM assignments WHERE "
                             "device_id=? AND feature=?", (dev, feature)).fetchone()
            if cur is not None and (cur[0], cur[1]) != (entitlement, product):
                raise UsageError(
                    f"device {dev[:12]}… has {feature} assigned from {cur[0]}/{cur[1]}; assign "
                    f"0 there and reclaim it first")
            held = self._may_hold(db, dev).get(feature, 0)
            total, until = db.execute("SELECT count, until FROM features WHERE entitlement=? "
                                      "AND product=? AND feature=?",
                                      (entitlement, product, feature)).fetchone()
            others = self._used(db, entitlement, product, feature, exclude=dev)
            need = max(count, held)
            if others + need > total:
                free = max(0, total - others - held)
                raise NotEntitledError(
                    f"entitlement {entitlement} ({product}) holds {total} of {feature}; "
                    f"{others} are used by other devices"
                    + (f" and this device may hold {held}" if held else "")
                    + f": cannot assign {count} (at most {held + free} here)")
            if cur is None:
                db.execute("INSERT INTO assignments VALUES (?, ?, ?, ?, ?)",
                           (dev, feature, entitlement, product, count))
            else:
                db.execute("UPDATE assignments SET count=? WHERE device_id=? AND feature=?",
                           (count, dev, feature))
            self._drop_released(db, dev)
            rec["detail"] = f"{entitlement}/{product}: {feature}={count}"
            return {"entitlement": entitlement, "product": product, "device_id": dev,
                    "feature": feature, "count": count, "until": iso(until),
                    "free": total - others - need}

    # ------------------------------------------------------------ devices

    def observe_device_info(self, data: bytes, now: int | None = None) -> DeviceInfo:
        """Verify a device-information file and update the ledger's view of that device."""
        now = self._now(now)
        with self._operation("device-info", now) as (db, rec):
            info = read_device_info(data)
            rec["device_id"] = info.device_id
            rec["outcome"] = self._observe(db, "device-info", info.device_id, info.device_key,
                                           info.model, info.serial, info.sequence,
                                           info.licenses, now)
            rec["detail"] = f"sequence {info.sequence}"
            return info

    def _observe(self, db: sqlite3.Connection, source: str, dev: str, key: PublicKey,
                 model: str, serial: str | None, sequence: int,
                 licenses: Sequence[License], now: int) -> str:
        """Adopt a verified state of a device if it is at least as new as the one known."""
        row = db.execute("SELECT sequence, serial FROM devices WHERE id=?", (dev,)).fetchone()
        if row is not None and sequence < row[0]:
            return "older"  # the ledger already knows a later state
        digest = state_digest(licenses)
        if row is None:
            db.execute("INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (dev, key.alg, key.raw, model, serial, sequence, digest, source, now))
        else:
            db.execute("UPDATE devices SET model=?, serial=?, sequence=?, digest=?, source=?, "
                       "updated=? WHERE id=?",
                       (model, serial if serial is not None else row[1], sequence, digest,
                        source, now, dev))
        db.execute("DELETE FROM installed WHERE device_id=?", (dev,))
        db.executemany("INSERT INTO installed VALUES (?, ?, ?, ?, ?, ?)",
                       [(dev, x.feature, x.count, x.not_before, x.not_after, x.grace)
                        for x in licenses])
        return "new" if row is None else "updated"

    def _installed(self, db: sqlite3.Connection, dev: str) -> dict[str, License]:
        return {r[0]: License(r[0], r[1], r[2], r[3], r[4]) for r in db.execute(
            "SELECT feature, count, not_before, not_after, grace FROM installed WHERE "
            "device_id=?", (dev,))}

    def _may_hold(self, db: sqlite3.Connection, dev: str) -> dict[str, int]:
        """Per feature, the most a device may hold, or must be counted as holding.

        That is the largest of: its known state; the result of each open response
        on that state (it may have been applied); and what each open response
        removes, from the moment it is issued until its receipt is verified.
        """
        out = {f: lic.count for f, lic in self._installed(db, dev).items()}
        row = db.execute("SELECT sequence FROM devices WHERE id=?", (dev,)).fetchone()
        if row is None:
            return out

        def at_least(f: str, n: int) -> None:
            out[f] = max(out.get(f, 0), n)

        for digest, base, result in db.execute(
                "SELECT digest, base_sequence, result FROM responses WHERE device_id=? AND "
                "status='open'", (dev,)).fetchall():
            after = {x.feature: x.count for x in _decode_licenses(result)}
            if base >= row[0]:
                for f, n in after.items():
                    at_least(f, n)
            for f, n in db.execute("SELECT feature, count FROM pending_reclaims WHERE "
                                   "response_digest=?", (digest,)):
                at_least(f, after.get(f, 0) + n)
        return out

    def _used(self, db: sqlite3.Connection, entitlement: str, product: str, feature: str,
              exclude: str | None = None) -> int:
        """What the assignments of one entitlement's feature use: sum of max(target, may hold)."""
        used = 0
        for dev, target in db.execute(
                "SELECT device_id, count FROM assignments WHERE entitlement=? AND product=? AND "
                "feature=?", (entitlement, product, feature)).fetchall():
            if dev != exclude:
                used += max(target, self._may_hold(db, dev).get(feature, 0))
        return used

    def _drop_released(self, db: sqlite3.Connection, dev: str) -> None:
        """Forget assignments of 0 that the device no longer may hold anything of."""
        hold = self._may_hold(db, dev)
        for (f,) in db.execute("SELECT feature FROM assignments WHERE device_id=? AND count=0",
                               (dev,)).fetchall():
            if hold.get(f, 0) == 0:
                db.execute("DELETE FROM assignments WHERE device_id=? AND feature=?", (dev, f))

    def _targets(self, db: sqlite3.Connection, dev: str) -> dict[str, tuple[int, License]]:
        """Per assigned feature: the target count and the license that target means."""
        out: dict[str, tuple[int, License]] = {}
        for f, n, until in db.execute(
                "SELECT a.feature, a.count, f.until FROM assignments a JOIN features f USING "
                "(entitlement, product, feature) WHERE a.device_id=?", (dev,)):
            out[f] = (n, License(f, n, None, until, 0))
        return out

    def _plan(self, db: sqlite3.Connection, dev: str, installed: Mapping[str, License]
              ) -> tuple[list[License], list[License]]:
        """(installed licenses to reclaim, licenses to install) for one device."""
        targets = self._targets(db, dev)
        reclaim = [lic for f, lic in sorted(installed.items())
                   if lic.count > targets.get(f, (0, lic))[0]]
        install = [want for f, (n, want) in sorted(targets.items())
                   if n > 0 and (f not in installed or installed[f].count < n)]
        return reclaim, install

    # ------------------------------------------------------------ step 2: license information

    def license_info(self, site_info: bytes, devices: Sequence[str] | None = None,
                     now: int | None = None, vendor: Vendor | None = None) -> bytes:
        """Verify the device files of a SITE_INFO bundle, update the ledger, sign license info.

        Per device: ``reclaim`` = installed licenses beyond what is assigned (the
        assignment was lowered or released, or never existed); ``install`` = the
        assigned licenses not installed, or installed with a smaller count.

        Raises:
            MalformedError: no device-information file in the bundle verifies.
            UsageError: ``devices`` names a device the bundle does not hold.
        """
        return self.license_info_files(site_info, devices, now, vendor, per_device=False)[0]

    def license_info_files(self, site_info: bytes, devices: Sequence[str] | None = None,
                           now: int | None = None, vendor: Vendor | None = None,
                           per_device: bool = True) -> tuple[bytes, dict[str, bytes]]:
        """:meth:`license_info`, plus (``per_device``) one signed file per device naming only it.

        A server is handed only its own file in step 3: the whole site's file grows
        with the site (about 120 bytes a server) and would not fit a serial frame
        or an MQTT message beyond a few hundred servers.
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        files = SiteInfo.decode(site_info).devices
        infos: dict[str, DeviceInfo] = {}
        for f in files:
            try:
                info = read_device_info(f)
            except LicensingError:
                continue
            prev = infos.get(info.device_id)
            if prev is None or info.sequence >= prev.sequence:
                infos[info.device_id] = info
        with self._operation("license-info", now) as (db, rec):
            if not infos:
                raise MalformedError(f"none of the {len(files)} device-information file(s) in "
                                     "the site information verifies")
            wanted = list(dict.fromkeys(devices or ()))
            unknown = [d for d in wanted if d not in infos]
            if unknown:
                raise UsageError(f"device {', '.join(d[:12] + '…' for d in unknown)} is not in "
                                 f"the site information")
            for info in infos.values():
                self._observe(db, "device-info", info.device_id, info.device_key, info.model,
                              info.serial, info.sequence, info.licenses, now)
            entries: dict[str, tuple[list[License], list[License]]] = {}
            for dev in wanted or sorted(infos):
                entries[dev] = self._plan(db, dev, self._installed(db, dev))
            rec["detail"] = (f"{len(entries)} device(s) of {len(files)} file(s); "
                             + "; ".join(f"{d[:12]}: reclaim {len(r)}, install {len(i)}"
                                         for d, (r, i) in entries.items())[:800])
            whole = signer.license_info(entries, now, LICENSE_INFO_VALID)
            one = ({dev: signer.license_info({dev: plan}, now, LICENSE_INFO_VALID)
                    for dev, plan in entries.items()} if per_device else {})
            return whole, one

    # ------------------------------------------------------------ step 4: requests

    def answer_request(self, data: bytes, now: int | None = None,
                       vendor: Vendor | None = None) -> bytes:
        """Verify a request and sign the response the ledger decides; record it as issued.

        activate: install what is assigned and not installed (or installed with a
        smaller count), limited to the features the request names if it names any.
        renew: move installed, assigned licenses to their entitlement's current end.
        reclaim: remove the named features (or, naming none, those beyond their
        assignment; a license still partly assigned shrinks to its assignment), and
        install what waits for the device in the same response. The same request
        sent again gets the same response.

        Raises:
            MalformedError, TrustError: the request does not verify.
            StaleError: the ledger knows a later state of the device.
            UsageError: nothing to do for this request.
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        if len(data) > REQUEST_MAX:
            raise MalformedError(f"request file larger than {REQUEST_MAX} bytes")
        with self._operation("request", now) as (db, rec):
            req = Vendor.read_request(data)
            dev = rec["device_id"] = req.device_id
            rec["detail"] = f"{req.action.value} on sequence {req.sequence}"
            rdigest = sha256(data)
            prev = db.execute("SELECT request_digest, file FROM responses WHERE device_id=? AND "
                              "nonce=?", (dev, req.nonce)).fetchone()
            if prev is not None:
                if bytes(prev[0]) != rdigest:
                    raise SequenceError("a different request with the same nonce was answered "
                                        "before; create a new request")
                rec["outcome"] = "repeated"
                return bytes(prev[1])
            row = db.execute("SELECT sequence FROM devices WHERE id=?", (dev,)).fetchone()
            if row is not None and req.sequence < row[0]:
                raise StaleError(f"the request was made on sequence {req.sequence}, but the "
                                 f"device has reached sequence {row[0]}; create a new request")
            self._observe(db, "request", dev, req.device_key, req.model, None, req.sequence,
                          req.licenses, now)
            changes = self._decide(db, req)
            resp = signer.response_for(req, changes, now, self.response_valid)
            file = signer.sign(resp)
            digest = sha256(file)
            base = {x.feature: x for x in req.licenses}
            result = _apply(req.licenses, changes)
            db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'open')",
                       (digest, dev, req.nonce, rdigest, req.action.value, req.sequence,
                        resp.sequence, _encode_licenses(result.values()), file, now,
                        resp.expires))
            ents = {f: e for f, e in db.execute(
                "SELECT feature, entitlement FROM assignments WHERE device_id=?", (dev,))}
            for f, lic in sorted(base.items()):
                after = result[f].count if f in result else 0
                if after < lic.count:
                    db.execute("INSERT INTO pending_reclaims VALUES (?, ?, ?, ?, ?)",
                               (digest, dev, f, lic.count - after, ents.get(f)))
            rec["detail"] += ": " + (", ".join(
                f"{c.op.value} {c.feature}" + ("" if c.op is ChangeOp.REMOVE else f"={c.count}")
                for c in changes))
            return file

    def _decide(self, db: sqlite3.Connection, req: Request) -> tuple[LicenseChange, ...]:
        dev = req.device_id
        installed = {x.feature: x for x in req.licenses}
        targets = self._targets(db, dev)
        named = set(req.features)
        changes: list[LicenseChange] = []

        def grow(features: Iterable[str]) -> None:
            for f in sorted(features):
                n, want = targets[f]
                have = installed.get(f)
                if n == 0 or (have is not None and have.count >= n):
                    continue
                op = ChangeOp.ADD if have is None else ChangeOp.UPDATE
                changes.append(LicenseChange(op, f, n, want.not_before, want.not_after, 0))

        if req.action is Action.ACTIVATE:
            grow([f for f in targets if not named or f in named])
            if not changes:
                what = ", ".join(sorted(named)) or "anything"
                raise UsageError(f"nothing to activate: {what} is not assigned to device "
                                 f"{dev[:12]}… beyond what it holds (licadmin assign first)")
        elif req.action is Action.RENEW:
            for f in sorted(named or installed):
                have = installed.get(f)
                if have is None or f not in targets or targets[f][0] == 0:
                    continue
                until = targets[f][1].not_after
                if have.not_after != until or have.not_before is not None or have.grace:
                    changes.append(LicenseChange(ChangeOp.UPDATE, f, have.count, None, until, 0))
            if not changes:
                raise UsageError(f"nothing to renew on device {dev[:12]}…: its assigned licenses "
                                 "already end when their entitlements do")
        else:
            gone = named or {f for f, lic in installed.items()
                             if lic.count > targets.get(f, (0, lic))[0]}
            if not gone:
                raise UsageError(f"nothing to reclaim on device {dev[:12]}…: name the features "
                                 "or lower their assignment first")
            for f in sorted(gone):
                have = installed.get(f)
                if have is None:
                    raise UsageError(f"cannot reclaim {f}: device {dev[:12]}… does not hold it")
                n = targets[f][0] if f in targets else 0
                if 0 < n < have.count:  # still partly assigned: shrink to the assignment
                    want = targets[f][1]
                    changes.append(LicenseChange(ChangeOp.UPDATE, f, n, None, want.not_after, 0))
                else:
                    changes.append(LicenseChange(ChangeOp.REMOVE, f))
            grow([f for f in targets if f not in gone])
        return tuple(changes)

    # ------------------------------------------------------------ steps 5-6: receipts

    def accept_receipt(self, data: bytes, now: int | None = None,
                       vendor: Vendor | None = None) -> ReceiptResult:
        """Verify a receipt for a response this ledger issued; accept it once; free its reclaims.

        Raises:
            MalformedError, TrustError: the receipt does not verify.
            UnknownRequestError: the response inside was not issued by this ledger.
            AlreadyAppliedError: this receipt (or one for the same response) was accepted.
            StaleError: the device applied another response on the same state.
        """
        now = self._now(now)
        signer = self._vendor(vendor)
        with self._operation("receipt", now) as (db, rec):
            if len(data) > RECEIPT_MAX:
                raise MalformedError(f"receipt file larger than {RECEIPT_MAX} bytes")
            rc = verify_receipt(data, [signer.public])
            dev = rec["device_id"] = rc.device_id
            rec["detail"] = f"sequence {rc.sequence}"
            digest = sha256(data)
            if db.execute("SELECT 1 FROM receipts_seen WHERE digest=?", (digest,)).fetchone():
                raise AlreadyAppliedError("this receipt was accepted before")
            row = db.execute("SELECT status, base_sequence FROM responses WHERE digest=? AND "
                             "device_id=?", (rc.response_digest, dev)).fetchone()
            if row is None:
                raise UnknownRequestError("the receipt answers a response this licensing server "
                                          "did not issue")
            status, base = row
            if status == "confirmed":
                raise AlreadyAppliedError("a receipt for this response was accepted before")
            if status == "superseded":
                raise StaleError("the device applied another response on the same state; this "
                                 "receipt contradicts the one accepted")
            db.execute("UPDATE responses SET status='confirmed' WHERE digest=?",
                       (rc.response_digest,))
            db.execute("INSERT INTO receipts_seen VALUES (?, ?, ?, ?, ?)",
                       (digest, rc.response_digest, dev, rc.sequence, now))
            # every other answer to the same state can no longer be applied
            for (other,) in db.execute("SELECT digest FROM responses WHERE device_id=? AND "
                                       "base_sequence=? AND status='open'",
                                       (dev, base)).fetchall():
                db.execute("UPDATE responses SET status='superseded' WHERE digest=?", (other,))
                db.execute("DELETE FROM pending_reclaims WHERE response_digest=?", (other,))
            freed = db.execute("SELECT feature, count FROM pending_reclaims WHERE "
                               "response_digest=? ORDER BY feature",
                               (rc.response_digest,)).fetchall()
            db.execute("DELETE FROM pending_reclaims WHERE response_digest=?",
                       (rc.response_digest,))
            self._observe(db, "receipt", dev, rc.device_key, self._model(db, dev), None,
                          rc.sequence, rc.licenses, now)
            # release the assignment down to what the device kept, or may hold by now
            # (a later state the ledger already knows, another open response)
            hold = self._may_hold(db, dev)
            for f, _n in freed:
                db.execute("UPDATE assignments SET count=MIN(count, ?) WHERE device_id=? AND "
                           "feature=?", (hold.get(f, 0), dev, f))
            self._drop_released(db, dev)
            rec["detail"] += ": freed " + (", ".join(f"{f}={n}" for f, n in freed) or "nothing")
            return ReceiptResult(dev, rc.sequence, tuple((str(f), int(n)) for f, n in freed))

    @staticmethod
    def _model(db: sqlite3.Connection, dev: str) -> str:
        row = db.execute("SELECT model FROM devices WHERE id=?", (dev,)).fetchone()
        return str(row[0]) if row else "?"

    def confirm(self, receipts: Sequence[bytes], now: int | None = None,
                vendor: Vendor | None = None) -> dict[str, list[dict[str, Any]]]:
        """Accept each receipt on its own; ``{"accepted": [...], "refused": [...]}``.

        ``refused`` entries are ``{"index", "code", "reason", "message"}``.
        """
        out: dict[str, list[dict[str, Any]]] = {"accepted": [], "refused": []}
        for i, data in enumerate(receipts):
            try:
                out["accepted"].append(self.accept_receipt(data, now, vendor).to_json())
            except StorageError:
                raise
            except LicensingError as err:
                out["refused"].append({"index": i, **refusal(err)})
        return out

    def upload(self, requests: Sequence[bytes], receipts: Sequence[bytes] = (),
               now: int | None = None, vendor: Vendor | None = None) -> UploadResult:
        """Confirm the receipts first, then answer each request (each its own operation)."""
        res = UploadResult(receipts=self.confirm(receipts, now, vendor))
        for i, data in enumerate(requests):
            key = f"#{i}"
            try:
                try:
                    req = Vendor.read_request(data)
                except LicensingError:
                    req = None
                if req is not None and req.device_id not in res.responses \
                        and req.device_id not in res.errors:
                    key = req.device_id
                elif req is not None:
                    raise UsageError(f"another request of device {req.device_id[:12]}… is in "
                                     "this upload; send one per device")
                res.responses[key] = self.answer_request(data, now, vendor)
            except StorageError:
                raise
            except LicensingError as err:
                res.errors[key] = refusal(err)
        return res

    # ------------------------------------------------------------ report

    def _entitlement_json(self, db: sqlite3.Connection, entitlement: str) -> dict[str, Any]:
        products = []
        for (p,) in db.execute("SELECT product FROM products WHERE entitlement=? ORDER BY "
                               "product", (entitlement,)).fetchall():
            feats = []
            for f, n, until in db.execute("SELECT feature, count, until FROM features WHERE "
                                          "entitlement=? AND product=? ORDER BY feature",
                                          (entitlement, p)).fetchall():
                assigned = db.execute("SELECT COALESCE(SUM(count), 0) FROM assignments WHERE "
                                      "entitlement=? AND product=? AND feature=?",
                                      (entitlement, p, f)).fetchone()[0]
                used = self._used(db, entitlement, p, f)
                feats.append({"feature": f, "count": n, "until": iso(until),
                              "assigned": assigned, "used": used, "free": n - used})
            products.append({"product": p, "features": feats})
        return {"entitlement": entitlement, "products": products}

    def free(self, entitlement: str, feature: str, product: str | None = None) -> int:
        """What is left of a feature of an entitlement (summed over its products)."""
        with self._snapshot() as db:
            total = 0
            for p, n in db.execute("SELECT product, count FROM features WHERE entitlement=? AND "
                                   "feature=?", (entitlement, feature)).fetchall():
                if product is None or p == product:
                    total += n - self._used(db, entitlement, p, feature)
            return total

    def report(self) -> dict[str, Any]:
        """Entitlements, assignments, installed licenses per device, pending reclaims, devices.

        The shape is documented in :meth:`LicensingClient.report
        <apps.licensing_client.LicensingClient.report>`.
        """
        with self._snapshot() as db:
            ents = [self._entitlement_json(db, e) for (e,) in
                    db.execute("SELECT id FROM entitlements ORDER BY id").fetchall()]
            assignments = [
                {"entitlement": e, "product": p, "device_id": d, "feature": f, "count": n}
                for d, f, e, p, n in db.execute(
                    "SELECT device_id, feature, entitlement, product, count FROM assignments "
                    "ORDER BY entitlement, product, feature, device_id")]
            installed: dict[str, list[dict[str, Any]]] = {}
            for d, f, n, nb, na, g in db.execute(
                    "SELECT device_id, feature, count, not_before, not_after, grace FROM "
                    "installed ORDER BY device_id, feature"):
                installed.setdefault(d, []).append(
                    {"feature": f, "count": n, "not_before": iso(nb), "not_after": iso(na),
                     "grace": g})
            pending = [
                {"response_digest": bytes(rd).hex(), "device_id": d, "sequence": s,
                 "feature": f, "count": n, "entitlement": e, "issued": iso(t)}
                for rd, d, s, f, n, e, t in db.execute(
                    "SELECT p.response_digest, p.device_id, r.sequence, p.feature, p.count, "
                    "p.entitlement, r.issued FROM pending_reclaims p JOIN responses r ON "
                    "r.digest = p.response_digest ORDER BY r.issued, p.device_id, p.feature")]
            devices = [{"device_id": d, "model": m, "serial": s, "sequence": q,
                        "state_digest": bytes(g).hex(), "source": src, "updated": iso(u)}
                       for d, m, s, q, g, src, u in db.execute(
                           "SELECT id, model, serial, sequence, digest, source, updated FROM "
                           "devices ORDER BY id")]
            open_responses = db.execute("SELECT COUNT(*) FROM responses WHERE "
                                        "status='open'").fetchone()[0]
            ops = db.execute("SELECT COUNT(*) FROM operations").fetchone()[0]
            return {"entitlements": ents, "assignments": assignments, "installed": installed,
                    "pending_reclaims": pending, "devices": devices,
                    "open_responses": open_responses, "operations": ops}

    def operations(self, limit: int = 1000) -> list[dict[str, Any]]:
        """The latest operations, oldest first."""
        with self._snapshot() as db:
            rows = db.execute("SELECT id, time, kind, device_id, outcome, detail FROM "
                                    "operations ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [{"n": n, "time": iso(t), "kind": k, "device_id": d, "outcome": o, "detail": x}
                for n, t, k, d, o, x in reversed(rows)]

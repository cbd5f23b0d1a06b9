"""The ledger's SQL, one text for SQLite and PostgreSQL: every read and write of a transaction.

The statements keep to what both engines run alike (``?`` placeholders, which the
PostgreSQL storage turns into its own; ``ON CONFLICT``; no engine's own functions),
so the accounting reads and writes the same rows on either. Each storage owns its
schema (the column types differ), its connections and its transactions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from agent.cose import PublicKey, canonical, strict_loads
from agent.errors import StorageError
from agent.messages import License, licenses_from
from simulators.licensing_server.rules import (
    Assignment,
    KnownDevice,
    OpenResponse,
    ResponseStatus,
    Role,
    Stock,
    Token,
    target,
)
from simulators.licensing_server.storage import (
    ChainHead,
    DeviceRow,
    InstalledRow,
    IssuedResponse,
    Operation,
    PendingReclaim,
    RequestAnswered,
    RevocationRow,
)

__all__ = ["SqlConnection", "SqlCursor", "SqlTransaction"]


class SqlCursor(Protocol):
    """What a statement's result gives: rows as tuples."""

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def __iter__(self) -> Any: ...


class SqlConnection(Protocol):
    """``execute`` and ``executemany`` with ``?`` placeholders (sqlite3's, or an adapter's)."""

    def execute(self, sql: str, args: Sequence[object] = ..., /) -> SqlCursor: ...
    def executemany(self, sql: str, rows: Iterable[Sequence[object]], /) -> Any: ...


def _encode_licenses(lics: Iterable[License]) -> bytes:
    return canonical([x.to_cbor() for x in sorted(lics)])


def _decode_licenses(data: bytes) -> tuple[License, ...]:
    obj = strict_loads(data, max_size=1024 * 1024)
    if not isinstance(obj, list):
        raise StorageError("the ledger holds a license list that is not a list: is the database damaged?")
    return licenses_from(obj)


def _count(db: SqlConnection, sql: str, args: tuple[object, ...] = ()) -> int:
    return int(db.execute(sql, args).fetchone()[0])


class SqlTransaction:
    """:class:`~simulators.licensing_server.storage.LedgerTransaction` in SQL both storages run.

    ``db``: SQLite's connection, or PostgreSQL's behind a cursor that reads ``?``
    placeholders (:mod:`~simulators.licensing_server.ledger_postgres`).
    """

    def __init__(self, db: SqlConnection) -> None:
        self._db = db

    # ------------------------------------------------------------ entitlements

    def add_entitlement(self, entitlement: str, product: str, now: int) -> None:
        db = self._db
        db.execute("INSERT INTO entitlements (id, created) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   (entitlement, now))
        db.execute("INSERT INTO products (entitlement, product) VALUES (?, ?) "
                   "ON CONFLICT DO NOTHING", (entitlement, product))

    def has_entitlement(self, entitlement: str) -> bool:
        return self._db.execute("SELECT 1 FROM entitlements WHERE id=?",
                                (entitlement,)).fetchone() is not None

    def entitlements(self) -> list[str]:
        return [e for (e,) in self._db.execute("SELECT id FROM entitlements ORDER BY id")]

    def products(self, entitlement: str) -> list[str]:
        return [p for (p,) in self._db.execute(
            "SELECT product FROM products WHERE entitlement=? ORDER BY product", (entitlement,))]

    def stock(self, entitlement: str, product: str, feature: str) -> Stock | None:
        row = self._db.execute("SELECT count, until FROM features WHERE entitlement=? AND "
                               "product=? AND feature=?",
                               (entitlement, product, feature)).fetchone()
        return None if row is None else Stock(entitlement, product, feature, row[0], row[1])

    def stocks(self, entitlement: str, *, product: str | None = None,
               feature: str | None = None) -> list[Stock]:
        sql = "SELECT product, feature, count, until FROM features WHERE entitlement=?"
        args: list[object] = [entitlement]
        if product is not None:
            sql += " AND product=?"
            args.append(product)
        if feature is not None:
            sql += " AND feature=?"
            args.append(feature)
        return [Stock(entitlement, p, f, n, u) for p, f, n, u in
                self._db.execute(sql + " ORDER BY product, feature", args)]

    def save_stock(self, stock: Stock) -> None:
        self._db.execute(
            "INSERT INTO features VALUES (?, ?, ?, ?, ?) ON CONFLICT (entitlement, product, "
            "feature) DO UPDATE SET count=excluded.count, until=excluded.until",
            (stock.entitlement, stock.product, stock.feature, stock.count, stock.until))

    # ------------------------------------------------------------ assignments

    def assignment(self, device_id: str, feature: str) -> Assignment | None:
        row = self._db.execute("SELECT entitlement, product, count FROM assignments WHERE "
                               "device_id=? AND feature=?", (device_id, feature)).fetchone()
        return None if row is None else Assignment(device_id, feature, row[0], row[1], row[2])

    def assignments_of(self, stock: Stock) -> list[Assignment]:
        return [Assignment(d, stock.feature, stock.entitlement, stock.product, n)
                for d, n in self._db.execute(
                    "SELECT device_id, count FROM assignments WHERE entitlement=? AND "
                    "product=? AND feature=?",
                    (stock.entitlement, stock.product, stock.feature)).fetchall()]

    def assignments(self) -> list[Assignment]:
        return [Assignment(d, f, e, p, n) for d, f, e, p, n in self._db.execute(
            "SELECT device_id, feature, entitlement, product, count FROM assignments "
            "ORDER BY entitlement, product, feature, device_id")]

    def zero_assigned(self, device_id: str) -> list[str]:
        return [f for (f,) in self._db.execute(
            "SELECT feature FROM assignments WHERE device_id=? AND count=0",
            (device_id,)).fetchall()]

    def entitlements_of(self, device_id: str) -> dict[str, str]:
        return {f: e for f, e in self._db.execute(
            "SELECT feature, entitlement FROM assignments WHERE device_id=?", (device_id,))}

    def targets(self, device_id: str) -> dict[str, License]:
        return {f: target(f, n, until) for f, n, until in self._db.execute(
            "SELECT a.feature, a.count, f.until FROM assignments a JOIN features f USING "
            "(entitlement, product, feature) WHERE a.device_id=?", (device_id,))}

    def save_assignment(self, assignment: Assignment) -> None:
        a = assignment
        self._db.execute(
            "INSERT INTO assignments VALUES (?, ?, ?, ?, ?) ON CONFLICT (device_id, feature) "
            "DO UPDATE SET count=excluded.count",
            (a.device_id, a.feature, a.entitlement, a.product, a.count))

    def lower_assignment(self, device_id: str, feature: str, at_most: int) -> None:
        self._db.execute("UPDATE assignments SET count=? WHERE device_id=? AND feature=? AND "
                         "count > ?", (at_most, device_id, feature, at_most))

    def drop_assignment(self, device_id: str, feature: str) -> None:
        self._db.execute("DELETE FROM assignments WHERE device_id=? AND feature=?",
                         (device_id, feature))

    # ------------------------------------------------------------ devices

    _DEVICE = "SELECT id, alg, key, model, serial, sequence, digest, source, updated FROM devices"

    @staticmethod
    def _known(row: Any) -> KnownDevice:
        d, alg, key, model, serial, seq, digest, source, updated = row
        return KnownDevice(d, PublicKey(alg, bytes(key)), model, serial, seq, bytes(digest),
                           source, updated)

    def device(self, device_id: str) -> KnownDevice | None:
        row = self._db.execute(self._DEVICE + " WHERE id=?", (device_id,)).fetchone()
        return None if row is None else self._known(row)

    def devices(self) -> list[DeviceRow]:
        return [DeviceRow(d, m, s, n, bytes(g), src, u) for d, m, s, n, g, src, u in
                self._db.execute("SELECT id, model, serial, sequence, digest, source, updated "
                                 "FROM devices ORDER BY id")]

    def device_sequence(self, device_id: str) -> int | None:
        row = self._db.execute("SELECT sequence FROM devices WHERE id=?", (device_id,)).fetchone()
        return None if row is None else int(row[0])

    def save_device(self, device: KnownDevice) -> None:
        d = device
        self._db.execute(
            "INSERT INTO devices VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE "
            "SET model=excluded.model, serial=excluded.serial, sequence=excluded.sequence, "
            "digest=excluded.digest, source=excluded.source, updated=excluded.updated",
            (d.device_id, d.key.alg, d.key.raw, d.model, d.serial, d.sequence, d.digest,
             d.source, d.updated))

    def installed(self, device_id: str) -> dict[str, License]:
        return {r[0]: License(r[0], r[1], r[2], r[3], r[4]) for r in self._db.execute(
            "SELECT feature, count, not_before, not_after, grace FROM installed WHERE "
            "device_id=?", (device_id,))}

    def all_installed(self) -> list[InstalledRow]:
        return [InstalledRow(*r) for r in self._db.execute(
            "SELECT device_id, feature, count, not_before, not_after, grace FROM "
            "installed ORDER BY device_id, feature")]

    def set_installed(self, device_id: str, licenses: tuple[License, ...]) -> None:
        self._db.execute("DELETE FROM installed WHERE device_id=?", (device_id,))
        self._db.executemany("INSERT INTO installed VALUES (?, ?, ?, ?, ?, ?)",
                             [(device_id, x.feature, x.count, x.not_before, x.not_after,
                               x.grace) for x in licenses])

    # ------------------------------------------------------------ responses and receipts

    def add_response(self, response: IssuedResponse) -> None:
        r = response
        self._db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (r.digest, r.device_id, r.nonce, r.request_digest, r.action,
                          r.base_sequence, r.sequence, _encode_licenses(r.result), r.file,
                          r.issued, r.expires, r.status.value))

    def response_to(self, device_id: str, nonce: bytes) -> RequestAnswered | None:
        row = self._db.execute(
            "SELECT request_digest, file FROM responses WHERE device_id=? AND nonce=?",
            (device_id, nonce)).fetchone()
        return None if row is None else RequestAnswered(bytes(row[0]), bytes(row[1]))

    def response_status(self, digest: bytes, device_id: str
                        ) -> tuple[ResponseStatus, int] | None:
        row = self._db.execute("SELECT status, base_sequence FROM responses WHERE digest=? AND "
                               "device_id=?", (digest, device_id)).fetchone()
        return None if row is None else (ResponseStatus(row[0]), int(row[1]))

    def set_status(self, digest: bytes, status: ResponseStatus) -> None:
        self._db.execute("UPDATE responses SET status=? WHERE digest=?", (status.value, digest))

    def open_responses(self, device_id: str) -> list[OpenResponse]:
        db = self._db
        out = []
        for digest, base, result in db.execute(
                "SELECT digest, base_sequence, result FROM responses WHERE device_id=? AND "
                "status='open'", (device_id,)).fetchall():
            after = {x.feature: x.count for x in _decode_licenses(result)}
            taken = {f: n for f, n in db.execute("SELECT feature, count FROM pending_reclaims "
                                                 "WHERE response_digest=?", (digest,))}
            out.append(OpenResponse(bytes(digest), base, after, taken))
        return out

    def open_on(self, device_id: str, base_sequence: int) -> list[bytes]:
        return [bytes(d) for (d,) in self._db.execute(
            "SELECT digest FROM responses WHERE device_id=? AND base_sequence=? AND "
            "status='open'", (device_id, base_sequence)).fetchall()]

    def count_open_responses(self) -> int:
        return _count(self._db, "SELECT COUNT(*) FROM responses WHERE status='open'")

    def add_reclaims(self, response_digest: bytes, device_id: str,
                     reclaims: list[tuple[str, int, str | None]]) -> None:
        for f, n, ent in reclaims:
            self._db.execute("INSERT INTO pending_reclaims VALUES (?, ?, ?, ?, ?)",
                             (response_digest, device_id, f, n, ent))

    def reclaims(self, response_digest: bytes) -> list[tuple[str, int]]:
        return [(str(f), int(n)) for f, n in self._db.execute(
            "SELECT feature, count FROM pending_reclaims WHERE response_digest=? ORDER BY "
            "feature", (response_digest,)).fetchall()]

    def drop_reclaims(self, response_digest: bytes) -> None:
        self._db.execute("DELETE FROM pending_reclaims WHERE response_digest=?",
                         (response_digest,))

    def pending_reclaims(self) -> list[PendingReclaim]:
        return [PendingReclaim(bytes(rd), d, s, f, n, e, t) for rd, d, s, f, n, e, t in
                self._db.execute(
                    "SELECT p.response_digest, p.device_id, r.sequence, p.feature, p.count, "
                    "p.entitlement, r.issued FROM pending_reclaims p JOIN responses r ON "
                    "r.digest = p.response_digest ORDER BY r.issued, p.device_id, p.feature")]

    def receipt_seen(self, digest: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM receipts_seen WHERE digest=?",
                                (digest,)).fetchone() is not None

    def add_receipt(self, digest: bytes, response_digest: bytes, device_id: str,
                    sequence: int, accepted: int) -> None:
        self._db.execute("INSERT INTO receipts_seen VALUES (?, ?, ?, ?, ?)",
                         (digest, response_digest, device_id, sequence, accepted))

    # ------------------------------------------------------------ tokens

    _TOKEN = "SELECT name, role, entitlements, digest, created, revoked FROM tokens"

    @staticmethod
    def _token(row: Any) -> Token:
        name, role, ents, digest, created, revoked = row
        return Token(name, Role(role), tuple(json.loads(ents)), bytes(digest), created, revoked)

    def add_token(self, token: Token) -> None:
        t = token
        self._db.execute("INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?)",
                         (t.name, t.role.value, json.dumps(list(t.entitlements)), t.digest,
                          t.created, t.revoked))

    def token(self, digest: bytes) -> Token | None:
        row = self._db.execute(self._TOKEN + " WHERE digest=?", (digest,)).fetchone()
        return None if row is None else self._token(row)

    def token_named(self, name: str) -> Token | None:
        row = self._db.execute(self._TOKEN + " WHERE name=?", (name,)).fetchone()
        return None if row is None else self._token(row)

    def tokens(self) -> list[Token]:
        return [self._token(r) for r in self._db.execute(self._TOKEN + " ORDER BY name")]

    def revoke_token(self, name: str, now: int) -> None:
        self._db.execute("UPDATE tokens SET revoked=? WHERE name=? AND revoked IS NULL",
                         (now, name))

    # ------------------------------------------------------------ operations

    def record(self, operation: Operation) -> None:
        o = operation
        self._db.execute("INSERT INTO operations (time, kind, device_id, outcome, detail) "
                         "VALUES (?, ?, ?, ?, ?)",
                         (o.time, o.kind, o.device_id, o.outcome, o.detail))

    def count_operations(self) -> int:
        return _count(self._db, "SELECT COUNT(*) FROM operations")

    def operations(self, limit: int) -> list[Operation]:
        rows = self._db.execute("SELECT id, time, kind, device_id, outcome, detail FROM "
                                "operations ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [Operation(t, k, d, o, x, n) for n, t, k, d, o, x in reversed(rows)]

    # ------------------------------------------------------------ revocations (issue 16)

    _REVOCATION = "SELECT device_id, reason, time, entitlements FROM revocations"

    def add_revocation(self, revocation: RevocationRow) -> None:
        r = revocation
        self._db.execute("INSERT INTO revocations (device_id, reason, time, entitlements) "
                         "VALUES (?, ?, ?, ?)",
                         (r.device_id, r.reason, r.time, json.dumps(list(r.entitlements))))

    def revocation(self, device_id: str) -> RevocationRow | None:
        row = self._db.execute(self._REVOCATION + " WHERE device_id=?", (device_id,)).fetchone()
        return None if row is None else RevocationRow(row[0], row[1], row[2],
                                                      tuple(json.loads(row[3])))

    def revocations(self) -> list[RevocationRow]:
        return [RevocationRow(d, r, t, tuple(json.loads(e))) for d, r, t, e in self._db.execute(
            self._REVOCATION + " ORDER BY time, device_id").fetchall()]

    def set_transferable(self, entitlement: str, product: str, feature: str) -> None:
        self._db.execute("INSERT INTO transferable_features (entitlement, product, feature) "
                         "VALUES (?, ?, ?) ON CONFLICT DO NOTHING", (entitlement, product, feature))

    def transferable(self, entitlement: str, product: str, feature: str) -> bool:
        return self._db.execute(
            "SELECT 1 FROM transferable_features WHERE entitlement=? AND product=? AND "
            "feature=?", (entitlement, product, feature)).fetchone() is not None

    def chain_head(self, device_id: str) -> ChainHead | None:
        row = self._db.execute("SELECT device_id, sequence, digest, applied_at FROM chain_heads "
                               "WHERE device_id=?", (device_id,)).fetchone()
        return None if row is None else ChainHead(row[0], row[1], bytes(row[2]), row[3])

    def set_chain_head(self, head: ChainHead) -> None:
        self._db.execute("INSERT INTO chain_heads (device_id, sequence, digest, applied_at) "
                         "VALUES (?, ?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                         "sequence=excluded.sequence, digest=excluded.digest, "
                         "applied_at=excluded.applied_at WHERE (excluded.sequence, "
                         "excluded.applied_at) > (chain_heads.sequence, chain_heads.applied_at)",
                         (head.device_id, head.sequence, head.digest, head.applied_at))

    def set_parent(self, device_id: str, parent: str | None, created: int) -> None:
        self._db.execute("INSERT INTO system_parents (device_id, parent_id, created) "
                         "VALUES (?, ?, ?) ON CONFLICT (device_id) DO UPDATE SET "
                         "parent_id=excluded.parent_id, created=excluded.created "
                         "WHERE excluded.created >= system_parents.created",
                         (device_id, parent, created))

    def parents(self) -> list[tuple[str, str | None]]:
        return [(r[0], r[1]) for r in self._db.execute(
            "SELECT device_id, parent_id FROM system_parents ORDER BY device_id").fetchall()]

    def transfer_seen(self, tid: bytes) -> bool:
        return self._db.execute("SELECT 1 FROM transfers_seen WHERE id=?",
                                (tid,)).fetchone() is not None

    def add_transfer(self, tid: bytes, from_device: str, to_device: str, now: int) -> None:
        self._db.execute("INSERT INTO transfers_seen (id, from_device, to_device, accepted) "
                         "VALUES (?, ?, ?, ?)", (tid, from_device, to_device, now))

    def operations_of(self, kind: str, limit: int, outcome: str | None = None
                      ) -> list[Operation]:
        """Issue 16: the latest operations of one kind (the report's moves), oldest first."""
        cols = "SELECT id, time, kind, device_id, outcome, detail FROM operations WHERE kind=?"
        rows = (self._db.execute(cols + " ORDER BY id DESC LIMIT ?", (kind, limit))
                if outcome is None else
                self._db.execute(cols + " AND outcome=? ORDER BY id DESC LIMIT ?",
                                 (kind, outcome, limit))).fetchall()
        return [Operation(t, k, d, o, x, n) for n, t, k, d, o, x in reversed(rows)]

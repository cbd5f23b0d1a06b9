"""The ledger's storage in one SQLite file: the schema, the SQL and the transactions.

Every transaction is ``BEGIN IMMEDIATE ... COMMIT`` on a WAL database with
``synchronous=FULL``, so a crash or a restart leaves each operation either
wholly recorded or not at all. The schema (``PRAGMA user_version`` 2) is the
file format: an existing ledger file must keep opening, so it changes only
with a new version and a migration (1 -> 2 added ``tokens``).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from agent.errors import StorageError
from simulators.licensing_server.ledger_sql import SqlTransaction
from simulators.licensing_server.storage import LedgerTransaction

__all__ = ["SCHEMA_VERSION", "SqliteStorage", "SqliteTransaction"]

_R = TypeVar("_R")

#: the transactions on an SQLite connection: the SQL both storages share
SqliteTransaction = SqlTransaction

SCHEMA_VERSION = 2

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

#: version 1 -> 2: bearer tokens, kept as their SHA-256 only
_TOKENS = """
CREATE TABLE tokens (
    name         TEXT PRIMARY KEY,
    role         TEXT NOT NULL CHECK (role IN ('vendor-admin', 'site-admin')),
    entitlements TEXT NOT NULL,
    digest       BLOB NOT NULL UNIQUE,
    created      INTEGER NOT NULL,
    revoked      INTEGER
)
"""


#: issue 16: devices declared dead; created when missing at every open (no version change)
_REVOCATIONS = """
CREATE TABLE IF NOT EXISTS revocations (
    device_id    TEXT PRIMARY KEY,
    reason       TEXT NOT NULL,
    time         INTEGER NOT NULL,
    entitlements TEXT NOT NULL
)
"""
_TRANSFERS = (  # issue 16: likewise
    """CREATE TABLE IF NOT EXISTS transferable_features (
    entitlement TEXT NOT NULL, product TEXT NOT NULL, feature TEXT NOT NULL,
    PRIMARY KEY (entitlement, product, feature))""",
    """CREATE TABLE IF NOT EXISTS transfers_seen (
    id BLOB PRIMARY KEY, from_device TEXT NOT NULL, to_device TEXT NOT NULL,
    accepted INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS chain_heads (
    device_id TEXT PRIMARY KEY, sequence INTEGER NOT NULL, digest BLOB NOT NULL,
    applied_at INTEGER NOT NULL)""",
    # issue 14 item 5: which server sits under which, from each one's signed device info
    """CREATE TABLE IF NOT EXISTS system_parents (
    device_id TEXT PRIMARY KEY, parent_id TEXT, created INTEGER NOT NULL)""",
)


class SqliteStorage:
    """:class:`~simulators.licensing_server.storage.LedgerStorage` in one SQLite file.

    Safe to share between threads: one connection, transactions serialise on a lock.

    Raises:
        StorageError: the file cannot be opened, or holds another schema version.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=10.0, isolation_level=None,
                                       check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the ledger {self.path}: {exc}"
                               f"{_what_it_is(self.path)}") from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _migrate(self) -> None:
        with self._tx() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                for stmt in (_SCHEMA + ";" + _TOKENS).split(";"):
                    if stmt.strip():
                        db.execute(stmt)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version == 1:
                db.execute(_TOKENS)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            elif version != SCHEMA_VERSION:
                raise StorageError(f"the ledger {self.path} has schema version {version}; "
                                   f"this licserver reads {SCHEMA_VERSION}")
            db.execute(_REVOCATIONS)
            for stmt in _TRANSFERS:
                db.execute(stmt)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception."""
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
    def transaction(self, what: str) -> Iterator[SqliteTransaction]:
        try:
            with self._tx() as db:
                yield SqliteTransaction(db)
        except sqlite3.Error as exc:
            raise StorageError(f"ledger {self.path}: {what} failed: {exc}") from exc

    def run(self, what: str, body: Callable[[LedgerTransaction], _R]) -> _R:
        """``body`` in one write transaction: ``BEGIN IMMEDIATE`` already runs it alone
        (another process waits for the file's write lock), so there is nothing to retry."""
        with self.transaction(what) as tx:
            return body(tx)

    @contextmanager
    def snapshot(self) -> Iterator[SqliteTransaction]:
        """One WAL snapshot: a consistent read even while another process writes."""
        with self._lock:
            db = self._db
            try:
                db.execute("BEGIN")
                try:
                    yield SqliteTransaction(db)
                finally:
                    db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"cannot read the ledger {self.path}: {exc}") from exc


def _what_it_is(path: Path) -> str:
    """``" (it is a request file, expected an SQLite ledger)"`` for a file that is no database."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return ""
    if not head or head.startswith(b"SQLite format 3\x00"):
        return ""
    from agent.formats import describe_kind, identify

    return f" (it is {describe_kind(identify(head))}, expected an SQLite ledger)"

"""The ledger's storage in PostgreSQL (psycopg 3): the schema, the connection, the transactions.

``licserver ... --db postgresql://USER@HOST:PORT/DB``. The reads and writes are
:class:`~simulators.licensing_server.ledger_sql.SqlTransaction`'s, the same SQL
the SQLite storage runs; this module owns only what differs: the column types
(``BIGINT`` times, ``BYTEA`` digests and files, text compared byte by byte with
``COLLATE "C"`` so lists come in the order SQLite gives), the connection, and how
a transaction starts.

Several ``licserver serve`` processes may share one database. Every write
transaction runs ``SERIALIZABLE``: PostgreSQL lets operations on different
devices and stocks run side by side, and when two could not have run one after
the other with the same result (both spending the same free licenses, both
answering one request, both crediting one receipt) it fails one of them with a
serialization failure. That one is rolled back and run again from the start
(:meth:`PostgresStorage.run`, with a short random pause, at most
:data:`~simulators.licensing_server.storage.ATTEMPTS` times), and then reads what
the other committed. A process killed in the middle loses its connection;
PostgreSQL rolls its transaction back. Reads (the report) take a ``REPEATABLE
READ READ ONLY`` snapshot and do not wait. Only creating the schema takes an
advisory lock (``pg_advisory_xact_lock``), so two workers starting on an empty
database do not both create it.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import psycopg

from agent.errors import StorageError
from simulators.licensing_server.ledger_sql import SqlCursor, SqlTransaction
from simulators.licensing_server.storage import ATTEMPTS, ConflictError, LedgerTransaction

__all__ = ["LOCK_KEY", "SCHEMA_VERSION", "PostgresStorage", "redact"]

SCHEMA_VERSION = 2
#: the advisory lock creating the schema takes ("lic18" in ASCII)
LOCK_KEY = 0x6C69633138
#: what PostgreSQL says when a transaction collided with another: run it again
_CONFLICTS = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
_R = TypeVar("_R")

_T = 'TEXT COLLATE "C"'
_SCHEMA: tuple[str, ...] = (
    f"""CREATE TABLE entitlements (
    id        {_T} PRIMARY KEY,
    created   BIGINT NOT NULL)""",
    f"""CREATE TABLE products (
    entitlement {_T} NOT NULL REFERENCES entitlements(id),
    product     {_T} NOT NULL,
    PRIMARY KEY (entitlement, product))""",
    f"""CREATE TABLE features (
    entitlement {_T} NOT NULL,
    product     {_T} NOT NULL,
    feature     {_T} NOT NULL,
    count       BIGINT NOT NULL CHECK (count >= 0),
    until       BIGINT,
    PRIMARY KEY (entitlement, product, feature),
    FOREIGN KEY (entitlement, product) REFERENCES products(entitlement, product))""",
    f"""CREATE TABLE devices (
    id        {_T} PRIMARY KEY,
    alg       BIGINT NOT NULL,
    key       BYTEA NOT NULL,
    model     {_T} NOT NULL,
    serial    {_T},
    sequence  BIGINT NOT NULL,
    digest    BYTEA NOT NULL,
    source    {_T} NOT NULL,
    updated   BIGINT NOT NULL)""",
    f"""CREATE TABLE assignments (
    device_id   {_T} NOT NULL,
    feature     {_T} NOT NULL,
    entitlement {_T} NOT NULL,
    product     {_T} NOT NULL,
    count       BIGINT NOT NULL CHECK (count >= 0),
    PRIMARY KEY (device_id, feature),
    FOREIGN KEY (entitlement, product, feature)
        REFERENCES features(entitlement, product, feature))""",
    f"""CREATE TABLE installed (
    device_id   {_T} NOT NULL REFERENCES devices(id),
    feature     {_T} NOT NULL,
    count       BIGINT NOT NULL,
    not_before  BIGINT,
    not_after   BIGINT,
    grace       BIGINT NOT NULL,
    PRIMARY KEY (device_id, feature))""",
    f"""CREATE TABLE responses (
    digest         BYTEA PRIMARY KEY,
    device_id      {_T} NOT NULL REFERENCES devices(id),
    nonce          BYTEA NOT NULL,
    request_digest BYTEA NOT NULL,
    action         {_T} NOT NULL,
    base_sequence  BIGINT NOT NULL,
    sequence       BIGINT NOT NULL,
    result         BYTEA NOT NULL,
    file           BYTEA NOT NULL,
    issued         BIGINT NOT NULL,
    expires        BIGINT NOT NULL,
    status         {_T} NOT NULL CHECK (status IN ('open', 'confirmed', 'superseded')),
    UNIQUE (device_id, nonce))""",
    f"""CREATE TABLE pending_reclaims (
    response_digest BYTEA NOT NULL REFERENCES responses(digest),
    device_id       {_T} NOT NULL,
    feature         {_T} NOT NULL,
    count           BIGINT NOT NULL CHECK (count > 0),
    entitlement     {_T},
    PRIMARY KEY (response_digest, feature))""",
    """CREATE TABLE receipts_seen (
    digest          BYTEA PRIMARY KEY,
    response_digest BYTEA NOT NULL UNIQUE REFERENCES responses(digest),
    device_id       TEXT NOT NULL,
    sequence        BIGINT NOT NULL,
    accepted        BIGINT NOT NULL)""",
    f"""CREATE TABLE operations (
    id        BIGSERIAL PRIMARY KEY,
    time      BIGINT NOT NULL,
    kind      {_T} NOT NULL,
    device_id {_T},
    outcome   {_T} NOT NULL,
    detail    {_T} NOT NULL)""",
    "CREATE INDEX responses_by_device ON responses(device_id, status)",
    f"""CREATE TABLE tokens (
    name         {_T} PRIMARY KEY,
    role         {_T} NOT NULL CHECK (role IN ('vendor-admin', 'site-admin')),
    entitlements {_T} NOT NULL,
    digest       BYTEA NOT NULL UNIQUE,
    created      BIGINT NOT NULL,
    revoked      BIGINT)""",
)


_REVOCATIONS = f"""CREATE TABLE IF NOT EXISTS revocations (
    device_id    {_T} PRIMARY KEY,
    reason       {_T} NOT NULL,
    time         BIGINT NOT NULL,
    entitlements {_T} NOT NULL)"""


_TRANSFERS = (  # issue 16: created when missing, no version change
    f"""CREATE TABLE IF NOT EXISTS transferable_features (
    entitlement {_T} NOT NULL, product {_T} NOT NULL, feature {_T} NOT NULL,
    PRIMARY KEY (entitlement, product, feature))""",
    f"""CREATE TABLE IF NOT EXISTS transfers_seen (
    id BYTEA PRIMARY KEY, from_device {_T} NOT NULL, to_device {_T} NOT NULL,
    accepted BIGINT NOT NULL)""",
    f"""CREATE TABLE IF NOT EXISTS chain_heads (
    device_id {_T} PRIMARY KEY, sequence BIGINT NOT NULL, digest BYTEA NOT NULL,
    applied_at BIGINT NOT NULL)""",
    # issue 14 item 5: which server sits under which, from each one's signed device info
    f"""CREATE TABLE IF NOT EXISTS system_parents (
    device_id {_T} PRIMARY KEY, parent_id {_T}, created BIGINT NOT NULL)""",
)


def redact(url: str) -> str:
    """``url`` without its password, to name it in a message or a log."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


@lru_cache(maxsize=256)
def _pg(sql: str) -> str:
    """The shared SQL's ``?`` placeholders as psycopg's ``%s`` (no statement holds a ``%``)."""
    return sql.replace("?", "%s")


class _Qmark:
    """A psycopg connection seen as :class:`~simulators.licensing_server.ledger_sql.SqlConnection`."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, args: Sequence[object] = (), /) -> SqlCursor:
        return self._conn.execute(_pg(sql), args)

    def executemany(self, sql: str, rows: Iterable[Sequence[object]], /) -> None:
        batch = list(rows)
        if batch:
            with self._conn.cursor() as cur:
                cur.executemany(_pg(sql), batch)


class PostgresStorage:
    """:class:`~simulators.licensing_server.storage.LedgerStorage` in one PostgreSQL database.

    Safe to share between threads: one connection, transactions serialise on a
    lock; between processes, ``SERIALIZABLE`` transactions run again on conflict. A lost connection (a database
    restart) is opened again at the next transaction.

    Raises:
        StorageError: the database cannot be reached, or holds another schema version.
    """

    def __init__(self, url: str, connect_timeout: int = 10) -> None:
        self.url = url
        self.where = redact(url)
        self._timeout = connect_timeout
        self._lock = threading.RLock()
        self._conn: psycopg.Connection[Any] | None = None
        self._migrate()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        try:
            self._conn = psycopg.connect(self.url, autocommit=True,
                                         connect_timeout=self._timeout,
                                         application_name="licserver")
        except psycopg.Error as exc:
            raise StorageError(f"cannot open the ledger {self.where}: "
                               f"{str(exc).strip()}") from exc
        return self._conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()

    def _migrate(self) -> None:
        with self._tx("BEGIN ISOLATION LEVEL READ COMMITTED", True, "opening the ledger"
                      ) as _db, self._lock:
            conn = self._connection()
            conn.execute("CREATE TABLE IF NOT EXISTS ledger_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM ledger_schema").fetchone()
            if row is None:
                for stmt in _SCHEMA:
                    conn.execute(stmt)
                conn.execute("INSERT INTO ledger_schema VALUES (%s)", (SCHEMA_VERSION,))
            elif row[0] != SCHEMA_VERSION:
                raise StorageError(f"the ledger {self.where} has schema version {row[0]}; "
                                   f"this licserver reads {SCHEMA_VERSION}")
            conn.execute(_REVOCATIONS)  # issue 16: created when missing, no version change
            for stmt in _TRANSFERS:
                conn.execute(stmt)

    @contextmanager
    def _tx(self, begin: str, lock: bool, what: str) -> Iterator[_Qmark]:
        with self._lock:
            conn = self._connection()
            try:
                conn.execute(begin)
                if lock:
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
            except psycopg.Error as exc:
                self._rollback(conn)
                raise StorageError(f"ledger {self.where}: cannot start {what}: "
                                   f"{str(exc).strip()}") from exc
            try:
                yield _Qmark(conn)
            except _CONFLICTS as exc:
                self._rollback(conn)
                raise ConflictError(f"ledger {self.where}: {what} collided with another "
                                    f"worker's: {str(exc).strip()}") from exc
            except psycopg.Error as exc:
                self._rollback(conn)
                raise StorageError(f"ledger {self.where}: {what} failed: "
                                   f"{str(exc).strip()}") from exc
            except BaseException:
                self._rollback(conn)
                raise
            try:
                conn.execute("COMMIT")
            except _CONFLICTS as exc:
                self._rollback(conn)
                raise ConflictError(f"ledger {self.where}: {what} collided with another "
                                    f"worker's at commit: {str(exc).strip()}") from exc
            except psycopg.Error as exc:
                self._rollback(conn)
                raise StorageError(f"cannot commit to the ledger {self.where}: "
                                   f"{str(exc).strip()}") from exc

    @staticmethod
    def _rollback(conn: psycopg.Connection[Any]) -> None:
        if conn.closed or conn.broken:
            return
        try:
            conn.execute("ROLLBACK")
        except psycopg.Error:
            conn.close()  # opened again by the next transaction

    @contextmanager
    def transaction(self, what: str) -> Iterator[SqlTransaction]:
        """One ``SERIALIZABLE`` attempt: ConflictError when it collided (see :meth:`run`)."""
        with self._tx("BEGIN ISOLATION LEVEL SERIALIZABLE", False, what) as db:
            yield SqlTransaction(db)

    def run(self, what: str, body: Callable[[LedgerTransaction], _R]) -> _R:
        """``body`` in a ``SERIALIZABLE`` transaction, run again after a conflict.

        Between attempts a random pause that doubles each time (from about a
        millisecond, at most about a quarter second), so two workers colliding
        again and again drift apart. The thread lock is not held while waiting.
        """
        pause = 0.001
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self.transaction(what) as tx:
                    return body(tx)
            except ConflictError:
                if attempt == ATTEMPTS:
                    raise
            time.sleep(random.uniform(0, pause))
            pause = min(pause * 2, 0.25)
        raise AssertionError("unreachable")  # the loop returns or raises

    @contextmanager
    def snapshot(self) -> Iterator[SqlTransaction]:
        with self._tx("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY", False,
                      "a read") as db:
            yield SqlTransaction(db)

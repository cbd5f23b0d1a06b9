"""What the ledger needs of its storage: a typing.Protocol, so a second storage is a new adapter.

:class:`~simulators.licensing_server.ledger_sqlite.SqliteStorage` is the one in
use. A storage hands out transactions; everything the ledger reads or writes
goes through a :class:`LedgerTransaction` inside one, as the plain records of
:mod:`simulators.licensing_server.rules`. A storage decides nothing: every
refusal comes from the rules, and every number it returns is what was stored.

Errors: a storage raises :class:`~agent.errors.StorageError` for its own
failures (naming what failed), wrapping the driver's exceptions at this
boundary; any other exception raised inside a transaction rolls it back and
passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol, TypeVar

from agent.errors import StorageError
from agent.messages import License
from simulators.licensing_server.rules import (
    Assignment,
    KnownDevice,
    OpenResponse,
    ResponseStatus,
    Stock,
    Token,
)

__all__ = [
    "ATTEMPTS",
    "ConflictError",
    "DeviceRow",
    "InstalledRow",
    "IssuedResponse",
    "LedgerStorage",
    "LedgerTransaction",
    "Operation",
    "PendingReclaim",
    "RequestAnswered",
]


_T = TypeVar("_T")

#: how many times a write transaction runs before a conflict is reported (PostgreSQL)
ATTEMPTS = 50


class ConflictError(StorageError):
    """A write transaction collided with another one (a serialization failure or a
    deadlock) and was rolled back: running it again from the start is safe."""


@dataclass(frozen=True)
class IssuedResponse:
    """A response as the ledger recorded it when it signed it."""

    digest: bytes
    device_id: str
    nonce: bytes
    request_digest: bytes
    action: str
    base_sequence: int
    sequence: int
    result: tuple[License, ...]
    file: bytes
    issued: int
    expires: int
    status: ResponseStatus = ResponseStatus.OPEN


@dataclass(frozen=True)
class RequestAnswered:
    """What the ledger keeps of an answered request to answer it again: its digest, the response."""

    request_digest: bytes
    file: bytes


@dataclass(frozen=True)
class PendingReclaim:
    """A license a response took away, counted until its receipt is verified (for the report)."""

    response_digest: bytes
    device_id: str
    sequence: int  # the response's
    feature: str
    count: int
    entitlement: str | None
    issued: int  # the response's


@dataclass(frozen=True)
class InstalledRow:
    """A license a device held in its known state, as stored (for the report: not validated)."""

    device_id: str
    feature: str
    count: int
    not_before: int | None
    not_after: int | None
    grace: int


@dataclass(frozen=True)
class DeviceRow:
    """A known device as stored, without its key (for the report)."""

    device_id: str
    model: str
    serial: str | None
    sequence: int
    digest: bytes
    source: str
    updated: int


@dataclass(frozen=True)
class RevocationRow:
    """Issue 16: a device the vendor declared dead, and the entitlements it held then (the
    site its revocation travels to)."""

    device_id: str
    reason: str
    time: int
    entitlements: tuple[str, ...]


@dataclass(frozen=True)
class ChainHead:
    """Issue 16: a device's state proven by its latest verified receipt, and when (by the
    device's clock) it was reached."""

    device_id: str
    sequence: int
    digest: bytes
    applied_at: int


@dataclass(frozen=True)
class Operation:
    """One line of the ledger's record of operations."""

    time: int
    kind: str
    device_id: str | None
    outcome: str
    detail: str
    n: int = 0  # its number, given by the storage


class LedgerTransaction(Protocol):
    """Reads and writes inside one transaction; lists come in the order each method names."""

    # entitlements
    def add_entitlement(self, entitlement: str, product: str, now: int) -> None:
        """Record the entitlement (created ``now``) and its product, each if missing."""
    def has_entitlement(self, entitlement: str) -> bool: ...
    def entitlements(self) -> list[str]:
        """All entitlement IDs, sorted."""
    def products(self, entitlement: str) -> list[str]:
        """The products of an entitlement, sorted."""
    def stock(self, entitlement: str, product: str, feature: str) -> Stock | None: ...
    def stocks(self, entitlement: str, *, product: str | None = None,
               feature: str | None = None) -> list[Stock]:
        """Stocks of an entitlement (of one product, of one feature), by product, then feature."""
    def save_stock(self, stock: Stock) -> None:
        """Insert or replace the count and end of one stock (its product is recorded)."""

    # assignments
    def assignment(self, device_id: str, feature: str) -> Assignment | None: ...
    def assignments_of(self, stock: Stock) -> list[Assignment]:
        """The assignments drawing on one stock (any order)."""
    def assignments(self) -> list[Assignment]:
        """All assignments, by entitlement, product, feature, device."""
    def zero_assigned(self, device_id: str) -> list[str]:
        """The features a device is assigned 0 of (any order)."""
    def entitlements_of(self, device_id: str) -> dict[str, str]:
        """Per feature assigned to a device, the entitlement it comes from."""
    def targets(self, device_id: str) -> dict[str, License]:
        """Per feature assigned to a device, the target count and its stock's end
        (:func:`~simulators.licensing_server.rules.target`)."""
    def save_assignment(self, assignment: Assignment) -> None:
        """Insert an assignment, or set the count of the device's one of that feature."""
    def lower_assignment(self, device_id: str, feature: str, at_most: int) -> None:
        """Lower an assignment's count to ``at_most`` (if there is one and it is larger)."""
    def drop_assignment(self, device_id: str, feature: str) -> None: ...

    # devices
    def device(self, device_id: str) -> KnownDevice | None: ...
    def device_sequence(self, device_id: str) -> int | None:
        """The sequence of the device's known state, None if the device is unknown."""
    def devices(self) -> list[DeviceRow]:
        """All known devices as stored (no key), by ID."""
    def save_device(self, device: KnownDevice) -> None:
        """Insert a device, or update all but its key."""
    def installed(self, device_id: str) -> dict[str, License]:
        """What the device held in its known state, per feature."""
    def all_installed(self) -> list[InstalledRow]:
        """What every device held, as stored, by device, then feature."""
    def set_installed(self, device_id: str, licenses: tuple[License, ...]) -> None:
        """Replace what the device is known to hold."""

    # responses and receipts
    def add_response(self, response: IssuedResponse) -> None: ...
    def response_to(self, device_id: str, nonce: bytes) -> RequestAnswered | None:
        """The device's request with this nonce and its response, if one was issued."""
    def response_status(self, digest: bytes, device_id: str
                        ) -> tuple[ResponseStatus, int] | None:
        """(status, base sequence) of a response issued to the device, None if none was."""
    def set_status(self, digest: bytes, status: ResponseStatus) -> None: ...
    def open_responses(self, device_id: str) -> list[OpenResponse]:
        """The device's open responses, each with what it reclaims (any order)."""
    def open_on(self, device_id: str, base_sequence: int) -> list[bytes]:
        """The digests of the device's open responses on one state (any order)."""
    def count_open_responses(self) -> int: ...
    def add_reclaims(self, response_digest: bytes, device_id: str,
                     reclaims: list[tuple[str, int, str | None]]) -> None:
        """Record what a response takes away: (feature, count, entitlement or None)."""
    def reclaims(self, response_digest: bytes) -> list[tuple[str, int]]:
        """(feature, count) a response takes away, by feature."""
    def drop_reclaims(self, response_digest: bytes) -> None: ...
    def pending_reclaims(self) -> list[PendingReclaim]:
        """Every pending reclaim, by the response's issue time, device, feature."""
    def receipt_seen(self, digest: bytes) -> bool: ...
    def add_receipt(self, digest: bytes, response_digest: bytes, device_id: str,
                    sequence: int, accepted: int) -> None: ...

    # tokens (their SHA-256 only)
    def add_token(self, token: Token) -> None:
        """Insert a token; its name is not yet taken (the caller checked)."""
    def token(self, digest: bytes) -> Token | None:
        """The token with this SHA-256, revoked or not."""
    def token_named(self, name: str) -> Token | None: ...
    def tokens(self) -> list[Token]:
        """Every token, revoked ones too, by name."""
    def revoke_token(self, name: str, now: int) -> None:
        """Mark the token revoked at ``now`` (if it is not already)."""

    # operations
    def record(self, operation: Operation) -> None: ...
    def count_operations(self) -> int: ...
    def operations(self, limit: int) -> list[Operation]:
        """The latest ``limit`` operations, oldest first."""
    def operations_of(self, kind: str, limit: int, outcome: str | None = None
                      ) -> list[Operation]:
        """Issue 16: the latest ``limit`` operations of one kind (and outcome), oldest first."""
    def add_revocation(self, revocation: RevocationRow) -> None:
        """Issue 16: declare a device dead."""
    def revocation(self, device_id: str) -> RevocationRow | None: ...
    def revocations(self) -> list[RevocationRow]:
        """Issue 16: every revocation, oldest first."""
    def set_transferable(self, entitlement: str, product: str, feature: str) -> None:
        """Issue 16: a feature of a product issued transferable."""
    def transferable(self, entitlement: str, product: str, feature: str) -> bool: ...
    def transfer_seen(self, tid: bytes) -> bool: ...
    def chain_head(self, device_id: str) -> ChainHead | None:
        """Issue 16: the latest state of a device proven by a receipt the ledger verified."""
    def set_chain_head(self, head: ChainHead) -> None:
        """Issue 16: keep ``head`` if it was reached later (by the device's clock) than the
        one kept: a restored device's answered reclaim is its newest state."""
    def set_parent(self, device_id: str, parent: str | None, created: int) -> None:
        """Issue 14 item 5: the parent a device's signed information names (None: it stands
        alone or is a top server), kept only from information newer than the kept one."""
    def parents(self) -> list[tuple[str, str | None]]:
        """Issue 14 item 5: every device recorded with its parent, by device ID."""
    def add_transfer(self, tid: bytes, from_device: str, to_device: str, now: int) -> None:
        """Issue 16: a direct transfer reconciled (once)."""


class LedgerStorage(Protocol):
    """Where the ledger lives: hands out transactions, one at a time per storage object."""

    def transaction(self, what: str) -> AbstractContextManager[LedgerTransaction]:
        """A write transaction, committed when the block ends, rolled back on any exception.

        Raises:
            StorageError: the transaction cannot start or commit, or the storage
                failed inside it (the message names ``what``).
        """
    def run(self, what: str, body: Callable[[LedgerTransaction], _T]) -> _T:
        """``body`` in a write transaction, committed after it returns; its answer.

        The ledger's operations go through here. A storage shared by several
        processes runs each one as if alone (PostgreSQL: ``SERIALIZABLE``); when it
        collides with another (:class:`ConflictError`), it is rolled back and
        ``body`` runs again from the start, at most :data:`ATTEMPTS` times, so
        ``body`` must do nothing outside the transaction that a second run would
        repeat wrongly (it only reads and writes through its transaction and
        computes, signs or draws random numbers).

        Raises:
            StorageError: as :meth:`transaction`; ConflictError after the last attempt.
            Any exception ``body`` raises, after the rollback.
        """
    def snapshot(self) -> AbstractContextManager[LedgerTransaction]:
        """A consistent read, even while another process writes (StorageError on failure)."""
    def close(self) -> None: ...

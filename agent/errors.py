"""One exception hierarchy for the whole project, split by whose fault it is.

Every error maps to exactly one documented exit code of ``licagent``:

==== ===========================================================
code meaning
==== ===========================================================
0    success
1    not licensed (``check``) or any other failure
2    usage error
3    malformed input
4    signature or trust failure
5    not for this device, or a store copied from other hardware
6    replay, stale, too new, or no such outstanding request
7    expired, not yet valid, or clock set back
8    storage or store-integrity failure
9    no seat free in a floating license's pool, or seats out of a pool to reclaim (issue 15)
==== ===========================================================
"""

from __future__ import annotations

__all__ = [
    "EXIT_FAILURE",
    "EXIT_OK",
    "AddressInUseError",
    "AlreadyAppliedError",
    "ClockSetBackError",
    "CopiedStoreError",
    "ExpiredError",
    "FactsOverrideError",
    "IntegrityError",
    "LicensingError",
    "MalformedError",
    "NoIdentityError",
    "NoSeatError",
    "NotLicensedError",
    "NotYetValidError",
    "GrantsHeldError",
    "NotTopServerError",
    "NotInTreeError",
    "ReadOnlyStoreError",
    "SeatNotOutError",
    "SeatsOutError",
    "SequenceError",
    "StaleError",
    "StorageError",
    "TooNewError",
    "TrustError",
    "UnknownRequestError",
    "UnsafeFileError",
    "UsageError",
    "ValidityError",
    "WrongDeviceError",
    "listen_error",
]

EXIT_OK = 0
EXIT_FAILURE = 1


class LicensingError(Exception):
    """Root of every error this project raises on purpose."""

    exit_code = EXIT_FAILURE
    #: short machine-readable refusal class, shown in JSON output and the journal
    reason = "failure"


class NotLicensedError(LicensingError):
    """A feature is not licensed now."""

    exit_code = 1
    reason = "not-licensed"


class UsageError(LicensingError):
    """The caller asked for something that makes no sense (bad flags, missing store)."""

    exit_code = 2
    reason = "usage"


class FactsOverrideError(UsageError):
    """Hardware facts given as data (``--facts``) for a store bound to this machine's hardware."""

    reason = "facts-override"


class NoIdentityError(UsageError):
    """``init`` on hardware that reports no serial number, MAC address or machine ID."""

    reason = "no-identity"


class AddressInUseError(UsageError):
    """A listener's address or port is taken (by another process, or given twice).

    The same code in every tool that listens (``licagent run``, ``licserver serve``, ``licsim``).
    """

    reason = "address-in-use"


def listen_error(where: str, exc: OSError) -> UsageError:
    """The one message and code (2) of every tool for an address it cannot listen on."""
    import errno

    if exc.errno == errno.EADDRINUSE:
        return AddressInUseError(f"cannot listen on {where}: address already in use (another "
                                 f"process listens there; stop it or pick another port)")
    return UsageError(f"cannot listen on {where}: {exc.strerror or exc}")


class MalformedError(LicensingError):
    """Input that is not a well-formed file of this project (size, CBOR, schema)."""

    exit_code = 3
    reason = "malformed"


class TrustError(LicensingError):
    """Bad signature, unknown key, key outside its validity window, wrong algorithm."""

    exit_code = 4
    reason = "untrusted"


class WrongDeviceError(LicensingError):
    """The file is bound to another device."""

    exit_code = 5
    reason = "wrong-device"


class CopiedStoreError(WrongDeviceError):
    """The license store belongs to other hardware (it was copied here)."""

    reason = "copied-store"


class SequenceError(LicensingError):
    """The file does not fit the signed chain of states at this point."""

    exit_code = 6
    reason = "sequence"


class AlreadyAppliedError(SequenceError):
    """Replay: this response was applied before (and is not the latest one)."""

    reason = "replay"


class StaleError(SequenceError):
    """The response was issued against an older state than the installed one (rollback)."""

    reason = "stale"


class TooNewError(SequenceError):
    """The response builds on a state this device has not reached: one is missing."""

    reason = "too-new"


class UnknownRequestError(SequenceError):
    """The response answers no outstanding request of this device."""

    reason = "no-such-request"


class ValidityError(LicensingError):
    """Time-related refusal."""

    exit_code = 7
    reason = "validity"


class ExpiredError(ValidityError):
    reason = "expired"


class NotYetValidError(ValidityError):
    reason = "not-yet-valid"


class ClockSetBackError(ValidityError):
    reason = "clock-set-back"


class StorageError(LicensingError):
    """The store could not be read or written (disk full, I/O error, failed fsync)."""

    exit_code = 8
    reason = "storage"


class IntegrityError(StorageError):
    """The stored state fails its integrity check and no good copy is left."""

    reason = "store-integrity"


class UnsafeFileError(StorageError):
    """A file or folder is not what it must be: a symbolic link, a FIFO, a device node, on
    another filesystem, owned by another user or writable by group or others. Nothing was
    read or written through it."""

    reason = "unsafe-file"


class ReadOnlyStoreError(StorageError):
    """A write to a store on a read-only file system (reading still works)."""

    reason = "read-only"


# ---------------------------------------------------------------- issue 15: floating seats


class NoSeatError(LicensingError):
    """Every seat of a floating license is out: "no seat free: N of N out; next free at …"."""

    exit_code = 9
    reason = "no-seat"

    def __init__(self, feature: str, out: int, count: int, next_free: int) -> None:
        import datetime

        when = datetime.datetime.fromtimestamp(next_free, datetime.UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ")
        super().__init__(f"no seat free: {out} of {count} out; next free at {when} "
                         f"({feature}; try again then, or ask a holder to return theirs)")
        self.feature, self.out, self.count, self.next_free = feature, out, count, next_free


class SeatNotOutError(SequenceError):
    """A renew or return of a seat that is not out (returned, lapsed or reclaimed)."""

    reason = "seat-not-out"


class SeatsOutError(LicensingError):
    """A reclaim of a floating license while seats of it are out (without ``--force``)."""

    exit_code = 9
    reason = "seats-out"


# ---------------------------------------------------------------- issue 14: the system tree


class NotTopServerError(WrongDeviceError):
    """A demo license, or a child's attach, on a server that cannot take it at its place in
    the system tree (not the top server, more than three levels, a parent that is no
    Enterprise Server)."""

    reason = "not-top-server"


class GrantsHeldError(LicensingError):
    """A reclaim of an inheritable license while child servers still hold grants of it
    (they were asked to return them; ``--force`` reclaims anyway, the leases running on)."""

    exit_code = 1
    reason = "grants-held"


# ---------------------------------------------------------------- issue 16: replacing hardware


class RevokedError(TrustError):
    """The vendor declared this device dead (RMA, ``licserver revoke``): its licenses went
    back to the entitlement, and nothing is sent to it or accepted from it."""

    reason = "revoked"


class RestoredError(StaleError):
    """A request made from an older state than one the licensing server verified a receipt
    for, after that receipt: the device's store was restored from a backup (issue 16)."""

    reason = "restored"


# ---------------------------------------------------------------- issue 14 item 5: relay


class NotInTreeError(WrongDeviceError):
    """A relay to a device that is not under this server (no child of it, nor of its
    children, reported it): the operation is not for any server this one reaches."""

    reason = "not-in-tree"


class RestoredStoreError(IntegrityError):
    """Issue 16 item 6: a TPM-backed store older than the TPM's monotonic counter (restored
    from a copy), or not this TPM's store; refused at open, nothing written (exit 8)."""

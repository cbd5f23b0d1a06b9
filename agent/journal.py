"""Append-only audit journal: hash-chained, MAC-protected entries, one fsync per entry.

File format: a sequence of records, each a 4-byte big-endian length followed
by that many bytes of canonical CBOR::

    entry = {"n": uint, "time": uint, "event": tstr, "data": any,
             "prev": bstr .size 32, "mac": bstr .size 32}

``prev`` is the SHA-256 of the previous record's CBOR bytes (32 zero bytes for
the first); ``mac`` is HMAC-SHA256 with a key derived from the device key over
the entry without ``mac``. A record cut short by a crash (a torn tail) is
reported by :meth:`Journal.verify` and cut off before the next append.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.cose import canonical, strict_loads
from agent.digest import equal, hmac_sha256, sha256
from agent.durable import FileOps, write_all
from agent.errors import IntegrityError, MalformedError, StorageError
from agent.record import record

__all__ = ["Journal", "JournalEntry", "JournalReport"]

MAX_RECORD = 64 * 1024
ZERO = bytes(32)
#: refusals journalled per hour at most; then one ``refusals-suppressed`` entry, until the
#: hour has passed: a peer sending garbage cannot grow the journal (or its fsyncs) unbounded
REFUSALS_PER_HOUR = 60
REFUSAL_WINDOW = 3600


@record(frozen=True)
class JournalEntry:
    n: int
    time: int
    event: str
    data: Any
    digest: bytes


@record(frozen=True)
class _Tail:
    count: int  # verified records
    prev: bytes  # digest of the last one (the chain's end)
    good_length: int  # bytes of whole records
    torn: int  # bytes of an incomplete last record
    refused: int = 0  # refusals since ``since`` (see _scan)
    suppressed: bool = False  # a refusals-suppressed entry since ``since``


_FIELDS = frozenset({"n", "time", "event", "data", "prev", "mac"})


@record(frozen=True)
class JournalReport:
    entries: tuple[JournalEntry, ...]
    torn_tail: int  # bytes of an incomplete last record, 0 if none
    good_length: int


def _whole_record_at(data: bytes, off: int) -> bool:
    """Whether a complete journal record (a map with the entry's fields) starts at ``off``."""
    try:
        obj = strict_loads(data[off:], max_size=MAX_RECORD + 4, allow_trailing=True)
    except MalformedError:  # cut short or garbage: not a whole record
        return False
    return isinstance(obj, dict) and set(obj) == _FIELDS


def _no_follow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK)


class Journal:
    def __init__(self, path: Path, mac_key: bytes, ops: FileOps) -> None:
        self.path = path
        self.mac_key = mac_key
        self.ops = ops

    def _mac(self, body: dict[str, Any]) -> bytes:
        return hmac_sha256(self.mac_key, canonical(body))

    def read(self) -> JournalReport:
        """Read and verify every complete record.

        Raises:
            IntegrityError: a record fails its MAC, breaks the hash chain or
                does not decode: the journal was tampered with.
        """
        entries: list[JournalEntry] = []
        tail = self._scan(entries.append)
        return JournalReport(tuple(entries), tail.torn, tail.good_length)

    def _scan(self, keep: Callable[[JournalEntry], None] | None = None,
              since: int | None = None) -> _Tail:
        """Verify the journal record by record, holding one record in memory at a time.

        ``keep`` receives each verified entry (``read`` keeps them all; ``append``
        needs only the chain's end, so a journal of years costs it no memory).
        With ``since``, refusals (and a suppression marker) at or after that time
        are counted.
        """
        n, prev, good, torn = 0, ZERO, 0, 0
        refused, suppressed = 0, False
        try:
            # never through a symlink or into a FIFO (the state directory is checked too)
            f = open(self.path, "rb", opener=_no_follow)
        except FileNotFoundError:
            return _Tail(0, ZERO, 0, 0)
        except OSError as exc:
            raise StorageError(f"cannot read the journal: {exc}") from exc
        with f:
            try:
                while True:
                    head = f.read(4)
                    if len(head) < 4:
                        torn = len(head)
                        break
                    (length,) = struct.unpack(">I", head)
                    if length > MAX_RECORD:
                        raise IntegrityError(f"journal record {n} declares {length} bytes")
                    raw = f.read(length)
                    if len(raw) < length:
                        if _whole_record_at(raw, 0):
                            # a crash only cuts the tail short; a complete record behind a
                            # length that runs past the end means the length was altered
                            raise IntegrityError(f"journal record {n} has a damaged length")
                        torn = 4 + len(raw)
                        break
                    try:
                        e = strict_loads(raw, max_size=MAX_RECORD)
                    except MalformedError as exc:
                        raise IntegrityError(f"journal record {n} does not decode") from exc
                    if not isinstance(e, dict) or set(e) != _FIELDS:
                        raise IntegrityError(f"journal record {n} has the wrong fields")
                    mac = e.pop("mac")
                    if not isinstance(mac, bytes) or not equal(mac, self._mac(e)):
                        raise IntegrityError(f"journal record {n} fails its MAC (tampered)")
                    if e["prev"] != prev or e["n"] != n:
                        raise IntegrityError(f"journal hash chain broken at record {n}")
                    prev = sha256(raw)
                    if since is not None and isinstance(e["time"], int) and e["time"] >= since:
                        refused += e["event"] == "refused"
                        suppressed = suppressed or e["event"] == "refusals-suppressed"
                    if keep is not None:
                        keep(JournalEntry(e["n"], e["time"], e["event"], e["data"], prev))
                    n += 1
                    good += 4 + length
            except OSError as exc:
                raise StorageError(f"cannot read the journal: {exc}") from exc
        return _Tail(n, prev, good, torn, refused, suppressed)

    def append(self, event: str, data: Any, now: int) -> JournalEntry:
        """Append one entry and fsync it; a torn tail from an earlier crash is cut off first."""
        # the whole chain is verified first: never append behind a tampered record
        return self._write(self._scan(), event, data, now)

    def append_refusal(self, data: Any, now: int,
                       limit: int = REFUSALS_PER_HOUR) -> JournalEntry | None:
        """Journal a refusal, at most ``limit`` an hour.

        Past the limit one ``refusals-suppressed`` entry says so, and further
        refusals in that hour are not written (None): the caller's refusal stands
        all the same. Entries dated after ``now`` count too, so setting the clock
        back does not reopen the window.
        """
        rep = self._scan(since=now - REFUSAL_WINDOW)
        if rep.refused < limit:
            return self._write(rep, "refused", data, now)
        if not rep.suppressed:
            return self._write(rep, "refusals-suppressed",
                               {"limit": limit, "window_seconds": REFUSAL_WINDOW}, now)
        return None

    def _write(self, rep: _Tail, event: str, data: Any, now: int) -> JournalEntry:
        body = {"n": rep.count, "time": now, "event": event, "data": data, "prev": rep.prev}
        record = canonical({**body, "mac": self._mac(body)})
        blob = struct.pack(">I", len(record)) + record
        fd = -1
        try:
            fd = self.ops.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            if rep.torn:
                self.ops.ftruncate(fd, rep.good_length)
            os.lseek(fd, rep.good_length, os.SEEK_SET)
            write_all(self.ops, fd, blob)
            self.ops.fsync(fd)
        except OSError as exc:
            if fd >= 0:
                try:
                    self.ops.ftruncate(fd, rep.good_length)
                except OSError:
                    pass
            raise StorageError(f"could not append to the journal: {exc}") from exc
        finally:
            if fd >= 0:
                try:
                    self.ops.close(fd)
                except OSError:
                    pass
        return JournalEntry(body["n"], now, event, data, sha256(record))

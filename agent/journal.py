"""Append-only audit journal: hash-chained, MAC-protected entries, one fsync per entry.

File format: a sequence of records, each a 4-byte big-endian length followed
by that many bytes of canonical CBOR::

    entry = {"n": uint, "time": uint, "event": tstr, "data": any,
             "prev": bstr .size 32, "mac": bstr .size 32}

``prev`` is the SHA-256 of the previous record's CBOR bytes (32 zero bytes for
the first); ``mac`` is HMAC-SHA256 with a key derived from the device key over
the entry without ``mac``. A record cut short by a crash (a torn tail) is
reported by :meth:`Journal.read` and cut off before the next append.

The store's slots name the journal's head (:class:`JournalHead`: the record that
committed the slot's state), so opening a store verifies that record and those
after it only (:meth:`Journal.since_head`), and an append costs the same with ten
records or ten thousand: the end of the chain is kept in memory and checked against
the file's size before each append (no re-read of the chain).
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

__all__ = ["EMPTY_HEAD", "Journal", "JournalEntry", "JournalHead", "JournalReport"]

#: a record carries at most a response or trust update file (64 KiB by default) and its
#: details; the cap bounds what one length prefix can make a reader allocate
MAX_RECORD = 1024 * 1024
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
class JournalHead:
    """Where the journal stood when a slot was written: its last record, by position and hash.

    ``count`` records up to and including the one at bytes ``start``..``end`` (length
    prefix included), whose CBOR bytes hash to ``digest``; ``(0, 0, 0, ZERO)`` for an
    empty journal.
    """

    count: int
    start: int
    end: int
    digest: bytes
    #: the journal file's identity ``(st_ino, st_size, st_ctime_ns)`` right after this
    #: process appended the head record (or verified the chain), None if unknown: a
    #: journal still of that identity was not changed since, so opening checks the
    #: head record only; any other is verified whole once (:meth:`Journal.since_head`)
    file: tuple[int, int, int] | None = None

    def to_cbor(self) -> list[Any]:
        base: list[Any] = [self.count, self.start, self.end, self.digest]
        return base if self.file is None else [*base, list(self.file)]

    @classmethod
    def from_cbor(cls, v: Any) -> JournalHead:
        if (not isinstance(v, list) or len(v) not in (4, 5)
                or not all(type(x) is int and x >= 0 for x in v[:3])
                or not isinstance(v[3], bytes) or len(v[3]) != 32
                or not v[1] <= v[2] or (v[0] == 0) != (v[2] == 0)):
            raise MalformedError("journal head is not [count, start, end, digest, ? file]")
        file: tuple[int, int, int] | None = None
        if len(v) == 5:
            f = v[4]
            if (not isinstance(f, list) or len(f) != 3
                    or not all(type(x) is int and x >= 0 for x in f)):
                raise MalformedError("journal head's file is not [ino, size, ctime_ns]")
            file = (f[0], f[1], f[2])
        return cls(v[0], v[1], v[2], v[3], file)


EMPTY_HEAD = JournalHead(0, 0, 0, ZERO)


@record(frozen=True)
class _Tail:
    count: int  # verified records
    prev: bytes  # digest of the last one (the chain's end)
    good_length: int  # bytes of whole records
    torn: int  # bytes of an incomplete last record
    refused: int = 0  # refusals since ``since`` (see _scan)
    suppressed: bool = False  # a refusals-suppressed entry since ``since``
    last_start: int = 0  # where the last whole record begins

    def head(self) -> JournalHead:
        if not self.count:
            return EMPTY_HEAD
        return JournalHead(self.count, self.last_start, self.good_length, self.prev)


@record(frozen=True)
class _Start:
    """Where a scan begins: a verified record's end (the file's start by default)."""

    count: int = 0
    prev: bytes = ZERO
    offset: int = 0


_FIELDS = frozenset({"n", "time", "event", "data", "prev", "mac"})
#: how a canonical record starts: a map of six, ``"n"`` and its value, then the MAC's key
#: and a 32-byte string head (:meth:`Journal._mac_in_place`)
_MAC_KEY = b"\x63mac\x58\x20"
_N_LEAD = tuple(b"\xa6\x61n" + canonical(i) for i in range(24))


@record(frozen=True)
class JournalReport:
    entries: tuple[JournalEntry, ...]
    torn_tail: int  # bytes of an incomplete last record, 0 if none
    good_length: int
    records: int = 0  # verified records (``entries`` may be left empty: Journal.read)


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
        #: the chain's end as last verified or written, and the file size it stands for
        self._tail: _Tail | None = None
        #: where refusal counting and a fresh scan begin (the slot's head, once known)
        self._start = _Start()
        #: the file's identity (:attr:`JournalHead.file`) while ``_tail`` is the chain's
        #: end this process wrote or verified whole, with that very tail object
        self._ident: tuple[_Tail, tuple[int, int, int]] | None = None
        #: whether the last :meth:`since_head` verified the whole chain (the file's identity
        #: was not the slot's) rather than the head record and those after it only
        self.verified_whole = False
        #: the last record this process appended: (the tail it made, its bytes with their
        #: length prefix, the file's identity right after the append); see :meth:`written`
        self._written: tuple[_Tail, bytes, tuple[int, int, int]] | None = None

    def _mac(self, body: dict[str, Any]) -> bytes:
        return hmac_sha256(self.mac_key, canonical(body))

    def _seal(self, body: dict[str, Any]) -> bytes:
        """``canonical({**body, "mac": MAC over canonical(body)})``, the body encoded once.

        In canonical order ``"n"`` (the shortest key) comes first and ``"mac"`` second,
        so the record is the body's bytes with the map head of six and the MAC's entry
        put in after ``"n"`` and its value (the layout :meth:`_mac_in_place` reads).
        """
        enc = canonical(body)
        mac = hmac_sha256(self.mac_key, enc)
        cut = 3 + len(canonical(body["n"]))  # map head, "n", its value
        if enc[0] != 0xA5 or enc[1:3] != b"\x61n":  # never: five keys, "n" first
            return canonical({**body, "mac": mac})
        return b"\xa6" + enc[1:cut] + _MAC_KEY + mac + enc[cut:]

    def read(self, entries: bool = True) -> JournalReport:
        """Read and verify every complete record.

        ``entries=False`` verifies the same way but keeps no entry (``journal --verify``
        needs only the count): no memory for a journal of years.

        Raises:
            IntegrityError: a record fails its MAC, breaks the hash chain or
                does not decode: the journal was tampered with.
        """
        kept: list[JournalEntry] = []
        tail = self._scan(kept.append if entries else None)
        return JournalReport(tuple(kept), tail.torn, tail.good_length, tail.count)

    def _mac_in_place(self, raw: bytes, n: int, mac: bytes) -> bool:
        """Whether ``mac`` holds over the body as written, taken from ``raw`` without re-encoding.

        A record is written canonically, so its bytes are ``{"n": n, "mac": ...}`` first
        (the shortest keys), then the other fields: the body the MAC covers is those
        bytes less the ``mac`` entry, with a map head of five. True only if ``raw`` has
        exactly that layout and the MAC over the body holds, which makes ``raw`` the
        very record the key's holder wrote; otherwise the caller re-encodes the decoded
        body (:meth:`_mac`), so what is accepted is unchanged.
        """
        if n < 24:
            lead = _N_LEAD[n]
        elif n < 0x100:
            lead = b"\xa6\x61n\x18" + n.to_bytes(1, "big")
        elif n < 0x10000:
            lead = b"\xa6\x61n\x19" + n.to_bytes(2, "big")
        else:
            lead = b"\xa6\x61n" + canonical(n)
        at = len(lead)
        if raw[:at] != lead or raw[at:at + 6] != _MAC_KEY or len(mac) != 32:
            return False
        body = b"\xa5" + raw[1:at] + raw[at + 38:]
        return equal(mac, hmac_sha256(self.mac_key, body)) and raw[at + 6:at + 38] == mac

    def _verified(self, raw: bytes, n: int, prev: bytes) -> dict[str, Any]:
        """Record ``n``'s decoded body, checked: fields, MAC, index and link to ``prev``."""
        try:
            e = strict_loads(raw, max_size=MAX_RECORD)
        except MalformedError as exc:
            raise IntegrityError(f"journal record {n} does not decode") from exc
        if not isinstance(e, dict) or e.keys() != _FIELDS:
            raise IntegrityError(f"journal record {n} has the wrong fields")
        mac = e.pop("mac")
        if not isinstance(mac, bytes) or not (self._mac_in_place(raw, n, mac)
                                              or equal(mac, self._mac(e))):
            raise IntegrityError(f"journal record {n} fails its MAC (tampered)")
        if e["prev"] != prev or e["n"] != n:
            raise IntegrityError(f"journal hash chain broken at record {n}")
        return e

    def _scan(self, keep: Callable[[JournalEntry], None] | None = None,
              since: int | None = None, start: _Start | None = None) -> _Tail:
        """Verify the journal record by record, holding one record in memory at a time.

        ``keep`` receives each verified entry (``read`` keeps them all; ``append``
        needs only the chain's end, so a journal of years costs it no memory).
        With ``since``, refusals (and a suppression marker) at or after that time
        are counted. ``start``: begin after an already verified record (the
        store's head) rather than at the first byte.
        """
        at = start or _Start()
        n, prev, good, torn, last = at.count, at.prev, at.offset, 0, at.offset
        refused, suppressed = 0, False
        try:
            # never through a symlink or into a FIFO (the state directory is checked too)
            f = open(self.path, "rb", opener=_no_follow)
        except FileNotFoundError:
            if at.offset:
                raise IntegrityError(f"{self.path} is missing") from None
            return _Tail(0, ZERO, 0, 0)
        except OSError as exc:
            raise StorageError(f"cannot read the journal: {exc}") from exc
        with f:
            try:
                f.seek(at.offset)
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
                    e = self._verified(raw, n, prev)
                    prev = sha256(raw)
                    if since is not None and isinstance(e["time"], int) and e["time"] >= since:
                        refused += e["event"] == "refused"
                        suppressed = suppressed or e["event"] == "refusals-suppressed"
                    if keep is not None:
                        keep(JournalEntry(e["n"], e["time"], e["event"], e["data"], prev))
                    n += 1
                    last = good
                    good += 4 + length
            except OSError as exc:
                raise StorageError(f"cannot read the journal: {exc}") from exc
        return _Tail(n, prev, good, torn, refused, suppressed, last)

    def since_head(self, head: JournalHead) -> list[JournalEntry]:
        """Check the record a slot names as its head, and return the verified records after it.

        If the journal file's identity (inode, size, change time) is the one the slot
        records (:attr:`JournalHead.file`), the file was not changed since this agent
        last wrote it (no unprivileged process can set a change time back): the head
        record and what follows it are read only, so opening a store costs the same
        however long the journal is. Otherwise (copied, restored, edited, or a record
        appended after the slot) the whole chain is verified once, as
        ``licagent journal --verify`` does (:attr:`verified_whole`).

        Raises:
            IntegrityError: the journal is missing, shorter than the head, its record
                there is not the one the slot names (the journal was deleted, emptied,
                cut or replaced by an older copy), or a record before it is damaged.
        """
        where = (f"the store's slot names {head.count} journal records ending at byte "
                 f"{head.end}")
        self.verified_whole = False
        try:
            f = open(self.path, "rb", opener=_no_follow)
        except FileNotFoundError:
            if head.count:
                raise IntegrityError(
                    f"{self.path} is missing, but {where}: the journal was deleted"
                ) from None
            f = None
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from exc
        ident: tuple[int, int, int] | None = None
        blob = b""
        try:
            size = 0
            if f is not None:
                # taken before anything is read: a change after it changes the change time
                st = os.fstat(f.fileno())
                size, ident = st.st_size, (st.st_ino, st.st_size, st.st_ctime_ns)
            if size < head.end:
                what = "emptied" if size == 0 else "cut short"
                raise IntegrityError(
                    f"{self.path} holds {size} bytes, but {where}: the journal was {what} "
                    f"(or an older copy put back)"
                )
            if head.count and f is not None:
                f.seek(head.start)
                blob = f.read(head.end - head.start)
        except OSError as exc:
            raise StorageError(f"cannot read {self.path}: {exc}") from exc
        finally:
            if f is not None:
                f.close()
        if head.count:
            raw = blob[4:]
            try:
                if int.from_bytes(blob[:4], "big") != len(raw) or sha256(raw) != head.digest:
                    raise IntegrityError("another record")
                self._verified(raw, head.count - 1, strict_loads(
                    raw, max_size=MAX_RECORD).get("prev", b""))
            except (IntegrityError, MalformedError, AttributeError) as exc:
                raise IntegrityError(
                    f"{self.path} does not hold the record the store's slot names (record "
                    f"{head.count - 1} at byte {head.start}): the journal was replaced or "
                    f"altered"
                ) from exc
        self._start = _Start(head.count, head.digest, head.end)
        entries: list[JournalEntry] = []
        if ident is not None and head.file == ident:
            tail = self._scan(entries.append, start=self._start)
        else:
            self.verified_whole = True

            def keep(e: JournalEntry) -> None:
                if e.n >= head.count:
                    entries.append(e)

            try:
                tail = self._scan(keep)
            except IntegrityError as exc:
                raise IntegrityError(
                    f"{self.path} is damaged before the record the store's slot names: "
                    f"{exc}"
                ) from exc
            if tail.count < head.count:  # cannot be: the head record was found in place
                raise IntegrityError(f"{self.path} holds fewer records than {where}")
        self._remember(tail)
        if ident is not None:
            self._ident = (tail, ident)  # the chain as verified here, this file
        return entries

    def anchor(self, head: JournalHead) -> None:
        """A slot naming ``head`` was just written: scans start there, as after :meth:`since_head`.

        Only for a journal already anchored (its chain verified up to ``head``).
        """
        if self._start.count and head.count:
            self._start = _Start(head.count, head.digest, head.end)

    def tail_token(self) -> object:
        """The chain's end as known in memory: a new object after every append, take-back
        or re-read (what :meth:`agent.store.Store.write_mark` compares by identity)."""
        return self._tail

    def written(self) -> tuple[int, bytes, tuple[int, int, int]] | None:
        """(where it starts, its bytes, the file's identity then) of the journal's last
        record, if this process appended it and nothing was appended, taken back or re-read
        since; else None. What the file holds from that record on, as this process left it
        (:meth:`agent.store.OpenStore.after`)."""
        w = self._written
        if w is None or w[0] is not self._tail or w[0].torn:
            return None
        return w[0].last_start, w[1], w[2]

    def _remember(self, tail: _Tail) -> None:
        self._tail = tail

    def _known_ident(self, tail: _Tail | None) -> tuple[int, int, int] | None:
        """The file's identity if ``tail`` is the chain's end this process last wrote or
        verified (the same records), else None."""
        i = self._ident
        if i is None or tail is None:
            return None
        t = i[0]
        if t is tail or (t.count, t.prev, t.good_length, t.torn) == (
                tail.count, tail.prev, tail.good_length, tail.torn):
            return i[1]
        return None

    def identity(self) -> tuple[int, int, int] | None:
        """The file's identity for a slot written now (:attr:`JournalHead.file`): known only
        while the chain's end is the one this process last wrote or verified."""
        return self._known_ident(self._tail)

    def _current(self) -> _Tail:
        """The chain's end: the one in memory if the file is still the size it stands for.

        Only a journal anchored at a store's head (:meth:`since_head`, the store lock
        held) trusts its memory; a bare journal verifies its whole chain each time.
        """
        t = self._tail
        if t is not None and self._start.count:  # anchored by since_head, under the lock
            try:
                if os.stat(self.path).st_size == t.good_length + t.torn:
                    return t
            except OSError:
                pass
        t = self._scan(start=self._start)
        self._remember(t)
        return t

    def head(self) -> JournalHead:
        """The head a slot written now records: the journal's last whole record (and the
        file's identity, when known: :meth:`identity`)."""
        h = self._current().head()
        ident = self.identity()
        if ident is None or not h.count:
            return h
        return JournalHead(h.count, h.start, h.end, h.digest, ident)

    def appended_head(self) -> JournalHead | None:
        """:meth:`head` right after this process's own append (the slot a commit writes
        next names it), from memory: that append's tail and the file's identity taken by
        ``fstat`` after its fsync; None if anything was appended, taken back or re-read
        since, or the journal is not anchored (then :meth:`head` reads the file again)."""
        w = self._written
        t = self._tail
        if w is None or t is None or w[0] is not t or t.torn or not self._start.count:
            return None  # (a journal not anchored at a store's head trusts no memory)
        h = t.head()
        ident = self.identity()
        if ident is None or not h.count:
            return h
        return JournalHead(h.count, h.start, h.end, h.digest, ident)

    def append(self, event: str, data: Any, now: int) -> JournalEntry:
        """Append one entry and fsync it; a torn tail from an earlier crash is cut off first.

        Costs the same whatever the journal's length: the chain's end is known from
        the last verification or write (never appended behind an unverified record).
        """
        return self._write(self._current(), event, data, now)

    def append_refusal(self, data: Any, now: int,
                       limit: int = REFUSALS_PER_HOUR) -> JournalEntry | None:
        """Journal a refusal, at most ``limit`` an hour.

        Past the limit one ``refusals-suppressed`` entry says so, and further
        refusals in that hour are not written (None): the caller's refusal stands
        all the same. Entries dated after ``now`` count too, so setting the clock
        back does not reopen the window. Counted from the store's head on (the
        records since the last slot save).
        """
        rep = self._scan(since=now - REFUSAL_WINDOW, start=self._start)
        self._remember(rep)
        if rep.refused < limit:
            return self._write(rep, "refused", data, now)
        if not rep.suppressed:
            return self._write(rep, "refusals-suppressed",
                               {"limit": limit, "window_seconds": REFUSAL_WINDOW}, now)
        return None

    def truncate_to(self, end: int) -> None:
        """Take back records appended from offset ``end`` on (where the first of them
        begins: a commit whose slot write failed)."""
        fd = -1
        try:
            fd = self.ops.open(str(self.path), os.O_WRONLY | os.O_NOFOLLOW)
            self.ops.ftruncate(fd, end)
            self.ops.fsync(fd)
        except OSError as exc:
            raise StorageError(f"could not take back the journal record: {exc}") from exc
        finally:
            self._tail = None
            self._ident = None
            if fd >= 0:
                try:
                    self.ops.close(fd)
                except OSError:
                    pass

    def _write(self, rep: _Tail, event: str, data: Any, now: int) -> JournalEntry:
        body = {"n": rep.count, "time": now, "event": event, "data": data, "prev": rep.prev}
        record = self._seal(body)
        if len(record) > MAX_RECORD:
            raise StorageError(f"journal record of {len(record)} bytes is over the "
                               f"{MAX_RECORD}-byte limit")
        blob = struct.pack(">I", len(record)) + record
        # the identity is carried forward only if the file is still the one this process
        # wrote or verified (or holds no record): never vouch for a chain changed meanwhile
        known = None if rep.count else (0, 0, 0)
        known = known or self._known_ident(rep)
        carried = False
        fd = -1
        try:
            fd = self.ops.open(str(self.path), os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            if known is not None:
                st0 = os.fstat(fd)
                carried = not rep.count or (st0.st_ino, st0.st_size, st0.st_ctime_ns) == known
            if rep.torn:
                self.ops.ftruncate(fd, rep.good_length)
            os.lseek(fd, rep.good_length, os.SEEK_SET)
            write_all(self.ops, fd, blob)
            self.ops.fsync(fd)
            st = os.fstat(fd)  # after the fsync: what the slot written next records
        except OSError as exc:
            self._tail = None
            if fd >= 0:
                try:
                    self.ops.ftruncate(fd, rep.good_length)
                except OSError:
                    pass
            raise StorageError(f"could not append to the journal: {exc.strerror or exc} "
                               f"(errno {exc.errno})") from exc
        finally:
            if fd >= 0:
                try:
                    self.ops.close(fd)
                except OSError:
                    pass
        digest = sha256(record)
        self._tail = _Tail(rep.count + 1, digest, rep.good_length + len(blob), 0,
                           last_start=rep.good_length)
        ident = (st.st_ino, st.st_size, st.st_ctime_ns)
        self._ident = (self._tail, ident) if carried else None
        self._written = (self._tail, blob, ident)
        return JournalEntry(body["n"], now, event, data, digest)

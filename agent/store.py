"""The trusted license store on disk: atomic, MAC-protected, bound to its hardware.

Layout of a state directory::

    device.key   the device's private key (PEM PKCS#8, mode 0600); never leaves the store
    device.tpm   instead of device.key when the key lives in a TPM (agent/tpm.py): which
                 TPM, key and monotonic counter; a slot older than the counter is refused
    state.0      slot 0 } the state alternates between two slots, each written with the
    state.1      slot 1 } recipe below and holding two MAC-protected copies of the state
    journal.log  append-only, hash-chained, MAC-protected audit journal
    lock         advisory lock so that the daemon and CLI calls never interleave

The directory and each of these files must belong to the user the agent runs as
and be writable by nobody else, and no file is followed through a symbolic link
(:func:`check_state_dir`, :func:`read_state_file`): a refusal is an
:class:`~agent.errors.UnsafeFileError`, exit 8, with the store left as it is.

Write recipe (per slot): temporary file in the same directory, write, fsync,
close, ``os.replace``, fsync the directory. Each syscall goes through
:class:`FileOps`, so tests can fail or crash at every step.

Commit order (write-ahead): the journal record is appended and fsynced first, then
the slot is written; the slot records the journal's head (the record of its own
commit) and the journal file's identity right after that append (inode, size,
change time). Opening checks that record and replays the ones after it, so a crash
between the two writes, an older slot put back or a damaged newest slot all end
at the newest committed state; a journal shorter than the head is refused. A
journal whose identity is not the slot's (copied, restored, edited) has its whole
chain verified first: a damaged earlier record is refused too (exit 8).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent import protocol
from agent.cose import SigningKey, canonical, strict_loads
from agent.digest import equal, hmac_sha256
from agent.durable import (
    FileOps,
    atomic_write,
    check_private,
    check_private_dir,
    describe,
    kind_at,
    read_capped,
)
from agent.errors import (
    CopiedStoreError,
    FactsOverrideError,
    IntegrityError,
    LicensingError,
    MalformedError,
    ReadOnlyStoreError,
    RestoredStoreError,
    StorageError,
    UnsafeFileError,
    UsageError,
)
from agent.identity import binding_refusal, check_binding, check_facts_source
from agent.journal import EMPTY_HEAD, Journal, JournalEntry, JournalHead
from agent.protocol import DEFAULT_LIMITS, AgentState, Limits
from agent.record import field, record

__all__ = [
    "STATE_FILES",
    "FileOps",
    "KeptLock",
    "LoadReport",
    "OpenStore",
    "Store",
    "check_state_dir",
    "decode_slot",
    "decode_slot_head",
    "encode_slot",
    "read_state_file",
    "store_lock",
]

SLOT_MAGIC = "licagent-store"
SLOT_VERSION = 2  # 2 records the journal head; 1 (read, never written) did not
SLOT_V1 = 1
#: records past the slot's head that a store open replays or skips before it re-saves the
#: slot (a save moves the head to the journal's end), so opening stays cheap
RESAVE_AFTER = 256
MAX_SLOT = 1024 * 1024
KEY_FILE = "device.key"
SLOTS = ("state.0", "state.1")
JOURNAL_FILE = "journal.log"
LOCK_FILE = "lock"
#: every file of a state directory: each is checked (regular, private, same filesystem)
#: before the store is used, and read only through :func:`read_state_file`
STATE_FILES = (KEY_FILE, *SLOTS, JOURNAL_FILE, LOCK_FILE, "device.tpm")
TPM_FILE = "device.tpm"  # agent.tpm.TPM_FILE, named here so opening imports agent.tpm only for it
MAX_KEY = 64 * 1024


def check_state_dir(directory: Path) -> None:
    """Refuse a state directory someone else could change, or a state file that is not a
    private regular file in it (a symlink, a FIFO, a device node, another filesystem).

    Once the directory itself is private, only its owner can swap an entry, so what
    is checked here stays true while the store is open.

    Raises:
        FileNotFoundError: there is no such directory.
        UnsafeFileError: the directory or a file fails a check (one line naming it).
    """
    dfd = check_private_dir(directory)
    try:
        _check_entries(dfd, directory)
    finally:
        os.close(dfd)


def _check_entries(dfd: int, directory: Path) -> dict[str, int]:
    """:func:`check_state_dir`'s check of each state file, in the open directory ``dfd``;
    returns the size of each that exists."""
    euid = os.geteuid()
    dev = os.fstat(dfd).st_dev
    sizes: dict[str, int] = {}
    for name in STATE_FILES:
        st = kind_at(dfd, name)
        if st is None:
            continue
        if (stat.S_ISREG(st.st_mode) and st.st_dev == dev
                and st.st_uid == euid and not st.st_mode & 0o022):
            sizes[name] = st.st_size
            continue  # the common case, without building a message
        label = os.path.join(directory, name)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{label} is {describe(st.st_mode)}, expected a regular "
                                  f"file of the license store; refused (nothing read or "
                                  f"written through it)")
        if st.st_dev != dev:
            raise UnsafeFileError(f"{label} is on another filesystem than {directory}, "
                                  f"expected a file of the state directory itself; refused")
        check_private(st, label)
        sizes[name] = st.st_size
    return sizes


def read_state_file(directory: Path, name: str, cap: int) -> bytes:
    """Read a state file (at most ``cap + 1`` bytes), never through a symlink nor blocking on
    a FIFO.

    One open and one ``fstat``: :func:`check_state_dir` has already refused a device
    node, and in a private directory no one else can swap the entry in between (this
    is on the path of every ``check``).

    Raises:
        FileNotFoundError: the file is not there.
        UnsafeFileError: it is not a regular file.
        OSError: it cannot be read.
    """
    path = os.path.join(directory, name)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{path} is a symbolic link, expected a regular file of the "
                                  f"license store; refused") from exc
        raise
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFileError(f"{path} is {describe(st.st_mode)}, expected a regular file "
                                  f"of the license store; refused")
        return read_capped(f, cap)


@record
class LoadReport:
    """What loading found: which slot, and every anomaly worth telling the operator."""

    slot: int
    generation: int
    warnings: list[str] = field(default_factory=list)


def _mac(key: bytes, generation: int, state_bytes: bytes,
         head: JournalHead | None = None) -> bytes:
    if head is None:  # slot format 1
        return hmac_sha256(key, canonical([SLOT_MAGIC, SLOT_V1, generation, state_bytes]))
    msg = canonical([SLOT_MAGIC, SLOT_VERSION, generation, state_bytes, head.to_cbor()])
    return hmac_sha256(key, msg)


def encode_slot(key: bytes, generation: int, state_bytes: bytes,
                head: JournalHead | None = None) -> bytes:
    """A slot file: format 2 with the journal ``head``; format 1 (tests of old stores) without."""
    if head is None:
        mac = _mac(key, generation, state_bytes, head)
        copy: list[Any] = [SLOT_MAGIC, SLOT_V1, generation, state_bytes, mac]
        # two identical copies: a flipped bit or a torn tail in one leaves the other intact
        return canonical([copy, copy])
    # the MAC's message is the copy less its last item: [magic, version, generation, state,
    # head] (an array of five); the copy is that array made one of six, with the MAC after
    msg = canonical([SLOT_MAGIC, SLOT_VERSION, generation, state_bytes, head.to_cbor()])
    mac = hmac_sha256(key, msg)
    copy_bytes = b"\x86" + msg[1:] + canonical(mac)
    return b"\x82" + copy_bytes + copy_bytes  # two identical copies, as above


def decode_slot(key: bytes, data: bytes) -> tuple[int, bytes, list[str]]:
    """Return (generation, state bytes, warnings) from the first copy whose MAC holds."""
    gen, sb, _head, warnings = decode_slot_head(key, data)
    return gen, sb, warnings


def _copy_fields(key: bytes, c: Any) -> tuple[int, bytes, JournalHead | None] | None:
    """(generation, state bytes, head or None for format 1) of a good copy, else None."""
    if not isinstance(c, list) or len(c) not in (5, 6) or c[0] != SLOT_MAGIC:
        return None
    if not (isinstance(c[2], int) and isinstance(c[3], bytes) and isinstance(c[-1], bytes)):
        return None
    head: JournalHead | None = None
    if len(c) == 6 and c[1] == SLOT_VERSION:
        try:
            head = JournalHead.from_cbor(c[4])
        except MalformedError:
            return None
    elif not (len(c) == 5 and c[1] == SLOT_V1):
        return None
    if not equal(_mac(key, c[2], c[3], head), c[-1]):
        return None
    return c[2], c[3], head


def decode_slot_head(key: bytes, data: bytes
                     ) -> tuple[int, bytes, JournalHead | None, list[str]]:
    """Return (generation, state bytes, journal head, warnings) from the first good copy.

    The head is None for a slot of format 1 (written before slots recorded it).
    """
    warnings: list[str] = []
    copies: list[Any] = []
    try:
        outer = strict_loads(data, max_size=MAX_SLOT)
        if isinstance(outer, list):
            copies = outer[:2]
    except MalformedError as exc:
        warnings.append(f"slot does not decode as a whole ({exc})")
    if not copies:
        copies = _salvage_copies(data)
    for i, c in enumerate(copies):
        got = _copy_fields(key, c)
        if got is not None:
            if i:
                warnings.append("first copy of the slot is damaged; the second copy was used")
            return got[0], got[1], got[2], warnings
    raise IntegrityError("no copy in the slot passes its integrity check")


def _salvage_copies(data: bytes) -> list[Any]:
    """Find a copy in a damaged slot file: try decoding from each plausible offset."""
    found: list[Any] = []
    magic = canonical(SLOT_MAGIC)
    start = 0
    while len(found) < 2:
        i = data.find(magic, start)
        if i < 1:
            if i == 0:
                start = 1
                continue
            break
        try:
            found.append(strict_loads(data[i - 1:], max_size=MAX_SLOT, allow_trailing=True))
        except MalformedError:
            pass  # not a copy starting here; the MAC decides for the ones that decode
        start = i + 1
    return found


def _remove_stale_temporaries(directory: Path) -> None:
    """Delete temporary files a crashed writer left behind (callers hold the store lock)."""
    for p in directory.glob(".*.tmp*"):
        try:
            p.unlink()
        except OSError:
            pass


class Store:
    """A device's trusted store in a directory. Use :meth:`open` or :meth:`create`."""

    def __init__(
        self,
        directory: Path,
        key: SigningKey,
        state: AgentState,
        generation: int,
        slot: int,
        ops: FileOps,
        report: LoadReport,
        head: JournalHead | None = EMPTY_HEAD,
        writable: bool = True,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.directory = directory
        self.key = key
        self.state = state
        self.generation = generation
        self.slot = slot
        self.ops = ops
        self.report = report
        #: the journal head the loaded slot records (None: a slot of format 1)
        self.head = head
        #: False on a read-only file system: reading works, every write is refused
        self.writable = writable
        self.limits = limits
        #: (the state's binding and simulated mark, the facts, facts given as data) that
        #: last passed :meth:`check_hardware`
        self._hw_passed: tuple[tuple[str, ...], bool, tuple[str, ...], bool] | None = None
        #: (generation, slot index, bytes) of the last slot this object wrote
        self.saved: tuple[int, int, bytes] | None = None
        self.mac_key = key.secret_digest(b"store-mac")
        self._slot_paths = (os.path.join(directory, SLOTS[0]), os.path.join(directory, SLOTS[1]))
        self.journal = Journal(directory / JOURNAL_FILE, key.secret_digest(b"journal-mac"), ops)

    # ------------------------------------------------------------ creation / loading

    @classmethod
    def create(
        cls, directory: Path, key: SigningKey, state: AgentState, ops: FileOps | None = None
    ) -> Store:
        ops = ops or FileOps()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_state_dir(directory)
        if any(os.path.lexists(directory / n) for n in (KEY_FILE, TPM_FILE, *SLOTS)):
            raise UsageError(
                f"{directory} already holds a license store; refusing to overwrite it"
            )
        _require_writable_dir(directory, "initialise a license store")
        tpm_file = getattr(key, "to_file", None)  # a TPM key (issue 16 item 6)
        key_name = KEY_FILE if tpm_file is None else TPM_FILE
        atomic_write(ops, directory / key_name, key.to_pem() if tpm_file is None
                     else tpm_file(), 0o600)
        store = cls(directory, key, state, 0, 1, ops, LoadReport(1, 0))
        try:
            # a journal left by an init that failed before its slot belongs to no store
            (directory / JOURNAL_FILE).unlink(missing_ok=True)
            # write-ahead like every commit: the init record, then the slot naming it
            store.journal.append("init", {"device_id": state.device_id, "model": state.model,
                                           "sequence": state.sequence}, state.created)
            store.save(state)
        except (StorageError, OSError) as exc:
            # a half-provisioned directory would block a retried init: take it all back
            for n in (SLOTS[0], JOURNAL_FILE, key_name):
                try:
                    (directory / n).unlink()
                except OSError:
                    pass
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"could not initialise the store in {directory}: {exc}") from exc
        return store

    @classmethod
    def open(
        cls, directory: Path, binding_facts: tuple[str, ...] | None = None,
        ops: FileOps | None = None, now: int = 0, facts_simulated: bool = False,
        writable: bool | None = None, limits: Limits = DEFAULT_LIMITS,
    ) -> Store:
        """Load the last good state; check it still sits on the same hardware.

        Args:
            binding_facts: the hardware's facts now; None skips the binding check
                (used only by tests that look at the raw store).
            facts_simulated: ``binding_facts`` were given as data, not read from this
                machine; refused (the slots untouched, the refusal journaled) unless
                the store was initialised that way.
            writable: whether the store may be written; None asks the file system
                (False on a read-only mount: the state is read, nothing is written).

        Raises:
            UsageError: no store in ``directory``.
            IntegrityError: no slot passes its integrity check (never reset to empty),
                or the journal does not match the slot (missing, emptied, cut, altered).
            CopiedStoreError: the store was copied from other hardware.
            FactsOverrideError: facts given as data for a store bound to real hardware.
        """
        ops = ops or FileOps()
        key_path = directory / KEY_FILE
        tpm_data: bytes | None = None
        try:
            check_state_dir(directory)
            try:
                pem = read_state_file(directory, KEY_FILE, MAX_KEY)
            except FileNotFoundError:
                key_path = directory / TPM_FILE
                tpm_data = read_state_file(directory, TPM_FILE, MAX_KEY)
        except FileNotFoundError as exc:
            raise UsageError(
                f"no license store in {directory} (run 'licagent init' first)"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key_path}: {exc}") from exc
        key: SigningKey
        if tpm_data is not None:
            from agent.tpm import load_key  # only for a TPM store: subprocess, tempfile

            key = load_key(tpm_data, str(key_path))
        else:
            if len(pem) > MAX_KEY:
                raise IntegrityError(f"device key {key_path} is larger than {MAX_KEY} bytes")
            try:
                key = SigningKey.from_pem(pem)
            except MalformedError as exc:
                raise IntegrityError(f"device key {key_path} is damaged: {exc}") from exc
        if writable is None:
            writable = not _read_only(directory)
        mac_key = key.secret_digest(b"store-mac")
        if writable:
            _remove_stale_temporaries(directory)
        best: tuple[int, int, bytes, JournalHead | None] | None = None
        warnings: list[str] = []
        missing: list[str] = []
        for idx, name in enumerate(SLOTS):
            try:
                data = read_state_file(directory, name, MAX_SLOT)
            except FileNotFoundError:
                missing.append(name)
                continue
            except OSError as exc:
                warnings.append(f"{name} unreadable: {exc}")
                continue
            try:
                gen, sb, head, w = decode_slot_head(mac_key, data)
            except IntegrityError as exc:
                warnings.append(f"{name} is damaged ({exc}); ignored")
                continue
            warnings.extend(f"{name}: {x}" for x in w)
            if best is None or gen > best[0]:
                best = (gen, idx, sb, head)
        if best is None:
            raise IntegrityError(
                f"no intact license state in {directory}: both slots are missing or fail their "
                f"integrity check. The store is NOT reset; restore it from a backup or "
                f"re-provision the device with the vendor."
            )
        gen, idx, sb, head = best
        try:
            state = AgentState.from_cbor(strict_loads(sb, max_size=MAX_SLOT))
        except MalformedError as exc:
            raise IntegrityError(f"stored state does not decode: {exc}") from exc
        if state.device_key != key.public:
            raise IntegrityError("stored state belongs to a different device key")
        check_generation = getattr(key, "check_generation", None)
        lost_newest = False
        if check_generation is not None:  # the TPM's counter: a restored store is refused
            # the other slot damaged or gone: the counter may be one ahead, for that slot
            other_lost = SLOTS[1 - idx] in missing or any(
                w.startswith(SLOTS[1 - idx] + " ") for w in warnings)
            lost_newest = check_generation(gen, f"{directory / SLOTS[idx]}", other_lost)
        if missing and gen >= 2:
            # after two saves both slots exist: one vanished
            warnings.extend(f"{n} is missing" for n in missing)
        if warnings:
            warnings.append(f"using {SLOTS[idx]} (generation {gen}), the last good state")
        store = cls(directory, key, state, gen, idx, ops, LoadReport(idx, gen, warnings),
                    head, writable, limits)
        # before anything is written: the journal agrees with the slot (never append to,
        # or run on, a journal that was deleted, emptied or cut)
        pending = store._journal_past_head()
        if binding_facts is not None:
            store._check_facts_source(facts_simulated, now)
        if head is None:
            if warnings and writable:
                store._recover_from_journal(now)
        else:
            if lost_newest:
                store._roll_to_lost_newest(pending)
            store._catch_up(pending, now)
        if warnings and writable:
            store.journal.append("recovered", {"warnings": warnings, "generation": gen}, now)
        if binding_facts is not None:
            store._check_binding(binding_facts, now)
        return store

    def _journal_past_head(self) -> list[JournalEntry]:
        """The journal records after the slot's head, the head record checked in place.

        Raises:
            IntegrityError: exit 8, with the journal named: a state change can never be
                made on a journal that lost records the slot says it has.
        """
        if self.head is None:  # slot format 1: the journal is verified at the next append
            return []
        try:
            return self.journal.since_head(self.head)
        except IntegrityError as exc:
            raise IntegrityError(
                f"{exc}. Nothing is changed until the journal is restored from a backup "
                f"together with the slots (state.0, state.1), or the device is re-provisioned"
            ) from exc

    def _roll_to_lost_newest(self, pending: list[JournalEntry]) -> None:
        """A TPM store whose newest slot is lost: only the journal may bring it back.

        The counter proves generation ``g + 1`` was saved. The journal records past this
        slot's head must change the state (the commit that made ``g + 1``); the rebuilt
        state is then saved as ``g + 2`` (the counter moves with it). With no such record
        the newest state cannot be rebuilt and an older one is never used: refused.
        """
        state = self.state
        for e in pending:
            try:
                state = protocol.replay_event(state, e.event, e.data, e.time, self.key,
                                              self.limits)
            except IntegrityError:
                break  # _catch_up names the record
        if state == self.state:
            raise RestoredStoreError(
                f"{self.directory / SLOTS[self.slot]} is generation {self.generation}, the other "
                f"slot is damaged and the journal holds no commit to rebuild generation "
                f"{self.generation + 1}, which the TPM's counter says was saved: refused (nothing "
                f"written; restore the newest copy of the store, journal included, or "
                f"re-provision the device with the vendor)")
        self.generation += 1  # the lost slot's generation: the next save is past it

    def _catch_up(self, pending: list[JournalEntry], now: int) -> None:
        """Redo the commits journaled after the slot's head (write-ahead: the slot lags).

        A crash between a journal append and its slot write, an older slot put back,
        or a damaged newest slot all leave committed records past the head: each is
        replayed at the protocol level and must reproduce what it recorded, so the
        newest committed state is never lost and a reclaimed license never returns.
        """
        state = self.state
        for e in pending:
            try:
                state = protocol.replay_event(state, e.event, e.data, e.time, self.key,
                                              self.limits)
            except IntegrityError as exc:
                raise IntegrityError(
                    f"journal record {e.n} ({e.event}) cannot be replayed onto the stored "
                    f"state ({exc}). Refusing to run on an older state (reclaimed licenses "
                    f"would come back); restore the store from a backup or re-provision the "
                    f"device with the vendor."
                ) from exc
        changed = state != self.state
        if changed:
            self.report.warnings.append(
                f"{len(pending)} journal record(s) past the slot replayed: state rolled "
                f"forward from the journal to sequence {state.sequence}"
            )
        if not self.writable:
            self.state = state
            if changed:
                self.report.warnings.append(
                    "read-only file system: the recovered state is used but not saved")
            return
        if changed or len(pending) > RESAVE_AFTER:
            self.save(state)

    def _recover_from_journal(self, now: int) -> None:
        """A slot of format 1 fell back to its older copy: redo the applies journaled beyond it.

        A rollback would bring reclaimed licenses back, so a state older than
        the journal is never used as it is: either the journal replays onto it
        exactly, or the store refuses to run (IntegrityError, exit 8).
        """
        applies = [e.data for e in self.journal.read().entries
                   if e.event == "apply" and isinstance(e.data, dict)]
        newer = [a for a in applies
                 if isinstance(a.get("sequence"), int) and a["sequence"] > self.state.sequence]
        if not newer:
            return
        try:
            recovered = protocol.roll_forward(self.state, newer)
        except IntegrityError as exc:
            raise IntegrityError(
                f"the newest license state is lost and the journal cannot restore it ({exc}). "
                f"Refusing to roll back (reclaimed licenses would come back); restore the store "
                f"from a backup or re-provision the device with the vendor."
            ) from exc
        self.journal.append("recovered", {"rolled_forward_to": recovered.sequence}, now)
        self.save(recovered)
        self.report.warnings.append(
            f"state rolled forward from the journal to sequence {recovered.sequence}"
        )

    def _check_facts_source(self, facts_simulated: bool, now: int) -> None:
        """Before anything else is written: facts given as data only for a simulated store."""
        try:
            check_facts_source(self.state.simulated, facts_simulated, self.directory)
        except FactsOverrideError as err:
            self.record_refusal(err, "open", now)  # the slots stay as they are
            raise

    def _check_binding(self, facts: tuple[str, ...], now: int) -> None:
        chk = check_binding(self.state.binding, facts)
        if not chk.ok:
            if self.writable:
                self.journal.append_refusal({"reason": "copied-store",
                                             "missing": list(chk.missing),
                                             "added": list(chk.added)}, now)
            raise CopiedStoreError(binding_refusal(chk))
        if chk.changed:
            from agent.record import replace

            new_binding = set(facts)
            if not any(f.startswith("model=") for f in new_binding):
                # the hardware cannot name our model; keep the one bound at provisioning
                new_binding |= {f for f in self.state.binding if f.startswith("model=")}
            if not self.writable:
                self.report.warnings.append(
                    f"hardware changed ({', '.join(chk.missing)} gone, "
                    f"{', '.join(chk.added)} new); not re-bound: read-only file system")
                return
            self.commit(replace(self.state, binding=tuple(sorted(new_binding))), "rebind",
                        {"missing": list(chk.missing), "added": list(chk.added),
                         "matched": chk.matched, "total": chk.total,
                         "binding": sorted(new_binding)}, now)
            self.report.warnings.append(
                f"hardware changed ({', '.join(chk.missing)} gone, {', '.join(chk.added)} new); "
                f"store re-bound"
            )

    def write_mark(self) -> tuple[int, object]:
        """Changes whenever this store writes (a slot saved, a journal record appended or
        taken back, the journal's end re-read): an :class:`OpenStore` re-reads only then."""
        return self.generation, self.journal.tail_token()

    def check_hardware(self, binding_facts: tuple[str, ...], facts_simulated: bool,
                       now: int) -> None:
        """What :meth:`open` checks of the hardware, for a store kept open (:class:`OpenStore`).

        Both checks are pure functions of the state's binding and simulated mark and of
        the facts: when all four are those that passed last time, they pass again and are
        not redone (an apply or a request changes neither binding nor mark).
        """
        # what both checks read of the state: its binding and whether it was simulated
        passed = (self.state.binding, self.state.simulated, binding_facts, facts_simulated)
        if passed == self._hw_passed:
            return
        self._check_facts_source(facts_simulated, now)
        before = self.state
        self._check_binding(binding_facts, now)
        if self.state is before and not self.report.warnings:
            self._hw_passed = passed

    # ------------------------------------------------------------ writing

    def require_writable(self, what: str) -> None:
        """Refuse a write up front on a read-only file system (exit 8, nothing attempted)."""
        if not self.writable:
            raise ReadOnlyStoreError(_read_only_message(self.directory, what))

    def save(self, state: AgentState, head: JournalHead | None = None) -> None:
        """Persist ``state`` into the older slot, with the journal's head as it is now
        (``head``: as :meth:`commit`'s append just left it, known without reading)."""
        self.require_writable("save the license state")
        gen = self.generation + 1
        slot = 1 - self.slot
        if head is None:
            head = self.journal.head()
        data = encode_slot(self.mac_key, gen, state.encode(), head)
        atomic_write(self.ops, self._slot_paths[slot], data)
        advance = getattr(self.key, "advance", None)
        if advance is not None:  # the TPM's counter follows the slot (caught up at open)
            advance(gen)
        self.state, self.generation, self.slot, self.head = state, gen, slot, head
        self.saved = (gen, slot, data)
        self.journal.anchor(head)  # as a fresh open of this slot would (refusals counted on)

    def commit(self, state: AgentState, event: str, details: dict[str, Any], now: int) -> str | None:
        """Journal, then save (write-ahead): every committed state has its journal record.

        The journal record is the commit point. If the slot write fails before its
        rename, the record is taken back and the command fails (exit 8, the old state
        kept); after the rename the record stays (the slot may hold the new state,
        and the next open replays it if not). Returns None (a journal failure is an
        error now: nothing is committed without its record).
        """
        self.require_writable(f"save the {event} change")
        self.journal.append(event, details, now)
        # where the record just appended begins: the journal's end before it (torn bytes
        # of an earlier crash cut off), what a failed save takes the journal back to
        written = self.journal.written()
        assert written is not None  # set by every append that returns
        before = written[0]
        try:
            self.save(state, self.journal.appended_head())
        except StorageError:
            if not self._slot_holds(self.generation + 1):
                try:
                    self.journal.truncate_to(before)
                except StorageError:
                    pass  # the record stays: the next open replays it (it was committed)
            raise
        return None

    def _slot_holds(self, generation: int) -> bool:
        """Whether the slot a failed save wrote may hold ``generation`` (its rename done).

        False only when the slot is known not to (missing, or another generation): the
        journal record is taken back only then, never under a slot that names it.
        """
        try:
            data = read_state_file(self.directory, SLOTS[1 - self.slot], MAX_SLOT)
        except FileNotFoundError:
            return False
        except (OSError, StorageError):
            return True
        try:
            return decode_slot_head(self.mac_key, data)[0] == generation
        except LicensingError:
            return False

    def record_refusal(self, err: LicensingError, what: str, now: int) -> None:
        """Journal a refusal; the license state itself stays untouched."""
        if not self.writable:
            return
        try:
            self.journal.append_refusal({"what": what, "reason": err.reason,
                                         "message": str(err)[:300]}, now)
        except StorageError:
            pass


@record(frozen=True)
class _Files:
    """The bytes :meth:`Store.open` reads: key, both slots, the journal from the head on."""

    key: bytes
    slots: tuple[bytes | None, bytes | None]
    journal_size: int
    journal_tail: bytes
    #: the journal's (inode, size, change time): a change before the head (which the bytes
    #: from the head on do not show) changes the change time
    journal_ident: tuple[int, int, int] | None = None


_RAW = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
#: files an :class:`OpenStore` keeps open: name ("" the directory) -> (fd, (device, inode))
_Held = dict[str, tuple[int, tuple[int, int]]]


def _raw(dfd: int, name: str, cap: int, start: int = 0,
         size: int | None = None) -> tuple[bytes, int] | None:
    """(bytes from ``start``, at most ``cap + 1``; the file's size) of a regular file in
    ``dfd``, or None if there is none; never through a symlink nor blocking on a FIFO.

    ``size``: the size an ``lstat`` of this entry just found a regular file to have (its
    check done there); otherwise the open file is checked. A file that grew since is
    read one byte longer, which no snapshot matches.
    """
    try:
        fd = os.open(name, _RAW, dir_fd=dfd)
    except FileNotFoundError:
        return None
    try:
        if size is None:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise UnsafeFileError(f"{name} is {describe(st.st_mode)}")
            size = st.st_size
        return os.pread(fd, min(max(size - start, 0), cap) + 1, start), size
    finally:
        os.close(fd)


def _files(directory: Path, journal_from: int, check: bool = False) -> _Files:
    """Read what opening the store reads (raises OSError/UnsafeFileError); with ``check``,
    check the directory and its files first as :func:`check_state_dir` does."""
    if check:
        dfd = check_private_dir(directory)
    else:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sizes = _check_entries(dfd, directory) if check else {}
        key = _raw(dfd, KEY_FILE, MAX_KEY, 0, sizes.get(KEY_FILE))
        if key is None:
            raise FileNotFoundError(os.path.join(directory, KEY_FILE))
        s0 = _raw(dfd, SLOTS[0], MAX_SLOT, 0, sizes.get(SLOTS[0]))
        s1 = _raw(dfd, SLOTS[1], MAX_SLOT, 0, sizes.get(SLOTS[1]))
        # the journal from the head on is bounded (RESAVE_AFTER records); one over
        # MAX_SLOT is cut there, and its size still tells any change
        try:
            st = os.stat(JOURNAL_FILE, dir_fd=dfd, follow_symlinks=False)
            ident: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_ctime_ns)
        except FileNotFoundError:
            ident = None
        j = _raw(dfd, JOURNAL_FILE, MAX_SLOT, journal_from, sizes.get(JOURNAL_FILE))
    finally:
        os.close(dfd)
    return _Files(key[0], (None if s0 is None else s0[0], None if s1 is None else s1[0]),
                  -1 if j is None else j[1], b"" if j is None else j[0], ident)


class OpenStore:
    """A store kept open between operations (the daemon), and the files it stands for.

    Taken after an operation, under the store lock: the bytes of the device key, of
    both slots, and of the journal from the slot's head on (with the journal's
    size), which is all :meth:`Store.open` reads. :meth:`reuse`, under the lock
    again, reads them once more and returns the kept store only if every byte is
    the same: a fresh open would then load exactly this store (the same slot, the
    same head record, the same records past it). Anything another process did, a
    slot put back, a journal cut or appended to, a key replaced, differs in some
    byte and the store is opened from scratch. Comparing bytes, not times or inode
    numbers, is exact whatever the file system's timestamp granularity; the journal's
    identity (inode, size, change time) is compared too, since a record changed before
    the head shows in no byte read here (a fresh open then verifies the whole chain).
    """

    __slots__ = ("buf", "fds", "files", "journal_from", "mark", "path", "store", "writable")

    def __init__(self, store: Store, files: _Files, journal_from: int,
                 buf: bytearray | None = None, fds: _Held | None = None,
                 ) -> None:
        self.store = store
        self.path = os.fspath(store.directory)
        self.files = files
        self.journal_from = journal_from
        self.writable = store.writable
        self.mark = store.write_mark()
        #: where :meth:`reuse` reads the files to compare them (kept: no allocation per
        #: request, and no heap pages for the daemon's ``malloc_trim`` to hand back each time)
        self.buf = buf if buf is not None else bytearray()
        #: the directory and each file :meth:`_holds` read, kept open with its (device,
        #: inode): while it is open no other file has them, so a ``stat`` of the name
        #: finding them means the name still names this very file, read without an open
        self.fds: _Held = fds if fds is not None else {}

    def _pass_on(self) -> tuple[bytearray, _Held]:
        """The buffer and open files, handed to the :class:`OpenStore` that replaces this one."""
        fds, self.fds = self.fds, {}
        return self.buf, fds

    def close(self) -> None:
        """Close the files kept open (the store itself needs nothing closed)."""
        fds, self.fds = self.fds, {}
        for fd, _ident in fds.values():
            try:
                os.close(fd)
            except OSError:
                pass

    def __del__(self) -> None:
        self.close()

    @classmethod
    def snapshot(cls, store: Store, prev: OpenStore | None = None) -> OpenStore | None:
        """The store and its files now (under the lock); None when it cannot be kept (a slot
        of format 1, or more past the head than is compared). ``prev``: the one it
        replaces, whose buffer and open files it takes over."""
        if store.head is None or hasattr(store.key, "check_generation"):
            return None  # a TPM store is opened afresh each time: its counter checked each time
        try:
            files = _files(store.directory, store.head.start)
        except (OSError, LicensingError):
            return None
        if files.journal_size - store.head.start > MAX_SLOT:
            return None
        if prev is None:
            return cls(store, files, store.head.start)
        return cls(store, files, store.head.start, *prev._pass_on())

    def reuse(self, writable: bool) -> Store | None:
        """The kept store if the files are unchanged (call under the store lock), else None."""
        if writable != self.writable:
            return None
        try:
            if not self._unchanged():
                return None
        except (OSError, LicensingError):
            return None  # opening from scratch says what is wrong
        store = self.store
        store.report = LoadReport(store.slot, store.generation)
        return store

    def _unchanged(self) -> bool:
        """Whether the directory passes :func:`check_state_dir`'s checks and every file
        holds the kept bytes (the journal: from the head on, and its identity).

        What :func:`_files` with ``check`` reads, compared as it is read (the first
        difference ends it: the fresh open that follows names any unsafe file), each file
        read once into :attr:`buf` after one ``lstat``: about half the system calls, no
        allocation.
        """
        files = self.files
        dst = os.stat(self.path)  # followed, as opening it follows it
        euid = os.geteuid()
        if not stat.S_ISDIR(dst.st_mode) or dst.st_uid != euid or dst.st_mode & 0o022:
            return False
        dev = dst.st_dev
        dfd = self._open_kept("", dst, None)  # the directory too, while its path names it
        if dfd < 0:
            return False
        sts: list[os.stat_result | None] = []
        for name in STATE_FILES:
            try:
                st: os.stat_result | None = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not (stat.S_ISREG(st.st_mode) and st.st_dev == dev
                                       and st.st_uid == euid and not st.st_mode & 0o022):
                return False
            sts.append(st)
        key_st, s0_st, s1_st, j_st = sts[0], sts[1], sts[2], sts[3]
        if j_st is None:
            if files.journal_ident is not None or files.journal_size != -1:
                return False
        elif ((j_st.st_ino, j_st.st_size, j_st.st_ctime_ns) != files.journal_ident
                or j_st.st_size != files.journal_size):
            return False
        return (self._holds(dfd, KEY_FILE, key_st, files.key, 0)
                and self._holds(dfd, SLOTS[0], s0_st, files.slots[0], 0)
                and self._holds(dfd, SLOTS[1], s1_st, files.slots[1], 0)
                and self._holds(dfd, JOURNAL_FILE, j_st, files.journal_tail or None,
                                self.journal_from))

    def _open_kept(self, name: str, st: os.stat_result, dfd: int | None) -> int:
        """A descriptor of the file ``st`` (the directory for ``name`` ""), kept open
        (:attr:`fds`); -1 if the name was replaced between that ``stat`` and the open."""
        ident = (st.st_dev, st.st_ino)
        held = self.fds.get(name)
        if held is not None:
            if held[1] == ident:
                return held[0]
            del self.fds[name]
            os.close(held[0])
        if dfd is None:
            fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        else:
            fd = os.open(name, _RAW, dir_fd=dfd)
        try:
            fst = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if (fst.st_dev, fst.st_ino) != ident or stat.S_IFMT(fst.st_mode) != stat.S_IFMT(
                st.st_mode):
            os.close(fd)
            return -1
        self.fds[name] = (fd, ident)
        return fd

    def _holds(self, dfd: int, name: str, st: os.stat_result | None, kept: bytes | None,
               start: int) -> bool:
        """Whether ``name`` (``st`` its ``lstat``) holds ``kept`` from ``start`` to its end."""
        if st is None or kept is None:
            return st is None and kept is None
        if st.st_size - start != len(kept):
            return False
        want = len(kept) + 1  # one more: a file that grew since the lstat never matches
        if len(self.buf) < want:
            self.buf = bytearray(want)
        fd = self._open_kept(name, st, dfd)
        if fd < 0:
            return False
        n = os.preadv(fd, [memoryview(self.buf)[:want]], start)
        return n == len(kept) and self.buf.startswith(kept)

    def after(self, store: Store) -> OpenStore | None:
        """What to keep after an operation on ``store`` (still under the lock): this very
        snapshot if the operation wrote nothing (no slot saved, no journal record), else
        a new one read from the files."""
        gen, tail = store.write_mark()
        if store is self.store and gen == self.mark[0] and tail is self.mark[1] is not None:
            return self  # the same objects: nothing written (None: the end was forgotten)
        return self._committed(store) or OpenStore.snapshot(store, self)

    def _committed(self, store: Store) -> OpenStore | None:
        """After one commit on this kept store (records appended, then one slot saved naming
        the last of them): the files as this process wrote them, without reading them back.

        The key and the other slot are the bytes :meth:`reuse` compared at the start of
        the operation, the saved slot and the journal's head record the bytes written, the
        journal's identity the one taken right after the append. Anything written by
        another process meanwhile differs from these in some byte or in that identity,
        so the next :meth:`reuse` opens from scratch, as a re-read snapshot would (which
        would take such a change for the store's own).
        """
        saved, written, head = store.saved, store.journal.written(), store.head
        if (store is not self.store or saved is None or written is None or head is None
                or store.generation != self.mark[0] + 1 or saved[0] != store.generation):
            return None
        start, blob, ident = written
        if (head.start != start or head.end != start + len(blob) or ident[1] != head.end
                or len(blob) > MAX_SLOT):
            return None
        slots = list(self.files.slots)
        slots[saved[1]] = saved[2]
        files = _Files(self.files.key, (slots[0], slots[1]), head.end, blob, ident)
        return OpenStore(store, files, start, *self._pass_on())


def _read_only(directory: Path) -> bool:
    """Whether ``directory`` is on a file system mounted read-only."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _read_only_message(directory: Path, what: str) -> str:
    return (f"cannot {what}: the license store {directory} is on a read-only file system "
            f"(status, check, info and journal still work); remount it read-write")


def _require_writable_dir(directory: Path, what: str) -> None:
    if _read_only(directory):
        raise ReadOnlyStoreError(_read_only_message(directory, what))


def open_lock_file(directory: Path) -> tuple[int, bool]:
    """Open (create) the lock file in a private directory, and say whether the store can be
    written: never through a symlink, never blocking on a FIFO; anything but a private
    regular file of its own is refused.

    On a read-only file system the lock file is opened read-only (a shared lock then
    still keeps a writer on another mount of the same files out), or not at all if it
    does not exist (-1): reading never needs writing.

    Raises:
        UnsafeFileError: the directory is not private, or the lock file is not such a file.
        StorageError: it cannot be opened.
    """
    dfd = check_private_dir(directory)  # not even a lock file in someone else's folder
    label = os.path.join(directory, LOCK_FILE)
    flags = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    writable = True
    try:
        try:
            fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | flags, 0o600, dir_fd=dfd)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            writable = False
            try:
                fd = os.open(LOCK_FILE, os.O_RDONLY | flags, dir_fd=dfd)
            except FileNotFoundError:
                return -1, False
    except OSError as exc:
        os.close(dfd)
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{label} is a symbolic link, expected a regular file of the "
                                  f"license store; refused (nothing read or written through "
                                  f"it)") from exc
        raise StorageError(f"cannot open lock file in {directory}: {exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_dev != os.fstat(dfd).st_dev:
            raise UnsafeFileError(f"{label} is {describe(st.st_mode)}, expected a regular file "
                                  f"of the license store; refused")
        if st.st_nlink != 1:  # flock on it would also lock (and wait for) another file
            raise UnsafeFileError(f"{label} is a regular file with {st.st_nlink} hard links, "
                                  f"expected a file of its own; refused")
        check_private(st, label)
    except BaseException:
        os.close(fd)
        raise
    finally:
        os.close(dfd)
    return fd, writable


class KeptLock:
    """The store lock of an agent that keeps its store open: the lock file stays open.

    Each :meth:`hold` takes the flock on the kept descriptor, then checks that the
    lock file's name still names that very file (device, inode, one link); if not
    (removed, replaced), the descriptor is dropped and the lock file opened again with
    every check of :func:`open_lock_file`, so a lock on a file no longer in the
    directory never excludes nothing. The directory's own checks are those the
    operation makes next (:class:`OpenStore`, :meth:`Store.open`). One operation at
    a time (a thread lock): an flock does not exclude another thread of the same
    open file.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.lock_path = os.path.join(directory, LOCK_FILE)
        self.fd = -1
        self.writable = True
        self.ident: tuple[int, int] = (0, 0)
        import threading  # only a daemon keeps its lock: check and status never load it

        self.threads = threading.Lock()
        #: whether the current operation holds the flock (released by :meth:`release`)
        self.flocked = False

    def _open(self) -> None:
        fd, writable = open_lock_file(self.directory)
        self.fd, self.writable = fd, writable
        if fd >= 0:
            st = os.fstat(fd)
            self.ident = (st.st_dev, st.st_ino)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = -1

    def __del__(self) -> None:
        self.close()

    def acquire(self) -> bool:
        """Take the lock for one operation; returns whether the store is writable. Every
        :meth:`acquire` that returns is followed by one :meth:`release` (a method pair, not
        a generator: this is on each of the daemon's requests)."""
        self.threads.acquire()
        try:
            return self._flock()
        except BaseException:  # (a Ctrl-C after the flock too: nothing stays held)
            self.release()
            raise

    def _flock(self) -> bool:
        """:func:`store_lock` on the kept descriptor (this thread holds :attr:`threads`)."""
        self.flocked = False
        for _ in range(3):
            if self.fd < 0:
                if not self.directory.is_dir():  # asked only when the lock is not kept
                    return True
                self._open()
                if self.fd < 0:  # read-only, no lock file: nothing to lock
                    return False
            fcntl.flock(self.fd, fcntl.LOCK_EX if self.writable else fcntl.LOCK_SH)
            try:
                st = os.stat(self.lock_path, follow_symlinks=False)
                same = (st.st_dev, st.st_ino) == self.ident and st.st_nlink == 1
            except OSError:
                same = False
            if same:
                break
            self.close()  # the name names another file now: lock that one instead
        else:
            raise StorageError(f"the lock file in {self.directory} keeps being replaced")
        self.flocked = True
        return self.writable and not _read_only(self.directory)

    def release(self) -> None:
        """End the operation :meth:`acquire` began."""
        try:
            if self.flocked:
                self.flocked = False
                fcntl.flock(self.fd, fcntl.LOCK_UN)
        finally:
            self.threads.release()

    @contextmanager
    def hold(self) -> Iterator[bool]:
        """:meth:`acquire` and :meth:`release` around a block; yields whether the store is
        writable."""
        writable = self.acquire()
        try:
            yield writable
        finally:
            self.release()


@contextmanager
def store_lock(directory: Path) -> Iterator[bool]:
    """Advisory lock on a state directory for one operation; yields whether it is writable.

    Exclusive on a writable store; shared (or none, with no lock file) on a
    read-only file system, where nothing can be written anyway.
    """
    if not directory.is_dir():
        yield True
        return
    fd, writable = open_lock_file(directory)
    if fd < 0:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if writable else fcntl.LOCK_SH)
        yield writable and not _read_only(directory)
    finally:
        os.close(fd)

"""The trusted license store on disk: atomic, MAC-protected, bound to its hardware.

Layout of a state directory::

    device.key   the device's private key (PEM PKCS#8, mode 0600); never leaves the store
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
    StorageError,
    UnsafeFileError,
    UsageError,
)
from agent.identity import binding_refusal, check_binding, check_facts_source
from agent.journal import Journal
from agent.protocol import AgentState
from agent.record import field, record

__all__ = ["STATE_FILES", "FileOps", "LoadReport", "Store", "check_state_dir", "read_state_file"]

SLOT_MAGIC = "licagent-store"
SLOT_VERSION = 1
MAX_SLOT = 1024 * 1024
KEY_FILE = "device.key"
SLOTS = ("state.0", "state.1")
JOURNAL_FILE = "journal.log"
LOCK_FILE = "lock"
#: every file of a state directory: each is checked (regular, private, same filesystem)
#: before the store is used, and read only through :func:`read_state_file`
STATE_FILES = (KEY_FILE, *SLOTS, JOURNAL_FILE, LOCK_FILE)
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
    euid = os.geteuid()
    try:
        dev = os.fstat(dfd).st_dev
        for name in STATE_FILES:
            st = kind_at(dfd, name)
            if st is None or (stat.S_ISREG(st.st_mode) and st.st_dev == dev
                              and st.st_uid == euid and not st.st_mode & 0o022):
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
    finally:
        os.close(dfd)


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


def _mac(key: bytes, generation: int, state_bytes: bytes) -> bytes:
    msg = canonical([SLOT_MAGIC, SLOT_VERSION, generation, state_bytes])
    return hmac_sha256(key, msg)


def encode_slot(key: bytes, generation: int, state_bytes: bytes) -> bytes:
    mac = _mac(key, generation, state_bytes)
    copy = [SLOT_MAGIC, SLOT_VERSION, generation, state_bytes, mac]
    # two identical copies: a flipped bit or a torn tail in one leaves the other intact
    return canonical([copy, copy])


def decode_slot(key: bytes, data: bytes) -> tuple[int, bytes, list[str]]:
    """Return (generation, state bytes, warnings) from the first copy whose MAC holds."""
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
        if (
            isinstance(c, list) and len(c) == 5 and c[0] == SLOT_MAGIC and c[1] == SLOT_VERSION
            and isinstance(c[2], int) and isinstance(c[3], bytes) and isinstance(c[4], bytes)
            and equal(_mac(key, c[2], c[3]), c[4])
        ):
            if i:
                warnings.append("first copy of the slot is damaged; the second copy was used")
            return c[2], c[3], warnings
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
    ) -> None:
        self.directory = directory
        self.key = key
        self.state = state
        self.generation = generation
        self.slot = slot
        self.ops = ops
        self.report = report
        self.mac_key = key.secret_digest(b"store-mac")
        self.journal = Journal(directory / JOURNAL_FILE, key.secret_digest(b"journal-mac"), ops)

    # ------------------------------------------------------------ creation / loading

    @classmethod
    def create(
        cls, directory: Path, key: SigningKey, state: AgentState, ops: FileOps | None = None
    ) -> Store:
        ops = ops or FileOps()
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        check_state_dir(directory)
        if any(os.path.lexists(directory / n) for n in (KEY_FILE, *SLOTS)):
            raise UsageError(
                f"{directory} already holds a license store; refusing to overwrite it"
            )
        atomic_write(ops, directory / KEY_FILE, key.to_pem(), 0o600)
        store = cls(directory, key, state, 0, 1, ops, LoadReport(1, 0))
        try:
            store.save(state)
            store.journal.append("init", {"device_id": state.device_id, "model": state.model,
                                           "sequence": state.sequence}, state.created)
        except StorageError:
            # a half-provisioned directory would block a retried init: take it all back
            for n in (SLOTS[0], JOURNAL_FILE, KEY_FILE):
                try:
                    (directory / n).unlink()
                except OSError:
                    pass
            raise
        return store

    @classmethod
    def open(
        cls, directory: Path, binding_facts: tuple[str, ...] | None = None,
        ops: FileOps | None = None, now: int = 0, facts_simulated: bool = False,
    ) -> Store:
        """Load the last good state; check it still sits on the same hardware.

        Args:
            binding_facts: the hardware's facts now; None skips the binding check
                (used only by tests that look at the raw store).
            facts_simulated: ``binding_facts`` were given as data, not read from this
                machine; refused (the slots untouched, the refusal journaled) unless
                the store was initialised that way.

        Raises:
            UsageError: no store in ``directory``.
            IntegrityError: no slot passes its integrity check (never reset to empty).
            CopiedStoreError: the store was copied from other hardware.
            FactsOverrideError: facts given as data for a store bound to real hardware.
        """
        ops = ops or FileOps()
        key_path = directory / KEY_FILE
        try:
            check_state_dir(directory)
            pem = read_state_file(directory, KEY_FILE, MAX_KEY)
        except FileNotFoundError as exc:
            raise UsageError(
                f"no license store in {directory} (run 'licagent init' first)"
            ) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {key_path}: {exc}") from exc
        if len(pem) > MAX_KEY:
            raise IntegrityError(f"device key {key_path} is larger than {MAX_KEY} bytes")
        try:
            key = SigningKey.from_pem(pem)
        except MalformedError as exc:
            raise IntegrityError(f"device key {key_path} is damaged: {exc}") from exc
        mac_key = key.secret_digest(b"store-mac")
        _remove_stale_temporaries(directory)
        best: tuple[int, int, bytes] | None = None
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
                gen, sb, w = decode_slot(mac_key, data)
            except IntegrityError as exc:
                warnings.append(f"{name} is damaged ({exc}); ignored")
                continue
            warnings.extend(f"{name}: {x}" for x in w)
            if best is None or gen > best[0]:
                best = (gen, idx, sb)
        if best is None:
            raise IntegrityError(
                f"no intact license state in {directory}: both slots are missing or fail their "
                f"integrity check. The store is NOT reset; restore it from a backup or "
                f"re-provision the device with the vendor."
            )
        gen, idx, sb = best
        try:
            state = AgentState.from_cbor(strict_loads(sb, max_size=MAX_SLOT))
        except MalformedError as exc:
            raise IntegrityError(f"stored state does not decode: {exc}") from exc
        if state.device_key != key.public:
            raise IntegrityError("stored state belongs to a different device key")
        if missing and gen >= 2:
            # after two saves both slots exist: one vanished
            warnings.extend(f"{n} is missing" for n in missing)
        if warnings:
            warnings.append(f"using {SLOTS[idx]} (generation {gen}), the last good state")
        store = cls(directory, key, state, gen, idx, ops, LoadReport(idx, gen, warnings))
        if binding_facts is not None:
            store._check_facts_source(facts_simulated, now)
        if warnings:
            store._recover_from_journal(now)
        if warnings:
            store.journal.append("recovered", {"warnings": warnings, "generation": gen}, now)
        if binding_facts is not None:
            store._check_binding(binding_facts, now)
        return store

    def _recover_from_journal(self, now: int) -> None:
        """After falling back to an older slot, redo the applies the journal holds beyond it.

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
        self.save(recovered)
        self.journal.append("recovered", {"rolled_forward_to": recovered.sequence}, now)
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
            self.commit(replace(self.state, binding=tuple(sorted(new_binding))), "rebind",
                        {"missing": list(chk.missing), "added": list(chk.added),
                         "matched": chk.matched, "total": chk.total}, now)
            self.report.warnings.append(
                f"hardware changed ({', '.join(chk.missing)} gone, {', '.join(chk.added)} new); "
                f"store re-bound"
            )

    # ------------------------------------------------------------ writing

    def save(self, state: AgentState) -> None:
        """Persist ``state`` into the older slot; on success it becomes the current state."""
        gen = self.generation + 1
        slot = 1 - self.slot
        data = encode_slot(self.mac_key, gen, state.encode())
        atomic_write(self.ops, self.directory / SLOTS[slot], data)
        self.state, self.generation, self.slot = state, gen, slot

    def commit(self, state: AgentState, event: str, details: dict[str, Any], now: int) -> str | None:
        """Save, then journal. Returns a warning if only the journal write failed.

        The state is the commit point; the journal records it afterwards, so a
        journal failure cannot undo an apply whose receipt the caller may use.
        """
        self.save(state)
        try:
            self.journal.append(event, details, now)
        except StorageError as exc:
            return f"state saved, but the audit journal could not be written: {exc}"
        return None

    def record_refusal(self, err: LicensingError, what: str, now: int) -> None:
        """Journal a refusal; the license state itself stays untouched."""
        try:
            self.journal.append_refusal({"what": what, "reason": err.reason,
                                         "message": str(err)[:300]}, now)
        except StorageError:
            pass


def open_lock_file(directory: Path) -> int:
    """Open (create) the lock file in a private directory: never through a symlink, never
    blocking on a FIFO; anything but a private regular file of its own is refused.

    Raises:
        UnsafeFileError: the directory is not private, or the lock file is not such a file.
    """
    dfd = check_private_dir(directory)  # not even a lock file in someone else's folder
    try:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        os.close(dfd)
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(f"{os.path.join(directory, LOCK_FILE)} is a symbolic link, "
                                  f"expected a regular file of the license store; refused "
                                  f"(nothing read or written through it)") from exc
        raise
    try:
        st = os.fstat(fd)
        label = os.path.join(directory, LOCK_FILE)
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
    return fd


@contextmanager
def store_lock(directory: Path) -> Iterator[None]:
    """Exclusive advisory lock on a state directory for one operation.

    The directory is checked first, so that a directory someone else could change is
    not even given a lock file; :meth:`Store.open` then checks every state file.
    """
    if not directory.is_dir():
        yield
        return
    try:
        fd = open_lock_file(directory)
    except OSError as exc:
        raise StorageError(f"cannot open lock file in {directory}: {exc}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)

"""Storage faults (ENOSPC, EIO) at every syscall of the write recipe.

A FileOps subclass makes the real syscalls, logs each one with what it acts
on, and turns the N-th call of one method into an ``OSError``. For every step
of a full ``apply`` and ``request`` (write-ahead: the journal record, then the
slot) the agent must report ``StorageError`` (exit code 8), keep the old state
and journal byte for byte (or, once the slot's rename is done, exactly the new
state with its record), leave no temporary file and no open descriptor, never
retry the failing call, and keep working once the fault clears.
"""

from __future__ import annotations

import errno
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent import protocol
from agent.durable import FileOps
from agent.errors import StorageError
from agent.messages import Action
from agent.protocol import AgentState
from agent.record import replace
from agent.store import JOURNAL_FILE, Store
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device, Site

ERRNOS = [pytest.param(errno.ENOSPC, id="ENOSPC"), pytest.param(errno.EIO, id="EIO")]


class FaultOps(FileOps):
    """Real syscalls, each logged as (method, target); the n-th call of ``method`` fails.

    ``close`` is failed the way Linux fails it: the descriptor is released and
    only then is the error reported, so closing it again would be a bug.
    """

    def __init__(self, directory: Path, method: str | None = None, n: int = 0,
                 err: int = errno.EIO) -> None:
        self.directory = directory
        self.method, self.n, self.err = method, n, err
        self.calls: list[tuple[str, str]] = []
        self.counts: Counter[str] = Counter()
        self.fds: dict[int, str] = {}
        self.open_fds: set[int] = set()
        self.failed: tuple[str, str] | None = None
        self.failed_at = -1

    def _label(self, path: str) -> str:
        p = Path(path)
        if p == self.directory:
            return "<dir>"
        # the temp name carries a pid and a nonce; which slot is written depends on parity
        return re.sub(r"\.tmp.*$", ".tmp", re.sub(r"^(\.?state)\.[01]", r"\1.N", p.name))

    def _call(self, method: str, target: str) -> bool:
        self.calls.append((method, target))
        self.counts[method] += 1
        if method == self.method and self.counts[method] == self.n:
            self.fail_here()
            return True
        return False

    def fail_here(self) -> None:
        self.failed, self.failed_at = self.calls[-1], len(self.calls) - 1

    def retried(self) -> bool:
        """Whether the failing call was made again on the same target after it failed."""
        assert self.failed is not None, "no fault was injected"
        return self.failed in self.calls[self.failed_at + 1:]

    def _raise(self) -> None:
        raise OSError(self.err, os.strerror(self.err))

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        if self._call("open", path):
            self._raise()
        fd = super().open(path, flags, mode)
        self.fds[fd] = path
        self.open_fds.add(fd)
        return fd

    def write(self, fd: int, data: bytes) -> int:
        if self._call("write", self.fds[fd]):
            self._raise()
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        if self._call("fsync", self.fds[fd]):
            self._raise()
        super().fsync(fd)

    def close(self, fd: int) -> None:
        fail = self._call("close", self.fds[fd])
        self.open_fds.discard(fd)
        super().close(fd)
        if fail:
            self._raise()

    def replace(self, src: str, dst: str) -> None:
        if self._call("replace", dst):
            self._raise()
        super().replace(src, dst)

    def unlink(self, path: str) -> None:
        if self._call("unlink", path):
            self._raise()
        super().unlink(path)

    def ftruncate(self, fd: int, length: int) -> None:
        if self._call("ftruncate", self.fds[fd]):
            self._raise()
        super().ftruncate(fd, length)

    def labelled(self) -> list[tuple[str, str]]:
        return [(m, self._label(t)) for m, t in self.calls]


@dataclass(frozen=True)
class Step:
    """One syscall of a fault-free run: the n-th call of ``method``, acting on ``target``."""

    index: int
    method: str
    n: int
    target: str

    def __str__(self) -> str:
        return f"#{self.index} {self.method}[{self.n}] on {self.target}"


def steps_of(ops: FaultOps) -> list[Step]:
    seen: Counter[str] = Counter()
    out = []
    for i, (m, t) in enumerate(ops.labelled()):
        seen[m] += 1
        out.append(Step(i, m, seen[m], t))
    return out


def disk_state(d: Path) -> AgentState:
    """The state as a fresh process would load it from disk."""
    return Store.open(d, None).state


def pending_apply(device: Device, feature: str = "bacnet") -> bytes:
    """An outstanding activation on ``device`` and the vendor's response to it."""
    req = device.request(Action.ACTIVATE, [feature])
    return device.vendor.issue(req, [Grant(feature, 10)], now=device.clock())


def expected_after(d: Path, old: AgentState, resp: bytes, now: int) -> bytes:
    """The encoded state a successful apply of ``resp`` writes (Ed25519 receipts are deterministic)."""
    return protocol.apply_response(old, resp, now, Store.open(d, None).key).state.encode()


def counted_run(site: Site, op: str) -> list[Step]:
    """Every FileOps call of a fault-free ``apply`` or ``request``, in order."""
    dev = site.device()
    resp = pending_apply(dev)
    ops = FaultOps(dev.directory)
    agent = replace(dev.agent, ops=ops)
    if op == "apply":
        agent.apply(resp)
    else:
        agent.request(Action.ACTIVATE, ["modbus"])
    return steps_of(ops)


def journal_phase(steps: list[Step]) -> list[Step]:
    """The calls that append the journal record (write-ahead: before the slot is touched)."""
    first_slot = next(s.index for s in steps if s.target == ".state.N.tmp")
    return steps[:first_slot]


def state_phase(steps: list[Step]) -> list[Step]:
    """The calls that persist the state (everything after the journal record)."""
    return steps[len(journal_phase(steps)):]


def test_recipe_is_what_the_fault_tests_assume(site: Site) -> None:
    """The counting run sees the documented recipe; the loops below cover each of its steps."""
    for op in ("apply", "request"):
        steps = counted_run(site, op)
        assert [(s.method, s.target) for s in journal_phase(steps)] == [
            ("open", JOURNAL_FILE), ("write", JOURNAL_FILE), ("fsync", JOURNAL_FILE),
            ("close", JOURNAL_FILE)]
        recipe = [(s.method, s.target) for s in state_phase(steps)]
        assert recipe[:5] == [("open", ".state.N.tmp"), ("write", ".state.N.tmp"),
                              ("fsync", ".state.N.tmp"), ("close", ".state.N.tmp"),
                              ("replace", "state.N")]
        assert recipe[5:] == [("open", "<dir>"), ("fsync", "<dir>"), ("close", "<dir>")]


def check_fault_contract(ops: FaultOps, exc: pytest.ExceptionInfo[StorageError], err: int,
                         step: Step, device: Device, journal_before: bytes,
                         renamed: bool) -> None:
    assert exc.value.exit_code == 8, step
    assert isinstance(exc.value.__cause__, OSError) and exc.value.__cause__.errno == err, step
    assert ops.failed is not None and ops._label(ops.failed[1]) == step.target, step
    # the failing call was made once: never retried after a failed write, fsync or close
    assert not ops.retried(), (step, ops.labelled())
    assert device.leftovers() == [], step
    assert ops.open_fds == set(), f"{step}: descriptors leaked"
    journal = (device.directory / JOURNAL_FILE).read_bytes()
    if renamed:  # the slot may hold the new state: its record stays (replayed if need be)
        assert journal.startswith(journal_before) and journal != journal_before, step
    else:  # nothing is journaled for a state that was not saved: the record is taken back
        assert journal == journal_before, f"{step}: the journal record was not taken back"


@pytest.mark.parametrize("err", ERRNOS)
def test_apply_fault_at_every_state_step(site: Site, err: int) -> None:
    steps = state_phase(counted_run(site, "apply"))
    renamed_at = next(s.index for s in steps if s.method == "replace")
    for step in steps:
        dev = site.device()
        dev.activate(knx=1)  # some history, so "old" is not the empty state
        resp = pending_apply(dev)
        old = disk_state(dev.directory)
        new_enc = expected_after(dev.directory, old, resp, dev.clock())
        before = dev.store_bytes()
        journal_before = (dev.directory / JOURNAL_FILE).read_bytes()
        ops = FaultOps(dev.directory, step.method, step.n, err)

        with pytest.raises(StorageError) as exc:
            replace(dev.agent, ops=ops).apply(resp)

        check_fault_contract(ops, exc, err, step, dev, journal_before, step.index > renamed_at)
        loaded = disk_state(dev.directory).encode()
        if step.index <= renamed_at:
            assert loaded == old.encode(), step
            assert dev.store_bytes() == before, step
        else:  # the rename happened; only its directory entry's durability is in doubt,
            # and the journal record replays it if the entry is lost
            assert loaded == new_enc, step

        # the fault has cleared: the same response completes (or is the idempotent no-op)
        res, warn = dev.agent.apply(resp)
        assert res.already_applied == (loaded == new_enc), step
        assert warn is None
        assert disk_state(dev.directory).encode() == new_enc, step
        # and the device goes on with a fresh request/response
        dev.activate(modbus=3)
        st = disk_state(dev.directory)
        assert st.sequence == old.sequence + 2, step
        assert {lic.feature for lic in st.licenses} == {"knx", "bacnet", "modbus"}, step
        assert Store.open(dev.directory, None).journal.read().torn_tail == 0


@pytest.mark.parametrize("err", ERRNOS)
def test_request_fault_at_every_state_step(site: Site, err: int) -> None:
    steps = state_phase(counted_run(site, "request"))
    renamed_at = next(s.index for s in steps if s.method == "replace")
    for step in steps:
        dev = site.device()
        old = disk_state(dev.directory)
        before = dev.store_bytes()
        journal_before = (dev.directory / JOURNAL_FILE).read_bytes()
        ops = FaultOps(dev.directory, step.method, step.n, err)

        with pytest.raises(StorageError) as exc:
            replace(dev.agent, ops=ops).request(Action.ACTIVATE, ["bacnet"])

        check_fault_contract(ops, exc, err, step, dev, journal_before, step.index > renamed_at)
        loaded = disk_state(dev.directory)
        if step.index <= renamed_at:
            assert loaded.encode() == old.encode(), step
            assert dev.store_bytes() == before, step
        else:  # exactly the new state: one more outstanding request, nothing else changed
            assert loaded.encode() == old.encode() or (
                loaded.outstanding[:-1] == old.outstanding
                and replace(loaded, outstanding=old.outstanding).encode() == old.encode()
            ), step

        dev.activate(bacnet=4)
        st = disk_state(dev.directory)
        assert st.sequence == old.sequence + 1, step
        assert [(lic.feature, lic.count) for lic in st.licenses] == [("bacnet", 4)], step


@pytest.mark.parametrize("err", ERRNOS)
def test_journal_fault_before_the_state_is_saved(site: Site, err: int) -> None:
    """Write-ahead: the journal record is the commit point. A fault while appending it fails
    the command (exit 8) with the slots and the journal as they were, never a torn record,
    and the same response applies once the fault clears."""
    steps = counted_run(site, "apply")
    jsteps = journal_phase(steps)
    assert jsteps
    for step in jsteps:
        dev = site.device()
        resp = pending_apply(dev)
        old = disk_state(dev.directory)
        new_enc = expected_after(dev.directory, old, resp, dev.clock())
        before = dev.store_bytes()
        journal_before = (dev.directory / JOURNAL_FILE).read_bytes()
        ops = FaultOps(dev.directory, step.method, step.n, err)

        if step.method == "close":  # after a good fsync the record is durable: committed
            res, warn = replace(dev.agent, ops=ops).apply(resp)
            assert warn is None and not res.already_applied, step
            assert disk_state(dev.directory).encode() == new_enc, step
        else:
            with pytest.raises(StorageError) as exc:
                replace(dev.agent, ops=ops).apply(resp)
            assert exc.value.exit_code == 8, step
            assert dev.store_bytes() == before, step
            assert (dev.directory / JOURNAL_FILE).read_bytes() == journal_before, step
            assert disk_state(dev.directory).encode() == old.encode(), step
            res, warn = dev.agent.apply(resp)
            assert not res.already_applied and warn is None, step
        assert not ops.retried(), step
        assert dev.leftovers() == [] and ops.open_fds == set(), step
        rep = Store.open(dev.directory, None).journal.read()
        assert rep.torn_tail == 0 and rep.entries[-1].event == "apply", step
        assert disk_state(dev.directory).encode() == new_enc, step

        dev.activate(modbus=1)
        rep = Store.open(dev.directory, None).journal.read()
        assert rep.torn_tail == 0 and rep.entries[-1].event == "apply", step


@pytest.mark.parametrize("err", ERRNOS)
def test_failed_directory_fsync_is_reported(device: Device, err: int) -> None:
    """fsync of the directory after the rename fails: exit 8, the disk holds old or new, and
    re-applying hands back the receipt of the state that is on disk."""
    resp = pending_apply(device)
    old = disk_state(device.directory)
    new_enc = expected_after(device.directory, old, resp, device.clock())
    ops = FaultOps(device.directory, "fsync", 3, err)  # journal, temporary file, directory

    with pytest.raises(StorageError) as exc:
        replace(device.agent, ops=ops).apply(resp)

    assert exc.value.exit_code == 8
    assert ops.failed is not None and ops._label(ops.failed[1]) == "<dir>"
    assert not ops.retried()
    assert "could not write state.0" in str(exc.value)
    assert device.leftovers() == [] and ops.open_fds == set()
    loaded = disk_state(device.directory)
    assert loaded.encode() in (old.encode(), new_enc)

    res, _ = device.agent.apply(resp)
    assert disk_state(device.directory).encode() == new_enc
    assert res.receipt == disk_state(device.directory).last_receipt


class ShortWriteOps(FaultOps):
    """A disk that takes at most ``chunk`` bytes per write and fills up after ``fill_after``."""

    def __init__(self, directory: Path, chunk: int, fill_after: int | None,
                 zero_write: bool = False) -> None:
        super().__init__(directory)
        self.chunk, self.fill_after, self.zero_write = chunk, fill_after, zero_write
        self.written = 0

    def write(self, fd: int, data: bytes) -> int:
        self._call("write", self.fds[fd])
        if ".tmp" not in self.fds[fd]:  # the slot's temporary file only
            return os.write(fd, data)
        if self.fill_after is not None and self.written >= self.fill_after:
            self.fail_here()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if self.zero_write and self.written:
            self.fail_here()
            return 0
        n = os.write(fd, data[: self.chunk])
        self.written += n
        return n


def test_short_writes_are_completed(device: Device) -> None:
    resp = pending_apply(device)
    old = disk_state(device.directory)
    new_enc = expected_after(device.directory, old, resp, device.clock())
    ops = ShortWriteOps(device.directory, chunk=97, fill_after=None)
    replace(device.agent, ops=ops).apply(resp)
    assert disk_state(device.directory).encode() == new_enc
    assert ops.counts["write"] > 2  # the slot really went out in pieces
    assert Store.open(device.directory, None).journal.read().torn_tail == 0


@pytest.mark.parametrize("zero_write", [False, True], ids=["ENOSPC-midway", "no-progress"])
def test_disk_full_in_the_middle_of_the_slot(device: Device, zero_write: bool) -> None:
    resp = pending_apply(device)
    old = disk_state(device.directory)
    before = device.store_bytes()
    ops = ShortWriteOps(device.directory, chunk=128, fill_after=None if zero_write else 512,
                        zero_write=zero_write)

    with pytest.raises(StorageError) as exc:
        replace(device.agent, ops=ops).apply(resp)

    assert exc.value.exit_code == 8
    assert not ops.retried()
    assert device.store_bytes() == before
    assert disk_state(device.directory).encode() == old.encode()
    assert device.leftovers() == [] and ops.open_fds == set()
    res, warn = device.agent.apply(resp)
    assert not res.already_applied and warn is None

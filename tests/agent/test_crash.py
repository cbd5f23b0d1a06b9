"""Crash safety of the trusted store and the journal.

(a) A simulated crash at every FileOps call of ``apply`` and ``request``, with
    the file system either surviving (process crash) or losing what was not
    yet fsynced (power loss): a fresh process always finds exactly the old or
    exactly the new state, and the device goes on.
(b) Damaged slots: a bad copy, a bad slot, two bad slots, empty slots.
(c) The journal: a torn tail is reported and cut off; a changed byte is tampering.
(d) SIGKILL of a real ``licagent apply`` process at random moments.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import protocol
from agent.cose import strict_loads
from agent.durable import FileOps
from agent.errors import IntegrityError, LicensingError, UsageError
from agent.identity import HardwareFacts
from agent.journal import Journal
from agent.messages import Action
from agent.protocol import AgentState
from agent.record import replace
from agent.service import Agent
from agent.store import JOURNAL_FILE, MAX_SLOT, SLOTS, Store, decode_slot
from apps.licagent.cli import main as licagent_main
from hw.facts import StaticFactsProvider, load_facts_file
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Clock, Device, Site

# ---------------------------------------------------------------- helpers


class SimulatedCrash(BaseException):
    """The process dies here. A BaseException, so no ``except Exception`` can swallow it."""


class CrashOps(FileOps):
    """Real syscalls, counted; call number ``crash_at`` (1-based) is never made: the process dies.

    ``calls`` holds the calls that completed, ``written`` what was written per path.
    """

    def __init__(self, crash_at: int | None = None) -> None:
        self.crash_at = crash_at
        self.calls: list[tuple[str, str]] = []
        self.crashed: tuple[str, str] | None = None
        self.fds: dict[int, str] = {}
        self.open_fds: set[int] = set()
        self.written: dict[str, bytearray] = {}

    def _step(self, method: str, target: str) -> None:
        if len(self.calls) + 1 == self.crash_at:
            self.crashed = (method, target)
            raise SimulatedCrash(f"crash at call {self.crash_at}: {method} {target}")
        self.calls.append((method, target))

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self._step("open", path)
        fd = super().open(path, flags, mode)
        self.fds[fd] = path
        self.open_fds.add(fd)
        return fd

    def write(self, fd: int, data: bytes) -> int:
        self._step("write", self.fds[fd])
        n = super().write(fd, data)
        self.written.setdefault(self.fds[fd], bytearray()).extend(data[:n])
        return n

    def fsync(self, fd: int) -> None:
        self._step("fsync", self.fds[fd])
        super().fsync(fd)

    def close(self, fd: int) -> None:
        self._step("close", self.fds[fd])
        self.open_fds.discard(fd)
        super().close(fd)

    def replace(self, src: str, dst: str) -> None:
        self._step("replace", dst)
        super().replace(src, dst)

    def unlink(self, path: str) -> None:
        self._step("unlink", path)
        super().unlink(path)

    def ftruncate(self, fd: int, length: int) -> None:
        self._step("ftruncate", self.fds[fd])
        super().ftruncate(fd, length)

    def die(self) -> None:
        """What the kernel does for a dead process: release its descriptors."""
        for fd in self.open_fds:
            os.close(fd)
        self.open_fds.clear()

    def done(self, method: str, pred: str) -> bool:
        """Whether a ``method`` call on a path matching regex ``pred`` completed."""
        return any(m == method and re.search(pred, t) for m, t in self.calls)

    def tmp_path(self) -> str | None:
        return next((t for m, t in self.calls if m == "open" and ".tmp" in t), None)


def state_of(d: Path) -> AgentState:
    return Store.open(d, None).state


def intended_state(d: Path, ops: CrashOps) -> bytes | None:
    """The encoded state the crashed run was writing (decoded from the bytes it wrote)."""
    tmp = ops.tmp_path()
    if tmp is None or tmp not in ops.written:
        return None
    mac_key = Store.open(d, None).mac_key
    _gen, sb, _w = decode_slot(mac_key, bytes(ops.written[tmp]))
    return AgentState.from_cbor(strict_loads(sb, max_size=MAX_SLOT)).encode()


def lose_unsynced(d: Path, pristine: Path, ops: CrashOps, rng: random.Random) -> None:
    """Power loss at the crash: whatever was not fsynced is lost or garbled (SQLite's model).

    - temp file written but not fsynced: its contents are cut short and garbage follows;
    - rename done but the directory not fsynced: the rename is undone;
    - journal record written but not fsynced: only part of it reached the disk.
    """
    tmp = ops.tmp_path()
    replaced = next((t for m, t in ops.calls if m == "replace"), None)
    holder = Path(tmp) if tmp else None  # where the temp file's inode is named after the loss
    if replaced and not ops.done("fsync", f"^{re.escape(str(d))}$"):
        assert tmp is not None
        Path(tmp).write_bytes(bytes(ops.written[tmp]))  # the inode is back under its temp name
        shutil.copyfile(pristine / Path(replaced).name, replaced)  # and the old one in place
    elif replaced:
        holder = Path(replaced)
    if tmp and ops.done("write", re.escape(tmp)) and not ops.done("fsync", re.escape(tmp)):
        assert holder is not None
        if holder.exists():
            data = holder.read_bytes()
            holder.write_bytes(data[: len(data) // 2] + rng.randbytes(len(data) // 3))
    jpath = str(d / JOURNAL_FILE)
    if ops.done("write", re.escape(jpath)) and not ops.done("fsync", re.escape(jpath)):
        blob = ops.written[jpath]
        keep = (pristine / JOURNAL_FILE).stat().st_size + len(blob) // 2
        os.truncate(jpath, keep)


def facts_file(device: Device, directory: Path) -> Path:
    p = directory / f"{device.directory.name}-facts.json"
    p.write_text(json.dumps(device.facts.read().as_dict()))
    assert load_facts_file(p).read().binding_facts() == device.facts.read().binding_facts()
    return p


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = licagent_main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def record_offsets(data: bytes) -> list[int]:
    """Start offsets of the journal's records (each a 4-byte length and a CBOR body)."""
    offs, off = [], 0
    while off + 4 <= len(data):
        offs.append(off)
        off += 4 + int.from_bytes(data[off:off + 4], "big")
    return offs


# ---------------------------------------------------------------- (a) crash at every step


@dataclass
class Scenario:
    device: Device
    pristine: Path
    resp: bytes
    old: bytes
    old_sequence: int


@pytest.fixture
def scenario(site: Site, tmp_path: Path) -> Scenario:
    """A device with some history, an outstanding request and the vendor's response, frozen."""
    dev = site.device()
    dev.activate(knx=2)
    req = dev.request(Action.ACTIVATE, ["bacnet"])
    resp = dev.vendor.issue(req, [Grant("bacnet", 25)], now=dev.clock())
    pristine = tmp_path / "pristine"
    shutil.copytree(dev.directory, pristine)
    old = state_of(pristine)
    return Scenario(dev, pristine, resp, old.encode(), old.sequence)


def run_op(agent: Agent, op: str, resp: bytes) -> None:
    if op == "apply":
        agent.apply(resp)
    else:
        agent.request(Action.ACTIVATE, ["modbus"])


@pytest.mark.parametrize("mode", ["process-crash", "power-loss"])
@pytest.mark.parametrize("op", ["apply", "request"])
def test_crash_at_every_call(scenario: Scenario, tmp_path: Path, op: str, mode: str) -> None:
    dev, pristine = scenario.device, scenario.pristine
    # counting run on a copy: how many calls a full operation makes, and its result
    ref = tmp_path / "reference"
    shutil.copytree(pristine, ref)
    counter = CrashOps()
    run_op(Agent(ref, dev.facts, clock=dev.clock, ops=counter), op, scenario.resp)
    total = len(counter.calls)
    assert total >= 12  # temp file (5) + directory fsync (3) + journal (4)
    ref_new = state_of(ref).encode()
    rng = random.Random(f"{op}-{mode}")

    outcomes = []
    for k in range(1, total + 1):
        d = tmp_path / f"k{k}"
        shutil.copytree(pristine, d)
        ops = CrashOps(k)
        with pytest.raises(SimulatedCrash):
            run_op(Agent(d, dev.facts, clock=dev.clock, ops=ops), op, scenario.resp)
        ops.die()
        j_re = re.escape(JOURNAL_FILE) + "$"
        if mode == "power-loss":
            lose_unsynced(d, pristine, ops, rng)
            # write-ahead: the commit point is the journal record reaching the disk
            expect_new = ops.done("fsync", j_re)
        else:  # a dead process's writes are in the page cache: a whole record is committed
            expect_new = ops.done("write", j_re)
        where = f"crash at call {k}/{total} ({ops.crashed}), {mode}"

        # a fresh process loads exactly the old or exactly the new state
        loaded = state_of(d)
        if expect_new:
            if op == "apply":
                assert loaded.encode() == ref_new, where
            else:  # the request's nonce is fresh: one more outstanding request, nothing else
                assert loaded.outstanding[:-1] == state_of(pristine).outstanding, where
                assert replace(loaded, outstanding=state_of(pristine).outstanding
                               ).encode() == scenario.old, where
            if ops.tmp_path() in ops.written and ops.done("fsync", re.escape(ops.tmp_path() or "")):
                assert loaded.encode() == intended_state(d, ops), where
        else:
            assert loaded.encode() == scenario.old, where
        outcomes.append(expect_new)
        rep = Store.open(d, None).journal.read()  # never a broken chain, at most a torn tail
        if mode == "power-loss" and ops.done("write", j_re) and not ops.done("fsync", j_re):
            assert rep.torn_tail > 0, where

        # ... and goes on
        agent = Agent(d, dev.facts, clock=dev.clock)
        if op == "apply":
            res, warn = agent.apply(scenario.resp)  # the same response: applied, or the no-op
            assert res.already_applied == expect_new, where
            assert warn is None, where
            assert state_of(d).encode() == ref_new, where
        req = agent.request(Action.ACTIVATE, ["modbus"])
        agent.apply(dev.vendor.issue(req, [Grant("modbus", 4)], now=dev.clock()))
        st = state_of(d)
        assert st.sequence == scenario.old_sequence + (2 if op == "apply" else 1), where
        assert "modbus" in {lic.feature for lic in st.licenses}, where
        rep = Store.open(d, None).journal.read()
        assert rep.torn_tail == 0 and rep.entries[-1].event == "apply", where
        shutil.rmtree(d)

    # both outcomes really occur, so the loop covered the commit point
    assert outcomes[0] is False and outcomes[-1] is True


# ---------------------------------------------------------------- (b) damaged slots


def newest(d: Path) -> tuple[Path, Path]:
    s = Store.open(d, None)
    return d / SLOTS[s.slot], d / SLOTS[1 - s.slot]


def all_files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_bit_flip_in_first_copy_uses_the_second(device: Device) -> None:
    device.activate(bacnet=5)
    s = Store.open(device.directory, None)
    good = s.state.encode()
    slot, _ = newest(device.directory)
    data = bytearray(slot.read_bytes())
    i = bytes(data).find(good)
    assert 0 < i < len(data) // 2  # the first copy's state
    data[i + len(good) // 2] ^= 0x10
    slot.write_bytes(bytes(data))

    s2 = Store.open(device.directory, None)
    assert s2.state.encode() == good and s2.generation == s.generation
    assert any("second copy was used" in w for w in s2.report.warnings)
    # the device goes on; once both slots were rewritten the warning is gone
    device.activate(modbus=1)
    device.activate(knx=1)
    assert Store.open(device.directory, None).report.warnings == []


def test_every_single_bit_flip_in_a_slot_is_survived(device: Device) -> None:
    device.activate(bacnet=5)
    s = Store.open(device.directory, None)
    data = newest(device.directory)[0].read_bytes()
    expected = decode_slot(s.mac_key, data)[:2]
    assert expected == (s.generation, s.state.encode())
    for i in range(len(data)):
        for bit in range(8):
            flipped = bytearray(data)
            flipped[i] ^= 1 << bit
            assert decode_slot(s.mac_key, bytes(flipped))[:2] == expected, (i, bit)


def logical(st: AgentState) -> tuple[object, ...]:
    """What a recovery must preserve: identity, position in the chain, licenses."""
    return (st.device_id, st.sequence, st.licenses, st.binding, st.trust)


def test_every_truncation_of_the_newest_slot(device: Device) -> None:
    """A slot cut at any length: the first copy if it is whole, else the older slot rolled
    forward through the journal; never the older state as it is."""
    device.activate(bacnet=5)
    s = Store.open(device.directory, None)
    newer = s.state.encode()
    slot, other = newest(device.directory)
    older = decode_slot(s.mac_key, other.read_bytes())[1]
    data = slot.read_bytes()
    whole_from = None
    for n in range(len(data)):
        try:
            got = decode_slot(s.mac_key, data[:n])[:2]
        except IntegrityError:
            assert whole_from is None, n  # once the first copy is whole it stays readable
            continue
        assert got == (s.generation, newer), n
        whole_from = n if whole_from is None else whole_from
    assert whole_from is not None and whole_from <= len(data) // 2 + 4
    journal = (device.directory / JOURNAL_FILE).read_bytes()
    assert logical(AgentState.from_cbor(strict_loads(older, max_size=MAX_SLOT))) != logical(s.state)
    for n in (0, 1, 7, whole_from - 1, whole_from, len(data) - 1):
        slot.write_bytes(data[:n])
        st = Store.open(device.directory, None)
        if n >= whole_from:
            assert st.state.encode() == newer, n
        else:
            assert logical(st.state) == logical(s.state), n
            assert any("rolled forward" in w for w in st.report.warnings), n
        assert st.report.warnings, n
        slot.write_bytes(data[:n])
        (device.directory / JOURNAL_FILE).write_bytes(journal)
    slot.write_bytes(data)


def strict_decode(state_bytes: bytes) -> bytes:
    return AgentState.from_cbor(strict_loads(state_bytes, max_size=MAX_SLOT)).encode()


def test_newest_slot_destroyed_rolls_forward_never_back(device: Device) -> None:
    """Losing the newest slot must not resurrect what it removed: the journal redoes it."""
    device.activate(knx=1, bacnet=3)
    req = device.request(Action.RECLAIM, ["bacnet"])
    resp = device.vendor.issue(req, now=device.clock())
    device.agent.apply(resp)
    lost = state_of(device.directory)
    slot, _ = newest(device.directory)
    slot.write_bytes(random.Random(1).randbytes(slot.stat().st_size))  # both copies gone

    s = Store.open(device.directory, None)
    assert logical(s.state) == logical(lost)
    assert "bacnet" not in {lic.feature for lic in s.state.licenses}
    assert any(f"{slot.name} is damaged" in w for w in s.report.warnings)
    assert any("rolled forward" in w for w in s.report.warnings)
    assert s.journal.read().entries[-1].event == "recovered"
    # the reclaim cannot be undone by replaying anything: the journal's replay kept its
    # receipt, so the same response is the idempotent no-op that hands it back
    res, _ = device.agent.apply(resp)
    assert res.already_applied and res.receipt == lost.last_receipt
    assert "bacnet" not in {lic.feature for lic in state_of(device.directory).licenses}
    assert Store.open(device.directory, None).report.warnings == []  # the bad slot was rewritten
    device.activate(lon=1)
    assert device.agent.check("lon").licensed


def test_newest_slot_destroyed_with_no_journal_record_uses_last_good_state(
    device: Device,
) -> None:
    """The journal lost its last record and the newest slot is damaged: the older slot, whose
    head is the journal's end, is the truth: its request is still outstanding and the
    response applies again. (Write-ahead: a commit never reaches a slot without its record.)"""
    device.activate(knx=1)
    journal = device.directory / JOURNAL_FILE
    req = device.request(Action.ACTIVATE, ["bacnet"])
    resp = device.vendor.issue(req, [Grant("bacnet", 9)], now=device.clock())
    last_good = state_of(device.directory).encode()
    before_apply = journal.read_bytes()
    device.agent.apply(resp)
    lost = state_of(device.directory).encode()
    slot, _ = newest(device.directory)
    journal.write_bytes(before_apply)
    with pytest.raises(IntegrityError, match="cut short"):  # the newest slot names the record
        Store.open(device.directory, None)
    slot.write_bytes(random.Random(2).randbytes(slot.stat().st_size))

    s = Store.open(device.directory, None)
    assert s.state.encode() == last_good
    assert any("last good state" in w for w in s.report.warnings)
    res, _ = device.agent.apply(resp)
    assert not res.already_applied
    assert state_of(device.directory).encode() == lost


@pytest.mark.parametrize("damage", ["garbage", "empty", "garbage+empty", "missing+garbage"])
def test_both_slots_destroyed_is_an_integrity_error_and_nothing_is_reset(
    device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, damage: str,
) -> None:
    device.activate(bacnet=2)
    rng = random.Random(damage)
    how = damage.split("+") * (2 if "+" not in damage else 1)
    for kind, name in zip(how, SLOTS, strict=True):
        p = device.directory / name
        if kind == "garbage":
            p.write_bytes(rng.randbytes(p.stat().st_size))
        elif kind == "empty":
            p.write_bytes(b"")
        else:
            p.unlink()
    facts = facts_file(device, tmp_path)
    monkeypatch.setenv("LICAGENT_TIME", str(device.clock()))
    before = all_files(device.directory)

    for _ in range(2):  # and again: the first failure did not "repair" anything
        with pytest.raises(IntegrityError) as exc:
            Store.open(device.directory, None)
        assert exc.value.exit_code == 8
        assert "NOT reset" in str(exc.value)
    with pytest.raises(IntegrityError):
        device.agent.status()
    with pytest.raises(IntegrityError):
        device.agent.request(Action.ACTIVATE, ["x"])
    code, _out, err = run_cli(capsys, "status", "--state", str(device.directory),
                              "--facts", str(facts))
    assert code == 8 and "store-integrity" in err
    with pytest.raises(UsageError):  # init will not overwrite it either
        device.agent.init("AS-P", None, [device.vendor.public])
    assert all_files(device.directory) == before


@pytest.mark.parametrize("which", ["newest", "older"])
def test_slot_truncated_to_zero_bytes(device: Device, which: str) -> None:
    device.activate(bacnet=2)
    device.activate(modbus=3)
    s = Store.open(device.directory, None)
    slot, other = newest(device.directory)
    keep = decode_slot(s.mac_key, other.read_bytes())[1] if which == "newest" else None
    (slot if which == "newest" else other).write_bytes(b"")

    s2 = Store.open(device.directory, None)
    if keep is None:
        assert s2.state.encode() == s.state.encode()
    else:  # the older slot, rolled forward through the journal
        assert logical(s2.state) == logical(s.state)
    assert s2.report.warnings
    device.activate(knx=1)
    device.activate(lon=1)
    st = Store.open(device.directory, None)
    assert st.report.warnings == []
    assert {"knx", "lon"} <= {lic.feature for lic in st.state.licenses}


# ---------------------------------------------------------------- (c) journal


@pytest.fixture
def journal_device(device: Device) -> Device:
    device.activate(bacnet=1)
    device.activate(modbus=2)
    return device


def test_torn_journal_tail_is_reported_and_cut_off(
    journal_device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record past the slot's head cut short by a crash is a torn tail (exit 0, cut off at
    the next append); a cut into the head record itself is a cut journal (exit 8)."""
    dev = journal_device
    with pytest.raises(LicensingError):  # a refusal: journaled past the head, no slot save
        dev.agent.apply(b"not a response")
    jpath = dev.directory / JOURNAL_FILE
    data = jpath.read_bytes()
    last = record_offsets(data)[-1]
    blob = len(data) - last
    s = Store.open(dev.directory, None)
    assert s.head is not None and s.head.end == last  # the refusal lies past the head
    n = len(s.journal.read().entries)
    j = Journal(jpath, s.journal.mac_key, FileOps())

    for cut in range(1, blob):  # every partial last record, length prefix included
        jpath.write_bytes(data[:-cut])
        rep = j.read()
        assert len(rep.entries) == n - 1 and rep.torn_tail == blob - cut, cut
        assert rep.good_length == last, cut

    facts = facts_file(dev, tmp_path)
    monkeypatch.setenv("LICAGENT_TIME", str(dev.clock()))
    for cut in (1, 3, blob // 2, blob - 4, blob - 2):
        jpath.write_bytes(data[:-cut])
        code, out, _ = run_cli(capsys, "journal", "--state", str(dev.directory),
                               "--facts", str(facts), "--verify")
        assert code == 0, cut
        assert f"journal OK: {n - 1} entries" in out, cut
        assert f"{blob - cut} bytes of a torn last record" in out, cut

    for cut in (blob + 1, blob + 4, len(data) // 2):  # into the record the slot names
        jpath.write_bytes(data[:-cut])
        code, out, err = run_cli(capsys, "journal", "--state", str(dev.directory),
                                 "--facts", str(facts), "--verify")
        assert code == 8 and "store-integrity" in err and "cut short" in err, cut
        assert len(err.strip().splitlines()) == 1, err
    jpath.write_bytes(data[:-1])

    dev.request(Action.ACTIVATE, ["knx"])  # the next append cuts the torn tail off
    rep = j.read()
    assert rep.torn_tail == 0 and len(rep.entries) == n
    assert rep.entries[-1].event == "request"
    assert jpath.read_bytes()[:last] == data[:last]
    code, out, _ = run_cli(capsys, "journal", "--state", str(dev.directory),
                           "--facts", str(facts), "--verify")
    assert code == 0 and "torn" not in out and f"journal OK: {n} entries" in out


def test_modified_byte_in_earlier_record_is_exit_8(
    journal_device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A damaged record before the slot's head: the journal file is no longer the one the
    slot recorded (its change time moved), so opening verifies the whole chain and every
    command refuses (exit 8, one line naming the record), as for a cut journal; the
    state is not changed and ``journal --verify`` says so too."""
    dev = journal_device
    jpath = dev.directory / JOURNAL_FILE
    pristine = jpath.read_bytes()
    data = bytearray(pristine)
    offs = record_offsets(bytes(data))
    assert len(offs) >= 4
    data[(offs[1] + offs[2]) // 2] ^= 0x01  # inside record 1, well before the tail
    jpath.write_bytes(bytes(data))
    facts = facts_file(dev, tmp_path)
    monkeypatch.setenv("LICAGENT_TIME", str(dev.clock()))
    before = dev.store_bytes()

    out_file = tmp_path / "req.cbor"
    code, _, err = run_cli(capsys, "request", "--state", str(dev.directory),
                           "--facts", str(facts), "activate", "--feature", "knx",
                           "--out", str(out_file))
    assert code == 8 and "store-integrity" in err and "record 1" in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert not out_file.exists()
    assert dev.store_bytes() == before and jpath.read_bytes() == bytes(data)
    for cmd in (["status"], ["check", "knx"], ["info"], ["journal", "--verify"]):
        code, _, err = run_cli(capsys, *cmd, "--state", str(dev.directory), "--facts", str(facts))
        assert code == 8 and "store-integrity" in err and "record 1" in err, (cmd, err)
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(IntegrityError, match="record 1"):
        dev.request(Action.ACTIVATE, ["knx"])
    assert dev.store_bytes() == before and jpath.read_bytes() == bytes(data)

    jpath.write_bytes(pristine)  # put back as it was (a new change time): verified, usable
    dev.request(Action.ACTIVATE, ["knx"])
    code, _, _ = run_cli(capsys, "journal", "--state", str(dev.directory),
                         "--facts", str(facts), "--verify")
    assert code == 0

    # the record the slot names (the last one here) damaged: every command refuses
    s = Store.open(dev.directory, None)
    assert s.head is not None
    data = bytearray(jpath.read_bytes())
    data[(s.head.start + s.head.end) // 2] ^= 0x01
    jpath.write_bytes(bytes(data))
    before = dev.store_bytes()
    for cmd in (["status"], ["check", "knx"], ["journal", "--verify"], ["info"]):
        code, _, err = run_cli(capsys, *cmd, "--state", str(dev.directory), "--facts", str(facts))
        assert code == 8 and "does not hold the record the store's slot names" in err, cmd
        assert len(err.strip().splitlines()) == 1, err
    with pytest.raises(IntegrityError):
        dev.request(Action.ACTIVATE, ["lon"])
    assert dev.store_bytes() == before and jpath.read_bytes() == bytes(data)


def test_every_modified_byte_of_the_journal_is_detected(journal_device: Device) -> None:
    """Length prefixes included: a damaged length must not pass for a torn tail."""
    jpath = journal_device.directory / JOURNAL_FILE
    data = jpath.read_bytes()
    s = Store.open(journal_device.directory, None)
    j = Journal(jpath, s.journal.mac_key, FileOps())
    for i in range(len(data)):
        for mask in (0x01, 0x40, 0x80, 0xFF):
            bad = bytearray(data)
            bad[i] ^= mask
            jpath.write_bytes(bytes(bad))
            with pytest.raises(IntegrityError):
                j.read()
                pytest.fail(f"byte {i} ^ {mask:#x} went unnoticed")
    jpath.write_bytes(data)


# ---------------------------------------------------------------- (d) SIGKILL a real process


def licagent_cmd() -> list[str]:
    script = Path(sys.executable).parent / "licagent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "apps.licagent.cli"]


@pytest.mark.slow
def test_sigkill_mid_apply(tmp_path: Path, vendor: Vendor) -> None:
    iterations = 40
    rng = random.Random(20270115)
    hw = HardwareFacts(model="AS-P", serial="SN-KILL-0001", macs=("00:80:f4:0a:0b:0c",),
                       board="AS-P-MB2", machine_id="5f1e0c4b2d7a4e0f9c3b8a6d1e2f3a4b")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(hw.as_dict()))
    assert load_facts_file(facts).read() == hw  # subprocess and test see the same hardware
    clock = Clock()
    d = tmp_path / "store"
    agent = Agent(d, StaticFactsProvider(hw), clock=clock)
    agent.init("AS-P", hw.serial, [vendor.public])
    start_seq = state_of(d).sequence
    cmd = licagent_cmd()

    def env() -> dict[str, str]:
        return {**os.environ, "LICAGENT_FACTS": str(facts), "LICAGENT_TIME": str(clock.t)}

    full_run = 0.15
    outcomes = {"completed": 0, "killed-old": 0, "killed-new": 0}
    for i in range(iterations):
        clock.t += 60
        feature = f"f{i % 7}"
        if i % 5 == 0:  # sometimes the request also comes from the CLI
            req_file = tmp_path / "req.cbor"
            subprocess.run([*cmd, "request", "activate", "--state", str(d), "--feature",
                            feature, "--out", str(req_file)], env=env(), check=True,
                           capture_output=True)
            req = req_file.read_bytes()
        else:
            req = agent.request(Action.ACTIVATE, [feature])
        resp = vendor.issue(req, [Grant(feature, i + 1)], now=clock.t)
        resp_file = tmp_path / "resp.cbor"
        resp_file.write_bytes(resp)
        s = Store.open(d, None)
        old = s.state.encode()
        new = protocol.apply_response(s.state, resp, clock.t, s.key).state.encode()

        began = time.monotonic()
        proc = subprocess.Popen([*cmd, "apply", "--state", str(d), str(resp_file)], env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if i == 0:  # a complete run, to learn how long one takes on this machine
            _out, err = proc.communicate()
            assert proc.returncode == 0, err
            full_run = time.monotonic() - began
        else:
            hi = 1.25 * full_run if i % 2 else 1.1 * full_run
            lo = 0.0 if i % 2 else 0.7 * full_run  # half the kills near the write window
            time.sleep(rng.uniform(lo, hi))
            proc.send_signal(signal.SIGKILL)
            _out, err = proc.communicate()
            assert proc.returncode in (0, -signal.SIGKILL), err

        loaded = state_of(d).encode()
        assert loaded in (old, new), f"iteration {i}: neither the old nor the new state"
        if proc.returncode == 0:
            assert loaded == new
            outcomes["completed"] += 1
        else:
            outcomes["killed-new" if loaded == new else "killed-old"] += 1
        # the outstanding request is still usable: applied now, or the idempotent no-op
        res, warn = agent.apply(resp)
        assert res.already_applied == (loaded == new), i
        assert warn is None
        assert state_of(d).encode() == new
        assert state_of(d).sequence == start_seq + i + 1

    rep = Store.open(d, None).journal.read()
    assert rep.torn_tail == 0
    verify = subprocess.run([*cmd, "journal", "--state", str(d), "--verify"], env=env(),
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert f"journal OK: {len(rep.entries)} entries" in verify.stdout
    leftovers = [n for n in os.listdir(d) if ".tmp" in n]
    print(f"\nSIGKILL outcomes over {iterations} runs (full run {full_run * 1000:.0f} ms): "
          f"{outcomes}; temp files left by killed processes: {len(leftovers)}")


def test_restored_store_is_verified_whole_once_and_works(
    journal_device: Device, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A store copied away and put back with ``cp -a`` (a new inode and change time, the
    same bytes): the journal is not the file the slot recorded, so the first open verifies
    its whole chain, which passes; commands work, and the next save records the new file."""
    dev = journal_device
    backup = tmp_path / "backup"
    subprocess.run(["cp", "-a", str(dev.directory), str(backup)], check=True)
    shutil.rmtree(dev.directory)
    subprocess.run(["cp", "-a", str(backup), str(dev.directory)], check=True)

    s = Store.open(dev.directory, None)
    assert s.journal.verified_whole
    assert s.head is not None and s.head.file is not None
    st = (dev.directory / JOURNAL_FILE).stat()
    assert s.head.file != (st.st_ino, st.st_size, st.st_ctime_ns)

    facts = facts_file(dev, tmp_path)
    monkeypatch.setenv("LICAGENT_TIME", str(dev.clock()))
    out_file = tmp_path / "req.cbor"
    code, _, err = run_cli(capsys, "request", "--state", str(dev.directory),
                           "--facts", str(facts), "activate", "--feature", "knx",
                           "--out", str(out_file))
    assert code == 0, err
    assert out_file.exists()
    s = Store.open(dev.directory, None)  # the request's save recorded this journal file
    assert not s.journal.verified_whole
    st = (dev.directory / JOURNAL_FILE).stat()
    assert s.head is not None and s.head.file == (st.st_ino, st.st_size, st.st_ctime_ns)
    code, _, _ = run_cli(capsys, "journal", "--state", str(dev.directory),
                         "--facts", str(facts), "--verify")
    assert code == 0


def test_common_open_reads_the_journal_from_the_head_only(
    journal_device: Device, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """After the agent's own commit the journal is the file the slot recorded: opening
    scans from the head record on, never from the journal's first byte (constant time)."""
    dev = journal_device
    dev.request(Action.ACTIVATE, ["knx"])
    starts: list[int] = []
    scan = Journal._scan

    def counting(self: Journal, keep: Any = None, since: int | None = None,
                 start: Any = None) -> Any:
        starts.append(0 if start is None else start.offset)
        return scan(self, keep, since, start)

    monkeypatch.setattr(Journal, "_scan", counting)
    s = Store.open(dev.directory, None)
    assert s.head is not None and s.head.count >= 4 and s.head.file is not None
    assert not s.journal.verified_whole
    assert starts and all(o >= s.head.end > 0 for o in starts), starts

    # the daemon's kept store: a changed earlier record changes the file's identity, so the
    # kept store is not reused and the fresh open verifies the whole chain (exit 8)
    agent = Agent(dev.directory, dev.agent.facts, clock=dev.clock, keep_open=True)
    agent.status()
    agent.status()
    assert starts and all(o >= s.head.start for o in starts), starts
    jpath = dev.directory / JOURNAL_FILE
    data = bytearray(jpath.read_bytes())
    offs = record_offsets(bytes(data))
    data[(offs[1] + offs[2]) // 2] ^= 0x01
    jpath.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="record 1"):
        agent.status()

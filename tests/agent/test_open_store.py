"""Issue 17, item 2: a store kept open between operations (the daemon) is exact.

An agent with ``keep_open`` reuses its loaded store only while the files are byte
for byte what they were after its last operation. Here real ``licagent`` processes
change the store beside it, older slots and journals are put back, the journal is
cut and a slot damaged: after each, the kept agent answers exactly what an agent
opening the store from scratch answers (or refuses exactly as it does), and the
kept store is shown to be reused when nothing changed (so the cache is real).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.cose import SigningKey
from agent.errors import IntegrityError, LicensingError
from agent.identity import HardwareFacts
from agent.messages import Action
from agent.service import Agent
from agent.store import JOURNAL_FILE, SLOTS, OpenStore
from hw.facts import StaticFactsProvider
from simulators.licensing_server.vendor import Grant, Vendor

HW = HardwareFacts(model="AS-P", serial="SN-KEEP-1", macs=("00:80:f4:0a:0b:0d",))
T0 = 1_800_000_000


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


def licagent(d: Path, facts: Path, clock: Clock, *args: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "licagent"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "apps.licagent.cli"]
    env = {**os.environ, "LICAGENT_FACTS": str(facts), "LICAGENT_TIME": str(clock.t)}
    return subprocess.run([*cmd, *args[:1], "--state", str(d), *args[1:]], env=env,
                          capture_output=True, text=True, check=False)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Agent, Agent, Vendor, Clock, Path]:
    clock = Clock()
    vendor = Vendor(SigningKey.generate())
    d = tmp_path / "store"
    kept = Agent(d, StaticFactsProvider(HW), clock=clock, keep_open=True)
    kept.init("AS-P", HW.serial, [vendor.public])
    fresh = Agent(d, StaticFactsProvider(HW), clock=clock)
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(HW.as_dict()))
    return kept, fresh, vendor, clock, facts


def status(agent: Agent) -> dict[str, Any]:
    st = agent.status()
    return {k: v for k, v in st.items() if k != "warnings"}


def activate(agent: Agent, vendor: Vendor, clock: Clock, feature: str, count: int = 1) -> None:
    req = agent.request(Action.ACTIVATE, [feature])
    agent.apply(vendor.issue(req, [Grant(feature, count)], now=clock.t))
    clock.t += 10


def kept_store(agent: Agent) -> Any:
    k = agent.__dict__.get("_kept")
    return k.store if isinstance(k, OpenStore) else None


def test_kept_store_is_reused_while_nothing_changes(setup: Any) -> None:
    kept, fresh, vendor, clock, _facts = setup
    activate(kept, vendor, clock, "bacnet")
    first = kept_store(kept)
    assert first is not None
    kept.check("bacnet")
    kept.status()
    assert kept_store(kept) is first  # reused: not opened again
    assert status(kept) == status(fresh)
    # an agent without keep_open keeps nothing
    fresh.status()
    assert kept_store(fresh) is None


def test_another_process_commit_is_seen(setup: Any) -> None:
    kept, fresh, vendor, clock, facts = setup
    d = kept.directory
    activate(kept, vendor, clock, "bacnet")
    before = kept_store(kept)
    # a real licagent process creates a request and applies its response beside the agent
    out = d.parent / "req.cbor"
    r = licagent(d, facts, clock, "request", "activate", "--feature", "modbus", "--out", str(out))
    assert r.returncode == 0, r.stderr
    resp = d.parent / "resp.cbor"
    resp.write_bytes(vendor.issue(out.read_bytes(), [Grant("modbus", 3)], now=clock.t))
    r = licagent(d, facts, clock, "apply", str(resp))
    assert r.returncode == 0, r.stderr
    st = status(kept)
    assert kept_store(kept) is not before  # opened again
    assert {lic["feature"] for lic in st["licenses"]} == {"bacnet", "modbus"}
    assert st == status(fresh)
    # and the kept agent builds on the other process's state
    activate(kept, vendor, clock, "lon")
    assert status(kept) == status(fresh)
    assert status(kept)["sequence"] == 3


def test_request_by_another_process_only_in_the_journal_is_seen(setup: Any) -> None:
    kept, fresh, _vendor, clock, facts = setup
    d = kept.directory
    kept.status()
    r = licagent(d, facts, clock, "request", "activate", "--feature", "x1",
                 "--out", str(d.parent / "r.cbor"))
    assert r.returncode == 0, r.stderr
    assert len(status(kept)["outstanding_requests"]) == 1
    assert status(kept) == status(fresh)


def test_older_slots_put_back_are_replayed_as_a_fresh_open_does(setup: Any) -> None:
    kept, fresh, vendor, clock, _facts = setup
    d = kept.directory
    activate(kept, vendor, clock, "bacnet")
    saved = {n: (d / n).read_bytes() for n in SLOTS}
    activate(kept, vendor, clock, "modbus")
    req = kept.request(Action.RECLAIM, ["bacnet"])
    kept.apply(vendor.issue(req, now=clock.t))  # reclaim: bacnet gone
    for n, b in saved.items():  # older slots back, same sizes and all, within a clock tick
        (d / n).write_bytes(b)
    st = status(kept)
    assert {lic["feature"] for lic in st["licenses"]} == {"modbus"}  # never comes back
    assert st == status(fresh)


def test_cut_journal_and_damaged_slot_are_refused_like_a_fresh_open(setup: Any) -> None:
    kept, fresh, vendor, clock, _facts = setup
    d = kept.directory
    activate(kept, vendor, clock, "bacnet")
    activate(kept, vendor, clock, "modbus")
    kept.status()
    j = d / JOURNAL_FILE
    whole = j.read_bytes()
    j.write_bytes(whole[:-7])  # the journal cut inside its last record
    with pytest.raises(IntegrityError) as got:
        kept.status()
    with pytest.raises(IntegrityError) as want:
        fresh.status()
    assert str(got.value) == str(want.value)
    j.write_bytes(whole)
    assert status(kept) == status(fresh)
    # one byte of the newest slot flipped: both copies checked again, same warnings
    newest = max(SLOTS, key=lambda n: (d / n).stat().st_mtime_ns)
    data = bytearray((d / newest).read_bytes())
    data[len(data) // 4] ^= 0x40
    (d / newest).write_bytes(bytes(data))
    got_st, want_st = kept.status(), fresh.status()
    assert got_st["warnings"] and got_st["warnings"] == want_st["warnings"]


def test_changed_hardware_is_noticed_on_a_kept_store(setup: Any) -> None:
    kept, _fresh, vendor, clock, _facts = setup
    activate(kept, vendor, clock, "bacnet")
    moved = Agent(kept.directory, StaticFactsProvider(HardwareFacts(
        model="AS-P", serial="OTHER", macs=("00:80:f4:99:99:99",))), clock=clock,
        keep_open=True)
    moved.__dict__["_kept"] = kept.__dict__["_kept"]  # the same kept store, other hardware
    with pytest.raises(LicensingError) as exc:
        moved.status()
    assert exc.value.exit_code == 5


def test_a_failed_operation_drops_the_kept_store(setup: Any) -> None:
    kept, _fresh, vendor, clock, _facts = setup
    activate(kept, vendor, clock, "bacnet")
    with pytest.raises(LicensingError):
        kept.apply(b"\xa0")  # not a response: refused
    assert kept_store(kept) is None
    assert status(kept)["sequence"] == 1
    assert kept_store(kept) is not None


LOCK_PROBE = """
import fcntl, sys
with open(sys.argv[1], "rb") as f:
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        sys.exit(3)
sys.exit(0)
"""


def other_process_can_lock(path: Path) -> bool:
    r = subprocess.run([sys.executable, "-c", LOCK_PROBE, str(path)], capture_output=True,
                       check=False)
    assert r.returncode in (0, 3), r.stderr
    return r.returncode == 0


def test_kept_lock_excludes_other_processes_even_after_the_lock_file_is_replaced(
        setup: Any) -> None:
    kept, _fresh, vendor, clock, _facts = setup
    lock = kept.directory / "lock"
    activate(kept, vendor, clock, "bacnet")
    with kept._open():  # an operation in progress: another process cannot take the lock
        assert not other_process_can_lock(lock)
    assert other_process_can_lock(lock)  # released between operations (the file kept open)
    # the lock file removed and made again: the kept descriptor names a file no longer
    # there, so the next operation locks the new one
    lock.unlink()
    lock.write_bytes(b"")
    lock.chmod(0o600)
    with kept._open():
        assert not other_process_can_lock(lock)
    assert other_process_can_lock(lock)
    lock.unlink()  # and gone altogether: made again by the next operation
    assert status(kept)["sequence"] == 1
    assert lock.exists()
    with kept._open():
        assert not other_process_can_lock(lock)


def test_after_a_commit_the_kept_files_are_exactly_what_a_reread_finds(setup: Any) -> None:
    """Issue 17: after its own commit the kept store takes the files as it wrote them (no
    read back); they must be byte for byte, and in the journal's identity, what reading
    them finds, or every later request would open the store from scratch (or worse)."""
    from agent.store import _files

    kept, fresh, vendor, clock, _facts = setup
    for i in range(4):
        activate(kept, vendor, clock, f"f{i}")
        k = kept.__dict__["_kept"]
        assert k.files == _files(kept.directory, k.journal_from)
        assert k.store.saved is not None and k.store.saved[0] == k.store.generation
    before = kept_store(kept)
    kept.status()
    assert kept_store(kept) is before  # reused: what it kept is what is on disk
    assert status(kept) == status(fresh)


def test_a_slot_rewritten_in_place_right_after_a_commit_is_noticed(setup: Any) -> None:
    """Another process puts the older slot's bytes into the newest slot's file, same inode
    and size where it can (an in-place write: no rename), right after the kept agent's
    commit: the next request opens from scratch and says what it found."""
    kept, fresh, vendor, clock, _facts = setup
    activate(kept, vendor, clock, "bacnet")
    activate(kept, vendor, clock, "modbus")
    k = kept.__dict__["_kept"]
    newest = kept.directory / SLOTS[k.store.slot]
    older = (kept.directory / SLOTS[1 - k.store.slot]).read_bytes()
    with open(newest, "r+b") as f:  # in place: same inode
        f.write(older)
        f.truncate(len(older))
    st = status(kept)
    assert kept_store(kept) is not k.store  # opened again: the journal rolls it forward
    assert {lic["feature"] for lic in st["licenses"]} == {"bacnet", "modbus"}
    assert st == status(fresh)


def test_a_state_directory_swapped_for_another_between_requests_is_opened(setup: Any) -> None:
    """The kept store keeps its directory and files open between requests (issue 17): a
    directory put in place of the old one (an older copy restored under the same path) is
    another file, so the next request opens it from scratch, as a fresh process does."""
    import shutil

    kept, fresh, vendor, clock, _facts = setup
    d = kept.directory
    activate(kept, vendor, clock, "bacnet")
    copy = d.parent / "copy"
    shutil.copytree(d, copy)  # the store with bacnet only
    activate(kept, vendor, clock, "modbus")
    before = kept_store(kept)
    d.rename(d.parent / "old")
    copy.rename(d)
    st = status(kept)
    assert kept_store(kept) is not before
    assert {lic["feature"] for lic in st["licenses"]} == {"bacnet"}
    assert st == status(fresh)


def test_kept_files_are_closed_when_the_kept_store_is_dropped(setup: Any) -> None:
    kept, _fresh, vendor, clock, _facts = setup
    activate(kept, vendor, clock, "bacnet")
    kept.status()
    k = kept.__dict__["_kept"]
    fds = [fd for fd, _ident in k.fds.values()]
    assert len(fds) == 5  # the directory, the key, both slots, the journal
    def open_in_store() -> list[int]:
        out = []
        for fd in fds:
            try:
                target = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(kept.directory)):
                out.append(fd)
        return out

    assert open_in_store() == fds
    del kept.__dict__["_kept"]
    del k
    assert open_in_store() == []


def test_the_head_a_commit_names_without_reading_is_the_head_read_from_the_file(
        setup: Any) -> None:
    """Issue 17: a commit's slot names the journal head its own append left, taken from
    memory; it must be the head reading the file gives (count, place, digest, identity),
    and a journal changed since that append (here: another append) is read again."""
    from agent.store import Store

    kept, _fresh, vendor, clock, _facts = setup
    activate(kept, vendor, clock, "f0")  # the journal anchored at a store's head
    store = Store.open(kept.directory, HW.binding_facts(), now=clock.t)
    for i in range(3):
        store.journal.append("reapply", {"sequence": 0, "i": i}, clock.t)
        got = store.journal.appended_head()
        assert got is not None and got == store.journal.head()
        assert got.file is not None  # the identity known: the append's own fstat
    other = Store.open(kept.directory, HW.binding_facts(), now=clock.t)
    other.journal.append("reapply", {"sequence": 0, "i": 9}, clock.t)
    assert store.journal.appended_head() is not None  # memory alone cannot know ...
    store.journal.head()  # ... but reading the file finds the other record: re-read
    assert store.journal.appended_head() is None

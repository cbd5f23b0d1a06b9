"""Item 5: partial restores and crashes never bring back a license.

Staged for real on a real store directory: older slot files copied back without the
journal, one slot damaged on top, an older (shorter) journal put back, a journal
deleted, emptied or cut, and real ``licagent`` processes killed with a real SIGKILL
at every file-system call between the journal append and the slot write.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cose import SigningKey
from agent.errors import IntegrityError
from agent.identity import HardwareFacts
from agent.messages import Action, TrustKey
from agent.service import Agent
from agent.store import (
    JOURNAL_FILE,
    RESAVE_AFTER,
    SLOTS,
    Store,
    decode_slot,
    decode_slot_head,
    encode_slot,
)
from hw.facts import StaticFactsProvider
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Device, Site

ROOT = Path(__file__).resolve().parents[2]


def slots(d: Path) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in SLOTS if (d / n).exists()}


def put_back(d: Path, saved: dict[str, bytes]) -> None:
    for n in SLOTS:
        if n in saved:
            (d / n).write_bytes(saved[n])
        else:
            (d / n).unlink(missing_ok=True)


def features(d: Path) -> set[str]:
    return {lic.feature for lic in Store.open(d, None).state.licenses}


def reclaim(device: Device, feature: str) -> bytes:
    req = device.request(Action.RECLAIM, [feature])
    resp = device.vendor.issue(req, now=device.clock())
    device.agent.apply(resp)
    return resp


def cli(device: Device, facts: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LICAGENT_TIME": str(device.clock()), "LICAGENT_FACTS": str(facts)}
    return subprocess.run([sys.executable, "-m", "apps.licagent.cli", *argv,
                           "--state", str(device.directory)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def facts(device: Device, tmp_path: Path) -> Path:
    p = tmp_path / "facts.json"
    p.write_text(json.dumps(device.facts.read().as_dict()))
    return p


def test_older_slots_copied_back_without_the_journal_never_revive_a_reclaim(
    device: Device, facts: Path,
) -> None:
    device.activate(knx=1, bacnet=3)
    old = slots(device.directory)  # a "backup" of the slots only, bacnet installed
    reclaim(device, "bacnet")
    device.activate(lon=2)  # and some more history after the reclaim
    newest = Store.open(device.directory, None).state
    assert "bacnet" not in features(device.directory)

    put_back(device.directory, old)
    s = Store.open(device.directory, None)
    assert s.state.sequence == newest.sequence and s.state.licenses == newest.licenses
    assert any("replayed" in w and "rolled forward" in w for w in s.report.warnings)
    # every command sees the newest committed state; the reclaimed license stays gone
    p = cli(device, facts, "check", "bacnet")
    assert p.returncode == 1 and "bacnet: not licensed" in p.stdout, p.stderr
    p = cli(device, facts, "status", "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["sequence"] == newest.sequence
    assert {lic["feature"] for lic in st["licenses"]} == {"knx", "lon"}
    # and the recovery was saved: the next open replays nothing
    assert Store.open(device.directory, None).report.warnings == []
    assert cli(device, facts, "journal", "--verify").returncode == 0


def test_older_slots_put_back_and_one_of_them_damaged(device: Device) -> None:
    """The older of the two restored slots is all that is left: the journal still carries
    the store forward to the newest state."""
    device.activate(bacnet=3)
    device.activate(knx=1)
    old = slots(device.directory)
    reclaim(device, "bacnet")
    newest = Store.open(device.directory, None).state

    put_back(device.directory, old)
    s = Store.open(device.directory, None, writable=False)  # look without healing
    damaged = device.directory / SLOTS[s.report.slot]
    damaged.write_bytes(b"\x00" * damaged.stat().st_size)
    s = Store.open(device.directory, None)
    assert s.state.licenses == newest.licenses and s.state.sequence == newest.sequence
    assert any(f"{damaged.name} is damaged" in w for w in s.report.warnings)
    assert "bacnet" not in features(device.directory)
    assert not device.agent.check("bacnet").licensed


def test_a_shorter_journal_put_back_stops_every_command(device: Device, facts: Path) -> None:
    device.activate(bacnet=3)
    journal = device.directory / JOURNAL_FILE
    old_journal = journal.read_bytes()
    reclaim(device, "bacnet")
    journal.write_bytes(old_journal)
    before = slots(device.directory)

    for argv in (["status"], ["check", "bacnet"], ["info"], ["journal", "--verify"],
                 ["request", "activate", "--feature", "x", "--out", os.devnull]):
        p = cli(device, facts, *argv)
        assert p.returncode == 8, (argv, p.stdout, p.stderr)
        line = p.stderr.strip()
        assert "\n" not in line and "journal.log" in line and "cut short" in line, line
        assert "store-integrity" in line
    assert slots(device.directory) == before and journal.read_bytes() == old_journal
    # the newest slot was not given up for the older one that matches the old journal
    with pytest.raises(IntegrityError):
        Store.open(device.directory, None)


@pytest.mark.parametrize("how", ["deleted", "emptied", "cut"])
def test_journal_verify_detects_a_deleted_emptied_or_cut_journal(
    device: Device, facts: Path, how: str,
) -> None:
    device.activate(bacnet=3)
    journal = device.directory / JOURNAL_FILE
    data = journal.read_bytes()
    if how == "deleted":
        journal.unlink()
    elif how == "emptied":
        journal.write_bytes(b"")
    else:
        journal.write_bytes(data[: len(data) - 7])
    before = slots(device.directory)
    jbefore = journal.read_bytes() if journal.exists() else None
    p = cli(device, facts, "journal", "--verify")
    assert p.returncode == 8, p.stdout
    line = p.stderr.strip()
    assert "\n" not in line and how.replace("cut", "cut short") in line, line
    # state changes stop too, with the same line; nothing is written
    p = cli(device, facts, "request", "activate", "--feature", "knx", "--out", os.devnull)
    assert p.returncode == 8 and how.replace("cut", "cut short") in p.stderr
    assert slots(device.directory) == before
    assert (journal.read_bytes() if journal.exists() else None) == jbefore


# ---------------------------------------------------------------- real SIGKILL at every step

#: runs one ``apply`` in its own process and SIGKILLs itself at file-system call number K
_KILLER = r"""
import os, signal, sys
from pathlib import Path
from agent.durable import FileOps
from agent.service import Agent
from hw.facts import load_facts_file

state, facts, resp, k, now = sys.argv[1:6]
k = int(k)

class KillAt(FileOps):
    n = 0
    def _step(self, what):
        KillAt.n += 1
        if KillAt.n == k:
            sys.stdout.write(what + "\n"); sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    def open(self, path, flags, mode=0o600):
        self._step("open " + Path(path).name); return super().open(path, flags, mode)
    def write(self, fd, data):
        self._step("write"); return super().write(fd, data)
    def fsync(self, fd):
        self._step("fsync"); return super().fsync(fd)
    def close(self, fd):
        self._step("close"); return super().close(fd)
    def replace(self, src, dst):
        self._step("replace " + Path(dst).name); return super().replace(src, dst)
    def ftruncate(self, fd, length):
        self._step("ftruncate"); return super().ftruncate(fd, length)

agent = Agent(Path(state), load_facts_file(Path(facts)), clock=lambda: int(now), ops=KillAt())
agent.apply(Path(resp).read_bytes())
print("done")
"""


def test_sigkill_at_every_step_of_a_reclaim_never_loses_its_record(
    device: Device, facts: Path, tmp_path: Path,
) -> None:
    """A real process applying a reclaim is SIGKILLed at each file-system call in turn: the
    store is exactly the old or the new state, the new one exactly when its journal record
    exists, and a later damage of the newest slot never brings the reclaimed license back."""
    device.activate(knx=1, bacnet=3)
    req = device.request(Action.RECLAIM, ["bacnet"])
    resp_file = tmp_path / "reclaim.resp"
    resp_file.write_bytes(device.vendor.issue(req, now=device.clock()))
    pristine = tmp_path / "pristine"
    shutil.copytree(device.directory, pristine)
    old = Store.open(pristine, None).state
    n_before = len(Store.open(pristine, None).journal.read().entries)

    outcomes: list[bool] = []
    k = 0
    while True:
        k += 1
        d = tmp_path / f"k{k}"
        shutil.copytree(pristine, d)
        p = subprocess.run([sys.executable, "-c", _KILLER, str(d), str(facts), str(resp_file),
                            str(k), str(device.clock())], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
        if p.returncode == 0:
            assert p.stdout.strip() == "done", p.stderr
            shutil.rmtree(d)
            break
        assert p.returncode == -signal.SIGKILL, p.stderr
        at = p.stdout.strip()
        s = Store.open(d, None)
        recorded = len(s.journal.read().entries) > n_before
        new = s.state.sequence == old.sequence + 1
        assert s.state.encode() == old.encode() or new, at
        assert recorded == new, f"killed at call {k} ({at}): record {recorded}, new state {new}"
        assert ("bacnet" in {lic.feature for lic in s.state.licenses}) == (not new), at
        # a later damage of the newest slot: the older slot plus the journal, same answer
        s = Store.open(d, None)
        slot = d / SLOTS[s.slot]
        slot.write_bytes(os.urandom(slot.stat().st_size))
        after = Store.open(d, None).state
        assert (after.sequence, after.licenses) == (s.state.sequence, s.state.licenses), at
        outcomes.append(new)
        shutil.rmtree(d)
    assert k > 10, k  # the journal append and the whole slot recipe were covered
    # both outcomes occurred: killed before the record (old) and after it (new)
    assert outcomes[0] is False and outcomes[-1] is True, outcomes
    assert outcomes == sorted(outcomes), outcomes  # one commit point: the record's write


# ---------------------------------------------------------------- slot format and head


def test_a_store_of_slot_format_1_is_read_and_upgraded_at_its_next_save(
    device: Device, facts: Path,
) -> None:
    """Slots written before they recorded the journal head are read as before; the next
    save writes format 2, and from then on a cut journal is refused."""
    device.activate(bacnet=3)
    s = Store.open(device.directory, None)
    for name in SLOTS:
        p = device.directory / name
        gen, sb, _w = decode_slot(s.mac_key, p.read_bytes())
        p.write_bytes(encode_slot(s.mac_key, gen, sb))  # format 1: no head
    assert all(decode_slot_head(s.mac_key, (device.directory / n).read_bytes())[2] is None
               for n in SLOTS)
    assert cli(device, facts, "check", "bacnet").returncode == 0
    device.activate(knx=1)
    s = Store.open(device.directory, None)
    head = decode_slot_head(s.mac_key, (device.directory / SLOTS[s.slot]).read_bytes())[2]
    assert head is not None and head.count == len(s.journal.read().entries)
    journal = device.directory / JOURNAL_FILE
    journal.write_bytes(journal.read_bytes()[:-1])
    p = cli(device, facts, "status")
    assert p.returncode == 8 and "cut short" in p.stderr


def test_records_past_the_head_are_bounded(device: Device) -> None:
    """Records that change nothing (here: re-applies) pile up past the slot's head until
    the next open finds more than RESAVE_AFTER and saves the slot, moving the head."""
    resp = device.activate(bacnet=3)
    start = Store.open(device.directory, None)
    assert start.head is not None
    for _ in range(RESAVE_AFTER + 1):
        res, _warn = device.agent.apply(resp)  # the idempotent no-op: a reapply record
        assert res.already_applied
    assert Store.open(device.directory, None, writable=False).head == start.head
    device.agent.apply(resp)  # this open finds RESAVE_AFTER + 2 past the head
    s = Store.open(device.directory, None)
    assert s.head is not None and s.head.count > start.head.count + RESAVE_AFTER
    assert s.state.encode() == start.state.encode()
    assert s.report.warnings == []


# ---------------------------------------------------------------- every kind of commit replays


def test_a_trust_update_and_a_rebind_are_replayed_onto_older_slots(site: Site) -> None:
    """Older slots put back after a trust rotation and a re-bind: both are redone from
    their journal records, so the old vendor key is not trusted again and the store stays
    bound to the new network card."""
    d = site.device(serial="CCC", macs=("00:80:f4:00:00:01", "00:80:f4:00:00:02"))
    d.activate(x=1)
    old = slots(d.directory)
    new_vendor = Vendor(SigningKey.generate())
    d.agent.trust_update(d.vendor.trust_update([TrustKey(new_vendor.public)], 1, d.clock()))
    new_hw = StaticFactsProvider(HardwareFacts(model="AS-P", serial="CCC",
                                               macs=("00:80:f4:00:00:01", "00:80:f4:00:00:99")))
    moved = Agent(d.directory, new_hw, clock=site.clock)
    assert any("re-bound" in w for w in moved.status()["warnings"])
    newest = Store.open(d.directory, None).state
    assert [e.event for e in moved.journal().entries][-2:] == ["trust-update", "rebind"]

    put_back(d.directory, old)
    s = Store.open(d.directory, None)
    assert s.state.trust == newest.trust and s.state.trust_version == 1
    assert s.state.binding == newest.binding and "mac=00:80:f4:00:00:99" in s.state.binding
    assert s.state.encode() == newest.encode()
    # the device goes on under the new key and the new card
    req = moved.request(Action.ACTIVATE, ["y"])
    moved.apply(new_vendor.issue(req, [Grant("y", 2)], now=site.clock()))
    assert moved.check("y").licensed

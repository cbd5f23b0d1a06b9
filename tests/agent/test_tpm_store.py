"""Issue 16 item 6 end to end: ``licagent init --key-store tpm+swtpm://...`` on a real swtpm.

The store holds no private key; licenses apply and receipts verify as with the file
key store; a store directory put back from an older copy is refused at open (exit 8,
one line, nothing written); a SIGKILL between a slot write and the counter's increment
is caught up at the next open.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cose import decode_sign1
from agent.errors import LicensingError, RestoredStoreError, StorageError, UnsafeFileError
from agent.identity import HardwareFacts
from agent.messages import Action
from agent.service import Agent
from agent.store import SLOTS, Store
from agent.tpm import TPM_FILE, Tpm
from hw.facts import StaticFactsProvider
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Clock
from tests.support.swtpm import SoftTpm

ROOT = Path(__file__).resolve().parents[2]
FACTS = HardwareFacts(model="AS-P", serial="SN-TPM-1", macs=("00:80:f4:00:00:71",))


@pytest.fixture
def soft_tpm() -> Iterator[SoftTpm]:
    tpm = SoftTpm()
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.close()
        assert not tpm.running, "swtpm outlived its fixture"


def licagent(state: Path, facts: Path, now: int, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LICAGENT_TIME": str(now), "LICAGENT_FACTS": str(facts)}
    return subprocess.run([sys.executable, "-m", "apps.licagent.cli", *argv, "--state", str(state)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def provisioned(soft_tpm: SoftTpm, tmp_path: Path, vendor: Vendor
                ) -> tuple[Path, Path, Agent, Clock]:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS.as_dict()))
    trust = tmp_path / "vendor.pub"
    trust.write_bytes(vendor.public.to_pem())
    state = tmp_path / "store"
    clock = Clock()
    done = licagent(state, facts, clock(), "init", "--model", "AS-P", "--trust", str(trust),
                    "--key-store", soft_tpm.url)
    assert done.returncode == 0, done.stderr
    assert "device_id" in done.stdout
    agent = Agent(state, StaticFactsProvider(FACTS), clock=clock)
    return state, facts, agent, clock


def activate(agent: Agent, vendor: Vendor, clock: Clock, **grants: int) -> None:
    req = agent.request(Action.ACTIVATE, grants)
    agent.apply(vendor.issue(req, [Grant(f, c) for f, c in grants.items()], now=clock()))


def test_no_private_key_in_the_store_and_licenses_apply(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor) -> None:
    state, facts, agent, clock = provisioned
    assert not (state / "device.key").exists()
    from agent.store import STATE_FILES, check_state_dir

    check_state_dir(state)  # device.tpm is checked like every state file (private, regular)
    present = sorted(n for n in os.listdir(state) if not n.startswith("."))
    assert TPM_FILE in present and set(present) <= set(STATE_FILES) - {"device.key"}
    os.chmod(state / TPM_FILE, 0o620)
    with pytest.raises(UnsafeFileError, match=f"{state / TPM_FILE} has mode 0620"):
        agent.status()
    os.chmod(state / TPM_FILE, 0o600)
    assert (state / TPM_FILE).exists()
    blob = b"".join(p.read_bytes() for p in state.iterdir() if p.is_file())
    assert b"PRIVATE KEY" not in blob
    activate(agent, vendor, clock, BACnet=2)
    done = licagent(state, facts, clock(), "status", "--json")
    assert done.returncode == 0, done.stderr
    assert "BACnet" in done.stdout
    # the device's signed files are signed in the TPM and verify with its key (ES256)
    st = Store.open(state, None).state
    assert st.device_key.alg == -7
    data, _info = agent.info()
    env = decode_sign1(data, max_size=1 << 20)
    assert env.verify_with(st.device_key)
    tampered = bytearray(data)
    tampered[-1] ^= 1
    with pytest.raises(LicensingError):
        decode_sign1(bytes(tampered), max_size=1 << 20).verify_with(st.device_key)


def test_store_restored_from_an_older_copy_is_refused(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor, tmp_path: Path) -> None:
    state, facts, agent, clock = provisioned
    activate(agent, vendor, clock, BACnet=2)
    backup = tmp_path / "backup"
    shutil.copytree(state, backup, symlinks=True)
    activate(agent, vendor, clock, Modbus=1)
    newest = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    # the whole directory put back from the copy (slots, journal, device.tpm: everything)
    shutil.rmtree(state)
    shutil.copytree(backup, state, symlinks=True)
    before = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 8, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "restored from an older copy" in lines[0], lines
    assert str(state / SLOTS[0]) in lines[0] or str(state / SLOTS[1]) in lines[0]
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == before
    with pytest.raises(RestoredStoreError):
        Store.open(state, None)
    # the newest copy put back opens again, with both licenses
    for name, data in newest.items():
        (state / name).write_bytes(data)
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 0, done.stderr
    assert "BACnet" in done.stdout and "Modbus" in done.stdout


def test_a_tpm_lost_between_slot_and_increment_is_caught_up(
        provisioned: tuple[Path, Path, Agent, Clock], soft_tpm: SoftTpm) -> None:
    """The slot is written, then the TPM goes away (swtpm stopped by SIGTERM) before the
    counter moves: the commit fails (exit 8), the slot stays committed, and the next
    open, with the TPM back, moves the counter on instead of calling it a restore."""
    state, facts, _agent, clock = provisioned
    store = Store.open(state, None)
    gen = store.generation
    value = Tpm(soft_tpm.url).read_counter()
    soft_tpm.stop()
    with pytest.raises(StorageError, match="increment the NV counter") as exc:
        store.commit(store.state, "recovered", {"warnings": ["test"], "generation": gen},
                     clock())
    assert exc.value.exit_code == 8
    soft_tpm.start()  # the same TPM state on the same port, as after a reboot
    tpm = Tpm(soft_tpm.url)
    assert tpm.read_counter() == value
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 0, done.stderr
    assert Store.open(state, None).generation == gen + 1
    assert tpm.read_counter() == value + 1


def test_a_second_init_on_the_same_tpm_is_refused(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor, soft_tpm: SoftTpm,
        tmp_path: Path) -> None:
    _, facts, _, clock = provisioned
    trust = tmp_path / "vendor.pub"
    done = licagent(tmp_path / "other", facts, clock(), "init", "--model", "AS-P", "--trust",
                    str(trust), "--key-store", soft_tpm.url)
    assert done.returncode == 8, done.stdout + done.stderr
    assert "already holds a device key" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_bad_key_store_url_is_a_usage_error(tmp_path: Path, vendor: Vendor) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(FACTS.as_dict()))
    trust = tmp_path / "vendor.pub"
    trust.write_bytes(vendor.public.to_pem())
    done = licagent(tmp_path / "s", facts, 1_800_000_000, "init", "--model", "AS-P",
                    "--trust", str(trust), "--key-store", "tpm+swtpm://127.0.0.1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "expected tpm+swtpm://HOST:PORT" in done.stderr
    assert not (tmp_path / "s" / TPM_FILE).exists()


def test_device_tpm_file_is_as_documented(provisioned: tuple[Path, Path, Agent, Clock],
                                          soft_tpm: SoftTpm) -> None:
    """docs/protocol.md section 29, checked with cbor2 and cryptography alone."""
    import cbor2
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    state, _, _, _ = provisioned
    assert (state / TPM_FILE).stat().st_mode & 0o777 == 0o600
    m = cbor2.loads((state / TPM_FILE).read_bytes())
    assert m[:5] == ["licagent-tpm", 1, soft_tpm.url, 0x81010016, 0x01500016]
    assert isinstance(m[5], int) and len(m[6]) == 32 and len(m[7]) == 65 and len(m[8]) == 64
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), m[7])
    der = encode_dss_signature(int.from_bytes(m[8][:32], "big"), int.from_bytes(m[8][32:], "big"))
    pub.verify(der, cbor2.dumps(m[:8], canonical=True), ec.ECDSA(hashes.SHA256()))
    assert Tpm(soft_tpm.url).read_counter() == m[5] + Store.open(state, None).generation


def test_a_store_copied_to_another_tpm_is_refused_at_open(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor, soft_tpm: SoftTpm) -> None:
    """The whole store copied to another server, whose TPM answers at the same URL: that
    TPM holds no such key, so nothing can be signed there; refused (exit 8), one line."""
    state, facts, agent, clock = provisioned
    activate(agent, vendor, clock, BACnet=2)
    soft_tpm.stop()
    other = SoftTpm()  # a fresh TPM (its own state) where the old one answered
    other.port = soft_tpm.port
    other.start()
    try:
        files = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
        done = licagent(state, facts, clock(), "status")
        assert done.returncode == 8, done.stdout + done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "which this TPM does not hold" in lines[0], lines
        assert "copied from another server" in lines[0]
        assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == files
    finally:
        other.close()
    soft_tpm.start()  # the store's own TPM back: it opens again
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 0 and "BACnet" in done.stdout, done.stderr


# ---------------------------------------------------------------- item 2: a damaged newest slot


def _newest_and_older(state: Path) -> tuple[Path, Path]:
    s = Store.open(state, None)
    return state / SLOTS[s.slot], state / SLOTS[1 - s.slot]


def _features(state: Path) -> set[str]:
    return {lic.feature for lic in Store.open(state, None).state.licenses}


@pytest.mark.parametrize("damage", ["garbage", "missing", "cut"])
def test_a_damaged_newest_slot_rolls_forward_from_the_journal(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor, soft_tpm: SoftTpm,
        damage: str) -> None:
    """As on the file store: the older slot plus the journal give back the newest state,
    and the TPM's counter is moved past the lost generation (so the next open agrees)."""
    state, facts, agent, clock = provisioned
    activate(agent, vendor, clock, BACnet=2)
    activate(agent, vendor, clock, Modbus=1)
    newest_state = Store.open(state, None).state
    gen = Store.open(state, None).generation
    tpm = Tpm(soft_tpm.url)
    counter = tpm.read_counter()
    slot, _older = _newest_and_older(state)
    data = slot.read_bytes()
    if damage == "garbage":
        slot.write_bytes(bytes(b ^ 0x5A for b in data))
    elif damage == "missing":
        slot.unlink()
    else:
        slot.write_bytes(data[:7])
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "BACnet" in done.stdout and "Modbus" in done.stdout
    s = Store.open(state, None)
    assert s.report.warnings == []  # the lost slot was rewritten
    assert s.state.licenses == newest_state.licenses
    assert s.state.sequence == newest_state.sequence
    assert s.generation == gen + 1 and tpm.read_counter() == counter + 1
    assert s.journal.read().entries[-1].event == "recovered"
    activate(agent, vendor, clock, KNX=1)  # and it goes on as before
    assert _features(state) == {"BACnet", "Modbus", "KNX"}


def test_a_damaged_older_slot_is_just_ignored(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor, soft_tpm: SoftTpm) -> None:
    state, facts, agent, clock = provisioned
    activate(agent, vendor, clock, BACnet=2)
    activate(agent, vendor, clock, Modbus=1)
    counter = Tpm(soft_tpm.url).read_counter()
    _newest, older = _newest_and_older(state)
    older.write_bytes(b"\x00" * older.stat().st_size)
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 0, done.stderr
    assert "BACnet" in done.stdout and "Modbus" in done.stdout
    assert Tpm(soft_tpm.url).read_counter() == counter


def test_newest_slot_lost_with_the_journals_last_commit_is_refused(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor, soft_tpm: SoftTpm) -> None:
    """Where the TPM store differs from the file store: there the older slot is the last
    good state (tests/agent/test_crash.py); here the TPM's counter says a newer state was
    saved, and nothing on disk can rebuild it, so the store is refused (exit 8)."""
    state, facts, agent, clock = provisioned
    activate(agent, vendor, clock, BACnet=2)
    journal = state / "journal.log"
    req = agent.request(Action.ACTIVATE, {"Modbus": 1})
    before = journal.read_bytes()  # the older slot's head is the journal's end
    agent.apply(vendor.issue(req, [Grant("Modbus", 1)], now=clock()))
    slot, _older = _newest_and_older(state)
    slot.write_bytes(bytes(b ^ 0xFF for b in slot.read_bytes()))
    journal.write_bytes(before)
    counter = Tpm(soft_tpm.url).read_counter()
    files = {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()}
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 8, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "TPM's counter says was saved" in lines[0], lines
    assert "journal holds no commit" in lines[0]
    assert {p.name: p.read_bytes() for p in state.iterdir() if p.is_file()} == files
    assert Tpm(soft_tpm.url).read_counter() == counter
    with pytest.raises(RestoredStoreError):
        Store.open(state, None)


def test_both_slots_lost_is_refused_and_nothing_is_reset(
        provisioned: tuple[Path, Path, Agent, Clock], vendor: Vendor) -> None:
    state, facts, agent, clock = provisioned
    activate(agent, vendor, clock, BACnet=2)
    for name in SLOTS:
        (state / name).write_bytes(b"x")
    done = licagent(state, facts, clock(), "status")
    assert done.returncode == 8, done.stdout + done.stderr
    assert "NOT reset" in done.stderr
    assert all((state / n).read_bytes() == b"x" for n in SLOTS)

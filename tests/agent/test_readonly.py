"""Item 7: reading never needs writing.

The store is put on a real read-only mount (a read-only bind mount of its folder; the
test needs root and is skipped otherwise) and the real ``licagent`` is run on it in
its own process: ``status``, ``check``, ``info`` and ``journal`` work; every write
fails with exit 8 and one line saying the file system is read-only; nothing changes.
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

from agent.messages import Action, TrustKey
from agent.store import JOURNAL_FILE, LOCK_FILE, SLOTS, Store
from simulators.licensing_server.vendor import Grant
from tests.conftest import T0, Device

ROOT = Path(__file__).resolve().parents[2]


def _mount(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(a writable folder, the same folder seen through a read-only bind mount)."""
    src, view = tmp_path / "rw", tmp_path / "ro"
    src.mkdir()
    view.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a read-only bind mount needs root")
    p = _mount("--bind", str(src), str(view))
    if p.returncode:
        pytest.skip(f"cannot bind-mount here: {p.stderr.strip()}")
    try:
        p = _mount("-o", "remount,bind,ro", str(view))
        assert p.returncode == 0, p.stderr
        probe = view / "probe"
        with pytest.raises(OSError):  # really read-only
            probe.write_text("x")
        yield src, view
    finally:
        subprocess.run(["umount", str(view)], check=False)
        if os.path.ismount(view):
            subprocess.run(["umount", "-l", str(view)], check=False)
    assert not os.path.ismount(view)


def licagent(state: Path, facts: Path, t: int, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LICAGENT_TIME": str(t), "LICAGENT_FACTS": str(facts)}
    return subprocess.run([sys.executable, "-m", "apps.licagent.cli", *argv, "--state",
                           str(state)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def store(device: Device, read_only: tuple[Path, Path], tmp_path: Path
          ) -> tuple[Device, Path, Path, Path]:
    """A device with history whose store lives in the bind-mounted folder."""
    src, view = read_only
    req = device.request(Action.ACTIVATE, ["bacnet", "knx"])
    device.agent.apply(device.vendor.issue(
        req, [Grant("bacnet", 5, not_after=T0 + 100), Grant("knx", 2)], now=device.clock()))
    shutil.copytree(device.directory, src / "store")
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(device.facts.read().as_dict()))
    return device, src / "store", view / "store", facts


def test_reading_works_on_a_read_only_file_system(
    store: tuple[Device, Path, Path, Path],
) -> None:
    device, rw, ro, facts = store
    before = snapshot(ro)
    t = device.clock()
    for argv in (["status"], ["status", "--json"], ["check", "knx"], ["info"],
                 ["info", "--json"], ["journal"], ["journal", "--json"],
                 ["journal", "--verify"]):
        p_ro = licagent(ro, facts, t, *argv)
        p_rw = licagent(rw, facts, t, *argv)
        assert p_ro.returncode == 0, (argv, p_ro.stderr)
        assert p_ro.stderr == "", (argv, p_ro.stderr)
        if argv[0] not in ("info",):  # info is freshly signed each time
            assert p_ro.stdout == p_rw.stdout, argv
    assert "journal OK" in licagent(ro, facts, t, "journal", "--verify").stdout
    assert snapshot(ro) == before


def test_the_lock_file_is_not_needed(store: tuple[Device, Path, Path, Path],
                                     read_only: tuple[Path, Path]) -> None:
    """A store copied without its lock file, then mounted read-only: still readable."""
    device, rw, ro, facts = store
    (rw / LOCK_FILE).unlink(missing_ok=True)
    p = licagent(ro, facts, device.clock(), "check", "knx")
    assert p.returncode == 0 and "knx: licensed" in p.stdout, p.stderr
    assert not (ro / LOCK_FILE).exists()


def test_every_write_fails_with_exit_8_and_one_line(
    store: tuple[Device, Path, Path, Path], tmp_path: Path,
) -> None:
    device, _rw, ro, facts = store
    before = snapshot(ro)
    resp = tmp_path / "x.resp"
    req = device.request(Action.ACTIVATE, ["modbus"])
    resp.write_bytes(device.vendor.issue(req, [Grant("modbus", 1)], now=device.clock()))
    trust = tmp_path / "trust.upd"
    trust.write_bytes(device.vendor.trust_update([TrustKey(device.vendor.public)], 2,
                                                 now=device.clock()))
    for argv in (["request", "activate", "--feature", "modbus", "--out", str(tmp_path / "r")],
                 ["apply", str(resp)], ["trust-update", str(trust)]):
        p = licagent(ro, facts, device.clock(), *argv)
        assert p.returncode == 8, (argv, p.stdout, p.stderr)
        line = p.stderr.strip()
        assert "\n" not in line, line
        assert line.startswith("licagent: read-only: cannot "), line
        assert f"{ro} is on a read-only file system" in line and "remount it read-write" in line
    assert snapshot(ro) == before


def test_init_on_a_read_only_file_system(store: tuple[Device, Path, Path, Path],
                                         tmp_path: Path) -> None:
    device, _rw, ro, facts = store
    pub = tmp_path / "vendor.pub"
    pub.write_bytes(device.vendor.public.to_pem())
    for target in (ro.parent / "new", ro.parent):  # a folder to create, an existing one
        p = licagent(target, facts, device.clock(), "init", "--model", "AS-P", "--trust",
                     str(pub))
        assert p.returncode == 8, p.stderr
        line = p.stderr.strip()
        assert "\n" not in line and "read-only file system" in line.lower(), line
    assert not (ro.parent / "new").exists()


def test_a_check_that_cannot_save_the_clock_mark_answers_and_warns_once(
    store: tuple[Device, Path, Path, Path],
) -> None:
    _device, _rw, ro, facts = store
    p = licagent(ro, facts, T0 + 200, "check", "bacnet")
    assert p.returncode == 1 and "bacnet: expired" in p.stdout
    warn = p.stderr.strip().splitlines()
    assert len(warn) == 1, p.stderr
    assert warn[0].startswith("licagent: warning: the clock high-water mark "), warn
    assert "could not be saved" in warn[0] and "read-only file system" in warn[0]
    assert Store.open(ro, None).state.clock_hwm < T0 + 200  # nothing written


def test_a_crash_recovery_is_used_but_not_saved_on_a_read_only_store(
    store: tuple[Device, Path, Path, Path],
) -> None:
    """Records past the slot's head (a crash after the journal append) are replayed in memory:
    reading shows the newest committed state, and says it could not save it."""
    device, rw, ro, facts = store
    # stage the crash on the writable side: an apply's journal record without its slot
    old_slots = {n: (rw / n).read_bytes() for n in SLOTS}
    req_agent = device.agent.__class__(rw, device.facts, clock=device.clock)
    req = req_agent.request(Action.RECLAIM, ["knx"])
    req_agent.apply(device.vendor.issue(req, now=device.clock()))
    newest = Store.open(rw, None, writable=False).state
    for n, data in old_slots.items():
        (rw / n).write_bytes(data)
    assert (rw / JOURNAL_FILE).exists()

    p = licagent(ro, facts, device.clock(), "status", "--json")
    assert p.returncode == 0, p.stderr
    st = json.loads(p.stdout)
    assert st["sequence"] == newest.sequence
    assert "knx" not in {lic["feature"] for lic in st["licenses"]}
    assert any("not saved" in w for w in st["warnings"]), st["warnings"]
    assert licagent(ro, facts, device.clock(), "check", "knx").returncode == 1


def test_the_daemon_serves_reads_from_a_read_only_store(
    store: tuple[Device, Path, Path, Path],
) -> None:
    """``licagent run`` starts on a read-only store; status, check and journal answer over
    TCP on loopback, and a request is refused with exit 8 and the read-only reason."""
    import hw
    from agent.rpc import RemoteError

    device, _rw, ro, facts = store
    before = snapshot(ro)
    env = {**os.environ, "LICAGENT_TIME": str(device.clock()), "LICAGENT_FACTS": str(facts)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "apps.licagent.cli", "run", "--state",
                             str(ro), "--listen", "tcp://127.0.0.1:0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("listening "), (line, proc.stderr and proc.stderr.read())
        address = line.split(" ", 1)[1].strip()
        with hw.connect(address) as c:
            assert c.status()["sequence"] == 1
            assert c.check("knx")["licensed"] is True
            assert c.journal()["entries"]
            with pytest.raises(RemoteError) as exc:
                c.request("activate", ["modbus"])
            assert exc.value.exit_code == 8 and exc.value.reason == "read-only"
            assert "read-only file system" in str(exc.value)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert snapshot(ro) == before

"""Issue 13 item 2: the state directory follows no symlink and belongs to the agent alone.

Each attack is staged for real on a store made by ``licagent init`` (symlinks to files
outside, a FIFO, a file chowned to another uid, group/world-writable modes), then every
command runs in a real subprocess: each is refused with exit 8 and one line naming the
file, what it is and what was expected, and nothing in or outside the store changes.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.errors import UnsafeFileError
from agent.service import Agent
from agent.store import STATE_FILES, check_state_dir
from hw.facts import StaticFactsProvider
from tests.agent.test_cli import Cli
from tests.conftest import Device

OTHER_UID = 54321


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    c("licserver", "keygen", "--out", "v")
    c("licagent", "init", "--state", "s", "--model", "AS-B", "--trust", "v/vendor.pub")
    c("licagent", "request", "--state", "s", "activate", "--feature", "bacnet", "--out", "r1")
    c("licserver", "issue", "--key", "v/vendor.key", "--request", "r1", "--grant", "bacnet=2",
      "--out", "p1")
    return c


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes | str | None]]:
    """Every entry under ``root`` as (type, mode, owner, bytes or link target)."""
    out: dict[str, tuple[int, int, int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            body: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode),
                                             st.st_uid, body)
    return out


def symlink_to_outside(name: str) -> Callable[[Path], str]:
    """Move a state file out of the directory and leave a symlink to it in its place."""
    def stage(s: Path) -> str:
        outside = s.parent / f"outside-{name}"
        os.replace(s / name, outside)
        os.symlink(outside, s / name)
        return f"{s / name} is a symbolic link, expected a regular file"
    return stage


def lock_symlink_to_nowhere(s: Path) -> str:
    """A dangling symlink: following it with O_CREAT would create a file outside."""
    (s / "lock").unlink()
    os.symlink(s.parent / "created-through-the-link", s / "lock")
    return f"{s / 'lock'} is a symbolic link, expected a regular file"


def journal_fifo(s: Path) -> str:
    (s / "journal.log").unlink()
    os.mkfifo(s / "journal.log", 0o600)
    return f"{s / 'journal.log'} is a FIFO (named pipe), expected a regular file"


def chown_file(name: str) -> Callable[[Path], str]:
    def stage(s: Path) -> str:
        os.chown(s / name, OTHER_UID, -1)
        return f"{s / name} is owned by uid {OTHER_UID}, expected a regular file owned by uid 0"
    return stage


def chown_dir(s: Path) -> str:
    os.chown(s, OTHER_UID, -1)
    return f"{s} is owned by uid {OTHER_UID}, expected a directory owned by uid 0"


def chmod(name: str, mode: int, expected: str = "a regular file") -> Callable[[Path], str]:
    def stage(s: Path) -> str:
        p = s / name if name else s
        os.chmod(p, mode)
        return f"{p} has mode {mode:04o}, writable by group or others, expected {expected}"
    return stage


ATTACKS: dict[str, Callable[[Path], str]] = {
    "symlinked state.0": symlink_to_outside("state.0"),
    "symlinked state.1": symlink_to_outside("state.1"),
    "symlinked journal": symlink_to_outside("journal.log"),
    "symlinked device key": symlink_to_outside("device.key"),
    "symlinked lock to nowhere": lock_symlink_to_nowhere,
    "journal is a FIFO": journal_fifo,
    "slot owned by another uid": chown_file("state.1"),
    "key owned by another uid": chown_file("device.key"),
    "directory owned by another uid": chown_dir,
    "directory mode 0777": chmod("", 0o777, "a directory"),
    "directory mode 0770": chmod("", 0o770, "a directory"),
    "journal mode 0664": chmod("journal.log", 0o664),
    "key mode 0602": chmod("device.key", 0o602),
}

COMMANDS = (
    ("status", "--state", "s"),
    ("check", "--state", "s", "bacnet"),
    ("journal", "--state", "s", "--verify"),
    ("info", "--state", "s", "--out", "info.cbor"),
    ("request", "--state", "s", "activate", "--feature", "modbus", "--out", "r2"),
    ("apply", "--state", "s", "p1", "--receipt-out", "rc1"),
)


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_every_command_refuses_an_unsafe_state_dir(cli: Cli, attack: str) -> None:
    # the commands name the store as given: --state s
    expected = ATTACKS[attack](cli.root / "s").replace(f"{cli.root}/", "")
    before = tree(cli.root)
    for command in COMMANDS:
        p = cli("licagent", *command, code=8)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in p.stderr, (command, p.stderr)
        assert lines[0].startswith("licagent: unsafe-file: "), (command, lines)
        assert expected in lines[0], (command, lines[0])
        assert p.stdout == "", (command, p.stdout)
    assert tree(cli.root) == before, "the store, the files outside and the outputs are unchanged"
    assert not (cli.root / "created-through-the-link").exists()


def test_init_refuses_a_group_writable_directory(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    c("licserver", "keygen", "--out", "v")
    (tmp_path / "s").mkdir()
    os.chmod(tmp_path / "s", 0o775)
    p = c("licagent", "init", "--state", "s", "--model", "AS-B", "--trust", "v/vendor.pub",
          code=8)
    assert p.stderr.strip().splitlines() == [
        "licagent: unsafe-file: s has mode 0775, writable by group or others, expected a "
        "directory only its owner can write; refused. Fix: chmod go-w s"]
    assert os.listdir(tmp_path / "s") == [], "nothing written into it, not even a lock file"


def test_the_fix_the_message_names_makes_the_store_usable_again(cli: Cli) -> None:
    os.chmod(cli.root / "s" / "journal.log", 0o666)
    p = cli("licagent", "status", "--state", "s", code=8)
    assert "Fix: chmod go-w " in p.stderr
    os.chmod(cli.root / "s" / "journal.log", 0o600)
    cli("licagent", "apply", "--state", "s", "p1", "--receipt-out", "rc1")
    cli("licagent", "check", "--state", "s", "bacnet")


def test_a_good_store_passes_and_every_state_file_is_checked(device: Device) -> None:
    device.activate(bacnet=1)
    check_state_dir(device.directory)  # a store made by init is private throughout
    present = sorted(n for n in os.listdir(device.directory) if not n.startswith("."))
    # device.tpm stands in for device.key in a TPM store (issue 16, tests/agent/test_tpm_store.py)
    assert present == sorted(set(STATE_FILES) - {"device.tpm"}), \
        "every file init makes is in STATE_FILES"
    for name in present:
        p = device.directory / name
        os.chmod(p, 0o620)
        with pytest.raises(UnsafeFileError, match=f"{p} has mode 0620"):
            device.agent.status()
        os.chmod(p, 0o600)


def test_a_symlinked_state_dir_itself_is_allowed(device: Device, tmp_path: Path) -> None:
    """The state directory's own path is the administrator's choice; only what is inside
    is never followed."""
    link = tmp_path / "via-link"
    os.symlink(device.directory, link)
    agent = Agent(link, StaticFactsProvider(device.facts.read()), clock=device.clock)
    assert agent.status()["device_id"] == device.agent.status()["device_id"]


def test_a_hard_linked_lock_file_is_refused(device: Device, tmp_path: Path) -> None:
    os.link(device.directory / "lock", tmp_path / "second-name")
    with pytest.raises(UnsafeFileError, match="with 2 hard links"):
        device.agent.status()

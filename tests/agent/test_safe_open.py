"""The safe-open primitives of agent/durable.py on real files: links, FIFOs, device nodes,
mounts, hard links, owners and modes, and the escaping of names for log lines."""

from __future__ import annotations

import errno
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.durable import (
    FileOps,
    atomic_write_at,
    check_private,
    check_private_dir,
    create_exclusive,
    ensure_dir,
    escape,
    open_dir,
    open_regular,
    read_regular,
)
from agent.errors import StorageError, UnsafeFileError

ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def never_blocks() -> Iterator[None]:
    """A primitive that opened a FIFO would block for ever: fail the test instead."""
    def _alarm(_sig: int, _frame: object) -> None:
        raise TimeoutError("a safe-open primitive blocked")
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[int]:
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


@pytest.fixture
def mount() -> Iterator[Callable[..., None]]:
    """Real mounts (a tmpfs, a bind mount), lazily unmounted at the end of the test."""
    done: list[Path] = []

    def _mount(*args: str) -> None:
        if not ROOT:
            pytest.skip("mounting needs root")
        r = subprocess.run(["mount", *args], capture_output=True, text=True, check=False)
        if r.returncode:
            pytest.skip(f"cannot mount here: {r.stderr.strip()}")
        done.append(Path(args[-1]))

    yield _mount
    for at in reversed(done):
        subprocess.run(["umount", "-l", str(at)], check=True)


def d(tmp_path: Path) -> Path:
    return tmp_path / "d"


# ---------------------------------------------------------------- open_regular


def test_a_regular_file_is_read(tmp_path: Path, folder: int) -> None:
    (d(tmp_path) / "f").write_bytes(b"x" * 100)
    assert read_regular("f", folder, 10) == b"x" * 11, "capped at cap + 1: the caller sees 'too large'"
    assert read_regular("f", folder, 1000) == b"x" * 100


def test_a_symlink_is_never_followed(tmp_path: Path, folder: int) -> None:
    (tmp_path / "secret").write_bytes(b"secret")
    os.symlink(tmp_path / "secret", d(tmp_path) / "f")
    with pytest.raises(UnsafeFileError) as err:
        read_regular("f", folder, 100)
    assert str(err.value) == ("f is a symbolic link, expected a regular file; refused "
                              "(nothing read or written through it)")
    with pytest.raises(UnsafeFileError, match="symbolic link"):
        open_regular("f", folder, os.O_WRONLY | os.O_APPEND)
    assert (tmp_path / "secret").read_bytes() == b"secret"


def test_a_fifo_is_never_opened(tmp_path: Path, folder: int) -> None:
    os.mkfifo(d(tmp_path) / "p")
    for flags in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
        with pytest.raises(UnsafeFileError, match=r"^p is a FIFO \(named pipe\), expected a "
                                                  r"regular file"):
            open_regular("p", folder, flags)


@pytest.mark.skipif(not ROOT, reason="mknod needs root")
@pytest.mark.parametrize(("kind", "words"), [(stat.S_IFCHR, "a character device node"),
                                             (stat.S_IFBLK, "a block device node")])
def test_a_device_node_is_never_opened(tmp_path: Path, folder: int, kind: int,
                                       words: str) -> None:
    # a block device with numbers no driver has: opening it would fail with ENXIO, so a
    # refusal that names it proves the node was looked at, not opened
    os.mknod(d(tmp_path) / "n", 0o600 | kind, os.makedev(1, 5) if kind == stat.S_IFCHR
             else os.makedev(259, 999))
    with pytest.raises(UnsafeFileError, match=f"^n is {words}, expected a regular file"):
        read_regular("n", folder, 10)


def test_a_directory_is_not_a_file(tmp_path: Path, folder: int) -> None:
    (d(tmp_path) / "sub").mkdir()
    with pytest.raises(UnsafeFileError, match=r"^sub is a directory, expected a regular file"):
        read_regular("sub", folder, 10)


def test_a_missing_file_is_file_not_found(folder: int) -> None:
    with pytest.raises(FileNotFoundError):
        read_regular("nothing", folder, 10)


def test_a_hard_link_is_read_but_never_written_in_place(tmp_path: Path, folder: int) -> None:
    (tmp_path / "other").write_bytes(b"other")
    os.link(tmp_path / "other", d(tmp_path) / "f")
    assert read_regular("f", folder, 10) == b"other"
    with pytest.raises(UnsafeFileError, match=r"^f is a regular file with 2 hard links, "
                                              "expected a file of its own"):
        open_regular("f", folder, os.O_WRONLY | os.O_APPEND)
    assert (tmp_path / "other").read_bytes() == b"other"


def test_a_file_bind_mounted_from_another_filesystem_is_refused(
        tmp_path: Path, folder: int, mount: Callable[..., None]) -> None:
    other = tmp_path / "other-fs"
    other.mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(other))
    (other / "f").write_bytes(b"elsewhere")
    (d(tmp_path) / "f").write_bytes(b"")
    mount("--bind", str(other / "f"), str(d(tmp_path) / "f"))
    with pytest.raises(UnsafeFileError, match=r"^f is a regular file on another filesystem"):
        read_regular("f", folder, 100)


def test_without_proc_the_same_checks_hold(tmp_path: Path) -> None:
    """On a controller without /proc mounted: reopened by name, still never a link or FIFO."""
    if not ROOT:
        pytest.skip("unshare -m needs root")
    dd = d(tmp_path)
    dd.mkdir()
    (dd / "f").write_bytes(b"content")
    os.symlink(dd / "f", dd / "l")
    os.mkfifo(dd / "p")
    code = (
        "import os, sys\n"
        "assert not os.path.isdir('/proc/self/fd'), 'proc still mounted'\n"
        "from agent.durable import read_regular\n"
        "from agent.errors import UnsafeFileError\n"
        f"fd = os.open({str(dd)!r}, os.O_RDONLY)\n"
        "assert read_regular('f', fd, 100) == b'content'\n"
        "for n in ('l', 'p'):\n"
        "    try:\n"
        "        read_regular(n, fd, 100)\n"
        "    except UnsafeFileError as e:\n"
        "        print(e)\n"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c",
                        f"umount -l /proc && exec {sys.executable} -c \"$0\"", code],
                       capture_output=True, text=True, timeout=60, check=False,
                       cwd=Path(__file__).parents[2])
    if "umount" in r.stderr:
        pytest.skip(f"cannot unmount /proc in a mount namespace: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "l is a symbolic link, expected a regular file; refused (nothing read or written "
        "through it)",
        "p is a FIFO (named pipe), expected a regular file; refused (nothing read or written "
        "through it)"]


# ---------------------------------------------------------------- directories


def test_open_dir_refuses_a_link_a_file_and_another_filesystem(
        tmp_path: Path, folder: int, mount: Callable[..., None]) -> None:
    os.symlink(tmp_path, d(tmp_path) / "link")
    (d(tmp_path) / "file").write_bytes(b"")
    os.mkfifo(d(tmp_path) / "fifo")
    with pytest.raises(UnsafeFileError, match=r"^link is a symbolic link, expected a directory"):
        open_dir("link", folder)
    with pytest.raises(UnsafeFileError, match=r"^file is a regular file, expected a directory"):
        open_dir("file", folder)
    with pytest.raises(UnsafeFileError, match=r"^fifo is a FIFO \(named pipe\), expected a dir"):
        ensure_dir("fifo", folder)
    (d(tmp_path) / "mnt").mkdir()
    mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d(tmp_path) / "mnt"))
    with pytest.raises(UnsafeFileError, match=r"^mnt is a directory on another filesystem"):
        ensure_dir("mnt", folder)


def test_ensure_dir_creates_once(tmp_path: Path, folder: int) -> None:
    for _ in range(2):
        fd = ensure_dir("new", folder, mode=0o750)
        assert stat.S_ISDIR(os.fstat(fd).st_mode)
        os.close(fd)
    assert (d(tmp_path) / "new").is_dir()


# ---------------------------------------------------------------- creating and replacing


def test_create_exclusive_never_goes_through_a_dangling_link(tmp_path: Path, folder: int) -> None:
    os.symlink(tmp_path / "created-elsewhere", d(tmp_path) / "f")
    with pytest.raises(FileExistsError):
        create_exclusive(FileOps(), folder, "f", os.O_WRONLY, 0o644)
    assert not (tmp_path / "created-elsewhere").exists()


def test_atomic_write_at_replaces_a_file_and_refuses_a_link(tmp_path: Path, folder: int) -> None:
    atomic_write_at(FileOps(), folder, "f", b"one", 0o644)
    atomic_write_at(FileOps(), folder, "f", b"two", 0o644)
    assert (d(tmp_path) / "f").read_bytes() == b"two"
    assert stat.S_IMODE((d(tmp_path) / "f").stat().st_mode) == 0o644
    (tmp_path / "target").write_bytes(b"kept")
    os.symlink(tmp_path / "target", d(tmp_path) / "l")
    with pytest.raises(UnsafeFileError, match=r"^l is a symbolic link, expected a regular file "
                                              "or nothing"):
        atomic_write_at(FileOps(), folder, "l", b"x")
    assert (tmp_path / "target").read_bytes() == b"kept"
    assert sorted(os.listdir(d(tmp_path))) == ["f", "l"]


class FailingRename(FileOps):
    def renameat(self, src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system")


def test_atomic_write_at_failure_leaves_nothing(tmp_path: Path, folder: int) -> None:
    with pytest.raises(StorageError, match="could not write f: Read-only file system"):
        atomic_write_at(FailingRename(), folder, "f", b"x")
    assert os.listdir(d(tmp_path)) == []


# ---------------------------------------------------------------- owners and modes


def test_check_private(tmp_path: Path) -> None:
    p = tmp_path / "f"
    p.write_bytes(b"")
    os.chmod(p, 0o644)
    check_private(p.stat(), "f")  # readable by others is not writable by others
    for mode in (0o664, 0o646, 0o777):
        os.chmod(p, mode)
        with pytest.raises(UnsafeFileError, match=f"^f has mode {mode:04o}, writable by group "
                                                  f"or others"):
            check_private(p.stat(), "f")
    if ROOT:
        os.chmod(p, 0o600)
        os.chown(p, 4242, -1)
        with pytest.raises(UnsafeFileError, match=r"^f is owned by uid 4242, expected a regular "
                                                  "file owned by uid 0"):
            check_private(p.stat(), "f")


def test_check_private_dir(tmp_path: Path) -> None:
    (tmp_path / "ok").mkdir(mode=0o700)
    os.close(check_private_dir(tmp_path / "ok"))
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(UnsafeFileError, match="is a regular file, expected a directory"):
        check_private_dir(tmp_path / "file")
    os.chmod(tmp_path / "ok", 0o1777)  # even sticky, world-writable is someone else's too
    with pytest.raises(UnsafeFileError, match="has mode 1777, writable by group or others"):
        check_private_dir(tmp_path / "ok")
    with pytest.raises(FileNotFoundError):
        check_private_dir(tmp_path / "missing")


# ---------------------------------------------------------------- names in log lines


#: every code point, surrogates included (a name os.listdir could not decode holds them)
NAMES = st.text(st.characters(blacklist_categories=()))


@pytest.mark.parametrize(("name", "shown"), [
    ("plain.resp", "plain.resp"),
    ("a\nb", "a\\x0ab"),
    ("a\rb", "a\\x0db"),
    ("tab\there", "tab\\x09here"),
    ("back\\slash", "back\\\\slash"),
    ("esc\x1b[31mred", "esc\\x1b[31mred"),
    ("line\u2028sep", "line\\u2028sep"),
    ("bad\udcff", "bad\\xff"),  # a byte os.listdir could not decode
    ("café", "café"),
    ("nel\x85", "nel\\u0085"),  # a character, not the byte 0x85
])
def test_escape(name: str, shown: str) -> None:
    assert escape(name) == shown


@given(NAMES)
def test_an_escaped_name_is_one_printable_line(name: str) -> None:
    shown = escape(name)
    assert shown.isprintable() and "\n" not in shown and "\r" not in shown
    shown.encode("utf-8")  # always writable into a log


@given(NAMES, NAMES)
def test_escaping_keeps_names_apart(a: str, b: str) -> None:
    if a != b:
        assert escape(a) != escape(b)

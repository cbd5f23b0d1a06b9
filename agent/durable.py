"""Durable and safe file access: the write recipe, and opening only what a folder really holds.

Each syscall of the write recipe goes through :class:`FileOps`, so tests can
fail or crash the store, the journal and the USB mailbox at every step
(temporary file in the same directory, write, fsync, close, ``os.replace``,
fsync the directory).

The safe-open primitives are for folders someone else may fill (a USB stick)
or that must stay private (the state directory): a name is opened relative to
a directory descriptor already checked, never through a symbolic link
(``O_NOFOLLOW``), first as ``O_PATH`` so that a FIFO or a device node is never
really opened (no blocking, no driver side effects); ``fstat`` then says what
it is, and only a regular file on the parent's filesystem is reopened through
``/proc/self/fd``. New files are created with ``O_EXCL``. A refusal is an
:class:`~agent.errors.UnsafeFileError` (exit 8) naming the file, what it is and
what was expected.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from agent.errors import StorageError, UnsafeFileError

__all__ = [
    "FileOps",
    "atomic_write",
    "atomic_write_at",
    "check_private",
    "check_private_dir",
    "create_exclusive",
    "describe",
    "ensure_dir",
    "escape",
    "fsync_dir",
    "kind_at",
    "open_dir",
    "open_regular",
    "read_capped",
    "read_regular",
    "write_all",
]

_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_NOCTTY = getattr(os, "O_NOCTTY", 0)
_PATH = getattr(os, "O_PATH", 0)


class FileOps:
    """The syscalls of the write recipe, one method each (overridden by fault-injection tests)."""

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        return os.open(path, flags, mode)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def replace(self, src: str, dst: str) -> None:
        os.replace(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def ftruncate(self, fd: int, length: int) -> None:
        os.ftruncate(fd, length)

    # relative to a held directory descriptor (the USB mailbox): never through a symlink

    def openat(self, dir_fd: int, name: str, flags: int, mode: int = 0o600) -> int:
        return os.open(name, flags | os.O_NOFOLLOW | _CLOEXEC, mode, dir_fd=dir_fd)

    def renameat(self, src_dir_fd: int, src: str, dst_dir_fd: int, dst: str) -> None:
        os.rename(src, dst, src_dir_fd=src_dir_fd, dst_dir_fd=dst_dir_fd)

    def unlinkat(self, dir_fd: int, name: str) -> None:
        os.unlink(name, dir_fd=dir_fd)


def write_all(ops: FileOps, fd: int, data: bytes) -> None:
    off = 0
    while off < len(data):
        n = ops.write(fd, data[off:])
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        off += n


def fsync_dir(ops: FileOps, directory: Path | str) -> None:
    fd = ops.open(os.fspath(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        ops.fsync(fd)
    finally:
        ops.close(fd)


def atomic_write(ops: FileOps, path: Path | str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves exactly the old or the new file.

    A failure at any step raises :class:`StorageError` (never retried: after a
    failed fsync the kernel may have dropped the dirty pages) and leaves no
    temporary file behind.
    """
    # the names as strings, built once (pathlib's joins cost more than the syscalls on tmpfs)
    dst = os.fspath(path)
    parent, name = os.path.split(dst)
    # unique per call: a temp file left by a crashed process whose PID is reused
    # (daemon restarted after a reboot, PID 1 in a container) must not block O_EXCL forever
    tmp = os.path.join(parent, f".{name}.tmp{os.getpid()}.{os.urandom(4).hex()}")
    fd = -1
    try:
        fd = ops.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, mode)
        write_all(ops, fd, data)
        ops.fsync(fd)
        closing, fd = fd, -1  # never close twice: after a failed close(2) the fd is gone
        ops.close(closing)
        ops.replace(tmp, dst)
        fsync_dir(ops, parent or ".")
    except OSError as exc:
        if fd >= 0:
            try:
                ops.close(fd)
            except OSError:
                pass
        try:
            ops.unlink(tmp)
        except OSError:
            pass
        raise StorageError(
            f"could not write {name}: {exc.strerror or exc} (errno {exc.errno}); "
            f"the previous state is kept"
        ) from exc


# ---------------------------------------------------------------- safe opening


def describe(mode: int) -> str:
    """What a ``st_mode`` is, in words for a refusal."""
    for test, words in (
        (stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device node"), (stat.S_ISBLK, "a block device node"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return words
    return f"a file of unknown type {stat.S_IFMT(mode):o}"


def escape(name: str) -> str:
    """``name`` as one printable line: control characters (a newline, a carriage return),
    backslashes, line separators and bytes that are not UTF-8 are written as escapes, so a
    file name can never start a line of its own in a log."""
    out: list[str] = []
    for ch in name:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= o <= 0xDCFF:  # a byte os.listdir could not decode (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch.isprintable():
            out.append(ch)
        elif o < 0x80:  # above 0x7f, \xNN means a byte that is not UTF-8 (above)
            out.append(f"\\x{o:02x}")
        else:
            out.append(f"\\u{o:04x}" if o < 0x10000 else f"\\U{o:08x}")
    return "".join(out)


def kind_at(dir_fd: int | None, name: str) -> os.stat_result | None:
    """``lstat`` of ``name`` (relative to ``dir_fd``); None if there is no such entry."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _refuse(label: str, st: os.stat_result | None, expected: str, why: str = "") -> UnsafeFileError:
    what = describe(st.st_mode) if st is not None else "not what it was a moment ago"
    return UnsafeFileError(f"{escape(label)} is {what}{why}, expected {expected}; refused "
                           f"(nothing read or written through it)")


def _check_fs(st: os.stat_result, parent_dev: int | None, label: str, expected: str) -> None:
    if parent_dev is not None and st.st_dev != parent_dev:
        raise _refuse(label, st, expected, " on another filesystem (a mount point)")


def open_dir(name: str, dir_fd: int | None = None, *, label: str | None = None) -> int:
    """Open the directory ``name`` relative to ``dir_fd`` (a path if None) without following a
    symbolic link in its last component; with ``dir_fd`` it must be on the same filesystem.

    Raises:
        FileNotFoundError: there is no such entry.
        UnsafeFileError: it is a symlink, not a directory, or on another filesystem.
    """
    label = label or name
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise _refuse(label, kind_at(dir_fd, name), "a directory") from exc
        raise
    try:
        _check_fs(os.fstat(fd), os.fstat(dir_fd).st_dev if dir_fd is not None else None,
                  label, "a directory on the same filesystem")
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_dir(name: str, dir_fd: int, *, label: str | None = None, mode: int = 0o755) -> int:
    """:func:`open_dir`, creating the directory first if there is no entry of that name."""
    try:
        os.mkdir(name, mode, dir_fd=dir_fd)
    except FileExistsError:
        pass  # whatever it is, open_dir says whether it will do
    return open_dir(name, dir_fd, label=label)


_have_proc: bool | None = None


def _proc_fd(fd: int) -> str | None:
    """``/proc/self/fd/FD`` (reopens exactly that inode), or None on a system without /proc."""
    global _have_proc
    if _have_proc is None:
        _have_proc = os.path.isdir("/proc/self/fd")
    return f"/proc/self/fd/{fd}" if _have_proc else None


def open_regular(name: str, dir_fd: int | None, flags: int = os.O_RDONLY, *,
                 label: str | None = None) -> int:
    """Open the existing regular file ``name`` relative to ``dir_fd`` with ``flags``.

    The entry is pinned with ``O_PATH | O_NOFOLLOW`` (a symlink, a FIFO or a device
    node is looked at, never opened), checked with ``fstat`` (a regular file on the
    directory's filesystem; to be written, with no other hard link) and only then
    reopened with ``flags``.

    Raises:
        FileNotFoundError: there is no such entry.
        UnsafeFileError: it is anything but such a regular file.
    """
    label = label or name
    parent_dev = os.fstat(dir_fd).st_dev if dir_fd is not None else None
    pin = os.open(name, _PATH | os.O_NOFOLLOW | os.O_NONBLOCK | _NOCTTY | _CLOEXEC,
                  dir_fd=dir_fd)
    try:
        st = os.fstat(pin)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(label, st, "a regular file")
        _check_fs(st, parent_dev, label, "a regular file on the same filesystem")
        if flags & (os.O_WRONLY | os.O_RDWR) and st.st_nlink != 1:
            # written in place: a hard link would carry the bytes into another file
            raise _refuse(label, st, "a file of its own", f" with {st.st_nlink} hard links")
        proc = _proc_fd(pin) if _PATH else None
        if proc is not None:
            fd = os.open(proc, flags | _NOCTTY | _CLOEXEC)
        else:  # no /proc: open the name again, still never through a link nor blocking
            fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | _NOCTTY | _CLOEXEC,
                         dir_fd=dir_fd)
    finally:
        os.close(pin)
    now = os.fstat(fd)
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):  # swapped between the two opens
        os.close(fd)
        raise _refuse(label, None, "the regular file checked")
    return fd


def read_regular(name: str, dir_fd: int | None, cap: int, *, label: str | None = None) -> bytes:
    """Read at most ``cap + 1`` bytes of the regular file ``name`` (see :func:`open_regular`)."""
    fd = open_regular(name, dir_fd, label=label)
    with os.fdopen(fd, "rb") as f:
        return read_capped(f, cap)


def read_capped(f: BinaryIO, cap: int) -> bytes:
    """At most ``cap + 1`` bytes of an open regular file, without a buffer of ``cap`` bytes
    for a small file (a 1 MiB allocation per read would dominate a ``check``)."""
    want = min(os.fstat(f.fileno()).st_size, cap) + 1
    data = f.read(want)
    if len(data) == want and want <= cap:  # it grew since fstat: the rest, still capped
        data += f.read(cap + 1 - want)
    return data


def create_exclusive(ops: FileOps, dir_fd: int, name: str, flags: int, mode: int) -> int:
    """Create ``name`` in ``dir_fd``; fails if any entry of that name exists (O_EXCL)."""
    return ops.openat(dir_fd, name, flags | os.O_CREAT | os.O_EXCL, mode)


def atomic_write_at(ops: FileOps, dir_fd: int, name: str, data: bytes, mode: int = 0o600,
                    *, label: str | None = None) -> None:
    """:func:`atomic_write` of ``name`` in the held directory ``dir_fd``.

    The temporary file is created with ``O_EXCL | O_NOFOLLOW``; an existing ``name``
    that is not a regular file is refused (rename would replace, not follow, it, but
    a folder that holds a link or a FIFO there is not ours to tidy).

    Raises:
        UnsafeFileError: ``name`` exists and is not a regular file.
        StorageError: any step failed; no temporary file is left.
    """
    label = label or name
    old = kind_at(dir_fd, name)
    if old is not None and not stat.S_ISREG(old.st_mode):
        raise _refuse(label, old, "a regular file or nothing")
    # a name from a stick may be 255 bytes long already: the temporary one stays short
    tmp = f".{name[:64]}.tmp{os.getpid()}.{os.urandom(4).hex()}"
    fd = -1
    try:
        fd = create_exclusive(ops, dir_fd, tmp, os.O_WRONLY, mode)
        write_all(ops, fd, data)
        ops.fsync(fd)
        closing, fd = fd, -1
        ops.close(closing)
        ops.renameat(dir_fd, tmp, dir_fd, name)
        ops.fsync(dir_fd)
    except OSError as exc:
        if fd >= 0:
            try:
                ops.close(fd)
            except OSError:
                pass
        try:
            ops.unlinkat(dir_fd, tmp)
        except OSError:
            pass
        raise StorageError(
            f"could not write {escape(label)}: {exc.strerror or exc} (errno {exc.errno}); "
            f"the previous version is kept"
        ) from exc


def check_private(st: os.stat_result, label: str, expected: str = "a regular file") -> None:
    """Refuse a state file or directory that someone else could change.

    Raises:
        UnsafeFileError: owned by another user than the one running, or writable by
            group or others.
    """
    euid = os.geteuid()
    if st.st_uid != euid:
        raise UnsafeFileError(
            f"{escape(label)} is owned by uid {st.st_uid}, expected {expected} owned by uid "
            f"{euid} (the user licagent runs as); refused. Fix: chown {euid} {escape(label)}")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeFileError(
            f"{escape(label)} has mode {stat.S_IMODE(st.st_mode):04o}, writable by group or "
            f"others, expected {expected} only its owner can write; refused. "
            f"Fix: chmod go-w {escape(label)}")


def check_private_dir(path: Path) -> int:
    """Open the directory ``path`` and check it is private (:func:`check_private`).

    ``path`` itself may be a symbolic link an administrator made; nothing inside is
    followed. Returns the open directory descriptor.

    Raises:
        FileNotFoundError: there is no such directory.
        UnsafeFileError: not a directory, or not private.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    except NotADirectoryError as exc:
        raise _refuse(str(path), kind_at(None, str(path)), "a directory") from exc
    try:
        check_private(os.fstat(fd), str(path), "a directory")
    except BaseException:
        os.close(fd)
        raise
    return fd

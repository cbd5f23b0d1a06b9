"""Durable file writes: the syscalls of the write recipe and the atomic replace built on them.

Each syscall goes through :class:`FileOps`, so tests can fail or crash the
store, the journal and the USB mailbox at every step of the recipe (temporary
file in the same directory, write, fsync, close, ``os.replace``, fsync the
directory).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from agent.errors import StorageError

__all__ = ["FileOps", "atomic_write", "fsync_dir", "write_all"]


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


def write_all(ops: FileOps, fd: int, data: bytes) -> None:
    off = 0
    while off < len(data):
        n = ops.write(fd, data[off:])
        if n <= 0:
            raise OSError(errno.EIO, "write made no progress")
        off += n


def fsync_dir(ops: FileOps, directory: Path) -> None:
    fd = ops.open(str(directory), os.O_RDONLY | os.O_DIRECTORY)
    try:
        ops.fsync(fd)
    finally:
        ops.close(fd)


def atomic_write(ops: FileOps, path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves exactly the old or the new file.

    A failure at any step raises :class:`StorageError` (never retried: after a
    failed fsync the kernel may have dropped the dirty pages) and leaves no
    temporary file behind.
    """
    # unique per call: a temp file left by a crashed process whose PID is reused
    # (daemon restarted after a reboot, PID 1 in a container) must not block O_EXCL forever
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.{os.urandom(4).hex()}")
    fd = -1
    try:
        fd = ops.open(str(tmp), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_TRUNC, mode)
        write_all(ops, fd, data)
        ops.fsync(fd)
        closing, fd = fd, -1  # never close twice: after a failed close(2) the fd is gone
        ops.close(closing)
        ops.replace(str(tmp), str(path))
        fsync_dir(ops, path.parent)
    except OSError as exc:
        if fd >= 0:
            try:
                ops.close(fd)
            except OSError:
                pass
        try:
            ops.unlink(str(tmp))
        except OSError:
            pass
        raise StorageError(
            f"could not write {path.name}: {exc.strerror or exc} (errno {exc.errno}); "
            f"the previous state is kept"
        ) from exc

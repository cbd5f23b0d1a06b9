"""Power loss at a store write step: the store's :class:`~agent.durable.FileOps` seam, with a model of the disk.

:class:`PowerLossOps` makes the real syscalls and counts them; call number
``crash_at`` never happens: :class:`PowerLoss` is raised instead (a
BaseException, so no ``except Exception`` in the agent can swallow it). What
was not made durable is then lost the way a disk loses it on power failure
(SQLite's crash-test model): bytes written since the file's last fsync are cut
to half and the rest is garbage, and a rename whose directory was not yet
fsynced is undone.
"""

from __future__ import annotations

import os
import random

from agent.durable import FileOps

__all__ = ["PowerLoss", "PowerLossOps"]


class PowerLoss(BaseException):
    """The power went off here."""


class PowerLossOps(FileOps):
    """Real file syscalls until call ``crash_at`` (1-based), then power loss.

    Args:
        crash_at: the call that never happens.
        rng: garbage for the torn writes.
    """

    def __init__(self, crash_at: int, rng: random.Random) -> None:
        self.crash_at = crash_at
        self.rng = rng
        self.calls = 0
        self.crashed: str | None = None
        self.paths: dict[int, str] = {}
        self.synced: dict[str, int] = {}  # path -> durable size
        self.dirty: set[str] = set()
        self.renames: list[tuple[str, str, bytes | None]] = []  # (src, dst, old dst bytes)

    def _step(self, what: str) -> None:
        self.calls += 1
        if self.calls == self.crash_at:
            self.crashed = what
            raise PowerLoss(f"power lost at store write step {self.crash_at} ({what})")

    def open(self, path: str, flags: int, mode: int = 0o600) -> int:
        self._step(f"open {os.path.basename(path)}")
        fd = super().open(path, flags, mode)
        self.paths[fd] = path
        try:
            self.synced.setdefault(path, os.fstat(fd).st_size)
        except OSError:
            pass
        return fd

    def write(self, fd: int, data: bytes) -> int:
        self._step(f"write {os.path.basename(self.paths.get(fd, '?'))}")
        n = super().write(fd, data)
        self.dirty.add(self.paths.get(fd, ""))
        return n

    def fsync(self, fd: int) -> None:
        path = self.paths.get(fd, "")
        self._step(f"fsync {os.path.basename(path)}")
        super().fsync(fd)
        if os.path.isdir(path):
            self.renames = [r for r in self.renames if os.path.dirname(r[1]) != path]
        else:
            self.dirty.discard(path)
            try:
                self.synced[path] = os.fstat(fd).st_size
            except OSError:
                pass

    def close(self, fd: int) -> None:
        self._step(f"close {os.path.basename(self.paths.get(fd, '?'))}")
        super().close(fd)
        self.paths.pop(fd, None)

    def replace(self, src: str, dst: str) -> None:
        self._step(f"rename to {os.path.basename(dst)}")
        try:
            with open(dst, "rb") as f:
                old: bytes | None = f.read()
        except FileNotFoundError:
            old = None
        super().replace(src, dst)
        self.renames.append((src, dst, old))
        if src in self.dirty:  # the inode's unsynced bytes now live under dst
            self.dirty.discard(src)
            self.dirty.add(dst)
            self.synced[dst] = self.synced.get(src, 0)

    def unlink(self, path: str) -> None:
        self._step(f"unlink {os.path.basename(path)}")
        super().unlink(path)

    def ftruncate(self, fd: int, length: int) -> None:
        self._step(f"truncate {os.path.basename(self.paths.get(fd, '?'))}")
        super().ftruncate(fd, length)

    def lose_unsynced(self) -> list[str]:
        """After the crash: what the disk forgets. Returns a description of each loss."""
        lost: list[str] = []
        for fd in list(self.paths):  # the dead process's descriptors
            try:
                os.close(fd)
            except OSError:
                pass
        self.paths.clear()
        for src, dst, old in reversed(self.renames):  # directory entry never made durable
            try:
                os.replace(dst, src)
                if old is not None:
                    with open(dst, "wb") as f:
                        f.write(old)
                lost.append(f"rename to {os.path.basename(dst)} undone")
            except OSError:
                pass
            if dst in self.dirty:
                self.dirty.discard(dst)
                self.dirty.add(src)
                self.synced[src] = self.synced.get(dst, 0)
        for path in sorted(self.dirty):
            try:
                size = os.path.getsize(path)
            except OSError:
                continue
            keep = self.synced.get(path, 0)
            extra = size - keep
            if extra <= 0:
                continue
            with open(path, "r+b") as f:
                f.seek(keep + extra // 2)
                f.truncate()
                f.write(self.rng.randbytes(extra // 4))
            lost.append(f"{os.path.basename(path)}: {extra - extra // 2} unsynced bytes lost")
        return lost

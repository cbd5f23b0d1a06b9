"""One simulated server: paths, facts and IDs only; its store is opened per operation.

A :class:`SimServer` keeps no agent, key or store in memory (the goal is a few
KiB per server at 10,000 servers): each operation makes an
:class:`agent.service.Agent` over the server's directory, with the server's
hardware facts and clock, and :class:`ServerHandler` runs it through the
agent's operation table (:class:`agent.ops.AgentOps`), as ``licagent run`` does.

One exception, because a site's ``gather`` asks every server for it at once: the
signed device information. The last one a server signed is kept with a digest
of every byte of its state files, and of their owners and modes
(:func:`state_digest`, :class:`SignedInfo`), and handed out again as long as the
digest is the same, the hardware facts, clock offset and lease are the same, and
it was signed less than :data:`INFO_REUSE` seconds ago by the server's clock
(never once the clock went back). Reading the files (what opening the store
reads, without decoding, MAC checks or a signature) costs a fraction of opening
the store and signing; anything that changed the store, a fault included, shows
in the digest and the next one is opened and signed afresh. The kept file lives
in the server's folder beside its store (``info.cbor``, the server's own disk),
with only its length and a BLAKE2b hash in memory: about 0.7 KiB less per server
than the bytes themselves; a kept file that no longer matches is signed afresh.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.durable import FileOps
from agent.identity import HardwareFacts
from agent.ops import AgentOps
from agent.rpc import InfoResult
from agent.service import Agent
from agent.store import STATE_FILES
from hw.facts import StaticFactsProvider

__all__ = ["INFO_FILE", "INFO_REUSE", "ServerHandler", "SignedInfo", "SimServer", "device_info",
           "state_digest"]

#: seconds (by the server's clock) a signed device information is handed out again
INFO_REUSE = 600
#: a state file larger than this (a long journal) is not digested: the store is opened
_DIGEST_CAP = 64 * 1024


_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def state_digest(directory: str) -> bytes | None:
    """SHA-256 of the state directory's owner and mode, and of every state file's name,
    owner, mode, filesystem and bytes (a missing one marked as such); None if one is not
    a regular file, cannot be read or is larger than the cap (then the store is opened).

    What :func:`agent.store.check_state_dir` checks is part of the digest rather than
    checked here: a file that changed owner or mode, or moved to another filesystem,
    changes the digest, and the fresh open that follows refuses it as it would anyway.
    A file is opened only after an ``lstat`` found a regular file, never through a
    symbolic link, never blocking on a FIFO.
    """
    h = hashlib.sha256()
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(dfd)
        h.update(f"{st.st_uid}:{st.st_mode}:{st.st_dev};".encode())
        for name in STATE_FILES:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except FileNotFoundError:
                h.update(f"{name}:-;".encode())
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_size > _DIGEST_CAP:
                return None
            fd = os.open(name, _OPEN, dir_fd=dfd)
            try:
                st = os.fstat(fd)
                data = os.read(fd, _DIGEST_CAP + 1)
            finally:
                os.close(fd)
            if not stat.S_ISREG(st.st_mode) or len(data) > _DIGEST_CAP:
                return None
            h.update(f"{name}:{st.st_uid}:{st.st_mode}:{st.st_dev}:{len(data)};".encode())
            h.update(data)
    except OSError:
        return None
    finally:
        os.close(dfd)
    return h.digest()


#: the kept signed device information, in the server's folder (not in its store)
INFO_FILE = "info.cbor"
_INFO_MAX = 64 * 1024


def _check(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


class SignedInfo:
    """The device information a server signed last (kept in its folder as
    :data:`INFO_FILE`, only its length and hash here), and what it was signed from."""

    __slots__ = ("check", "clock_offset", "created", "device_id", "digest", "facts", "lease",
                 "size")

    def __init__(self, srv: SimServer, created: int, digest: bytes, result: InfoResult
                 ) -> None:
        self.facts = srv.facts
        self.clock_offset = srv.clock_offset
        self.lease = srv.lease
        self.created = created  # at most the time inside the file (taken before signing)
        self.digest = digest
        self.size = len(result.file)
        self.check = _check(result.file)
        # the server's own string when it is the same (one copy per server, not two)
        self.device_id = srv.device_id if srv.device_id == result.device_id else result.device_id

    @staticmethod
    def keep(srv: SimServer, created: int, digest: bytes, result: InfoResult) -> None:
        """Write ``result``'s file to the server's folder and remember it (nothing kept
        when the folder cannot take it: the next get-info signs afresh)."""
        path = os.path.join(srv.directory, INFO_FILE)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, result.file)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError:
            return
        srv.signed_info = SignedInfo(srv, created, digest, result)

    def read(self, srv: SimServer) -> bytes | None:
        """The kept file's bytes, or None if it is gone or not the bytes kept."""
        try:
            fd = os.open(os.path.join(srv.directory, INFO_FILE), _OPEN)
        except OSError:
            return None
        try:
            data = os.read(fd, _INFO_MAX)
        except OSError:
            return None
        finally:
            os.close(fd)
        return data if len(data) == self.size and _check(data) == self.check else None

    def fits(self, srv: SimServer, now: int, digest: bytes | None) -> bool:
        """Whether opening the store now would sign the same information (but its time)."""
        return (digest == self.digest and srv.facts is self.facts
                and srv.clock_offset == self.clock_offset and srv.lease == self.lease
                and 0 <= now - self.created < INFO_REUSE)


class SimServer:
    """A simulated automation server of the fleet.

    Attributes:
        name: ``as-p-0001`` style name, unique in the fleet.
        model: AS-P, AS-B or Edge-Server.
        directory: the server's folder (its store is ``directory/state``).
        facts: the hardware facts it reports now (a replaced network card changes them).
        device_id: the SHA-256 of its device key, filled in after provisioning.
        links: the links it is served on.
        addresses: link -> the URL a client uses (filled in once served).
        clock_offset: seconds added to the wall clock (clock-jump faults).
    """

    __slots__ = ("addresses", "clock_offset", "device_id", "directory", "facts", "lease",
                 "links", "model", "name", "signed_info")

    def __init__(self, name: str, model: str, directory: Path, facts: HardwareFacts,
                 links: tuple[str, ...]) -> None:
        self.name = name
        self.model = model
        self.directory = str(directory)
        self.facts = facts
        self.links = links
        self.device_id = ""
        self.addresses: dict[str, str] = {}
        self.clock_offset = 0
        self.lease: int | None = None  # issue 14: a system's top server grants this long
        self.signed_info: SignedInfo | None = None  # the last get-info answer (see above)

    @property
    def state_dir(self) -> Path:
        return Path(self.directory) / "state"

    def now(self) -> int:
        return int(time.time()) + self.clock_offset

    def agent(self, ops: FileOps | None = None, facts: HardwareFacts | None = None,
              directory: Path | None = None) -> Agent:
        """An agent over this server's store (or ``directory``) as this hardware sees it now."""
        if self.lease is None:
            return Agent(directory or self.state_dir, StaticFactsProvider(facts or self.facts),
                         clock=self.now, ops=ops)
        from agent.protocol import DEFAULT_LIMITS
        from agent.record import replace

        return Agent(directory or self.state_dir, StaticFactsProvider(facts or self.facts),
                     clock=self.now, ops=ops,
                     limits=replace(DEFAULT_LIMITS, grant_lease=self.lease))

    def __repr__(self) -> str:
        return f"SimServer({self.name}, {self.model}, {self.device_id[:12]})"


class ServerHandler:
    """The ``(op, args) -> result`` a listener calls for one server; counts what it served."""

    __slots__ = ("counts", "server")

    def __init__(self, server: SimServer, counts: Counter[str]) -> None:
        self.server = server
        self.counts = counts

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        if op == "get-info" and not args:
            result: Any = self._info()
        else:  # a change it makes to the store shows in the files' digest
            result = AgentOps(self.server.agent())(op, args)
        self.counts[op] += 1
        return result

    def _info(self) -> InfoResult:
        return device_info(self.server)


def device_info(srv: SimServer) -> InfoResult:
    """``get-info`` on ``srv``: the kept answer while it fits, else signed afresh (and kept
    if the files held the same bytes before and after: nothing changed them meanwhile)."""
    now = srv.now()
    where = os.path.join(srv.directory, "state")  # srv.state_dir, without building a Path
    before = state_digest(where)
    kept = srv.signed_info
    if kept is not None and kept.fits(srv, now, before):
        data = kept.read(srv)
        if data is not None:
            return InfoResult(data, kept.device_id)
    srv.signed_info = None
    result = AgentOps(srv.agent())("get-info", {})
    assert isinstance(result, InfoResult)
    if before is not None and state_digest(where) == before:
        SignedInfo.keep(srv, now, before, result)
    return result

"""``usbdrop:///media/usb0``: a USB stick (or a shared folder) as the mailbox between office and server.

The daemon side (:func:`listen`) polls the folder every ``?poll=`` seconds
(default 1.0; no inotify). A stick counts as **inserted** when the folder
holds the marker file ``.licmailbox`` (``touch /media/usb0/.licmailbox`` once
at the office): an empty mount point, or a stick someone plugged in for
another reason, is never written to. With ``?always=1`` the folder counts as
present all the time (a shared folder, tests) and is created if missing.

Layout of the stick (``<id>`` is the device ID, the SHA-256 of the device key)::

    .licmailbox                     marker: this stick is a license mailbox
    rpc/                            RPC transport for clients without ?device=
        <client>-<seq>.req.cbor       request map, written atomically by the client
        <client>-<seq>.rsp.cbor       answer map, written atomically by the daemon
    <id>/                           one folder per device; a daemon touches only its own
        device-info.cbor              signed device information (rewritten on each insertion
                                      and whenever missing)
        want-request.json             written at the office: {"action": "activate",
                                      "features": ["bacnet"]}; renamed to
                                      want-request.json.done once the request is made, or to
                                      want-request.json.rejected (+ .reason.txt) if refused
        request-<nonce>.req           the signed request for the vendor (first 12 hex digits
                                      of its nonce)
        responses/                    drop vendor responses here, as NAME.resp
        receipts/NAME.receipt         signed receipt of each applied response
        applied/NAME.resp             responses that were applied (or were already applied)
        rejected/NAME.resp            responses that failed verification, each with
        rejected/NAME.reason.txt        the refusal: exit class, reason and message
        rpc/                          RPC transport for clients with ?device=<id>
        log.txt                       one line per action: time, action, outcome

The stick is not trusted. Every poll opens the stick's folder, the device folder and its
subfolders once and does every listing, read, write and rename relative to those
descriptors (:mod:`agent.durable`'s safe-open primitives), never through a symbolic link:
a device folder, ``log.txt``, ``device-info.cbor``, ``responses/``, ``receipts/``,
``applied/``, ``rejected/`` or ``rpc/`` that is a symbolic link, a FIFO, a device node or
on another filesystem stops that part of the stick with one line in the daemon log (once
per insertion); a response or ``want-request.json`` that is not a regular file is left
alone with one line in ``log.txt``; ``log.txt`` must be a file of its own (no hard link).
The folders a result goes to are checked before the agent is asked, so a refusal leaves
the store untouched. Names in log lines are escaped (:func:`agent.durable.escape`).

Only final names are read: a name starting with ``.`` or not ending in ``.resp``
(``x.resp.part``, ``x.resp.tmp``) is a file still being written and is left
alone. Each response is read once, capped at the protocol's file limit; the
bytes read are the bytes verified. The receipt is written before the response
is moved, so a crash in between re-applies it on the next poll, which the agent
answers idempotently with the same receipt. When NAME is taken in applied/ or
rejected/, NAME.2, NAME.3, ... are used. A refusal by the agent's own store
(exit class 8: disk full, damaged store) is not the file's fault: the file stays
and is tried again at the next insertion or after five minutes, not on every poll.

The client side (:func:`connect`) is a synchronous RPC transport over the same
folder, so that the contract test suite runs against ``usbdrop://`` like any
other link: the maps are those of :mod:`hw.rpc`, answered by the same
:class:`~hw.rpc.RpcServer` logic. Each request file stands alone (no session);
the daemon claims a request by renaming it, so when several daemons share a
stick exactly one answers a request in the shared ``rpc/``.

Options (both sides take the same set, so one URL serves a test's both ends):
``poll`` seconds between looks (daemon default 1.0, client default 0.05),
``always=1`` folder always present, ``timeout`` seconds a client waits for an
answer (default 10), ``device=<id>`` the device folder a client talks to (on
the daemon side it must name the device served).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.durable import (
    FileOps,
    atomic_write,
    atomic_write_at,
    create_exclusive,
    ensure_dir,
    escape,
    kind_at,
    open_dir,
    open_regular,
    read_regular,
    write_all,
)
from agent.errors import (
    LicensingError,
    MalformedError,
    StorageError,
    UnsafeFileError,
    UsageError,
)
from agent.formats import iso
from agent.messages import Request
from agent.protocol import DEFAULT_LIMITS, self_signed_payload
from agent.record import record
from agent.rpc import (
    MESSAGE_SLACK,
    Handler,
    Op,
    RpcAnswer,
    RpcRequest,
    TransportError,
    answer,
    decode_message,
    first_request_id,
    for_origin,
    next_request_id,
    speaks,
)
from hw.framing import DEFAULT_MAX_FRAME
from hw.link import LinkURL, Listener, SessionClient

__all__ = [
    "MARKER",
    "MailboxClient",
    "MailboxListener",
    "MailboxOptions",
    "answer_request",
    "connect",
    "listen",
]


MARKER = ".licmailbox"
OPTIONS = ("always", "device", "poll", "timeout")
DEVICE_INFO = "device-info.cbor"
WANT = "want-request.json"
LOG = "log.txt"
LOG_OLD = "log.1.txt"
SUBFOLDERS = ("responses", "receipts", "applied", "rejected")
RESP_SUFFIX = ".resp"
REQ_SUFFIX = ".req.cbor"
RSP_SUFFIX = ".rsp.cbor"
#: the largest response file read: the protocol's own cap (+1 byte, so that it sees "too large")
MAX_RESPONSE = DEFAULT_LIMITS.max_file
MAX_WANT = 4096
#: an RPC map may be as large as a frame of the stream links, plus the server's slack
MAX_RPC_FILE = DEFAULT_MAX_FRAME + 2 * MESSAGE_SLACK
MAX_LOG = 1024 * 1024
#: a file set aside (agent store failure, stick write failure) is tried again after this long,
#: or at the next insertion, not on every poll (each refusal is journalled by the agent)
RETRY_AFTER = 300.0
_SAFE_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")

_logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- options


@record(frozen=True)
class MailboxOptions:
    """A parsed ``usbdrop://`` URL."""

    root: Path
    poll: float | None = None
    always: bool = False
    timeout: float | None = None
    device: str | None = None


def parse_options(url: LinkURL) -> MailboxOptions:
    """Check a ``usbdrop://`` URL; every problem is a UsageError naming it."""
    url.check_options(OPTIONS)
    if url.host or not url.path.startswith("/"):
        raise UsageError(f"{url.text}: usbdrop:// takes an absolute folder path, "
                         f"e.g. usbdrop:///media/usb0 (three slashes)")
    device = url.option("device")
    if device is not None and not _SAFE_NAME.fullmatch(device):
        raise UsageError(f"{url.text}: option device={device!r} is not a device ID")
    return MailboxOptions(
        root=Path(os.path.normpath(url.path)),
        poll=url.seconds("poll", None, 3600),
        always=url.flag("always", False),
        timeout=url.seconds("timeout", None, 86400),
        device=device,
    )


# ---------------------------------------------------------------- file helpers


def _read_capped(path: Path, cap: int) -> bytes | None:
    """Read a regular file once, at most ``cap + 1`` bytes; None if it is gone or not a file.

    (The client's answers; the daemon reads through its held folders instead.)
    """
    try:
        dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        # no symlinks (a shared folder could point into another device's folder), no FIFOs
        return read_regular(path.name, dfd, cap, label=str(path))
    except (FileNotFoundError, UnsafeFileError):
        return None
    finally:
        os.close(dfd)


def answer_request(handler: Handler, payload: bytes) -> bytes | None:
    """One RPC request map in, its answer map out (None: not an RPC request, nothing to say).

    A request file stands alone: its ``v`` field already names a version this
    server speaks, so no ``hello`` is required first (a ``hello`` is still answered).
    """
    try:
        msg = decode_message(payload, MAX_RPC_FILE)
    except MalformedError:
        return None
    if not isinstance(msg, RpcRequest) or not speaks(msg.v):
        return None
    return answer(handler, msg, DEFAULT_MAX_FRAME).encode_within(
        DEFAULT_MAX_FRAME + MESSAGE_SLACK, "frame")


def _refusal(name: str, err: LicensingError) -> str:
    return f"{escape(name)}: refused, exit class {err.exit_code} ({err.reason}): {_one_line(str(err))}\n"


def _one_line(text: str) -> str:
    """``text`` with every character that could end or disguise a log line escaped (names are
    escaped with :func:`~agent.durable.escape` where they enter a message)."""
    return "".join(ch if ch.isprintable() else escape(ch) for ch in text)


class _Folder:
    """A folder of the stick held open while one poll works in it; its subfolders are
    opened (and created) on first use, each checked by :func:`~agent.durable.open_dir`.

    ``label`` is the folder's path on the stick, for messages.
    """

    def __init__(self, fd: int, label: str) -> None:
        self.fd = fd
        self.label = label
        self._subs: dict[str, int] = {}

    def sub(self, name: str) -> int:
        fd = self._subs.get(name)
        if fd is None:
            fd = ensure_dir(name, self.fd, label=f"{self.label}/{name}")
            self._subs[name] = fd
        return fd

    def close(self) -> None:
        for fd in self._subs.values():
            os.close(fd)
        self._subs.clear()
        os.close(self.fd)


# ---------------------------------------------------------------- daemon side


class MailboxListener(Listener):
    """Polls the mailbox folder in one thread; see the module docstring for the layout.

    Every file is opened relative to a folder descriptor held for the poll, never
    through a symbolic link, and only if it is a regular file (or a folder) on the
    stick's own filesystem; anything else is refused with one line (the daemon log,
    and ``log.txt`` for a file in the device folder), nothing read or written through it.

    Args:
        opts: the parsed URL.
        handler: ``handler(op, args)``, normally :class:`agent.ops.AgentOps`.
        log: the daemon log (one line per action).
        clock: POSIX seconds, for the time stamps in ``log.txt``.
        ops: file syscalls (fault injection in tests).
    """

    def __init__(self, opts: MailboxOptions, handler: Handler,
                 log: Callable[[str], None], clock: Callable[[], float], ops: FileOps) -> None:
        self.opts = opts
        self.root = opts.root
        self.poll = opts.poll if opts.poll is not None else 1.0
        self.handler = for_origin(handler, "usb")  # requests kept apart from other links
        self.log = log
        self.clock = clock
        self.ops = ops
        self.address = f"usbdrop://{quote(str(opts.root), safe='/')}"
        #: completed polls (tests wait on it instead of on the clock)
        self.polls = 0
        self.device_id: str | None = None
        self._present = False
        self._deferred: dict[tuple[str, int, int], float] = {}
        #: problems reported and still there at the last poll (each is said once while it
        #: lasts, and again if it comes back after it was gone)
        self._reported: set[str] = set()
        self._current: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ Listener

    def start(self) -> None:
        if self._thread is not None:
            raise UsageError(f"{self.address} is already being served")
        if self.opts.always:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot create the mailbox folder {self.root}: {exc}") from exc
        if self.opts.device is not None:
            self._fetch_info()
            if self.device_id != self.opts.device:
                raise UsageError(f"{self.address}: device={self.opts.device} is not the device "
                                 f"served here ({self.device_id})")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"usbdrop-{self.root.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll_once()
            self._stop.wait(self.poll)

    # ------------------------------------------------------------ one poll

    def poll_once(self) -> None:
        """One look at the folder; never raises (the daemon's thread must keep polling)."""
        try:
            self._poll()
        except (OSError, LicensingError) as exc:
            self._complain(f"usbdrop {self.root}: {_one_line(str(exc))}")
        except Exception as exc:  # a bug must not end the mailbox thread silently
            _logger.exception("usbdrop %s: internal error", self.root)
            self._complain(f"usbdrop {self.root}: internal error: {type(exc).__name__}: "
                           f"{_one_line(str(exc))}")
        finally:
            self._reported, self._current = self._current, set()
            self.polls += 1

    def _waiting(self, key: tuple[str, int, int] | None) -> bool:
        """True if there is no such file, or it was set aside and its time has not come."""
        if key is None:
            return True
        since = self._deferred.get(key)
        if since is None:
            return False
        if time.monotonic() - since < RETRY_AFTER:
            return True
        del self._deferred[key]
        return False

    def _set_aside(self, key: tuple[str, int, int]) -> None:
        self._deferred[key] = time.monotonic()

    def _complain(self, msg: str) -> None:
        """Tell the daemon log, once per problem while it lasts (a stick that stays
        read-only, or holds a planted link, is reported once, not on every poll)."""
        self._current.add(msg)
        if msg not in self._reported:
            self._reported.add(msg)
            self.log(msg)

    def _open_root(self) -> int | None:
        """The stick's folder (the configured path, an administrator's choice), or None."""
        try:
            return os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _poll(self) -> None:
        root = self._open_root()
        if root is None:
            if self.opts.always:
                raise StorageError(f"the mailbox folder {self.root} is gone")
            self._removed()
            return
        with ExitStack() as held:
            held.callback(os.close, root)
            marker = kind_at(root, MARKER)
            if not (self.opts.always or (marker is not None and stat.S_ISREG(marker.st_mode))):
                self._removed()
                return
            info = None
            if not self._present:
                info = self._fetch_info()
            assert self.device_id is not None
            dev = _Folder(ensure_dir(self.device_id, root, label=self.device_id), self.device_id)
            held.callback(dev.close)
            self._check_log(dev)  # nothing is done in a folder whose log leads elsewhere
            if info is not None:
                for sub in SUBFOLDERS:
                    dev.sub(sub)
                self._write_device_info(dev, info, "inserted")  # raises: retried next poll
                self._present = True
            elif kind_at(dev.fd, DEVICE_INFO) is None:
                self._write_device_info(dev, self._fetch_info(), "device-info was missing")
            parts: list[Callable[[], None]] = [
                lambda: self._serve_rpc(root, "rpc"),
                lambda: self._serve_rpc(dev.fd, f"{dev.label}/rpc"),
                lambda: self._want_request(dev),
                lambda: self._responses(dev),
            ]
            for part in parts:
                try:  # one hostile part of the stick does not stop the others
                    part()
                except (OSError, LicensingError) as exc:
                    self._complain(f"usbdrop {self.root}: {_one_line(str(exc))}")

    def _removed(self) -> None:
        # a stick inserted again: files set aside are tried again
        self._deferred.clear()
        if self._present:
            self._present = False
            self.log(f"usbdrop {self.root}: mailbox removed")

    # ------------------------------------------------------------ device folder

    def _fetch_info(self) -> bytes:
        result = self.handler(Op.GET_INFO, {})
        device_id = result.get("device_id")
        if not isinstance(device_id, str) or not _SAFE_NAME.fullmatch(device_id):
            raise MalformedError(f"the agent reported an unusable device ID {device_id!r}")
        self.device_id = device_id
        return bytes(result["file"])

    def _write_device_info(self, dev: _Folder, data: bytes, why: str) -> None:
        atomic_write_at(self.ops, dev.fd, DEVICE_INFO, data, 0o644,
                        label=f"{dev.label}/{DEVICE_INFO}")
        self._note(dev, "device-info", f"{why}; {DEVICE_INFO} written")

    def _open_log(self, dev: _Folder) -> int:
        """``log.txt`` for appending: an existing regular file of its own, or a new one."""
        label = f"{dev.label}/{LOG}"
        for _attempt in range(2):
            try:
                fd = open_regular(LOG, dev.fd, os.O_WRONLY | os.O_APPEND, label=label)
            except FileNotFoundError:
                try:
                    return create_exclusive(self.ops, dev.fd, LOG, os.O_WRONLY | os.O_APPEND,
                                            0o644)
                except FileExistsError:
                    continue  # someone made one just now: look at it again
            if os.fstat(fd).st_size <= MAX_LOG:
                return fd
            os.close(fd)
            self.ops.renameat(dev.fd, LOG, dev.fd, LOG_OLD)
        raise StorageError(f"{label} keeps changing while it is opened")

    @staticmethod
    def _check_log(dev: _Folder) -> None:
        """Refuse the device folder while its ``log.txt`` is anything but a file of its own."""
        st = kind_at(dev.fd, LOG)
        if st is not None and (not stat.S_ISREG(st.st_mode) or st.st_nlink != 1
                               or st.st_dev != os.fstat(dev.fd).st_dev):
            os.close(open_regular(LOG, dev.fd, os.O_WRONLY | os.O_APPEND,
                                  label=f"{dev.label}/{LOG}"))  # raises, naming what it is

    def _note(self, dev: _Folder, action: str, outcome: str) -> None:
        """One line in the device folder's log.txt and in the daemon log.

        ``action`` and ``outcome`` carry names already escaped; anything else that could
        break the line (an error message's newline) is escaped here.
        """
        action, outcome = _one_line(action), _one_line(outcome)
        line = f"{iso(int(self.clock()))} {action}: {outcome}\n".encode()
        fd = self._open_log(dev)
        try:
            write_all(self.ops, fd, line)
            self.ops.fsync(fd)
        finally:
            self.ops.close(fd)
        self.log(f"usbdrop {dev.label[:12]}: {action}: {outcome}")

    def _refused(self, dev: _Folder, err: UnsafeFileError) -> None:
        """A file of the device folder that is not a regular file: said once, left alone."""
        msg = str(err)
        self._current.add(msg)
        if msg not in self._reported:
            self._reported.add(msg)
            self._note(dev, "refused", msg)  # the stick's log and the daemon log

    def _move(self, src_fd: int, src: str, dst_fd: int, dst: str) -> None:
        self.ops.renameat(src_fd, src, dst_fd, dst)
        self.ops.fsync(dst_fd)
        if src_fd != dst_fd:
            self.ops.fsync(src_fd)

    @staticmethod
    def _free_name(stem: str, *folders: int) -> str:
        """``stem`` or ``stem.2``, ``stem.3``...: the first not yet used by a processed file."""
        cand, n = stem, 1
        while any(kind_at(f, f"{cand}{RESP_SUFFIX}") is not None for f in folders):
            n += 1
            cand = f"{stem}.{n}"
        return cand

    def _regular_key(self, dev: _Folder, folder: int, name: str,
                     label: str) -> tuple[str, int, int] | None:
        """Identity of a file's current version (to remember one that must wait); None if it
        is not there, or (said once) if it is not a regular file."""
        st = kind_at(folder, name)
        if st is None:
            return None
        if not stat.S_ISREG(st.st_mode):
            try:
                open_regular(name, folder, label=label)  # the refusal, in the usual words
            except UnsafeFileError as err:
                self._refused(dev, err)
            except FileNotFoundError:
                pass
            return None
        return (name, st.st_size, st.st_mtime_ns)

    def _read(self, dev: _Folder, folder: int, name: str, cap: int, label: str) -> bytes | None:
        try:
            return read_regular(name, folder, cap, label=label)
        except FileNotFoundError:
            return None
        except UnsafeFileError as err:
            self._refused(dev, err)
            return None

    # ------------------------------------------------------------ want-request.json

    def _want_request(self, dev: _Folder) -> None:
        label = f"{dev.label}/{WANT}"
        key = self._regular_key(dev, dev.fd, WANT, label)
        if self._waiting(key):
            return
        assert key is not None
        data = self._read(dev, dev.fd, WANT, MAX_WANT, label)
        if data is None:
            return
        try:
            args = _parse_want(data)
            result = self.handler(Op.CREATE_REQUEST, args)
        except StorageError as err:
            self._set_aside(key)
            self._note(dev, "request", f"set aside, the agent's store failed: {err}")
            return
        except LicensingError as err:
            self._set_aside(key)  # if writing to the stick fails below, not again every poll
            atomic_write_at(self.ops, dev.fd, f"{WANT}.reason.txt", _refusal(WANT, err).encode(),
                            0o644, label=f"{label}.reason.txt")
            self._move(dev.fd, WANT, dev.fd, f"{WANT}.rejected")
            self._deferred.pop(key, None)
            self._note(dev, "request", _refusal(WANT, err).strip())
            return
        self._set_aside(key)
        req = bytes(result["file"])
        payload, _key = self_signed_payload(req, Request)
        name = f"request-{payload.nonce.hex()[:12]}.req"
        # request first, then .done: a crash between makes one more (harmless) outstanding request
        atomic_write_at(self.ops, dev.fd, name, req, 0o644, label=f"{dev.label}/{name}")
        self._move(dev.fd, WANT, dev.fd, f"{WANT}.done")
        self._deferred.pop(key, None)
        features = ",".join(escape(f) for f in args["features"]) or "-"
        self._note(dev, "request", f"{escape(args['action'])} {features} -> {name}")

    # ------------------------------------------------------------ responses/

    def _responses(self, dev: _Folder) -> None:
        inbox = dev.sub("responses")
        for name in sorted(os.listdir(inbox)):
            if self._stop.is_set():
                return
            if name.startswith(".") or not name.lower().endswith(RESP_SUFFIX):
                continue  # not final yet (.part, .tmp, dot-temporaries) or not a response
            self._response(dev, inbox, name)

    def _response(self, dev: _Folder, inbox: int, name: str) -> None:
        label = f"{dev.label}/responses/{name}"
        key = self._regular_key(dev, inbox, name, label)
        if self._waiting(key):
            return
        assert key is not None
        data = self._read(dev, inbox, name, MAX_RESPONSE, label)
        if data is None:
            return
        stem = name[: -len(RESP_SUFFIX)]
        action = f"apply {escape(name)}"
        applied, receipts, rejected = (dev.sub(n) for n in ("applied", "receipts", "rejected"))
        try:
            result = self.handler(Op.APPLY_RESPONSE, {"file": data})
        except StorageError as err:
            self._set_aside(key)
            self._note(dev, action, f"set aside, the agent's store failed: {err}")
            return
        except LicensingError as err:
            self._set_aside(key)  # if writing to the stick fails below, not again every poll
            target = self._free_name(stem, rejected)
            atomic_write_at(self.ops, rejected, f"{target}.reason.txt",
                            _refusal(name, err).encode(), 0o644,
                            label=f"{dev.label}/rejected/{target}.reason.txt")
            self._move(inbox, name, rejected, f"{target}{RESP_SUFFIX}")
            self._deferred.pop(key, None)
            self._note(dev, action, f"rejected/{escape(target)}{RESP_SUFFIX}: "
                                    f"{_refusal(name, err).strip()}")
            return
        self._set_aside(key)
        target = self._free_name(stem, applied, rejected)
        # receipt before the move: a crash in between re-applies idempotently next time
        atomic_write_at(self.ops, receipts, f"{target}.receipt", bytes(result["receipt"]), 0o644,
                        label=f"{dev.label}/receipts/{target}.receipt")
        self._move(inbox, name, applied, f"{target}{RESP_SUFFIX}")
        self._deferred.pop(key, None)
        if result.get("already_applied"):
            outcome = "already applied (idempotent no-op); receipt written again"
        else:
            outcome = f"applied, sequence {result.get('sequence')}"
        warning = f"; warning: {result['warning']}" if result.get("warning") else ""
        self._note(dev, action, f"{outcome} -> receipts/{escape(target)}.receipt{warning}")

    # ------------------------------------------------------------ rpc/

    def _serve_rpc(self, parent: int, label: str) -> None:
        try:
            folder = open_dir("rpc", parent, label=label)
        except FileNotFoundError:
            return
        try:
            for name in sorted(os.listdir(folder)):
                if self._stop.is_set():
                    return
                if name.startswith(".") or not name.endswith(REQ_SUFFIX):
                    continue
                self._rpc_request(folder, label, name)
        finally:
            os.close(folder)

    def _rpc_request(self, folder: int, label: str, name: str) -> None:
        base = name[: -len(REQ_SUFFIX)]
        claimed = f".{name}.claimed-{os.getpid()}"
        try:
            # atomic: one daemon per request (a link is renamed, never followed)
            os.rename(name, claimed, src_dir_fd=folder, dst_dir_fd=folder)
        except FileNotFoundError:
            return  # withdrawn by its client, or taken by another daemon on the stick
        try:
            try:
                data: bytes | None = read_regular(claimed, folder, MAX_RPC_FILE,
                                                  label=f"{label}/{name}")
            except (FileNotFoundError, UnsafeFileError):
                data = None
            reply = None
            if data is not None and len(data) <= MAX_RPC_FILE:
                reply = answer_request(self.handler, data)
            if reply is None:
                self.log(f"usbdrop {self.root}: {escape(label)}/{escape(name)} is not an RPC "
                         f"request; dropped")
            else:
                atomic_write_at(self.ops, folder, f"{base}{RSP_SUFFIX}", reply, 0o644,
                                label=f"{label}/{base}{RSP_SUFFIX}")
        finally:
            try:
                os.unlink(claimed, dir_fd=folder)
            except OSError:
                pass


def _parse_want(data: bytes) -> dict[str, Any]:
    """``{"action": ..., "features": [...]}`` from want-request.json, as create-request args."""
    if len(data) > MAX_WANT:
        raise MalformedError(f"{WANT} is larger than {MAX_WANT} bytes")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
        raise MalformedError(f"{WANT} is not JSON (half-written?): {exc}") from exc
    shape = f'{WANT} must be {{"action": "activate"|"reclaim"|"renew", "features": [NAME, ...]}}'
    if not isinstance(obj, dict) or not isinstance(obj.get("action"), str) or (
            set(obj) - {"action", "features"}):
        raise UsageError(shape)
    features = obj.get("features", [])
    if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
        raise UsageError(shape)
    return {"action": obj["action"], "features": features}


def listen(url: LinkURL, handler: Handler, log: Callable[[str], None] | None = None,
           clock: Callable[[], float] = time.time, ops: FileOps | None = None,
           **_ctx: Any) -> MailboxListener:
    """The daemon side of ``usbdrop:///FOLDER`` (not yet started)."""
    return MailboxListener(parse_options(url), handler, log or _logger.info, clock,
                           ops or FileOps())


# ---------------------------------------------------------------- client side


class MailboxClient(SessionClient):
    """Synchronous RPC through request and answer files in ``folder``.

    Args:
        root: the mailbox folder (for messages).
        folder: ``ROOT/rpc`` or ``ROOT/<device>/rpc``.
        timeout: seconds to wait for each answer.
        poll: seconds between looks for the answer.
        clock: monotonic seconds (injectable for tests).
    """

    def __init__(self, root: Path, folder: Path, timeout: float = 10.0, poll: float = 0.05,
                 ops: FileOps | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.folder = folder
        self.timeout = timeout
        self.poll = poll
        self.ops = ops or FileOps()
        self.clock = clock
        self.client_id = os.urandom(6).hex()
        self.seq = 0
        # one try: a request file is not lost in transit, and a resend could run it twice
        self.next_id = first_request_id()

    def _exchange(self, op: str, args: Mapping[str, Any]) -> Any:
        rid, self.next_id = self.next_id, next_request_id(self.next_id)
        payload = RpcRequest(rid, op, dict(args)).encode()
        if len(payload) > DEFAULT_MAX_FRAME + MESSAGE_SLACK:
            raise MalformedError(f"request of {len(payload)} bytes exceeds the frame limit")
        self.seq += 1
        base = f"{self.client_id}-{self.seq:06d}"
        req = self.folder / f"{base}{REQ_SUFFIX}"
        rsp = self.folder / f"{base}{RSP_SUFFIX}"
        try:
            atomic_write(self.ops, req, payload, 0o644)
        except StorageError as exc:
            raise TransportError(f"{op}: cannot leave the request in {self.folder}: {exc}") from exc
        deadline = self.clock() + self.timeout
        while True:
            try:
                data = _read_capped(rsp, MAX_RPC_FILE)
            except OSError as exc:
                raise TransportError(f"{op}: cannot read the answer {rsp}: {exc}") from exc
            if data is not None:
                try:
                    rsp.unlink()
                except OSError:
                    pass
                try:
                    msg = decode_message(data, MAX_RPC_FILE)
                except MalformedError:
                    msg = None
                if (isinstance(msg, RpcAnswer) and msg.id == rid
                        and speaks(msg.v)):
                    return msg.value()
                raise TransportError(f"{op}: the answer {rsp.name} is not an answer to this request")
            if self.clock() >= deadline:
                try:
                    req.unlink()  # still unclaimed: withdraw it, so that no daemon runs it late
                except FileNotFoundError:
                    pass
                raise TransportError(
                    f"{op}: no answer within {self.timeout:g} s in {self.folder}; is the licagent "
                    f"daemon listening on usbdrop://{self.root} and is the stick inserted "
                    f"(with {MARKER})?"
                )
            time.sleep(self.poll)


def _check_client_folder(opts: MailboxOptions) -> None:
    """Create the client's ``rpc/`` folder (and the device folder), each a real folder of the
    stick: the office's computer does not write through a link on the stick either."""
    parts = [opts.device, "rpc"] if opts.device else ["rpc"]
    held: list[int] = []
    try:
        held.append(os.open(opts.root, os.O_RDONLY | os.O_DIRECTORY))
        for i, name in enumerate(parts):
            held.append(ensure_dir(name, held[-1], label="/".join(parts[: i + 1])))
    except UnsafeFileError as exc:
        raise TransportError(f"usbdrop {opts.root}: {exc}") from exc
    except OSError as exc:
        raise TransportError(f"cannot create {opts.root}/{'/'.join(parts)}: {exc}") from exc
    finally:
        for fd in held:
            os.close(fd)


def connect(url: LinkURL, timeout: float | None = None, **_ctx: Any) -> MailboxClient:
    """A client of the daemon polling ``usbdrop:///FOLDER`` (``?timeout=`` overrides ``timeout``).

    Raises:
        TransportError: the folder is not there (stick not mounted) or not writable, or
            its ``rpc/`` (or device folder) is a link, a FIFO or on another filesystem.
    """
    opts = parse_options(url)
    if not opts.root.is_dir():
        raise TransportError(f"no mailbox folder {opts.root}: is the stick mounted?")
    folder = (opts.root / opts.device if opts.device else opts.root) / "rpc"
    _check_client_folder(opts)
    return MailboxClient(
        opts.root, folder,
        timeout=opts.timeout or timeout or 10.0,
        poll=opts.poll or 0.05,
    )

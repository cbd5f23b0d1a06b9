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

import errno
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from agent.durable import FileOps, atomic_write, fsync_dir, write_all
from agent.errors import LicensingError, MalformedError, StorageError, UsageError
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
    """Read a regular file once, at most ``cap + 1`` bytes; None if it is gone or not a file."""
    try:
        # no symlinks (a shared folder could point into another device's folder), no FIFOs
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        return f.read(cap + 1)


def _file_key(path: Path) -> tuple[str, int, int] | None:
    """Identity of a file's current version, to remember one that must wait."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return (path.name, st.st_size, st.st_mtime_ns)


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
    return f"{name}: refused, exit class {err.exit_code} ({err.reason}): {err}\n"


# ---------------------------------------------------------------- daemon side


class MailboxListener(Listener):
    """Polls the mailbox folder in one thread; see the module docstring for the layout.

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
        self._last_error = ""
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
            self._last_error = ""
        except (OSError, LicensingError) as exc:
            self._complain(f"usbdrop {self.root}: {exc}")
        except Exception as exc:  # a bug must not end the mailbox thread silently
            _logger.exception("usbdrop %s: internal error", self.root)
            self._complain(f"usbdrop {self.root}: internal error: {type(exc).__name__}: {exc}")
        finally:
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
        if msg != self._last_error:  # a stick that stays read-only is reported once, not per poll
            self.log(msg)
            self._last_error = msg

    def _poll(self) -> None:
        present = self.opts.always or (self.root / MARKER).is_file()
        if not present:
            if self._present:
                self._present = False
                self.log(f"usbdrop {self.root}: mailbox removed")
            return
        if not self._present:
            self._deferred.clear()
            self._write_device_info("inserted")  # raises: stays "not present", retried next poll
            self._present = True
        assert self.device_id is not None
        dev = self.root / self.device_id
        if not (dev / DEVICE_INFO).is_file():
            self._write_device_info("device-info was missing")
        self._serve_rpc(self.root / "rpc")
        self._serve_rpc(dev / "rpc")
        self._want_request(dev)
        self._responses(dev)

    # ------------------------------------------------------------ device folder

    def _fetch_info(self) -> bytes:
        result = self.handler(Op.GET_INFO, {})
        device_id = result.get("device_id")
        if not isinstance(device_id, str) or not _SAFE_NAME.fullmatch(device_id):
            raise MalformedError(f"the agent reported an unusable device ID {device_id!r}")
        self.device_id = device_id
        return bytes(result["file"])

    def _write_device_info(self, why: str) -> None:
        data = self._fetch_info()
        assert self.device_id is not None
        dev = self.root / self.device_id
        dev.mkdir(exist_ok=True)
        for sub in ("responses", "receipts", "applied", "rejected"):
            (dev / sub).mkdir(exist_ok=True)
        atomic_write(self.ops, dev / DEVICE_INFO, data, 0o644)
        self._note(dev, "device-info", f"{why}; {DEVICE_INFO} written")

    def _note(self, dev: Path, action: str, outcome: str) -> None:
        """One line in the device folder's log.txt and in the daemon log."""
        line = f"{iso(int(self.clock()))} {action}: {outcome}\n".encode()
        path = dev / LOG
        try:
            if path.stat().st_size > MAX_LOG:
                self.ops.replace(str(path), str(dev / "log.1.txt"))
        except FileNotFoundError:
            pass
        fd = self.ops.open(str(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            write_all(self.ops, fd, line)
            self.ops.fsync(fd)
        finally:
            self.ops.close(fd)
        self.log(f"usbdrop {dev.name[:12]}: {action}: {outcome}")

    def _move(self, src: Path, dst: Path) -> None:
        self.ops.replace(str(src), str(dst))
        fsync_dir(self.ops, dst.parent)
        if src.parent != dst.parent:
            fsync_dir(self.ops, src.parent)

    @staticmethod
    def _free_name(folder: Path, stem: str, *others: Path) -> str:
        """``stem`` or ``stem.2``, ``stem.3``...: the first not yet used by a processed file."""
        cand, n = stem, 1
        while any((f / f"{cand}{RESP_SUFFIX}").exists() for f in (folder, *others)):
            n += 1
            cand = f"{stem}.{n}"
        return cand

    # ------------------------------------------------------------ want-request.json

    def _want_request(self, dev: Path) -> None:
        path = dev / WANT
        key = _file_key(path)
        if self._waiting(key):
            return
        assert key is not None
        data = _read_capped(path, MAX_WANT)
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
            atomic_write(self.ops, dev / f"{WANT}.reason.txt", _refusal(WANT, err).encode(), 0o644)
            self._move(path, dev / f"{WANT}.rejected")
            self._deferred.pop(key, None)
            self._note(dev, "request", _refusal(WANT, err).strip())
            return
        self._set_aside(key)
        req = bytes(result["file"])
        payload, _key = self_signed_payload(req, Request)
        name = f"request-{payload.nonce.hex()[:12]}.req"
        # request first, then .done: a crash between makes one more (harmless) outstanding request
        atomic_write(self.ops, dev / name, req, 0o644)
        self._move(path, dev / f"{WANT}.done")
        self._deferred.pop(key, None)
        self._note(dev, "request", f"{args['action']} {','.join(args['features']) or '-'} "
                                   f"-> {name}")

    # ------------------------------------------------------------ responses/

    def _responses(self, dev: Path) -> None:
        inbox = dev / "responses"
        try:
            names = sorted(os.listdir(inbox))
        except FileNotFoundError:
            return
        for name in names:
            if self._stop.is_set():
                return
            if name.startswith(".") or not name.lower().endswith(RESP_SUFFIX):
                continue  # not final yet (.part, .tmp, dot-temporaries) or not a response
            self._response(dev, inbox / name)

    def _response(self, dev: Path, path: Path) -> None:
        key = _file_key(path)
        if self._waiting(key):
            return
        assert key is not None
        data = _read_capped(path, MAX_RESPONSE)
        if data is None:
            return
        stem = path.name[: -len(RESP_SUFFIX)]
        action = f"apply {path.name}"
        try:
            result = self.handler(Op.APPLY_RESPONSE, {"file": data})
        except StorageError as err:
            self._set_aside(key)
            self._note(dev, action, f"set aside, the agent's store failed: {err}")
            return
        except LicensingError as err:
            self._set_aside(key)  # if writing to the stick fails below, not again every poll
            target = self._free_name(dev / "rejected", stem)
            atomic_write(self.ops, dev / "rejected" / f"{target}.reason.txt",
                         _refusal(path.name, err).encode(), 0o644)
            self._move(path, dev / "rejected" / f"{target}{RESP_SUFFIX}")
            self._deferred.pop(key, None)
            self._note(dev, action, f"rejected/{target}{RESP_SUFFIX}: "
                                    f"{_refusal(path.name, err).strip()}")
            return
        self._set_aside(key)
        target = self._free_name(dev / "applied", stem, dev / "rejected")
        # receipt before the move: a crash in between re-applies idempotently next time
        atomic_write(self.ops, dev / "receipts" / f"{target}.receipt", bytes(result["receipt"]),
                     0o644)
        self._move(path, dev / "applied" / f"{target}{RESP_SUFFIX}")
        self._deferred.pop(key, None)
        if result.get("already_applied"):
            outcome = "already applied (idempotent no-op); receipt written again"
        else:
            outcome = f"applied, sequence {result.get('sequence')}"
        warning = f"; warning: {result['warning']}" if result.get("warning") else ""
        self._note(dev, action, f"{outcome} -> receipts/{target}.receipt{warning}")

    # ------------------------------------------------------------ rpc/

    def _serve_rpc(self, folder: Path) -> None:
        try:
            names = sorted(os.listdir(folder))
        except FileNotFoundError:
            return
        for name in names:
            if self._stop.is_set():
                return
            if name.startswith(".") or not name.endswith(REQ_SUFFIX):
                continue
            base = name[: -len(REQ_SUFFIX)]
            claimed = folder / f".{name}.claimed-{os.getpid()}"
            try:
                os.rename(folder / name, claimed)  # atomic: one daemon per request
            except FileNotFoundError:
                continue  # withdrawn by its client, or taken by another daemon on the stick
            try:
                data = _read_capped(claimed, MAX_RPC_FILE)
                reply = None
                if data is not None and len(data) <= MAX_RPC_FILE:
                    reply = answer_request(self.handler, data)
                if reply is None:
                    self.log(f"usbdrop {folder}: {name} is not an RPC request; dropped")
                else:
                    atomic_write(self.ops, folder / f"{base}{RSP_SUFFIX}", reply, 0o644)
            finally:
                try:
                    claimed.unlink()
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


def connect(url: LinkURL, timeout: float | None = None, **_ctx: Any) -> MailboxClient:
    """A client of the daemon polling ``usbdrop:///FOLDER`` (``?timeout=`` overrides ``timeout``).

    Raises:
        TransportError: the folder is not there (stick not mounted) or not writable.
    """
    opts = parse_options(url)
    if not opts.root.is_dir():
        raise TransportError(f"no mailbox folder {opts.root}: is the stick mounted?")
    folder = (opts.root / opts.device if opts.device else opts.root) / "rpc"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TransportError(f"cannot create {folder}: {exc}") from exc
    return MailboxClient(
        opts.root, folder,
        timeout=opts.timeout or timeout or 10.0,
        poll=opts.poll or 0.05,
    )

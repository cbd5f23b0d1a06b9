"""Sans-IO request/response protocol spoken over framed byte streams.

Messages are CBOR maps inside frames (:mod:`hw.framing`)::

    request  = {"v": 1, "id": uint, "op": tstr, "args": {* tstr => any}}
    response = {"v": 1, "id": uint, "ok": true,  "result": any}
             / {"v": 1, "id": uint, "ok": false, "error": {"code": uint, "reason": tstr,
                                                           "message": tstr}}

The first exchange is ``hello`` (version negotiation): the client offers the
versions it speaks, the server picks one or refuses. Request IDs let a client
retry after a timeout: the server remembers its last responses by ID and
answers a retried request from that memory, so a retried ``apply`` or
``create-request`` is never executed twice. Responses to IDs the client no
longer waits for (late answers to earlier tries) are dropped.

Neither class does I/O or reads a clock: bytes and ``now`` go in, bytes and
events come out.
"""

from __future__ import annotations

import enum
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from agent.cose import canonical, strict_loads
from agent.errors import LicensingError, MalformedError
from agent.record import field, record
from hw.framing import DEFAULT_MAX_FRAME, CorruptFrame, Frame, FrameDecoder, encode_frame

__all__ = [
    "OPS",
    "PROTOCOL_VERSIONS",
    "Op",
    "RemoteError",
    "RpcClient",
    "RpcResult",
    "RpcServer",
    "TransportError",
]

PROTOCOL_VERSIONS = (1,)


class Op(enum.StrEnum):
    HELLO = "hello"
    GET_INFO = "get-info"
    GET_STATUS = "get-status"
    GET_LICENSE_INFO = "get-license-info"
    CREATE_REQUEST = "create-request"
    APPLY_RESPONSE = "apply-response"
    CHECK_FEATURE = "check-feature"
    READ_JOURNAL = "read-journal"


OPS = frozenset(o.value for o in Op)


class TransportError(LicensingError):
    """The link failed: timeout after all retries, connection lost, refused."""

    exit_code = 1
    reason = "transport"


class RemoteError(LicensingError):
    """The server answered with an error; carries the server's exit code and reason."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.exit_code = code
        self.reason = reason


def _decode(payload: bytes, max_frame: int) -> Mapping[str, Any]:
    msg = strict_loads(payload, max_size=max_frame)
    if not isinstance(msg, dict) or msg.get("v") not in PROTOCOL_VERSIONS or not isinstance(
        msg.get("id"), int
    ) or isinstance(msg.get("id"), bool) or not 0 <= msg["id"] < 2**32:
        raise MalformedError("not an RPC message of a supported version")
    return msg


# ---------------------------------------------------------------- server side

Handler = Callable[[str, Mapping[str, Any]], Any]


@record
class RpcServer:
    """One connection's server side.

    Args:
        handler: ``handler(op, args) -> result``; raises LicensingError to answer an error.
        max_frame: largest payload accepted.
        remember: how many recent responses are kept for retried requests.
    """

    handler: Handler
    max_frame: int = DEFAULT_MAX_FRAME
    remember: int = 16
    version: int | None = None
    corrupt_frames: int = 0
    _decoder: FrameDecoder = field(init=False)
    _recent: OrderedDict[int, bytes] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self._decoder = FrameDecoder(self.max_frame)

    def receive(self, data: bytes) -> list[bytes]:
        """Bytes from the link in; frames to send back out."""
        out: list[bytes] = []
        for ev in self._decoder.feed(data):
            if not isinstance(ev, Frame):
                self.corrupt_frames += 1  # noise: the client's timeout and retry recover
                continue
            reply = self._answer(ev.payload)
            if reply is not None:
                out.append(reply)
        return out

    def _answer(self, payload: bytes) -> bytes | None:
        try:
            msg = _decode(payload, self.max_frame)
        except MalformedError:
            self.corrupt_frames += 1
            return None
        rid = msg["id"]
        if "op" not in msg:
            return None  # a response echoed back to us on a loop: ignore
        cached = self._recent.get(rid)
        if cached is not None and msg.get("op") != Op.HELLO:
            return cached
        op, args = msg.get("op"), msg.get("args", {})
        if not isinstance(op, str) or not isinstance(args, dict):
            body: dict[str, Any] = self._error(2, "usage", "op must be text and args a map")
        elif op != Op.HELLO and self.version is None:
            body = self._error(2, "usage", "say hello first (version negotiation)")
        elif op == Op.HELLO:
            body = self._hello(args)
        elif op not in OPS:
            body = self._error(2, "usage", f"unknown operation {op!r}")
        else:
            try:
                body = {"ok": True, "result": self.handler(op, args)}
            except LicensingError as err:
                body = self._error(err.exit_code, err.reason, str(err))
        frame = encode_frame(canonical({"v": 1, "id": rid, **body}))
        if len(frame) > self.max_frame + 1024:
            frame = encode_frame(canonical({"v": 1, "id": rid, **self._error(
                1, "too-large", "the answer is larger than the link's frame limit")}))
        self._recent[rid] = frame
        while len(self._recent) > self.remember:
            self._recent.popitem(last=False)
        return frame

    def _hello(self, args: Mapping[str, Any]) -> dict[str, Any]:
        offered = args.get("versions", [])
        common = [v for v in PROTOCOL_VERSIONS if isinstance(offered, list) and v in offered]
        if not common:
            return self._error(2, "version",
                               f"no common protocol version: server speaks "
                               f"{list(PROTOCOL_VERSIONS)}, client offered {offered!r}")
        self.version = max(common)
        self._recent.clear()  # a new client session: its IDs mean nothing from before
        extra = self.handler(Op.HELLO, args) or {}
        return {"ok": True, "result": {"version": self.version, "max_frame": self.max_frame,
                                       **extra}}

    @staticmethod
    def _error(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"ok": False, "error": {"code": code, "reason": reason, "message": message}}


# ---------------------------------------------------------------- client side


@record(frozen=True)
class RpcResult:
    """The answer to request ``id``: a result, or the server's error."""

    id: int
    ok: bool
    result: Any = None
    error: RemoteError | None = None


@record
class _Pending:
    frame: bytes
    deadline: float
    tries: int


@record
class RpcClient:
    """One connection's client side: request IDs, timeouts and retries, no I/O.

    The edge loop calls :meth:`start` to send, :meth:`receive` with bytes from
    the link, and :meth:`due` with the time to learn which frames to resend;
    a request that ran out of tries comes back from :meth:`due` as failed.
    """

    timeout: float = 2.0
    tries: int = 4
    max_frame: int = DEFAULT_MAX_FRAME
    next_id: int = 0
    corrupt_frames: int = 0
    _decoder: FrameDecoder = field(init=False)
    _pending: dict[int, _Pending] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._decoder = FrameDecoder(self.max_frame)
        if self.next_id == 0:
            # a random start, so that two sessions over one serial line never share IDs
            self.next_id = int.from_bytes(os.urandom(4), "big") % (2**31) + 1

    def start(self, op: str, args: Mapping[str, Any], now: float) -> tuple[int, bytes]:
        rid = self.next_id
        self.next_id = (self.next_id % (2**32 - 1)) + 1
        frame = encode_frame(canonical({"v": 1, "id": rid, "op": op, "args": dict(args)}))
        if len(frame) > self.max_frame + 1024:
            raise MalformedError(f"request of {len(frame)} bytes exceeds the frame limit")
        self._pending[rid] = _Pending(frame, now + self.timeout, 1)
        return rid, frame

    def hello(self, now: float) -> tuple[int, bytes]:
        return self.start(Op.HELLO, {"versions": list(PROTOCOL_VERSIONS)}, now)

    def receive(self, data: bytes) -> list[RpcResult]:
        results: list[RpcResult] = []
        for ev in self._decoder.feed(data):
            if isinstance(ev, CorruptFrame) or not isinstance(ev, Frame):
                self.corrupt_frames += 1
                continue
            try:
                msg = _decode(ev.payload, self.max_frame)
            except MalformedError:
                self.corrupt_frames += 1
                continue
            rid = msg["id"]
            if rid not in self._pending or "ok" not in msg:
                continue  # a late answer to an abandoned try, or our own echo
            del self._pending[rid]
            if msg["ok"] is True:
                results.append(RpcResult(rid, True, msg.get("result")))
            else:
                e = msg.get("error")
                if not isinstance(e, dict):
                    e = {}
                raw_code = e.get("code")
                code = raw_code if isinstance(raw_code, int) and 0 < raw_code < 256 else 1
                results.append(RpcResult(rid, False, error=RemoteError(
                    code, str(e.get("reason", "remote")), str(e.get("message", "remote error")))))
        return results

    def due(self, now: float) -> tuple[list[bytes], list[RpcResult]]:
        """Frames to resend now, and requests that failed for good."""
        resend: list[bytes] = []
        failed: list[RpcResult] = []
        for rid, p in list(self._pending.items()):
            if now < p.deadline:
                continue
            if p.tries >= self.tries:
                del self._pending[rid]
                failed.append(RpcResult(rid, False, error=RemoteError(
                    1, "transport", f"no answer after {p.tries} tries "
                                    f"({self.timeout:g} s each)")))
            else:
                p.tries += 1
                p.deadline = now + self.timeout
                resend.append(p.frame)
        return resend, failed

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

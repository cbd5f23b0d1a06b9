"""The RPC session over framed byte streams (serial, pty, TCP, TLS, loop, sim, QEMU), sans I/O.

The messages, the operation table and how a request is answered are
:mod:`agent.rpc`'s; this module adds what a byte stream needs: frames
(:mod:`hw.framing`), the ``hello`` exchange first on each connection, and request
IDs for retries. The server remembers its last answers by ID and answers a
retried request from that memory, so a retried ``apply`` or ``create-request``
is never executed twice. Answers to IDs the client no longer waits for (late
answers to earlier tries) are dropped.

Neither class does I/O or reads a clock: bytes and ``now`` go in, bytes and
events come out.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import MalformedError
from agent.record import field, record
from agent.rpc import (
    MESSAGE_SLACK,
    Handler,
    Op,
    RemoteError,
    RpcAnswer,
    RpcRequest,
    answer,
    decode_message,
    first_request_id,
    hello_args,
    next_request_id,
    speaks,
)
from hw.framing import DEFAULT_MAX_FRAME, Frame, FrameDecoder, encode_frame

__all__ = ["RpcClient", "RpcResult", "RpcServer"]

# ---------------------------------------------------------------- server side


@record
class RpcServer:
    """One connection's server side.

    Args:
        handler: ``handler(op, args) -> result``; raises LicensingError to answer an error.
        max_frame: largest payload accepted.
        remember: how many recent responses are kept for retried requests.
        admit: asked once, when the session's first ``hello`` succeeds: None lets the
            session in, a message refuses it (the ``hello`` is answered ``busy`` with it,
            and :attr:`refused` tells the edge to close the connection). A listener
            counts a connection against its limit only from here on.
    """

    handler: Handler
    max_frame: int = DEFAULT_MAX_FRAME
    remember: int = 16
    version: int | None = None
    corrupt_frames: int = 0
    admit: Callable[[], str | None] | None = None
    #: the session was let in by ``admit`` (always true without an ``admit``)
    admitted: bool = False
    #: the session's ``hello`` was refused by ``admit``: close once the answer is sent
    refused: bool = False
    #: complete frames received (good or not): a request arrived when it moves
    frames: int = 0
    _decoder: FrameDecoder = field(init=False)
    _recent: OrderedDict[int, bytes] = field(init=False, default_factory=OrderedDict)

    def __post_init__(self) -> None:
        self._decoder = FrameDecoder(self.max_frame)
        if self.admit is None:
            self.admitted = True

    @property
    def mid_frame(self) -> bool:
        """Part of a frame has arrived and its end has not (the edge times it)."""
        return self._decoder.in_frame

    def receive(self, data: bytes) -> list[bytes]:
        """Bytes from the link in; frames to send back out."""
        out: list[bytes] = []
        for ev in self._decoder.feed(data):
            self.frames += 1
            if self.refused:
                continue  # nothing more is answered on a refused session
            if not isinstance(ev, Frame):
                self.corrupt_frames += 1  # noise: the client's timeout and retry recover
                continue
            reply = self._answer(ev.payload)
            if reply is not None:
                out.append(reply)
        return out

    def _answer(self, payload: bytes) -> bytes | None:
        try:
            msg = decode_message(payload, self.max_frame)
        except MalformedError:
            self.corrupt_frames += 1
            return None
        if not speaks(msg.v):
            self.corrupt_frames += 1
            return None
        if not isinstance(msg, RpcRequest):
            return None  # an answer echoed back to us on a loop: ignore
        rid = msg.id
        cached = self._recent.get(rid)
        if cached is not None and msg.op != Op.HELLO:
            return cached
        if msg.op != Op.HELLO and self.version is None and isinstance(msg.op, str) \
                and isinstance(msg.args, dict):
            ans = RpcAnswer.refusal(rid, 2, "usage", "say hello first (version negotiation)")
        else:
            ans = answer(self.handler, msg, self.max_frame)
            if msg.op == Op.HELLO and ans.ok and not self.admitted:
                assert self.admit is not None
                why = self.admit()
                if why is not None:
                    self.refused = True
                    return encode_frame(RpcAnswer.refusal(rid, 1, "busy", why).encode())
                self.admitted = True
            if msg.op == Op.HELLO and ans.ok:
                self.version = int(ans.result["version"])
                self._recent.clear()  # a new client session: its IDs mean nothing from before
        frame = ans.encode_within(self.max_frame + MESSAGE_SLACK, "frame", encode_frame)
        self._recent[rid] = frame
        while len(self._recent) > self.remember:
            self._recent.popitem(last=False)
        return frame


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
            self.next_id = first_request_id()

    def start(self, op: str, args: Mapping[str, Any], now: float) -> tuple[int, bytes]:
        rid = self.next_id
        self.next_id = next_request_id(rid)
        frame = encode_frame(RpcRequest(rid, op, dict(args)).encode())
        if len(frame) > self.max_frame + MESSAGE_SLACK:
            raise MalformedError(f"request of {len(frame)} bytes exceeds the frame limit")
        self._pending[rid] = _Pending(frame, now + self.timeout, 1)
        return rid, frame

    def hello(self, now: float) -> tuple[int, bytes]:
        return self.start(Op.HELLO, hello_args(), now)

    def receive(self, data: bytes) -> list[RpcResult]:
        results: list[RpcResult] = []
        for ev in self._decoder.feed(data):
            if not isinstance(ev, Frame):
                self.corrupt_frames += 1
                continue
            try:
                msg = decode_message(ev.payload, self.max_frame)
            except MalformedError:
                self.corrupt_frames += 1
                continue
            if not speaks(msg.v):
                self.corrupt_frames += 1
                continue
            if not isinstance(msg, RpcAnswer) or msg.id not in self._pending:
                continue  # a late answer to an abandoned try, or our own echo
            del self._pending[msg.id]
            if msg.ok:
                results.append(RpcResult(msg.id, True, msg.result))
            else:
                results.append(RpcResult(msg.id, False, error=msg.value_error()))
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

    def abandon(self, rid: int) -> None:
        """Stop waiting for ``rid`` (its answer, if it comes, is ignored)."""
        self._pending.pop(rid, None)

    def next_deadline(self) -> float | None:
        return min((p.deadline for p in self._pending.values()), default=None)

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

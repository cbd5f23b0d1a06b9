"""The RPC layer: the operation table, the request and answer records, and how a request is answered.

Every link carries the same two CBOR messages (docs/protocol.md, "RPC messages")::

    request = {"v": 1, "id": uint, "op": tstr, "args": {* tstr => any}}
    answer  = {"v": 1, "id": uint, "ok": true,  "result": any}
            / {"v": 1, "id": uint, "ok": false, "error": {"code", "reason", "message"}}

They are built and parsed here and nowhere else. :data:`OPERATIONS` is the one
table of operations: each entry names the operation, the schema of its
arguments (read into a typed, frozen record before a handler sees them) and the
record type of its result; :func:`read_args` reads a request's arguments with
it. :func:`answer` turns a request and a handler into an answer for every link
(byte streams, the USB mailbox, MQTT and the simulators; HTTPS maps the same
handler onto routes). Adding an operation is one table entry plus its
implementation in :class:`agent.ops.AgentOps`.

Pure: no I/O, no clock. Links and sessions (retries, answer memory, hello per
connection) live in ``hw``.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from agent import protocol
from agent.cose import canonical, strict_loads
from agent.errors import LicensingError, MalformedError, UsageError
from agent.messages import Action
from agent.record import WireView, record

__all__ = [
    "OPERATIONS",
    "MESSAGE_SLACK",
    "OPS",
    "PROTOCOL_VERSIONS",
    "ApplyArgs",
    "ApplyResult",
    "CheckArgs",
    "FeatureCheck",
    "Handler",
    "HelloResult",
    "InfoResult",
    "JournalResult",
    "LicenseInfoResult",
    "NoArgs",
    "Op",
    "Operation",
    "RemoteError",
    "RequestArgs",
    "RequestResult",
    "RpcAnswer",
    "RpcError",
    "RpcRequest",
    "SeatCheckoutArgs",
    "SeatListArgs",
    "SeatListResult",
    "SeatResult",
    "SeatTokenArgs",
    "StatusResult",
    "TransferArgs",
    "TransferResult",
    "ApplyTransferResult",
    "TransportError",
    "answer",
    "for_origin",
    "decode_message",
    "first_request_id",
    "hello_args",
    "next_request_id",
    "read_args",
    "speaks",
    "wire",
]

PROTOCOL_VERSIONS = (1,)
MAX_ID = 2**32
#: how far an encoded message may exceed a link's payload limit (its CBOR envelope)
MESSAGE_SLACK = 1024
#: at most this many feature names in one create-request
MAX_FEATURES = 64


class Op(enum.StrEnum):
    HELLO = "hello"
    GET_INFO = "get-info"
    GET_STATUS = "get-status"
    GET_LICENSE_INFO = "get-license-info"
    CREATE_REQUEST = "create-request"
    APPLY_RESPONSE = "apply-response"
    CHECK_FEATURE = "check-feature"
    READ_JOURNAL = "read-journal"
    # issue 15: floating seats
    SEAT_CHECKOUT = "seat-checkout"
    SEAT_RENEW = "seat-renew"
    SEAT_RETURN = "seat-return"
    SEAT_LIST = "seat-list"
    # issue 14: the system tree
    RENEW_GRANTS = "renew-grants"
    RETURN_GRANTS = "return-grants"
    USE_FEATURE = "use-feature"
    GET_TREE = "get-tree"
    # issue 14 item 5: the workflow through the top server
    RELAY = "relay"
    # issue 16: direct transfer at the site between two live servers (licadmin transfer)
    TRANSFER = "transfer"
    APPLY_TRANSFER = "apply-transfer"


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


# ---------------------------------------------------------------- the messages


def speaks(v: object) -> bool:
    """Is ``v`` a protocol version this side speaks (an integer, never a boolean)?"""
    return type(v) is int and v in PROTOCOL_VERSIONS


def hello_args() -> dict[str, Any]:
    """The arguments of ``hello``: the versions this side speaks."""
    return {"versions": list(PROTOCOL_VERSIONS)}


def first_request_id() -> int:
    """A random first request ID (1 to 2^31), so that two sessions on one line rarely share IDs."""
    return int.from_bytes(os.urandom(4), "big") % (2**31) + 1


def next_request_id(rid: int) -> int:
    """The ID after ``rid``: one more, from 2^32 - 1 back to 1."""
    return rid % (MAX_ID - 1) + 1


@record(frozen=True)
class RpcRequest:
    """A request as it travels: ``op`` and ``args`` are checked by :func:`answer`, not here."""

    id: int
    op: Any
    args: Any
    v: Any = 1

    def encode(self) -> bytes:
        return canonical({"v": self.v, "id": self.id, "op": self.op, "args": dict(self.args)})


@record(frozen=True)
class RpcError:
    """The error object of a refused request: the exit code, a short reason, the message."""

    code: int
    reason: str
    message: str

    @classmethod
    def of(cls, err: LicensingError) -> RpcError:
        return cls(err.exit_code, err.reason, str(err))

    def to_wire(self) -> dict[str, Any]:
        """``{"code", "reason", "message"}``: every refusal on every link and in every API."""
        return {"code": self.code, "reason": self.reason, "message": self.message}

    @classmethod
    def from_wire(cls, e: object) -> RpcError:
        """Read a refusal leniently: a code outside 1 to 255 is 1, missing texts are generic."""
        m = e if isinstance(e, dict) else {}
        code = m.get("code")
        return cls(code if type(code) is int and 0 < code < 256 else 1,
                   str(m.get("reason", "remote")), str(m.get("message", "remote error")))

    def exception(self) -> RemoteError:
        return RemoteError(self.code, self.reason, self.message)


@record(frozen=True)
class RpcAnswer:
    """An answer to request ``id``: a result (``ok``), or an error."""

    id: int
    ok: bool
    result: Any = None
    error: RpcError | None = None
    v: Any = 1

    @classmethod
    def refusal(cls, rid: int, code: int, reason: str, message: str) -> RpcAnswer:
        return cls(rid, False, error=RpcError(code, reason, message))

    def encode(self) -> bytes:
        if self.ok:
            return canonical({"v": self.v, "id": self.id, "ok": True, "result": self.result})
        e = self.error or RpcError(1, "remote", "remote error")
        return canonical({"v": self.v, "id": self.id, "ok": False, "error": e.to_wire()})

    def encode_within(self, limit: int, what: str = "frame",
                      wrap: Callable[[bytes], bytes] = bytes) -> bytes:
        """``wrap(encode())``, or a ``too-large`` refusal when that exceeds ``limit`` bytes."""
        out = wrap(self.encode())
        if len(out) > limit:
            out = wrap(RpcAnswer.refusal(self.id, 1, "too-large",
                                         f"the answer is larger than the link's {what} limit"
                                         ).encode())
        return out

    def value_error(self) -> RemoteError:
        """The server's refusal as the exception a client raises."""
        return (self.error or RpcError(1, "remote", "remote error")).exception()

    def value(self) -> Any:
        """The result; the server's refusal raised as :class:`RemoteError`."""
        if not self.ok:
            raise self.value_error()
        return self.result


def decode_message(payload: bytes, max_size: int) -> RpcRequest | RpcAnswer:
    """Parse one RPC message (strict CBOR, size capped): a request if it has ``op``, else an answer.

    Any ``v`` is kept as it came (:func:`speaks` tells whether it is one this side speaks):
    :func:`answer` refuses the others with a ``version`` error, a stream session drops them.

    Raises:
        MalformedError: not CBOR, not a map, no valid ``id``, neither op nor ok.
    """
    msg = strict_loads(payload, max_size=max_size)
    if not isinstance(msg, dict):
        raise MalformedError("not an RPC message (a CBOR map)")
    v, rid = msg.get("v"), msg.get("id")
    if type(rid) is not int or not 0 <= rid < MAX_ID:
        raise MalformedError("not an RPC message (id must be a whole number)")
    if "op" in msg:
        return RpcRequest(rid, msg["op"], msg.get("args", {}), v)
    if "ok" not in msg:
        raise MalformedError("not an RPC message (neither op nor ok)")
    if msg["ok"] is True:
        return RpcAnswer(rid, True, msg.get("result"), v=v)
    return RpcAnswer(rid, False, error=RpcError.from_wire(msg.get("error")), v=v)


# ---------------------------------------------------------------- answering

#: ``handler(op, args) -> result``: raises LicensingError to refuse. The result is a
#: result record of :data:`OPERATIONS` (or, for test handlers, any CBOR-able value).
Handler = Callable[[str, Mapping[str, Any]], Any]


def for_origin(handler: Handler, origin: str) -> Handler:
    """``handler`` as it serves the requests of one peer, named by ``origin``.

    A listener calls this once per connection (or per HTTP request) with the link
    kind and the peer: ``"tcp 192.0.2.7"``, ``"tls cert CN=admin sha256:1f2e…"``. A
    handler that keeps requests per origin (:class:`agent.ops.AgentOps`) offers
    ``for_origin(origin)``; any other handler is returned as it is.
    """
    bind = getattr(handler, "for_origin", None)
    bound: Handler = bind(origin) if callable(bind) else handler
    return bound


def wire(result: Any) -> Any:
    """A result record as its wire map; any other value as it is."""
    to_wire = getattr(result, "to_wire", None)
    return to_wire() if callable(to_wire) else result


def answer(handler: Handler, request: RpcRequest, max_frame: int,
           log: Callable[[str], None] | None = None) -> RpcAnswer:
    """The answer to ``request``: version, op and args checked, the handler run once.

    ``hello`` negotiates the version (the highest both speak) and adds what the
    handler returns for it (the device ID and model). A LicensingError becomes an
    error answer with its exit code; any other exception an ``internal`` error
    (logged), so that one request never takes a link's thread down.
    """
    rid, op, args = request.id, request.op, request.args
    if not speaks(request.v):
        return RpcAnswer.refusal(rid, 2, "version", f"no common protocol version: server speaks "
                                 f"{list(PROTOCOL_VERSIONS)}, the request is v{request.v!r}")
    if not isinstance(op, str) or not isinstance(args, dict):
        return RpcAnswer.refusal(rid, 2, "usage", "op must be text and args a map")
    try:
        if op == Op.HELLO:
            offered = args.get("versions", [])
            common = [v for v in PROTOCOL_VERSIONS if isinstance(offered, list) and v in offered]
            if not common:
                return RpcAnswer.refusal(rid, 2, "version",
                                         f"no common protocol version: server speaks "
                                         f"{list(PROTOCOL_VERSIONS)}, client offered {offered!r}")
            extra = wire(handler(op, args)) or {}
            return RpcAnswer(rid, True, {"version": max(common), "max_frame": max_frame, **extra})
        if op not in OPS:
            return RpcAnswer.refusal(rid, 2, "usage", f"unknown operation {op!r}")
        return RpcAnswer(rid, True, wire(handler(op, args)))
    except LicensingError as err:
        return RpcAnswer(rid, False, error=RpcError.of(err))
    except Exception as exc:  # never let one request take the link's thread down
        if log is not None:
            log(f"{op} failed: {exc!r}")
        return RpcAnswer.refusal(rid, 1, "internal",
                                 f"internal error in the license agent: {exc!r}")


# ---------------------------------------------------------------- typed arguments


def _bytes_arg(args: Mapping[str, Any], name: str) -> bytes:
    v = args.get(name)
    if not isinstance(v, bytes):
        raise UsageError(f"argument {name!r} must be a byte string (the file's content)")
    return v


@record(frozen=True)
class NoArgs:
    """The arguments of an operation that takes none (any given are ignored)."""

    @classmethod
    def from_wire(cls, _args: Mapping[str, Any]) -> NoArgs:
        return cls()

    def to_wire(self) -> dict[str, Any]:
        return {}


@record(frozen=True)
class RequestArgs:
    """create-request: the action, features named directly, and license information to reclaim."""

    action: Action
    features: tuple[str, ...] = ()
    license_info: bytes | None = None
    #: issue 15: reclaim floating licenses even while seats are out (the receipt records them);
    #: issue 14: reclaim although child servers hold grants
    force: bool = False
    #: issue 16 (rehost): the device a reclaim moves the licenses to
    transfer_to: str | None = None

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> RequestArgs:
        try:
            action = Action(str(args.get("action")))
        except ValueError as exc:
            raise UsageError("action must be activate, reclaim, renew or clock") from exc
        f = args.get("features", [])
        if (not isinstance(f, list) or len(f) > MAX_FEATURES
                or not all(isinstance(x, str) for x in f)):
            raise UsageError("features must be a list of names")
        li = _bytes_arg(args, "license_info") if "license_info" in args else None
        force = args.get("force", False)
        if not isinstance(force, bool):
            raise UsageError("force must be true or false")
        to = args.get("transfer_to")  # issue 16
        if to is not None and not isinstance(to, str):
            raise UsageError("transfer_to must be a device ID")
        return cls(action, tuple(f), li, force, to)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action.value, "features": list(self.features)}
        if self.license_info is not None:
            out["license_info"] = self.license_info
        if self.force:
            out["force"] = True
        if self.transfer_to is not None:
            out["transfer_to"] = self.transfer_to
        return out


@record(frozen=True)
class ApplyArgs:
    """apply-response: the response file's exact bytes."""

    file: bytes

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> ApplyArgs:
        return cls(_bytes_arg(args, "file"))

    def to_wire(self) -> dict[str, Any]:
        return {"file": self.file}


@record(frozen=True)
class CheckArgs:
    """check-feature: the feature's name."""

    feature: str
    count: int = 1  # issue 14: units asked for (absent: 1)

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> CheckArgs:
        feature = args.get("feature")
        if not isinstance(feature, str):
            raise UsageError("feature must be a name")
        count = args.get("count", 1)
        if type(count) is not int or not 1 <= count < 2**32:
            raise UsageError("count must be a whole number from 1")
        return cls(feature, count)

    def to_wire(self) -> dict[str, Any]:
        if self.count != 1:
            return {"feature": self.feature, "count": self.count}
        return {"feature": self.feature}


# ---------------------------------------------------------------- typed results


def _need(m: object, types: Mapping[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise MalformedError(f"the {what} answer is not a map")
    for key, t in types.items():
        v = m.get(key)
        if not isinstance(v, t) or (isinstance(v, bool) and t is int):
            raise MalformedError(f"the {what} answer's {key!r} is missing or of the wrong type")
    return m


@record(frozen=True)
class HelloResult(WireView):
    KEYS: ClassVar[tuple[str, ...]] = ("version", "max_frame", "device_id", "model")
    version: int
    max_frame: int | None = None  # not said over https://
    device_id: str | None = None
    model: str | None = None

    @classmethod
    def from_wire(cls, m: object) -> HelloResult:
        d = _need(m, {"version": int}, "hello")
        mf, dev, model = d.get("max_frame"), d.get("device_id"), d.get("model")
        return cls(d["version"], mf if type(mf) is int else None,
                   dev if isinstance(dev, str) else None,
                   model if isinstance(model, str) else None)


@record(frozen=True)
class InfoResult(WireView):
    KEYS: ClassVar[tuple[str, ...]] = ("file", "device_id")
    file: bytes
    device_id: str

    @classmethod
    def from_wire(cls, m: object) -> InfoResult:
        d = _need(m, {"file": bytes, "device_id": str}, "get-info")
        return cls(d["file"], d["device_id"])


@record(frozen=True)
class StatusResult(WireView):
    """get-status: the JSON of ``licagent status --json`` (see agent.service.status_dict)."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "device_id", "model", "serial", "sequence", "state_digest", "licenses",
        "outstanding_requests", "trusted_keys", "clock_high_water", "clock_set_back", "warnings")
    device_id: str
    model: str
    serial: str | None
    sequence: int
    state_digest: str
    licenses: list[dict[str, Any]]
    outstanding_requests: list[dict[str, Any]]
    trusted_keys: list[dict[str, Any]]
    clock_high_water: str | None
    clock_set_back: bool
    warnings: list[str]

    @classmethod
    def from_wire(cls, m: object) -> StatusResult:
        d = _need(m, {"device_id": str, "model": str, "sequence": int, "state_digest": str,
                      "licenses": list, "outstanding_requests": list, "trusted_keys": list,
                      "clock_set_back": bool, "warnings": list}, "get-status")
        if not all(isinstance(x, dict) for k in ("licenses", "outstanding_requests",
                                                 "trusted_keys") for x in d[k]):
            raise MalformedError("the get-status answer's lists must hold maps")
        serial, hwm = d.get("serial"), d.get("clock_high_water")
        return cls(d["device_id"], d["model"], serial if isinstance(serial, str) else None,
                   d["sequence"], d["state_digest"], d["licenses"], d["outstanding_requests"],
                   d["trusted_keys"], hwm if isinstance(hwm, str) else None,
                   d["clock_set_back"], [str(w) for w in d["warnings"]])


@record(frozen=True)
class LicenseInfoResult(WireView):
    """get-license-info: what can be reclaimed here, and the state it sits on."""

    KEYS: ClassVar[tuple[str, ...]] = ("device_id", "sequence", "state_digest", "licenses")
    device_id: str
    sequence: int
    state_digest: bytes
    licenses: list[dict[str, Any]]

    @classmethod
    def from_wire(cls, m: object) -> LicenseInfoResult:
        d = _need(m, {"device_id": str, "sequence": int, "state_digest": bytes,
                      "licenses": list}, "get-license-info")
        return cls(d["device_id"], d["sequence"], d["state_digest"], d["licenses"])


@record(frozen=True)
class RequestResult(WireView):
    KEYS: ClassVar[tuple[str, ...]] = ("file",)
    file: bytes

    @classmethod
    def from_wire(cls, m: object) -> RequestResult:
        return cls(_need(m, {"file": bytes}, "create-request")["file"])


@record(frozen=True)
class ApplyResult(WireView):
    """apply-response: the receipt, and what the response did."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "receipt", "already_applied", "sequence", "base_sequence", "changes", "warning")
    receipt: bytes
    already_applied: bool
    sequence: int
    base_sequence: int
    changes: list[str]
    warning: str | None = None

    @classmethod
    def of(cls, res: protocol.ApplyResult, warning: str | None) -> ApplyResult:
        """What :meth:`agent.service.Agent.apply` did, as the operation's result."""
        return cls(res.receipt, res.already_applied, res.response.sequence,
                   res.response.base_sequence,
                   [f"{c.op.value} {c.feature}" for c in res.response.changes], warning)

    @classmethod
    def from_wire(cls, m: object) -> ApplyResult:
        d = _need(m, {"receipt": bytes, "already_applied": bool, "sequence": int,
                      "base_sequence": int, "changes": list}, "apply-response")
        warn = d.get("warning")
        return cls(d["receipt"], d["already_applied"], d["sequence"], d["base_sequence"],
                   [str(c) for c in d["changes"]], warn if isinstance(warn, str) else None)


@record(frozen=True)
class FeatureCheck(WireView):
    """check-feature: licensed or not, and why."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "feature", "licensed", "message", "in_grace", "clock_set_back")
    feature: str
    licensed: bool
    message: str
    in_grace: bool = False
    clock_set_back: bool = False

    @classmethod
    def from_wire(cls, m: object) -> FeatureCheck:
        d = _need(m, {"feature": str, "licensed": bool, "message": str}, "check-feature")
        return cls(d["feature"], d["licensed"], d["message"], d.get("in_grace") is True,
                   d.get("clock_set_back") is True)


@record(frozen=True)
class JournalResult(WireView):
    """read-journal: the verified entries, and the bytes of a torn last record."""

    KEYS: ClassVar[tuple[str, ...]] = ("entries", "torn_tail", "verified")
    entries: list[dict[str, Any]]
    torn_tail: int
    verified: bool

    @classmethod
    def from_wire(cls, m: object) -> JournalResult:
        d = _need(m, {"entries": list, "torn_tail": int, "verified": bool}, "read-journal")
        return cls(d["entries"], d["torn_tail"], d["verified"])


# ---------------------------------------------------------------- issue 15: floating seats


def _opt_uint(args: Mapping[str, Any], name: str) -> int | None:
    v = args.get(name)
    if v is None:
        return None
    if type(v) is not int or v < 0:
        raise UsageError(f"argument {name!r} must be a whole number of seconds")
    return v


@record(frozen=True)
class SeatCheckoutArgs:
    """seat-checkout: the feature, the client's name, a borrow period or a lease (seconds)."""

    feature: str
    client: str
    borrow_seconds: int | None = None
    lease_seconds: int | None = None

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> SeatCheckoutArgs:
        feature, client = args.get("feature"), args.get("client")
        if not isinstance(feature, str) or not isinstance(client, str):
            raise UsageError("feature and client must be names")
        return cls(feature, client, _opt_uint(args, "borrow_seconds"),
                   _opt_uint(args, "lease_seconds"))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"feature": self.feature, "client": self.client}
        if self.borrow_seconds is not None:
            out["borrow_seconds"] = self.borrow_seconds
        if self.lease_seconds is not None:
            out["lease_seconds"] = self.lease_seconds
        return out


@record(frozen=True)
class SeatTokenArgs:
    """seat-renew, seat-return: the seat token's exact bytes (and, to renew, a lease)."""

    token: bytes
    lease_seconds: int | None = None

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> SeatTokenArgs:
        return cls(_bytes_arg(args, "token"), _opt_uint(args, "lease_seconds"))

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"token": self.token}
        if self.lease_seconds is not None:
            out["lease_seconds"] = self.lease_seconds
        return out


@record(frozen=True)
class SeatResult(WireView):
    """seat-checkout, seat-renew, seat-return: the seat (times in POSIX seconds) and its token
    (signed by the serving agent; for a return, the token given back)."""

    KEYS: ClassVar[tuple[str, ...]] = (
        "token", "feature", "client", "since", "until", "borrowed")
    token: bytes
    feature: str
    client: str
    since: int
    until: int
    borrowed: bool

    @classmethod
    def from_wire(cls, m: object) -> SeatResult:
        d = _need(m, {"token": bytes, "feature": str, "client": str, "since": int,
                      "until": int, "borrowed": bool}, "seat")
        return cls(*(d[k] for k in cls.KEYS))


#: seats in one seat-list answer (about 100 bytes each: well within every link's frame)
SEAT_PAGE = 200


@record(frozen=True)
class SeatListArgs:
    """seat-list: from which seat on (the seats out are listed in pages of SEAT_PAGE)."""

    offset: int = 0

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> SeatListArgs:
        return cls(_opt_uint(args, "offset") or 0)

    def to_wire(self) -> dict[str, Any]:
        return {"offset": self.offset} if self.offset else {}


@record(frozen=True)
class SeatListResult(WireView):
    """seat-list: the seats out (each feature, client, since, until, borrowed) from the
    offset asked, at most SEAT_PAGE, the pools (each feature, count, out, free,
    next_free), and the offset of the next page (None on the last)."""

    KEYS: ClassVar[tuple[str, ...]] = ("seats", "pools", "next")
    seats: list[dict[str, Any]]
    pools: list[dict[str, Any]]
    next: int | None = None

    @classmethod
    def from_wire(cls, m: object) -> SeatListResult:
        d = _need(m, {"seats": list, "pools": list}, "seat-list")
        nxt = d.get("next")
        for s in d["seats"]:
            _need(s, {"feature": str, "client": str, "since": int, "until": int,
                      "borrowed": bool}, "seat-list seat")
        for p in d["pools"]:
            _need(p, {"feature": str, "count": int, "out": int, "free": int}, "seat-list pool")
        return cls(d["seats"], d["pools"], nxt if type(nxt) is int else None)


# ---------------------------------------------------------------- issue 14: the system tree


@record(frozen=True)
class RenewArgs:
    """renew-grants: a child's signed device information, where it listens, its report."""

    info: bytes
    url: str | None = None
    report: Mapping[str, Any] | None = None

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> RenewArgs:
        url, report = args.get("url"), args.get("report")
        if url is not None and (not isinstance(url, str) or len(url) > 512):
            raise UsageError("url must be a link URL")
        if report is not None and not isinstance(report, dict):
            raise UsageError("report must be a map")
        return cls(_bytes_arg(args, "info"), url, report)

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"info": self.info}
        if self.url is not None:
            out["url"] = self.url
        if self.report is not None:
            out["report"] = dict(self.report)
        return out


@record(frozen=True)
class RenewResult(WireView):
    """renew-grants: the parent, its level, the grants it gives now, those it recalls."""

    KEYS: ClassVar[tuple[str, ...]] = ("parent_info", "depth", "grants", "recalled", "refused")
    parent_info: bytes
    depth: int
    grants: list[bytes]
    recalled: list[str]
    refused: list[str]

    @classmethod
    def from_wire(cls, m: object) -> RenewResult:
        d = _need(m, {"parent_info": bytes, "depth": int, "grants": list, "recalled": list,
                      "refused": list}, "renew-grants")
        if not all(isinstance(g, bytes) for g in d["grants"]) or not all(
                isinstance(x, str) for x in (*d["recalled"], *d["refused"])):
            raise MalformedError("the renew-grants answer's lists are of the wrong type")
        return cls(d["parent_info"], d["depth"], d["grants"], d["recalled"], d["refused"])


@record(frozen=True)
class ReturnArgs:
    """return-grants: a child's signed grant return."""

    file: bytes

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> ReturnArgs:
        return cls(_bytes_arg(args, "file"))

    def to_wire(self) -> dict[str, Any]:
        return {"file": self.file}


@record(frozen=True)
class ReturnResult(WireView):
    KEYS: ClassVar[tuple[str, ...]] = ("features",)
    features: list[str]

    @classmethod
    def from_wire(cls, m: object) -> ReturnResult:
        return cls([str(f) for f in _need(m, {"features": list}, "return-grants")["features"]])


@record(frozen=True)
class UseArgs(WireView):
    """use-feature: the units of a feature the host application needs (also its result)."""

    KEYS: ClassVar[tuple[str, ...]] = ("feature", "count")
    feature: str
    count: int

    @classmethod
    def from_wire(cls, args: object) -> UseArgs:
        m = args if isinstance(args, dict) else {}
        feature, count = m.get("feature"), m.get("count")
        if not isinstance(feature, str) or type(count) is not int or count < 0:
            raise UsageError("use-feature takes a feature name and a count from 0")
        return cls(feature, count)


@record(frozen=True)
class TreeResult(WireView):
    """get-tree: this server's node, with its children's last reports under it."""

    KEYS: ClassVar[tuple[str, ...]] = ("device_id", "model", "serial", "parent", "depth",
                                       "features", "children")
    device_id: str
    model: str
    serial: str | None
    parent: str | None
    depth: int
    features: list[dict[str, Any]]
    children: list[dict[str, Any]]

    @classmethod
    def from_wire(cls, m: object) -> TreeResult:
        d = _need(m, {"device_id": str, "model": str, "depth": int, "features": list,
                      "children": list}, "get-tree")
        serial, parent = d.get("serial"), d.get("parent")
        return cls(d["device_id"], d["model"], serial if isinstance(serial, str) else None,
                   parent if isinstance(parent, str) else None, d["depth"], d["features"],
                   d["children"])


#: what a top server relays to a server under it (issue 14 item 5): the site steps only
RELAYED = frozenset({"hello", "get-info", "get-license-info", "create-request",
                     "apply-response", "get-tree"})


@record(frozen=True)
class RelayArgs:
    """relay (issue 14 item 5): run ``op`` on the server ``device_id`` under this one.

    The answer is the server's own, passed back unchanged: every file in it stays signed
    by the device it describes, so the relaying server can neither forge nor alter it.
    """

    device_id: str
    op: str
    args: Mapping[str, Any]

    @classmethod
    def from_wire(cls, args: Mapping[str, Any]) -> RelayArgs:
        dev, op, inner = args.get("device_id"), args.get("op"), args.get("args", {})
        if not isinstance(dev, str) or not isinstance(op, str) or not isinstance(inner, dict):
            raise UsageError("relay takes a device_id, an op and its args (a map)")
        if op not in RELAYED:
            raise UsageError(f"relay: {op} is not relayed (only {', '.join(sorted(RELAYED))})")
        return cls(dev, op, inner)

    def to_wire(self) -> dict[str, Any]:
        return {"device_id": self.device_id, "op": self.op, "args": dict(self.args)}


def _passed_on(m: object) -> object:
    return m


# ---------------------------------------------------------------- the operation table


@record(frozen=True)
class Operation:
    """One operation: its name, how its arguments are read, and its result's record type."""

    op: Op
    args: Callable[[Mapping[str, Any]], Any]
    result: Callable[[object], Any]


#: every operation a server offers over any link
@record(frozen=True)
class TransferArgs(WireView):
    """transfer (issue 16): the transferable features to move, and the new server's device ID."""

    KEYS: ClassVar[tuple[str, ...]] = ("features", "to")
    features: tuple[str, ...]
    to: str

    @classmethod
    def from_wire(cls, args: object) -> TransferArgs:
        m = args if isinstance(args, dict) else {}
        f, to = m.get("features"), m.get("to")
        if (not isinstance(f, list) or not 1 <= len(f) <= MAX_FEATURES
                or not all(isinstance(x, str) for x in f)):
            raise UsageError("features must be a list of 1 to "
                             f"{MAX_FEATURES} names")
        if not isinstance(to, str) or not to:
            raise UsageError("to must be the new server's device ID")
        return cls(tuple(f), to)

    def to_wire(self) -> dict[str, Any]:
        return {"features": list(self.features), "to": self.to}


@record(frozen=True)
class TransferResult(WireView):
    """transfer: the signed transfer file; ``already`` when it was made before (the same
    transfer asked again while it is the server's last receipt: nothing changed)."""

    KEYS: ClassVar[tuple[str, ...]] = ("file", "already")
    file: bytes
    already: bool

    @classmethod
    def from_wire(cls, m: object) -> TransferResult:
        d = _need(m, {"file": bytes, "already": bool}, "transfer")
        return cls(d["file"], d["already"])


@record(frozen=True)
class ApplyTransferResult(WireView):
    """apply-transfer: the signed transfer receipt, the old server, the features installed;
    ``already_applied`` when this transfer was applied here before and its receipt is
    still the server's last (the same receipt again, nothing changed)."""

    KEYS: ClassVar[tuple[str, ...]] = ("receipt", "already_applied", "from_device", "features")
    receipt: bytes
    already_applied: bool
    from_device: str
    features: list[str]

    @classmethod
    def from_wire(cls, m: object) -> ApplyTransferResult:
        d = _need(m, {"receipt": bytes, "already_applied": bool, "from_device": str,
                      "features": list}, "apply-transfer")
        return cls(d["receipt"], d["already_applied"], d["from_device"],
                   [str(x) for x in d["features"]])


OPERATIONS: Mapping[Op, Operation] = {o.op: o for o in (
    Operation(Op.HELLO, NoArgs.from_wire, HelloResult.from_wire),
    Operation(Op.GET_INFO, NoArgs.from_wire, InfoResult.from_wire),
    Operation(Op.GET_STATUS, NoArgs.from_wire, StatusResult.from_wire),
    Operation(Op.GET_LICENSE_INFO, NoArgs.from_wire, LicenseInfoResult.from_wire),
    Operation(Op.CREATE_REQUEST, RequestArgs.from_wire, RequestResult.from_wire),
    Operation(Op.APPLY_RESPONSE, ApplyArgs.from_wire, ApplyResult.from_wire),
    Operation(Op.CHECK_FEATURE, CheckArgs.from_wire, FeatureCheck.from_wire),
    Operation(Op.READ_JOURNAL, NoArgs.from_wire, JournalResult.from_wire),
    # issue 15: floating seats (agent.seats; records in agent.seat_rpc)
    Operation(Op.SEAT_CHECKOUT, SeatCheckoutArgs.from_wire, SeatResult.from_wire),
    Operation(Op.SEAT_RENEW, SeatTokenArgs.from_wire, SeatResult.from_wire),
    Operation(Op.SEAT_RETURN, SeatTokenArgs.from_wire, SeatResult.from_wire),
    Operation(Op.SEAT_LIST, SeatListArgs.from_wire, SeatListResult.from_wire),
    # issue 14: the system tree
    Operation(Op.RENEW_GRANTS, RenewArgs.from_wire, RenewResult.from_wire),
    Operation(Op.RETURN_GRANTS, ReturnArgs.from_wire, ReturnResult.from_wire),
    Operation(Op.USE_FEATURE, UseArgs.from_wire, UseArgs.from_wire),
    Operation(Op.GET_TREE, NoArgs.from_wire, TreeResult.from_wire),
    # issue 14 item 5: the answer is the relayed operation's own
    Operation(Op.RELAY, RelayArgs.from_wire, _passed_on),
    # issue 16: direct transfer between two live servers
    Operation(Op.TRANSFER, TransferArgs.from_wire, TransferResult.from_wire),
    Operation(Op.APPLY_TRANSFER, ApplyArgs.from_wire, ApplyTransferResult.from_wire),
)}


_BY_NAME: Mapping[str, Operation] = {o.value: OPERATIONS[o] for o in Op}


def read_args(op: str, args: Mapping[str, Any]) -> tuple[Op, Any]:
    """The operation named ``op`` and its arguments read with the table's schema.

    Raises:
        UsageError: an unknown operation, or an argument of the wrong type (exit 2).
    """
    entry = _BY_NAME.get(op)
    if entry is None:
        raise UsageError(f"unknown operation {op!r}")
    return entry.op, entry.args(args)

"""Attaching a server to its parent with a carried USB stick (issue 14 item 2): the two
signed files and their rules, without I/O.

An offline child cannot renew with its parent over a link. Instead the child signs an
*attach request* (its signed device information, its part of the tree, a fresh nonce);
the stick is carried to the parent, whose technician answers it: the parent runs the
renewal's rules (:func:`agent.inherit.issue_grants`) and signs an *attach answer* naming
the child, the exact request (its SHA-256), its own signed device information, its
level, the grants and the recalled features. The stick goes back and the child applies
the answer. The stick is not trusted: both files are COSE_Sign1 (docs/protocol.md
section 30); the child takes an answer only if it is signed by the parent whose device
information it carries, names this child and a request this child signed, is no older
than a day, and its request is newer than the child's last attach (a replayed answer
is refused).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from agent.cose import SigningKey, sign1, strict_loads
from agent.digest import sha256
from agent.errors import ExpiredError, MalformedError, TrustError, WrongDeviceError
from agent.messages import DeviceInfo, valid_device_id
from agent.protocol import read_signed, self_signed_payload
from agent.record import record
from agent.tree import SystemState

__all__ = [
    "ANSWER_CONTENT_TYPE",
    "ANSWER_MAX",
    "ANSWER_FRESH",
    "REQUEST_CONTENT_TYPE",
    "REQUEST_MAX",
    "AttachAnswer",
    "AttachRequest",
    "make_request",
    "read_answer",
    "read_request",
    "sign_answer",
]

REQUEST_CONTENT_TYPE = "application/vnd.bms-license.attach-request+cbor"
ANSWER_CONTENT_TYPE = "application/vnd.bms-license.attach-answer+cbor"
#: a request: the child's device information (at most 64 KiB) and a small report
REQUEST_MAX = 72 * 1024
#: an answer: the parent's device information and up to 256 grants of at most 72 KiB
#: each would be too much for a stick file read at once; a parent has few inheritable
#: licenses, so the answer is capped at 1 MiB
ANSWER_MAX = 1024 * 1024
#: the child refuses an answer made more than this from its clock (and the parent a
#: request whose device information is older: agent.inherit.INFO_FRESH)
ANSWER_FRESH = 86400
NONCE_LEN = 16
MAX_TIME = 2**40


def _map(data: bytes, what: str, cap: int) -> Mapping[str, Any]:
    m = strict_loads(data, max_size=cap)
    if not isinstance(m, dict) or not all(isinstance(k, str) for k in m):
        raise MalformedError(f"{what} must be a map with text keys")
    return m


def _keys(m: Mapping[str, Any], what: str, keys: Iterable[str], kind: str) -> None:
    want = set(keys)
    if set(m) != want:
        missing, extra = want - set(m), set(m) - want
        raise MalformedError(f"{what} " + (f"lacks {', '.join(sorted(missing))}" if missing
                                           else f"has unknown field {', '.join(sorted(extra))}"))
    if type(m["v"]) is not int or m["v"] != 1 or m["kind"] != kind:
        raise MalformedError(f"not a version 1 {what}")


def _uint(v: object, what: str, maximum: int = MAX_TIME) -> int:
    if type(v) is not int or not 0 <= v <= maximum:
        raise MalformedError(f"{what} must be an integer from 0 to {maximum}")
    return v


def _bytes(v: object, what: str, maximum: int, exact: int | None = None) -> bytes:
    if not isinstance(v, bytes) or len(v) > maximum or (exact is not None and len(v) != exact):
        raise MalformedError(f"{what} must be a byte string of "
                             + (f"{exact} bytes" if exact is not None else
                                f"at most {maximum} bytes"))
    return v


def _texts(v: object, what: str) -> tuple[str, ...]:
    if not isinstance(v, list) or len(v) > 256 or not all(
            isinstance(x, str) and len(x) <= 512 for x in v):
        raise MalformedError(f"{what} must be an array of at most 256 texts")
    return tuple(v)


@record(frozen=True)
class AttachRequest:
    """The child's signed ask: attach me and give me what I may inherit."""

    KIND: ClassVar[str] = "attach-request"
    child_id: str
    info: bytes  # the child's own signed device-information file
    report: Mapping[str, Any]  # its part of the tree (agent.service.Agent.tree_report)
    nonce: bytes
    created: int

    def encode(self) -> bytes:
        from agent.cose import canonical

        return canonical({"v": 1, "kind": self.KIND, "child_id": self.child_id,
                          "info": self.info, "report": dict(self.report),
                          "nonce": self.nonce, "created": self.created})

    @classmethod
    def decode(cls, payload: bytes) -> AttachRequest:
        m = _map(payload, "attach request", REQUEST_MAX)
        _keys(m, "attach request", ("v", "kind", "child_id", "info", "report", "nonce",
                                    "created"), cls.KIND)
        if not isinstance(m["report"], dict):
            raise MalformedError("an attach request's report must be a map")
        return cls(valid_device_id(m["child_id"], "child_id"),
                   _bytes(m["info"], "info", REQUEST_MAX), m["report"],
                   _bytes(m["nonce"], "nonce", NONCE_LEN, NONCE_LEN),
                   _uint(m["created"], "created"))


@record(frozen=True)
class AttachAnswer:
    """The parent's signed answer to one attach request."""

    KIND: ClassVar[str] = "attach-answer"
    parent_id: str
    child_id: str
    request: bytes  # SHA-256 of the exact attach-request file answered
    parent_info: bytes  # the parent's own signed device-information file
    depth: int  # the parent's level (0: the top)
    grants: tuple[bytes, ...]
    recalled: tuple[str, ...]
    refused: tuple[str, ...]
    created: int

    def encode(self) -> bytes:
        from agent.cose import canonical

        return canonical({"v": 1, "kind": self.KIND, "parent_id": self.parent_id,
                          "child_id": self.child_id, "request": self.request,
                          "parent_info": self.parent_info, "depth": self.depth,
                          "grants": list(self.grants), "recalled": list(self.recalled),
                          "refused": list(self.refused), "created": self.created})

    @classmethod
    def decode(cls, payload: bytes) -> AttachAnswer:
        m = _map(payload, "attach answer", ANSWER_MAX)
        _keys(m, "attach answer", ("v", "kind", "parent_id", "child_id", "request",
                                   "parent_info", "depth", "grants", "recalled", "refused",
                                   "created"), cls.KIND)
        grants = m["grants"]
        if not isinstance(grants, list) or len(grants) > 256:
            raise MalformedError("an attach answer's grants must be an array of at most 256")
        return cls(valid_device_id(m["parent_id"], "parent_id"),
                   valid_device_id(m["child_id"], "child_id"),
                   _bytes(m["request"], "request", 32, 32),
                   _bytes(m["parent_info"], "parent_info", REQUEST_MAX),
                   _uint(m["depth"], "depth", 2),
                   tuple(_bytes(g, "grant", ANSWER_MAX) for g in grants),
                   _texts(m["recalled"], "recalled"), _texts(m["refused"], "refused"),
                   _uint(m["created"], "created"))


def make_request(device_id: str, info: bytes, report: Mapping[str, Any], key: SigningKey,
                 now: int, nonce: bytes | None = None) -> bytes:
    """The child's signed attach request."""
    req = AttachRequest(device_id, info, dict(report), nonce or os.urandom(NONCE_LEN), now)
    return sign1(req.encode(), key, REQUEST_CONTENT_TYPE)


def _open(data: bytes, ctype: str, what: str, cap: int) -> Any:
    if len(data) > cap:
        raise MalformedError(f"{what} is larger than {cap} bytes")
    env = read_signed(data)
    if env.content_type != ctype:
        raise MalformedError(f"not an {what} (the header says {env.content_type!r})")
    return env


def read_request(data: bytes) -> tuple[AttachRequest, DeviceInfo]:
    """An attach request read on the parent: signed by the key of the device information it
    carries (itself signed by that key), for that device.

    Raises:
        MalformedError, TrustError: not a genuine attach request.
    """
    env = _open(data, REQUEST_CONTENT_TYPE, "attach request", REQUEST_MAX)
    req = AttachRequest.decode(env.payload)
    return req, _signer(env, req.info, req.child_id, "attach request", "device")


def _signer(env: Any, info_file: bytes, claimed: str, what: str, who: str) -> DeviceInfo:
    """The self-signed device information ``info_file`` that a carried file (``env``) holds:
    its ID must be ``claimed`` and its key must have signed ``env``.

    Raises:
        MalformedError, TrustError: it is not.
    """
    info, key = self_signed_payload(info_file, DeviceInfo)
    if info.device_id != claimed or env.kid != key.kid:
        raise TrustError(f"{what} is not signed by the {who} whose information it carries")
    env.verify_with(key)
    return info


def sign_answer(answer: AttachAnswer, key: SigningKey) -> bytes:
    return sign1(answer.encode(), key, ANSWER_CONTENT_TYPE)


def read_answer(data: bytes, request: bytes, device_id: str, system: SystemState,
                now: int) -> tuple[AttachAnswer, DeviceInfo]:
    """An attach answer checked on the child, before anything is recorded.

    ``request`` is the attach-request file the answer must name (the child's, from the
    stick: its own signature is checked here too).

    Raises:
        MalformedError, TrustError: not a genuine answer from the parent it names.
        WrongDeviceError: an answer for another child or another request.
        ExpiredError: the answer is more than a day from this server's clock, or its
            request is not newer than this server's last attach (a replay).
    """
    env = _open(data, ANSWER_CONTENT_TYPE, "attach answer", ANSWER_MAX)
    ans = AttachAnswer.decode(env.payload)
    parent = _signer(env, ans.parent_info, ans.parent_id, "attach answer", "parent")
    if ans.child_id != device_id:
        raise WrongDeviceError(f"attach answer is for device {ans.child_id[:12]}…, not this "
                               f"server ({device_id[:12]}…)")
    if ans.request != sha256(request):
        raise WrongDeviceError("attach answer answers another attach request than the one "
                               "on the stick (write a new request and carry the stick again)")
    req, _info = read_request(request)
    if req.child_id != device_id:
        raise WrongDeviceError("the attach request on the stick is not this server's")
    if abs(ans.created - now) > ANSWER_FRESH:
        raise ExpiredError(f"attach answer was made at {_iso(ans.created)}, more than a day "
                           f"from this server's clock ({_iso(now)}): write a new request")
    last = system.parent.attached if system.parent is not None else None
    if last is not None and req.created <= last:
        raise ExpiredError(f"attach answer is for a request made at {_iso(req.created)}, not "
                           f"after this server's last attach ({_iso(last)}): already applied, "
                           f"or replayed")
    return ans, parent


def _iso(t: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

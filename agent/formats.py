"""The files that travel outside the signed protocol core: one home and one decoder each.

The device, ``licadmin`` and the vendor side all read these formats through this
module, so they cannot disagree: the SITE_INFO bundle of step 1, device
information and receipts with their verification, peeking at a signed file's
payload for routing, and the size limit of each kind. Pure: bytes in, records out.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from functools import lru_cache
from typing import Any, TypeVar

import cbor2

from agent.cose import COSE_SIGN1_TAG, PublicKey, canonical, strict_loads
from agent.digest import sha256
from agent.errors import LicensingError, MalformedError, TrustError
from agent.messages import (
    ChangeOp,
    DeviceInfo,
    Kind,
    Payload,
    Receipt,
    Response,
    decode_payload,
    state_digest,
)
from agent.protocol import Limits, read_signed, self_signed_payload
from agent.record import record

__all__ = [
    "DEVICE_FILE_MAX",
    "LICENSE_INFO_MAX",
    "MAX_SITE_DEVICES",
    "RECEIPT_MAX",
    "SITE_INFO_MAX",
    "SiteInfo",
    "describe_kind",
    "expect_kind",
    "identify",
    "iso",
    "loads_json",
    "peek_payload",
    "read_device_info",
    "verify_receipt",
]

#: vendor-signed license information may list a whole site
LICENSE_INFO_MAX = 16 * 1024 * 1024
#: a site of a few thousand servers, each device information a few hundred bytes
SITE_INFO_MAX = 16 * 1024 * 1024
#: the largest single per-device file (a receipt carries its whole response)
DEVICE_FILE_MAX = 256 * 1024
RECEIPT_MAX = 256 * 1024
MAX_SITE_DEVICES = 100_000
MAX_SITE_NAME = 256

_P = TypeVar("_P", bound=Payload)


def iso(t: int | None) -> str | None:
    """POSIX seconds as ISO 8601 UTC (``2026-11-28T00:00:00Z``), None stays None."""
    if t is None:
        return None
    return _iso(t)


@lru_cache(maxsize=256)  # a status names the same few dates (its licenses' ends) each time
def _iso(t: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


#: what :func:`identify` names, beyond the signed kinds of :class:`agent.messages.Kind`
_KIND_TEXT = {
    "empty": "an empty file",
    "site-info": "a SITE_INFO bundle",
    "pem-public-key": "a PEM public key",
    "pem-private-key": "a PEM private key",
    "pem-encrypted-key": "an encrypted PEM private key",
    "pem-certificate": "a PEM certificate",
    "pem": "a PEM file of another kind",
    "signed": "a COSE-signed file of an unknown kind",
    "cbor": "CBOR data that is no file of this project",
    "json": "a JSON document",
    "text": "a text file",
    "binary": "binary data",
    **{k.value: f"a {k.value} file" for k in Kind},
    "toml": "a TOML file",
    "csv": "a CSV file",
}
_CONTENT_TYPES = {k.content_type: k.value for k in Kind}
# issue 14: the system tree's files (agent/inherit.py), named in refusals
_CONTENT_TYPES.update({f"application/vnd.bms-license.{k}+cbor": k
                       for k in ("grant", "grant-return",
                                 "attach-request", "attach-answer")})  # item 2: carried


def identify(data: bytes) -> str:
    """What ``data`` is, as a short name: a :class:`Kind` value (``request``, ``response``,
    ...), ``site-info``, ``pem-public-key``, ``pem-private-key``, ``pem-certificate``,
    ``pem``, ``signed``, ``cbor``, ``json``, ``text``, ``binary`` or ``empty``.

    For messages only ("FILE is a request file, expected a response file"): it
    verifies nothing and never raises; a file is accepted only by its own decoder.
    """
    if not data.strip():
        return "empty"
    head = data.lstrip()[:64]
    if head.startswith(b"-----BEGIN "):
        label = head[11:].split(b"-----", 1)[0]
        if label == b"PUBLIC KEY":
            return "pem-public-key"
        if label == b"ENCRYPTED PRIVATE KEY":
            return "pem-encrypted-key"
        if label.endswith(b"PRIVATE KEY"):
            return "pem-private-key"
        if label == b"CERTIFICATE":
            return "pem-certificate"
        return "pem"
    fast = _content_type_kind(data)
    if fast is not None:  # the protected header alone: no second decode of a large file
        return fast
    try:
        obj = strict_loads(data, max_size=LICENSE_INFO_MAX, allow_sign1_tag=True)
    except LicensingError:
        text = _text_kind(data)
        if text != "binary":
            return text
        try:  # a signed file with bytes appended is still named for what it is
            obj = strict_loads(data, max_size=LICENSE_INFO_MAX, allow_sign1_tag=True,
                               allow_trailing=True)
        except LicensingError:
            return "binary"
        if not (isinstance(obj, cbor2.CBORTag) and obj.tag == COSE_SIGN1_TAG):
            return "binary"
    if isinstance(obj, dict):
        return "site-info" if obj.get("kind") == "site-info" else "cbor"
    if not (isinstance(obj, cbor2.CBORTag) and obj.tag == COSE_SIGN1_TAG):
        text = _text_kind(data)  # "1" or "x" alone are also one CBOR item
        return "cbor" if text == "binary" else text
    return _signed_kind(obj.value)


def _content_type_kind(data: bytes) -> str | None:
    """The kind a COSE_Sign1 file's protected header names, read without decoding the rest."""
    if data[:2] != b"\xd2\x84" or len(data) < 4:
        return None
    first, pos = data[2], 3
    if first >> 5 != 2:  # the protected header is a byte string
        return None
    n = first & 0x1F
    if n == 24:
        n, pos = data[3], 4
    elif n == 25:
        n, pos = int.from_bytes(data[3:5]), 5
    elif n > 25:
        return None
    try:
        header = strict_loads(data[pos:pos + n], max_size=4096)
    except LicensingError:
        return None
    ctype = header.get(3) if isinstance(header, dict) else None
    return _CONTENT_TYPES.get(ctype) if isinstance(ctype, str) else None


def _signed_kind(v: object) -> str:
    if not isinstance(v, list | tuple) or len(v) != 4 or not isinstance(v[0], bytes):
        return "signed"
    try:
        header = strict_loads(v[0], max_size=4096) if v[0] else {}
    except LicensingError:
        header = {}
    ctype = header.get(3) if isinstance(header, dict) else None
    if isinstance(ctype, str) and ctype in _CONTENT_TYPES:
        return _CONTENT_TYPES[ctype]
    if isinstance(v[2], bytes):
        try:
            payload = strict_loads(v[2], max_size=LICENSE_INFO_MAX)
        except LicensingError:
            return "signed"
        kind = payload.get("kind") if isinstance(payload, dict) else None
        if isinstance(kind, str) and kind in {k.value for k in Kind}:
            return kind
    return "signed"


def _text_kind(data: bytes) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    if any(ord(c) < 32 and c not in "\t\r\n\f" for c in text[:4096]):
        return "binary"
    if text.lstrip()[:1] in ("{", "["):
        import json  # only to name a file in a refusal

        try:
            json.loads(text)
        except (ValueError, RecursionError):
            return "text"
        return "json"
    return "text"


def loads_json(data: bytes, name: str, expected: str = "a JSON document") -> Any:
    """Decode JSON from outside (a facts file, an HTTP body), as one of the project's errors.

    Refused: not UTF-8, not JSON, NaN or Infinity, and nesting so deep that the
    standard decoder runs out of recursion (its RecursionError is one of ours here).

    Raises:
        MalformedError: ``NAME is WHAT, expected EXPECTED: detail``.
    """
    def refuse(detail: str) -> MalformedError:
        return MalformedError(f"{name} is {describe_kind(identify(data))}, expected "
                              f"{expected}: {detail}")

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise refuse(f"not UTF-8 text at byte {exc.start}") from exc
    ok, obj = _scan_json(text)
    if ok:
        return obj
    import json  # the daemon's RPC is CBOR; JSON only at the tools' and HTTP's edges

    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise refuse(str(exc) or type(exc).__name__) from exc


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _ScanContext:
    """What ``json.JSONDecoder`` gives its C scanner, for ``json.loads(text, parse_constant=_no_constant)``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = staticmethod(_no_constant)


_JSON_SPACE = " \t\n\r"  # json.decoder.WHITESPACE


def _scan_json(text: str) -> tuple[bool, Any]:
    """``(True, json.loads(text, ...))`` by the json package's own C scanner, without importing
    the package, or ``(False, None)``: then :func:`json.loads` decides, with its own message.

    Importing ``json`` compiles six regular expressions and loads its encoder: about a
    twentieth of a ``licagent check`` process of a simulated server, which reads its facts
    file (issue 17 item 3). The scanner (``_json``, what ``json`` itself uses when present)
    parses the same way; everything but one well-formed document (a byte order mark, an
    error, NaN or Infinity, data after it) and a Python without the accelerator go to
    ``json.loads``, so what is accepted and every refusal's words are exactly its own.
    """
    try:
        from _json import make_scanner
    except ImportError:
        return False, None
    if text.startswith("\ufeff"):
        return False, None
    start = len(text) - len(text.lstrip(_JSON_SPACE))
    try:
        # typeshed types the context as the scanner itself: it reads the attributes above
        obj, end = make_scanner(_ScanContext())(text, start)  # type: ignore[arg-type]
    except Exception:  # StopIteration, a decode error, RecursionError: json.loads says which
        return False, None
    if text[end:].strip(_JSON_SPACE):
        return False, None
    return True, obj


def describe_kind(kind: str) -> str:
    """The words for an :func:`identify` name or an expected kind (``a request file``)."""
    return _KIND_TEXT.get(kind, kind)


def expect_kind(data: bytes, expected: str | Kind, name: str) -> None:
    """Refuse ``data`` at once when it is plainly another kind of file than ``expected``.

    ``name`` (the file's path, as the user gave it) starts the message:
    ``req.cbor is a request file, expected a response file``.

    Raises:
        MalformedError: what the file is, and what was expected.
    """
    want = str(expected.value if isinstance(expected, Kind) else expected)
    got = identify(data)
    if got == want or (got == "signed" and want in _CONTENT_TYPES.values()):
        return  # the file's own decoder says what is wrong with it, if anything
    extra = f" ({len(data)} bytes)" if got in ("binary", "cbor", "text") else ""
    raise MalformedError(f"{name} is {describe_kind(got)}{extra}, "
                         f"expected {describe_kind(want)}")


@record(frozen=True)
class SiteInfo:
    """Step 1's bundle: every gathered device-information file, and the servers that failed.

    A plain CBOR map, not signed as a whole: each device-information file inside
    keeps its device's own signature and is verified by whoever uses it.
    """

    site: str
    created: int
    devices: tuple[bytes, ...]
    failed: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        return canonical({
            "v": 1, "kind": "site-info", "site": self.site, "created": self.created,
            "devices": list(self.devices),
            "failed": [{"server": s, "error": e} for s, e in self.failed],
        })

    @classmethod
    def decode(cls, data: bytes) -> SiteInfo:
        """Parse a bundle (shape only: each device file is verified by whoever uses it).

        Raises:
            MalformedError: not a SITE_INFO bundle of version 1, or a field of the wrong type.
        """
        return cls.from_map(strict_loads(data, max_size=SITE_INFO_MAX))

    @classmethod
    def from_map(cls, m: object) -> SiteInfo:
        if not isinstance(m, dict) or m.get("kind") != "site-info":
            raise MalformedError("not a SITE_INFO bundle (a CBOR map with kind site-info)")
        if type(m.get("v")) is not int or m.get("v") != 1:
            raise MalformedError(f"unsupported SITE_INFO version {m.get('v')!r} (this reads 1)")
        extra = set(m) - {"v", "kind", "site", "created", "devices", "failed"}
        if extra:
            raise MalformedError(f"SITE_INFO has unknown field {', '.join(sorted(map(str, extra)))}")
        site, created, devices, failed = (m.get("site"), m.get("created"), m.get("devices"),
                                          m.get("failed", []))
        if not isinstance(site, str) or len(site) > MAX_SITE_NAME:
            raise MalformedError(f"SITE_INFO site must be text of at most {MAX_SITE_NAME} "
                                 f"characters")
        if type(created) is not int or created < 0:
            raise MalformedError("SITE_INFO created must be POSIX seconds")
        if (not isinstance(devices, list) or len(devices) > MAX_SITE_DEVICES
                or not all(isinstance(d, bytes) for d in devices)):
            raise MalformedError("SITE_INFO devices must be a list of device-information files")
        if not isinstance(failed, list) or not all(
                isinstance(f, dict) and isinstance(f.get("server"), str)
                and isinstance(f.get("error"), str) for f in failed):
            raise MalformedError("SITE_INFO failed must be a list of {server, error}")
        return cls(site, created, tuple(devices),
                   tuple((f["server"], f["error"]) for f in failed))


def read_device_info(data: bytes) -> DeviceInfo:
    """Check a device-information file's self-signature and decode it.

    Raises:
        MalformedError, TrustError: not a genuine device-information file.
    """
    payload, _key = self_signed_payload(data, DeviceInfo)
    return payload


def peek_payload(data: bytes, expect: type[_P], max_file: int = DEVICE_FILE_MAX
                 ) -> tuple[_P, bytes]:
    """Decode a signed file's payload WITHOUT verifying it; returns it and the signer's kid.

    For routing and display only: the server that receives the file verifies it.
    """
    env = read_signed(data, Limits(max_file=max_file))
    payload = decode_payload(strict_loads(env.payload, max_size=max_file), expect)
    return payload, env.kid


def verify_receipt(data: bytes, trusted: Iterable[PublicKey] = (), limits: Limits | None = None,
                   *, response: bytes | None = None) -> Receipt:
    """Accept a receipt only if it is genuine: THE receipt check of the project.

    ``licserver verify-receipt``, the licensing server's ledger (``POST /v1/receipts``
    and receipts riding along ``POST /v1/requests``), ``licadmin show --trust``, and
    ``licadmin send`` / ``apply`` on the receipt a server returns all call this, so
    a receipt written by ``licagent apply --receipt-out`` and one written by
    ``licadmin send`` are judged the same way, with the same messages.

    Genuine means: signed by the device key it carries (whose SHA-256 is the
    device ID), answering a response file that one of ``trusted`` vendor keys
    really signed (or, for a tool that holds no vendor key, that is exactly the
    ``response`` file it sent), for that same device, and consistent with that
    response.

    Args:
        trusted: vendor public keys; the response inside must verify with one of them.
        response: the exact response file the receipt must carry, when the caller
            knows what was applied but holds no vendor key (``licadmin send``);
            its signature is then the device's business, checked when it applied it.

    Raises:
        MalformedError, TrustError: with the reason.
    """
    lim = limits or Limits(max_file=RECEIPT_MAX)
    rc, _key = self_signed_payload(data, Receipt, lim)
    env = read_signed(rc.response, lim)
    keys = {k.kid: k for k in trusted}
    if response is not None and rc.response != response:
        raise TrustError("the receipt does not carry the response file that was sent")
    if response is not None and not keys:
        signed = env.payload  # the exact file the caller sent; the device verified its signature
    else:
        vk = keys.get(env.kid)
        if vk is None:
            raise TrustError(
                "the response inside the receipt was not signed by a trusted vendor key")
        signed = env.verify_with(vk)
    resp = decode_payload(strict_loads(signed, max_size=lim.max_file), Response)
    if sha256(rc.response) != rc.response_digest:
        raise TrustError("receipt's response digest does not match the response it carries")
    if resp.device_id != rc.device_id:
        raise TrustError(
            f"receipt is signed by device {rc.device_id[:12]}…, but the response was issued to "
            f"{resp.device_id[:12]}…"
        )
    if rc.sequence != resp.sequence:
        raise TrustError("receipt's sequence is not the one the response set")
    if tuple(rc.applied) != tuple(resp.changes):
        raise TrustError("receipt's applied changes differ from the response's")
    removed = {c.feature for c in resp.changes if c.op is ChangeOp.REMOVE}
    if {lic.feature for lic in rc.removed} != removed:
        raise TrustError("receipt does not prove the removals the response asked for")
    if any(lic.feature in removed for lic in rc.licenses):
        raise TrustError("receipt still lists a reclaimed license as installed")
    if state_digest(rc.licenses) != rc.state_digest:
        raise TrustError("receipt's license list does not match its state digest")
    return rc

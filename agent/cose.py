"""Minimal COSE_Sign1 (RFC 9052) with Ed25519 and ES256, on cbor2 and cryptography only.

Strict CBOR decoding lives here too: every byte string from outside goes
through :func:`strict_loads`, which caps size, depth, refuses indefinite
lengths, duplicate map keys and every semantic tag (no regex, no bignums,
no shared values).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import cached_property
from io import BytesIO
from typing import TYPE_CHECKING, Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from agent.record import record

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric import ec

# ECDSA and the serialization module (which drags in SSH, RSA, DSA and cipher code) are
# imported only when a P-256 key or a PEM conversion is actually used: the daemon on an
# Ed25519 device never pays for them (about 1.5 MB of resident memory).

from agent.digest import sha256
from agent.errors import MalformedError, TrustError

__all__ = [
    "ALG_EDDSA",
    "ALG_ES256",
    "COSE_SIGN1_TAG",
    "Encoded",
    "PublicKey",
    "SigningKey",
    "Sign1",
    "canonical",
    "jsonable",
    "decode_sign1",
    "sign1",
    "strict_loads",
]

COSE_SIGN1_TAG = 18
ALG_EDDSA = -8
ALG_ES256 = -7
ALG_NAMES = {ALG_EDDSA: "EdDSA", ALG_ES256: "ES256"}

# COSE header labels
HDR_ALG = 1
HDR_CONTENT_TYPE = 3
HDR_KID = 4
HDR_CRIT = 2

#: CBOR nesting allowed in any file (our deepest legitimate file nests 6 levels)
MAX_DEPTH = 16


def _reject_tag(decoder: Any) -> Any:
    raise ValueError("semantic tags are not allowed here")


# cbor2 decodes these tags into Python objects (datetimes, bignums, regular
# expressions, shared references...). None is legitimate in our files.
_SEMANTIC = {t: _reject_tag for t in (*range(0, 64), 256, 258, 260, 261, 262, 263, 270, 1004,
                                       55799)}


def _tag_of(args: tuple[Any, ...]) -> cbor2.CBORTag:
    # cbor2 5.x calls tag_hook(decoder, tag); 6.x calls tag_hook(tag, immutable)
    for a in args:
        if isinstance(a, cbor2.CBORTag):
            return a
    raise ValueError("tag hook called without a tag")


def _tag_hook_reject(*args: Any) -> Any:
    raise ValueError(f"CBOR tag {_tag_of(args).tag} is not allowed here")


def _tag_hook_sign1(*args: Any) -> Any:
    tag = _tag_of(args)
    if tag.tag != COSE_SIGN1_TAG:
        raise ValueError(f"CBOR tag {tag.tag} is not allowed here")
    return tag


#: the decoder tables, built once (not on every call): every tag refused, or all but Sign1
_SEMANTIC_SIGN1 = {t: f for t, f in _SEMANTIC.items() if t != COSE_SIGN1_TAG}


def strict_loads(
    data: bytes, *, max_size: int, allow_sign1_tag: bool = False, allow_trailing: bool = False
) -> Any:
    """Decode one CBOR item from ``data`` with every safety limit on.

    Raises:
        MalformedError: too large, not well-formed, trailing bytes, or uses a
            feature this project refuses.
    """
    if len(data) > max_size:
        raise MalformedError(f"input is {len(data)} bytes, larger than the {max_size}-byte limit")
    # loads() ignores trailing bytes, so decode through a stream and check the end.
    fp = BytesIO(data)
    try:
        dec = cbor2.CBORDecoder(
            fp,
            tag_hook=_tag_hook_sign1 if allow_sign1_tag else _tag_hook_reject,
            semantic_decoders=_SEMANTIC_SIGN1 if allow_sign1_tag else _SEMANTIC,
            max_depth=MAX_DEPTH,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            strict_hashable_types=False,
        )
        obj = dec.decode()
    except cbor2.CBORDecodeError as exc:
        raise MalformedError(f"not well-formed CBOR: {exc}") from exc
    except (RecursionError, MemoryError, OverflowError) as exc:
        raise MalformedError(f"CBOR rejected: {type(exc).__name__}") from exc
    if fp.tell() != len(data) and not allow_trailing:
        raise MalformedError(f"{len(data) - fp.tell()} trailing bytes after the CBOR item")
    return obj


class Encoded:
    """An item already in canonical CBOR, written as it is by :func:`canonical`.

    Deterministic encoding is compositional (a map's or an array's encoding is its
    head and its items' encodings), so an immutable part encoded once (a license)
    gives the same bytes inside any larger item as encoding it again would.
    """

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def _write_encoded(encoder: Any, value: Any) -> None:
    if type(value) is not Encoded:
        raise cbor2.CBOREncodeError(f"cannot serialize type {type(value).__name__}")
    encoder.write(value.data)


def encoded_array(items: Iterable[Encoded]) -> Encoded:
    """An array of items already encoded, as one :class:`Encoded` (the array's head and
    the items' bytes: what :func:`canonical` writes for the list, without a call per item)."""
    parts = [x.data for x in items]
    n = len(parts)
    if n < 24:
        return Encoded(_ARRAY_HEADS[n] + b"".join(parts))
    head = bytearray(canonical(n))  # major type 0 (uint) ...
    head[0] |= 0x80  # ... made major type 4 (array), same length encoding
    return Encoded(bytes(head) + b"".join(parts))


#: the one-byte heads of arrays of 0 to 23 items
_ARRAY_HEADS = tuple(bytes([0x80 + n]) for n in range(24))


def canonical(obj: object) -> bytes:
    """Deterministic CBOR encoding (RFC 8949 core deterministic: sorted keys, shortest forms).

    cbor2's canonical mode sorts every map by encoding its keys each time (a third of
    an apply's encoding time). Maps with text keys only, of text, byte strings,
    integers, booleans, None, :class:`Encoded` and arrays and maps of these, are put in
    canonical key order here (each set of keys sorted once) and written by cbor2's
    plain mode, whose heads are the shortest forms too: the same bytes. Anything else
    (a float, a set, a tag, an integer key) goes through the canonical mode as a whole.
    """
    try:
        ready = _in_key_order(obj)
    except (_NotPlain, RecursionError):
        return cbor2.dumps(obj, canonical=True, default=_write_encoded)
    return cbor2.dumps(ready, default=_write_encoded)


class _NotPlain(Exception):
    """An item :func:`canonical` leaves to cbor2's canonical mode."""


#: the types cbor2 writes alike in its canonical and its plain mode (shortest heads in both)
_PLAIN = frozenset({str, bytes, int, bool, type(None), Encoded})
#: a map's keys (in the order given) -> the same keys in canonical order; bounded
_KEY_ORDERS: dict[tuple[str, ...], tuple[str, ...]] = {}
_MAX_KEY_ORDERS = 512


def _key_rank(key: str) -> tuple[int, bytes]:
    # RFC 8949 4.2.1: bytewise order of the encoded keys; for text keys the head grows with
    # the length, so that is by UTF-8 length, then bytewise
    b = key.encode()
    return len(b), b


def _in_key_order(v: Any) -> Any:
    """``v`` with every map's keys in canonical order (raises :class:`_NotPlain` if it holds
    anything cbor2 writes differently in its canonical mode)."""
    t = type(v)
    if t is dict:
        keys = tuple(v)
        order = _KEY_ORDERS.get(keys)
        if order is None:
            for k in keys:
                if type(k) is not str:
                    raise _NotPlain
            order = tuple(sorted(keys, key=_key_rank))
            if len(_KEY_ORDERS) < _MAX_KEY_ORDERS:
                _KEY_ORDERS[keys] = order
        plain = _PLAIN
        return {k: x if type(x := v[k]) in plain else _in_key_order(x) for k in order}
    if t is list or t is tuple:
        plain = _PLAIN
        for x in v:
            if type(x) not in plain:
                return [x if type(x) in plain else _in_key_order(x) for x in v]
        return v
    if t in _PLAIN:
        return v
    raise _NotPlain


def jsonable(v: Any) -> Any:
    """A decoded CBOR value as JSON can carry it: byte strings as hex, map keys as text."""
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [jsonable(x) for x in v]
    return v


@record(frozen=True)
class PublicKey:
    """A verification key: algorithm plus raw public key bytes.

    Raw means the 32-byte Ed25519 key, or the 65-byte uncompressed P-256 point.
    ``kid`` is the SHA-256 of the raw bytes, so the device ID (its hex form) and
    the COSE key ID of a device key are the same thing.
    """

    alg: int
    raw: bytes

    def __post_init__(self) -> None:
        if self.alg == ALG_EDDSA:
            if len(self.raw) != 32:
                raise MalformedError("an Ed25519 public key is 32 bytes")
        elif self.alg == ALG_ES256:
            if len(self.raw) != 65 or self.raw[0] != 4:
                raise MalformedError("a P-256 public key is a 65-byte uncompressed point")
        else:
            raise MalformedError(f"unsupported COSE algorithm {self.alg}")

    @cached_property
    def kid(self) -> bytes:
        return sha256(self.raw)

    @cached_property
    def _ed25519(self) -> ed25519.Ed25519PublicKey:
        """The key as loaded by cryptography, once (a kept state verifies with it often)."""
        return ed25519.Ed25519PublicKey.from_public_bytes(self.raw)

    @property
    def alg_name(self) -> str:
        return ALG_NAMES[self.alg]

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raise :class:`TrustError` unless ``signature`` is valid over ``message``."""
        try:
            if self.alg == ALG_EDDSA:
                self._ed25519.verify(signature, message)
            else:
                if len(signature) != 64:
                    raise TrustError("ES256 signature must be 64 bytes (r || s)")
                from cryptography.hazmat.primitives import hashes
                from cryptography.hazmat.primitives.asymmetric import ec
                from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

                r = int.from_bytes(signature[:32], "big")
                s = int.from_bytes(signature[32:], "big")
                pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.raw)
                pub.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise TrustError("signature does not verify") from exc
        except ValueError as exc:  # invalid point encoding
            raise TrustError(f"public key unusable: {exc}") from exc

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
        if self.alg == ALG_EDDSA:
            key = ed25519.Ed25519PublicKey.from_public_bytes(self.raw)
        else:
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), self.raw)
        return key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        from cryptography.exceptions import InternalError, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise MalformedError(f"not a PEM public key: {exc}") from exc
        except UnsupportedAlgorithm as exc:  # an algorithm OID OpenSSL does not know
            raise MalformedError(f"a PEM public key of an unsupported kind: {exc}") from exc
        except InternalError as exc:  # OpenSSL refused the key material itself
            raise MalformedError("a PEM public key whose key material OpenSSL refuses") from exc
        if isinstance(key, ed25519.Ed25519PublicKey):
            return cls(ALG_EDDSA, key.public_bytes_raw())
        if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            return cls(
                ALG_ES256,
                key.public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                ),
            )
        raise MalformedError("only Ed25519 and P-256 public keys are supported")


#: DER of PKCS#8 PrivateKeyInfo for Ed25519 up to the 32 key bytes (RFC 8410)
ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


def _ed25519_pkcs8_raw(pem: bytes) -> bytes | None:
    """The 32 key bytes of an unencrypted Ed25519 PKCS#8 PEM, or None if it is not one."""
    import binascii

    lines = pem.strip().splitlines()
    if len(lines) < 3 or lines[0] != b"-----BEGIN PRIVATE KEY-----" or (
            lines[-1] != b"-----END PRIVATE KEY-----"):
        return None
    try:
        der = binascii.a2b_base64(b"".join(lines[1:-1]))
    except binascii.Error:
        return None
    if len(der) != 48 or not der.startswith(ED25519_PKCS8_PREFIX):
        return None
    return der[16:]


class SigningKey:
    """A private key that signs COSE_Sign1 messages."""

    def __init__(self, key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> None:
        self._key = key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            self.public = PublicKey(ALG_EDDSA, key.public_key().public_bytes_raw())
        else:
            from cryptography.hazmat.primitives import serialization
            from cryptography.hazmat.primitives.asymmetric import ec

            if not isinstance(key.curve, ec.SECP256R1):
                raise MalformedError("only P-256 ECDSA keys are supported")
            self.public = PublicKey(
                ALG_ES256,
                key.public_key().public_bytes(
                    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
                ),
            )

    @classmethod
    def generate(cls, alg: int = ALG_EDDSA) -> SigningKey:
        if alg == ALG_EDDSA:
            return cls(ed25519.Ed25519PrivateKey.generate())
        if alg == ALG_ES256:
            from cryptography.hazmat.primitives.asymmetric import ec

            return cls(ec.generate_private_key(ec.SECP256R1()))
        raise MalformedError(f"unsupported COSE algorithm {alg}")

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        raw = _ed25519_pkcs8_raw(data)
        if raw is not None:  # the common case, without the serialization module
            return cls(ed25519.Ed25519PrivateKey.from_private_bytes(raw))
        from cryptography.exceptions import InternalError, UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise MalformedError(f"not an unencrypted PEM private key: {exc}") from exc
        except UnsupportedAlgorithm as exc:  # an algorithm OID OpenSSL does not know
            raise MalformedError(f"a PEM private key of an unsupported kind: {exc}") from exc
        except InternalError as exc:  # OpenSSL refused the key material itself
            raise MalformedError("a PEM private key whose key material OpenSSL refuses") from exc
        if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            return cls(key)
        raise MalformedError("only Ed25519 and P-256 private keys are supported")

    def to_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def secret_digest(self, label: bytes) -> bytes:
        """A key derived from the private key for ``label`` (used for the store MAC)."""
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            raw = ED25519_PKCS8_PREFIX + self._key.private_bytes_raw()  # = its PKCS#8 DER
        else:
            from cryptography.hazmat.primitives import serialization

            raw = self._key.private_bytes(
                serialization.Encoding.DER,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        return sha256(b"licagent-derive\x00" + label + b"\x00" + raw)

    def protected_header(self, content_type: str) -> bytes:
        """The protected header of a COSE_Sign1 this key signs: ``alg`` (1), ``content type``
        (3) and ``kid`` (4), in canonical CBOR; encoded once per content type."""
        headers: dict[str, bytes] = self.__dict__.setdefault("_protected", {})
        got = headers.get(content_type)
        if got is None:
            got = headers[content_type] = canonical(
                {HDR_ALG: self.public.alg, HDR_CONTENT_TYPE: content_type,
                 HDR_KID: self.public.kid})
        return got

    def sign(self, message: bytes) -> bytes:
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(message)
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        der = self._key.sign(message, ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _bstr_head(n: int) -> bytes:
    """The shortest head of a CBOR byte string of ``n`` bytes (major type 2)."""
    if n < 24:
        return _BSTR_HEADS[n]
    if n < 0x100:
        return bytes((0x58, n))
    if n < 0x10000:
        return b"\x59" + n.to_bytes(2, "big")
    if n < 0x100000000:
        return b"\x5a" + n.to_bytes(4, "big")
    return b"\x5b" + n.to_bytes(8, "big")


_BSTR_HEADS = tuple(bytes((0x40 + n,)) for n in range(24))
#: an array of four, then the text "Signature1" (RFC 9052 section 4.4)
_SIG_STRUCTURE_HEAD = b"\x84\x6aSignature1"
#: tag 18 (COSE_Sign1), then an array of four
_SIGN1_HEAD = b"\xd2\x84"


def _sig_structure(protected: bytes, payload: bytes) -> bytes:
    """``cbor2.dumps(["Signature1", protected, b"", payload])``, written out (the heads in
    their shortest forms, as cbor2 writes them): the payload copied once, not twice."""
    return b"".join((_SIG_STRUCTURE_HEAD, _bstr_head(len(protected)), protected, b"\x40",
                     _bstr_head(len(payload)), payload))


def sign1(payload: bytes, key: SigningKey, content_type: str) -> bytes:
    """Wrap ``payload`` in a tagged COSE_Sign1 signed by ``key``.

    The protected header carries ``alg`` (1), ``content type`` (3) and ``kid`` (4).
    The envelope is ``cbor2.dumps(CBORTag(18, [protected, {}, payload, signature]))``
    written out: the shortest-form encoding :func:`decode_sign1` requires.
    """
    protected = key.protected_header(content_type)
    signature = key.sign(_sig_structure(protected, payload))
    return b"".join((_SIGN1_HEAD, _bstr_head(len(protected)), protected, b"\xa0",
                     _bstr_head(len(payload)), payload, _bstr_head(len(signature)), signature))


@record(frozen=True)
class Sign1:
    """A decoded but not yet verified COSE_Sign1 envelope.

    ``payload`` is the exact byte string that was signed; nothing is re-encoded.
    """

    protected_raw: bytes
    alg: int
    kid: bytes
    content_type: str | None
    payload: bytes
    signature: bytes

    def verify_with(self, key: PublicKey) -> bytes:
        """Verify against ``key`` and return the signed payload bytes."""
        if key.alg != self.alg:
            raise TrustError(
                f"file is signed with {ALG_NAMES.get(self.alg, self.alg)} but the key "
                f"is {key.alg_name}"
            )
        key.verify(self.signature, _sig_structure(self.protected_raw, self.payload))
        return self.payload

    def verify(self, lookup: Callable[[bytes], PublicKey]) -> tuple[PublicKey, bytes]:
        """Find the key for this message's kid with ``lookup`` and verify."""
        key = lookup(self.kid)
        return key, self.verify_with(key)


def decode_sign1(data: bytes, *, max_size: int) -> Sign1:
    """Parse the COSE_Sign1 envelope of ``data`` (size-capped, strict), without verifying.

    Only the envelope and the small protected header are decoded here; the
    payload stays an opaque byte string until its signature has been checked.
    """
    obj = strict_loads(data, max_size=max_size, allow_sign1_tag=True)
    if not isinstance(obj, cbor2.CBORTag) or obj.tag != COSE_SIGN1_TAG:
        raise MalformedError("not a tagged COSE_Sign1 message (CBOR tag 18)")
    v = obj.value
    if not isinstance(v, list | tuple) or len(v) != 4:
        raise MalformedError("COSE_Sign1 must be an array of 4 items")
    protected_raw, unprotected, payload, signature = v
    if not isinstance(protected_raw, bytes) or not isinstance(unprotected, Mapping):
        raise MalformedError("COSE_Sign1 headers have the wrong types")
    if not isinstance(payload, bytes):
        raise MalformedError("COSE_Sign1 payload must be attached (a byte string)")
    if not isinstance(signature, bytes):
        raise MalformedError("COSE_Sign1 signature must be a byte string")
    # The envelope itself is not signed: accept only its shortest-form encoding, so a
    # signed message has exactly one file (a re-encoded copy would dodge replay checks).
    try:
        reencoded = cbor2.dumps(obj)
    except (cbor2.CBOREncodeError, ValueError, TypeError) as exc:
        raise MalformedError(f"COSE_Sign1 envelope cannot be re-encoded: {exc}") from exc
    if reencoded != data:
        raise MalformedError("COSE_Sign1 envelope is not in shortest-form CBOR encoding")
    protected = strict_loads(protected_raw, max_size=1024) if protected_raw else {}
    if not isinstance(protected, dict):
        raise MalformedError("protected header must be a map")
    if any(k in unprotected for k in (HDR_ALG, HDR_KID, HDR_CONTENT_TYPE)):
        raise MalformedError("alg, kid and content type must be in the protected header only")
    if unprotected:
        raise MalformedError("the unprotected header must be empty in this project's files")
    if HDR_CRIT in protected:
        raise MalformedError("critical header parameters (crit) are not supported")
    alg = protected.get(HDR_ALG)
    kid = protected.get(HDR_KID)
    ctype = protected.get(HDR_CONTENT_TYPE)
    # type check first: an array or map as alg is unhashable, and -8.0 == -8
    if type(alg) is not int or alg not in ALG_NAMES:
        raise TrustError(f"unsupported or missing COSE algorithm {alg!r} (EdDSA or ES256 only)")
    if not isinstance(kid, bytes) or not 1 <= len(kid) <= 64:
        raise MalformedError("protected header has no usable kid")
    if ctype is not None and not isinstance(ctype, str | int):
        raise MalformedError("content type must be text or an integer")
    return Sign1(
        protected_raw=protected_raw,
        alg=alg,
        kid=kid,
        content_type=ctype if isinstance(ctype, str) else None,
        payload=payload,
        signature=signature,
    )

"""COSE_Sign1 verify/sign with python-cwt, for the interoperability tests.

Runs in the separate ``.venv-cwt`` environment (python-cwt 3.3.0 needs
cbor2 < 6, the project needs cbor2 6.x), so it imports only cwt, cbor2,
cryptography and the standard library, never the project's own modules:
the point is a second, independent COSE implementation.

Usage::

    cwt_tool.py verify FILE PUBKEY_PEM
        Verify a COSE_Sign1 with cwt.COSE.decode_with_headers and a key from
        COSEKey.from_pem. The key's kid is computed independently as the
        SHA-256 of the raw public key (32-byte Ed25519 key or 65-byte
        uncompressed P-256 point), which is the project's kid convention:
        cwt only tries keys whose kid equals the message's kid. Prints one
        JSON object (payload hex, alg, kid hex, content type, unprotected
        header labels) and exits 0; exits 1 if decoding or verification fails.

    cwt_tool.py sign PAYLOAD_FILE PRIVKEY_PEM KID_HEX ALG OUT [CONTENT_TYPE] [--auto-headers]
        Write a tagged COSE_Sign1 over the bytes of PAYLOAD_FILE to OUT. ALG is
        EdDSA, ES256 or the integer label. By default alg (1), content type (3)
        and kid (4) are passed explicitly in the PROTECTED header with cwt's
        auto inclusion off. ``--auto-headers`` instead uses cwt's
        alg_auto_inclusion/kid_auto_inclusion, which puts the kid in the
        unprotected header (the project refuses such files).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import cbor2
import cwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cwt import COSEKey

ALGS = {"EdDSA": -8, "ES256": -7}


def raw_public(pem: bytes) -> bytes:
    """The raw public key of a PEM public or private key (Ed25519 or P-256)."""
    if b"PRIVATE" in pem:
        key = serialization.load_pem_private_key(pem, password=None).public_key()
    else:
        key = serialization.load_pem_public_key(pem)
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
    raise ValueError("only Ed25519 and P-256 keys are supported")


def _header_json(h: dict[int, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in h.items():
        out[str(k)] = v.hex() if isinstance(v, bytes) else v
    return out


def verify(path: str, pem_path: str) -> int:
    pem = Path(pem_path).read_bytes()
    kid = hashlib.sha256(raw_public(pem)).digest()
    key = COSEKey.from_pem(pem, kid=kid)
    data = Path(path).read_bytes()
    ctx = cwt.COSE.new(verify_kid=True)
    try:
        protected, unprotected, payload = ctx.decode_with_headers(data, key)
    except Exception as exc:  # cwt raises DecodeError, VerifyError, ValueError...
        print(f"cwt refused: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({
        "payload": payload.hex(),
        "alg": protected.get(1),
        "kid": protected[4].hex() if isinstance(protected.get(4), bytes) else None,
        "content_type": protected.get(3),
        "protected": _header_json(protected),
        "unprotected": _header_json(unprotected),
    }))
    return 0


def sign(payload_path: str, pem_path: str, kid_hex: str, alg_name: str, out: str,
         content_type: str | None, auto: bool) -> int:
    alg = ALGS[alg_name] if alg_name in ALGS else int(alg_name)
    kid = bytes.fromhex(kid_hex)
    pem = Path(pem_path).read_bytes()
    payload = Path(payload_path).read_bytes()
    if auto:
        key = COSEKey.from_pem(pem, alg=alg, kid=kid)
        ctx = cwt.COSE.new(alg_auto_inclusion=True, kid_auto_inclusion=True)
        auto_protected: dict[int, object] = {3: content_type} if content_type else {}
        msg = ctx.encode_and_sign(payload, key, protected=auto_protected)
    else:
        key = COSEKey.from_pem(pem, alg=alg)
        ctx = cwt.COSE.new(alg_auto_inclusion=False, kid_auto_inclusion=False)
        protected: dict[int, object] = {1: alg, 4: kid}
        if content_type:
            protected[3] = content_type
        msg = ctx.encode_and_sign(payload, key, protected=protected, unprotected={})
    assert isinstance(msg, bytes)
    # cwt always emits the COSE_Sign1 tag (18); check rather than assume.
    if cbor2.loads(msg).tag != 18:
        print("cwt did not produce a tagged COSE_Sign1", file=sys.stderr)
        return 1
    Path(out).write_bytes(msg)
    return 0


def main(argv: list[str]) -> int:
    flags = {a for a in argv if a.startswith("--")}
    args = [a for a in argv if not a.startswith("--")]
    if args[:1] == ["verify"] and len(args) == 3 and not flags:
        return verify(args[1], args[2])
    if args[:1] == ["sign"] and len(args) in (6, 7) and flags <= {"--auto-headers"}:
        ctype = args[6] if len(args) == 7 else None
        return sign(args[1], args[2], args[3], args[4], args[5], ctype,
                    "--auto-headers" in flags)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

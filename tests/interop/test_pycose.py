"""Interoperability of our COSE_Sign1 files with pycose, an independent COSE implementation.

Both directions, for Ed25519 (EdDSA) and P-256 (ES256) keys:

* every kind of signed file this project writes is decoded by pycose, shows
  alg, kid and content type in the protected header, carries the exact
  payload bytes we signed and verifies with a pycose key built from our raw
  public key;
* a COSE_Sign1 made by pycose verifies with our decoder, and a device applies
  a pycose-signed response end to end.

A flipped signature byte is refused by both sides.

Snag: pycose 1.1.0 cannot decode any tagged message under cbor2 6.x, which
decodes the contents of a tag as immutable tuple/frozendict where pycose
insists on list/dict (TimothyClaeys/pycose#141, open). :func:`pycose_decode`
calls ``Sign1Message.decode`` and only when it fails in exactly that way hands
the same COSE array, as a list, to pycose's own ``Sign1Message.from_cose_obj``;
header parsing, the Sig_structure and the signature check stay pycose's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from pycose.algorithms import EdDSA, Es256
from pycose.headers import KID, Algorithm, ContentType
from pycose.keys.cosekey import CoseKey
from pycose.keys.curves import P256, Ed25519
from pycose.keys.ec2 import EC2Key
from pycose.keys.okp import OKPKey
from pycose.messages.sign1message import Sign1Message

from agent.cose import ALG_EDDSA, ALG_ES256, PublicKey, SigningKey, decode_sign1, strict_loads
from agent.errors import MalformedError, TrustError
from agent.formats import verify_receipt
from agent.messages import (
    Action,
    Kind,
    Response,
    decode_payload,
)
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Site
from tests.interop.signed_files import (
    ALG_IDS,
    ALGS,
    MAX,
    SignedFile,
    add_device,
    build_files,
    combo_ids,
    flip_signature,
)

#: (vendor key, device key): each algorithm on each side, and both mixes
COMBOS = [(v, d) for v in ALGS for d in ALGS]
COMBO_IDS = combo_ids(COMBOS)
PYCOSE_ALG = {ALG_EDDSA: EdDSA, ALG_ES256: Es256}


# ---------------------------------------------------------------- pycose side


def pycose_decode(data: bytes) -> Sign1Message:
    """``Sign1Message.decode``, working around pycose#141 under cbor2 6.x (see module doc)."""
    try:
        msg = Sign1Message.decode(data)
    except TypeError as exc:
        if "cannot be decoded as COSE message" not in str(exc):
            raise
        tagged = cbor2.loads(data)
        assert isinstance(tagged, cbor2.CBORTag) and tagged.tag == Sign1Message.cbor_tag
        assert isinstance(tagged.value, tuple), "pycose refused a list: not the cbor2 6 snag"
        protected, unprotected, payload, signature = tagged.value
        msg = Sign1Message.from_cose_obj([protected, dict(unprotected), payload, signature], True)
    assert isinstance(msg, Sign1Message)
    return msg


def pycose_public(pk: PublicKey) -> CoseKey:
    """A pycose verification key from our raw public key bytes."""
    if pk.alg == ALG_EDDSA:
        return OKPKey(crv=Ed25519, x=pk.raw)
    assert pk.raw[0] == 4 and len(pk.raw) == 65  # uncompressed point 04 || x || y
    return EC2Key(crv=P256, x=pk.raw[1:33], y=pk.raw[33:65])


def pycose_private(priv: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey) -> CoseKey:
    """A pycose signing key holding the same private bytes as ``priv``."""
    if isinstance(priv, ed25519.Ed25519PrivateKey):
        return OKPKey(crv=Ed25519, x=priv.public_key().public_bytes_raw(),
                      d=priv.private_bytes_raw())
    nums = priv.private_numbers()
    return EC2Key(
        crv=P256,
        x=nums.public_numbers.x.to_bytes(32, "big"),
        y=nums.public_numbers.y.to_bytes(32, "big"),
        d=nums.private_value.to_bytes(32, "big"),
    )


def pycose_sign(
    payload: bytes, key: CoseKey, alg: int, kid: bytes, content_type: str, *,
    tag: bool = True, kid_unprotected: bool = False,
) -> bytes:
    phdr: dict[object, object] = {Algorithm: PYCOSE_ALG[alg], ContentType: content_type}
    uhdr: dict[object, object] = {}
    (uhdr if kid_unprotected else phdr)[KID] = kid
    msg = Sign1Message(phdr=phdr, uhdr=uhdr, payload=payload)
    msg.key = key
    out = msg.encode(tag=tag)
    assert isinstance(out, bytes)
    return out


def pycose_verifies(data: bytes, pk: PublicKey) -> bool:
    msg = pycose_decode(data)
    msg.key = pycose_public(pk)
    result = msg.verify_signature()
    assert isinstance(result, bool)
    return result


# ---------------------------------------------------------------- helpers


def generate_private(alg: int) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
    if alg == ALG_EDDSA:
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module", params=COMBOS, ids=COMBO_IDS)
def files(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> dict[Kind, SignedFile]:
    vendor_alg, device_alg = request.param
    return build_files(tmp_path_factory.mktemp("pycose"), vendor_alg, device_alg, "IOP")


# ---------------------------------------------------------------- our files, read by pycose


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_pycose_decodes_and_verifies_our_file(files: dict[Kind, SignedFile], kind: Kind) -> None:
    f = files[kind]
    assert f.data[0] == 0xD2  # CBOR tag 18, COSE_Sign1_Tagged
    msg = pycose_decode(f.data)
    assert msg.phdr[Algorithm] is PYCOSE_ALG[f.signer.alg]
    assert msg.phdr[KID] == f.signer.kid == hashlib.sha256(f.signer.raw).digest()
    assert msg.phdr[ContentType] == kind.content_type
    assert msg.uhdr == {}
    assert msg.payload == f.payload
    assert decode_payload(strict_loads(msg.payload, max_size=MAX)).KIND is kind
    msg.key = pycose_public(f.signer)
    assert msg.verify_signature() is True
    # and ours agrees on the same bytes
    assert decode_sign1(f.data, max_size=MAX).verify_with(f.signer) == f.payload


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_flipped_signature_and_wrong_key_refused_by_pycose_and_us(
    files: dict[Kind, SignedFile], kind: Kind
) -> None:
    f = files[kind]
    bad = flip_signature(f.data)
    assert pycose_verifies(bad, f.signer) is False
    with pytest.raises(TrustError):
        decode_sign1(bad, max_size=MAX).verify_with(f.signer)

    other = SigningKey.generate(f.signer.alg).public
    assert pycose_verifies(f.data, other) is False
    with pytest.raises(TrustError):
        decode_sign1(f.data, max_size=MAX).verify_with(other)


# ---------------------------------------------------------------- pycose's files, read by us


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_we_verify_a_pycose_sign1(tmp_path: Path, alg: int) -> None:
    priv = generate_private(alg)
    pem = priv.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    ours = SigningKey.from_pem(pem)
    site = Site(Vendor(ours), tmp_path)
    dev = add_device(site, alg, "IOP")
    req = Vendor.read_request(dev.request(Action.ACTIVATE, ["bacnet"]))
    resp = site.vendor.response_for(
        req, site.vendor.changes_for(req, [Grant("bacnet", 5)], ()), now=site.clock()
    )
    payload = resp.encode()

    data = pycose_sign(payload, pycose_private(priv), alg, ours.public.kid,
                       Kind.RESPONSE.content_type)
    assert cbor2.loads(data).tag == 18
    env = decode_sign1(data, max_size=MAX)
    assert (env.alg, env.kid, env.content_type) == (alg, ours.public.kid,
                                                    Kind.RESPONSE.content_type)
    assert env.verify_with(ours.public) == payload
    assert decode_payload(strict_loads(env.payload, max_size=MAX), Response) == resp
    assert pycose_verifies(data, ours.public) is True

    bad = flip_signature(data)
    assert pycose_verifies(bad, ours.public) is False
    with pytest.raises(TrustError):
        decode_sign1(bad, max_size=MAX).verify_with(ours.public)
    with pytest.raises(TrustError):
        env.verify_with(SigningKey.generate(alg).public)


@pytest.mark.parametrize(("vendor_alg", "device_alg"), COMBOS, ids=COMBO_IDS)
def test_device_applies_a_pycose_signed_response(
    tmp_path: Path, vendor_alg: int, device_alg: int
) -> None:
    priv = generate_private(vendor_alg)
    vendor = Vendor(SigningKey(priv))
    site = Site(vendor, tmp_path)
    dev = add_device(site, device_alg, "IOP")
    req = vendor.read_request(dev.request(Action.ACTIVATE, ["bacnet"]))
    resp = vendor.response_for(req, vendor.changes_for(req, [Grant("bacnet", 7)], ()),
                               now=site.clock())
    data = pycose_sign(resp.encode(), pycose_private(priv), vendor_alg, vendor.public.kid,
                       Kind.RESPONSE.content_type)

    before = dev.store_bytes()
    with pytest.raises(TrustError):
        dev.agent.apply(flip_signature(data))
    assert dev.store_bytes() == before
    assert not dev.agent.check("bacnet").licensed

    result, _ = dev.agent.apply(data)
    assert not result.already_applied
    assert result.response == resp
    assert dev.agent.check("bacnet").licensed
    assert [lic["count"] for lic in dev.agent.status()["licenses"]] == [7]
    # the receipt carries pycose's exact bytes, and the vendor side accepts it
    rc = verify_receipt(result.receipt, [vendor.public])
    assert rc.response == data
    # and pycose verifies the device-signed receipt
    assert pycose_verifies(result.receipt, rc.device_key) is True


@pytest.mark.parametrize("variant", ["kid-unprotected", "untagged"])
def test_we_refuse_pycose_messages_outside_our_profile(variant: str) -> None:
    """Valid COSE for pycose, refused by us: header placement and tagging are part of the format."""
    priv = generate_private(ALG_EDDSA)
    ours = SigningKey(priv)
    payload = cbor2.dumps({"v": 1, "kind": "response"})
    data = pycose_sign(payload, pycose_private(priv), ALG_EDDSA, ours.public.kid,
                       Kind.RESPONSE.content_type, tag=variant != "untagged",
                       kid_unprotected=variant == "kid-unprotected")
    if variant == "kid-unprotected":
        assert pycose_verifies(data, ours.public) is True  # a genuine signature...
    with pytest.raises(MalformedError):  # ...in a shape our format does not allow
        decode_sign1(data, max_size=MAX)

"""Issue 15 item 7: seat tokens interoperate with pycose and python-cwt, both directions.

A borrowed seat token made by the real agent (Ed25519 and P-256 device keys) is decoded
and verified by pycose and by python-cwt (its own environment) with the carried device
key, with the payload bytes docs/protocol.md section 22 describes; a token signed by
pycose or cwt with the device's key is accepted by the agent (a return) and by the
offline check, and one signed by another key is refused by all.
"""

from __future__ import annotations

from pathlib import Path

import cbor2
import pytest

from agent import seats
from agent.cose import SigningKey, canonical, decode_sign1, strict_loads
from agent.errors import TrustError, WrongDeviceError
from agent.store import Store
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Device, Site
from tests.interop.signed_files import ALG_IDS, ALGS, MAX, add_device, flip_signature
from tests.interop.test_cwt import CWT_PYTHON, cwt_sign, cwt_verify
from tests.interop.test_pycose import (
    PYCOSE_ALG,
    pycose_decode,
    pycose_private,
    pycose_public,
    pycose_sign,
    pycose_verifies,
)


def borrowed(tmp: Path, alg: int) -> tuple[Device, bytes, SigningKey]:
    site = Site(Vendor(SigningKey.generate()), tmp)
    dev = add_device(site, alg, "SEAT")
    req = dev.request(features=["editor"])
    dev.agent.apply(site.vendor.issue(req, [Grant("editor", 2, floating=True)],
                                      now=site.clock()))
    _seat, token = dev.agent.seat_checkout("editor", "laptop-7", borrow=3600)
    return dev, token, Store.open(dev.directory, None).key


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_pycose_reads_and_verifies_a_seat_token(tmp_path: Path, alg: int) -> None:
    dev, token, key = borrowed(tmp_path, alg)
    msg = pycose_decode(token)
    from pycose.headers import KID, Algorithm, ContentType

    assert msg.phdr[Algorithm] is PYCOSE_ALG[alg]
    assert msg.phdr[KID] == key.public.kid
    assert msg.phdr[ContentType] == "application/vnd.bms-license.seat+cbor"
    assert msg.payload is not None
    m = cbor2.loads(msg.payload)
    assert set(m) == {"v", "device_id", "device_alg", "device_key", "id", "feature", "client",
                      "since", "until", "borrowed", "license"}
    assert (m["v"], m["device_alg"], m["borrowed"]) == (1, alg, True)
    assert canonical(m) == msg.payload  # deterministic encoding, as documented
    msg.key = pycose_public(key.public)
    assert msg.verify_signature() is True
    assert pycose_verifies(flip_signature(token), key.public) is False
    assert seats.verify_borrowed(token, dev.vendor.public, dev.clock()).seat.client == "laptop-7"


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_a_pycose_signed_token_is_accepted_and_a_foreign_one_refused(tmp_path: Path,
                                                                     alg: int) -> None:
    dev, token, key = borrowed(tmp_path, alg)
    payload = decode_sign1(token, max_size=MAX).payload
    from cryptography.hazmat.primitives import serialization

    priv = serialization.load_pem_private_key(key.to_pem(), password=None)
    theirs = pycose_sign(payload, pycose_private(priv), alg,  # type: ignore[arg-type]
                         key.public.kid, seats.SEAT_TOKEN_TYPE)
    assert seats.verify_borrowed(theirs, dev.vendor.public, dev.clock()).seat.borrowed
    other = SigningKey.generate(alg)
    other_priv = serialization.load_pem_private_key(other.to_pem(), password=None)
    forged = pycose_sign(payload, pycose_private(other_priv), alg,  # type: ignore[arg-type]
                         key.public.kid, seats.SEAT_TOKEN_TYPE)
    with pytest.raises(TrustError):
        seats.verify_borrowed(forged, dev.vendor.public, dev.clock())
    with pytest.raises(TrustError):
        dev.agent.seat_return(forged)
    assert len(dev.agent.seat_list()[0]) == 1
    dev.agent.seat_return(theirs)  # the device's own key, through another library
    assert dev.agent.seat_list()[0] == ()


@pytest.mark.skipif(not CWT_PYTHON.exists(), reason="make .venv-cwt/.installed")
@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_python_cwt_both_directions(tmp_path: Path, alg: int) -> None:
    dev, token, key = borrowed(tmp_path / "site", alg)
    out = cwt_verify(tmp_path, token, key.public)
    assert out is not None and out["content_type"] == seats.SEAT_TOKEN_TYPE
    assert bytes.fromhex(out["payload"]) == decode_sign1(token, max_size=MAX).payload
    assert out["unprotected"] == {}
    payload = strict_loads(bytes.fromhex(out["payload"]), max_size=MAX)
    theirs = cwt_sign(tmp_path, canonical(payload), key, seats.SEAT_TOKEN_TYPE)
    assert seats.read_token(theirs, key.public).seat.id == payload["id"]
    with pytest.raises(WrongDeviceError):
        seats.read_token(theirs, SigningKey.generate(alg).public)
    dev.agent.seat_return(theirs)
    assert dev.agent.seat_list()[0] == ()

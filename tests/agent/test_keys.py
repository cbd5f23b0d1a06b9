"""Key handling: the Ed25519 PEM fast path agrees with the serialization module exactly."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import serialization

from agent.cose import ALG_ES256, ED25519_PKCS8_PREFIX, SigningKey, _ed25519_pkcs8_raw
from agent.errors import MalformedError


def test_ed25519_fast_path_matches_pkcs8() -> None:
    k = SigningKey.generate()
    der = k._key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    assert der == ED25519_PKCS8_PREFIX + k._key.private_bytes_raw()  # type: ignore[union-attr]
    again = SigningKey.from_pem(k.to_pem())
    assert again.public == k.public
    assert again.secret_digest(b"store-mac") == k.secret_digest(b"store-mac")


def test_es256_keys_take_the_general_path() -> None:
    k = SigningKey.generate(ALG_ES256)
    pem = k.to_pem()
    assert _ed25519_pkcs8_raw(pem) is None
    again = SigningKey.from_pem(pem)
    assert again.public == k.public
    assert again.secret_digest(b"x") == k.secret_digest(b"x")


@pytest.mark.parametrize("pem", [
    b"", b"-----BEGIN PRIVATE KEY-----\n!!!\n-----END PRIVATE KEY-----\n",
    b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
])
def test_bad_private_keys_are_malformed(pem: bytes) -> None:
    with pytest.raises(MalformedError):
        SigningKey.from_pem(pem)

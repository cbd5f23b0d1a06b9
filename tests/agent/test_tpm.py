"""The TPM root of trust (issue 16 item 6) against a real swtpm: a key that signs ES256
and never leaves the TPM, a counter that only goes up, refusals that name the TPM."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cose import ALG_ES256, PublicKey
from agent.errors import StorageError, UsageError
from agent.tpm import Tpm, tcti_for_url
from tests.support.swtpm import SoftTpm


@pytest.fixture
def soft_tpm() -> Iterator[SoftTpm]:
    tpm = SoftTpm()
    tpm.start()
    try:
        yield tpm
    finally:
        tpm.close()
        assert not tpm.running, "swtpm outlived its fixture"


def test_urls() -> None:
    assert tcti_for_url("tpm:///dev/tpmrm0") == "device:/dev/tpmrm0"
    assert tcti_for_url("tpm+swtpm://127.0.0.1:2321") == "swtpm:host=127.0.0.1,port=2321"
    for bad in ("tpm://host/dev/tpmrm0", "tpm:///etc/passwd", "tpm+swtpm://127.0.0.1",
                "file:///var/lib/licagent", "tpm+swtpm://127.0.0.1:x"):
        with pytest.raises(UsageError, match="key store"):
            tcti_for_url(bad)


def test_key_signs_es256_verified_by_the_cose_layer(soft_tpm: SoftTpm) -> None:
    tpm = Tpm(soft_tpm.url)
    pem = tpm.create_key()
    assert b"PRIVATE" not in pem
    message = b"receipt bytes"
    sig = tpm.sign_es256(message)
    assert len(sig) == 64
    # verified by the project's own COSE key type, as a receipt's signature would be
    from cryptography.hazmat.primitives import serialization
    pub = PublicKey(ALG_ES256, serialization.load_pem_public_key(pem)
                    .public_bytes(serialization.Encoding.X962,
                                  serialization.PublicFormat.UncompressedPoint))
    pub.verify(sig, message)
    assert tpm.verify_es256(sig, message)
    assert not tpm.verify_es256(sig, message + b"!")
    # a second key at the same handle is refused: the device key is never replaced
    with pytest.raises(StorageError, match="already holds a device key"):
        tpm.create_key()
    assert tpm.public_pem() == pem


def test_key_is_not_in_a_copy_of_anything_but_the_tpm(soft_tpm: SoftTpm, tmp_path: Path) -> None:
    """Another TPM (a copied store moved to other hardware) has no such key: signing fails."""
    Tpm(soft_tpm.url).create_key()
    other = SoftTpm()
    other.start()
    try:
        with pytest.raises(StorageError, match=r"TPM tpm\+swtpm://127\.0\.0\.1:\d+: cannot sign"):
            Tpm(other.url).sign_es256(b"forged receipt")
    finally:
        other.close()


def test_counter_only_goes_up_even_when_the_tpm_state_is_put_back(soft_tpm: SoftTpm) -> None:
    tpm = Tpm(soft_tpm.url)
    first = tpm.define_counter()
    assert tpm.increment() == first + 1
    assert tpm.read_counter() == first + 1
    with pytest.raises(StorageError, match="already in use"):
        tpm.define_counter()
    # survives a restart of the TPM (SIGTERM, start again on the same state)
    soft_tpm.stop()
    soft_tpm.start()
    tpm = Tpm(soft_tpm.url)
    assert tpm.read_counter() == first + 1
    assert tpm.increment() == first + 2


def test_dead_tpm_is_one_storage_error(soft_tpm: SoftTpm) -> None:
    tpm = Tpm(soft_tpm.url)
    tpm.create_key()
    soft_tpm.stop()
    with pytest.raises(StorageError, match="cannot sign with the device key") as exc:
        tpm.sign_es256(b"x")
    assert exc.value.exit_code == 8
    assert "\n" not in str(exc.value)


def test_missing_tools_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert shutil.which("tpm2_sign") is None
    with pytest.raises(StorageError, match="apt-get install tpm2-tools"):
        Tpm("tpm:///dev/tpmrm0")

"""SHA-256 and HMAC-SHA256 through cryptography, which the agent loads anyway for signatures.

``hashlib`` and ``hmac`` would load Python's own OpenSSL binding as well: about
3.7 MB more resident memory on an embedded controller for the same two functions.
"""

from __future__ import annotations

from _operator import _compare_digest  # what hmac.compare_digest is, without hmac's imports

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac

__all__ = ["Sha256", "equal", "hmac_sha256", "sha256"]


def sha256(data: bytes) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(data)
    return h.finalize()


class Sha256:
    """Incremental SHA-256 (``update`` then ``digest``/``hexdigest``)."""

    def __init__(self) -> None:
        self._h = hashes.Hash(hashes.SHA256())

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.finalize()

    def hexdigest(self) -> str:
        return self.digest().hex()


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    h = _hmac.HMAC(key, hashes.SHA256())
    h.update(message)
    return h.finalize()


def equal(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two MACs."""
    return bool(_compare_digest(a, b))

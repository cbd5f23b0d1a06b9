"""A TPM 2.0 as the device's root of trust: a non-exportable ES256 key and a monotonic counter.

Issue 16 item 6. The TPM is reached through the ``tpm2-tools`` programs (Debian package
``tpm2-tools``, run as subprocesses), chosen by URL like the links:

    tpm:///dev/tpmrm0          the kernel's TPM resource manager (``device:`` TCTI)
    tpm+swtpm://HOST:PORT      a software TPM (``swtpm socket``), used by the tests

Why the command-line tools and not a Python binding: ``tpm2-pytss`` needs the libtss2
development headers and a C build at install time, which the embedded controllers do
not have; the tools are one Debian package with no Python dependency, so importing this
module costs the agent nothing (nothing here is imported unless a ``tpm`` URL is given).

The key is created inside the TPM (``fixedtpm|fixedparent|sensitivedataorigin``): its
private part never leaves it, so a copied store holds nothing to sign with. The counter
is an NV index of type ``counter``: it can only go up, and it survives a reset of the
TPM's owner state only by being undefined (which then fails every open: refused).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.errors import StorageError, UsageError

__all__ = ["DEFAULT_COUNTER", "DEFAULT_KEY_HANDLE", "Tpm", "tcti_for_url"]

#: persistent handle of the device key (owner hierarchy, persistent range 0x81000000-)
DEFAULT_KEY_HANDLE = 0x81010016
#: NV index of the store's generation counter (owner NV range 0x01000000-)
DEFAULT_COUNTER = 0x01500016
_TIMEOUT = 30.0
_KEY_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
_COUNTER_ATTRS = "ownerread|ownerwrite|authread|authwrite|nt=counter"


def tcti_for_url(url: str) -> str:
    """The TCTI string for a key-store URL; an unknown scheme or form names itself (exit 2)."""
    parts = urlsplit(url)
    if parts.scheme == "tpm":
        if parts.netloc or not parts.path.startswith("/dev/"):
            raise UsageError(f"key store {url!r}: expected tpm:///dev/tpmrm0 (a TPM device path)")
        return f"device:{parts.path}"
    if parts.scheme == "tpm+swtpm":
        try:
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise UsageError(f"key store {url!r}: bad port ({exc})") from exc
        if not host or not port or parts.path not in ("", "/"):
            raise UsageError(f"key store {url!r}: expected tpm+swtpm://HOST:PORT")
        return f"swtpm:host={host},port={port}"
    raise UsageError(
        f"key store {url!r}: unknown scheme {parts.scheme!r} (expected tpm:// or tpm+swtpm://)"
    )


class Tpm:
    """One TPM, reached by URL. Every failure is a :class:`StorageError` (exit 8) naming it."""

    def __init__(self, url: str, key_handle: int = DEFAULT_KEY_HANDLE,
                 counter: int = DEFAULT_COUNTER) -> None:
        self.url = url
        self.tcti = tcti_for_url(url)
        self.key_handle = key_handle
        self.counter = counter
        if shutil.which("tpm2_sign") is None:
            raise StorageError(
                f"key store {url}: the tpm2-tools programs are not installed "
                f"(apt-get install tpm2-tools)"
            )

    def _run(self, what: str, *args: str, stdin: bytes | None = None) -> bytes:
        env = dict(os.environ, TPM2TOOLS_TCTI=self.tcti)
        try:
            done = subprocess.run(args, input=stdin, capture_output=True, env=env,
                                  timeout=_TIMEOUT, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise StorageError(f"TPM {self.url}: cannot {what}: {exc}") from exc
        if done.returncode != 0:
            last = (done.stderr.decode(errors="replace").strip().splitlines() or ["no message"])
            raise StorageError(f"TPM {self.url}: cannot {what}: {last[-1]}")
        return done.stdout

    # ------------------------------------------------------------------ the device key

    def create_key(self) -> bytes:
        """Create the ES256 device key inside the TPM, persist it; return its public PEM.

        Refuses (exit 8) when the handle already holds a key: never replaces a device key.
        """
        try:
            self.public_pem()
        except StorageError:
            pass
        else:
            raise StorageError(f"TPM {self.url}: handle {self.key_handle:#x} already holds a "
                               f"device key; refusing to replace it")
        with tempfile.TemporaryDirectory(prefix="licagent-tpm-") as tmp:
            ctx = str(Path(tmp) / "key.ctx")
            self._run("create the device key", "tpm2_createprimary", "-Q", "-C", "o",
                      "-g", "sha256", "-G", "ecc256:ecdsa-sha256", "-a", _KEY_ATTRS,
                      "-c", ctx)
            try:
                self._run(f"persist the device key at {self.key_handle:#x}",
                          "tpm2_evictcontrol", "-Q", "-C", "o", "-c", ctx,
                          f"{self.key_handle:#x}")
            finally:
                # without a resource manager (swtpm, /dev/tpm0) the transient copy stays
                # loaded and the TPM runs out of object slots: flush it, persisted or not
                self._run("flush the transient key", "tpm2_flushcontext", "-t")
        return self.public_pem()

    def public_pem(self) -> bytes:
        """The device key's public part (PEM SubjectPublicKeyInfo)."""
        with tempfile.TemporaryDirectory(prefix="licagent-tpm-") as tmp:
            out = Path(tmp) / "pub.pem"
            self._run(f"read the device key at {self.key_handle:#x}", "tpm2_readpublic", "-Q",
                      "-c", f"{self.key_handle:#x}", "-f", "pem", "-o", str(out))
            return out.read_bytes()

    def public_key(self) -> ec.EllipticCurvePublicKey:
        key = serialization.load_pem_public_key(self.public_pem())
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
            raise StorageError(f"TPM {self.url}: key at {self.key_handle:#x} is not a P-256 key")
        return key

    def sign_es256(self, message: bytes) -> bytes:
        """ES256 signature of ``message`` as COSE wants it: r || s, 32 bytes each."""
        with tempfile.TemporaryDirectory(prefix="licagent-tpm-") as tmp:
            msg, sig = Path(tmp) / "msg", Path(tmp) / "sig"
            msg.write_bytes(message)
            self._run("sign with the device key", "tpm2_sign", "-c", f"{self.key_handle:#x}",
                      "-g", "sha256", "-s", "ecdsa", "-f", "plain", "-o", str(sig), str(msg))
            r, s = decode_dss_signature(sig.read_bytes())
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def verify_es256(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` (r || s) is the device key's over ``message`` (checked here)."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

        if len(signature) != 64:
            return False
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"),
                                   int.from_bytes(signature[32:], "big"))
        try:
            self.public_key().verify(der, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            return False
        return True

    # ------------------------------------------------------------ the monotonic counter

    def define_counter(self) -> int:
        """Define the NV counter (refused if it exists), increment it once; return its value.

        A TPM counter has no value until its first increment (then it starts at the
        highest value any counter of this TPM ever had), so the value returned need not
        be 1: the store records whatever the TPM says.
        """
        self._run(f"define the NV counter {self.counter:#x} (already in use?)", "tpm2_nvdefine",
                  f"{self.counter:#x}", "-C", "o", "-s", "8", "-a", _COUNTER_ATTRS)
        return self.increment()

    def increment(self) -> int:
        """Add one to the counter; return its new value."""
        self._run(f"increment the NV counter {self.counter:#x}", "tpm2_nvincrement",
                  f"{self.counter:#x}", "-C", "o")
        return self.read_counter()

    def read_counter(self) -> int:
        data = self._run(f"read the NV counter {self.counter:#x}", "tpm2_nvread",
                         f"{self.counter:#x}", "-C", "o", "-s", "8")
        if len(data) != 8:
            raise StorageError(f"TPM {self.url}: NV counter {self.counter:#x} read {len(data)} bytes")
        return int.from_bytes(data, "big")

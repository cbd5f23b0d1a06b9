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

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from agent.cose import ALG_ES256, PublicKey, SigningKey, canonical, strict_loads
from agent.digest import sha256
from agent.errors import (
    IntegrityError,
    LicensingError,
    MalformedError,
    RestoredStoreError,
    StorageError,
    UsageError,
)

__all__ = ["DEFAULT_COUNTER", "DEFAULT_KEY_HANDLE", "TPM_FILE", "Tpm", "TpmSigningKey",
           "create_key", "load_key", "tcti_for_url"]

#: persistent handle of the device key (owner hierarchy, persistent range 0x81000000-)
DEFAULT_KEY_HANDLE = 0x81010016
#: NV index of the store's generation counter (owner NV range 0x01000000-)
DEFAULT_COUNTER = 0x01500016
_TIMEOUT = 30.0
_KEY_ATTRS = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign"
_COUNTER_ATTRS = "ownerread|ownerwrite|authread|authwrite|nt=counter"


def tcti_for_url(url: str) -> str:
    """The TCTI string for a key-store URL; an unknown scheme or form names itself (exit 2).

    Parsed by hand: the device core imports no ``urllib`` (import-linter).
    """
    scheme, sep, rest = url.partition("://")
    if scheme == "tpm" and sep:
        if not rest.startswith("/dev/") or "/" in rest[5:] or len(rest) == 5:
            raise UsageError(f"key store {url!r}: expected tpm:///dev/tpmrm0 (a TPM device path)")
        return f"device:{rest}"
    if scheme == "tpm+swtpm" and sep:
        host, colon, port = rest.rstrip("/").rpartition(":")
        if not colon or not host or "/" in host or not port.isdigit() or not 0 < int(port) < 65536:
            raise UsageError(f"key store {url!r}: expected tpm+swtpm://HOST:PORT")
        return f"swtpm:host={host},port={int(port)}"
    raise UsageError(
        f"key store {url!r}: unknown scheme {scheme!r} (expected tpm:// or tpm+swtpm://)"
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

    def holds_key(self) -> bool:
        """Whether the TPM has a persistent object at the key handle (it answers either way)."""
        out = self._run("list the persistent handles", "tpm2_getcap", "handles-persistent")
        return f"{self.key_handle:#x}" in out.decode(errors="replace").lower().split()

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


# ------------------------------------------------------------------ the store's TPM file

#: the file a TPM-backed store holds in place of ``device.key``: which TPM, which key and
#: counter, and the counter's value at generation 0; signed by the TPM key itself
TPM_FILE = "device.tpm"
_TPM_MAGIC = "licagent-tpm"
MAX_TPM_FILE = 4096


class TpmSigningKey(SigningKey):
    """The device key when it lives in a TPM: signs there; ``to_pem`` is refused.

    The store's MAC keys (``secret_digest``) come from a random secret kept in
    ``device.tpm``, not from the private key (which cannot be read): a copy of the store
    can be edited by whoever has it, as with the file key store, but cannot sign.
    """

    def __init__(self, tpm: Tpm, public: PublicKey, mac_secret: bytes, base: int) -> None:
        self._key = None  # type: ignore[assignment]
        self.public = public
        self.tpm = tpm
        self.mac_secret = mac_secret
        #: the counter's value at generation 0: generation g is current iff the TPM
        #: counter reads ``base + g``
        self.base = base

    def sign(self, message: bytes) -> bytes:
        return self.tpm.sign_es256(message)

    def to_pem(self) -> bytes:
        raise UsageError(f"the device key lives in the TPM {self.tpm.url} and cannot be exported")

    def secret_digest(self, label: bytes) -> bytes:
        return sha256(b"licagent-derive-tpm\x00" + label + b"\x00" + self.mac_secret)

    # ---------------------------------------------------------------- the file

    def _body(self) -> list[object]:
        return [_TPM_MAGIC, 1, self.tpm.url, self.tpm.key_handle, self.tpm.counter, self.base,
                self.mac_secret, self.public.raw]

    def to_file(self) -> bytes:
        body = self._body()
        return canonical([*body, self.sign(canonical(body))])

    # ---------------------------------------------------------------- the generation

    def check_generation(self, generation: int, path: str, newest_lost: bool = False) -> bool:
        """Refuse a store older than the TPM's counter; catch up one interrupted save.

        ``base + generation`` is what the counter reads after the save of ``generation``;
        ``base + generation - 1`` is a save killed between its slot and its increment
        (the slot is committed: the counter catches up now).

        Args:
            newest_lost: the other slot is damaged or missing. A counter exactly one
                generation ahead is then that lost slot, not a restore: True is returned
                and the caller must roll the state forward from the journal to it, or
                refuse.

        Returns:
            True when the newest generation is the lost slot (``generation + 1``).

        Raises:
            RestoredStoreError: the counter is past this store (restored from an older
                copy) or behind it (another TPM, or a file edited): exit 8.
        """
        value = self.tpm.read_counter()
        expected = self.base + generation
        if value == expected - 1:
            self.tpm.increment()
            return False
        if newest_lost and value == expected + 1:
            return True
        if value > expected:
            raise RestoredStoreError(
                f"{path} is generation {generation} but the TPM's counter says generation "
                f"{value - self.base} was saved: this store was restored from an older copy; "
                f"refused (nothing written; restore the newest copy or re-provision with the vendor)"
            )
        if value != expected:
            raise RestoredStoreError(
                f"{path} is generation {generation} but the TPM's counter reads "
                f"{value}, behind it (expected {expected}): not this TPM's store; refused"
            )
        return False

    def advance(self, generation: int) -> None:
        """After the slot of ``generation`` is written: move the counter to it."""
        self.tpm.increment()


def create_key(url: str) -> TpmSigningKey:
    """``licagent init --key-store URL``: a new key and counter in the TPM (exit 8 if taken)."""
    tpm = Tpm(url)
    pem = tpm.create_key()
    base = tpm.define_counter()
    return TpmSigningKey(tpm, _public_from_pem(pem), os.urandom(32), base)


def load_key(data: bytes, path: str) -> TpmSigningKey:
    """The key of a ``device.tpm`` file: checked against the TPM it names (exit 8 if not)."""
    try:
        m = strict_loads(data, max_size=MAX_TPM_FILE)
        ok = (isinstance(m, list) and len(m) == 9 and m[0] == _TPM_MAGIC and m[1] == 1
              and isinstance(m[2], str) and all(isinstance(x, int) for x in m[3:6])
              and isinstance(m[6], bytes) and len(m[6]) == 32 and isinstance(m[7], bytes)
              and isinstance(m[8], bytes))
    except MalformedError as exc:
        raise IntegrityError(f"{path} is damaged: {exc}") from exc
    if not ok:
        raise IntegrityError(f"{path} is not a licagent TPM key file")
    tpm = Tpm(m[2], m[3], m[4])
    try:
        pem = tpm.public_pem()
    except StorageError:
        if tpm.holds_key():
            raise  # the key is there but cannot be read: the TPM's own failure
        raise RestoredStoreError(
            f"{path} names the key at {m[3]:#x} of {m[2]}, which this TPM does not hold: the "
            f"store was copied from another server (or this TPM was cleared); refused "
            f"(nothing written)") from None
    public = _public_from_pem(pem)
    if public.raw != m[7]:
        raise RestoredStoreError(f"{path} names the key at {m[3]:#x} of {m[2]}, which holds "
                                 f"another key: not this TPM's store; refused")
    key = TpmSigningKey(tpm, public, m[6], m[5])
    try:
        public.verify(m[8], canonical(m[:8]))
    except LicensingError as exc:
        raise IntegrityError(f"{path} is not signed by the TPM's device key: {exc}") from exc
    return key


def _public_from_pem(pem: bytes) -> PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise StorageError("the TPM's device key is not a P-256 key")
    return PublicKey(ALG_ES256, key.public_bytes(serialization.Encoding.X962,
                                                 serialization.PublicFormat.UncompressedPoint))

"""A client of the licensing server's HTTP API (docs/licensing-api.md), for ``licadmin`` and tests.

Every method makes one HTTP exchange on a fresh connection (``http.client``).
A refusal of the server (a JSON ``{"code", "reason", "message"}`` body with an
HTTP error status) is raised as :class:`hw.rpc.RemoteError` carrying the
server's exit code and reason, so a command can exit with it; a failure to
reach the server or an unreadable answer is :class:`hw.rpc.TransportError`
(exit 1).

Every exchange carries the caller's bearer token (``Authorization: Bearer``;
:func:`read_token` reads a token file); over ``https://`` the server is verified
against the system's CAs or the one CA file given.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import urlsplit

from agent.cose import strict_loads
from agent.errors import MalformedError, UsageError
from agent.rpc import RemoteError, TransportError
from apps.licensing_api import (
    AssignmentBatch,
    AssignmentQuery,
    Confirmation,
    EntitlementQuery,
    LicenseInfoQuery,
    PerDeviceLicenseInfo,
    UploadAnswer,
    files_body,
)
from hw.backends.https import refusal_from_body
from hw.httpjson import CBOR, JSON

__all__ = ["MAX_ANSWER", "TOKEN_ENV", "LicensingClient", "read_token"]

#: the environment variable licadmin reads the bearer token from without --token-file
TOKEN_ENV = "LICADMIN_TOKEN"
#: the largest token file read
TOKEN_FILE_MAX = 4096


def read_token(path: str | None, env: str | None = None) -> str | None:
    """The bearer token from ``path`` (its first line), else from the environment variable
    ``env`` (default :data:`TOKEN_ENV`), else None.

    Raises:
        UsageError: the file cannot be read, is empty, or holds more than a token.
    """
    if path is None:
        value = os.environ.get(env or TOKEN_ENV, "").strip()
        return value or None
    try:
        with open(path, "rb") as f:
            data = f.read(TOKEN_FILE_MAX + 1)
    except OSError as exc:
        raise UsageError(f"cannot read the token file {path}: {exc.strerror or exc}") from exc
    lines = data.decode("utf-8", "replace").strip().splitlines()
    if len(data) > TOKEN_FILE_MAX or len(lines) != 1 or not lines[0].isprintable() \
            or " " in lines[0]:
        raise UsageError(f"{path} is not a token file: expected one line holding the token "
                         "(licserver token create --out writes one)")
    return lines[0]

#: the largest answer read: license information may be up to 16 MiB
MAX_ANSWER = 16 * 1024 * 1024 + 64 * 1024
#: files per upload or confirm call, and their bytes: within the server's limits
#: (ServerLimits.max_files, max_files_body), so a site of any size goes in batches
BATCH_FILES = 1000
BATCH_BYTES = 24 * 1024 * 1024

_B = TypeVar("_B")


def batches(files: Sequence[bytes], max_files: int | None = None,
            max_bytes: int | None = None) -> list[tuple[int, list[bytes]]]:
    """``files`` cut into (first index, files) batches of at most ``max_files`` and ``max_bytes``
    (default :data:`BATCH_FILES`, :data:`BATCH_BYTES`); a larger file goes alone."""
    max_files = max_files or BATCH_FILES
    max_bytes = max_bytes or BATCH_BYTES
    out: list[tuple[int, list[bytes]]] = []
    start, size = 0, 0
    cur: list[bytes] = []
    for i, f in enumerate(files):
        if cur and (len(cur) >= max_files or size + len(f) > max_bytes):
            out.append((start, cur))
            start, cur, size = i, [], 0
        cur.append(bytes(f))
        size += len(f)
    if cur:
        out.append((start, cur))
    return out


class LicensingClient:
    """Talks to ``licserver serve`` at ``url`` (``http://HOST:PORT`` or ``https://HOST:PORT``).

    Args:
        url: base URL of the licensing server; a path prefix is allowed.
        timeout: seconds for connecting and for each answer.
        token: the bearer token sent with every exchange (None: none, answered 401).
        ca: over ``https://``, the PEM CA file to verify the server with (default: the
            system's CAs); the server's name or address must match its certificate.

    Raises (every method):
        RemoteError: the server refused (``exit_code``/``reason`` are the server's).
        TransportError: the server could not be reached or answered nonsense.
    """

    def __init__(self, url: str, timeout: float = 30.0, token: str | None = None,
                 ca: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"licensing server URL {url!r}: expected http://HOST:PORT "
                             "(or https://HOST:PORT)")
        try:
            port = parts.port
        except ValueError as exc:
            raise UsageError(f"licensing server URL {url!r}: bad port") from exc
        self.url = url.rstrip("/")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = port
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.token = token
        self._tls: ssl.SSLContext | None = None
        if ca is not None and self.scheme != "https":
            raise UsageError(f"--licensing-ca {ca}: the licensing server {url} is not https://")
        if self.scheme == "https":
            try:
                self._tls = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise UsageError(f"--licensing-ca {ca}: not a readable PEM CA certificate: "
                                 f"{exc}") from exc

    # ------------------------------------------------------------ the workflow

    def license_info(self, site_info: bytes, devices: Sequence[str] | None = None) -> bytes:
        """``POST /v1/license-info``.

        Args:
            site_info: the SITE_INFO bundle (CBOR) written by ``licadmin gather``.
            devices: device IDs to answer for; None or empty means every device in it.

        Returns:
            The vendor-signed license-information file (bytes, as signed).
        """
        body = LicenseInfoQuery(bytes(site_info), tuple(devices or ())).encode()
        data, _ctype = self._exchange("POST", "/v1/license-info", body, CBOR)
        return data

    def license_info_files(self, site_info: bytes, devices: Sequence[str] | None = None
                           ) -> tuple[bytes, dict[str, bytes]]:
        """``POST /v1/license-info`` with ``per_device``: the site's file and each device's own.

        Returns:
            (the vendor-signed file for every device, {device ID: a vendor-signed
            file naming only that device}).
        """
        body = LicenseInfoQuery(bytes(site_info), tuple(devices or ()), per_device=True).encode()
        data, ctype = self._exchange("POST", "/v1/license-info", body, CBOR)
        answer = self._read(PerDeviceLicenseInfo.from_body, data, ctype, "/v1/license-info")
        return answer.license_info, answer.per_device

    def upload(self, requests: Sequence[bytes], receipts: Sequence[bytes] = ()) -> UploadAnswer:
        """``POST /v1/requests``: receipts are confirmed first, then each request answered.

        Many requests go in batches within the server's limits (:func:`batches`);
        the answers are merged.

        Returns:
            The :class:`~apps.licensing_api.UploadAnswer` (it reads as the documented map
            ``{"responses": {device_id: bytes}, "errors": {key: {"code", "reason",
            "message"}}, "receipts": {"accepted": [...], "refused": [...]}}``). ``key`` is
            the device ID of a request that verified, else ``"#INDEX"`` (its position in
            ``requests``). ``receipts`` is :meth:`confirm`'s answer.
        """
        total = UploadAnswer()
        if receipts:
            # receipts first, as one call would have it: freed licenses count for the requests
            total.receipts = self.confirm(receipts)
        for offset, part in batches(requests):
            data, ctype = self._exchange("POST", "/v1/requests", files_body("requests", part),
                                         CBOR)
            total.merge(self._read(UploadAnswer.from_body, data, ctype, "/v1/requests"), offset)
        return total

    def confirm(self, receipts: Sequence[bytes]) -> Confirmation:
        """``POST /v1/receipts``: hand receipts over; verified ones free pending reclaims.

        Many receipts go in batches within the server's limits (:func:`batches`);
        the answers are merged.

        Returns:
            The :class:`~apps.licensing_api.Confirmation`: ``{"accepted": [{"device_id":
            str, "sequence": int, "freed": [{"feature": str, "count": int}]}],
            "refused": [{"index": int, "code": int, "reason": str, "message": str}]}``
            where ``index`` is the receipt's position in ``receipts``.
        """
        total = Confirmation()
        for offset, part in batches(receipts) or [(0, [])]:
            data, ctype = self._exchange("POST", "/v1/receipts", files_body("receipts", part),
                                         CBOR)
            total.merge(self._read(Confirmation.from_body, data, ctype, "/v1/receipts"), offset)
        return total

    def assign(self, entitlement: str, device: str, feature: str, count: int) -> dict[str, Any]:
        """``POST /v1/assignments``: assign COUNT of FEATURE of an entitlement to a device.

        Returns:
            The assignment: ``{"entitlement", "device_id", "feature", "count"}`` where
            ``count`` is the device's total assignment of that feature from that
            entitlement after this call, plus ``"free"``: what is left unassigned.

        Raises:
            RemoteError: exit code 6, reason ``not-entitled`` (HTTP 409) when the
                entitlement does not hold enough; exit 2 for an unknown entitlement
                or feature.
        """
        body = AssignmentQuery(entitlement, device, feature, count).encode()
        data, ctype = self._exchange("POST", "/v1/assignments", body, JSON)
        return self._object(data, ctype, "/v1/assignments")

    def assign_many(self, assignments: Sequence[AssignmentQuery]) -> list[dict[str, Any]]:
        """``POST /v1/assignments`` in its batch form: every assignment in ONE request and one
        ledger transaction, all or none.

        Returns:
            One :meth:`assign` answer per assignment, in order.

        Raises:
            RemoteError: as :meth:`assign`; the message names the assignment refused
                (``assignment #N of M (device …, FEATURE=COUNT): ...``) and says that
                none was made.
        """
        body = AssignmentBatch(tuple(assignments)).encode()
        data, ctype = self._exchange("POST", "/v1/assignments", body, JSON)
        obj = self._object(data, ctype, "/v1/assignments")
        try:
            return AssignmentBatch.answers(obj, len(assignments))
        except MalformedError as exc:
            raise TransportError(f"{self.url}/v1/assignments answered {exc}") from exc

    def entitle(self, entitlement: str, product: str, features: Mapping[str, int],
                until: str | None = None) -> dict[str, Any]:
        """``POST /v1/entitlements``: record a purchase (adds to an existing entitlement).

        Args:
            until: ISO 8601 date or date-time (a date means the end of that day, UTC),
                or None for perpetual.

        Returns:
            The entitlement as in :meth:`report`'s ``entitlements`` list.
        """
        body = EntitlementQuery(entitlement, product, dict(features), until).encode()
        data, ctype = self._exchange("POST", "/v1/entitlements", body, JSON)
        return self._object(data, ctype, "/v1/entitlements")

    def report(self) -> dict[str, Any]:
        """``GET /v1/report``.

        Returns:
            ``{"entitlements": [{"entitlement", "products": [{"product", "features":
            [{"feature", "count", "until", "assigned", "free"}]}]}],
            "assignments": [{"entitlement", "product", "device_id", "feature", "count"}],
            "installed": {device_id: [{"feature", "count", "not_before", "not_after", "grace"}]},
            "pending_reclaims": [{"response_digest", "device_id", "sequence", "feature",
            "count", "entitlement", "issued"}],
            "devices": [{"device_id", "model", "serial", "sequence", "state_digest",
            "source", "updated"}],
            "tokens": [{"name", "role", "entitlements", "created", "revoked"}],
            "open_responses": int, "operations": int, "systems": [{"top", "servers":
            [{"device_id", "parent"}]}], "grant_returns": [{"time", "child", "detail"}],
            ...}``; times are ISO 8601 text or null.
            A site administrator's token sees only its entitlements, their assignments and
            devices, and no tokens.
            ``used`` is what assignments take (the larger of the assigned count and what
            the device may hold, pending reclaims included); ``free = count - used``.
        """
        data, ctype = self._exchange("GET", "/v1/report")
        return self._object(data, ctype, "/v1/report")

    def health(self) -> dict[str, Any]:
        """``GET /v1/health``: ``{"ok": true}``."""
        data, ctype = self._exchange("GET", "/v1/health")
        return self._object(data, ctype, "/v1/health")

    # ------------------------------------------------------------ HTTP

    def _connection(self) -> http.client.HTTPConnection:
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self._tls)
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)

    def _exchange(self, method: str, path: str, body: bytes | None = None,
                  ctype: str | None = None) -> tuple[bytes, str]:
        """One request; returns the answer body and its content type."""
        headers = {"Accept": f"{CBOR}, {JSON}"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if ctype:
            headers["Content-Type"] = ctype
        conn = self._connection()
        try:
            conn.request(method, self.prefix + path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read(MAX_ANSWER + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise TransportError(self._explain(exc)) from exc
        finally:
            conn.close()
        if len(data) > MAX_ANSWER:
            raise TransportError(f"{self.url}{path}: answer larger than {MAX_ANSWER} bytes")
        if resp.status >= 300:
            raise self._refusal(resp.status, resp.reason, data)
        return data, resp.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def _decode(self, data: bytes, ctype: str, path: str) -> Any:
        try:
            if ctype == CBOR:
                return strict_loads(data, max_size=MAX_ANSWER)
            return json.loads(data)
        except (MalformedError, ValueError, RecursionError) as exc:
            raise TransportError(f"{self.url}{path}: unreadable answer: {exc}") from exc

    def _read(self, decode: Callable[[object], _B], data: bytes, ctype: str, path: str) -> _B:
        """An answer body read with its one decoder (apps.licensing_api)."""
        try:
            return decode(self._decode(data, ctype, path))
        except MalformedError as exc:
            raise TransportError(f"{self.url}{path} answered {exc}") from exc

    def _object(self, data: bytes, ctype: str, path: str) -> dict[str, Any]:
        obj = self._decode(data, ctype, path)
        if not isinstance(obj, dict):
            raise TransportError(f"{self.url}{path} answered something other than an object")
        return obj

    def _explain(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionRefusedError):
            return (f"cannot connect to the licensing server {self.url}: connection refused "
                    "(is licserver serve running there?)")
        if isinstance(exc, TimeoutError):
            return f"no answer from the licensing server {self.url} within {self.timeout:g} s"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (f"the licensing server {self.url} is not who it claims: "
                    f"{exc.verify_message} (give its CA with --licensing-ca FILE)")
        return f"talking to the licensing server {self.url} failed: {exc}"

    def _refusal(self, status: int, phrase: str, data: bytes) -> RemoteError:
        return refusal_from_body(self.url, status, phrase, data)

"""``licadmin show``: any file of this project as readable text or JSON, with its signer and verdict.

Files signed by a device carry the device's public key, so their signature is
always checked (against that key, whose SHA-256 must be the device ID).
Files signed by the vendor are checked only against keys the user gives with
``--trust VENDOR_PUB``; without one the kid is shown and the verdict says it
was not checked. Nothing here trusts a file: it only reports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from agent.cose import ALG_NAMES, PublicKey, SigningKey, decode_sign1, strict_loads
from agent.digest import sha256
from agent.errors import LicensingError, MalformedError
from agent.formats import (
    LICENSE_INFO_MAX,
    SiteInfo,
    describe_kind,
    identify,
    iso,
    verify_receipt,
)
from agent.messages import DeviceInfo, Kind, Payload, Receipt, Request, decode_payload
from agent.protocol import Limits, self_signed_payload, verify_self_signed
from apps.common import read_input, read_public_key
from apps.licadmin.files import short

__all__ = ["describe", "describe_file", "load_trust", "render_text"]

TIME_KEYS = {"created", "issued", "expires", "not_before", "not_after", "applied_at",
             "until", "seats_end"}  # until, seats_end: a receipt's seats still out (issue 15)
LIMITS = Limits(max_file=LICENSE_INFO_MAX)
NOT_CHECKED = "vendor signature not checked (give --trust VENDOR_PUB)"


def load_trust(paths: Sequence[str]) -> list[PublicKey]:
    """The vendor public keys (PEM) given with ``--trust``."""
    return [read_public_key(p, "--trust vendor public key") for p in paths]


def describe_file(path: str, trusted: Sequence[PublicKey]) -> dict[str, Any]:
    data = read_input(path, LICENSE_INFO_MAX)
    try:
        return describe(data, trusted)
    except MalformedError as exc:
        kind = identify(data)
        what = (f"{describe_kind(kind)}" + (f" ({len(data)} bytes)" if kind in (
            "binary", "cbor", "text", "json") else ""))
        raise MalformedError(f"{path} is {what}, expected a file of this project: "
                             f"{exc}") from exc


def describe(data: bytes, trusted: Sequence[PublicKey]) -> dict[str, Any]:
    """``{"kind", "signer", "signature": {"verified": bool | None, "detail"}, "content"}``.

    Raises:
        MalformedError: not a file of this project.
    """
    head = data.lstrip()[:40]
    if head.startswith(b"-----BEGIN"):
        return _pem(data)
    try:
        obj = strict_loads(data, max_size=LICENSE_INFO_MAX, allow_sign1_tag=True)
    except MalformedError as exc:
        raise MalformedError(f"neither CBOR nor a PEM key: {exc}") from exc
    if isinstance(obj, dict) and obj.get("kind") == "site-info":
        return _site_info(SiteInfo.from_map(obj))
    return _signed(data, trusted)


def _signed(data: bytes, trusted: Sequence[PublicKey]) -> dict[str, Any]:
    env = decode_sign1(data, max_size=LICENSE_INFO_MAX)
    payload = decode_payload(strict_loads(env.payload, max_size=LICENSE_INFO_MAX))
    kind = payload.KIND
    alg = ALG_NAMES.get(env.alg, str(env.alg))
    out: dict[str, Any] = {"kind": kind.value, "size": len(data), "sha256": sha256(data).hex()}
    if isinstance(payload, Request | Receipt | DeviceInfo):
        dev = payload.device_id
        out["signer"] = {"by": "device", "device_id": dev, "kid": env.kid.hex(), "alg": alg}
        try:
            verify_self_signed(data, LIMITS)
            sig: dict[str, Any] = {"verified": True,
                                   "detail": "verifies with the device key the file carries"}
        except LicensingError as err:
            sig = {"verified": False, "detail": f"DOES NOT VERIFY: {err}"}
        if kind is Kind.RECEIPT and sig["verified"] and trusted:
            try:
                verify_receipt(data, trusted)
                sig["detail"] += "; genuine receipt of a response a --trust key signed"
            except LicensingError as err:
                sig = {"verified": False, "detail": f"receipt is not genuine: {err}"}
    else:
        out["signer"] = {"by": "vendor", "kid": env.kid.hex(), "alg": alg}
        sig = _vendor_verdict(env.kid, lambda k: env.verify_with(k), trusted)
    out["signature"] = sig
    out["content"] = _content(payload, trusted)
    return out


def _vendor_verdict(kid: bytes, check: Any, trusted: Sequence[PublicKey]) -> dict[str, Any]:
    if not trusted:
        return {"verified": None, "detail": NOT_CHECKED}
    key = next((k for k in trusted if k.kid == kid), None)
    if key is None:
        return {"verified": False,
                "detail": f"signed by vendor key {kid.hex()[:16]}…, none of the --trust keys"}
    try:
        check(key)
    except LicensingError as err:
        return {"verified": False, "detail": f"DOES NOT VERIFY: {err}"}
    return {"verified": True, "detail": f"verifies with the --trust key {kid.hex()[:16]}…"}


def _content(payload: Payload, trusted: Sequence[PublicKey]) -> dict[str, Any]:
    fields = payload.fields()
    if isinstance(payload, Receipt):
        inner = describe(payload.response, trusted)
        fields["response"] = {"sha256": inner["sha256"], "signer": inner["signer"],
                              "signature": inner["signature"],
                              "nonce": inner["content"]["nonce"],
                              "sequence": inner["content"]["sequence"]}
    return {k: _jsonable(k, v) for k, v in fields.items()}


def _jsonable(key: str, v: Any) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, Mapping):
        return {str(k): _jsonable(str(k), x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(key, x) for x in v]
    if key in TIME_KEYS and isinstance(v, int) and not isinstance(v, bool):
        return iso(v)
    return v


def _site_info(bundle: SiteInfo) -> dict[str, Any]:
    devices = []
    good = 0
    for d in bundle.devices:
        try:
            payload, _key = self_signed_payload(d, DeviceInfo, LIMITS)
        except LicensingError as err:
            devices.append({"verified": False, "detail": f"DOES NOT VERIFY: {err}"})
            continue
        good += 1
        f = payload.fields()
        devices.append({"verified": True, **{k: _jsonable(k, f[k]) for k in (
            "device_id", "model", "serial", "sequence", "licenses", "created")}})
    n = len(bundle.devices)
    return {
        "kind": "site-info",
        "signer": None,
        "signature": {"verified": good == n,
                      "detail": f"not signed as a whole; {good} of {n} device-information "
                                f"files verify with their own device keys"},
        "content": {"site": bundle.site, "created": iso(bundle.created), "devices": devices,
                    "failed": [{"server": s, "error": e} for s, e in bundle.failed]},
    }


def _pem(data: bytes) -> dict[str, Any]:
    if b"PRIVATE KEY" in data[:80]:
        key = SigningKey.from_pem(data).public
        kind, note = "private-key", "a signing key: keep it secret (its secret is not shown)"
    else:
        key = PublicKey.from_pem(data)
        kind, note = "public-key", "a public key: use it with --trust to check vendor signatures"
    return {"kind": kind, "signer": None, "signature": {"verified": None, "detail": note},
            "content": {"alg": key.alg_name, "kid": key.kid.hex()}}


def render_text(d: dict[str, Any], name: str) -> list[str]:
    """The readable form: a header (kind, signer, signature), then the fields."""
    lines = [f"{name}: {d['kind']}"]
    s = d.get("signer")
    if s is not None:
        who = (f"device {s['device_id']}" if s["by"] == "device" else "the vendor")
        lines.append(f"  {'signer':<15} {who} ({s['alg']}, kid {s['kid'][:16]}…)")
    v = d["signature"]
    word = {True: "OK", False: "FAILED", None: "NOT CHECKED" if s else "n/a"}[v["verified"]]
    lines.append(f"  {'signature':<15} {word}: {v['detail']}")
    for k, val in d["content"].items():
        lines.extend(_text_field(k, val, "  "))
    return lines


def _text_field(key: str, v: Any, pad: str) -> list[str]:
    if isinstance(v, list):
        if not v:
            return [f"{pad}{key:<15} none"]
        out = [f"{pad}{key}"]
        for item in v:
            out.append(f"{pad}  - {_inline(item)}")
        return out
    if isinstance(v, dict):
        out = [f"{pad}{key}"]
        for k, x in v.items():
            out.extend(_text_field(k, x, pad + "  "))
        return out
    return [f"{pad}{key:<15} {'-' if v is None else v}"]


def _inline(item: Any) -> str:
    if isinstance(item, dict):
        if "feature" in item:
            window = f"{item.get('not_before') or '-'} .. {item.get('not_after') or 'perpetual'}"
            if item.get("op") == "remove":
                return f"remove {item['feature']}"
            op = f"{item['op']} " if "op" in item else ""
            return f"{op}{item['feature']} count {item.get('count', '-')}, {window}"
        if "device_id" in item and "model" in item:
            state = "verifies" if item.get("verified") else "DOES NOT VERIFY"
            return (f"device {short(item['device_id'])} {item['model']} {item.get('serial') or '-'}"
                    f", sequence {item['sequence']}, {len(item['licenses'])} license(s), "
                    f"signature {state}")
        return ", ".join(f"{k} {_inline(x) if isinstance(x, list | dict) else x}"
                         for k, x in item.items())
    if isinstance(item, list):
        return "; ".join(_inline(x) for x in item) or "none"
    return str(item)

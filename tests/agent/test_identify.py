"""``agent.formats.identify`` / ``expect_kind`` / ``loads_json``: what a file is, in a refusal
(issue 13, item 15). Real files of every kind, made by the real vendor and device."""

from __future__ import annotations

import json

import pytest

from agent.cose import SigningKey
from agent.errors import MalformedError
from agent.formats import SiteInfo, describe_kind, expect_kind, identify, loads_json
from agent.messages import Action, TrustKey
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device


def kinds(device: Device) -> dict[str, bytes]:
    req = device.request(Action.ACTIVATE, ["bacnet"])
    resp = device.vendor.issue(req, [Grant("bacnet", 1)], now=device.clock())
    res, _ = device.agent.apply(resp)
    info, _ = device.agent.info()
    v = device.vendor
    return {
        "request": req, "response": resp, "receipt": res.receipt, "device-info": info,
        "license-info": v.license_info({device.agent.status()["device_id"]: ([], [])},
                                       device.clock()),
        "trust-update": v.trust_update([TrustKey(v.public)], 1, device.clock()),
        "site-info": SiteInfo("s", device.clock(), (info,)).encode(),
        "pem-public-key": v.public.to_pem(), "pem-private-key": SigningKey.generate().to_pem(),
        "json": b'{"a": [1, 2]}', "text": b"a = 1\n", "binary": b"\x00\xff\xfe binary",
        "empty": b"  \n", "cbor": b"\xa1\x61a\x01",
    }


def test_every_kind_is_named(device: Device) -> None:
    for kind, data in kinds(device).items():
        assert identify(data) == kind, kind
        expect_kind(data, kind, "f")  # the right kind passes


def test_a_signed_file_with_bytes_appended_is_still_named(device: Device) -> None:
    files = kinds(device)
    assert identify(files["request"] + b"\x00junk") == "request"
    assert identify(files["response"][:-10]) == "response"  # the header is intact


@pytest.mark.parametrize(("given_as", "expected"), [
    ("request", "response"), ("receipt", "trust-update"), ("pem-private-key", "pem-public-key"),
    ("pem-public-key", "pem-private-key"), ("binary", "response"), ("site-info", "license-info"),
    ("empty", "pem-public-key")])
def test_another_kind_is_one_line_naming_both(device: Device, given_as: str,
                                              expected: str) -> None:
    data = kinds(device)[given_as]
    with pytest.raises(MalformedError) as exc:
        expect_kind(data, expected, "dir/my.file")
    msg = str(exc.value)
    assert msg.startswith(f"dir/my.file is {describe_kind(given_as)}")
    assert msg.endswith(f"expected {describe_kind(expected)}")
    assert "\n" not in msg


def test_loads_json_turns_every_failure_into_a_malformed_error() -> None:
    assert loads_json(b'{"a": [1]}', "f") == {"a": [1]}
    for bad in (b"[" * 200_000, b"\xff\xfe", b'{"a": NaN}', b"[1, Infinity]", b"{", b""):
        with pytest.raises(MalformedError, match=r"^body is .*, expected a JSON document: "):
            loads_json(bad, "body")
    with pytest.raises(RecursionError):  # what it guards against
        json.loads(b"[" * 200_000)

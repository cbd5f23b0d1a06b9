"""``agent.formats.identify`` / ``expect_kind`` / ``loads_json``: what a file is, in a refusal
(issue 13, item 15). Real files of every kind, made by the real vendor and device."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _json_loads_as_before(data: bytes) -> tuple[str, object]:
    """What loads_json gave when it always went through json.loads: the value, or the refusal's
    detail (after "expected a JSON document: ")."""
    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not a JSON number")

    try:
        return "ok", json.loads(data.decode("utf-8"), parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        return "refused", str(exc) or type(exc).__name__


_JSON_TOKENS = ['{', '}', '[', ']', ',', ':', ' ', '\n', '\t', '"a"', '"\\u00e9"', '"\\ud800"',
                '"x\\n"', '"\\q"', '"\x01"', '1', '-0', '1.5e3', '1e999', '01', '-', 'true',
                'null', 'NaN', '-Infinity', 'Infinity', '\ufeff', '"é"', 'x', '9' * 30]


@settings(max_examples=1500, deadline=None)
@given(st.one_of(
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                 | st.text(max_size=8),
                 lambda kids: st.lists(kids, max_size=4)
                 | st.dictionaries(st.text(max_size=4), kids, max_size=4), max_leaves=12)
    .map(lambda v: json.dumps(v, ensure_ascii=False)),
    st.lists(st.sampled_from(_JSON_TOKENS), max_size=12).map("".join),
), st.sampled_from(["", " ", "\n\t", "\r "]), st.sampled_from(["", " ", "\n", "x", "]", " 1"]))
def test_loads_json_accepts_and_refuses_exactly_as_json_loads(text: str, before: str,
                                                              after: str) -> None:
    """Issue 17 item 3: documents go through json's C scanner without importing json (a
    twentieth of `licagent check` with a facts file); what is accepted, the value, and every
    refusal's words stay json.loads's own."""
    data = (before + text + after).encode("utf-8", "surrogatepass")
    want = _json_loads_as_before(data)
    try:
        got: tuple[str, object] = ("ok", loads_json(data, "body"))
    except MalformedError as exc:
        got = ("refused", str(exc).split("expected a JSON document: ", 1)[1])
    assert got == want
    if want[0] == "ok":
        assert type(got[1]) is type(want[1])


def test_a_well_formed_document_needs_no_json_package() -> None:
    code = ("import sys\nfrom agent.formats import loads_json\n"
            "assert loads_json(b' {\"model\": \"AS-P\", \"macs\": [\"00:80:f4:00:00:0a\"]}\\n',"
            " 'f') == {'model': 'AS-P', 'macs': ['00:80:f4:00:00:0a']}\n"
            "print('json' in sys.modules)\n"
            )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"

"""Hostile inputs: bounded memory, strict CBOR, strict COSE headers, and no check-then-use gap.

Each hostile file is refused with the documented class (exit code) and leaves
the store's state slots byte-for-byte as they were. Memory is measured
(tracemalloc in-process, ru_maxrss in a fresh child process); time never is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent import errors
from agent.cose import (
    ALG_EDDSA,
    COSE_SIGN1_TAG,
    HDR_ALG,
    HDR_CONTENT_TYPE,
    HDR_KID,
    SigningKey,
    canonical,
    decode_sign1,
    sign1,
    strict_loads,
)
from agent.messages import Action, ChangeOp, Kind, LicenseChange, Request, Response
from agent.protocol import Limits
from agent.service import Agent
from apps.common import read_input
from simulators.licensing_server.vendor import Vendor
from tests.conftest import Device

MB = 1024 * 1024
MEMORY_CAP = 50 * MB
MAX_FILE = Limits().max_file
RESPONSE_CT = Kind.RESPONSE.content_type

#: CBOR heads that declare far more content than follows (byte/text strings, arrays, maps)
HUGE_HEADS = {
    "bstr-2^32": bytes.fromhex("5AFFFFFFFF"),
    "bstr-2^63": bytes.fromhex("5B7FFFFFFFFFFFFFFF"),
    "bstr-2^64": bytes.fromhex("5BFFFFFFFFFFFFFFFF"),
    "tstr-2^32": bytes.fromhex("7AFFFFFFFF"),
    "tstr-2^63": bytes.fromhex("7B7FFFFFFFFFFFFFFF"),
    "array-2^64": bytes.fromhex("9BFFFFFFFFFFFFFFFF"),
    "map-2^64": bytes.fromhex("BBFFFFFFFFFFFFFFFF"),
}


# ---------------------------------------------------------------- helpers


@dataclass
class Pending:
    """A device with one outstanding request and the vendor's correct answer, unsigned."""

    device: Device
    vendor: Vendor
    request: Request
    response: Response

    def payload_map(self) -> dict[str, Any]:
        return {"v": 1, "kind": "response", **self.response.fields()}

    def signed(self, payload: bytes) -> bytes:
        """``payload`` (raw bytes, possibly hostile) in a correct envelope, vendor-signed."""
        return sign1(payload, self.vendor.key, RESPONSE_CT)

    def good(self) -> bytes:
        return self.vendor.sign(self.response)


@pytest.fixture
def pending(device: Device, vendor: Vendor) -> Pending:
    device.activate(bacnet=4)
    req = Vendor.read_request(device.request(Action.ACTIVATE, ["modbus"]))
    resp = vendor.response_for(req, [LicenseChange(ChangeOp.ADD, "modbus", 2)], device.clock())
    return Pending(device, vendor, req, resp)


def sign_raw(key: SigningKey, protected: bytes, unprotected: dict[Any, Any],
             payload: bytes) -> bytes:
    """A COSE_Sign1 with hand-made headers, correctly signed over the given bytes."""
    sig = key.sign(cbor2.dumps(["Signature1", protected, b"", payload]))
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, unprotected, payload, sig]))


def refused(device: Device, data: bytes, err: type[errors.LicensingError], code: int) -> str:
    """``apply(data)`` raises ``err`` with exit code ``code``; the state slots do not change."""
    before = device.store_bytes()
    state_before = device.agent.state()[0]
    with pytest.raises(err) as info:
        device.agent.apply(data)
    assert info.value.exit_code == code
    assert device.store_bytes() == before
    assert device.agent.state()[0] == state_before
    assert device.leftovers() == []
    return str(info.value)


def with_raw_field(m: dict[str, Any], name: str, raw_item: bytes) -> bytes:
    """Canonical CBOR of ``m`` with field ``name`` replaced by the raw (hostile) CBOR item."""
    marker = "\u2603-raw-field-marker-\u2603"
    encoded = canonical({**m, name: marker})
    assert encoded.count(cbor2.dumps(marker)) == 1
    return encoded.replace(cbor2.dumps(marker), raw_item)


def unprotected_offset(envelope: bytes) -> int:
    """Offset of the unprotected header map in a tagged COSE_Sign1 (tag 18, array of 4)."""
    assert envelope[:2] == b"\xd2\x84"
    return 2 + len(cbor2.dumps(cbor2.loads(envelope).value[0]))


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated (as tracemalloc sees them) while ``fn`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        try:
            fn()
        except errors.LicensingError:
            pass
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def map_with_duplicate(m: dict[str, Any], dup_key: str, dup_value: Any) -> bytes:
    """CBOR map of ``m`` plus a second entry for ``dup_key`` (cbor2 cannot encode that)."""
    items = [*m.items(), (dup_key, dup_value)]
    assert len(items) <= 23
    return bytes([0xA0 + len(items)]) + b"".join(
        cbor2.dumps(k) + cbor2.dumps(v) for k, v in items
    )


# ---------------------------------------------------------------- size and memory


@pytest.mark.parametrize("head", HUGE_HEADS.values(), ids=HUGE_HEADS.keys())
def test_huge_declared_length_is_refused_in_bounded_memory(head: bytes, pending: Pending) -> None:
    dev = pending.device
    envelope = bytes([0xD2, 0x84]) + head  # tag 18, array of 4, then the hostile item
    for data in (head, head + b"\x00" * 100, envelope):
        for parse in (
            lambda d=data: strict_loads(d, max_size=MAX_FILE),
            lambda d=data: strict_loads(d, max_size=MAX_FILE, allow_sign1_tag=True),
            lambda d=data: decode_sign1(d, max_size=MAX_FILE),
        ):
            with pytest.raises(errors.MalformedError):
                parse()
            assert peak_memory(parse) < MEMORY_CAP
        refused(dev, data, errors.MalformedError, 3)
        assert peak_memory(lambda d=data: dev.agent.apply(d)) < MEMORY_CAP
    # the same hostile item inside a correctly signed payload
    signed = pending.signed(head)
    refused(dev, signed, errors.MalformedError, 3)
    assert peak_memory(lambda: dev.agent.apply(signed)) < MEMORY_CAP


_CHILD = r"""
import json, resource, sys
from agent.cose import decode_sign1, strict_loads
from agent.errors import LicensingError
inputs = [bytes.fromhex(h) for h in json.load(sys.stdin)]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome = []
for d in inputs:
    for fn in (lambda: strict_loads(d, max_size=1 << 20, allow_sign1_tag=True),
               lambda: decode_sign1(d, max_size=1 << 20)):
        try:
            fn()
            outcome.append("accepted")
        except LicensingError as e:
            outcome.append(type(e).__name__)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grew_kib": after - before, "outcome": outcome}))
"""


def test_hostile_cbor_resident_memory_in_a_fresh_process() -> None:
    """ru_maxrss sees C allocations too (tracemalloc only sees Python's allocators)."""
    inputs = [*HUGE_HEADS.values(), b"\x81" * 100_000 + b"\x01", b"\xa1\x01" * 100_000 + b"\x01",
              bytes([0xD2, 0x84]) + HUGE_HEADS["bstr-2^32"]]
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], input=json.dumps([d.hex() for d in inputs]),
        capture_output=True, text=True, check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    res = json.loads(out.stdout)
    assert res["outcome"] == ["MalformedError"] * (2 * len(inputs))
    assert res["grew_kib"] * 1024 < MEMORY_CAP


def test_deep_nesting(pending: Pending) -> None:
    dev = pending.device
    deep = b"\x81" * 100_000 + b"\x01"
    # at the file limit, the size check refuses it before any decoding
    with pytest.raises(errors.MalformedError, match="larger than"):
        decode_sign1(deep, max_size=MAX_FILE)
    msg = refused(dev, deep, errors.MalformedError, 3)
    assert "larger than" in msg
    # with a limit large enough to let it through, the depth limit refuses it
    for data in (deep, b"\xa1\x01" * 100_000 + b"\x01", b"\xd2" * 100_000 + b"\x01"):
        with pytest.raises(errors.MalformedError, match="depth"):
            strict_loads(data, max_size=MB)
        assert peak_memory(lambda d=data: strict_loads(d, max_size=MB)) < MEMORY_CAP
    with pytest.raises(errors.MalformedError, match="indefinite"):
        strict_loads(b"\x9f" * 100_000, max_size=MB)
    # the depth limit sits exactly at 16 levels
    assert strict_loads(b"\x81" * 16 + b"\x01", max_size=MAX_FILE) is not None
    with pytest.raises(errors.MalformedError, match="depth"):
        strict_loads(b"\x81" * 17 + b"\x01", max_size=MAX_FILE)
    # deep nesting inside a signed payload: refused, not a crash
    payload = with_raw_field(pending.payload_map(), "changes", b"\x81" * 40 + b"\x80")
    msg = refused(dev, pending.signed(payload), errors.MalformedError, 3)
    assert "depth" in msg


INDEFINITE = {
    "bstr": bytes.fromhex("5F41614162FF"),
    "tstr": bytes.fromhex("7F61616162FF"),
    "array": bytes.fromhex("9F0102FF"),
    "map": bytes.fromhex("BF616101FF"),
}


@pytest.mark.parametrize("item", INDEFINITE.values(), ids=INDEFINITE.keys())
def test_indefinite_length_items_refused(item: bytes, pending: Pending) -> None:
    with pytest.raises(errors.MalformedError, match="indefinite"):
        strict_loads(item, max_size=MAX_FILE)
    # the definite form of the same value is fine: only the encoding is refused
    assert strict_loads(cbor2.dumps(cbor2.loads(item)), max_size=MAX_FILE) == cbor2.loads(item)
    dev = pending.device
    refused(dev, item, errors.MalformedError, 3)
    # as a field inside an otherwise correct, vendor-signed payload
    payload = with_raw_field(pending.payload_map(), "device_id", item)
    refused(dev, pending.signed(payload), errors.MalformedError, 3)


def test_indefinite_length_payload_map_and_envelope(pending: Pending) -> None:
    dev = pending.device
    m = pending.payload_map()
    indefinite_map = b"\xbf" + b"".join(cbor2.dumps(k) + cbor2.dumps(v)
                                        for k, v in m.items()) + b"\xff"
    assert cbor2.loads(indefinite_map) == m  # same content, indefinite-length encoding
    refused(dev, pending.signed(indefinite_map), errors.MalformedError, 3)
    good = pending.good()
    assert good[:2] == b"\xd2\x84"
    indefinite_envelope = b"\xd2\x9f" + good[2:] + b"\xff"
    refused(dev, indefinite_envelope, errors.MalformedError, 3)
    dev.agent.apply(good)  # the genuine file still applies


# ---------------------------------------------------------------- duplicate keys


def test_duplicate_keys_in_signed_payload_refused(pending: Pending) -> None:
    m = pending.payload_map()
    dev = pending.device
    # the same value twice, and a different value the second time (which one would win?)
    for dup_value in (m["changes"], [{"op": "add", "feature": "modbus", "count": 1000}]):
        payload = map_with_duplicate(m, "changes", dup_value)
        msg = refused(dev, pending.signed(payload), errors.MalformedError, 3)
        assert "uplicate" in msg
    dev.agent.apply(pending.good())
    assert {lic.feature: lic.count for lic in dev.agent.state()[0].licenses} == {
        "bacnet": 4, "modbus": 2}


def test_duplicate_keys_in_protected_header_refused(pending: Pending) -> None:
    key = pending.vendor.key
    kid = key.public.kid
    payload = pending.response.encode()
    heads = [
        # alg twice, the second time an algorithm the device would refuse
        [(HDR_ALG, ALG_EDDSA), (HDR_CONTENT_TYPE, RESPONSE_CT), (HDR_KID, kid), (HDR_ALG, -35)],
        # kid twice
        [(HDR_ALG, ALG_EDDSA), (HDR_CONTENT_TYPE, RESPONSE_CT), (HDR_KID, kid), (HDR_KID, kid)],
    ]
    for items in heads:
        protected = bytes([0xA0 + len(items)]) + b"".join(
            cbor2.dumps(k) + cbor2.dumps(v) for k, v in items)
        data = sign_raw(key, protected, {}, payload)
        with pytest.raises(errors.MalformedError, match="uplicate"):
            decode_sign1(data, max_size=MAX_FILE)
        refused(pending.device, data, errors.MalformedError, 3)


def test_duplicate_keys_in_unprotected_header_refused(pending: Pending) -> None:
    good = pending.good()
    i = unprotected_offset(good)
    assert good[i] == 0xA0  # the empty unprotected map
    data = good[:i] + b"\xa2\x05\x40\x05\x40" + good[i + 1:]  # {5: h'', 5: h''}
    with pytest.raises(errors.MalformedError, match="uplicate"):
        decode_sign1(data, max_size=MAX_FILE)


# ---------------------------------------------------------------- integers and tags


@pytest.mark.parametrize("base", [2**64 - 2, 2**63 - 1, 2**63, 2**64 - 1])
def test_sequence_near_2_64_is_malformed(base: int, pending: Pending) -> None:
    """The dataclass refuses such a response, so the payload map is built and signed by hand."""
    m = pending.payload_map()
    m["base_sequence"] = base
    m["sequence"] = base + 1  # 2**64 and beyond is a bignum (tag 2) in CBOR
    data = pending.signed(cbor2.dumps(m))
    msg = refused(pending.device, data, errors.MalformedError, 3)
    assert "sequence" in msg or "tag" in msg


SEMANTIC_TAGS = {
    "regex-35": cbor2.CBORTag(35, "^(a+)+$"),
    "bignum-2": cbor2.CBORTag(2, b"\x01" + bytes(8)),
    "negbignum-3": cbor2.CBORTag(3, b"\x01" + bytes(8)),
    "datetime-1": cbor2.CBORTag(1, 1_800_000_000),
    "datetime-0": cbor2.CBORTag(0, "2027-01-15T00:00:00Z"),
    "decimal-4": cbor2.CBORTag(4, [-2, 27315]),
    "shareable-28": cbor2.CBORTag(28, 1_800_000_000),
    "selfdescribe-55799": cbor2.CBORTag(55799, 1_800_000_000),
    "mime-36": cbor2.CBORTag(36, "text/plain"),
    "uuid-37": cbor2.CBORTag(37, bytes(16)),
    "set-258": cbor2.CBORTag(258, [1]),
    "unknown-999": cbor2.CBORTag(999, 1),
}


@pytest.mark.parametrize("tag", SEMANTIC_TAGS.values(), ids=SEMANTIC_TAGS.keys())
def test_semantic_tags_in_signed_payload_refused(tag: cbor2.CBORTag, pending: Pending) -> None:
    m = pending.payload_map()
    m["issued"] = tag
    refused(pending.device, pending.signed(cbor2.dumps(m)), errors.MalformedError, 3)
    # a tag around the whole payload map, too
    refused(pending.device, pending.signed(cbor2.dumps(cbor2.CBORTag(tag.tag, m))),
            errors.MalformedError, 3)


def test_tag_18_is_only_allowed_as_the_envelope(pending: Pending) -> None:
    good = pending.good()
    m = pending.payload_map()
    m["issued"] = cbor2.CBORTag(COSE_SIGN1_TAG, 1)
    refused(pending.device, pending.signed(cbor2.dumps(m)), errors.MalformedError, 3)
    # an envelope wrapped in a second tag 18 is not an envelope
    refused(pending.device, b"\xd2" + good, errors.MalformedError, 3)
    # the untagged array is not accepted either
    refused(pending.device, good[1:], errors.MalformedError, 3)


# ---------------------------------------------------------------- envelope shape


def test_trailing_bytes_after_cose_item_refused(pending: Pending) -> None:
    good = pending.good()
    for tail in (b"\x00", b"\xff", b"\n", good):
        msg = refused(pending.device, good + tail, errors.MalformedError, 3)
        assert "trailing" in msg
    pending.device.agent.apply(good)


def test_file_larger_than_limit_refused_before_decoding(pending: Pending) -> None:
    dev = pending.device
    good = pending.good()
    # would be "trailing bytes" if it were decoded: the size check comes first
    msg = refused(dev, good + bytes(MAX_FILE), errors.MalformedError, 3)
    assert "larger than" in msg and str(MAX_FILE) in msg
    # would blow the depth limit (or worse) if it were decoded
    msg = refused(dev, b"\x81" * (MAX_FILE + 1), errors.MalformedError, 3)
    assert "larger than" in msg
    # the limit is on the exact length: one byte under the file's size refuses the real file
    tight = Agent(dev.directory, dev.facts, clock=dev.clock,
                  limits=Limits(max_file=len(good) - 1))
    before = dev.store_bytes()
    with pytest.raises(errors.MalformedError, match="larger than"):
        tight.apply(good)
    assert dev.store_bytes() == before
    exact = Agent(dev.directory, dev.facts, clock=dev.clock, limits=Limits(max_file=len(good)))
    res, _ = exact.apply(good)
    assert not res.already_applied
    assert res.state.sequence == pending.response.sequence


MOVES: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {
    # name: (labels kept in the protected header, labels moved to the unprotected header)
    "alg": ((HDR_CONTENT_TYPE, HDR_KID), (HDR_ALG,)),
    "kid": ((HDR_ALG, HDR_CONTENT_TYPE), (HDR_KID,)),
    "alg+kid": ((HDR_CONTENT_TYPE,), (HDR_ALG, HDR_KID)),
    "content-type": ((HDR_ALG, HDR_KID), (HDR_CONTENT_TYPE,)),
    "kid-in-both": ((HDR_ALG, HDR_CONTENT_TYPE, HDR_KID), (HDR_KID,)),
    "alg-in-both": ((HDR_ALG, HDR_CONTENT_TYPE, HDR_KID), (HDR_ALG,)),
}


@pytest.mark.parametrize("move", MOVES.values(), ids=MOVES.keys())
def test_header_parameters_in_unprotected_header_refused(
    move: tuple[tuple[int, ...], tuple[int, ...]], pending: Pending
) -> None:
    key = pending.vendor.key
    values = {HDR_ALG: key.public.alg, HDR_CONTENT_TYPE: RESPONSE_CT, HDR_KID: key.public.kid}
    kept, moved = move
    protected = canonical({k: values[k] for k in kept})
    data = sign_raw(key, protected, {k: values[k] for k in moved}, pending.response.encode())
    msg = refused(pending.device, data, errors.MalformedError, 3)
    assert "protected header" in msg
    pending.device.agent.apply(pending.good())


@pytest.mark.parametrize("alg", [-35, -36, -37, -257, 0, 1, -9, "EdDSA", None],
                         ids=repr)
def test_unsupported_alg_is_a_trust_error(alg: object, pending: Pending) -> None:
    key = pending.vendor.key
    hdr: dict[int, object] = {HDR_CONTENT_TYPE: RESPONSE_CT, HDR_KID: key.public.kid}
    if alg is not None:
        hdr[HDR_ALG] = alg
    data = sign_raw(key, canonical(hdr), {}, pending.response.encode())
    refused(pending.device, data, errors.TrustError, 4)


@pytest.mark.parametrize("alg", [[], [-8], {1: -8}, b"\xf8", True], ids=repr)
def test_alg_of_the_wrong_cbor_type_is_refused_not_a_crash(alg: object, pending: Pending) -> None:
    """Regression: an array as alg made decode_sign1 raise TypeError (unhashable)."""
    key = pending.vendor.key
    hdr = {HDR_ALG: alg, HDR_CONTENT_TYPE: RESPONSE_CT, HDR_KID: key.public.kid}
    data = sign_raw(key, cbor2.dumps(hdr), {}, pending.response.encode())
    refused(pending.device, data, errors.TrustError, 4)


def test_float_alg_equal_to_eddsa_is_refused(pending: Pending) -> None:
    """-8.0 == -8 in Python: the label must be an integer, not merely compare equal to one."""
    key = pending.vendor.key
    hdr = {HDR_ALG: -8.0, HDR_CONTENT_TYPE: RESPONSE_CT, HDR_KID: key.public.kid}
    data = sign_raw(key, cbor2.dumps(hdr), {}, pending.response.encode())
    refused(pending.device, data, errors.TrustError, 4)


def test_reencoded_envelope_is_refused_and_does_not_block_the_real_file(pending: Pending) -> None:
    """Regression: the unsigned envelope must have exactly one encoding.

    A copy with a non-shortest length in front of the signature carries the
    same signed bytes; accepting it would make the genuine vendor file a
    "replay" (and the receipt would carry bytes the vendor never wrote).
    """
    good = pending.good()
    sig = cbor2.loads(good).value[3]
    assert good.endswith(b"\x58\x40" + sig)
    variants = [
        good[: -len(sig) - 2] + b"\x59\x00\x40" + sig,  # 2-byte length for the signature
        b"\xd8\x12" + good[1:],  # tag 18 in a 1-byte argument
    ]
    i = unprotected_offset(good)
    variants.append(good[:i] + b"\xb9\x00\x00" + good[i + 1:])  # {} with a 2-byte count
    for v in variants:
        assert cbor2.loads(v).value == cbor2.loads(good).value
        refused(pending.device, v, errors.MalformedError, 3)
    res, _ = pending.device.agent.apply(good)
    assert not res.already_applied


# ---------------------------------------------------------------- check-then-use


def test_apply_uses_the_bytes_read_not_the_file_now_on_disk(pending: Pending, tmp_path: Path) -> None:
    dev, vendor, req = pending.device, pending.vendor, pending.request
    now = dev.clock()
    first = vendor.sign(vendor.response_for(req, [LicenseChange(ChangeOp.ADD, "modbus", 2)], now))
    other = vendor.sign(vendor.response_for(req, [LicenseChange(ChangeOp.ADD, "modbus", 9)], now))
    assert first != other
    path = tmp_path / "response.cbor"
    path.write_bytes(first)
    data = read_input(str(path), dev.agent.limits.max_file)
    path.write_bytes(other)  # swapped after the read, before the apply
    res, _ = dev.agent.apply(data)
    assert res.state.licenses == dev.agent.state()[0].licenses
    counts = {lic.feature: lic.count for lic in res.state.licenses}
    assert counts == {"bacnet": 4, "modbus": 2}
    assert res.response.changes == (LicenseChange(ChangeOp.ADD, "modbus", 2),)
    receipt = strict_loads(decode_sign1(res.receipt, max_size=MAX_FILE).payload,
                           max_size=MAX_FILE)
    assert receipt["response"] == first
    # the swapped-in file is now a refusal (same request, already answered)
    refused(dev, path.read_bytes(), errors.AlreadyAppliedError, 6)


def test_read_input_reads_once_and_caps(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old contents")
    data = read_input(str(path), 100)
    path.write_bytes(b"new contents, longer")
    assert data == b"old contents"
    # capped at limit + 1 bytes, so that an oversized file is refused without reading it all
    big = tmp_path / "big"
    big.write_bytes(b"\x81" * (10 * MAX_FILE))
    capped = read_input(str(big), MAX_FILE)
    assert len(capped) == MAX_FILE + 1
    with pytest.raises(errors.MalformedError, match="larger than"):
        decode_sign1(capped, max_size=MAX_FILE)


def test_read_input_reads_files_that_do_not_say_their_size(tmp_path: Path) -> None:
    """read_input asks for what fstat says the file holds (not a buffer of the whole cap for
    every small file, issue 17 item 5), so a file whose size says nothing, a pipe, must still
    be read whole, and still capped at limit + 1 bytes."""
    import os
    import threading

    for payload, limit, want in ((b"x" * 20_000, MAX_FILE, b"x" * 20_000),
                                 (b"y" * 5000, 1000, b"y" * 1001)):
        fifo = tmp_path / f"fifo-{limit}"
        os.mkfifo(fifo)

        def feed(fifo: Path = fifo, payload: bytes = payload) -> None:
            with open(fifo, "wb") as w:
                try:
                    w.write(payload)
                except BrokenPipeError:  # the reader stopped at its cap
                    pass

        t = threading.Thread(target=feed)
        t.start()
        assert read_input(str(fifo), limit) == want
        t.join(10)
    with pytest.raises(errors.UsageError):
        read_input(str(tmp_path / "missing"), 100)

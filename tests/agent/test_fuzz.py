"""Fuzzing every parser of outside bytes: nothing but a LicensingError ever escapes.

Three kinds of input:

* random bytes and random CBOR (including COSE_Sign1-shaped envelopes);
* random mutations (bit flips, byte insert/delete, truncation, splicing) of
  valid response, request, receipt, device-info, trust-update and
  license-info files; a mutated response applied to a real store leaves the
  state slots byte-for-byte unchanged unless it *is* the valid file;
* validly signed payloads whose fields were replaced with random CBOR, to
  reach the schema checks behind the signature.

``FUZZ_EXAMPLES`` sets the number of examples per test (``make fuzz``: 20000).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol
from agent.cose import (
    COSE_SIGN1_TAG,
    SigningKey,
    decode_sign1,
    sign1,
    strict_loads,
)
from agent.errors import LicensingError, TrustError
from agent.formats import read_device_info, verify_receipt
from agent.messages import (
    Action,
    Kind,
    License,
    LicenseInfo,
    TrustKey,
    decode_payload,
)
from agent.protocol import AgentState, Limits
from agent.store import KEY_FILE, decode_slot
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import T0, Device, Site
from tests.support.fuzzcount import record_inputs

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
#: generated inputs fed to the parsers by this module's tests (``make fuzz`` sums them)
RUNS = [0]
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)
MAX_FILE = Limits().max_file


@pytest.fixture(autouse=True, scope="module")
def _count_inputs() -> Iterator[None]:
    yield
    record_inputs(RUNS[0])


# ---------------------------------------------------------------- the world under test


@dataclass
class World:
    """A real store with one applied response and one outstanding request, plus valid files."""

    device: Device
    vendor: Vendor
    key: SigningKey  # the device key, read back from the store
    state: AgentState  # the state in the store, for the pure protocol functions
    now: int
    applied: bytes  # the latest applied response (re-applying it is idempotent)
    pending: bytes  # the correct response to the outstanding request (not applied)
    request: bytes
    receipt: bytes
    device_info: bytes
    trust_update: bytes
    license_info: bytes
    snapshot: dict[str, bytes]

    @property
    def files(self) -> list[bytes]:
        return [self.pending, self.applied, self.request, self.receipt, self.device_info,
                self.trust_update, self.license_info]

    def restore(self) -> None:
        """Put every file of the store back as it was (refusals append to the journal)."""
        d = self.device.directory
        for name, data in self.snapshot.items():
            p = d / name
            if not p.exists() or p.read_bytes() != data:
                p.write_bytes(data)


def make_world(root: Path) -> World:
    """Build the world once per test (the examples of a test share it)."""
    vendor = Vendor(SigningKey.generate())
    site = Site(vendor, root)
    dev = site.device()
    now = site.clock()
    req1 = dev.request(Action.ACTIVATE, ["bacnet", "modbus"])
    applied = vendor.issue(req1, [Grant("bacnet", 4, not_after=now + 86400 * 365),
                                  Grant("modbus", 2)], now=now)
    res, _ = dev.agent.apply(applied)
    request = dev.request(Action.RENEW, ["bacnet"])
    pending = vendor.issue(request, [Grant("bacnet", 8, not_after=now + 2 * 86400 * 365)],
                           now=now)
    info, _ = dev.agent.info()
    trust = vendor.trust_update([TrustKey(vendor.public), TrustKey(SigningKey.generate().public,
                                                                   not_before=now)], 1, now)
    lic_info = vendor.license_info(
        {dev.agent.state()[0].device_id: ([License("modbus", 2)], [License("lon", 1)])}, now)
    key = SigningKey.from_pem((dev.directory / KEY_FILE).read_bytes())
    state = dev.agent.state()[0]
    snapshot = {p.name: p.read_bytes() for p in dev.directory.iterdir() if p.is_file()}
    return World(dev, vendor, key, state, now, applied, pending, request, res.receipt, info,
                 trust, lic_info, snapshot)


def make_tmp(tmp_path: Path) -> Path:
    d = tmp_path / "world"
    d.mkdir()
    return d


# ---------------------------------------------------------------- parsers


def parsers(w: World) -> dict[str, Callable[[bytes], object]]:
    """Every function that reads bytes from outside (or from disk), bound to the world."""
    mac_key = w.key.secret_digest(b"store-mac")
    return {
        "strict_loads": lambda d: strict_loads(d, max_size=MAX_FILE),
        "strict_loads_sign1": lambda d: strict_loads(d, max_size=MAX_FILE, allow_sign1_tag=True),
        "decode_sign1": lambda d: decode_sign1(d, max_size=MAX_FILE),
        "decode_payload": lambda d: decode_payload(strict_loads(d, max_size=MAX_FILE)),
        "apply_response": lambda d: protocol.apply_response(w.state, d, w.now, w.key),
        "apply_trust_update": lambda d: protocol.apply_trust_update(w.state, d, w.now),
        "license_info": lambda d: protocol.verify_vendor_file(w.state, d, w.now, LicenseInfo),
        "read_request": Vendor.read_request,
        "verify_receipt": lambda d: verify_receipt(d, [w.vendor.public]),
        "read_device_info": read_device_info,
        "decode_slot": lambda d: decode_slot(mac_key, d),
    }


def run_parsers(w: World, data: bytes) -> dict[str, str]:
    """Feed ``data`` to every parser; anything but a LicensingError propagates and fails."""
    out: dict[str, str] = {}
    for name, fn in parsers(w).items():
        try:
            result = fn(data)
        except LicensingError as exc:
            out[name] = type(exc).__name__
            continue
        out[name] = "accepted"
        if name == "apply_response":
            assert isinstance(result, protocol.ApplyResult)
            check_accepted_response(w, data, result)
    return out


def check_accepted_response(w: World, data: bytes, res: protocol.ApplyResult) -> None:
    """An accepted response is the next link of the chain, and its receipt is genuine."""
    if res.already_applied:
        assert data == w.applied
        assert res.state == w.state
        return
    assert res.state.sequence == w.state.sequence + 1
    assert res.response.base_sequence == w.state.sequence
    assert res.response.nonce in {o.nonce for o in w.state.outstanding}
    assert res.state.outstanding == ()
    rc = verify_receipt(res.receipt, [w.vendor.public])
    assert rc.response == data
    assert rc.licenses == res.state.licenses


# ---------------------------------------------------------------- strategies

INTERESTING_INTS = [0, 1, -1, 23, 24, 255, 256, 2**31, 2**32, 2**40, 2**40 + 1, 2**63 - 2,
                    2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**64), T0, 366 * 86400]
TEXTS = ["add", "update", "remove", "activate", "renew", "reclaim", *(k.value for k in Kind),
         "bacnet", "modbus", "lon", "", "a" * 300, "-bad", "x" * 65]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**64), max_value=2**64 - 1),
    st.sampled_from(INTERESTING_INTS),
    st.floats(),
    st.binary(max_size=70),
    st.text(max_size=20),
    st.sampled_from(TEXTS),
    st.just(cbor2.undefined),
    st.integers(min_value=0, max_value=255).filter(lambda n: n < 20 or n > 31).map(
        cbor2.CBORSimpleValue),
)
TAGS = [0, 1, 2, 3, 4, 18, 24, 28, 29, 35, 36, 37, 258, 55799]


def cbor_tree(tags: bool) -> st.SearchStrategy[Any]:
    def extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        branches = [
            st.lists(children, max_size=5),
            st.dictionaries(st.text(max_size=10) | st.integers(-10, 10), children, max_size=5),
        ]
        if tags:
            branches.append(st.builds(cbor2.CBORTag, st.sampled_from(TAGS)
                                      | st.integers(min_value=0, max_value=2**32), children))
        return st.one_of(*branches)

    return st.recursive(scalars, extend, max_leaves=12)


plain_values = cbor_tree(tags=False)
#: random CBOR values; semantic tags in about one in three
cbor_values = st.one_of(plain_values, plain_values, cbor_tree(tags=True))


def encode(value: Any) -> bytes:
    return cbor2.dumps(value)


def envelopes(kids: list[bytes], payloads: list[bytes]) -> st.SearchStrategy[bytes]:
    """Tagged COSE_Sign1 envelopes with plausible-to-hostile headers, payloads, signatures."""
    alg = st.sampled_from([-8, -7, -35, -257, 0, -8.0, True]) | cbor_values
    kid = st.sampled_from(kids) | st.binary(max_size=70) | cbor_values
    ctype = st.sampled_from([k.content_type for k in Kind]) | cbor_values
    protected_map = st.builds(
        lambda named, extra: {**extra, **named},
        st.fixed_dictionaries({}, optional={1: alg, 3: ctype, 4: kid}),
        st.dictionaries(st.integers(-40, 40) | st.text(max_size=3), cbor_values, max_size=2),
    )
    protected = st.one_of(protected_map.map(encode), protected_map.map(encode),
                          st.binary(max_size=40))
    unprotected = st.one_of(
        st.just({}), st.just({}),
        st.dictionaries(st.integers(-40, 40) | st.text(max_size=3), cbor_values, max_size=3),
    )
    payload = st.one_of(st.sampled_from(payloads), cbor_values.map(encode),
                        st.binary(max_size=80))
    signature = st.one_of(st.binary(min_size=64, max_size=64), st.binary(max_size=80),
                          cbor_values)
    return st.builds(
        lambda *items: encode(cbor2.CBORTag(COSE_SIGN1_TAG, list(items))),
        protected, unprotected, payload, signature,
    )


def random_inputs(kids: list[bytes], payloads: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=512),
        cbor_values.map(encode),
        envelopes(kids, payloads),
        envelopes(kids, payloads),
        st.builds(lambda head, tail: head + tail,
                  st.sampled_from([b"\xd2\x84", b"\xd2\x84\x43\xa1\x01\x27\xa0",
                                   b"\xd2\x84\x58\x40", b"\x84", b"\xd2"]),
                  st.binary(max_size=200)),
    )


#: in-place changes are weighted up: they keep the envelope parseable more often, so the
#: signature and header checks get exercised, not only the CBOR decoder
MUTATIONS = ("flip", "flip", "flip", "set", "set", "insert", "delete", "truncate", "splice",
             "duplicate")


@st.composite
def mutated_files(draw: st.DrawFn, files: list[bytes]) -> bytes:
    """A valid file after 1-4 random byte-level mutations."""
    data = bytearray(draw(st.sampled_from(files)))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(MUTATIONS))
        pos = draw(st.integers(min_value=0, max_value=max(len(data), 1) * 2)) % (len(data) + 1)
        if op == "flip" and data:
            data[pos % len(data)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos % len(data)] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif op == "delete":
            del data[pos:pos + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[pos:]
        elif op == "splice":
            other = draw(st.sampled_from(files))
            cut = draw(st.integers(0, len(other)))
            data = data[:pos] + bytearray(other[cut:])
        elif op == "duplicate":
            n = draw(st.integers(1, 16))
            data[pos:pos] = data[pos:pos + n]
    return bytes(data)


@st.composite
def nudged(draw: st.DrawFn, value: Any) -> Any:
    """A near miss of a valid field value: off by a little, one byte off, one item more or less."""
    if isinstance(value, bool) or value is None:
        return draw(st.sampled_from([0, False, True, None]))
    if isinstance(value, int):
        return value + draw(st.sampled_from([-2, -1, 1, 2, 86400, -86400, 2**32]))
    if isinstance(value, bytes):
        if not value or draw(st.booleans()):
            return value[:-1] + draw(st.binary(max_size=2))
        i = draw(st.integers(0, len(value) - 1))
        return value[:i] + bytes([value[i] ^ 1]) + value[i + 1:]
    if isinstance(value, str):
        return draw(st.sampled_from([value[:-1], value + "x", value.upper(), value[::-1]]))
    if isinstance(value, list):
        if not value:
            return draw(st.sampled_from([[{}], [None], [""]]))
        i = draw(st.integers(0, len(value) - 1))
        return draw(st.sampled_from([value[:-1], [*value, value[i]], value[::-1],
                                     [draw(nudged(value[i]))]]))
    if isinstance(value, dict) and value:
        k = draw(st.sampled_from(sorted(value, key=repr)))
        return {**value, k: draw(nudged(value[k]))}
    return value


def replaced_fields(m: dict[str, Any], interesting: list[Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``m`` with fields deleted, nudged (near misses), replaced by random CBOR, or added."""
    keys = sorted(m)
    values = st.one_of(cbor_values, st.sampled_from(interesting), st.sampled_from(interesting))
    license_like = st.fixed_dictionaries(
        {}, optional={k: values for k in ("op", "feature", "count", "not_before", "not_after",
                                           "grace")},
    )
    field_value = st.one_of(values, st.lists(license_like, max_size=4))

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out = dict(m)
        if draw(st.booleans()):
            for k in draw(st.lists(st.sampled_from(keys), min_size=1, max_size=3, unique=True)):
                out[k] = draw(nudged(out[k]))
            return out
        if draw(st.booleans()):
            for k in draw(st.lists(st.sampled_from(keys), max_size=2, unique=True)):
                del out[k]
        repl = draw(st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), field_value,
                                    min_size=1, max_size=3))
        out.update(repl)
        return out

    return build()


# ---------------------------------------------------------------- (a) random bytes


def test_random_bytes_raise_only_licensing_errors(tmp_path: Path) -> None:
    w = make_world(make_tmp(tmp_path))
    kids = [w.vendor.public.kid, w.key.public.kid]
    payloads = [decode_sign1(f, max_size=MAX_FILE).payload for f in w.files]

    @FUZZ
    @given(random_inputs(kids, payloads))
    def run(data: bytes) -> None:
        RUNS[0] += 1
        outcome = run_parsers(w, data)
        for name in ("apply_response", "apply_trust_update", "license_info", "read_request",
                     "verify_receipt", "read_device_info", "decode_slot"):
            assert outcome[name] != "accepted", name

    run()


def test_valid_files_parse(tmp_path: Path) -> None:
    """The fuzzers start from files every parser of their kind accepts."""
    w = make_world(make_tmp(tmp_path))
    for data, parser in ((w.pending, "apply_response"), (w.applied, "apply_response"),
                         (w.request, "read_request"), (w.receipt, "verify_receipt"),
                         (w.device_info, "read_device_info"),
                         (w.trust_update, "apply_trust_update"),
                         (w.license_info, "license_info")):
        assert run_parsers(w, data)[parser] == "accepted", parser


# ---------------------------------------------------------------- (b) mutations of valid files


def test_mutated_files_raise_only_licensing_errors(tmp_path: Path) -> None:
    w = make_world(make_tmp(tmp_path))
    valid = {
        "apply_response": {w.pending, w.applied},
        "apply_trust_update": {w.trust_update},
        "license_info": {w.license_info},
        "read_request": {w.request},
        "verify_receipt": {w.receipt},
        "read_device_info": {w.device_info},
    }

    @FUZZ
    @given(mutated_files(w.files))
    def run(data: bytes) -> None:
        RUNS[0] += 1
        outcome = run_parsers(w, data)
        for name, ok in valid.items():
            if outcome[name] == "accepted":
                assert data in ok, f"{name} accepted a mutated file"

    run()


def test_mutated_response_never_changes_the_store(tmp_path: Path) -> None:
    w = make_world(make_tmp(tmp_path))
    dev = w.device

    @FUZZ
    @given(mutated_files(w.files))
    def run(data: bytes) -> None:
        RUNS[0] += 1
        w.restore()
        before = dev.store_bytes()
        try:
            res, _ = dev.agent.apply(data)
        except LicensingError:
            assert dev.store_bytes() == before
            assert dev.leftovers() == []
            return
        after = dev.store_bytes()
        assert data in (w.pending, w.applied), "a mutated response was accepted"
        if data == w.applied:
            assert res.already_applied
            assert after == before
        else:
            assert after != before
            assert res.state.sequence == w.state.sequence + 1

    try:
        run()
    finally:
        w.restore()
    assert dev.agent.state()[0] == w.state


# ---------------------------------------------------------------- (c) signed, schema-fuzzed


def test_signed_payloads_with_random_fields(tmp_path: Path) -> None:
    """Correct signatures over fuzzed payload maps: only the schema stands in the way."""
    w = make_world(make_tmp(tmp_path))
    st0 = w.state
    pending = decode_sign1(w.pending, max_size=MAX_FILE)
    interesting: list[Any] = [
        st0.device_id, st0.digest, st0.sequence, st0.sequence + 1, w.now, w.now + 86400,
        *(o.nonce for o in st0.outstanding), *(lic.to_cbor() for lic in st0.licenses),
        *INTERESTING_INTS, *TEXTS,
    ]
    templates: list[tuple[bytes, SigningKey]] = [
        (w.pending, w.vendor.key), (w.trust_update, w.vendor.key),
        (w.license_info, w.vendor.key), (w.request, w.key), (w.receipt, w.key),
        (w.device_info, w.key),
    ]
    kinds = []
    for data, key in templates:
        env = decode_sign1(data, max_size=MAX_FILE)
        kinds.append((strict_loads(env.payload, max_size=MAX_FILE), key, env.content_type))
    assert pending.content_type == Kind.RESPONSE.content_type

    @FUZZ
    @given(st.sampled_from(range(len(kinds))).flatmap(
        lambda i: st.tuples(st.just(i), replaced_fields(kinds[i][0], interesting))))
    def run(case: tuple[int, dict[str, Any]]) -> None:
        RUNS[0] += 1
        i, m = case
        _orig, key, ctype = kinds[i]
        data = sign1(encode(m), key, ctype or "")
        outcome = run_parsers(w, data)
        if i == 0:  # a response: the real store must agree with the pure function
            w.restore()
            before = w.device.store_bytes()
            try:
                res, _ = w.device.agent.apply(data)
            except LicensingError as exc:
                assert type(exc).__name__ == outcome["apply_response"]
                assert w.device.store_bytes() == before
                return
            assert outcome["apply_response"] == "accepted"
            check_accepted_response(w, data, res)
            w.restore()

    try:
        run()
    finally:
        w.restore()


def test_trust_update_fuzz_never_lets_an_untrusted_key_sign(tmp_path: Path) -> None:
    """A trust update signed by a key the device does not trust is refused, whatever it says."""
    w = make_world(make_tmp(tmp_path))
    stranger = SigningKey.generate()
    base = strict_loads(decode_sign1(w.trust_update, max_size=MAX_FILE).payload,
                        max_size=MAX_FILE)

    @FUZZ
    @given(replaced_fields(base, [stranger.public.raw, -8, -7, 2, 3, None, w.now]))
    def run(m: dict[str, Any]) -> None:
        RUNS[0] += 1
        data = sign1(encode(m), stranger, Kind.TRUST_UPDATE.content_type)
        try:
            protocol.apply_trust_update(w.state, data, w.now)
        except TrustError:  # the signature is checked before the payload is even decoded
            return
        raise AssertionError("a trust update signed by an untrusted key was accepted")

    run()


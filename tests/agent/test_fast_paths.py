"""Issue 17: each faster path answers exactly what the path it replaces answers.

The licenses sorted by feature name against the generic field-by-field order, the
state digest computed once against computing it again, and the status's
``licensed_now`` against ``check_feature`` for every license, clock and grace.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cose import SigningKey
from agent.messages import License, sort_licenses, state_digest
from agent.protocol import AgentState, check_feature, licensed_at, new_state
from agent.record import replace
from agent.service import status_dict

T = 1_800_000_000
times = st.one_of(st.none(), st.integers(T - 1000, T + 1000))


@st.composite
def licenses(draw: st.DrawFn, unique: bool = True) -> list[License]:
    names = draw(st.lists(st.sampled_from(["a", "b", "bb", "B", "a.b", "a1", "zz", "f10", "f9"]),
                          max_size=8, unique=unique))
    out = []
    for name in names:
        nb, na = draw(times), draw(times)
        if nb is not None and na is not None and na < nb:
            nb, na = na, nb
        out.append(License(name, draw(st.integers(0, 3)), nb, na, draw(st.integers(0, 500))))
    return out


@settings(max_examples=300)
@given(licenses(unique=False))
def test_sorted_by_feature_is_the_generic_order(lics: list[License]) -> None:
    try:
        want = tuple(sorted(lics))
    except TypeError:  # a feature twice with None against a time: neither can order them
        with pytest.raises(TypeError):
            sort_licenses(lics)
        return
    assert sort_licenses(lics) == want


@settings(max_examples=200)
@given(licenses(), licenses())
def test_state_digest_remembered_is_the_digest(a: list[License], b: list[License]) -> None:
    from agent.cose import canonical
    from agent.digest import sha256

    def plain(lics: list[License]) -> bytes:
        return sha256(canonical([x.to_cbor() for x in sorted(lics)]))

    ta, tb = sort_licenses(a), sort_licenses(b)
    for t in (ta, tb, ta, ta, tb):  # the one remembered, and the other, in turn
        assert state_digest(t) == plain(list(t))
    key = SigningKey.generate()
    s = replace(_state(key), licenses=ta)
    assert s.digest == plain(a) == replace(s, sequence=5).digest


def _state(key: SigningKey) -> AgentState:
    from agent.messages import TrustKey

    return new_state(key.public, "AS-P", "S", ["mac=00:80:f4:00:00:01"],
                     [TrustKey(SigningKey.generate().public)], T)


KEY = SigningKey.generate()


@settings(max_examples=300)
@given(licenses(), st.integers(T - 1500, T + 1500), st.integers(T - 1500, T + 1500))
def test_status_licensed_now_is_check_feature(lics: list[License], now: int, hwm: int) -> None:
    s = replace(_state(KEY), licenses=sort_licenses(lics), clock_hwm=hwm)
    st_ = status_dict(s, now)
    for lic, row in zip(s.licenses, st_["licenses"], strict=True):
        assert row["licensed_now"] == check_feature(s, lic.feature, now).licensed
        assert licensed_at(lic, max(now, hwm)) == row["licensed_now"]


@settings(max_examples=100)
@given(licenses(), licenses())
def test_licenses_encoded_once_are_the_same_bytes(a: list[License], b: list[License]) -> None:
    """The state and a receipt carry each license as encoded once: byte for byte what
    encoding the whole again gives (cbor2's own canonical encoder)."""
    import cbor2

    from agent.messages import FORMAT_VERSION, Receipt

    s = replace(_state(KEY), licenses=sort_licenses(a), clock_hwm=T + 5)
    assert s.encode() == cbor2.dumps(s.to_cbor(), canonical=True)
    r = Receipt(device_id=s.device_id, device_key=s.device_key, response=b"r" * 40,
                response_digest=bytes(32), sequence=3, state_digest=s.digest, applied=(),
                removed=sort_licenses(b), licenses=s.licenses, applied_at=T)
    assert r.encode() == cbor2.dumps({"v": FORMAT_VERSION, "kind": "receipt", **r.fields()},
                                     canonical=True)
    assert Receipt.from_map(cbor2.loads(r.encode())) == r


KEYS = ["v", "kind", "a", "bb", "c", "op"]


@settings(max_examples=400)
@given(st.lists(st.sampled_from(KEYS), unique=True), st.lists(st.sampled_from(KEYS), unique=True),
       st.sets(st.sampled_from([*KEYS, "zz", "extra"])))
def test_field_check_without_sets_answers_as_with_them(required: list[str], optional: list[str],
                                                       present: set[str]) -> None:
    from agent.errors import MalformedError
    from agent.messages import _keys

    optional = [k for k in optional if k not in required]  # each key named once, as the callers do
    m = dict.fromkeys(present, 0)
    want = set(required) <= present and present <= set(required) | set(optional)
    try:
        _keys(m, "thing", required, optional)
        got = True
    except MalformedError as exc:
        got = False
        assert ("lacks" in str(exc)) == (not set(required) <= present)
    assert got == want


@settings(max_examples=200)
@given(licenses())
def test_a_decoded_change_carries_the_license_its_fields_make(lics: list[License]) -> None:
    from agent.messages import ChangeOp, LicenseChange

    for lic in lics:
        for op in (ChangeOp.ADD, ChangeOp.UPDATE):
            got = LicenseChange.from_cbor({"op": op.value, **lic.to_cbor()})
            made = LicenseChange(op, lic.feature, lic.count, lic.not_before, lic.not_after,
                                 lic.grace)
            assert got == made and hash(got) == hash(made)
            assert got.license() == made.license() == lic
            assert got.to_cbor() == made.to_cbor()


@settings(max_examples=200)
@given(licenses(), licenses())
def test_licenses_array_remembered_is_the_array(a: list[License], b: list[License]) -> None:
    """The state's and the receipt's array of licenses, remembered for the last tuple (and
    shared with the digest when the tuple is sorted), is the array encoded afresh."""
    from agent.cose import encoded_array
    from agent.messages import encoded_licenses

    for lics in (tuple(a), sort_licenses(a), tuple(b), sort_licenses(a)):
        want = encoded_array(lic.encoded for lic in lics).data
        assert state_digest(lics) == state_digest(list(lics))  # list: never remembered
        assert encoded_licenses(lics).data == want
        assert encoded_licenses(lics).data == want  # the remembered one


def _cbor_items(encoded: type) -> st.SearchStrategy[object]:
    keys = st.one_of(st.text(max_size=30), st.sampled_from(["n", "mac", "a", "b", "aa", "é", "\x00"]))
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.binary(max_size=40), st.text(max_size=30),
                        st.floats(allow_nan=False), st.binary(max_size=20).map(encoded))
    return st.recursive(scalars, lambda inner: st.one_of(
        st.lists(inner, max_size=5), st.lists(inner, max_size=5).map(tuple),
        st.dictionaries(keys, inner, max_size=6),
        st.dictionaries(st.integers(-30, 30), inner, max_size=4),
        st.frozensets(st.integers(0, 9), max_size=3)), max_leaves=25)


@settings(max_examples=500)
@given(st.data())
def test_canonical_in_key_order_is_cbor2s_canonical_mode(data: st.DataObject) -> None:
    """Issue 17: maps put in canonical key order and written by cbor2's plain mode are the
    bytes of cbor2's canonical mode, whatever they hold (the rest goes through that mode)."""
    import cbor2

    from agent.cose import Encoded, _write_encoded, canonical

    obj = data.draw(_cbor_items(lambda b: Encoded(cbor2.dumps(b))))
    assert canonical(obj) == cbor2.dumps(obj, canonical=True, default=_write_encoded)
    for _ in range(2):  # the key orders remembered give the same bytes
        assert canonical({"k": obj, "kk": [obj], "": {"z": obj}}) == cbor2.dumps(
            {"k": obj, "kk": [obj], "": {"z": obj}}, canonical=True, default=_write_encoded)


@settings(max_examples=60)
@given(st.sampled_from([0, 1, 23, 24, 25, 255, 256, 65535, 65536, 70000]), st.binary(max_size=8))
def test_sign1_written_out_is_cbor2s_encoding(size: int, seed: bytes) -> None:
    """Issue 17: the COSE_Sign1 envelope and the signed structure, written byte by byte, are
    what cbor2 encodes (across every length of the byte strings' heads), and verify."""
    import cbor2

    from agent.cose import _sig_structure, decode_sign1, sign1

    payload = (seed or b"p") * (size // max(len(seed), 1) + 1)
    payload = payload[:size]
    for key in (_KEYS[0], _KEYS[1]):
        prot = key.protected_header("application/x")
        assert _sig_structure(prot, payload) == cbor2.dumps(["Signature1", prot, b"", payload])
        data = sign1(payload, key, "application/x")
        env = decode_sign1(data, max_size=1 << 20)  # also: the shortest form, re-encoded
        assert env.verify_with(key.public) == payload
        assert data == cbor2.dumps(cbor2.CBORTag(18, [prot, {}, payload, env.signature]))


_KEYS = (SigningKey.generate(), SigningKey.generate(-7))


@settings(max_examples=200)
@given(licenses(), licenses())
def test_digest_of_licenses_sorted_by_apply_is_the_state_digest(a: list[License],
                                                               b: list[License]) -> None:
    """Issue 17: an apply's licenses (sorted, one per feature) digested without sorting them
    again: the state digest of the same licenses in any order, remembered or not."""
    from agent.messages import sorted_state_digest

    for lics in (a, b, a):
        ordered = sort_licenses(lics)
        want = state_digest(list(reversed(lics)))  # a list: never remembered
        assert sorted_state_digest(ordered) == want
        assert sorted_state_digest(ordered) == want  # the remembered one
        assert state_digest(ordered) == want

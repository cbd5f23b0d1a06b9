"""The framing and RPC layers on their own, sans I/O: chunking, corruption, size limits, retries."""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.cose import canonical, strict_loads
from agent.errors import MalformedError, WrongDeviceError
from agent.rpc import Op, RemoteError
from hw.framing import (
    CorruptFrame,
    Frame,
    FrameDecoder,
    FrameEvent,
    FrameTooLarge,
    cobs_decode,
    cobs_encode,
    encode_frame,
)
from hw.rpc import RpcClient, RpcServer

payloads = st.binary(max_size=600)
# payloads that stress COBS: runs of zeros, 254-byte zero-free blocks and their edges
structured = st.one_of(
    payloads,
    st.integers(0, 700).map(lambda n: bytes(n)),
    st.integers(250, 520).map(lambda n: bytes([0x55]) * n),
    st.tuples(st.integers(0, 600), st.integers(0, 600)).map(
        lambda t: bytes([7]) * t[0] + b"\x00" + bytes([9]) * t[1]),
)


def decode_all(chunks: list[bytes], max_frame: int = 4096) -> list[FrameEvent]:
    dec = FrameDecoder(max_frame)
    events: list[FrameEvent] = []
    for c in chunks:
        events += dec.feed(c)
    return events


def frames(events: list[FrameEvent]) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, Frame)]


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# ---------------------------------------------------------------- COBS


@given(structured)
def test_cobs_round_trip_and_no_zero_inside(data: bytes) -> None:
    enc = cobs_encode(data)
    assert 0 not in enc
    assert cobs_decode(enc) == data
    assert len(enc) <= len(data) + len(data) // 254 + 1


# ---------------------------------------------------------------- chunking


@given(st.lists(structured, min_size=1, max_size=5), st.lists(st.integers(0, 10_000)))
def test_any_chunking_decodes_the_same_frames(msgs: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in msgs)
    events = decode_all(chunked(stream, cuts))
    assert events == [Frame(m) for m in msgs]


@pytest.mark.parametrize("payload", [
    b"", b"\x00", b"\x00" * 5, b"hello\x00world", bytes(range(256)) * 2,
    b"\x11" * 253, b"\x11" * 254, b"\x11" * 255, b"\x11" * 254 + b"\x00" + b"\x22" * 254,
])
def test_split_at_every_position(payload: bytes) -> None:
    stream = encode_frame(payload) + encode_frame(b"next")
    want = [Frame(payload), Frame(b"next")]
    for i in range(len(stream) + 1):
        assert decode_all([stream[:i], stream[i:]]) == want, i
    assert decode_all([bytes([b]) for b in stream]) == want  # one byte at a time


# ---------------------------------------------------------------- corruption


def _code_byte_positions(enc: bytes) -> set[int]:
    """Indices of the COBS code bytes of an encoding (the rest are the data, unchanged)."""
    out, i = set(), 0
    while i < len(enc):
        out.add(i)
        i += enc[i]
    return out


@given(st.binary(min_size=0, max_size=2000),
       st.lists(st.integers(0, 2**24), min_size=1, max_size=3))
@example(b"", [0])
@example(b"x", [0, 9, 17])
@example(b"\x00" * 40, [0, 1, 2])
@example(b"\xff" * 300, [5, 2000, 2001])
def test_up_to_three_bit_flips_in_data_bytes_are_always_detected(
    payload: bytes, picks: list[int],
) -> None:
    """A theorem, not a sample: a flipped bit in a COBS data byte is the same bit flipped in
    payload||CRC, and CRC-32 has Hamming distance >= 4 up to 91,607 data bits (Koopman), so
    1-3 flips (that do not make a 0x00 delimiter) never give a valid frame."""
    wire = encode_frame(payload)
    enc = wire[1:-1]  # between the leading and the closing delimiter
    data_bits = [8 * i + b for i in range(len(enc)) if i not in _code_byte_positions(enc)
                 for b in range(8)]
    if not data_bits:
        return  # the empty payload: CRC32(b"") is four zeros, all code bytes on the wire
    flips = {data_bits[p % len(data_bits)] for p in picks}
    bad = bytearray(enc)
    for bit in flips:
        bad[bit // 8] ^= 0x80 >> (bit % 8)
    if 0 in bad:
        return  # made a delimiter: covered by the next test
    events = decode_all([bytes(bad) + b"\x00"])
    assert events == [CorruptFrame("checksum mismatch", len(enc))]


@given(st.binary(max_size=600), st.lists(st.integers(0, 2**20), min_size=1, max_size=3,
                                         unique=True))
def test_up_to_three_bit_flips_anywhere_never_give_another_payload(
    payload: bytes, positions: list[int],
) -> None:
    """Flips anywhere on the wire, code bytes and delimiter included: nothing but the original
    payload is ever accepted (a flip of a redundant trailing code byte can leave it intact)."""
    wire = bytearray(encode_frame(payload))
    for p in {p % (8 * len(wire)) for p in positions}:
        wire[p // 8] ^= 0x80 >> (p % 8)
    for got in frames(decode_all([bytes(wire)])):
        assert got == payload


mutation = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 2**20), st.integers(0, 7)),
    st.tuples(st.just("insert"), st.integers(0, 2**20), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 2**20), st.integers(1, 8)),
    st.tuples(st.just("replace"), st.integers(0, 2**20), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 2**20)),
)


def mutate(data: bytes, ops: list[tuple[Any, ...]]) -> bytes:
    b = bytearray(data)
    for op in ops:
        at = op[1] % (len(b) + 1)
        if op[0] == "flip" and b:
            b[at % len(b)] ^= 1 << op[2]
        elif op[0] == "insert":
            b[at:at] = op[2]
        elif op[0] == "delete":
            del b[at:at + op[2]]
        elif op[0] == "replace":
            b[at:at + len(op[2])] = op[2]
        elif op[0] == "truncate":
            del b[at:]
    return bytes(b)


@given(st.lists(payloads, min_size=1, max_size=4), st.lists(mutation, min_size=1, max_size=6),
       st.lists(st.integers(0, 10_000), max_size=6))
@example([b"license"], [("insert", 3, b"\x00")], [])
@example([b"license"], [("delete", 0, 1)], [])
@example([b"license", b"two"], [("truncate", 9)], [])
@example([b"\x00\x00\x00"], [("replace", 0, b"\x01\x01")], [])
@example([b"a" * 300], [("flip", 0, 7)], [])
@example([b"abc"], [("insert", 0, encode_frame(b"xyz")[1:-2])], [])
def test_random_corruption_never_yields_a_different_payload(
    msgs: list[bytes], ops: list[tuple[Any, ...]], cuts: list[int],
) -> None:
    """Bit flips, inserted, deleted and replaced bytes, truncation, in any chunking.

    Any frame that is accepted is one that was sent. (For arbitrary multi-byte damage this is
    CRC-32's 2**-32 chance of a miss per damaged frame, so it is a sampled property; the
    @examples pin the typical torn and merged frames.)
    """
    wire = mutate(b"".join(encode_frame(m) for m in msgs), ops)
    for got in frames(decode_all(chunked(wire, cuts))):
        assert got in msgs


@given(st.binary(max_size=300), st.lists(payloads, min_size=2, max_size=3),
       st.lists(st.integers(0, 10_000), max_size=5))
@example(b"\x05garbage", [b"one", b"two"], [])
@example(b"\x00\x00", [b"one", b"two"], [])
def test_decoder_resynchronises_after_garbage(garbage: bytes, msgs: list[bytes],
                                              cuts: list[int]) -> None:
    """Garbage can take the frame it runs into down with it, but never the ones after it."""
    stream = garbage + b"".join(encode_frame(m) for m in msgs)
    got = frames(decode_all(chunked(stream, cuts)))
    assert got[-(len(msgs) - 1):] == msgs[1:]
    if not garbage or garbage.endswith(b"\x00"):
        assert got[-len(msgs):] == msgs


# ---------------------------------------------------------------- size limits


@settings(max_examples=50)
@given(st.integers(72, 3000), st.lists(st.integers(0, 10_000), max_size=20))
def test_oversized_frame_is_reported_and_memory_stays_bounded(size: int, cuts: list[int]) -> None:
    dec = FrameDecoder(max_frame=64)
    stream = encode_frame(bytes([0xAB]) * size) + encode_frame(b"small")
    events: list[FrameEvent] = []
    for c in chunked(stream, cuts):
        events += dec.feed(c)
        assert dec.buffered <= dec.max_encoded
    assert len(events) == 2
    assert isinstance(events[0], FrameTooLarge) and events[0].length >= size
    assert events[1] == Frame(b"small")


def test_endless_stream_without_delimiter_stays_bounded() -> None:
    dec = FrameDecoder(max_frame=1024)
    for _ in range(1000):  # 1 MB of noise that never closes a frame
        assert dec.feed(bytes(range(1, 256)) * 4 + b"\x01" * 4) == []
        assert dec.buffered <= dec.max_encoded
    assert isinstance(dec.feed(b"\x00")[0], FrameTooLarge)
    assert dec.feed(encode_frame(b"ok")) == [Frame(b"ok")]


def test_largest_allowed_frame_is_accepted() -> None:
    for payload in (bytes([1]) * 1024, bytes(1024)):  # best and worst case for COBS
        assert decode_all([encode_frame(payload)], max_frame=1024) == [Frame(payload)]
    assert isinstance(decode_all([encode_frame(bytes([1]) * 1100)], max_frame=1024)[0],
                      FrameTooLarge)


def test_short_and_bad_frames_are_named() -> None:
    assert decode_all([b"\x02\x01\x00"]) == [CorruptFrame("frame shorter than its checksum", 2)]
    assert decode_all([b"\x05\x01\x00"])[0] == CorruptFrame(
        "COBS block runs past the end of the frame", 2)
    crc = zlib.crc32(b"x").to_bytes(4, "big")
    assert decode_all([cobs_encode(b"x" + crc) + b"\x00"]) == [Frame(b"x")]


# ---------------------------------------------------------------- RPC, sans I/O


class CountingHandler:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        self.calls.append(op)
        if op == Op.HELLO:
            return {"device_id": "d1"}
        if op == Op.APPLY_RESPONSE:
            if args.get("file") == b"other":
                raise WrongDeviceError("this response is for device d2")
            return {"applied": len([c for c in self.calls if c == Op.APPLY_RESPONSE])}
        return {"op": op}


def hello(client: RpcClient, server: RpcServer, now: float = 0.0) -> None:
    _rid, frame = client.hello(now)
    (res,) = client.receive(b"".join(server.receive(frame)))
    assert res.ok and res.result["version"] == 1 and res.result["device_id"] == "d1"


def test_retry_after_a_dropped_answer_gets_the_remembered_answer() -> None:
    h = CountingHandler()
    server, client = RpcServer(h), RpcClient(timeout=1.0, tries=3)
    hello(client, server)
    rid, frame = client.start(Op.APPLY_RESPONSE, {"file": b"resp"}, now=10.0)
    first = server.receive(frame)  # the answer is lost on the way back
    assert client.due(10.5) == ([], [])
    resend, failed = client.due(11.0)
    assert resend == [frame] and failed == []
    again = server.receive(resend[0])
    assert again == first  # answered from memory, byte for byte
    (res,) = client.receive(again[0])
    assert res.id == rid and res.ok and res.result == {"applied": 1}
    assert h.calls.count(Op.APPLY_RESPONSE) == 1  # the operation ran once


def test_late_and_duplicate_answers_are_ignored() -> None:
    h = CountingHandler()
    server, client = RpcServer(h), RpcClient(timeout=1.0, tries=2)
    hello(client, server)
    _rid, frame = client.start(Op.GET_STATUS, {}, now=0.0)
    answer = server.receive(frame)[0]
    assert len(client.receive(answer)) == 1
    assert client.receive(answer) == []  # the same answer again (a duplicated chunk)
    # a request that gave up: its answer arrives after the failure and is dropped
    _rid2, frame2 = client.start(Op.GET_STATUS, {}, now=0.0)
    client.due(1.0)
    _resend, failed = client.due(2.0)
    assert len(failed) == 1 and failed[0].error is not None
    assert "no answer after 2 tries" in str(failed[0].error)
    assert client.receive(server.receive(frame2)[0]) == []
    assert not client.waiting


def test_an_error_answer_carries_the_exit_code_and_reason() -> None:
    server, client = RpcServer(CountingHandler()), RpcClient()
    hello(client, server)
    _rid, frame = client.start(Op.APPLY_RESPONSE, {"file": b"other"}, now=0.0)
    (res,) = client.receive(server.receive(frame)[0])
    assert not res.ok and isinstance(res.error, RemoteError)
    assert (res.error.exit_code, res.error.reason) == (5, "wrong-device")
    assert "device d2" in str(res.error)


def test_version_negotiation_failure_is_a_clear_error() -> None:
    h = CountingHandler()
    server, client = RpcServer(h), RpcClient()
    _rid, frame = client.start(Op.HELLO, {"versions": [2]}, now=0.0)
    (res,) = client.receive(server.receive(frame)[0])
    assert not res.ok and res.error is not None
    assert (res.error.exit_code, res.error.reason) == (2, "version")
    assert str(res.error) == ("no common protocol version: server speaks [1], "
                              "client offered [2]")
    assert server.version is None and h.calls == []


def test_a_request_before_hello_is_refused() -> None:
    h = CountingHandler()
    server, client = RpcServer(h), RpcClient()
    _rid, frame = client.start(Op.APPLY_RESPONSE, {"file": b"resp"}, now=0.0)
    (res,) = client.receive(server.receive(frame)[0])
    assert not res.ok and res.error is not None
    assert res.error.exit_code == 2 and "say hello first" in str(res.error)
    assert h.calls == []  # nothing ran


def test_server_counts_noise_and_ignores_non_rpc_frames() -> None:
    server = RpcServer(CountingHandler())
    assert server.receive(b"\x03ab\x00" + encode_frame(b"\xa0") + encode_frame(b"\xff")) == []
    assert server.corrupt_frames == 3  # a torn frame, a map without v/id, not CBOR
    # a response echoed back (a loop wired to itself) is not answered
    echo = encode_frame(canonical({"v": 1, "id": 5, "ok": True, "result": 1}))
    assert server.receive(echo) == []


def test_request_frames_are_canonical_cbor() -> None:
    _rid, frame = RpcClient().start(Op.CHECK_FEATURE, {"feature": "bacnet"}, now=0.0)
    (ev,) = decode_all([frame])
    assert isinstance(ev, Frame)
    msg = strict_loads(ev.payload, max_size=4096)
    assert msg["op"] == "check-feature" and msg["args"] == {"feature": "bacnet"}
    assert canonical(msg) == ev.payload
    with pytest.raises(MalformedError):
        RpcClient(max_frame=16).start(Op.APPLY_RESPONSE, {"file": bytes(2000)}, now=0.0)

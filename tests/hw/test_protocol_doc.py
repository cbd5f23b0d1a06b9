"""docs/protocol.md, sections 18 to 21: the wire examples are exact and a client can be
written from the document alone.

The decoder here (COBS, CRC-32, frame splitting) is written from the document's text, with
the standard library and cbor2 only; the project's own framing and RPC code is then checked
to produce exactly the bytes the document shows.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.cose import canonical
from hw.framing import FrameDecoder, encode_frame

try:
    from agent.rpc import OPS
    from hw.rpc import RpcClient, RpcServer
except ImportError:  # pragma: no cover - the RPC layer may move into agent/
    from agent.rpc import OPS, RpcClient, RpcServer  # type: ignore[no-redef]

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"

EXAMPLES = (
    "hello-request",
    "hello-answer",
    "check-feature-request",
    "check-feature-answer",
    "check-feature-error",
)
DEVICE_ID = "063f2d4a07d05c7005de604540a6b1659f127a58fff0988686818de9955f89cb"
CHECK_RESULT: dict[str, Any] = {
    "feature": "bacnet",
    "licensed": True,
    "message": "bacnet: licensed, count 10",
    "in_grace": False,
    "clock_set_back": False,
}


# ---------------------------------------------------------------- reading the document


def _doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _blocks(kind: str) -> dict[str, str]:
    """The fenced block after each ``<!-- KIND: NAME -->`` marker, by NAME."""
    pattern = re.compile(
        rf"^<!-- {kind}: ([a-z-]+) -->\n```[a-z]*\n(.*?)\n```$", re.MULTILINE | re.DOTALL)
    found: dict[str, str] = {}
    for name, body in pattern.findall(_doc()):
        assert name not in found, f"two {kind} blocks named {name}"
        found[name] = body
    return found


def _hex(text: str) -> bytes:
    """Hex bytes of a block; ``;`` starts a comment that runs to the end of the line."""
    return bytes.fromhex("".join(line.split(";", 1)[0] for line in text.splitlines()))


def wire(name: str) -> bytes:
    return _hex(_blocks("example")[name])


def message(name: str) -> Any:
    return json.loads(_blocks("message")[name])


# ---------------------------------------------------------------- the independent decoder


def crc32_doc(data: bytes) -> int:
    """CRC-32 as section 18 specifies it: reflected 0xEDB88320, init and xor-out all ones."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def cobs_decode_doc(data: bytes) -> bytes:
    """COBS decoding as section 18 describes it."""
    out = bytearray()
    i = 0
    while i < len(data):
        code = data[i]
        if code == 0 or i + code > len(data):
            raise ValueError("not COBS")
        out += data[i + 1:i + code]
        i += code
        if code != 0xFF and i < len(data):
            out.append(0)
    return bytes(out)


def frames_doc(stream: bytes) -> list[bytes]:
    """The payloads of the good frames in a byte stream; damaged pieces are skipped."""
    payloads: list[bytes] = []
    for piece in stream.split(b"\x00"):
        if not piece:
            continue
        try:
            raw = cobs_decode_doc(piece)
        except ValueError:
            continue
        if len(raw) < 4 or len(raw) - 4 > 81920:
            continue
        payload, crc = raw[:-4], raw[-4:]
        if crc32_doc(payload).to_bytes(4, "big") == crc:
            payloads.append(payload)
    return payloads


def decode_doc(frame: bytes) -> tuple[bytes, Any]:
    """One frame's payload and the message in it."""
    assert frame[0] == 0 and frame[-1] == 0 and 0 not in frame[1:-1]
    (payload,) = frames_doc(frame)
    return payload, cbor2.loads(payload)


# ---------------------------------------------------------------- the document's own claims


def test_every_example_is_documented() -> None:
    for kind in ("example", "message"):
        assert sorted(_blocks(kind)) == sorted(EXAMPLES), kind
    assert set(_blocks("cbor")) <= set(EXAMPLES)


def test_crc_check_value() -> None:
    assert crc32_doc(b"123456789") == 0xCBF43926
    assert "`0xCBF43926`, appended as `cb f4 39 26`" in _doc()


@pytest.mark.parametrize("name", EXAMPLES)
def test_independent_decoder_reads_the_example(name: str) -> None:
    frame = wire(name)
    payload, msg = decode_doc(frame)
    assert msg == message(name)
    # the CRC the prose names, and the annotated CBOR where there is one
    assert f"`{crc32_doc(payload).to_bytes(4, 'big').hex(' ')}`" in _doc()
    annotated = _blocks("cbor").get(name)
    if annotated is not None:
        assert _hex(annotated) == payload


def test_independent_decoder_resynchronises() -> None:
    frames = [wire(n) for n in EXAMPLES]
    damaged = bytearray(frames[1])
    damaged[20] ^= 0x10  # one bit flipped: that frame fails its CRC
    stream = b"\x13\x37\xff" + frames[0] + bytes(damaged) + b"noise" + frames[2]
    assert [cbor2.loads(p) for p in frames_doc(stream)] == [
        message(EXAMPLES[0]), message(EXAMPLES[2])]


def test_cddl_names_every_operation() -> None:
    ops = set(re.findall(r'\( "op": "([a-z-]+)"', _doc()))
    assert ops == set(OPS)


# ---------------------------------------------------------------- the project's code


@pytest.mark.parametrize("name", EXAMPLES)
def test_real_encoder_writes_the_documented_bytes(name: str) -> None:
    assert encode_frame(canonical(message(name))) == wire(name)
    (event,) = FrameDecoder().feed(wire(name))
    assert getattr(event, "payload", None) == canonical(message(name))


def test_real_client_writes_the_documented_requests() -> None:
    client = RpcClient(next_id=message("hello-request")["id"])
    _rid, hello = client.hello(0.0)
    assert hello == wire("hello-request")
    _rid, check = client.start("check-feature", {"feature": "bacnet"}, 0.0)
    assert check == wire("check-feature-request")
    results = client.receive(wire("hello-answer") + wire("check-feature-answer"))
    assert [r.result for r in results] == [message("hello-answer")["result"], CHECK_RESULT]


def _handler(op: str, args: Mapping[str, Any]) -> Any:
    if op == "hello":
        return {"device_id": DEVICE_ID, "model": "AS-P"}
    assert op == "check-feature" and args == {"feature": "bacnet"}
    return CHECK_RESULT


def test_real_server_answers_with_the_documented_bytes() -> None:
    server = RpcServer(_handler)
    assert server.receive(wire("hello-request")) == [wire("hello-answer")]
    assert server.receive(wire("check-feature-request")) == [wire("check-feature-answer")]
    # a retry is answered from memory, byte for byte
    assert server.receive(wire("check-feature-request")) == [wire("check-feature-answer")]
    # a new session that skipped hello
    fresh = RpcServer(_handler)
    assert fresh.receive(wire("check-feature-request")) == [wire("check-feature-error")]

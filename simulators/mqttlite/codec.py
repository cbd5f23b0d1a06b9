"""A sans-IO MQTT 5 codec for the subset a simulated device fleet needs.

Packets: CONNECT (with Will and properties), CONNACK, PUBLISH (QoS 0/1, and
QoS 2 decoded only to be refused by the caller), PUBACK, SUBSCRIBE, SUBACK,
PINGREQ, PINGRESP, DISCONNECT. Properties of every MQTT 5 identifier are read
(a broker may send any of them); unknown identifiers are malformed.

Bounds are strict: a remaining length that is not a valid variable byte
integer, a packet larger than the decoder's ``max_packet``, bad UTF-8, a field
running past its packet, reserved flags, trailing bytes: each raises
:class:`CodecError` and nothing else. The decoder never buffers more than one
packet's worth of bytes (``max_packet``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONNACK", "CONNECT", "DISCONNECT", "PINGREQ", "PINGRESP", "PUBACK", "PUBLISH",
    "SUBACK", "SUBSCRIBE",
    "CodecError", "Connack", "Connect", "Decoder", "Disconnect", "Packet", "Pingreq",
    "Pingresp", "Puback", "Publish", "Suback", "Subscribe", "Will",
    "decode_vbi", "encode", "encode_vbi",
    "P_CORRELATION_DATA", "P_MAX_PACKET_SIZE", "P_MESSAGE_EXPIRY", "P_RESPONSE_TOPIC",
    "P_SESSION_EXPIRY", "P_RECEIVE_MAXIMUM", "P_REASON_STRING", "P_SERVER_KEEP_ALIVE",
]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

VBI_MAX = 268_435_455
#: the largest packet MQTT can express (fixed header of 5 bytes + VBI_MAX)
ABSOLUTE_MAX = VBI_MAX + 5

# property identifiers used by name elsewhere
P_PAYLOAD_FORMAT = 1
P_MESSAGE_EXPIRY = 2
P_RESPONSE_TOPIC = 8
P_CORRELATION_DATA = 9
P_SESSION_EXPIRY = 17
P_SERVER_KEEP_ALIVE = 19
P_RECEIVE_MAXIMUM = 33
P_REASON_STRING = 31
P_USER_PROPERTY = 38
P_MAX_PACKET_SIZE = 39

# identifier -> type: b byte, h two-byte int, i four-byte int, v VBI, s UTF-8, d binary, p pair
_PROP_TYPES: dict[int, str] = {
    1: "b", 2: "i", 3: "s", 8: "s", 9: "d", 11: "v", 17: "i", 18: "s", 19: "h", 21: "s",
    22: "d", 23: "b", 24: "i", 25: "b", 26: "s", 28: "s", 31: "s", 33: "h", 34: "h",
    35: "h", 36: "b", 37: "b", 38: "p", 39: "i", 40: "b", 41: "b", 42: "b",
}

Properties = dict[int, Any]


class CodecError(ValueError):
    """Malformed, oversized or unsupported MQTT bytes, or a packet that cannot be encoded."""


# ---------------------------------------------------------------- packets


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True)
class Connect:
    client_id: str
    keepalive: int = 60
    clean_start: bool = True
    properties: Properties = field(default_factory=dict)
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None


@dataclass(frozen=True)
class Connack:
    session_present: bool
    reason: int
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True)
class Puback:
    packet_id: int
    reason: int = 0
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    topics: tuple[tuple[str, int], ...]  # (filter, options byte: QoS in bits 0-1)
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True)
class Suback:
    packet_id: int
    reasons: tuple[int, ...]
    properties: Properties = field(default_factory=dict)


@dataclass(frozen=True)
class Pingreq:
    pass


@dataclass(frozen=True)
class Pingresp:
    pass


@dataclass(frozen=True)
class Disconnect:
    reason: int = 0
    properties: Properties = field(default_factory=dict)


Packet = Connect | Connack | Publish | Puback | Subscribe | Suback | Pingreq | Pingresp | Disconnect


# ---------------------------------------------------------------- primitives


def encode_vbi(n: int) -> bytes:
    if not 0 <= n <= VBI_MAX:
        raise CodecError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def decode_vbi(data: bytes | memoryview, pos: int, end: int) -> tuple[int, int] | None:
    """``(value, next position)``; None if ``data[pos:end]`` ends before the integer does."""
    value = shift = 0
    for i in range(4):
        if pos + i >= end:
            return None
        b = data[pos + i]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            if i and b == 0:
                raise CodecError("variable byte integer not in its shortest form")
            return value, pos + i + 1
        shift += 7
    raise CodecError("variable byte integer longer than 4 bytes")


def _u16(n: int, what: str) -> bytes:
    if not 0 <= n <= 0xFFFF:
        raise CodecError(f"{what} {n} out of range")
    return struct.pack(">H", n)


def _str(s: str, what: str = "string") -> bytes:
    b = s.encode("utf-8")
    if len(b) > 0xFFFF:
        raise CodecError(f"{what} longer than 65535 bytes")
    if "\0" in s:
        raise CodecError(f"{what} contains U+0000")
    return struct.pack(">H", len(b)) + b


def _bin(b: bytes, what: str = "binary data") -> bytes:
    if len(b) > 0xFFFF:
        raise CodecError(f"{what} longer than 65535 bytes")
    return struct.pack(">H", len(b)) + bytes(b)


def _props(props: Mapping[int, Any]) -> bytes:
    out = bytearray()
    for pid, value in sorted(props.items()):
        kind = _PROP_TYPES.get(pid)
        if kind is None:
            raise CodecError(f"unknown property {pid}")
        values = value if kind == "p" or (pid == 11 and isinstance(value, list)) else [value]
        for v in values:
            out += encode_vbi(pid)
            try:
                if kind == "b":
                    out += struct.pack(">B", v)
                elif kind == "h":
                    out += struct.pack(">H", v)
                elif kind == "i":
                    out += struct.pack(">I", v)
                elif kind == "v":
                    out += encode_vbi(v)
                elif kind == "s":
                    out += _str(v, f"property {pid}")
                elif kind == "d":
                    out += _bin(v, f"property {pid}")
                else:
                    k, val = v
                    out += _str(k, "user property") + _str(val, "user property")
            except (struct.error, TypeError, AttributeError) as exc:
                raise CodecError(f"property {pid}: {exc}") from None
    return encode_vbi(len(out)) + bytes(out)


def _fixed(kind: int, flags: int, body: bytes, max_packet: int | None) -> bytes:
    out = bytes([kind << 4 | flags]) + encode_vbi(len(body)) + body
    if max_packet is not None and len(out) > max_packet:
        raise CodecError(f"packet of {len(out)} bytes exceeds the limit of {max_packet}")
    return out


def encode(p: Packet, max_packet: int | None = None) -> bytes:
    """The bytes of packet ``p``; :class:`CodecError` if it cannot be expressed (or exceeds
    ``max_packet``, the peer's maximum packet size)."""
    if isinstance(p, Publish):
        if p.qos not in (0, 1, 2):
            raise CodecError(f"QoS {p.qos}")
        if not p.topic or any(c in p.topic for c in "+#"):
            raise CodecError("a PUBLISH topic must be non-empty and without wildcards")
        body = _str(p.topic, "topic")
        if p.qos:
            if not 0 < p.packet_id <= 0xFFFF:
                raise CodecError("a QoS 1 or 2 PUBLISH needs a packet ID of 1 to 65535")
            body += _u16(p.packet_id, "packet ID")
        body += _props(p.properties) + bytes(p.payload)
        flags = (8 if p.dup else 0) | p.qos << 1 | (1 if p.retain else 0)
        return _fixed(PUBLISH, flags, body, max_packet)
    if isinstance(p, Puback):
        body = _u16(p.packet_id, "packet ID")
        if p.reason or p.properties:
            body += bytes([p.reason]) + (_props(p.properties) if p.properties else b"")
        return _fixed(PUBACK, 0, body, max_packet)
    if isinstance(p, Connect):
        flags = 2 if p.clean_start else 0
        payload = _str(p.client_id, "client ID")
        if p.will is not None:
            w = p.will
            if w.qos not in (0, 1, 2):
                raise CodecError(f"Will QoS {w.qos}")
            flags |= 4 | w.qos << 3 | (0x20 if w.retain else 0)
            payload += _props(w.properties) + _str(w.topic, "Will topic") + _bin(w.payload)
        if p.username is not None:
            flags |= 0x80
            payload += _str(p.username, "user name")
        if p.password is not None:
            flags |= 0x40
            payload += _bin(p.password, "password")
        body = (_str("MQTT") + bytes([5, flags]) + _u16(p.keepalive, "keep alive")
                + _props(p.properties) + payload)
        return _fixed(CONNECT, 0, body, max_packet)
    if isinstance(p, Connack):
        if not 0 <= p.reason <= 0xFF:
            raise CodecError("reason code out of range")
        body = bytes([1 if p.session_present else 0, p.reason]) + _props(p.properties)
        return _fixed(CONNACK, 0, body, max_packet)
    if isinstance(p, Subscribe):
        if not p.topics:
            raise CodecError("a SUBSCRIBE needs at least one topic filter")
        body = _u16(p.packet_id, "packet ID") + _props(p.properties)
        if p.packet_id == 0:
            raise CodecError("a SUBSCRIBE needs a packet ID of 1 to 65535")
        for topic, opts in p.topics:
            if not topic or not 0 <= opts <= 0x3F or opts & 3 == 3:
                raise CodecError(f"bad subscription {topic!r} options {opts}")
            body += _str(topic, "topic filter") + bytes([opts])
        return _fixed(SUBSCRIBE, 2, body, max_packet)
    if isinstance(p, Suback):
        if not p.reasons or not all(0 <= r <= 0xFF for r in p.reasons):
            raise CodecError("a SUBACK needs reason codes of 0 to 255")
        body = _u16(p.packet_id, "packet ID") + _props(p.properties) + bytes(p.reasons)
        return _fixed(SUBACK, 0, body, max_packet)
    if isinstance(p, Pingreq):
        return bytes([PINGREQ << 4, 0])
    if isinstance(p, Pingresp):
        return bytes([PINGRESP << 4, 0])
    if isinstance(p, Disconnect):
        if not 0 <= p.reason <= 0xFF:
            raise CodecError("reason code out of range")
        body = b"" if not p.reason and not p.properties else (
            bytes([p.reason]) + _props(p.properties))
        return _fixed(DISCONNECT, 0, body, max_packet)
    raise CodecError(f"cannot encode {type(p).__name__}")


# ---------------------------------------------------------------- decoding


class _Reader:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: memoryview, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > self.end:
            raise CodecError(f"{what} runs past the end of its packet")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self, what: str) -> int:
        return int(self.take(1, what)[0])

    def u16(self, what: str) -> int:
        b = self.take(2, what)
        return int(b[0] << 8 | b[1])

    def u32(self, what: str) -> int:
        return int(struct.unpack(">I", self.take(4, what))[0])

    def vbi(self, what: str) -> int:
        got = decode_vbi(self.data, self.pos, self.end)
        if got is None:
            raise CodecError(f"{what} runs past the end of its packet")
        value, self.pos = got
        return value

    def string(self, what: str) -> str:
        raw = self.take(self.u16(what), what)
        try:
            s = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise CodecError(f"{what} is not UTF-8") from None
        if "\0" in s:
            raise CodecError(f"{what} contains U+0000")
        return s

    def binary(self, what: str) -> bytes:
        return bytes(self.take(self.u16(what), what))

    def rest(self) -> bytes:
        out = bytes(self.data[self.pos:self.end])
        self.pos = self.end
        return out

    def properties(self) -> Properties:
        n = self.vbi("property length")
        if self.pos + n > self.end:
            raise CodecError("properties run past the end of their packet")
        stop, end = self.pos + n, self.end
        self.end = stop
        props: Properties = {}
        try:
            while self.pos < stop:
                pid = self.vbi("property identifier")
                kind = _PROP_TYPES.get(pid)
                if kind is None:
                    raise CodecError(f"unknown property identifier {pid}")
                if kind == "b":
                    v: Any = self.byte("property")
                elif kind == "h":
                    v = self.u16("property")
                elif kind == "i":
                    v = self.u32("property")
                elif kind == "v":
                    v = self.vbi("property")
                elif kind == "s":
                    v = self.string("property")
                elif kind == "d":
                    v = self.binary("property")
                else:
                    v = (self.string("user property"), self.string("user property"))
                if kind == "p" or pid == 11:
                    props.setdefault(pid, []).append(v)
                elif pid in props:
                    raise CodecError(f"property {pid} given twice")
                else:
                    props[pid] = v
        finally:
            self.end = end
        return props


def _decode_one(kind: int, flags: int, r: _Reader) -> Packet:
    if kind == PUBLISH:
        qos = flags >> 1 & 3
        if qos == 3:
            raise CodecError("PUBLISH with QoS 3")
        topic = r.string("topic")
        pid = 0
        if qos:
            pid = r.u16("packet ID")
            if pid == 0:
                raise CodecError("PUBLISH with packet ID 0")
        props = r.properties()
        if not topic and 35 not in props:
            raise CodecError("PUBLISH without a topic")
        return Publish(topic, r.rest(), qos, bool(flags & 1), bool(flags & 8), pid, props)
    expected_flags = 2 if kind == SUBSCRIBE else 0
    if flags != expected_flags:
        raise CodecError(f"reserved flags {flags:#x} in packet type {kind}")
    p: Packet
    if kind == PUBACK:
        pid = r.u16("packet ID")
        reason = r.byte("reason code") if r.pos < r.end else 0
        props = r.properties() if r.pos < r.end else {}
        p = Puback(pid, reason, props)
    elif kind == CONNACK:
        ack = r.byte("acknowledge flags")
        if ack & 0xFE:
            raise CodecError("reserved CONNACK flags")
        p = Connack(bool(ack & 1), r.byte("reason code"), r.properties())
    elif kind == SUBACK:
        pid = r.u16("packet ID")
        props = r.properties()
        reasons = tuple(r.rest())
        if not reasons:
            raise CodecError("SUBACK without reason codes")
        p = Suback(pid, reasons, props)
    elif kind in (PINGREQ, PINGRESP):
        p = Pingreq() if kind == PINGREQ else Pingresp()
    elif kind == DISCONNECT:
        reason = r.byte("reason code") if r.pos < r.end else 0
        props = r.properties() if r.pos < r.end else {}
        p = Disconnect(reason, props)
    elif kind == SUBSCRIBE:
        pid = r.u16("packet ID")
        if pid == 0:
            raise CodecError("SUBSCRIBE with packet ID 0")
        props = r.properties()
        topics = []
        while r.pos < r.end:
            t = r.string("topic filter")
            opts = r.byte("subscription options")
            if not t or opts & 0xC0 or opts & 3 == 3:
                raise CodecError("bad subscription")
            topics.append((t, opts))
        if not topics:
            raise CodecError("SUBSCRIBE without topic filters")
        p = Subscribe(pid, tuple(topics), props)
    elif kind == CONNECT:
        p = _decode_connect(r)
    else:
        raise CodecError(f"unsupported packet type {kind}")
    if r.pos != r.end:
        raise CodecError(f"{r.end - r.pos} trailing bytes in packet type {kind}")
    return p


def _decode_connect(r: _Reader) -> Connect:
    if r.string("protocol name") != "MQTT" or r.byte("protocol level") != 5:
        raise CodecError("not an MQTT 5 CONNECT")
    flags = r.byte("connect flags")
    if flags & 1:
        raise CodecError("reserved CONNECT flag set")
    keepalive = r.u16("keep alive")
    props = r.properties()
    client_id = r.string("client ID")
    will = None
    wq, wr = flags >> 3 & 3, bool(flags & 0x20)
    if flags & 4:
        if wq == 3:
            raise CodecError("Will QoS 3")
        wprops = r.properties()
        will = Will(r.string("Will topic"), r.binary("Will payload"), wq, wr, wprops)
    elif wq or wr:
        raise CodecError("Will QoS or retain without a Will")
    user = r.string("user name") if flags & 0x80 else None
    password = r.binary("password") if flags & 0x40 else None
    return Connect(client_id, keepalive, bool(flags & 2), props, will, user, password)


class Decoder:
    """Bytes in, whole packets out; at most ``max_packet`` bytes held at any time.

    Raises :class:`CodecError` for anything malformed or oversized; after that
    the stream is unusable (the caller closes the connection).
    """

    __slots__ = ("_buf", "max_packet")

    def __init__(self, max_packet: int = ABSOLUTE_MAX) -> None:
        if not 2 <= max_packet <= ABSOLUTE_MAX:
            raise CodecError("max_packet must be 2 to 268435460 bytes")
        self.max_packet = max_packet
        self._buf = b""

    @property
    def pending(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        buf = self._buf + bytes(data) if self._buf else bytes(data)
        out: list[Packet] = []
        view = memoryview(buf)
        pos, n = 0, len(buf)
        while pos < n:
            if not buf[pos] >> 4:
                raise CodecError("reserved packet type 0")
            got = decode_vbi(view, pos + 1, n)
            if got is None:
                if n - pos > self.max_packet:
                    raise CodecError(f"packet header alone exceeds the limit of "
                                     f"{self.max_packet}")
                break
            length, start = got
            total = start - pos + length
            if total > self.max_packet:
                raise CodecError(f"packet of {total} bytes exceeds the limit of "
                                 f"{self.max_packet}")
            if start + length > n:
                break
            first = buf[pos]
            out.append(_decode_one(first >> 4, first & 0x0F, _Reader(view, start, start + length)))
            pos = start + length
        view.release()
        self._buf = buf[pos:] if pos < n else b""
        return out


def decode_all(data: bytes, max_packet: int = ABSOLUTE_MAX) -> list[Packet]:
    """Every packet in ``data``, which must hold whole packets only."""
    d = Decoder(max_packet)
    out = d.feed(data)
    if d.pending:
        raise CodecError(f"{d.pending} bytes of an incomplete packet at the end")
    return out


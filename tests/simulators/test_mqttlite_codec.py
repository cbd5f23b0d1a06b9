"""simulators.mqttlite.codec: round trips, any chunking, garbage, bounds; and a real mosquitto.

The property tests run the sans-IO codec alone; the last tests speak it over a
plain socket to a real mosquitto broker on a loopback port, so what it writes
is what a broker accepts and what it reads is what a broker sends.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from simulators.mqttlite import codec as c
from tests.hw.mosquitto import Broker

WAIT = 20.0  # an upper bound for a broker to answer; never asserted as a time

# ---------------------------------------------------------------- strategies

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
               max_size=40)
topic = text.filter(lambda t: t and "+" not in t and "#" not in t)
blob = st.binary(max_size=200)
u16 = st.integers(1, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

publish_props = st.fixed_dictionaries({}, optional={
    c.P_RESPONSE_TOPIC: topic, c.P_CORRELATION_DATA: blob, c.P_MESSAGE_EXPIRY: u32,
    c.P_PAYLOAD_FORMAT: st.integers(0, 1),
    c.P_USER_PROPERTY: st.lists(st.tuples(text, text), min_size=1, max_size=3)})


@st.composite
def publishes(draw: st.DrawFn) -> c.Publish:
    qos = draw(st.integers(0, 1))
    return c.Publish(draw(topic), draw(blob), qos, draw(st.booleans()),
                     draw(st.booleans()) if qos else False, draw(u16) if qos else 0,
                     draw(publish_props))


connects = st.builds(
    c.Connect, text, st.integers(0, 0xFFFF), st.booleans(),
    st.fixed_dictionaries({}, optional={c.P_SESSION_EXPIRY: u32,
                                        c.P_MAX_PACKET_SIZE: st.integers(1, 2**28)}),
    st.none() | st.builds(c.Will, topic, blob, st.integers(0, 2), st.booleans(),
                          st.fixed_dictionaries({}, optional={24: u32})),
    st.none() | text, st.none() | blob)

packets = st.one_of(
    publishes(),
    connects,
    st.builds(c.Connack, st.booleans(), st.integers(0, 255),
              st.fixed_dictionaries({}, optional={c.P_RECEIVE_MAXIMUM: u16,
                                                  c.P_MAX_PACKET_SIZE: st.integers(1, 2**28),
                                                  c.P_REASON_STRING: text})),
    st.builds(c.Puback, u16, st.integers(0, 255),
              st.fixed_dictionaries({}, optional={c.P_REASON_STRING: text})),
    st.builds(c.Subscribe, u16,
              st.lists(st.tuples(text.filter(bool), st.integers(0, 2)), min_size=1, max_size=4)
              .map(tuple)),
    st.builds(c.Suback, u16, st.lists(st.integers(0, 255), min_size=1, max_size=4).map(tuple)),
    st.just(c.Pingreq()), st.just(c.Pingresp()),
    st.builds(c.Disconnect, st.integers(0, 255),
              st.fixed_dictionaries({}, optional={c.P_SESSION_EXPIRY: u32})),
)


# ---------------------------------------------------------------- sans-IO


@given(st.integers(0, c.VBI_MAX))
@example(0)
@example(127)
@example(128)
@example(16_383)
@example(16_384)
@example(c.VBI_MAX)
def test_variable_byte_integers_round_trip(n: int) -> None:
    b = c.encode_vbi(n)
    assert len(b) <= 4
    assert c.decode_vbi(b, 0, len(b)) == (n, len(b))
    assert c.decode_vbi(b, 0, len(b) - 1) is None  # one byte short: not yet known


def test_variable_byte_integers_out_of_range_or_not_shortest_are_errors() -> None:
    with pytest.raises(c.CodecError):
        c.encode_vbi(c.VBI_MAX + 1)
    with pytest.raises(c.CodecError):
        c.encode_vbi(-1)
    with pytest.raises(c.CodecError, match="longer than 4"):
        c.decode_vbi(b"\x80\x80\x80\x80\x01", 0, 5)
    with pytest.raises(c.CodecError, match="shortest"):
        c.decode_vbi(b"\x80\x00", 0, 2)


@settings(max_examples=300, deadline=None)
@given(packets)
def test_every_packet_round_trips(p: c.Packet) -> None:
    assert c.decode_all(c.encode(p)) == [p]


@settings(max_examples=150, deadline=None)
@given(st.lists(packets, min_size=1, max_size=8), st.data())
def test_any_chunking_gives_the_same_packets(ps: list[c.Packet], data: st.DataObject) -> None:
    wire = b"".join(c.encode(p) for p in ps)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=12)))
    d = c.Decoder()
    got: list[c.Packet] = []
    prev = 0
    for cut in [*cuts, len(wire)]:
        got += d.feed(wire[prev:cut])
        prev = cut
    assert got == ps
    assert d.pending == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(2, 400))
@example(b"\x30\xff\xff\xff\xff", 100)  # a 5-byte remaining length
@example(b"\x30\xff\xff\xff\x7f", 100)  # 268 MB announced
@example(b"\x20\x03\x00\x00\x05\x01", 100)  # properties running past the packet
@example(b"\x30\x05\x00\x02\xc3\x28\x00", 100)  # a topic that is not UTF-8
@example(b"\x36\x03\x00\x01a", 100)  # QoS 3
def test_garbage_never_raises_anything_but_codec_errors(data: bytes, max_packet: int) -> None:
    d = c.Decoder(max_packet)
    try:
        d.feed(data)
    except c.CodecError:
        return
    assert d.pending <= max_packet


def test_an_oversized_packet_is_refused_from_its_header_alone() -> None:
    big = c.encode(c.Publish("t", b"x" * 1000))
    d = c.Decoder(max_packet=500)
    with pytest.raises(c.CodecError, match="exceeds the limit of 500"):
        d.feed(big[:5])  # before the body arrives: nothing of it is buffered
    with pytest.raises(c.CodecError, match="exceeds"):
        c.encode(c.Publish("t", b"x" * 1000), max_packet=500)


@pytest.mark.parametrize("bad, why", [
    (b"\xc1\x00", "reserved flags"),  # PINGREQ with a flag
    (b"\x80\x03\x00\x01\x00", "reserved flags"),  # SUBSCRIBE without its 0b0010
    (b"\xd0\x01\x00", "trailing"),  # PINGRESP with a body
    (b"\x40\x01\x00", "runs past"),  # PUBACK cut short
    (b"\x32\x05\x00\x01a\x00\x00", "packet ID 0"),
    (b"\x50\x02\x00\x01", "unsupported"),  # PUBREC: not in the subset
    (b"\x90\x03\x00\x01\x00", "without reason codes"),
    (b"\x20\x05\x00\x00\x02\x63\x00", "unknown property"),
    (b"\x20\x09\x00\x00\x06\x21\x00\x01\x21\x00\x02", "twice"),
])
def test_malformed_packets_say_why(bad: bytes, why: str) -> None:
    with pytest.raises(c.CodecError, match=why):
        c.decode_all(bad)


def test_values_that_cannot_be_encoded_are_errors() -> None:
    for p in (c.Publish("a/+", b""), c.Publish("t", b"", qos=1, packet_id=0),
              c.Publish("t", b"", qos=3), c.Subscribe(1, ()), c.Suback(1, ()),
              c.Connect("x" * 70_000), c.Publish("t", b"", properties={99: 1}),
              c.Publish("t", b"", properties={c.P_MESSAGE_EXPIRY: -1}),
              c.Connect("a\0b")):
        with pytest.raises(c.CodecError):
            c.encode(p)


# ---------------------------------------------------------------- against mosquitto


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker.plain(tmp_path_factory.mktemp("mqttlite-codec")) as b:
        yield b


class Raw:
    """A plain socket speaking the codec to the broker."""

    def __init__(self, broker: Broker, max_packet: int = c.ABSOLUTE_MAX) -> None:
        self.sock = socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT)
        self.dec = c.Decoder(max_packet)
        self.got: list[c.Packet] = []

    def send(self, p: c.Packet) -> None:
        self.sock.sendall(c.encode(p))

    def next(self) -> c.Packet:
        deadline = time.monotonic() + WAIT
        while not self.got:
            assert time.monotonic() < deadline, "the broker sent nothing"
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed by the broker")
            self.got += self.dec.feed(data)
        return self.got.pop(0)

    def closed_by_broker(self) -> bool:
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self.got += self.dec.feed(data)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()


def test_a_whole_session_with_mosquitto(broker: Broker, tmp_path: Path) -> None:
    """CONNECT with a Will and properties, SUBSCRIBE, PUBLISH with response topic, correlation
    data and expiry to ourselves, PUBACK, PINGREQ, DISCONNECT: all as the broker sees them."""
    r = Raw(broker, max_packet=4096)
    try:
        r.send(c.Connect("codec-test", 30, True, {c.P_SESSION_EXPIRY: 60,
                                                   c.P_MAX_PACKET_SIZE: 4096},
                         c.Will("lite/will", b"gone", 1, True)))
        ack = r.next()
        assert isinstance(ack, c.Connack) and ack.reason == 0 and not ack.session_present
        r.send(c.Subscribe(7, (("lite/#", 1),)))
        sub = r.next()
        assert sub == c.Suback(7, (1,), sub.properties)
        props = {c.P_RESPONSE_TOPIC: "lite/resp/x", c.P_CORRELATION_DATA: b"\x00corr",
                 c.P_MESSAGE_EXPIRY: 120}
        r.send(c.Publish("lite/req", b"\x01payload", 1, packet_id=9, properties=props))
        got = [r.next(), r.next()]
        ack1 = next(p for p in got if isinstance(p, c.Puback))
        msg = next(p for p in got if isinstance(p, c.Publish))
        assert ack1.packet_id == 9 and ack1.reason == 0
        assert msg.topic == "lite/req" and msg.payload == b"\x01payload" and msg.qos == 1
        assert msg.properties[c.P_RESPONSE_TOPIC] == "lite/resp/x"
        assert msg.properties[c.P_CORRELATION_DATA] == b"\x00corr"
        assert 0 < msg.properties[c.P_MESSAGE_EXPIRY] <= 120
        r.send(c.Puback(msg.packet_id))
        # the broker must not send us more than our maximum packet size: it drops it
        r.send(c.Publish("lite/big", b"x" * 5000, 1, packet_id=10))
        r.send(c.Pingreq())
        seen = [r.next(), r.next()]
        assert c.Pingresp() in seen and c.Puback(10) in seen  # and no lite/big PUBLISH
        r.send(c.Disconnect(0, {c.P_SESSION_EXPIRY: 0}))
        assert r.closed_by_broker()
    finally:
        r.close()


def test_the_broker_closes_on_a_protocol_error_and_a_cut_connection_publishes_the_will(broker: Broker) -> None:
    watcher, dev = Raw(broker), Raw(broker)
    try:
        watcher.send(c.Connect("codec-watcher"))
        assert isinstance(watcher.next(), c.Connack)
        watcher.send(c.Subscribe(1, (("lite2/will", 1),)))
        assert isinstance(watcher.next(), c.Suback)
        dev.send(c.Connect("codec-dev", will=c.Will("lite2/will", b"offline", 1, False)))
        assert isinstance(dev.next(), c.Connack)
        dev.send(c.Connect("codec-dev"))  # a second CONNECT is a protocol error
        assert dev.closed_by_broker()
        dev2 = Raw(broker)
        dev2.send(c.Connect("codec-dev2", will=c.Will("lite2/will", b"offline", 1, False)))
        assert isinstance(dev2.next(), c.Connack)
        dev2.sock.shutdown(socket.SHUT_RDWR)  # cut off without a DISCONNECT
        dev2.close()
        will = watcher.next()
        assert isinstance(will, c.Publish) and will.payload == b"offline"
    finally:
        watcher.close()
        dev.close()

"""hw/backends/mqtt_loop.py's paho client: big reads and joined writes, the same packets.

The site session's client serves paho's small reads (a type byte, each length byte,
the rest) from one large ``recv``, and joins the packets waiting to be written into
one ``send``. Over a real socket pair, and with the project's own MQTT codec at the
other end: every packet arrives once, whole and in order, however the bytes are cut;
bytes left from a closed socket are never read as the next one's; packets paho must
see written one by one (QoS 0 publishes, DISCONNECT) are still written by paho.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest

from hw.backends.mqtt_loop import CLEAN_START_FIRST_ONLY, MqttLoop, Session
from simulators.mqttlite import codec as c


def _client() -> tuple[Any, socket.socket, socket.socket, list[Any]]:
    loop = MqttLoop("test")  # never started: the test drives the client itself
    s = Session(loop, "io-test", "127.0.0.1", 1, 30, None, CLEAN_START_FIRST_ONLY)
    heard: list[Any] = []
    client = s.client
    client.on_message = lambda _c, _u, msg: heard.append(
        (msg.topic, bytes(msg.payload), msg.properties.CorrelationData))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours
    return client, ours, theirs, heard


def _read_all(client: Any, sock: socket.socket) -> None:
    """What MqttLoop._service does on a readable socket."""
    client.loop_read()
    while client.socket() is sock and client.buffered():
        client.loop_read()


def _answers(n: int) -> list[bytes]:
    return [c.encode(c.Publish(f"lic/s/d{i}/resp/io-test", bytes([i]) * (i * 37 % 300),
                               qos=0, properties={c.P_CORRELATION_DATA: i.to_bytes(16, "big")}))
            for i in range(n)]


@pytest.mark.parametrize("cut", [None, 1, 7, 1000])
def test_packets_arrive_whole_and_in_order_however_cut(cut: int | None) -> None:
    client, ours, theirs, heard = _client()
    try:
        data = b"".join(_answers(200))
        pieces = [data] if cut is None else [data[i:i + cut] for i in range(0, len(data), cut)]
        for piece in pieces:
            theirs.sendall(piece)
            _read_all(client, ours)
        assert [h[2] for h in heard] == [i.to_bytes(16, "big") for i in range(200)]
        assert [h[1] for h in heard] == [bytes([i]) * (i * 37 % 300) for i in range(200)]
        assert not client.buffered()
    finally:
        ours.close()
        theirs.close()


def test_bytes_of_a_closed_socket_are_not_read_from_the_next() -> None:
    client, ours, theirs, heard = _client()
    try:
        one, two = _answers(2)
        theirs.sendall(one + two[:5])  # the second packet cut short: its start read ahead
        _read_all(client, ours)
        assert len(heard) == 1 and client._in_packet["command"] != 0
        new_ours, new_theirs = socket.socketpair()
        new_ours.setblocking(False)
        client._sock = new_ours  # a reconnection: paho starts a fresh packet
        client._in_packet = {"command": 0, "have_remaining": 0, "remaining_count": [],
                             "remaining_mult": 1, "remaining_length": 0, "packet": bytearray(),
                             "to_process": 0, "pos": 0}
        assert not client.buffered()
        new_theirs.sendall(two)
        _read_all(client, new_ours)
        assert [h[2] for h in heard] == [(0).to_bytes(16, "big"), (1).to_bytes(16, "big")]
        new_ours.close()
        new_theirs.close()
    finally:
        ours.close()
        theirs.close()


def test_queued_packets_are_written_once_in_order() -> None:
    client, ours, theirs, _heard = _client()
    client._state = 1  # connected enough for paho to queue publishes (MQTT_CS_CONNECTED)
    published: list[int] = []
    client.on_publish = lambda _c, _u, mid, *_a: published.append(mid)
    try:
        # 80: within the in-flight limit the session sets (100), so all go out now
        infos = [client.publish(f"lic/s/d{i}/req", bytes([i]) * 50, qos=1) for i in range(80)]
        q0 = client.publish("lic/s/_admin/io-test", b"marker", qos=0)
        infos += [client.publish("lic/s/d9/req", b"after", qos=1)]
        while client.want_write():
            client.loop_write()
        client.disconnect()
        while client.want_write() and client.socket() is not None:
            client.loop_write()
        got = b""
        theirs.settimeout(2)
        while True:
            chunk = theirs.recv(1 << 20)
            if not chunk:
                break
            got += chunk
        packets = c.decode_all(got)
        pubs = [p for p in packets if isinstance(p, c.Publish)]
        assert [p.topic for p in pubs] == ([f"lic/s/d{i}/req" for i in range(80)]
                                           + ["lic/s/_admin/io-test", "lic/s/d9/req"])
        assert [p.packet_id for p in pubs if p.qos == 1] == [i.mid for i in infos]
        assert isinstance(packets[-1], c.Disconnect)
        assert published == [q0.mid]  # QoS 0: done once written; QoS 1: at its PUBACK
        assert not any(i.is_published() for i in infos)
    finally:
        ours.close()
        theirs.close()

"""MQTT identity on the SHIPPED broker configuration (issue 13, item 9).

A real mosquitto runs contrib/mosquitto/mosquitto.conf and its acl (only the
port and the certificate paths rewritten, on 127.0.0.1). Two devices have their
own certificates (CN = device ID). Device B connects with device A's client ID:
the broker gives B its own identity as client ID instead, so A stays connected,
and the ACL keeps B off A's topics.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import hw
from agent.cose import canonical
from agent.ops import AgentOps
from hw.backends.mqtt import MqttListener
from hw.backends.mqtt_contract import (
    Presence,
    device_client_id,
    encode_presence,
    presence_topic,
    request_topic,
    response_topic,
)
from tests.conftest import Site
from tests.hw.mosquitto import EXAMPLE, Broker

WAIT = 10.0

pytestmark = pytest.mark.usefixtures("no_thread_outlives_its_test")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """The shipped configuration, for this test alone (its log is read afterwards)."""
    b = Broker.secure(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


class Impostor:
    """A bare paho client that connects with a client ID of its choosing."""

    def __init__(self, broker: Broker, client_id: str, cert: tuple[Path, Path]) -> None:
        assert broker.pki is not None
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=paho.MQTTv5)
        import ssl

        ctx = ssl.create_default_context(cafile=str(broker.pki.ca_cert))
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
        self.c.tls_set_context(ctx)
        self.cond = threading.Condition()
        self.messages: list[Any] = []
        self.acks: dict[int, str] = {}
        self.granted: list[str] = []
        self.assigned: str | None = None
        self.c.on_connect = self._connected
        self.c.on_message = self._message
        self.c.on_publish = self._published
        self.c.on_subscribe = self._subscribed
        self.c.connect("127.0.0.1", broker.port)
        self.c.loop_start()
        self.wait(lambda: self.c.is_connected(), "the impostor is connected")

    def _connected(self, _c: Any, _u: Any, _f: Any, _rc: Any, props: Any = None) -> None:
        with self.cond:
            self.assigned = getattr(props, "AssignedClientIdentifier", None)
            self.cond.notify_all()

    def _message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _published(self, _c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        with self.cond:
            self.acks[mid] = str(rc)
            self.cond.notify_all()

    def _subscribed(self, _c: Any, _u: Any, _mid: int, codes: Any, _p: Any) -> None:
        with self.cond:
            self.granted += [str(c) for c in codes]
            self.cond.notify_all()

    def wait(self, cond: Any, what: str) -> None:
        deadline = time.monotonic() + WAIT
        with self.cond:
            while not cond():
                assert time.monotonic() < deadline, f"gave up waiting: {what}"
                self.cond.wait(0.05)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> str:
        props = Properties(PacketTypes.PUBLISH)
        props.CorrelationData = b"c"
        info = self.c.publish(topic, payload, qos=1, retain=retain, properties=props)
        deadline = time.monotonic() + WAIT
        with self.cond:
            while info.mid not in self.acks and self.c.is_connected():
                assert time.monotonic() < deadline, "no PUBACK"
                self.cond.wait(0.05)
            return self.acks.get(info.mid, "connection closed")

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def serve(broker: Broker, ops: AgentOps, site: str, cert: tuple[Path, Path],
          log: list[str]) -> MqttListener:
    assert broker.pki is not None
    lst = hw.listen(f"{broker.url}/{site}?ca={broker.pki.ca_cert}&cert={cert[0]}&key={cert[1]}",
                    ops, log=log.append)
    assert isinstance(lst, MqttListener)
    lst.start()
    return lst


def test_the_shipped_configuration_binds_client_ids_to_certificates() -> None:
    text = (EXAMPLE / "mosquitto.conf").read_text()
    settings = {m.group(1): m.group(2) for m in re.finditer(r"(?m)^(\w+) (.+)$", text)}
    assert settings["use_identity_as_username"] == "true"
    assert settings["use_username_as_clientid"] == "true"
    assert settings["require_certificate"] == "true"
    assert settings["allow_anonymous"] == "false"


def test_a_device_cannot_disconnect_another_with_its_client_id(broker: Broker,
                                                               site: Site) -> None:
    p = broker.pki
    assert p is not None
    name = f"id{uuid.uuid4().hex[:8]}"
    a, b = site.device(), site.device()
    a_id, b_id = (d.agent.status()["device_id"] for d in (a, b))
    a_log: list[str] = []
    admin = f"?ca={p.ca_cert}&cert={p.client_cert}&key={p.client_key}"
    lst_a = serve(broker, AgentOps(a.agent), name, p.client(a_id), a_log)
    lst_b = serve(broker, AgentOps(b.agent), name, p.client(b_id), [])
    impostor: Impostor | None = None
    try:
        from hw.backends.mqtt import discover

        # both devices online, each with its own certificate
        assert sorted(discover(f"{broker.url}/{name}{admin}")) == sorted(
            [(a_id, "AS-P", True), (b_id, "AS-P", True)])
        lst_b.stop()  # device B now acts on its own, with its own certificate

        # B asks for A's client ID; the broker makes it B's own identity instead
        impostor = Impostor(broker, device_client_id(name, a_id), p.client(b_id))
        # a round trip through A after the impostor's CONNACK: had the broker closed A's
        # session for it, A would have read that DISCONNECT before this request
        with hw.connect(f"{lst_a.address}{admin}") as c:
            assert c.status()["device_id"] == a_id
        assert not [line for line in a_log if "was lost" in line or "closed" in line], a_log
        assert lst_a._session is not None and lst_a._session.up
        log = broker.log.read_text(errors="replace")
        assert "New client connected from 127.0.0.1" in log
        assert re.search(rf"as {re.escape(b_id)} \(", log), "B's session is named by its CN"
        assert "already connected, closing old connection" not in log
        assert "taken over" not in log.lower()

        # and the ACL keeps B off A's topics, whatever client ID it asked for
        impostor.c.subscribe([(request_topic(name, a_id), 1),
                              (response_topic(name, a_id, "+"), 1)])
        impostor.wait(lambda: len(impostor.granted) == 2, "SUBACK")
        forged = encode_presence(Presence(a_id, "FORGED", False))
        assert impostor.publish(presence_topic(name, a_id), forged, retain=True) in (
            "Not authorized", "connection closed")
        if not impostor.c.is_connected():  # mosquitto may close a client after a refusal
            impostor.close()
            impostor = Impostor(broker, device_client_id(name, a_id), p.client(b_id))
            impostor.c.subscribe([(request_topic(name, a_id), 1)])
        assert impostor.publish(
            request_topic(name, a_id),
            canonical({"v": 1, "id": 1, "op": "read-journal", "args": {}})) in (
            "Not authorized", "connection closed")
        with hw.connect(f"{lst_a.address}{admin}") as c:  # a request to A it must not see
            assert c.check("bacnet")["licensed"] is False
        assert not [m for m in impostor.messages if f"/{a_id}/" in m.topic]
        # A is still online; B is offline (its own agent stopped), never forged
        assert sorted(discover(f"{broker.url}/{name}{admin}")) == sorted(
            [(a_id, "AS-P", True), (b_id, "AS-P", False)])
    finally:
        if impostor is not None:
            impostor.close()
        lst_a.stop()
        lst_b.stop()

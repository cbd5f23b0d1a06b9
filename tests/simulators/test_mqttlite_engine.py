"""simulators.mqttlite.DeviceEngine against a real mosquitto, through the unchanged clients.

Tens of simulated devices with real stores on one engine; the other side is
what ``licadmin`` and ``licagent``'s users already use: ``hw.connect`` (one
:class:`~hw.backends.mqtt.MqttClient` per device), ``discover()``, the
``licadmin`` command as a subprocess, and a bare paho client for what no
well-behaved client does (sending the same request twice).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import hw
from agent.cose import canonical, strict_loads
from agent.ops import AgentOps
from agent.rpc import TransportError
from apps.licadmin import console, inventory, onsite
from hw.backends.mqtt import discover
from hw.backends.mqtt_contract import request_topic, response_topic
from simulators.licensing_server.vendor import Grant
from simulators.mqttlite import CapacityError, DeviceEngine, check_capacity
from tests.conftest import Device, Site
from tests.hw.mosquitto import Broker
from tests.hw.test_mqtt import eventually

WAIT = 20.0  # an upper bound for anything to happen; never asserted as a time
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker.plain(tmp_path_factory.mktemp("mqttlite-engine")) as b:
        yield b


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker.plain(tmp_path / "broker")
    b.start()
    try:
        yield b
    finally:
        b.stop()


pytestmark = pytest.mark.usefixtures("no_thread_outlives_its_test")


class Counting:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.ran: list[str] = []

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        self.ran.append(op)
        return self.inner(op, args)


def fleet(broker: Broker, site: Site, n: int, **kw: Any) -> tuple[DeviceEngine, list[Device],
                                                                   list[Counting], str]:
    name = f"t{uuid.uuid4().hex[:10]}"
    logs: list[str] = kw.pop("logs", [])
    engine = DeviceEngine("127.0.0.1", broker.port, name, log=logs.append, **kw)
    devices = [site.device(model=("AS-P", "AS-B", "Edge-Server")[i % 3]) for i in range(n)]
    handlers = [Counting(AgentOps(d.agent)) for d in devices]
    for d, h in zip(devices, handlers, strict=True):
        st = d.agent.status()
        engine.add(st["device_id"], st["model"], h)
    engine.start()
    assert engine.wait_ready(n, WAIT) == n
    return engine, devices, handlers, name


def dev_id(d: Device) -> str:
    return str(d.agent.status()["device_id"])


def test_discover_status_and_apply_through_the_existing_client(broker: Broker,
                                                               site: Site) -> None:
    engine, devices, _handlers, name = fleet(broker, site, 30)
    try:
        assert engine.url == f"{broker.url}/{name}"
        found = discover(engine.url)
        assert sorted(d for d, _m, _o in found) == sorted(dev_id(d) for d in devices)
        assert all(online for _d, _m, online in found)
        assert {m for _d, m, _o in found} == {"AS-P", "AS-B", "Edge-Server"}
        for d in devices[:3]:
            with hw.connect(f"{broker.url}/{name}/{dev_id(d)}") as c:
                assert c.status()["device_id"] == dev_id(d)
                req = c.request("activate", ["bacnet"])
                resp = d.vendor.issue(req, [Grant("bacnet", 3)], now=d.clock())
                out = c.apply(resp)
                assert out["sequence"] == 1 and not out["already_applied"]
                assert c.apply(resp)["already_applied"]  # idempotent in the core
                assert c.check("bacnet")["licensed"] is True
        assert devices[0].agent.status()["licenses"][0]["feature"] == "bacnet"
        st = engine.stats()
        assert st["connected"] == 30 and st["devices"] == 30 and st["dropped"] == 0
        assert st["requests"] >= 3 * 5  # status, request, apply twice, check
    finally:
        engine.stop()
    assert all(not online for _d, _m, online in discover(f"{broker.url}/{name}"))


def test_a_request_delivered_twice_runs_once(broker: Broker, site: Site) -> None:
    engine, devices, handlers, name = fleet(broker, site, 3)
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="dup-test", protocol=paho.MQTTv5)
    got: list[Any] = []
    cond = threading.Condition()

    def message(_c: Any, _u: Any, msg: Any) -> None:
        with cond:
            got.append(msg)
            cond.notify_all()

    c.on_message = message
    c.connect("127.0.0.1", broker.port)
    c.loop_start()
    try:
        target = dev_id(devices[1])
        reply_to = response_topic(name, target, "dup-test")
        c.subscribe(reply_to, qos=1)
        time.sleep(0.3)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to
        props.CorrelationData = b"same-correlation"
        body = canonical({"v": 1, "id": 9, "op": "create-request",
                          "args": {"action": "activate", "features": ["x"]}})
        for _ in range(2):  # a replaying network, or a client's retry
            c.publish(request_topic(name, target), body, qos=1, properties=props)
        with cond:
            assert cond.wait_for(lambda: len(got) >= 2, WAIT)
        assert got[0].payload == got[1].payload  # the same signed request, twice
        assert strict_loads(got[0].payload, max_size=1 << 16)["ok"] is True
        assert handlers[1].ran.count("create-request") == 1
        assert devices[1].agent.status()["sequence"] == 0
        assert len(devices[1].agent.status()["outstanding_requests"]) == 1
        assert engine.stats()["repeats"] == 1
    finally:
        c.disconnect()
        c.loop_stop()
        engine.stop()


def test_power_loss_publishes_the_will_and_graceful_removal_says_offline(
        broker: Broker, site: Site) -> None:
    engine, devices, _h, name = fleet(broker, site, 4)
    try:
        lost, left, linked = dev_id(devices[0]), dev_id(devices[1]), dev_id(devices[2])
        engine.remove(lost, graceful=False)  # the socket is cut: only the broker can tell
        engine.remove(left)  # offline presence, then DISCONNECT
        engine.drop_connection(linked)  # a link fault: it comes back by itself

        def states() -> dict[str, bool]:
            return {d: o for d, _m, o in discover(f"{broker.url}/{name}")}
        eventually("the Last Will and the goodbye", lambda: not states()[lost]
                   and not states()[left])
        eventually("the dropped device back", lambda: engine.stats()["reconnects"] == 1)
        s = states()
        assert s[linked] and s[dev_id(devices[3])]
        with hw.connect(f"{broker.url}/{name}/{linked}") as c:
            assert c.status()["device_id"] == linked
        with pytest.raises(KeyError):
            engine.remove(lost)
    finally:
        engine.stop()


def test_devices_reconnect_and_announce_again_after_a_broker_restart(own_broker: Broker,
                                                                      site: Site) -> None:
    logs: list[str] = []
    engine, devices, _h, name = fleet(own_broker, site, 20, logs=logs)
    try:
        own_broker.kill()  # no persistence: every retained presence is gone with it
        eventually("all connections lost", lambda: engine.stats()["connected"] == 0)
        own_broker.start()
        assert engine.wait_ready(20, WAIT) == 20
        found = discover(f"{own_broker.url}/{name}")
        assert len(found) == 20 and all(o for _d, _m, o in found)
        st = engine.stats()
        assert st["reconnects"] == 20 and st["lost"] == 20
        assert any("lost" in line and "trying again" in line for line in logs)
        with hw.connect(f"{own_broker.url}/{name}/{dev_id(devices[5])}") as c:
            assert c.status()["sequence"] == 0
    finally:
        engine.stop()


def test_licadmin_gather_over_one_site_session_with_a_partial_result(
        broker: Broker, site: Site, tmp_path: Path) -> None:
    """One device lost its power: listed (its Will says offline), failed, the rest gathered:
    exit 10, as for any partial site step."""
    engine, devices, _h, name = fleet(broker, site, 12)
    try:
        gone = dev_id(devices[4])
        engine.remove(gone, graceful=False)
        eventually("the Will", lambda: [o for d, _m, o in discover(f"{broker.url}/{name}")
                                        if d == gone] == [False])
        out = tmp_path / "site.info"
        p = subprocess.run(
            [str(BIN / "licadmin"), "gather", "--server",
             f"{broker.url}/{name}?presence_timeout=1", "--out", str(out), "--json"],
            capture_output=True, text=True, timeout=120, check=False)
        assert p.returncode == 10, p.stdout + p.stderr
        doc = json.loads(p.stdout)
        assert doc["devices"] == 11 and doc["failed"] == 1
        failed = [r for r in doc["results"] if r["status"] == "failed"]
        assert gone in failed[0]["url"] and "offline" in failed[0]["detail"]
    finally:
        engine.stop()


def test_an_impossible_fleet_is_refused_up_front_with_a_plan() -> None:
    plan = check_capacity(50)
    assert plan.fd_room >= 50 and plan.sources == ("127.0.0.1",)
    with pytest.raises(CapacityError) as err:
        check_capacity(50_000)
    text = str(err.value)
    assert "50000 sessions need 50000 descriptors" in text
    assert "plan: split the fleet into" in text and "own broker" in text
    assert "source addresses 127.0.0.1, 127.0.0.2" in text  # 50,000 > ports of one address
    with pytest.raises(CapacityError, match="broker's descriptor limit is 1024"):
        check_capacity(2000, broker_fd_limit=1024)
    assert check_capacity(40_000, raise_limit=False, reserve=-10**6).sources[:2] == (
        "127.0.0.1", "127.0.0.2")  # a loopback broker: more source addresses, planned


def test_a_site_url_is_one_broker_session_for_every_device(broker: Broker, site: Site,
                                                           tmp_path: Path) -> None:
    """`licadmin`'s site steps reach every device of an mqtt://HOST:PORT/SITE URL through the
    one MqttSite session that listed them: no device gets a connection of its own."""
    engine, devices, handlers, name = fleet(broker, site, 20)
    refs, _site = inventory.servers_from([f"{broker.url}/{name}"], None, 5.0)
    try:
        assert len(refs) == 20 and len({id(r.via) for r in refs}) == 1
        assert {r.device for r in refs} == {dev_id(d) for d in devices}

        def no_connect(url: str) -> Any:
            raise AssertionError(f"a broker session of its own for {url}")
        res = onsite.gather(refs, str(tmp_path / "site.info"), None, no_connect,
                              console.Console(io.StringIO()), jobs=2)
        assert res.code == 0 and res.facts["devices"] == 20
        assert all(h.ran.count("get-info") == 1 for h in handlers)
        # a device whose link drops mid-way is asked again once its presence is back
        site_session = refs[0].via
        engine.drop_connection(refs[3].device)
        assert site_session.call(refs[3].device, "get-status")["device_id"] == refs[3].device
    finally:
        inventory.close_servers(refs)
        engine.stop()


def test_an_engine_started_before_its_broker_serves_once_it_is_up(own_broker: Broker,
                                                                  site: Site) -> None:
    own_broker.kill()
    logs: list[str] = []
    name = f"t{uuid.uuid4().hex[:10]}"
    engine = DeviceEngine("127.0.0.1", own_broker.port, name, log=logs.append)
    devices = [site.device() for _ in range(5)]
    for d in devices:
        engine.add(dev_id(d), "AS-P", AgentOps(d.agent))
    engine.start()
    try:
        eventually("refused attempts", lambda: engine.stats()["connect_failures"] >= 5)
        assert engine.wait_ready(1, 0.2) == 0
        assert any("cannot reach the MQTT broker" in line for line in logs)
        own_broker.start()
        assert engine.wait_ready(5, WAIT) == 5
        assert engine.stats()["reconnects"] == 0  # first connections, only late
        with hw.connect(f"{engine.url}/{dev_id(devices[2])}") as c:
            assert c.status()["sequence"] == 0
    finally:
        engine.stop()
    with pytest.raises(TransportError, match="stopped"):
        engine.add("late", "AS-P", AgentOps(devices[0].agent))


class Overlap:
    """A slow handler that records how many of its calls ran at once."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.active = 0
        self.most = 0
        self.lock = threading.Lock()

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        with self.lock:
            self.active += 1
            self.most = max(self.most, self.active)
        try:
            time.sleep(0.02)  # as an apply's fsyncs would
            return self.inner(op, args)
        finally:
            with self.lock:
                self.active -= 1


def test_one_request_at_a_time_per_device_however_many_arrive(broker: Broker,
                                                              site: Site) -> None:
    name = f"t{uuid.uuid4().hex[:10]}"
    engine = DeviceEngine("127.0.0.1", broker.port, name, workers=4)
    devices = [site.device() for _ in range(2)]
    handlers = [Overlap(AgentOps(d.agent)) for d in devices]
    for d, h in zip(devices, handlers, strict=True):
        engine.add(dev_id(d), "AS-P", h)
    engine.start()
    refs: list[inventory.ServerRef] = []
    try:
        assert engine.wait_ready(2, WAIT) == 2
        refs, _site = inventory.servers_from([engine.url], None, 10.0)
        session = refs[0].via
        results: list[Any] = []

        def ask(dev: str) -> None:
            results.append(session.call(dev, "create-request",
                                        {"action": "activate", "features": []}))
        threads = [threading.Thread(target=ask, args=(dev_id(d),))
                   for d in devices for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(WAIT)
        assert len(results) == 12
        assert [h.most for h in handlers] == [1, 1]  # serialised per device
        assert all(len(d.agent.status()["outstanding_requests"]) == 6 for d in devices)
    finally:
        inventory.close_servers(refs)
        engine.stop()

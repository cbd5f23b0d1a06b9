"""One contract for every link backend (pyserial's suite against loop:// or a port; python-can back-to-back).

Each backend is a starter in :data:`STARTERS` that makes a listener serving a
fresh device and a client connected to it; :data:`BACKENDS` is the
parametrisation. A new backend joins by adding a starter and a param: every
case below then runs against it unchanged.
"""

from __future__ import annotations

import importlib.util
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.errors import GrantsHeldError
from agent.formats import read_device_info
from agent.messages import Action
from agent.ops import AgentOps
from agent.rpc import (
    CheckArgs,
    Op,
    RelayArgs,
    RemoteError,
    RenewArgs,
    RenewResult,
    ReturnArgs,
    TreeResult,
    UseArgs,
    hello_args,
)
from apps.licagent.daemon import relay_to_child
from hw import connect, listen
from hw.backends.loop import LoopFabric
from hw.backends.sim import SimFabric
from hw.link import Listener, ServerClient
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device, Site
from tests.support.pki import Pki, make_pki


@dataclass
class Env:
    """What a starter may need besides the device."""

    tmp: Path
    pki: Callable[[], Pki]
    fixture: Callable[[str], Any] = lambda name: None  # pytest's getfixturevalue


Starter = Callable[[AgentOps, Env], tuple[Listener, Callable[[], ServerClient]]]


def _loop(ops: AgentOps, _env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    fab = LoopFabric()
    lst = listen("loop://contract", ops, fabric=fab)
    lst.start()
    return lst, lambda: connect(lst.address, fabric=fab)


def _sim(ops: AgentOps, _env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    # a line that re-chunks, duplicates and delays, but loses nothing: the contract must
    # hold without waiting for retries (test_sim.py covers the lossy lines)
    fab = SimFabric()
    lst = listen("sim://contract?split=0.5&dup=0.1&delay=0.001&seed=4", ops, fabric=fab)
    lst.start()
    return lst, lambda: connect(lst.address, fabric=fab)


def _pty(ops: AgentOps, _env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    lst = listen("pty://", ops)
    lst.start()
    return lst, lambda: connect(lst.address)  # serial:///dev/pts/N through pyserial


def _tcp(ops: AgentOps, _env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    lst = listen("tcp://127.0.0.1:0", ops)
    lst.start()
    return lst, lambda: connect(lst.address)


def _tls_like(scheme: str) -> Starter:
    def start(ops: AgentOps, env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
        p = env.pki()
        lst = listen(f"{scheme}://127.0.0.1:0?cert={p.server_cert}&key={p.server_key}"
                     f"&ca={p.ca_cert}", ops)
        lst.start()
        return lst, lambda: connect(f"{lst.address}?ca={p.ca_cert}&cert={p.client_cert}"
                                    f"&key={p.client_key}")
    return start


def _mqtt(ops: AgentOps, env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    broker = env.fixture("mosquitto")  # tests/hw/conftest.py: a real mosquitto on loopback
    lst = listen(f"{broker.url}/contract-{uuid.uuid4().hex[:8]}", ops)
    lst.start()
    return lst, lambda: connect(lst.address)


def _mqtts(ops: AgentOps, env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    broker = env.fixture("mosquitto_tls")  # contrib/mosquitto's TLS + ACL configuration
    p = broker.pki
    cert, key = p.client(ops("hello", {})["device_id"])  # the device's own certificate
    lst = listen(f"{broker.url}/contract?ca={p.ca_cert}&cert={cert}&key={key}", ops)
    lst.start()
    return lst, lambda: connect(f"{lst.address}?ca={p.ca_cert}&cert={p.client_cert}"
                                f"&key={p.client_key}")


class _EngineListener(Listener):
    """One device served by the fleet simulator's MQTT engine (simulators.mqttlite), as a
    listener: the device side of the mqtt:// contract without paho."""

    def __init__(self, port: int, ops: AgentOps) -> None:
        from simulators.mqttlite import DeviceEngine  # only when this backend runs

        hello = ops("hello", hello_args())
        self.device_id, self.model = hello["device_id"], hello["model"]
        self.engine = DeviceEngine("127.0.0.1", port, f"contract-{uuid.uuid4().hex[:8]}")
        self.engine.add(self.device_id, self.model, ops)

    def start(self) -> None:
        self.engine.start()
        if self.engine.wait_ready(1, 20.0) != 1:
            self.engine.stop()
            raise AssertionError("the engine's device did not announce itself")
        self.address = f"{self.engine.url}/{self.device_id}"

    def stop(self) -> None:
        self.engine.stop()


def _mqttlite(ops: AgentOps, env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    broker = env.fixture("mosquitto")  # the same real mosquitto as mqtt://
    lst = _EngineListener(broker.port, ops)
    lst.start()
    return lst, lambda: connect(lst.address)  # the ordinary paho client, hw.backends.mqtt


def _usbdrop(ops: AgentOps, env: Env) -> tuple[Listener, Callable[[], ServerClient]]:
    lst = listen(f"usbdrop://{env.tmp / 'stick'}?always=1&poll=0.05", ops)
    lst.start()
    return lst, lambda: connect(lst.address)


STARTERS: dict[str, Starter] = {
    "loop": _loop,
    "sim": _sim,
    "pty": _pty,
    "tcp": _tcp,
    "tls": _tls_like("tls"),
    "https": _tls_like("https"),
    "usbdrop": _usbdrop,
    "mqtt": _mqtt,
    "mqtts": _mqtts,
    "mqttlite": _mqttlite,
    # further backends join here (serial:// on real hardware and QEMU behind an opt-in
    # marker), and in BACKENDS below
}


def _backend(name: str, module: str) -> Any:
    missing = importlib.util.find_spec(module) is None
    return pytest.param(name, id=name, marks=pytest.mark.skipif(
        missing, reason=f"{module} is not in this build"))


BACKENDS = [
    _backend("loop", "hw.backends.loop"),
    _backend("sim", "hw.backends.sim"),
    _backend("pty", "hw.backends.serialport"),
    _backend("tcp", "hw.backends.tcp"),
    _backend("tls", "hw.backends.tcp"),
    _backend("https", "hw.backends.https"),
    _backend("usbdrop", "hw.backends.usbdrop"),
    _backend("mqtt", "hw.backends.mqtt"),
    _backend("mqtts", "hw.backends.mqtt"),
    _backend("mqttlite", "simulators.mqttlite"),  # the device side; the client is mqtt://
]


@pytest.fixture(scope="module")
def module_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(params=BACKENDS)
def served(request: pytest.FixtureRequest, device: Device,
           tmp_path: Path) -> Iterator[tuple[ServerClient, Device]]:
    """A listener of backend ``request.param`` serving a fresh device, and a client of it."""
    before = set(threading.enumerate())
    env = Env(tmp_path, lambda: request.getfixturevalue("module_pki"), request.getfixturevalue)
    lst, make_client = STARTERS[request.param](AgentOps(device.agent), env)
    try:
        client = make_client()
        try:
            yield client, device
        finally:
            client.close()
    finally:
        lst.stop()
    # no leaked threads: everything the listener and client started has ended
    for t in set(threading.enumerate()) - before:
        t.join(timeout=5)
        assert not t.is_alive(), f"{request.param}: thread {t.name} outlived its listener"


def activate(c: ServerClient, device: Device, feature: str = "bacnet") -> tuple[bytes, Any]:
    req = c.request("activate", [feature])
    resp = device.vendor.issue(req, [Grant(feature, 3)], now=device.clock())
    return resp, c.apply(resp)


def test_hello_and_status_shape(served: tuple[ServerClient, Device]) -> None:
    c, device = served
    mine = device.agent.status()
    hello = c.call("hello", {"versions": [1]})
    assert hello["version"] == 1
    assert hello["device_id"] == mine["device_id"] and hello["model"] == "AS-P"
    st = c.status()
    assert {"device_id", "model", "serial", "sequence", "state_digest", "licenses",
            "outstanding_requests", "trusted_keys"} <= set(st)
    assert (st["device_id"], st["sequence"], st["licenses"]) == (mine["device_id"], 0, [])
    assert st["state_digest"] == mine["state_digest"]


def test_device_info_verifies(served: tuple[ServerClient, Device]) -> None:
    c, device = served
    info = read_device_info(c.info())  # checks the device's self-signature
    assert info.device_id == device.agent.status()["device_id"]


def test_request_issue_apply_check(served: tuple[ServerClient, Device]) -> None:
    c, device = served
    _resp, out = activate(c, device)
    assert out["sequence"] == 1 and out["already_applied"] is False
    assert c.check("bacnet")["licensed"] is True
    assert c.status()["sequence"] == 1
    assert device.agent.check("bacnet").licensed  # the store itself, not the link's word


def test_re_apply_is_idempotent(served: tuple[ServerClient, Device]) -> None:
    c, device = served
    resp, _out = activate(c, device)
    again = c.apply(resp)
    assert again["already_applied"] is True and again["sequence"] == 1
    assert c.status()["sequence"] == 1


def test_a_response_for_another_device_is_refused_with_exit_code_5(
    served: tuple[ServerClient, Device], site: Site,
) -> None:
    c, device = served
    other = site.device()
    resp = other.vendor.issue(other.request(features=["bacnet"]), [Grant("bacnet", 3)],
                              now=other.clock())
    before = device.store_bytes()
    with pytest.raises(RemoteError) as err:
        c.apply(resp)
    assert err.value.exit_code == 5
    assert device.store_bytes() == before


def test_a_garbage_file_is_refused_with_exit_code_3(served: tuple[ServerClient, Device]) -> None:
    c, device = served
    before = device.store_bytes()
    with pytest.raises(RemoteError) as err:
        c.apply(b"this is not a license response")
    assert err.value.exit_code == 3
    assert device.store_bytes() == before


def test_journal_is_readable(served: tuple[ServerClient, Device]) -> None:
    c, device = served
    activate(c, device)
    j = c.journal()
    events = [e["event"] for e in j["entries"]]
    assert events[0] == "init" and events[-2:] == ["request", "apply"]
    assert j["verified"] is True


def test_check_of_an_unknown_feature_is_not_licensed(served: tuple[ServerClient, Device]) -> None:
    c, _device = served
    r = c.check("no-such-feature")
    assert r["feature"] == "no-such-feature" and r["licensed"] is False


# ---------------------------------------------------------------- issue 15: floating seats


def test_floating_seats_over_the_link(served: tuple[ServerClient, Device],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Check out until the pool is empty (exit 9), list (one seat a page), renew, return:
    the store agrees."""
    monkeypatch.setattr("agent.ops.SEAT_PAGE", 1)
    c, device = served
    req = c.request("activate", ["editor"])
    c.apply(device.vendor.issue(req, [Grant("editor", 2, floating=True)], now=device.clock()))
    a = c.seat_checkout("editor", "ws-1")
    b = c.seat_checkout("editor", "ws-2", lease_seconds=60)
    assert (a.client, a.until - a.since, b.until - b.since, a.borrowed) == ("ws-1", 300, 60,
                                                                            False)
    with pytest.raises(RemoteError) as exc:
        c.seat_checkout("editor", "ws-3")
    assert exc.value.exit_code == 9 and exc.value.reason == "no-seat"
    assert str(exc.value).startswith("no seat free: 2 of 2 out; next free at ")
    first = c.call("seat-list", {})
    assert len(first["seats"]) == 1 and first["next"] == 1
    lst = c.seat_list()  # both pages
    assert lst.pools == [{"feature": "editor", "count": 2, "out": 2, "free": 0,
                          "next_free": b.until}]
    assert sorted(s["client"] for s in lst.seats) == ["ws-1", "ws-2"]
    device.clock.t += 30
    renewed = c.seat_renew(b.token)
    assert renewed.until == device.clock() + 300 and renewed.token != b.token
    back = c.seat_return(a.token)
    assert back.client == "ws-1"
    with pytest.raises(RemoteError) as exc:
        c.seat_return(a.token)  # once only
    assert exc.value.exit_code == 6 and exc.value.reason == "seat-not-out"
    assert [s.client for s in device.agent.seat_list()[0]] == ["ws-2"]  # the store's word
    c.seat_checkout("editor", "ws-3")
    with pytest.raises(RemoteError) as exc:
        c.seat_checkout("bacnet", "ws-4")
    assert exc.value.exit_code == 1  # not installed


# ---------------------------------------------------------------- issue 14: the system tree


@pytest.fixture(params=BACKENDS)
def served_top(request: pytest.FixtureRequest, site: Site,
               tmp_path: Path) -> Iterator[tuple[ServerClient, Device]]:
    """A top Enterprise Server (relaying to its children over their own links) served by
    backend ``request.param``, and a client of it."""
    before = set(threading.enumerate())
    top = site.device("Enterprise-Server", macs=("52:54:00:00:10:01",))
    env = Env(tmp_path, lambda: request.getfixturevalue("module_pki"), request.getfixturevalue)
    lst, make_client = STARTERS[request.param](AgentOps(top.agent, relay=relay_to_child), env)
    try:
        client = make_client()
        try:
            yield client, top
        finally:
            client.close()
    finally:
        lst.stop()
    for t in set(threading.enumerate()) - before:
        t.join(timeout=5)
        assert not t.is_alive(), f"{request.param}: thread {t.name} outlived its listener"


def test_the_system_tree_over_the_link(served_top: tuple[ServerClient, Device],
                                       site: Site) -> None:
    """A child renews, inherits, is relayed to and seen in the tree; use and check --count;
    a recall comes back as the child's signed return: every tree operation over the link."""
    c, top = served_top
    req = top.agent.request(Action.ACTIVATE, ["SNMP"])
    top.agent.apply(top.vendor.issue(req, [Grant("SNMP", 2, inherit=2)], now=top.clock()))
    top_id = top.agent.state()[0].device_id
    kid = site.device()
    kid_id = kid.agent.state()[0].device_id
    kid_lst = listen("tcp://127.0.0.1:0", AgentOps(kid.agent))  # the top relays over it
    kid_lst.start()
    try:
        info, _i = kid.agent.info()
        res = RenewResult.from_wire(c.call(Op.RENEW_GRANTS, RenewArgs(
            info, kid_lst.address, kid.agent.tree_report()).to_wire()))
        assert read_device_info(res.parent_info).device_id == top_id and res.depth == 0
        kid.agent.attach(res.parent_info, "contract://top", res.depth)
        installed, refused, ret = kid.agent.install_grants(top_id, res.grants, res.recalled)
        assert (installed, refused, ret) == (["SNMP"], [], None)
        assert kid.agent.check("SNMP").licensed  # verified on the child: vendor -> top -> kid

        assert c.typed(Op.USE_FEATURE, UseArgs("SNMP", 2).to_wire()) == UseArgs("SNMP", 2)
        assert c.typed(Op.CHECK_FEATURE, CheckArgs("SNMP", 2).to_wire())["licensed"] is True
        three = c.typed(Op.CHECK_FEATURE, CheckArgs("SNMP", 3).to_wire())
        assert three["licensed"] is False  # answered for three units, not for one
        assert c.check("SNMP")["licensed"] is True

        tree: TreeResult = c.typed(Op.GET_TREE)
        assert (tree.device_id, tree.model, tree.depth) == (top_id, "Enterprise-Server", 0)
        assert [ch["device_id"] for ch in tree.children] == [kid_id]
        assert [(f["feature"], f["required"]) for f in tree.features] == [("SNMP", 2)]

        relayed = c.call(Op.RELAY, RelayArgs(kid_id, "get-license-info", {}).to_wire())
        st = kid.agent.state()[0]
        assert (relayed["device_id"], relayed["sequence"]) == (kid_id, st.sequence)
        kid_tree = c.call(Op.RELAY, RelayArgs(kid_id, "get-tree", {}).to_wire())
        assert (kid_tree["device_id"], kid_tree["parent"]) == (kid_id, top_id)
        with pytest.raises(RemoteError) as err:
            c.call(Op.RELAY, RelayArgs("0" * 64, "get-tree", {}).to_wire())
        assert "is not under this server" in str(err.value)

        with pytest.raises(GrantsHeldError):  # children hold grants: the reclaim recalls them
            top.agent.request(Action.RECLAIM, ["SNMP"])
        res = RenewResult.from_wire(c.call(Op.RENEW_GRANTS, RenewArgs(
            info, kid_lst.address, kid.agent.tree_report()).to_wire()))
        assert res.recalled == ["SNMP"] and res.grants == []
        _inst, _ref, ret = kid.agent.install_grants(top_id, res.grants, res.recalled)
        assert ret is not None
        assert c.call(Op.RETURN_GRANTS, ReturnArgs(ret).to_wire()) == {"features": ["SNMP"]}
        assert top.agent.state()[0].system.granted == ()  # the top's own record
        assert not kid.agent.check("SNMP").licensed
    finally:
        kid_lst.stop()

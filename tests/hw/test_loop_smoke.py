from agent.ops import AgentOps
from hw import connect, listen
from hw.backends.loop import LoopFabric
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device


def test_loop_round_trip(device: Device) -> None:
    fab = LoopFabric()
    lst = listen("loop://dev1", AgentOps(device.agent), fabric=fab)
    lst.start()
    try:
        with connect("loop://dev1", fabric=fab) as c:
            assert c.status()["sequence"] == 0
            req = c.request("activate", ["bacnet"])
            resp = device.vendor.issue(req, [Grant("bacnet", 3)], now=device.clock())
            out = c.apply(resp)
            assert out["sequence"] == 1 and not out["already_applied"]
            assert c.check("bacnet")["licensed"] is True
    finally:
        lst.stop()

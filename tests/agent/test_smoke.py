from tests.conftest import Device


def test_activate_then_check(device: Device) -> None:
    device.activate(bacnet=10)
    assert device.agent.check("bacnet").licensed
    assert not device.agent.check("modbus").licensed

"""Many simulated devices on one MQTT broker in one process, within a few KiB each.

- :mod:`simulators.mqttlite.codec`: a sans-IO MQTT 5 codec for the packets a device needs.
- :class:`DeviceEngine`: the device side of ``hw.backends.mqtt_contract`` for
  thousands of devices on one asyncio loop.
- :func:`check_capacity`: file descriptors and loopback ports, checked before starting.
"""

from simulators.mqttlite.engine import DeviceEngine
from simulators.mqttlite.limits import CapacityError, CapacityPlan, check_capacity

__all__ = ["CapacityError", "CapacityPlan", "DeviceEngine", "check_capacity"]

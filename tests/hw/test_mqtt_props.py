"""hw/backends/mqtt_props.py: FastProperties behaves as paho's Properties, property by property.

For every property paho knows and every packet type, setting a value on both
classes gives the same refusal (type and message) or the same packed bytes, and
unpacking those bytes gives the same properties; lists (user properties,
subscription identifiers) add up the same way. The decoder paho uses for what it
reads makes FastProperties once hw.backends.mqtt_loop is imported (paho 2.x).
"""

from __future__ import annotations

from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import hw.backends.mqtt_loop  # noqa: F401 (installs FastProperties in paho's decoder)
from hw.backends.mqtt_props import FastProperties

_NAMES: dict[str, int] = Properties(PacketTypes.PUBLISH).names
_TYPES = ["Byte", "Two Byte Integer", "Four Byte Integer", "Variable Byte Integer",
          "Binary Data", "UTF-8 Encoded String", "UTF-8 String Pair"]
_SAMPLES: dict[str, list[Any]] = {
    "Byte": [0, 1, 2],
    "Two Byte Integer": [0, 1, 300, 65535, 70000],
    "Four Byte Integer": [0, 1, 30, 2**32 - 1],
    "Variable Byte Integer": [0, 1, 268435455, 268435456],
    "Binary Data": [b"", b"\x00" * 16],
    "UTF-8 Encoded String": ["", "lic/site/dev/answer"],
    "UTF-8 String Pair": [("a", "b")],
}
_PACKETS = [v for k, v in vars(PacketTypes).items() if k.isupper() and isinstance(v, int)
            and k not in ("indexes",)]


def _outcome(cls: type[Any], packet: int, name: str, values: list[Any]) -> tuple[str, Any]:
    p = cls(packet)
    try:
        for v in values:
            setattr(p, name, v)
        packed = p.pack()
    except Exception as exc:  # the refusal itself is compared
        return "refused", (type(exc).__name__, str(exc))
    back = cls(packet)
    back.unpack(packed)
    return "packed", (packed, str(p), p.json(), back.json(), p.isEmpty())


@pytest.mark.parametrize("name", sorted(_NAMES))
def test_every_property_on_every_packet_type_as_paho_does_it(name: str) -> None:
    kind = _TYPES[Properties(PacketTypes.PUBLISH).properties[_NAMES[name]][0]]
    compressed = name.replace(" ", "")
    cases = [[v] for v in _SAMPLES[kind]] + [_SAMPLES[kind][:2]]  # and twice (a list)
    seen = set()
    for packet in _PACKETS:
        for values in cases:
            for attr in (compressed, name):  # paho accepts the name with its spaces too
                want = _outcome(Properties, packet, attr, values)
                got = _outcome(FastProperties, packet, attr, values)
                assert got == want, (name, packet, values)
                seen.add(want[0])
    assert "packed" in seen  # each property applies to some packet type


def test_unknown_names_and_duplicates_are_refused_as_paho_refuses_them() -> None:
    for cls in (Properties, FastProperties):
        with pytest.raises(Exception, match="Property name must be one of"):
            cls(PacketTypes.PUBLISH).Nope = 1
    dup = b"\x06" + b"\x02\x00\x00\x00\x01" * 1  # one Message Expiry Interval
    twice = bytes([10]) + b"\x02\x00\x00\x00\x01" * 2
    for cls in (Properties, FastProperties):
        ok = cls(PacketTypes.PUBLISH)
        ok.unpack(b"\x05" + dup[1:])
        assert ok.MessageExpiryInterval == 1
        with pytest.raises(Exception, match="must not exist more than once"):
            cls(PacketTypes.PUBLISH).unpack(twice)


def test_unpack_starts_from_nothing() -> None:
    p = FastProperties(PacketTypes.PUBLISH)
    p.ResponseTopic = "old"
    p.unpack(b"\x00")
    assert p.isEmpty() and not hasattr(p, "ResponseTopic")


def test_paho_decodes_into_fast_properties() -> None:
    try:
        from paho.mqtt import _packet
    except ImportError:
        pytest.skip("paho-mqtt 1.6 decodes in its client module (left as it is)")
    assert _packet.Properties is FastProperties
    props = FastProperties(PacketTypes.PUBLISH)
    props.CorrelationData = b"c" * 16
    props.ResponseTopic = "lic/v1/site/dev/answer"
    topic = b"lic/v1/site/dev/request"
    body = len(topic).to_bytes(2, "big") + topic + (7).to_bytes(2, "big") + props.pack()
    got = _packet.decode_publish(0x32, body + b"payload", 5)  # QoS 1, MQTT 5
    assert isinstance(got.properties, FastProperties)
    assert (got.properties.CorrelationData, got.properties.ResponseTopic) == (
        b"c" * 16, "lic/v1/site/dev/answer")

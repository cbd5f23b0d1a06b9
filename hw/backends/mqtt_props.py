"""paho's MQTT 5 properties at the cost of a dict lookup: the same class, its tables built once.

paho-mqtt's :class:`~paho.mqtt.properties.Properties` builds two tables (27 names,
27 identifiers, each through ``list.index``) in every object, and finds a property
by stripping the spaces of every name in turn. A site session makes several per
server (the request's properties, the answer's, the PUBACK's): about a third of
``licadmin gather``'s time on a site of 10,000 went there. :class:`FastProperties`
is a subclass that shares paho's tables, built once from a paho object, and looks
names and identifiers up in dictionaries made from them; what it accepts, refuses
(the same :class:`~paho.mqtt.MQTTException` messages, raised by paho's own code) and
packs is paho's. :func:`install` has paho's packet decoder (paho-mqtt 2.x, the module
``paho.mqtt._packet``) make these for what it reads; paho 1.6 keeps its own (slower,
the same).
"""

from __future__ import annotations

from typing import Any

from paho.mqtt import properties as _paho_properties

__all__ = ["FastProperties", "install"]

# paho is untyped: reached through these aliases
_props: Any = _paho_properties
Properties: Any = _props.Properties
_VBI: Any = _props.VariableByteIntegers
_TEMPLATE: Any = Properties(1)  # any packet type: the tables do not depend on it
_NAMES: dict[str, int] = _TEMPLATE.names
_TYPES: list[str] = _TEMPLATE.types
_TABLE: dict[int, tuple[int, list[int]]] = _TEMPLATE.properties
#: "ResponseTopic" -> 8, as paho's getIdentFromName finds it
_IDENT: dict[str, int] = {}
for _name, _ident in _NAMES.items():
    _IDENT.setdefault(_name.replace(" ", ""), _ident)
#: 8 -> "Response Topic" (paho's getNameFromIdent: the last name with that identifier)
_NAME_OF: dict[int, str] = {ident: name for name, ident in _NAMES.items()}
#: every property in paho's packing order: (attribute, identifier, type)
_ORDER: tuple[tuple[str, int, int], ...] = tuple(
    (name.replace(" ", ""), _IDENT[name.replace(" ", "")], _TABLE[_IDENT[name.replace(" ", "")]][0])
    for name in _NAMES)
_MULTIPLE = frozenset(ident for ident in _NAME_OF if _TEMPLATE.allowsMultiple(
    _NAME_OF[ident].replace(" ", "")))
#: the properties whose values paho range-checks: set through paho's own code
_CHECKED = frozenset({"ReceiveMaximum", "TopicAlias", "TopicAliasMaximum", "MaximumPacketSize",
                      "SubscriptionIdentifier", "RequestResponseInformation",
                      "RequestProblemInformation", "PayloadFormatIndicator"})
_PRIVATE = frozenset({"packetType", "types", "names", "properties"})


class FastProperties(Properties):  # type: ignore[misc]  # (paho's class, untyped)
    """:class:`paho.mqtt.properties.Properties`, sharing its tables between objects."""

    def __init__(self, packetType: int) -> None:
        object.__setattr__(self, "packetType", packetType)
        object.__setattr__(self, "types", _TYPES)
        object.__setattr__(self, "names", _NAMES)
        object.__setattr__(self, "properties", _TABLE)

    def getIdentFromName(self, compressedName: str) -> int:
        return _IDENT.get(compressedName, -1)

    def getNameFromIdent(self, identifier: int) -> str | None:
        return _NAME_OF.get(identifier)

    def allowsMultiple(self, compressedName: str) -> bool:
        return _IDENT.get(compressedName, -1) in _MULTIPLE

    def __setattr__(self, name: str, value: Any) -> None:
        bare = name.replace(" ", "")
        ident = _IDENT.get(bare)
        if (ident is None or bare in _PRIVATE or bare in _CHECKED or ident in _MULTIPLE
                or self.packetType not in _TABLE[ident][1]):
            super().__setattr__(name, value)  # paho's checks, refusals and lists
            return
        object.__setattr__(self, bare, value)

    def clear(self) -> None:
        d = self.__dict__
        for attr, _ident, _type in _ORDER:
            if attr in d:
                del d[attr]

    def pack(self) -> bytes:
        d = self.__dict__
        out = b""
        for attr, ident, kind in _ORDER:
            if attr in d:
                values = d[attr] if ident in _MULTIPLE else (d[attr],)
                for v in values:
                    out += self.writeProperty(ident, kind, v)
        return bytes(_VBI.encode(len(out))) + out


def install() -> None:
    """Have paho's packet decoder (paho-mqtt 2.x) make :class:`FastProperties`; once is enough."""
    try:
        import paho.mqtt._packet

        _packet: Any = paho.mqtt._packet
    except ImportError:  # paho-mqtt 1.6 decodes in its client module: left as it is
        return
    if getattr(_packet, "Properties", None) is Properties:
        _packet.Properties = FastProperties

"""The simulated server models and their hardware facts: AS-P, AS-B (embedded ARM), Edge Server and
Enterprise Server (PC/VM).

Facts are made from a seeded random stream and the server's index, so the same
scenario seed gives the same serial numbers, MAC addresses, firmware versions
and board IDs on every run.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

from agent.identity import HardwareFacts

__all__ = ["LINKS", "MODELS", "ModelSpec", "make_facts", "replacement_mac"]

#: every link a scenario may name, and what it is on a real server
LINKS: Mapping[str, str] = {
    "tcp": "the LAN port (tcp://127.0.0.1:PORT)",
    "pty": "the serial console (a real pseudo-terminal, serial:///dev/pts/N)",
    "usbdrop": "the USB device port used as a mailbox (usbdrop:///FOLDER)",
    "mqtt": "the site broker (mqtt://HOST:PORT/SITE/DEVICE_ID)",
    "sim": "an in-process line with the hw fault injector (sim://NAME, Python API only)",
}


@dataclass(frozen=True)
class ModelSpec:
    """What one model is: its links and how its hardware describes itself."""

    name: str
    links: tuple[str, ...]
    #: serial number: prefix, then YYWW (production year and week) and a 5-digit unit number,
    #: or for PCs ES- and a 10-character service tag
    serial_prefix: str
    oui: str | None  # fixed vendor OUI of the controller family; None: VM-style addresses
    nics: int
    boards: tuple[str, ...]
    firmware: tuple[str, ...]
    machine_id: bool  # a Linux machine ID the agent binds to (PC/VM only)
    family: int = 0  # address block of the model within its vendor OUI


_EBO = ("4.0.4.13", "5.0.3.117", "6.0.2.43", "6.0.4.90")
MODELS: Mapping[str, ModelSpec] = {
    "AS-P": ModelSpec("AS-P", ("tcp", "pty", "usbdrop", "mqtt", "sim"), "AS-P-", "00:80:f4", 2,
                      ("SXWASPXXX10001", "SXWASPXXX10002"),
                      tuple(f"EBO AS-P {v} (armv7l)" for v in _EBO), False, 1),
    "AS-B": ModelSpec("AS-B", ("tcp", "pty", "usbdrop", "mqtt", "sim"), "AS-B-", "00:80:f4", 1,
                      ("SXWASB24X10001", "SXWASB36X10001", "SXWASB36X10002"),
                      tuple(f"EBO AS-B {v} (armv7l)" for v in _EBO), False, 2),
    # a PC or VM: the LAN only, no serial console and no USB device port
    "Edge-Server": ModelSpec("Edge-Server", ("tcp", "mqtt", "sim"), "ES-", None, 2,
                             ("KVM Standard PC (Q35 + ICH9, 2009)", "VMware7,1",
                              "ProLiant DL20 Gen10"),
                             tuple(f"EBO Edge Server {v} (x86_64)" for v in _EBO), True),
    # issue 14: the top of a system (Enterprise Server or Enterprise Central): a PC or VM
    "Enterprise-Server": ModelSpec("Enterprise-Server", ("tcp", "mqtt", "sim"), "ENT-", None, 1,
                                   ("KVM Standard PC (Q35 + ICH9, 2009)", "VMware7,1",
                                    "PowerEdge R250"),
                                   tuple(f"EBO Enterprise Server {v} (x86_64)" for v in _EBO),
                                   True, 1),
}

_TAG = "0123456789BCDFGHJKLMNPQRSTVWXYZ"


def _mac(rng: random.Random, oui: str | None) -> str:
    if oui is None:  # QEMU/KVM's locally administered range, as virt-manager assigns
        oui = "52:54:00"
    return oui + "".join(f":{rng.randrange(256):02x}" for _ in range(3))


def make_facts(model: str, seed: int, index: int) -> HardwareFacts:
    """The facts of server number ``index`` of ``model`` in a fleet made with ``seed``.

    Serial numbers are unique within a fleet (the unit number is the index); MAC
    addresses are drawn per server and made unique by the index bytes.
    """
    spec = MODELS[model]
    rng = random.Random(f"{seed}/{model}/{index}")
    if spec.oui is not None:
        year, week = rng.randrange(18, 26), rng.randrange(1, 53)
        serial = f"{spec.serial_prefix}{year:02d}{week:02d}{index:05d}"
        # controllers: consecutive addresses on the board; a block per model (and seed),
        # the unit number below it, so no two units of a fleet share one
        block = (spec.family * 8 + seed % 8) << 18
        units = [block | ((index * spec.nics + n) & 0x3FFFF) for n in range(spec.nics)]
        macs = tuple(spec.oui + "".join(f":{u >> s & 0xff:02x}" for s in (16, 8, 0))
                     for u in units)
    else:
        serial = spec.serial_prefix + "".join(rng.choice(_TAG) for _ in range(6)) + f"{index:04d}"
        # QEMU/KVM's 52:54:00 prefix; unit number and NIC number keep them unique in the fleet
        # (the family's bit keeps two VM models with the same unit number apart)
        macs = tuple(f"52:54:00:{(index >> 8) & 0xff:02x}:{index & 0xff:02x}:"
                     f"{spec.family << 7 | n << 5 | rng.randrange(32):02x}"
                     for n in range(spec.nics))
    machine_id = f"{rng.getrandbits(128):032x}" if spec.machine_id else None
    return HardwareFacts(model=model, serial=serial, macs=tuple(sorted(set(macs))),
                         board=rng.choice(spec.boards), firmware=rng.choice(spec.firmware),
                         machine_id=machine_id)


def replacement_mac(facts: HardwareFacts, rng: random.Random) -> HardwareFacts:
    """The same server with its first network card replaced (a new MAC address)."""
    spec = MODELS[facts.model or "AS-P"]
    new = _mac(rng, spec.oui)
    while new in facts.macs:
        new = _mac(rng, spec.oui)
    macs = tuple(sorted((new, *facts.macs[1:])))
    return HardwareFacts(model=facts.model, serial=facts.serial, macs=macs, board=facts.board,
                         firmware=facts.firmware, machine_id=facts.machine_id, usb=facts.usb)

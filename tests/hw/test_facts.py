"""Tests for hw.facts: Linux facts from fake sysfs trees, static facts and facts files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import UsageError
from agent.identity import FactsProvider, HardwareFacts
from hw.facts import LinuxFactsProvider, StaticFactsProvider, load_facts_file

DMI = "sys/class/dmi/id"


def put(root: Path, rel: str, content: str | bytes) -> Path:
    """Write ``content`` to ``root/rel``, creating parent directories."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content)
    return p


def nic(root: Path, name: str, mac: str, *, physical: bool) -> None:
    put(root, f"sys/class/net/{name}/address", mac + "\n")
    if physical:
        (root / f"sys/class/net/{name}/device").mkdir()


def usb(root: Path, dev: str, vendor: str, product: str) -> None:
    put(root, f"sys/bus/usb/devices/{dev}/idVendor", vendor + "\n")
    put(root, f"sys/bus/usb/devices/{dev}/idProduct", product + "\n")


@pytest.fixture
def x86(tmp_path: Path) -> Path:
    """A PC with DMI, one physical NIC, one veth, loopback and two USB devices."""
    put(tmp_path, f"{DMI}/product_serial", "PF1ABCDE\n")
    put(tmp_path, f"{DMI}/board_serial", "BSN-123\n")
    put(tmp_path, f"{DMI}/board_name", "  B450M DS3H  \n")
    put(tmp_path, f"{DMI}/bios_version", "F50\n")
    put(tmp_path, f"{DMI}/product_uuid", "4C4C4544-0042-3510-8053-B4C04F4A5A31\n")
    put(tmp_path, "etc/machine-id", "0123456789abcdef0123456789abcdef\n")
    nic(tmp_path, "enp3s0", "1C:69:7A:0A:BB:CC", physical=True)
    nic(tmp_path, "veth1a2b3c", "ae:12:34:56:78:9a", physical=False)
    nic(tmp_path, "lo", "00:00:00:00:00:00", physical=False)
    usb(tmp_path, "1-1", "0403", "6001")
    usb(tmp_path, "1-2", "0403", "6001")  # a second identical adapter: deduplicated
    usb(tmp_path, "usb1", "1D6B", "0002")
    put(tmp_path, "sys/bus/usb/devices/1-0:1.0/bInterfaceClass", "09\n")  # no idVendor
    return tmp_path


@pytest.fixture
def arm(tmp_path: Path) -> Path:
    """An ARM board: device tree, no DMI."""
    put(tmp_path, "proc/device-tree/serial-number", b"10000000a1b2c3d4\x00")
    put(tmp_path, "proc/device-tree/model", b"Raspberry Pi 4 Model B Rev 1.4\x00")
    put(tmp_path, "proc/device-tree/chosen/u-boot,version", b"U-Boot 2023.04\x00")
    put(tmp_path, "etc/machine-id", "fedcba9876543210fedcba9876543210\n")
    nic(tmp_path, "eth0", "dc:a6:32:01:02:03", physical=True)
    nic(tmp_path, "wlan0", "DC:A6:32:01:02:04", physical=True)
    nic(tmp_path, "wg0", "00:00:00:00:00:00", physical=False)
    nic(tmp_path, "docker0", "02:42:ac:11:00:01", physical=False)
    return tmp_path


@pytest.fixture
def container(tmp_path: Path) -> Path:
    """A container: only eth0 without a device entry, and /etc/machine-id."""
    put(tmp_path, "etc/machine-id", "3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")
    nic(tmp_path, "eth0", "02:42:AC:11:00:02", physical=False)
    nic(tmp_path, "lo", "00:00:00:00:00:00", physical=False)
    return tmp_path


def test_x86_pc(x86: Path) -> None:
    facts = LinuxFactsProvider(x86, model="AS-P").read()
    assert facts == HardwareFacts(
        model="AS-P",
        serial="PF1ABCDE",
        macs=("1c:69:7a:0a:bb:cc",),
        board="B450M DS3H",
        firmware="F50",
        machine_id="4c4c4544-0042-3510-8053-b4c04f4a5a31",
        usb=("0403:6001", "1d6b:0002"),
    )
    assert facts.binding_facts() == (
        "board=B450M DS3H",
        "mac=1c:69:7a:0a:bb:cc",
        "machine-id=4c4c4544-0042-3510-8053-b4c04f4a5a31",
        "model=AS-P",
        "serial=PF1ABCDE",
    )


def test_arm_board_with_device_tree(arm: Path) -> None:
    facts = LinuxFactsProvider(arm).read()
    assert facts.model is None
    assert facts.serial == "10000000a1b2c3d4"
    assert facts.board == "Raspberry Pi 4 Model B Rev 1.4"
    assert facts.firmware == "U-Boot 2023.04"
    assert facts.machine_id == "fedcba9876543210fedcba9876543210"
    assert facts.macs == ("dc:a6:32:01:02:03", "dc:a6:32:01:02:04")
    assert facts.usb == ()
    assert all("\x00" not in f for f in facts.binding_facts())


def test_container_falls_back_to_non_physical_nics(container: Path) -> None:
    facts = LinuxFactsProvider(container, model="AS-P").read()
    assert facts == HardwareFacts(
        model="AS-P",
        macs=("02:42:ac:11:00:02",),
        machine_id="3d1219c7c4c5404aaa1f6d2a48adfda4",
    )


def test_physical_nics_preferred_over_non_physical(x86: Path) -> None:
    nic(x86, "eth9", "02:00:00:00:00:09", physical=False)  # not in the virtual-name list
    assert LinuxFactsProvider(x86).read().macs == ("1c:69:7a:0a:bb:cc",)


def test_mixed_case_duplicate_macs_are_deduplicated(x86: Path) -> None:
    nic(x86, "bond0", "1c:69:7a:0a:bb:cc", physical=False)
    nic(x86, "enp4s0", "1C:69:7A:0A:BB:CC", physical=True)
    assert LinuxFactsProvider(x86).read().macs == ("1c:69:7a:0a:bb:cc",)


@pytest.mark.parametrize(
    "name", ["veth0", "docker0", "br-1234abcd", "virbr0", "tun0", "tap0", "wg0"]
)
def test_virtual_interfaces_are_ignored_even_without_physical_ones(
    tmp_path: Path, name: str
) -> None:
    nic(tmp_path, name, "02:11:22:33:44:55", physical=False)
    assert LinuxFactsProvider(tmp_path).read().macs == ()


def test_all_zero_mac_ignored(tmp_path: Path) -> None:
    nic(tmp_path, "eth0", "00:00:00:00:00:00", physical=True)
    nic(tmp_path, "eth1", "00:1a:2b:3c:4d:5e", physical=True)
    assert LinuxFactsProvider(tmp_path).read().macs == ("00:1a:2b:3c:4d:5e",)


@pytest.mark.parametrize(
    "placeholder",
    [
        "",
        "None",
        "Default string",
        "To Be Filled By O.E.M.",
        "Not Specified",
        "0",
        "System Serial Number",
        "0123456789",
        "   \n",
    ],
)
def test_serial_placeholders_ignored(tmp_path: Path, placeholder: str) -> None:
    put(tmp_path, f"{DMI}/product_serial", placeholder + "\n")
    put(tmp_path, f"{DMI}/board_serial", "REAL-BOARD-SN\n")
    assert LinuxFactsProvider(tmp_path).read().serial == "REAL-BOARD-SN"


def test_all_serials_placeholders_means_no_serial(tmp_path: Path) -> None:
    put(tmp_path, f"{DMI}/product_serial", "To be filled by O.E.M.\n")
    put(tmp_path, f"{DMI}/board_serial", "Default string\n")
    put(tmp_path, "proc/device-tree/serial-number", b"0\x00")
    facts = LinuxFactsProvider(tmp_path).read()
    assert facts.serial is None
    assert not any(f.startswith("serial=") for f in facts.binding_facts())


def test_device_tree_serial_used_when_dmi_serials_are_placeholders(tmp_path: Path) -> None:
    put(tmp_path, f"{DMI}/product_serial", "System Serial Number\n")
    put(tmp_path, "proc/device-tree/serial-number", b"ABC123\x00")
    assert LinuxFactsProvider(tmp_path).read().serial == "ABC123"


def test_explicit_serial_wins(x86: Path) -> None:
    assert LinuxFactsProvider(x86, serial=" SN-EXPLICIT ").read().serial == "SN-EXPLICIT"


def test_placeholder_product_uuid_falls_back_to_machine_id(x86: Path) -> None:
    put(x86, f"{DMI}/product_uuid", "03000200-0400-0500-0006-000700080009\n")
    assert LinuxFactsProvider(x86).read().machine_id == "0123456789abcdef0123456789abcdef"


def test_unreadable_file_is_skipped(x86: Path) -> None:
    # chmod 000 does not stop root; a directory in place of the file makes the
    # read raise IsADirectoryError instead.
    (x86 / DMI / "product_serial").unlink()
    (x86 / DMI / "product_serial").mkdir()
    (x86 / DMI / "bios_version").unlink()
    (x86 / DMI / "bios_version").mkdir()
    (x86 / "sys/class/net/enp3s0/address").unlink()
    (x86 / "sys/class/net/enp3s0/address").mkdir()
    facts = LinuxFactsProvider(x86).read()
    assert facts.serial == "BSN-123"  # next candidate
    assert facts.firmware is None
    assert facts.macs == ()  # only the physical NIC had a MAC; veth is virtual
    assert facts.board == "B450M DS3H"


def test_empty_root_gives_empty_facts(tmp_path: Path) -> None:
    assert LinuxFactsProvider(tmp_path, model="AS-P").read() == HardwareFacts(model="AS-P")


def test_binding_facts_change_when_a_mac_changes(x86: Path) -> None:
    before = LinuxFactsProvider(x86).read()
    put(x86, "sys/class/net/enp3s0/address", "1c:69:7a:0a:bb:cd\n")
    after = LinuxFactsProvider(x86).read()
    assert before.binding_facts() != after.binding_facts()
    assert "mac=1c:69:7a:0a:bb:cd" in after.binding_facts()


def test_firmware_and_usb_do_not_change_binding_facts(x86: Path) -> None:
    before = LinuxFactsProvider(x86).read()
    put(x86, f"{DMI}/bios_version", "F51\n")
    usb(x86, "1-3", "10c4", "ea60")
    after = LinuxFactsProvider(x86).read()
    assert before != after
    assert before.binding_facts() == after.binding_facts()


def test_providers_satisfy_protocol(x86: Path) -> None:
    providers: list[FactsProvider] = [
        LinuxFactsProvider(x86),
        StaticFactsProvider(HardwareFacts(model="AS-P")),
    ]
    for p in providers:
        assert isinstance(p.read(), HardwareFacts)


def test_real_machine_reads_without_raising() -> None:
    facts = LinuxFactsProvider().read()
    assert isinstance(facts, HardwareFacts)
    assert all(m == m.lower() for m in facts.macs)


# --- StaticFactsProvider ---------------------------------------------------------------------


def test_static_provider_returns_given_facts() -> None:
    facts = HardwareFacts(model="AS-P", serial="S1", macs=("aa:bb:cc:dd:ee:ff",))
    assert StaticFactsProvider(facts).read() is facts


def test_from_mapping_full_and_normalised() -> None:
    p = StaticFactsProvider.from_mapping(
        {
            "model": "AS-P",
            "serial": "S1",
            "macs": ["AA:BB:CC:DD:EE:FF", "00:11:22:33:44:55", "aa:bb:cc:dd:ee:ff"],
            "board": "B1",
            "firmware": "F1",
            "machine_id": "m1",
            "usb": ["0403:6001"],
        }
    )
    assert p.read() == HardwareFacts(
        model="AS-P",
        serial="S1",
        macs=("00:11:22:33:44:55", "aa:bb:cc:dd:ee:ff"),
        board="B1",
        firmware="F1",
        machine_id="m1",
        usb=("0403:6001",),
    )


def test_from_mapping_empty_and_nulls() -> None:
    assert StaticFactsProvider.from_mapping({}).read() == HardwareFacts()
    assert StaticFactsProvider.from_mapping({"serial": None}).read() == HardwareFacts()


def test_from_mapping_round_trips_as_dict(x86: Path) -> None:
    facts = LinuxFactsProvider(x86, model="AS-P").read()
    assert StaticFactsProvider.from_mapping(facts.as_dict()).read() == facts


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"colour": "red"}, "colour"),
        ({"model": 3}, "model"),
        ({"serial": ["S1"]}, "serial"),
        ({"machine_id": True}, "machine_id"),
        ({"macs": "aa:bb:cc:dd:ee:ff"}, "macs"),
        ({"macs": [1, 2]}, "macs"),
        ({"macs": None}, "macs"),
        ({"usb": [""]}, "usb"),
        ({"usb": {"0403": "6001"}}, "usb"),
    ],
)
def test_from_mapping_errors_name_the_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(UsageError, match=repr(key)):
        StaticFactsProvider.from_mapping(data)


# --- load_facts_file -------------------------------------------------------------------------


def test_load_facts_file(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"model": "AS-P", "macs": ["AA:BB:CC:DD:EE:FF"]}))
    assert load_facts_file(path).read() == HardwareFacts(model="AS-P", macs=("aa:bb:cc:dd:ee:ff",))


def test_load_facts_file_missing(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(UsageError, match="cannot read hardware facts file") as exc:
        load_facts_file(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '"facts"', "null"])
def test_load_facts_file_unparseable_or_not_object(tmp_path: Path, content: str) -> None:
    path = tmp_path / "facts.json"
    path.write_text(content)
    with pytest.raises(UsageError, match="hardware facts file"):
        load_facts_file(path)


def test_load_facts_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_bytes(b'{"model": "\xff"}')
    with pytest.raises(UsageError, match="hardware facts file"):
        load_facts_file(path)


def test_load_facts_file_directory(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="hardware facts file"):
        load_facts_file(tmp_path)


def test_load_facts_file_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "facts.json"
    path.write_text(json.dumps({"model": "AS-P", "mac": ["aa:bb:cc:dd:ee:ff"]}))
    with pytest.raises(UsageError, match="'mac'") as exc:
        load_facts_file(path)
    assert str(path) in str(exc.value)

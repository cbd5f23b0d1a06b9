"""Hardware facts providers: Linux sysfs/DMI/device tree, and facts given as data."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from agent.errors import MalformedError, UsageError
from agent.identity import HardwareFacts

__all__ = [
    "PLACEHOLDERS",
    "VIRTUAL_NET_PREFIXES",
    "LinuxFactsProvider",
    "StaticFactsProvider",
    "load_facts_file",
]

_ROOT = Path("/")

#: Values firmware vendors leave in DMI/device-tree fields instead of a real one
#: (compared case-insensitively after stripping). Strings made only of zeros
#: ("00000000") are treated as placeholders too.
PLACEHOLDERS: frozenset[str] = frozenset(
    {
        "",
        "none",
        "default string",
        "to be filled by o.e.m.",
        "not specified",
        "0",
        "system serial number",
        "0123456789",
    }
)

#: DMI product UUIDs that many boards share, so they identify nothing.
_PLACEHOLDER_UUIDS: frozenset[str] = frozenset(
    {
        "00000000-0000-0000-0000-000000000000",
        "ffffffff-ffff-ffff-ffff-ffffffffffff",
        "03000200-0400-0500-0006-000700080009",
    }
)

#: Name prefixes of network interfaces that are virtual: their MACs are random
#: or borrowed and say nothing about the box. ``ifb`` and ``dummy`` are added to
#: the usual container/VPN/bridge ones because they get a random MAC at creation.
VIRTUAL_NET_PREFIXES: tuple[str, ...] = (
    "veth",
    "docker",
    "br-",
    "virbr",
    "tun",
    "tap",
    "wg",
    "ifb",
    "dummy",
)

_DMI = "sys/class/dmi/id"
_DT = "proc/device-tree"


def _clean(raw: str) -> str | None:
    """Strip whitespace and device-tree NUL terminators; empty becomes ``None``."""
    value = raw.strip().strip("\x00").strip()
    return value or None


def _read(path: Path) -> str | None:
    """The stripped text of ``path``, or ``None`` if it is absent, unreadable or empty."""
    try:
        data = path.read_bytes()
    except OSError:  # missing, PermissionError, IsADirectoryError, EIO on sysfs ...
        return None
    return _clean(data.decode("utf-8", errors="replace"))


def _is_placeholder(value: str) -> bool:
    v = value.strip().lower()
    return v in PLACEHOLDERS or set(v) == {"0"}


def _first_real(paths: Iterable[Path]) -> str | None:
    """The first readable, non-placeholder value among ``paths``."""
    for p in paths:
        v = _read(p)
        if v is not None and not _is_placeholder(v):
            return v
    return None


def _list_dir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _is_zero_mac(mac: str) -> bool:
    digits = mac.replace(":", "").replace("-", "").replace(".", "")
    return set(digits) <= {"0"}


class LinuxFactsProvider:
    """Reads hardware facts from a Linux file system tree rooted at ``root``.

    Every fact is optional: a file that is missing or cannot be read leaves
    its fact absent instead of failing, because containers, VMs and boards
    without DMI all lack some of them.

    Args:
        root: where the file system starts (``/`` in production, a fake tree in tests).
        model: our product name for this box; the hardware does not know it.
        serial: explicit serial number; wins over whatever the hardware reports.
    """

    def __init__(
        self, root: Path = _ROOT, model: str | None = None, serial: str | None = None
    ) -> None:
        self._root = Path(root)
        self._model = _clean(model) if model is not None else None
        self._serial = _clean(serial) if serial is not None else None

    @property
    def simulated(self) -> bool:
        """A tree other than ``/`` (tests) is not this machine."""
        return self._root != _ROOT

    @property
    def origin(self) -> str:
        return "this machine" if self._root == _ROOT else f"the hardware tree under {self._root}"

    def read(self) -> HardwareFacts:
        return HardwareFacts(
            model=self._model,
            serial=self._serial if self._serial is not None else self._read_serial(),
            macs=self._read_macs(),
            board=self._read_board(),
            firmware=self._read_firmware(),
            machine_id=self._read_machine_id(),
            usb=self._read_usb(),
        )

    def _read_serial(self) -> str | None:
        r = self._root
        return _first_real(
            (
                r / _DMI / "product_serial",
                r / _DMI / "board_serial",
                r / _DT / "serial-number",
            )
        )

    def _read_board(self) -> str | None:
        r = self._root
        return _first_real((r / _DMI / "board_name", r / _DT / "model"))

    def _read_firmware(self) -> str | None:
        r = self._root
        return _first_real((r / _DMI / "bios_version", r / _DT / "chosen" / "u-boot,version"))

    def _read_machine_id(self) -> str | None:
        uuid = _read(self._root / _DMI / "product_uuid")
        if uuid is not None:
            uuid = uuid.lower()
            if uuid not in _PLACEHOLDER_UUIDS and not _is_placeholder(uuid):
                return uuid
        mid = _read(self._root / "etc" / "machine-id")
        if mid is None or _is_placeholder(mid) or mid.lower() == "uninitialized":
            return None
        return mid.lower()

    def _read_macs(self) -> tuple[str, ...]:
        physical: set[str] = set()
        other: set[str] = set()
        for iface in _list_dir(self._root / "sys" / "class" / "net"):
            name = iface.name
            if name == "lo" or name.startswith(VIRTUAL_NET_PREFIXES):
                continue
            mac = _read(iface / "address")
            if mac is None or _is_zero_mac(mac):
                continue
            mac = mac.lower()
            try:
                has_device = (iface / "device").exists()
            except OSError:
                has_device = False
            (physical if has_device else other).add(mac)
        # Containers have no physical NIC: fall back to the non-virtual ones.
        return tuple(sorted(physical or other))

    def _read_usb(self) -> tuple[str, ...]:
        found: set[str] = set()
        for dev in _list_dir(self._root / "sys" / "bus" / "usb" / "devices"):
            vendor = _read(dev / "idVendor")
            product = _read(dev / "idProduct")
            if vendor is not None and product is not None:
                found.add(f"{vendor.lower()}:{product.lower()}")
        return tuple(sorted(found))


_STR_KEYS = ("model", "serial", "board", "firmware", "machine_id")
_LIST_KEYS = ("macs", "usb")


def _opt_str(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UsageError(
            f"hardware facts: {key!r} must be a string or null, not {type(value).__name__}"
        )
    return _clean(value)


def _str_list(data: Mapping[str, object], key: str) -> tuple[str, ...]:
    value = data.get(key, [])
    if not isinstance(value, list | tuple):
        raise UsageError(
            f"hardware facts: {key!r} must be a list of strings, not {type(value).__name__}"
        )
    out: set[str] = set()
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise UsageError(f"hardware facts: {key!r} must be a list of non-empty strings")
        out.add(item.strip().lower())
    return tuple(sorted(out))


class StaticFactsProvider:
    """Returns facts given up front (simulated servers, tests, a facts file).

    Always :attr:`simulated`: a store initialised from this machine's own facts
    refuses to be opened with these (``identity.check_facts_source``).
    """

    def __init__(self, facts: HardwareFacts, origin: str = "the hardware facts given") -> None:
        self._facts = facts
        self._origin = origin

    @property
    def simulated(self) -> bool:
        return True

    @property
    def origin(self) -> str:
        return self._origin

    @property
    def facts(self) -> HardwareFacts:
        return self._facts

    def read(self) -> HardwareFacts:
        return self._facts

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> StaticFactsProvider:
        """Build from a mapping with the keys of :meth:`HardwareFacts.as_dict`.

        Every key is optional; strings may be ``None``. MACs and USB IDs are
        lowercased, sorted and deduplicated.

        Raises:
            UsageError: an unknown key or a value of the wrong type (the message names the key).
        """
        known = set(_STR_KEYS) | set(_LIST_KEYS)
        for key in data:
            if key not in known:
                raise UsageError(
                    f"hardware facts: unknown key {key!r} (known: {', '.join(sorted(known))})"
                )
        return cls(
            HardwareFacts(
                model=_opt_str(data, "model"),
                serial=_opt_str(data, "serial"),
                macs=_str_list(data, "macs"),
                board=_opt_str(data, "board"),
                firmware=_opt_str(data, "firmware"),
                machine_id=_opt_str(data, "machine_id"),
                usb=_str_list(data, "usb"),
            )
        )


#: a facts file lists a few identifiers
FACTS_FILE_MAX = 64 * 1024


def load_facts_file(path: Path) -> StaticFactsProvider:
    """Read hardware facts from a JSON object file (keys as in :meth:`from_mapping`).

    Raises:
        UsageError: the file is missing, unreadable, not JSON, not an object,
            or has an unknown key or a wrongly typed value.
    """
    from agent.formats import loads_json  # only for simulated servers' facts files

    try:
        with open(path, "rb") as f:
            raw = f.read(FACTS_FILE_MAX + 1)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read hardware facts file {path}: no such file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read hardware facts file {path}: "
                         f"{exc.strerror or exc}") from exc
    if len(raw) > FACTS_FILE_MAX:
        raise UsageError(f"hardware facts file {path} is larger than {FACTS_FILE_MAX} bytes")
    try:
        data: object = loads_json(raw, f"hardware facts file {path}",
                                  "a JSON object of hardware facts")
    except MalformedError as exc:  # a facts file is the tester's own: a usage error
        raise UsageError(str(exc)) from exc
    if not isinstance(data, dict):
        raise UsageError(
            f"cannot read hardware facts file {path}: expected a JSON object, "
            f"not {type(data).__name__}"
        )
    try:
        facts = StaticFactsProvider.from_mapping(data).read()
    except UsageError as exc:
        raise UsageError(f"invalid hardware facts file {path}: {exc}") from exc
    return StaticFactsProvider(facts, f"hardware facts file {path}")

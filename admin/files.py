"""The files ``licadmin`` carries between the site and the licensing server, and its work folders.

A SITE_INFO bundle (docs/licensing-api.md) is a plain CBOR map, not signed as a
whole: each device-information file inside keeps its device's own signature.
The folders a workflow step writes hold one file per device, named by device
ID (``DEVICE_ID.req``, ``DEVICE_ID.resp``, ``DEVICE_ID.receipt``), each written
atomically. A file is matched to a device by what its signed payload says,
never by its name, so a renamed or misplaced file cannot reach the wrong server.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cli import parse_time, read_input
from agent.cose import canonical, strict_loads
from agent.errors import MalformedError, UsageError
from agent.messages import DeviceInfo, Payload, decode_payload
from agent.protocol import Limits, read_signed, self_signed_payload
from agent.store import FileOps, atomic_write

__all__ = [
    "LICENSE_INFO_MAX",
    "per_device_dir",
    "SITE_INFO_MAX",
    "SiteInfo",
    "device_file",
    "ensure_dir",
    "features_text",
    "now",
    "peek_payload",
    "read_device_files",
    "short",
    "verify_device_info",
    "write_file",
]

#: vendor-signed license information may list a whole site
LICENSE_INFO_MAX = 16 * 1024 * 1024
#: a site of a few thousand servers, each device information a few hundred bytes
SITE_INFO_MAX = 16 * 1024 * 1024
#: the largest single file in a work folder (a receipt carries its whole response)
DEVICE_FILE_MAX = 256 * 1024
MAX_SITE_DEVICES = 100_000

SUFFIX = {"request": ".req", "response": ".resp", "receipt": ".receipt",
          "license-info": ".cbor"}


def per_device_dir(license_info: str | Path) -> Path:
    """``LICENSE_INFO.d``: each device's own signed license information, beside the site's."""
    p = Path(license_info)
    return p.with_name(p.name + ".d")


def now() -> int:
    """POSIX seconds; ``LICADMIN_TIME`` or ``LICAGENT_TIME`` (as for licagent) stage a clock."""
    fake = os.environ.get("LICADMIN_TIME") or os.environ.get("LICAGENT_TIME")
    return parse_time(fake) if fake else int(time.time())


def verify_device_info(data: bytes) -> DeviceInfo:
    """Check a device-information file's self-signature and decode it."""
    payload, _key = self_signed_payload(data, DeviceInfo)
    assert isinstance(payload, DeviceInfo)
    return payload


@dataclass(frozen=True)
class SiteInfo:
    """Step 1's bundle: every gathered device-information file, and the servers that failed."""

    site: str
    created: int
    devices: tuple[bytes, ...]
    failed: tuple[tuple[str, str], ...] = ()

    def encode(self) -> bytes:
        return canonical({
            "v": 1, "kind": "site-info", "site": self.site, "created": self.created,
            "devices": list(self.devices),
            "failed": [{"server": s, "error": e} for s, e in self.failed],
        })

    @classmethod
    def decode(cls, data: bytes) -> SiteInfo:
        """Parse a bundle (shape only: each device file is verified by whoever uses it)."""
        return cls.from_map(strict_loads(data, max_size=SITE_INFO_MAX))

    @classmethod
    def from_map(cls, m: object) -> SiteInfo:
        if not isinstance(m, dict) or m.get("kind") != "site-info":
            raise MalformedError("not a SITE_INFO bundle (a CBOR map with kind site-info)")
        if m.get("v") != 1:
            raise MalformedError(f"unsupported SITE_INFO version {m.get('v')!r} (this reads 1)")
        extra = set(m) - {"v", "kind", "site", "created", "devices", "failed"}
        if extra:
            raise MalformedError(f"SITE_INFO has unknown field {', '.join(sorted(map(str, extra)))}")
        site, created, devices, failed = (m.get("site"), m.get("created"), m.get("devices"),
                                          m.get("failed", []))
        if not isinstance(site, str) or len(site) > 256:
            raise MalformedError("SITE_INFO site must be text of at most 256 characters")
        if not isinstance(created, int) or isinstance(created, bool) or created < 0:
            raise MalformedError("SITE_INFO created must be POSIX seconds")
        if (not isinstance(devices, list) or len(devices) > MAX_SITE_DEVICES
                or not all(isinstance(d, bytes) for d in devices)):
            raise MalformedError("SITE_INFO devices must be a list of device-information files")
        if not isinstance(failed, list) or not all(
                isinstance(f, dict) and isinstance(f.get("server"), str)
                and isinstance(f.get("error"), str) for f in failed):
            raise MalformedError("SITE_INFO failed must be a list of {server, error}")
        return cls(site, created, tuple(devices),
                   tuple((f["server"], f["error"]) for f in failed))


def peek_payload(data: bytes, expect: type[Payload] | None = None,
                 max_file: int = DEVICE_FILE_MAX) -> tuple[Payload, bytes]:
    """Decode a signed file's payload WITHOUT verifying it; returns it and the signer's kid.

    For routing and display only: the server that receives the file verifies it.
    """
    env = read_signed(data, Limits(max_file=max_file))
    payload = decode_payload(strict_loads(env.payload, max_size=max_file), expect)
    return payload, env.kid


def write_file(path: Path, data: bytes) -> None:
    """Write atomically: a half-written file never appears under its final name."""
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {path.parent} does not exist")
    atomic_write(FileOps(), path.absolute(), data, 0o644)


def ensure_dir(path: str | Path) -> Path:
    """The output folder of a step, created if missing (its parent must exist)."""
    p = Path(path)
    if p.is_dir():
        return p
    if p.exists():
        raise UsageError(f"{p} exists and is not a folder")
    if not p.absolute().parent.is_dir():
        raise UsageError(f"cannot create folder {p}: {p.absolute().parent} does not exist")
    p.mkdir()
    return p


def device_file(folder: Path, device_id: str, kind: str) -> Path:
    """Where a step writes ``kind`` (request, response, receipt) for one device."""
    return folder / f"{device_id}{SUFFIX[kind]}"


def read_device_files(folder: str | Path, kind: str) -> list[tuple[Path, bytes]]:
    """Every ``*.req`` / ``*.resp`` / ``*.receipt`` file of a folder, by name.

    Names starting with a dot (temporary files of an atomic write) are skipped.

    Raises:
        UsageError: the folder does not exist.
    """
    p = Path(folder)
    if not p.is_dir():
        raise UsageError(f"no such folder: {p}")
    out: list[tuple[Path, bytes]] = []
    for f in sorted(p.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(SUFFIX[kind]) or not f.is_file():
            continue
        out.append((f, read_input(str(f), DEVICE_FILE_MAX)))
    return out


def short(device_id: str | None) -> str:
    """A device ID as people read it in tables (first 12 hex digits)."""
    return f"{device_id[:12]}…" if device_id else "-"


def features_text(items: Iterable[Any]) -> str:
    """``bacnet=10, modbus=2`` from licenses or ``{"feature", "count"}`` maps."""
    parts = []
    for x in items:
        if isinstance(x, dict):
            parts.append(f"{x['feature']}={x['count']}")
        else:
            parts.append(f"{x.feature}={x.count}")
    return ", ".join(parts) or "nothing"

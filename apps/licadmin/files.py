"""The files ``licadmin`` carries between the site and the licensing server, and its work folders.

The formats themselves (SITE_INFO, device information, receipts) live in
:mod:`agent.formats`, shared with the device and the vendor side. The folders a workflow step writes hold one file per device, named by device
ID (``DEVICE_ID.req``, ``DEVICE_ID.resp``, ``DEVICE_ID.receipt``), each written
atomically. A file is matched to a device by what its signed payload says,
never by its name, so a renamed or misplaced file cannot reach the wrong server.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.formats import DEVICE_FILE_MAX
from apps.common import read_input, tool_clock, write_output

__all__ = [
    "device_file",
    "ensure_dir",
    "features_text",
    "now",
    "per_device_dir",
    "read_device_files",
    "short",
    "write_file",
]

SUFFIX = {"request": ".req", "response": ".resp", "receipt": ".receipt",
          "license-info": ".cbor"}


def per_device_dir(license_info: str | Path) -> Path:
    """``LICENSE_INFO.d``: each device's own signed license information, beside the site's."""
    p = Path(license_info)
    return p.with_name(p.name + ".d")


def now() -> int:
    """POSIX seconds; ``LICADMIN_TIME`` or ``LICAGENT_TIME`` (as for licagent) stage a clock."""
    return tool_clock(("LICADMIN_TIME", "LICAGENT_TIME"))


def write_file(path: Path, data: bytes) -> None:
    """Write atomically: a half-written file never appears under its final name."""
    write_output(path, data)


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
        out.append((f, read_input(str(f), DEVICE_FILE_MAX, f"{kind} file")))  # each judged alone
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

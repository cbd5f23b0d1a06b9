"""The plan of a move of licenses between two live servers: ``licadmin rehost`` and ``licadmin
transfer`` (issue 16) keep it as ``plan.json`` in their work folder.

The plan names both servers by URL and by device ID, read once from their signed device
information; a rerun with the same work folder goes on with the same two devices (a URL that
now reaches another server is caught by the steps, which name the device), and a rerun with
other arguments is refused with what the folder holds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from agent.errors import UsageError
from agent.messages import DeviceInfo
from agent.protocol import self_signed_payload
from apps.common import write_output
from hw.link import ServerClient

__all__ = ["PLAN", "MovePlan", "short", "work_dir_for"]

PLAN = "plan.json"


def short(dev: str) -> str:
    """A device ID as the lines show it."""
    return dev[:12] + "…"


def work_dir_for(kind: str, src: str, dst: str) -> Path:
    """The same folder for the same two URLs (``KIND-HASH``), so that a rerun finds the
    earlier steps."""
    tag = hashlib.sha256(f"{src}\n{dst}".encode()).hexdigest()[:12]
    return Path(f"{kind}-{tag}")


class MovePlan:
    """``plan.json`` of a move named ``kind`` ("rehost", "transfer") in ``work``; after
    :meth:`load_or_make`, ``src_id`` and ``dst_id`` are the two servers' device IDs."""

    def __init__(self, kind: str, src: str, dst: str, features: list[str], work: Path,
                 connect: Callable[[str], ServerClient]) -> None:
        self.kind = kind
        self.src, self.dst, self.features = src, dst, features
        self.work = work
        self.connect = connect
        self.src_id = ""
        self.dst_id = ""

    def device_id(self, url: str) -> str:
        """The device ID in the signed device information of the server at ``url``."""
        with self.connect(url) as client:
            info, _key = self_signed_payload(client.info(), DeviceInfo)
        return info.device_id

    def load_or_make(self) -> None:
        """Read the folder's plan (refused if it is another move's), or make and write it."""
        f = self.work / PLAN
        if f.exists():
            try:
                plan = json.loads(f.read_text())
                keep = (plan["from"], plan["to"], plan["features"])
                self.src_id, self.dst_id = str(plan["from_id"]), str(plan["to_id"])
            except (ValueError, KeyError, TypeError, OSError) as exc:
                raise UsageError(f"{f} is not a {self.kind} plan ({exc}); give another "
                                 "--work-dir") from exc
            if keep != (self.src, self.dst, self.features):
                raise UsageError(
                    f"{self.work} holds a {self.kind} from {plan['from']} to {plan['to']} of "
                    f"{', '.join(plan['features']) or 'every license'}; finish it with those "
                    f"arguments, or give another --work-dir")
            return
        self.src_id = self.device_id(self.src)
        self.dst_id = self.device_id(self.dst)
        if self.src_id == self.dst_id:
            raise UsageError(f"--from and --to reach the same server (device "
                             f"{short(self.src_id)}): give the new server as --to")
        self.work.mkdir(parents=True, exist_ok=True)
        write_output(f, json.dumps({
            "from": self.src, "to": self.dst, "from_id": self.src_id, "to_id": self.dst_id,
            "features": self.features}, indent=1).encode() + b"\n")

    def walk(self, say: Callable[[str], None],
             steps: Sequence[tuple[str, Callable[[], str]]]) -> None:
        """Say where the files go, then do each step whose file is not in the folder yet
        (a step returns its line; a step done before says so)."""
        say(f"{self.kind} from {short(self.src_id)} ({self.src}) to {short(self.dst_id)} "
            f"({self.dst}); files of every step in {self.work}")
        for n, (name, step) in enumerate(steps, 1):
            if (self.work / name).exists():
                say(f"{n}/{len(steps)} {name}: done before")
                continue
            say(f"{n}/{len(steps)} {step()}")

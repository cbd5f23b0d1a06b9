"""``licadmin transfer``: a direct transfer at the site between two live servers (issue 16).

The same move as ``licagent transfer`` on the old server and ``licagent apply-transfer``
on the new one (docs/protocol.md sections 26 and 31), done in one go over two links,
with each step's file kept in a work folder so that a run killed anywhere is finished
by running the same command again:

1. ``out.receipt``: the old server removes the licenses and signs the transfer file
   naming the new server (the ``transfer`` operation);
2. ``in.receipt``: the new server verifies it and installs them, signing its transfer
   receipt (``apply-transfer``).

Both operations answer a repeat with the same file (the server's last receipt), so an
answer lost on the way strands nothing. The folder then holds both receipts, for
``licadmin confirm --receipts DIR``: the vendor reconciles the move later.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from agent.errors import UsageError
from agent.messages import Transfer, TransferReceipt
from agent.protocol import DEFAULT_LIMITS, self_signed_payload
from agent.record import replace
from agent.rpc import ApplyArgs, ApplyTransferResult, Op, TransferArgs, TransferResult
from apps.common import write_output
from apps.licadmin.moveplan import MovePlan, short, work_dir_for
from hw.link import ServerClient

__all__ = ["STEPS", "SiteTransfer", "default_work_dir"]

#: the files of the steps, in order (a step is done when its file exists)
STEPS = ("out.receipt", "in.receipt")
#: a transfer file carries the vendor's evidence for each license: up to 256 KiB
_LIMITS = replace(DEFAULT_LIMITS, max_file=max(DEFAULT_LIMITS.max_file, 256 * 1024))
#: links with no route for the transfer operations
_NOT_CARRIED = ("https",)


def default_work_dir(src: str, dst: str) -> Path:
    """The same folder for the same two URLs, so that a rerun finds the earlier steps."""
    return work_dir_for("transfer", src, dst)


class SiteTransfer:
    """One direct transfer's steps over a work folder.

    Args:
        src, dst: link URLs of the old and the new server.
        features: the transferable features to move (at least one).
        connect: a client for a link URL (``runner.connector``).
        say: where each step's line goes.
    """

    def __init__(self, src: str, dst: str, features: Sequence[str], work: Path,
                 connect: Callable[[str], ServerClient],
                 say: Callable[[str], None] = print) -> None:
        self.src, self.dst = src, dst
        self.features = list(dict.fromkeys(features))
        self.work = work
        self.connect = connect
        self.say = say
        self.src_id = ""
        self.dst_id = ""
        if not self.features:
            raise UsageError("name the licenses to transfer: --feature F (repeat for each)")
        for url in (src, dst):
            scheme = url.partition("://")[0].lower()
            if scheme in _NOT_CARRIED:
                raise UsageError(
                    f"{url}: {scheme}:// does not carry the transfer operations; reach both "
                    f"servers over tcp://, tls://, mqtt://, a serial line or usbdrop://, or "
                    f"use licagent transfer and licagent apply-transfer with the file")

    # ------------------------------------------------------------ plan

    # ------------------------------------------------------------ steps

    def run(self) -> int:
        """Do every step not done yet; 0 when the licenses are on the new server."""
        plan = MovePlan("transfer", self.src, self.dst, self.features, self.work, self.connect)
        plan.load_or_make()
        self.src_id, self.dst_id = plan.src_id, plan.dst_id
        steps: list[Callable[[], str]] = [self._out, self._in]
        plan.walk(self.say, list(zip(STEPS, steps, strict=True)))
        t = self._transfer()
        moved = ", ".join(f"{lic.feature}={lic.count}" for lic in t.moved)
        self.say(f"moved {moved} from {short(self.src_id)} to {short(self.dst_id)} without "
                 f"a vendor trip; the licensing server reconciles it from both receipts: "
                 f"licadmin confirm --receipts {self.work}")
        return 0

    def _transfer(self, data: bytes | None = None) -> Transfer:
        """The transfer file (the kept one by default), checked against the plan: signed by
        the old server, naming the new one, moving exactly the features asked (the work
        folder and the link are not trusted)."""
        name = self.work / "out.receipt"
        if data is None:
            data = name.read_bytes()
        t, _key = self_signed_payload(data, Transfer, _LIMITS)
        if t.device_id != self.src_id or t.transfer_to != self.dst_id:
            raise UsageError(f"{name}: a transfer from {short(t.device_id)} to "
                             f"{short(t.transfer_to)}, not the one this plan makes (from "
                             f"{short(self.src_id)} to {short(self.dst_id)})")
        if {lic.feature for lic in t.moved} != set(self.features):
            raise UsageError(f"{name}: the transfer moves "
                             f"{', '.join(lic.feature for lic in t.moved)}, not "
                             f"{', '.join(self.features)}")
        return t

    def _out(self) -> str:
        with self.connect(self.src) as client:
            r: TransferResult = client.typed(
                Op.TRANSFER, TransferArgs(tuple(self.features), self.dst_id).to_wire())
        self._transfer(r.file)
        write_output(self.work / "out.receipt", r.file)
        again = " (it had done so before: the same file)" if r.already else ""
        return (f"out.receipt: the old server removed {', '.join(self.features)} and signed "
                f"the transfer for {short(self.dst_id)}{again}")

    def _in(self) -> str:
        data = (self.work / "out.receipt").read_bytes()
        t = self._transfer()
        with self.connect(self.dst) as client:
            r: ApplyTransferResult = client.typed(Op.APPLY_TRANSFER, ApplyArgs(data).to_wire())
        rc, _key = self_signed_payload(r.receipt, TransferReceipt, _LIMITS)
        if rc.device_id != self.dst_id or rc.transfer != data:
            raise UsageError(f"{self.dst} answered with a receipt of device "
                             f"{short(rc.device_id)} for another transfer: is the URL right?")
        write_output(self.work / "in.receipt", r.receipt)
        again = " (applied before: the same receipt)" if r.already_applied else ""
        return (f"in.receipt: the new server installed "
                f"{', '.join(f'{lic.feature}={lic.count}' for lic in t.moved)} and signed its "
                f"receipt{again}")

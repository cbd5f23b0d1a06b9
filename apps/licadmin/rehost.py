"""``licadmin rehost``: move licenses from one server to another, make-before-break (issue 16).

Eight steps, each leaving its file in the work folder before the next starts, so a
run killed anywhere is finished by running the same command again (a step whose
file exists is not done twice; a step interrupted before its file was written is
redone, and every step is idempotent on the other side: the licensing server
answers the same request with the same response, a server answers a response it
already applied with the same receipt, a receipt confirmed before is reported so):

1. ``out.req``: the old server signs a reclaim naming the new server's device ID
   (``transfer_to``): the transfer-out request.
2. ``out.resp``: the licensing server answers it: remove the licenses, for that device.
3. ``out.receipt``: the old server removes them and signs its receipt: the proof.
4. ``out.confirmed``: the licensing server verifies the proof and only then assigns
   the licenses to the new server (the ledger records the move).
5. ``in.req``, 6. ``in.resp``, 7. ``in.receipt``, 8. ``in.confirmed``: the new server's
   activation, as in ``licadmin activate``.

The licenses are never on both servers (the new one's response exists only after the
old one's signed removal) and never lost (the proof is in the work folder, and the old
server returns it again when its response is sent again). The same steps work with
files carried by hand: ``licadmin request --server OLD reclaim --transfer-to NEW_ID``,
``licadmin upload``, ``send``, ``confirm``, then an activation of the new server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.formats import peek_payload, verify_receipt
from agent.messages import ChangeOp, Request, Response
from agent.protocol import self_signed_payload
from agent.rpc import RemoteError
from apps.common import write_output
from apps.licadmin.moveplan import MovePlan, short, work_dir_for
from apps.licadmin.online import Licensing
from hw.link import ServerClient

__all__ = ["STEPS", "Rehost", "default_work_dir"]

#: the files of the steps, in order (a step is done when its file exists)
STEPS = ("out.req", "out.resp", "out.receipt", "out.confirmed",
         "in.req", "in.resp", "in.receipt", "in.confirmed")


def default_work_dir(src: str, dst: str) -> Path:
    """The same folder for the same two URLs, so that a rerun finds the earlier steps."""
    return work_dir_for("rehost", src, dst)


def _remote_error(refusal: dict[str, Any]) -> RemoteError:
    """A refusal ``{"code", "reason", "message"}`` in the licensing server's answer."""
    return RemoteError(int(refusal.get("code", 1)), str(refusal.get("reason", "failure")),
                       str(refusal.get("message", "")))


class Rehost:
    """One rehost's steps over a work folder.

    Args:
        src, dst: link URLs of the old and the new server.
        features: the features to move (none: every license installed on the old one).
        connect: a client for a link URL (``runner.connector``).
        say: where each step's line goes.
    """

    def __init__(self, src: str, dst: str, licensing: Licensing, features: Sequence[str],
                 work: Path, connect: Callable[[str], ServerClient],
                 say: Callable[[str], None] = print) -> None:
        self.src, self.dst = src, dst
        self.licensing = licensing
        self.features = list(dict.fromkeys(features))
        self.work = work
        self.connect = connect
        self.say = say
        self.src_id = ""
        self.dst_id = ""

    # ------------------------------------------------------------ plan

    # ------------------------------------------------------------ steps

    def run(self) -> int:
        """Do every step not done yet; 0 when the licenses are on the new server."""
        plan = MovePlan("rehost", self.src, self.dst, self.features, self.work, self.connect)
        plan.load_or_make()
        self.src_id, self.dst_id = plan.src_id, plan.dst_id
        steps: list[Callable[[], str]] = [
            self._out_request, self._out_response, self._out_receipt, self._out_confirm,
            self._in_request, self._in_response, self._in_receipt, self._in_confirm]
        plan.walk(self.say, list(zip(STEPS, steps, strict=True)))
        moved = self._moved()
        self.say(f"moved {moved} from {short(self.src_id)} to {short(self.dst_id)}; "
                 "both receipts confirmed")
        return 0

    def _path(self, name: str) -> Path:
        return self.work / name

    def _read(self, name: str) -> bytes:
        return self._path(name).read_bytes()

    def _moved(self) -> str:
        resp, _ = peek_payload(self._read("in.resp"), Response)
        return ", ".join(f"{c.feature}={c.count}" for c in resp.changes) or "nothing"

    def _request(self, url: str, dev: str, action: str, features: Sequence[str],
                 name: str, transfer_to: str | None = None) -> bytes:
        with self.connect(url) as client:
            data = client.request(action, features, transfer_to=transfer_to)
        req, _key = self_signed_payload(data, Request)
        if req.device_id != dev:
            raise UsageError(f"{url} is now device {short(req.device_id)}, the rehost in "
                             f"{self.work} was started with device {short(dev)}: is the URL "
                             "right?")
        write_output(self._path(name), data)
        return data

    def _upload(self, req_name: str, dev: str, name: str) -> Response:
        answer = self.licensing.upload([self._read(req_name)])
        if dev in answer.errors:
            raise _remote_error(answer.errors[dev])
        for err in answer.errors.values():
            raise _remote_error(err)
        data = answer.responses.get(dev)
        if data is None:
            raise UsageError(f"the licensing server sent no response for {req_name}")
        resp, _ = peek_payload(data, Response)
        write_output(self._path(name), data)
        return resp

    def _apply(self, url: str, resp_name: str, name: str) -> bytes:
        response = self._read(resp_name)
        with self.connect(url) as client:
            res = client.apply(response)
        verify_receipt(res.receipt, response=response)
        write_output(self._path(name), res.receipt)
        return res.receipt

    def _confirm(self, receipt_name: str, name: str) -> dict[str, Any]:
        answer = self.licensing.confirm([self._read(receipt_name)])
        if answer.refused:
            r = answer.refused[0]
            if r.get("reason") != "replay":  # accepted by an earlier, killed run
                raise _remote_error(r)
            result: dict[str, Any] = {"confirmed": "before"}
        else:
            result = {"confirmed": answer.accepted[0]}
        write_output(self._path(name), json.dumps(result).encode() + b"\n")
        return result

    def _out_request(self) -> str:
        self._request(self.src, self.src_id, "reclaim", self.features, "out.req",
                      transfer_to=self.dst_id)
        return f"out.req: the old server signed the transfer-out request naming {short(self.dst_id)}"

    def _out_response(self) -> str:
        resp = self._upload("out.req", self.src_id, "out.resp")
        return ("out.resp: the licensing server answered: remove "
                + ", ".join(c.feature for c in resp.changes) + f", for {short(self.dst_id)}")

    def _out_receipt(self) -> str:
        self._apply(self.src, "out.resp", "out.receipt")
        return "out.receipt: the old server removed them; its signed receipt is the proof"

    def _out_confirm(self) -> str:
        self._confirm("out.receipt", "out.confirmed")
        return ("out.confirmed: the licensing server verified the proof and assigned them to "
                f"{short(self.dst_id)}")

    def _in_request(self) -> str:
        resp, _ = peek_payload(self._read("out.resp"), Response)
        feats = [c.feature for c in resp.changes if c.op is ChangeOp.REMOVE]
        self._request(self.dst, self.dst_id, "activate", feats, "in.req")
        return "in.req: the new server signed its activation request"

    def _in_response(self) -> str:
        resp = self._upload("in.req", self.dst_id, "in.resp")
        return ("in.resp: the licensing server answered: "
                + ", ".join(f"{c.op.value} {c.feature}={c.count}" for c in resp.changes))

    def _in_receipt(self) -> str:
        self._apply(self.dst, "in.resp", "in.receipt")
        return "in.receipt: the new server installed them"

    def _in_confirm(self) -> str:
        self._confirm("in.receipt", "in.confirmed")
        return "in.confirmed: the licensing server confirmed the new server's receipt"

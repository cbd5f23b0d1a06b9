"""The site steps of the workflow, through the links to the servers: gather, requests, send.

Each runs one job per server (:func:`apps.licadmin.runner.each_server`). Files
are written atomically as soon as each server's answer arrives, so a step
interrupted half-way keeps everything already done, and rerunning it finishes
the rest: a server answers a response it already applied with the same receipt.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import LicensingError, MalformedError, TrustError, UsageError
from agent.formats import LICENSE_INFO_MAX, SiteInfo, peek_payload, read_device_info, verify_receipt
from agent.messages import Action, LicenseInfo, Request, Response
from agent.protocol import self_signed_payload
from apps.common import read_input
from apps.licadmin.console import Console
from apps.licadmin.files import (
    device_file,
    ensure_dir,
    features_text,
    now,
    per_device_dir,
    read_device_files,
    short,
    write_file,
)
from apps.licadmin.inventory import ServerRef
from apps.licadmin.outcome import FAILED, OK, Outcome, StepResult
from apps.licadmin.runner import DEFAULT_JOBS, Connect, each_server
from hw.link import ServerClient

__all__ = ["device_id_of", "gather", "make_requests", "send"]


def device_id_of(client: ServerClient) -> str:
    """Which device answers on this link (``hello``; ``status`` if hello does not say)."""
    dev = client.hello().device_id
    if dev is None:
        dev = client.status().device_id
    if not isinstance(dev, str) or len(dev) != 64:
        raise MalformedError("the server did not say which device it is")
    return dev


# ---------------------------------------------------------------- step 1: gather


def gather(servers: Sequence[ServerRef], out: str, site: str | None, connect: Connect,
           console: Console, jobs: int = DEFAULT_JOBS) -> StepResult:
    """Fetch and verify every server's device information; write one SITE_INFO bundle."""
    out_path = Path(out)
    if not out_path.absolute().parent.is_dir():
        raise UsageError(f"cannot write {out}: its folder does not exist")

    def job(client: ServerClient, o: Outcome) -> None:
        data = client.info()
        info = read_device_info(data)  # a bundle holds only self-signatures that verify
        o.device_id, o.data = info.device_id, data
        o.detail = (f"{info.model} {info.serial or '-'}, sequence {info.sequence}, "
                    f"licenses: {features_text(info.licenses)}")
        o.result = "gathered"

    res = StepResult("gather", each_server(servers, job, connect, console, "gather", jobs))
    first: dict[str, str] = {}
    for o in res.outcomes:
        if o.status == OK and o.device_id is not None:
            if o.device_id in first:
                o.skip(f"same device as {first[o.device_id]}")
                res.notes.append(f"note: {o.who} is the same device as {first[o.device_id]}: "
                                 f"gathered once")
            else:
                first[o.device_id] = o.who
    devices = tuple(o.data for o in res.outcomes if o.status == OK and o.data is not None)
    failed = tuple((o.who, f"{o.reason}: {o.detail}") for o in res.outcomes if o.status == FAILED)
    res.facts = {"out": out, "devices": len(devices), "failed": len(failed)}
    if devices:
        bundle = SiteInfo(site or out_path.stem, now(), devices, failed)
        write_file(out_path, bundle.encode())
        res.notes.append(f"wrote site information of {len(devices)} server(s) to {out}"
                         + (f"; {len(failed)} failed" if failed else ""))
    else:
        res.facts["out"] = None
        res.notes.append(f"no server answered: {out} not written")
    return res


# ---------------------------------------------------------------- step 3: requests


def make_requests(servers: Sequence[ServerRef], license_info_file: str, out_dir: str,
                  connect: Connect, console: Console, jobs: int = DEFAULT_JOBS,
                  mode: str = "auto", features: Sequence[str] = ()) -> StepResult:
    """Each server checks the license information against its own state and signs a request.

    ``mode`` auto/activate: reclaim when the server's entry lists licenses to
    reclaim (a reclaim response also installs what waits for it), else
    activate when it lists licenses to install. ``mode`` reclaim: only servers
    with something to reclaim; ``features`` then names what (where installed).
    """
    data = read_input(license_info_file, LICENSE_INFO_MAX, "license information file",
                      expect="license-info")
    info, _kid = peek_payload(data, LicenseInfo, LICENSE_INFO_MAX)
    folder = ensure_dir(out_dir)
    own_dir = per_device_dir(license_info_file)

    def own_file(dev: str) -> bytes:
        """The server's own license information if step 2 wrote it, else the site's."""
        path = device_file(own_dir, dev, "license-info")
        if not path.is_file():
            return data
        one = read_input(str(path), LICENSE_INFO_MAX, "license information file",
                         expect="license-info")
        part, _kid = peek_payload(one, LicenseInfo, LICENSE_INFO_MAX)
        if ([e.device_id for e in part.entries] != [dev]
                or part.for_device(dev) != info.for_device(dev)):
            raise UsageError(f"{path} does not match {license_info_file} for this server "
                             f"(files of different runs?); run license-info again")
        return one

    def job(client: ServerClient, o: Outcome) -> None:
        dev = o.device_id = device_id_of(client)
        entry = info.for_device(dev)
        wanted: list[str] = []
        li: bytes | None = None
        if mode == "reclaim" and features:
            installed = {x["feature"] for x in client.status().licenses}
            wanted = [f for f in features if f in installed]
            if not wanted:
                o.skip(f"none of {', '.join(features)} is installed")
                return
            action, li = Action.RECLAIM, None
        elif entry is None:
            o.skip("not named in the license information")
            return
        elif entry.reclaim:
            action, li = Action.RECLAIM, own_file(dev)
        elif entry.install and mode != "reclaim":
            action, li = Action.ACTIVATE, own_file(dev)
        else:
            o.skip("nothing to reclaim" if mode == "reclaim" else "nothing to reclaim or install")
            return
        req = client.request(action.value, wanted, license_info=li)
        payload, _key = self_signed_payload(req, Request)
        if payload.device_id != dev:
            raise TrustError(f"the server answered with a request of device {short(payload.device_id)}")
        path = device_file(folder, dev, "request")
        write_file(path, req)
        o.result = action.value
        o.detail = (f"{action.value} {', '.join(payload.features) or '(as assigned)'} "
                    f"on sequence {payload.sequence}")

    res = StepResult("requests", each_server(servers, job, connect, console, "requests", jobs))
    n = sum(1 for o in res.outcomes if o.status == OK)
    res.notes.append(f"wrote {n} request(s) to {folder}")
    res.facts = {"out_dir": str(folder), "requests": n}
    return res


# ---------------------------------------------------------------- step 5: send


@dataclass(frozen=True)
class _Held:
    path: Path
    data: bytes


def _responses_by_device(responses_dir: str, res: StepResult) -> dict[str, _Held]:
    """Every response file, keyed by the device its signed payload names (not by its name)."""
    by_dev: dict[str, _Held] = {}
    clash: dict[str, list[str]] = {}
    for path, data in read_device_files(responses_dir, "response"):
        try:
            payload, _kid = peek_payload(data, Response)
        except LicensingError as err:
            o = Outcome(path.name)
            o.fail(err)
            res.outcomes.append(o)
            continue
        dev = payload.device_id
        if path != device_file(path.parent, dev, "response"):
            res.notes.append(f"note: {path.name} holds the response for device {short(dev)}, "
                             f"not the one its name says; it goes to that device only")
        held = by_dev.get(dev)
        if held is not None and held.data != data:
            clash.setdefault(dev, [held.path.name]).append(path.name)
        elif held is None:
            by_dev[dev] = _Held(path, data)
    for dev, names in clash.items():
        del by_dev[dev]
        o = Outcome(", ".join(names), device_id=dev)
        o.fail(UsageError(f"{len(names)} different responses for device {short(dev)}: "
                          f"keep only the newest in the folder"))
        res.outcomes.append(o)
    return by_dev


def send(servers: Sequence[ServerRef], responses_dir: str, receipts_out: str,
         connect: Connect, console: Console, jobs: int = DEFAULT_JOBS) -> StepResult:
    """Give each server the response for its own device; write the receipts it returns."""
    res = StepResult("send")
    by_dev = _responses_by_device(responses_dir, res)
    folder = ensure_dir(receipts_out)
    sent: set[str] = set()
    lock = threading.Lock()

    def job(client: ServerClient, o: Outcome) -> None:
        dev = o.device_id = device_id_of(client)
        held = by_dev.get(dev)
        if held is None:
            o.skip("no response for this device")
            return
        with lock:
            sent.add(dev)
        answer = client.apply(held.data)
        receipt = answer.receipt
        # the one receipt check, anchored on the exact response sent (licadmin holds no vendor key)
        payload = verify_receipt(receipt, response=held.data)
        if payload.device_id != dev:
            raise TrustError(f"the server returned a receipt of device {short(payload.device_id)}")
        write_file(device_file(folder, dev, "receipt"), receipt)
        if answer.already_applied:
            o.result = "already applied"
            o.detail = f"sequence {answer.sequence}; receipt written again"
        else:
            o.result = "applied"
            o.detail = (f"sequence {answer.base_sequence} -> {answer.sequence}: "
                        f"{', '.join(answer.changes) or 'no changes'}")
        if answer.warning:
            o.detail += f" (warning: {answer.warning})"

    server_outcomes = each_server(servers, job, connect, console, "send", jobs)
    res.outcomes = server_outcomes + res.outcomes
    for dev, held in sorted(by_dev.items()):
        if dev not in sent:
            res.notes.append(f"not sent: {held.path.name} (device {short(dev)}): no server "
                             f"given answered as that device")
    n = sum(1 for o in server_outcomes if o.status == OK)
    res.notes.append(f"wrote {n} receipt(s) to {folder}")
    res.facts = {"receipts_dir": str(folder), "receipts": n}
    return res

"""The site steps of the workflow, through the links to the servers: gather, requests, send.

Each runs one job per server (:func:`apps.licadmin.runner.each_server`). Files
are written atomically as soon as each server's answer arrives, so a step
interrupted half-way keeps everything already done, and rerunning it finishes
the rest: a server answers a response it already applied with the same receipt.
"""

from __future__ import annotations

import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.errors import LicensingError, MalformedError, RevokedError, TrustError, UsageError
from agent.formats import (
    LICENSE_INFO_MAX,
    RECEIPT_MAX,
    SITE_INFO_MAX,
    SiteInfo,
    iso,
    peek_payload,
    read_device_info,
    verify_receipt,
)
from agent.messages import Action, LicenseInfo, LicenseInfoEntry, Request, Response, Revocation
from agent.protocol import self_signed_payload
from agent.rpc import TransportError
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
from apps.licadmin.inventory import ServerRef, unlisted
from apps.licadmin.outcome import FAILED, INTERRUPTED, OK, Outcome, StepResult
from apps.licadmin.runner import DEFAULT_JOBS, DEFAULT_TIMEOUT, Connect, Stop, each_server
from hw.link import ServerClient

__all__ = ["device_id_of", "entries_by_device", "gather", "make_requests", "send"]


def device_id_of(client: ServerClient) -> str:
    """Which device answers on this link: the device its address routes by (a device of an
    MQTT site: no round trip), else ``hello`` (``status`` if hello does not say)."""
    if client.routed_device is not None:
        return client.routed_device
    dev = client.hello().device_id
    if dev is None:
        dev = client.status().device_id
    if not isinstance(dev, str) or len(dev) != 64:
        raise MalformedError("the server did not say which device it is")
    return dev


def entries_by_device(info: LicenseInfo) -> dict[str, LicenseInfoEntry]:
    """The entries of a license information file by device ID, the first one of each (as
    :meth:`LicenseInfo.for_device` finds it): one look-up per server instead of a scan of
    every entry (10,000 servers made that 50 million comparisons per step)."""
    out: dict[str, LicenseInfoEntry] = {}
    for e in info.entries:
        out.setdefault(e.device_id, e)
    return out


# ---------------------------------------------------------------- step 1: gather


def gather(servers: Sequence[ServerRef], out: str, site: str | None, connect: Connect,
           console: Console, jobs: int = DEFAULT_JOBS, stop: Stop | None = None,
           timeout: float = DEFAULT_TIMEOUT, append: bool = False) -> StepResult:
    """Fetch and verify every server's device information; write one SITE_INFO bundle.

    ``append``: keep the devices ``out`` already holds (the servers an interrupted
    gather finished) and add these; a device gathered again replaces its old file.
    """
    out_path = Path(out)
    if not out_path.absolute().parent.is_dir():
        raise UsageError(f"cannot write {out}: its folder does not exist")
    before: SiteInfo | None = None
    if append and out_path.exists():
        before = SiteInfo.decode(read_input(out, SITE_INFO_MAX))

    def job(client: ServerClient, o: Outcome) -> None:
        data = client.info()
        info = read_device_info(data)  # a bundle holds only self-signatures that verify
        o.device_id, o.data, o.payload = info.device_id, data, info
        o.detail = (f"{info.model} {info.serial or '-'}, sequence {info.sequence}, "
                    f"licenses: {features_text(info.licenses)}")
        o.result = "gathered"

    res = StepResult("gather", each_server(servers, job, connect, console, "gather", jobs,
                                           stop, timeout))
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
    if before is not None:
        new = set(first)
        names = {o.who for o in res.outcomes}
        kept = tuple(d for d in before.devices if _device_of(d) not in new)
        devices = kept + devices
        failed = tuple(f for f in before.failed if f[0] not in names) + failed
        site = site or before.site
        res.notes.append(f"kept {len(kept)} server(s) {out} already held")
    if devices:
        bundle = SiteInfo(site or out_path.stem, now(), devices, failed)
        write_file(out_path, bundle.encode())
        res.notes.append(f"wrote site information of {len(devices)} server(s) to {out}"
                         + (f"; {len(failed)} failed" if failed else ""))
    else:
        res.facts["out"] = None
        res.notes.append(f"no server answered: {out} not written")
    return res


def _device_of(device_info: bytes) -> str | None:
    try:
        return read_device_info(device_info).device_id
    except LicensingError:
        return None


# ---------------------------------------------------------------- step 3: requests


def make_requests(servers: Sequence[ServerRef], license_info_file: str, out_dir: str,
                  connect: Connect, console: Console, jobs: int = DEFAULT_JOBS,
                  mode: str = "auto", features: Sequence[str] = (), stop: Stop | None = None,
                  timeout: float = DEFAULT_TIMEOUT, force: bool = False) -> StepResult:
    """Each server checks the license information against its own state and signs a request.

    ``mode`` auto/activate: reclaim when the server's entry lists licenses to
    reclaim (a reclaim response also installs what waits for it), else
    activate when it lists licenses to install. ``mode`` reclaim: only servers
    with something to reclaim; ``features`` then names what (where installed).
    ``force``: reclaim floating licenses even while seats are out (issue 15).
    """
    data = read_input(license_info_file, LICENSE_INFO_MAX, "license information file",
                      expect="license-info")
    info, _kid = peek_payload(data, LicenseInfo, LICENSE_INFO_MAX)
    entries = entries_by_device(info)
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
                or part.for_device(dev) != entries.get(dev)):
            raise UsageError(f"{path} does not match {license_info_file} for this server "
                             f"(files of different runs?); run license-info again")
        return one

    def job(client: ServerClient, o: Outcome) -> None:
        dev = o.device_id = device_id_of(client)
        entry = entries.get(dev)
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
            o.miss("not named in the license information (gathered after it was made?): "
                   "run gather and license-info again for it")
            return
        elif entry.reclaim:
            action, li = Action.RECLAIM, own_file(dev)
        elif entry.install and mode != "reclaim":
            action, li = Action.ACTIVATE, own_file(dev)
        else:
            o.skip("nothing to reclaim" if mode == "reclaim" else "nothing to reclaim or install")
            return
        req = client.request(action.value, wanted, license_info=li,
                             force=force and action is Action.RECLAIM)
        payload, _key = self_signed_payload(req, Request)
        if payload.device_id != dev:
            raise TrustError(f"the server answered with a request of device {short(payload.device_id)}")
        path = device_file(folder, dev, "request")
        write_file(path, req)
        o.result = action.value
        o.detail = (f"{action.value} {', '.join(payload.features) or '(as assigned)'} "
                    f"on sequence {payload.sequence}")

    res = StepResult("requests", each_server(servers, job, connect, console, "requests", jobs,
                                             stop, timeout))
    n = sum(1 for o in res.outcomes if o.status == OK)
    res.notes.append(f"wrote {n} request(s) to {folder}")
    res.facts = {"out_dir": str(folder), "requests": n}
    return res


# ---------------------------------------------------------------- step 5: send


@dataclass(frozen=True)
class _Held:
    path: Path
    data: bytes
    #: the revocations its payload carries (issue 16), read once with the rest of it
    revoked: tuple[Revocation, ...] = ()


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
            by_dev[dev] = _Held(path, data, payload.revoked)
    for dev, names in clash.items():
        del by_dev[dev]
        o = Outcome(", ".join(names), device_id=dev)
        o.fail(UsageError(f"{len(names)} different responses for device {short(dev)}: "
                          f"keep only the newest in the folder"))
        res.outcomes.append(o)
    return by_dev


def send(servers: Sequence[ServerRef], responses_dir: str, receipts_out: str,
         connect: Connect, console: Console, jobs: int = DEFAULT_JOBS,
         stop: Stop | None = None, timeout: float = DEFAULT_TIMEOUT,
         devices: Collection[str] | None = None) -> StepResult:
    """Give each server the response for its own device; write the receipts it returns.

    A server with no response, and a response no server given answered for, are
    ``missed`` (exit 10). ``devices``: only the responses of these devices (the
    one-go commands send only what they just made).
    """
    res = StepResult("send")
    by_dev = _responses_by_device(responses_dir, res)
    dead = by_device(h.revoked for h in by_dev.values())  # issue 16
    if devices is not None:
        by_dev = {d: h for d, h in by_dev.items() if d in devices}
    # a device of an MQTT site whose presence is not back yet (a broker restart) is
    # still asked: waited for up to the time allowed, then reported
    servers = res.servers = [*servers, *unlisted(servers, by_dev)]
    folder = ensure_dir(receipts_out)
    sent: set[str] = set()
    lock = threading.Lock()

    def job(client: ServerClient, o: Outcome) -> None:
        dev = o.device_id = device_id_of(client)
        held = by_dev.get(dev)
        if dev in dead:  # issue 16: the vendor declared it dead; it gets nothing
            with lock:
                sent.add(dev)
            o.fail(RevokedError(refuse_revoked(dev, dead[dev])))
            return
        if held is None:
            o.miss(f"no response for this device in {responses_dir}")
            return
        with lock:
            sent.add(dev)
        try:
            answer = client.apply(held.data)
        except TransportError as err:
            if "sent again" in str(err):
                raise
            raise TransportError(f"{err}; the response may or may not have been applied "
                                 f"there: sending it again is safe (a server answers a "
                                 f"response it already applied with the same receipt)"
                                 ) from err
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

    server_outcomes = each_server(servers, job, connect, console, "send", jobs, stop, timeout)
    res.outcomes = server_outcomes + res.outcomes
    interrupted = any(o.status == INTERRUPTED for o in server_outcomes)
    earlier = 0
    for dev, held in sorted(by_dev.items()):
        if dev in sent or interrupted:
            continue
        if _receipt_done(device_file(folder, dev, "receipt"), held.data):
            earlier += 1  # applied by an earlier (interrupted) send: done
            continue
        o = Outcome(held.path.name, device_id=dev)
        o.miss(f"not sent: no server given answered as device {short(dev)}")
        res.outcomes.append(o)
    if earlier:
        res.notes.append(f"{earlier} other response(s) were applied before: their receipts "
                         f"are in {folder}")
    n = sum(1 for o in server_outcomes if o.status == OK)
    res.notes.append(f"wrote {n} receipt(s) to {folder}")
    res.facts = {"receipts_dir": str(folder), "receipts": n}
    return res


def revoked_in(files: Iterable[bytes]) -> dict[str, Revocation]:
    """Issue 16: the revocations the vendor responses at hand carry, by device (read without
    the vendor key, which licadmin does not hold: a forged list can only make it refuse)."""
    lists = []
    for data in files:
        try:
            payload, _kid = peek_payload(data, Response)
        except LicensingError:
            continue
        lists.append(payload.revoked)
    return by_device(lists)


def by_device(lists: Iterable[Iterable[Revocation]]) -> dict[str, Revocation]:
    """Revocations by device, the later list's winning (:func:`revoked_in`, or lists read
    with their responses already)."""
    return {r.device_id: r for revoked in lists for r in revoked}


def refuse_revoked(dev: str, r: Revocation) -> str:
    """Issue 16: the one line of a refusal to send anything to a device declared dead."""
    return (f"device {short(dev)} was declared dead by the vendor at {iso(r.revoked_at)} "
            f"({r.reason}): nothing is sent to it; its licenses went back to the entitlement "
            f"(activate the server that replaces it)")


def _receipt_done(path: Path, response: bytes) -> bool:
    """Whether ``path`` holds the receipt of exactly this response (sent before)."""
    if not path.is_file():
        return False
    try:
        verify_receipt(read_input(str(path), RECEIPT_MAX), response=response)
    except LicensingError:
        return False
    return True

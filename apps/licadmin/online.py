"""The online steps of the workflow, with the licensing server: license-info, upload, confirm."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.errors import LicensingError, MalformedError, UsageError
from agent.formats import LICENSE_INFO_MAX, SITE_INFO_MAX, SiteInfo, peek_payload
from agent.messages import DeviceInfo, LicenseInfo, Request, Response
from agent.rpc import RemoteError
from apps.common import read_input
from apps.licadmin.console import Console
from apps.licadmin.files import (
    SUFFIX,
    device_file,
    ensure_dir,
    features_text,
    per_device_dir,
    read_device_files,
    short,
    write_file,
)
from apps.licadmin.outcome import OK, Outcome, StepResult
from apps.licensing_api import AssignmentQuery, Confirmation, UploadAnswer

__all__ = ["Licensing", "confirm", "license_info", "licensing_client", "receipts_beside",
           "upload"]


# ---------------------------------------------------------------- step 2: license-info


class Licensing(Protocol):
    """What the workflow asks the licensing server (apps.licensing_client)."""

    def license_info(self, site_info: bytes, devices: Sequence[str] | None = None) -> bytes: ...
    def license_info_files(self, site_info: bytes, devices: Sequence[str] | None = None
                           ) -> tuple[bytes, dict[str, bytes]]: ...
    def upload(self, requests: Sequence[bytes], receipts: Sequence[bytes] = ()
               ) -> UploadAnswer: ...
    def confirm(self, receipts: Sequence[bytes]) -> Confirmation: ...
    def assign(self, entitlement: str, device: str, feature: str, count: int) -> Any: ...
    def assign_many(self, assignments: Sequence[AssignmentQuery]) -> list[dict[str, Any]]: ...


def licensing_client(url: str) -> Licensing:
    from apps.licensing_client import LicensingClient

    client: Licensing = LicensingClient(url)
    return client


def license_info(site_info: str, devices: Sequence[str], out: str,
                 licensing: Licensing) -> StepResult:
    """Have the licensing server answer, for the gathered servers, what to reclaim and install."""
    if not Path(out).absolute().parent.is_dir():
        raise UsageError(f"cannot write {out}: its folder does not exist")
    data = read_input(site_info, SITE_INFO_MAX, "SITE_INFO file", expect="site-info")
    bundle = SiteInfo.decode(data)
    if devices:  # only to name a --device the bundle does not hold: the IDs, unverified
        known = set()
        for d in bundle.devices:
            try:
                known.add(peek_payload(d, DeviceInfo)[0].device_id)
            except LicensingError:
                continue  # the licensing server lists it; we only check --device names here
        unknown = [d for d in devices if d not in known]
        if unknown:
            raise UsageError(
                f"--device {', '.join(short(d) for d in unknown)}: not in {site_info} "
                f"(it holds {', '.join(short(d) for d in sorted(known)) or 'no device'})")
    answer, own = licensing.license_info_files(data, list(devices) or None)
    info, _kid = peek_payload(answer, LicenseInfo, LICENSE_INFO_MAX)
    # each server's own file goes beside the site's (step 3 hands a server only its own)
    folder = per_device_dir(out)
    if folder.is_dir():
        for old in folder.glob("*" + SUFFIX["license-info"]):
            old.unlink()  # never hand a server a file from an earlier run
    folder = ensure_dir(folder)
    for dev, one in own.items():
        part, _kid = peek_payload(one, LicenseInfo, LICENSE_INFO_MAX)
        if [e.device_id for e in part.entries] != [dev]:
            raise MalformedError(f"the licensing server's license information for {short(dev)} "
                                 f"names other devices")
        write_file(device_file(folder, dev, "license-info"), one)
    write_file(Path(out), answer)
    res = StepResult("license-info")
    entries = []
    for e in info.entries:
        res.details.append(f"device {short(e.device_id)}: reclaim {features_text(e.reclaim)}; "
                           f"install {features_text(e.install)}")
        entries.append({"device_id": e.device_id,
                        "reclaim": [x.to_cbor() for x in e.reclaim],
                        "install": [x.to_cbor() for x in e.install]})
    n_reclaim = sum(1 for e in info.entries if e.reclaim)
    n_install = sum(1 for e in info.entries if e.install and not e.reclaim)
    res.notes.append(f"license information: {n_reclaim} server(s) with licenses to reclaim, "
                     f"{n_install} with licenses to install, "
                     f"{len(info.entries) - n_reclaim - n_install} with nothing to do")
    res.notes.append(f"wrote license information for {len(info.entries)} server(s) to {out}, "
                     f"and each server's own to {folder}")
    res.facts = {"out": out, "per_device": str(folder), "entries": entries,
                 "expires": info.expires}
    return res


# ---------------------------------------------------------------- step 4: upload


def receipts_beside(requests_dir: str, receipts: str | None) -> Path | None:
    """``--receipts DIR``, else a ``receipts`` folder beside REQUESTS if there is one."""
    if receipts:
        p = Path(receipts)
        if not p.is_dir():
            raise UsageError(f"no such folder: {receipts}")
        return p
    beside = Path(requests_dir).absolute().parent / "receipts"
    return beside if beside.is_dir() else None


def upload(requests_dir: str, out_dir: str, receipts: str | None,
           licensing: Licensing, console: Console,
           devices: Collection[str] | None = None) -> StepResult:
    """Send every request (and any receipts riding along); write one response per server.

    ``devices``: only the requests of these devices (the one-go commands send
    only what they just made, whatever an earlier run left in the folder).
    """
    files = read_device_files(requests_dir, "request")
    if devices is not None:
        files = [(p, d) for p, d in files if p.name.removesuffix(SUFFIX["request"]) in devices]
    if not files:
        raise UsageError(f"no request files (*{SUFFIX['request']}) in {requests_dir}")
    folder = ensure_dir(out_dir)
    rc_dir = receipts_beside(requests_dir, receipts)
    rc_files = read_device_files(rc_dir, "receipt") if rc_dir else []
    res = StepResult("upload")
    by_key: dict[str, Outcome] = {}
    reqs: list[bytes] = []
    for path, data in files:
        o = Outcome(path.name)
        res.outcomes.append(o)
        try:
            payload, _kid = peek_payload(data, Request)
        except LicensingError as err:
            o.fail(err)
            continue
        o.device_id = payload.device_id
        if path == device_file(path.parent, payload.device_id, "request"):
            o.who = "request"  # the device column says whose
        by_key[payload.device_id] = by_key[f"#{len(reqs)}"] = o
        reqs.append(data)
    answer = licensing.upload(reqs, [d for _p, d in rc_files]) if reqs else UploadAnswer()
    for dev, resp in answer.responses.items():
        o = by_key.get(dev) or Outcome(f"(device {short(dev)})", device_id=dev)
        if o not in res.outcomes:
            res.outcomes.append(o)
        try:
            filed, _kid = peek_payload(resp, Response)
            if filed.device_id != dev:
                raise MalformedError(f"the licensing server filed a response of device "
                                     f"{short(filed.device_id)} under {short(dev)}")
        except LicensingError as err:
            o.fail(err)
            continue
        path = device_file(folder, dev, "response")
        write_file(path, resp)
        o.result = "answered"
        o.detail = (f"response: sequence {filed.base_sequence} -> {filed.sequence}: "
                    f"{_changes(filed)}")
    for key, refusal in answer.errors.items():
        o = by_key.get(key) or Outcome(str(key))
        if o not in res.outcomes:
            res.outcomes.append(o)
        o.fail(_remote_error(refusal))
    for o in res.outcomes:
        if o.status == OK and o.result == "ok":
            o.fail(LicensingError("the licensing server gave no answer for this request"))
    n = sum(1 for o in res.outcomes if o.status == OK)
    if rc_files:
        verdicts = _receipt_outcomes(answer.receipts, rc_files)
        res.outcomes += verdicts
    for o in res.outcomes:
        console.each(o)
    if rc_files:
        res.notes.append(f"{len(rc_files)} receipt(s) from {rc_dir} rode along: "
                         + _verdict_counts(verdicts))
    res.notes.append(f"wrote {n} response(s) to {folder}")
    res.facts = {"out_dir": str(folder), "responses": n,
                 "receipts_dir": str(rc_dir) if rc_dir else None}
    return res


def _remote_error(refusal: dict[str, Any]) -> RemoteError:
    """A refusal ``{"code", "reason", "message"}`` in the licensing server's answer."""
    return RemoteError(int(refusal.get("code", 1)), str(refusal.get("reason", "failure")),
                       str(refusal.get("message", "")))


def _changes(resp: Response) -> str:
    return ", ".join(f"{c.op.value} {c.feature}" + (f"={c.count}" if c.op.value != "remove" else "")
                     for c in resp.changes) or "no changes"


def _receipt_outcomes(answer: Confirmation, files: Sequence[tuple[Path, bytes]]
                      ) -> list[Outcome]:
    """The licensing server's verdict on each receipt (riding along with upload, or confirm).

    A receipt the ledger accepted before (reason ``replay``) is no failure:
    receipts stay in their folder and ride along again until someone removes them.
    """
    out = []
    for a in answer.accepted:
        o = Outcome("receipt", device_id=a.get("device_id"))
        o.result = "confirmed"
        o.detail = f"sequence {a.get('sequence')}: freed {features_text(a.get('freed', []))}"
        out.append(o)
    for r in answer.refused:
        idx = r.get("index")
        name = files[idx][0].name if isinstance(idx, int) and 0 <= idx < len(files) else f"#{idx}"
        o = Outcome(name)
        if r.get("reason") == "replay":
            o.result, o.detail = "already confirmed", str(r.get("message", ""))
        else:
            o.fail(_remote_error(r))
            o.result = "refused"
        out.append(o)
    return out


# ---------------------------------------------------------------- step 6: confirm


def confirm(receipts_dir: str, licensing: Licensing, console: Console) -> StepResult:
    """Hand every receipt to the licensing server; reclaimed licenses become free."""
    files = read_device_files(receipts_dir, "receipt")
    res = StepResult("confirm")
    if not files:
        res.notes.append(f"no receipts (*.receipt) in {receipts_dir}: nothing to confirm")
        return res
    answer = licensing.confirm([d for _p, d in files])
    res.outcomes = _receipt_outcomes(answer, files)
    for o in res.outcomes:
        console.each(o)
    res.notes.append(f"{len(files)} receipt(s) from {receipts_dir}: "
                     + _verdict_counts(res.outcomes))
    res.facts = {"receipts": len(files)}
    return res


def _verdict_counts(outcomes: Sequence[Outcome]) -> str:
    words = ("confirmed", "already confirmed", "refused")
    counts = {w: sum(1 for o in outcomes if o.result == w) for w in words}
    return ", ".join(f"{n} {w}" for w, n in counts.items() if n) or "no verdict"

"""``licadmin assign``: licenses of an entitlement assigned to one server or to many at once.

The devices come from ``--device`` (repeatable), from a SITE_INFO bundle (what
``licadmin gather`` wrote: every gathered server, each device-information file's
self-signature checked) or from a CSV of ``DEVICE_ID,FEATURE=COUNT[,FEATURE=COUNT...]``
rows. Every assignment of the command goes to the licensing server in ONE request
and is made in one ledger transaction: all of them, or none (the refusal names the
one that did not fit).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import EXIT_OK, LicensingError, MalformedError, UsageError
from agent.formats import SITE_INFO_MAX, SiteInfo, read_device_info
from agent.messages import valid_device_id
from apps.common import read_input
from apps.licadmin.files import short
from apps.licadmin.online import Licensing
from apps.licadmin.outcome import EXIT_PARTIAL
from apps.licensing_api import AssignmentBatch, AssignmentQuery

__all__ = ["AssignPlan", "parse_feature_count", "plan", "run_assign"]

#: the largest CSV read (about 60 bytes a row: far beyond AssignmentBatch.MAX rows)
CSV_MAX = 8 * 1024 * 1024


def parse_feature_count(text: str, where: str = "--feature") -> tuple[str, int]:
    """``FEATURE=COUNT`` (COUNT the device's total; 0 releases the assignment)."""
    name, sep, count = text.strip().partition("=")
    if not sep or not name.strip() or not count.strip().isdigit():
        raise UsageError(f"{where} {text!r}: expected FEATURE=COUNT (the total for the device; "
                         f"0 releases the assignment)")
    return name.strip(), int(count)


@dataclass
class AssignPlan:
    """What one ``licadmin assign`` asks: the assignments, and the servers left out."""

    assignments: list[AssignmentQuery] = field(default_factory=list)
    #: servers SITE_INFO lists as not gathered: (server, why)
    left_out: list[tuple[str, str]] = field(default_factory=list)


def _site_info_devices(path: str, bundle: SiteInfo) -> list[str]:
    """The device IDs of a SITE_INFO bundle, each file's self-signature checked, in order."""
    out: dict[str, None] = {}
    for i, data in enumerate(bundle.devices, 1):
        try:
            out[read_device_info(data).device_id] = None
        except LicensingError as err:
            raise type(err)(f"{path}: device-information file #{i} of the SITE_INFO bundle "
                            f"does not verify: {err}") from None
    if not out:
        raise UsageError(f"{path}: the SITE_INFO bundle holds no device (licadmin gather "
                         "reached no server)")
    return list(out)


def _csv_rows(path: str, data: bytes) -> list[tuple[str, list[tuple[str, int]]]]:
    """``DEVICE_ID,FEATURE=COUNT[,...]`` rows; blank lines, ``#`` comments and a header
    row starting with ``device`` are skipped."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise MalformedError(f"--devices-from {path}: neither a SITE_INFO file (licadmin "
                             f"gather) nor a UTF-8 CSV of DEVICE_ID,FEATURE=COUNT rows "
                             f"(byte {exc.start} is not UTF-8)") from None
    rows: list[tuple[str, list[str]]] = []
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        for cells in reader:
            where = f"--devices-from {path} line {reader.line_num}:"
            rows.append((where, [c.strip() for c in cells]))
    except csv.Error as exc:
        raise MalformedError(f"--devices-from {path}: not a CSV file: {exc}") from None
    out = []
    for where, cells in rows:
        if not any(cells) or cells[0].startswith("#"):
            continue
        if cells[0].lower() in ("device", "device_id"):
            continue  # a header row
        try:
            dev = valid_device_id(cells[0])
        except MalformedError:
            raise MalformedError(f"{where} {cells[0][:80]!r} is not a device ID (64 lowercase "
                                 "hex digits; licadmin status --json shows it)") from None
        feats = [parse_feature_count(c, where) for c in cells[1:] if c]
        if not feats:
            raise UsageError(f"{where} device {short(dev)} has no FEATURE=COUNT after it")
        out.append((dev, feats))
    if not out:
        raise UsageError(f"--devices-from {path}: no DEVICE_ID,FEATURE=COUNT row in it")
    return out


def plan(entitlement: str, product: str | None, devices: Sequence[str],
         devices_from: str | None, features: Sequence[str]) -> AssignPlan:
    """Read what to assign from the command line and ``--devices-from``.

    Raises:
        UsageError, MalformedError: a flag combination or a file that does not fit,
            one line naming the file and what was expected.
    """
    feats = [parse_feature_count(f) for f in features]
    out = AssignPlan()
    if bool(devices) == bool(devices_from):
        raise UsageError("name the servers with --device DEVICE_ID (repeat for each) or "
                         "--devices-from SITE_INFO|FILE.csv, not both")
    targets: list[tuple[str, list[tuple[str, int]]]] = []
    if devices:
        if not feats:
            raise UsageError("give --feature FEATURE=COUNT (repeat for each feature)")
        targets = [(d, feats) for d in dict.fromkeys(devices)]
    else:
        assert devices_from is not None
        data = read_input(devices_from, max(SITE_INFO_MAX, CSV_MAX), "--devices-from file")
        if data[:1] and 0xA0 <= data[0] <= 0xBF:  # a CBOR map: a SITE_INFO bundle
            try:
                bundle = SiteInfo.decode(data)
            except MalformedError as err:
                raise MalformedError(f"--devices-from {devices_from}: not a SITE_INFO file "
                                     f"(licadmin gather) nor a CSV: {err}") from None
            if not feats:
                raise UsageError(f"give --feature FEATURE=COUNT: {devices_from} is a "
                                 "SITE_INFO file, which names devices but no counts")
            targets = [(d, feats) for d in _site_info_devices(devices_from, bundle)]
            out.left_out = list(bundle.failed)
        else:
            if feats:
                raise UsageError(f"--feature with a CSV: {devices_from} names the features "
                                 "of each device on its row; leave --feature out")
            targets = _csv_rows(devices_from, data)
    for dev, fs in targets:
        for f, n in fs:
            out.assignments.append(AssignmentQuery(entitlement, dev, f, n, product))
    if len(out.assignments) > AssignmentBatch.MAX:
        raise UsageError(f"{len(out.assignments)} assignments: at most {AssignmentBatch.MAX} "
                         "in one command (one ledger transaction); split the file")
    return out


def run_assign(p: AssignPlan, licensing: Licensing) -> tuple[int, dict[str, Any], list[str]]:
    """Send the plan in one request; (exit code, the JSON summary, the text lines)."""
    done: list[dict[str, Any]] = licensing.assign_many(p.assignments)
    lines: list[str] = []
    devices = {a["device_id"] for a in done}
    if len(devices) == 1:
        for a in done:
            lines.append(f"assigned {a['feature']}={a['count']} of entitlement "
                         f"{a['entitlement']} ({a.get('product', '-')}) to device "
                         f"{a['device_id']}; {a.get('free', '-')} left unassigned")
    else:
        per: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for a in done:
            per.setdefault((a["entitlement"], a.get("product", "-"), a["feature"]),
                           []).append(a)
        for (ent, prod, feat), rows in per.items():
            lines.append(f"assigned {feat} to {len(rows)} device(s), "
                         f"{sum(int(r['count']) for r in rows)} in all, of entitlement {ent} "
                         f"({prod}); {rows[-1].get('free', '-')} left unassigned")
        lines.append(f"{len(done)} assignment(s) for {len(devices)} device(s), "
                     "made in one transaction")
    code = EXIT_OK
    if p.left_out:
        code = EXIT_PARTIAL
        lines.append(f"partial: {len(p.left_out)} server(s) of the SITE_INFO file were not "
                     "gathered, so nothing was assigned to them: "
                     + "; ".join(f"{s} ({e[:80]})" for s, e in p.left_out[:5])
                     + (" ..." if len(p.left_out) > 5 else "")
                     + "; gather them again, then assign")
    summary = {"command": "assign", "exit_code": code, "assignments": done,
               "not_gathered": [{"server": s, "error": e} for s, e in p.left_out]}
    return code, summary, lines

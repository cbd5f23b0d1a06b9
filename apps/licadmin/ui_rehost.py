"""The Rehost screen of ``licadmin ui`` (issue 19): move licenses from one server to another.

The same operation as ``licadmin rehost`` (:class:`apps.licadmin.rehost.Rehost`), with its
eight step files in ``WORK/rehost/rehost-HASH`` (the folder the command line would use for
the same two URLs), so a refresh, a restart of ``licadmin ui`` or the command line itself
finishes a rehost the browser started. Without a licensing server the two hops to it are
carried by hand, as in the guided flow: the request file is downloaded and its response
uploaded here; the receipt is downloaded and confirmed on a computer that is online.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.errors import EXIT_OK, LicensingError, UsageError
from agent.formats import DEVICE_FILE_MAX, expect_kind, peek_payload
from agent.messages import Response
from apps.common import one_line, read_input, write_output
from apps.licadmin.moveplan import PLAN
from apps.licadmin.rehost import STEPS, Rehost, default_work_dir
from apps.licadmin.runner import connector
from apps.licadmin.ui_flow import Job, Site, cli_line
from apps.licadmin.ui_pages import Screen, csrf_field, e, table

__all__ = ["CarryByHand", "routes"]

OUTCOME = "outcome.json"
_ID = re.compile(r"rehost-[0-9a-f]{12}")
#: what each step's file is, as the screen says it
SAID = {"out.req": "the old server's transfer-out request",
        "out.resp": "the licensing server's response to it",
        "out.receipt": "the old server's receipt: the licenses removed",
        "out.confirmed": "the licensing server confirmed that receipt",
        "in.req": "the new server's activation request",
        "in.resp": "the licensing server's response to it",
        "in.receipt": "the new server's receipt: the licenses installed",
        "in.confirmed": "the licensing server confirmed that receipt"}


class CarryByHand(UsageError):
    """A step needs the licensing server and none was given: its file is carried by hand."""


class _Carried:
    """The licensing server of a ``licadmin ui`` started without one: each of its steps
    stops the rehost with what to carry where."""

    def upload(self, requests: Sequence[bytes], receipts: Sequence[bytes] = ()) -> Any:
        raise CarryByHand("no licensing server given: download the request file below, run "
                          "licadmin upload --requests DIR --out-dir DIR on a computer that "
                          "is online, and upload its response file here")

    def confirm(self, receipts: Sequence[bytes]) -> Any:
        raise CarryByHand("no licensing server given: download the receipt below, run "
                          "licadmin confirm --receipts DIR on a computer that is online, "
                          "then say so here")


def _base(site: Site) -> Path:
    return site.work / "rehost"


def _folder(site: Site, ident: str) -> Path:
    if not _ID.fullmatch(ident) or not (_base(site) / ident / PLAN).is_file():
        raise UsageError(f"no rehost {one_line(ident)} in {_base(site)}")
    return _base(site) / ident


def _plan(folder: Path) -> dict[str, Any]:
    try:
        plan = json.loads((folder / PLAN).read_text())
        assert isinstance(plan, dict)
        return plan
    except (ValueError, OSError, AssertionError) as exc:
        raise UsageError(f"{folder / PLAN} is not a rehost plan ({exc})") from exc


def _next(folder: Path) -> str | None:
    return next((s for s in STEPS if not (folder / s).exists()), None)


def _outcome(folder: Path) -> dict[str, Any]:
    try:
        d = json.loads((folder / OUTCOME).read_text())
        return d if isinstance(d, dict) else {}
    except (ValueError, OSError):
        return {}


def start(site: Site, src: str, dst: str, features: Sequence[str]) -> str:
    """Start (or carry on) the rehost from ``src`` to ``dst`` as the job; its folder's name."""
    known = {s.url for s in site.servers}
    if src not in known or dst not in known:
        raise UsageError("choose the old and the new server among the site's servers")
    if src == dst:
        raise UsageError("the old and the new server are the same: choose the new server as "
                         "the one the licenses move to")
    folder = _base(site) / default_work_dir(src, dst).name
    feats = [f for f in (x.strip() for x in features) if f]

    def work(job: Job) -> None:
        job.total = len(STEPS)
        lines: list[str] = []

        def say(line: str) -> None:
            lines.append(line)
            job.lines.append(line)
            job.done = sum(1 for s in STEPS if (folder / s).exists())

        record: dict[str, Any] = {"lines": lines, "code": EXIT_OK}
        try:
            _base(site).mkdir(exist_ok=True)
            Rehost(src, dst, site.licensing or _Carried(),  # type: ignore[arg-type]
                   feats, folder, connector(site.timeout), say).run()
        except CarryByHand as hop:
            record |= {"carry": str(hop), "code": hop.exit_code}
        except LicensingError as err:
            record |= {"error": cli_line(err), "code": err.exit_code}
        if folder.is_dir():
            write_output(str(folder / OUTCOME), json.dumps(record, indent=1).encode() + b"\n")
        elif "error" in record:  # refused before its folder existed: the next page says so
            site.failure = str(record["error"])

    site.start("rehosting", work)
    return folder.name


def take_response(site: Site, ident: str, name: str, data: bytes) -> str:
    """A response file carried from ``licadmin upload``: checked for its kind and device,
    then written as the step's file."""
    folder = _folder(site, ident)
    step = _next(folder)
    if step not in ("out.resp", "in.resp"):
        raise UsageError("this rehost waits for no response file now")
    if len(data) > DEVICE_FILE_MAX:
        raise UsageError(f"{name}: {len(data)} bytes, more than the {DEVICE_FILE_MAX}-byte "
                         f"limit of a response file")
    expect_kind(data, "response", name)
    resp, _kid = peek_payload(data, Response)
    plan = _plan(folder)
    want = str(plan["from_id" if step == "out.resp" else "to_id"])
    if resp.device_id != want:
        raise UsageError(f"{name} answers device {resp.device_id[:12]}…, this step waits for "
                         f"the response to {step.replace('.resp', '.req')} of device "
                         f"{want[:12]}…: nothing was taken")
    write_output(str(folder / step), data)
    return f"{name} taken as {step}: continue the rehost"


def confirmed_by_hand(site: Site, ident: str) -> str:
    folder = _folder(site, ident)
    step = _next(folder)
    if step not in ("out.confirmed", "in.confirmed"):
        raise UsageError("this rehost waits for no confirmation now")
    write_output(str(folder / step), json.dumps({"confirmed": "carried by hand"}).encode()
                 + b"\n")
    return f"{step}: recorded; continue the rehost"


# ---------------------------------------------------------------- the page


def _select(name: str, label: str, site: Site, chosen: str) -> str:
    opts = "".join(f'<option value="{e(s.url)}"{" selected" if s.url == chosen else ""}>'
                   f'{e(s.label)} ({e(s.url)})</option>' for s in site.servers)
    return (f'<div class="field"><label for="{name}">{label}</label>'
            f'<select id="{name}" name="{name}">{opts}</select></div>')


def _start_form(site: Site, csrf: str) -> str:
    first = site.servers[0].url if site.servers else ""
    second = site.servers[1].url if len(site.servers) > 1 else first
    return ('<form method="post" action="/rehost/start" id="rehost-form">' + csrf_field(csrf)
            + _select("from", "Old server (the licenses leave it)", site, first)
            + _select("to", "New server (the licenses arrive there)", site, second)
            + '<div class="field"><label for="rehost-features">Features to move, separated '
              'by commas (empty: every license of the old server)</label><input type="text" '
              'id="rehost-features" name="features" autocomplete="off"></div>'
              '<button type="submit" class="primary" id="rehost-start">Start the rehost'
              '</button></form>')


def _detail(site: Site, ident: str, csrf: str) -> str:
    folder = _folder(site, ident)
    plan = _plan(folder)
    label = {s.url: s.label for s in site.servers}
    feats = ", ".join(plan.get("features") or []) or "every license"
    out = (f'<p id="rehost-plan">Rehost of {e(feats)} from <strong>'
           f'{e(label.get(plan["from"], plan["from"]))}</strong> ({e(str(plan["from_id"])[:12])}…)'
           f' to <strong>{e(label.get(plan["to"], plan["to"]))}</strong> '
           f'({e(str(plan["to_id"])[:12])}…). Files: <code>{e(folder)}</code></p>')
    rows = []
    for n, s in enumerate(STEPS, 1):
        done = (folder / s).exists()
        link = (f'<a href="/rehost/files/{ident}/{s}" download>{s}</a>' if done else e(s))
        rows.append((n, link, SAID[s], "done" if done else "not yet"))
    out += table("The steps and their files", ("#", "File", "What it is", "State"), rows,
                 "rehost-steps", raw=frozenset({1}))
    outcome = _outcome(folder)
    if outcome.get("lines"):
        out += '<ul class="summary" id="rehost-lines">' + "".join(
            f"<li>{e(x)}</li>" for x in outcome["lines"]) + "</ul>"
    if outcome.get("error"):
        out += f'<p class="error" role="alert" id="rehost-error">{e(outcome["error"])}</p>'
    nxt = _next(folder)
    if outcome.get("carry") and nxt is not None:
        out += f'<p class="note" id="rehost-carry">{e(outcome["carry"])}</p>'
    if site.busy():
        return out
    hidden = f'<input type="hidden" name="id" value="{e(ident)}">'
    if nxt is None:
        return out + '<p class="note" id="rehost-done">Done: the licenses are on the new ' \
                     'server and both receipts are confirmed.</p>'
    out += (f'<form method="post" action="/rehost/run">{csrf_field(csrf)}{hidden}<button '
            f'type="submit" class="primary" id="rehost-run">Continue the rehost</button></form>')
    if nxt in ("out.resp", "in.resp"):
        out += (f'<form method="post" action="/rehost/upload" enctype="multipart/form-data" '
                f'class="upload">{csrf_field(csrf)}{hidden}<label for="file-rehost">Or upload '
                f'the response to {nxt.replace(".resp", ".req")} (licadmin upload on a '
                f'computer that is online)</label><input type="file" id="file-rehost" '
                f'name="file" required><button type="submit" id="upload-rehost">Upload'
                f'</button></form>')
    if nxt in ("out.confirmed", "in.confirmed"):
        receipt = nxt.replace(".confirmed", ".receipt")
        out += (f'<form method="post" action="/rehost/confirmed">{csrf_field(csrf)}{hidden}'
                f'<button type="submit" id="rehost-confirmed">{e(receipt)} was confirmed on '
                f'a computer that is online (licadmin confirm)</button></form>')
    return out


def rehost_page(site: Site, ident: str | None, csrf: str) -> str:
    out = ""
    if ident and _ID.fullmatch(ident) and site.busy() and not (_base(site) / ident /
                                                                PLAN).is_file():
        out += '<p class="note">The rehost is starting: reading both servers.</p>'
    elif ident:
        out += _detail(site, ident, csrf)
    base = _base(site)
    known = sorted(p.name for p in base.iterdir()
                   if _ID.fullmatch(p.name) and (p / PLAN).is_file()) if base.is_dir() else []
    label = {s.url: s.label for s in site.servers}
    rows = []
    for name in known:
        plan = _plan(base / name)
        nxt = _next(base / name)
        rows.append((f'<a href="/rehost?id={name}"{" aria-current=page" if name == ident else ""}'
                     f'>{e(label.get(plan["from"], plan["from"]))} to '
                     f'{e(label.get(plan["to"], plan["to"]))}</a>',
                     ", ".join(plan.get("features") or []) or "every license",
                     "done" if nxt is None else f"next: {nxt}"))
    out += table("Rehosts of this site", ("Rehost", "Features", "State"), rows, "rehosts",
                 raw=frozenset({0}))
    return out + "<h2>A new rehost</h2>" + _start_form(site, csrf)


def routes(h: Screen, path: str) -> Mapping[str, Any]:
    """The screen's routes for ``path`` (none when it is not this screen's)."""
    site = h.server.site

    def show() -> Any:
        ident = (h.query().get("id") or [""])[0]
        return h.page("Rehost", rehost_page(site, ident or None, h.server.csrf), "/rehost")

    def ident_of(fields: dict[str, list[str]]) -> str:
        ident = (fields.get("id") or [""])[0]
        _folder(site, ident)
        return ident

    def begin() -> Any:
        fields, _files = h.form()
        where: list[str] = []

        def go() -> None:
            where.append(start(site, (fields.get("from") or [""])[0],
                               (fields.get("to") or [""])[0],
                               (fields.get("features") or [""])[0].split(",")))

        answer = h.acted("/rehost", go)
        if where:
            answer.headers["Location"] = f"/rehost?id={where[0]}"
        return answer

    def carry_on() -> Any:
        fields, _files = h.form()
        ident = ident_of(fields)

        def go() -> None:
            plan = _plan(_folder(site, ident))
            start(site, str(plan["from"]), str(plan["to"]), list(plan.get("features") or []))

        return h.acted(f"/rehost?id={ident}", go)

    def upload() -> Any:
        fields, files = h.form()
        ident = ident_of(fields)

        def go() -> str:
            if len(files) != 1:
                raise UsageError("choose one response file")
            _f, name, data = files[0]
            return take_response(site, ident, name, data)

        return h.acted(f"/rehost?id={ident}", go)

    def confirmed() -> Any:
        fields, _files = h.form()
        ident = ident_of(fields)
        return h.acted(f"/rehost?id={ident}", lambda: confirmed_by_hand(site, ident))

    if path == "/rehost":
        return {"GET": show, "HEAD": show}
    posts = {"/rehost/start": begin, "/rehost/run": carry_on, "/rehost/upload": upload,
             "/rehost/confirmed": confirmed}
    if path in posts:
        return {"POST": posts[path]}
    if path.startswith("/rehost/files/"):
        ident, _sep, name = path[len("/rehost/files/"):].partition("/")

        def download() -> Any:
            folder = _folder(site, ident)
            if name not in (*STEPS, PLAN) or not (folder / name).is_file():
                raise UsageError(f"no such file of the rehost: {one_line(name)}")
            return h.download(read_input(str(folder / name), DEVICE_FILE_MAX), name)

        return {"GET": download}
    return {}

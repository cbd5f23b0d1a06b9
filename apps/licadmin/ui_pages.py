"""The pages of ``licadmin ui``: plain HTML forms, from the state in, text out.

No script is needed: every action is a form (``POST``, with the CSRF field), every page
a ``GET`` that only reads, so the keyboard, a screen reader and the browser's refresh
all work as on any document. Each screen has one ``h1``, tables have captions and
column headers, every control a label, and errors are the command line's one line in an
``role="alert"`` paragraph.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from html import escape
from typing import Any, Protocol
from urllib.parse import quote

from agent.formats import iso
from apps.licadmin.files import short
from apps.licadmin.ui_flow import ONLINE, STEPS, TITLES, Flow, Job, ServerView, Site

__all__ = ["NAV", "Screen", "csrf_field", "e", "flow_page", "journal_page", "layout",
           "licenses_page", "server_links", "servers_page", "table"]

#: the screens, in the order of the navigation
NAV = (("/servers", "Servers"), ("/licenses", "Show Licenses"), ("/flow", "Activate"),
       ("/flow?mode=reclaim", "Reclaim"), ("/rehost", "Rehost"), ("/seats", "Seat pools"),
       ("/journal", "Journal"))


class Served(Protocol):
    """What a screen reads of the server: the site and the page's CSRF field."""

    @property
    def site(self) -> Site: ...

    @property
    def csrf(self) -> str: ...


class Screen(Protocol):
    """What a screen module (``ui_seats``, ``ui_rehost``) asks of the request handler."""

    @property
    def server(self) -> Served: ...

    def query(self) -> dict[str, list[str]]: ...

    def form(self) -> tuple[dict[str, list[str]], list[tuple[str, str, bytes]]]: ...

    def page(self, title: str, body: str, current: str) -> Any: ...

    def acted(self, to: str, fn: Callable[[], Any]) -> Any: ...

    def download(self, data: bytes, name: str) -> Any: ...


#: a screen's routes for a path: method to handler (empty when the path is not its own)
Routes = Callable[[Screen, str], Mapping[str, Any]]


def e(x: Any) -> str:
    """``x`` as HTML text (quotes escaped too)."""
    return escape(str(x), quote=True)


_e = e


def _current(yes: bool, what: str = "page") -> str:
    return f' aria-current="{what}"' if yes else ""


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{_e(csrf)}">'


def button_form(action: str, label: str, csrf: str, extra: str = "",
                primary: bool = False, ident: str = "") -> str:
    cls = ' class="primary"' if primary else ""
    idattr = f' id="{_e(ident)}"' if ident else ""
    return (f'<form method="post" action="{_e(action)}">{csrf_field(csrf)}{extra}'
            f'<button type="submit"{cls}{idattr}>{_e(label)}</button></form>')


def layout(title: str, body: str, current: str, flash: tuple[str, str] | None = None,
           job: Job | None = None, csrf: str = "") -> str:
    """One page: skip link, navigation, the job's progress, the flash line, the screen."""
    nav = "".join(
        f'<li><a href="{_e(href)}"{_current(href == current)}>'
        f'{_e(name)}</a></li>' for href, name in NAV)
    refresh = ""
    job_html = ""
    if job is not None and job.running:
        refresh = '<meta http-equiv="refresh" content="1">'
        job_html = (
            f'<section class="job" aria-labelledby="job-title"><h2 id="job-title">Running: '
            f'{_e(job.title)}</h2><progress id="progress" max="{max(job.total, 1)}" '
            f'value="{job.done}" aria-label="{_e(job.title)}">{job.done} of {job.total}'
            f'</progress> <span id="progress-text">{job.done} of {job.total} server(s) done'
            f'</span>' + button_form("/stop", "Stop after the servers in flight", csrf)
            + "</section>")
    flash_html = ""
    if flash is not None:
        kind, text = flash
        role = "alert" if kind == "error" else "status"
        flash_html = f'<p id="{kind}" class="{kind}" role="{role}">{_e(text)}</p>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{_e(title)} - licadmin</title><link rel="stylesheet" href="/static/ui.css">'
        f'{refresh}</head><body><a class="skip" href="#main">Skip to the content</a>'
        '<header><span class="brand">licadmin</span>'
        f'<nav aria-label="Screens"><ul>{nav}</ul></nav></header>'
        f'<main id="main" tabindex="-1"><h1>{_e(title)}</h1>{flash_html}{job_html}{body}'
        '</main></body></html>\n')


def table(caption: str, head: Sequence[str], rows: Sequence[Sequence[Any]],
           ident: str = "", raw: frozenset[int] = frozenset()) -> str:
    """A table with a caption and column headers; ``raw`` columns hold HTML already."""
    idattr = f' id="{_e(ident)}"' if ident else ""
    th = "".join(f'<th scope="col">{_e(h)}</th>' for h in head)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if i in raw else _e(c)}</td>" for i, c in enumerate(r))
        + "</tr>" for r in rows)
    if not rows:
        body = f'<tr><td colspan="{len(head)}">none</td></tr>'
    return (f'<table{idattr}><caption>{_e(caption)}</caption><thead><tr>{th}</tr></thead>'
            f'<tbody>{body}</tbody></table>')


# ---------------------------------------------------------------- Servers


def servers_page(site: Site, csrf: str, places: Sequence[str] = ()) -> str:
    """The site's servers; ``places``: each one's place in a system tree (ui_system)."""
    views = site.views
    rows = []
    for k, s in enumerate(site.servers):
        v: ServerView | None = views[k] if views is not None and k < len(views) else None
        st = v.status if v is not None else None
        reach = ("not read yet" if v is None or v.reachable is None
                 else "yes" if v.reachable else f"no: {v.error}")
        rows.append((s.name or "-", st.model if st else "-", st.device_id if st else "-",
                     s.url, reach, st.sequence if st else "-",
                     places[k] if k < len(places) else "-",
                     f'<a href="/journal?server={k}">journal</a>'))
    body = (table(f"The site's {len(site.servers)} server(s)"
                  + (f" ({site.site})" if site.site else ""),
                  ("Name", "Model", "Device ID", "Link", "Reachable", "Sequence", "System",
                   "Journal"), rows, "servers", raw=frozenset({7}))
            + button_form("/servers/read", "Read the servers again", csrf, ident="read"))
    return body


# ---------------------------------------------------------------- Show Licenses


def licenses_page(site: Site, report: dict[str, Any] | None, report_error: str) -> str:
    rows = []
    held: dict[str, int] = {}
    devices: set[str] = set()
    for k, s in enumerate(site.servers):
        v = site.views[k] if site.views is not None and k < len(site.views) else None
        if v is None or v.status is None:
            why = "not read yet" if v is None or v.reachable is None else v.error
            rows.append((s.label, "-", "-", "-", "-", f"unknown: {why}"))
            continue
        devices.add(v.status.device_id)
        if not v.status.licenses:
            rows.append((s.label, "(none)", "", "", "", ""))
        for lic in v.status.licenses:
            held[lic["feature"]] = held.get(lic["feature"], 0) + int(lic["count"])
            until = lic.get("not_after") or "no end"
            valid = f"{lic.get('not_before') or 'always'} to {until}"
            state = "licensed" if lic.get("licensed_now") else "not licensed now"
            rows.append((s.label, lic["feature"], lic["count"], lic.get("source", "vendor"), valid,
                         state))
    body = table("Licenses per server", ("Server", "Feature", "Count", "Source", "Validity",
                                          "State"), rows, "licenses")
    required: dict[str, int] = {}
    available: dict[str, int] = {}
    if report is not None:
        for a in report.get("assignments", []):
            if a.get("device_id") in devices:
                f = str(a.get("feature"))
                required[f] = required.get(f, 0) + int(a.get("count", 0))
        for ent in report.get("entitlements", []):
            for prod in ent.get("products", []):
                for f in prod.get("features", []):
                    name = str(f.get("feature"))
                    available[name] = available.get(name, 0) + int(f.get("free", 0))
    feats = sorted(set(held) | set(required))
    site_rows = [(f, required.get(f, "-") if report is not None else "-", held.get(f, 0),
                  available.get(f, "-") if report is not None else "-") for f in feats]
    body += table("The site: required (assigned at the licensing server), licensed "
                   "(installed on the servers), available (free in the entitlements)",
                   ("Feature", "Required", "Licensed", "Available"), site_rows, "site")
    if report_error:
        body += f'<p class="error" role="alert" id="report-error">{_e(report_error)}</p>'
    elif report is None:
        body += ('<p class="note">Required and available come from the licensing server: '
                 'start licadmin ui with --licensing-server URL to see them.</p>')
    return body


# ---------------------------------------------------------------- the guided flow


def _start_form(site: Site, mode: str, csrf: str) -> str:
    boxes = "".join(
        f'<div><input type="checkbox" name="server" id="srv-{k}" value="{_e(s.url)}" checked>'
        f'<label for="srv-{k}">{_e(s.label)} <span class="url">{_e(s.url)}</span></label></div>'
        for k, s in enumerate(site.servers))
    modes = "".join(
        f'<div><input type="radio" name="mode" id="mode-{m}" value="{m}"'
        f'{" checked" if m == mode else ""}><label for="mode-{m}">{label}</label></div>'
        for m, label in (("activate", "Activate: install what the licensing server assigned"),
                         ("reclaim", "Reclaim: return licenses to the licensing server")))
    return (
        '<form method="post" action="/flow/start" id="start">' + csrf_field(csrf)
        + f'<fieldset><legend>What to do</legend>{modes}</fieldset>'
        '<fieldset><legend>Servers</legend>' + boxes + '</fieldset>'
        '<div class="field"><label for="features">Features to reclaim, separated by commas '
        '(reclaim only; empty: what the license information lists)</label>'
        '<input type="text" id="features" name="features" autocomplete="off"></div>'
        '<div class="field-box"><input type="checkbox" name="force" value="1" id="force">'
        '<label for="force">Reclaim even while seats are out (reclaim only: floating '
        'licenses; the receipt records the seats, which run to their end; the command '
        'line\'s --force)</label></div>'
        '<button type="submit" class="primary" id="start-button">Start: gather server '
        'information</button></form>')


def _result_html(step: str, result: dict[str, Any] | None) -> str:
    if result is None:
        return '<p class="pending">Not run yet.</p>'
    if "error" in result:
        return (f'<p class="error" role="alert" id="error-{step}">{_e(result["error"])}</p>'
                f'<p>exit code {result.get("code")}</p>')
    out = ""
    if result.get("summary"):
        out += '<ul class="summary">' + "".join(
            f"<li>{_e(x)}</li>" for x in result["summary"]) + "</ul>"
    rows = [(r["server"], short(r.get("device_id")), r["result"], r["detail"])
            for r in result.get("rows", [])]
    if rows:
        out += table(f"{TITLES[step]}: outcome per server", ("Server", "Device", "Result",
                                                              "Detail"), rows,
                      f"outcome-{step}")
    for d in result.get("details", []):
        out += f'<p class="detail">{_e(d)}</p>'
    for n in result.get("notes", []):
        out += f'<p class="note">{_e(n)}</p>'
    return out


def _downloads(flow: Flow, step: str) -> str:
    links: list[tuple[str, str]] = []
    if step == "gather" and (flow.folder / "site-info.cbor").is_file():
        links.append(("site-info.cbor", "SITE_INFO (site-info.cbor)"))
    if step == "license-info" and (flow.folder / "license-info.cbor").is_file():
        links.append(("license-info.cbor", "license information (license-info.cbor)"))
    folder = {"requests": "requests", "upload": "responses", "send": "receipts"}.get(step)
    if folder:
        links += [(f"{folder}/{n}", n) for n in flow.files(folder)]
    if not links:
        return ""
    items = "".join(f'<li><a href="/files/{quote(rel)}" download>{_e(label)}</a></li>'
                    for rel, label in links)
    return f'<div class="files"><h4>Files of this step</h4><ul>{items}</ul></div>'


def _upload_form(step: str, csrf: str) -> str:
    if step == "license-info":
        what, field, multiple = ("the license information file (licadmin license-info on a "
                                 "computer that is online)", "license-info", "")
    elif step == "upload":
        what, field, multiple = ("the response files (licadmin upload on a computer that is "
                                 "online)", "responses", " multiple")
    else:
        return ""
    return (f'<form method="post" action="/flow/upload/{field}" enctype="multipart/form-data"'
            f' class="upload">{csrf_field(csrf)}<label for="file-{field}">Or upload {what}'
            f'</label><input type="file" id="file-{field}" name="file"{multiple} required>'
            f'<button type="submit" id="upload-{field}">Upload</button></form>')


def flow_page(site: Site, csrf: str, mode: str, new: bool) -> str:
    flow = site.flow
    state = flow.state()
    if state is None or new:
        intro = ("" if state is None else
                 '<p class="note">Starting a new flow keeps the files of the current one in '
                 'its own folder.</p>')
        return intro + _start_form(site, mode, csrf)
    results: dict[str, Any] = state.get("results", {})
    current = next((s for s in STEPS if s not in results or "error" in results[s]), None)
    chosen = [s.label for s in site.servers if s.url in state["servers"]]
    head = (f'<p id="flow-mode">Flow: <strong>{_e(state["mode"])}</strong>'
            + (f' of {_e(", ".join(state["features"]))}' if state["features"] else "")
            + (" even while seats are out (--force)" if state.get("force") else "")
            + f' on {len(chosen)} server(s): {_e(", ".join(chosen))}. '
            f'Files: <code>{_e(flow.folder)}</code></p>')
    marks = {s: ("failed" if s in results and ("error" in results[s] or results[s].get("code"))
                 else "done" if s in results else "todo") for s in STEPS}
    said = {"failed": "not all done", "done": "done", "todo": "not run yet"}
    steps_nav = "".join(
        f'<li{_current(s == current, "step")} class="{marks[s]}"><a href="#step-{s}">'
        f'{k}. {_e(TITLES[s])}<span class="sr"> ({said[marks[s]]})</span></a></li>'
        for k, s in enumerate(STEPS, 1))
    out = head + f'<ol class="steps" aria-label="Steps">{steps_nav}</ol>'
    for k, s in enumerate(STEPS, 1):
        ready = k == 1 or STEPS[k - 2] in results
        actions = ""
        if ready and not site.busy():
            extra = ""
            if s == "requests" and state["mode"] == "activate" and flow.planned_reclaims():
                extra = ('<div><input type="checkbox" name="allow_reclaim" value="1" '
                         'id="allow-reclaim"><label for="allow-reclaim">allow these reclaims'
                         '</label></div>')
            if s in ONLINE and site.licensing is None:
                actions += (f'<p class="note">No licensing server given: carry the files of '
                            f'step {k - 1} to a computer that is online and run licadmin '
                            f'{s} there.</p>')
            else:
                label = ("Run again: " if s in results else "Run: ") + TITLES[s].lower()
                actions += button_form(f"/flow/run/{s}", label, csrf, extra,
                                       primary=s == current, ident=f"run-{s}")
            actions += _upload_form(s, csrf)
        out += (f'<section class="step" id="step-{s}" aria-labelledby="h-{s}">'
                f'<h2 id="h-{s}">{k}. {_e(TITLES[s])}</h2>'
                + _result_html(s, results.get(s)) + _downloads(flow, s) + actions
                + "</section>")
    out += '<p><a href="/flow?new=1" id="new-flow">Start a new flow</a></p>'
    return out


# ---------------------------------------------------------------- Journal


def server_links(site: Site, screen: str, index: int | None) -> str:
    """The site's servers as links to ``screen?server=K`` (the chosen one marked)."""
    links = "".join(
        f'<li><a href="{screen}?server={k}"'
        f'{_current(k == index)}>{_e(s.label)}</a></li>'
        for k, s in enumerate(site.servers))
    return f'<nav aria-label="Servers"><ul class="servers">{links}</ul></nav>'


def journal_page(site: Site, index: int | None, entries: list[dict[str, Any]] | None,
                 error: str) -> str:
    out = server_links(site, "/journal", index)
    if index is None:
        return out + '<p>Choose a server to read its journal.</p>'
    who = site.servers[index].label
    if error:
        return out + f'<p class="error" role="alert" id="journal-error">{_e(error)}</p>'
    rows = [(e.get("n"), iso(e["time"]) if isinstance(e.get("time"), int) else "-",
             e.get("event"), json.dumps(e.get("data"), default=_plain, sort_keys=True))
            for e in entries or []]
    return out + table(f"Journal of {who}: {len(rows)} record(s), verified",
                        ("#", "Time", "Event", "Data"), rows, "journal")


def _plain(x: Any) -> str:
    return x.hex() if isinstance(x, bytes) else str(x)

"""The Seat pools screen of ``licadmin ui`` (issue 19): each server's floating licenses.

The pools (count, out, free) and the seats out, read with ``seat-list`` as ``licadmin seat
list`` does; a seat given back by uploading its token file, as ``licadmin seat return
TOKEN_FILE`` does (the same client call, the same line). Reclaiming a floating license
with seats out is the Reclaim flow with "reclaim even while seats are out" (``--force``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.errors import LicensingError, MalformedError, UsageError
from agent.formats import iso
from agent.seats import MAX_TOKEN
from apps.licadmin.runner import open_client
from apps.licadmin.ui_flow import Site, cli_line
from apps.licadmin.ui_pages import Screen, csrf_field, e, server_links, table

__all__ = ["routes"]


def _index(site: Site, raw: str) -> int:
    if not raw.isdigit() or int(raw) >= len(site.servers):
        raise UsageError(f"no server {raw} in the site: choose one of the list")
    return int(raw)


def seats_page(site: Site, index: int | None, lst: Any, error: str, csrf: str) -> str:
    out = server_links(site, "/seats", index)
    if index is None:
        return out + "<p>Choose a server to see its floating licenses and the seats out.</p>"
    if error:
        return out + f'<p class="error" role="alert" id="seats-error">{e(error)}</p>'
    who = site.servers[index].label
    pools = [(p["feature"], p["count"], p["out"], p["free"]) for p in lst.pools]
    pooled = {p["feature"] for p in lst.pools}
    # the order a technician reads: by feature, then who has held a seat longest
    seats = [(s["feature"], s["client"], iso(s["since"]), iso(s["until"]),
              "borrowed" if s["borrowed"] else "leased",
              "" if s["feature"] in pooled else "reclaimed: runs to its end, never renewed")
             for s in sorted(lst.seats, key=lambda s: (s["feature"], s["since"], s["client"]))]
    out += table(f"Floating licenses of {who}", ("Feature", "Seats", "Out", "Free"), pools,
                 "pools")
    out += table(f"Seats out on {who}", ("Feature", "Client", "Since", "Until", "Kind", "Note"),
                 seats, "seats")
    out += (f'<form method="post" action="/seats/return" enctype="multipart/form-data" '
            f'class="upload">{csrf_field(csrf)}<input type="hidden" name="server" '
            f'value="{index}"><label for="file-token">Return a seat: its token file (licadmin '
            f'seat checkout wrote it)</label><input type="file" id="file-token" name="token" '
            f'required><button type="submit" id="return-seat">Return the seat</button></form>'
            '<p class="note">To take back a floating license while seats are out, reclaim '
            'it with <a href="/flow?mode=reclaim">Reclaim</a> and tick "reclaim even while '
            'seats are out".</p>')
    return out


def routes(h: Screen, path: str) -> Mapping[str, Any]:
    """The screen's routes for ``path`` (none when it is not this screen's)."""
    site = h.server.site

    def show() -> Any:
        raw = (h.query().get("server") or [""])[0]
        index = _index(site, raw) if raw else None
        lst, error = None, ""
        if index is not None:
            try:
                with open_client(site.servers[index].url, site.timeout) as client:
                    lst = client.seat_list()
            except LicensingError as err:
                error = cli_line(err)
        return h.page("Seat pools", seats_page(site, index, lst, error, h.server.csrf),
                      "/seats")

    def give_back() -> Any:
        fields, files = h.form()
        raw = (fields.get("server") or [""])[0]
        index = _index(site, raw)

        def put() -> str:
            if len(files) != 1:
                raise UsageError("choose one seat token file")
            _f, name, token = files[0]
            if len(token) > MAX_TOKEN:
                raise MalformedError(f"{name}: {len(token)} bytes, more than the "
                                     f"{MAX_TOKEN}-byte limit of a seat token")
            with open_client(site.servers[index].url, site.timeout) as client:
                res = client.seat_return(token)
            return f"returned seat of {res.feature} for {res.client}"  # licadmin seat return

        return h.acted(f"/seats?server={index}", put)

    if path == "/seats":
        return {"GET": show, "HEAD": show}
    if path == "/seats/return":
        return {"POST": give_back}
    return {}

"""The site's servers for ``licadmin``: ``--server`` URLs, the servers file, whole MQTT sites."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from agent.rpc import TransportError
from apps.common import read_toml, write_output

__all__ = ["ServerRef", "close_servers", "load_servers", "servers_from", "unlisted",
           "write_servers"]


@dataclass(frozen=True)
class ServerRef:
    """One server of the site: its link URL and the name people know it by."""

    url: str
    name: str = ""
    #: the open :class:`hw.backends.mqtt.MqttSite` this device of a whole MQTT site is
    #: reached through (one broker session for the site), and its device ID
    via: Any = field(default=None, compare=False, repr=False)
    device: str = field(default="", compare=False, repr=False)

    @property
    def label(self) -> str:
        return self.name or self.url


SERVER_KEYS = {"url", "name"}


def load_servers(path: str) -> tuple[list[ServerRef], str | None]:
    """Read a site's server list: ``[[server]]`` tables with ``url`` and an optional ``name``.

    An optional top-level ``site = "NAME"`` names the site (the SITE_INFO ``site``).

    Raises:
        UsageError: unreadable file, bad TOML, a missing url, an unknown key, a URL twice.
    """
    doc = read_toml(path, "servers file")
    extra = set(doc) - {"server", "site"}
    if extra:
        raise UsageError(f"{path}: unknown key {', '.join(sorted(extra))} "
                         f"(a servers file holds site = \"NAME\" and [[server]] tables)")
    site = doc.get("site")
    if site is not None and not isinstance(site, str):
        raise UsageError(f"{path}: site must be text")
    tables = doc.get("server", [])
    if not isinstance(tables, list) or not tables:
        raise UsageError(f"{path}: no [[server]] tables (each with url = \"tcp://HOST:PORT\")")
    refs: list[ServerRef] = []
    for i, t in enumerate(tables, 1):
        if not isinstance(t, dict):
            raise UsageError(f"{path}: server {i} must be a [[server]] table")
        unknown = set(t) - SERVER_KEYS
        if unknown:
            raise UsageError(f"{path}: server {i} has unknown key {', '.join(sorted(unknown))} "
                             f"(it takes: name, url)")
        url, name = t.get("url"), t.get("name", "")
        if not isinstance(url, str) or not url:
            raise UsageError(f"{path}: server {i} has no url")
        if not isinstance(name, str):
            raise UsageError(f"{path}: server {i}: name must be text")
        refs.append(ServerRef(url, name))
    return _distinct(refs), site


def servers_from(urls: Sequence[str], servers_file: str | None,
                 timeout: float | None = None) -> tuple[list[ServerRef], str | None]:
    """The servers named by ``--server URL ...`` or ``--servers FILE.toml`` (not both).

    A whole MQTT site, ``mqtt://HOST:PORT/SITE`` (or ``mqtts://``), stands for every device
    that announced itself there (its retained presence), each as
    ``mqtt://HOST:PORT/SITE/DEVICE_ID`` with the same options; all of them are reached
    through one broker session (:class:`hw.backends.mqtt.MqttSite`), which
    :func:`close_servers` closes. ``timeout``: the total seconds allowed per server:
    a device whose presence is away (still reconnecting after a broker restart) is
    waited for that long, then reported; each try gets a share of it. A site that
    lists no device at all is a failure (exit 1), never an empty success.
    """
    if urls and servers_file:
        raise UsageError("give either --server URL ... or --servers FILE.toml, not both")
    if servers_file:
        refs, site = load_servers(servers_file)
        return _distinct(_expand_sites(refs, timeout)), site
    if not urls:
        raise UsageError("name the servers: --server URL [--server URL ...] or --servers FILE.toml")
    return _distinct(_expand_sites([ServerRef(u) for u in urls], timeout)), None


def _expand_sites(refs: list[ServerRef], timeout: float | None = None) -> list[ServerRef]:
    out: list[ServerRef] = []
    opened: list[Any] = []
    try:
        for r in refs:
            if not r.url.startswith(("mqtt://", "mqtts://")):
                out.append(r)
                continue
            from hw.link import parse_url

            u = parse_url(r.url)
            if len([p for p in u.path.split("/") if p]) != 1:
                out.append(r)  # already one device
                continue
            from hw.backends.mqtt import DEFAULT_TIMEOUT, MqttSite

            total = timeout or DEFAULT_TIMEOUT
            tries = 4
            site = MqttSite(r.url, timeout=max(total / tries, min(total, 0.5)), tries=tries,
                            presence_timeout=total)
            opened.append(site)
            base, _, query = r.url.partition("?")
            listed = site.devices()
            deadline = time.monotonic() + total
            while not listed and time.monotonic() < deadline:
                # none back yet (the broker just restarted?): wait up to the time allowed
                time.sleep(0.1)
                listed = site.devices()
            if not listed:
                raise TransportError(f"{r.url}: no device of the site has announced itself "
                                     f"on the broker within {total:g} s (no retained "
                                     f"presence): nothing to do there; is it the right site "
                                     f"name?")
            for device_id, model, _online in listed:
                url = f"{base.rstrip('/')}/{device_id}" + (f"?{query}" if query else "")
                out.append(ServerRef(url, f"{r.name or model} {device_id[:12]}", via=site,
                                     device=device_id))
    except BaseException:
        for site in opened:
            site.close()
        raise
    return out


def unlisted(servers: Sequence[ServerRef], device_ids: Iterable[str]) -> list[ServerRef]:
    """When ``servers`` are one whole MQTT site: its devices among ``device_ids`` that the
    site did not list (their presence not back yet, after a broker restart), each to be
    waited for up to the time allowed, then reported. Else nothing."""
    sites = {id(s.via) for s in servers}
    if not servers or len(sites) != 1 or servers[0].via is None:
        return []
    first = servers[0]
    known = {s.device for s in servers}
    base, _, query = first.url.partition("?")
    base = base.rsplit("/", 1)[0]
    return [ServerRef(f"{base}/{dev}" + (f"?{query}" if query else ""),
                      f"(not listed) {dev[:12]}", via=first.via, device=dev)
            for dev in sorted(set(device_ids) - known)]


def close_servers(servers: Iterable[ServerRef]) -> None:
    """Close the MQTT site sessions :func:`servers_from` opened."""
    for site in {id(s.via): s.via for s in servers if s.via is not None}.values():
        site.close()


def _distinct(refs: list[ServerRef]) -> list[ServerRef]:
    seen: set[str] = set()
    for r in refs:
        if r.url in seen:
            raise UsageError(f"server {r.url} is named twice")
        seen.add(r.url)
    return refs


def _toml_text(text: str) -> str:
    """A TOML basic string (JSON's escapes, minus what TOML lacks: no \\/)."""
    import json

    return json.dumps(text, ensure_ascii=False)


def write_servers(path: Path, servers: Sequence[ServerRef], site: str | None) -> None:
    """Write a servers file (:func:`load_servers` reads it back): the rest of an interrupted
    step. A device of a whole MQTT site is written by its own URL."""
    lines = ["# the servers not done when licadmin was interrupted (written by licadmin)"]
    if site is not None:
        lines.append(f"site = {_toml_text(site)}")
    for r in servers:
        lines += ["", "[[server]]", f"url = {_toml_text(r.url)}"]
        if r.name:
            lines.append(f"name = {_toml_text(r.name)}")
    write_output(str(path), ("\n".join(lines) + "\n").encode())

"""The site workflow of ``licadmin``: gather, license-info, requests, upload, send, confirm.

Each step that talks to servers runs one job per server on a bounded thread
pool; a server that fails is listed with its exit class and the others go on
(:func:`each_server`). Files are written atomically as soon as each server's
answer arrives, so a step interrupted half-way keeps everything already done,
and rerunning it finishes the rest: a server answers a response it already
applied with the same receipt.

Exit codes are ``licagent``'s; :data:`EXIT_PARTIAL` (10) says some servers
(or files) failed and others succeeded. When every attempted one failed, the
exit code is the first failure's (in the order the servers were given).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

import hw
from agent.errors import EXIT_OK, LicensingError, MalformedError, TrustError, UsageError
from agent.formats import LICENSE_INFO_MAX, SITE_INFO_MAX, SiteInfo, peek_payload, read_device_info
from agent.messages import Action, LicenseInfo, Receipt, Request, Response
from agent.protocol import self_signed_payload
from agent.rpc import PROTOCOL_VERSIONS, Op
from apps.common import read_input, read_toml
from apps.licadmin.files import (
    SUFFIX,
    device_file,
    ensure_dir,
    features_text,
    now,
    per_device_dir,
    read_device_files,
    short,
    write_file,
)
from hw.link import ServerClient

__all__ = [
    "EXIT_PARTIAL",
    "Console",
    "Licensing",
    "OneGo",
    "Outcome",
    "ServerRef",
    "StepResult",
    "close_servers",
    "confirm",
    "connector",
    "each_server",
    "exit_code",
    "gather",
    "license_info",
    "licensing_client",
    "load_servers",
    "make_requests",
    "outcome_line",
    "send",
    "servers_from",
    "table",
    "upload",
]

#: some servers or files failed, the others succeeded (see README, exit codes)
EXIT_PARTIAL = 10
DEFAULT_JOBS = 8
MAX_JOBS = 64

OK, FAILED, SKIPPED = "ok", "failed", "skipped"
#: the steps that talk to the licensing server
ONLINE = frozenset({"license-info", "upload", "confirm"})


# ---------------------------------------------------------------- servers


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
    :func:`close_servers` closes. ``timeout``: seconds per try on those sessions.
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

            site = MqttSite(r.url, timeout=timeout or DEFAULT_TIMEOUT)
            opened.append(site)
            base, _, query = r.url.partition("?")
            for device_id, model, _online in site.devices():
                url = f"{base.rstrip('/')}/{device_id}" + (f"?{query}" if query else "")
                out.append(ServerRef(url, f"{r.name or model} {device_id[:12]}", via=site,
                                     device=device_id))
    except BaseException:
        for site in opened:
            site.close()
        raise
    return out


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


# ---------------------------------------------------------------- outcomes


@dataclass(eq=False)
class Outcome:
    """What happened with one server (or one file) in one step."""

    who: str
    url: str | None = None
    status: str = OK
    device_id: str | None = None
    detail: str = ""
    code: int = EXIT_OK
    reason: str = ""
    data: bytes | None = field(default=None, repr=False)
    result: str = "ok"  # the word in the result table: ok, applied, already applied, ...

    def fail(self, err: LicensingError) -> None:
        self.status, self.code, self.reason = FAILED, err.exit_code, err.reason
        self.detail, self.result = str(err), "FAILED"

    def skip(self, why: str) -> None:
        self.status, self.detail, self.result = SKIPPED, why, "skipped"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"server": self.who, "status": self.status,
                             "device_id": self.device_id, "detail": self.detail}
        if self.url is not None and self.url != self.who:
            d["url"] = self.url
        if self.status == FAILED:
            d["code"], d["reason"] = self.code, self.reason
        return d


def exit_code(outcomes: Iterable[Outcome]) -> int:
    """0 when nothing failed; the first failure's code when all tried failed; else partial."""
    tried = [o for o in outcomes if o.status != SKIPPED]
    failed = [o for o in tried if o.status == FAILED]
    if not failed:
        return EXIT_OK
    if len(failed) == len(tried):
        return failed[0].code
    return EXIT_PARTIAL


@dataclass
class StepResult:
    """One step's outcomes and the lines and facts a summary needs."""

    command: str
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @property
    def code(self) -> int:
        return exit_code(self.outcomes)

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "exit_code": self.code, **self.facts,
                "results": [o.to_json() for o in self.outcomes], "notes": self.notes}


# ---------------------------------------------------------------- output


class Console:
    """Where a step talks: a progress bar on a terminal, plain lines otherwise, nothing in --json.

    Args:
        stream: usually sys.stdout.
        quiet: --json: the caller prints one JSON document instead.
        tty: force the terminal mode (default: ``stream.isatty()``).
    """

    BAR = 30

    def __init__(self, stream: TextIO | None = None, quiet: bool = False,
                 tty: bool | None = None) -> None:
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self._lock = threading.Lock()
        self._bar: tuple[str, int, int] | None = None

    def line(self, text: str) -> None:
        if self.quiet:
            return
        with self._lock:
            self._clear()
            print(text, file=self.stream)
            self._draw()
            self.stream.flush()

    @contextmanager
    def progress(self, title: str, total: int) -> Iterator[Callable[[Outcome], None]]:
        """A callback to report each finished server; a bar while it runs on a terminal."""
        if self.tty and not self.quiet:
            with self._lock:
                self._bar = (title, 0, total)
                self._draw()
                self.stream.flush()

        def done(o: Outcome) -> None:
            if self.quiet:
                return
            with self._lock:
                if self._bar is not None:
                    t, n, tot = self._bar
                    self._bar = (t, n + 1, tot)
                if not self.tty or o.status == FAILED:
                    self._clear()
                    print(outcome_line(o), file=self.stream)
                self._draw()
                self.stream.flush()

        try:
            yield done
        finally:
            with self._lock:
                if self._bar is not None:
                    self._bar = None
                    print(file=self.stream)
                    self.stream.flush()

    def _clear(self) -> None:
        if self._bar is not None:
            self.stream.write("\r\x1b[K")

    def _draw(self) -> None:
        if self._bar is None:
            return
        title, n, total = self._bar
        filled = self.BAR * n // max(total, 1)
        self.stream.write(f"\r{title} [{'#' * filled}{'.' * (self.BAR - filled)}] {n}/{total}")


def outcome_line(o: Outcome) -> str:
    word = {OK: "ok", FAILED: "FAILED", SKIPPED: "skipped"}[o.status]
    dev = f" device {short(o.device_id)}" if o.device_id else ""
    why = f" {o.reason}:" if o.status == FAILED else ""
    return f"{word:<7} {o.who}{dev}:{why} {o.detail}".rstrip()


def table(outcomes: Sequence[Outcome]) -> list[str]:
    """The per-server result table at the end of ``send`` (and of the one-go commands)."""
    rows = [("SERVER", "DEVICE", "RESULT", "DETAIL")]
    for o in outcomes:
        detail = f"{o.reason}: {o.detail}" if o.status == FAILED else o.detail
        rows.append((o.who, short(o.device_id), o.result, detail))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}".rstrip() for r in rows]


# ---------------------------------------------------------------- running per server

Connect = Callable[[str], ServerClient]
ServerJob = Callable[[ServerClient, Outcome], None]


def connector(timeout: float) -> Connect:
    def connect(url: str) -> ServerClient:
        client: ServerClient = hw.connect(url, timeout=timeout)
        return client
    return connect


def each_server(servers: Sequence[ServerRef], job: ServerJob, connect: Connect,
                console: Console, title: str, jobs: int = DEFAULT_JOBS) -> list[Outcome]:
    """Run ``job`` for every server on at most ``jobs`` threads; outcomes in server order.

    A job reports through the :class:`Outcome` it is given; any exception it
    raises marks that server failed and never stops the others.
    """
    outcomes = [Outcome(s.label, s.url) for s in servers]

    def run(i: int) -> Outcome:
        o, ref = outcomes[i], servers[i]
        try:
            with (ref.via.client(ref.device) if ref.via is not None
                  else connect(ref.url)) as client:
                job(client, o)
        except LicensingError as err:
            o.fail(err)
        except Exception as err:  # a broken backend fails this server only, with its story
            o.fail(LicensingError(f"{type(err).__name__}: {err}"))
        return o

    workers = max(1, min(jobs, len(servers), MAX_JOBS))
    if any(s.via is not None for s in servers):
        # devices of an MQTT site share one broker session: many requests in flight
        # cost no connection each, so they go SITE_WINDOW at a time
        from hw.backends.mqtt import SITE_WINDOW

        workers = max(workers, min(len(servers), SITE_WINDOW))
    with console.progress(title, len(servers)) as done, \
            ThreadPoolExecutor(max_workers=workers,
                               thread_name_prefix="licadmin") as pool:
        futures = [pool.submit(run, i) for i in range(len(servers))]
        for fut in as_completed(futures):
            done(fut.result())
    return outcomes


def device_id_of(client: ServerClient) -> str:
    """Which device answers on this link (``hello``; ``status`` if hello does not say)."""
    hello = client.call(Op.HELLO, {"versions": list(PROTOCOL_VERSIONS)})
    dev = hello.get("device_id") if isinstance(hello, dict) else None
    if not isinstance(dev, str):
        dev = client.status().get("device_id")
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


# ---------------------------------------------------------------- step 2: license-info


class Licensing(Protocol):
    """What the workflow asks the licensing server (apps.licensing_client)."""

    def license_info(self, site_info: bytes, devices: Sequence[str] | None = None) -> bytes: ...
    def license_info_files(self, site_info: bytes, devices: Sequence[str] | None = None
                           ) -> tuple[bytes, dict[str, bytes]]: ...
    def upload(self, requests: Sequence[bytes], receipts: Sequence[bytes] = ()) -> Any: ...
    def confirm(self, receipts: Sequence[bytes]) -> Any: ...
    def assign(self, entitlement: str, device: str, feature: str, count: int) -> Any: ...


def licensing_client(url: str) -> Licensing:
    from apps.licensing_client import LicensingClient

    client: Licensing = LicensingClient(url)
    return client


def license_info(site_info: str, devices: Sequence[str], out: str,
                 licensing: Licensing) -> StepResult:
    """Have the licensing server answer, for the gathered servers, what to reclaim and install."""
    if not Path(out).absolute().parent.is_dir():
        raise UsageError(f"cannot write {out}: its folder does not exist")
    data = read_input(site_info, SITE_INFO_MAX)
    bundle = SiteInfo.decode(data)
    known = set()
    for d in bundle.devices:
        try:
            known.add(read_device_info(d).device_id)
        except LicensingError:
            continue  # the licensing server lists it; we only check --device names here
    unknown = [d for d in devices if d not in known]
    if unknown:
        raise UsageError(f"--device {', '.join(short(d) for d in unknown)}: not in {site_info} "
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
        res.notes.append(f"device {short(e.device_id)}: reclaim {features_text(e.reclaim)}; "
                         f"install {features_text(e.install)}")
        entries.append({"device_id": e.device_id,
                        "reclaim": [x.to_cbor() for x in e.reclaim],
                        "install": [x.to_cbor() for x in e.install]})
    res.notes.append(f"wrote license information for {len(info.entries)} server(s) to {out}, "
                     f"and each server's own to {folder}")
    res.facts = {"out": out, "per_device": str(folder), "entries": entries,
                 "expires": info.expires}
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
    data = read_input(license_info_file, LICENSE_INFO_MAX)
    info, _kid = peek_payload(data, LicenseInfo, LICENSE_INFO_MAX)
    folder = ensure_dir(out_dir)
    own_dir = per_device_dir(license_info_file)

    def own_file(dev: str) -> bytes:
        """The server's own license information if step 2 wrote it, else the site's."""
        path = device_file(own_dir, dev, "license-info")
        if not path.is_file():
            return data
        one = read_input(str(path), LICENSE_INFO_MAX)
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
            installed = {x["feature"] for x in client.status()["licenses"]}
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
        files = [(p, d) for p, d in files if p.name.removesuffix(".req") in devices]
    if not files:
        raise UsageError(f"no request files (*.req) in {requests_dir}")
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
        if path.name == f"{payload.device_id}.req":
            o.who = "request"  # the device column says whose
        by_key[payload.device_id] = by_key[f"#{len(reqs)}"] = o
        reqs.append(data)
    answer = licensing.upload(reqs, [d for _p, d in rc_files]) if reqs else {}
    for dev, resp in dict(answer.get("responses", {})).items():
        o = by_key.get(dev) or Outcome(f"(device {short(dev)})", device_id=dev)
        if o not in res.outcomes:
            res.outcomes.append(o)
        try:
            filed, _kid = peek_payload(bytes(resp), Response)
            if filed.device_id != dev:
                raise MalformedError(f"the licensing server filed a response of device "
                                     f"{short(filed.device_id)} under {short(dev)}")
        except LicensingError as err:
            o.fail(err)
            continue
        path = device_file(folder, dev, "response")
        write_file(path, bytes(resp))
        o.result = "answered"
        o.detail = (f"response: sequence {filed.base_sequence} -> {filed.sequence}: "
                    f"{_changes(filed)}")
    for key, refusal in dict(answer.get("errors", {})).items():
        o = by_key.get(key) or Outcome(str(key))
        if o not in res.outcomes:
            res.outcomes.append(o)
        o.status, o.code = FAILED, int(refusal.get("code", 1))
        o.reason, o.detail = str(refusal.get("reason", "failure")), str(refusal.get("message", ""))
        o.result = "FAILED"
    for o in res.outcomes:
        if o.status == OK and o.result == "ok":
            o.fail(LicensingError("the licensing server gave no answer for this request"))
    n = sum(1 for o in res.outcomes if o.status == OK)
    if rc_files:
        verdicts = _receipt_outcomes(answer.get("receipts"), rc_files)
        res.outcomes += verdicts
    for o in res.outcomes:
        console.line(outcome_line(o))
    if rc_files:
        res.notes.append(f"{len(rc_files)} receipt(s) from {rc_dir} rode along: "
                         + _verdict_counts(verdicts))
    res.notes.append(f"wrote {n} response(s) to {folder}")
    res.facts = {"out_dir": str(folder), "responses": n,
                 "receipts_dir": str(rc_dir) if rc_dir else None}
    return res


def _changes(resp: Response) -> str:
    return ", ".join(f"{c.op.value} {c.feature}" + (f"={c.count}" if c.op.value != "remove" else "")
                     for c in resp.changes) or "no changes"


def _receipt_outcomes(answer: Any, files: Sequence[tuple[Path, bytes]]) -> list[Outcome]:
    """The licensing server's verdict on each receipt (riding along with upload, or confirm).

    A receipt the ledger accepted before (reason ``replay``) is no failure:
    receipts stay in their folder and ride along again until someone removes them.
    """
    answer = answer if isinstance(answer, dict) else {}
    out = []
    for a in answer.get("accepted", []):
        o = Outcome("receipt", device_id=a.get("device_id"))
        o.result = "confirmed"
        o.detail = f"sequence {a.get('sequence')}: freed {features_text(a.get('freed', []))}"
        out.append(o)
    for r in answer.get("refused", []):
        idx = r.get("index")
        name = files[idx][0].name if isinstance(idx, int) and 0 <= idx < len(files) else f"#{idx}"
        o = Outcome(name)
        if r.get("reason") == "replay":
            o.result, o.detail = "already confirmed", str(r.get("message", ""))
        else:
            o.status, o.code = FAILED, int(r.get("code", 1))
            o.reason, o.detail = str(r.get("reason", "failure")), str(r.get("message", ""))
            o.result = "refused"
        out.append(o)
    return out


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
        if path.name != f"{dev}.resp":
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
        receipt = bytes(answer["receipt"])
        payload, _key = self_signed_payload(receipt, Receipt)
        if payload.device_id != dev:
            raise TrustError(f"the server returned a receipt of device {short(payload.device_id)}")
        write_file(device_file(folder, dev, "receipt"), receipt)
        if answer.get("already_applied"):
            o.result = "already applied"
            o.detail = f"sequence {answer['sequence']}; receipt written again"
        else:
            o.result = "applied"
            o.detail = (f"sequence {answer['base_sequence']} -> {answer['sequence']}: "
                        f"{', '.join(answer['changes']) or 'no changes'}")
        if answer.get("warning"):
            o.detail += f" (warning: {answer['warning']})"

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
        console.line(outcome_line(o))
    res.notes.append(f"{len(files)} receipt(s) from {receipts_dir}: "
                     + _verdict_counts(res.outcomes))
    res.facts = {"receipts": len(files)}
    return res


def _verdict_counts(outcomes: Sequence[Outcome]) -> str:
    words = ("confirmed", "already confirmed", "refused")
    counts = {w: sum(1 for o in outcomes if o.result == w) for w in words}
    return ", ".join(f"{n} {w}" for w, n in counts.items() if n) or "no verdict"


# ---------------------------------------------------------------- steps 1-6 in one go


@dataclass
class OneGo:
    """The ``activate`` / ``reclaim`` commands: the six steps with the office online."""

    servers: Sequence[ServerRef]
    licensing: Licensing
    connect: Connect
    console: Console
    mode: str
    features: Sequence[str] = ()
    work_dir: str | None = None
    jobs: int = DEFAULT_JOBS
    steps: list[StepResult] = field(default_factory=list)
    _current: str = "gather"

    def run(self) -> tuple[int, Path, bool]:
        """Returns the exit code, the work folder, and whether it was kept."""
        if self.work_dir:
            work, temporary = ensure_dir(self.work_dir), False
        else:
            work, temporary = Path(tempfile.mkdtemp(prefix="licadmin-")), True
        try:
            code = self._steps(work)
        except LicensingError as err:
            # a whole step failed (the licensing server unreachable, a usage error): say
            # which, keep the folder, and exit with that failure's code
            failed = StepResult(self._current)
            o = Outcome("licensing server" if self._current in ONLINE else self._current)
            o.fail(err)
            failed.outcomes.append(o)
            self.steps.append(failed)
            self.console.line(f"FAILED  {o.who}: {err.reason}: {err}")
            code = err.exit_code
        kept = not (temporary and code == EXIT_OK)
        if not kept:
            shutil.rmtree(work, ignore_errors=True)
        return code, work, kept

    def _say(self, n: int, command: str, text: str) -> None:
        self._current = command
        self.console.line(f"== step {n}/6: {text}")

    def _report(self, res: StepResult, with_table: bool = False) -> None:
        self.steps.append(res)
        if with_table:
            for line in table(res.outcomes):
                self.console.line(line)
        for n in res.notes:
            self.console.line(n)

    def failures(self) -> list[str]:
        """Every failure of every step, one line each, for the end of the output."""
        return [f"{s.command}: {o.who}: {o.reason}: {o.detail}"
                for s in self.steps for o in s.outcomes if o.status == FAILED]

    def _steps(self, work: Path) -> int:
        self._say(1, "gather", "gather server information")
        g = gather(self.servers, str(work / "site-info.cbor"), None, self.connect,
                   self.console, self.jobs)
        self._report(g)
        if not g.facts["devices"]:
            return g.code
        self._say(2, "license-info", "download license information")
        li = license_info(str(work / "site-info.cbor"), [], str(work / "license-info.cbor"),
                          self.licensing)
        self._report(li)
        gathered = {o.url for o in g.outcomes if o.status == OK}
        here = [s for s in self.servers if s.url in gathered]
        self._say(3, "requests", "create the request files")
        rq = make_requests(here, str(work / "license-info.cbor"), str(work / "requests"),
                           self.connect, self.console, self.jobs, self.mode, self.features)
        self._report(rq)
        if not rq.facts["requests"]:
            return self._final()
        self._say(4, "upload", "upload the request files")
        made = {o.device_id for o in rq.outcomes if o.status == OK and o.device_id}
        up = upload(str(work / "requests"), str(work / "responses"), None, self.licensing,
                    self.console, made)
        self._report(up)
        self._say(5, "send", "send the response files")
        answered = {o.device_id for o in up.outcomes if o.result == "answered"}
        targets = [s for s, o in zip(here, rq.outcomes, strict=True) if o.device_id in answered]
        sd = send(targets, str(work / "responses"), str(work / "receipts"), self.connect,
                  self.console, self.jobs)
        self._report(sd, with_table=True)
        self._say(6, "confirm", "confirm")
        cf = confirm(str(work / "receipts"), self.licensing, self.console)
        self._report(cf)
        return self._final()

    def _final(self) -> int:
        codes = [s.code for s in self.steps]
        if all(c == EXIT_OK for c in codes):
            return EXIT_OK
        succeeded = any(o.status == OK for s in self.steps for o in s.outcomes)
        if succeeded:
            return EXIT_PARTIAL
        return next(c for c in codes if c != EXIT_OK)

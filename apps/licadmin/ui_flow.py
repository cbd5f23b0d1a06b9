"""The state behind ``licadmin ui``: the site's servers, the guided flow's folder, the running job.

Nothing here is a second implementation of a step: every step calls the function the
command line calls (:mod:`apps.licadmin.onsite`, :mod:`apps.licadmin.online`), with the
same files in the same work folder layout as ``licadmin activate --work-dir`` (SITE_INFO,
license information, ``requests/``, ``responses/``, ``receipts/``). What the browser shows
of a flow is read back from that folder and its ``flow.json`` (the choices and each
step's outcome table, written atomically after each step), so a browser refresh, or
``licadmin ui`` started again, carries on where the flow stood.
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from agent.errors import LicensingError, MalformedError, UsageError
from agent.formats import DEVICE_FILE_MAX, LICENSE_INFO_MAX, expect_kind, peek_payload
from agent.messages import LicenseInfo, Response
from agent.rpc import Op
from apps.common import one_line, write_output
from apps.licadmin import online, onsite, tree
from apps.licadmin.console import Console
from apps.licadmin.files import SUFFIX, device_file, ensure_dir, per_device_dir, short
from apps.licadmin.inventory import ServerRef
from apps.licadmin.outcome import FAILED, NOT_DONE, OK, Outcome, StepResult, summary_lines
from apps.licadmin.runner import (
    DEFAULT_JOBS,
    DEFAULT_TIMEOUT,
    Stop,
    connector,
    each_server,
    open_client,
)

__all__ = ["ONLINE", "STEPS", "TITLES", "Flow", "Job", "Site", "cli_line"]

PROG = "licadmin"
#: the guided flow, in order (the six steps of the command line)
STEPS = ("gather", "license-info", "requests", "upload", "send", "confirm")
TITLES = {"gather": "Gather server information", "license-info": "Download license information",
          "requests": "Create request files", "upload": "Upload requests",
          "send": "Send responses", "confirm": "Confirm"}
#: the steps that talk to the licensing server (else their file hop is done by hand)
ONLINE = frozenset({"license-info", "upload", "confirm"})
MODES = ("activate", "reclaim")
#: the files of a flow a browser may download, by folder
FOLDERS = {"requests": "request", "responses": "response", "receipts": "receipt"}
_FILE_NAME = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,127}")


def cli_line(err: LicensingError) -> str:
    """The one line the command line prints for ``err`` (``licadmin: REASON: MESSAGE``)."""
    return f"{PROG}: {err.reason}: {one_line(str(err))}"


@dataclass
class Job:
    """What the browser shows while a step (or a reading of the servers) runs."""

    title: str
    total: int = 0
    done: int = 0
    running: bool = True
    lines: list[str] = field(default_factory=list)
    stop: Stop = field(default_factory=lambda: Stop(stream=-1))


class UiConsole(Console):
    """The step's :class:`Console`, counting finished servers for the progress bar."""

    def __init__(self, job: Job) -> None:
        super().__init__(quiet=False, tty=False, verbose=False)
        self.job = job

    def line(self, text: str) -> None:
        self.job.lines.append(text)

    @contextmanager
    def progress(self, title: str, total: int) -> Iterator[Callable[[Outcome], None]]:
        self.job.title, self.job.total, self.job.done = title, total, 0

        def done(_o: Outcome) -> None:
            self.job.done += 1

        yield done


@dataclass
class ServerView:
    """One server as the Servers screen shows it (read with get-status)."""

    ref: ServerRef
    reachable: bool | None = None
    status: Any = None
    error: str = ""
    #: its get-tree answer (issue 14), None when it could not say
    tree: dict[str, Any] | None = None


def rows_of(res: StepResult) -> list[dict[str, Any]]:
    """A step's per-server outcome table, as stored in flow.json and shown."""
    rows = []
    for o in res.outcomes:
        detail = f"{o.reason}: {o.detail}" if o.status == FAILED else o.detail
        rows.append({"server": o.who, "device_id": o.device_id, "status": o.status,
                     "result": o.result, "detail": one_line(detail), "code": o.code})
    return rows


class Site:
    """The servers of ``--servers FILE.toml``, the licensing server, and the one running job."""

    def __init__(self, servers: Sequence[ServerRef], site: str | None,
                 licensing: online.Licensing | None, work: Path,
                 timeout: float = DEFAULT_TIMEOUT, jobs: int = DEFAULT_JOBS) -> None:
        self.servers = list(servers)
        self.site = site
        self.licensing = licensing
        self.work = work
        self.timeout = timeout
        self.jobs = jobs
        self.views: list[ServerView] | None = None
        #: the system under each server of the site that has servers under it (issue 14):
        #: (its index, :func:`apps.licadmin.tree.collect`'s answer), read with the servers
        self.systems: list[tuple[int, dict[str, Any]]] = []
        self.job: Job | None = None
        #: the line of a job that failed on a bug (its traceback is in the log)
        self.failure: str | None = None
        self._lock = threading.Lock()
        #: per request thread: the job as the page being built shows it (:meth:`one_view`)
        self._view = threading.local()

    def log(self, text: str) -> None:
        """The UI log (licadmin ui's standard error)."""
        print(text, file=sys.stderr, flush=True)

    @property
    def flow(self) -> Flow:
        return Flow(self.work / "flow")

    # ------------------------------------------------------------ jobs

    def busy(self) -> bool:
        """Whether a job runs, as the page being built shows it (see :meth:`one_view`)."""
        job = self.shown_job()
        return job is not None and job.running

    def _running(self) -> bool:
        """Whether a job runs now (not the page's snapshot)."""
        return self.job is not None and self.job.running

    def shown_job(self) -> Job | None:
        """The job as the page being built in this thread shows it: the snapshot
        :meth:`one_view` took, or the job itself outside a page."""
        job: Job | None = getattr(self._view, "job", self.job)
        return job

    @contextmanager
    def one_view(self) -> Iterator[None]:
        """Build one page from one snapshot of the job: the screen's body and the page's
        frame (progress, refresh) read the same state, so a job that ends while the page
        is built cannot give a body of a running job in the frame of a finished one (no
        refresh, no Done line) or the reverse."""
        self._view.job = self._snapshot(self.job)
        try:
            yield
        finally:
            del self._view.job

    @staticmethod
    def _snapshot(job: Job | None) -> Job | None:
        return None if job is None else replace(job, lines=list(job.lines))

    def start(self, title: str, work: Callable[[Job], None]) -> None:
        """Run ``work`` in a thread as the one job; refused while another runs."""
        with self._lock:
            if self._running():
                assert self.job is not None
                raise UsageError(f"{self.job.title} is still running: wait for it to finish "
                                 f"(this page shows its progress)")
            job = self.job = Job(title)
            if hasattr(self._view, "job"):  # started by a page: the page shows it running
                self._view.job = self._snapshot(job)

        def run() -> None:
            try:
                work(job)
            except Exception:  # a bug: its traceback to the log, one line to the browser
                self.log(f"internal error in {title}:\n{traceback.format_exc().rstrip()}")
                self.failure = (f"{PROG}: internal: internal error in licadmin ui while "
                                f"{title}; see its log")
            finally:
                job.running = False

        threading.Thread(target=run, name="licadmin-ui-job", daemon=True).start()

    def wait(self, timeout: float) -> bool:
        """Wait for the job to finish (tests, screenshots); whether it did."""
        deadline = time.monotonic() + timeout
        while self._running() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._running()

    # ------------------------------------------------------------ the Servers screen

    def read_servers(self) -> None:
        """get-status on every server, as a job (the Servers and Show Licenses screens)."""
        views = [ServerView(r) for r in self.servers]
        by_url = {v.ref.url: v for v in views}

        def job(client: Any, o: Outcome) -> None:
            st = client.status()
            o.device_id = st.device_id
            by_url[o.url or ""].status = st
            try:
                by_url[o.url or ""].tree = client.typed(Op.GET_TREE).to_wire()
            except LicensingError:
                pass  # a server that keeps no tree: no system shown for it

        def work(j: Job) -> None:
            outs = each_server(self.servers, job, connector(self.timeout), UiConsole(j),
                               "reading the servers", self.jobs, j.stop, self.timeout)
            for o in outs:
                v = by_url[o.url or ""]
                v.reachable = o.status == OK
                if o.status != OK:
                    v.error = one_line(f"{o.reason}: {o.detail}")
            self.systems = self._systems(views)
            self.views = views

        self.start("reading the servers", work)

    def _systems(self, views: Sequence[ServerView]) -> list[tuple[int, dict[str, Any]]]:
        """The system under each server with servers under it whose own parent is not a
        server of the site (that one's system shows it), as ``licadmin tree`` shows it."""
        ids = {v.tree["device_id"] for v in views if v.tree is not None}

        def ask(url: str) -> dict[str, Any] | None:
            try:
                with open_client(url, self.timeout) as c:
                    answer: dict[str, Any] = c.typed(Op.GET_TREE).to_wire()
                    return answer
            except LicensingError:
                return None

        return [(k, tree.collect(v.tree, ask)) for k, v in enumerate(views)
                if v.tree is not None and v.tree.get("children")
                and v.tree.get("parent") not in ids]

    # ------------------------------------------------------------ the guided flow

    def new_flow(self, mode: str, urls: Sequence[str], features: Sequence[str],
                 force: bool = False) -> None:
        if mode not in MODES:
            raise UsageError(f"unknown flow {mode!r}: choose activate or reclaim")
        known = {s.url for s in self.servers}
        chosen = [u for u in urls if u in known]
        if not chosen or len(chosen) != len(urls):
            raise UsageError("select at least one server of the site")
        feats = [f for f in (x.strip() for x in features) if f]
        self.flow.begin(mode, chosen, feats, force and mode == "reclaim")

    def run_step(self, step: str, allow_reclaim: bool = False) -> None:
        """Start ``step`` of the current flow as the job (the command line's function)."""
        flow = self.flow
        state = flow.state()
        if state is None:
            raise UsageError("no flow started: choose the servers first")
        if step not in STEPS:
            raise UsageError(f"no such step {step!r}")
        if step in ONLINE and self.licensing is None:
            raise UsageError(f"{TITLES[step].lower()} needs the licensing server: start "
                             f"licadmin ui with --licensing-server URL, or carry the files "
                             f"by hand (below)")
        if step == "requests" and state["mode"] == "activate" and not allow_reclaim:
            reclaims = flow.planned_reclaims()
            if reclaims:
                raise UsageError(
                    f"activate would reclaim installed licenses from {len(reclaims)} "
                    f"server(s) (listed above) that you did not ask to reclaim: nothing was "
                    f"changed; tick \"allow these reclaims\" to allow it")
        servers = flow.servers(self.servers, step)
        title = f"step {STEPS.index(step) + 1}/6: {TITLES[step].lower()}"

        def work(job: Job) -> None:
            console = UiConsole(job)
            try:
                res = self._step(step, flow, state, servers, console, job.stop)
            except LicensingError as err:
                flow.record(step, {"error": cli_line(err), "code": err.exit_code})
                return
            flow.record(step, {"code": res.code, "rows": rows_of(res),
                               "summary": summary_lines(step, res.outcomes) if res.outcomes
                               else [], "notes": [one_line(n) for n in res.notes],
                               "details": [one_line(d) for d in res.details]})

        self.start(title, work)

    def _step(self, step: str, flow: Flow, state: dict[str, Any], servers: list[ServerRef],
              console: Console, stop: Stop) -> StepResult:
        w = flow.folder
        connect = connector(self.timeout)
        if step == "gather":
            return onsite.gather(servers, str(w / "site-info.cbor"), self.site, connect,
                                 console, self.jobs, stop, self.timeout)
        if step == "license-info":
            assert self.licensing is not None
            return online.license_info(str(w / "site-info.cbor"), [],
                                       str(w / "license-info.cbor"), self.licensing)
        if step == "requests":
            return onsite.make_requests(servers, str(w / "license-info.cbor"),
                                        str(w / "requests"), connect, console, self.jobs,
                                        state["mode"], state["features"], stop, self.timeout,
                                        force=bool(state.get("force")))
        if step == "upload":
            assert self.licensing is not None
            return online.upload(str(w / "requests"), str(w / "responses"), None,
                                 self.licensing, console)
        if step == "send":
            return onsite.send(servers, str(w / "responses"), str(w / "receipts"), connect,
                               console, self.jobs, stop, self.timeout)
        assert self.licensing is not None
        return online.confirm(str(w / "receipts"), self.licensing, console)


class Flow:
    """One guided flow's folder: the command line's files and ``flow.json``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.state_file = folder / "flow.json"

    def state(self) -> dict[str, Any] | None:
        try:
            data = self.state_file.read_bytes()
        except FileNotFoundError:
            return None
        try:
            d = json.loads(data)
        except ValueError as exc:
            raise MalformedError(f"{self.state_file} is not the JSON licadmin ui wrote: "
                                 f"{exc}") from exc
        if not isinstance(d, dict) or d.get("mode") not in MODES:
            raise MalformedError(f"{self.state_file} is not a flow licadmin ui wrote")
        return d

    def _save(self, d: dict[str, Any]) -> None:
        write_output(str(self.state_file), (json.dumps(d, indent=1) + "\n").encode())

    def begin(self, mode: str, urls: Sequence[str], features: Sequence[str],
              force: bool = False) -> None:
        """A new flow; the files of an earlier one are kept beside it, never deleted."""
        if self.folder.exists():
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            old = self.folder.with_name(f"flow-{stamp}")
            n = 1
            while old.exists():
                n += 1
                old = self.folder.with_name(f"flow-{stamp}-{n}")
            self.folder.rename(old)
        ensure_dir(self.folder.parent)
        ensure_dir(self.folder)
        self._save({"mode": mode, "servers": list(urls), "features": list(features),
                    "force": force, "results": {}})

    def record(self, step: str, result: dict[str, Any]) -> None:
        d = self.state() or {}
        d.setdefault("results", {})[step] = result
        self._save(d)

    def servers(self, all_servers: Sequence[ServerRef], step: str) -> list[ServerRef]:
        """The selected servers; from step 3 on, those whose information was gathered."""
        d = self.state() or {}
        chosen = set(d.get("servers", []))
        refs = [s for s in all_servers if s.url in chosen]
        gathered = d.get("results", {}).get("gather", {}).get("rows")
        if step in ("requests", "send") and gathered:
            ok = {r["server"] for r in gathered if r["status"] == OK}
            refs = [s for s in refs if s.label in ok]
        return refs

    def files(self, folder: str) -> list[str]:
        p = self.folder / folder
        if not p.is_dir():
            return []
        suffix = SUFFIX[FOLDERS[folder]]
        return sorted(f.name for f in p.iterdir()
                      if f.name.endswith(suffix) and not f.name.startswith("."))

    def file_path(self, rel: str) -> Path:
        """A file of the flow a browser may download; anything else is refused."""
        parts = rel.split("/")
        if len(parts) == 1 and parts[0] in ("site-info.cbor", "license-info.cbor"):
            return self.folder / parts[0]
        if (len(parts) == 2 and parts[0] in FOLDERS and _FILE_NAME.fullmatch(parts[1])
                and parts[1] in self.files(parts[0])):
            return self.folder / parts[0] / parts[1]
        raise UsageError(f"no such file of the flow: {one_line(rel)}")

    def planned_reclaims(self) -> list[str]:
        """The devices whose entry in the license information lists licenses to reclaim."""
        path = self.folder / "license-info.cbor"
        if not path.is_file():
            return []
        info, _kid = peek_payload(path.read_bytes()[:LICENSE_INFO_MAX + 1], LicenseInfo,
                                  LICENSE_INFO_MAX)
        return [e.device_id for e in info.entries if e.reclaim]

    # ------------------------------------------------------------ files carried by hand

    def put_license_info(self, name: str, data: bytes) -> str:
        """The license information got elsewhere (``licadmin license-info`` on a computer
        that is online): checked as step 3 reads it, then written as step 2 would."""
        expect_kind(data, "license-info", name)
        info, _kid = peek_payload(data, LicenseInfo, LICENSE_INFO_MAX)
        if not self.state_file.is_file():
            raise UsageError("no flow started: choose the servers first")
        own = per_device_dir(self.folder / "license-info.cbor")
        if own.is_dir():  # never hand a server a file of an earlier run
            for old in own.glob("*" + SUFFIX["license-info"]):
                old.unlink()
        write_output(str(self.folder / "license-info.cbor"), data)
        self.record("license-info", {"code": 0, "rows": [], "summary": [], "details": [],
                                     "notes": [f"{one_line(name)}: license information for "
                                               f"{len(info.entries)} server(s) uploaded"]})
        return f"license information for {len(info.entries)} server(s) taken from {name}"

    def put_responses(self, files: Sequence[tuple[str, bytes]]) -> str:
        """Response files got elsewhere (``licadmin upload``): each checked for its kind and
        filed under the device its signed payload names, as step 4 would."""
        if not self.state_file.is_file():
            raise UsageError("no flow started: choose the servers first")
        if not files:
            raise UsageError("choose one or more response files")
        checked: list[tuple[str, bytes]] = []
        for name, data in files:
            if len(data) > DEVICE_FILE_MAX:
                raise MalformedError(f"{name}: {len(data)} bytes, more than the "
                                     f"{DEVICE_FILE_MAX}-byte limit of a response file")
            expect_kind(data, "response", name)
            payload, _kid = peek_payload(data, Response)
            checked.append((payload.device_id, data))
        folder = ensure_dir(self.folder / "responses")
        for dev, data in checked:
            write_output(str(device_file(folder, dev, "response")), data)
        devices = ", ".join(short(d) for d, _ in checked)
        self.record("upload", {"code": 0, "rows": [
            {"server": "response", "device_id": d, "status": OK, "result": "uploaded",
             "detail": "carried by hand", "code": 0} for d, _ in checked],
            "summary": [f"upload: uploaded {len(checked)}"], "details": [],
            "notes": [f"{len(checked)} response file(s) uploaded: {devices}"]})
        return f"{len(checked)} response file(s) taken: {devices}"


def not_done(rows: Sequence[dict[str, Any]]) -> int:
    return sum(1 for r in rows if r.get("status") in NOT_DONE)

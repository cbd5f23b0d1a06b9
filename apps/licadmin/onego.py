"""The one-go commands ``activate`` and ``reclaim``: the six steps with the office online.

Before step 3 changes anything on a server, the plan is known from steps 1 and 2:
per server, what will be installed, updated and reclaimed. ``--dry-run`` prints
it and stops; ``activate`` never reclaims a license the operator did not ask for
without ``--yes`` or a "y" on a terminal (else exit 2, nothing changed).
Ctrl-C starts no further server and no further step (:class:`runner.Stop`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import EXIT_OK, LicensingError, UsageError
from agent.messages import DeviceInfo, LicenseInfo
from apps.common import read_input
from apps.licadmin.console import Console
from apps.licadmin.files import ensure_dir
from apps.licadmin.inventory import ServerRef
from apps.licadmin.online import Licensing, confirm, license_info, upload
from apps.licadmin.onsite import entries_by_device, gather, make_requests, send
from apps.licadmin.outcome import (
    EXIT_INTERRUPTED,
    FAILED,
    INTERRUPTED,
    OK,
    SKIPPED,
    Outcome,
    StepResult,
    exit_code,
    failure_table,
    summary_lines,
    table,
)
from apps.licadmin.runner import DEFAULT_JOBS, DEFAULT_TIMEOUT, Connect, Stop

__all__ = ["OneGo", "ServerPlan"]

#: the steps that talk to the licensing server
ONLINE = frozenset({"license-info", "upload", "confirm"})

#: exit code when a reclaim was not confirmed (usage: --yes or an answer was missing)
EXIT_USAGE = 2


@dataclass(frozen=True)
class ServerPlan:
    """What step 3 onwards would do on one server."""

    server: str
    device_id: str
    install: tuple[str, ...] = ()
    update: tuple[str, ...] = ()
    reclaim: tuple[str, ...] = ()

    @property
    def action(self) -> str:
        parts = [f"{w} {', '.join(x)}" for w, x in
                 (("reclaim", self.reclaim), ("install", self.install), ("update", self.update))
                 if x]
        return "; ".join(parts) or "nothing to do"

    def to_json(self) -> dict[str, Any]:
        return {"server": self.server, "device_id": self.device_id,
                "install": list(self.install), "update": list(self.update),
                "reclaim": list(self.reclaim)}


def _ask_terminal(question: str) -> bool:
    """A yes/no question on the terminal; False when there is none."""
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        return False
    sys.stderr.write(question)
    sys.stderr.flush()
    answer = sys.stdin.readline()
    return answer.strip().lower() in ("y", "yes")


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
    stop: Stop = field(default_factory=Stop)
    timeout: float = DEFAULT_TIMEOUT
    dry_run: bool = False
    yes: bool = False
    force: bool = False  # issue 15: reclaim floating licenses with seats out
    ask: Callable[[str], bool] = _ask_terminal
    steps: list[StepResult] = field(default_factory=list)
    plan: list[ServerPlan] | None = None
    #: the servers not done (failed, missed or interrupted) when the run ended
    rest: list[ServerRef] = field(default_factory=list)
    interrupted: bool = False
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
        if self.stop.requested:  # Ctrl-C: 130 when servers were left undone
            self.interrupted = True
            if self.rest:
                code = EXIT_INTERRUPTED
        kept = not (temporary and code == EXIT_OK)
        if not kept:
            shutil.rmtree(work, ignore_errors=True)
        return code, work, kept

    def _say(self, n: int, command: str, text: str) -> None:
        self._current = command
        self.console.line(f"== step {n}/6: {text}")

    def _report(self, res: StepResult, with_table: bool = False) -> None:
        self.steps.append(res)
        if self.console.verbose:
            if with_table:
                for line in table(res.outcomes):
                    self.console.line(line)
            for line in res.details:
                self.console.line(line)
        elif res.outcomes:
            for line in summary_lines(res.command, res.outcomes):
                self.console.line(line)
        for n in res.notes:
            self.console.line(n)

    def failures(self) -> list[str]:
        """Every failure of every step, one line each, for the end of the output."""
        return [f"{s.command}: {o.who}: {o.reason}: {o.detail}"
                for s in self.steps for o in s.outcomes if o.status == FAILED]

    def failure_table(self) -> list[str]:
        """One table of what was not done, over every step (nothing if all was done)."""
        pairs = [(s.command, o) for s in self.steps for o in s.outcomes]
        return failure_table([o for _c, o in pairs], [c for c, _o in pairs])

    def _stopped(self) -> bool:
        return self.stop.requested

    def _steps(self, work: Path) -> int:
        self.rest = list(self.servers)
        self._say(1, "gather", "gather server information")
        g = gather(self.servers, str(work / "site-info.cbor"), None, self.connect,
                   self.console, self.jobs, self.stop, self.timeout)
        self._report(g)
        if not g.facts["devices"] or self._stopped():
            return g.code
        self._say(2, "license-info", "download license information")
        li = license_info(str(work / "site-info.cbor"), [], str(work / "license-info.cbor"),
                          self.licensing)
        self._report(li)
        gathered = {o.url for o in g.outcomes if o.status == OK}
        here = [s for s in self.servers if s.url in gathered]
        self.plan = self._plan(g, work / "license-info.cbor")
        if self.dry_run:
            self.rest = []
            for p in self.plan:
                self.console.line(f"plan: {p.server}: {p.action}")
            self.console.line("dry run: nothing was changed on any server")
            return self._final()
        refusal = self._confirm_reclaims()
        if refusal is not None:
            return refusal
        if self._stopped():
            return self._final()
        self._say(3, "requests", "create the request files")
        rq = make_requests(here, str(work / "license-info.cbor"), str(work / "requests"),
                           self.connect, self.console, self.jobs, self.mode, self.features,
                           self.stop, self.timeout, self.force)
        self._report(rq)
        nothing = {o.url for o in rq.outcomes if o.status == SKIPPED}
        if not rq.facts["requests"] or self._stopped():
            self._rest(done=nothing)
            return self._final()
        self._say(4, "upload", "upload the request files")
        made = {o.device_id for o in rq.outcomes if o.status == OK and o.device_id}
        up = upload(str(work / "requests"), str(work / "responses"), None, self.licensing,
                    self.console, made)
        self._report(up)
        self._say(5, "send", "send the response files")
        answered = {o.device_id for o in up.outcomes
                    if o.result == "answered" and o.device_id is not None}
        targets = [s for s, o in zip(here, rq.outcomes, strict=True) if o.device_id in answered]
        sd = send(targets, str(work / "responses"), str(work / "receipts"), self.connect,
                  self.console, self.jobs, self.stop, self.timeout, devices=answered)
        self._report(sd, with_table=True)
        self._rest(done=nothing | {o.url for o in sd.outcomes if o.status == OK})
        if self.stop.hard:
            return self._final()
        # the receipts already written are confirmed even after Ctrl-C: no server is
        # started, and the ledger frees what was reclaimed
        self._say(6, "confirm", "confirm")
        cf = confirm(str(work / "receipts"), self.licensing, self.console)
        self._report(cf)
        return self._final()

    def _rest(self, done: set[str | None]) -> None:
        self.rest = [s for s in self.servers if s.url not in done]

    def _plan(self, g: StepResult, li_file: Path) -> list[ServerPlan]:
        """Per gathered server: what install, update and reclaim steps 3 to 6 would do."""
        from agent.formats import LICENSE_INFO_MAX, peek_payload

        info, _kid = peek_payload(read_input(str(li_file), LICENSE_INFO_MAX), LicenseInfo,
                                  LICENSE_INFO_MAX)
        plans: list[ServerPlan] = []
        entries = entries_by_device(info)
        for o in g.outcomes:
            if o.status != OK or o.device_id is None or o.data is None:
                continue
            # these exact bytes were verified and decoded by step 1 in this process
            # (read_device_info)
            device = o.payload if isinstance(o.payload, DeviceInfo) else \
                peek_payload(o.data, DeviceInfo)[0]
            held = {x.feature: x.count for x in device.licenses}
            e = entries.get(o.device_id)
            if self.mode == "reclaim" and self.features:
                gone = tuple(f"{f}={held[f]}" for f in self.features if f in held)
                plans.append(ServerPlan(o.who, o.device_id, reclaim=gone))
                continue
            if e is None:
                plans.append(ServerPlan(o.who, o.device_id))
                continue
            reclaim = tuple(f"{x.feature}={x.count}" for x in e.reclaim)
            install: tuple[str, ...] = ()
            update: tuple[str, ...] = ()
            if self.mode != "reclaim" or e.reclaim:
                install = tuple(f"{x.feature}={x.count}" for x in e.install
                                if x.feature not in held)
                update = tuple(f"{x.feature} {held[x.feature]} -> {x.count}" for x in e.install
                               if x.feature in held)
            plans.append(ServerPlan(o.who, o.device_id, install, update, reclaim))
        return plans

    def _confirm_reclaims(self) -> int | None:
        """``activate`` reclaims only with --yes or a yes on the terminal; else exit 2."""
        if self.mode == "reclaim" or self.yes or self.plan is None:
            return None
        reclaims = [p for p in self.plan if p.reclaim]
        if not reclaims:
            return None
        for p in reclaims[:20]:
            self.console.line(f"plan: {p.server}: {p.action}")
        if len(reclaims) > 20:
            self.console.line(f"plan: ... and {len(reclaims) - 20} more server(s) with a "
                              f"reclaim (--dry-run lists them all)")
        n = len(reclaims)
        question = (f"activate would reclaim installed licenses from {n} server(s) "
                    f"(listed above). Reclaim them? [y/N] ")
        if self.ask(question):
            return None
        err = UsageError(f"activate would reclaim installed licenses from {n} server(s) "
                         f"(listed above) that you did not ask to reclaim: nothing was "
                         f"changed; rerun with --yes to allow it, or --dry-run to see the "
                         f"whole plan")
        res = StepResult("activate")
        o = Outcome("plan")
        o.fail(err)
        res.outcomes.append(o)
        self.steps.append(res)
        self.rest = []
        print(f"licadmin: {err.reason}: {err}", file=sys.stderr)
        return EXIT_USAGE

    def _final(self) -> int:
        """0, partial, or the first failure's code, over every step's outcomes."""
        if any(o.status == INTERRUPTED for s in self.steps for o in s.outcomes):
            return EXIT_INTERRUPTED
        return exit_code(o for s in self.steps for o in s.outcomes)

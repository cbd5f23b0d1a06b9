"""The one-go commands ``activate`` and ``reclaim``: the six steps with the office online."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import EXIT_OK, LicensingError
from apps.licadmin.console import Console
from apps.licadmin.files import ensure_dir
from apps.licadmin.inventory import ServerRef
from apps.licadmin.online import Licensing, confirm, license_info, upload
from apps.licadmin.onsite import gather, make_requests, send
from apps.licadmin.outcome import FAILED, OK, Outcome, StepResult, exit_code, table
from apps.licadmin.runner import DEFAULT_JOBS, Connect

__all__ = ["OneGo"]

#: the steps that talk to the licensing server
ONLINE = frozenset({"license-info", "upload", "confirm"})


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
        """0, partial, or the first failure's code, over every step's outcomes."""
        return exit_code(o for s in self.steps for o in s.outcomes)

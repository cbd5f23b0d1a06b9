"""What a workflow step did, server by server: outcomes, their exit code, table and JSON.

Exit codes are ``licagent``'s; :data:`EXIT_PARTIAL` (10) says something was
not done: some servers (or files) failed, or were missed (no response for
them, absent from an MQTT site, never started because of Ctrl-C), while
others succeeded. When every attempted one failed and nothing was missed, the
exit code is the first failure's (in the order the servers were given). A step
is never 0 when something was not done.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import EXIT_OK, LicensingError
from apps.licadmin.files import short

__all__ = [
    "EXIT_INTERRUPTED",
    "EXIT_PARTIAL",
    "FAILED",
    "INTERRUPTED",
    "MISSED",
    "NOT_DONE",
    "OK",
    "SKIPPED",
    "Outcome",
    "StepResult",
    "exit_code",
    "failure_table",
    "outcome_line",
    "summary_lines",
    "table",
]

#: some servers or files failed, the others succeeded (see README, exit codes)
EXIT_PARTIAL = 10
#: stopped by SIGINT or SIGTERM (Ctrl-C) before every server was done
EXIT_INTERRUPTED = 130

#: ok: done; skipped: nothing to do there (counts as done); failed: the server or file
#: refused or could not be reached; missed: not done for want of something (no response
#: for it, absent from the site); interrupted: not started, or still running, at Ctrl-C
OK, FAILED, SKIPPED, MISSED, INTERRUPTED = "ok", "failed", "skipped", "missed", "interrupted"
#: the statuses that mean "not done" (never exit 0)
NOT_DONE = frozenset({FAILED, MISSED, INTERRUPTED})


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
    #: what this process decoded from ``data`` after verifying it (gather: the DeviceInfo)
    payload: Any = field(default=None, repr=False, compare=False)
    result: str = "ok"  # the word in the result table: ok, applied, already applied, ...

    def fail(self, err: LicensingError) -> None:
        self.status, self.code, self.reason = FAILED, err.exit_code, err.reason
        self.detail, self.result = str(err), "FAILED"

    def skip(self, why: str) -> None:
        """Nothing to do there (done): the same device twice, nothing to install."""
        self.status, self.detail, self.result = SKIPPED, why, "skipped"

    def miss(self, why: str) -> None:
        """Not done for want of something (no response for it): exit 10, never 0."""
        self.status, self.detail, self.result = MISSED, why, "missed"
        self.code, self.reason = EXIT_PARTIAL, "missed"

    def interrupt(self, why: str) -> None:
        """Not started, or not waited for, because of Ctrl-C."""
        self.status, self.detail, self.result = INTERRUPTED, why, "interrupted"
        self.code, self.reason = EXIT_INTERRUPTED, "interrupted"

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"server": self.who, "status": self.status,
                             "device_id": self.device_id, "detail": self.detail}
        if self.url is not None and self.url != self.who:
            d["url"] = self.url
        if self.status in NOT_DONE:
            d["code"], d["reason"] = self.code, self.reason
        return d


def exit_code(outcomes: Iterable[Outcome]) -> int:
    """0 when everything was done; the first failure's code when every one tried failed
    and nothing was missed; else partial (10), whatever was missed or interrupted.

    (The command exits 130 when it was interrupted; that is the caller's decision.)
    """
    outs = list(outcomes)
    if not any(o.status in NOT_DONE for o in outs):
        return EXIT_OK
    tried = [o for o in outs if o.status != SKIPPED]
    failed = [o for o in tried if o.status == FAILED]
    if failed and len(failed) == len(tried):
        return failed[0].code
    return EXIT_PARTIAL


@dataclass
class StepResult:
    """One step's outcomes and the lines and facts a summary needs."""

    command: str
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    #: per-server lines printed with --verbose only (a site may have 10,000)
    details: list[str] = field(default_factory=list)
    #: the servers the step went to, in the order of the first outcomes, when it added
    #: some to those it was given (devices of an MQTT site not listed yet)
    servers: list[Any] = field(default_factory=list, repr=False)

    @property
    def code(self) -> int:
        return exit_code(self.outcomes)

    def to_json(self) -> dict[str, Any]:
        return {"command": self.command, "exit_code": self.code, **self.facts,
                "results": [o.to_json() for o in self.outcomes], "notes": self.notes}


def outcome_line(o: Outcome) -> str:
    word = {OK: "ok", FAILED: "FAILED", SKIPPED: "skipped", MISSED: "MISSED",
            INTERRUPTED: "STOPPED"}[o.status]
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


def summary_lines(command: str, outcomes: Sequence[Outcome]) -> list[str]:
    """One line per outcome class (``applied``, ``already applied``, ``FAILED``, ...),
    in the order they first occur: the size of the output does not grow with the site."""
    counts: dict[str, int] = {}
    for o in outcomes:
        word = o.result if o.status in (OK, SKIPPED) else o.status.upper()
        counts[word] = counts.get(word, 0) + 1
    if not counts:
        return [f"{command}: nothing done"]
    w = max(len(k) for k in counts)
    return [f"{command}: {k:<{w}} {n}" for k, n in counts.items()]


def failure_table(outcomes: Sequence[Outcome], steps: Sequence[str] | None = None) -> list[str]:
    """A table of what was not done (failed, missed, interrupted), servers by their names;
    nothing when everything was done. ``steps``: each outcome's step (a STEP column)."""
    rows: list[tuple[str, ...]] = []
    for k, o in enumerate(outcomes):
        if o.status not in NOT_DONE:
            continue
        detail = f"{o.reason}: {o.detail}" if o.status == FAILED else o.detail
        step = (steps[k],) if steps is not None else ()
        who = o.who
        if o.who in ("request", "receipt") and o.device_id:  # a file: whose it is
            who = f"{o.who} of device {short(o.device_id)}"
        rows.append((*step, who, o.status.upper(), detail))
    if not rows:
        return []
    rows.insert(0, (*(("STEP",) if steps is not None else ()), "SERVER", "RESULT", "DETAIL"))
    n = len(rows[0]) - 1
    w = [max(len(r[i]) for r in rows) for i in range(n)]
    return [("  ".join(f"{r[i]:<{w[i]}}" for i in range(n)) + f"  {r[n]}").rstrip()
            for r in rows]

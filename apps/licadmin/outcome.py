"""What a workflow step did, server by server: outcomes, their exit code, table and JSON.

Exit codes are ``licagent``'s; :data:`EXIT_PARTIAL` (10) says some servers
(or files) failed and others succeeded. When every attempted one failed, the
exit code is the first failure's (in the order the servers were given).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.errors import EXIT_OK, LicensingError
from apps.licadmin.files import short

__all__ = [
    "EXIT_PARTIAL",
    "FAILED",
    "OK",
    "SKIPPED",
    "Outcome",
    "StepResult",
    "exit_code",
    "outcome_line",
    "table",
]

#: some servers or files failed, the others succeeded (see README, exit codes)
EXIT_PARTIAL = 10

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


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

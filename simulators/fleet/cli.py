"""``licsim``: run a fleet of simulated automation servers from a TOML scenario.

``licsim run SCENARIO.toml [--duration SECONDS] [--summary-json FILE]`` prints a
line beginning with ``ready`` once every server is reachable, runs until the
duration ends or SIGINT/SIGTERM, stops everything and prints the summary
(JSON to ``--summary-json``). Exit codes: 0 every invariant held and every fault of
the scenario was injected, 1 one broke, a server was never reachable, or a fault not
marked ``optional`` could not be injected, 2 a bad scenario or flag, 8 storage.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from agent.errors import EXIT_FAILURE, EXIT_OK, UsageError, listen_error
from apps.common import add_version, exit_code_of

if TYPE_CHECKING:
    from simulators.fleet.fleet import Fleet

__all__ = ["main"]

PROG = "licsim"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Fleet simulator: many simulated "
                                "automation servers with real license stores, faults and a report.")
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a scenario until --duration or SIGINT/SIGTERM")
    r.add_argument("scenario", type=Path, help="the scenario TOML file")
    r.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="stop after this many seconds from ready (default: until a signal)")
    r.add_argument("--summary-json", type=Path, default=None, metavar="FILE",
                   help="write the summary as JSON here")
    r.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                   help="where stores and mailboxes go (default: state_dir, else a temporary "
                        "folder removed at the end)")
    r.add_argument("--keep", action="store_true", help="keep the working folder")
    r.add_argument("--urls", type=Path, default=None, metavar="FILE",
                   help="write a licadmin --servers file (TOML) of every server's URLs once "
                        "ready")
    r.add_argument("--log", action="store_true", help="one line per fleet event on stderr")
    return p


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _servers_toml(fleet: Fleet) -> str:
    lines = [f"site = {json.dumps(fleet.scenario.site)}"]
    for s in fleet.servers:
        for link, url in s.addresses.items():
            lines += ["", "[[server]]", f"url = {json.dumps(url)}",
                      f"name = {json.dumps(f'{s.name} {link}')}"]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    from simulators.fleet.fleet import Fleet
    from simulators.fleet.scenario import load_scenario

    if args.duration is not None and args.duration < 0:
        raise UsageError(f"--duration {args.duration:g}: must be 0 or more seconds")
    scenario = load_scenario(args.scenario)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    log = (lambda line: print(line, file=sys.stderr, flush=True)) if args.log else None
    fleet = Fleet(scenario, args.workdir, keep=args.keep, log=log)
    try:
        fleet.start()
        by_link: dict[str, int] = {}
        for s in fleet.servers:
            for lk in s.links:
                by_link[lk] = by_link.get(lk, 0) + 1
        if args.urls is not None:
            _write_atomic(args.urls, _servers_toml(fleet))
        status = "ready" if fleet.ready else "ready-partial"
        print(f"{status} {len(fleet.servers)} servers site {scenario.site} "
              f"({', '.join(f'{k} {n}' for k, n in sorted(by_link.items()))}) "
              f"broker {fleet.broker_url or '-'} workdir {fleet.workdir}", flush=True)
        fleet.run(args.duration, stop)  # stopped already: records the faults not reached
    finally:
        fleet.stop()
    summary = fleet.summary()
    if received:
        print(f"{received[0]} received, stopped", flush=True)
    print(summary.to_text(), flush=True)
    if args.summary_json is not None:
        _write_atomic(args.summary_json, summary.dumps() + "\n")
    return EXIT_OK if summary.ok else EXIT_FAILURE


def main(argv: Sequence[str] | None = None) -> int:
    def command() -> int:
        args = _parser().parse_args(argv)  # inside: Ctrl-C while it loads is one line too
        try:
            return run(args)
        except OSError as exc:  # a folder or port licsim itself could not use
            if exc.errno == errno.EADDRINUSE:  # the same code as licagent and licserver
                raise listen_error(exc.filename or "a port of the fleet", exc) from exc
            print(f"{PROG}: {exc}", file=sys.stderr)
            return EXIT_FAILURE

    return exit_code_of(PROG, command)


if __name__ == "__main__":
    sys.exit(main())

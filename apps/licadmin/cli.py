"""``licadmin``: the administration tool: one server over a link, and the site workflow.

Single-server commands: info, status, request, apply, check. The site
workflow (issue 5): gather, license-info, requests, upload, send, confirm
(:mod:`apps.licadmin.onsite`, :mod:`apps.licadmin.online`), the one-go activate and
reclaim (:mod:`apps.licadmin.onego`), assign, and show.

A server is named by a link URL (``--server https://HOST:PORT?ca=FILE``,
``tcp://...``, ...; see :mod:`hw`). Exit codes are those of ``licagent``
(see agent.errors): the server's refusal comes back with its code. A link
failure (connection refused, timeout, TLS) exits 1 with a message. A
workflow step where anything was not done (a server failed, was missed or
interrupted) while others succeeded exits 10 (partial). Ctrl-C (SIGINT or
SIGTERM) during a site step starts no further server, lets the ones in flight
finish, writes the servers not done into a servers file, prints the command
that finishes them, and exits 130.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from agent.errors import EXIT_OK, RevokedError, UsageError
from agent.formats import LICENSE_INFO_MAX, verify_receipt
from agent.messages import DeviceInfo
from agent.protocol import DEFAULT_LIMITS, self_signed_payload
from agent.rpc import TransportError
from apps.common import (
    add_operation_commands,
    add_version,
    exit_code_of,
    print_json,
    read_input,
    show_applied,
    show_check,
    show_info,
    show_status,
    write_output,
)
from apps.licadmin import (
    inventory,
    licensing_access,
    onego,
    online,
    onsite,
    outcome,
    runner,
    seat,
)
from apps.licadmin.console import Console
from hw.link import ServerClient

__all__ = ["main"]

PROG = "licadmin"
#: the site workflow's commands (the others talk to one server)
WORKFLOW = frozenset({"gather", "license-info", "requests", "upload", "send", "confirm",
                      "activate", "reclaim", "assign", "show"})
DEFAULT_TIMEOUT = 10.0
FORCE_HELP = ("reclaim floating licenses even while seats are out (issue 15; without it such "
              "a server refuses, exit 9, naming each holder; the receipt records the seats "
              "still out and when the last one ends)")


def _timeout(text: str) -> float:
    try:
        t = float(text)
    except ValueError:
        t = -1.0
    if not 0 < t <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds in (0, 3600]")
    return t


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, description="Administer the licenses of a BMS automation server over a link.")
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        return server_args(sub.add_parser(name, help=help_, description=help_))

    def server_args(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--server", required=True, metavar="URL",
                        help="link URL of the server, e.g. https://HOST:PORT?ca=ca.pem")
        sp.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"the total time allowed for the server, in seconds: connecting, "
                             f"the operation and its retries (default {DEFAULT_TIMEOUT:g})")
        return sp

    add_operation_commands(cmd, {
        "info": "fetch the server's signed device-information file",
        "status": "show the server's installed licenses",
        "request": "have the server create a signed request file",
        "license-info": "vendor-signed license information: request what it lists for the server",
        "apply": "send a vendor response file to the server to verify and apply",
        "check": "is FEATURE licensed on the server now? (exit 0 yes, 1 no)",
    })
    seat.add_parser(sub, server_args)  # issue 15
    sp = cmd("tree", "show the system under a top server: each server's required, licensed, "
                     "inherited and available units, and the totals")  # issue 14
    sp.add_argument("--json", action="store_true",
                    help='print {"servers": [...], "totals": [...]} as JSON')
    sp = cmd("use", "record how many units of FEATURE the server's host application needs")
    sp.add_argument("use", metavar="FEATURE=COUNT", help="e.g. bacnet-ip=1 (0 forgets it)")
    _workflow_parsers(sub)
    from apps.licadmin.ui import add_parser as add_ui_parser

    add_ui_parser(sub, _timeout, _jobs)
    return p


def _jobs(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= runner.MAX_JOBS:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 to {runner.MAX_JOBS} servers at once")
    return n


def _workflow_parsers(sub: Any) -> None:
    """The site workflow (README: the offline activation and reclaim workflow)."""

    def cmd(name: str, help_: str, servers: bool = False,
            licensing: bool = False) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = sub.add_parser(
            name, help=help_, description=help_, epilog=SITE_EPILOG if servers else None)
        if servers:
            sp.add_argument("--server", action="append", default=[], metavar="URL",
                            help="link URL of a server (repeat for each)")
            sp.add_argument("--servers", metavar="FILE.toml",
                            help='the site\'s servers: [[server]] tables with url = "..." '
                                 'and an optional name = "..."')
            sp.add_argument("--timeout", type=_timeout, default=runner.DEFAULT_TIMEOUT,
                            metavar="SECONDS",
                            help=TIMEOUT_HELP.format(default=runner.DEFAULT_TIMEOUT))
            sp.add_argument("--jobs", type=_jobs, default=runner.DEFAULT_JOBS, metavar="N",
                            help=f"servers handled at once (default {runner.DEFAULT_JOBS})")
            sp.add_argument("--tree", action="store_true",  # issue 14 item 5
                            help="each --server is a top server: also every server under "
                                 "it, reached through it (its children's own signed files)")
        if licensing:
            licensing_access.add_options(sp)
        sp.add_argument("--json", action="store_true", help="print a summary as JSON")
        if name != "show":
            sp.add_argument("--verbose", action="store_true",
                            help="one line per server (or file) as it finishes; by default "
                                 "one line per outcome class and a table of what was not done")
        return sp

    sp = cmd("gather", "step 1 (site): gather every server's device information into SITE_INFO",
             servers=True)
    sp.add_argument("--out", required=True, metavar="SITE_INFO",
                    help="where to write the SITE_INFO bundle")
    sp.add_argument("--site", metavar="NAME", help="the site's name (default: from --servers, "
                                                   "else the file name)")
    sp.add_argument("--append", action="store_true",
                    help="keep the servers SITE_INFO already holds and add these (how an "
                         "interrupted gather is finished)")
    sp = cmd("license-info", "step 2 (online): download the license information for SITE_INFO",
             licensing=True)
    sp.add_argument("--site-info", required=True, metavar="SITE_INFO",
                    help="the SITE_INFO file licadmin gather wrote")
    sp.add_argument("--device", action="append", default=[], metavar="DEVICE_ID",
                    help="only these servers (default: all in SITE_INFO)")
    sp.add_argument("--out", required=True, metavar="LICENSE_INFO",
                    help="where to write the license information (each server's own "
                         "beside it, in LICENSE_INFO.d)")
    sp = cmd("requests", "step 3 (site): each server signs its request from LICENSE_INFO",
             servers=True)
    sp.add_argument("--license-info", required=True, metavar="LICENSE_INFO",
                    help="the license information licadmin license-info wrote")
    sp.add_argument("--out-dir", required=True, metavar="REQUESTS",
                    help="folder for the request files, one per server (created if missing)")
    sp.add_argument("--force", action="store_true", help=FORCE_HELP)
    sp = cmd("upload", "step 4 (online): upload the requests, download one response per server",
             licensing=True)
    sp.add_argument("--requests", required=True, metavar="REQUESTS",
                    help="the folder licadmin requests wrote")
    sp.add_argument("--out-dir", required=True, metavar="RESPONSES",
                    help="folder for the response files, one per server (created if "
                         "missing)")
    sp.add_argument("--receipts", metavar="RECEIPTS",
                    help="receipts to confirm on the way (default: a receipts folder beside "
                         "REQUESTS, if there is one)")
    sp = cmd("send", "step 5 (site): each server applies its own response and returns a receipt",
             servers=True)
    sp.add_argument("--responses", required=True, metavar="RESPONSES",
                    help="the folder licadmin upload wrote")
    sp.add_argument("--receipts-out", required=True, metavar="RECEIPTS",
                    help="folder for the receipts, one per server (created if missing)")
    sp = cmd("confirm", "step 6 (online): confirm the receipts; reclaimed licenses become free",
             licensing=True)
    sp.add_argument("--receipts", required=True, metavar="RECEIPTS",
                    help="the folder licadmin send wrote (or receipts from licagent apply "
                         "--receipt-out)")
    for name, what in (("activate", "activation"), ("reclaim", "license reclaim")):
        sp = cmd(name, f"steps 1 to 6 in one go ({what}; this computer online, the servers not)",
                 servers=True, licensing=True)
        sp.add_argument("--work-dir", metavar="DIR",
                        help="keep the files of every step here (default: a temporary folder, "
                             "kept only if something failed)")
        sp.add_argument("--dry-run", action="store_true",
                        help="run steps 1 and 2 only and print the plan per server (install, "
                             "update, reclaim); change nothing")
        if name == "activate":
            sp.add_argument("--yes", action="store_true",
                            help="allow the reclaims the license information lists (without "
                                 "it, activate asks on a terminal, else refuses with exit 2)")
        if name == "reclaim":
            sp.add_argument("--force", action="store_true", help=FORCE_HELP)
            sp.add_argument("--feature", action="append", default=[], metavar="F",
                            help="reclaim these features where installed (default: what the "
                                 "license information lists)")
    sp = cmd("assign", "assign licenses of an entitlement to servers before their activation: "
                       "one or many at once, in one request and one ledger transaction",
             licensing=True)
    sp.add_argument("--entitlement", required=True, metavar="ID",
                    help="the entitlement (order) as recorded by licserver entitle: free text, "
                         "quote it if it has spaces")
    sp.add_argument("--product", metavar="NAME",
                    help="the product of the entitlement to draw from (needed only when "
                         "several of its products hold the feature)")
    sp.add_argument("--device", action="append", default=[], metavar="DEVICE_ID",
                    help="a server's device ID (repeat for each)")
    sp.add_argument("--devices-from", metavar="SITE_INFO|FILE.csv",
                    help="every server of a SITE_INFO file (licadmin gather), or a CSV of "
                         "DEVICE_ID,FEATURE=COUNT[,FEATURE=COUNT...] rows")
    sp.add_argument("--feature", action="append", default=[], metavar="FEATURE=COUNT",
                    help="the device's total of FEATURE (0 releases it); repeat for each "
                         "feature; not with a CSV, whose rows carry their own")
    sp = sub.add_parser("rehost", help=REHOST_HELP, description=REHOST_HELP)
    _move_options(sp, "the file of every step", "rehost")
    licensing_access.add_options(sp)
    sp.add_argument("--feature", action="append", default=[], metavar="F",
                    help="move only these features (default: every license of the old server)")
    sp = sub.add_parser("transfer", help=TRANSFER_HELP, description=TRANSFER_HELP)
    _move_options(sp, "the transfer file and the receipt", "transfer")
    sp.add_argument("--feature", action="append", default=[], metavar="F", required=True,
                    help="a transferable license to move (repeat for each)")
    sp = cmd("show", "print any file of this project with its kind, signer and signature verdict")
    sp.add_argument("file", metavar="FILE",
                    help="a signed file, SITE_INFO bundle or PEM key of this project")
    sp.add_argument("--trust", action="append", default=[], metavar="VENDOR_PUB",
                    help="vendor public key (PEM) to check vendor signatures with")


REHOST_HELP = ("move licenses from an old server to a new one, make-before-break: the old "
               "server's signed removal first, then the new server's activation (issue 16); "
               "run it again to finish an interrupted one")
TRANSFER_HELP = ("move licenses issued transferable from one live server to another "
                 "directly, without a vendor trip (issue 16): the old server's signed transfer "
                 "file, then the new server's receipt; run it again to finish an interrupted "
                 "one")

#: the site steps: they talk to the servers, and Ctrl-C stops them cleanly
SITE_STEPS = frozenset({"gather", "requests", "send", "activate", "reclaim"})
#: what ``--timeout`` means on them (a dead server costs at most that)
TIMEOUT_HELP = ("the total time allowed per server, in seconds: connecting, every operation "
                "and its retries (on links that retry, each try gets a quarter of it); a "
                "server that does not answer costs at most this (default {default:g})")


SITE_EPILOG = ("Exit 0 only when every server was done; 10 (partial) when anything was not "
               "(failed, no response for it, absent from an MQTT site). Ctrl-C (SIGINT or "
               "SIGTERM) starts no further server, lets the ones in flight finish (a second "
               "signal stops waiting), writes the servers not done into a servers file, "
               "prints the command that finishes them, and exits 130.")


def _server_args_removed(argv: Sequence[str], drop_flags: Sequence[str] = ()) -> list[str]:
    """``argv`` without its --server/--servers arguments (and ``drop_flags``)."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--server", "--servers"):
            skip = True
            continue
        if a.startswith(("--server=", "--servers=")) or a in drop_flags:
            continue
        out.append(a)
    return out


def resume_command(argv: Sequence[str], rest_file: Path, extra: Sequence[str] = ()) -> str:
    """The exact command that runs the same step for the servers in ``rest_file`` only."""
    args = _server_args_removed(argv)
    return shlex.join([PROG, *args, "--servers", str(rest_file),
                       *[x for x in extra if x not in args]])


def run_workflow(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """The workflow commands; each prints its lines (or one JSON document) and returns the code."""
    c = args.command
    console = Console(sys.stdout, quiet=args.json, verbose=getattr(args, "verbose", False))
    if c == "show":
        from apps.licadmin.show import describe_file, load_trust, render_text

        d = describe_file(args.file, load_trust(args.trust))
        if args.json:
            print_json(d)
        else:
            print("\n".join(render_text(d, args.file)))
        return 4 if d["signature"]["verified"] is False else EXIT_OK
    licensing = (licensing_access.client_from(args)
                 if getattr(args, "licensing_server", None) else None)
    servers: list[inventory.ServerRef] = []
    site: str | None = None
    connect = runner.connector(runner.DEFAULT_TIMEOUT)
    stop = runner.Stop()
    with stop.installed() if c in SITE_STEPS else nullcontext(stop):
        if hasattr(args, "servers"):
            servers, site = inventory.servers_from(args.server, args.servers, args.timeout)
            connect = runner.connector(args.timeout)
            if getattr(args, "tree", False):  # issue 14 item 5
                from apps.licadmin import tree

                servers = tree.expand(servers, connect)
        try:
            if stop.requested:
                print(f"{PROG}: interrupted while listing the servers: nothing was done on "
                      f"any server; run the same command again", file=sys.stderr)
                return outcome.EXIT_INTERRUPTED
            return _run_steps(args, c, console, licensing, servers, site, connect, stop, argv)
        finally:
            inventory.close_servers(servers)


def _one_go(args: argparse.Namespace, c: str, console: Console, licensing: online.Licensing,
            servers: list[inventory.ServerRef], site: str | None, connect: runner.Connect,
            stop: runner.Stop, argv: Sequence[str]) -> int:
    go = onego.OneGo(servers, licensing, connect, console, c, getattr(args, "feature", []),
                     args.work_dir, args.jobs, stop=stop, timeout=args.timeout,
                     dry_run=args.dry_run, yes=getattr(args, "yes", False),
                     force=getattr(args, "force", False))
    code, work, kept = go.run()
    resume = None
    if go.interrupted and go.rest:
        rest_file = work / "rest.toml"
        inventory.write_servers(rest_file, go.rest, site)
        extra = [] if args.work_dir else ["--work-dir", str(work)]
        resume = resume_command(argv, rest_file, extra)
    plan = [p.to_json() for p in go.plan] if go.plan is not None else None
    if args.json:
        print_json({"command": c, "exit_code": code,
                    "work_dir": str(work) if kept else None,
                    "steps": [s.to_json() for s in go.steps],
                    "plan": plan, "interrupted": go.interrupted, "resume": resume})
        return code
    for line in go.failure_table():
        print(line)
    failures = go.failures()
    if failures and not go.interrupted:
        print(f"{'partial' if code == outcome.EXIT_PARTIAL else 'failed'}: "
              f"{len(failures)} failure(s), listed above")
    if kept:
        print(f"files of every step are in {work}" + (
            "; rerun the failed steps with them" if code != EXIT_OK and not resume else ""))
    if resume:
        done = len(servers) - len(go.rest)
        print(f"interrupted: {done} of {len(servers)} server(s) done; the other "
              f"{len(go.rest)} are listed in {work / 'rest.toml'}; finish them with:")
        print(f"  {resume}")
    return code


def _rest_file(c: str, args: argparse.Namespace) -> Path:
    """Where an interrupted site step writes the servers it did not do."""
    target = {"gather": args.out if c == "gather" else "",
              "requests": getattr(args, "out_dir", ""),
              "send": getattr(args, "receipts_out", "")}[c]
    return Path(str(target).rstrip("/") + ".rest.toml")


def _run_steps(args: argparse.Namespace, c: str, console: Console,
               licensing: online.Licensing | None, servers: list[inventory.ServerRef],
               site: str | None, connect: runner.Connect, stop: runner.Stop,
               argv: Sequence[str]) -> int:
    if c in ("activate", "reclaim"):
        assert licensing is not None
        return _one_go(args, c, console, licensing, servers, site, connect, stop, argv)
    if c == "assign":
        assert licensing is not None
        from apps.licadmin.assign import plan, run_assign

        code, summary, lines = run_assign(
            plan(args.entitlement, args.product, args.device, args.devices_from, args.feature),
            licensing)
        if args.json:
            print_json(summary)
        else:
            print("\n".join(lines))
        return code
    timeout = getattr(args, "timeout", runner.DEFAULT_TIMEOUT)
    if c == "gather":
        res = onsite.gather(servers, args.out, args.site or site, connect, console, args.jobs,
                            stop, timeout, args.append)
    elif c == "license-info":
        assert licensing is not None
        res = online.license_info(args.site_info, args.device, args.out, licensing)
    elif c == "requests":
        res = onsite.make_requests(servers, args.license_info, args.out_dir, connect, console,
                                   args.jobs, stop=stop, timeout=timeout, force=args.force)
    elif c == "upload":
        assert licensing is not None
        res = online.upload(args.requests, args.out_dir, args.receipts, licensing, console)
    elif c == "send":
        res = onsite.send(servers, args.responses, args.receipts_out, connect, console,
                          args.jobs, stop, timeout)
    elif c == "confirm":
        assert licensing is not None
        res = online.confirm(args.receipts, licensing, console)
    else:
        raise UsageError(f"unknown command {c}")
    code, resume, rest = res.code, None, []
    if stop.requested:
        went = res.servers or servers
        rest = [s for s, o in zip(went, res.outcomes, strict=False)
                if o.status in (outcome.FAILED, outcome.INTERRUPTED)]
        if any(o.status == outcome.INTERRUPTED for o in res.outcomes):
            rest_file = _rest_file(c, args)
            inventory.write_servers(rest_file, rest, args.site or site if c == "gather" else site)
            resume = resume_command(argv, rest_file, ["--append"] if c == "gather" else [])
            code = outcome.EXIT_INTERRUPTED
    if args.json:
        print_json({**res.to_json(), "exit_code": code, "interrupted": resume is not None,
                    "resume": resume})
        return code
    if console.verbose:
        for line in (outcome.table(res.outcomes) if c == "send" else []) + res.details:
            print(line)
    if res.outcomes:
        for line in outcome.summary_lines(c, res.outcomes):
            print(line)
    if not (console.verbose and c == "send"):  # (its whole table is above)
        for line in outcome.failure_table(res.outcomes):
            print(line)
    for n in res.notes:
        print(n)
    if resume is not None:
        total = len(res.servers or servers)
        done = total - len(rest)
        print(f"interrupted: {done} of {total} server(s) done; the other {len(rest)} "
              f"are listed in {_rest_file(c, args)}; finish them with:")
        print(f"  {resume}")
    elif code == outcome.EXIT_PARTIAL:
        bad = sum(1 for o in res.outcomes if o.status in outcome.NOT_DONE)
        print(f"partial: {bad} of {len(res.outcomes)} not done (listed above); "
              f"the others are done; rerun {c} for the failed ones")
    return code


def _check_folder(path: str | None) -> None:
    """Refuse before talking to the server, so that an answer is never lost for want of a folder."""
    if path and not Path(path).absolute().parent.is_dir():
        raise UsageError(f"cannot write {path}: its folder does not exist")


def run(args: argparse.Namespace, client: ServerClient) -> int:
    c = args.command
    if c == "info":
        _check_folder(args.out)
        data = client.info()
        # verify the device's self-signature before trusting or storing what arrived
        payload, _key = self_signed_payload(data, DeviceInfo)
        show_info(data, payload, args.out, args.json)
        return EXIT_OK
    if c == "status":
        show_status(client.status().to_wire(), args.json)
        return EXIT_OK
    if c == "request":
        _check_folder(args.out)
        license_info = (read_input(args.license_info, LICENSE_INFO_MAX,
                                   "license information file", expect="license-info")
                        if args.license_info else None)
        data = client.request(args.action, args.feature, license_info, force=args.force,
                              transfer_to=args.transfer_to)
        write_output(args.out, data)
        print(f"wrote {args.action} request to {args.out}")
        return EXIT_OK
    if c == "apply":
        _check_folder(args.receipt_out)
        response = read_input(args.response, DEFAULT_LIMITS.max_file, "response file",
                              expect="response")
        from apps.licadmin.onsite import refuse_revoked, revoked_in

        dead = revoked_in([response])  # issue 16: nothing goes to a device declared dead
        if dead:
            dev = client.status().device_id
            if dev in dead:
                raise RevokedError(refuse_revoked(dev, dead[dev]))
        try:
            res = client.apply(response)
        except TransportError as err:
            raise TransportError(f"{err}; the response may or may not have been applied: "
                                 f"sending it again is safe (a server answers a response it "
                                 f"already applied with the same receipt)") from err
        verify_receipt(res.receipt, response=response)  # what send checks, the same way
        show_applied(PROG, res, args.receipt_out)
        return EXIT_OK
    if c == "use":  # issue 14: the daemon operation use-feature
        from agent.rpc import Op, UseArgs

        feature, eq, count = args.use.partition("=")
        if not eq or not count.isdigit():
            raise UsageError(f"{args.use!r}: expected FEATURE=COUNT, e.g. bacnet-ip=1")
        done: UseArgs = client.typed(Op.USE_FEATURE, UseArgs(feature, int(count)).to_wire())
        print(f"{done.feature}: {done.count} required")
        return EXIT_OK
    if c == "tree":  # issue 14
        from apps.licadmin import tree

        return tree.show(client, lambda url: runner.open_client(url, args.timeout), args.json)
    if c == "check":
        if args.count != 1:  # issue 14: units, own and inherited
            from agent.rpc import CheckArgs, Op

            r = client.typed(Op.CHECK_FEATURE, CheckArgs(args.feature, args.count).to_wire())
        else:
            r = client.check(args.feature)
        return show_check(r.licensed, r.message)
    raise UsageError(f"unknown command {c}")


def _rehost(args: argparse.Namespace) -> int:
    from apps.licadmin.rehost import Rehost, default_work_dir

    work = Path(args.work_dir) if args.work_dir else default_work_dir(args.src, args.dst)
    return _resumable(work, Rehost(args.src, args.dst, licensing_access.client_from(args),
                                   args.feature, work, runner.connector(args.timeout)).run)


def _move_options(sp: argparse.ArgumentParser, kept: str, what: str) -> None:
    """--from, --to, --work-dir and --timeout of a move of licenses (rehost, transfer)."""
    sp.add_argument("--from", dest="src", required=True, metavar="URL",
                    help="link URL of the old server (the licenses leave it)")
    sp.add_argument("--to", dest="dst", required=True, metavar="URL",
                    help="link URL of the new server (the licenses arrive there)")
    sp.add_argument("--work-dir", metavar="DIR",
                    help=f"keep {kept} here; run the same command again to finish an "
                         f"interrupted {what} (default: {what}-HASH in the current folder, "
                         f"the same for the same two URLs)")
    sp.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                    help=f"the total time allowed per server operation (default "
                         f"{DEFAULT_TIMEOUT:g})")


def _transfer(args: argparse.Namespace) -> int:
    from apps.licadmin.site_transfer import SiteTransfer, default_work_dir

    work = Path(args.work_dir) if args.work_dir else default_work_dir(args.src, args.dst)
    return _resumable(work, SiteTransfer(args.src, args.dst, args.feature, work,
                                         runner.connector(args.timeout)).run)


def _resumable(work: Path, run: Callable[[], int]) -> int:
    """Run a rehost or transfer; Ctrl-C says how it is finished (its work folder keeps
    every file written so far, and each server answers a repeated step with the same file)."""
    try:
        return run()
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: stopped by Ctrl-C (SIGINT); the same command finishes it "
              f"(work folder {work})", file=sys.stderr)
        return outcome.EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    def command() -> int:
        args = _parser().parse_args(argv)  # inside: Ctrl-C while it loads is one line too
        if args.command == "rehost":
            return _rehost(args)
        if args.command == "transfer":
            return _transfer(args)
        if args.command == "ui":
            from apps.licadmin.ui import run_ui

            return run_ui(args)
        if args.command in WORKFLOW:
            return run_workflow(args, list(sys.argv[1:] if argv is None else argv))
        if args.command == "seat" and args.seat_command in seat.OFFLINE:
            return seat.run_offline(args)
        client = runner.open_client(args.server, args.timeout)
        with client:
            return seat.run(args, client) if args.command == "seat" else run(args, client)

    return exit_code_of(PROG, command)


if __name__ == "__main__":
    sys.exit(main())

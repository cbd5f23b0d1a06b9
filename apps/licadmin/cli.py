"""``licadmin``: the administration tool: one server over a link, and the site workflow.

Single-server commands: info, status, request, apply, check. The site
workflow (issue 5): gather, license-info, requests, upload, send, confirm
(:mod:`apps.licadmin.onsite`, :mod:`apps.licadmin.online`), the one-go activate and
reclaim (:mod:`apps.licadmin.onego`), assign, and show.

A server is named by a link URL (``--server https://HOST:PORT?ca=FILE``,
``tcp://...``, ...; see :mod:`hw`). Exit codes are those of ``licagent``
(see agent.errors): the server's refusal comes back with its code. A link
failure (connection refused, timeout, TLS) exits 1 with a message. A
workflow step where some servers failed and others succeeded exits 10
(partial).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hw
from agent.errors import EXIT_OK, UsageError
from agent.formats import LICENSE_INFO_MAX, verify_receipt
from agent.messages import DeviceInfo
from agent.protocol import DEFAULT_LIMITS, self_signed_payload
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
from apps.licadmin import inventory, onego, online, onsite, outcome, runner
from apps.licadmin.console import Console
from hw.link import ServerClient

__all__ = ["main"]

PROG = "licadmin"
#: the site workflow's commands (the others talk to one server)
WORKFLOW = frozenset({"gather", "license-info", "requests", "upload", "send", "confirm",
                      "activate", "reclaim", "assign", "show"})
DEFAULT_TIMEOUT = 10.0


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
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--server", required=True, metavar="URL",
                        help="link URL of the server, e.g. https://HOST:PORT?ca=ca.pem")
        sp.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the server (default {DEFAULT_TIMEOUT:g})")
        return sp

    add_operation_commands(cmd, {
        "info": "fetch the server's signed device-information file",
        "status": "show the server's installed licenses",
        "request": "have the server create a signed request file",
        "license-info": "vendor-signed license information: request what it lists for the server",
        "apply": "send a vendor response file to the server to verify and apply",
        "check": "is FEATURE licensed on the server now? (exit 0 yes, 1 no)",
    })
    _workflow_parsers(sub)
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
        sp: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        if servers:
            sp.add_argument("--server", action="append", default=[], metavar="URL",
                            help="link URL of a server (repeat for each)")
            sp.add_argument("--servers", metavar="FILE.toml",
                            help='the site\'s servers: [[server]] tables with url = "..." '
                                 'and an optional name = "..."')
            sp.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT,
                            metavar="SECONDS",
                            help=f"how long to wait for each server (default {DEFAULT_TIMEOUT:g})")
            sp.add_argument("--jobs", type=_jobs, default=runner.DEFAULT_JOBS, metavar="N",
                            help=f"servers handled at once (default {runner.DEFAULT_JOBS})")
        if licensing:
            sp.add_argument("--licensing-server", required=True, metavar="URL",
                            help="the licensing server, e.g. http://127.0.0.1:8400")
        sp.add_argument("--json", action="store_true", help="print a summary as JSON")
        return sp

    sp = cmd("gather", "step 1 (site): gather every server's device information into SITE_INFO",
             servers=True)
    sp.add_argument("--out", required=True, metavar="SITE_INFO",
                    help="where to write the SITE_INFO bundle")
    sp.add_argument("--site", metavar="NAME", help="the site's name (default: from --servers, "
                                                   "else the file name)")
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
        if name == "reclaim":
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
    sp = cmd("show", "print any file of this project with its kind, signer and signature verdict")
    sp.add_argument("file", metavar="FILE",
                    help="a signed file, SITE_INFO bundle or PEM key of this project")
    sp.add_argument("--trust", action="append", default=[], metavar="VENDOR_PUB",
                    help="vendor public key (PEM) to check vendor signatures with")


def run_workflow(args: argparse.Namespace) -> int:
    """The workflow commands; each prints its lines (or one JSON document) and returns the code."""
    c = args.command
    console = Console(sys.stdout, quiet=args.json)
    if c == "show":
        from apps.licadmin.show import describe_file, load_trust, render_text

        d = describe_file(args.file, load_trust(args.trust))
        if args.json:
            print_json(d)
        else:
            print("\n".join(render_text(d, args.file)))
        return 4 if d["signature"]["verified"] is False else EXIT_OK
    licensing = (online.licensing_client(args.licensing_server)
                 if getattr(args, "licensing_server", None) else None)
    servers: list[inventory.ServerRef] = []
    site: str | None = None
    connect = runner.connector(DEFAULT_TIMEOUT)
    if hasattr(args, "servers"):
        servers, site = inventory.servers_from(args.server, args.servers, args.timeout)
        connect = runner.connector(args.timeout)
    try:
        return _run_steps(args, c, console, licensing, servers, site, connect)
    finally:
        inventory.close_servers(servers)


def _run_steps(args: argparse.Namespace, c: str, console: Console,
               licensing: online.Licensing | None, servers: list[inventory.ServerRef],
               site: str | None, connect: runner.Connect) -> int:
    if c in ("activate", "reclaim"):
        assert licensing is not None
        go = onego.OneGo(servers, licensing, connect, console, c,
                         getattr(args, "feature", []), args.work_dir, args.jobs)
        code, work, kept = go.run()
        if args.json:
            print_json({"command": c, "exit_code": code,
                         "work_dir": str(work) if kept else None,
                         "steps": [s.to_json() for s in go.steps]})
        else:
            failures = go.failures()
            if failures:
                print(f"{'partial' if code == outcome.EXIT_PARTIAL else 'failed'}: "
                      f"{len(failures)} failure(s):")
                for line in failures:
                    print(f"  {line}")
            if kept:
                print(f"files of every step are in {work}" + (
                    "; rerun the failed steps with them" if code != EXIT_OK else ""))
        return code
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
    if c == "gather":
        res = onsite.gather(servers, args.out, args.site or site, connect, console, args.jobs)
    elif c == "license-info":
        assert licensing is not None
        res = online.license_info(args.site_info, args.device, args.out, licensing)
    elif c == "requests":
        res = onsite.make_requests(servers, args.license_info, args.out_dir, connect, console,
                                   args.jobs)
    elif c == "upload":
        assert licensing is not None
        res = online.upload(args.requests, args.out_dir, args.receipts, licensing, console)
    elif c == "send":
        res = onsite.send(servers, args.responses, args.receipts_out, connect, console,
                          args.jobs)
    elif c == "confirm":
        assert licensing is not None
        res = online.confirm(args.receipts, licensing, console)
    else:
        raise UsageError(f"unknown command {c}")
    if args.json:
        print_json(res.to_json())
        return res.code
    if c == "send":
        for line in outcome.table(res.outcomes):
            print(line)
    for n in res.notes:
        print(n)
    if res.code == outcome.EXIT_PARTIAL:
        failed = sum(1 for o in res.outcomes if o.status == outcome.FAILED)
        print(f"partial: {failed} of {len(res.outcomes)} failed (listed above); "
              f"the others are done; rerun {c} for the failed ones")
    return res.code


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
        data = client.request(args.action, args.feature, license_info)
        write_output(args.out, data)
        print(f"wrote {args.action} request to {args.out}")
        return EXIT_OK
    if c == "apply":
        _check_folder(args.receipt_out)
        response = read_input(args.response, DEFAULT_LIMITS.max_file, "response file",
                              expect="response")
        res = client.apply(response)
        verify_receipt(res.receipt, response=response)  # what send checks, the same way
        show_applied(PROG, res, args.receipt_out)
        return EXIT_OK
    if c == "check":
        r = client.check(args.feature)
        return show_check(r.licensed, r.message)
    raise UsageError(f"unknown command {c}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def command() -> int:
        if args.command in WORKFLOW:
            return run_workflow(args)
        client: ServerClient = hw.connect(args.server, timeout=args.timeout)
        with client:
            return run(args, client)

    return exit_code_of(PROG, command)


if __name__ == "__main__":
    sys.exit(main())

"""``licagent``: the device-side command-line tool (init, info, status, request, apply, check, journal, trust-update, run).

Exit codes are a contract (see agent.errors and the README). Time comes from
the system clock, or from ``LICAGENT_TIME`` (POSIX seconds or ISO 8601) when
set, the way faketime would set it, so that clock faults can be staged.
"""

# ruff: noqa: E402 (the imports below run with the cyclic collector paused)
from __future__ import annotations

import gc

# ``licagent check`` and ``status`` are run per call by server software (issue 17 item 3): the
# cyclic collector, triggered over and over while the agent's modules load, costs such a
# process several percent of its time and finds nothing (modules, classes and functions live
# as long as the process). It is paused while they load, then what they made is frozen out of
# its sight (gc.freeze) and it runs as before for the command itself.
_COLLECTING = gc.isenabled()
gc.disable()

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cose import jsonable
from agent.errors import EXIT_OK, UsageError
from agent.formats import LICENSE_INFO_MAX, iso
from agent.messages import Action
from agent.protocol import DEFAULT_LIMITS
from agent.record import replace
from agent.service import MODELS, Agent
from apps.common import (
    add_operation_commands,
    add_version,
    dumps_json,
    exit_code_of,
    facts_provider,
    print_json,
    read_input,
    read_public_key,
    show_applied,
    show_check,
    show_info,
    show_status,
    tool_clock,
    write_output,
)

gc.freeze()
if _COLLECTING:
    gc.enable()

if TYPE_CHECKING:
    import argparse

__all__ = ["RUN_FLAGS", "fast_query_args", "fast_run_args", "main"]

PROG = "licagent"


def _parser() -> argparse.ArgumentParser:
    import argparse  # not for `licagent run`: see fast_run_args

    p = argparse.ArgumentParser(prog=PROG, description="License agent of a BMS automation server.")
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--state", required=True, metavar="DIR", help="license store directory")
        sp.add_argument("--facts", metavar="FILE",
                        help="hardware facts JSON, for simulated servers only: a store "
                             "initialised without it refuses it (default: $LICAGENT_FACTS, "
                             "else read this machine)")
        return sp

    sp = cmd("init", "provision a new license store with a fresh device key")
    sp.add_argument("--model", required=True, choices=MODELS, help="the server's model")
    sp.add_argument("--serial", metavar="SN",
                    help="the serial number printed on the server (default: read from the "
                         "hardware)")
    sp.add_argument("--trust", required=True, metavar="VENDOR_PUBKEY_FILE",
                    help="PEM public key of the vendor (repeat for several)", action="append")
    sp.add_argument("--alg", choices=("Ed25519", "ES256"), default="Ed25519",
                    help="device key algorithm (default Ed25519)")
    sp.add_argument("--key-store", metavar="URL",
                    help="keep the device key (ES256) and the store's generation in a TPM 2.0: "
                         "tpm:///dev/tpmrm0, or tpm+swtpm://HOST:PORT (default: device.key in "
                         "the store)")

    add_operation_commands(cmd, {
        "info": "write or show the signed device-information file",
        "status": "show the installed licenses",
        "request": "create a signed request file",
        "license-info": "vendor-signed license information: reclaim what it lists for this device",
        "apply": "verify a vendor response file and apply it",
        "check": "is FEATURE licensed now? (exit 0 yes, 1 no)",
    })

    sp = cmd("transfer", "move transferable licenses to a named new server directly: write "
                         "the signed transfer file (issue 16)")
    sp.add_argument("--feature", action="append", default=[], metavar="F", required=True,
                    help="a transferable license to move (repeat for each)")
    sp.add_argument("--to", required=True, metavar="DEVICE_ID",
                    help="the new server's device ID (licagent info there shows it)")
    sp.add_argument("--out", required=True, metavar="FILE", help="where to write the transfer file")
    sp = cmd("apply-transfer", "verify a transfer file for this server and install its "
                               "licenses (issue 16)")
    sp.add_argument("transfer", metavar="TRANSFER_FILE", help="the old server's transfer file")
    sp.add_argument("--receipt-out", metavar="FILE",
                    help="write the signed transfer receipt here (for licadmin confirm)")

    sp = cmd("journal", "print or verify the audit journal")
    sp.add_argument("--verify", action="store_true",
                    help="check the hash chain and MACs (exit 8 if the journal was cut or "
                         "changed)")
    sp.add_argument("--json", action="store_true", help="print the entries as JSON")

    sp = cmd("trust-update", "install a new set of vendor keys signed by a trusted key")
    sp.add_argument("update", metavar="TRUST_UPDATE_FILE",
                    help="the vendor-signed trust-update file")

    # issue 14: the system tree
    sp = cmd("attach", "attach this server to its parent once and inherit its licenses")
    sp.add_argument("--parent", required=True, metavar="URL",
                    help="the parent server's link URL (tcp://, mqtt://, usbdrop://...)")
    sp.add_argument("--url", metavar="URL",
                    help="where this server listens, for the parent's tree (optional)")
    sp.add_argument("--carried", action="store_true",
                    help="the usbdrop:// stick is carried to the parent and back (no daemon "
                         "serves it): write this server's attach request on it, or apply "
                         "the parent's answer it brings back")
    sp = cmd("answer-attach", "on the parent server: answer the attach requests on a carried "
                              "stick (and take the children's returns)")
    sp.add_argument("--stick", required=True, metavar="URL|DIR",
                    help="the stick: usbdrop:///media/usb0 or its folder")
    sp = cmd("use", "record how many units of FEATURE the host application needs")
    sp.add_argument("use", metavar="FEATURE=COUNT", help="e.g. bacnet-ip=1 (0 forgets it)")

    help_ = "serve the store on every --listen URL until SIGTERM (the daemon)"
    sp = sub.add_parser("run", help=help_, description=help_)
    for flag, (metavar, kind, text) in RUN_FLAGS.items():
        if kind == "list":
            sp.add_argument(flag, action="append", metavar=metavar, help=text)
        elif kind == "int":
            sp.add_argument(flag, type=int, metavar=metavar, help=text)
        elif isinstance(kind, tuple):
            sp.add_argument(flag, choices=kind, help=text)
        else:
            sp.add_argument(flag, metavar=metavar, help=text)
    return p


#: ``licagent run``'s flags: flag -> (metavar, kind, help); kind is "text", "list"
#: (repeatable), "int" or a tuple of choices. Both parsers below are made from it.
RUN_FLAGS: dict[str, tuple[str, str | tuple[str, ...], str]] = {
    "--config": ("FILE.toml", "text", "settings file; flags override it"),
    "--state": ("DIR", "text", "license store directory"),
    "--listen": ("URL", "list", "link to serve, e.g. tcp://0.0.0.0:7700 (repeat for several)"),
    "--facts": ("FILE", "text", "hardware facts JSON, for simulated servers only (a store "
                                "initialised without it refuses it)"),
    "--max-clients": ("N", "int", "connections served at once per listener (default 64)"),
    "--log-level": ("L", ("debug", "info", "warning", "error"), "log level (default info)"),
    # issue 14: the system tree
    "--parent": ("URL", "text", "the parent server's link URL: keep the relation live and "
                                "inherit its licenses"),
    "--renew-every": ("S", "int", "seconds between renewals with the parent (default 3600)"),
    "--lease": ("S", "int", "seconds a grant to a child server lasts (default 604800, "
                            "7 days)"),
}


def fast_run_args(argv: Sequence[str]) -> dict[str, Any] | None:
    """``licagent run``'s arguments without argparse, or None to let argparse handle them.

    The daemon is the one long-lived process on a controller, and argparse (with
    the shutil, gettext and locale modules its help formatter loads) costs it about
    1 MB of resident memory. Only a plain, well-formed ``run`` command line is taken
    here (``--flag VALUE`` or ``--flag=VALUE`` with the exact flags of
    :data:`RUN_FLAGS`); help, abbreviations, repeated single flags, bad values and
    every error go to argparse, so messages and exit codes stay argparse's own.
    """
    if not argv or argv[0] != "run":
        return None
    out: dict[str, Any] = {flag[2:].replace("-", "_"): None for flag in RUN_FLAGS}
    rest = list(argv[1:])
    while rest:
        token = rest.pop(0)
        flag, eq, value = token.partition("=")
        if flag not in RUN_FLAGS:
            return None
        if not eq:
            if not rest or rest[0].startswith("-"):
                return None
            value = rest.pop(0)
        _metavar, kind, _help = RUN_FLAGS[flag]
        key = flag[2:].replace("-", "_")
        if kind == "list":
            out[key] = [*(out[key] or []), value]
            continue
        if out[key] is not None:
            return None  # argparse's rule (the last one wins) stays argparse's
        if kind == "int":
            if not value.isascii() or not value.isdigit():
                return None
            out[key] = int(value)
        elif isinstance(kind, tuple) and value not in kind:
            return None
        else:
            out[key] = value
    return out


def run_daemon(config: str | None, state: str | None, listen: list[str] | None,
               facts: str | None, max_clients: int | None, log_level: str | None,
               parent: str | None = None, renew_every: int | None = None,
               lease: int | None = None) -> int:
    """``licagent run`` once its flags are parsed."""
    from apps.licagent import daemon

    cfg = daemon.resolve_config(
        Path(config) if config else None, state=state, listen=listen,
        facts=facts, max_clients=max_clients, log_level=log_level, parent=parent,
        renew_every=renew_every, lease=lease)
    limits = DEFAULT_LIMITS if cfg.lease == DEFAULT_LIMITS.grant_lease else replace(
        DEFAULT_LIMITS, grant_lease=cfg.lease)
    # the daemon keeps its store open; each request revalidates it under the lock
    return daemon.serve(Agent(cfg.state, facts_provider(str(cfg.facts) if cfg.facts else None),
                              clock=tool_clock, keep_open=True, limits=limits), cfg)


def run(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run_daemon(args.config, args.state, args.listen, args.facts, args.max_clients,
                          args.log_level, args.parent, args.renew_every, args.lease)
    agent = Agent(Path(args.state), facts_provider(args.facts), clock=tool_clock)
    c = args.command
    if c == "init":
        keys = [read_public_key(t, "vendor public key") for t in args.trust]
        from agent.cose import ALG_EDDSA, ALG_ES256

        store = agent.init(args.model, args.serial, keys,
                           ALG_ES256 if args.alg == "ES256" or args.key_store else ALG_EDDSA,
                           key_store=args.key_store)
        print(f"initialised {args.model} store in {args.state}")
        print(f"device_id {store.state.device_id}")
        if store.state.simulated:
            print(f"simulated server: bound to {agent.facts.origin}; the store accepts "
                  f"hardware facts only given this way (--facts or LICAGENT_FACTS)")
        else:
            print(f"bound to this machine's hardware ({', '.join(store.state.binding)}); "
                  f"a hardware facts override (--facts) will be refused")
        return EXIT_OK
    if c == "info":
        show_info(*agent.info(), args.out, args.json)
        return EXIT_OK
    if c == "status":
        show_status(agent.status(), args.json)
        return EXIT_OK
    if c == "request":
        features = list(args.feature)
        if args.license_info:
            features += agent.features_from_license_info(
                read_input(args.license_info, LICENSE_INFO_MAX, "license information file",
                           expect="license-info"), Action(args.action))
        data = agent.request(Action(args.action), features, force=args.force,
                             transfer_to=args.transfer_to)
        write_output(args.out, data)
        print(f"wrote {args.action} request to {args.out}")
        return EXIT_OK
    if c == "apply":
        if args.receipt_out and not Path(args.receipt_out).absolute().parent.is_dir():
            raise UsageError(f"cannot write {args.receipt_out}: its folder does not exist")
        res, warn = agent.apply(read_input(args.response, agent.limits.max_file, "response file",
                                            expect="response"))
        from agent.rpc import ApplyResult  # not loaded by check and status

        show_applied(PROG, ApplyResult.of(res, warn), args.receipt_out)
        return EXIT_OK
    if c == "attach" and args.carried:  # issue 14 item 2
        from apps.licagent.carried import attach_carried

        if args.url:
            raise UsageError("--url is for a live link: a carried stick has no address")
        return attach_carried(agent, args.parent, PROG)
    if c == "answer-attach":
        from apps.licagent.carried import answer_attach

        return answer_attach(agent, args.stick)
    if c == "attach":
        from apps.licagent.relation import renew_once

        out = renew_once(agent, args.parent, args.url)
        print(f"attached to parent {out.parent_id} at {args.parent}")
        print(f"inherited: {', '.join(out.installed) or 'nothing'}")
        for line in out.refused:
            print(f"refused: {line}")
        if out.returned:
            print(f"returned: {', '.join(out.returned)}")
        return EXIT_OK
    if c == "use":
        feature, eq, count = args.use.partition("=")
        if not eq or not count.isdigit():
            raise UsageError(f"{args.use!r}: expected FEATURE=COUNT, e.g. bacnet-ip=1")
        agent.use(feature, int(count))
        print(f"{feature}: {int(count)} required")
        return EXIT_OK
    if c == "check":
        count = args.count
        r = agent.check_count(args.feature, count)
        for w in r.warnings:
            print(f"{PROG}: warning: {w}", file=sys.stderr)
        return show_check(r.licensed, r.message)
    if c == "journal":
        # --verify alone prints only the count: every record is verified, none kept
        rep = agent.journal(entries=not args.verify or args.json)
        if args.json:
            print_json([{"n": e.n, "time": iso(e.time), "event": e.event,
                          "data": jsonable(e.data), "digest": e.digest.hex()}
                         for e in rep.entries])
        elif not args.verify:
            for e in rep.entries:
                print(f"{e.n:>5} {iso(e.time)} {e.event:<13} {dumps_json(_brief(e.data))}")
        if args.verify:
            tail = f"; {rep.torn_tail} bytes of a torn last record" if rep.torn_tail else ""
            print(f"journal OK: {rep.records} entries, hash chain and MACs verified, "
                  f"the record the state slots name in place{tail}",
                  file=sys.stderr if args.json else sys.stdout)
        return EXIT_OK
    if c == "transfer":  # issue 16
        if not Path(args.out).absolute().parent.is_dir():
            raise UsageError(f"cannot write {args.out}: its folder does not exist")
        data = agent.transfer_out(args.feature, args.to)
        write_output(args.out, data)
        print(f"removed {', '.join(dict.fromkeys(args.feature))} from this server; wrote the "
              f"transfer for device {args.to[:12]}… to {args.out} (it applies there once; "
              f"keep it: it is also this server's receipt)")
        return EXIT_OK
    if c == "apply-transfer":  # issue 16
        if args.receipt_out and not Path(args.receipt_out).absolute().parent.is_dir():
            raise UsageError(f"cannot write {args.receipt_out}: its folder does not exist")
        receipt, t = agent.apply_transfer(read_input(args.transfer, 256 * 1024,
                                                     "transfer file", expect="transfer"))
        if args.receipt_out:
            write_output(args.receipt_out, receipt)
        print(f"installed {', '.join(f'{x.feature}={x.count}' for x in t.moved)} from device "
              f"{t.device_id[:12]}…" + (f"; wrote transfer receipt to {args.receipt_out}"
                                        if args.receipt_out else ""))
        return EXIT_OK
    if c == "trust-update":
        upd = agent.trust_update(read_input(args.update, agent.limits.max_file,
                                             "trust-update file", expect="trust-update"))
        print(f"trusted keys replaced (version {upd.version}): "
              f"{', '.join(k.kid.hex()[:16] for k in upd.keys)}")
        return EXIT_OK
    raise UsageError(f"unknown command {c}")




def _brief(data: Any) -> Any:
    """An entry's data for the text listing: a file it carries (the response an apply
    recorded for replay) shown by its size, not as kilobytes of hex (``--json`` has it all)."""
    if isinstance(data, dict):
        return {k: f"<{len(v)} bytes>" if isinstance(v, bytes) and len(v) > 64 else jsonable(v)
                for k, v in data.items()}
    return jsonable(data)


def fast_query_args(argv: Sequence[str]) -> Any:
    """``licagent check``'s and ``status``'s arguments without argparse, or None.

    These are what server software runs per call, and argparse's help formatter
    (shutil, gettext, locale) is a sixth of such a process. Only a plain, well-formed
    line is taken here (``--state DIR`` or ``--state=DIR``, ``--facts FILE``, ``--json``
    for status, one FEATURE for check, each once); help, abbreviations, ``--`` and every
    error go to argparse, so messages and exit codes stay argparse's own.
    """
    if not argv or argv[0] not in ("check", "status"):
        return None
    from types import SimpleNamespace

    command = argv[0]
    out: dict[str, Any] = {"command": command, "state": None, "facts": None}
    if command == "status":
        out["json"] = False
    else:
        out["count"] = 1  # issue 14: --count N goes to argparse
    rest = list(argv[1:])
    while rest:
        token = rest.pop(0)
        flag, eq, value = token.partition("=")
        if flag in ("--state", "--facts"):
            if not eq:
                if not rest or rest[0].startswith("-"):
                    return None
                value = rest.pop(0)
            key = flag[2:]
            if out[key] is not None or not value:
                return None
            out[key] = value
        elif token == "--json" and command == "status" and not out["json"]:
            out["json"] = True
        elif command == "check" and "feature" not in out and token and token[0] != "-":
            out["feature"] = token
        else:
            return None
    if out["state"] is None or (command == "check" and "feature" not in out):
        return None
    return SimpleNamespace(**out)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    fast = fast_run_args(argv)
    if fast is not None:
        return exit_code_of(PROG, lambda: run_daemon(**fast))
    query = fast_query_args(argv)
    if query is not None:
        return exit_code_of(PROG, lambda: run(query))
    return exit_code_of(PROG, lambda: run(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

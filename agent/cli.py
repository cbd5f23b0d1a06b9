"""``licagent``: the device-side command-line tool (init, info, status, request, apply, check, journal, trust-update, run).

Exit codes are a contract (see agent.errors and the README). Time comes from
the system clock, or from ``LICAGENT_TIME`` (POSIX seconds or ISO 8601) when
set, the way faketime would set it, so that clock faults can be staged.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.cose import PublicKey, jsonable
from agent.errors import EXIT_OK, LicensingError, NotLicensedError, StorageError, UsageError
from agent.identity import FactsProvider
from agent.messages import Action, DeviceInfo
from agent.service import MODELS, Agent, iso
from agent.store import FileOps, atomic_write

if TYPE_CHECKING:
    import argparse

__all__ = ["main", "parse_time"]

PROG = "licagent"


def parse_time(text: str) -> int:
    """POSIX seconds, an ISO 8601 date-time, or an ISO date (meaning the end of that day, UTC)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    from datetime import UTC, datetime  # only when a date is given: the daemon never needs it

    try:
        if len(text) == 10:
            d = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return int(d.timestamp()) + 86399
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"cannot read time {text!r}: use ISO 8601 or POSIX seconds") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def _clock() -> int:
    fake = os.environ.get("LICAGENT_TIME")
    if fake:
        return parse_time(fake)
    return int(time.time())


def facts_provider(path: str | None) -> FactsProvider:
    path = path or os.environ.get("LICAGENT_FACTS")
    if path:
        from hw.facts import load_facts_file

        return load_facts_file(Path(path))
    from hw.facts import LinuxFactsProvider

    return LinuxFactsProvider()


def write_output(path: str, data: bytes) -> None:
    """Write a file the user asked for, atomically (no half-written file on a stick)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {p.parent} does not exist")
    atomic_write(FileOps(), p.absolute(), data, 0o644)


def read_toml(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A TOML file (``what`` names it in errors: config file, scenario, servers file).

    Raises:
        UsageError: it cannot be read or is not TOML.
    """
    import tomllib  # only for the tools' settings files: a daemon started by flags never pays

    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {what} {path}: no such file") from exc
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is not valid TOML: {exc}") from exc


def read_input(path: str, limit: int) -> bytes:
    """Read a file once, capped: the bytes read are the bytes verified and applied."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError as exc:
        raise UsageError(f"no such file: {path}") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {path}: {exc}") from exc
    return data


def _dumps(obj: Any, indent: int | None = None) -> str:
    import json  # not loaded by the daemon, which never prints JSON

    return json.dumps(obj, indent=indent)


def print_json(obj: Any) -> None:
    print(_dumps(obj, indent=2))


def info_json(info: DeviceInfo) -> dict[str, Any]:
    """The JSON of ``licagent info --json`` (and ``licadmin info --json``)."""
    return {
        "kind": "device-info",
        "device_id": info.device_id,
        "model": info.model,
        "serial": info.serial,
        "host_id": info.host_id,
        "hardware": info.hardware,
        "sequence": info.sequence,
        "state_digest": info.state_digest.hex(),
        "licenses": [{"feature": x.feature, "count": x.count,
                      "not_before": iso(x.not_before), "not_after": iso(x.not_after)}
                     for x in info.licenses],
        "created": iso(info.created),
    }


def show_info(data: bytes, info: DeviceInfo, out: str | None, as_json: bool) -> None:
    """``info [--out FILE] [--json]`` of licagent and licadmin: write the file, show it."""
    if out:
        write_output(out, data)
    if as_json:
        print_json(info_json(info))
    elif out:
        print(f"wrote device information of {info.device_id} to {out}")
    else:
        print(f"device_id {info.device_id}\nmodel     {info.model}\nserial    {info.serial}\n"
              f"host_id   {info.host_id}\nsequence  {info.sequence}\n"
              f"licenses  {len(info.licenses)}")


def show_status(st: Mapping[str, Any], as_json: bool) -> None:
    """``status [--json]`` of licagent and licadmin (the same JSON and text)."""
    if as_json:
        print_json(st)
    else:
        print_status(st)


def print_status(st: Mapping[str, Any]) -> None:
    """``licagent status`` (and ``licadmin status``) as text."""
    print(f"device {st['device_id']} ({st['model']}), sequence {st['sequence']}")
    if not st["licenses"]:
        print("  no licenses installed")
    for lic in st["licenses"]:
        window = f"{lic['not_before'] or '-'} .. {lic['not_after'] or 'perpetual'}"
        state = "ok" if lic["licensed_now"] else "NOT VALID NOW"
        print(f"  {lic['feature']:<24} count {lic['count']:<6} {window}  {state}")
    for o in st["outstanding_requests"]:
        print(f"  outstanding {o['action']} request {o['nonce'][:12]}… (sequence {o['sequence']})")
    for w in st["warnings"]:
        print(f"  warning: {w}")


def add_operation_commands(cmd: Callable[[str, str], argparse.ArgumentParser],
                           helps: Mapping[str, str]) -> None:
    """info, status, request, apply and check: licagent runs them on its store and licadmin
    on a server over a link, with the same arguments and flags (a contract), declared here
    once. ``cmd(name, help)`` makes a subcommand with the tool's own common flags."""
    sp = cmd("info", helps["info"])
    sp.add_argument("--out", metavar="FILE")
    sp.add_argument("--json", action="store_true")

    sp = cmd("status", helps["status"])
    sp.add_argument("--json", action="store_true")

    sp = cmd("request", helps["request"])
    sp.add_argument("action", choices=[a.value for a in Action])
    sp.add_argument("--feature", action="append", default=[], metavar="F")
    sp.add_argument("--license-info", metavar="FILE", help=helps["license-info"])
    sp.add_argument("--out", required=True, metavar="FILE")

    sp = cmd("apply", helps["apply"])
    sp.add_argument("response", metavar="RESPONSE_FILE")
    sp.add_argument("--receipt-out", metavar="FILE")

    sp = cmd("check", helps["check"])
    sp.add_argument("feature", metavar="FEATURE")


def _parser() -> argparse.ArgumentParser:
    import argparse  # not for `licagent run`: see fast_run_args

    p = argparse.ArgumentParser(prog=PROG, description="License agent of a BMS automation server.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--state", required=True, metavar="DIR", help="license store directory")
        sp.add_argument("--facts", metavar="FILE",
                        help="hardware facts JSON (simulated servers; default: read this machine, "
                             "or $LICAGENT_FACTS)")
        return sp

    sp = cmd("init", "provision a new license store with a fresh device key")
    sp.add_argument("--model", required=True, choices=MODELS)
    sp.add_argument("--serial", metavar="SN")
    sp.add_argument("--trust", required=True, metavar="VENDOR_PUBKEY_FILE",
                    help="PEM public key of the vendor (repeat for several)", action="append")
    sp.add_argument("--alg", choices=("Ed25519", "ES256"), default="Ed25519",
                    help="device key algorithm (default Ed25519)")

    add_operation_commands(cmd, {
        "info": "write or show the signed device-information file",
        "status": "show the installed licenses",
        "request": "create a signed request file",
        "license-info": "vendor-signed license information: reclaim what it lists for this device",
        "apply": "verify a vendor response file and apply it",
        "check": "is FEATURE licensed now? (exit 0 yes, 1 no)",
    })

    sp = cmd("journal", "print or verify the audit journal")
    sp.add_argument("--verify", action="store_true")
    sp.add_argument("--json", action="store_true")

    sp = cmd("trust-update", "install a new set of vendor keys signed by a trusted key")
    sp.add_argument("update", metavar="TRUST_UPDATE_FILE")

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
    "--facts": ("FILE", "text", "hardware facts JSON (simulated servers)"),
    "--max-clients": ("N", "int", "connections served at once per listener (default 64)"),
    "--log-level": ("L", ("debug", "info", "warning", "error"), "log level (default info)"),
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
               facts: str | None, max_clients: int | None, log_level: str | None) -> int:
    """``licagent run`` once its flags are parsed."""
    from agent import daemon

    cfg = daemon.resolve_config(
        Path(config) if config else None, state=state, listen=listen,
        facts=facts, max_clients=max_clients, log_level=log_level)
    return daemon.serve(Agent(cfg.state, facts_provider(str(cfg.facts) if cfg.facts else None),
                              clock=_clock), cfg)


def run(args: argparse.Namespace) -> int:
    if args.command == "run":
        return run_daemon(args.config, args.state, args.listen, args.facts, args.max_clients,
                          args.log_level)
    agent = Agent(Path(args.state), facts_provider(args.facts), clock=_clock)
    c = args.command
    if c == "init":
        keys = []
        for t in args.trust:
            try:
                keys.append(PublicKey.from_pem(Path(t).read_bytes()))
            except OSError as exc:
                raise UsageError(f"cannot read trust key {t}: {exc}") from exc
        from agent.cose import ALG_EDDSA, ALG_ES256

        store = agent.init(args.model, args.serial, keys,
                           ALG_ES256 if args.alg == "ES256" else ALG_EDDSA)
        print(f"initialised {args.model} store in {args.state}")
        print(f"device_id {store.state.device_id}")
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
                read_input(args.license_info, 16 * 1024 * 1024), Action(args.action))
        data = agent.request(Action(args.action), features)
        write_output(args.out, data)
        print(f"wrote {args.action} request to {args.out}")
        return EXIT_OK
    if c == "apply":
        if args.receipt_out and not Path(args.receipt_out).absolute().parent.is_dir():
            raise UsageError(f"cannot write {args.receipt_out}: its folder does not exist")
        res, warn = agent.apply(read_input(args.response, agent.limits.max_file))
        if args.receipt_out:
            write_output(args.receipt_out, res.receipt)
        if res.already_applied:
            print(f"already applied: this response made sequence {res.response.sequence}; "
                  f"nothing changed")
        else:
            parts = [f"{ch.op.value} {ch.feature}" for ch in res.response.changes] or ["no changes"]
            print(f"applied response: sequence {res.response.base_sequence} -> "
                  f"{res.response.sequence}: {', '.join(parts)}")
        if args.receipt_out:
            print(f"wrote receipt to {args.receipt_out}")
        if warn:
            print(f"{PROG}: warning: {warn}", file=sys.stderr)
        return EXIT_OK
    if c == "check":
        r = agent.check(args.feature)
        print(r.message)
        if not r.licensed:
            raise NotLicensedError(r.message)
        return EXIT_OK
    if c == "journal":
        rep = agent.journal()
        if args.json:
            print_json([{"n": e.n, "time": iso(e.time), "event": e.event,
                          "data": jsonable(e.data), "digest": e.digest.hex()}
                         for e in rep.entries])
        elif not args.verify:
            for e in rep.entries:
                print(f"{e.n:>5} {iso(e.time)} {e.event:<13} {_dumps(jsonable(e.data))}")
        if args.verify:
            tail = f"; {rep.torn_tail} bytes of a torn last record" if rep.torn_tail else ""
            print(f"journal OK: {len(rep.entries)} entries, hash chain and MACs verified{tail}",
                  file=sys.stderr if args.json else sys.stdout)
        return EXIT_OK
    if c == "trust-update":
        upd = agent.trust_update(read_input(args.update, agent.limits.max_file))
        print(f"trusted keys replaced (version {upd.version}): "
              f"{', '.join(k.kid.hex()[:16] for k in upd.keys)}")
        return EXIT_OK
    raise UsageError(f"unknown command {c}")




def exit_code_of(prog: str, command: Callable[[], int]) -> int:
    """Run a tool's command and turn what it raises into the documented exit code.

    ``not licensed`` exits 1 silently (``check``); any other LicensingError prints
    ``PROG: REASON: MESSAGE`` and exits with its code; Ctrl-C exits 130.
    """
    try:
        return command()
    except NotLicensedError:
        return NotLicensedError.exit_code
    except LicensingError as err:
        print(f"{prog}: {err.reason}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    fast = fast_run_args(argv)
    if fast is not None:
        return exit_code_of(PROG, lambda: run_daemon(**fast))
    args = _parser().parse_args(argv)
    return exit_code_of(PROG, lambda: run(args))


if __name__ == "__main__":
    sys.exit(main())

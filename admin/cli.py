"""``licadmin``: the administration tool: info, status, request, apply and check on a server over a link.

The server is named by a link URL (``--server https://HOST:PORT?ca=FILE``,
``tcp://...``, ...; see :mod:`hw`). Exit codes are those of ``licagent``
(see agent.errors): the server's refusal comes back with its code. A link
failure (connection refused, timeout, TLS) exits 1 with a message.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hw
from agent.cli import read_input, write_output
from agent.errors import EXIT_OK, LicensingError, NotLicensedError, UsageError
from agent.messages import Action, DeviceInfo
from agent.protocol import DEFAULT_LIMITS, self_signed_payload
from agent.service import iso
from hw.link import ServerClient

__all__ = ["main"]

PROG = "licadmin"
DEFAULT_TIMEOUT = 10.0
#: vendor-signed license information may list a whole site
LICENSE_INFO_MAX = 16 * 1024 * 1024


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
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--server", required=True, metavar="URL",
                        help="link URL of the server, e.g. https://HOST:PORT?ca=ca.pem")
        sp.add_argument("--timeout", type=_timeout, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help=f"how long to wait for the server (default {DEFAULT_TIMEOUT:g})")
        return sp

    sp = cmd("info", "fetch the server's signed device-information file")
    sp.add_argument("--out", metavar="FILE")
    sp.add_argument("--json", action="store_true")

    sp = cmd("status", "show the server's installed licenses")
    sp.add_argument("--json", action="store_true")

    sp = cmd("request", "have the server create a signed request file")
    sp.add_argument("action", choices=[a.value for a in Action])
    sp.add_argument("--feature", action="append", default=[], metavar="F")
    sp.add_argument("--license-info", metavar="FILE",
                    help="vendor-signed license information: request what it lists for the server")
    sp.add_argument("--out", required=True, metavar="FILE")

    sp = cmd("apply", "send a vendor response file to the server to verify and apply")
    sp.add_argument("response", metavar="RESPONSE_FILE")
    sp.add_argument("--receipt-out", metavar="FILE")

    sp = cmd("check", "is FEATURE licensed on the server now? (exit 0 yes, 1 no)")
    sp.add_argument("feature", metavar="FEATURE")
    return p


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def _info_json(info: DeviceInfo) -> dict[str, Any]:
    """The JSON of ``licagent info --json``."""
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


def _print_status(st: dict[str, Any]) -> None:
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
        assert isinstance(payload, DeviceInfo)
        if args.out:
            write_output(args.out, data)
        if args.json:
            _print_json(_info_json(payload))
        elif args.out:
            print(f"wrote device information of {payload.device_id} to {args.out}")
        else:
            print(f"device_id {payload.device_id}\nmodel     {payload.model}\n"
                  f"serial    {payload.serial}\nhost_id   {payload.host_id}\n"
                  f"sequence  {payload.sequence}\nlicenses  {len(payload.licenses)}")
        return EXIT_OK
    if c == "status":
        st = client.status()
        if args.json:
            _print_json(st)
        else:
            _print_status(st)
        return EXIT_OK
    if c == "request":
        _check_folder(args.out)
        license_info = (read_input(args.license_info, LICENSE_INFO_MAX)
                        if args.license_info else None)
        data = client.request(args.action, args.feature, license_info)
        write_output(args.out, data)
        print(f"wrote {args.action} request to {args.out}")
        return EXIT_OK
    if c == "apply":
        _check_folder(args.receipt_out)
        res = client.apply(read_input(args.response, DEFAULT_LIMITS.max_file))
        if args.receipt_out:
            write_output(args.receipt_out, bytes(res["receipt"]))
        if res["already_applied"]:
            print(f"already applied: this response made sequence {res['sequence']}; "
                  f"nothing changed")
        else:
            parts = list(res["changes"]) or ["no changes"]
            print(f"applied response: sequence {res['base_sequence']} -> {res['sequence']}: "
                  f"{', '.join(parts)}")
        if args.receipt_out:
            print(f"wrote receipt to {args.receipt_out}")
        if res.get("warning"):
            print(f"{PROG}: warning: {res['warning']}", file=sys.stderr)
        return EXIT_OK
    if c == "check":
        r = client.check(args.feature)
        print(r["message"])
        if not r["licensed"]:
            raise NotLicensedError(str(r["message"]))
        return EXIT_OK
    raise UsageError(f"unknown command {c}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        client: ServerClient = hw.connect(args.server, timeout=args.timeout)
        with client:
            return run(args, client)
    except NotLicensedError:
        return NotLicensedError.exit_code
    except LicensingError as err:
        print(f"{PROG}: {err.reason}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

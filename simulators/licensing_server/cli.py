"""``licserver``: the vendor side, minimal: key generation, issuing responses, checking receipts."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from agent.cose import ALG_EDDSA, ALG_ES256, PublicKey, SigningKey
from agent.durable import FileOps, atomic_write
from agent.errors import EXIT_OK, UsageError
from agent.formats import DEVICE_FILE_MAX, RECEIPT_MAX, iso, read_device_info, verify_receipt
from agent.messages import License
from apps.common import (
    add_version,
    exit_code_of,
    parse_time,
    read_input,
    read_public_key,
    read_signing_key,
    write_output,
)
from simulators.licensing_server.vendor import DAY, Grant, Vendor

__all__ = ["main", "parse_grant"]

PROG = "licserver"
GRANT_RE = re.compile(r"^(?P<feature>[^=@\s]+)=(?P<count>\d+)(?:@(?P<expiry>\S+))?$")


def _refuse_child(vendor: Vendor, request: str, db: str) -> None:
    """Refuse a demo license for a device the ledger knows as a child server."""
    from agent.errors import NotTopServerError
    from simulators.licensing_server.ledger import Ledger

    req = vendor.read_request(read_input(request, 64 * 1024, "request file", expect="request"))
    ledger = Ledger(db)
    try:
        parent = ledger.parent_of(req.device_id)
    finally:
        ledger.close()
    if parent is not None:
        raise NotTopServerError(
            f"request {request}: device {req.device_id[:12]}… is a child server of "
            f"{parent[:12]}… in the ledger: a demo license is for a top server only "
            f"(issue it to the top server; its children inherit it)")


def parse_grant(text: str) -> Grant:
    """``FEATURE=COUNT[@EXPIRY]``; EXPIRY is an ISO date (end of that day, UTC) or date-time."""
    m = GRANT_RE.match(text)
    if not m:
        raise UsageError(f"--grant {text!r}: expected FEATURE=COUNT or FEATURE=COUNT@EXPIRY")
    expiry = m["expiry"]
    return Grant(m["feature"], int(m["count"]), parse_time(expiry) if expiry else None)


def _now() -> int:
    fake = os.environ.get("LICSERVER_TIME") or os.environ.get("LICAGENT_TIME")
    return parse_time(fake) if fake else int(time.time())


def _load_key(path: str) -> SigningKey:
    return read_signing_key(path, "vendor key")


def _load_pub(path: str) -> PublicKey:
    return read_public_key(path, "vendor public key")


KEY_HELP = "the vendor's private signing key (PEM; licserver keygen wrote it)"
DB_HELP = "the ledger: an SQLite file (created if missing) or postgresql://USER@HOST:PORT/DATABASE"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Vendor licensing server (simulator).")
    add_version(p, PROG)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sp = sub.add_parser("keygen", help="create a vendor signing key pair")
    sp.add_argument("--out", required=True, metavar="DIR",
                    help="folder for vendor.key (mode 0600) and vendor.pub (created if missing)")
    sp.add_argument("--alg", choices=("Ed25519", "ES256"), default="Ed25519",
                    help="key algorithm (default Ed25519)")
    sp = sub.add_parser("issue", help="answer a request file with a signed response")
    sp.add_argument("--key", required=True, metavar="KEYFILE", help=KEY_HELP)
    sp.add_argument("--request", required=True, metavar="REQ",
                    help="the device's signed request file")
    sp.add_argument("--grant", action="append", default=[], metavar="FEATURE=COUNT[@EXPIRY]",
                    help="a license to install; EXPIRY is an ISO date (end of that day, UTC) "
                         "or date-time (repeat for each)")
    sp.add_argument("--remove", action="append", default=[], metavar="FEATURE",
                    help="a license to reclaim (repeat for each)")
    sp.add_argument("--inherit", action="store_true",
                    help="the granted licenses are inheritable: COUNT child servers of the "
                         "top server that activates them may inherit each")
    sp.add_argument("--demo", action="store_true",
                    help="the granted licenses are demo licenses: time-limited (@EXPIRY, "
                         "else --demo-days), for a top server only")
    sp.add_argument("--db", metavar="FILE|URL",
                    help="with --demo (issue 14): the ledger; a device it knows as a child "
                         "server (from its signed device information) is refused")
    sp.add_argument("--demo-days", type=int, default=30,
                    help="a demo license's length when --grant gives no @EXPIRY (default 30)")
    sp.add_argument("--grace-days", type=int, default=0,
                    help="grace period after each granted license's expiry (default 0)")
    sp.add_argument("--floating", action="store_true",
                    help="the granted licenses are floating: COUNT seats the device serves to "
                         "clients (licadmin seat checkout)")
    sp.add_argument("--transferable", action="store_true",
                    help="the granted licenses may move to another server directly "
                         "(licagent transfer; issue 16)")
    sp.add_argument("--valid-days", type=int, default=30,
                    help="how long the response may be applied (default 30 days)")
    sp.add_argument("--out", required=True, metavar="RESP",
                    help="where to write the signed response file")
    sp = sub.add_parser("license-info",
                        help="sign license information: which installed licenses to reclaim")
    sp.add_argument("--key", required=True, metavar="KEYFILE", help=KEY_HELP)
    sp.add_argument("--device-info", required=True, action="append", metavar="FILE",
                    help="a device-information file (licagent info --out; repeat for each)")
    sp.add_argument("--reclaim", action="append", default=[], metavar="FEATURE",
                    help="feature to reclaim where installed (default: every installed license)")
    sp.add_argument("--out", required=True, metavar="LICENSE_INFO",
                    help="where to write the signed license information")
    sp = sub.add_parser("verify-receipt", help="check a device's receipt (exit 0 only if genuine)")
    sp.add_argument("--trust", required=True, action="append", metavar="VENDOR_PUBKEY_FILE",
                    help="the vendor public key (PEM) the response inside must be signed "
                         "with (repeat for several)")
    sp.add_argument("receipt", metavar="RECEIPT_FILE", help="the device's receipt file")
    sp = sub.add_parser("serve", help="run the licensing server's HTTP API over a ledger "
                                      "(docs/licensing-api.md) until SIGTERM or SIGINT")
    sp.add_argument("--db", required=True, metavar="FILE|URL", help=DB_HELP)
    sp.add_argument("--key", required=True, metavar="KEYFILE", help=KEY_HELP)
    sp.add_argument("--port", required=True, type=int, metavar="N", help="0 picks a free port")
    sp.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    sp.add_argument("--cert", metavar="FILE", help="serve HTTPS with this PEM certificate "
                                                   "(chain) and --tls-key")
    sp.add_argument("--tls-key", metavar="FILE",
                    help="the PEM private key of --cert (--key is the vendor signing key)")
    sp.add_argument("--quiet", action="store_true", help="no log line per request on stderr")
    sp = sub.add_parser("entitle", help="record a purchase in the ledger (adds to an entitlement)")
    sp.add_argument("--db", required=True, metavar="FILE|URL", help=DB_HELP)
    sp.add_argument("--entitlement", required=True, metavar="ID",
                    help="the entitlement (order), free text as the vendor writes it")
    sp.add_argument("--product", required=True, metavar="NAME",
                    help="the product bought, free text")
    sp.add_argument("--feature", required=True, action="append", metavar="FEATURE=COUNT",
                    help="licenses bought, added to what the product holds (repeat for each)")
    sp.add_argument("--until", metavar="DATE",
                    help="subscription end: ISO date (end of that day, UTC) or date-time")
    sp.add_argument("--transferable", action="store_true",
                    help="these features are issued transferable: a server may move them to "
                         "another directly (licagent transfer; issue 16)")
    sp = sub.add_parser("token", help="bearer tokens of the HTTP API: create, revoke")
    tsub = sp.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    tp = tsub.add_parser("create", help="make a token; its secret goes to --out (mode 0600), "
                                        "the ledger keeps only its SHA-256")
    tp.add_argument("--db", required=True, metavar="FILE|URL", help=DB_HELP)
    tp.add_argument("--role", required=True, choices=("vendor-admin", "site-admin"),
                    help="vendor-admin: every route; site-admin: only its --entitlement(s)")
    tp.add_argument("--entitlement", action="append", default=[], metavar="ID",
                    help="an entitlement a site-admin token may use (repeat for each)")
    tp.add_argument("--name", metavar="NAME",
                    help="the token's name in the report and the log (default: --out's file "
                         "name without its extension)")
    tp.add_argument("--out", required=True, metavar="TOKEN_FILE",
                    help="where to write the token's secret (mode 0600)")
    tp = tsub.add_parser("revoke", help="refuse a token from now on (HTTP 401)")
    tp.add_argument("--db", required=True, metavar="FILE|URL", help=DB_HELP)
    tp.add_argument("--name", required=True, metavar="NAME", help="the token to revoke")
    sp = sub.add_parser("revoke", help="declare a device dead (RMA): its licenses go back to "
                                       "the entitlement, and every later vendor file for its "
                                       "site carries the signed revocation (issue 16)")
    sp.add_argument("--db", required=True, metavar="FILE|URL", help=DB_HELP)
    sp.add_argument("--device", required=True, metavar="DEVICE_ID",
                    help="the dead server's device ID (licserver report lists them)")
    sp.add_argument("--reason", required=True, metavar="TEXT",
                    help="why, for the report and the site (e.g. \"RMA 4711: board failed\")")
    sp = sub.add_parser("report", help="show entitlements, assignments, installed licenses, "
                                       "pending reclaims and tokens")
    sp.add_argument("--db", required=True, metavar="FILE|URL", help=DB_HELP)
    sp.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    if args.command == "keygen":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if (out / "vendor.key").exists():
            raise UsageError(f"{out / 'vendor.key'} exists; refusing to overwrite a signing key")
        key = SigningKey.generate(ALG_ES256 if args.alg == "ES256" else ALG_EDDSA)
        ops = FileOps()
        atomic_write(ops, out.absolute() / "vendor.key", key.to_pem(), 0o600)
        atomic_write(ops, out.absolute() / "vendor.pub", key.public.to_pem(), 0o644)
        print(f"wrote {out / 'vendor.key'} (mode 0600) and {out / 'vendor.pub'}")
        print(f"kid {key.public.kid.hex()}")
        return EXIT_OK
    if args.command == "issue":
        vendor = Vendor(_load_key(args.key))
        if not 0 <= args.grace_days <= 366:
            raise UsageError("--grace-days must be from 0 to 366")
        grants = [replace(parse_grant(g), grace=args.grace_days * DAY, floating=args.floating,
                          transferable=args.transferable) for g in args.grant]
        if args.inherit:  # issue 14: COUNT is the number of children that may inherit it
            grants = [replace(g, inherit=g.count) for g in grants]
        if args.demo:
            if not 1 <= args.demo_days <= 366:
                raise UsageError("--demo-days must be from 1 to 366")
            if not grants:
                raise UsageError("--demo needs --grant FEATURE=COUNT[@EXPIRY]")
            grants = [replace(g, demo=True, not_after=g.not_after if g.not_after is not None
                              else _now() + args.demo_days * DAY) for g in grants]
        if args.valid_days < 1:
            raise UsageError("--valid-days must be at least 1")
        if args.db and not args.demo:
            raise UsageError("--db is read with --demo only")
        if args.demo and args.db:  # issue 14: a demo license is for a top server only
            _refuse_child(vendor, args.request, args.db)
        data = vendor.issue(read_input(args.request, 64 * 1024, "request file",
                                       expect="request"), grants, args.remove, _now(),
                            args.valid_days * DAY)
        write_output(args.out, data)
        print(f"wrote response to {args.out}")
        return EXIT_OK
    if args.command == "license-info":
        vendor = Vendor(_load_key(args.key))
        entries: dict[str, tuple[list[License], list[License]]] = {}
        for f in args.device_info:
            info = read_device_info(read_input(f, DEVICE_FILE_MAX, "device information file",
                                               expect="device-info"))
            wanted = set(args.reclaim)
            picked = [x for x in info.licenses if not wanted or x.feature in wanted]
            entries[info.device_id] = (picked, [])
        write_output(args.out, vendor.license_info(entries, _now()))
        for dev, (picked, _) in entries.items():
            names = ", ".join(x.feature for x in picked) or "nothing"
            print(f"device {dev[:12]}…: reclaim {names}")
        print(f"wrote license information to {args.out}")
        return EXIT_OK
    if args.command == "verify-receipt":
        trusted = [_load_pub(t) for t in args.trust]
        rc = verify_receipt(read_input(args.receipt, RECEIPT_MAX, "receipt file",
                                       expect="receipt"), trusted)
        removed = ", ".join(f"{x.feature}={x.count}" for x in rc.removed) or "nothing"
        print(f"genuine receipt from device {rc.device_id}: sequence {rc.sequence}, "
              f"removed {removed}")
        if rc.seats_out:  # issue 15: a reclaim given --force while seats were out
            print(f"{len(rc.seats_out)} seat(s) still out, the last until "
                  f"{iso(rc.seats_end)}: " + ", ".join(
                      f"{s.feature} {s.client} until {iso(s.until)}"
                      f"{' (borrowed)' if s.borrowed else ''}" for s in rc.seats_out))
        return EXIT_OK
    if args.command in ("serve", "entitle", "report", "token", "revoke"):
        from simulators.licensing_server._commands import run as run_ledger_command

        return run_ledger_command(args, _load_key, _now)
    raise UsageError(f"unknown command {args.command}")


def main(argv: Sequence[str] | None = None) -> int:
    return exit_code_of(PROG, lambda: run(_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())

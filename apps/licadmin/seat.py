"""``licadmin seat``: check out, renew, return, list and verify the seats of a floating license.

``checkout``, ``renew``, ``return`` and ``list`` talk to the agent that serves the pool
over any link URL (issue 15); ``verify`` checks a seat token offline against the vendor's
public key. A checkout refused because every seat is out exits 9.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from agent.errors import EXIT_OK, UsageError
from agent.formats import iso
from agent.seats import MAX_BORROW, MAX_TOKEN
from apps.common import print_json, read_input, read_public_key, write_output
from hw.link import ServerClient

__all__ = ["add_parser", "run", "run_offline"]

#: commands that talk to no server
OFFLINE = frozenset({"verify"})


def _hours(text: str) -> float:
    try:
        h = float(text)
    except ValueError:
        h = -1.0
    if not 0 < h * 3600 <= MAX_BORROW:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number of hours in (0, {MAX_BORROW // 3600}]")
    return h


def add_parser(sub: Any, server_args: Any) -> None:
    """``licadmin seat SUBCOMMAND``; ``server_args(parser)`` adds --server and --timeout."""
    sp = sub.add_parser("seat", help="floating seats: checkout, renew, return, list, verify",
                        description="Check out, renew, return and list the seats of a floating "
                                    "license served by an agent, and verify a seat token.")
    seat = sp.add_subparsers(dest="seat_command", required=True, metavar="SEAT_COMMAND")
    p = seat.add_parser("checkout", help="check out one seat of FEATURE (exit 9: none free)")
    server_args(p)
    p.add_argument("feature", metavar="FEATURE", help="the floating license's feature")
    p.add_argument("--client", required=True, metavar="NAME",
                   help="who holds the seat (an editor's or client's name)")
    p.add_argument("--borrow-hours", type=_hours, metavar="H",
                   help="borrow the seat for H hours: a signed token valid offline")
    p.add_argument("--out", required=True, metavar="TOKEN_FILE",
                   help="where to write the seat token")
    p = seat.add_parser("renew", help="renew the lease of a checked-out seat")
    server_args(p)
    p.add_argument("token", metavar="TOKEN_FILE",
                   help="the seat token checkout wrote (rewritten with the new lease)")
    p = seat.add_parser("return", help="give a seat back (it is free at once)")
    server_args(p)
    p.add_argument("token", metavar="TOKEN_FILE", help="the seat token checkout wrote")
    p = seat.add_parser("list", help="the seats out and every floating license's pool")
    server_args(p)
    p.add_argument("--json", action="store_true", help="print the seats and pools as JSON")
    p = seat.add_parser("verify", help="check a seat token offline against the vendor's key")
    p.add_argument("token", metavar="TOKEN_FILE", help="a borrowed seat's token")
    p.add_argument("--trust", required=True, metavar="VENDOR_PUB",
                   help="the vendor's public key (PEM)")


def _token(path: str) -> bytes:
    return read_input(path, MAX_TOKEN, "seat token")


def _print_seat(what: str, feature: str, client: str, until: int, borrowed: bool) -> None:
    kind = "borrowed" if borrowed else "leased"
    print(f"{what} seat of {feature} for {client}: {kind} until {iso(until)}")


def run(args: argparse.Namespace, client: ServerClient) -> int:
    c = args.seat_command
    if c == "checkout":
        if not Path(args.out).absolute().parent.is_dir():
            raise UsageError(f"cannot write {args.out}: its folder does not exist")
        borrow = round(args.borrow_hours * 3600) if args.borrow_hours else None
        res = client.seat_checkout(args.feature, args.client, borrow)
        write_output(args.out, res.token)
        _print_seat("checked out", res.feature, res.client, res.until, res.borrowed)
        print(f"wrote seat token to {args.out}")
        return EXIT_OK
    if c == "renew":
        res = client.seat_renew(_token(args.token))
        write_output(args.token, res.token)
        _print_seat("renewed", res.feature, res.client, res.until, res.borrowed)
        return EXIT_OK
    if c == "return":
        res = client.seat_return(_token(args.token))
        print(f"returned seat of {res.feature} for {res.client}")
        return EXIT_OK
    if c == "list":
        lst = client.seat_list()
        seats = [{"feature": s["feature"], "client": s["client"], "since": iso(s["since"]),
                  "until": iso(s["until"]), "borrowed": s["borrowed"]} for s in lst.seats]
        pools = [{"feature": p["feature"], "count": p["count"], "out": p["out"],
                  "free": p["free"]} for p in lst.pools]
        if args.json:
            print_json({"seats": seats, "pools": pools})
            return EXIT_OK
        if not pools:
            print("no floating license installed")
        for p in pools:
            print(f"{p['feature']}: {p['out']} of {p['count']} out, {p['free']} free")
        pooled = {p["feature"] for p in pools}
        left = [s for s in seats if s["feature"] not in pooled]
        for group in ([s for s in seats if s["feature"] in pooled], left):
            if group is left and left:
                print("still out of reclaimed licenses (each runs to its end, never renewed):")
            for s in group:
                print(f"  {s['feature']}  {s['client']}  since {s['since']}  until "
                      f"{s['until']}{'  borrowed' if s['borrowed'] else ''}")
        return EXIT_OK
    raise UsageError(f"unknown seat command {c}")


def run_offline(args: argparse.Namespace) -> int:
    """``licadmin seat verify``: no server involved."""
    from agent.seats import verify_borrowed

    vendor = read_public_key(args.trust, "vendor public key")
    token = verify_borrowed(_token(args.token), vendor, _now())
    s = token.seat
    print(f"{args.token}: a valid borrowed seat of {s.feature} for {s.client}, served by "
          f"device {token.device_id[:12]}…, until {iso(s.until)}")
    return EXIT_OK


def _now() -> int:
    from apps.common import tool_clock

    return tool_clock()

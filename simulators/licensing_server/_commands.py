"""``licserver serve``, ``entitle``, ``token`` and ``report``: the commands over the ledger."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from agent.cose import SigningKey
from agent.durable import FileOps, atomic_write
from agent.errors import EXIT_OK, UsageError
from apps.common import parse_time
from simulators.licensing_server.ledger import Ledger, is_url
from simulators.licensing_server.server import serve, tls_context
from simulators.licensing_server.vendor import Vendor

__all__ = ["format_report", "parse_feature_count", "run"]

FEATURE_COUNT_RE = re.compile(r"^(?P<feature>[^=\s]+)=(?P<count>\d+)$")


def parse_feature_count(text: str) -> tuple[str, int]:
    """``FEATURE=COUNT``."""
    m = FEATURE_COUNT_RE.match(text)
    if not m:
        raise UsageError(f"--feature {text!r}: expected FEATURE=COUNT, e.g. bacnet=25")
    return m["feature"], int(m["count"])


def run(args: argparse.Namespace, load_key: Callable[[str], SigningKey],
        clock: Callable[[], int]) -> int:
    if args.command == "serve":
        return _serve(args, load_key, clock)
    if args.command == "entitle":
        features: dict[str, int] = {}
        for text in args.feature:
            f, n = parse_feature_count(text)
            features[f] = features.get(f, 0) + n
        until = parse_time(args.until) if args.until else None
        with Ledger(args.db, clock=clock) as ledger:
            ent = ledger.entitle(args.entitlement, args.product, features, until,
                                 transferable=args.transferable)
        for p in ent["products"]:
            if p["product"] != args.product:
                continue
            for f in p["features"]:
                if f["feature"] in features:
                    print(f"{args.entitlement} / {args.product}: {f['feature']} now {f['count']} "
                          f"(free {f['free']}), until {f['until'] or 'perpetual'}")
        return EXIT_OK
    if args.command == "token":
        return _token(args, clock)
    if args.command == "revoke":  # issue 16
        _existing(args.db)
        with Ledger(args.db, clock=clock) as ledger:
            r = ledger.revoke_device(args.device, args.reason)
        back = ", ".join(f"{f}={n}" for f, n in sorted(r["returned"].items())) or "nothing"
        print(f"device {_short(r['device_id'])} revoked at {r['revoked']} ({r['reason']}): "
              f"{back} back to {', '.join(r['entitlements']) or 'no entitlement'}")
        print("every later response and license information for its site carries the signed "
              "revocation; the licensing server answers nothing more for it")
        return EXIT_OK
    if args.command == "report":
        _existing(args.db)
        with Ledger(args.db, clock=clock) as ledger:
            rep = ledger.report()
        if args.json:
            print(json.dumps(rep, indent=2))
        else:
            print(format_report(rep), end="")
        return EXIT_OK
    raise UsageError(f"unknown command {args.command}")


def _existing(db: str) -> None:
    """Refuse a ledger file that is not there (a database server's ledger is checked on opening)."""
    if not is_url(db) and not Path(db).is_file():
        raise UsageError(f"no ledger at {db} (licserver entitle or serve creates one)")


def _token(args: argparse.Namespace, clock: Callable[[], int]) -> int:
    if args.token_command == "revoke":
        _existing(args.db)
        with Ledger(args.db, clock=clock) as ledger:
            tok = ledger.revoke_token(args.name)
        print(f"token {tok.name} ({tok.role.value}) "
              + ("was already revoked" if tok.revoked else "revoked: refused from now on"))
        return EXIT_OK
    out = Path(args.out)
    if not out.absolute().parent.is_dir():
        raise UsageError(f"cannot write {out}: its folder does not exist")
    if out.exists() or out.is_symlink():
        raise UsageError(f"{out} exists; refusing to overwrite a token file")
    name = args.name or out.name.split(".")[0]
    with Ledger(args.db, clock=clock) as ledger:
        secret = ledger.create_token(name, args.role, args.entitlement)
    atomic_write(FileOps(), out.absolute(), secret.encode() + b"\n", 0o600)
    scope = f" for {', '.join(sorted(set(args.entitlement)))}" if args.entitlement else ""
    print(f"token {name} ({args.role}{scope}) written to {out} (mode 0600); the ledger keeps "
          "only its SHA-256")
    return EXIT_OK


def _serve(args: argparse.Namespace, load_key: Callable[[str], SigningKey],
           clock: Callable[[], int]) -> int:
    if not 0 <= args.port <= 65535:
        raise UsageError("--port must be from 0 to 65535")
    if bool(args.cert) != bool(args.tls_key):
        raise UsageError("HTTPS needs both --cert FILE and --tls-key FILE")
    tls = tls_context(args.cert, args.tls_key) if args.cert else None
    vendor = Vendor(load_key(args.key))
    stop = threading.Event()

    def on_signal(_sig: int, _frame: FrameType | None) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with Ledger(args.db, vendor, clock=clock) as ledger:
            log = None if args.quiet else _stderr
            with serve(ledger, vendor, args.host, args.port, log=log, tls=tls) as srv:
                print(f"serving {srv.url}", flush=True)
                while not stop.wait(0.5):
                    pass
            print("licserver: stopped", file=sys.stderr, flush=True)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return EXIT_OK


def _stderr(line: str) -> None:
    print(f"licserver: {line}", file=sys.stderr, flush=True)


def _short(dev: str) -> str:
    return dev[:12] + "…"


def format_report(rep: dict[str, Any]) -> str:
    """The text table of ``licserver report``."""
    out: list[str] = []
    w = out.append
    w("entitlements")
    if not rep["entitlements"]:
        w("  none (licserver entitle records a purchase)")
    for e in rep["entitlements"]:
        for p in e["products"]:
            w(f"  {e['entitlement']} / {p['product']}")
            w(f"    {'feature':<24} {'count':>7} {'assigned':>9} {'used':>7} {'free':>7}  until")
            for f in p["features"]:
                w(f"    {f['feature']:<24} {f['count']:>7} {f['assigned']:>9} {f['used']:>7} "
                  f"{f['free']:>7}  {f['until'] or 'perpetual'}")
    w("assignments")
    if not rep["assignments"]:
        w("  none")
    for a in rep["assignments"]:
        w(f"  {a['entitlement']} / {a['product']}: {a['feature']}={a['count']} "
          f"to device {_short(a['device_id'])}")
    w("installed (as the ledger last saw it)")
    devices = {d["device_id"]: d for d in rep["devices"]}
    if not devices:
        w("  no device seen yet")
    for dev, d in devices.items():
        serial = f" {d['serial']}" if d.get("serial") else ""
        w(f"  device {_short(dev)} ({d['model']}{serial}), sequence {d['sequence']}, "
          f"from {d['source']}")
        lics = rep["installed"].get(dev, [])
        if not lics:
            w("    nothing installed")
        for lic in lics:
            w(f"    {lic['feature']:<24} count {lic['count']:<6} until "
              f"{lic['not_after'] or 'perpetual'}")
    w("awaiting confirmation (reclaimed, freed once the receipt arrives)")
    if not rep["pending_reclaims"]:
        w("  nothing")
    for r in rep["pending_reclaims"]:
        w(f"  device {_short(r['device_id'])}: {r['feature']}={r['count']} "
          f"(response {r['response_digest'][:12]}…, sequence {r['sequence']}, issued "
          f"{r['issued']})")
    w("tokens (the ledger keeps their SHA-256 only)")
    if not rep.get("tokens"):
        w("  none (licserver token create makes one)")
    for t in rep.get("tokens", []):
        scope = f" for {', '.join(t['entitlements'])}" if t["entitlements"] else ""
        state = f"revoked {t['revoked']}" if t["revoked"] else "live"
        w(f"  {t['name']}: {t['role']}{scope}, created {t['created']}, {state}")
    if rep.get("revocations"):  # issue 16: shown once a device was declared dead
        w("revoked (declared dead; their licenses went back to the entitlement)")
        for r in rep["revocations"]:
            w(f"  device {_short(r['device_id'])} at {r['revoked']}: {r['reason']}")
    if rep.get("restores"):  # issue 16: flagged once a restored store asked for something
        w("restored from a backup (requests refused: made on an older state than verified)")
        for r in rep["restores"]:
            w(f"  device {_short(r['device_id'] or '-')} at {r['time']}")
    if rep.get("moves"):  # issue 16: shown once a rehost moved something
        w("moved (rehost: licenses left the first device, proven by its receipt)")
        for m in rep["moves"]:
            w(f"  {m['time']}: {m['detail']}")
    if rep.get("systems"):  # issue 14 item 5: shown once a gathered server named a parent
        w("systems (from each server's signed device information, requests and its parent's "
          "receipts)")
        for sy in rep["systems"]:
            w(f"  top server {_short(sy['top'])}: {len(sy['servers'])} server(s) under it")
            for sv in sy["servers"]:
                w(f"    device {_short(sv['device_id'])} under {_short(sv['parent'])}")
    if rep.get("grant_returns"):  # issue 14 item 3: children's returns in their parents' receipts
        w("grant returns (each child's signed return, carried in its parent's receipt)")
        for g in rep["grant_returns"]:
            w(f"  {g['time']}: {g['detail']}")
    w(f"open responses: {rep['open_responses']}; operations recorded: {rep['operations']}")
    return "\n".join(out) + "\n"

"""Floating seats (issue 15): the pure rules of the pools that floating licenses serve.

A floating license (``License.floating``) of COUNT is served by the agent that holds it as
COUNT seats: a client checks one out for a lease (renewed while it runs) or borrows one
for hours (a signed token valid offline), and gives it back. A seat is *out* while its
``until`` lies after the time ``t`` it is looked at; ``t`` is always the later of the clock
and the store's high-water mark, so a clock set back never lengthens a lease, and a lapsed
seat is free again without anyone returning it.

Pure: seats, licenses and ``t`` in; seats out. The store keeps them (``AgentState.seats``),
:mod:`agent.service` journals each change (event ``seat``) before it is saved, and
:func:`redo` replays one such record after a crash.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from agent.cose import PublicKey, SigningKey, canonical, decode_sign1, sign1, strict_loads
from agent.errors import (
    ExpiredError,
    MalformedError,
    NoSeatError,
    NotLicensedError,
    SeatNotOutError,
    SeatsOutError,
    TrustError,
    UsageError,
    WrongDeviceError,
)
from agent.messages import (
    ChangeOp,
    Kind,
    License,
    Response,
    SeatOut,
    decode_payload,
    valid_feature,
)
from agent.record import record, replace

__all__ = [
    "DEFAULT_LEASE",
    "MAX_BORROW",
    "MAX_LEASE",
    "Pool",
    "SEAT_TOKEN_TYPE",
    "Seat",
    "SeatToken",
    "check_reclaim",
    "checkout",
    "give_back",
    "live",
    "pools",
    "read_token",
    "redo",
    "renew",
    "seats_of",
    "sign_token",
    "still_out",
    "verify_borrowed",
]

#: a seat not renewed is free again after this many seconds (the issue's "5 minutes")
DEFAULT_LEASE = 300
#: bounds on a lease and a borrow period the client may ask for
MIN_LEASE = 10
MAX_LEASE = 24 * 3600
MAX_BORROW = 90 * 24 * 3600
MAX_CLIENT = 128
SEAT_ID_LEN = 16
#: seats one agent has out at once, all pools together: each is about 100 bytes of the
#: store's slot (at most 1 MiB, rewritten by every change)
MAX_SEATS_OUT = 4096


def valid_client(name: object) -> str:
    """A client's name: 1 to 128 printable characters, one line."""
    if (not isinstance(name, str) or not 0 < len(name) <= MAX_CLIENT
            or not name.isprintable()):
        raise UsageError(f"client name {str(name)[:40]!r} must be 1 to {MAX_CLIENT} printable "
                         "characters")
    return name


@record(frozen=True, order=True)
class Seat:
    """One seat out: who holds it, since when, until when (POSIX seconds)."""

    feature: str
    until: int
    id: bytes
    client: str
    since: int
    borrowed: bool = False

    def to_cbor(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "feature": self.feature, "client": self.client,
                               "since": self.since, "until": self.until}
        if self.borrowed:
            out["borrowed"] = True
        return out

    @classmethod
    def from_cbor(cls, m: object) -> Seat:
        if not isinstance(m, Mapping):
            raise MalformedError("a seat is not a map")
        try:
            seat = cls(valid_feature(m["feature"]), m["until"], m["id"],
                       valid_client(m["client"]), m["since"], m.get("borrowed") is True)
        except (KeyError, UsageError) as exc:
            raise MalformedError(f"a seat has the wrong shape: {exc}") from exc
        if (not isinstance(seat.id, bytes) or len(seat.id) != SEAT_ID_LEN
                or type(seat.since) is not int or type(seat.until) is not int
                or not 0 <= seat.since <= seat.until):
            raise MalformedError("a seat has the wrong shape (id, since, until)")
        return seat

    def as_json(self) -> dict[str, Any]:
        """The entry of ``licadmin seat list --json`` (times are ISO strings there)."""
        return {"feature": self.feature, "client": self.client, "since": self.since,
                "until": self.until, "borrowed": self.borrowed}


@record(frozen=True)
class Pool:
    """One floating license and how many of its seats are out at ``t``."""

    feature: str
    count: int
    out: int
    #: when the next seat lapses (None when none is out)
    next_free: int | None

    @property
    def free(self) -> int:
        return max(0, self.count - self.out)


def live(seats: Iterable[Seat], t: int) -> tuple[Seat, ...]:
    """The seats still out at ``t`` (a lapsed lease or borrow is free again)."""
    return tuple(s for s in seats if s.until > t)


def seats_of(seats: Iterable[Seat], feature: str, t: int) -> list[Seat]:
    return [s for s in live(seats, t) if s.feature == feature]


def _licensed(lic: License, t: int) -> bool:
    if lic.count <= 0 or (lic.not_before is not None and t < lic.not_before):
        return False
    return lic.not_after is None or t <= lic.not_after


def _pool_license(licenses: Iterable[License], feature: str, t: int) -> License:
    lic = next((x for x in licenses if x.feature == feature), None)
    if lic is None:
        raise NotLicensedError(f"{feature} is not installed on this server: no seat to serve")
    if not lic.floating:
        raise UsageError(f"{feature} is a node-locked license of this server, not a floating "
                         "one: it serves no seats")
    if not _licensed(lic, t):
        valid = " to ".join(_iso(x) if x is not None else "-"
                            for x in (lic.not_before, lic.not_after))
        raise NotLicensedError(f"{feature} is not licensed now (valid {valid}, count "
                               f"{lic.count}): no seat to serve")
    return lic


def pools(licenses: Iterable[License], seats: Iterable[Seat], t: int) -> list[Pool]:
    """Every floating license with its seats out at ``t``."""
    out = live(seats, t)
    result = []
    for lic in licenses:
        if lic.floating:
            mine = [s.until for s in out if s.feature == lic.feature]
            result.append(Pool(lic.feature, lic.count, len(mine), min(mine) if mine else None))
    return result


def _end(lic: License, want: int) -> int:
    return want if lic.not_after is None else min(want, lic.not_after)


def checkout(licenses: Iterable[License], seats: Iterable[Seat], feature: str, client: str,
             t: int, seat_id: bytes, lease: int = DEFAULT_LEASE,
             borrow: int | None = None) -> tuple[tuple[Seat, ...], Seat]:
    """Give ``client`` one seat of ``feature`` at ``t``: for ``lease`` seconds, or borrowed
    for ``borrow`` seconds; never past the license's end.

    Returns:
        the seats out after it (lapsed ones dropped) and the new seat.

    Raises:
        NoSeatError: every seat is out (exit 9), naming when the next one is free.
        NotLicensedError: the feature is not installed or not valid now.
        UsageError: the license is not floating; a lease or borrow period out of range.
    """
    lic = _pool_license(licenses, feature, t)
    valid_client(client)
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise UsageError(f"a lease must be {MIN_LEASE} to {MAX_LEASE} seconds, not {lease}")
    if borrow is not None and not 0 < borrow <= MAX_BORROW:
        raise UsageError(f"a borrow period must be up to {MAX_BORROW // 3600} hours")
    now_out = live(seats, t)
    mine = [s for s in now_out if s.feature == feature]
    if len(mine) >= lic.count:
        raise NoSeatError(feature, len(mine), lic.count, min(s.until for s in mine))
    if len(now_out) >= MAX_SEATS_OUT:  # the agent's own limit, whatever the pools hold
        raise NoSeatError(feature, len(now_out), MAX_SEATS_OUT,
                          min(s.until for s in now_out))
    if any(s.id == seat_id for s in now_out):
        raise UsageError("seat ID in use")  # 16 random bytes: never in practice
    seat = Seat(feature, _end(lic, t + (borrow if borrow is not None else lease)), seat_id,
                client, t, borrow is not None)
    return tuple(sorted((*now_out, seat))), seat


def _find(seats: Iterable[Seat], seat_id: bytes, t: int, what: str) -> Seat:
    seat = next((s for s in live(seats, t) if s.id == seat_id), None)
    if seat is None:
        raise SeatNotOutError(f"cannot {what} the seat {seat_id.hex()[:12]}…: it is not out any "
                              "more (returned, lapsed, or its license was reclaimed); check "
                              "out a new one")
    return seat


def renew(licenses: Iterable[License], seats: Iterable[Seat], seat_id: bytes, t: int,
          lease: int = DEFAULT_LEASE) -> tuple[tuple[Seat, ...], Seat]:
    """Extend a leased seat to ``t + lease`` (never shorter, never past the license's end).

    Raises:
        SeatNotOutError: no such seat out (returned or lapsed: check out again), exit 6.
        UsageError: a borrowed seat (it runs to its end or is returned).
    """
    seat = _find(seats, seat_id, t, "renew")
    if seat.borrowed:
        raise UsageError(f"seat {seat_id.hex()[:12]}… is borrowed until its end: it is not "
                         "renewed (return it to free it early)")
    lic = _pool_license(licenses, seat.feature, t)
    if not MIN_LEASE <= lease <= MAX_LEASE:
        raise UsageError(f"a lease must be {MIN_LEASE} to {MAX_LEASE} seconds, not {lease}")
    n = len(seats_of(seats, seat.feature, t))
    if n > lic.count:  # the pool was cut below the seats out: they run out, none renewed
        raise SeatNotOutError(f"cannot renew the seat {seat_id.hex()[:12]}…: {seat.feature} "
                              f"now has {lic.count} seat(s) and {n} are out; it ends at "
                              f"{_iso(seat.until)}")
    new = replace(seat, until=max(seat.until, _end(lic, t + lease)))
    rest = [s for s in live(seats, t) if s.id != seat_id]
    return tuple(sorted((*rest, new))), new


def give_back(seats: Iterable[Seat], seat_id: bytes, t: int) -> tuple[tuple[Seat, ...], Seat]:
    """Return a seat: it is free at once.

    Raises:
        SeatNotOutError: no such seat out, exit 6.
    """
    seat = _find(seats, seat_id, t, "return")
    return tuple(s for s in live(seats, t) if s.id != seat_id), seat


def check_reclaim(licenses: Iterable[License], seats: Iterable[Seat], features: Iterable[str],
                  t: int) -> None:
    """Refuse to reclaim a floating license while seats of it are out (item 6).

    ``features``: those to reclaim (empty: every installed license).

    Raises:
        SeatsOutError: naming each holder and until when (exit 9); ``--force`` goes on.
    """
    wanted = set(features) or {lic.feature for lic in licenses}
    held = [s for s in live(seats, t) if s.feature in wanted]
    if held:
        who = ", ".join(f"{s.client} until {_iso(s.until)}{' (borrowed)' if s.borrowed else ''}"
                        for s in sorted(held, key=lambda s: (s.until, s.client))[:10])
        more = f" and {len(held) - 10} more" if len(held) > 10 else ""
        raise SeatsOutError(
            f"cannot reclaim {', '.join(sorted({s.feature for s in held}))}: {len(held)} "
            f"seat(s) out: {who}{more}; have them returned, or give --force (the receipt "
            f"then records them; the last ends at {_iso(max(s.until for s in held))})")


def still_out(after: Iterable[License], seats: Iterable[Seat], t: int) -> tuple[SeatOut, ...]:
    """The seats out at ``t`` whose license ``after`` a change no longer covers: removed,
    no longer floating, or cut below the seats out (what a receipt records)."""
    pools = {lic.feature: lic for lic in after if lic.floating}
    out = live(seats, t)
    hit = []
    for s in out:
        lic = pools.get(s.feature)
        if lic is None or sum(1 for x in out if x.feature == s.feature) > lic.count:
            hit.append(SeatOut(s.feature, s.client, s.until, s.borrowed))
    return tuple(sorted(hit, key=lambda x: (x.feature, x.until, x.client)))


def redo(seats: Iterable[Seat], data: Mapping[str, Any], t: int) -> tuple[Seat, ...]:
    """Replay one journaled ``seat`` record (its recorded effect, at its time ``t``)."""
    op, t = data["op"], data.get("t", t)  # the time the seats were looked at (``t`` below)
    rest = live(seats, t)
    if op in ("checkout", "renew"):
        seat = Seat.from_cbor(data["seat"])
        return tuple(sorted((*(s for s in rest if s.id != seat.id), seat)))
    if op == "return":
        sid = data["id"]
        return tuple(s for s in rest if s.id != sid)
    if op == "drop":  # the seats of a reclaimed license (item 6)
        gone = set(data["features"])
        return tuple(s for s in rest if s.feature not in gone)
    raise MalformedError(f"unknown seat record {op!r}")


# ---------------------------------------------------------------- the seat token

SEAT_TOKEN_TYPE = "application/vnd.bms-license.seat+cbor"
MAX_TOKEN = 64 * 1024


@record(frozen=True)
class SeatToken:
    """What a seat token says: the seat, the serving device and its key (docs/protocol.md)."""

    seat: Seat
    device_id: str
    device_alg: int
    device_key: bytes
    #: a borrowed seat's proof (issue 15 item 4): the vendor-signed response that installed
    #: the floating license on the serving device; None for a leased seat
    license: bytes | None = None

    def payload(self) -> bytes:
        m: dict[str, Any] = {"v": 1, "device_id": self.device_id, "device_alg": self.device_alg,
                             "device_key": self.device_key, **self.seat.to_cbor()}
        if self.license is not None:
            m["license"] = self.license
        return canonical(m)

    @classmethod
    def from_payload(cls, data: bytes) -> SeatToken:
        m = strict_loads(data, max_size=MAX_TOKEN)
        if not isinstance(m, dict) or m.get("v") != 1:
            raise MalformedError("a seat token's payload is not a version 1 map")
        extra = set(m) - {"v", "device_id", "device_alg", "device_key", "license", "id",
                          "feature", "client", "since", "until", "borrowed"}
        if extra:
            raise MalformedError(f"a seat token has unknown field {', '.join(sorted(extra))}")
        lic = m.get("license")
        if (not isinstance(m.get("device_id"), str) or type(m.get("device_alg")) is not int
                or not isinstance(m.get("device_key"), bytes)
                or not (lic is None or isinstance(lic, bytes))):
            raise MalformedError("a seat token names no device (device_id, device_alg, "
                                 "device_key)")
        return cls(Seat.from_cbor(m), m["device_id"], m["device_alg"], m["device_key"], lic)


def sign_token(token: SeatToken, key: SigningKey) -> bytes:
    """The token as a COSE_Sign1 file signed by the serving device's key."""
    return sign1(token.payload(), key, SEAT_TOKEN_TYPE)


def read_token(data: bytes, key: PublicKey | None = None) -> SeatToken:
    """A seat token's content, its signature checked against the device key it carries
    (``key``: the key it must be, for the serving agent itself).

    Raises:
        MalformedError: not a seat token (exit 3).
        TrustError: a bad signature, or a key that is not the device's (exit 4).
        WrongDeviceError: signed by another device than ``key`` (exit 5).
    """
    env = decode_sign1(data, max_size=MAX_TOKEN)
    if env.content_type != SEAT_TOKEN_TYPE:
        raise MalformedError(f"not a seat token (content type {env.content_type!r}, expected "
                             f"{SEAT_TOKEN_TYPE})")
    token = SeatToken.from_payload(env.payload)
    carried = PublicKey(token.device_alg, token.device_key)
    if carried.kid.hex() != token.device_id or env.kid != carried.kid:
        raise TrustError("the seat token's device_id is not the SHA-256 of the key it carries")
    if key is not None and carried.kid != key.kid:
        raise WrongDeviceError(f"the seat token was served by device {token.device_id[:12]}…, "
                               f"not by this one ({key.kid.hex()[:12]}…)")
    env.verify_with(carried)
    return token


def verify_borrowed(data: bytes, vendor: PublicKey, now: int) -> SeatToken:
    """Check a borrowed seat token offline: the serving device's signature, then the chain to
    the vendor (the vendor-signed response that installed the floating license on that very
    device), then its period.

    Raises:
        MalformedError: not a seat token, or one with no borrowed seat (exit 3).
        TrustError: a bad signature anywhere in the chain, a proof for another device or
            feature, a seat beyond what the license allows (exit 4).
        ExpiredError: the borrow period has ended (exit 7).
    """
    token = read_token(data)
    seat = token.seat
    if not seat.borrowed:
        raise MalformedError("this seat token is a lease, not a borrowed seat: it is valid only "
                             "while its server renews it (check out with --borrow-hours)")
    if token.license is None:
        raise TrustError("the borrowed seat carries no vendor-signed license: its chain does "
                         "not reach the vendor")
    env = decode_sign1(token.license, max_size=MAX_TOKEN)
    if env.content_type != Kind.RESPONSE.content_type:
        raise TrustError("the seat token's proof is not a vendor response file")
    if env.kid != vendor.kid:
        raise TrustError(f"the seat token's license is signed by key {env.kid.hex()[:16]}, not "
                         f"by the trusted vendor key {vendor.kid.hex()[:16]}")
    resp = decode_payload(strict_loads(env.verify_with(vendor), max_size=MAX_TOKEN), Response)
    if resp.device_id != token.device_id:
        raise TrustError(f"the seat token's license was issued to device "
                         f"{resp.device_id[:12]}…, not to the serving device "
                         f"{token.device_id[:12]}…")
    change = next((c for c in resp.changes if c.feature == seat.feature), None)
    if change is None or change.op is ChangeOp.REMOVE or not change.floating:
        raise TrustError(f"the seat token's license does not install {seat.feature} as a "
                         "floating license")
    if change.count < 1 or (change.not_after is not None and seat.until > change.not_after):
        raise TrustError(f"the borrowed seat outlives its license (ends {change.not_after})")
    if now >= seat.until:
        raise ExpiredError(f"the borrowed seat of {seat.feature} ended at {_iso(seat.until)}")
    return token


def _iso(t: int) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

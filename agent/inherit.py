"""Inherited licenses (issue 14): the grant a parent server signs for a child, its
verification on the child, the return a child signs, and the grant rules, all pure.

A grant is a COSE_Sign1 signed by the parent's device key (docs/protocol.md, "Grants").
It carries the vendor response that installed the inheritable license on the parent, so
the child verifies the whole chain with its own trusted vendor keys: vendor → the
parent's license (a response for the parent's device ID, setting the feature with
``inherit`` ≥ 1) → the parent's grant naming this child, inside its lease.

The rules, on the parent: a grant only for an own license with ``inherit`` ≥ 1 that is
valid now; at most ``inherit`` children hold a live grant of a feature (one slot each,
a slot freed only when its lease ended or the child returned it); a recalled grant is
never renewed; a lease never outlives the license's own end. On the child: a grant
counts only inside its lease and its license's window.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

from agent.cose import PublicKey, SigningKey, sign1, strict_loads
from agent.digest import sha256
from agent.errors import (
    ExpiredError,
    GrantsHeldError,
    MalformedError,
    NotTopServerError,
    TrustError,
    UsageError,
    WrongDeviceError,
)
from agent.messages import (
    MAX_COUNT,
    MAX_TIME,
    ChangeOp,
    DeviceInfo,
    License,
    Response,
    valid_device_id,
    valid_feature,
)
from agent.protocol import (
    AgentState,
    CheckResult,
    Limits,
    check_feature,
    licensed_at,
    read_signed,
    self_signed_payload,
    verify_vendor_file,
)
from agent.record import record
from agent.tree import MAX_DEPTH, Child, GrantOut, Inherited, ParentLink, SystemState

__all__ = [
    "GRANT_MAX",
    "MAX_LEASE",
    "PARENT_MODELS",
    "Grant",
    "GrantReturn",
    "IssuedGrants",
    "check_units",
    "feature_rows",
    "holders",
    "issue_grants",
    "make_return",
    "parent_link",
    "read_receipt_return",
    "read_return",
    "status_licenses",
    "verify_grant",
]

GRANT_CONTENT_TYPE = "application/vnd.bms-license.grant+cbor"
RETURN_CONTENT_TYPE = "application/vnd.bms-license.grant-return+cbor"
#: a grant file: its fields plus the parent's vendor response (at most 64 KiB)
GRANT_MAX = 72 * 1024
RETURN_MAX = 16 * 1024
#: the longest lease a child accepts, whatever its parent says
MAX_LEASE = 31 * 86400
#: a child's device information older (or newer) than this is not taken as its renewal
INFO_FRESH = 86400
#: models that may have child servers
PARENT_MODELS = ("Enterprise-Server",)
#: child servers one parent keeps: each is a record in the parent's state slot (at most
#: MAX_REPORT bytes of its report), and the slot stays below the store's 1 MiB cap
MAX_CHILDREN = 1000
#: a child's report kept by its parent, encoded; a larger one is kept without its own
#: children (licadmin tree then asks that child directly), then without its features
MAX_REPORT = 256


def _iso(t: int) -> str:
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _need_map(obj: object, what: str) -> Mapping[str, Any]:
    if not isinstance(obj, dict) or not all(isinstance(k, str) for k in obj):
        raise MalformedError(f"{what} must be a map with text keys")
    return obj


def _exact_keys(m: Mapping[str, Any], what: str, keys: Iterable[str]) -> None:
    want = set(keys)
    if set(m) != want:
        missing, extra = want - set(m), set(m) - want
        raise MalformedError(f"{what} " + (f"lacks {', '.join(sorted(missing))}" if missing
                                           else f"has unknown field {', '.join(sorted(extra))}"))


def _uint(v: object, what: str, maximum: int) -> int:
    if type(v) is not int or not 0 <= v <= maximum:
        raise MalformedError(f"{what} must be an integer from 0 to {maximum}")
    return v


def _bytes(v: object, what: str, maximum: int) -> bytes:
    if not isinstance(v, bytes) or len(v) > maximum:
        raise MalformedError(f"{what} must be a byte string of at most {maximum} bytes")
    return v


def _alg(v: object) -> int:
    if type(v) is not int:
        raise MalformedError("an alg must be an integer")
    return v


# ---------------------------------------------------------------- the two files


@record(frozen=True)
class Grant:
    """A parent's grant of one inheritable feature to one child, for a lease."""

    KIND: ClassVar[str] = "grant"
    parent_id: str
    parent_key: PublicKey
    child_id: str
    feature: str
    slot: int
    count: int
    issued: int
    lease_until: int
    license: bytes

    def encode(self) -> bytes:
        from agent.cose import canonical

        return canonical({"v": 1, "kind": self.KIND, "parent_id": self.parent_id,
                          "parent_alg": self.parent_key.alg, "parent_key": self.parent_key.raw,
                          "child_id": self.child_id, "feature": self.feature,
                          "slot": self.slot, "count": self.count, "issued": self.issued,
                          "lease_until": self.lease_until, "license": self.license})

    @classmethod
    def decode(cls, payload: bytes) -> Grant:
        m = _need_map(strict_loads(payload, max_size=GRANT_MAX), "grant")
        _exact_keys(m, "grant", ("v", "kind", "parent_id", "parent_alg", "parent_key",
                                 "child_id", "feature", "slot", "count", "issued",
                                 "lease_until", "license"))
        if m["v"] != 1 or type(m["v"]) is not int or m["kind"] != cls.KIND:
            raise MalformedError("not a version 1 grant")
        issued = _uint(m["issued"], "issued", MAX_TIME)
        until = _uint(m["lease_until"], "lease_until", MAX_TIME)
        if until < issued:
            raise MalformedError("grant's lease ends before it was issued")
        return cls(valid_device_id(m["parent_id"], "parent_id"),
                   PublicKey(_alg(m["parent_alg"]), _bytes(m["parent_key"], "parent_key", 65)),
                   valid_device_id(m["child_id"], "child_id"), valid_feature(m["feature"]),
                   _uint(m["slot"], "slot", MAX_COUNT), _uint(m["count"], "count", MAX_COUNT),
                   issued, until, _bytes(m["license"], "license", 64 * 1024))


@record(frozen=True)
class GrantReturn:
    """A child's signed statement that it gave back its grants of ``features``."""

    KIND: ClassVar[str] = "grant-return"
    child_id: str
    child_key: PublicKey
    parent_id: str
    features: tuple[str, ...]
    grants: tuple[bytes, ...]  # SHA-256 of each grant file given back
    returned: int

    def encode(self) -> bytes:
        from agent.cose import canonical

        return canonical({"v": 1, "kind": self.KIND, "child_id": self.child_id,
                          "child_alg": self.child_key.alg, "child_key": self.child_key.raw,
                          "parent_id": self.parent_id, "features": list(self.features),
                          "grants": list(self.grants), "returned": self.returned})

    @classmethod
    def decode(cls, payload: bytes) -> GrantReturn:
        m = _need_map(strict_loads(payload, max_size=RETURN_MAX), "grant return")
        _exact_keys(m, "grant return", ("v", "kind", "child_id", "child_alg", "child_key",
                                        "parent_id", "features", "grants", "returned"))
        if m["v"] != 1 or type(m["v"]) is not int or m["kind"] != cls.KIND:
            raise MalformedError("not a version 1 grant return")
        feats, grants = m["features"], m["grants"]
        if not isinstance(feats, list) or not isinstance(grants, list) or len(feats) > 256 \
                or len(grants) > 256:
            raise MalformedError("a grant return's features and grants are arrays")
        return cls(valid_device_id(m["child_id"], "child_id"),
                   PublicKey(_alg(m["child_alg"]), _bytes(m["child_key"], "child_key", 65)),
                   valid_device_id(m["parent_id"], "parent_id"),
                   tuple(valid_feature(f) for f in feats),
                   tuple(_bytes(g, "grant digest", 32) for g in grants),
                   _uint(m["returned"], "returned", MAX_TIME))


def _open(data: bytes, content_type: str, what: str, cap: int) -> Any:
    env = read_signed(data)  # size-capped by the protocol's file limit
    if len(data) > cap:
        raise MalformedError(f"{what} is larger than {cap} bytes")
    if env.content_type != content_type:
        raise MalformedError(f"not a {what} (the header says {env.content_type!r})")
    return env


def _proof_license(resp: Response, feature: str) -> License | None:
    for ch in resp.changes:
        if ch.feature == feature and ch.op is not ChangeOp.REMOVE:
            return ch.license()
    return None


def verify_grant(state: AgentState, data: bytes, now: int, limits: Limits) -> Inherited:
    """A grant file checked on the child, end to end (nothing persisted).

    Raises:
        MalformedError, TrustError: not a grant, or a signature in the chain fails.
        WrongDeviceError: for another child, or from a server that is not this one's parent.
        ExpiredError: the lease has ended (or the license in it has).
    """
    env = _open(data, GRANT_CONTENT_TYPE, "grant file", GRANT_MAX)
    grant = Grant.decode(env.payload)  # the key comes from the payload: checked below
    parent = state.system.parent
    if grant.child_id != state.device_id:
        raise WrongDeviceError(f"grant of {grant.feature} is for child {grant.child_id[:12]}…, "
                               f"this server is {state.device_id[:12]}…")
    if parent is None or grant.parent_id != parent.device_id:
        raise WrongDeviceError(
            f"grant of {grant.feature} comes from {grant.parent_id[:12]}…, which is not this "
            f"server's parent ({parent.device_id[:12] + '…' if parent else 'none attached'})")
    if grant.parent_key != parent.key or env.kid != parent.key.kid:
        raise TrustError(f"grant of {grant.feature} is not signed by the parent's key")
    env.verify_with(parent.key)
    # vendor → parent's license: the response in the grant, checked with this server's
    # own trusted vendor keys (not the parent's word)
    lim = limits
    resp, _renv = verify_vendor_file(state, grant.license, now, Response, lim)
    if resp.device_id != grant.parent_id:
        raise WrongDeviceError(f"grant of {grant.feature}: its vendor response is for device "
                               f"{resp.device_id[:12]}…, not the parent")
    lic = _proof_license(resp, grant.feature)
    if lic is None or lic.inherit < 1:
        raise TrustError(f"grant of {grant.feature}: the parent's vendor response does not make "
                         f"{grant.feature} inheritable")
    if grant.slot >= lic.inherit:
        raise TrustError(f"grant of {grant.feature} uses slot {grant.slot}, but the license may "
                         f"be inherited by {lic.inherit} children only")
    if grant.count != 1:
        raise MalformedError(f"grant of {grant.feature} gives {grant.count} units; a grant "
                             f"gives 1 (the right to use the feature on this server)")
    if grant.lease_until - grant.issued > MAX_LEASE:
        raise TrustError(f"grant of {grant.feature} is leased for more than "
                         f"{MAX_LEASE // 86400} days")
    t = max(now, state.clock_hwm)
    if t > grant.lease_until:
        raise ExpiredError(f"grant of {grant.feature} ended at {_iso(grant.lease_until)}")
    return Inherited(grant.feature, grant.parent_id, 1, grant.slot, grant.issued,
                     grant.lease_until, lic.not_before, lic.not_after, lic.grace, lic.demo, data)


def read_return(state: AgentState, data: bytes) -> GrantReturn:
    """A child's grant return checked on the parent with the child's recorded key.

    Raises:
        MalformedError, TrustError, WrongDeviceError: not a genuine return to this server.
    """
    env = _open(data, RETURN_CONTENT_TYPE, "grant return", RETURN_MAX)
    ret = GrantReturn.decode(env.payload)
    child = next((c for c in state.system.children if c.device_id == ret.child_id), None)
    if child is None:
        raise WrongDeviceError(f"grant return from {ret.child_id[:12]}…, which is not a child "
                               f"of this server")
    if ret.parent_id != state.device_id:
        raise WrongDeviceError(f"grant return is addressed to {ret.parent_id[:12]}…, not this "
                               f"server")
    if ret.child_key != child.key or env.kid != child.key.kid:
        raise TrustError("grant return is not signed by the child's key")
    env.verify_with(child.key)
    return ret


def read_receipt_return(data: bytes, parent_id: str) -> GrantReturn:
    """A grant return carried in ``parent_id``'s receipt, checked without the parent's state
    (the licensing server's side): signed by the key it carries, which the child's device ID
    is the SHA-256 of, and addressed to ``parent_id``.

    Raises:
        MalformedError, TrustError, WrongDeviceError: not a genuine return to that server.
    """
    env = _open(data, RETURN_CONTENT_TYPE, "grant return", RETURN_MAX)
    ret = GrantReturn.decode(env.payload)
    if ret.child_key.kid.hex() != ret.child_id or env.kid != ret.child_key.kid:
        raise TrustError("grant return is not signed by the key of the child it names")
    if ret.parent_id != parent_id:
        raise WrongDeviceError(f"grant return is addressed to {ret.parent_id[:12]}…, not "
                               f"{parent_id[:12]}…")
    env.verify_with(ret.child_key)
    return ret


def make_return(state: AgentState, features: Iterable[str], key: SigningKey, now: int
                ) -> tuple[bytes, tuple[str, ...]]:
    """The child's signed return of its grants of ``features`` (those it holds)."""
    parent = state.system.parent
    feats = tuple(sorted(set(features)))
    held = [g for g in state.system.inherited if g.feature in feats]
    if parent is None:
        raise UsageError("this server is attached to no parent: nothing to return")
    ret = GrantReturn(state.device_id, state.device_key, parent.device_id, feats,
                      tuple(sha256(g.file) for g in held), now)
    return sign1(ret.encode(), key, RETURN_CONTENT_TYPE), feats


# ---------------------------------------------------------------- the parent's rules


@record(frozen=True)
class IssuedGrants:
    """What one renewal decided: the event to commit and the answer to send."""

    event: dict[str, Any]
    files: tuple[bytes, ...]
    recalled: tuple[str, ...]
    refused: tuple[str, ...]  # features with no free slot, as lines


def parent_link(parent_info: DeviceInfo, url: str | None, parent_depth: int, now: int,
                child: AgentState) -> ParentLink:
    """The relation a child records on attach, after the checks of the tree's shape.

    Raises:
        NotTopServerError: a parent that cannot have children, or a fourth level.
        UsageError: attaching to itself, or to another parent while attached.
    """
    if parent_info.device_id == child.device_id:
        raise UsageError("a server cannot be its own parent")
    if parent_info.model not in PARENT_MODELS:
        raise NotTopServerError(f"parent {parent_info.device_id[:12]}… is an "
                                f"{parent_info.model}; only an {' or '.join(PARENT_MODELS)} "
                                f"has child servers")
    depth = parent_depth + 1
    if depth > MAX_DEPTH:
        raise NotTopServerError(f"parent {parent_info.device_id[:12]}… is at level "
                                f"{parent_depth + 1} of 3: the tree has at most three levels")
    if child.system.children and depth >= MAX_DEPTH:
        raise NotTopServerError("this server has children itself: under that parent the "
                                "tree would have more than three levels")
    demos = [lic.feature for lic in child.licenses if lic.demo]
    if demos:
        raise NotTopServerError(f"this server holds demo license(s) {', '.join(demos)}: demo "
                                f"licenses live on the top server; reclaim them first")
    return ParentLink(parent_info.device_id, parent_info.device_key, parent_info.model, url,
                      depth, now)


def issue_grants(state: AgentState, info_file: bytes, url: str | None,
                 report: Mapping[str, Any], now: int, key: SigningKey, limits: Limits
                 ) -> IssuedGrants:
    """The parent's side of a renewal: verify the child, then grant, renew, refuse or
    recall each inheritable feature by the rules above.

    Raises:
        MalformedError, TrustError: the child's device information is not genuine.
        NotTopServerError: this server cannot have children at its level.
        ValidityError: the device information is not fresh.
    """
    info, child_key = self_signed_payload(info_file, DeviceInfo)
    if state.model not in PARENT_MODELS:
        raise NotTopServerError(f"this server is an {state.model}; only an "
                                f"{' or '.join(PARENT_MODELS)} has child servers")
    if state.system.depth >= MAX_DEPTH:
        raise NotTopServerError("this server is at the third level of its system: it cannot "
                                "have child servers")
    if info.device_id == state.device_id or (
            state.system.parent is not None and info.device_id == state.system.parent.device_id):
        raise UsageError(f"server {info.device_id[:12]}… cannot be a child of this server "
                         f"(it is this server or its parent)")
    if abs(info.created - now) > INFO_FRESH:
        raise ExpiredError(f"the child's device information was made at {_iso(info.created)}, "
                           f"more than a day from this server's clock ({_iso(now)})")
    t = max(now, state.clock_hwm)
    sys_ = state.system
    files: list[bytes] = []
    outs: list[dict[str, Any]] = []
    recalled: list[str] = []
    refused: list[str] = []
    dropped: list[str] = []
    mine = {g.feature: g for g in sys_.granted if g.child_id == info.device_id}
    for lic in state.licenses:
        if lic.inherit < 1:
            continue
        proof = sys_.proofs.get(lic.feature)
        held = mine.get(lic.feature)
        if proof is None or not licensed_at(lic, t):
            if held is not None:
                dropped.append(lic.feature)
            continue
        if lic.feature in sys_.recalled or (held is not None and held.recalled):
            if held is not None:
                recalled.append(lic.feature)
            continue
        if held is not None and held.until >= t and held.slot < lic.inherit:
            slot = held.slot
        else:  # new, ended, or a slot beyond a license updated to fewer children
            used = {g.slot for g in sys_.active_grants(lic.feature, t)
                    if g.child_id != info.device_id}
            free = [s for s in range(lic.inherit) if s not in used]
            if not free:
                refused.append(f"{lic.feature}: all {lic.inherit} inheritance slot(s) are held "
                               f"by other children")
                if held is not None:
                    dropped.append(lic.feature)
                continue
            slot = free[0]
        until = now + limits.grant_lease
        if lic.not_after is not None:
            until = min(until, lic.not_after + lic.grace)
        grant = Grant(state.device_id, state.device_key, info.device_id, lic.feature, slot, 1,
                      now, until, proof)
        files.append(sign1(grant.encode(), key, GRANT_CONTENT_TYPE))
        outs.append(GrantOut(info.device_id, lic.feature, slot, now, until).to_cbor())
    for feature in mine:
        if feature not in {lic.feature for lic in state.licenses if lic.inherit > 0}:
            dropped.append(feature)
    known = any(c.device_id == info.device_id for c in sys_.children)
    if not known and len(sys_.children) >= MAX_CHILDREN:
        raise UsageError(f"this server already keeps {MAX_CHILDREN} child servers, the most "
                         f"one parent keeps; attach {info.device_id[:12]}… to another "
                         f"Enterprise Server")
    child = Child(info.device_id, child_key, info.model, url, now, _kept_report(report))
    event = {"child": child.to_cbor(), "grants": outs, "dropped": sorted(set(dropped)),
             "expired_before": t}
    return IssuedGrants(event, tuple(files), tuple(recalled), tuple(refused))


def _kept_report(report: Mapping[str, Any]) -> dict[str, Any]:
    """What a parent keeps of a child's report: its name, features and children, within
    :data:`MAX_REPORT` bytes (identity fields are the child record's own)."""
    from agent.cose import canonical

    kept: dict[str, Any] = {k: report[k] for k in ("serial", "features", "children")
                            if k in report}
    kept["features"] = [[f.get(k) for k in ("feature", "required", "licensed", "inherited",
                                            "available")]
                        for f in kept.get("features", []) if isinstance(f, dict)]
    for drop in ("children", "features"):
        if len(canonical(kept)) <= MAX_REPORT:
            break
        kept.pop(drop, None)
    return kept if len(canonical(kept)) <= MAX_REPORT else {}


def holders(state: AgentState, features: Iterable[str], t: int) -> list[GrantOut]:
    """The live grants of ``features`` (children still holding them at ``t``)."""
    feats = set(features)
    return [g for g in state.system.granted if g.feature in feats and g.until >= t]


def held_refusal(state: AgentState, grants: list[GrantOut], renew_hint: str) -> GrantsHeldError:
    """The one-line refusal of a reclaim while children hold grants."""
    parts = [f"{g.child_id[:12]}… ({g.feature}, lease until {_iso(g.until)})" for g in grants]
    latest = max(g.until for g in grants)
    return GrantsHeldError(
        f"{len(grants)} grant(s) still held by child servers: {'; '.join(parts)}. They are "
        f"recalled now and given back at each child's next renewal{renew_hint}; reclaim again "
        f"afterwards, or reclaim with --force (the receipt then records the leases, which run "
        f"until {_iso(latest)} at the latest)")


# ---------------------------------------------------------------- what a child can use


def check_units(state: AgentState, feature: str, now: int, count: int, limits: Limits
                ) -> CheckResult:
    """Are ``count`` units of ``feature`` licensed: own license plus live grants."""
    own = check_feature(state, feature, now, limits)
    t = max(now, state.clock_hwm)
    own_units = own.license.count if own.licensed and own.license is not None else 0
    grants = [g for g in state.system.inherited if g.feature == feature]
    live = [g for g in grants if g.valid_at(t)]
    inherited = sum(g.count for g in live)
    total = own_units + inherited
    if not grants:
        if own.licensed and count > own_units:
            return CheckResult(feature, False, f"{feature}: {count} units asked, {own_units} "
                               f"licensed", own.license, own.in_grace, own.clock_set_back)
        return own
    if total >= count and total > 0:
        g = max(live, key=lambda x: x.lease_until)
        parts = (f"own {own_units} + " if own_units else "") + (
            f"inherited {inherited} from parent {g.parent_id[:12]}… until "
            f"{_iso(g.lease_until)}")
        return CheckResult(feature, True, f"{feature}: licensed, count {total} ({parts})",
                           own.license, own.in_grace, own.clock_set_back)
    if total > 0:  # some units, fewer than asked
        why = f"{count} units asked, {total} licensed"
    else:
        ended = max(grants, key=lambda x: x.lease_until)
        why = (f"inherited from parent {ended.parent_id[:12]}…, whose lease ended at "
               f"{_iso(ended.lease_until)} (the parent was not heard from since; renew it "
               f"through licagent run --parent)" if t > ended.lease_until else
               "the inherited license is outside its validity window")
    return CheckResult(feature, False, f"{feature}: not licensed: {why}", own.license, False,
                       own.clock_set_back)


def grant_edge(state: AgentState, feature: str, now: int) -> str | None:
    """As :func:`agent.protocol.clock_edge`, for the grants held: a lease or window that
    ended between the clock mark and ``now`` moves the mark, so a clock wound back later
    never revives it."""
    if now <= state.clock_hwm:
        return None
    for g in state.system.inherited:
        if g.feature == feature and g.valid_at(now) != g.valid_at(state.clock_hwm):
            return "lease-ended" if now > g.lease_until else "window"
    return None


def status_licenses(state: AgentState, now: int) -> list[dict[str, Any]]:
    """The inherited entries of ``status --json``'s licenses (source, parent, lease_until)."""
    t = max(now, state.clock_hwm)
    return [{"feature": g.feature, "count": g.count, "not_before": _opt_iso(g.not_before),
             "not_after": _opt_iso(g.not_after), "grace_seconds": g.grace,
             "licensed_now": g.valid_at(t), "source": "inherited", "parent": g.parent_id,
             "lease_until": _iso(g.lease_until)}
            for g in state.system.inherited]


def _opt_iso(t: int | None) -> str | None:
    return None if t is None else _iso(t)


def feature_rows(state: AgentState, now: int) -> list[dict[str, Any]]:
    """Per feature: required, licensed (own + inherited), inherited, available."""
    t = max(now, state.clock_hwm)
    names = sorted({lic.feature for lic in state.licenses}
                   | {g.feature for g in state.system.inherited} | set(state.system.required))
    rows = []
    for f in names:
        own = sum(lic.count for lic in state.licenses if lic.feature == f and licensed_at(lic, t))
        inh = sum(g.count for g in state.system.inherited if g.feature == f and g.valid_at(t))
        granted = len(state.system.active_grants(f, t))
        req = state.system.required.get(f, 0)
        rows.append({"feature": f, "required": req, "licensed": own + inh, "inherited": inh,
                     "available": own + inh - req - granted, "granted": granted})
    return rows


def tree_report(state: AgentState, now: int) -> dict[str, Any]:
    """This server's node of the system tree, its children's last reports under it."""
    p = state.system.parent
    return {"device_id": state.device_id, "model": state.model, "serial": state.serial,
            "parent": None if p is None else p.device_id, "depth": state.system.depth,
            "features": feature_rows(state, now),
            "children": [_child_report(c) for c in state.system.children]}


_ROW_KEYS = ("feature", "required", "licensed", "inherited", "available")


def _child_report(c: Child) -> dict[str, Any]:
    """A child's node as its parent last heard it (the rows kept as arrays)."""
    r = dict(c.report)
    rows = [dict(zip(_ROW_KEYS, row, strict=False)) if isinstance(row, list) else row
            for row in r.get("features", [])]
    return {**r, "features": rows, "children": r.get("children", []), "device_id": c.device_id,
            "model": c.model, "url": c.url, "seen": c.seen}


def grants_summary(sys_: SystemState) -> list[str]:
    return [f"{g.feature} slot {g.slot} -> {g.child_id[:12]}…" for g in sys_.granted]

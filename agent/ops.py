"""The operations a server offers over any link, mapped onto :class:`agent.service.Agent`.

One function per entry of :data:`agent.rpc.OPERATIONS`, each taking its typed
arguments and returning its typed result record; every link (serial, TCP, TLS,
HTTPS, the USB mailbox, MQTT and the simulators) calls :meth:`AgentOps.__call__`
through :func:`agent.rpc.answer`. Refusals are raised as LicensingError and reach
the client with their exit code and reason.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import LicensingError, NotInTreeError, UsageError
from agent.rpc import (
    SEAT_PAGE,
    ApplyArgs,
    ApplyResult,
    ApplyTransferResult,
    CheckArgs,
    FeatureCheck,
    Handler,
    InfoResult,
    JournalResult,
    LicenseInfoResult,
    NoArgs,
    Op,
    RelayArgs,
    RenewArgs,
    RenewResult,
    RequestArgs,
    RequestResult,
    ReturnArgs,
    ReturnResult,
    SeatCheckoutArgs,
    SeatListArgs,
    SeatListResult,
    SeatResult,
    SeatTokenArgs,
    StatusResult,
    TransferArgs,
    TransferResult,
    TreeResult,
    UseArgs,
    read_args,
)
from agent.service import Agent

__all__ = ["AgentOps"]


class AgentOps:
    """Callable ``(op, args) -> result`` serving one agent; serialises store access.

    The store itself is also protected by an flock, so a ``licagent`` CLI call
    beside the daemon never interleaves with it; the thread lock here only
    keeps the daemon's own threads from queueing on that flock. The table of
    implementations is the class's (:data:`_IMPLS`), not each instance's: a
    fleet simulator holds ten thousand of these.
    """

    def __init__(self, agent: Agent, log: Callable[[str], None] | None = None,
                 relay: Callable[[str, str, Mapping[str, Any]], Any] | None = None) -> None:
        self.agent = agent
        #: issue 14 item 5: ``relay(url, op, args)`` runs one operation on a child's link
        self.relay = relay
        self.lock = threading.Lock()
        self.log = log or _no_log

    def __call__(self, op: str, args: Mapping[str, Any], origin: str | None = None) -> Any:
        """Run ``op``; ``origin`` names the peer that asked (:func:`agent.rpc.for_origin`)."""
        name, typed = read_args(op, args)
        impl = _IMPLS[name]
        with self.lock:
            return impl(self, typed, origin)

    def for_origin(self, origin: str) -> Handler:
        """This agent's operations as asked by ``origin`` (one peer of a listener)."""
        return functools.partial(self, origin=origin)

    def _hello(self, _args: NoArgs, _origin: str | None) -> dict[str, Any]:
        st, _w, _now = self.agent.state()
        return {"device_id": st.device_id, "model": st.model}

    def _info(self, _args: NoArgs, _origin: str | None) -> InfoResult:
        data, info = self.agent.info()
        self.log(f"get-info device={info.device_id[:12]}")
        return InfoResult(data, info.device_id)

    def _status(self, _args: NoArgs, _origin: str | None) -> StatusResult:
        st = self.agent.status()  # the service's own map: no re-checking
        return StatusResult(*(st[k] for k in StatusResult.KEYS))

    def _license_info(self, _args: NoArgs, _origin: str | None) -> LicenseInfoResult:
        """What can be reclaimed here: the installed licenses and the state they sit on."""
        st, _w, _now = self.agent.state()
        return LicenseInfoResult(st.device_id, st.sequence, st.digest,
                                 [lic.to_cbor() for lic in st.licenses])

    def _request(self, args: RequestArgs, origin: str | None) -> RequestResult:
        features = list(args.features)
        if args.license_info is not None:  # one opening of the store for both
            data, features = self.agent.request_from_license_info(
                args.action, features, args.license_info, origin, force=args.force,
                transfer_to=args.transfer_to)
        else:
            data = self.agent.request(args.action, features, origin, force=args.force,
                                      transfer_to=args.transfer_to)
        self.log(f"create-request action={args.action.value} "
                 f"features={','.join(features) or '-'} origin={origin or 'local'}")
        return RequestResult(data)

    def _apply(self, args: ApplyArgs, _origin: str | None) -> ApplyResult:
        res, warn = self.agent.apply(args.file)
        self.log(f"apply-response sequence={res.response.sequence} "
                 f"{'already-applied' if res.already_applied else 'applied'}")
        return ApplyResult.of(res, warn)

    def _check(self, args: CheckArgs, _origin: str | None) -> FeatureCheck:
        r = self.agent.check_count(args.feature, args.count)
        return FeatureCheck(args.feature, r.licensed, r.message, r.in_grace, r.clock_set_back)

    def _journal(self, _args: NoArgs, _origin: str | None) -> JournalResult:
        rep = self.agent.journal()
        return JournalResult([{"n": e.n, "time": e.time, "event": e.event,
                               "data": _audit_view(e.data), "digest": e.digest}
                              for e in rep.entries], rep.torn_tail, True)

    # -- issue 15: floating seats

    def _seat_checkout(self, args: SeatCheckoutArgs, origin: str | None) -> SeatResult:
        seat, token = self.agent.seat_checkout(args.feature, args.client, args.lease_seconds,
                                               args.borrow_seconds)
        self.log(f"seat-checkout feature={seat.feature} client={seat.client!r} "
                 f"until={seat.until}{' borrowed' if seat.borrowed else ''} "
                 f"origin={origin or 'local'}")
        return SeatResult(token, seat.feature, seat.client, seat.since, seat.until,
                          seat.borrowed)

    def _seat_renew(self, args: SeatTokenArgs, _origin: str | None) -> SeatResult:
        seat, token = self.agent.seat_renew(args.token, args.lease_seconds)
        return SeatResult(token, seat.feature, seat.client, seat.since, seat.until,
                          seat.borrowed)

    def _seat_return(self, args: SeatTokenArgs, _origin: str | None) -> SeatResult:
        seat = self.agent.seat_return(args.token)
        self.log(f"seat-return feature={seat.feature} client={seat.client!r}")
        return SeatResult(args.token, seat.feature, seat.client, seat.since, seat.until,
                          seat.borrowed)

    def _seat_list(self, args: SeatListArgs, _origin: str | None) -> SeatListResult:
        out, pools = self.agent.seat_list()
        end = args.offset + SEAT_PAGE
        return SeatListResult(
            [s.as_json() for s in out[args.offset:end]],
            [{"feature": p.feature, "count": p.count, "out": p.out, "free": p.free,
              "next_free": p.next_free} for p in pools],
            end if end < len(out) else None)


    # ------------------------------------------------------------ issue 14: the system tree

    def _renew(self, args: RenewArgs, _origin: str | None) -> RenewResult:
        issued, st = self.agent.renew_child(args.info, args.url, dict(args.report or {}))
        parent_info, _info = self.agent.info()
        child = issued.event["child"]["device_id"]
        self.log(f"renew-grants child={child[:12]} granted={len(issued.files)} "
                 f"recalled={','.join(issued.recalled) or '-'}")
        return RenewResult(parent_info, st.system.depth, list(issued.files),
                           list(issued.recalled), list(issued.refused))

    def _return(self, args: ReturnArgs, _origin: str | None) -> ReturnResult:
        feats = self.agent.accept_return(args.file)
        self.log(f"return-grants features={','.join(feats)}")
        return ReturnResult(feats)

    def _use(self, args: UseArgs, _origin: str | None) -> UseArgs:
        self.agent.use(args.feature, args.count)
        return args

    def _tree(self, _args: NoArgs, _origin: str | None) -> TreeResult:
        r = self.agent.tree_report()
        return TreeResult(*(r[k] for k in TreeResult.KEYS))


    def _relay(self, args: RelayArgs, _origin: str | None) -> Any:
        """Pass ``args.op`` on to the server under this one (issue 14 item 5)."""
        if self.relay is None:
            raise UsageError("this server relays no operation (it runs without a daemon)")
        st, _w, _now = self.agent.state()
        for child in st.system.children:
            below = child.device_id == args.device_id
            if not below and not _under(child.report, args.device_id):
                continue
            if not child.url:
                raise UsageError(f"child server {child.device_id[:12]} reported no link "
                                 f"URL: it cannot be reached through this server")
            op, inner = (args.op, args.args) if below else (Op.RELAY.value, args.to_wire())
            self.log(f"relay {args.op} to={args.device_id[:12]} via={child.device_id[:12]}")
            return self.relay(child.url, op, inner)
        # a child Enterprise Server whose kept report lost its own children (reports are
        # kept within agent.inherit.MAX_REPORT bytes): it is asked, and says if not its
        for child in st.system.children:
            if child.model not in _PARENT_MODELS or "children" in child.report or not child.url:
                continue
            self.log(f"relay {args.op} to={args.device_id[:12]} via={child.device_id[:12]} "
                     f"(its report is kept without its children)")
            try:
                return self.relay(child.url, Op.RELAY.value, args.to_wire())
            except LicensingError as err:
                if err.reason != NotInTreeError.reason:
                    raise
        raise NotInTreeError(f"device {args.device_id[:12]} is not under this server "
                               f"(expected one of its children or theirs)")

    # ------------------------------------------------------------ issue 16: direct transfer

    def _transfer(self, args: TransferArgs, origin: str | None) -> TransferResult:
        data, again = self.agent.transfer_out_again(args.features, args.to)
        self.log(f"transfer features={','.join(args.features)} to={args.to[:12]} "
                 f"{'again' if again else 'done'} origin={origin or 'local'}")
        return TransferResult(data, again)

    def _apply_transfer(self, args: ApplyArgs, _origin: str | None) -> ApplyTransferResult:
        receipt, t, again = self.agent.apply_transfer_again(args.file)
        self.log(f"apply-transfer from={t.device_id[:12]} "
                 f"{'already-applied' if again else 'applied'}")
        return ApplyTransferResult(receipt, again, t.device_id,
                                   [f"{lic.feature}={lic.count}" for lic in t.moved])


#: the models that may have children (agent.inherit.PARENT_MODELS, without importing the
#: grant rules into every daemon)
_PARENT_MODELS = ("Enterprise-Server",)


def _under(report: Mapping[str, Any], device_id: str) -> bool:
    """Whether ``device_id`` is in a child's reported part of the tree."""
    for c in report.get("children", []) if isinstance(report, dict) else []:
        if isinstance(c, dict) and (c.get("device_id") == device_id or _under(c, device_id)):
            return True
    return False


def _no_log(_line: str) -> None:
    pass


#: files an entry carries for replay after a crash (docs/protocol.md section 15); a link's
#: read-journal gives their size instead, so that a long journal still fits in frames
_REPLAY_FILES = ("response", "update")


def _audit_view(data: Any) -> Any:
    if isinstance(data, dict) and any(isinstance(data.get(k), bytes) for k in _REPLAY_FILES):
        return {k: (f"<{len(v)} bytes>" if k in _REPLAY_FILES and isinstance(v, bytes) else v)
                for k, v in data.items()}
    return data


#: one implementation per entry of :data:`agent.rpc.OPERATIONS`
_IMPLS: Mapping[Op, Callable[[AgentOps, Any, str | None], Any]] = {
    Op.HELLO: AgentOps._hello,
    Op.GET_INFO: AgentOps._info,
    Op.GET_STATUS: AgentOps._status,
    Op.GET_LICENSE_INFO: AgentOps._license_info,
    Op.CREATE_REQUEST: AgentOps._request,
    Op.APPLY_RESPONSE: AgentOps._apply,
    Op.CHECK_FEATURE: AgentOps._check,
    Op.READ_JOURNAL: AgentOps._journal,
    # issue 15: floating seats
    Op.SEAT_CHECKOUT: AgentOps._seat_checkout,
    Op.SEAT_RENEW: AgentOps._seat_renew,
    Op.SEAT_RETURN: AgentOps._seat_return,
    Op.SEAT_LIST: AgentOps._seat_list,
    Op.RENEW_GRANTS: AgentOps._renew,  # issue 14
    Op.RETURN_GRANTS: AgentOps._return,
    Op.USE_FEATURE: AgentOps._use,
    Op.GET_TREE: AgentOps._tree,
    Op.RELAY: AgentOps._relay,  # issue 14 item 5
    Op.TRANSFER: AgentOps._transfer,  # issue 16
    Op.APPLY_TRANSFER: AgentOps._apply_transfer,
}
if set(_IMPLS) != set(Op):  # adding an operation is one table entry plus its handler here
    raise ImportError(f"agent.ops implements no {', '.join(sorted(set(Op) - set(_IMPLS)))}")

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

from agent.rpc import (
    ApplyArgs,
    ApplyResult,
    CheckArgs,
    FeatureCheck,
    Handler,
    InfoResult,
    JournalResult,
    LicenseInfoResult,
    NoArgs,
    Op,
    RequestArgs,
    RequestResult,
    StatusResult,
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

    def __init__(self, agent: Agent, log: Callable[[str], None] | None = None) -> None:
        self.agent = agent
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
        if args.license_info is not None:
            features += self.agent.features_from_license_info(args.license_info, args.action)
        data = self.agent.request(args.action, features, origin, args.transfer_to)
        self.log(f"create-request action={args.action.value} "
                 f"features={','.join(features) or '-'} origin={origin or 'local'}")
        return RequestResult(data)

    def _apply(self, args: ApplyArgs, _origin: str | None) -> ApplyResult:
        res, warn = self.agent.apply(args.file)
        self.log(f"apply-response sequence={res.response.sequence} "
                 f"{'already-applied' if res.already_applied else 'applied'}")
        return ApplyResult.of(res, warn)

    def _check(self, args: CheckArgs, _origin: str | None) -> FeatureCheck:
        r = self.agent.check(args.feature)
        return FeatureCheck(args.feature, r.licensed, r.message, r.in_grace, r.clock_set_back)

    def _journal(self, _args: NoArgs, _origin: str | None) -> JournalResult:
        rep = self.agent.journal()
        return JournalResult([{"n": e.n, "time": e.time, "event": e.event,
                               "data": _audit_view(e.data), "digest": e.digest}
                              for e in rep.entries], rep.torn_tail, True)


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
}
if set(_IMPLS) != set(Op):  # adding an operation is one table entry plus its handler here
    raise ImportError(f"agent.ops implements no {', '.join(sorted(set(Op) - set(_IMPLS)))}")

"""The operations a server offers over any link, mapped onto :class:`agent.service.Agent`.

One function per entry of :data:`agent.rpc.OPERATIONS`, each taking its typed
arguments and returning its typed result record; every link (serial, TCP, TLS,
HTTPS, the USB mailbox, MQTT and the simulators) calls :meth:`AgentOps.__call__`
through :func:`agent.rpc.answer`. Refusals are raised as LicensingError and reach
the client with their exit code and reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from agent.rpc import (
    ApplyArgs,
    ApplyResult,
    CheckArgs,
    FeatureCheck,
    InfoResult,
    JournalResult,
    LicenseInfoResult,
    NoArgs,
    Op,
    RequestArgs,
    RequestResult,
    StatusResult,
    table_handler,
)
from agent.service import Agent

__all__ = ["AgentOps"]


class AgentOps:
    """Callable ``(op, args) -> result`` serving one agent; serialises store access.

    The store itself is also protected by an flock, so a ``licagent`` CLI call
    beside the daemon never interleaves with it; the thread lock here only
    keeps the daemon's own threads from queueing on that flock.
    """

    def __init__(self, agent: Agent, log: Callable[[str], None] | None = None) -> None:
        self.agent = agent
        self.lock = threading.Lock()
        self.log = log or (lambda _line: None)
        self._handle = table_handler({
            Op.HELLO: self._hello,
            Op.GET_INFO: self._info,
            Op.GET_STATUS: self._status,
            Op.GET_LICENSE_INFO: self._license_info,
            Op.CREATE_REQUEST: self._request,
            Op.APPLY_RESPONSE: self._apply,
            Op.CHECK_FEATURE: self._check,
            Op.READ_JOURNAL: self._journal,
        }, around=self._locked)

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        return self._handle(op, args)

    def _locked(self, call: Callable[[], Any]) -> Any:
        with self.lock:
            return call()

    def _hello(self, _args: NoArgs) -> dict[str, Any]:
        st, _w, _now = self.agent.state()
        return {"device_id": st.device_id, "model": st.model}

    def _info(self, _args: NoArgs) -> InfoResult:
        data, info = self.agent.info()
        self.log(f"get-info device={info.device_id[:12]}")
        return InfoResult(data, info.device_id)

    def _status(self, _args: NoArgs) -> StatusResult:
        st = self.agent.status()  # the service's own map: no re-checking
        return StatusResult(*(st[k] for k in StatusResult.KEYS))

    def _license_info(self, _args: NoArgs) -> LicenseInfoResult:
        """What can be reclaimed here: the installed licenses and the state they sit on."""
        st, _w, _now = self.agent.state()
        return LicenseInfoResult(st.device_id, st.sequence, st.digest,
                                 [lic.to_cbor() for lic in st.licenses])

    def _request(self, args: RequestArgs) -> RequestResult:
        features = list(args.features)
        if args.license_info is not None:
            features += self.agent.features_from_license_info(args.license_info, args.action)
        data = self.agent.request(args.action, features)
        self.log(f"create-request action={args.action.value} "
                 f"features={','.join(features) or '-'}")
        return RequestResult(data)

    def _apply(self, args: ApplyArgs) -> ApplyResult:
        res, warn = self.agent.apply(args.file)
        self.log(f"apply-response sequence={res.response.sequence} "
                 f"{'already-applied' if res.already_applied else 'applied'}")
        return ApplyResult(res.receipt, res.already_applied, res.response.sequence,
                           res.response.base_sequence,
                           [f"{c.op.value} {c.feature}" for c in res.response.changes], warn)

    def _check(self, args: CheckArgs) -> FeatureCheck:
        r = self.agent.check(args.feature)
        return FeatureCheck(args.feature, r.licensed, r.message, r.in_grace, r.clock_set_back)

    def _journal(self, _args: NoArgs) -> JournalResult:
        rep = self.agent.journal()
        return JournalResult([{"n": e.n, "time": e.time, "event": e.event, "data": e.data,
                               "digest": e.digest} for e in rep.entries], rep.torn_tail, True)

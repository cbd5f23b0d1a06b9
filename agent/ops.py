"""The operations a server offers over any link, mapped onto :class:`agent.service.Agent`.

One table for every transport: the RPC server (serial, TCP, TLS, loop, sim),
the HTTPS endpoints and the USB mailbox all call :meth:`AgentOps.__call__`.
Results are plain CBOR-able values; refusals are raised as LicensingError and
reach the client with their exit code and reason.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import UsageError
from agent.messages import Action
from agent.service import Agent

__all__ = ["AgentOps"]

MAX_FEATURES = 64


def _features(args: Mapping[str, Any]) -> list[str]:
    f = args.get("features", [])
    if not isinstance(f, list) or len(f) > MAX_FEATURES or not all(isinstance(x, str) for x in f):
        raise UsageError("features must be a list of names")
    return f


def _bytes_arg(args: Mapping[str, Any], name: str) -> bytes:
    v = args.get(name)
    if not isinstance(v, bytes):
        raise UsageError(f"argument {name!r} must be a byte string (the file's content)")
    return v


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
        self._table: dict[str, Callable[[Mapping[str, Any]], Any]] = {
            "hello": self._hello,
            "get-info": self._info,
            "get-status": self._status,
            "get-license-info": self._license_info,
            "create-request": self._request,
            "apply-response": self._apply,
            "check-feature": self._check,
            "read-journal": self._journal,
        }

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        fn = self._table.get(op)
        if fn is None:
            raise UsageError(f"unknown operation {op!r}")
        with self.lock:
            return fn(args)

    def _hello(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        st, _w, _now = self.agent.state()
        return {"device_id": st.device_id, "model": st.model}

    def _info(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        data, info = self.agent.info()
        self.log(f"get-info device={info.device_id[:12]}")
        return {"file": data, "device_id": info.device_id}

    def _status(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        return self.agent.status()

    def _license_info(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        """What can be reclaimed here: the installed licenses and the state they sit on."""
        st, _w, _now = self.agent.state()
        return {
            "device_id": st.device_id,
            "sequence": st.sequence,
            "state_digest": st.digest,
            "licenses": [lic.to_cbor() for lic in st.licenses],
        }

    def _request(self, args: Mapping[str, Any]) -> dict[str, Any]:
        try:
            action = Action(str(args.get("action")))
        except ValueError as exc:
            raise UsageError("action must be activate, reclaim or renew") from exc
        features = _features(args)
        if "license_info" in args:
            features += self.agent.features_from_license_info(
                _bytes_arg(args, "license_info"), action)
        data = self.agent.request(action, features)
        self.log(f"create-request action={action.value} features={','.join(features) or '-'}")
        return {"file": data}

    def _apply(self, args: Mapping[str, Any]) -> dict[str, Any]:
        res, warn = self.agent.apply(_bytes_arg(args, "file"))
        changes = [f"{c.op.value} {c.feature}" for c in res.response.changes]
        self.log(f"apply-response sequence={res.response.sequence} "
                 f"{'already-applied' if res.already_applied else 'applied'}")
        return {
            "receipt": res.receipt,
            "already_applied": res.already_applied,
            "sequence": res.response.sequence,
            "base_sequence": res.response.base_sequence,
            "changes": changes,
            "warning": warn,
        }

    def _check(self, args: Mapping[str, Any]) -> dict[str, Any]:
        feature = args.get("feature")
        if not isinstance(feature, str):
            raise UsageError("feature must be a name")
        r = self.agent.check(feature)
        return {"feature": feature, "licensed": r.licensed, "message": r.message,
                "in_grace": r.in_grace, "clock_set_back": r.clock_set_back}

    def _journal(self, _args: Mapping[str, Any]) -> dict[str, Any]:
        rep = self.agent.journal()
        return {
            "entries": [{"n": e.n, "time": e.time, "event": e.event, "data": e.data,
                         "digest": e.digest} for e in rep.entries],
            "torn_tail": rep.torn_tail,
            "verified": True,
        }

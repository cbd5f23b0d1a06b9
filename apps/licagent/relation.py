"""A child server's relation to its parent (issue 14): ``licagent attach`` once, and
``licagent run --parent URL`` keeping it live (a renewal every ``--renew-every`` seconds).

One renewal: the child sends its signed device information, where it listens and its
part of the tree to the parent (``renew-grants``); the parent answers with its own signed
device information, its level, the grants it gives now and the features it recalls. The
child records the parent (first time, or a parent that changed: ``child-moved``),
verifies and installs the grants, and sends back the signed return of the recalled ones
(``return-grants``). Links are any URL ``hw.connect`` knows.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import hw
from agent.errors import LicensingError
from agent.messages import DeviceInfo
from agent.protocol import self_signed_payload
from agent.record import record
from agent.rpc import Op, RenewArgs, RenewResult, ReturnArgs
from agent.service import Agent

__all__ = ["ParentRelation", "RenewOutcome", "renew_once"]


@record(frozen=True)
class RenewOutcome:
    """What one renewal did."""

    parent_id: str
    attached: bool  # recorded now (first attach, or a new parent)
    installed: tuple[str, ...]
    refused: tuple[str, ...]
    returned: tuple[str, ...]


def renew_once(agent: Agent, parent_url: str, own_url: str | None = None,
               lock: Any = None, timeout: float | None = None) -> RenewOutcome:
    """One renewal with the parent at ``parent_url`` (see the module docstring).

    ``lock`` serialises the agent's operations with a daemon's own (its operation lock).

    Raises:
        LicensingError: the parent cannot be reached or refuses; what the child recorded
            before the failure stays (each step is its own commit).
    """
    guard: Callable[[], Any] = (lambda: lock) if lock is not None else contextlib.nullcontext
    with guard():
        info, _i = agent.info()
        report = agent.tree_report()
        st, _w, _now = agent.state()
    kw: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    with hw.connect(parent_url, **kw) as client:
        raw = client.call(Op.RENEW_GRANTS, RenewArgs(info, own_url, report).to_wire())
        res = RenewResult.from_wire(raw)
        parent, _key = self_signed_payload(res.parent_info, DeviceInfo)
        attached = False
        with guard():
            cur = st.system.parent
            if cur is None or cur.device_id != parent.device_id or cur.url != parent_url:
                agent.attach(res.parent_info, parent_url, res.depth)
                attached = cur is None or cur.device_id != parent.device_id
            installed, refused, ret = agent.install_grants(parent.device_id, res.grants,
                                                           res.recalled)
        returned: tuple[str, ...] = ()
        if ret is not None:
            client.call(Op.RETURN_GRANTS, ReturnArgs(ret).to_wire())
            returned = tuple(sorted(res.recalled))
        held = {g.feature for g in st.system.inherited}
        if attached or returned or set(installed) != held:
            # what this server holds changed: tell the parent at once (its tree shows the
            # report sent with a renewal, which was made before these grants)
            with guard():
                info, _i = agent.info()
                report = agent.tree_report()
            client.call(Op.RENEW_GRANTS, RenewArgs(info, own_url, report).to_wire())
    return RenewOutcome(parent.device_id, attached, tuple(installed),
                        (*res.refused, *refused), returned)


class ParentRelation:
    """The daemon's thread that renews with the parent until stopped.

    A failed renewal is logged and tried again at the next interval: the grants held keep
    counting until their leases end, then ``check`` says why they stopped.
    """

    def __init__(self, agent: Agent, parent_url: str, own_url: str | None, every: float,
                 lock: Any, log: Any) -> None:
        self.agent = agent
        self.parent_url = parent_url
        self.own_url = own_url
        self.every = every
        self.lock = lock
        self.log = log
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="parent-relation", daemon=True)
        self.renewals = 0

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        while not self.stop_event.is_set():
            try:
                out = renew_once(self.agent, self.parent_url, self.own_url, self.lock,
                                 timeout=min(10.0, max(1.0, self.every)))
                self.renewals += 1
                self.log.info("parent %s renewed: parent %s, inherited %s%s%s",
                              self.parent_url, out.parent_id[:12],
                              ",".join(out.installed) or "-",
                              f", returned {','.join(out.returned)}" if out.returned else "",
                              "".join(f"; refused {r}" for r in out.refused))
            except LicensingError as err:
                self.log.warning("parent %s: renewal failed: %s: %s", self.parent_url,
                                 err.reason, err)
            except Exception:
                self.log.exception("parent %s: renewal failed", self.parent_url)
            self.stop_event.wait(self.every)


@contextlib.contextmanager
def running(relation: ParentRelation | None) -> Iterator[None]:
    if relation is not None:
        relation.start()
    try:
        yield
    finally:
        if relation is not None:
            relation.stop()

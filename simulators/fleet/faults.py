"""The fleet's seven fault injectors, and what each checks must hold afterwards.

:class:`FaultInjection` is mixed into :class:`simulators.fleet.fleet.Fleet`: one
method per kind in :data:`INJECTORS` (the kinds of
:data:`simulators.fleet.scenario.FAULT_KINDS`). A link fault goes through the
link kind's own fault hook (:meth:`simulators.fleet.links.FleetLink.inject`).
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.errors import (
    ClockSetBackError,
    CopiedStoreError,
    LicensingError,
    SequenceError,
    UsageError,
)
from agent.messages import Action
from simulators.fleet.broker import MosquittoBroker
from simulators.fleet.links import ServedLinks, wait_until
from simulators.fleet.models import make_facts, replacement_mac
from simulators.fleet.power import PowerLoss, PowerLossOps
from simulators.fleet.scenario import FAULT_KINDS, FaultSpec, Scenario
from simulators.fleet.server import SimServer
from simulators.licensing_server.vendor import Grant, Vendor

__all__ = ["INJECTORS", "FaultInjection", "FaultRecord"]

DAY = 86400
#: a license issued at provisioning runs for this long (so a clock jump can outlive it)
SUBSCRIPTION = 365 * DAY
#: how far a clock-jump fault moves the clock by default
CLOCK_JUMP = 400 * DAY
#: issue 16: the wrong reading of a clock-future fault (2038-01-19T03:14:07Z)
FUTURE = 2**31 - 1
#: an upper bound for servers to come back after a fault (a bound, not a measurement)
RECOVER_WAIT = 30.0


class _NoServerFits(Exception):
    """A random fault found no server it can act on; recorded as skipped."""


class FaultRecord(dict[str, Any]):
    """One fault: ``time``, ``kind``, ``server``, ``link``, ``detail``, ``held``, ``checks``,
    ``injected`` (False: it could not be staged, ``detail`` says why), ``planned`` (from
    the scenario, not injected by hand) and ``optional`` (the scenario's ``optional``)."""



class FaultInjection:
    """Injecting faults into a fleet and checking what must hold afterwards (a mixin of Fleet)."""

    scenario: Scenario
    servers: list[SimServer]
    rng: random.Random
    vendor: Vendor | None
    links: ServedLinks
    broker: MosquittoBroker | None
    faults: list[FaultRecord]
    entitled: dict[str, dict[str, int]]
    reclaimed: dict[str, set[str]]
    not_ready: list[str]
    started_at: float
    ready_at: float
    #: raised by an injector that finds nothing to act on (recorded as skipped)
    NoFit = _NoServerFits

    def log(self, line: str) -> None:
        raise NotImplementedError

    def load_once(self) -> bool:  # Fleet's: one operation of the scenario's load mix
        raise NotImplementedError

    def server(self, name: str) -> SimServer:
        raise NotImplementedError

    def _hello(self, srv: SimServer, link: str, tries: int = 3) -> bool:
        raise NotImplementedError

    def inject(self, fault: FaultSpec | str, planned: bool = False) -> FaultRecord:
        """Inject one fault now and check what must hold afterwards.

        Args:
            planned: the fault comes from the scenario (its schedule or random faults):
                one that cannot be injected (no such server, nothing fits) is recorded
                instead of raised, and fails the run unless it is ``optional``.

        Returns:
            the record added to the report (``held`` False when an invariant broke;
            ``injected`` False when the fault could not be staged, ``detail`` says why).

        Raises:
            UsageError: an unknown kind, server or link (not ``planned``).
        """
        if isinstance(fault, str):
            fault = FaultSpec(fault)
        if fault.kind not in FAULT_KINDS:
            raise UsageError(f"unknown fault kind {fault.kind!r} "
                             f"(known: {', '.join(FAULT_KINDS)})")
        fn = INJECTORS[fault.kind]
        rec = self._record(fault.kind, fault, planned)
        try:
            fn(self, fault, rec)
        except _NoServerFits as exc:  # e.g. a reclaim where nothing is installed any more
            rec["detail"] = str(exc)
            rec["injected"] = False
        except LicensingError as exc:
            if isinstance(exc, UsageError) and rec["server"] is None:
                if not planned:
                    raise
                rec["server"] = fault.server
                rec["detail"] = f"not injected: {exc}"
                rec["injected"] = False
            else:
                rec["held"] = False
                rec["detail"] += f" FAILED: {exc.reason}: {exc}"
        except Exception as exc:  # a bug in the fault itself: reported, the run goes on
            rec["held"] = False
            rec["detail"] += f" FAILED: internal error {exc!r}"
        rec["injected"] = rec.get("injected", True)
        self.faults.append(rec)
        self._log_fault(rec)
        return rec

    def _record(self, kind: str, fault: FaultSpec | None, planned: bool) -> FaultRecord:
        since = self.ready_at or self.started_at
        return FaultRecord(time=round(time.monotonic() - since, 3), kind=kind,
                           server=None, link=fault.link if fault else None, detail="",
                           held=True, checks=[], planned=planned,
                           optional=bool(fault and fault.optional))

    def _log_fault(self, rec: FaultRecord) -> None:
        outcome = ("not injected" if not rec["injected"] else
                   "held" if rec["held"] else "BROKEN")
        self.log(f"fault {rec['kind']} {rec['server'] or '-'} {rec['link'] or ''}: "
                 f"{rec['detail'].strip()} -> {outcome}")

    def missed(self, kind: str, fault: FaultSpec | None, detail: str,
               optional: bool) -> FaultRecord:
        """Record a planned fault the run never reached (it ended first): not injected."""
        rec = self._record(kind, fault, planned=True)
        rec.update(server=fault.server if fault else None, detail=detail, injected=False,
                   optional=optional)
        self.faults.append(rec)
        self._log_fault(rec)
        return rec

    def _pick(self, fault: FaultSpec, rec: FaultRecord,
              want: Callable[[SimServer], bool] = lambda _s: True) -> SimServer:
        if fault.server is not None:
            srv = self.server(fault.server)
            if not want(srv):
                rec["server"] = srv.name
                raise _NoServerFits(f"skipped: {srv.name} does not fit a {fault.kind} fault "
                                    f"now ({self._unfit(srv, fault)})")
        else:
            choices = [s for s in self.servers if want(s)]
            if not choices:
                raise _NoServerFits(f"skipped: no server in this fleet fits a {fault.kind} "
                                    f"fault" + (f" on {fault.link}" if fault.link else ""))
            srv = self.rng.choice(choices)
        rec["server"] = srv.name
        return srv

    def _unfit(self, srv: SimServer, fault: FaultSpec) -> str:
        if fault.link is not None and fault.link not in srv.links:
            return f"it has no {fault.link} link"
        if self._clock_set_back(srv):
            return ("its clock is behind the latest time it has seen, so it signs no request "
                    "until the clock passes that time again")
        return "nothing installed to reclaim"

    def _clock_set_back(self, srv: SimServer) -> bool:
        try:
            return bool(srv.agent().status()["clock_set_back"])
        except LicensingError:
            return False

    def _can_request(self, srv: SimServer) -> bool:
        """A server whose clock was set back refuses to sign requests (rightly)."""
        return not self._clock_set_back(srv)

    @staticmethod
    def _check(rec: FaultRecord, name: str, held: bool, detail: str) -> None:
        rec["checks"].append({"name": name, "held": held, "detail": detail})
        if not held:
            rec["held"] = False

    def _snapshot(self, srv: SimServer) -> tuple[int, str, dict[str, int]]:
        st = srv.agent().status()
        return (int(st["sequence"]), str(st["state_digest"]),
                {x["feature"]: int(x["count"]) for x in st["licenses"]
                 if x.get("source", "own") == "own"})  # inherited ones are not its own

    def _fault_power_loss(self, fault: FaultSpec, rec: FaultRecord) -> None:
        assert self.vendor is not None
        srv = self._pick(fault, rec, self._can_request)
        old = self._snapshot(srv)
        grants = dict(old[2]) or {"power-test": 1}
        self.entitled[srv.name] = {**grants, **self.entitled.get(srv.name, {})}
        agent = srv.agent()
        req = agent.request(Action.RENEW if old[2] else Action.ACTIVATE, list(grants))
        now = srv.now()
        resp = self.vendor.issue(req, [Grant(f, n, not_after=now + SUBSCRIPTION)
                                       for f, n in grants.items()], now=now)
        mid = self._snapshot(srv)  # the request itself moved the state (outstanding nonce)
        step = fault.step or self.rng.randint(1, self._write_steps(srv, resp))
        ops = PowerLossOps(step, random.Random(self.rng.random()))
        try:
            srv.agent(ops=ops).apply(resp)
            rec["detail"] = (f"apply finished before write step {ops.crash_at} "
                             f"({ops.calls} steps): no power loss")
            rec["injected"] = False
        except PowerLoss as exc:
            lost = ops.lose_unsynced()
            rec["detail"] = f"{exc}; {'; '.join(lost) or 'nothing unsynced lost'}"
        after = self._snapshot(srv)  # the restart: the store is opened from its directory
        res, _w = srv.agent().apply(resp)  # the office sends the response again
        final = self._snapshot(srv)
        self._check(rec, "old-or-new-state", after[:2] in (mid[:2], final[:2]),
                    f"after restart sequence {after[0]} (before {mid[0]}, after apply "
                    f"{final[0]}); licenses {after[2]}")
        self._check(rec, "apply-completes", final[0] == mid[0] + 1,
                    f"{'already applied' if res.already_applied else 'applied'}: sequence "
                    f"{final[0]}")

    @staticmethod
    def _write_steps(srv: SimServer, resp: bytes) -> int:
        """How many file calls applying ``resp`` makes: counted on a copy of the store, so a
        random power loss always lands inside the apply."""
        with tempfile.TemporaryDirectory(prefix="licsim-count-") as tmp:
            copy = Path(tmp) / "state"
            shutil.copytree(srv.state_dir, copy)
            counter = PowerLossOps(1 << 30, random.Random(0))  # never reached: counts only
            srv.agent(ops=counter, directory=copy).apply(resp)
            return max(1, counter.calls)

    def _fault_link(self, fault: FaultSpec, rec: FaultRecord) -> None:
        srv = self._pick(fault, rec, lambda s: fault.link is None or fault.link in s.links)
        link = fault.link or self.rng.choice(srv.links)
        rec["link"] = link
        # line noise with frame delimiters in it, so the server has to resynchronise
        noise = bytes(0 if i % 16 == 0 else b for i, b in enumerate(self.rng.randbytes(64)))
        rec["detail"] = self.links.fault(
            srv, link, noise, lambda name, held, detail: self._check(rec, name, held, detail))
        back = wait_until(lambda: self._hello(srv, link, tries=1), RECOVER_WAIT)
        self._check(rec, "reachable-again", back, f"{srv.name} answers on {link} again"
                    if back else f"{srv.name} does not answer on {link}")

    def _fault_clock_jump(self, fault: FaultSpec, rec: FaultRecord) -> None:
        srv = self._pick(fault, rec)
        jump = fault.seconds or CLOCK_JUMP
        features = sorted(self._snapshot(srv)[2]) or ["bacnet-ip"]
        base = srv.clock_offset

        def licensed() -> dict[str, bool]:
            a = srv.agent()
            return {f: a.check(f).licensed for f in features}

        before = licensed()
        srv.clock_offset = base + jump
        moved = licensed()
        srv.clock_offset = base
        after = licensed()
        rec["detail"] = (f"clock {'+' if jump > 0 else ''}{jump / DAY:g} days and back; licensed before "
                         f"{before}, after the jump {moved}, after the return {after}")
        # whichever move went backwards must not license anything that was not licensed
        back_from, back_to = (moved, after) if jump > 0 else (before, moved)
        extended = [f for f in features if back_to[f] and not back_from[f]]
        self._check(rec, "backwards-jump-extends-nothing", not extended,
                    f"licenses that came back: {extended}" if extended else
                    "no license came back")
        st = srv.agent().status()
        if jump > 0:
            self._check(rec, "clock-set-back-seen", bool(st["clock_set_back"]),
                        f"high-water mark {st['clock_high_water']}")

    def _fault_nic_replaced(self, fault: FaultSpec, rec: FaultRecord) -> None:
        srv = self._pick(fault, rec)
        old = srv.facts.macs
        srv.facts = replacement_mac(srv.facts, self.rng)
        rec["detail"] = f"MACs {', '.join(old)} -> {', '.join(srv.facts.macs)}"
        try:
            st = srv.agent().status()
            held, detail = True, f"store still valid (device {str(st['device_id'])[:12]})"
        except CopiedStoreError as exc:
            held, detail = False, f"refused: {exc}"
        self._check(rec, "binding-holds", held, detail)
        events = [e.event for e in srv.agent().journal().entries]
        self._check(rec, "rebind-journalled", "rebind" in events,
                    "journal records the re-bind" if "rebind" in events else "no rebind entry")

    def _fault_clone_store(self, fault: FaultSpec, rec: FaultRecord) -> None:
        srv = self._pick(fault, rec)
        others = [s for s in self.servers if s.model == srv.model and s is not srv]
        if others:
            target_facts = self.rng.choice(others).facts
            target = next(s.name for s in others if s.facts is target_facts)
        else:  # a spare unit of the same model
            target_facts = make_facts(srv.model, self.scenario.seed, len(self.servers) + 1000)
            target = f"a spare {srv.model}"
        copy = self.links.workdir / "clones" / f"{srv.name}-{len(self.faults)}"
        shutil.copytree(srv.state_dir, copy)
        try:
            try:
                srv.agent(facts=target_facts, directory=copy).status()
                held, detail = False, "the copied store was accepted"
            except CopiedStoreError as exc:
                held, detail = True, f"refused: {str(exc)[:120]}"
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        rec["detail"] = f"store of {srv.name} copied to {target}"
        self._check(rec, "clone-refused", held, detail)
        ok = True
        try:
            srv.agent().status()
        except LicensingError:
            ok = False
        self._check(rec, "original-still-valid", ok, f"{srv.name} itself is unaffected"
                    if ok else f"{srv.name} was damaged")

    def _fault_broker_restart(self, fault: FaultSpec, rec: FaultRecord) -> None:
        if self.broker is None or self.links.mqtt is None:
            rec["detail"] = ("skipped: the broker is not licsim's own ([broker] start = true) "
                             "or no server uses mqtt")
            rec["injected"] = False
            return
        self.broker.restart()
        mqtt = self.links.mqtt_link
        on = [s for s in self.servers if "mqtt" in s.links]
        n = len(on)
        back = mqtt.sessions_connected(n, RECOVER_WAIT)
        rec["detail"] = (f"mosquitto killed and started again; "
                         f"{mqtt.connected()} of {n} sessions reconnected")
        self._check(rec, "sessions-reconnect", back, rec["detail"])
        missing = mqtt.listed_online(on, RECOVER_WAIT) if back else None
        self.not_ready = [missing] if missing else []
        listed = back and missing is None
        self._check(rec, "presence-republished", listed,
                    "every server listed online again" if listed else "; ".join(self.not_ready))

    def _fault_reclaim(self, fault: FaultSpec, rec: FaultRecord) -> None:
        assert self.vendor is not None
        srv = self._pick(fault, rec, lambda s: bool(self._installed(s)) and (
            Path(s.directory) / "activation.resp").exists() and self._can_request(s))
        feature = sorted(self._installed(srv))[0]
        agent = srv.agent()
        req = agent.request(Action.RECLAIM, [feature])
        resp = self.vendor.issue(req, removes=[feature], now=srv.now())
        res, _w = agent.apply(resp)
        self.reclaimed.setdefault(srv.name, set()).add(feature)
        gone = not srv.agent().check(feature).licensed
        self._check(rec, "reclaimed-gone", gone, f"{feature} {'gone' if gone else 'STILL THERE'}")
        old = (Path(srv.directory) / "activation.resp").read_bytes()
        try:
            srv.agent().apply(old)
            held, detail = False, "the old activation was applied again"
        except SequenceError as exc:
            held, detail = True, f"replay refused: {exc.reason}"
        self._check(rec, "replay-refused", held, detail)
        rec["detail"] = f"reclaimed {feature}; receipt {len(res.receipt)} bytes"

    # issue 14: the system faults (simulators/fleet/systems.py)
    def _fault_parent_offline(self, fault: FaultSpec, rec: FaultRecord) -> None:
        from simulators.fleet import systems

        systems.fault_parent_offline(self, fault, rec)

    def _fault_parent_reclaim(self, fault: FaultSpec, rec: FaultRecord) -> None:
        from simulators.fleet import systems

        systems.fault_parent_reclaim(self, fault, rec)

    def _fault_child_moved(self, fault: FaultSpec, rec: FaultRecord) -> None:
        from simulators.fleet import systems

        systems.fault_child_moved(self, fault, rec)
    def _fault_clock_future(self, fault: FaultSpec, rec: FaultRecord) -> None:
        """Issue 16: a wrong clock reading far in the future, then the way back."""
        assert self.vendor is not None
        srv = self._pick(fault, rec, lambda s: not s.clock_offset and not self._clock_set_back(s))
        features = sorted(self._snapshot(srv)[2])
        agent = srv.agent()
        before = {f: agent.check(f).licensed for f in features}
        base = srv.clock_offset
        srv.clock_offset = FUTURE - int(time.time())  # one reading in 2038
        for f in features or ["bacnet-ip"]:
            agent.check(f)  # the mark follows what a check decided
        srv.clock_offset = base
        st = srv.agent().status()
        locked = bool(st["clock_set_back"])
        self._check(rec, "future-reading-seen", locked,
                    f"high-water mark {st['clock_high_water']}")
        try:
            srv.agent().request(Action.RENEW, features[:1])
            refused, why = False, "a request was signed that would be refused"
        except ClockSetBackError as exc:
            refused, why = "licagent request clock" in str(exc), str(exc)[:100]
        self._check(rec, "request-names-the-way-back", refused, why)
        req = srv.agent().request(Action.CLOCK, [])
        resp = self.vendor.issue(req, now=srv.now())
        srv.agent().apply(resp)
        st = srv.agent().status()
        back = not st["clock_set_back"]
        self._check(rec, "certified-time-recovers", back,
                    f"high-water mark {st['clock_high_water']}")
        after = {f: srv.agent().check(f).licensed for f in features}
        self._check(rec, "licenses-as-before", after == before,
                    f"licensed before {before}, after {after}")
        srv.clock_offset = FUTURE - int(time.time())
        srv.agent().check(features[0] if features else "bacnet-ip")
        srv.clock_offset = base
        res, _w = srv.agent().apply(resp)  # the same certified time again: no reset
        again = bool(srv.agent().status()["clock_set_back"])
        self._check(rec, "certified-time-applies-once", again and res.already_applied,
                    "replayed: nothing reset" if again else "the mark was reset again")
        # leave the server as it was found: a fresh certified time
        srv.agent().apply(self.vendor.issue(srv.agent().request(Action.CLOCK, []),
                                            now=srv.now()))
        rec["detail"] = f"clock read 2038 once; recovered with a certified time ({len(resp)} bytes)"

    def _fault_restore_backup(self, fault: FaultSpec, rec: FaultRecord) -> None:
        """Issue 16: a server's store put back from an older copy, judged by a real ledger.

        licsim signs with the vendor key directly and keeps no ledger, so this fault opens
        a real one (an SQLite file in a scratch folder) over the same vendor: it issues a
        license, verifies the receipt (the chain head), and then sees the restored store.
        """
        assert self.vendor is not None
        from agent.errors import RestoredError
        from agent.store import store_lock
        from simulators.licensing_server.ledger import Ledger

        srv = self._pick(fault, rec, self._can_request)
        feature = "restore-test"
        scratch = Path(tempfile.mkdtemp(prefix="licsim-restore-"))
        try:
            with Ledger(scratch / "ledger.db", self.vendor, clock=srv.now) as led:
                led.entitle("licsim-restore", "sim", {feature: 1})
                led.assign("licsim-restore", srv.device_id, feature, 1)
                before = self._snapshot(srv)
                with store_lock(srv.state_dir):  # a consistent copy, as a backup tool takes
                    shutil.copytree(srv.state_dir, scratch / "backup", symlinks=True)
                agent = srv.agent()
                res, _w = agent.apply(led.answer_request(agent.request(Action.ACTIVATE,
                                                                       [feature])))
                led.accept_receipt(res.receipt)
                self._check(rec, "receipt-verified", agent.check(feature).licensed,
                            f"{feature} applied, its receipt verified by the ledger")
                time.sleep(1.1)  # the rule compares whole seconds of the device's clock
                _put_back(srv.state_dir, scratch / "backup")
                restored = self._snapshot(srv)
                self._check(rec, "backup-put-back", restored[:2] == before[:2],
                            f"sequence {restored[0]} (was {before[0]} at the copy)")
                try:
                    led.answer_request(srv.agent().request(Action.RENEW, []))
                    refused, why = False, "a request from the restored store was answered"
                except RestoredError as exc:
                    refused, why = "restored from an older backup" in str(exc), str(exc)[:120]
                self._check(rec, "restore-detected", refused, why)
                flagged = led.report().get("restores", [])
                self._check(rec, "restore-flagged", bool(flagged), f"{len(flagged)} flagged")
                after = self._snapshot(srv)
                self._check(rec, "no-license-beyond-the-backup",
                            not srv.agent().check(feature).licensed and after[2] == before[2],
                            f"holds {after[2]} (at the copy {before[2]})")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rec["detail"] = ("store put back from a copy older than a verified receipt: refused "
                         "by the ledger as restored and flagged; it holds what the copy held")

    def _fault_server_dead(self, fault: FaultSpec, rec: FaultRecord) -> None:
        """Issue 16: a server declared dead (revoked) in a real ledger; its licenses return,
        another server of its site gets them, and the box, back, drops what it held.

        Like restore-backup, a real ledger file over the same vendor key. The dead server's
        store is copied first and put back at the end, so the fleet runs on with it.
        """
        assert self.vendor is not None
        from agent.errors import RevokedError
        from agent.formats import SiteInfo
        from agent.store import store_lock
        from simulators.licensing_server.ledger import Ledger

        dead = self._pick(fault, rec, self._can_request)
        others = [s for s in self.servers if s is not dead and self._can_request(s)]
        if not others:
            raise _NoServerFits("skipped: no second server to take the dead one's licenses")
        heir = others[0]
        feature, ent = "dead-test", "licsim-dead"
        scratch = Path(tempfile.mkdtemp(prefix="licsim-dead-"))
        try:
            with store_lock(dead.state_dir):
                shutil.copytree(dead.state_dir, scratch / "dead", symlinks=True)
            with Ledger(scratch / "ledger.db", self.vendor, clock=dead.now) as led:
                led.entitle(ent, "sim", {feature: 2})
                led.assign(ent, dead.device_id, feature, 2)
                res, _w = dead.agent().apply(led.answer_request(
                    dead.agent().request(Action.ACTIVATE, [feature])))
                led.accept_receipt(res.receipt)
                led.revoke_device(dead.device_id, "licsim: server-dead fault")
                free = led.free(ent, feature)
                self._check(rec, "licenses-returned", free == 2, f"{free} of 2 free after revoke")
                try:
                    led.answer_request(dead.agent().request(Action.RENEW, [feature]))
                    refused, why = False, "the ledger answered the dead server"
                except RevokedError as exc:
                    refused, why = True, str(exc)[:120]
                self._check(rec, "dead-gets-nothing", refused, why)
                led.assign(ent, heir.device_id, feature, 2)
                resp = led.answer_request(heir.agent().request(Action.ACTIVATE, [feature]))
                res, _w = heir.agent().apply(resp)
                led.accept_receipt(res.receipt)
                got = heir.agent().check(feature).licensed
                self._check(rec, "heir-gets-them", got, f"{heir.name} licensed for {feature}")
                site = SiteInfo("licsim", heir.now(), (heir.agent().info()[0],)).encode()
                info = led.license_info(site)
                try:
                    dead.agent().features_from_license_info(info, Action.RECLAIM)
                    dropped, why = False, "the dead server took its site's license information"
                except RevokedError as exc:
                    dropped = not dead.agent().check(feature).licensed
                    why = str(exc)[:120]
                self._check(rec, "box-drops-on-return", dropped, why)
                # the heir gives the test license back (a plain reclaim)
                res, _w = heir.agent().apply(led.answer_request(
                    heir.agent().request(Action.RECLAIM, [feature])))
                led.accept_receipt(res.receipt)
        finally:
            if (scratch / "dead").exists():
                _put_back(dead.state_dir, scratch / "dead")
            shutil.rmtree(scratch, ignore_errors=True)
        rec["detail"] = (f"{dead.name} revoked in a real ledger: 2 {feature} returned, "
                         f"{heir.name} took them, the box dropped its licenses on return "
                         f"(its store then put back for the fleet)")

    def _fault_server_replaced(self, fault: FaultSpec, rec: FaultRecord) -> None:
        """Issue 16: a server replaced by another (rehost) under load, in a real ledger.

        The old server's transfer-out reclaim names the new one; once its receipt is
        verified the ledger moves the assignment; the new server activates it. A round of
        the scenario's load runs between every two steps.
        """
        assert self.vendor is not None
        from simulators.licensing_server.ledger import Ledger

        old = self._pick(fault, rec, self._can_request)
        others = [s for s in self.servers if s is not old and self._can_request(s)]
        if not others:
            raise _NoServerFits("skipped: no second server to replace it")
        new = others[-1]
        feature, ent = "rehost-test", "licsim-rehost"
        scratch = Path(tempfile.mkdtemp(prefix="licsim-rehost-"))
        loaded = 0

        def load() -> None:
            nonlocal loaded
            for _ in range(3):
                loaded += self.load_once()

        try:
            with Ledger(scratch / "ledger.db", self.vendor, clock=old.now) as led:
                led.entitle(ent, "sim", {feature: 2})
                led.assign(ent, old.device_id, feature, 2)
                res, _w = old.agent().apply(led.answer_request(
                    old.agent().request(Action.ACTIVATE, [feature])))
                led.accept_receipt(res.receipt)
                led.observe_device_info(new.agent().info()[0])
                load()
                req = old.agent().request(Action.RECLAIM, [feature], transfer_to=new.device_id)
                load()
                resp = led.answer_request(req)
                load()
                res, _w = old.agent().apply(resp)
                load()
                led.accept_receipt(res.receipt)
                gone = not old.agent().check(feature).licensed
                self._check(rec, "old-holds-none", gone, f"{old.name}: {feature} gone")
                load()
                res, _w = new.agent().apply(led.answer_request(
                    new.agent().request(Action.ACTIVATE, [feature])))
                led.accept_receipt(res.receipt)
                got = self._installed(new).get(feature, 0)
                self._check(rec, "new-gets-them", got == 2, f"{new.name} holds {got} {feature}")
                free = led.free(ent, feature)
                self._check(rec, "counted-once", free == 0, f"{free} free of 2 after the move")
                again, _w = old.agent().apply(resp)  # the transfer-out replayed: nothing back
                self._check(rec, "replay-gives-nothing",
                            not old.agent().check(feature).licensed,
                            "already applied" if again.already_applied else "applied again")
                res, _w = new.agent().apply(led.answer_request(
                    new.agent().request(Action.RECLAIM, [feature])))
                led.accept_receipt(res.receipt)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        rec["detail"] = (f"{old.name} rehosted to {new.name} in a real ledger, "
                         f"{loaded} load operations between the steps")

    def _installed(self, srv: SimServer) -> dict[str, int]:
        try:
            return self._snapshot(srv)[2]
        except LicensingError:
            return {}



def _put_back(state: Path, copy: Path) -> None:
    """Put a store directory back from a copy, as a restore of the folder does: each file
    of the copy, and no file the copy did not have (a newer slot would name a longer
    journal), under the store lock."""
    from agent.store import STATE_FILES, store_lock

    with store_lock(state):
        kept = {f.name for f in copy.iterdir()}
        for name in STATE_FILES:
            if name not in kept and name != "lock":
                (state / name).unlink(missing_ok=True)
        for f in copy.iterdir():
            if f.name != "lock":
                shutil.copy2(f, state / f.name)


#: the injector of each fault kind
INJECTORS: Mapping[str, Callable[[FaultInjection, FaultSpec, FaultRecord], None]] = {
    "power-loss": FaultInjection._fault_power_loss,
    "link": FaultInjection._fault_link,
    "clock-jump": FaultInjection._fault_clock_jump,
    "nic-replaced": FaultInjection._fault_nic_replaced,
    "clone-store": FaultInjection._fault_clone_store,
    "broker-restart": FaultInjection._fault_broker_restart,
    "reclaim": FaultInjection._fault_reclaim,
    "parent-offline": FaultInjection._fault_parent_offline,  # issue 14
    "parent-reclaim": FaultInjection._fault_parent_reclaim,
    "child-moved": FaultInjection._fault_child_moved,
    "clock-future": FaultInjection._fault_clock_future,  # issue 16
    "restore-backup": FaultInjection._fault_restore_backup,
    "server-dead": FaultInjection._fault_server_dead,
    "server-replaced": FaultInjection._fault_server_replaced,
}
assert set(INJECTORS) == set(FAULT_KINDS), "every fault kind has its injector"

"""The fleet: provisions simulated servers, serves them on their links, injects faults, reports.

Python API for test benches::

    with Fleet.from_scenario("scenario.toml", workdir) as fleet:
        urls = fleet.urls(link="tcp")
        fleet.inject(FaultSpec("power-loss"))
        report = fleet.summary()

Everything the fleet starts (listeners, its MQTT loop, the USB-mailbox poller,
its own mosquitto, the clients of the load generator) is stopped by
:meth:`Fleet.stop`; its working folder is removed unless it was given or
``keep`` is set.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from agent.cose import PublicKey, SigningKey
from agent.errors import (
    CopiedStoreError,
    LicensingError,
    SequenceError,
    UsageError,
)
from agent.messages import Action
from simulators.fleet.broker import MosquittoBroker
from simulators.fleet.links import ServedLinks, start_mqtt
from simulators.fleet.models import make_facts, replacement_mac
from simulators.fleet.power import PowerLoss, PowerLossOps
from simulators.fleet.report import Invariant, Latency, Summary
from simulators.fleet.scenario import (
    FAULT_KINDS,
    FaultSpec,
    Scenario,
    load_scenario,
    parse_scenario,
)
from simulators.fleet.server import ServerHandler, SimServer
from simulators.licensing_server.vendor import Grant, Vendor
from simulators.mqttlite import DeviceEngine

__all__ = ["FaultRecord", "Fleet", "check_capacity"]

DAY = 86400
#: a license issued at provisioning runs for this long (so a clock jump can outlive it)
SUBSCRIPTION = 365 * DAY
#: how far a clock-jump fault moves the clock by default
CLOCK_JUMP = 400 * DAY
#: an upper bound for servers to come back after a fault (a bound, not a measurement)
RECOVER_WAIT = 30.0
LOG_LIMIT = 10_000
#: clients the fleet keeps open at once (load over many servers reuses the recent ones)
MAX_CLIENTS = 64


def rss_kib() -> int:
    """This process's resident memory now, KiB (0 where /proc cannot tell)."""
    return _status_kib("VmRSS:")


def peak_rss_kib() -> int:
    """This process's peak resident memory, KiB."""
    return _status_kib("VmHWM:")


def _status_kib(key: str) -> int:
    try:
        return int(Path("/proc/self/status").read_text().split(key)[1].split()[0])
    except (OSError, IndexError, ValueError):
        return 0


def check_capacity(sc: Scenario) -> dict[str, int]:
    """Check file descriptors and loopback ports before anything starts (raise the soft fd limit).

    Each tcp listener, pty and MQTT session holds a descriptor in this process, and
    each MQTT session an ephemeral port towards the broker. A fleet that would run out
    is refused with a plan instead of failing halfway with "address not available".

    Returns:
        ``{"fds": needed, "fd_limit": ..., "ports": needed, "port_range": ...}``.

    Raises:
        UsageError: the fleet does not fit in one process; the message says how to split it.
    """
    import math
    import resource

    from simulators.mqttlite.limits import port_range, raise_fd_limit

    per_link = {"tcp": 1, "pty": 1, "mqtt": 1}
    fds = sum(g.count * sum(per_link.get(lk, 0) for lk in g.links) for g in sc.servers)
    fds += 3 * MAX_CLIENTS + 100  # clients and their server ends, the broker, logs, slack
    soft, hard = raise_fd_limit()
    ports = sum(g.count for g in sc.servers if "mqtt" in g.links) + MAX_CLIENTS
    low, high = port_range()
    port_range_size = high - low + 1
    if soft != resource.RLIM_INFINITY and fds > soft:
        parts = math.ceil(fds / max(1, soft - 3 * MAX_CLIENTS - 100))
        raise UsageError(f"this fleet needs about {fds} file descriptors and this process may "
                         f"open {soft} (hard limit {hard}): split it into {parts} licsim "
                         f"processes, each with its own site, or raise the limit (ulimit -n)")
    if ports > port_range_size:
        parts = math.ceil(ports / max(1, port_range_size - MAX_CLIENTS))
        raise UsageError(f"this fleet needs about {ports} loopback ports towards the broker and "
                         f"{port_range_size} ephemeral ports exist (ip_local_port_range): split it "
                         f"into {parts} licsim processes, each with its own site and broker "
                         f"address (127.0.0.N)")
    return {"fds": fds, "fd_limit": int(soft), "ports": ports, "port_range": port_range_size}


class _NoServerFits(Exception):
    """A random fault found no server it can act on; recorded as skipped."""


class FaultRecord(dict[str, Any]):
    """One injected fault: ``time``, ``kind``, ``server``, ``link``, ``detail``, ``held``, ``checks``."""


class _Clients:
    """The fleet's own clients (load, reachability checks), one per server and link, reused."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.open: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.loop: Any = None

    def get(self, server: SimServer, link: str, timeout: float, faulty: bool = True) -> Any:
        """The client of ``server`` on ``link``; ``timeout`` bounds one call, retries included.

        ``faulty``: on sim:// the load's line carries ``[load] sim_line`` faults; the
        reachability checks use a clean line.
        """
        import hw

        faulty = faulty and link == "sim" and bool(self.fleet.scenario.load.sim_line)
        key = (server.name, link + ("+faults" if faulty else ""))
        c = self.open.get(key)
        if c is not None:
            self.open.move_to_end(key)
            return c
        while len(self.open) >= MAX_CLIENTS:  # the least recently used goes
            _k, old = self.open.popitem(last=False)
            try:
                old.close()
            except Exception:
                pass
        ctx: dict[str, Any] = {"timeout": timeout / 4, "tries": 4}
        url = server.addresses[link]
        if link == "mqtt":
            if self.loop is None:
                from hw.backends.mqtt import MqttLoop

                self.loop = MqttLoop("fleet-clients")
                self.loop.start()
            ctx.update(loop=self.loop, timeout=timeout / 3, tries=3)
        elif link == "sim":
            ctx["fabric"] = self.fleet.links.fabric
            if faulty:
                url += "?" + self.fleet.scenario.load.sim_line
        elif link == "usbdrop":
            url += f"&timeout={timeout:g}"
            ctx = {}
        c = hw.connect(url, **ctx)
        self.open[key] = c
        return c

    def has(self, server: SimServer, link: str) -> bool:
        return any(k in self.open for k in ((server.name, link), (server.name, link + "+faults")))

    def release(self, server: SimServer, link: str) -> None:
        """Done for now: a console (pty) is closed again so other tools can open it."""
        if link == "pty":
            self.drop(server, link)

    def drop(self, server: SimServer, link: str) -> None:
        for key in ((server.name, link), (server.name, link + "+faults")):
            c = self.open.pop(key, None)
            if c is None:
                continue
            try:
                c.close()
            except Exception:
                pass

    def close(self) -> None:
        for key in list(self.open):
            c = self.open.pop(key)
            try:
                c.close()
            except Exception:
                pass
        if self.loop is not None:
            self.loop.stop()
            self.loop = None


class Fleet:
    """A fleet of simulated servers described by a :class:`Scenario`.

    Args:
        scenario: what to run.
        workdir: where stores, mailboxes and the broker's files go; a temporary
            folder (removed at stop unless ``keep``) when None.
        keep: keep ``workdir`` after :meth:`stop`.
        log: receives one line per fleet event (faults, links); default: kept in memory only.
    """

    def __init__(self, scenario: Scenario, workdir: Path | None = None, keep: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        self.scenario = scenario
        self._own_dir = workdir is None and scenario.state_dir is None
        given = workdir or scenario.state_dir
        # a temporary folder is made by start(), so a fleet never started leaves none
        self.workdir = Path(given).resolve() if given else Path(tempfile.gettempdir(),
                                                                 "licsim-unstarted")
        self.keep = keep or not self._own_dir
        self._made = False
        self._log_fn = log
        self.events: list[str] = []
        self.servers: list[SimServer] = []
        self.by_name: dict[str, SimServer] = {}
        self.served: Counter[str] = Counter()
        self.broker: MosquittoBroker | None = None
        self.broker_url: str | None = scenario.broker.url
        self.mqtt: DeviceEngine | None = None
        self.links = ServedLinks(self.workdir, None, self.log)
        self.clients = _Clients(self)
        self.vendor: Vendor | None = None
        self.trust: list[PublicKey] = []
        self.vendor_key_path: Path | None = None
        self.trust_path: Path | None = None
        self.rng = random.Random(f"{scenario.seed}/faults" if scenario.random_faults.seed is None
                                 else f"{scenario.random_faults.seed}/faults")
        self.load_rng = random.Random(f"{scenario.seed}/load")
        self.faults: list[FaultRecord] = []
        self.entitled: dict[str, dict[str, int]] = {}
        self.reclaimed: dict[str, set[str]] = {}
        self.ops: Counter[str] = Counter()
        self.op_failures: Counter[str] = Counter()
        self.latency = Latency()
        self.link_latency: dict[str, Latency] = {}
        self.lost = 0
        self.reconnects = 0
        self.started_at = 0.0
        self.rss_start = self.rss_ready = 0  # KiB, at start() and once every server is ready
        self.ready_at = 0.0
        self.provisioned_at = 0.0
        self.stopped_at = 0.0
        self.ready = False
        self.not_ready: list[str] = []
        self._started = False
        self._stopped = False
        self._final: list[Invariant] | None = None
        self._messages: dict[str, int] | None = None

    # ------------------------------------------------------------ construction

    @classmethod
    def from_scenario(cls, scenario: str | Path | Mapping[str, Any] | Scenario,
                      workdir: str | Path | None = None, keep: bool = False,
                      log: Callable[[str], None] | None = None) -> Fleet:
        """A fleet from a scenario file, a mapping with the same keys, or a Scenario.

        Raises:
            UsageError: the scenario is not valid (the message names the key).
        """
        if isinstance(scenario, Scenario):
            sc = scenario
        elif isinstance(scenario, Mapping):
            sc = parse_scenario(scenario)
        else:
            sc = load_scenario(Path(scenario))
        return cls(sc, Path(workdir) if workdir is not None else None, keep, log)

    def log(self, line: str) -> None:
        stamp = f"{time.monotonic() - self.started_at:8.3f}" if self.started_at else "   0.000"
        text = f"{stamp} {line}"
        if len(self.events) < LOG_LIMIT:
            self.events.append(text)
        if self._log_fn is not None:
            self._log_fn(text)

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------ start

    def start(self, ready_timeout: float = 60.0) -> None:
        """Provision every server, serve it on its links, and wait until each is reachable.

        Raises:
            UsageError: the scenario asks for something this fleet cannot do (a vendor
                key is needed, no broker).
            LicensingError: a server could not be provisioned or served; everything
                started so far is stopped again.
        """
        if self._started:
            return
        self._started = True
        self.started_at = time.monotonic()
        self.rss_start = rss_kib()
        try:
            check_capacity(self.scenario)
            if self._own_dir:
                self.workdir = Path(tempfile.mkdtemp(prefix="licsim-")).resolve()
                self.links.workdir = self.workdir
                self._made = True
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._keys()
            if self.scenario.needs_broker:
                self._broker()
            self._provision()
            self.provisioned_at = time.monotonic()
            self._serve()
            self.ready = self._wait_reachable(ready_timeout)
            self.ready_at = time.monotonic()
            self.rss_ready = rss_kib()
            self.log(f"ready: {len(self.servers)} servers in "
                     f"{self.ready_at - self.started_at:.2f} s"
                     + ("" if self.ready else f"; NOT reachable: {', '.join(self.not_ready[:5])}"))
        except BaseException:
            self.stop()
            raise

    def _keys(self) -> None:
        sc = self.scenario
        vdir = self.workdir / "vendor"
        if sc.vendor_key is not None:
            try:
                key = SigningKey.from_pem(sc.vendor_key.read_bytes())
            except OSError as exc:
                raise UsageError(f"scenario vendor_key {sc.vendor_key}: {exc.strerror}") from exc
            self.vendor = Vendor(key)
            self.vendor_key_path = sc.vendor_key
        elif sc.trust is None:
            vdir.mkdir(parents=True, exist_ok=True)
            key = SigningKey.generate()
            self.vendor_key_path = vdir / "vendor.key"
            self.vendor_key_path.write_bytes(key.to_pem())
            os.chmod(self.vendor_key_path, 0o600)
            (vdir / "vendor.pub").write_bytes(key.public.to_pem())
            self.vendor = Vendor(key)
        if sc.trust is not None:
            try:
                self.trust = [PublicKey.from_pem(sc.trust.read_bytes())]
            except OSError as exc:
                raise UsageError(f"scenario trust {sc.trust}: cannot read the vendor public "
                                 f"key: {exc.strerror}") from exc
            self.trust_path = sc.trust
        else:
            assert self.vendor is not None
            self.trust = [self.vendor.public]
            self.trust_path = vdir / "vendor.pub"
            if not self.trust_path.exists():
                vdir.mkdir(parents=True, exist_ok=True)
                self.trust_path.write_bytes(self.vendor.public.to_pem())
        if self.vendor is not None and self.vendor.public not in self.trust:
            raise UsageError("scenario: vendor_key is not the key named by trust")
        if self.vendor is None:
            wants = [g.model for g in sc.servers if g.licenses]
            kinds = {f.kind for f in sc.schedule} | (
                set(sc.random_faults.kinds) if sc.random_faults.count else set())
            need = sorted(kinds & {"power-loss", "reclaim"})
            if wants or need:
                raise UsageError("scenario: licenses and the power-loss and reclaim faults are "
                                 "issued by the vendor: give vendor_key = \"FILE\" (the private "
                                 "key matching trust), or leave trust out and licsim makes a "
                                 "vendor key")

    def _broker(self) -> None:
        sc = self.scenario
        if sc.broker.start:
            self.broker = MosquittoBroker(self.workdir / "broker")
            self.broker.start()
            self.broker_url = self.broker.url
            self.log(f"broker started: {self.broker_url}")
        assert self.broker_url is not None
        self.mqtt = start_mqtt(self.broker_url, sc.site, log=self.log)
        self.links.mqtt = self.mqtt

    def _provision(self) -> None:
        sc = self.scenario
        per_model: Counter[str] = Counter()
        for g in sc.servers:
            prefix = g.name or g.model.lower()
            for _ in range(g.count):
                per_model[g.model] += 1
                i = per_model[g.model]
                name = f"{prefix}-{i:04d}"
                if name in self.by_name:
                    raise UsageError(f"scenario: two servers would be named {name}; give the "
                                     f"[[servers]] tables different names")
                index = len(self.servers) + 1
                facts = make_facts(g.model, sc.seed, index)
                srv = SimServer(name, g.model, self.workdir / "servers" / name, facts, g.links)
                agent = srv.agent()
                if (srv.state_dir / "device.key").exists():
                    st = agent.status()  # a kept state_dir: the same servers again
                else:
                    agent.init(g.model, facts.serial, self.trust)
                    st = agent.status()
                    if g.licenses:
                        self._activate(srv, dict(g.licenses))
                srv.device_id = str(st["device_id"])
                self.entitled[name] = dict(g.licenses)
                self.servers.append(srv)
                self.by_name[name] = srv
        self.log(f"provisioned {len(self.servers)} servers "
                 f"({', '.join(f'{m} {n}' for m, n in per_model.items())})")

    def _activate(self, srv: SimServer, licenses: dict[str, int]) -> None:
        assert self.vendor is not None
        agent = srv.agent()
        req = agent.request(Action.ACTIVATE, list(licenses))
        now = srv.now()
        resp = self.vendor.issue(req, [Grant(f, n, not_after=now + SUBSCRIPTION)
                                       for f, n in licenses.items()], now=now)
        agent.apply(resp)
        (Path(srv.directory) / "activation.resp").write_bytes(resp)

    def _serve(self) -> None:
        for srv in self.servers:
            handler = ServerHandler(srv, self.served)
            for link in srv.links:
                srv.addresses[link] = self.links.serve(srv.name, srv.device_id, srv.model, link,
                                                       handler)

    def _wait_reachable(self, timeout: float) -> bool:
        """Every server answers ``hello`` on every link (mqtt: its presence is listed online)."""
        self.not_ready = []
        if self.mqtt is not None:
            n = sum(1 for s in self.servers if "mqtt" in s.links)
            if self.mqtt.wait_ready(n, timeout) < n:
                self.not_ready.append(f"mqtt: {self.mqtt.stats().get('connected', '?')} of "
                                      f"{n} connected")
            else:
                self._check_presence(n, timeout)
        boxes = [s for s in self.servers if "usbdrop" in s.links]
        if boxes and not self._until(lambda: all(self.links.mailbox_ready(s.name, s.device_id)
                                                 for s in boxes), timeout):
            self.not_ready += [f"{s.name} usbdrop (no device-info.cbor on its stick)"
                               for s in boxes if not self.links.mailbox_ready(s.name,
                                                                              s.device_id)]
        for srv in self.servers:
            for link in srv.links:
                # mqtt: listed online above; usbdrop: every mailbox wrote its device
                # information, and the first one answers an RPC (a round trip costs a poll
                # cycle over every mailbox, so not one per server)
                if link == "mqtt" or (link == "usbdrop" and srv is not boxes[0]):
                    continue
                if not self._hello(srv, link):
                    self.not_ready.append(f"{srv.name} {link}")
        return not self.not_ready

    def _check_presence(self, n: int, timeout: float) -> bool:
        from hw.backends.mqtt import discover

        assert self.broker_url is not None
        want = {s.device_id for s in self.servers if "mqtt" in s.links}
        deadline = time.monotonic() + timeout
        while True:
            try:
                online = {d for d, _m, up in discover(f"{self.broker_url}/{self.scenario.site}",
                                                      timeout=max(5.0, n / 500))
                          if up}
            except LicensingError as exc:
                online = set()
                self.log(f"discover failed: {exc}")
            missing = want - online
            if not missing:
                return True
            if time.monotonic() > deadline:
                self.not_ready.append(f"mqtt: {len(missing)} device(s) not listed online")
                return False
            time.sleep(0.2)

    def _hello(self, srv: SimServer, link: str, tries: int = 3) -> bool:
        for _ in range(tries):
            try:
                c = self.clients.get(srv, link, self.scenario.load.timeout, faulty=False)
                c.call("hello", {"versions": [1]})
                self.clients.release(srv, link)
                return True
            except LicensingError as exc:
                self.log(f"{srv.name} {link}: hello failed: {exc}")
                self.clients.drop(srv, link)
        return False

    # ------------------------------------------------------------ queries

    def urls(self, link: str | None = None, model: str | None = None) -> list[str]:
        """The client URLs of every server (on ``link``, of ``model``), in server order."""
        out = []
        for s in self.servers:
            if model is not None and s.model != model:
                continue
            for lk, url in s.addresses.items():
                if link is None or lk == link:
                    out.append(url)
        return out

    def server(self, name: str) -> SimServer:
        try:
            return self.by_name[name]
        except KeyError:
            raise UsageError(f"no server {name!r} in this fleet") from None

    # ------------------------------------------------------------ load

    def operate(self, srv: SimServer, link: str, op: str) -> bool:
        """One operation from the fleet's client over a real link; latency recorded."""
        feature = (self.scenario.load.features or tuple(self.entitled.get(srv.name, {}))
                   or ("bacnet-ip",))
        t0 = time.monotonic()
        for attempt in (1, 2):
            fresh = not self.clients.has(srv, link)
            try:
                c = self.clients.get(srv, link, self.scenario.load.timeout)
                if op == "status":
                    c.status()
                elif op == "check":
                    c.check(self.load_rng.choice(feature))
                else:
                    c.info()
                break
            except LicensingError as exc:
                if exc.reason == "transport":
                    self.clients.drop(srv, link)
                    if attempt == 1 and not fresh:
                        # the kept connection died (a link fault): connect again once, as a
                        # real client would
                        self.reconnects += 1
                        continue
                    self.lost += 1
                self.op_failures[op] += 1
                self.log(f"load {op} {srv.name} {link}: {exc.reason}: {str(exc)[:160]}")
                return False
        took = time.monotonic() - t0
        self.latency.add(took)
        self.link_latency.setdefault(link, Latency()).add(took)
        self.ops[op] += 1
        self.clients.release(srv, link)
        return True

    def load_once(self) -> bool:
        """One operation of the scenario's load mix on a server and link drawn at random."""
        ld = self.scenario.load
        srv = self.load_rng.choice(self.servers)
        links = [lk for lk in srv.links if lk in ld.links] or list(srv.links)
        return self.operate(srv, self.load_rng.choice(links), self.load_rng.choice(ld.ops))

    # ------------------------------------------------------------ running

    def run(self, duration: float | None = None, stop: threading.Event | None = None) -> None:
        """Inject the scheduled and random faults and run the load until ``duration`` or ``stop``."""
        sc = self.scenario
        stop = stop or threading.Event()
        t0 = time.monotonic()
        pending = sorted(sc.schedule, key=lambda f: f.at or 0.0)
        rnd = sc.random_faults
        randoms = rnd.count if rnd.every > 0 else 0
        next_random = rnd.every
        period = 1.0 / sc.load.rate if sc.load.rate > 0 else None
        next_op = 0.0
        while not stop.is_set():
            now = time.monotonic() - t0
            if duration is not None and now >= duration:
                break
            while pending and (pending[0].at or 0.0) <= now:
                self.inject(pending.pop(0))
            if randoms and now >= next_random:
                randoms -= 1
                next_random += rnd.every
                self.inject(FaultSpec(self.rng.choice(rnd.kinds)))
            if period is not None and now >= next_op:
                self.load_once()
                next_op += period
                if now - next_op > 1.0:  # fell behind: do not burst to catch up
                    next_op = now
            waits = [x for x in (next_op if period else None,
                                 next_random if randoms else None,
                                 (pending[0].at or 0.0) if pending else None,
                                 duration) if x is not None]
            wait = min(waits) - (time.monotonic() - t0) if waits else 0.5
            if wait > 0:
                stop.wait(min(wait, 0.5))
        for f in pending:
            self.log(f"fault {f.kind} at {f.at:g} s not reached (the run ended first)")

    # ------------------------------------------------------------ faults

    def inject(self, fault: FaultSpec | str) -> FaultRecord:
        """Inject one fault now and check what must hold afterwards.

        Returns:
            the record added to the report (``held`` False when an invariant broke).

        Raises:
            UsageError: an unknown kind, server or link.
        """
        if isinstance(fault, str):
            fault = FaultSpec(fault)
        if fault.kind not in FAULT_KINDS:
            raise UsageError(f"unknown fault kind {fault.kind!r} "
                             f"(known: {', '.join(FAULT_KINDS)})")
        fn = getattr(self, "_fault_" + fault.kind.replace("-", "_"))
        since = self.ready_at or self.started_at
        rec = FaultRecord(time=round(time.monotonic() - since, 3), kind=fault.kind,
                          server=None, link=fault.link, detail="", held=True, checks=[])
        try:
            fn(fault, rec)
        except _NoServerFits as exc:  # e.g. a reclaim where nothing is installed any more
            rec["detail"] = str(exc)
            rec["injected"] = False
        except LicensingError as exc:
            if isinstance(exc, UsageError) and rec["server"] is None:
                raise
            rec["held"] = False
            rec["detail"] += f" FAILED: {exc.reason}: {exc}"
        except Exception as exc:  # a bug in the fault itself: reported, the run goes on
            rec["held"] = False
            rec["detail"] += f" FAILED: internal error {exc!r}"
        rec["injected"] = rec.get("injected", True)
        self.faults.append(rec)
        outcome = ("not injected" if not rec["injected"] else
                   "held" if rec["held"] else "BROKEN")
        self.log(f"fault {rec['kind']} {rec['server'] or '-'} {rec['link'] or ''}: "
                 f"{rec['detail'].strip()} -> {outcome}")
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
                {x["feature"]: int(x["count"]) for x in st["licenses"]})

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
        rec["detail"] = self.links.fault(srv.name, srv.device_id, link, noise)
        if link == "usbdrop":
            ok_out = not self._hello_once(srv, link, timeout=0.5)
            self._check(rec, "pulled-stick-unreachable", ok_out,
                        "no answer while the stick is out" if ok_out else "answered anyway")
            self.links.heal(srv.name)
            rec["detail"] += ", put back"
        back = self._until(lambda: self._hello(srv, link, tries=1), RECOVER_WAIT)
        self._check(rec, "reachable-again", back, f"{srv.name} answers on {link} again"
                    if back else f"{srv.name} does not answer on {link}")

    def _hello_once(self, srv: SimServer, link: str, timeout: float) -> bool:
        import hw

        url = srv.addresses[link] + (f"&timeout={timeout:g}" if link == "usbdrop" else "")
        try:
            with hw.connect(url, timeout=timeout, tries=1) as c:
                c.call("hello", {"versions": [1]})
            return True
        except LicensingError:
            return False

    @staticmethod
    def _until(fn: Callable[[], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if fn():
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)

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
        copy = self.workdir / "clones" / f"{srv.name}-{len(self.faults)}"
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
        if self.broker is None or self.mqtt is None:
            rec["detail"] = ("skipped: the broker is not licsim's own ([broker] start = true) "
                             "or no server uses mqtt")
            rec["injected"] = False
            return
        self.broker.restart()
        n = sum(1 for s in self.servers if "mqtt" in s.links)
        back = self.mqtt.wait_ready(n, RECOVER_WAIT) >= n
        rec["detail"] = (f"mosquitto killed and started again; "
                         f"{self.mqtt.stats().get('connected', '?')} of {n} sessions reconnected")
        self._check(rec, "sessions-reconnect", back, rec["detail"])
        self.not_ready = []
        listed = back and self._check_presence(n, RECOVER_WAIT)
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

    def _installed(self, srv: SimServer) -> dict[str, int]:
        try:
            return self._snapshot(srv)[2]
        except LicensingError:
            return {}

    # ------------------------------------------------------------ invariants and report

    def invariants(self) -> list[Invariant]:
        """Check every server's store now, and fold in what each fault checked."""
        out = [Invariant("all-reachable-at-start", self.ready,
                         "every server answered on every link" if self.ready
                         else "; ".join(self.not_ready[:5]))]
        bad: dict[str, list[str]] = {"stores-verify": [], "journals-verify": [],
                                     "within-entitlement": [], "reclaimed-gone": []}
        external: set[str] = set()
        for srv in self.servers:
            try:
                st = srv.agent().status()
            except LicensingError as exc:
                bad["stores-verify"].append(f"{srv.name}: {exc.reason}: {exc}")
                continue
            try:
                srv.agent().journal()
            except LicensingError as exc:
                bad["journals-verify"].append(f"{srv.name}: {exc}")
            ent = self.entitled.get(srv.name, {})
            for lic in st["licenses"]:
                if lic["feature"] not in ent:
                    external.add(lic["feature"])  # issued by a licensing server, not by us
                elif lic["count"] > ent[lic["feature"]]:
                    bad["within-entitlement"].append(
                        f"{srv.name}: {lic['feature']} {lic['count']} > {ent[lic['feature']]}")
            for f in self.reclaimed.get(srv.name, ()):
                if any(lic["feature"] == f for lic in st["licenses"]):
                    bad["reclaimed-gone"].append(f"{srv.name}: {f}")
        what = {"stores-verify": "every store opens, verifies its MAC and its hardware binding",
                "journals-verify": "every journal's hash chain and MACs verify",
                "within-entitlement": "no installed count above what the server was issued",
                "reclaimed-gone": "no reclaimed license is installed again"}
        if external:
            what["within-entitlement"] += (f"; features issued outside the fleet, not "
                                           f"checked: {', '.join(sorted(external))}")
        for name, problems in bad.items():
            out.append(Invariant(name, not problems, "; ".join(problems[:5]) or
                                 f"{what[name]} ({len(self.servers)} servers)"))
        by_check: dict[str, list[tuple[bool, str]]] = {}
        for rec in self.faults:
            for chk in rec["checks"]:
                by_check.setdefault(f"{rec['kind']}: {chk['name']}", []).append(
                    (chk["held"], f"{rec['server']}: {chk['detail']}"))
        for name, results in by_check.items():
            broken = [d for h, d in results if not h]
            out.append(Invariant(name, not broken, "; ".join(broken[:5]) or
                                 f"held in {len(results)} fault(s)"))
        return out

    def summary(self) -> Summary:
        """The run's report (invariants checked now, or as checked at stop)."""
        by_model = Counter(s.model for s in self.servers)
        by_link = Counter(lk for s in self.servers for lk in s.links)
        ready_s = (self.ready_at - self.started_at) if self.ready_at else 0.0
        end = self.stopped_at or time.monotonic()
        return Summary(
            site=self.scenario.site,
            seed=self.scenario.seed,
            workdir=str(self.workdir),
            servers=len(self.servers),
            by_model=dict(by_model),
            by_link=dict(by_link),
            ready=self.ready,
            ready_seconds=ready_s,
            run_seconds=end - (self.ready_at or self.started_at) if self.started_at else 0.0,
            ops=dict(self.ops),
            op_failures=dict(self.op_failures),
            served=dict(self.served),
            latency=self.latency,
            link_latency=self.link_latency,
            provision_seconds=self.provisioned_at - self.started_at if self.provisioned_at
            else 0.0,
            load_rate=self.scenario.load.rate,
            messages=self._messages if self._messages is not None else self._message_counts(),
            faults=list(self.faults),
            memory={"rss_start_kib": self.rss_start, "rss_ready_kib": self.rss_ready,
                    "rss_now_kib": rss_kib(), "peak_kib": peak_rss_kib()},
            invariants=self._final if self._final is not None else self.invariants(),
            broker=self.broker_url,
        )

    def _message_counts(self) -> dict[str, int]:
        line = self.links.fabric.counts()
        mq: Mapping[str, int] = self.mqtt.stats() if self.mqtt is not None else {}
        return {"lost": self.lost, "reconnects": self.reconnects,
                "duplicated": line["dups"] + mq.get("repeats", 0),
                "line_drops": line["drops"], "line_bit_flips": line["bit_flips"],
                "line_noise_bursts": line["noise_bursts"],
                "corrupt_frames": self.links.corrupt_frames(),
                "mqtt_repeats_answered_from_memory": mq.get("repeats", 0),
                "mqtt_dropped": mq.get("dropped", 0)}

    # ------------------------------------------------------------ stop

    def stop(self) -> None:
        """Stop everything this fleet started; check the invariants first. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self.stopped_at = time.monotonic()
        self.clients.close()
        self._messages = self._message_counts()  # the listeners' counters go with them
        self.links.stop()
        if self.servers and self._final is None:
            try:
                self._final = self.invariants()
            except Exception as exc:
                self._final = [Invariant("invariants-checked", False, repr(exc))]
        if self.broker is not None:
            self.broker.stop()
        if not self.keep and self._made:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def iter_servers(self, model: str | None = None) -> Iterator[SimServer]:
        return (s for s in self.servers if model is None or s.model == model)


"""The fleet's lifecycle and load: provisions simulated servers, serves them, runs, reports.

The fault injectors are :mod:`simulators.fleet.faults` (mixed into :class:`Fleet`),
the invariants :mod:`simulators.fleet.invariants`, each link kind (serving, the
fleet's client, readiness, its fault hook) :mod:`simulators.fleet.links`, and the
fleet's own clients :mod:`simulators.fleet.clients`.

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
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.cose import PublicKey, SigningKey
from agent.errors import LicensingError, MalformedError, UsageError
from agent.messages import Action
from apps.common import read_public_key, read_signing_key
from simulators.fleet.broker import MosquittoBroker, bridge_config, free_port, plain_config
from simulators.fleet.clients import MAX_CLIENTS, FleetClients
from simulators.fleet.faults import SUBSCRIPTION, FaultInjection, FaultRecord
from simulators.fleet.invariants import check_invariants
from simulators.fleet.links import LINK_KINDS, ServedLinks
from simulators.fleet.models import make_facts
from simulators.fleet.report import Invariant, Latency, Summary
from simulators.fleet.scenario import FaultSpec, Scenario, load_scenario, parse_scenario
from simulators.fleet.seat_load import SeatLoad, seats_within_count
from simulators.fleet.server import ServerHandler, SimServer, device_info
from simulators.fleet.systems import (
    SystemRun,
    attach_children,
    provision_systems,
    system_invariants,
)
from simulators.licensing_server.vendor import Grant, Vendor

__all__ = ["FaultRecord", "Fleet", "check_capacity"]

LOG_LIMIT = 10_000


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

    fds = sum(g.count * sum(LINK_KINDS[lk].fds for lk in g.links) for g in sc.servers)
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



class Fleet(FaultInjection):
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
        workdir = Path(given).resolve() if given else Path(tempfile.gettempdir(),
                                                           "licsim-unstarted")
        self.keep = keep or not self._own_dir
        self._made = False
        self._log_fn = log
        self.events: list[str] = []
        self.servers: list[SimServer] = []
        self.by_name: dict[str, SimServer] = {}
        self.served: Counter[str] = Counter()
        self.broker: MosquittoBroker | None = None
        seat_clients = scenario.clients.count
        self.links = ServedLinks(workdir, self.log, sim_line=scenario.load.sim_line,
                                 tcp_sessions=seat_clients + 16 if seat_clients else None)
        self.clients = FleetClients(self.links)
        self.vendor: Vendor | None = None
        self.trust: list[PublicKey] = []
        self.vendor_key_path: Path | None = None
        self.trust_path: Path | None = None
        self.rng = random.Random(f"{scenario.seed}/faults" if scenario.random_faults.seed is None
                                 else f"{scenario.random_faults.seed}/faults")
        self.load_rng = random.Random(f"{scenario.seed}/load")
        self.faults: list[FaultRecord] = []
        self.entitled: dict[str, dict[str, int]] = {}
        self.systems: list[SystemRun] = []  # issue 14: [[systems]]
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

    @property
    def workdir(self) -> Path:
        """Where stores, mailboxes and the broker's files go (the links' folder)."""
        return self.links.workdir

    @property
    def broker_url(self) -> str | None:
        """The broker of the mqtt link: licsim's own once started, else ``[broker] url``."""
        return self.links.broker_url or self.scenario.broker.url

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
                self.links.workdir = Path(tempfile.mkdtemp(prefix="licsim-")).resolve()
                self._made = True
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._keys()
            if self.scenario.needs_broker:
                self._broker()
            self._provision()
            self.provisioned_at = time.monotonic()
            self._serve()
            self.ready = self._wait_reachable(ready_timeout)
            if self.systems:
                attach_children(self)
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
                key = read_signing_key(str(sc.vendor_key), "scenario vendor_key")
            except MalformedError as exc:  # a bad scenario is a usage error (exit 2)
                raise UsageError(f"scenario vendor_key: {exc}") from exc
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
                self.trust = [read_public_key(str(sc.trust), "scenario trust")]
            except MalformedError as exc:
                raise UsageError(f"scenario trust: {exc}") from exc
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
            config = None
            if sc.broker.bridge_to is not None:
                port = free_port()
                config = plain_config(port) + bridge_config(sc.site, sc.broker.bridge_to)
                self.broker = MosquittoBroker(self.workdir / "broker", config=config, port=port)
            else:
                self.broker = MosquittoBroker(self.workdir / "broker")
            self.broker.start()
            self.log(f"broker started: {self.broker.url}")
        url = self.broker.url if self.broker is not None else sc.broker.url
        assert url is not None
        self.links.start_mqtt(url, sc.site)

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
                device_info(srv)  # signed now, as its state is new; handed out until it changes
                self.entitled[name] = dict(g.licenses)
                self.servers.append(srv)
                self.by_name[name] = srv
        self.systems = provision_systems(self, len(self.servers))
        for run in self.systems:
            per_model["Enterprise-Server"] += 1
            per_model[run.spec.child_model] += len(run.children)
        self.log(f"provisioned {len(self.servers)} servers "
                 f"({', '.join(f'{m} {n}' for m, n in per_model.items())})")

    def _activate(self, srv: SimServer, licenses: dict[str, int]) -> None:
        assert self.vendor is not None
        agent = srv.agent()
        req = agent.request(Action.ACTIVATE, list(licenses))
        now = srv.now()
        floating = self.scenario.clients.feature  # issue 15: served as seats to [clients]
        resp = self.vendor.issue(req, [Grant(f, n, not_after=now + SUBSCRIPTION,
                                             floating=f == floating)
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
        """Every server answers ``hello`` on every link, or is ready as its link kind
        says (mqtt: its presence is listed online; usbdrop: every mailbox wrote its device
        information, and the first one answers)."""
        self.not_ready = []
        hello: dict[str, set[str]] = {}
        for kind, servers in self.links.in_use(self.servers):
            self.not_ready += kind.wait_ready(servers, timeout)
            hello[kind.name] = {s.name for s in kind.needs_hello(servers)}
        for srv in self.servers:
            for link in srv.links:
                if srv.name in hello[link] and not self._hello(srv, link):
                    self.not_ready.append(f"{srv.name} {link}")
        return not self.not_ready

    def _hello(self, srv: SimServer, link: str, tries: int = 3) -> bool:
        for _ in range(tries):
            try:
                c = self.clients.get(srv, link, self.scenario.load.timeout, faulty=False)
                c.hello()
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
        """Inject the scheduled and random faults and run the load until ``duration`` or ``stop``.

        When ``duration`` ends, every fault that fell due before the end and was not
        injected yet (the injectors took longer than planned) is injected before the run
        ends, so a scenario's faults do not depend on the machine's speed. A fault due at
        or after the end, or any left when ``stop`` is set, is recorded as not injected
        (:meth:`missed`): a failure of the run unless the scenario marks it optional.
        """
        seat_load = self._seat_load()  # issue 15: [clients]
        seat_load.start()
        try:
            self._run(duration, stop)
        finally:
            seat_load.stop()
            failures = seat_load.stats.pop("seat-failures", 0)
            self.ops.update(seat_load.stats)  # a refusal for want of a seat was answered
            if failures:
                self.op_failures["seat"] += failures

    def _seat_load(self) -> SeatLoad:
        spec = self.scenario.clients
        holders = [(s, "tcp" if "tcp" in s.links else s.links[0]) for s in self.servers
                   if spec.feature in self.entitled.get(s.name, {})]
        timeout = self.scenario.load.timeout

        def connect(srv: SimServer, link: str) -> Any:
            return self.links.kind(link).connect(srv.addresses[link], timeout, "")
        return SeatLoad(spec, holders, connect, self.scenario.seed, self.log)

    def _run(self, duration: float | None, stop: threading.Event | None) -> None:
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
                self.inject(pending.pop(0), planned=True)
            if randoms and now >= next_random:
                randoms -= 1
                next_random += rnd.every
                self._inject_random()
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
        ended = time.monotonic() - t0
        if duration is not None and not stop.is_set():
            # due before the end, late only because injecting the earlier ones took time
            while pending and (pending[0].at or 0.0) < duration:
                self.inject(pending.pop(0), planned=True)
            while randoms and next_random < duration:
                randoms -= 1
                next_random += rnd.every
                self._inject_random()
        why = (f"the run was stopped at {ended:.1f} s" if stop.is_set() else
               f"the run ended at {ended:.1f} s (--duration {duration:g})")
        for f in pending:
            self.missed(f.kind, f, f"not reached: due at {f.at or 0.0:g} s, but {why}",
                        f.optional)
        for i in range(rnd.count - randoms + 1, rnd.count + 1) if randoms else ():
            self.missed("random", None, f"not reached: random fault {i} of {rnd.count}, due "
                        f"at {rnd.every * i:g} s, but {why}", rnd.optional)

    def _inject_random(self) -> None:
        rnd = self.scenario.random_faults
        self.inject(FaultSpec(self.rng.choice(rnd.kinds), optional=rnd.optional), planned=True)

    # ------------------------------------------------------------ invariants and report

    def invariants(self) -> list[Invariant]:
        """Check every server's store now, and fold in what each fault checked."""
        out = check_invariants(self.servers, self.ready, self.not_ready, self.entitled,
                               self.reclaimed, self.faults) + system_invariants(self.systems)
        if self.scenario.clients.count:  # issue 15
            out.append(seats_within_count(self.servers))
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
        mq: Mapping[str, int] = self.links.mqtt.stats() if self.links.mqtt is not None else {}
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

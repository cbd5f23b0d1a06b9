"""A fleet scenario: the TOML file ``licsim run`` takes (or the same keys as a dict), checked.

Contract keys: ``site``, ``seed``, ``trust``, ``[broker] url``, ``[[servers]]``
with ``model``, ``count``, ``links``. Every other key is documented in
:data:`TOP_KEYS` and the ``*_KEYS`` tables; an unknown key, model or link is a
:class:`~agent.errors.UsageError` naming it (exit 2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.errors import UsageError
from simulators.fleet.models import LINKS, MODELS
from simulators.fleet.seat_load import CLIENT_KEYS, ClientsSpec

__all__ = [
    "FAULT_KINDS",
    "BrokerSpec",
    "FaultSpec",
    "LoadSpec",
    "RandomFaults",
    "Scenario",
    "ServerGroup",
    "SystemSpec",
    "load_scenario",
    "parse_scenario",
]

TOP_KEYS: Mapping[str, str] = {
    "site": "the MQTT site name (text, one topic level)",
    "seed": "the seed of every random choice (a whole number)",
    "trust": "the vendor public key file the servers trust (text, a path)",
    "vendor_key": "the vendor private key file, to issue licenses and stage faults (text)",
    "state_dir": "where the stores go; kept after the run (text, a path)",
    "broker": "a table: url, start, bridge_to",
    "servers": "an array of tables: model, count, links, licenses",
    "systems": "an array of tables (issue 14): name, children, child_model, links, "
               "licenses (inheritable, FEATURE = COUNT), lease",
    "faults": "an array of scheduled faults, or a table: seed, every, count, kinds, schedule, "
              "optional",
    "load": "a table: rate, ops, links, features, timeout, sim_line",
    "clients": "a table: count, feature, hold_seconds (issue 15: editors and clients holding "
               "floating seats of feature; the servers' licenses of it are issued floating)",
}
BROKER_KEYS = ("url", "start", "bridge_to")
SERVER_KEYS = ("model", "count", "links", "licenses", "name")
FAULT_KEYS = ("kind", "at", "server", "link", "seconds", "step", "optional")
RANDOM_KEYS = ("seed", "every", "count", "kinds", "schedule", "optional")
LOAD_KEYS = ("rate", "ops", "links", "features", "timeout", "sim_line")
SYSTEM_KEYS = ("name", "children", "child_model", "links", "licenses", "lease")
#: fault kind -> what it does (the fleet's inject() implements each)
FAULT_KINDS: Mapping[str, str] = {
    "power-loss": "power lost during an apply (crash at a store write step), then a restart",
    "link": "the link fails: tcp connections closed, mqtt connection dropped, pty line noise, "
            "usbdrop stick pulled and put back",
    "clock-jump": "the server's clock jumps forward, then back (licenses must not come back)",
    "nic-replaced": "a network card is replaced (new MAC): the binding holds by votes",
    "clone-store": "the store copied to another server of the same model: refused",
    "broker-restart": "the MQTT broker is killed and started again (licsim's own broker)",
    "reclaim": "a license is reclaimed, then the old activation replayed: it stays gone",
    # issue 14: systems ([[systems]])
    "parent-offline": "a system's top server is not heard from past the lease: its children "
                      "lose the inherited licenses and say why; back, they inherit again",
    "parent-reclaim": "an inheritable license is reclaimed on a top server (forced): its "
                      "children lose it at their next renewal",
    "child-moved": "a child is attached to another system's top server: it inherits from "
                   "that one only",
    # issue 16
    "clock-future": "one clock reading in 2038 locks the server out; a vendor-certified time "
                    "answering its fresh clock request brings it back, once",
    "restore-backup": "a store put back from a copy older than a receipt a real ledger "
                      "verified: the ledger refuses its request as restored and flags it; the "
                      "server holds what the copy held",
    "server-dead": "a server declared dead (revoked) in a real ledger: its licenses return, "
                   "the ledger answers it nothing, another server takes them, and the box, "
                   "shown its site's license information, drops what it held",
    "server-replaced": "a server replaced by another under load (rehost in a real ledger): "
                       "the old one holds none, the new one all, counted once, a replay "
                       "gives nothing back",
}
#: the fault kinds that act on [[systems]]: drawn at random only when the fleet has some
SYSTEM_FAULTS = ("parent-offline", "parent-reclaim", "child-moved")
LOAD_OPS = ("status", "check", "info")


@dataclass(frozen=True)
class BrokerSpec:
    url: str | None = None  # mqtt://HOST:PORT; None with start: licsim runs mosquitto itself
    start: bool = False
    #: licsim's own broker bridges lic/SITE/# to this one (mqtt://, or mqtts://...?ca=&cert=&key=)
    bridge_to: str | None = None


@dataclass(frozen=True)
class ServerGroup:
    model: str
    count: int
    links: tuple[str, ...]
    licenses: Mapping[str, int] = field(default_factory=dict)
    name: str | None = None  # name prefix, default the model in lower case


@dataclass(frozen=True)
class SystemSpec:
    """Issue 14: one Enterprise Server (``NAME-top``) with ``children`` servers under it."""

    name: str
    children: int
    child_model: str = "AS-P"
    links: tuple[str, ...] = ("tcp",)
    licenses: Mapping[str, int] = field(default_factory=dict)  # inheritable: COUNT children
    lease: int = 7 * 86400


@dataclass(frozen=True)
class FaultSpec:
    kind: str
    at: float | None = None  # seconds after ready; None: inject() by hand
    server: str | None = None  # default: one drawn at random (seeded)
    link: str | None = None
    seconds: int | None = None  # clock-jump size
    step: int | None = None  # power-loss: the store write step that never happens (1-based)
    #: a fault that cannot be injected (no such server, nothing fits, after the end of the
    #: run) is a failure of the run (exit 1) unless it is optional
    optional: bool = False


@dataclass(frozen=True)
class RandomFaults:
    every: float = 0.0
    count: int = 0
    kinds: tuple[str, ...] = ()
    seed: int | None = None
    optional: bool = False  # the random faults may go uninjected without failing the run


@dataclass(frozen=True)
class LoadSpec:
    rate: float = 0.0  # operations per second, all servers together
    ops: tuple[str, ...] = LOAD_OPS
    links: tuple[str, ...] = ()  # default: every link of the fleet
    features: tuple[str, ...] = ()
    timeout: float = 5.0
    sim_line: str = ""  # sim:// client options: "ber=1e-4&drop=0.01&dup=0.01&seed=1"


@dataclass(frozen=True)
class Scenario:
    site: str = "fleet"
    seed: int = 1
    trust: Path | None = None
    vendor_key: Path | None = None
    state_dir: Path | None = None
    broker: BrokerSpec = BrokerSpec()
    servers: tuple[ServerGroup, ...] = ()
    schedule: tuple[FaultSpec, ...] = ()
    random_faults: RandomFaults = RandomFaults()
    load: LoadSpec = LoadSpec()
    clients: ClientsSpec = field(default_factory=ClientsSpec)  # issue 15
    systems: tuple[SystemSpec, ...] = ()  # issue 14

    @property
    def total(self) -> int:
        return sum(g.count for g in self.servers) + sum(1 + s.children for s in self.systems)

    @property
    def links(self) -> tuple[str, ...]:
        return tuple(sorted({lk for g in self.servers for lk in g.links}
                            | {lk for s in self.systems for lk in s.links}))

    @property
    def needs_broker(self) -> bool:
        return "mqtt" in self.links


def _where(origin: str, path: str) -> str:
    return f"scenario {origin}: {path}" if origin else f"scenario: {path}"


class _Checker:
    def __init__(self, origin: str, base: Path) -> None:
        self.origin = origin
        self.base = base

    def fail(self, path: str, msg: str) -> UsageError:
        return UsageError(f"{_where(self.origin, path)}: {msg}")

    def keys(self, raw: Any, path: str, known: Any) -> Mapping[str, Any]:
        if not isinstance(raw, Mapping):
            raise self.fail(path, f"must be a table, not {type(raw).__name__}")
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise self.fail(path, f"unknown key {', '.join(unknown)} "
                                  f"(known: {', '.join(known)})")
        return raw

    def text(self, raw: Any, path: str) -> str:
        if not isinstance(raw, str) or not raw:
            raise self.fail(path, f"must be non-empty text, not {raw!r}")
        return raw

    def path(self, raw: Any, path: str) -> Path:
        p = Path(self.text(raw, path))
        return p if p.is_absolute() else self.base / p

    def integer(self, raw: Any, path: str, low: int = 0) -> int:
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < low:
            raise self.fail(path, f"must be a whole number of at least {low}, not {raw!r}")
        return raw

    def number(self, raw: Any, path: str) -> float:
        if not isinstance(raw, int | float) or isinstance(raw, bool) or raw < 0:
            raise self.fail(path, f"must be a number of at least 0, not {raw!r}")
        return float(raw)

    def flag(self, raw: Any, path: str) -> bool:
        if not isinstance(raw, bool):
            raise self.fail(path, f"must be true or false, not {raw!r}")
        return raw

    def names(self, raw: Any, path: str, known: Any, what: str) -> tuple[str, ...]:
        if not isinstance(raw, list) or not all(isinstance(x, str) for x in raw):
            raise self.fail(path, f"must be a list of {what}s, not {raw!r}")
        for x in raw:
            if x not in known:
                raise self.fail(path, f"unknown {what} {x!r} (known: {', '.join(known)})")
        return tuple(dict.fromkeys(raw))


def _sim_line(c: _Checker, raw: Any) -> str:
    """Check ``[load] sim_line`` now (an unknown option would fail only at the first call)."""
    if raw == "":
        return ""
    text = c.text(raw, "[load] sim_line")
    from hw.backends.sim import LineFaults
    from hw.link import parse_url

    try:
        url = parse_url(f"sim://x?{text}")
        url.check_options(LineFaults.names())
        LineFaults().with_options(url.options)
    except UsageError as exc:
        raise c.fail("[load] sim_line", str(exc)) from exc
    return text


def parse_scenario(raw: Mapping[str, Any], base: Path | None = None,
                   origin: str = "") -> Scenario:
    """Check a scenario mapping and build the :class:`Scenario`.

    Args:
        raw: the TOML document (or a dict with the same keys).
        base: the folder relative paths are relative to (the file's folder).
        origin: the file name, for error messages.

    Raises:
        UsageError: an unknown or wrongly typed key, an unknown model, link or fault
            kind, or a link the model does not have.
    """
    c = _Checker(origin, base or Path.cwd())
    top = c.keys(raw, "top level", TOP_KEYS)
    site = c.text(top.get("site", "fleet"), "site")
    if any(ch in site for ch in "/+#") or site.startswith("_"):
        raise c.fail("site", f"{site!r} must be one MQTT topic level (no / + #, no leading _)")
    seed = c.integer(top.get("seed", 1), "seed")
    trust = c.path(top["trust"], "trust") if "trust" in top else None
    vendor_key = c.path(top["vendor_key"], "vendor_key") if "vendor_key" in top else None
    state_dir = c.path(top["state_dir"], "state_dir") if "state_dir" in top else None

    b = c.keys(top.get("broker", {}), "[broker]", BROKER_KEYS)
    url = c.text(b["url"], "[broker] url") if "url" in b else None
    if url is not None and not url.startswith("mqtt://"):
        raise c.fail("[broker] url", f"{url!r} must be mqtt://HOST:PORT")
    start = b.get("start", url is None)
    if not isinstance(start, bool):
        raise c.fail("[broker] start", f"must be true or false, not {start!r}")
    if start and url is not None:
        raise c.fail("[broker]", "url (a running broker) and start = true (licsim's own) "
                                 "exclude each other: give one")
    bridge_to = c.text(b["bridge_to"], "[broker] bridge_to") if "bridge_to" in b else None
    if bridge_to is not None and not start:
        raise c.fail("[broker] bridge_to", "bridges licsim's own broker: not with url (bridge "
                                           "that broker in its own configuration)")
    if bridge_to is not None:
        from simulators.fleet.broker import bridge_config

        try:
            bridge_config(site, bridge_to)
        except UsageError as err:
            raise c.fail("[broker] bridge_to", str(err)) from None
    broker = BrokerSpec(url, start, bridge_to)

    groups: list[ServerGroup] = []
    raw_servers = top.get("servers", [])
    systems = _systems(c, top.get("systems", []))
    if not isinstance(raw_servers, list) or not (raw_servers or systems):
        raise c.fail("[[servers]]", "at least one [[servers]] table (model, count, links) "
                                    "is needed")
    for i, g in enumerate(raw_servers):
        where = f"[[servers]] #{i + 1}"
        g = c.keys(g, where, SERVER_KEYS)
        if "model" not in g:
            raise c.fail(where, f"model is missing (one of {', '.join(MODELS)})")
        model = c.text(g["model"], f"{where} model")
        if model not in MODELS:
            raise c.fail(f"{where} model", f"unknown model {model!r} "
                                           f"(known: {', '.join(MODELS)})")
        count = c.integer(g.get("count", 1), f"{where} count", 1)
        links = c.names(g.get("links", ["tcp"]), f"{where} links", LINKS, "link")
        if not links:
            raise c.fail(f"{where} links", "a server needs at least one link")
        spec = MODELS[model]
        for lk in links:
            if lk not in spec.links:
                raise c.fail(f"{where} links", f"a {model} has no {lk} link "
                                               f"({LINKS[lk]}); it has {', '.join(spec.links)}")
        lic_raw = c.keys(g.get("licenses", {}), f"{where} licenses", g.get("licenses", {}))
        licenses = {str(f): c.integer(n, f"{where} licenses.{f}", 1) for f, n in lic_raw.items()}
        name = c.text(g["name"], f"{where} name") if "name" in g else None
        groups.append(ServerGroup(model, count, links, licenses, name))
    sys_links = {lk for sy in systems for lk in sy.links}
    if "mqtt" in {lk for g in groups for lk in g.links} | sys_links and url is None \
            and not start:
        raise c.fail("[broker]", "servers with the mqtt link need [broker] url = "
                                 "\"mqtt://HOST:PORT\" or start = true")

    # broker-restart kills licsim's own mosquitto: without one it could never be injected
    own_broker = start and "mqtt" in {lk for g in groups for lk in g.links} | sys_links
    no_restart = ("broker-restart restarts licsim's own broker, and this fleet has none "
                  "([broker] start = true and servers on the mqtt link): leave it out")
    schedule: list[FaultSpec] = []
    rnd = RandomFaults()
    f = top.get("faults", [])
    if isinstance(f, Mapping):
        f = c.keys(f, "[faults]", RANDOM_KEYS)
        default = [k for k in FAULT_KINDS if (own_broker or k != "broker-restart")
                   and (systems or k not in SYSTEM_FAULTS)]
        kinds = c.names(f.get("kinds", default), "[faults] kinds", FAULT_KINDS, "fault kind")
        if "broker-restart" in kinds and not own_broker:
            raise c.fail("[faults] kinds", no_restart)
        rnd = RandomFaults(every=c.number(f.get("every", 0), "[faults] every"),
                           count=c.integer(f.get("count", 0), "[faults] count"),
                           kinds=kinds,
                           seed=c.integer(f["seed"], "[faults] seed") if "seed" in f else None,
                           optional=c.flag(f.get("optional", False), "[faults] optional"))
        f = f.get("schedule", [])
    if not isinstance(f, list):
        raise c.fail("faults", "must be [[faults]] tables or a [faults] table")
    for i, e in enumerate(f):
        where = f"[[faults]] #{i + 1}"
        e = c.keys(e, where, FAULT_KEYS)
        kind = c.text(e.get("kind"), f"{where} kind")
        if kind not in FAULT_KINDS:
            raise c.fail(f"{where} kind", f"unknown fault kind {kind!r} "
                                          f"(known: {', '.join(FAULT_KINDS)})")
        if kind == "broker-restart" and not own_broker:
            raise c.fail(f"{where} kind", no_restart)
        link = c.text(e["link"], f"{where} link") if "link" in e else None
        if link is not None and link not in LINKS:
            raise c.fail(f"{where} link", f"unknown link {link!r} (known: {', '.join(LINKS)})")
        secs = e.get("seconds")
        if secs is not None and (not isinstance(secs, int) or isinstance(secs, bool)
                                 or secs == 0):
            raise c.fail(f"{where} seconds", f"must be a non-zero whole number, not {secs!r}")
        step = c.integer(e["step"], f"{where} step", 1) if "step" in e else None
        schedule.append(FaultSpec(kind, c.number(e.get("at", 0), f"{where} at"),
                                  c.text(e["server"], f"{where} server") if "server" in e
                                  else None, link, secs, step,
                                  c.flag(e.get("optional", False), f"{where} optional")))

    ld = c.keys(top.get("load", {}), "[load]", LOAD_KEYS)
    all_links = sorted({lk for g in groups for lk in g.links} | sys_links)
    load = LoadSpec(
        rate=c.number(ld.get("rate", 0), "[load] rate"),
        ops=c.names(ld.get("ops", list(LOAD_OPS)), "[load] ops", LOAD_OPS, "operation"),
        links=c.names(ld.get("links", all_links), "[load] links", all_links, "fleet link"),
        features=tuple(c.text(x, "[load] features") for x in ld.get("features", [])),
        timeout=c.number(ld.get("timeout", 5.0), "[load] timeout") or 5.0,
        sim_line=_sim_line(c, ld.get("sim_line", "")),
    )
    cl = c.keys(top.get("clients", {}), "[clients]", CLIENT_KEYS)
    clients = ClientsSpec(count=c.integer(cl.get("count", 0), "[clients] count"),
                          feature=c.text(cl["feature"], "[clients] feature") if "feature" in cl
                          else "",
                          hold_seconds=c.number(cl.get("hold_seconds", 5.0),
                                                "[clients] hold_seconds"))
    if clients.count and not any(clients.feature in g.licenses for g in groups):
        raise c.fail("[clients] feature", f"{clients.feature or '(missing)'!s} is in no "
                                          "[[servers]] licenses table: no server serves its "
                                          "seats")
    return Scenario(site, seed, trust, vendor_key, state_dir, broker, tuple(groups),
                    tuple(schedule), rnd, load, clients, systems)


def _systems(c: _Checker, raw: Any) -> tuple[SystemSpec, ...]:
    """``[[systems]]`` (issue 14): each an Enterprise Server and its children."""
    if not isinstance(raw, list):
        raise c.fail("[[systems]]", "must be an array of tables")
    out: list[SystemSpec] = []
    for i, t in enumerate(raw):
        where = f"[[systems]] #{i + 1}"
        t = c.keys(t, where, SYSTEM_KEYS)
        name = c.text(t.get("name", f"system{i + 1}"), f"{where} name")
        children = c.integer(t.get("children", 1), f"{where} children", 1)
        child_model = c.text(t.get("child_model", "AS-P"), f"{where} child_model")
        if child_model not in MODELS:
            raise c.fail(f"{where} child_model", f"unknown model {child_model!r} "
                                                 f"(known: {', '.join(MODELS)})")
        links = c.names(t.get("links", ["tcp"]), f"{where} links", LINKS, "link")
        for model in ("Enterprise-Server", child_model):
            for lk in links:
                if lk not in MODELS[model].links:
                    raise c.fail(f"{where} links", f"a {model} has no {lk} link ({LINKS[lk]})")
        if not links:
            raise c.fail(f"{where} links", "a server needs at least one link")
        lic_raw = c.keys(t.get("licenses", {}), f"{where} licenses", t.get("licenses", {}))
        licenses = {str(f): c.integer(n, f"{where} licenses.{f}", 1) for f, n in lic_raw.items()}
        lease = c.integer(t.get("lease", 7 * 86400), f"{where} lease", 60)
        if any(s.name == name for s in out):
            raise c.fail(f"{where} name", f"two systems are named {name!r}")
        out.append(SystemSpec(name, children, child_model, links, licenses, lease))
    return tuple(out)


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario TOML file (relative paths are relative to its folder).

    Raises:
        UsageError: unreadable, not TOML, or any problem :func:`parse_scenario` names.
    """
    from apps.common import read_toml

    raw = read_toml(path, "scenario")
    return parse_scenario(raw, path.resolve().parent, str(path))

"""``licagent run``: serve one license store on every ``--listen`` URL at once until told to stop.

The daemon is a thin edge around :class:`agent.ops.AgentOps`: it starts one
:class:`hw.link.Listener` per URL, logs one line per operation to stderr,
tells systemd it is ready (``sd_notify READY=1``) and stops cleanly on
SIGTERM or SIGINT. Operations run one at a time behind a gate; stopping
closes the gate first, so an ``apply`` in progress completes and none starts
afterwards (store writes are atomic in any case).

Configuration comes from a TOML file (``--config``) with the keys of
:data:`CONFIG_KEYS`; command-line flags override it. Relative paths in the
file are relative to the file's folder.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

import hw
from agent.errors import EXIT_OK, LicensingError, UsageError
from agent.ops import AgentOps
from agent.record import record
from agent.rpc import FeatureCheck, TransportError
from agent.service import Agent
from apps.common import read_toml
from hw.link import Listener

__all__ = [
    "CONFIG_KEYS",
    "Daemon",
    "DaemonConfig",
    "load_config",
    "resolve_config",
    "sd_notify",
    "serve",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
#: key -> what it holds, for the TOML file and its error messages
CONFIG_KEYS: Mapping[str, str] = {
    "state": "the license store directory (text)",
    "listen": "the link URLs to serve (a list of text)",
    "facts": "a hardware facts JSON file, for simulated servers only (text)",
    "max_clients": "connections served at once per listener (a whole number)",
    "max_per_peer": "connections from one address at once per listener (a whole number)",
    "log_level": f"one of {', '.join(LOG_LEVELS)}",
    # issue 14: the system tree
    "parent": "the parent server's link URL, to inherit its licenses (text)",
    "renew_every": "seconds between renewals with the parent (a whole number)",
    "lease": "seconds a grant to a child server lasts (a whole number)",
}
#: issue 14: renewals with the parent, and the grants' lease, by default
RENEW_EVERY = 3600
LEASE = 7 * 86400
#: how long stopping waits for the operation in progress
STOP_TIMEOUT = 30.0
#: the C heap's free pages are handed back at most this often while operations come in,
#: and once the daemon is idle again (:meth:`Daemon.trim_if_due`): a ``malloc_trim`` walks
#: the whole heap, which costs a request answered from the kept store as much as its work
TRIM_INTERVAL = 1.0


@record(frozen=True)
class DaemonConfig:
    """What ``licagent run`` serves, after merging the config file and the flags."""

    state: Path
    listen: tuple[str, ...]
    facts: Path | None = None
    max_clients: int | None = None
    log_level: str = "info"
    max_per_peer: int | None = None
    parent: str | None = None  # issue 14
    renew_every: int = RENEW_EVERY
    lease: int = LEASE


def load_config(path: Path) -> dict[str, Any]:
    """Read and check a ``licagent.toml``; relative paths become relative to its folder.

    Raises:
        UsageError: unreadable, not TOML, an unknown key or a wrongly typed value.
    """
    raw = read_toml(path, "config file")
    unknown = sorted(set(raw) - set(CONFIG_KEYS))
    if unknown:
        raise UsageError(f"config file {path}: unknown key {', '.join(unknown)} "
                         f"(known: {', '.join(CONFIG_KEYS)})")

    def bad(key: str) -> UsageError:
        return UsageError(f"config file {path}: {key} must be {CONFIG_KEYS[key]}, "
                          f"not {raw[key]!r}")

    out: dict[str, Any] = {}
    for key in ("state", "facts", "parent"):
        if key in raw:
            if not isinstance(raw[key], str) or not raw[key]:
                raise bad(key)
            out[key] = raw[key] if key == "parent" else path.parent / raw[key]
    if "listen" in raw:
        urls = raw["listen"]
        if isinstance(urls, str):
            urls = [urls]
        if not isinstance(urls, list) or not all(isinstance(u, str) and u for u in urls):
            raise bad("listen")
        out["listen"] = list(urls)
    for key in ("max_clients", "max_per_peer", "renew_every", "lease"):
        if key in raw:
            n = raw[key]
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise bad(key)
            out[key] = n
    if "log_level" in raw:
        if not isinstance(raw["log_level"], str) or raw["log_level"].lower() not in LOG_LEVELS:
            raise bad("log_level")
        out["log_level"] = raw["log_level"].lower()
    return out


def resolve_config(config_file: Path | None = None, *, state: str | None = None,
                   listen: Sequence[str] | None = None, facts: str | None = None,
                   max_clients: int | None = None, log_level: str | None = None,
                   parent: str | None = None, renew_every: int | None = None,
                   lease: int | None = None) -> DaemonConfig:
    """The config file's settings with each given flag in place of the file's value.

    Raises:
        UsageError: no store or no listen URL from either source, or a bad value.
    """
    base = load_config(config_file) if config_file is not None else {}
    if state is not None:
        base["state"] = Path(state)
    if listen:
        base["listen"] = list(listen)
    if facts is not None:
        base["facts"] = Path(facts)
    if max_clients is not None:
        if max_clients < 1:
            raise UsageError(f"--max-clients {max_clients}: must be at least 1")
        base["max_clients"] = max_clients
    if log_level is not None:
        base["log_level"] = log_level
    if parent is not None:
        base["parent"] = parent
    for key, n in (("renew_every", renew_every), ("lease", lease)):
        if n is not None:
            if n < 1:
                raise UsageError(f"--{key.replace('_', '-')} {n}: must be at least 1")
            base[key] = n
    if "state" not in base:
        raise UsageError("no license store given: use --state DIR or state = \"DIR\" in --config")
    if not base.get("listen"):
        raise UsageError("nothing to listen on: use --listen URL (e.g. tcp://0.0.0.0:7700) "
                         "or listen = [...] in --config")
    return DaemonConfig(
        state=base["state"],
        listen=tuple(base["listen"]),
        facts=base.get("facts"),
        max_clients=base.get("max_clients"),
        log_level=base.get("log_level", "info"),
        max_per_peer=base.get("max_per_peer"),
        parent=base.get("parent"),
        renew_every=base.get("renew_every", RENEW_EVERY),
        lease=base.get("lease", LEASE),
    )


# ---------------------------------------------------------------- systemd


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. ``READY=1``) to systemd's ``$NOTIFY_SOCKET``, if there is one.

    A plain AF_UNIX datagram, as ``sd_notify(3)`` sends it; an address starting
    with ``@`` is in the abstract namespace.

    Returns:
        True if sent, False if the daemon does not run under a notify-aware manager.

    Raises:
        OSError: the socket is named but could not be reached.
    """
    env = os.environ if environ is None else environ
    addr = env.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        target = "\0" + addr[1:]
    elif addr.startswith("/"):
        target = addr
    else:
        raise OSError(f"NOTIFY_SOCKET={addr!r} is neither a path nor an abstract '@' name")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(target)
        s.sendall(message.encode("utf-8"))
    return True


# ---------------------------------------------------------------- serving


DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40
_LEVEL_NAMES = {DEBUG: "DEBUG", INFO: "INFO", WARNING: "WARNING", ERROR: "ERROR"}


class LogSink(Protocol):
    """What the daemon logs through (a :class:`OperationLog`, or any ``logging.Logger``)."""

    def log(self, level: int, msg: str, *args: object) -> None: ...
    def debug(self, msg: str, *args: object) -> None: ...
    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def exception(self, msg: str, *args: object) -> None: ...


class OperationLog:
    """One line per event, ``2027-01-15T08:00:00.123Z LEVEL message``, always UTC.

    A few lines instead of the logging package, which would cost the daemon about
    1 MB of resident memory on a controller for features it does not use.
    """

    def __init__(self, level: str = "info", stream: Any = None) -> None:
        self.level = {"debug": DEBUG, "info": INFO, "warning": WARNING,
                      "error": ERROR}[level.lower()]
        self.stream = stream or sys.stderr
        self.lock = threading.Lock()

    def log(self, level: int, msg: str, *args: object) -> None:
        if level < self.level:
            return
        t = time.time()
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
        line = f"{stamp} {_LEVEL_NAMES.get(level, level)} {msg % args if args else msg}\n"
        with self.lock:
            try:
                self.stream.write(line)
                self.stream.flush()
            except (OSError, ValueError):
                pass  # a closed stderr must not take the daemon down

    def debug(self, msg: str, *args: object) -> None:
        self.log(DEBUG, msg, *args)

    def info(self, msg: str, *args: object) -> None:
        self.log(INFO, msg, *args)

    def warning(self, msg: str, *args: object) -> None:
        self.log(WARNING, msg, *args)

    def exception(self, msg: str, *args: object) -> None:
        import traceback

        self.log(ERROR, msg + "\n" + traceback.format_exc().rstrip(), *args)


def make_logger(level: str, stream: Any = None) -> OperationLog:
    """The daemon's logger: one line per event on stderr (journald adds nothing else)."""
    return OperationLog(level, stream)


class _ListenerOps:
    """The handler one listener calls: the daemon's gated, logged operations under its name."""

    def __init__(self, daemon: Daemon, name: str, origin: str | None = None) -> None:
        self.daemon = daemon
        self.name = name  # the configured URL until the listener knows its real address
        self.origin = origin

    def __call__(self, op: str, args: Mapping[str, Any]) -> Any:
        return self.daemon.run_op(self.name, op, args, self.origin)

    def for_origin(self, origin: str) -> _ListenerOps:
        """The handler of one peer of this listener (:func:`agent.rpc.for_origin`)."""
        return _ListenerOps(self.daemon, self.name, origin)


class Daemon:
    """Every listener of one store, and the gate that serialises their operations.

    Args:
        agent: the store's operations.
        config: listen URLs and limits.
        log: where operation lines go.
        ctx: passed on to each backend's ``listen`` (e.g. ``fabric`` for loop://).
    """

    def __init__(self, agent: Agent, config: DaemonConfig, log: LogSink,
                 **ctx: Any) -> None:
        self.agent = agent
        self.config = config
        self.log = log
        self.ctx = ctx
        self.listeners: list[Listener] = []
        self._gate = threading.Lock()
        self._stopping = False
        #: when the heap was last trimmed, and whether an operation ran since
        self._trimmed_at = 0.0
        self._untrimmed = False
        self._detail = threading.local()
        self.ops = AgentOps(agent, log=self._note, relay=relay_to_child)

    @property
    def stopping(self) -> bool:
        """True once :meth:`stop` was called: no operation starts any more."""
        return self._stopping

    def _note(self, line: str) -> None:
        getattr(self._detail, "lines", []).append(line)

    def run_op(self, listener: str, op: str, args: Mapping[str, Any],
               origin: str | None = None) -> Any:
        """One operation through the gate, logged as one line naming ``listener``;
        ``origin`` names the peer that asked."""
        self._detail.lines = []
        with self._gate:
            if self._stopping:
                raise TransportError("the license agent is shutting down; "
                                     "try again once it is back")
            try:
                result = self.ops(op, args, origin)
            except LicensingError as err:
                self._log_op(listener, op, f"refused {err.reason} (exit {err.exit_code}): "
                                           f"{err}", INFO)
                raise
            except Exception as exc:
                self.log.exception("%s %s failed", listener, op)
                raise LicensingError(f"internal error in the license agent: {exc!r}; "
                                     f"see its log") from exc
            if op != "hello":
                self._untrimmed = True
                self.trim_if_due()
        detail = [d.removeprefix(op).strip() for d in self._detail.lines]
        if isinstance(result, FeatureCheck):
            detail.append(f"feature={result.feature} licensed={result.licensed}")
        outcome = " ".join(["ok", *[d for d in detail if d]])
        self._log_op(listener, op, outcome, DEBUG if op == "hello" else INFO)
        return result

    def trim_if_due(self) -> None:
        """Hand free heap pages back (:func:`release_free_memory`) if an operation ran since
        the last time and that was at least :data:`TRIM_INTERVAL` ago; the serve loop calls
        it when idle, so a burst of operations is trimmed after it too."""
        now = time.monotonic()
        if self._untrimmed and now - self._trimmed_at >= TRIM_INTERVAL:
            self._untrimmed = False
            self._trimmed_at = now
            release_free_memory()

    def trim_when_idle(self) -> None:
        """:meth:`trim_if_due` unless an operation is running (it trims after itself)."""
        if self._gate.acquire(blocking=False):
            try:
                self.trim_if_due()
            finally:
                self._gate.release()

    def _log_op(self, listener: str, op: str, outcome: str, level: int) -> None:
        self.log.log(level, "%s %s %s", listener, op, outcome)

    def start(self) -> list[str]:
        """Create and start every listener; returns their resolved addresses.

        Raises:
            LicensingError: a bad URL or option, or an address that cannot be served;
                listeners already started are stopped again.
        """
        handlers: list[_ListenerOps] = []
        listeners: list[Listener] = []
        extra: dict[str, Any] = dict(self.ctx)
        if self.config.max_clients is not None:
            extra["max_clients"] = self.config.max_clients
        if self.config.max_per_peer is not None:
            extra["max_per_peer"] = self.config.max_per_peer
        for url in self.config.listen:
            handlers.append(_ListenerOps(self, url))
            listeners.append(hw.listen(url, handlers[-1],
                                       log=lambda line: self.log.info("%s", line), **extra))
        try:
            for lst, handler in zip(listeners, handlers, strict=True):
                lst.start()
                self.listeners.append(lst)
                handler.name = lst.address or handler.name
        except BaseException:
            self.stop()
            raise
        return [lst.address for lst in self.listeners]

    def stop(self) -> None:
        """Let the operation in progress finish, refuse new ones, and stop every listener."""
        self._stopping = True  # an operation waiting at the gate from now on is refused
        got = self._gate.acquire(timeout=STOP_TIMEOUT)  # the one in progress finishes
        if got:
            self._gate.release()
        else:
            self.log.warning("an operation is still running after %g s; stopping anyway",
                             STOP_TIMEOUT)
        for lst in reversed(self.listeners):
            try:
                lst.stop()
            except Exception:
                self.log.exception("stopping %s failed", lst.address)
        self.listeners.clear()


_trim: Any = None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``); best effort.

    Starting up (imports, reading the store) and every operation leave freed
    blocks in the middle of the C heap that glibc keeps resident; on a
    controller that is most of the daemon's growth over a bare interpreter
    (measured: 0.8 MB of 24.5 MB after start-up, net of loading ctypes).
    Returns False where there is no glibc (musl gives memory back by itself).
    """
    global _trim
    if _trim is None:
        _trim = False
        try:
            if os.confstr("CS_GNU_LIBC_VERSION"):
                import ctypes  # loaded once, only on glibc

                _trim = ctypes.CDLL(None).malloc_trim
        except (ValueError, OSError, AttributeError, ImportError):
            _trim = False
    if _trim is False:
        return False
    _trim(0)
    return True


def relay_to_child(url: str, op: str, args: Mapping[str, Any]) -> Any:
    """Issue 14 item 5: one operation on a child's link (the URL it reported); the
    child's answer, or its refusal, goes back unchanged."""
    with hw.connect(url, timeout=RELAY_TIMEOUT) as client:
        return client.call(op, args)


#: seconds a relayed operation may take on the child's link
RELAY_TIMEOUT = 10.0


def serve(agent: Agent, config: DaemonConfig, stop: threading.Event | None = None,
          out: Any = None) -> int:
    """Run the daemon in this (main) thread until SIGTERM, SIGINT or ``stop`` is set.

    Prints ``listening URL`` on stdout for each listener once all are ready.

    Returns:
        0 after a clean stop.

    Raises:
        LicensingError: the store cannot be opened or an address cannot be served.
    """
    log = make_logger(config.log_level)
    stop = stop or threading.Event()
    out = out or sys.stdout
    st = agent.status()  # fail now, with the store's own message, rather than on first use
    log.info("license store %s: device %s (%s), sequence %d, %d license(s)", config.state,
             st["device_id"], st["model"], st["sequence"], len(st["licenses"]))

    received: list[str] = []

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        received.append(signal.Signals(signum).name)  # logged by the main loop, not here
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)

    daemon = Daemon(agent, config, log)
    addresses = daemon.start()
    relation = None
    if config.parent is not None:  # issue 14: keep the relation to the parent live
        from apps.licagent.relation import ParentRelation

        # the first listener's address (an MQTT one names the device) is where the
        # parent's tree reaches this server
        relation = ParentRelation(agent, config.parent, addresses[0] if addresses else None,
                                  config.renew_every, daemon.ops.lock, log)
        relation.start()
    try:
        for a in addresses:
            log.info("listening %s", a)
            print(f"listening {a}", file=out, flush=True)
        try:
            sd_notify(f"READY=1\nSTATUS=serving on {', '.join(addresses)}")
        except OSError as exc:
            log.warning("could not notify systemd (NOTIFY_SOCKET): %s", exc)
        release_free_memory()
        while not stop.wait(TRIM_INTERVAL):
            daemon.trim_when_idle()
        log.info("%s, stopping", f"{received[0]} received" if received else "asked to stop")
    finally:
        try:
            sd_notify("STOPPING=1")
        except OSError:
            pass
        if relation is not None:
            relation.stop()
        daemon.stop()
    log.info("stopped")
    return EXIT_OK

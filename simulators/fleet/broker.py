"""A mosquitto broker on a free loopback port, which licsim (and the tests) start and can restart.

:class:`MosquittoBroker` writes a configuration file (``listener PORT 127.0.0.1``,
anonymous, persistence off, unless given another), runs ``mosquitto -c`` as a
child process that dies with its parent, waits until it accepts connections,
and can kill it (every connection drops, nothing retained survives) and start
it again on the same port. Nothing ever listens on another address.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from agent.errors import LicensingError, UsageError

__all__ = ["MosquittoBroker", "bridge_config", "free_port", "mosquitto_path", "plain_config"]

#: an upper bound for the broker to start or stop
WAIT = 20.0


def mosquitto_path() -> str:
    """The mosquitto binary.

    Raises:
        UsageError: it is not installed (``make broker`` installs it on Debian).
    """
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None)
    if path is None:
        raise UsageError("mosquitto is not installed: run `make broker` (apt-get install -y "
                         "mosquitto), or give [broker] url = \"mqtt://HOST:PORT\"")
    return path


def _die_with_parent() -> None:
    """In the child: SIGTERM when licsim dies, so no broker outlives a killed run."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def plain_config(port: int, max_connections: int = -1) -> str:
    """Anonymous MQTT on 127.0.0.1:``port``, no persistence, warnings and errors logged."""
    return "\n".join([
        "per_listener_settings false",
        "persistence false",
        f"user {getpass.getuser()}",
        f"listener {port} 127.0.0.1",
        f"max_connections {max_connections}",
        "allow_anonymous true",
        "max_queued_messages 0",
        "set_tcp_nodelay true",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "",
    ])


def bridge_config(site: str, to: str) -> str:
    """The bridge section that carries ``lic/SITE/#`` both ways to the broker at ``to``.

    The directives are those of ``contrib/mosquitto/bridge.conf`` (MQTT 5, QoS 1, a new
    session at each connection, reconnect at once then back off to 10 s; the remote client
    ID ``bridge-SITE``). ``to``: ``mqtt://HOST:PORT``, or ``mqtts://HOST:PORT?ca=FILE&cert=
    FILE&key=FILE`` for TLS with the bridge's own certificate (CN ``bridge-SITE``).

    Raises:
        UsageError: another scheme, no port, or TLS files missing or unreadable.
    """
    parts = urlsplit(to)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or parts.path not in ("", "/"):
        raise UsageError(f"[broker] bridge_to {to!r}: expected mqtt://HOST:PORT or "
                         "mqtts://HOST:PORT?ca=FILE&cert=FILE&key=FILE (no site: the bridge "
                         "carries this scenario's site)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        raise UsageError(f"[broker] bridge_to {to!r}: give the port")
    opts = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    lines = [f"connection hq-{site}", f"address {host}:{port}",
             "bridge_protocol_version mqttv50", f"topic lic/{site}/# both 1",
             f"remote_clientid bridge-{site}", "cleansession true", "restart_timeout 1 10",
             "keepalive_interval 30", "notifications false"]
    if parts.scheme == "mqtts":
        unknown = set(opts) - {"ca", "cert", "key"}
        if unknown or set(opts) != {"ca", "cert", "key"}:
            raise UsageError(f"[broker] bridge_to {to!r}: mqtts:// takes ca=, cert= and key= "
                             "(headquarters' CA, this bridge's certificate and key), nothing "
                             "else")
        for k in ("ca", "cert", "key"):
            if not os.access(opts[k], os.R_OK):
                raise UsageError(f"[broker] bridge_to: {k}={opts[k]} cannot be read")
        lines += [f"bridge_cafile {os.path.abspath(opts['ca'])}",
                  f"bridge_certfile {os.path.abspath(opts['cert'])}",
                  f"bridge_keyfile {os.path.abspath(opts['key'])}",
                  "bridge_tls_version tlsv1.2", "bridge_insecure false"]
    elif opts:
        raise UsageError(f"[broker] bridge_to {to!r}: mqtt:// takes no options")
    return "\n".join(lines) + "\n"


class MosquittoBroker:
    """One mosquitto process in ``directory``: :func:`plain_config` on a free port by default."""

    def __init__(self, directory: Path, max_connections: int = -1, *, config: str | None = None,
                 port: int | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.port = port or free_port()
        self.conf = directory / "mosquitto.conf"
        self.log = directory / "mosquitto.log"
        self.conf.write_text(config if config is not None
                             else plain_config(self.port, max_connections))
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Start mosquitto and wait until it accepts connections.

        Raises:
            LicensingError: it exited or did not listen within :data:`WAIT` seconds.
        """
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)], stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise LicensingError(f"mosquitto exited with {self.proc.returncode}: "
                                     f"{self.log.read_text(errors='replace')[-1000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise LicensingError(f"mosquitto did not listen on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, every connection drops, nothing retained survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=WAIT)

    def restart(self) -> None:
        """:meth:`kill`, then start again on the same port."""
        self.kill()
        self.start()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

"""A real mosquitto broker on a free loopback port, for the MQTT tests and benchmarks.

:class:`Broker` writes a configuration file (``listener PORT 127.0.0.1``,
persistence off), runs ``mosquitto -c`` as a child process and can kill and
restart it on the same port. :meth:`Broker.secure` uses the repository's example
configuration, ``contrib/mosquitto/mosquitto.conf`` and its ``acl`` file, with
the listener moved to 127.0.0.1 and the certificate paths pointed at a PKI made
by :func:`hw.pki.make_pki`. Nothing ever listens on another address.
"""

from __future__ import annotations

import ctypes
import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from hw.pki import Pki, make_pki

__all__ = ["Broker", "free_port", "mosquitto_path"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "contrib" / "mosquitto"
#: an upper bound for the broker to start or stop; never asserted as a time
WAIT = 20.0


def mosquitto_path() -> str:
    """The mosquitto binary (``make broker`` installs it on Debian)."""
    path = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)),
        None)
    if path is None:
        raise RuntimeError("mosquitto is not installed: run `make broker` "
                           "(apt-get install -y mosquitto)")
    return path


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies, so no broker outlives a killed run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    """One mosquitto process; :meth:`kill` and :meth:`start` again keep the port."""

    def __init__(self, directory: Path, config: str, port: int, pki: Pki | None = None) -> None:
        self.directory = directory
        self.port = port
        self.pki = pki
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text(config)
        self.log = directory / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def plain(cls, directory: Path) -> Broker:
        """Anonymous MQTT on 127.0.0.1, no persistence."""
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = "\n".join([
            "per_listener_settings false",
            "persistence false",
            f"user {getpass.getuser()}",
            f"listener {port} 127.0.0.1",
            "allow_anonymous true",
            "max_queued_messages 0",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "",
        ])
        return cls(directory, config, port)

    @classmethod
    def secure(cls, directory: Path) -> Broker:
        """The repository's example configuration (TLS, certificates, ACL) on 127.0.0.1."""
        directory.mkdir(parents=True, exist_ok=True)
        pki = make_pki(directory / "pki")
        port = free_port()
        text = (EXAMPLE / "mosquitto.conf").read_text()
        text, n = re.subn(r"(?m)^listener \d+ \S+$", f"listener {port} 127.0.0.1", text)
        assert n == 1, "contrib/mosquitto/mosquitto.conf must have one `listener PORT ADDRESS`"
        paths = {"ca.pem": pki.ca_cert, "server.pem": pki.server_cert,
                 "server.key": pki.server_key, "acl": directory / "acl"}
        for name, path in paths.items():
            text, n = re.subn(rf"/etc/mosquitto/lic/{re.escape(name)}\b", str(path), text)
            assert n == 1, f"contrib/mosquitto/mosquitto.conf must name /etc/mosquitto/lic/{name}"
        assert "0.0.0.0" not in text and "::" not in text
        shutil.copyfile(EXAMPLE / "acl", directory / "acl")
        # run as the current user, which can read the key files (mosquitto would
        # otherwise drop to the `mosquitto` user when started as root)
        text += f"\nuser {getpass.getuser()}\n"
        return cls(directory, text, port, pki)

    @property
    def url(self) -> str:
        return f"mqtt{'s' if self.pki else ''}://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([mosquitto_path(), "-c", str(self.conf)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + WAIT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"mosquitto did not listen on port {self.port}") from None
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, every connection drops, nothing retained survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=WAIT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=WAIT)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

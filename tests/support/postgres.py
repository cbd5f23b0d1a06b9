"""A real PostgreSQL server for the tests: ``initdb`` into a temporary folder, a free loopback
port, stopped (and its folder removed) at the end.

Debian's ``postgresql`` package provides the programs (``make postgres`` installs it). The
server refuses to run as root, so when the tests run as root it runs as the ``postgres``
user (``runuser``), in a folder that user owns. It listens on 127.0.0.1 only, with
``trust`` authentication for that address, and without ``fsync``: the tests kill
``licserver`` processes, never PostgreSQL itself, so its own durability is not what they test.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

__all__ = ["PostgresServer", "find_bin"]

WAIT = 60.0  # an upper bound for start-up and shutdown; never asserted as a time


def find_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(d, name), os.X_OK):
            return os.path.join(d, name)
    raise RuntimeError(f"PostgreSQL's {name} is not installed (make postgres installs "
                       "Debian's postgresql package)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One running server; :meth:`database` makes an empty database and returns its URL."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="licserver-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = pwd.getpwnam("postgres")
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]
        self._count = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "postgres.log"

    def start(self) -> PostgresServer:
        subprocess.run([*self._as, find_bin("initdb"), "-D", str(self.data), "-U", "postgres",
                        "--auth=trust", "--no-locale", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, timeout=WAIT)
        self._run()
        return self

    def _run(self) -> None:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self._as, find_bin("postgres"), "-D", str(self.data), "-p", str(self.port),
                 "-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + WAIT
        while True:
            try:
                psycopg.connect(self.url("postgres"), connect_timeout=5).close()
                return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    text = self.log.read_text()
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start: {text}") from None
                time.sleep(0.1)

    def restart(self) -> None:
        """Stop the server (fast shutdown: clients are disconnected) and start it again on
        the same folder and port."""
        self._shutdown()
        self._run()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def database(self) -> str:
        """A new empty database's URL."""
        self._count += 1
        name = f"ledger{self._count}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")  # a name made here, not a caller's text
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), then the folder goes."""
        self._shutdown()
        shutil.rmtree(self.root, ignore_errors=True)

    def _shutdown(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            pid_file = self.data / "postmaster.pid"
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGINT)
            except (OSError, ValueError, IndexError):
                self.proc.terminate()
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)

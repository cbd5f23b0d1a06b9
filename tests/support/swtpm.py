"""A real software TPM 2.0 for the tests: ``swtpm socket`` on free loopback ports, its
state in a temporary folder, stopped (SIGTERM, then SIGKILL) and removed at the end.

Debian's ``swtpm`` and ``tpm2-tools`` packages provide the programs (``make swtpm``
installs them). The state folder can be copied while the TPM is stopped and put back,
which is how the tests stage "the whole machine restored from an image".
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["SoftTpm"]

WAIT = 30.0  # an upper bound for start-up and shutdown; never asserted as a time


def _free_port_pair() -> int:
    """A port P with P and P + 1 free on 127.0.0.1 (swtpm's server and control ports)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
        return port
    raise RuntimeError("no pair of free loopback ports for swtpm")


class SoftTpm:
    """One swtpm process; ``url`` is its ``tpm+swtpm://`` key-store URL."""

    def __init__(self, state: Path | None = None) -> None:
        if shutil.which("swtpm") is None or shutil.which("tpm2_sign") is None:
            raise RuntimeError("swtpm and tpm2-tools are not installed (make swtpm installs "
                               "Debian's swtpm, swtpm-tools and tpm2-tools packages)")
        self.root = Path(tempfile.mkdtemp(prefix="licagent-swtpm-"))
        self.state = state or self.root / "state"
        self.state.mkdir(exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"tpm+swtpm://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start swtpm; a restart keeps its port (as a TPM device keeps its path)."""
        self.port = self.port or _free_port_pair()
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
             "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
             "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
             "--flags", "not-need-init,startup-clear"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"swtpm exited with {self.proc.returncode}: {err}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("swtpm did not start listening")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT)
        if self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

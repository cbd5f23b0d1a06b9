"""``qemu://arm64``: the agent on an emulated ARM automation server (QEMU, software emulation).

The guest is the arm64 Debian bookworm image ``make qemu-image`` builds
(simulators/qemu/build_image.py): Debian's cloud-arm64 kernel, a busybox
initramfs, a read-only root disk with python3 and ``/opt/licagent``, and a
per-server **state disk** (ext4, label ``licstate``) holding the license store.
:class:`QemuGuest` boots it under ``qemu-system-aarch64 -M virt -cpu cortex-a57``
(TCG, no KVM) with

* the PL011 serial console on qemu's stdin/stdout: boot messages, the agent's
  log, and the guest init's control word ``poweroff`` (a clean shutdown);
* a virtio console (``/dev/hvc0`` in the guest, where ``licagent run`` listens
  with ``serial:///dev/hvc0``) exposed on the host as a pseudo-terminal, which the
  host opens through the ordinary serial backend (``serial:///dev/pts/N``);
* the LAN port (virtio-net, user-mode networking) with the guest's port 7700
  forwarded to ``tcp://127.0.0.1:PORT``.

``connect("qemu://arm64?...")`` boots a guest, waits until its agent listens,
and returns a client over ``link=serial`` (default) or ``link=tcp``; closing the
client shuts the guest down cleanly. Options:

``image=DIR`` (the image cache, default ``$LICQEMU_CACHE`` or
``~/.cache/bms-licensing/qemu``), ``state=FILE`` (the state disk; created on first
use, then kept: a temporary one is removed at close when not given),
``trust=PEM`` (the vendor key a new state disk is provisioned with), ``model=``,
``serial=`` (of a new store), ``mac=`` (of the LAN port; default derived from the
state disk's path, so the hardware binding holds across boots), ``time=`` (the
guest agent's clock, LICAGENT_TIME), ``memory=`` (MiB, 512), ``boot_timeout=``
(seconds, 300), ``console=FILE`` (a copy of the serial console), ``timeout=`` and
``tries=`` (per RPC try, as on the other links).

``tpm=1`` gives the guest a TPM 2.0: a software TPM (``swtpm socket``, Debian package
``swtpm``) started with the guest and reached by qemu's ``-tpmdev emulator`` on the arm64
virt machine's MMIO TPM (``-device tpm-tis-device``: a device-tree node
``tcg,tpm-tis-mmio``, driven by the guest kernel's ``tpm_tis`` module, seen as
``/dev/tpmrm0``). Its state is a folder next to the state disk (``STATE.tpm``): the TPM
is part of the server, so it is kept with its disk; a state disk copied elsewhere meets
another TPM. A new state disk of a TPM guest is provisioned with
``licagent init --key-store tpm:///dev/tpmrm0``.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from agent.errors import UsageError
from agent.rpc import TransportError
from hw.link import LinkURL, ServerClient

__all__ = ["QemuClient", "QemuGuest", "connect", "default_image_dir", "listen"]

QEMU = "qemu-system-aarch64"
GUEST_PORT = 7700
MODELS = ("AS-P", "AS-B", "Edge-Server")
_OPTIONS = ("image", "state", "trust", "model", "serial", "mac", "time", "memory",
            "boot_timeout", "console", "link", "timeout", "tries", "tpm")
_SAFE = re.compile(r"[A-Za-z0-9._:+-]{1,64}")
_MAC = re.compile(r"([0-9a-f]{2}:){5}[0-9a-f]{2}")
_PTY = re.compile(r"char device redirected to (\S+) \(label lic\)")
#: console lines that are not a command's output: the agent daemon's log, kernel messages
_NOISE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z [A-Z]+ |\[\s*\d+\.\d+\] ")


def default_image_dir() -> Path:
    env = os.environ.get("LICQEMU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bms-licensing" / "qemu"


def load_manifest(image: Path) -> dict[str, Any]:
    """The ``image.json`` written by ``make qemu-image``; a UsageError if there is none."""
    path = image / "image.json"
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no guest image in {image} (no image.json): run `make qemu-image`, "
                         "or give ?image=DIR of a built one") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"unreadable guest image manifest {path}: {exc}") from exc
    for k in ("kernel", "initrd", "root"):
        if not Path(str(manifest.get(k, ""))).is_file():
            raise UsageError(f"guest image {image} is incomplete ({k} is missing): "
                             "run `make qemu-image` again")
    return manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class QemuGuest:
    """One emulated automation server: boot, wait for its agent, stop or pull the plug.

    Args:
        state: the state disk image (ext4). Created when missing, which needs ``trust``.
        image: the image cache folder holding ``image.json``.
        trust: PEM vendor public key a new store trusts.
        model, serial: of a new store (the guest provisions it at its first boot).
        mac: the LAN port's MAC address; default derived from ``state``'s path.
        time: LICAGENT_TIME for the guest agent (POSIX seconds or ISO 8601).
        memory: guest RAM in MiB.
        console: a file receiving a copy of the serial console.
        tpm: give the guest a TPM (swtpm; its state in ``STATE.tpm``); a new state disk
            keeps its device key there.
    """

    def __init__(self, state: Path, image: Path | None = None, *, trust: Path | None = None,
                 model: str = "AS-P", serial: str | None = None, mac: str | None = None,
                 time: str | None = None, memory: int = 512,
                 console: Path | None = None, tpm: bool = False) -> None:
        self.image = (image or default_image_dir()).expanduser()
        self.manifest = load_manifest(self.image)
        self.state = Path(state).resolve()
        if model not in MODELS:
            raise UsageError(f"qemu://: model {model!r} is not one of {', '.join(MODELS)}")
        for name, value in (("serial", serial), ("time", time)):
            if value is not None and not _SAFE.fullmatch(value):
                raise UsageError(f"qemu://: bad {name} {value!r} (letters, digits, . _ : + -)")
        self.trust, self.model, self.serial, self.time = trust, model, serial, time
        if mac is None:
            h = hashlib.sha256(str(self.state).encode()).digest()
            mac = "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])
        if not _MAC.fullmatch(mac.lower()):
            raise UsageError(f"qemu://: bad mac {mac!r} (six hex pairs with colons)")
        self.mac = mac.lower()
        self.memory = memory
        self.console_path = console
        self.tpm = tpm
        self._swtpm: subprocess.Popen[bytes] | None = None
        self._swtpm_dir: str | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.pty = ""
        #: seconds from starting qemu to the agent listening on both ports
        self.ready_seconds = 0.0
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        #: every console line since the last start (for run(): commands' output)
        self.lines_seen: list[str] = []
        self._token = 0
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None
        self._console_file: IO[str] | None = None

    # ------------------------------------------------------------ addresses

    @property
    def serial_url(self) -> str:
        """The guest's virtio console as the host sees it (a pty through pyserial)."""
        return f"serial://{self.pty}"

    @property
    def tcp_url(self) -> str:
        """The guest's LAN port 7700, forwarded to loopback."""
        return f"tcp://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ state disk

    def ensure_state(self) -> None:
        """Create the state disk (ext4 ``licstate`` seeded with the trust key) if missing."""
        if self.state.exists():
            return
        if self.trust is None:
            raise UsageError(f"qemu://: state disk {self.state} does not exist; give "
                             "?trust=VENDOR_PUBKEY_FILE to provision a new one")
        mkfs = shutil.which("mkfs.ext4") or "/usr/sbin/mkfs.ext4"
        with tempfile.TemporaryDirectory(prefix="licqemu-seed-") as seed:
            try:
                shutil.copyfile(self.trust, Path(seed) / "vendor.pub")
            except OSError as exc:
                raise UsageError(f"qemu://: cannot read trust file {self.trust}: {exc}") from exc
            env = [f"MODEL={self.model}", f"PORT={GUEST_PORT}"]
            if self.serial:
                env.append(f"SERIAL={self.serial}")
            if self.time:
                env.append(f"export LICAGENT_TIME={self.time}")
            if self.tpm:
                env.append("KEY_STORE=tpm:///dev/tpmrm0")
            (Path(seed) / "guest.env").write_text("\n".join(env) + "\n")
            self.state.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state.with_name(self.state.name + ".tmp")
            p = subprocess.run([mkfs, "-q", "-F", "-L", "licstate", "-E", "root_owner=0:0",
                                "-d", seed, str(tmp), "64M"], capture_output=True, text=True,
                               check=False)
            if p.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise TransportError(f"cannot create state disk {self.state}: "
                                     f"{p.stderr.strip() or p.stdout.strip()}")
            tmp.rename(self.state)

    # ------------------------------------------------------------ TPM

    @property
    def tpm_state(self) -> Path:
        """The guest's TPM (swtpm's state folder), kept next to its state disk."""
        return self.state.with_name(self.state.name + ".tpm")

    def _start_swtpm(self) -> str:
        """Start the guest's software TPM; the path of its control socket for qemu."""
        if shutil.which("swtpm") is None:
            raise UsageError("qemu://arm64?tpm=1 needs swtpm (apt-get install swtpm; "
                             "`make swtpm` installs it)")
        self.tpm_state.mkdir(mode=0o700, exist_ok=True)
        # a short folder: a unix socket path is limited to about 100 bytes
        self._swtpm_dir = tempfile.mkdtemp(prefix="licswtpm-")
        sock = os.path.join(self._swtpm_dir, "ctrl")
        # --terminate: swtpm ends when qemu closes the control channel (or dies)
        self._swtpm = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.tpm_state}",
             "--ctrl", f"type=unixio,path={sock}", "--terminate"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self._swtpm.poll() is not None or time.monotonic() > deadline:
                err = self._swtpm.stderr.read().decode() if self._swtpm.stderr else ""
                self._stop_swtpm()
                raise TransportError(f"swtpm for {self.state.name} did not start: {err.strip()}")
            time.sleep(0.02)
        return sock

    def _stop_swtpm(self) -> None:
        p = self._swtpm
        if p is not None:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            if p.stderr is not None:
                p.stderr.close()
            self._swtpm = None
        if self._swtpm_dir is not None:
            shutil.rmtree(self._swtpm_dir, ignore_errors=True)
            self._swtpm_dir = None

    # ------------------------------------------------------------ boot

    def command(self, tpm_socket: str | None = None) -> list[str]:
        m = self.manifest
        tpm = [] if tpm_socket is None else [
            "-chardev", f"socket,id=chrtpm,path={tpm_socket}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis-device,tpmdev=tpm0",
        ]
        return [
            QEMU, "-M", "virt", "-cpu", "cortex-a57", "-smp", "1", "-m", str(self.memory),
            "-display", "none", "-monitor", "none", "-no-reboot", "-nodefaults",
            "-kernel", m["kernel"], "-initrd", m["initrd"],
            "-append", "console=ttyAMA0 quiet panic=-1",
            "-chardev", "stdio,id=con,signal=off", "-serial", "chardev:con",
            "-drive", f"file={m['root']},if=none,id=root,format=raw,readonly=on",
            "-device", "virtio-blk-device,drive=root",
            "-drive", f"file={self.state},if=none,id=state,format=raw,cache=writeback",
            "-device", "virtio-blk-device,drive=state",
            "-netdev", f"user,id=lan,hostfwd=tcp:127.0.0.1:{self.port}-:{GUEST_PORT}",
            "-device", f"virtio-net-device,netdev=lan,mac={self.mac}",
            "-device", "virtio-serial-device",
            "-chardev", "pty,id=lic", "-device", "virtconsole,chardev=lic",
            *tpm,
        ]

    def start(self, timeout: float = 300.0) -> None:
        """Boot the guest and return once its agent listens on the console and the LAN port.

        Raises:
            UsageError: qemu or the image is missing, or the state disk cannot be provisioned.
            TransportError: the guest did not get its agent ready within ``timeout``.
        """
        if self.proc is not None:
            raise RuntimeError("guest already started")
        self.ensure_state()
        if shutil.which(QEMU) is None:
            raise UsageError(f"qemu:// needs {QEMU} (apt-get install qemu-system-arm; "
                             "`make qemu-image` installs it)")
        self.port = _free_port()
        self.pty = ""
        self.lines.clear()
        self.lines_seen = []
        if self.console_path is not None:
            self._console_file = open(self.console_path, "a", encoding="utf-8",
                                      errors="replace")
        t0 = time.monotonic()
        sock = self._start_swtpm() if self.tpm else None
        try:
            self.proc = subprocess.Popen(self.command(sock), stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except BaseException:
            self._stop_swtpm()
            raise
        self._reader = threading.Thread(target=self._read_console, name="qemu-console",
                                        daemon=True)
        self._reader.start()
        ok = self.wait_for(lambda: self._listening() or self._agent_ended(), timeout)
        if not ok or self._agent_ended():
            why = ("qemu exited" if self.proc.poll() is not None
                   else "its agent ended (see the console)" if self._agent_ended()
                   else f"no agent ready within {timeout:.0f} s")
            self.kill()
            tail = "\n".join(list(self.lines)[-15:])
            raise TransportError(f"qemu guest ({self.state.name}): {why}; console:\n{tail}")
        self.ready_seconds = time.monotonic() - t0

    def _listening(self) -> bool:
        return bool(self.pty) and any(x.startswith("listening tcp://") for x in self.lines) and \
            any(x.startswith("listening serial://") for x in self.lines)

    def _agent_ended(self) -> bool:
        return any(x.startswith("licguest: licagent run ended") for x in self.lines)

    def _read_console(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        for raw in iter(out.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if self._console_file is not None:
                self._console_file.write(line + "\n")
                self._console_file.flush()
            with self._cond:
                m = _PTY.search(line)
                if m:
                    self.pty = m.group(1)
                self.lines.append(line)
                self.lines_seen.append(line)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_for(self, predicate: Any, timeout: float) -> bool:
        """Wait until ``predicate()`` holds (re-checked on each console line) or qemu exits."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                if self.proc is None or (self.proc.poll() is not None and not (
                        self._reader and self._reader.is_alive())):
                    return bool(predicate())
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    # ------------------------------------------------------------ console

    def send_console(self, line: str) -> None:
        """Type one line on the serial console (the guest init reads ``poweroff``)."""
        if self.proc is None or self.proc.stdin is None or self.proc.poll() is not None:
            raise TransportError("the guest is not running")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise TransportError(f"cannot write to the guest console: {exc}") from exc

    def run(self, *argv: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run a command in the guest from its service console; its exit code and output.

        Arguments are split on blanks by the guest's shell, so they must not contain any.
        Lines of the agent daemon's log and kernel messages, which share the console, are
        left out of the output.
        """
        if any(not a or any(c.isspace() for c in a) for a in argv):
            raise UsageError(f"guest command arguments must be non-empty words: {argv!r}")
        with self._cond:
            self._token += 1
            token = f"t{self._token}"
            start = len(self.lines_seen)
        self.send_console(" ".join(("exec", token, *argv)))
        end = re.compile(rf"licguest: end {token} (\d+)$")
        if not self.wait_for(lambda: any(end.search(x) for x in self.lines_seen[start:]),
                             timeout):
            raise TransportError(f"guest command {' '.join(argv)} did not finish in "
                                 f"{timeout:.0f} s")
        with self._cond:
            seen = self.lines_seen[start:]
        out: list[str] = []
        inside = False
        rc = 1
        for x in seen:
            if x.endswith(f"licguest: begin {token}"):
                inside = True
            elif (m := end.search(x)) is not None:
                rc = int(m.group(1))
                break
            elif inside and not _NOISE.match(x):
                out.append(x)
        return rc, "\n".join(out) + ("\n" if out else "")

    # ------------------------------------------------------------ stop

    def stop(self, timeout: float = 120.0) -> bool:
        """Shut the guest down cleanly (agent stopped, disk synced and unmounted).

        Returns True when it powered itself off, False when it had to be killed.
        """
        if self.proc is None:
            return True
        clean = False
        if self.proc.poll() is None:
            try:
                self.send_console("poweroff")
                self.proc.wait(timeout)
                clean = any("licguest: power off" in x for x in self.lines)
            except (TransportError, subprocess.TimeoutExpired):
                clean = False
        self._finish()
        return clean

    def kill(self) -> None:
        """Pull the plug: SIGKILL qemu at once (what the guest had not written is lost)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self._finish()

    def _finish(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if self._reader is not None:
            self._reader.join(10)
        for f in (proc.stdin, proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        if self._console_file is not None:
            self._console_file.close()
            self._console_file = None
        self._stop_swtpm()  # after qemu: the TPM's state is saved as the guest left it
        self.proc = None
        self._reader = None

    def __enter__(self) -> QemuGuest:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


class QemuClient(ServerClient):
    """A client of the agent inside a guest this client booted; close() shuts it down."""

    def __init__(self, guest: QemuGuest, inner: ServerClient,
                 cleanup: tempfile.TemporaryDirectory[str] | None = None) -> None:
        self.guest = guest
        self.inner = inner
        self._cleanup = cleanup

    def call(self, op: str, args: Mapping[str, Any] | None = None) -> Any:
        return self.inner.call(op, args)

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            try:
                self.guest.stop()
            finally:
                if self._cleanup is not None:
                    self._cleanup.cleanup()
                    self._cleanup = None


def _num(url: LinkURL, name: str, default: float, lo: float) -> float:
    raw = url.option(name)
    if raw is None:
        return default
    try:
        v = float(raw)
    except ValueError:
        raise UsageError(f"{url.text}: {name} must be a number, not {raw!r}") from None
    if not v >= lo:
        raise UsageError(f"{url.text}: {name} must be at least {lo:g}")
    return v


def _flag(url: LinkURL, name: str) -> bool:
    raw = url.option(name, "0")
    if raw not in ("0", "1"):
        raise UsageError(f"{url.text}: {name} must be 0 or 1, not {raw!r}")
    return raw == "1"


def guest_from_url(url: LinkURL) -> tuple[QemuGuest, tempfile.TemporaryDirectory[str] | None]:
    """The :class:`QemuGuest` a ``qemu://arm64?...`` URL describes (not started)."""
    url.check_options(_OPTIONS)
    if url.host != "arm64" or url.path not in ("", "/"):
        raise UsageError(f"{url.text}: the only machine is qemu://arm64 (an emulated "
                         "AS-P/AS-B class arm64 server)")
    cleanup = None
    state = url.option("state")
    if not state:
        cleanup = tempfile.TemporaryDirectory(prefix="licqemu-")
        state = str(Path(cleanup.name) / "state.img")
    image = url.option("image")
    trust = url.option("trust")
    console = url.option("console")
    guest = QemuGuest(
        Path(state), Path(image) if image else None, trust=Path(trust) if trust else None,
        model=url.option("model", "AS-P") or "AS-P", serial=url.option("serial"),
        mac=url.option("mac"), time=url.option("time"),
        memory=int(_num(url, "memory", 512, 128)),
        console=Path(console) if console else None, tpm=_flag(url, "tpm"))
    return guest, cleanup


def connect(url: LinkURL, timeout: float = 10.0, tries: int = 4, **_ctx: Any) -> QemuClient:
    """Boot the guest ``url`` describes and connect to its agent over ``link=serial|tcp``."""
    link = url.option("link", "serial")
    if link not in ("serial", "tcp"):
        raise UsageError(f"{url.text}: link must be serial or tcp, not {link!r}")
    timeout = _num(url, "timeout", max(timeout, 10.0), 0.001)
    tries = int(_num(url, "tries", tries, 1))
    boot_timeout = _num(url, "boot_timeout", 300.0, 1.0)
    guest, cleanup = guest_from_url(url)
    import hw

    try:
        guest.start(boot_timeout)
        inner_url = guest.serial_url if link == "serial" else guest.tcp_url
        inner = hw.connect(inner_url, timeout=timeout, tries=tries)
    except BaseException:
        guest.kill()
        if cleanup is not None:
            cleanup.cleanup()
        raise
    return QemuClient(guest, inner, cleanup)


def listen(url: LinkURL, _handler: Any, **_ctx: Any) -> Any:
    raise UsageError(f"{url.text}: qemu:// is a client-side link; the agent inside the guest "
                     "listens on its own console and LAN port")

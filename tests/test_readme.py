"""The README's walkthrough runs as written (issue 13, item 20).

Every ```console block preceded by ``<!-- walkthrough -->`` is run, command by
command (lines starting with ``$ ``), with ``bash`` in one empty temporary folder,
the project's console scripts first on ``PATH``: each must exit 0 and print (stdout
and stderr, as a terminal shows them) exactly the lines the README shows under it,
after normalising what differs from run to run: device IDs and key IDs (64 hex
digits, or 12 and an ellipsis), ISO 8601 times, the loopback ports (each port of
the README is mapped to a free one before running, and back in what was printed),
the temporary folder, and runs of spaces (table columns).

``<!-- walkthrough: background -->`` marks a long-running command (a daemon, the
licensing server): it is started in its own process group, the test waits until it
has printed the lines shown, goes on, and at the end stops it with SIGTERM (what
Ctrl-C does) and checks that it exits 0. ``<!-- walkthrough: unordered -->``
compares the lines in any order (a report sorted by device ID).

``README_UPDATE=1`` rewrites the shown output of every walkthrough command with what
it printed this time (ports mapped back to the README's), for after a deliberate
change of output; the test then passes only if the README stays runnable.
"""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
WAIT = 60.0  # an upper bound for one command; never asserted as a time

MARK = re.compile(r"^<!-- walkthrough(?:: (?P<mode>background|unordered))? -->\n```console\n"
                  r"(?P<body>.*?)^```$", re.M | re.S)
PORT = re.compile(r"127\.0\.0\.1:(\d+)")
LISTEN_PORT = re.compile(r"(--port[ =])(\d+)\b")


@dataclass
class Command:
    line: str
    shown: list[str] = field(default_factory=list)
    printed: list[str] | None = None


@dataclass
class Block:
    mode: str
    span: tuple[int, int]  # of the body in the README text
    commands: list[Command]


def blocks(text: str) -> list[Block]:
    out = []
    for m in MARK.finditer(text):
        cmds: list[Command] = []
        for line in m["body"].splitlines():
            if line.startswith("$ "):
                cmds.append(Command(line[2:]))
            else:
                assert cmds, f"output before any command in a walkthrough block: {line!r}"
                cmds[-1].shown.append(line)
        out.append(Block(m["mode"] or "run", m.span("body"), cmds))
    return out


def normalise(lines: list[str], tmp: Path) -> list[str]:
    out = []
    for line in lines:
        line = line.replace(str(tmp), ".")
        line = re.sub(r"\b[0-9a-f]{64}\b", "<ID>", line)
        line = re.sub(r"\b[0-9a-f]{12}…", "<id>…", line)
        line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<TIME>", line)
        out.append(re.sub(r"\s+", " ", line).strip())
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Walkthrough:
    """Runs the blocks in one folder; keeps the background processes to stop them."""

    def __init__(self, tmp: Path, ports: dict[str, str]) -> None:
        self.tmp = tmp
        self.ports = ports  # README port -> free port
        self.back = {v: k for k, v in ports.items()}
        self.env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    "COLUMNS": "100"}
        for var in ("LICAGENT_FACTS", "LICAGENT_TIME", "LICSERVER_TIME"):
            self.env.pop(var, None)
        self.background: list[tuple[str, subprocess.Popen[bytes]]] = []

    def local(self, cmd: str) -> str:
        cmd = LISTEN_PORT.sub(lambda m: f"{m[1]}{self.ports[m[2]]}", cmd)
        return PORT.sub(lambda m: f"127.0.0.1:{self.ports[m[1]]}", cmd)

    def readme_ports(self, text: str) -> str:
        return PORT.sub(lambda m: f"127.0.0.1:{self.back.get(m[1], m[1])}", text)

    def run(self, cmd: Command) -> None:
        p = subprocess.run(["bash", "-c", self.local(cmd.line)], cwd=self.tmp, env=self.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=WAIT,
                           check=False, start_new_session=True)
        text = self.readme_ports(p.stdout.decode(errors="replace"))
        cmd.printed = text.splitlines()
        assert p.returncode == 0, f"$ {cmd.line}\nexit {p.returncode}\n{text}"

    def start(self, cmd: Command, n: int) -> None:
        """Start a long-running command; wait for its first ``n`` lines (stdout and stderr)."""
        proc = subprocess.Popen(["bash", "-c", "exec " + self.local(cmd.line)], cwd=self.tmp,
                                env=self.env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((cmd.line, proc))
        assert proc.stdout is not None
        got = b""
        deadline = time.monotonic() + WAIT
        while got.count(b"\n") < max(n, 1) and time.monotonic() < deadline:
            r, _w, _x = select.select([proc.stdout], [], [], 0.2)
            if r:
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                got += chunk
        text = self.readme_ports(got.decode(errors="replace"))
        cmd.printed = text.splitlines()
        assert proc.poll() is None, f"$ {cmd.line}\nexited {proc.returncode}\n{text}"

    def stop(self) -> list[str]:
        """SIGTERM to each background command (as Ctrl-C would stop it); problems found."""
        problems = []
        for line, proc in reversed(self.background):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                rest, _ = proc.communicate(timeout=WAIT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
                problems.append(f"$ {line}: did not stop on SIGTERM")
                continue
            if proc.returncode != 0:
                problems.append(f"$ {line}: exit {proc.returncode} after SIGTERM: "
                                f"{rest.decode(errors='replace')[-500:]}")
        self.background.clear()
        return problems


@pytest.fixture
def walkthrough(tmp_path: Path) -> Iterator[tuple[Walkthrough, list[Block], str]]:
    text = README.read_text()
    found = blocks(text)
    ports = {p: str(free_port()) for b in found for c in b.commands
             for p in [*PORT.findall(c.line), *(m[1] for m in LISTEN_PORT.findall(c.line))]}
    w = Walkthrough(tmp_path, ports)
    try:
        yield w, found, text
    finally:
        w.stop()


def test_the_readme_walkthrough_runs_as_written(
        walkthrough: tuple[Walkthrough, list[Block], str], tmp_path: Path) -> None:
    w, found, text = walkthrough
    lines = [c.line for b in found for c in b.commands]
    # the walkthrough is the whole workflow, purchase to licensed
    for needed in ("licserver keygen", "licserver entitle", "licserver serve", "licagent init",
                   "licagent run", "licadmin gather", "licadmin assign", "licadmin license-info",
                   "licadmin requests", "licadmin upload", "licadmin send", "licadmin confirm",
                   "licadmin check", "licserver report"):
        assert any(line.startswith(needed) for line in lines), f"no `{needed}` in the walkthrough"
    update = bool(os.environ.get("README_UPDATE"))
    mismatches = []
    for b in found:
        for cmd in b.commands:
            if b.mode == "background":
                w.start(cmd, len(cmd.shown))
            else:
                w.run(cmd)
            assert cmd.printed is not None
            want, got = normalise(cmd.shown, tmp_path), normalise(cmd.printed, tmp_path)
            if b.mode == "unordered":
                want, got = sorted(want), sorted(got)
            if want != got:
                mismatches.append(f"$ {cmd.line}\n  README shows:\n    "
                                  + "\n    ".join(cmd.shown) + "\n  it printed:\n    "
                                  + "\n    ".join(cmd.printed))
    assert not w.stop(), "a background command did not stop cleanly"
    if update:
        for b in reversed(found):
            body = "".join(f"$ {c.line}\n" + "".join(
                f"{ln.replace(str(tmp_path), '.')}\n" for ln in (c.printed or []))
                for c in b.commands)
            text = text[:b.span[0]] + body + text[b.span[1]:]
        README.write_text(text)
        return
    assert not mismatches, ("the README's walkthrough no longer shows what its commands "
                            "print (README_UPDATE=1 rewrites it):\n" + "\n".join(mismatches))


def test_a_stale_command_or_output_fails(tmp_path: Path) -> None:
    """The checker itself: a renamed flag and a changed output line are both caught."""
    stale = ("<!-- walkthrough -->\n```console\n$ licserver keygen --out vendor\n"
             "wrote vendor/vendor.key (mode 0600) and vendor/vendor.pub\nkid " + "ab" * 32 +
             "\n$ licserver keygen --output vendor2\n```\n")
    (b,) = blocks(stale)
    w = Walkthrough(tmp_path, {})
    first, second = b.commands
    w.run(first)
    assert first.printed is not None
    assert normalise(first.shown, tmp_path) == normalise(first.printed, tmp_path)
    first.shown[0] = "wrote vendor/vendor.key"
    assert normalise(first.shown, tmp_path) != normalise(first.printed, tmp_path)
    with pytest.raises(AssertionError, match="exit 2"):
        w.run(second)

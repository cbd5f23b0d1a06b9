"""The four tools behave alike (issue 13, item 19): the same failure has the same exit code
and reason in every tool, ``--version`` everywhere, help text on every option, ISO 8601
dates in messages, and a clock set back says how to recover.

Busy ports are real: a socket holds a loopback port while ``licagent run`` and
``licserver serve`` (real processes) try to listen on it.
"""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from agent.messages import Action
from apps.licadmin.cli import _parser as licadmin_parser
from apps.licadmin.cli import main as licadmin_main
from apps.licagent.cli import _parser as licagent_parser
from apps.licagent.cli import main as licagent_main
from simulators.fleet.cli import _parser as licsim_parser
from simulators.fleet.cli import main as licsim_main
from simulators.licensing_server.cli import _parser as licserver_parser
from simulators.licensing_server.cli import main as licserver_main
from simulators.licensing_server.vendor import Grant
from tests.conftest import T0, Device

BIN = Path(sys.executable).parent
WAIT = 60.0  # an upper bound for a process; never asserted as a time

TOOLS: dict[str, tuple[Callable[[], argparse.ArgumentParser],
                       Callable[[Sequence[str] | None], int]]] = {
    "licagent": (licagent_parser, licagent_main),
    "licadmin": (licadmin_parser, licadmin_main),
    "licserver": (licserver_parser, licserver_main),
    "licsim": (licsim_parser, licsim_main),
}


def run(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=WAIT, check=False)


def one_line(p: subprocess.CompletedProcess[str]) -> str:
    """The refusal: exactly one line on stderr, no traceback."""
    assert "Traceback" not in p.stderr, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


# ---------------------------------------------------------------- --version and help


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_tool_has_version(tool: str, capsys: pytest.CaptureFixture[str]) -> None:
    _parser, main = TOOLS[tool]
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(rf"{tool} \S+ \(bms-licensing, file format 1\)\n", out), out


def test_version_from_the_installed_command(tmp_path: Path) -> None:
    for tool in sorted(TOOLS):
        p = run(tmp_path, tool, "--version")
        assert p.returncode == 0 and p.stdout.startswith(f"{tool} "), (tool, p)


def walk(parser: argparse.ArgumentParser, path: list[str]
         ) -> Iterator[tuple[str, argparse.Action | None, str | None]]:
    """Every (command, option or argument, its help) of a parser and its subcommands."""
    for act in parser._actions:
        if isinstance(act, argparse._SubParsersAction):
            helps = {a.dest: a.help for a in act._choices_actions}
            for name, sub in act.choices.items():
                yield " ".join([*path, name]), None, helps.get(name)
                yield from walk(sub, [*path, name])
        elif not isinstance(act, argparse._HelpAction):
            yield " ".join(path), act, act.help


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_every_option_and_command_has_help(tool: str) -> None:
    parser = TOOLS[tool][0]()
    seen = list(walk(parser, [tool]))
    assert len(seen) > 3
    missing = [f"{cmd} {' '.join(act.option_strings) or act.dest if act else '(command)'}"
               for cmd, act, text in seen if not (text and text.strip())]
    assert missing == [], "no help text: " + "; ".join(missing)
    assert any(act is not None and "--version" in act.option_strings for _c, act, _t in seen)


# ---------------------------------------------------------------- same failure, same code


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port some other process (here: this one) listens on."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def test_a_busy_port_is_exit_2_address_in_use_in_every_tool(
        tmp_path: Path, device: Device, busy_port: int) -> None:
    facts = tmp_path / "facts.json"
    facts.write_text('{"model": "AS-P", "serial": "SN-B1", "macs": ["00:80:f4:00:00:b1"]}')
    assert run(tmp_path, "licagent", "init", "--state", "st", "--facts", str(facts),
               "--model", "AS-P", "--serial", "SN-B1", "--trust", "vendor.pub").returncode == 2
    assert run(tmp_path, "licserver", "keygen", "--out", ".").returncode == 0
    assert run(tmp_path, "licagent", "init", "--state", "st", "--facts", str(facts),
               "--model", "AS-P", "--serial", "SN-B1", "--trust", "vendor.pub").returncode == 0
    tried = {
        "licagent": run(tmp_path, "licagent", "run", "--state", "st", "--facts", str(facts),
                        "--listen", f"tcp://127.0.0.1:{busy_port}"),
        "licserver": run(tmp_path, "licserver", "serve", "--db", "l.db", "--key", "vendor.key",
                         "--port", str(busy_port)),
    }
    for tool, p in tried.items():
        assert p.returncode == 2, (tool, p)
        line = p.stderr.strip().splitlines()[-1]  # licagent logs its store first
        assert "Traceback" not in p.stderr
        assert line.startswith(f"{tool}: address-in-use: cannot listen on "), line
        assert line.endswith("address already in use (another process listens there; stop it "
                             "or pick another port)"), line


def test_a_missing_file_is_exit_2_in_every_tool(tmp_path: Path) -> None:
    cases = [
        ("licagent", "apply", "nothing.resp", "--state", "st"),
        ("licagent", "init", "--state", "st", "--model", "AS-P", "--trust", "nothing.pub"),
        ("licadmin", "show", "nothing.resp"),
        ("licadmin", "gather", "--servers", "nothing.toml", "--out", "site.cbor"),
        ("licserver", "verify-receipt", "--trust", "nothing.pub", "nothing.receipt"),
        ("licserver", "issue", "--key", "nothing.key", "--request", "r", "--out", "x"),
        ("licsim", "run", "nothing.toml"),
    ]
    for argv in cases:
        p = run(tmp_path, *argv)
        line = one_line(p)
        assert p.returncode == 2, (argv, p)
        assert re.fullmatch(rf"{argv[0]}: usage: cannot read .*nothing\.\w+: no such file",
                            line), line


def test_an_unreadable_file_is_exit_8_and_a_folder_exit_2(tmp_path: Path) -> None:
    (tmp_path / "folder.resp").mkdir()
    p = run(tmp_path, "licadmin", "show", "folder.resp")
    assert p.returncode == 2 and one_line(p).endswith("it is a folder, expected a file")
    # a real I/O error: reading a directory through a FIFO is not possible, so EISDIR aside,
    # /proc/self/mem read at offset 0 fails with EIO on Linux
    p = run(tmp_path, "licadmin", "show", "/proc/self/mem")
    assert p.returncode == 8, p
    assert one_line(p).startswith("licadmin: storage: cannot read file /proc/self/mem: ")


def test_not_entitled_is_exit_6_in_licadmin_and_in_the_http_api(tmp_path: Path) -> None:
    """licadmin assign and the licensing server's answer carry the same code and reason."""
    assert run(tmp_path, "licserver", "keygen", "--out", ".").returncode == 0
    assert run(tmp_path, "licserver", "entitle", "--db", "l.db", "--entitlement", "PO 1",
               "--product", "P", "--feature", "bacnet=1").returncode == 0
    assert run(tmp_path, "licserver", "token", "create", "--db", "l.db", "--role",
               "vendor-admin", "--out", "admin.token").returncode == 0
    proc = subprocess.Popen([str(BIN / "licserver"), "serve", "--db", "l.db", "--key",
                             "vendor.key", "--port", "0", "--quiet"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().split()[1]
        p = run(tmp_path, "licadmin", "assign", "--licensing-server", url, "--token-file",
                "admin.token", "--entitlement", "PO 1", "--device", "ab" * 32, "--feature",
                "bacnet=2")
        assert p.returncode == 6, p
        assert one_line(p).startswith("licadmin: not-entitled: ")
        from apps.licensing_client import LicensingClient

        with pytest.raises(Exception) as exc:
            token = (tmp_path / "admin.token").read_text().strip()
            LicensingClient(url, token=token).assign("PO 1", "cd" * 32, "bacnet", 5)
        assert (getattr(exc.value, "exit_code", None), getattr(exc.value, "reason", None)) == (
            6, "not-entitled")
    finally:
        proc.terminate()
        proc.communicate(timeout=WAIT)


# ---------------------------------------------------------------- dates and the clock


def test_clock_set_back_says_iso_dates_and_how_to_recover(device: Device) -> None:
    device.activate(bacnet=1)
    device.clock.t = T0 + 400 * 86400
    assert device.agent.check("bacnet").licensed  # the device has seen this time
    req = device.request(Action.ACTIVATE, ["bacnet"])
    resp = device.vendor.issue(req, [Grant("bacnet", 2)], now=device.clock())
    device.clock.t = T0 + 10 * 86400  # set back
    msg = device.agent.check("bacnet").message
    assert "clock set back" in msg and "set the system clock to the right time" in msg
    assert re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", msg), msg
    from agent.errors import ClockSetBackError

    with pytest.raises(ClockSetBackError) as exc:
        device.agent.apply(resp)
    text = str(exc.value)
    assert re.search(r"clock reads \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ, earlier than "
                     r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ already seen", text), text
    assert "set the system clock to the right time" in text
    assert not re.search(r"\b1[0-9]{9}\b", text), "raw POSIX seconds in a message"


# ---------------------------------------------------------------- the last resort


def test_a_bug_is_one_line_and_exit_1_never_a_traceback(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from apps.common import exit_code_of

    def buggy() -> int:
        return {}["missing"]  # type: ignore[no-any-return]

    monkeypatch.delenv("LICENSING_TRACEBACK", raising=False)
    assert exit_code_of("licadmin", buggy) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("licadmin: internal: KeyError: 'missing' (a bug in licadmin: please "
                          "report it")
    monkeypatch.setenv("LICENSING_TRACEBACK", "1")
    with pytest.raises(KeyError):
        exit_code_of("licadmin", buggy)

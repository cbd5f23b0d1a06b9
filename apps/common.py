"""What the four tools share: time and files from the command line, TOML settings, the info
and status output of licagent and licadmin, the operation subcommands both declare, and the
mapping of errors to exit codes.

Kept light: ``licagent run`` (the daemon, the one long-lived process on a controller)
imports this module, so json, tomllib and datetime load only when a tool needs them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.durable import FileOps, atomic_write
from agent.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    LicensingError,
    MalformedError,
    NotLicensedError,
    StorageError,
    UsageError,
)
from agent.formats import iso
from agent.identity import FactsProvider
from agent.messages import Action, DeviceInfo

if TYPE_CHECKING:
    import argparse

    from agent.cose import PublicKey, SigningKey
    from agent.rpc import ApplyResult  # only for show_applied's signature

__all__ = [
    "add_version",
    "add_operation_commands",
    "show_applied",
    "show_check",
    "exit_code_of",
    "one_line",
    "facts_provider",
    "info_json",
    "parse_time",
    "print_json",
    "print_status",
    "read_input",
    "read_public_key",
    "read_signing_key",
    "read_toml",
    "show_info",
    "show_status",
    "tool_clock",
    "write_output",
]


def parse_time(text: str) -> int:
    """POSIX seconds, an ISO 8601 date-time, or an ISO date (meaning the end of that day, UTC)."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    from datetime import UTC, datetime  # only when a date is given: the daemon never needs it

    try:
        if len(text) == 10:
            d = datetime.fromisoformat(text).replace(tzinfo=UTC)
            return int(d.timestamp()) + 86399
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"cannot read time {text!r}: use ISO 8601 or POSIX seconds") from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp())


def tool_clock(env: Sequence[str] = ("LICAGENT_TIME",)) -> int:
    """POSIX seconds; the first of the ``env`` variables that is set stages a clock."""
    fake = next((v for v in map(os.environ.get, env) if v), None)
    if fake:
        return parse_time(fake)
    return int(time.time())


def facts_provider(path: str | None) -> FactsProvider:
    path = path or os.environ.get("LICAGENT_FACTS")
    if path:
        from hw.facts import load_facts_file

        return load_facts_file(Path(path))
    from hw.facts import LinuxFactsProvider

    return LinuxFactsProvider()


def write_output(path: str | Path, data: bytes) -> None:
    """Write a file the user asked for, atomically (no half-written file on a stick)."""
    p = Path(path)
    if not p.parent.is_dir():
        raise UsageError(f"cannot write {path}: folder {p.parent} does not exist")
    atomic_write(FileOps(), p.absolute(), data, 0o644)


def read_toml(path: str | Path, what: str = "file") -> dict[str, Any]:
    """A TOML file (``what`` names it in errors: config file, scenario, servers file).

    Raises:
        UsageError: it cannot be read, or it is not TOML (what it is instead): a settings
        file is the user's own, so a bad one is a usage error (exit 2) in every tool.
    """
    import tomllib  # only for the tools' settings files: a daemon started by flags never pays

    data = read_input(str(path), TOML_MAX, what)
    if len(data) > TOML_MAX:
        raise UsageError(f"{what} {path} is larger than {TOML_MAX} bytes: not a settings file")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:  # binary data, a signed file, a key in DER ...
        raise UsageError(f"{what} {path} is {_what_is(data)} (not UTF-8 text at byte "
                         f"{exc.start})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{what} {path} is {_what_is(data)}: {exc}") from exc
    except RecursionError as exc:  # tomllib recurses per nesting level of arrays and tables
        raise UsageError(f"{what} {path} nests arrays or tables too deeply: "
                         f"not a settings file") from exc


#: a settings file (config, scenario, servers list) is small: far below this
TOML_MAX = 4 * 1024 * 1024


def _what_is(data: bytes) -> str:
    from agent.formats import describe_kind, identify

    kind = identify(data)
    if kind == "text":
        return "not valid TOML"
    return f"{describe_kind(kind)}, expected a TOML file"


def read_input(path: str, limit: int, what: str = "file", expect: str | None = None) -> bytes:
    """Read a file once, capped: the bytes read are the bytes verified and applied.

    Args:
        what: names the file in errors (``response file``, ``vendor key``).
        expect: an :func:`agent.formats.identify` kind (``response``, ``pem-public-key``):
            a file that is plainly something else is refused at once, naming what it is.

    Raises:
        UsageError: no such file, or a folder (exit 2); StorageError: it cannot be read
        (exit 8); MalformedError: another kind of file (exit 3). A file larger than
        ``limit`` comes back as ``limit + 1`` bytes, which its decoder refuses (the same
        message as over a link).
    """
    try:
        with open(path, "rb") as f:
            # read(limit + 1) would allocate the whole cap (16 MiB for a license information
            # file) for every small file: ask for what the file holds, then for any rest
            size = os.fstat(f.fileno()).st_size
            data = f.read(min(limit, size) + 1)
            if size < len(data) <= limit:  # it grew meanwhile: up to the cap, as before
                data += f.read(limit + 1 - len(data))
    except FileNotFoundError as exc:
        raise UsageError(f"cannot read {what} {path}: no such file") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"cannot read {what} {path}: it is a folder, expected a file") from exc
    except OSError as exc:
        raise StorageError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a path with a NUL byte
        raise UsageError(f"cannot read {what} {path!r}: not a valid path") from exc
    if expect is not None and len(data) <= limit:  # a larger one: its decoder says so
        from agent.formats import expect_kind

        expect_kind(data, expect, path)
    return data


def read_public_key(path: str, what: str = "public key") -> PublicKey:
    """A PEM public key (``--trust``); a private key or anything else is named as such."""
    from agent.cose import PublicKey

    data = read_input(path, KEY_MAX, what, expect="pem-public-key")
    try:
        return PublicKey.from_pem(data)
    except LicensingError as exc:
        raise MalformedError(f"{what} {path}: {exc}") from exc


def read_signing_key(path: str, what: str = "signing key") -> SigningKey:
    """A PEM private key (``--key``); a public key or anything else is named as such."""
    from agent.cose import SigningKey

    data = read_input(path, KEY_MAX, what, expect="pem-private-key")
    try:
        return SigningKey.from_pem(data)
    except LicensingError as exc:
        raise MalformedError(f"{what} {path}: {exc}") from exc


#: a PEM key of this project is a few hundred bytes
KEY_MAX = 64 * 1024


def add_version(parser: argparse.ArgumentParser, prog: str) -> None:
    """``--version`` of every tool: the package's version and the file format it reads."""
    from importlib.metadata import PackageNotFoundError, version

    from agent.messages import FORMAT_VERSION

    try:
        v = version("bms-licensing")
    except PackageNotFoundError:  # run from a source tree that was never installed
        v = "unknown (not installed)"
    parser.add_argument("--version", action="version",
                        version=f"{prog} {v} (bms-licensing, file format {FORMAT_VERSION})",
                        help="print the version and exit")


def dumps_json(obj: Any, indent: int | None = None) -> str:
    import json  # not loaded by the daemon, which never prints JSON

    return json.dumps(obj, indent=indent)


def print_json(obj: Any) -> None:
    print(dumps_json(obj, indent=2))


def info_json(info: DeviceInfo) -> dict[str, Any]:
    """The JSON of ``licagent info --json`` (and ``licadmin info --json``)."""
    return {
        "kind": "device-info",
        "device_id": info.device_id,
        "model": info.model,
        "serial": info.serial,
        "host_id": info.host_id,
        "hardware": info.hardware,
        "sequence": info.sequence,
        "state_digest": info.state_digest.hex(),
        "licenses": [{"feature": x.feature, "count": x.count,
                      "not_before": iso(x.not_before), "not_after": iso(x.not_after)}
                     for x in info.licenses],
        "created": iso(info.created),
    }


def show_info(data: bytes, info: DeviceInfo, out: str | None, as_json: bool) -> None:
    """``info [--out FILE] [--json]`` of licagent and licadmin: write the file, show it."""
    if out:
        write_output(out, data)
    if as_json:
        print_json(info_json(info))
    elif out:
        print(f"wrote device information of {info.device_id} to {out}")
    else:
        print(f"device_id {info.device_id}\nmodel     {info.model}\nserial    {info.serial}\n"
              f"host_id   {info.host_id}\nsequence  {info.sequence}\n"
              f"licenses  {len(info.licenses)}")


def show_applied(prog: str, res: ApplyResult, receipt_out: str | None) -> None:
    """``apply RESPONSE_FILE [--receipt-out FILE]`` of licagent and licadmin: the receipt
    written, what the response did, a warning on stderr."""
    if receipt_out:
        write_output(receipt_out, res.receipt)
    if res.already_applied:
        print(f"already applied: this response made sequence {res.sequence}; nothing changed")
    else:
        print(f"applied response: sequence {res.base_sequence} -> {res.sequence}: "
              f"{', '.join(res.changes or ['no changes'])}")
    if receipt_out:
        print(f"wrote receipt to {receipt_out}")
    if res.warning:
        print(f"{prog}: warning: {res.warning}", file=sys.stderr)


def show_check(licensed: bool, message: str) -> int:
    """``check FEATURE`` of licagent and licadmin: the message; exit 1 when not licensed."""
    print(message)
    if not licensed:
        raise NotLicensedError(message)
    return EXIT_OK


def show_status(st: Mapping[str, Any], as_json: bool) -> None:
    """``status [--json]`` of licagent and licadmin (the same JSON and text)."""
    if as_json:
        print_json(st)
    else:
        print_status(st)


def print_status(st: Mapping[str, Any]) -> None:
    """``licagent status`` (and ``licadmin status``) as text."""
    print(f"device {st['device_id']} ({st['model']}), sequence {st['sequence']}")
    if not st["licenses"]:
        print("  no licenses installed")
    for lic in st["licenses"]:
        window = f"{lic['not_before'] or '-'} .. {lic['not_after'] or 'perpetual'}"
        state = "ok" if lic["licensed_now"] else "NOT VALID NOW"
        print(f"  {lic['feature']:<24} count {lic['count']:<6} {window}  {state}")
    for o in st["outstanding_requests"]:
        print(f"  outstanding {o['action']} request {o['nonce'][:12]}… (sequence {o['sequence']})")
    for w in st["warnings"]:
        print(f"  warning: {w}")


def add_operation_commands(cmd: Callable[[str, str], argparse.ArgumentParser],
                           helps: Mapping[str, str]) -> None:
    """info, status, request, apply and check: licagent runs them on its store and licadmin
    on a server over a link, with the same arguments and flags (a contract), declared here
    once. ``cmd(name, help)`` makes a subcommand with the tool's own common flags."""
    sp = cmd("info", helps["info"])
    sp.add_argument("--out", metavar="FILE",
                    help="write the signed device-information file here (for licadmin "
                         "license-info or the vendor)")
    sp.add_argument("--json", action="store_true", help="print the fields as JSON")

    sp = cmd("status", helps["status"])
    sp.add_argument("--json", action="store_true",
                    help="print the status as JSON (dates in ISO 8601)")

    sp = cmd("request", helps["request"])
    sp.add_argument("action", choices=[a.value for a in Action],
                    help="what the request asks the vendor for")
    sp.add_argument("--feature", action="append", default=[], metavar="F",
                    help="a feature to ask for (repeat for each)")
    sp.add_argument("--license-info", metavar="FILE", help=helps["license-info"])
    sp.add_argument("--transfer-to", metavar="DEVICE_ID",
                    help="(reclaim) the new server the licenses move to: the signed "
                         "transfer-out of a rehost (issue 16)")
    sp.add_argument("--out", required=True, metavar="FILE",
                    help="where to write the signed request file")
    sp.add_argument("--force", action="store_true",
                    help="reclaim even while seats of floating licenses are out or child "
                         "servers hold grants of the licenses (without it the request is "
                         "refused naming each holder; the receipt records the seats still out "
                         "and the leases still running, and when the last one ends)")

    sp = cmd("apply", helps["apply"])
    sp.add_argument("response", metavar="RESPONSE_FILE",
                    help="the vendor's response file (not a request: that one is refused "
                         "and named)")
    sp.add_argument("--receipt-out", metavar="FILE",
                    help="write the signed receipt here (for licadmin confirm or the vendor)")

    sp = cmd("check", helps["check"])
    sp.add_argument("feature", metavar="FEATURE", help="the feature name, e.g. bacnet-ip")
    sp.add_argument("--count", type=int, default=1, metavar="N",
                    help="how many units must be licensed (own and inherited; default 1)")


def one_line(text: str) -> str:
    """A message as one line: line breaks and other control characters that came from a
    file or a peer are shown escaped, so that no input can forge a second line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def exit_code_of(prog: str, command: Callable[[], int]) -> int:
    """Run a tool's command and turn what it raises into the documented exit code.

    ``not licensed`` exits 1 silently (``check``); any other LicensingError prints
    ``PROG: REASON: MESSAGE`` and exits with its code; Ctrl-C (a KeyboardInterrupt no
    step handled itself) prints ``PROG: interrupted: ...`` and exits 130. Anything else
    is a bug of the tool: one line ``PROG: internal: ...`` and exit 1, never a traceback
    (``LICENSING_TRACEBACK=1`` shows it, for a bug report).
    """
    try:
        return command()
    except NotLicensedError:
        return NotLicensedError.exit_code
    except LicensingError as err:
        print(f"{prog}: {err.reason}: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: stopped by Ctrl-C (SIGINT)", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("LICENSING_TRACEBACK"):
            raise
        print(f"{prog}: internal: {type(exc).__name__}: {one_line(str(exc))[:300]} (a bug in "
              f"{prog}: please report it with the command that caused it; "
              f"LICENSING_TRACEBACK=1 shows where)", file=sys.stderr)
        return EXIT_FAILURE

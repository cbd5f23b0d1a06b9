"""Issue 17, item 3: ``licagent check`` and ``status`` start without argparse or unused modules.

The argparse-free path parses exactly what argparse parses (or hands the line to
argparse), and a real ``licagent check``/``status`` process loads neither argparse
(with the shutil, gettext and locale modules its help formatter pulls in) nor the
RPC tables it does not use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cose import SigningKey
from agent.identity import HardwareFacts
from agent.service import Agent
from apps.licagent.cli import _parser, fast_query_args
from hw.facts import StaticFactsProvider
from simulators.licensing_server.vendor import Vendor

TOKENS = ["--state", "--facts", "--json", "--state=s", "--state=", "--facts=f", "--stat", "-h",
          "--help", "--", "dir", "bacnet", "-1", "x=y", "", "--verbose", "check", "status"]


def via_argparse(argv: list[str]) -> dict[str, Any] | None:
    try:
        ns = _parser().parse_args(argv)
    except SystemExit:
        return None
    return vars(ns)


@settings(max_examples=600)
@given(st.sampled_from(["check", "status"]), st.lists(st.sampled_from(TOKENS), max_size=6))
def test_fast_path_agrees_with_argparse(command: str, tokens: list[str]) -> None:
    argv = [command, *tokens]
    fast = fast_query_args(argv)
    if fast is None:
        return  # argparse handles it, by construction the same as before
    assert vars(fast) == via_argparse(argv)


@pytest.mark.parametrize("argv", [
    ["check", "--state", "s", "bacnet"],
    ["check", "bacnet", "--state=s", "--facts", "f.json"],
    ["status", "--state", "s"],
    ["status", "--json", "--facts=f", "--state", "s"],
])
def test_plain_lines_take_the_fast_path(argv: list[str]) -> None:
    fast = fast_query_args(argv)
    assert fast is not None and vars(fast) == via_argparse(argv)


@pytest.mark.parametrize("argv", [
    ["check", "--state", "s"], ["status"], ["status", "--state", "s", "--json", "--json"],
    ["check", "--state", "s", "a", "b"], ["status", "--state", "s", "-h"],
    ["check", "--sta", "s", "a"], ["request", "--state", "s"], ["check", "--state", "s", "--", "a"],
])
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert fast_query_args(argv) is None


PROBE = """
import atexit, sys
atexit.register(lambda: print("MODULES", ",".join(sorted(sys.modules)), file=sys.stderr))
from apps.licagent.cli import main
sys.exit(main(sys.argv[1:]))
"""

#: the bench's floor (tests/bench/ratios.py): a Python that imports cbor2 and Ed25519
FLOOR = PROBE.replace("from apps.licagent.cli import main\nsys.exit(main(sys.argv[1:]))",
                      "import cbor2\nfrom cryptography.hazmat.primitives.asymmetric import ed25519")

#: what `licagent check` and `status` may load beyond the floor (tests/agent/query_modules.txt)
BUDGET = Path(__file__).with_name("query_modules.txt")

#: never on their path: argparse's help formatter (shutil, gettext, locale), the RPC and link
#: tables, the daemon, the tree's and transfer's operations, settings files, dates, threads
NEVER = {"argparse", "shutil", "gettext", "locale", "agent.rpc", "agent.ops", "agent.inherit",
         "agent.transfer", "agent.carried", "agent.tpm", "apps.licagent.daemon", "hw.link",
         "hw.rpc", "hw.backends", "tomllib", "datetime", "threading", "socket", "subprocess",
         "dataclasses", "inspect", "importlib.metadata"}


def _budget() -> set[str]:
    return {line.strip() for line in BUDGET.read_text().splitlines()
            if line.strip() and not line.startswith("#")}


def _modules(stderr: str) -> set[str]:
    line = next(x for x in stderr.splitlines() if x.startswith("MODULES "))
    # how the package is installed (an editable finder) is not the command's own import
    return {m for m in line.split()[1].split(",") if not m.startswith("__editable__")}


def _store(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    hw = HardwareFacts(model="AS-P", serial="SN-Q1", macs=("00:80:f4:0a:0b:0e",))
    d = tmp_path / "s"
    Agent(d, StaticFactsProvider(hw), clock=lambda: 1_800_000_000).init(
        "AS-P", hw.serial, [Vendor(SigningKey.generate()).public])
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(hw.as_dict()))
    return d, {**os.environ, "LICAGENT_FACTS": str(facts), "LICAGENT_TIME": "1800000000"}


def _run(code: str, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True,
                          text=True, check=False)


RUNS = [["check", "bacnet"], ["status"], ["status", "--json"]]


@pytest.mark.parametrize("args", RUNS)
def test_check_and_status_processes_load_nothing_they_do_not_use(tmp_path: Path,
                                                                  args: list[str]) -> None:
    d, env = _store(tmp_path)
    r = _run(PROBE, [args[0], "--state", str(d), *args[1:]], env)
    assert r.returncode == (1 if args[0] == "check" else 0), r.stderr
    if args[0] == "check":
        assert r.stdout.strip() == "bacnet: not licensed"
    else:
        assert "sequence 0" in r.stdout or '"sequence": 0' in r.stdout
    floor = _modules(_run(FLOOR, [], env).stderr)
    loaded = _modules(r.stderr)
    assert "agent.store" in loaded and "agent.store" not in floor  # it really opened the store
    assert not NEVER & loaded, sorted(NEVER & loaded)
    if "--json" not in args:  # the facts file is read without the json package
        assert "json" not in loaded and "_json" in loaded
    extra = sorted(loaded - floor - _budget())
    assert not extra, (
        f"licagent {args[0]} now imports {len(extra)} module(s) beyond its budget: "
        f"{', '.join(extra)}. Import them lazily where only other commands need them (issue 17 "
        f"item 3: at most 1.5x the bare import floor), or, if it must, add them to "
        f"tests/agent/query_modules.txt after `make bench-ratios` shows the goal still holds.")


def test_the_query_budget_lists_only_what_is_loaded(tmp_path: Path) -> None:
    """The budget stays tight: a module no longer loaded leaves it (and can not creep back)."""
    d, env = _store(tmp_path)
    loaded: set[str] = set()
    for args in RUNS:
        loaded |= _modules(_run(PROBE, [args[0], "--state", str(d), *args[1:]], env).stderr)
    assert not NEVER & _budget()
    assert sorted(_budget() - loaded) == []

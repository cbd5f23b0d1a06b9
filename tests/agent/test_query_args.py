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
import sys
from apps.licagent.cli import main
code = main(sys.argv[1:])
bad = sorted(m for m in ("argparse", "shutil", "gettext", "locale", "agent.rpc", "agent.ops",
                         "tomllib", "datetime", "threading") if m in sys.modules)
print("LOADED", ",".join(bad), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.parametrize("args", [["check", "bacnet"], ["status"], ["status", "--json"]])
def test_check_and_status_processes_load_nothing_they_do_not_use(tmp_path: Path,
                                                                  args: list[str]) -> None:
    hw = HardwareFacts(model="AS-P", serial="SN-Q1", macs=("00:80:f4:0a:0b:0e",))
    d = tmp_path / "s"
    Agent(d, StaticFactsProvider(hw), clock=lambda: 1_800_000_000).init(
        "AS-P", hw.serial, [Vendor(SigningKey.generate()).public])
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps(hw.as_dict()))
    env = {**os.environ, "LICAGENT_FACTS": str(facts), "LICAGENT_TIME": "1800000000"}
    argv = [args[0], "--state", str(d), *args[1:]]
    r = subprocess.run([sys.executable, "-c", PROBE, *argv], env=env, capture_output=True,
                       text=True, check=False)
    assert r.returncode == (1 if args[0] == "check" else 0), r.stderr
    assert "LOADED \n" in r.stderr, r.stderr  # none of them
    if args[0] == "check":
        assert r.stdout.strip() == "bacnet: not licensed"
    else:
        assert "SN-Q1" in r.stdout or "sequence 0" in r.stdout or '"sequence": 0' in r.stdout

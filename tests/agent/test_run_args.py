"""``licagent run``'s argparse-free fast path parses exactly what argparse parses."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apps.licagent.cli import RUN_FLAGS, _parser, fast_run_args

TOKENS = [*RUN_FLAGS, "--stat", "--listen=tcp://127.0.0.1:0", "--state=", "--max-clients=07",
          "--max-clients=x", "--log-level=info", "--log-level=loud", "-h", "--help", "--",
          "tcp://127.0.0.1:0", "pty://", "dir", "12", "-1", "debug", "error", "", "x=y", "--facts=f"]


def via_argparse(argv: list[str]) -> dict[str, Any] | None:
    try:
        ns = _parser().parse_args(argv)
    except SystemExit:
        return None
    return {k: v for k, v in vars(ns).items() if k != "command"}


@settings(max_examples=400)
@given(st.lists(st.sampled_from(TOKENS), max_size=8))
def test_fast_path_agrees_with_argparse(tokens: list[str]) -> None:
    argv = ["run", *tokens]
    fast = fast_run_args(argv)
    if fast is None:
        return  # argparse handles it, by construction the same as before
    assert fast == via_argparse(argv)


@pytest.mark.parametrize("argv", [
    ["run", "--state", "s", "--listen", "tcp://127.0.0.1:0", "--listen", "pty://"],
    ["run", "--config=c.toml", "--max-clients", "32", "--log-level", "debug", "--facts", "f"],
    ["run", "--state=s", "--listen=mqtt://127.0.0.1:1883/site"],
])
def test_plain_daemon_command_lines_take_the_fast_path(argv: list[str]) -> None:
    fast = fast_run_args(argv)
    assert fast is not None and fast == via_argparse(argv)


@pytest.mark.parametrize("argv", [
    ["run", "--help"], ["run", "--stat", "s"], ["run", "--state"], ["run", "--state", "a", "--state", "b"],
    ["run", "--max-clients", "many"], ["run", "--log-level", "loud"], ["status", "--state", "s"], [],
])
def test_anything_else_goes_to_argparse(argv: list[str]) -> None:
    assert fast_run_args(argv) is None


def test_daemon_does_not_load_argparse(tmp_path: Any) -> None:
    """The memory saving itself: a plain `licagent run` never imports argparse or dataclasses."""
    code = ("import sys; import apps.licagent.cli as c; a = c.fast_run_args(sys.argv[1:]); "
            "import apps.licagent.daemon, hw.backends.tcp, hw.backends.serialport; "
            "print(sorted(m for m in ('argparse', 'dataclasses', 'inspect', 'shutil') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "run", "--state", str(tmp_path),
                          "--listen", "tcp://127.0.0.1:0"], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"

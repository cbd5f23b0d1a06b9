"""apps/common.py: what the four tools share, refusing bad input with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from agent.errors import UsageError
from apps.common import read_toml

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("content", [b"\x00\xff binary", b"site = \"caf\xe9\"\n"])
def test_a_settings_file_that_is_not_utf8_text_is_one_usage_error(tmp_path: Path,
                                                                  content: bytes) -> None:
    bad = tmp_path / "servers.toml"
    bad.write_bytes(content)
    with pytest.raises(UsageError, match=r"expected a TOML file \(not UTF-8 text"):
        read_toml(bad, "servers file")
    p = subprocess.run([str(BIN / "licadmin"), "gather", "--servers", str(bad), "--out",
                        str(tmp_path / "site.cbor")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "expected a TOML file" in p.stderr

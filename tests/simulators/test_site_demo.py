"""`make run`'s site demo as a real subprocess: every step as expected, nothing left running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_site_demo_runs_clean(tmp_path: Path) -> None:
    env = dict(os.environ, DEMO_DIR=str(tmp_path / "site"))
    p = subprocess.run([sys.executable, "-m", "simulators.site_demo"], env=env,
                       capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    out = p.stdout
    assert "UNEXPECTED" not in out
    assert "as-p-02   bacnet-ip       250" in out  # the expansion landed
    assert "as-b-01   -" in out  # the reclaimed server holds nothing
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    assert str(tmp_path / "site") not in ps.stdout  # no daemon or licensing server left

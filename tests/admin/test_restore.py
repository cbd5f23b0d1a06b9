"""Restores from backup (issue 16, item 4), with a real store restored from a real copy.

The licensing server knows each device's chain head from the receipts it verified. A
server's store directory is copied (the backup), the server moves on (a reclaim whose
receipt is confirmed), then the directory is restored from the copy: its next request
is refused, saying what happened and what to do, and the report flags it. A request
that was only made before and uploaded late is merely stale (not flagged); re-sending
a reclaim request is the way back: answered with what brings the store to the state its
receipt proved (flagged too), and the server is served again from there.
"""

from __future__ import annotations

import shutil
import time

from tests.admin.test_clock_recovery import _agent, _round, _status
from tests.admin.test_clock_recovery import one as _one  # noqa: F401 - the fixture
from tests.admin.test_rehost import ENT, Site


def test_a_store_restored_from_a_backup_is_refused_and_flagged_and_can_catch_up(
        _one: Site) -> None:  # noqa: F811
    s = _one
    dev = s.ids["dev"]
    shutil.copytree(s.root / "st", s.root / "backup")  # the backup, at sequence 1
    (s.root / "late").mkdir()
    assert _agent(s, "request", "renew", "--out", f"late/{dev}.req").returncode == 0
    # the server moves on: sequence 2 (a reclaim), its receipt confirmed
    _round(s, "reclaim", "rc", None, "--feature", "bacnet-ip")
    assert _status(s)["sequence"] == 2
    # an old request uploaded late: stale, not a restore
    late = s.licadmin("upload", "--requests", "late", "--out-dir", "late-resp", *s.licensing,
                      "--verbose", check=False)
    assert late.returncode != 0 and "create a new request" in late.stdout
    assert "restored" not in late.stdout
    assert s.report()["restores"] == []
    # the store directory restored from the backup
    shutil.rmtree(s.root / "st")
    shutil.copytree(s.root / "backup", s.root / "st")
    assert _status(s)["sequence"] == 1
    # the rule compares whole seconds: a request made in the very second the receipt was
    # applied counts as made before it (only late); a restore is later than that
    time.sleep(1.1)
    (s.root / "r-req").mkdir()
    assert _agent(s, "request", "renew", "--out", f"r-req/{dev}.req").returncode == 0
    up = s.licadmin("upload", "--requests", "r-req", "--out-dir", "r-resp", *s.licensing,
                    "--verbose", check=False)
    assert up.returncode != 0
    text = " ".join(up.stdout.split())
    assert "made this request on sequence 1" in text and "after it had reached sequence 2" in text
    assert "restored from an older backup" in text and "restore the newest backup" in text
    assert not (s.root / "r-resp" / f"{dev}.resp").exists()
    flagged = s.report()["restores"]
    assert [f["device_id"] for f in flagged] == [dev]  # type: ignore[index]
    rep = s.run("licserver", "report", "--db", "ledger.db").stdout
    assert "restored from a backup" in rep and f"device {dev[:12]}…" in rep
    # the way back: a reclaim request is answered with what the receipt proved (flagged)
    back = _round(s, "reclaim", "back")
    assert _status(s)["sequence"] == 2 and _status(s)["licenses"] == []
    assert [f["device_id"] for f in s.report()["restores"]] == [dev, dev]  # type: ignore[index]
    assert back.exists()
    # served again from there: a new assignment is activated
    s.licadmin("assign", *s.licensing, "--entitlement", ENT, "--device", dev,
               "--feature", "bacnet-ip=10")
    _round(s, "activate", "again")
    assert _status(s)["sequence"] == 3
    assert _agent(s, "check", "bacnet-ip").returncode == 0

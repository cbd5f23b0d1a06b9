"""A wrong clock is recoverable (issue 16, item 5), with real processes and a real ledger.

A server's clock reads 2038 once (``LICAGENT_TIME``, the project's faketime): the clock
high-water mark goes to 2038, and with the clock right again its licenses (valid until
2027) count as expired and every new request would be refused. The agent refuses to make
such a request and names the way back; a ``clock`` request answered by the licensing
server with a vendor-certified time resets the mark (journalled), once, for that device.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.admin.test_rehost import BIN, ENT, Site

FUTURE = "2038-01-19T03:14:07Z"


@pytest.fixture
def one(tmp_path: Path) -> Iterator[Site]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    for k in ("LICADMIN_TOKEN", "LICAGENT_TIME"):
        env.pop(k, None)
    s = Site(tmp_path, env)
    s.run("licserver", "keygen", "--out", "vendor")
    s.run("licserver", "entitle", "--db", "ledger.db", "--entitlement", ENT, "--product", "Pro",
          "--feature", "bacnet-ip=10", "--until", "2027-12-31")
    s.run("licserver", "token", "create", "--db", "ledger.db", "--role", "site-admin",
          "--entitlement", ENT, "--out", "site.token")
    try:
        s.urls["ls"] = s.start("ls", "licserver", "serve", "--db", "ledger.db", "--key",
                               "vendor/vendor.key", "--port", "0", "--quiet", ready="serving")
        (tmp_path / "f.json").write_text(json.dumps(
            {"model": "AS-P", "serial": "AS-P-9", "macs": ["00:80:f4:00:00:09"]}))
        out = s.run("licagent", "init", "--state", "st", "--facts", "f.json", "--model", "AS-P",
                    "--serial", "AS-P-9", "--trust", "vendor/vendor.pub").stdout
        dev = s.ids["dev"] = re.search(r"device_id (\w+)", out).group(1)  # type: ignore[union-attr]
        s.licadmin("assign", *s.licensing, "--entitlement", ENT, "--device", dev,
                   "--feature", "bacnet-ip=10")
        _round(s, "activate", "act")
        assert _agent(s, "check", "bacnet-ip").returncode == 0
        yield s
    finally:
        for p in s.procs.values():
            p.kill()
            p.wait(timeout=30)
            assert p.stdout is not None
            p.stdout.close()


def _agent(s: Site, *args: str, at: str | None = None, check: bool = False
           ) -> subprocess.CompletedProcess[str]:
    env = dict(s.env)
    if at:
        env["LICAGENT_TIME"] = at
    cmd, rest = args[0], args[1:]
    return subprocess.run([str(BIN / "licagent"), cmd, "--state", "st", "--facts", "f.json",
                           *rest], cwd=s.root, env=env, capture_output=True, text=True,
                          timeout=60, check=check)


def _round(s: Site, action: str, tag: str, at: str | None = None, *extra: str) -> Path:
    """request (signed by the device), upload (the licensing server), apply: a response file."""
    dev = s.ids["dev"]
    for d in (f"{tag}-req", f"{tag}-resp", f"{tag}-rc"):
        (s.root / d).mkdir()
    p = _agent(s, "request", action, *extra, "--out", f"{tag}-req/{dev}.req", at=at)
    assert p.returncode == 0, p.stderr
    s.licadmin("upload", "--requests", f"{tag}-req", "--out-dir", f"{tag}-resp", *s.licensing)
    resp = s.root / f"{tag}-resp/{dev}.resp"
    p = _agent(s, "apply", str(resp), "--receipt-out", f"{tag}-rc/{dev}.receipt", at=at)
    assert p.returncode == 0, p.stderr
    s.licadmin("confirm", "--receipts", f"{tag}-rc", *s.licensing)
    return resp


def _status(s: Site) -> dict[str, object]:
    return json.loads(_agent(s, "status", "--json", check=True).stdout)  # type: ignore[no-any-return]


def test_a_clock_set_to_2038_is_recovered_with_a_vendor_certified_time(one: Site) -> None:
    s = one
    # one wrong reading in the future: the license looks expired and the mark moves to 2038
    p = _agent(s, "check", "bacnet-ip", at=FUTURE)
    assert p.returncode == 1 and "expired" in p.stdout
    assert _status(s)["clock_high_water"] == FUTURE
    # the clock is right again: locked out, and a request would be refused: none is made
    assert _agent(s, "check", "bacnet-ip").returncode == 1
    before = {f: (s.root / "st" / f).read_bytes() for f in os.listdir(s.root / "st")
              if f.startswith("slot")}
    p = _agent(s, "request", "renew", "--out", "x.req")
    assert p.returncode == 7, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and line.startswith("licagent: clock-set-back: the clock reads 20")
    assert f"earlier than {FUTURE} already seen" in line
    assert "licagent request clock --out FILE" in line and "licadmin upload" in line
    assert not (s.root / "x.req").exists()
    assert {f: (s.root / "st" / f).read_bytes() for f in before} == before
    # a clock request names no feature
    bad = _agent(s, "request", "clock", "--feature", "bacnet-ip", "--out", "x.req")
    assert bad.returncode == 2 and "names no feature" in bad.stderr
    # the way back: a fresh clock request, answered by the licensing server with its time
    dev = s.ids["dev"]
    for d in ("ck-req", "ck-resp", "ck-rc"):
        (s.root / d).mkdir()
    assert _agent(s, "request", "clock", "--out", f"ck-req/{dev}.req").returncode == 0
    s.licadmin("upload", "--requests", "ck-req", "--out-dir", "ck-resp", *s.licensing)
    resp = f"ck-resp/{dev}.resp"
    # applied while the clock still reads 2038: refused, nothing changed, says what to do
    p = _agent(s, "apply", resp, at=FUTURE)
    assert p.returncode == 7 and "the vendor certifies the time was 20" in p.stderr
    assert f"this clock reads {FUTURE}" in p.stderr and "apply this file again" in p.stderr
    assert _status(s)["clock_high_water"] == FUTURE
    # with the clock right, it resets the mark; the license counts again
    p = _agent(s, "apply", resp, "--receipt-out", f"ck-rc/{dev}.receipt")
    assert p.returncode == 0, p.stderr
    st = _status(s)
    assert st["clock_high_water"] != FUTURE and str(st["clock_high_water"]).startswith("20")
    assert st["clock_set_back"] is False
    assert _agent(s, "check", "bacnet-ip").returncode == 0
    s.licadmin("confirm", "--receipts", "ck-rc", *s.licensing)  # the vendor sees the link
    j = json.loads(_agent(s, "journal", "--json", check=True).stdout)
    recs = j["entries"] if isinstance(j, dict) else j
    reset = [r for r in recs if r.get("event") == "apply" and "clock_hwm" in r.get("data", {})]
    assert len(reset) == 1 and reset[0]["data"]["clock_hwm"]["from"] == FUTURE
    # a second wrong reading: the old certified time cannot be replayed to reset it again
    _agent(s, "check", "bacnet-ip", at=FUTURE)
    assert _status(s)["clock_high_water"] == FUTURE
    _agent(s, "apply", resp)
    assert _status(s)["clock_high_water"] == FUTURE
    assert _agent(s, "check", "bacnet-ip").returncode == 1
    # a normal request made while locked out is not made; a new clock request recovers again
    _round(s, "clock", "ck2")
    assert _agent(s, "check", "bacnet-ip").returncode == 0

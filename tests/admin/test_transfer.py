"""Direct transfer at the site (issue 16, item 2), with real processes and a real ledger.

A license issued transferable moves from one server to a named other without a trip to
the vendor: ``licagent transfer`` on the old store writes the signed transfer file,
``licagent apply-transfer`` on the new store installs it once, and ``licadmin confirm``
of both receipts lets the licensing server reconcile the move. Staged attacks: a
transfer applied twice, on another server, altered, forged by another device key with
real evidence, a license not issued transferable, and the same licenses transferred
twice from a store restored from a copy (flagged by the vendor).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cose import SigningKey, sign1
from agent.formats import peek_payload
from agent.messages import Kind, Transfer
from tests.admin.test_rehost import BIN, ENT, Site, _assigned

FEATURE = "bacnet-ip"


def _la(s: Site, state: str, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    cmd, rest = args[0], args[1:]
    return subprocess.run([str(BIN / "licagent"), cmd, "--state", state, "--facts",
                           f"{state}.json", *rest], cwd=s.root, env=s.env, capture_output=True,
                          text=True, timeout=60, check=check)


def _holds(s: Site, state: str) -> dict[str, int]:
    st = json.loads(_la(s, state, "status", "--json", check=True).stdout)
    return {x["feature"]: x["count"] for x in st["licenses"]}


@pytest.fixture
def three(tmp_path: Path) -> Iterator[Site]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("LICADMIN_TOKEN", None)
    s = Site(tmp_path, env)
    s.run("licserver", "keygen", "--out", "vendor")
    s.run("licserver", "entitle", "--db", "ledger.db", "--entitlement", ENT, "--product", "Pro",
          "--feature", f"{FEATURE}=100", "--transferable")
    s.run("licserver", "entitle", "--db", "ledger.db", "--entitlement", ENT, "--product", "Pro",
          "--feature", "trend-log=10")
    s.run("licserver", "token", "create", "--db", "ledger.db", "--role", "site-admin",
          "--entitlement", ENT, "--out", "site.token")
    try:
        s.urls["ls"] = s.start("ls", "licserver", "serve", "--db", "ledger.db", "--key",
                               "vendor/vendor.key", "--port", "0", "--quiet", ready="serving")
        for i, name in enumerate(("old", "new", "other")):
            (tmp_path / f"{name}.json").write_text(json.dumps(
                {"model": "AS-P", "serial": f"AS-P-{i}", "macs": [f"00:80:f4:00:01:0{i}"]}))
            out = s.run("licagent", "init", "--state", name, "--facts", f"{name}.json",
                        "--model", "AS-P", "--serial", f"AS-P-{i}", "--trust",
                        "vendor/vendor.pub").stdout
            s.ids[name] = re.search(r"device_id (\w+)", out).group(1)  # type: ignore[union-attr]
        old = s.ids["old"]
        s.licadmin("assign", *s.licensing, "--entitlement", ENT, "--device", old,
                   "--feature", f"{FEATURE}=20", "--feature", "trend-log=5")
        for d in ("a-req", "a-resp", "a-rc"):
            (tmp_path / d).mkdir()
        _la(s, "old", "request", "activate", "--out", f"a-req/{old}.req", check=True)
        s.licadmin("upload", "--requests", "a-req", "--out-dir", "a-resp", *s.licensing)
        _la(s, "old", "apply", f"a-resp/{old}.resp", "--receipt-out", f"a-rc/{old}.receipt",
            check=True)
        s.licadmin("confirm", "--receipts", "a-rc", *s.licensing)
        assert _holds(s, "old") == {FEATURE: 20, "trend-log": 5}
        yield s
    finally:
        for p in s.procs.values():
            p.kill()
            p.wait(timeout=30)
            assert p.stdout is not None
            p.stdout.close()


def test_a_transferable_license_moves_directly_once_and_the_vendor_reconciles_it(
        three: Site) -> None:
    s = three
    old, new = s.ids["old"], s.ids["new"]
    shutil.copytree(s.root / "old", s.root / "old-backup")  # a copy taken before the move
    bad = _la(s, "old", "transfer", "--feature", "trend-log", "--to", new, "--out", "t.tr")
    assert bad.returncode == 2 and "not issued transferable" in bad.stderr
    p = _la(s, "old", "transfer", "--feature", FEATURE, "--to", new, "--out", "t.tr")
    assert p.returncode == 0, p.stderr
    assert _holds(s, "old") == {"trend-log": 5}
    # not on another server, not altered, then once on the named one
    no = _la(s, "other", "apply-transfer", "t.tr")
    assert no.returncode == 5 and f"transfer is for device {new[:12]}…" in no.stderr
    data = (s.root / "t.tr").read_bytes()
    (s.root / "bad.tr").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    no = _la(s, "new", "apply-transfer", "bad.tr")
    assert no.returncode in (3, 4) and no.stderr.startswith("licagent: ")
    (s.root / "rc").mkdir()
    p = _la(s, "new", "apply-transfer", "t.tr", "--receipt-out", f"rc/{new}.receipt")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"installed {FEATURE}=20 from device {old[:12]}…")
    assert _holds(s, "new") == {FEATURE: 20}
    again = _la(s, "new", "apply-transfer", "t.tr")
    assert again.returncode == 6 and "already applied here" in again.stderr
    assert _holds(s, "new") == {FEATURE: 20}
    # a license received by transfer moves on only through the vendor
    on = _la(s, "new", "transfer", "--feature", FEATURE, "--to", s.ids["other"], "--out", "x.tr")
    assert on.returncode == 2 and "came here by transfer" in on.stderr
    # forged: another device's key with the genuine evidence inside
    t, _ = peek_payload(data, Transfer)
    evil = SigningKey.generate()
    forged = Transfer(device_id=evil.public.kid.hex(), device_key=evil.public,
                      transfer_to=s.ids["other"], id=os.urandom(16), moved=t.moved,
                      evidence=t.evidence, sequence=1, state_digest=t.state_digest,
                      licenses=(), created=t.created)
    (s.root / "forged.tr").write_bytes(sign1(forged.encode(), evil, Kind.TRANSFER.content_type))
    no = _la(s, "other", "apply-transfer", "forged.tr")
    assert no.returncode == 4 and "issued to device" in no.stderr
    assert _holds(s, "other") == {}
    # the vendor reconciles from both receipts
    shutil.copy(s.root / "t.tr", s.root / f"rc/{old}.receipt")
    c = s.licadmin("confirm", "--receipts", "rc", *s.licensing)
    assert "2 confirmed" in c.stdout
    assert _assigned(s) == {old: {"trend-log": 5}, new: {FEATURE: 20}}
    moves = s.report()["moves"]
    assert len(moves) == 1 and "direct transfer" in moves[0]["detail"]  # type: ignore[index,arg-type]
    c = s.licadmin("confirm", "--receipts", "rc", *s.licensing)
    assert "already confirmed" in c.stdout
    assert _assigned(s) == {old: {"trend-log": 5}, new: {FEATURE: 20}}
    # the old store restored from its copy transfers the same licenses again: flagged
    shutil.rmtree(s.root / "old")
    shutil.copytree(s.root / "old-backup", s.root / "old")
    assert _holds(s, "old") == {FEATURE: 20, "trend-log": 5}
    _la(s, "old", "transfer", "--feature", FEATURE, "--to", s.ids["other"], "--out", "t2.tr",
        check=True)
    (s.root / "rc2").mkdir()
    _la(s, "other", "apply-transfer", "t2.tr", "--receipt-out",
        f"rc2/{s.ids['other']}.receipt", check=True)
    c = s.licadmin("confirm", "--receipts", "rc2", *s.licensing, check=False)
    assert c.returncode != 0 and "flagged" in c.stdout and "went to two servers" in c.stdout
    assert _assigned(s) == {old: {"trend-log": 5}, new: {FEATURE: 20}}

"""The licagent and licserver command lines in real subprocesses: round trips and the exit-code contract."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import T0

BIN = Path(sys.executable).parent


class Cli:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.facts = root / "facts.json"
        self.facts.write_text(json.dumps({"model": "AS-B", "serial": "SN-CLI-1",
                                          "macs": ["00:80:f4:aa:bb:01"]}))
        self.env = dict(os.environ, LICAGENT_FACTS=str(self.facts), LICAGENT_TIME=str(T0))

    def __call__(self, tool: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
        return p


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    c = Cli(tmp_path)
    c("licserver", "keygen", "--out", "v")
    c("licagent", "init", "--state", "s", "--model", "AS-B", "--trust", "v/vendor.pub")
    return c


def test_keygen_modes(cli: Cli) -> None:
    assert stat.S_IMODE((cli.root / "v/vendor.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((cli.root / "s/device.key").stat().st_mode) == 0o600
    assert (cli.root / "v/vendor.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    cli("licserver", "keygen", "--out", "v", code=2)  # never overwrite a signing key
    cli("licagent", "init", "--state", "s", "--model", "AS-B", "--trust", "v/vendor.pub", code=2)


def test_round_trip_activate_check_reclaim(cli: Cli) -> None:
    cli("licagent", "request", "--state", "s", "activate", "--feature", "bacnet", "--out", "r1")
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r1",
        "--grant", "bacnet=10@2027-12-31", "--grant", "modbus=2", "--out", "p1")
    out = cli("licagent", "apply", "--state", "s", "p1", "--receipt-out", "rc1").stdout
    assert "sequence 0 -> 1" in out
    st = json.loads(cli("licagent", "status", "--state", "s", "--json").stdout)
    assert st["sequence"] == 1
    assert {(x["feature"], x["count"], x["not_after"]) for x in st["licenses"]} == {
        ("bacnet", 10, "2027-12-31T23:59:59Z"), ("modbus", 2, None)}
    for lic in st["licenses"]:
        assert set(lic) >= {"feature", "count", "not_before", "not_after"}
    cli("licagent", "check", "--state", "s", "bacnet")
    cli("licagent", "check", "--state", "s", "nothing-here", code=1)
    # after expiry (and no grace) the same check fails
    cli.env["LICAGENT_TIME"] = "2028-01-02"
    cli("licagent", "check", "--state", "s", "bacnet", code=1)
    cli.env["LICAGENT_TIME"] = str(T0)
    # the clock now reads earlier than the latest time seen: set back, never extends a license
    back = cli("licagent", "check", "--state", "s", "bacnet", code=1)
    assert "clock set back" in back.stdout
    # reclaim
    cli.env["LICAGENT_TIME"] = "2028-01-03"
    cli("licagent", "request", "--state", "s", "reclaim", "--feature", "modbus", "--out", "r2")
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r2", "--out", "p2")
    cli("licagent", "apply", "--state", "s", "p2", "--receipt-out", "rc2")
    ok = cli("licserver", "verify-receipt", "--trust", "v/vendor.pub", "rc2").stdout
    assert "removed modbus=2" in ok
    cli("licagent", "check", "--state", "s", "modbus", code=1)
    # exit-code contract on refusals
    cli("licagent", "apply", "--state", "s", "p1", code=6)  # replay
    err = cli("licagent", "apply", "--state", "s", "nope", code=2).stderr
    assert "no such file" in err
    (cli.root / "junk").write_bytes(b"\xff\x00junk")
    cli("licagent", "apply", "--state", "s", "junk", code=3)
    # re-apply of the latest is a no-op that writes the same receipt again
    out = cli("licagent", "apply", "--state", "s", "p2", "--receipt-out", "rc2b").stdout
    assert "already applied" in out
    assert (cli.root / "rc2").read_bytes() == (cli.root / "rc2b").read_bytes()
    j = cli("licagent", "journal", "--state", "s", "--verify").stdout
    assert "journal OK" in j
    entries = json.loads(cli("licagent", "journal", "--state", "s", "--json").stdout)
    assert [e["event"] for e in entries].count("apply") == 2
    assert any(e["event"] == "refused" for e in entries)


def test_receipt_verification_refuses_fakes(cli: Cli, tmp_path: Path) -> None:
    cli("licagent", "request", "--state", "s", "activate", "--out", "r1")
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r1", "--grant", "a=1",
        "--out", "p1")
    cli("licagent", "apply", "--state", "s", "p1", "--receipt-out", "rc1")
    cli("licserver", "keygen", "--out", "other")
    cli("licserver", "verify-receipt", "--trust", "other/vendor.pub", "rc1", code=4)
    data = bytearray((cli.root / "rc1").read_bytes())
    data[-3] ^= 0x40
    (cli.root / "rc-bad").write_bytes(bytes(data))
    cli("licserver", "verify-receipt", "--trust", "v/vendor.pub", "rc-bad", code=4)
    # a request is not a receipt
    cli("licserver", "verify-receipt", "--trust", "v/vendor.pub", "r1", code=3)


def test_wrong_device_and_copied_store_exit_5(cli: Cli) -> None:
    other_facts = cli.root / "other.json"
    other_facts.write_text(json.dumps({"model": "AS-B", "serial": "SN-CLI-2",
                                       "macs": ["00:80:f4:aa:bb:02"]}))
    env_other = dict(cli.env, LICAGENT_FACTS=str(other_facts))
    subprocess.run([str(BIN / "licagent"), "init", "--state", "s2", "--model", "AS-B",
                    "--trust", "v/vendor.pub"], cwd=cli.root, env=env_other, check=True,
                   capture_output=True)
    cli("licagent", "request", "--state", "s", "activate", "--out", "r1")
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r1", "--grant", "a=1",
        "--out", "p1")
    p = subprocess.run([str(BIN / "licagent"), "apply", "--state", "s2", "p1"], cwd=cli.root,
                       env=env_other, capture_output=True, text=True, check=False)
    assert p.returncode == 5 and "response is for device" in p.stderr
    # the whole store of s carried to the other hardware
    p = subprocess.run([str(BIN / "licagent"), "status", "--state", "s"], cwd=cli.root,
                       env=env_other, capture_output=True, text=True, check=False)
    assert p.returncode == 5 and "belongs to other hardware" in p.stderr


def test_usage_errors_exit_2(cli: Cli) -> None:
    cli("licagent", "bogus", code=2)
    cli("licagent", "status", code=2)
    cli("licagent", "status", "--state", "nowhere", code=2)
    cli("licagent", "request", "--state", "s", "reclaim", "--feature", "x", "--out", "r",
        code=2)
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r", "--grant", "bad",
        "--out", "x", code=2)


def test_es256_vendor_and_device(tmp_path: Path) -> None:
    c = Cli(tmp_path)
    c("licserver", "keygen", "--out", "v", "--alg", "ES256")
    c("licagent", "init", "--state", "s0", "--model", "Edge-Server", "--trust", "v/vendor.pub",
      code=2)  # the hardware says AS-B
    c.facts.write_text(json.dumps({"model": "Edge-Server", "serial": "ES-1",
                                   "macs": ["52:54:00:00:00:01"]}))
    c("licagent", "init", "--state", "s", "--model", "Edge-Server", "--alg", "ES256",
      "--trust", "v/vendor.pub")
    c("licagent", "request", "--state", "s", "activate", "--out", "r1")
    c("licserver", "issue", "--key", "v/vendor.key", "--request", "r1", "--grant", "a=3",
      "--out", "p1")
    c("licagent", "apply", "--state", "s", "p1", "--receipt-out", "rc")
    c("licserver", "verify-receipt", "--trust", "v/vendor.pub", "rc")
    c("licagent", "check", "--state", "s", "a")


def test_info_file_and_json(cli: Cli) -> None:
    cli("licagent", "info", "--state", "s", "--out", "dev.info")
    info = json.loads(cli("licagent", "info", "--state", "s", "--json").stdout)
    assert info["model"] == "AS-B" and info["serial"] == "SN-CLI-1"
    assert len(info["device_id"]) == 64 and len(info["host_id"]) == 64
    from agent.formats import read_device_info

    di = read_device_info((cli.root / "dev.info").read_bytes())
    assert di.device_id == info["device_id"]
    assert di.hardware["macs"] == ["00:80:f4:aa:bb:01"]


def test_license_info_drives_a_reclaim(cli: Cli) -> None:
    cli("licagent", "request", "--state", "s", "activate", "--out", "r1")
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r1", "--grant", "a=1",
        "--grant", "b=2", "--out", "p1")
    cli("licagent", "apply", "--state", "s", "p1")
    cli("licagent", "info", "--state", "s", "--out", "dev.info")
    cli("licserver", "license-info", "--key", "v/vendor.key", "--device-info", "dev.info",
        "--reclaim", "b", "--out", "li")
    cli("licagent", "request", "--state", "s", "reclaim", "--license-info", "li", "--out", "r2")
    cli("licserver", "issue", "--key", "v/vendor.key", "--request", "r2", "--out", "p2")
    out = cli("licagent", "apply", "--state", "s", "p2").stdout
    assert "remove b" in out and "remove a" not in out
    # license information signed by an untrusted key is refused
    cli("licserver", "keygen", "--out", "evil")
    cli("licserver", "license-info", "--key", "evil/vendor.key", "--device-info", "dev.info",
        "--out", "li-evil")
    cli("licagent", "request", "--state", "s", "reclaim", "--license-info", "li-evil",
        "--out", "r3", code=4)

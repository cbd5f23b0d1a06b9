"""Issue 15: ``licserver issue --floating`` and ``licadmin seat`` as real processes against a
real ``licagent run`` daemon over TCP: checkout until exit 9, list (JSON keys), renew,
return, borrow and offline verify, and the attacks on a token."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cose import decode_sign1, sign1, strict_loads
from agent.seats import SEAT_TOKEN_TYPE
from tests.agent.test_daemon import Agentd, listening
from tests.conftest import T0

BIN = Path(sys.executable).parent


class SeatSite:
    """A daemon serving a pool of two ``editor`` seats over tcp://, and the tools."""

    def __init__(self, d: Agentd) -> None:
        self.d, self.root = d, d.root
        self.proc = d.start("--listen", "tcp://127.0.0.1:0")
        (self.url,) = listening(self.proc)
        self.admin("request", "activate", "--feature", "editor", "--out", "req.cbor")
        self.run("licserver", "issue", "--key", "vendor.key", "--request", "req.cbor",
                 "--grant", "editor=2", "--floating", "--out", "resp.cbor")
        self.admin("apply", "resp.cbor")

    def run(self, tool: str, *args: str, code: int = 0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=env or self.d.env,
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
        return p

    def admin(self, command: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return self.run("licadmin", command, "--server", self.url, *args, code=code)

    def seat(self, command: str, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        return self.run("licadmin", "seat", command, "--server", self.url, *args, code=code)


def vendor_store(tmp_path: Path) -> Agentd:
    """A store trusting the key ``licserver keygen`` wrote (vendor.key, vendor.pub)."""
    d = Agentd(tmp_path)
    subprocess.run([str(BIN / "licserver"), "keygen", "--out", str(tmp_path / "v")],
                   check=True, capture_output=True, timeout=60)
    for name in ("vendor.pub", "vendor.key"):
        os.replace(tmp_path / "v" / name, tmp_path / name)
    shutil.rmtree(d.state)
    p = subprocess.run([str(BIN / "licagent"), "init", "--state", str(d.state), "--facts",
                        str(d.facts), "--model", "AS-P", "--trust", str(tmp_path / "vendor.pub")],
                       env=d.env, capture_output=True, text=True, timeout=60, check=False)
    assert p.returncode == 0, p.stderr
    return d


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SeatSite]:
    d = vendor_store(tmp_path)
    try:
        yield SeatSite(d)
    finally:
        d.close()


def test_a_pool_used_exhausted_renewed_and_returned(site: SeatSite) -> None:
    out = site.seat("checkout", "editor", "--client", "ws-anna", "--out", "a.seat").stdout
    assert out.startswith("checked out seat of editor for ws-anna: leased until ")
    site.seat("checkout", "editor", "--client", "ws-ben", "--out", "b.seat")
    p = site.seat("checkout", "editor", "--client", "ws-carl", "--out", "c.seat", code=9)
    assert "no seat free: 2 of 2 out; next free at 2027-01-15T08:05:00Z" in p.stderr
    assert len(p.stderr.splitlines()) == 1 and not (site.root / "c.seat").exists()
    listed = json.loads(site.seat("list", "--json").stdout)
    assert set(listed) == {"seats", "pools"}
    assert listed["pools"] == [{"feature": "editor", "count": 2, "out": 2, "free": 0}]
    assert [set(s) for s in listed["seats"]] == [
        {"feature", "client", "since", "until", "borrowed"}] * 2
    assert sorted(s["client"] for s in listed["seats"]) == ["ws-anna", "ws-ben"]
    assert all(s["borrowed"] is False and s["until"] == "2027-01-15T08:05:00Z"
               for s in listed["seats"])
    assert site.seat("renew", "a.seat").stdout == (
        "renewed seat of editor for ws-anna: leased until 2027-01-15T08:05:00Z\n")
    assert site.seat("return", "a.seat").stdout == "returned seat of editor for ws-anna\n"
    p = site.seat("return", "a.seat", code=6)
    assert "not out any more" in p.stderr
    site.seat("checkout", "editor", "--client", "ws-carl", "--out", "c.seat")
    text = site.seat("list").stdout
    assert text.startswith("editor: 2 of 2 out, 0 free\n") and "ws-carl" in text


def test_a_node_locked_license_serves_no_seat(site: SeatSite) -> None:
    site.admin("request", "activate", "--feature", "bacnet", "--out", "r2.cbor")
    site.run("licserver", "issue", "--key", "vendor.key", "--request", "r2.cbor",
             "--grant", "bacnet=5", "--out", "p2.cbor")
    site.admin("apply", "p2.cbor")
    p = site.seat("checkout", "bacnet", "--client", "ws", "--out", "x.seat", code=2)
    assert "not a floating one" in p.stderr
    p = site.seat("checkout", "nothing", "--client", "ws", "--out", "x.seat", code=1)
    assert "nothing is not installed" in p.stderr


def test_forged_and_foreign_tokens_are_refused(site: SeatSite, tmp_path: Path) -> None:
    site.seat("checkout", "editor", "--client", "ws-anna", "--out", "a.seat")
    data = (site.root / "a.seat").read_bytes()
    env = decode_sign1(data, max_size=65536)
    # the same payload with the client renamed, re-signed by another key: not this agent's
    from agent.cose import SigningKey, canonical

    m = strict_loads(env.payload, max_size=65536)
    other = SigningKey.generate()
    m |= {"client": "mallory", "device_id": other.public.kid.hex(),
          "device_key": other.public.raw}
    (site.root / "f.seat").write_bytes(sign1(canonical(m), other, SEAT_TOKEN_TYPE))
    p = site.seat("return", "f.seat", code=5)
    assert "not by this one" in p.stderr
    # one flipped bit in the signature: refused (exit 4), the seat stays out
    bad = bytearray(data)
    bad[-3] ^= 1
    (site.root / "b.seat").write_bytes(bytes(bad))
    site.seat("return", "b.seat", code=4)
    (site.root / "g.seat").write_bytes(b"\xa0garbage")
    site.seat("renew", "g.seat", code=3)
    listed = json.loads(site.seat("list", "--json").stdout)
    assert listed["pools"][0]["out"] == 1


def test_a_borrowed_seat_verifies_offline_until_its_end(site: SeatSite) -> None:
    out = site.seat("checkout", "editor", "--client", "laptop-7", "--borrow-hours", "48",
                    "--out", "l.seat").stdout
    assert "borrowed until 2027-01-17T08:00:00Z" in out
    offline = dict(site.d.env, LICAGENT_TIME=str(T0 + 47 * 3600))
    p = site.run("licadmin", "seat", "verify", "l.seat", "--trust", "vendor.pub", env=offline)
    assert "a valid borrowed seat of editor for laptop-7" in p.stdout
    later = dict(site.d.env, LICAGENT_TIME=str(T0 + 48 * 3600))
    p = site.run("licadmin", "seat", "verify", "l.seat", "--trust", "vendor.pub", env=later,
                 code=7)
    assert "ended at 2027-01-17T08:00:00Z" in p.stderr
    # another vendor's key: the chain does not end in it
    site.run("licserver", "keygen", "--out", "other")
    p = site.run("licadmin", "seat", "verify", "l.seat", "--trust", "other/vendor.pub",
                 code=4)
    assert "not by the trusted vendor key" in p.stderr
    # a leased seat is no offline token
    site.seat("checkout", "editor", "--client", "ws", "--out", "w.seat")
    p = site.run("licadmin", "seat", "verify", "w.seat", "--trust", "vendor.pub", code=3)
    assert "is a lease, not a borrowed seat" in p.stderr
    # a borrowed seat counts as out until returned
    listed = json.loads(site.seat("list", "--json").stdout)
    assert listed["pools"][0]["out"] == 2
    assert [s["borrowed"] for s in listed["seats"] if s["client"] == "laptop-7"] == [True]
    site.seat("return", "l.seat")
    assert json.loads(site.seat("list", "--json").stdout)["pools"][0]["out"] == 1


def test_a_pool_reclaimed_refused_then_forced_and_recorded(site: SeatSite) -> None:
    site.seat("checkout", "editor", "--client", "ws-anna", "--out", "a.seat")
    site.seat("checkout", "editor", "--client", "laptop-7", "--borrow-hours", "2",
              "--out", "l.seat")
    p = site.admin("request", "reclaim", "--feature", "editor", "--out", "rec.req", code=9)
    assert p.stderr == (
        "licadmin: seats-out: cannot reclaim editor: 2 seat(s) out: ws-anna until "
        "2027-01-15T08:05:00Z, laptop-7 until 2027-01-15T10:00:00Z (borrowed); have them "
        "returned, or give --force (the receipt then records them; the last ends at "
        "2027-01-15T10:00:00Z)\n")
    assert not (site.root / "rec.req").exists()
    site.admin("request", "reclaim", "--feature", "editor", "--force", "--out", "rec.req")
    site.run("licserver", "issue", "--key", "vendor.key", "--request", "rec.req",
             "--remove", "editor", "--out", "rec.resp")
    site.admin("apply", "rec.resp", "--receipt-out", "rec.receipt")
    p = site.run("licserver", "verify-receipt", "--trust", "vendor.pub", "rec.receipt")
    assert p.stdout.splitlines()[1] == (
        "2 seat(s) still out, the last until 2027-01-15T10:00:00Z: editor ws-anna until "
        "2027-01-15T08:05:00Z, editor laptop-7 until 2027-01-15T10:00:00Z (borrowed)")
    shown = json.loads(site.run("licadmin", "show", "rec.receipt", "--json").stdout)
    assert shown["content"]["seats_end"] == "2027-01-15T10:00:00Z"
    # the seats run out and none is renewed or added
    site.seat("renew", "a.seat", code=1)
    site.seat("checkout", "editor", "--client", "ws-ben", "--out", "b.seat", code=1)
    assert json.loads(site.seat("list", "--json").stdout)["pools"] == []


def test_the_site_requests_step_refuses_a_pool_with_seats_out_unless_forced(
        site: SeatSite) -> None:
    site.seat("checkout", "editor", "--client", "ws-anna", "--out", "a.seat")
    site.admin("info", "--out", "dev.info")
    site.run("licserver", "license-info", "--key", "vendor.key", "--device-info", "dev.info",
             "--reclaim", "editor", "--out", "li.cbor")
    p = site.run("licadmin", "requests", "--license-info", "li.cbor", "--server", site.url,
                 "--out-dir", "reqs", code=9)
    assert "seats-out" in p.stdout + p.stderr and "ws-anna until" in p.stdout + p.stderr
    assert not list((site.root / "reqs").glob("*.req"))
    site.run("licadmin", "requests", "--license-info", "li.cbor", "--server", site.url,
             "--out-dir", "reqs", "--force")
    assert len(list((site.root / "reqs").glob("*.req"))) == 1

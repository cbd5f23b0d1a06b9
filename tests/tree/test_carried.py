"""Issue 14 item 2: attaching an offline server to its parent with a CARRIED usbdrop stick
(no daemon serves it): the child writes its signed attach request on the stick, the
parent's technician answers it (``licagent answer-attach``), the child applies the answer;
a recall goes back the same way. Attacks: a replayed answer, another child's answer, an
answer edited on the way, a symbolic link on the stick, stale device information."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import T0
from tests.tree.test_system_daemons import System

DAY = 86400


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def at(s: System, t: int) -> dict[str, str]:
    return dict(s.env, LICAGENT_TIME=str(t))


@pytest.fixture
def carried(system: System) -> tuple[System, Path]:
    s = system
    s.init("top", "Enterprise-Server")
    s.init("kid", "AS-P")
    s.init("kid2", "AS-B")
    s.activate("top", "SNMP=2")
    stick = s.root / "stick"
    stick.mkdir()
    (stick / ".licmailbox").touch()
    return s, stick


def test_attach_with_a_carried_stick_and_give_back_a_recall(carried: tuple[System, Path]
                                                            ) -> None:
    s, stick = carried
    url = f"usbdrop://{stick}"
    kid = stick / "attach" / s.ids["kid"]
    out = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried").stdout
    assert out.splitlines()[0] == f"wrote the attach request to {kid}/request.cbor"
    assert "answer-attach" in out and (kid / "request.cbor").is_file()
    # nothing recorded on the child yet
    assert json.loads(s.run("licagent", "status", *s.store("kid"), "--json").stdout)[
        "licenses"] == []
    out = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url).stdout
    assert out.splitlines() == [f"answered {s.ids['kid'][:12]}…: granted SNMP",
                                f"answered 1 attach request(s) on {stick}"]
    out = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried").stdout
    assert out.splitlines() == [f"attached to parent {s.ids['top']} at {url} (carried stick)",
                                "inherited: SNMP"]
    st = json.loads(s.run("licagent", "status", *s.store("kid"), "--json").stdout)
    assert [(x["feature"], x["source"], x["parent"]) for x in st["licenses"]] == [
        ("SNMP", "inherited", s.ids["top"])]
    assert s.run("licagent", "check", *s.store("kid"), "SNMP").returncode == 0
    assert not (kid / "answer.cbor").exists() and not (kid / "request.cbor").exists()

    # the top server's reclaim recalls the grant; the recall travels on the stick too
    s.run("licagent", "request", *s.store("top"), "reclaim", "--feature", "SNMP", "--out",
          str(s.root / "r.req"), code=1)
    later = at(s, T0 + 3600)
    s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried", env=later)
    out = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url, env=later).stdout
    assert f"answered {s.ids['kid'][:12]}…: granted nothing; recalled SNMP" in out, out
    out = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried",
                env=later).stdout
    assert "returned: the signed return is on the stick for the parent" in out, out
    assert s.run("licagent", "check", *s.store("kid"), "SNMP", env=later, code=1)
    out = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url, env=later).stdout
    assert out.splitlines()[0] == f"return from {s.ids['kid'][:12]}…: SNMP", out
    assert not (kid / "return.cbor").exists()
    # the grant is back: the reclaim goes through now
    s.run("licagent", "request", *s.store("top"), "reclaim", "--feature", "SNMP", "--out",
          str(s.root / "r.req"), env=later)


def test_a_replayed_foreign_or_edited_answer_is_refused_and_nothing_changes(
        carried: tuple[System, Path]) -> None:
    s, stick = carried
    url = f"usbdrop://{stick}"
    kid, kid2 = stick / "attach" / s.ids["kid"], stick / "attach" / s.ids["kid2"]
    for name in ("kid", "kid2"):
        s.run("licagent", "attach", *s.store(name), "--parent", url, "--carried")
    out = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url).stdout
    assert "answered 2 attach request(s)" in out
    saved = {n: (kid / n).read_bytes() for n in ("request.cbor", "answer.cbor")}
    saved2 = {n: (kid2 / n).read_bytes() for n in ("request.cbor", "answer.cbor")}

    # another child's answer in this child's folder: refused, exit 5, one line
    (kid / "answer.cbor").write_bytes(saved2["answer.cbor"])
    before = _files(s.root / "kid")
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried", code=5)
    assert p.stderr.count("\n") == 1 and "attach answer is for device" in p.stderr, p.stderr
    assert _files(s.root / "kid") == before
    # an answer edited on the way (one byte of its signature): refused, exit 4
    edited = bytearray(saved["answer.cbor"])
    edited[-3] ^= 1
    (kid / "answer.cbor").write_bytes(bytes(edited))
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried", code=4)
    assert p.stderr.count("\n") == 1 and _files(s.root / "kid") == before
    # the genuine answer is applied once ...
    (kid / "answer.cbor").write_bytes(saved["answer.cbor"])
    s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried")
    applied = _files(s.root / "kid")
    # ... and replayed later (request and answer put back): refused, exit 7, nothing changes
    for n, data in saved.items():
        (kid / n).write_bytes(data)
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried",
              env=at(s, T0 + 60), code=7)
    assert p.stderr.count("\n") == 1 and "already applied, or replayed" in p.stderr, p.stderr
    assert _files(s.root / "kid") == applied
    # an answer more than a day old: refused (write a new request)
    p = s.run("licagent", "attach", *s.store("kid2"), "--parent", url, "--carried",
              env=at(s, T0 + DAY + 60), code=7)
    assert "more than a day" in p.stderr and p.stderr.count("\n") == 1, p.stderr


def test_stale_device_information_and_symbolic_links_on_the_stick_are_refused(
        carried: tuple[System, Path]) -> None:
    s, stick = carried
    url = f"usbdrop://{stick}"
    kid = stick / "attach" / s.ids["kid"]
    s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried")
    top_before = _files(s.root / "top")
    # the parent sees the request more than a day after it was made: refused, one line
    p = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url,
              env=at(s, T0 + DAY + 60), code=7)
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"refused {kid}: expired: the child's device information was "
                               f"made at 2027-01-15T08:00:00Z, more than a day"), lines
    assert not (kid / "answer.cbor").exists() and _files(s.root / "top") == top_before

    # a request that is a symbolic link (to a file elsewhere): refused, nothing read
    secret = s.root / "elsewhere.cbor"
    shutil.move(str(kid / "request.cbor"), secret)
    os.symlink(secret, kid / "request.cbor")
    p = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url, code=8)
    assert p.stdout.splitlines()[0].startswith(f"refused {kid}: unsafe-file: "), p.stdout
    assert "symbolic link" in p.stdout and _files(s.root / "top") == top_before
    # the child's folder itself a symbolic link: refused on both sides
    (kid / "request.cbor").unlink()
    shutil.rmtree(kid)
    other = s.root / "other"
    other.mkdir()
    os.symlink(other, kid)
    p = s.run("licagent", "answer-attach", *s.store("top"), "--stick", url, code=8)
    assert "symbolic link" in p.stdout and _files(s.root / "top") == top_before
    kid_before = _files(s.root / "kid")
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", url, "--carried", code=8)
    assert p.stderr.count("\n") == 1 and "symbolic link" in p.stderr, p.stderr
    assert list(other.iterdir()) == [] and _files(s.root / "kid") == kid_before
    # a folder that is not a license mailbox is never written to
    bare = s.root / "bare"
    bare.mkdir()
    p = s.run("licagent", "attach", *s.store("kid"), "--parent", f"usbdrop://{bare}",
              "--carried", code=2)
    assert "is not a license mailbox" in p.stderr and list(bare.iterdir()) == []

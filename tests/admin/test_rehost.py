"""``licadmin rehost`` (issue 16, item 1): licenses move make-before-break, all real processes.

The site: a ``licserver serve`` and two ``licagent run`` daemons as subprocesses on
loopback tcp://; every ``licadmin`` call is a real process. The bad day is staged
for real: the rehost is killed with SIGKILL between every two of its steps (the
peer of the next step is stopped with SIGSTOP, so the kill lands exactly there),
and after each kill the licenses are on exactly one server or on none while the
ledger holds the old server's signed removal; the same command finishes it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.formats import peek_payload, verify_receipt
from agent.messages import Request, Response
from apps.licadmin.rehost import STEPS
from simulators.licensing_server.ledger import Ledger

BIN = Path(sys.executable).parent
WAIT = 60
ENT = "PO 9 (Plant 9)"


@dataclass
class Site:
    root: Path
    env: dict[str, str]
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    ids: dict[str, str] = field(default_factory=dict)

    def run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([str(BIN / tool), *args], cwd=self.root, env=self.env,
                           capture_output=True, text=True, timeout=WAIT)
        if check:
            assert p.returncode == 0, (tool, args, p.stdout, p.stderr)
        return p

    def start(self, name: str, tool: str, *args: str, ready: str) -> str:
        proc = subprocess.Popen([str(BIN / tool), *args], cwd=self.root, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.procs[name] = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith(ready), line
        return line.split()[-1]

    def licadmin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("licadmin", *args, check=check)

    @property
    def licensing(self) -> list[str]:
        return ["--licensing-server", self.urls["ls"], "--token-file", "site.token"]

    def holds(self, name: str) -> dict[str, int]:
        st = json.loads(self.licadmin("status", "--server", self.urls[name], "--json").stdout)
        return {x["feature"]: x["count"] for x in st["licenses"]}

    def report(self) -> dict[str, object]:
        with Ledger(self.root / "ledger.db") as led:
            return led.report()

    def rehost(self, *extra: str) -> list[str]:
        return ["rehost", "--from", self.urls["old"], "--to", self.urls["new"], *self.licensing,
                "--work-dir", "work", *extra]


def _facts(root: Path, name: str, serial: str, mac: str) -> str:
    f = root / f"{name}.json"
    f.write_text(json.dumps({"model": "AS-P", "serial": serial, "macs": [mac]}))
    return str(f)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("LICADMIN_TOKEN", None)
    s = Site(tmp_path, env)
    s.run("licserver", "keygen", "--out", "vendor")
    s.run("licserver", "entitle", "--db", "ledger.db", "--entitlement", ENT, "--product", "Pro",
          "--feature", "bacnet-ip=500", "--feature", "trend-log=100")
    s.run("licserver", "token", "create", "--db", "ledger.db", "--role", "site-admin",
          "--entitlement", ENT, "--out", "site.token")
    try:
        s.urls["ls"] = s.start("ls", "licserver", "serve", "--db", "ledger.db", "--key",
                               "vendor/vendor.key", "--port", "0", "--quiet", ready="serving")
        for name, serial, mac in (("old", "AS-P-1", "00:80:f4:00:00:01"),
                                  ("new", "AS-P-2", "00:80:f4:00:00:02")):
            facts = _facts(tmp_path, name, serial, mac)
            out = s.run("licagent", "init", "--state", name, "--facts", facts, "--model", "AS-P",
                        "--serial", serial, "--trust", "vendor/vendor.pub").stdout
            s.ids[name] = re.search(r"device_id (\w+)", out).group(1)  # type: ignore[union-attr]
            s.urls[name] = s.start(name, "licagent", "run", "--state", name, "--facts", facts,
                                   "--listen", "tcp://127.0.0.1:0", ready="listening")
        s.licadmin("assign", *s.licensing, "--entitlement", ENT, "--device", s.ids["old"],
                   "--feature", "bacnet-ip=200", "--feature", "trend-log=50")
        s.licadmin("activate", "--server", s.urls["old"], *s.licensing)
        assert s.holds("old") == {"bacnet-ip": 200, "trend-log": 50}
        yield s
    finally:
        for p in s.procs.values():
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
            p.wait(timeout=WAIT)
            assert p.stdout is not None
            p.stdout.close()


def _assigned(site: Site) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for a in site.report()["assignments"]:  # type: ignore[attr-defined]
        if a["count"]:
            out.setdefault(a["device_id"], {})[a["feature"]] = a["count"]
    return out


def test_rehost_in_one_go_moves_the_licenses_and_the_ledger_shows_the_move(site: Site) -> None:
    p = site.licadmin(*site.rehost())
    assert p.stdout.splitlines()[-1] == (
        f"moved bacnet-ip=200, trend-log=50 from {site.ids['old'][:12]}… to "
        f"{site.ids['new'][:12]}…; both receipts confirmed")
    assert site.holds("old") == {}
    assert site.holds("new") == {"bacnet-ip": 200, "trend-log": 50}
    assert _assigned(site) == {site.ids["new"]: {"bacnet-ip": 200, "trend-log": 50}}
    # the transfer-out: signed by the old server, naming the new one
    req, _ = peek_payload((site.root / "work/out.req").read_bytes(), Request)
    assert (req.device_id, req.transfer_to) == (site.ids["old"], site.ids["new"])
    proof = verify_receipt((site.root / "work/out.receipt").read_bytes(),
                           [_vendor_pub(site)])
    resp, _ = peek_payload(proof.response, Response)
    assert resp.transfer_to == site.ids["new"] and proof.device_id == site.ids["old"]
    assert proof.licenses == ()
    rep = site.report()
    moves = rep["moves"]
    assert len(moves) == 1  # type: ignore[arg-type]
    assert (f"bacnet-ip=200, trend-log=50 from {site.ids['old']} to {site.ids['new']}"
            in moves[0]["detail"])  # type: ignore[index]
    text = site.run("licserver", "report", "--db", "ledger.db").stdout
    assert "moved (rehost" in text and f"to {site.ids['new']}" in text
    # nothing was created or lost: 200 + 50 still used, by the new server only
    ent = rep["entitlements"][0]["products"][0]["features"]  # type: ignore[index]
    assert {f["feature"]: f["used"] for f in ent} == {"bacnet-ip": 200, "trend-log": 50}
    # run again: every step is done, nothing changes
    again = site.licadmin(*site.rehost())
    assert again.stdout.count("done before") == len(STEPS)
    assert site.holds("new") == {"bacnet-ip": 200, "trend-log": 50}


def _vendor_pub(site: Site):  # type: ignore[no-untyped-def]
    from apps.common import read_public_key

    return read_public_key(str(site.root / "vendor/vendor.pub"))


#: who each step talks to (the peer stopped so that a kill lands right after the step before)
PEER = {"out.req": "old", "out.resp": "ls", "out.receipt": "old", "out.confirmed": "ls",
        "in.req": "new", "in.resp": "ls", "in.receipt": "new", "in.confirmed": "ls"}


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + WAIT
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


def test_rehost_killed_with_sigkill_between_every_two_steps_is_finished_by_rerunning(
        site: Site) -> None:
    work = site.root / "work"
    total = {"bacnet-ip": 200, "trend-log": 50}
    for i, name in enumerate(STEPS[:-1]):
        nxt = STEPS[i + 1]
        stopped = site.procs[PEER[nxt]]
        os.kill(stopped.pid, signal.SIGSTOP)  # the next step's peer: the run blocks there
        try:
            proc = subprocess.Popen([str(BIN / "licadmin"), *site.rehost()], cwd=site.root,
                                    env=site.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            _wait_for(work / name, proc)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=WAIT)
            assert proc.returncode == -signal.SIGKILL
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
        done = [s for s in STEPS if (work / s).exists()]
        assert done == list(STEPS[:i + 1])  # killed between step i+1 and i+2
        old, new = site.holds("old"), site.holds("new")
        assert not (old and new), (name, old, new)  # never on both
        assert old in ({}, total) and new in ({}, total)
        if not old and not new:  # on neither for now: the proof is kept to finish it
            assert (work / "out.receipt").exists()
    p = site.licadmin(*site.rehost())
    assert p.stdout.count("done before") == len(STEPS) - 1
    assert site.holds("old") == {} and site.holds("new") == total
    assert _assigned(site) == {site.ids["new"]: total}
    assert len(site.report()["moves"]) == 1  # type: ignore[arg-type]


def test_rehost_as_file_steps_offline_and_the_new_server_gets_nothing_before_the_proof(
        site: Site) -> None:
    old, new = site.ids["old"], site.ids["new"]
    for d in ("out", "out-resp", "out-rc", "in", "in-resp", "in-rc"):
        (site.root / d).mkdir()
    # at the site: the old server signs the transfer-out request naming the new server
    site.licadmin("request", "--server", site.urls["old"], "reclaim", "--feature", "bacnet-ip",
                  "--transfer-to", new, "--out", f"out/{old}.req")
    # a request for another action may not name a target; nor may the server name itself
    bad = site.licadmin("request", "--server", site.urls["old"], "activate", "--transfer-to",
                        new, "--out", "x.req", check=False)
    assert bad.returncode == 2 and "--transfer-to is for a reclaim, not activate" in bad.stderr
    bad = site.licadmin("request", "--server", site.urls["old"], "reclaim", "--transfer-to",
                        old, "--out", "x.req", check=False)
    assert bad.returncode == 2 and "names this device itself" in bad.stderr
    # at the office: the licensing server answers it (the removal, for the new server)
    site.licadmin("upload", "--requests", "out", "--out-dir", "out-resp", *site.licensing)
    # the new server asks before the proof: nothing is assigned to it yet
    site.licadmin("request", "--server", site.urls["new"], "activate", "--out", f"in/{new}.req")
    early = site.licadmin("upload", "--requests", "in", "--out-dir", "in-resp", *site.licensing,
                          check=False)
    assert early.returncode != 0 and "nothing to activate" in early.stdout + early.stderr
    assert not list((site.root / "in-resp").iterdir())
    # at the site: the old server removes it and signs the proof
    site.licadmin("send", "--server", site.urls["old"], "--responses", "out-resp",
                  "--receipts-out", "out-rc")
    assert site.holds("old") == {"trend-log": 50}
    # at the office: the proof moves the assignment, and only now the new server gets it
    site.licadmin("confirm", "--receipts", "out-rc", *site.licensing)
    again = site.licadmin("confirm", "--receipts", "out-rc", *site.licensing)
    assert "1 already confirmed" in again.stdout  # accepted once: it moves nothing again
    assert _assigned(site) == {old: {"trend-log": 50}, new: {"bacnet-ip": 200}}
    site.licadmin("request", "--server", site.urls["new"], "activate", "--out", f"in/{new}.req")
    site.licadmin("upload", "--requests", "in", "--out-dir", "in-resp", *site.licensing)
    site.licadmin("send", "--server", site.urls["new"], "--responses", "in-resp",
                  "--receipts-out", "in-rc")
    site.licadmin("confirm", "--receipts", "in-rc", *site.licensing)
    assert site.holds("old") == {"trend-log": 50} and site.holds("new") == {"bacnet-ip": 200}
    assert len(site.report()["moves"]) == 1  # type: ignore[arg-type]
    # the old server's transfer-out response is not for the new server
    bad = site.licadmin("apply", "--server", site.urls["new"], f"out-resp/{old}.resp",
                        check=False)
    assert bad.returncode == 5 and "response is for device" in bad.stderr


def test_rehost_refuses_a_work_folder_of_another_rehost_and_the_same_server_twice(
        site: Site) -> None:
    site.licadmin(*site.rehost("--feature", "trend-log"))
    assert site.holds("new") == {"trend-log": 50}
    other = site.licadmin(*site.rehost(), check=False)
    assert other.returncode == 2 and "holds a rehost from" in other.stderr
    same = site.licadmin("rehost", "--from", site.urls["old"], "--to", site.urls["old"],
                         *site.licensing, "--work-dir", "w2", check=False)
    assert same.returncode == 2 and "reach the same server" in same.stderr


def test_rehost_killed_after_the_old_server_applied_but_before_its_receipt_was_saved(
        site: Site) -> None:
    """The kill inside step 3: the old server removed the licenses, the receipt never reached
    the work folder. The rerun sends the response again and gets the same receipt."""
    work = site.root / "work"
    for peer, name in (("ls", "out.req"), ("old", "out.resp")):  # killed up to step 3
        stopped = site.procs[peer]
        os.kill(stopped.pid, signal.SIGSTOP)
        try:
            proc = subprocess.Popen([str(BIN / "licadmin"), *site.rehost()], cwd=site.root,
                                    env=site.env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
            _wait_for(work / name, proc)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=WAIT)
        finally:
            os.kill(stopped.pid, signal.SIGCONT)
    # what the killed run's step 3 did on the server, its answer lost with the process
    site.licadmin("apply", "--server", site.urls["old"], "work/out.resp")
    assert site.holds("old") == {} and site.holds("new") == {}  # on neither, for now
    assert not (work / "out.receipt").exists()
    p = site.licadmin(*site.rehost())
    assert "3/8 out.receipt: the old server removed them" in p.stdout
    assert site.holds("new") == {"bacnet-ip": 200, "trend-log": 50}
    assert _assigned(site) == {site.ids["new"]: {"bacnet-ip": 200, "trend-log": 50}}

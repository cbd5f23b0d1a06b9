"""``licadmin transfer`` (issue 16, docs/protocol.md section 31): a direct transfer between
two live servers in one go, over real ``licagent run`` daemons on loopback TCP.

The old server's ``transfer`` operation removes the licenses and signs the transfer file,
the new server's ``apply-transfer`` installs them and signs its receipt, and the work
folder keeps both for ``licadmin confirm``. Staged for real: the run killed with SIGKILL
between the two steps (the new server stopped with SIGSTOP so that the kill lands there),
answers lost after each server committed (the operation asked again hands the same file
back), a license not issued transferable, and an https:// URL (no route: refused first).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

import hw
from agent.formats import peek_payload
from agent.messages import Transfer, TransferReceipt
from agent.rpc import ApplyArgs, Op, TransferArgs
from tests.admin.test_rehost import BIN, WAIT, Site, _assigned, _wait_for
from tests.admin.test_transfer import FEATURE, three  # noqa: F401  (the fixture)

STEPS = ("out.receipt", "in.receipt")


@pytest.fixture
def live(three: Site) -> Iterator[Site]:  # noqa: F811
    """``three``'s stores (old holds bacnet-ip=20 transferable, trend-log=5 not), each
    served by its own ``licagent run`` on a free loopback port."""
    s = three
    for name in ("old", "new", "other"):
        s.urls[name] = s.start(name, "licagent", "run", "--state", name, "--facts",
                               f"{name}.json", "--listen", "tcp://127.0.0.1:0",
                               ready="listening")
    yield s
    for name in ("old", "new", "other"):
        p = s.procs[name]
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)


def _transfer(s: Site, *features: str, src: str = "old", dst: str = "new",
              work: str = "work") -> list[str]:
    feats = [a for f in (features or (FEATURE,)) for a in ("--feature", f)]
    return ["transfer", "--from", s.urls[src], "--to", s.urls[dst], *feats,
            "--work-dir", work, "--timeout", "20"]


def _holds(s: Site, name: str) -> dict[str, int]:
    return s.holds(name)


def test_transfer_in_one_go_between_two_live_servers_then_confirmed(live: Site) -> None:
    s = live
    old, new = s.ids["old"], s.ids["new"]
    p = s.licadmin(*_transfer(s))
    lines = p.stdout.splitlines()
    assert lines[0].startswith(f"transfer from {old[:12]}… ({s.urls['old']}) to {new[:12]}…")
    assert lines[1] == (f"1/2 out.receipt: the old server removed {FEATURE} and signed the "
                        f"transfer for {new[:12]}…")
    assert lines[2] == (f"2/2 in.receipt: the new server installed {FEATURE}=20 and signed "
                        f"its receipt")
    assert lines[-1].startswith(f"moved {FEATURE}=20 from {old[:12]}… to {new[:12]}… without "
                                f"a vendor trip")
    assert _holds(s, "old") == {"trend-log": 5}
    assert _holds(s, "new") == {FEATURE: 20}
    t, _ = peek_payload((s.root / "work/out.receipt").read_bytes(), Transfer)
    rc, _ = peek_payload((s.root / "work/in.receipt").read_bytes(), TransferReceipt)
    assert (t.device_id, t.transfer_to) == (old, new)
    assert rc.device_id == new and rc.transfer == (s.root / "work/out.receipt").read_bytes()
    # the same command again: both steps done, nothing moves
    again = s.licadmin(*_transfer(s))
    assert again.stdout.count("done before") == len(STEPS)
    assert _holds(s, "new") == {FEATURE: 20} and _holds(s, "old") == {"trend-log": 5}
    # the vendor reconciles the move from the work folder
    c = s.licadmin("confirm", "--receipts", "work", *s.licensing)
    assert "2 confirmed" in c.stdout, c.stdout
    assert _assigned(s) == {old: {"trend-log": 5}, new: {FEATURE: 20}}
    # a license received by transfer moves on only through the vendor: refused, one line
    on = s.licadmin(*_transfer(s, src="new", dst="other", work="work2"), check=False)
    assert on.returncode == 2, on.stdout + on.stderr
    assert on.stderr.strip().splitlines() == [on.stderr.strip()]
    assert "came here by transfer" in on.stderr
    assert _holds(s, "new") == {FEATURE: 20} and _holds(s, "other") == {}


def _signalled_at_the_second_step(s: Site, sig: signal.Signals) -> tuple[int, str]:
    """Run ``licadmin transfer`` with the new server silent (SIGSTOP) and send it ``sig``
    once the first step's file is in the work folder; its exit code and standard error."""
    work = s.root / "work"
    # the plan as a first run writes it (section 31), so that the run below needs the new
    # server only at its second step
    work.mkdir()
    (work / "plan.json").write_text(json.dumps({
        "from": s.urls["old"], "to": s.urls["new"], "from_id": s.ids["old"],
        "to_id": s.ids["new"], "features": [FEATURE]}))
    os.kill(s.procs["new"].pid, signal.SIGSTOP)  # the second step blocks there
    try:
        proc = subprocess.Popen([str(BIN / "licadmin"), *_transfer(s)], cwd=s.root,
                                env=s.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
        _wait_for(work / "out.receipt", proc)
        proc.send_signal(sig)
        _out, err = proc.communicate(timeout=WAIT)
    finally:
        os.kill(s.procs["new"].pid, signal.SIGCONT)
    assert not (work / "in.receipt").exists()
    return proc.returncode, err


def test_transfer_killed_between_the_steps_is_finished_by_rerunning(live: Site) -> None:
    s = live
    code, _err = _signalled_at_the_second_step(s, signal.SIGKILL)
    assert code == -signal.SIGKILL
    # between the steps: off the old server, not yet on the new one, the file in the folder
    assert _holds(s, "old") == {"trend-log": 5}
    assert _holds(s, "new") == {}
    p = s.licadmin(*_transfer(s))
    assert "1/2 out.receipt: done before" in p.stdout
    assert "2/2 in.receipt: the new server installed" in p.stdout
    assert _holds(s, "new") == {FEATURE: 20} and _holds(s, "old") == {"trend-log": 5}


def test_ctrl_c_while_the_new_server_is_silent_says_how_to_finish(live: Site) -> None:
    """The tired technician's Ctrl-C: the new server is silent (SIGSTOP) when a real SIGINT
    reaches licadmin waiting on it; one line naming the work folder, exit 130, the old
    server's half done and kept in the folder, and the same command finishes it."""
    s = live
    code, err = _signalled_at_the_second_step(s, signal.SIGINT)
    assert code == 130, err
    assert err.splitlines() == [
        "licadmin: interrupted: stopped by Ctrl-C (SIGINT); the same command finishes it "
        "(work folder work)"], err
    assert _holds(s, "old") == {"trend-log": 5} and _holds(s, "new") == {}
    p = s.licadmin(*_transfer(s))
    assert "2/2 in.receipt: the new server installed" in p.stdout
    assert _holds(s, "new") == {FEATURE: 20} and _holds(s, "old") == {"trend-log": 5}


def test_answers_lost_after_each_server_committed_are_handed_again(live: Site) -> None:
    """A run killed after a server committed but before the answer reached the folder: the
    operation asked again answers the same file, marked as done before."""
    s = live
    new = s.ids["new"]
    with hw.connect(s.urls["old"]) as c:
        lost = c.typed(Op.TRANSFER, TransferArgs((FEATURE,), new).to_wire())
    assert lost.already is False and _holds(s, "old") == {"trend-log": 5}
    p = s.licadmin(*_transfer(s))
    assert "(it had done so before: the same file)" in p.stdout
    assert (s.root / "work/out.receipt").read_bytes() == lost.file
    assert _holds(s, "new") == {FEATURE: 20}
    # the same for the new server's answer: its receipt handed again, nothing applied twice
    with hw.connect(s.urls["new"]) as c:
        again = c.typed(Op.APPLY_TRANSFER, ApplyArgs(lost.file).to_wire())
    assert again.already_applied is True
    assert again.receipt == (s.root / "work/in.receipt").read_bytes()
    assert _holds(s, "new") == {FEATURE: 20}
    (s.root / "work/in.receipt").unlink()
    p = s.licadmin(*_transfer(s))
    assert "(applied before: the same receipt)" in p.stdout
    assert (s.root / "work/in.receipt").read_bytes() == again.receipt
    # on the command line a second apply stays refused (replay, exit 6)
    cli = s.run("licagent", "apply-transfer", "--state", "new", "--facts", "new.json",
                "work/out.receipt", check=False)
    assert cli.returncode == 6 and "already applied here" in cli.stderr


def test_refusals_are_one_line_and_change_nothing(live: Site) -> None:
    s = live
    before = {n: _holds(s, n) for n in ("old", "new")}
    bad = s.licadmin(*_transfer(s, "trend-log"), check=False)
    assert bad.returncode == 2, bad.stdout + bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "not issued transferable" in bad.stderr
    assert not (s.root / "work/out.receipt").exists()
    # the same folder with other arguments: refused, it names the transfer it holds
    other = s.licadmin(*_transfer(s, FEATURE, "trend-log"), check=False)
    assert other.returncode == 2 and "finish it with those arguments" in other.stderr
    # https:// has no route for the transfer operations: refused before anything is done
    https = ["transfer", "--from", "https://127.0.0.1:9/", "--to", s.urls["new"],
             "--feature", FEATURE, "--work-dir", "w-https"]
    p = s.licadmin(*https, check=False)
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stderr.strip().splitlines() == [
        "licadmin: usage: https://127.0.0.1:9/: https:// does not carry the transfer "
        "operations; reach both servers over tcp://, tls://, mqtt://, a serial line or "
        "usbdrop://, or use licagent transfer and licagent apply-transfer with the file"]
    assert not (s.root / "w-https").exists()
    assert {n: _holds(s, n) for n in ("old", "new")} == before

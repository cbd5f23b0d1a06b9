"""usbdrop://: a real folder in tmp_path as the stick, a real agent behind the polling listener."""

from __future__ import annotations

import errno
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import hw
from agent.durable import FileOps
from agent.errors import UsageError
from agent.formats import read_device_info, verify_receipt
from agent.messages import Action
from agent.ops import AgentOps
from agent.rpc import RemoteError, TransportError
from hw.backends.usbdrop import MARKER, MailboxListener
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device, Site

POLL = 0.05
Start = Callable[..., MailboxListener]


def wait_for(what: str, cond: Callable[[], object], limit: float = 15.0) -> None:
    """Wait until ``cond()`` holds; ``limit`` only bounds a failing test, nothing is timed."""
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.01)


def polls(lst: MailboxListener, n: int = 3) -> None:
    """Let the listener complete ``n`` more full polls."""
    target = lst.polls + n
    wait_for(f"{n} polls", lambda: lst.polls >= target)


def log_text(dev: Path) -> str:
    try:
        return (dev / "log.txt").read_text()
    except FileNotFoundError:
        return ""


def put(path: Path, data: bytes) -> None:
    """Drop a file the way a careful writer does: as NAME.part, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    return tmp_path / "media" / "usb0"


@pytest.fixture
def start(stick: Path) -> Iterator[Start]:
    started: list[MailboxListener] = []

    def _start(device: Device, options: str = "always=1",
               log: list[str] | None = None) -> MailboxListener:
        lst = hw.listen(f"usbdrop://{stick}?poll={POLL}&{options}", AgentOps(device.agent),
                        log=(log if log is not None else []).append)
        lst.start()
        started.append(lst)
        return lst

    yield _start
    for lst in started:
        lst.stop()
    assert not [t for t in threading.enumerate() if t.name.startswith("usbdrop-")]


def dev_dir(stick: Path, device: Device) -> Path:
    return stick / device.agent.status()["device_id"]


def issue(device: Device, req: bytes, **grants: int) -> bytes:
    return device.vendor.issue(req, [Grant(f, c) for f, c in grants.items()], now=device.clock())


# ---------------------------------------------------------------- the mailbox


def test_insertion_writes_verifiable_device_info(start: Start, stick: Path, device: Device) -> None:
    daemon_log: list[str] = []
    lst = start(device, "always=0", daemon_log)
    polls(lst)
    assert not stick.exists()
    stick.mkdir(parents=True)
    (stick / "holiday-photos.jpg").write_bytes(b"not a mailbox")
    polls(lst)
    assert sorted(os.listdir(stick)) == ["holiday-photos.jpg"], "a stick without marker is not used"

    (stick / MARKER).touch()  # "inserted"
    info_file = dev_dir(stick, device) / "device-info.cbor"
    wait_for("device-info.cbor", info_file.exists)
    info = read_device_info(info_file.read_bytes())
    polls(lst, 1)
    assert info.device_id == device.agent.status()["device_id"] == lst.device_id
    for sub in ("responses", "receipts", "applied", "rejected"):
        assert (info_file.parent / sub).is_dir()
    assert "device-info: inserted" in (info_file.parent / "log.txt").read_text()

    # pulled out, wiped at the office, inserted again: everything is written anew
    (stick / MARKER).unlink()
    polls(lst)
    info_file.unlink()
    polls(lst)
    assert not info_file.exists()
    (stick / MARKER).touch()
    wait_for("device-info.cbor after re-insertion", info_file.exists)
    read_device_info(info_file.read_bytes())
    polls(lst, 1)  # the poll that wrote it has finished (and logged)
    assert any("mailbox removed" in line for line in daemon_log)


def test_want_request_to_applied_response_and_receipt(
        start: Start, stick: Path, device: Device) -> None:
    daemon_log: list[str] = []
    lst = start(device, log=daemon_log)
    dev = dev_dir(stick, device)
    wait_for("device folder", (dev / "responses").is_dir)
    put(dev / "want-request.json", json.dumps({"action": "activate",
                                               "features": ["bacnet"]}).encode())
    wait_for("want-request.json.done", (dev / "want-request.json.done").exists)
    reqs = list(dev.glob("request-*.req"))
    assert len(reqs) == 1
    req = reqs[0].read_bytes()
    assert reqs[0].name == f"request-{device.vendor.read_request(req).nonce.hex()[:12]}.req"
    assert device.agent.status()["outstanding_requests"][0]["features"] == ["bacnet"]

    resp = issue(device, req, bacnet=3)
    put(dev / "responses" / "bacnet.resp", resp)
    wait_for("applied/bacnet.resp", (dev / "applied" / "bacnet.resp").exists)
    assert not (dev / "responses" / "bacnet.resp").exists()
    assert (dev / "applied" / "bacnet.resp").read_bytes() == resp
    rc = verify_receipt((dev / "receipts" / "bacnet.receipt").read_bytes(), [device.vendor.public])
    assert rc.sequence == 1 and [lic.feature for lic in rc.licenses] == ["bacnet"]
    assert device.agent.check("bacnet").licensed
    polls(lst, 1)
    log = log_text(dev).splitlines()
    assert any("request: activate bacnet -> request-" in line for line in log)
    assert any("apply bacnet.resp: applied, sequence 1" in line for line in log)
    assert any("apply bacnet.resp" in line for line in daemon_log)
    assert not [p for p in dev.rglob("*") if p.name.startswith(".")], "no temporary left behind"


def test_half_written_files_are_never_applied(start: Start, stick: Path, device: Device) -> None:
    lst = start(device)
    dev = dev_dir(stick, device)
    wait_for("device folder", (dev / "responses").is_dir)
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=3)
    before = device.store_bytes()

    inbox = dev / "responses"
    for name in ("a.resp.part", "b.resp.tmp", ".c.resp", ".d.resp.tmp123"):
        (inbox / name).write_bytes(resp)
    polls(lst)
    assert sorted(os.listdir(inbox)) == [".c.resp", ".d.resp.tmp123", "a.resp.part", "b.resp.tmp"]
    assert device.store_bytes() == before
    assert os.listdir(dev / "applied") == [] and os.listdir(dev / "receipts") == []

    (inbox / "torn.resp").write_bytes(resp[: len(resp) // 2])  # final name, truncated content
    wait_for("rejected/torn.resp", (dev / "rejected" / "torn.resp").exists)
    reason = (dev / "rejected" / "torn.reason.txt").read_text()
    assert "exit class 3 (malformed)" in reason
    assert device.store_bytes() == before
    assert not device.agent.check("bacnet").licensed

    os.replace(inbox / "a.resp.part", inbox / "a.resp")  # the writer finished: now it counts
    wait_for("applied/a.resp", (dev / "applied" / "a.resp").exists)
    assert device.agent.check("bacnet").licensed


def test_other_devices_folders_are_never_touched(
        start: Start, stick: Path, site: Site) -> None:
    mine, other = site.device(), site.device()
    theirs = dev_dir(stick, other)
    resp = issue(other, other.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    put(theirs / "want-request.json", b'{"action": "activate", "features": ["modbus"]}')
    put(theirs / "responses" / "x.resp", resp)
    put(theirs / "rpc" / "abc-000001.req.cbor", b"\xa0")
    put(theirs / "device-info.cbor", b"old")
    before, other_store = snapshot(theirs), other.store_bytes()

    lst = start(mine)
    wait_for("own device-info", (dev_dir(stick, mine) / "device-info.cbor").exists)
    polls(lst, 5)
    assert snapshot(theirs) == before
    assert other.store_bytes() == other_store
    assert sorted(os.listdir(stick)) == sorted([theirs.name, dev_dir(stick, mine).name])


def test_response_for_another_device_is_rejected(
        start: Start, stick: Path, site: Site) -> None:
    mine, other = site.device(), site.device()
    mine.request(Action.ACTIVATE, ["bacnet"])  # an outstanding request of its own
    resp = issue(other, other.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    before = mine.store_bytes()
    lst = start(mine)
    dev = dev_dir(stick, mine)
    wait_for("device folder", (dev / "responses").is_dir)
    put(dev / "responses" / "misfiled.resp", resp)
    wait_for("rejected/misfiled.resp", (dev / "rejected" / "misfiled.resp").exists)
    assert (dev / "rejected" / "misfiled.resp").read_bytes() == resp
    reason = (dev / "rejected" / "misfiled.reason.txt").read_text()
    assert "exit class 5 (wrong-device)" in reason
    assert mine.store_bytes() == before
    assert os.listdir(dev / "receipts") == []
    polls(lst)
    assert "rejected/misfiled.resp" in log_text(dev)


def test_same_response_twice_is_the_idempotent_no_op(
        start: Start, stick: Path, device: Device) -> None:
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=2)
    lst = start(device)
    dev = dev_dir(stick, device)
    put(dev / "responses" / "r.resp", resp)
    wait_for("first apply", (dev / "applied" / "r.resp").exists)
    first = (dev / "receipts" / "r.receipt").read_bytes()
    before = device.store_bytes()

    put(dev / "responses" / "r.resp", resp)  # the operator drops it again
    wait_for("second apply", (dev / "applied" / "r.2.resp").exists)
    assert (dev / "receipts" / "r.2.receipt").read_bytes() == first
    assert (dev / "receipts" / "r.receipt").read_bytes() == first
    assert device.store_bytes() == before
    polls(lst, 1)
    assert "already applied (idempotent no-op)" in log_text(dev)
    assert device.agent.status()["sequence"] == 1


def test_crash_between_receipt_and_move_reapplies_idempotently(
        start: Start, stick: Path, device: Device) -> None:
    # the state a crash leaves: applied to the store, receipt written, response not yet moved
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=2)
    res, _warn = device.agent.apply(resp)
    dev = dev_dir(stick, device)
    put(dev / "receipts" / "r.receipt", res.receipt)
    put(dev / "responses" / "r.resp", resp)
    before = device.store_bytes()
    start(device)
    wait_for("applied/r.resp", (dev / "applied" / "r.resp").exists)
    assert (dev / "receipts" / "r.receipt").read_bytes() == res.receipt
    assert device.store_bytes() == before


class FailingFsync(FileOps):
    """The agent's disk refuses fsync while ``broken`` is set."""

    broken = False

    def fsync(self, fd: int) -> None:
        if self.broken:
            raise OSError(errno.EIO, "Input/output error")
        super().fsync(fd)


def test_store_failure_leaves_the_response_for_the_next_insertion(
        start: Start, stick: Path, site: Site) -> None:
    ops = FailingFsync()
    device = site.device(ops=ops)
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    ops.broken = True
    stick.mkdir(parents=True)
    (stick / MARKER).touch()
    lst = start(device, "always=0")
    dev = dev_dir(stick, device)
    wait_for("device folder", (dev / "responses").is_dir)
    put(dev / "responses" / "r.resp", resp)
    wait_for("set aside", lambda: "set aside" in log_text(dev))
    polls(lst, 5)
    log = log_text(dev)
    assert log.count("apply r.resp") == 1, "tried once, not on every poll"
    assert "exit" not in log.split("apply r.resp")[1] and os.listdir(dev / "rejected") == []
    assert (dev / "responses" / "r.resp").read_bytes() == resp

    ops.broken = False
    (stick / MARKER).unlink()  # the operator pulls the stick and inserts it again
    polls(lst)
    (stick / MARKER).touch()
    wait_for("applied/r.resp", (dev / "applied" / "r.resp").exists)
    assert device.agent.check("bacnet").licensed


def test_bad_want_request_is_set_aside_with_its_reason(
        start: Start, stick: Path, device: Device) -> None:
    start(device)
    dev = dev_dir(stick, device)
    wait_for("device folder", dev.is_dir)
    put(dev / "want-request.json", b'{"action": "steal", "features": []}')
    wait_for("want-request.json.rejected", (dev / "want-request.json.rejected").exists)
    assert "exit class 2 (usage)" in (dev / "want-request.json.reason.txt").read_text()
    assert not list(dev.glob("request-*.req"))
    assert device.agent.status()["outstanding_requests"] == []


# ---------------------------------------------------------------- the RPC transport


def test_rpc_round_trip(start: Start, stick: Path, device: Device) -> None:
    start(device)
    with hw.connect(f"usbdrop://{stick}?timeout=5") as c:
        assert c.status()["sequence"] == 0
        req = c.request("activate", ["bacnet"])
        out = c.apply(issue(device, req, bacnet=3))
        assert out["sequence"] == 1 and not out["already_applied"]
        verify_receipt(out["receipt"], [device.vendor.public])
        assert c.check("bacnet")["licensed"] is True
        assert c.hello_result is not None
        assert c.hello_result["device_id"] == device.agent.status()["device_id"]
        with pytest.raises(RemoteError) as exc:
            c.apply(b"\x00garbage")
        assert exc.value.exit_code == 3
    assert os.listdir(stick / "rpc") == [], "every request and answer file is cleaned up"


def test_rpc_through_a_device_folder(start: Start, stick: Path, site: Site) -> None:
    a, b = site.device(), site.device()
    start(a)
    start(b)
    ida, idb = (d.agent.status()["device_id"] for d in (a, b))
    with hw.connect(f"usbdrop://{stick}?timeout=5&device={idb}") as c:
        assert c.status()["device_id"] == idb
    with hw.connect(f"usbdrop://{stick}?device={ida}&timeout=5&poll=0.01") as c:
        assert c.status()["device_id"] == ida


def test_rpc_without_a_listener_times_out_and_withdraws(stick: Path) -> None:
    stick.mkdir(parents=True)
    with hw.connect(f"usbdrop://{stick}?timeout=0.2&poll=0.02") as c, \
            pytest.raises(TransportError, match="no answer"):
        c.status()
    assert os.listdir(stick / "rpc") == []


def test_connect_to_a_missing_stick_is_a_transport_error(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="is the stick mounted"):
        hw.connect(f"usbdrop://{tmp_path}/nothing-here")


@pytest.mark.parametrize("url, named", [
    ("usbdrop:///media/usb0?bogus=1", "bogus"),
    ("usbdrop:///media/usb0?poll=0", "poll"),
    ("usbdrop:///media/usb0?poll=soon", "poll"),
    ("usbdrop:///media/usb0?timeout=-1", "timeout"),
    ("usbdrop:///media/usb0?always=maybe", "always"),
    ("usbdrop:///media/usb0?device=../x", "device"),
    ("usbdrop://media/usb0", "absolute"),
])
def test_bad_urls_are_refused(url: str, named: str, device: Device) -> None:
    with pytest.raises(UsageError, match=named):
        hw.connect(url)
    with pytest.raises(UsageError, match=named):
        hw.listen(url, AgentOps(device.agent))


def test_listener_device_option_must_name_the_device(stick: Path, device: Device) -> None:
    lst = hw.listen(f"usbdrop://{stick}?always=1&device={'0' * 64}", AgentOps(device.agent))
    with pytest.raises(UsageError, match="not the device served"):
        lst.start()
    lst.stop()

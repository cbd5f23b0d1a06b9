"""serial:// and pty:// over real pseudo-terminals: the agent serves on a pty, clients open it with pyserial."""

from __future__ import annotations

import os
import time
import tty
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cose import canonical
from agent.errors import UsageError
from agent.formats import read_device_info
from agent.ops import AgentOps
from agent.rpc import TransportError
from hw import connect, listen
from hw.backends.serialport import FdLink, PtyListener, SerialListener
from hw.framing import encode_frame
from hw.link import StreamClient
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def wait_for(cond: Callable[[], bool], what: str, limit: int = 1000) -> None:
    """Poll a condition (no timing is asserted; the bound only stops a hung test)."""
    for _ in range(limit):
        if cond():
            return
        time.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture
def served(device: Device) -> Iterator[PtyListener]:
    lst = listen("pty://", AgentOps(device.agent))
    assert isinstance(lst, PtyListener)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()
        assert lst.thread is not None and not lst.thread.is_alive()


def activate(client: StreamClient, device: Device, feature: str = "bacnet") -> dict[str, object]:
    req = client.request("activate", [feature])
    resp = device.vendor.issue(req, [Grant(feature, 3)], now=device.clock())
    return client.apply(resp)


def test_full_activation_through_a_real_pty(served: PtyListener, device: Device) -> None:
    assert served.address.startswith("serial:///dev/pts/")
    assert Path(served.path).is_char_device()
    with connect(served.address) as c:
        assert c.status()["sequence"] == 0
        info = read_device_info(c.info())
        assert info.device_id == device.agent.status()["device_id"]
        out = activate(c, device)
        assert out["sequence"] == 1 and out["already_applied"] is False
        assert c.check("bacnet")["licensed"] is True
        assert [e["event"] for e in c.journal()["entries"]][-1] == "apply"
    assert device.agent.check("bacnet").licensed  # the real store, read directly


def test_clients_come_and_go(served: PtyListener, device: Device) -> None:
    with connect(served.address) as c:
        req = c.request("activate", ["bacnet"])
    # the slave is closed now: the master sees EIO until the next client opens it
    resp = device.vendor.issue(req, [Grant("bacnet", 3)], now=device.clock())
    with connect(served.address) as c:
        assert len(c.status()["outstanding_requests"]) == 1
        assert c.apply(resp)["sequence"] == 1
    for _ in range(3):
        with connect(served.address.replace("serial://", "pty://")) as c:
            assert c.apply(resp)["already_applied"] is True  # idempotent on every session
            assert c.check("bacnet")["licensed"] is True


def test_a_client_dropping_mid_frame_does_not_poison_the_next(served: PtyListener) -> None:
    with connect(served.address) as c:
        c.status()
        c.link.write(encode_frame(canonical({"v": 1, "id": 9, "op": "get-status",
                                             "args": {}}))[:20])
    with connect(f"{served.address}?timeout=0.3&tries=20") as c:
        assert c.status()["sequence"] == 0


@pytest.mark.parametrize("garbage", [
    b"\xff\xfe\x13\x11 noise \r\n\x00",          # ends in a delimiter
    bytes(range(1, 200)),                         # no delimiter: takes the next frame with it
    b"\x00" * 50 + b"\x02\x01\x00\x05ab\x00",     # empty and torn frames
], ids=["delimited", "undelimited", "torn"])
def test_garbage_written_into_the_pty_does_not_harm_the_next_request(
    served: PtyListener, device: Device, garbage: bytes,
) -> None:
    with connect(f"{served.address}?timeout=0.3&tries=20") as c:
        assert c.status()["sequence"] == 0
        before = device.store_bytes()
        c.link.write(garbage)
        assert c.status()["sequence"] == 0
        assert device.store_bytes() == before  # noise changed nothing
        assert activate(c, device)["sequence"] == 1
    wait_for(lambda: served.corrupt_frames >= 1, "the listener to count the noise")


def test_part_of_an_apply_frame_is_never_acted_on(served: PtyListener, device: Device) -> None:
    with connect(f"{served.address}?timeout=0.3&tries=20") as c:
        req = c.request("activate", ["bacnet"])
        resp = device.vendor.issue(req, [Grant("bacnet", 3)], now=device.clock())
        frame = encode_frame(canonical({"v": 1, "id": 4242, "op": "apply-response",
                                        "args": {"file": resp}}))
        for cut in (1, len(frame) // 2, len(frame) - 2):
            c.link.write(frame[:cut] + b"\x00")  # torn by a glitch, then a delimiter
        assert c.status()["sequence"] == 0
        assert c.apply(resp)["sequence"] == 1


def test_baud_defaults_to_115200(served: PtyListener) -> None:
    with connect(served.address) as c:
        assert c.link.serial.baudrate == 115200
        assert c.link.serial.port == served.path
    with connect(f"{served.address}?baud=9600") as c:
        assert c.link.serial.baudrate == 9600
        assert c.status()["sequence"] == 0


@pytest.mark.parametrize(("url", "words"), [
    ("serial:///dev/ttyUSB0?bogus=1", ["bogus", "baud", "timeout", "tries"]),
    ("serial:///dev/ttyUSB0?baud=fast", ["baud", "fast"]),
    ("serial:///dev/ttyUSB0?baud=0", ["baud"]),
    ("serial:///dev/ttyUSB0?tries=0", ["tries"]),
    ("serial:///dev/ttyUSB0?timeout=nan", ["timeout"]),
    ("serial://", ["which port"]),
    ("pty://", ["path"]),
])
def test_bad_client_urls_are_refused_by_name(url: str, words: list[str]) -> None:
    with pytest.raises(UsageError) as err:
        connect(url)
    for w in words:
        assert w in str(err.value)


@pytest.mark.parametrize(("url", "word"), [
    ("serial:///dev/ttyUSB0?timeout=1", "timeout"),  # a client option, not a listener one
    ("serial:///dev/ttyUSB0?reopen=-1", "reopen"),
    ("pty://?baud=9600", "baud"),
    ("pty:///dev/pts/3", "no path"),
])
def test_bad_listener_urls_are_refused_by_name(url: str, word: str) -> None:
    with pytest.raises(UsageError, match=word):
        listen(url, lambda _op, _args: None)


def test_a_missing_port_is_a_transport_error_naming_it(tmp_path: Path, device: Device) -> None:
    missing = tmp_path / "ttyUSB9"
    with pytest.raises(TransportError, match="ttyUSB9"):
        connect(f"serial://{missing}")
    lst = listen(f"serial://{missing}", AgentOps(device.agent))
    with pytest.raises(TransportError, match="cannot open serial port"):
        lst.start()
    lst.stop()


class Plug:
    """A "USB CDC" port at a stable path (like /dev/serial/by-id/...): a pty behind a symlink.

    The test holds the master (the host's end of the cable) and one slave descriptor, so the
    port exists and reads as a live line until it is unplugged.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.master = -1
        self.slave = -1

    def plug(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        tmp = self.path.with_suffix(".new")
        tmp.symlink_to(os.ttyname(self.slave))
        tmp.replace(self.path)

    def unplug(self) -> None:
        os.close(self.master)
        os.close(self.slave)
        self.path.unlink()

    def client(self) -> StreamClient:
        return StreamClient(FdLink(self.master), timeout=0.5, tries=10)


def test_serial_listener_reopens_a_replugged_port(tmp_path: Path, device: Device) -> None:
    baseline = open_fds()
    port = Plug(tmp_path / "ttyACM0")
    port.plug()
    lst = listen(f"serial://{port.path}?reopen=0.02", AgentOps(device.agent))
    assert isinstance(lst, SerialListener)
    lst.start()
    try:
        assert lst.opened == 1
        c = port.client()
        assert activate(c, device)["sequence"] == 1
        port.unplug()
        with pytest.raises(TransportError):
            c.status()
        port.plug()  # back, at the same path (most likely another /dev/pts/N behind it)
        wait_for(lambda: lst.opened == 2, "the listener to reopen the port")
        c = port.client()
        assert c.status()["sequence"] == 1
        assert c.check("bacnet")["licensed"] is True
    finally:
        lst.stop()
        port.unplug()
    assert lst.thread is not None and not lst.thread.is_alive()
    assert open_fds() <= baseline  # the listener closed every port it opened


def test_pty_listener_leaves_nothing_open(device: Device) -> None:
    baseline = open_fds()
    lst = listen("pty://", AgentOps(device.agent))
    lst.start()
    with connect(lst.address) as c:
        c.status()
    lst.stop()
    assert open_fds() <= baseline

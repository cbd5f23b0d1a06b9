"""Issue 13 item 1: nothing on a stick makes the daemon read or write outside its own device folder.

Every attack is staged for real in the stick's folder before or while a real listener
polls it, with a real agent behind it: symbolic links (the device folder, ``log.txt``,
``receipts/``, ``applied/``, ``rejected/``, ``rpc/``, ``device-info.cbor``) pointing at
the agent's own state directory or another folder, FIFOs, a device node made with
mknod, a tmpfs mounted inside the stick, hard links, and file names holding a newline
or bytes that are not UTF-8. Each is refused with one line (said once, not per poll),
nothing outside the device folder changes, the agent's store is untouched, and what
is not hostile on the same stick keeps working.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.messages import Action
from hw.backends.usbdrop import MARKER, MailboxListener
from tests.conftest import Device, Site
from tests.hw.test_usbdrop import POLL, Start, issue, log_text, polls, put, wait_for

pytestmark = pytest.mark.usefixtures("no_thread_outlives_its_test")


def tree(root: Path) -> dict[str, tuple[int, bytes | str | None]]:
    """Every entry under ``root`` (links not followed) with its type and bytes or target."""
    out: dict[str, tuple[int, bytes | str | None]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = p.lstat()
            body: bytes | str | None = None
            if stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(p)
            out[str(p.relative_to(root))] = (stat.S_IFMT(st.st_mode), body)
    return out


@pytest.fixture
def stick(tmp_path: Path) -> Path:
    s = tmp_path / "media" / "usb0"
    s.mkdir(parents=True)
    (s / MARKER).touch()
    return s


@pytest.fixture
def start(stick: Path) -> Iterator[Start]:
    """A started listener on ``stick`` (the marker decides, as on a real stick)."""
    from hw import listen

    started: list[MailboxListener] = []

    def _start(device: Device, options: str = "always=0",
               log: list[str] | None = None) -> MailboxListener:
        lst = listen(f"usbdrop://{stick}?poll={POLL}&{options}", _ops(device),
                     log=(log if log is not None else []).append)
        assert isinstance(lst, MailboxListener)
        lst.start()
        started.append(lst)
        return lst

    yield _start
    for lst in started:
        lst.stop()


def _ops(device: Device) -> Callable[..., object]:
    from agent.ops import AgentOps

    return AgentOps(device.agent)


def device_id(device: Device) -> str:
    return str(device.agent.status()["device_id"])


def outside(tmp_path: Path) -> Path:
    """A folder off the stick holding a file the daemon must never touch."""
    o = tmp_path / "elsewhere"
    o.mkdir(exist_ok=True)
    (o / "precious.txt").write_bytes(b"not the stick's to change\n")
    return o


def refusals(log: list[str], what: str) -> list[str]:
    return [line for line in log if what in line and "refused" in line]


# ---------------------------------------------------------------- symlinks


def test_a_symlinked_device_folder_into_the_agents_own_store_is_refused(
        start: Start, stick: Path, device: Device) -> None:
    """The attack the issue names: the device folder is a link to the daemon's own state
    directory, so device-info, log.txt and receipts would land in (and over) its journal."""
    did = device_id(device)
    os.symlink(device.directory, stick / did)
    store_before = tree(device.directory)
    log: list[str] = []
    lst = start(device, log=log)
    polls(lst, 5)
    assert tree(device.directory) == store_before, "not one byte written into the store"
    lines = refusals(log, did)
    assert lines == [f"usbdrop {stick}: {did} is a symbolic link, expected a directory; refused "
                     f"(nothing read or written through it)"], log
    assert sorted(os.listdir(stick)) == sorted([MARKER, did]), "nothing else made on the stick"

    # the operator replaces the link with a real folder: the mailbox works again
    (stick / did).unlink()
    wait_for("device-info.cbor", (stick / did / "device-info.cbor").exists)


@pytest.mark.parametrize("name", ["log.txt", "device-info.cbor"])
def test_a_symlinked_file_in_the_device_folder_is_refused(
        start: Start, stick: Path, device: Device, name: str) -> None:
    did = device_id(device)
    dev = stick / did
    dev.mkdir()
    journal = device.directory / "journal.log"
    os.symlink(journal, dev / name)
    store_before = tree(device.directory)
    log: list[str] = []
    lst = start(device, log=log)
    polls(lst, 5)
    assert tree(device.directory) == store_before
    assert refusals(log, f"{did}/{name} is a symbolic link, expected ") and len(
        refusals(log, name)) == 1, log
    assert os.path.islink(dev / name), "the link is left as it is, not followed"


@pytest.mark.parametrize("sub", ["receipts", "applied", "rejected", "responses"])
def test_a_symlinked_subfolder_is_refused_and_nothing_is_applied(
        start: Start, stick: Path, tmp_path: Path, device: Device, sub: str) -> None:
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    did = device_id(device)
    dev = stick / did
    dev.mkdir()
    elsewhere = outside(tmp_path)
    if sub == "responses":
        put(elsewhere / "r.resp", resp)  # a response placed where the link leads
    else:
        put(dev / "responses" / "r.resp", resp)
    os.symlink(elsewhere, dev / sub)
    before, store_before = tree(elsewhere), device.store_bytes()
    log: list[str] = []
    lst = start(device, log=log)
    polls(lst, 5)
    assert tree(elsewhere) == before, "nothing read, moved or written through the link"
    assert device.store_bytes() == store_before, "the response was not applied"
    assert len(refusals(log, f"{did}/{sub} is a symbolic link, expected a directory")) == 1, log


def test_a_symlinked_subfolder_after_insertion_leaves_the_store_untouched(
        start: Start, stick: Path, tmp_path: Path, device: Device) -> None:
    """Planted while the stick is in: the folders are checked before the agent is asked."""
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    log: list[str] = []
    lst = start(device, log=log)
    dev = stick / device_id(device)
    wait_for("device folder", (dev / "receipts").is_dir)
    polls(lst, 2)  # the insertion's poll is over: what it held open is closed
    elsewhere = outside(tmp_path)
    os.rmdir(dev / "receipts")
    os.symlink(elsewhere, dev / "receipts")
    before, store_before = tree(elsewhere), device.store_bytes()
    put(dev / "responses" / "r.resp", resp)
    polls(lst, 5)
    assert tree(elsewhere) == before
    assert device.store_bytes() == store_before
    assert (dev / "responses" / "r.resp").read_bytes() == resp, "left for a safe stick"
    assert len(refusals(log, "receipts is a symbolic link")) == 1


@pytest.mark.parametrize("where", ["root", "device"])
def test_a_symlinked_rpc_folder_is_never_served_and_the_rest_still_works(
        start: Start, stick: Path, tmp_path: Path, device: Device, where: str) -> None:
    did = device_id(device)
    elsewhere = outside(tmp_path)
    (elsewhere / "abc-000001.req.cbor").write_bytes(b"\xa0")
    parent = stick if where == "root" else stick / did
    parent.mkdir(exist_ok=True)
    os.symlink(elsewhere, parent / "rpc")
    before = tree(elsewhere)
    log: list[str] = []
    lst = start(device, log=log)
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    put(stick / did / "responses" / "r.resp", resp)
    wait_for("applied/r.resp", (stick / did / "applied" / "r.resp").exists)
    polls(lst, 3)
    assert tree(elsewhere) == before, "the request there was not claimed, read or answered"
    label = "rpc" if where == "root" else f"{did}/rpc"
    assert refusals(log, f": {label} is a symbolic link, expected a directory") == [
        f"usbdrop {stick}: {label} is a symbolic link, expected a directory; refused "
        f"(nothing read or written through it)"]
    assert device.agent.check("bacnet").licensed


def test_a_symlinked_response_is_left_alone_with_one_line(
        start: Start, stick: Path, tmp_path: Path, site: Site) -> None:
    """A link to a response in another device's folder is not read: a stick shared by
    two devices cannot feed one the other's files."""
    mine = site.device()
    did = device_id(mine)
    resp = issue(mine, mine.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    elsewhere = outside(tmp_path)
    put(elsewhere / "r.resp", resp)
    (stick / did / "responses").mkdir(parents=True)
    os.symlink(elsewhere / "r.resp", stick / did / "responses" / "r.resp")
    store_before = mine.store_bytes()
    log: list[str] = []
    lst = start(mine, log=log)
    polls(lst, 5)
    assert mine.store_bytes() == store_before
    line = (f"{did}/responses/r.resp is a symbolic link, expected a regular file; refused "
            f"(nothing read or written through it)")
    assert log_text(stick / did).count(line) == 1
    assert os.path.islink(stick / did / "responses" / "r.resp")


# ---------------------------------------------------------------- FIFOs and device nodes


def special(kind: str, path: Path) -> None:
    if kind == "fifo":
        os.mkfifo(path, 0o644)
    else:  # a character device node: /dev/zero's numbers (endless bytes if read)
        os.mknod(path, 0o644 | stat.S_IFCHR, os.makedev(1, 5))


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.parametrize("kind", ["fifo", "device-node"])
@pytest.mark.parametrize("name", ["responses/x.resp", "want-request.json"])
def test_a_fifo_or_device_node_is_never_opened_and_polling_goes_on(
        start: Start, stick: Path, device: Device, kind: str, name: str) -> None:
    did = device_id(device)
    dev = stick / did
    (dev / "responses").mkdir(parents=True)
    special(kind, dev / name)
    log: list[str] = []
    lst = start(device, log=log)
    resp = issue(device, device.request(Action.ACTIVATE, ["bacnet"]), bacnet=1)
    put(dev / "responses" / "y.resp", resp)  # a good response beside it is applied
    wait_for("applied/y.resp", (dev / "applied" / "y.resp").exists)
    polls(lst, 3)
    what = "a FIFO (named pipe)" if kind == "fifo" else "a character device node"
    line = f"{did}/{name} is {what}, expected a regular file; refused"
    assert log_text(dev).count(line) == 1, log_text(dev)
    assert len(refusals(log, line)) == 1
    assert stat.S_IFMT((dev / name).lstat().st_mode) in (stat.S_IFIFO, stat.S_IFCHR)


def test_a_refusal_is_said_once_while_it_lasts_and_again_when_it_comes_back(
        start: Start, stick: Path, device: Device) -> None:
    did = device_id(device)
    dev = stick / did
    log: list[str] = []
    lst = start(device, "always=1", log)
    wait_for("device folder", (dev / "responses").is_dir)
    line = f"{did}/responses/p.resp is a FIFO (named pipe), expected a regular file; refused"
    os.mkfifo(dev / "responses" / "p.resp")
    polls(lst, 5)
    assert len(refusals(log, line)) == 1
    os.unlink(dev / "responses" / "p.resp")
    polls(lst, 2)
    os.mkfifo(dev / "responses" / "p.resp")
    polls(lst, 5)
    assert len(refusals(log, line)) == 2
    assert log_text(dev).count(line) == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
@pytest.mark.parametrize("kind", ["fifo", "device-node"])
def test_log_txt_as_a_fifo_or_device_node_stops_the_folder(
        start: Start, stick: Path, device: Device, kind: str) -> None:
    did = device_id(device)
    dev = stick / did
    dev.mkdir()
    special(kind, dev / "log.txt")
    store_before = tree(device.directory)
    log: list[str] = []
    lst = start(device, log=log)
    polls(lst, 5)
    assert len(refusals(log, f"{did}/log.txt is a ")) == 1, log
    assert os.listdir(dev) == ["log.txt"], "nothing written into a folder with a hostile log"
    assert tree(device.directory) == store_before


def test_a_hard_linked_log_txt_is_refused(start: Start, stick: Path, site: Site) -> None:
    """A hard link from this device's log.txt to another device's would append there."""
    mine, other = site.device(), site.device()
    theirs = stick / device_id(other)
    theirs.mkdir()
    (theirs / "log.txt").write_text("their log\n")
    (stick / device_id(mine)).mkdir()
    os.link(theirs / "log.txt", stick / device_id(mine) / "log.txt")
    log: list[str] = []
    lst = start(mine, log=log)
    polls(lst, 5)
    assert (theirs / "log.txt").read_text() == "their log\n"
    assert len(refusals(log, "log.txt is a regular file with 2 hard links, expected a file "
                             "of its own")) == 1, log


# ---------------------------------------------------------------- another filesystem


@pytest.fixture
def tmpfs() -> Iterator[Callable[[Path], None]]:
    """Mount a real tmpfs at a folder (unmounted at the end of the test)."""
    mounted: list[Path] = []

    def _mount(at: Path) -> None:
        at.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(at)],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(at)

    yield _mount
    for at in reversed(mounted):
        subprocess.run(["umount", "-l", str(at)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
@pytest.mark.parametrize("where", ["", "receipts", "responses", "rpc"])
def test_a_folder_on_another_filesystem_is_refused(
        start: Start, stick: Path, device: Device, tmpfs: Callable[[Path], None],
        where: str) -> None:
    did = device_id(device)
    at = stick / did / where if where else stick / did
    tmpfs(at)
    (at / "planted.txt").write_text("on the other filesystem\n")
    before = tree(at)
    store_before = device.store_bytes()
    log: list[str] = []
    lst = start(device, log=log)
    polls(lst, 5)
    label = f"{did}/{where}" if where else did
    assert refusals(log, f"{label} is a directory on another filesystem (a mount point), "
                         f"expected a directory on the same filesystem; refused") == [
        f"usbdrop {stick}: {label} is a directory on another filesystem (a mount point), "
        f"expected a directory on the same filesystem; refused (nothing read or written "
        f"through it)"], log
    assert tree(at) == before
    assert device.store_bytes() == store_before


# ---------------------------------------------------------------- names


FORGED = "2027-01-15T08:00:00Z apply real.resp: applied, sequence 9 (a name holds no slash)"


def test_a_newline_in_a_file_name_cannot_forge_a_log_line(
        start: Start, stick: Path, device: Device) -> None:
    did = device_id(device)
    dev = stick / did
    log: list[str] = []
    lst = start(device, log=log)
    wait_for("device folder", (dev / "responses").is_dir)
    evil = f"x\n{FORGED}\nz.resp"
    put(dev / "responses" / evil, b"not a response")
    wait_for(f"rejected ({log})", lambda: any(n.endswith(".reason.txt")
                                              for n in os.listdir(dev / "rejected")))
    polls(lst, 1)
    lines = log_text(dev).splitlines()
    assert FORGED not in lines, "no line of the log is the forged one"
    assert all(line[:4].isdigit() for line in lines), lines
    escaped = "x\\x0a" + FORGED + "\\x0az.resp"
    assert any(line.endswith(f"apply {escaped}: rejected/{escaped}: {escaped}: refused, exit "
                             f"class 3 (malformed): " + line.split("(malformed): ", 1)[-1])
               for line in lines), lines
    reason = next(p for p in (dev / "rejected").iterdir() if p.name.endswith(".reason.txt"))
    assert reason.read_text().count("\n") == 1, "the reason file is one line too"


def test_a_name_that_is_not_utf8_is_escaped_not_a_crash(
        start: Start, stick: Path, device: Device) -> None:
    did = device_id(device)
    dev = stick / did
    log: list[str] = []
    lst = start(device, log=log)
    wait_for("device folder", (dev / "responses").is_dir)
    raw = os.fsencode(dev / "responses") + b"/bad\xff\xfename.resp"
    with open(raw, "wb") as f:
        f.write(b"garbage")
    wait_for("rejected", lambda: len(os.listdir(dev / "rejected")) == 2)
    polls(lst, 1)
    assert "apply bad\\xff\\xfename.resp: rejected/" in log_text(dev)
    assert not [line for line in log if "internal error" in line], log


# ---------------------------------------------------------------- the client side


@pytest.mark.parametrize("device_option", [False, True])
def test_the_client_does_not_write_through_a_link_on_the_stick(
        stick: Path, tmp_path: Path, device: Device, device_option: bool) -> None:
    from agent.rpc import TransportError
    from hw import connect

    did = device_id(device)
    elsewhere = outside(tmp_path)
    parent = stick / did if device_option else stick
    parent.mkdir(exist_ok=True)
    os.symlink(elsewhere, parent / "rpc")
    before = tree(elsewhere)
    url = f"usbdrop://{stick}?timeout=1" + (f"&device={did}" if device_option else "")
    label = f"{did}/rpc" if device_option else "rpc"
    with pytest.raises(TransportError, match=f"{label} is a symbolic link, expected a directory"):
        connect(url)
    assert tree(elsewhere) == before

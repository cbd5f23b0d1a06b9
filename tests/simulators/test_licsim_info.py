"""licsim hands out a server's signed device information again while nothing it was made from
changed (simulators/fleet/server.py, issue 17 item 5 / issue 18 item 5: the cost of a gather).

Real stores in a temporary folder, the server's own handler; every answer is verified
as licadmin verifies it (agent.formats.read_device_info) and compared with the store's
state as a fresh open reads it.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from pathlib import Path

import pytest

from agent.cose import SigningKey
from agent.errors import LicensingError
from agent.formats import read_device_info
from agent.messages import Action
from agent.rpc import InfoResult
from agent.store import SLOTS
from simulators.fleet import server as server_mod
from simulators.fleet.models import make_facts, replacement_mac
from simulators.fleet.server import ServerHandler, SimServer
from simulators.licensing_server.vendor import Grant, Vendor


@pytest.fixture
def vendor() -> Vendor:
    return Vendor(SigningKey.generate())


@pytest.fixture
def handler(tmp_path: Path, vendor: Vendor) -> ServerHandler:
    facts = make_facts("AS-P", 3, 1)
    srv = SimServer("as-p-0001", "AS-P", tmp_path / "as-p-0001", facts, ("mqtt",))
    st = srv.agent().init("AS-P", facts.serial, [vendor.public]).state
    srv.device_id = st.device_id
    return ServerHandler(srv, Counter())


def info(h: ServerHandler) -> bytes:
    res = h("get-info", {})
    assert isinstance(res, InfoResult)
    read_device_info(res.file)  # verifies, as licadmin does
    return res.file


def fresh(h: ServerHandler) -> tuple[int, bytes]:
    """(sequence, state digest) as a fresh open of the store reads them."""
    st = h.server.agent().state()[0]
    return st.sequence, st.digest


def test_unchanged_store_gets_the_same_signed_file_and_it_verifies(handler: ServerHandler
                                                                    ) -> None:
    first = info(handler)
    assert info(handler) == first  # the kept one: the same bytes, signature and all
    d = read_device_info(first)
    assert (d.sequence, d.state_digest) == fresh(handler)
    assert handler.counts["get-info"] == 2


def test_a_change_to_the_store_is_signed_afresh(handler: ServerHandler, vendor: Vendor) -> None:
    before = info(handler)
    agent = handler.server.agent()
    resp = vendor.issue(agent.request(Action.ACTIVATE, ["bacnet-ip"]),
                        [Grant("bacnet-ip", 3)], now=handler.server.now())
    agent.apply(resp)  # not through the handler: the files tell
    after = info(handler)
    assert after != before
    d = read_device_info(after)
    assert (d.sequence, d.state_digest) == fresh(handler)
    assert [(x.feature, x.count) for x in d.licenses] == [("bacnet-ip", 3)]


def test_a_slot_damaged_in_place_is_never_answered_from_the_kept_file(
        handler: ServerHandler) -> None:
    info(handler)
    state = handler.server.state_dir
    for name in SLOTS:
        p = state / name
        if p.exists():
            data = bytearray(p.read_bytes())
            data[len(data) // 2] ^= 0x01  # same size, same inode
            with open(p, "r+b") as f:
                f.write(data)
    # the store is opened again: it recovers from the other copy or refuses, as it would
    # with no file kept at all; either way it is what a fresh open says
    try:
        again = info(handler)
    except LicensingError:
        assert handler.server.signed_info is None
        return
    d = read_device_info(again)
    assert (d.sequence, d.state_digest) == fresh(handler)


def test_other_hardware_facts_or_clock_sign_afresh(handler: ServerHandler) -> None:
    info(handler)
    srv = handler.server
    kept = srv.signed_info
    assert kept is not None
    srv.facts = replacement_mac(srv.facts, random.Random(5))  # a new network card
    new = read_device_info(info(handler))
    assert new.hardware["macs"] == list(srv.facts.macs)
    assert srv.signed_info is not kept  # (the store recorded the change: nothing kept yet)
    info(handler)
    kept = srv.signed_info
    assert kept is not None and kept.facts is srv.facts
    srv.facts = make_facts("AS-P", 3, 1)  # the first card back
    assert read_device_info(info(handler)).hardware["macs"] == list(srv.facts.macs)
    assert srv.signed_info is not kept
    now = info(handler)
    srv.clock_offset = -3600  # the clock went back an hour
    back = info(handler)
    assert read_device_info(back).created < read_device_info(now).created


def test_a_kept_file_is_handed_out_for_a_bounded_time(handler: ServerHandler,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    info(handler)
    kept = handler.server.signed_info
    info(handler)
    assert handler.server.signed_info is kept
    monkeypatch.setattr(server_mod, "INFO_REUSE", 0)  # every kept file is too old now
    info(handler)
    assert handler.server.signed_info is not None and handler.server.signed_info is not kept


def test_the_digest_covers_every_state_file(handler: ServerHandler) -> None:
    state = handler.server.state_dir
    d0 = server_mod.state_digest(str(state))
    assert d0 is not None
    for name in ("device.key", *SLOTS, "journal.log"):
        p = state / name
        if not p.exists():
            continue
        data = p.read_bytes()
        p.write_bytes(data + b"\0")
        assert server_mod.state_digest(str(state)) != d0, name
        p.write_bytes(data)
        assert server_mod.state_digest(str(state)) == d0, name
        p.chmod(0o620)  # group-writable: opening the store refuses it
        assert server_mod.state_digest(str(state)) != d0, name
        p.chmod(0o600)
        assert server_mod.state_digest(str(state)) == d0, name
    (state / "journal.log").unlink(missing_ok=True)
    (state / "journal.log").symlink_to(state / SLOTS[0])
    assert server_mod.state_digest(str(state)) is None  # a symbolic link: never followed
    (state / "journal.log").unlink()
    os.mkfifo(state / "journal.log", 0o600)
    assert server_mod.state_digest(str(state)) is None  # a FIFO: never opened


@pytest.mark.parametrize("harm", ["other bytes", "damaged", "gone", "symlink"])
def test_a_kept_file_changed_on_the_server_s_disk_is_signed_afresh(
        handler: ServerHandler, tmp_path: Path, harm: str) -> None:
    """The kept device information lives in the server's folder (only its length and hash
    in memory): a file replaced, damaged, removed or turned into a symbolic link there is
    never handed out; the server signs afresh and keeps the new one."""
    first = info(handler)
    srv = handler.server
    kept = srv.signed_info
    assert kept is not None
    path = Path(srv.directory) / server_mod.INFO_FILE
    assert path.read_bytes() == first
    other = tmp_path / "other.cbor"
    other.write_bytes(first[:-1] + bytes([first[-1] ^ 1]))
    if harm == "other bytes":
        path.write_bytes(first + b"\0")
    elif harm == "damaged":
        path.write_bytes(other.read_bytes())
    elif harm == "gone":
        path.unlink()
    else:
        path.unlink()
        path.symlink_to(other)
    again = info(handler)
    assert again != other.read_bytes()
    read_device_info(again)  # a genuine signed file
    assert srv.signed_info is not None and srv.signed_info is not kept
    assert not path.is_symlink() and path.read_bytes() == again
    assert info(handler) == again  # kept again

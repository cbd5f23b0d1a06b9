"""The journal read record by record: a torn tail at any byte, a damaged length, appends that repair."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.durable import FileOps
from agent.errors import IntegrityError
from agent.journal import Journal
from tests.conftest import Device

KEY = bytes(range(32))


def make(path: Path, n: int) -> Journal:
    j = Journal(path, KEY, FileOps())
    for i in range(n):
        j.append("apply", {"sequence": i, "pad": "x" * (i % 7)}, now=1_800_000_000 + i)
    return j


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), cut=st.integers(0, 10_000))
def test_a_torn_tail_at_any_byte_is_cut_off_by_the_next_append(tmp_path_factory: pytest.TempPathFactory,
                                                                n: int, cut: int) -> None:
    path = tmp_path_factory.mktemp("j") / "journal.log"
    j = make(path, n)
    whole = path.read_bytes()
    full = j.read()
    cut = cut % (len(whole) + 1)
    path.write_bytes(whole[:cut])
    rep = j.read()
    # every record wholly before the cut survives, nothing else
    assert rep.good_length <= cut and rep.good_length + rep.torn_tail == cut
    assert rep.entries == full.entries[:len(rep.entries)]
    tail = j._scan()
    assert (tail.count, tail.good_length, tail.torn) == (len(rep.entries), rep.good_length,
                                                         rep.torn_tail)
    assert tail.prev == (rep.entries[-1].digest if rep.entries else bytes(32))
    entry = j.append("check", {}, now=1_900_000_000)
    after = j.read()
    assert after.torn_tail == 0 and after.entries[-1] == entry
    assert entry.n == len(rep.entries)


def test_a_length_running_past_the_end_of_a_whole_record_is_tampering(tmp_path: Path) -> None:
    path = tmp_path / "journal.log"
    j = make(path, 3)
    data = bytearray(path.read_bytes())
    first = int.from_bytes(data[:4], "big")
    data[:4] = (first + len(data)).to_bytes(4, "big")  # a complete record behind a longer length
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="damaged length"):
        j.read()
    with pytest.raises(IntegrityError):
        j.append("apply", {}, now=1)  # never behind a tampered record


def test_refusals_are_journalled_at_most_so_many_an_hour(tmp_path: Path) -> None:
    """A peer sending garbage cannot grow the journal without bound: past the limit one
    marker says so, and the next hour journals refusals again."""
    j = make(tmp_path / "journal.log", 1)
    t = 1_800_000_000
    written = [j.append_refusal({"what": "apply", "reason": "malformed"}, t + i, limit=5)
               for i in range(12)]
    assert [w is not None for w in written] == [True] * 6 + [False] * 6
    events = [e.event for e in j.read().entries]
    assert events == ["apply"] + ["refused"] * 5 + ["refusals-suppressed"]
    assert j.read().entries[-1].data == {"limit": 5, "window_seconds": 3600}
    # a clock set back does not reopen the window
    assert j.append_refusal({"what": "apply"}, t - 10_000, limit=5) is None
    # an hour after the last refusals, they are journalled again
    assert j.append_refusal({"what": "apply"}, t + 11 + 3601, limit=5) is not None
    assert j.read().entries[-1].event == "refused"
    # other events are never held back
    assert j.append("apply", {"sequence": 2}, now=t + 3700).event == "apply"


def test_read_journal_over_a_link_leaves_the_replay_files_out(device: Device) -> None:
    """``apply`` records carry their response for replay; a link's read-journal names its
    size instead, so a long journal stays within one frame (80 KiB) over a real socket."""
    import json
    import os
    import subprocess
    import sys

    import hw
    from agent.store import Store
    from hw.framing import DEFAULT_MAX_FRAME

    for i in range(150):
        device.activate(**{f"f{i}": 1})
    jpath = device.directory / "journal.log"
    assert jpath.stat().st_size > DEFAULT_MAX_FRAME  # responses included, it would not fit
    full = Store.open(device.directory, None).journal.read().entries
    applies = [e for e in full if e.event == "apply"]
    assert all(isinstance(e.data["response"], bytes) for e in applies)

    facts = device.directory.parent / "facts.json"
    facts.write_text(json.dumps(device.facts.read().as_dict()))
    env = {**os.environ, "LICAGENT_TIME": str(device.clock()),
           "LICAGENT_FACTS": str(facts)}
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "apps.licagent.cli", "run", "--state",
                             str(device.directory), "--listen", "tcp://127.0.0.1:0"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().decode().split(" ", 1)[1].strip()
        with hw.connect(address) as c:
            got = c.journal()["entries"]
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert [e["n"] for e in got] == [e.n for e in full]
    shown = [e["data"] for e in got if e["event"] == "apply"]
    assert [d["response"] for d in shown] == [f"<{len(e.data['response'])} bytes>"
                                              for e in applies]
    assert [d["state_digest"] for d in shown] == [e.data["state_digest"] for e in applies]


# ---------------------------------------------------------------- issue 17, item 4


def _records(data: bytes) -> list[tuple[int, bytes]]:
    out, off = [], 0
    while off < len(data):
        n = int.from_bytes(data[off:off + 4], "big")
        out.append((off, data[off + 4:off + 4 + n]))
        off += 4 + n
    return out


def test_verify_without_entries_counts_what_read_verifies(tmp_path: Path) -> None:
    j = make(tmp_path / "j.log", 300)  # record numbers past 23 and 255 (longer heads)
    full = j.read()
    bare = j.read(entries=False)
    assert bare.entries == () and bare.records == full.records == len(full.entries) == 300
    assert (bare.torn_tail, bare.good_length) == (full.torn_tail, full.good_length)


def test_mac_taken_in_place_is_no_weaker_than_re_encoding(tmp_path: Path) -> None:
    """The MAC is checked on the record's bytes less its mac entry (no re-encoding); every
    byte of a record changed is still refused, and a record whose fields are written in
    another order (not as the agent writes it) is still judged by re-encoding its body."""
    import cbor2

    from agent.cose import strict_loads

    path = tmp_path / "j.log"
    j = make(path, 30)
    data = path.read_bytes()
    off, raw = _records(data)[-1]
    for i in range(len(raw)):
        bad = bytearray(data)
        bad[off + 4 + i] ^= 0x01
        path.write_bytes(bytes(bad))
        with pytest.raises(IntegrityError):
            Journal(path, j.mac_key, FileOps()).read(entries=False)
            pytest.fail(f"byte {i} of the last record changed and not noticed")
    # the same fields, the mac entry last (not canonical): the in-place check declines,
    # re-encoding the body accepts it, as before
    e = strict_loads(raw, max_size=1 << 20)
    mac = e.pop("mac")
    odd = cbor2.dumps({**e, "mac": mac})
    assert odd != raw
    path.write_bytes(data[:off] + len(odd).to_bytes(4, "big") + odd)
    assert Journal(path, j.mac_key, FileOps()).read().records == 30
    # and with a MAC that does not hold it is refused
    odd = cbor2.dumps({**e, "mac": bytes(32)})
    path.write_bytes(data[:off] + len(odd).to_bytes(4, "big") + odd)
    with pytest.raises(IntegrityError, match="fails its MAC"):
        Journal(path, j.mac_key, FileOps()).read()


@settings(max_examples=200, deadline=None)
@given(n=st.integers(min_value=0, max_value=2**40),
       data=st.recursive(st.none() | st.integers() | st.binary(max_size=300) | st.text(max_size=40),
                         lambda kids: st.lists(kids, max_size=4)
                         | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=12),
       event=st.sampled_from(["apply", "request", "clock", "refused", "x" * 30]))
def test_a_record_sealed_with_its_body_encoded_once_is_the_canonical_record(
        n: int, data: object, event: str) -> None:
    """Issue 17: the MAC is spliced into the body's bytes (encoded once); the record must be
    byte for byte ``canonical({**body, "mac": MAC})``, the format docs/protocol.md gives."""
    import os

    from agent.cose import canonical

    j = Journal(Path("/nonexistent/journal.log"), os.urandom(32), FileOps())
    body = {"n": n, "time": 1_800_000_000, "event": event, "data": data, "prev": os.urandom(32)}
    assert j._seal(body) == canonical({**body, "mac": j._mac(body)})

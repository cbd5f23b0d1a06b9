"""sim://: the fault injector on its own, and full activations that must come out exactly right over a bad line."""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest

from agent.errors import UsageError
from agent.formats import read_device_info
from agent.ops import AgentOps
from agent.rpc import TransportError
from hw import connect, listen
from hw.backends.sim import (
    FAULT_KINDS,
    FaultInjector,
    LineFaults,
    SimEnd,
    SimFabric,
    SimListener,
)
from hw.link import StreamClient
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device

DATA = bytes(random.Random(0).randbytes(20_000))


def injector(seed: int = 1, **rates: float) -> FaultInjector:
    return FaultInjector(LineFaults(**rates), random.Random(seed))  # type: ignore[arg-type]


# ---------------------------------------------------------------- the injector


def test_no_faults_means_bytes_pass_untouched() -> None:
    inj = injector()
    assert inj.apply(DATA) == [DATA]
    assert inj.injected == 0 and inj.counts["bytes"] == len(DATA)


def test_same_seed_same_faults() -> None:
    rates = {"ber": 1e-3, "drop": 0.1, "dup": 0.1, "noise": 0.1, "split": 0.5}
    a, b = injector(5, **rates), injector(5, **rates)
    out_a = [a.apply(DATA[i:i + 500]) for i in range(0, len(DATA), 500)]
    out_b = [b.apply(DATA[i:i + 500]) for i in range(0, len(DATA), 500)]
    assert out_a == out_b and a.counts == b.counts
    assert injector(6, **rates).apply(DATA) != a.apply(DATA)


def test_bit_flips_are_counted_exactly_and_at_the_asked_rate() -> None:
    inj = injector(ber=1e-3)
    out = b"".join(b"".join(inj.apply(DATA[i:i + 1000])) for i in range(0, len(DATA), 1000))
    flipped = sum(bin(x ^ y).count("1") for x, y in zip(DATA, out, strict=True))
    assert flipped == inj.counts["bit_flips"] == inj.injected
    assert 100 < flipped < 220  # 160,000 bits at 1e-3: 160 expected (seeded, so fixed)


def test_drops_dups_noise_and_splits_account_for_every_byte() -> None:
    inj = injector(drop=0.2, dup=0.2, noise=0.2, split=0.6)
    delivered = 0
    pieces = 0
    for i in range(0, len(DATA), 400):
        chunks = inj.apply(DATA[i:i + 400])
        delivered += sum(len(c) for c in chunks)
        pieces += len(chunks)
    c = inj.counts
    assert min(c["drops"], c["dups"], c["noise_bursts"], c["splits"]) > 0
    assert c["writes"] + c["dups"] + c["splits"] - c["drops"] == pieces
    # what arrived = what was sent + the duplicated writes - what was dropped + noise
    dup_bytes = delivered - (len(DATA) - c["dropped_bytes"] + c["noise_bytes"])
    assert dup_bytes == 400 * c["dups"]
    assert inj.injected == sum(c[k] for k in FAULT_KINDS)


def test_split_only_re_chunks() -> None:
    inj = injector(split=0.9)
    chunks = inj.apply(DATA[:1000])
    assert b"".join(chunks) == DATA[:1000]
    assert len(chunks) == inj.counts["splits"] + 1 > 1
    assert inj.injected == 0  # re-chunking damages nothing


@pytest.mark.parametrize("opts", ["ber=2", "drop=-0.1", "dup=x", "delay=60", "noise=nan",
                                  "seed=one", "color=red", "timeout=0", "tries=zero"])
def test_bad_options_are_refused(opts: str, device: Device) -> None:
    fab = SimFabric()
    lst = listen("sim://d", AgentOps(device.agent), fabric=fab)
    lst.start()
    try:
        with pytest.raises(UsageError):
            connect(f"sim://d?{opts}", fabric=fab)
    finally:
        lst.stop()


def test_misuse_is_named() -> None:
    with pytest.raises(UsageError, match="SimFabric"):
        connect("sim://d")
    with pytest.raises(UsageError, match="needs a name"):
        listen("sim://", lambda _o, _a: None, fabric=SimFabric())
    with pytest.raises(UsageError, match="timeout"):
        listen("sim://d?timeout=1", lambda _o, _a: None, fabric=SimFabric())
    with pytest.raises(TransportError, match="nothing is listening"):
        connect("sim://nobody", fabric=SimFabric())
    fab = SimFabric()
    a = listen("sim://twice", lambda _o, _a: None, fabric=fab)
    a.start()
    with pytest.raises(UsageError, match="already"):
        listen("sim://twice", lambda _o, _a: None, fabric=fab).start()
    a.stop()


# ---------------------------------------------------------------- whole activations over a bad line


@pytest.fixture
def fabric() -> SimFabric:
    return SimFabric()


@pytest.fixture
def served(device: Device, fabric: SimFabric) -> Iterator[SimListener]:
    lst = listen("sim://as-p-1", AgentOps(device.agent), fabric=fabric)
    assert isinstance(lst, SimListener)
    lst.start()
    try:
        yield lst
    finally:
        lst.stop()
        assert not any(t.is_alive() for t in lst.threads)


def full_apply_and_check(c: StreamClient, device: Device) -> bytes:
    info = read_device_info(c.info())
    req = c.request("activate", ["bacnet", "modbus"])
    resp = device.vendor.issue(req, [Grant("bacnet", 3), Grant("modbus", 1)],
                               now=device.clock())
    out = c.apply(resp)
    assert out["sequence"] == 1 and out["already_applied"] is False
    assert sorted(out["changes"]) == ["add bacnet", "add modbus"]
    assert c.check("bacnet")["licensed"] is True
    assert c.check("bacnet-ip")["licensed"] is False
    st = c.status()
    assert st["device_id"] == info.device_id
    return resp


def assert_store_exactly_right(device: Device, *more_events: str) -> None:
    """Read straight from the store: one request, one apply, nothing twice, nothing half."""
    st = device.agent.status()
    assert st["sequence"] == 1
    assert sorted((lic["feature"], lic["count"]) for lic in st["licenses"]) == [
        ("bacnet", 3), ("modbus", 1)]
    assert st["outstanding_requests"] == []
    assert [e.event for e in device.agent.journal().entries] == [
        "init", "request", "apply", *more_events]


def keep_checking_until(c: StreamClient, fabric: SimFabric, kind: str, n: int) -> None:
    """Checks answered right over the line, until it has injected ``n`` faults of ``kind``."""
    for _ in range(3000):
        if fabric.counts()[kind] >= n:
            return
        assert c.check("bacnet")["licensed"] is True
    raise AssertionError(f"the line injected fewer than {n} {kind}")


def line_of(c: StreamClient) -> SimEnd:
    assert isinstance(c.link, SimEnd)
    return c.link


def test_full_apply_at_bit_error_rate_1e4(served: SimListener, device: Device,
                                          fabric: SimFabric) -> None:
    # at 1e-4 a 1.3 kB apply answer arrives intact only one time in three, so a try
    # (request and answer) succeeds about one time in five: 40 tries fail with p ~ 1e-4
    with connect(f"{served.address}?ber=1e-4&seed=3&timeout=0.2&tries=40", fabric=fabric) as c:
        full_apply_and_check(c, device)
        keep_checking_until(c, fabric, "bit_flips", 8)
        corrupt_seen_by_client = c.rpc.corrupt_frames
        line = line_of(c).line
    assert_store_exactly_right(device)
    counts = fabric.counts()
    assert counts == line.counts() and counts["bit_flips"] >= 8
    assert counts["drops"] == counts["dups"] == counts["noise_bursts"] == 0
    assert corrupt_seen_by_client + served.corrupt_frames >= 1


def test_full_apply_with_a_fifth_of_the_chunks_dropped(served: SimListener, device: Device,
                                                       fabric: SimFabric) -> None:
    with connect(f"{served.address}?drop=0.2&seed=3&timeout=0.2&tries=20", fabric=fabric) as c:
        full_apply_and_check(c, device)
        keep_checking_until(c, fabric, "drops", 8)
    assert_store_exactly_right(device)
    counts = fabric.counts()
    assert counts["drops"] >= 8 and counts["bit_flips"] == 0


def test_full_apply_through_every_fault_at_once(served: SimListener, device: Device,
                                                fabric: SimFabric) -> None:
    url = (f"{served.address}?ber=5e-5&drop=0.05&dup=0.1&noise=0.05&split=0.5&delay=0.002&seed=9"
           "&timeout=0.2&tries=25")
    with connect(url, fabric=fabric) as c:
        resp = full_apply_and_check(c, device)
        keep_checking_until(c, fabric, "dups", 5)
        # the same response again over the bad line: idempotent, and journalled once
        again = c.apply(resp)
        assert again["already_applied"] is True and again["sequence"] == 1
    assert_store_exactly_right(device, "reapply")
    counts = fabric.counts()
    assert all(counts[k] > 0 for k in ("splits", "dups")), counts


def test_listener_options_set_the_line_and_clients_override_them(device: Device) -> None:
    fab = SimFabric()
    lst = listen("sim://dead?drop=1", AgentOps(device.agent), fabric=fab)
    lst.start()
    try:
        with connect("sim://dead?timeout=0.05&tries=2", fabric=fab) as c, \
                pytest.raises(TransportError, match="no answer after 2 tries"):
            c.status()
        with connect("sim://dead?drop=0", fabric=fab) as c:
            assert c.status()["sequence"] == 0
        assert fab.counts()["drops"] >= 2
    finally:
        lst.stop()

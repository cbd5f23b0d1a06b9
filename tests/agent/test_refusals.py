"""Every refusal class: the right error and exit code, one clear message, and a store left byte-for-byte as it was."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

import pytest

from agent import errors
from agent.cose import SigningKey
from agent.messages import Action, ChangeOp, LicenseChange, TrustKey
from agent.protocol import Limits
from agent.service import Agent
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Device, Site

ADD_X = (LicenseChange(ChangeOp.ADD, "x", 1),)


def refused(device: Device, data: bytes, err: type[errors.LicensingError], code: int) -> str:
    """Apply ``data``, expect ``err``; the store's slots must not change by a single byte."""
    before = device.store_bytes()
    state_before = device.agent.state()[0]
    with pytest.raises(err) as info:
        device.agent.apply(data)
    assert info.value.exit_code == code
    assert device.store_bytes() == before
    assert device.agent.state()[0] == state_before
    assert device.leftovers() == []
    msg = str(info.value)
    assert msg and "\n" not in msg
    return msg


def fresh_request(device: Device) -> bytes:
    return device.request(Action.ACTIVATE, ["x"])


def test_bad_signature(device: Device, vendor: Vendor) -> None:
    resp = bytearray(vendor.issue(fresh_request(device), [Grant("x", 1)], now=device.clock()))
    resp[-5] ^= 0x01  # inside the signature
    refused(device, bytes(resp), errors.TrustError, 4)


def test_untrusted_key(device: Device) -> None:
    stranger = Vendor(SigningKey.generate())
    resp = stranger.issue(fresh_request(device), [Grant("x", 1)], now=device.clock())
    msg = refused(device, resp, errors.TrustError, 4)
    assert "does not trust" in msg


def test_signed_payload_tampered(device: Device, vendor: Vendor) -> None:
    resp = bytearray(vendor.issue(fresh_request(device), [Grant("x", 7)], now=device.clock()))
    i = resp.find(b"\x07")  # the count
    resp[i] = 0x09
    refused(device, bytes(resp), errors.TrustError, 4)


def test_wrong_device(site: Site, vendor: Vendor) -> None:
    a, b = site.device(), site.device()
    resp = vendor.issue(fresh_request(a), [Grant("x", 1)], now=site.clock())
    fresh_request(b)
    msg = refused(b, resp, errors.WrongDeviceError, 5)
    assert a.agent.state()[0].device_id[:12] in msg and b.agent.state()[0].device_id[:12] in msg


@pytest.mark.parametrize("near_miss", [
    lambda d: d[:-1],            # prefix
    lambda d: d.upper(),         # case
    lambda d: d[1:] + d[0],      # rotated
])
def test_near_miss_device_ids_are_malformed_or_wrong(device: Device, vendor: Vendor,
                                                     near_miss: Callable[[str], str]) -> None:
    req = vendor.read_request(fresh_request(device))
    other = near_miss(req.device_id)
    resp = vendor.sign(vendor.response_for(req, ADD_X, device.clock(), device_id=other))
    if re.fullmatch(r"[0-9a-f]{64}", other):
        refused(device, resp, errors.WrongDeviceError, 5)
    else:  # not even a well-formed device ID: signed, but still refused before any use
        refused(device, resp, errors.MalformedError, 3)


def test_replay_of_older_response(device: Device) -> None:
    first = device.activate(x=1)
    device.activate(y=2)
    msg = refused(device, first, errors.AlreadyAppliedError, 6)
    assert "already applied" in msg


def test_reapply_latest_is_idempotent(device: Device) -> None:
    resp = device.activate(x=1)
    before = device.store_bytes()
    res, _ = device.agent.apply(resp)
    assert res.already_applied
    assert device.store_bytes() == before
    res2, _ = device.agent.apply(resp)
    assert res2.receipt == res.receipt


def test_stale_after_another_applied(device: Device, vendor: Vendor) -> None:
    r1 = fresh_request(device)
    r2 = device.request(Action.ACTIVATE, ["y"])
    resp1 = vendor.issue(r1, [Grant("x", 1)], now=device.clock())
    resp2 = vendor.issue(r2, [Grant("y", 1)], now=device.clock())
    device.agent.apply(resp2)
    msg = refused(device, resp1, errors.StaleError, 6)
    assert "older than the installed state" in msg


def test_too_new(device: Device, vendor: Vendor) -> None:
    req = vendor.read_request(fresh_request(device))
    resp = vendor.sign(vendor.response_for(req, ADD_X, device.clock(), base_sequence=1))
    msg = refused(device, resp, errors.TooNewError, 6)
    assert "missing" in msg


def test_no_such_outstanding_request(device: Device, vendor: Vendor) -> None:
    req = vendor.read_request(fresh_request(device))
    resp = vendor.sign(vendor.response_for(req, ADD_X, device.clock(), nonce=os.urandom(16)))
    refused(device, resp, errors.UnknownRequestError, 6)


def test_digest_mismatch(device: Device, vendor: Vendor) -> None:
    req = vendor.read_request(fresh_request(device))
    resp = vendor.sign(vendor.response_for(req, ADD_X, device.clock(), base_digest=bytes(32)))
    refused(device, resp, errors.StaleError, 6)


def test_expired(device: Device, vendor: Vendor) -> None:
    resp = vendor.issue(fresh_request(device), [Grant("x", 1)], now=device.clock(),
                        valid_for=3600)
    device.clock.t += 7200
    refused(device, resp, errors.ExpiredError, 7)


def test_not_yet_valid(device: Device, vendor: Vendor) -> None:
    req = vendor.read_request(fresh_request(device))
    t = device.clock()
    resp = vendor.sign(vendor.response_for(req, ADD_X, t, not_before=t + 86400,
                                           expires=t + 2 * 86400))
    refused(device, resp, errors.NotYetValidError, 7)


def test_clock_set_back(device: Device, vendor: Vendor) -> None:
    req = fresh_request(device)
    device.clock.t -= 86400
    resp = vendor.issue(req, [Grant("x", 1)], now=device.clock())
    msg = refused(device, resp, errors.ClockSetBackError, 7)
    assert "set back" in msg


def test_refusal_never_consumes_the_request(device: Device, vendor: Vendor) -> None:
    req = fresh_request(device)
    late = vendor.issue(req, [Grant("x", 1)], now=device.clock(), valid_for=60)
    device.clock.t += 120
    refused(device, late, errors.ExpiredError, 7)
    good = vendor.issue(req, [Grant("x", 1)], now=device.clock())
    res, _ = device.agent.apply(good)
    assert not res.already_applied and res.state.sequence == 1


def test_malformed_garbage(device: Device) -> None:
    fresh_request(device)
    refused(device, b"\x00garbage", errors.MalformedError, 3)
    refused(device, b"", errors.MalformedError, 3)


def test_oversized_file(device: Device) -> None:
    refused(device, b"\x00" * (Limits().max_file + 1), errors.MalformedError, 3)


def test_request_signed_by_device_is_not_a_response(device: Device) -> None:
    req = fresh_request(device)
    # named for what it is before its signer is even looked at (issue 13, item 15)
    refused(device, req, errors.MalformedError, 3)


def test_vendor_file_of_another_kind(device: Device, vendor: Vendor) -> None:
    upd = vendor.trust_update([TrustKey(vendor.public)], 1, device.clock())
    msg = refused(device, upd, errors.MalformedError, 3)
    assert "expected a response" in msg


def test_vendor_key_validity_window(device: Device, vendor: Vendor) -> None:
    t = device.clock()
    upd = vendor.trust_update([TrustKey(vendor.public, not_before=t - 10, not_after=t + 100)],
                              1, t)
    device.agent.trust_update(upd)
    req = fresh_request(device)
    device.clock.t += 1000
    resp = vendor.issue(req, [Grant("x", 1)], now=device.clock())
    msg = refused(device, resp, errors.TrustError, 4)
    assert "expired" in msg


def test_response_changes_must_fit_state(device: Device, vendor: Vendor) -> None:
    device.activate(x=1)
    req = vendor.read_request(fresh_request(device))
    resp = vendor.sign(vendor.response_for(req, ADD_X, device.clock()))  # x already installed
    refused(device, resp, errors.MalformedError, 3)


def test_copied_store_refused(site: Site, tmp_path: os.PathLike[str]) -> None:
    import shutil
    from pathlib import Path

    from agent.identity import HardwareFacts
    from hw.facts import StaticFactsProvider

    a = site.device(serial="AAA", macs=("00:80:f4:00:00:aa",))
    a.activate(x=1)
    dst = Path(tmp_path) / "copy"
    shutil.copytree(a.directory, dst)
    other_hw = StaticFactsProvider(HardwareFacts(model="AS-P", serial="BBB",
                                                 macs=("00:80:f4:00:00:bb",)))
    thief = Agent(dst, other_hw, clock=site.clock)
    before = {p.name: p.read_bytes() for p in dst.iterdir() if p.name.startswith("state")}
    for op in (thief.status, lambda: thief.check("x"), thief.info):
        with pytest.raises(errors.CopiedStoreError) as info:
            op()
        assert info.value.exit_code == 5
    after = {p.name: p.read_bytes() for p in dst.iterdir() if p.name.startswith("state")}
    assert before == after


def test_one_network_card_replaced_rebinds(site: Site) -> None:
    from agent.identity import HardwareFacts
    from hw.facts import StaticFactsProvider

    d = site.device(serial="CCC", macs=("00:80:f4:00:00:01", "00:80:f4:00:00:02"))
    d.activate(x=1)
    new_hw = StaticFactsProvider(HardwareFacts(model="AS-P", serial="CCC",
                                               macs=("00:80:f4:00:00:01", "00:80:f4:00:00:99")))
    moved = Agent(d.directory, new_hw, clock=site.clock)
    st = moved.status()
    assert [lic["feature"] for lic in st["licenses"]] == ["x"]
    assert any("re-bound" in w for w in st["warnings"])
    events = [e.event for e in moved.journal().entries]
    assert "rebind" in events
    # re-bound: a second open sees no change and writes nothing
    before = d.store_bytes()
    assert moved.check("x").licensed
    assert d.store_bytes() == before

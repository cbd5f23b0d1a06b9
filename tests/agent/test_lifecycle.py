"""License lifecycle: renewals, grace periods, clock high-water mark, outstanding bounds, key rotation."""

from __future__ import annotations

import pytest

from agent import errors
from agent.cose import SigningKey
from agent.messages import Action, TrustKey
from agent.protocol import DEFAULT_LIMITS
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Device

DAY = 86400


def test_renew_extends_an_expiring_license(device: Device, vendor: Vendor) -> None:
    t = device.clock()
    req = device.request(Action.ACTIVATE, ["bacnet"])
    device.agent.apply(vendor.issue(req, [Grant("bacnet", 5, not_after=t + 10 * DAY)], now=t))
    device.clock.t += 9 * DAY
    req = device.request(Action.RENEW, ["bacnet"])
    res, _ = device.agent.apply(
        vendor.issue(req, [Grant("bacnet", 5, not_after=t + 400 * DAY)], now=device.clock()))
    assert [c.op.value for c in res.response.changes] == ["update"]
    device.clock.t = t + 200 * DAY
    assert device.agent.check("bacnet").licensed


def test_renew_of_missing_feature_is_a_usage_error(device: Device) -> None:
    with pytest.raises(errors.UsageError):
        device.request(Action.RENEW, ["nothing"])


def test_grace_period(device: Device, vendor: Vendor) -> None:
    t = device.clock()
    req = device.request(Action.ACTIVATE, ["trend"])
    device.agent.apply(
        vendor.issue(req, [Grant("trend", 1, not_after=t + DAY, grace=3 * DAY)], now=t))
    device.clock.t = t + 2 * DAY
    r = device.agent.check("trend")
    assert r.licensed and r.in_grace and "GRACE" in r.message
    device.clock.t = t + 5 * DAY
    assert not device.agent.check("trend").licensed


def test_not_before_window(device: Device, vendor: Vendor) -> None:
    t = device.clock()
    req = device.request(Action.ACTIVATE, ["later"])
    device.agent.apply(vendor.issue(req, [Grant("later", 1, not_before=t + DAY)], now=t))
    assert not device.agent.check("later").licensed
    device.clock.t += 2 * DAY
    assert device.agent.check("later").licensed


def test_clock_set_back_never_extends_a_license(device: Device, vendor: Vendor) -> None:
    t = device.clock()
    req = device.request(Action.ACTIVATE, ["x"])
    device.agent.apply(vendor.issue(req, [Grant("x", 1, not_after=t + DAY)], now=t))
    device.clock.t = t + 2 * DAY  # expired, and the device has seen this time
    assert not device.agent.check("x").licensed
    device.clock.t = t  # wound back to when it was valid
    r = device.agent.check("x")
    assert not r.licensed and r.clock_set_back
    assert device.agent.status()["clock_set_back"] is True


def test_high_water_mark_persisted_at_most_hourly(device: Device) -> None:
    """Frequent checks must not wear out flash: no write until the mark is an hour old."""
    device.activate(x=1)
    before = device.store_bytes()
    for _ in range(50):
        device.clock.t += 60
        assert device.agent.check("x").licensed
    assert device.store_bytes() == before  # 50 minutes of checks, no write
    device.clock.t += DEFAULT_LIMITS.hwm_persist_interval
    device.agent.check("x")
    assert device.store_bytes() != before
    assert device.agent.state()[0].clock_hwm == device.clock()


def test_outstanding_requests_are_bounded(device: Device, vendor: Vendor) -> None:
    reqs = [device.request(Action.ACTIVATE, [f"f{i}"]) for i in range(DEFAULT_LIMITS.max_outstanding + 2)]
    st = device.agent.state()[0]
    assert len(st.outstanding) == DEFAULT_LIMITS.max_outstanding
    # the two oldest were dropped: their answers are refused, the newest still applies
    with pytest.raises(errors.UnknownRequestError):
        device.agent.apply(vendor.issue(reqs[0], [Grant("a", 1)], now=device.clock()))
    res, _ = device.agent.apply(vendor.issue(reqs[-1], [Grant("a", 1)], now=device.clock()))
    assert res.state.outstanding == ()  # applying one makes the others stale


def test_key_rotation(device: Device, vendor: Vendor) -> None:
    new = Vendor(SigningKey.generate())
    # an update signed by a key the device does not trust is refused
    with pytest.raises(errors.TrustError):
        device.agent.trust_update(new.trust_update([TrustKey(new.public)], 1, device.clock()))
    device.agent.trust_update(vendor.trust_update([TrustKey(new.public)], 1, device.clock()))
    # the old key is gone, the new one works
    req = device.request(Action.ACTIVATE, ["x"])
    with pytest.raises(errors.TrustError):
        device.agent.apply(vendor.issue(req, [Grant("x", 1)], now=device.clock()))
    device.agent.apply(new.issue(req, [Grant("x", 1)], now=device.clock()))
    # an older or equal version is refused, even when signed by the current key
    with pytest.raises(errors.StaleError):
        device.agent.trust_update(new.trust_update([TrustKey(vendor.public)], 1, device.clock()))
    events = [e.event for e in device.agent.journal().entries]
    assert "trust-update" in events


def test_reclaim_everything_by_default(device: Device, vendor: Vendor) -> None:
    device.activate(a=1, b=2)
    req = device.request(Action.RECLAIM, [])
    res, _ = device.agent.apply(vendor.issue(req, now=device.clock()))
    assert {lic.feature for lic in res.removed} == {"a", "b"}
    assert res.state.licenses == ()
    with pytest.raises(errors.UsageError):
        device.request(Action.RECLAIM, [])  # nothing left to reclaim


def test_license_limit(device: Device, vendor: Vendor) -> None:
    req = device.request(Action.ACTIVATE, [])
    device.agent.apply(vendor.issue(req, [Grant(f"f{i}", 1) for i in range(200)],
                                    now=device.clock()))
    req = device.request(Action.ACTIVATE, [])
    before = device.store_bytes()
    with pytest.raises(errors.MalformedError, match="at most 256"):
        device.agent.apply(vendor.issue(req, [Grant(f"g{i}", 1) for i in range(100)],
                                        now=device.clock()))
    assert device.store_bytes() == before
    assert len(device.agent.status()["licenses"]) == 200

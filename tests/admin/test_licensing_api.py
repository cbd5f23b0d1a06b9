"""The licensing server's API bodies (apps/licensing_api.py): one encoding, one decoder each."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.cose import strict_loads
from agent.errors import AlreadyAppliedError, MalformedError, UsageError
from apps.licensing_api import (
    AssignmentQuery,
    Confirmation,
    EntitlementQuery,
    LicenseInfoQuery,
    PerDeviceLicenseInfo,
    UploadAnswer,
    body_fields,
    body_files,
    files_body,
)


@pytest.mark.parametrize("q", [
    LicenseInfoQuery(b"site"), LicenseInfoQuery(b"site", ("a" * 64, "b" * 64)),
    LicenseInfoQuery(b"site", (), per_device=True),
])
def test_a_license_info_query_reads_back_as_itself(q: LicenseInfoQuery) -> None:
    assert LicenseInfoQuery.from_body(strict_loads(q.encode(), max_size=1 << 20)) == q


@pytest.mark.parametrize(("body", "error", "text"), [
    ([], MalformedError, "must be a map"),
    ({"devices": []}, UsageError, "lacks site_info"),
    ({"site_info": b"s", "colour": 1}, UsageError, "unknown field colour"),
    ({"site_info": "s"}, MalformedError, "site_info must be the SITE_INFO file"),
    ({"site_info": b"s", "devices": [1]}, MalformedError, "devices must be a list"),
    ({"site_info": b"s", "per_device": 1}, MalformedError, "per_device must be true or false"),
    ({"site_info": b"s", 7: 1}, MalformedError, "non-text key"),
])
def test_a_bad_license_info_query_is_refused_with_one_line(body: Any, error: type[Exception],
                                                          text: str) -> None:
    with pytest.raises(error, match=text):
        LicenseInfoQuery.from_body(body)


def test_files_bodies_and_their_limits() -> None:
    body = strict_loads(files_body("requests", [b"a", b"b"]), max_size=1 << 20)
    assert body_files(body_fields(body, "requests", {"requests"}), "requests", 2) == [b"a", b"b"]
    with pytest.raises(UsageError, match="at most 1 per call"):
        body_files(body, "requests", 1)
    with pytest.raises(MalformedError, match="list of files"):
        body_files({"requests": ["a"]}, "requests", 5)
    assert body_files({}, "receipts", 5, required=False) == []


def test_upload_answers_merge_batches_and_read_back() -> None:
    total = UploadAnswer()
    first = UploadAnswer({"d1": b"r1"}, {"#1": {"code": 3, "reason": "untrusted", "message": "x"}})
    second = UploadAnswer({"d2": b"r2"}, {"#0": {"code": 2, "reason": "usage", "message": "y"},
                                          "d3": {"code": 6, "reason": "not-entitled",
                                                 "message": "z"}})
    total.merge(first, 0)
    total.merge(second, 1000)
    assert total.responses == {"d1": b"r1", "d2": b"r2"}
    assert sorted(total.errors) == ["#1", "#1000", "d3"]  # positions in the whole upload
    back = UploadAnswer.from_body(total.to_wire())
    assert back == total and back["responses"] == total.responses  # also reads as its map


def test_confirmations_keep_the_receipts_positions() -> None:
    part = Confirmation()
    part.accept("d1", 2, [("bacnet", 50)])
    part.refuse(1, AlreadyAppliedError("already confirmed"))
    total = Confirmation()
    total.merge(Confirmation(), 0)
    total.merge(part, 1000)
    assert total.accepted == [{"device_id": "d1", "sequence": 2,
                               "freed": [{"feature": "bacnet", "count": 50}]}]
    assert total.refused == [{"index": 1001, "code": AlreadyAppliedError.exit_code, "reason": "replay",
                              "message": "already confirmed"}]
    assert Confirmation.from_body(total.to_wire()) == total


@pytest.mark.parametrize("body", [
    [], {"responses": {"d": "not bytes"}}, {"errors": {"k": "not a map"}},
    {"receipts": {"accepted": "x"}}, {"receipts": {"refused": [{"index": "1"}]}},
])
def test_an_unreadable_upload_answer_is_malformed(body: Any) -> None:
    with pytest.raises(MalformedError, match=r"other than|not a"):
        UploadAnswer.from_body(body)


@pytest.mark.parametrize("body", [
    {}, {"license_info": b"x"}, {"license_info": b"x", "per_device": {"d": "y"}}, [b"x"],
])
def test_a_per_device_answer_must_have_its_shape(body: Any) -> None:
    with pytest.raises(MalformedError, match="something other than"):
        PerDeviceLicenseInfo.from_body(body)
    good = PerDeviceLicenseInfo(b"x", {"d": b"y"})
    assert PerDeviceLicenseInfo.from_body(strict_loads(good.encode(), max_size=99)) == good


def test_an_upload_answer_is_its_documented_map_all_the_way_down() -> None:
    ans = UploadAnswer({"d1": b"r1"}, {}, Confirmation([{"device_id": "d1", "sequence": 2,
                                                         "freed": []}]))
    wire = ans.to_wire()
    assert wire == {"responses": {"d1": b"r1"}, "errors": {},
                    "receipts": {"accepted": [{"device_id": "d1", "sequence": 2, "freed": []}],
                                 "refused": []}}
    assert type(wire["receipts"]) is dict
    assert UploadAnswer.from_body(wire) == ans


DEV = "ab" * 32


def test_assignment_queries_read_back_and_keep_the_body_the_client_sent() -> None:
    q = AssignmentQuery("ORDER-1", DEV, "bacnet", 3)
    assert q.encode() == json.dumps({"entitlement": "ORDER-1", "device_id": DEV,
                                     "feature": "bacnet", "count": 3}).encode()
    assert AssignmentQuery.from_body(json.loads(q.encode())) == q
    named = AssignmentQuery("ORDER-1", DEV, "bacnet", 3, product="BMS-Pro")
    assert AssignmentQuery.from_body(json.loads(named.encode())) == named
    with pytest.raises(UsageError, match="the body of assignments lacks count, feature"):
        AssignmentQuery.from_body({"entitlement": "E", "device_id": DEV})
    with pytest.raises(UsageError, match="unknown field until in the body of assignments"):
        AssignmentQuery.from_body({**json.loads(q.encode()), "until": None})
    with pytest.raises(MalformedError, match="must be a map"):
        AssignmentQuery.from_body([])


def test_entitlement_queries_read_back_and_refuse_what_the_server_refused() -> None:
    q = EntitlementQuery("ORDER-1", "BMS-Pro", {"bacnet": 5}, "2027-12-31")
    assert q.encode() == json.dumps({"entitlement": "ORDER-1", "product": "BMS-Pro",
                                     "features": {"bacnet": 5}, "until": "2027-12-31"}).encode()
    assert EntitlementQuery.from_body(json.loads(q.encode())) == q
    assert q.until_time() == 1830297599  # the end of that day, UTC
    forever = EntitlementQuery.from_body({"entitlement": "E", "product": "P",
                                          "features": {"x": 1}})
    assert forever.until is None and forever.until_time() is None
    assert EntitlementQuery("E", "P", {}, "").until_time() is None
    body = json.loads(q.encode())
    with pytest.raises(UsageError, match='features must be an object'):
        EntitlementQuery.from_body({**body, "features": [["bacnet", 5]]})
    with pytest.raises(UsageError, match="until must be an ISO 8601 date or date-time, or null"):
        EntitlementQuery.from_body({**body, "until": 20271231})
    with pytest.raises(UsageError, match="cannot read time 'soon'"):
        EntitlementQuery.from_body({**body, "until": "soon"}).until_time()
    with pytest.raises(UsageError, match="the body of entitlements lacks features"):
        EntitlementQuery.from_body({"entitlement": "E", "product": "P"})

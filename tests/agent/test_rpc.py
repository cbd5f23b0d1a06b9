"""The RPC layer of the device core (agent/rpc.py): messages, the operation table, answer()."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent import ops as ops_module
from agent.cose import canonical
from agent.errors import IntegrityError, MalformedError, UsageError
from agent.messages import Action
from agent.rpc import (
    OPERATIONS,
    OPS,
    ApplyArgs,
    ApplyResult,
    CheckArgs,
    FeatureCheck,
    InfoResult,
    JournalResult,
    LicenseInfoResult,
    Op,
    RemoteError,
    RequestArgs,
    RequestResult,
    RpcAnswer,
    RpcRequest,
    StatusResult,
    answer,
    decode_message,
    read_args,
    speaks,
    wire,
)

MAX = 81920
ids = st.integers(min_value=0, max_value=2**32 - 1)
cbor_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)


@given(ids, st.sampled_from(sorted(OPS)), st.dictionaries(st.text(max_size=8), cbor_values,
                                                          max_size=4))
def test_a_request_decodes_to_itself(rid: int, op: str, args: dict[str, Any]) -> None:
    req = RpcRequest(rid, op, args)
    assert decode_message(req.encode(), MAX) == req
    assert req.encode() == canonical({"v": 1, "id": rid, "op": op, "args": args})


@given(ids, cbor_values)
def test_an_answer_decodes_to_itself(rid: int, result: Any) -> None:
    ans = RpcAnswer(rid, True, result)
    assert decode_message(ans.encode(), MAX) == ans
    refusal = RpcAnswer.refusal(rid, 5, "wrong-device", "not this one")
    back = decode_message(refusal.encode(), MAX)
    assert isinstance(back, RpcAnswer) and back == refusal
    with pytest.raises(RemoteError) as e:
        back.value()
    assert (e.value.exit_code, e.value.reason, str(e.value)) == (5, "wrong-device", "not this one")


@pytest.mark.parametrize("msg", [
    [1, 2], {"v": 1, "id": True, "op": "hello"},
    {"v": 1, "id": -1, "op": "hello"}, {"v": 1, "id": 2**32, "op": "hello"},
    {"v": 1, "op": "hello"}, {"v": 1, "id": 3},
])
def test_what_is_not_an_rpc_message_is_refused(msg: Any) -> None:
    with pytest.raises(MalformedError):
        decode_message(canonical(msg), MAX)


@pytest.mark.parametrize("v", [True, None, "1", 2, 1.0])
def test_a_version_not_spoken_is_kept_and_refused_by_answer(v: Any) -> None:
    msg: dict[str, Any] = {"id": 3, "op": "get-info", "args": {}}
    if v is not None:
        msg["v"] = v
    req = decode_message(canonical(msg), MAX)
    assert isinstance(req, RpcRequest) and not speaks(req.v)
    ans = answer(echo, req, MAX)
    assert ans.error is not None and ans.error.reason == "version"


@pytest.mark.parametrize(("code", "taken"), [(0, 1), (256, 1), (True, 1), ("2", 1), (7, 7)])
def test_an_error_code_outside_1_to_255_is_taken_as_1(code: Any, taken: int) -> None:
    data = canonical({"v": 1, "id": 4, "ok": False, "error": {"code": code}})
    ans = decode_message(data, MAX)
    assert isinstance(ans, RpcAnswer) and ans.error is not None
    assert (ans.error.code, ans.error.reason, ans.error.message) == (taken, "remote", "remote error")


def echo(op: str, args: Mapping[str, Any]) -> Any:
    if op == Op.HELLO:
        return {"device_id": "d" * 64, "model": "AS-P"}
    if op == Op.CHECK_FEATURE:
        return FeatureCheck(str(args.get("feature")), False, "no license")
    return {"op": op}


def test_answer_negotiates_hello_and_runs_operations() -> None:
    hello = answer(echo, RpcRequest(1, "hello", {"versions": [1, 2]}), MAX)
    assert hello.value() == {"version": 1, "max_frame": MAX, "device_id": "d" * 64,
                             "model": "AS-P"}
    checked = answer(echo, RpcRequest(2, "check-feature", {"feature": "bacnet"}), MAX)
    assert checked.value() == {"feature": "bacnet", "licensed": False, "message": "no license",
                               "in_grace": False, "clock_set_back": False}  # the record's wire map


@pytest.mark.parametrize(("req", "code", "reason", "text"), [
    (RpcRequest(1, "hello", {"versions": [2]}), 2, "version", "client offered [2]"),
    (RpcRequest(1, "get-info", {}, v=2), 2, "version", "the request is v2"),
    (RpcRequest(1, 5, {}), 2, "usage", "op must be text"),
    (RpcRequest(1, "get-info", []), 2, "usage", "args a map"),
    (RpcRequest(1, "format-disk", {}), 2, "usage", "unknown operation 'format-disk'"),
])
def test_answer_refuses_with_the_links_errors(req: RpcRequest, code: int, reason: str,
                                              text: str) -> None:
    ans = answer(echo, req, MAX)
    assert not ans.ok and ans.error is not None
    assert (ans.error.code, ans.error.reason) == (code, reason) and text in ans.error.message


def test_a_failing_handler_is_answered_even_for_hello() -> None:
    """A store error during hello used to escape the stream server and end the link."""
    def broken(op: str, _args: Mapping[str, Any]) -> Any:
        if op == Op.HELLO:
            raise IntegrityError("both slots are damaged")
        raise ZeroDivisionError("a bug")

    lines: list[str] = []
    hello = answer(broken, RpcRequest(1, "hello", {"versions": [1]}), MAX)
    assert hello.error is not None and hello.error.reason == "store-integrity"
    assert hello.error.code == IntegrityError.exit_code
    bug = answer(broken, RpcRequest(2, "get-status", {}), MAX, log=lines.append)
    assert bug.error is not None and (bug.error.code, bug.error.reason) == (1, "internal")
    assert "ZeroDivisionError" in bug.error.message and "get-status" in lines[0]


def test_too_large_answers_are_replaced_by_a_refusal() -> None:
    big = RpcAnswer(9, True, {"file": bytes(2000)})
    assert big.encode_within(4096) == big.encode()
    small = decode_message(big.encode_within(100, "message"), MAX)
    assert isinstance(small, RpcAnswer) and small.error is not None
    assert small.error.reason == "too-large" and "message limit" in small.error.message


def test_the_table_has_one_entry_per_operation() -> None:
    assert set(OPERATIONS) == set(Op) and {o.value for o in Op} == OPS
    assert set(ops_module._IMPLS) == set(Op)  # AgentOps implements every entry
    with pytest.raises(UsageError, match="unknown operation 'format-disk'"):
        read_args("format-disk", {})


@pytest.mark.parametrize(("op", "args", "message"), [
    ("create-request", {"action": "steal"}, "action must be activate, reclaim, renew or clock"),
    ("create-request", {"action": "activate", "features": "bacnet"}, "features must be a list"),
    ("create-request", {"action": "activate", "features": ["f"] * 65}, "features must be a list"),
    ("create-request", {"action": "reclaim", "license_info": "x"}, "'license_info' must be a byte"),
    ("apply-response", {}, "argument 'file' must be a byte string"),
    ("check-feature", {"feature": 3}, "feature must be a name"),
])
def test_arguments_are_read_with_the_tables_schema(op: str, args: dict[str, Any],
                                                   message: str) -> None:
    with pytest.raises(UsageError, match=message):
        read_args(op, args)  # before any implementation runs


def test_typed_arguments_reach_the_handler() -> None:
    seen = [read_args("create-request", {"action": "reclaim", "features": ["a"],
                                         "license_info": b"li", "extra": 1}),
            read_args("apply-response", {"file": b"resp"}),
            read_args("check-feature", {"feature": "bacnet"})]
    assert seen == [(Op.CREATE_REQUEST, RequestArgs(Action.RECLAIM, ("a",), b"li")),
                    (Op.APPLY_RESPONSE, ApplyArgs(b"resp")),
                    (Op.CHECK_FEATURE, CheckArgs("bacnet"))]
    assert RequestArgs(Action.RECLAIM, ("a",), b"li").to_wire() == {
        "action": "reclaim", "features": ["a"], "license_info": b"li"}


STATUS = {"device_id": "d" * 64, "model": "AS-P", "serial": "SN1", "sequence": 2,
          "state_digest": "00" * 32, "licenses": [{"feature": "bacnet"}],
          "outstanding_requests": [], "trusted_keys": [{"kid": "ab"}],
          "clock_high_water": "2026-12-04T00:00:00Z", "clock_set_back": False, "warnings": []}
RESULTS: list[tuple[type[Any], dict[str, Any]]] = [
    (InfoResult, {"file": b"info", "device_id": "d" * 64}),
    (StatusResult, STATUS),
    (LicenseInfoResult, {"device_id": "d", "sequence": 1, "state_digest": b"\0" * 32,
                         "licenses": []}),
    (RequestResult, {"file": b"req"}),
    (ApplyResult, {"receipt": b"rc", "already_applied": False, "sequence": 1,
                   "base_sequence": 0, "changes": ["add bacnet"], "warning": None}),
    (FeatureCheck, {"feature": "f", "licensed": True, "message": "ok", "in_grace": False,
                    "clock_set_back": False}),
    (JournalResult, {"entries": [{"n": 1}], "torn_tail": 0, "verified": True}),
]


@pytest.mark.parametrize(("cls", "m"), RESULTS)
def test_result_records_read_and_write_their_wire_map(cls: type[Any], m: dict[str, Any]) -> None:
    rec = cls.from_wire(m)
    assert wire(rec) == m and dict(rec) == m
    assert all(rec[k] == v and getattr(rec, k) == v for k, v in m.items())
    first = next(iter(m))
    broken = {**m, first: object()}
    with pytest.raises(MalformedError):
        cls.from_wire(broken)
    with pytest.raises(MalformedError):
        cls.from_wire([m])


def test_a_status_with_a_boolean_sequence_is_not_a_status() -> None:
    with pytest.raises(MalformedError, match="'sequence'"):
        StatusResult.from_wire({**STATUS, "sequence": True})

"""The byte-stream session (hw/rpc.py) on top of agent.rpc: what a failing hello leaves."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from agent.errors import IntegrityError, UsageError
from agent.rpc import Op
from hw.rpc import RpcClient, RpcServer


def test_a_hello_that_fails_is_answered_and_the_session_keeps_no_version() -> None:
    broken = [True]

    def handler(op: str, _args: Mapping[str, Any]) -> Any:
        if op == Op.HELLO and broken[0]:
            raise IntegrityError("no good slot left")
        return {"device_id": "d" * 64, "model": "AS-B"} if op == Op.HELLO else {"ok": op}

    server, client = RpcServer(handler), RpcClient()
    _rid, hello = client.hello(0.0)
    (res,) = client.receive(b"".join(server.receive(hello)))  # answered, not raised
    assert res.error is not None and res.error.reason == "store-integrity"
    assert res.error.exit_code == IntegrityError.exit_code and server.version is None
    _rid, status = client.start(Op.GET_STATUS, {}, 0.0)
    (res,) = client.receive(b"".join(server.receive(status)))
    assert res.error is not None and "say hello first" in str(res.error)
    broken[0] = False
    _rid, hello = client.hello(0.0)
    (res,) = client.receive(b"".join(server.receive(hello)))
    assert res.ok and res.result["model"] == "AS-B" and server.version == 1


def test_a_request_whose_v_is_a_boolean_is_noise() -> None:
    server = RpcServer(lambda _op, _args: {})
    from agent.cose import canonical
    from hw.framing import encode_frame

    frame = encode_frame(canonical({"v": True, "id": 1, "op": "hello",
                                    "args": {"versions": [1]}}))
    assert server.receive(frame) == [] and server.corrupt_frames == 1


def test_a_tcp_listener_cuts_its_connections_and_keeps_listening() -> None:
    """The link fault hook the fleet uses (Listener.cut), on a real loopback socket."""
    import hw

    lst = hw.listen("tcp://127.0.0.1:0", lambda op, _a: {"device_id": "d", "model": "AS-P"}
                    if op == Op.HELLO else {"ok": True})
    lst.start()
    try:
        with hw.connect(lst.address, timeout=2.0, tries=2) as c:
            assert c.call(Op.GET_STATUS) == {"ok": True}
            assert lst.cut() == 1 and lst.cuts == 1
            with hw.connect(lst.address) as again:  # still listening
                assert again.call(Op.GET_STATUS) == {"ok": True}
    finally:
        lst.stop()
    with pytest.raises(UsageError, match="no connections to cut"):
        hw.listen("usbdrop:///nonexistent", lambda _o, _a: {}).cut()

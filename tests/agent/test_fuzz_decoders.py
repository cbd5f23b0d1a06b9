"""Every decoder of outside bytes, fuzzed in one place (issue 13, "Done when").

Signed files, link frames and RPC messages, MQTT packets and payloads, HTTP bodies
and headers, settings and facts files, CSV rows: each decoder is fed generated
bytes and may only return or raise one of the project's own errors
(:class:`agent.errors.LicensingError`, or the MQTT codec's ``CodecError`` of the
broker simulator); anything else escaping fails the test with the input. Memory is
bounded: the peak resident size grows by less than :data:`RSS_BOUND` over a run.

Each hypothesis example draws a seed and a starting input (random bytes, random CBOR,
a valid file, frame, packet or body of each kind, or a hostile one) and derives
:data:`BATCH` inputs from it with a seeded mutator (bit flips, byte sets, inserts,
deletes, truncation, splices, repeats), so a run covers many inputs cheaply; every
input goes to every decoder. ``DECODER_FUZZ_EXAMPLES`` (else ``FUZZ_EXAMPLES``) sets
the examples per test (a small
seeded layer runs inside ``make test``); the number of inputs is counted and
written to ``$FUZZ_COUNT_FILE`` when set (``make fuzz`` sums them).
"""

from __future__ import annotations

import json
import os
import random
import resource
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import protocol, rpc
from agent.cose import PublicKey, SigningKey, decode_sign1, strict_loads
from agent.errors import LicensingError, UsageError
from agent.formats import (
    SiteInfo,
    expect_kind,
    identify,
    loads_json,
    peek_payload,
    read_device_info,
    verify_receipt,
)
from agent.messages import DeviceInfo, LicenseInfo, Request, decode_payload
from agent.ops import AgentOps
from agent.store import decode_slot
from apps import licensing_api
from apps.licadmin.assign import _csv_rows
from hw import framing
from hw.backends import mqtt_contract
from hw.backends.https import refusal_from_body
from hw.backends.usbdrop import _parse_want
from hw.facts import StaticFactsProvider
from hw.rpc import RpcServer
from simulators.licensing_server.vendor import Vendor
from simulators.mqttlite import codec as mqtt_codec
from tests.agent.test_fuzz import World, cbor_values, make_tmp, make_world
from tests.support.fuzzcount import record_inputs

_env = os.environ.get("DECODER_FUZZ_EXAMPLES") or os.environ.get("FUZZ_EXAMPLES")
EXAMPLES = int(_env) if _env else 40
#: inputs derived from each hypothesis example by the seeded mutator
BATCH = int(os.environ.get("FUZZ_BATCH", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=_env is None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.large_base_example],
)
#: peak resident memory may grow by at most this much over one test's run
RSS_BOUND = 256 * 1024 * 1024
OWN_ERRORS: tuple[type[BaseException], ...] = (LicensingError, mqtt_codec.CodecError)


# ---------------------------------------------------------------- the decoders


def _rpc_result(data: bytes) -> object:
    """A decoded RPC answer's result read by each operation's result reader."""
    obj = strict_loads(data, max_size=1 << 20)
    for reader in (rpc.HelloResult, rpc.InfoResult, rpc.StatusResult, rpc.LicenseInfoResult,
                   rpc.RequestResult, rpc.ApplyResult, rpc.FeatureCheck, rpc.JournalResult):
        try:
            reader.from_wire(obj)
        except LicensingError:
            continue
    return rpc.RpcError.from_wire(obj)


def _rpc_args(data: bytes) -> object:
    obj = strict_loads(data, max_size=1 << 20)
    if not isinstance(obj, dict):
        return None
    for op in ("hello", "info", "status", "request", "license-info", "apply", "check",
               "journal", str(obj.get("op", ""))):
        try:
            rpc.read_args(op, obj)
        except LicensingError:
            continue
    return obj


def _frames(data: bytes) -> object:
    dec = framing.FrameDecoder(max_frame=4096)
    events = dec.feed(data[: len(data) // 2]) + dec.feed(data[len(data) // 2:] + b"\x00")
    for ev in events:
        if isinstance(ev, framing.Frame):
            rpc.decode_message(ev.payload, 1 << 20)
    return events


def _mqtt_stream(data: bytes) -> object:
    dec = mqtt_codec.Decoder(max_packet=1 << 16)
    out = []
    for i in range(0, len(data), 7):  # in small chunks, as a socket delivers them
        out += dec.feed(data[i:i + 7])
    return out


def _http_body(decode: Callable[[object], object]) -> Callable[[bytes], object]:
    def run(data: bytes) -> object:
        return decode(loads_json(data, "the request body", "a JSON object"))
    return run


def _facts(data: bytes) -> object:
    obj = loads_json(data, "facts", "a JSON object")
    if not isinstance(obj, dict):
        return None
    return StaticFactsProvider.from_mapping(obj).read()


def _toml(data: bytes) -> object:
    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, RecursionError) as exc:
        # what apps.common.read_toml turns into one usage line: every failure is one of these
        raise LicensingError(str(exc)) from exc


#: operations that would write the store: answered with a refusal in this fuzz, so that a
#: million inputs do not become a million fsyncs (test_fuzz.py applies to a real store)
WRITING_OPS = {rpc.Op.CREATE_REQUEST.value, rpc.Op.APPLY_RESPONSE.value,
               rpc.Op.TRANSFER.value, rpc.Op.APPLY_TRANSFER.value}


def read_only(w: World) -> Callable[..., object]:
    """The device's real operations (AgentOps on the world's store), reads only."""
    ops = AgentOps(w.device.agent)

    def handler(op: str, args: Any, origin: str | None = None) -> object:
        if op in WRITING_OPS:
            raise UsageError(f"{op} is not served in this fuzz")
        return ops(op, args, origin)
    return handler


def decoders(w: World) -> dict[str, Callable[[bytes], object]]:
    """Every function that reads bytes from outside, bound to a real world."""
    mac_key = w.key.secret_digest(b"store-mac")
    handler = read_only(w)
    server = RpcServer(handler)
    server.receive(framing.encode_frame(cbor2.dumps(  # a session that said hello
        {"v": 1, "id": 1, "op": "hello", "args": rpc.hello_args()})))
    memory = mqtt_contract.AnswerMemory(count=64, size=1 << 20)
    reply_to = mqtt_contract.response_topic("site", w.state.device_id, "c1")
    n = [0]

    def mqtt_request(d: bytes) -> object:
        n[0] += 1
        return mqtt_contract.answer_request(handler, "site", w.state.device_id, d, reply_to,
                                            n[0].to_bytes(8), memory)
    return {
        "rpc_server_frame": lambda d: server.receive(framing.encode_frame(d)),
        "rpc_server_stream": server.receive,
        "mqtt_request": mqtt_request,
        # signed files
        "strict_loads": lambda d: strict_loads(d, max_size=1 << 20),
        "decode_sign1": lambda d: decode_sign1(d, max_size=1 << 20),
        "decode_payload": lambda d: decode_payload(strict_loads(d, max_size=1 << 20)),
        "apply_response": lambda d: protocol.apply_response(w.state, d, w.now, w.key),
        "apply_trust_update": lambda d: protocol.apply_trust_update(w.state, d, w.now),
        "license_info": lambda d: protocol.verify_vendor_file(w.state, d, w.now, LicenseInfo),
        "verify_self_signed": protocol.verify_self_signed,
        "read_request": Vendor.read_request,
        "verify_receipt": lambda d: verify_receipt(d, [w.vendor.public]),
        "verify_receipt_sent": lambda d: verify_receipt(d, response=w.applied),
        "read_device_info": read_device_info,
        "peek_payload": lambda d: peek_payload(d, Request),
        "peek_device_info": lambda d: peek_payload(d, DeviceInfo),
        "site_info": SiteInfo.decode,
        "decode_slot": lambda d: decode_slot(mac_key, d),
        "identify": identify,
        "public_pem": PublicKey.from_pem,
        "private_pem": SigningKey.from_pem,
        "expect_kind": lambda d: expect_kind(d, "response", "f"),
        # link frames and RPC
        "frames": _frames,
        "rpc_message": lambda d: rpc.decode_message(d, 1 << 20),
        "rpc_result": _rpc_result,
        "rpc_args": _rpc_args,
        # MQTT packets and payloads
        "mqtt_decode_all": lambda d: mqtt_codec.decode_all(d, 1 << 16),
        "mqtt_stream": _mqtt_stream,
        "mqtt_presence": lambda d: mqtt_contract.decode_presence("lic/site/dev/presence", d),
        "mqtt_reply": lambda d: mqtt_contract.decode_reply(d, 7),
        # HTTP bodies and headers
        "json_body": lambda d: loads_json(d, "body"),
        "http_license_info": _http_body(licensing_api.LicenseInfoQuery.from_body),
        "http_per_device": _http_body(licensing_api.PerDeviceLicenseInfo.from_body),
        "http_assignment": _http_body(licensing_api.AssignmentQuery.from_body),
        "http_assignments": _http_body(licensing_api.AssignmentBatch.from_body),
        "http_entitlement": _http_body(licensing_api.EntitlementQuery.from_body),
        "http_confirmation": _http_body(licensing_api.Confirmation.from_body),
        "http_upload_answer": _http_body(licensing_api.UploadAnswer.from_body),
        "http_refusal": lambda d: refusal_from_body("x", 409, "Conflict", d),
        # files beside the protocol: the USB mailbox's want file, facts, settings, CSV
        "usbdrop_want": _parse_want,
        "facts_json": _facts,
        "toml": _toml,
        "assign_csv": lambda d: _csv_rows("f.csv", d),
    }


# ---------------------------------------------------------------- inputs


def seeds(w: World) -> list[bytes]:
    """One valid input of every kind the decoders read."""
    return [x for x in (
        *w.files, w.applied, w.pending,
        SiteInfo("site", w.now, (w.device_info,)).encode(),
        framing.encode_frame(cbor2.dumps({"id": 1, "op": "status", "args": {}})),
        framing.encode_frame(cbor2.dumps({"id": 1, "ok": True, "result": {}})),
        cbor2.dumps({"id": 1, "op": "apply", "args": {"file": w.pending}}),
        cbor2.dumps({"code": 6, "reason": "stale", "message": "m"}),
        *(cbor2.dumps({"v": 1, "id": 5, "op": op, "args": args}) for op, args in (
            ("hello", rpc.hello_args()), ("get-status", {}), ("get-info", {}), ("check-feature",
                                                                  {"feature": "bacnet"}),
            ("read-journal", {}), ("get-license-info", {}), ("apply-response",
                                                             {"file": w.pending}))),
        mqtt_codec.encode(mqtt_codec.Connect(client_id="c", keepalive=30)),
        mqtt_codec.encode(mqtt_codec.Publish(topic="lic/s/d/req", payload=b"\xa0", qos=1,
                                             packet_id=3)),
        mqtt_contract.encode_presence(mqtt_contract.Presence("dev", "AS-P", True)),
        mqtt_contract.encode_request(7, "status", None),
        json.dumps({"devices": [w.state.device_id], "site_info": "00"}).encode(),
        json.dumps({"entitlement": "PO 1", "device_id": w.state.device_id,
                    "feature": "bacnet", "count": 2}).encode(),
        json.dumps({"assignments": [{"entitlement": "E", "device_id": "ab" * 32,
                                     "feature": "f", "count": 1}]}).encode(),
        json.dumps({"code": 6, "reason": "not-entitled", "message": "no"}).encode(),
        json.dumps({"action": "activate", "features": ["bacnet"]}).encode(),
        json.dumps({"model": "AS-P", "serial": "S", "macs": ["00:80:f4:00:00:01"]}).encode(),
        b'state = "st"\nlisten = ["tcp://127.0.0.1:0"]\n',
        w.vendor.public.to_pem(), w.key.to_pem(), SigningKey.generate(-7).to_pem(),
        SigningKey.generate(-7).public.to_pem(),
        b"device,feature=count\n" + b"ab" * 32 + b",bacnet=2\n",
    ) if x]


HOSTILE = [
    b"", b"\x00", b"[" * 30_000, b"{" * 30_000, b'{"a":' * 3000, b"a = " + b"[" * 10_000,
    b"\x81" * 30_000, b"\x9f" * 500, b"\xbf" * 500, b"\x5f" * 100, b"\xd2\x84" * 3000,
    b"\x10\xff\xff\xff\x7f", b"\x30\xff\xff\xff\xff\x0f", b"\x82\x00" * 10_000,
    b"\xfb\x7f\xf8\x00\x00\x00\x00\x00\x00", b"NaN", b'{"a": Infinity}', b"1e99999",
    b"\xef\xbb\xbf{}", "é".encode("latin-1"), b"-" * 10_000 + b"\n",
]


def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One seeded mutation of ``data`` (1 to 4 edits)."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        pos = rng.randint(0, len(b))
        if op <= 1 and b:
            b[pos % len(b)] ^= 1 << rng.randrange(8)
        elif op == 2 and b:
            b[pos % len(b)] = rng.randrange(256)
        elif op == 3:
            b[pos:pos] = rng.randbytes(rng.randint(1, 4))
        elif op == 4:
            del b[pos:pos + rng.randint(1, 8)]
        elif op == 5:
            del b[pos:]
        elif op == 6:
            other = rng.choice(pool)
            b = b[:pos] + bytearray(other[rng.randint(0, len(other)):])
        else:
            n = rng.randint(1, 16)
            b[pos:pos] = b[pos:pos + n] * rng.randint(1, 4)
    return bytes(b)


def starts(pool: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.sampled_from(pool), st.sampled_from(pool), st.sampled_from(HOSTILE),
        st.binary(max_size=300), cbor_values.map(cbor2.dumps),
        st.text(max_size=100).map(str.encode),
    )


# ---------------------------------------------------------------- the run


def feed(fns: dict[str, Callable[[bytes], object]], data: bytes) -> None:
    for name, fn in fns.items():
        try:
            fn(data)
        except OWN_ERRORS:
            continue
        except Exception as exc:
            raise AssertionError(f"{name} let {type(exc).__name__} escape: {exc!r}") from exc


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_every_decoder_raises_only_its_own_errors(tmp_path: Path) -> None:
    w = make_world(make_tmp(tmp_path))
    fns = decoders(w)
    pool = seeds(w)
    assert len(fns) >= 40
    done = [0]
    before = peak_rss()

    @FUZZ
    @given(starts(pool), st.integers(0, 2**32))
    def run(start: bytes, seed: int) -> None:
        rng = random.Random(seed)
        feed(fns, start)
        data = start
        for _ in range(BATCH):
            data = mutate(rng, data if rng.random() < 0.5 else start, pool)
            feed(fns, data)
        done[0] += BATCH + 1

    run()
    record_inputs(done[0])
    assert done[0] >= EXAMPLES  # every example ran
    assert peak_rss() - before < RSS_BOUND, "memory grew past the bound"


def test_valid_seeds_are_read_by_their_decoders(tmp_path: Path) -> None:
    """The fuzz starts from inputs the decoders accept (else it would test only refusals)."""
    w = make_world(make_tmp(tmp_path))
    fns = decoders(w)
    accepted = {"read_device_info": w.device_info, "site_info": SiteInfo("s", w.now, (w.device_info,)).encode(),
                "verify_receipt": w.receipt, "read_request": w.request,
                "usbdrop_want": b'{"action": "activate", "features": ["bacnet"]}'}
    for name, data in accepted.items():
        fns[name](data)
    assert identify(w.pending) == "response"
    events = fns["frames"](framing.encode_frame(cbor2.dumps({"id": 1, "op": "status",
                                                             "args": {}})))
    assert isinstance(events, list) and any(isinstance(e, framing.Frame) for e in events)
    presence = mqtt_contract.decode_presence(
        "lic/site/dev/presence",
        mqtt_contract.encode_presence(mqtt_contract.Presence("dev", "AS-P", True)))
    assert presence is not None and presence.online
    # the RPC server of every stream link answers through the device's real operations
    server = RpcServer(read_only(w))
    out = server.receive(b"".join(framing.encode_frame(cbor2.dumps(
        {"v": 1, "id": i, "op": op, "args": args})) for i, op, args in (
            (1, "hello", rpc.hello_args()), (2, "get-status", {}))))
    answers = [rpc.decode_message(e.payload, 1 << 20) for f in out
               for e in framing.FrameDecoder().feed(f) if isinstance(e, framing.Frame)]
    assert [(a.id, getattr(a, "ok", None)) for a in answers] == [(1, True), (2, True)]


@pytest.mark.parametrize("data", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_inputs(tmp_path: Path, data: bytes) -> None:
    w = make_world(make_tmp(tmp_path))
    feed(decoders(w), data)

"""HTTP bodies fuzzed against a real licensing server (issue 13, item 15 and "Done when").

A real ``serve()`` on 127.0.0.1 over a real SQLite ledger; hypothesis generates the
body (JSON documents near the API's shapes, JSON that nests too deep, random CBOR,
valid signed files and their mutations, random bytes) and the content type of every
POST endpoint. Every answer is the server's own: 2xx, or a 4xx whose JSON body
carries a documented exit code, a reason and a one-line message; never a 500
(an exception that escaped a route), and the server answers ``/v1/health`` after.

``FUZZ_EXAMPLES`` (``HTTP_FUZZ_EXAMPLES``) sets the number of bodies; without it a small
seeded layer runs inside ``make test``.
"""

from __future__ import annotations

import http.client
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.formats import SiteInfo
from agent.messages import Action
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.server import LicensingServer, serve
from simulators.licensing_server.vendor import Grant, Vendor
from tests.agent.test_fuzz import cbor_values, mutated_files
from tests.conftest import T0, Site
from tests.support.fuzzcount import record_inputs

_env = os.environ.get("HTTP_FUZZ_EXAMPLES") or os.environ.get("FUZZ_EXAMPLES")
EXAMPLES = int(_env) if _env else 30
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=_env is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example,
                                       HealthCheck.function_scoped_fixture])
DOCUMENTED = {1, 2, 3, 4, 5, 6, 7, 8}
ENDPOINTS = ["/v1/license-info", "/v1/requests", "/v1/receipts", "/v1/assignments",
             "/v1/entitlements"]
CTYPES = ["application/json", "application/cbor", "text/plain", ""]
WAIT = 20.0


TOKEN = ""  # a vendor-admin token of the world's ledger


@pytest.fixture
def world(tmp_path: Path, vendor: Vendor, site: Site) -> Iterator[tuple[LicensingServer,
                                                                         list[bytes]]]:
    dev = site.device()
    req = dev.request(Action.ACTIVATE, ["bacnet"])
    resp = vendor.issue(req, [Grant("bacnet", 2)], now=T0)
    res, _ = dev.agent.apply(resp)
    info, _ = dev.agent.info()
    dev_id = str(dev.agent.status()["device_id"])
    files = [req, resp, res.receipt, info, SiteInfo("s", T0, (info,)).encode()]
    led = Ledger(tmp_path / "ledger.db", vendor, clock=lambda: T0)
    led.entitle("PO 1", "P", {"bacnet": 5}, None)
    bodies = [json.dumps(b).encode() for b in (
        {"site_info": info.hex(), "devices": [dev_id]},
        {"requests": [req.hex()], "receipts": [res.receipt.hex()]},
        {"receipts": [res.receipt.hex()]},
        {"entitlement": "PO 1", "device_id": dev_id, "feature": "bacnet", "count": 1},
        {"assignments": [{"entitlement": "PO 1", "device_id": dev_id, "feature": "bacnet",
                          "count": 1}]},
        {"entitlement": "PO 1", "product": "P", "features": {"bacnet": 1}},
    )]
    global TOKEN
    TOKEN = led.create_token("fuzz", "vendor-admin")  # the bodies reach the decoders behind it
    with serve(led, vendor) as srv:
        yield srv, files + bodies
    led.close()


def post(srv: LicensingServer, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=WAIT)
    try:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if ctype:
            headers["Content-Type"] = ctype
        conn.request("POST", path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def json_near(files: list[bytes]) -> st.SearchStrategy[Any]:
    """JSON documents shaped like the API's, with wrong types, hex files and deep nesting."""
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(
        allow_nan=False), st.text(max_size=20), st.sampled_from([f.hex() for f in files]),
        st.sampled_from(["PO 1", "P", "bacnet", "ab" * 32, ""]))
    keys = st.sampled_from(["site_info", "devices", "requests", "receipts", "entitlement",
                            "device_id", "feature", "count", "product", "features",
                            "assignments", "x"])
    return st.recursive(leaf, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(keys, c, max_size=5), max_leaves=15)


def bodies(pool: list[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        json_near(pool).map(lambda v: json.dumps(v).encode()),
        st.sampled_from(pool), mutated_files(pool),
        cbor_values.map(cbor2.dumps), st.binary(max_size=300),
        st.sampled_from([b"[" * 100_000, b'{"a":' * 20_000, b"\x81" * 50_000, b"",
                         b'{"count": NaN}', b"\xff\xfe"]),
    )


def test_http_bodies_get_the_servers_own_answers(
        world: tuple[LicensingServer, list[bytes]]) -> None:
    srv, pool = world

    done = [0]

    @FUZZ
    @given(st.sampled_from(ENDPOINTS), bodies(pool), st.sampled_from(CTYPES))
    def run(path: str, body: bytes, ctype: str) -> None:
        done[0] += 1
        status, answer = post(srv, path, body, ctype)
        assert status != 500, answer
        if status >= 300:
            err = json.loads(answer)
            assert err["code"] in DOCUMENTED and isinstance(err["reason"], str), err
            assert "\n" not in err["message"], err

    run()
    record_inputs(done[0])
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=WAIT)
    try:
        conn.request("GET", "/v1/health", headers={"Authorization": f"Bearer {TOKEN}"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()

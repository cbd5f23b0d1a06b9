"""HTTP bodies fuzzed against the agent's own ``https://`` listener (issue 13, "Done when").

A real device store served by the real HTTPS listener on 127.0.0.1 with a site PKI;
hypothesis generates the body, content type and path of POST ``/v1/request`` and
``/v1/apply`` and GET ``/v1/check/...`` (JSON near the API's shape, deep nesting, CBOR,
valid signed files and their mutations, random bytes). Every answer is the agent's own:
2xx, or an error whose JSON body has a documented exit code and a one-line message;
never a 500, and the store is the one it was unless a valid response was applied.

``HTTPS_FUZZ_EXAMPLES`` (else ``FUZZ_EXAMPLES``) sets the number of requests.
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
from pathlib import Path
from typing import Any
from urllib.parse import quote

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.messages import Action
from agent.ops import AgentOps
from hw import listen
from simulators.licensing_server.vendor import Grant
from tests.agent.test_fuzz import cbor_values, mutated_files
from tests.conftest import Device
from tests.support.fuzzcount import record_inputs
from tests.support.pki import Pki, make_pki

_env = os.environ.get("HTTPS_FUZZ_EXAMPLES") or os.environ.get("FUZZ_EXAMPLES")
EXAMPLES = int(_env) if _env else 30
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=_env is None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.large_base_example,
                                       HealthCheck.function_scoped_fixture])
DOCUMENTED = {1, 2, 3, 4, 5, 6, 7, 8}


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def json_bodies(files: list[bytes]) -> st.SearchStrategy[bytes]:
    leaf = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                     st.text(max_size=20), st.sampled_from(["activate", "reclaim", "renew",
                                                            "bacnet", f"{files[0].hex()}"]))
    keys = st.sampled_from(["action", "features", "license_info", "x"])
    tree = st.recursive(leaf, lambda c: st.lists(c, max_size=4)
                        | st.dictionaries(keys, c, max_size=4), max_leaves=12)
    return tree.map(lambda v: json.dumps(v).encode())


def test_agent_https_bodies_get_the_agents_own_answers(device: Device, pki: Pki,
                                                        tmp_path: Path) -> None:
    req = device.request(Action.ACTIVATE, ["bacnet"])
    resp = device.vendor.issue(req, [Grant("bacnet", 1)], now=device.clock())
    info, _ = device.agent.info()
    pool = [req, resp, info]
    lst = listen(f"https://127.0.0.1:0?cert={pki.server_cert}&key={pki.server_key}"
                 f"&ca={pki.ca_cert}", AgentOps(device.agent))
    lst.start()
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(pki.client_cert, pki.client_key)
    port = int(lst.address.rsplit(":", 1)[1])
    done = [0]
    bodies = st.one_of(json_bodies(pool), st.sampled_from(pool), mutated_files(pool),
                       cbor_values.map(cbor2.dumps), st.binary(max_size=300),
                       st.sampled_from([b"[" * 100_000, b'{"action": NaN}', b"\xff", b""]))
    targets = st.one_of(
        st.tuples(st.just("POST"), st.sampled_from(["/v1/request", "/v1/apply"]), bodies,
                  st.sampled_from(["application/json", "application/cbor", ""])),
        st.tuples(st.just("GET"), st.text(max_size=40).map(lambda t: "/v1/check/" + quote(t)),
                  st.just(b""), st.just("")),
    )

    def exchange(method: str, path: str, body: bytes, ctype: str) -> tuple[int, bytes]:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=20, context=ctx)
        try:
            conn.request(method, path, body=body or None,
                         headers={"Content-Type": ctype} if ctype else {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    @FUZZ
    @given(targets)
    def run(case: tuple[str, str, bytes, str]) -> None:
        done[0] += 1
        before = device.store_bytes()
        status, answer = exchange(*case)
        assert status != 500, answer
        if status >= 300:
            err: Any = json.loads(answer)
            assert err["code"] in DOCUMENTED and "\n" not in err["message"], err
            assert device.store_bytes() == before
        elif case[1] == "/v1/apply":
            assert case[2] == resp  # only the valid response is ever applied

    try:
        run()
    finally:
        lst.stop()
    record_inputs(done[0])

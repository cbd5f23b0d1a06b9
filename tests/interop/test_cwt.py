"""Interoperability of our COSE_Sign1 files with python-cwt, an independent COSE implementation.

python-cwt 3.3.0 needs cbor2 < 6 and the project needs cbor2 6.x, so cwt runs
in its own environment ``.venv-cwt`` (``make .venv-cwt/.installed``) through
``tests/interop/cwt_tool.py``, which imports nothing from this project.

Both directions, Ed25519 (EdDSA) and P-256 (ES256): every kind of file we
sign is verified by cwt with a key read from our PEM export and yields the
exact payload bytes we signed; a COSE_Sign1 produced by cwt verifies with our
decoder, and a device applies a cwt-signed response end to end. A flipped
signature byte is refused by both sides.

Snag: with ``kid_auto_inclusion`` cwt puts the kid in the *unprotected*
header; our format requires alg, kid and content type in the protected
header, so the tool passes them there explicitly (auto inclusion off).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import cbor2
import pytest

from agent.cose import ALG_EDDSA, ALG_ES256, PublicKey, SigningKey, decode_sign1, strict_loads
from agent.errors import MalformedError, TrustError
from agent.formats import verify_receipt
from agent.messages import (
    Action,
    Kind,
    Response,
    TrustKey,
    decode_payload,
)
from simulators.licensing_server.vendor import Grant, Vendor
from tests.conftest import Site
from tests.interop.signed_files import (
    ALG_IDS,
    ALGS,
    MAX,
    SignedFile,
    add_device,
    build_files,
    combo_ids,
    flip_signature,
)

ROOT = Path(__file__).resolve().parents[2]
CWT_PYTHON = ROOT / ".venv-cwt" / "bin" / "python"
TOOL = Path(__file__).resolve().with_name("cwt_tool.py")

#: (vendor key, device key): every kind of file is signed with each algorithm once
COMBOS = [(ALG_EDDSA, ALG_ES256), (ALG_ES256, ALG_EDDSA)]
COMBO_IDS = combo_ids(COMBOS)


@pytest.fixture(autouse=True, scope="module")
def _cwt_environment() -> None:
    if not CWT_PYTHON.exists():
        pytest.fail(
            f"{CWT_PYTHON} is missing: python-cwt needs cbor2<6 and runs in "
            f"its own virtualenv; create it with `make .venv-cwt/.installed` "
            f"(`make test` does this)",
            pytrace=False,
        )


def run_cwt(*args: str | Path) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(CWT_PYTHON), str(TOOL), *map(str, args)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode in (0, 1), f"cwt_tool usage/crash:\n{proc.stderr}"
    return proc


def cwt_verify(tmp: Path, data: bytes, pk: PublicKey) -> dict[str, Any] | None:
    """cwt's verdict on ``data`` with ``pk``: the decoded headers and payload, or None if refused."""
    msg = tmp / "msg.cose"
    pem = tmp / "pub.pem"
    msg.write_bytes(data)
    pem.write_bytes(pk.to_pem())
    proc = run_cwt("verify", msg, pem)
    if proc.returncode == 1:
        assert "cwt refused" in proc.stderr
        return None
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def cwt_sign(tmp: Path, payload: bytes, key: SigningKey, content_type: str,
             *, auto_headers: bool = False) -> bytes:
    src, pem, out = tmp / "payload.cbor", tmp / "key.pem", tmp / "signed.cose"
    src.write_bytes(payload)
    pem.write_bytes(key.to_pem())
    flags = ["--auto-headers"] if auto_headers else []
    proc = run_cwt("sign", src, pem, key.public.kid.hex(), key.public.alg_name, out,
                   content_type, *flags)
    assert proc.returncode == 0, proc.stderr
    return out.read_bytes()


@pytest.fixture(scope="module", params=COMBOS, ids=COMBO_IDS)
def files(request: pytest.FixtureRequest,
          tmp_path_factory: pytest.TempPathFactory) -> dict[Kind, SignedFile]:
    vendor_alg, device_alg = request.param
    return build_files(tmp_path_factory.mktemp("cwt"), vendor_alg, device_alg, "CWT")


# ---------------------------------------------------------------- our files, read by cwt


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_cwt_verifies_our_file(
    tmp_path: Path, files: dict[Kind, SignedFile], kind: Kind
) -> None:
    f = files[kind]
    out = cwt_verify(tmp_path, f.data, f.signer)
    assert out is not None, "cwt refused a file we signed"
    assert bytes.fromhex(out["payload"]) == f.payload
    assert out["alg"] == f.signer.alg
    assert out["kid"] == f.signer.kid.hex()
    assert out["content_type"] == kind.content_type
    assert set(out["protected"]) == {"1", "3", "4"}
    assert out["unprotected"] == {}
    assert decode_payload(strict_loads(f.payload, max_size=MAX)).KIND is kind


@pytest.mark.parametrize("kind", list(Kind), ids=str)
def test_cwt_refuses_our_file_with_a_flipped_signature(
    tmp_path: Path, files: dict[Kind, SignedFile], kind: Kind
) -> None:
    f = files[kind]
    bad = flip_signature(f.data)
    assert cwt_verify(tmp_path, bad, f.signer) is None
    with pytest.raises(TrustError):
        decode_sign1(bad, max_size=MAX).verify_with(f.signer)


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_cwt_refuses_our_file_with_another_key(tmp_path: Path, alg: int) -> None:
    key = SigningKey.generate(alg)
    vendor = Vendor(key)
    data = vendor.trust_update([TrustKey(key.public)], version=1, now=1_800_000_000)
    assert cwt_verify(tmp_path, data, key.public) is not None
    assert cwt_verify(tmp_path, data, SigningKey.generate(alg).public) is None


# ---------------------------------------------------------------- cwt's files, read by us


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_we_verify_a_cwt_sign1(tmp_path: Path, alg: int) -> None:
    key = SigningKey.generate(alg)
    site = Site(Vendor(key), tmp_path)
    dev = add_device(site, alg, "CWT")
    req = Vendor.read_request(dev.request(Action.ACTIVATE, ["bacnet"]))
    resp = site.vendor.response_for(
        req, site.vendor.changes_for(req, [Grant("bacnet", 5)], ()), now=site.clock()
    )
    payload = resp.encode()

    data = cwt_sign(tmp_path, payload, key, Kind.RESPONSE.content_type)
    assert cbor2.loads(data).tag == 18
    env = decode_sign1(data, max_size=MAX)
    assert (env.alg, env.kid, env.content_type) == (alg, key.public.kid,
                                                    Kind.RESPONSE.content_type)
    assert env.verify_with(key.public) == payload
    assert decode_payload(strict_loads(env.payload, max_size=MAX), Response) == resp

    bad = flip_signature(data)
    with pytest.raises(TrustError):
        decode_sign1(bad, max_size=MAX).verify_with(key.public)
    with pytest.raises(TrustError):
        env.verify_with(SigningKey.generate(alg).public)


@pytest.mark.parametrize(("vendor_alg", "device_alg"), COMBOS, ids=COMBO_IDS)
def test_device_applies_a_cwt_signed_response(
    tmp_path: Path, vendor_alg: int, device_alg: int
) -> None:
    vendor = Vendor(SigningKey.generate(vendor_alg))
    site = Site(vendor, tmp_path / "site")
    dev = add_device(site, device_alg, "CWT")
    req = vendor.read_request(dev.request(Action.ACTIVATE, ["bacnet"]))
    resp = vendor.response_for(req, vendor.changes_for(req, [Grant("bacnet", 7)], ()),
                               now=site.clock())
    work = tmp_path / "cwt"
    work.mkdir()
    data = cwt_sign(work, resp.encode(), vendor.key, Kind.RESPONSE.content_type)

    before = dev.store_bytes()
    with pytest.raises(TrustError):
        dev.agent.apply(flip_signature(data))
    assert dev.store_bytes() == before
    assert not dev.agent.check("bacnet").licensed

    result, _ = dev.agent.apply(data)
    assert not result.already_applied
    assert result.response == resp
    assert dev.agent.check("bacnet").licensed
    assert [lic["count"] for lic in dev.agent.status()["licenses"]] == [7]
    rc = verify_receipt(result.receipt, [vendor.public])
    assert rc.response == data
    # cwt verifies the device-signed receipt that embeds its own response
    out = cwt_verify(work, result.receipt, rc.device_key)
    assert out is not None and bytes.fromhex(out["payload"]) == rc.encode()


def test_cwt_auto_headers_put_kid_unprotected_and_we_refuse(tmp_path: Path) -> None:
    """cwt's kid_auto_inclusion is valid COSE, but not our format: kid must be protected."""
    key = SigningKey.generate(ALG_EDDSA)
    payload = cbor2.dumps({"v": 1, "kind": "response"})
    data = cwt_sign(tmp_path, payload, key, Kind.RESPONSE.content_type, auto_headers=True)
    _p, unprotected, _payload, _sig = cbor2.loads(data).value
    assert unprotected == {4: key.public.kid}
    out = cwt_verify(tmp_path, data, key.public)
    assert out is not None and bytes.fromhex(out["payload"]) == payload  # cwt itself accepts it
    with pytest.raises(MalformedError, match="protected header"):
        decode_sign1(data, max_size=MAX)


def test_cwt_tool_uses_only_its_own_environment() -> None:
    """The tool must not import the project (it runs against cbor2 < 6)."""
    proc = subprocess.run(
        [str(CWT_PYTHON), "-c", "import importlib.metadata as m;"
         "print(m.version('cbor2'), m.version('cwt'))"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    cbor2_version, cwt_version = proc.stdout.split()
    assert int(cbor2_version.split(".")[0]) < 6
    assert cwt_version == "3.3.0"
    source = TOOL.read_text()
    for mod in ("agent", "simulators", "hw", "tests"):
        assert f"from {mod}" not in source and f"import {mod}" not in source

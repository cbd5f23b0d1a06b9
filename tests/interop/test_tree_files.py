"""Issue 14 item 6: the system tree's signed files (grant, grant-return, and a reclaim
receipt carrying returns and leases) read by pycose and python-cwt, and a grant signed by
pycose installed on a child end to end; Ed25519 and ES256 on either side.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from pycose.headers import KID, Algorithm, ContentType

from agent import inherit
from agent.cose import ALG_EDDSA, ALG_ES256, PublicKey, decode_sign1
from agent.errors import TrustError
from agent.formats import verify_receipt
from agent.messages import Action
from agent.record import replace
from agent.tree import ParentLink
from simulators.licensing_server.vendor import Grant
from tests.conftest import Device, Site
from tests.interop.signed_files import ALG_IDS, ALGS, MAX, add_device, flip_signature
from tests.interop.test_cwt import cwt_verify
from tests.interop.test_pycose import (
    PYCOSE_ALG,
    pycose_decode,
    pycose_private,
    pycose_sign,
    pycose_verifies,
)

COMBOS = [(p, c) for p in ALGS for c in ALGS]
IDS = [f"parent-{ALG_IDS[p]}-child-{ALG_IDS[c]}" for p, c in COMBOS]


def _system(root: Path, parent_alg: int, child_alg: int, vendor_alg: int = ALG_EDDSA
            ) -> tuple[Site, Device, Device]:
    from agent.cose import SigningKey
    from simulators.licensing_server.vendor import Vendor

    site = Site(Vendor(SigningKey.generate(vendor_alg)), root)
    parent = _enterprise_server(site, parent_alg)
    child = add_device(site, child_alg, "KID")
    req = parent.agent.request(Action.ACTIVATE, ["SNMP"])
    parent.agent.apply(site.vendor.issue(req, [Grant("SNMP", 2, inherit=2)], now=site.clock()))
    info, _i = parent.agent.info()
    child.agent.attach(info, None, 0)
    return site, parent, child


def _enterprise_server(site: Site, alg: int) -> Device:
    from agent.identity import HardwareFacts
    from agent.service import Agent
    from hw.facts import StaticFactsProvider

    site.n += 1
    facts = StaticFactsProvider(HardwareFacts(model="Enterprise-Server", serial=f"ES{site.n}",
                                              macs=(f"52:54:00:00:0e:{site.n:02x}",)))
    d = site.root / f"dev{site.n}"
    agent = Agent(d, facts, clock=site.clock)
    agent.init("Enterprise-Server", None, [site.vendor.public], alg=alg)
    return Device(d, site.clock, facts, agent, site.vendor)


def _grant_and_return(site: Site, parent: Device, child: Device) -> tuple[bytes, bytes]:
    info, _i = child.agent.info()
    issued, _st = parent.agent.renew_child(info, None, {})
    (grant,) = issued.files
    installed, _refused, _ret = child.agent.install_grants(
        parent.agent.state()[0].device_id, [grant], [])
    assert installed == ["SNMP"]
    with child.agent._open() as (store, now):
        ret, _f = inherit.make_return(store.state, ["SNMP"], store.key, now)
    return grant, ret


def _both_read(tmp_path: Path, data: bytes, key: PublicKey, ctype: str, cls: type) -> None:
    """pycose and python-cwt read ``data`` (signed with ``key``, content type ``ctype``) and
    refuse it with a flipped signature; its payload is ``cls`` encoded canonically."""
    msg = pycose_decode(data)
    assert msg.phdr[Algorithm] is PYCOSE_ALG[key.alg]
    assert msg.phdr[KID] == key.kid == hashlib.sha256(key.raw).digest()
    assert msg.phdr[ContentType] == ctype
    assert pycose_verifies(data, key) is True
    assert pycose_verifies(flip_signature(data), key) is False
    assert cls.decode(msg.payload).encode() == msg.payload  # canonical, byte for byte
    out = cwt_verify(tmp_path, data, key)
    assert out is not None and bytes.fromhex(out["payload"]) == msg.payload
    assert out["content_type"] == ctype and set(out["protected"]) == {"1", "3", "4"}
    assert cwt_verify(tmp_path, flip_signature(data), key) is None


@pytest.mark.parametrize(("parent_alg", "child_alg"), COMBOS, ids=IDS)
def test_pycose_and_cwt_read_grants_and_returns(tmp_path: Path, parent_alg: int,
                                                child_alg: int) -> None:
    site, parent, child = _system(tmp_path, parent_alg, child_alg)
    grant, ret = _grant_and_return(site, parent, child)
    pkey = parent.agent.state()[0].device_key
    ckey = child.agent.state()[0].device_key
    for data, key, ctype, cls in ((grant, pkey, inherit.GRANT_CONTENT_TYPE, inherit.Grant),
                                  (ret, ckey, inherit.RETURN_CONTENT_TYPE, inherit.GrantReturn)):
        _both_read(tmp_path, data, key, ctype, cls)
    # the grant carries the vendor's response exactly: pycose verifies that link too
    g = inherit.Grant.decode(decode_sign1(grant, max_size=MAX).payload)
    assert pycose_verifies(g.license, site.vendor.public) is True


@pytest.mark.parametrize("alg", ALGS, ids=ALG_IDS.get)
def test_a_child_installs_a_grant_signed_by_pycose(tmp_path: Path, alg: int) -> None:
    _site, parent, child = _system(tmp_path, alg, ALG_ES256 if alg == ALG_EDDSA else ALG_EDDSA)
    info, _i = child.agent.info()
    issued, _st = parent.agent.renew_child(info, None, {})
    ours = decode_sign1(issued.files[0], max_size=MAX)
    with parent.agent._open() as (store, _now):
        priv = load_pem_private_key(store.key.to_pem(), None)
        kid = store.key.public.kid
    data = pycose_sign(ours.payload, pycose_private(priv), alg, kid,  # type: ignore[arg-type]
                       inherit.GRANT_CONTENT_TYPE)
    assert data != issued.files[0] or alg == ALG_EDDSA  # ES256 signatures differ each time
    pid = parent.agent.state()[0].device_id
    before = child.store_bytes()
    _i2, refused, _r = child.agent.install_grants(pid, [flip_signature(data)], [])
    assert refused and refused[0].startswith("untrusted")
    assert not child.agent.check("SNMP").licensed
    installed, refused, _r = child.agent.install_grants(pid, [data], [])
    assert installed == ["SNMP"] and refused == []
    assert child.agent.check("SNMP").licensed
    assert child.store_bytes() != before


def test_reclaim_receipt_with_returns_and_leases_reads_in_pycose_and_cwt(
        tmp_path: Path) -> None:
    site, parent, child = _system(tmp_path, ALG_ES256, ALG_EDDSA)
    other = add_device(site, ALG_EDDSA, "TWO")
    pinfo, _i = parent.agent.info()
    other.agent.attach(pinfo, None, 0)
    info, _i = child.agent.info()
    parent.agent.renew_child(info, None, {})
    oinfo, _i = other.agent.info()
    issued, _st = parent.agent.renew_child(oinfo, None, {})
    pid = parent.agent.state()[0].device_id
    other.agent.install_grants(pid, issued.files, [])
    # the first child gives its grant back; the other keeps its lease (forced reclaim)
    _inst, _ref, ret = child.agent.install_grants(pid, [], ["SNMP"])
    assert ret is not None
    parent.agent.accept_return(ret)
    req = parent.agent.request(Action.RECLAIM, ["SNMP"], force=True)
    res, _w = parent.agent.apply(site.vendor.issue(req, removes=["SNMP"], now=site.clock()))
    rc = verify_receipt(res.receipt, [site.vendor.public])
    assert rc.returns == (ret,)
    assert [x["child_id"] for x in rc.leases] == [other.agent.state()[0].device_id]
    key: PublicKey = parent.agent.state()[0].device_key
    assert pycose_verifies(res.receipt, key) is True
    out = cwt_verify(tmp_path, res.receipt, key)
    assert out is not None and bytes.fromhex(out["payload"]) == rc.encode()
    with pytest.raises(TrustError):
        decode_sign1(flip_signature(res.receipt), max_size=MAX).verify_with(key)


def test_a_grant_link_signed_by_the_wrong_parent_key_is_refused(tmp_path: Path) -> None:
    site, parent, child = _system(tmp_path, ALG_EDDSA, ALG_EDDSA)
    info, _i = child.agent.info()
    issued, _st = parent.agent.renew_child(info, None, {})
    st = child.agent.state()[0]
    p = st.system.parent
    assert p is not None
    from agent.cose import SigningKey

    impostor = SigningKey.generate(ALG_ES256).public
    fake = replace(st, system=replace(st.system, parent=ParentLink(
        p.device_id, impostor, p.model, p.url, p.depth, p.attached)))
    with pytest.raises(TrustError, match="not signed by the parent's key"):
        inherit.verify_grant(fake, issued.files[0], site.clock(), child.agent.limits)


@pytest.mark.parametrize(("parent_alg", "child_alg"), COMBOS, ids=IDS)
def test_pycose_and_cwt_read_a_carried_attach_request_and_answer(
        tmp_path: Path, parent_alg: int, child_alg: int) -> None:
    """Issue 14 item 2: the attach request (signed by the child) and the attach answer
    (signed by the parent) of a carried stick verify in pycose and python-cwt; the answer
    carries the parent's device information and a grant pycose verifies as well."""
    from agent import carried
    from agent.digest import sha256

    site, parent, _attached = _system(tmp_path, parent_alg, child_alg)
    child = add_device(site, child_alg, "CARRIED")
    request = child.agent.attach_request()
    answer, _issued = parent.agent.answer_attach(request)
    pkey = parent.agent.state()[0].device_key
    ckey = child.agent.state()[0].device_key
    for data, key, ctype, cls in (
            (request, ckey, carried.REQUEST_CONTENT_TYPE, carried.AttachRequest),
            (answer, pkey, carried.ANSWER_CONTENT_TYPE, carried.AttachAnswer)):
        _both_read(tmp_path, data, key, ctype, cls)
    ans = carried.AttachAnswer.decode(pycose_decode(answer).payload)
    assert ans.request == sha256(request) and ans.child_id == child.agent.state()[0].device_id
    assert pycose_verifies(ans.parent_info, pkey) is True
    (grant,) = ans.grants
    assert pycose_verifies(grant, pkey) is True
    # and the child takes it
    pid, installed, refused, ret = child.agent.apply_attach_answer(answer, request, "usbdrop:///x")
    assert (pid, installed, refused, ret) == (parent.agent.state()[0].device_id, ["SNMP"], [],
                                              None)

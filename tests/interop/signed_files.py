"""One file of every kind, made by the real agent and vendor code, for the interoperability checks.

Shared by the pycose and python-cwt tests: each independent COSE library
must read exactly these files and yield exactly the payload bytes we signed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cbor2

from agent.cose import ALG_EDDSA, ALG_ES256, PublicKey, SigningKey
from agent.formats import verify_receipt
from agent.identity import HardwareFacts
from agent.messages import (
    Action,
    Kind,
    License,
    LicenseInfo,
    LicenseInfoEntry,
    TransferReceipt,
    TrustKey,
    TrustUpdate,
)
from agent.protocol import DEFAULT_LIMITS, self_signed_payload
from agent.service import Agent
from hw.facts import StaticFactsProvider
from simulators.licensing_server.vendor import DAY, Grant, Vendor
from tests.conftest import Device, Site

MAX = DEFAULT_LIMITS.max_file
ALGS = [ALG_EDDSA, ALG_ES256]
ALG_IDS = {ALG_EDDSA: "EdDSA", ALG_ES256: "ES256"}


def combo_ids(combos: list[tuple[int, int]]) -> list[str]:
    """Test IDs for (vendor key, device key) algorithm pairs."""
    return [f"vendor-{ALG_IDS[v]}-device-{ALG_IDS[d]}" for v, d in combos]


@dataclass(frozen=True)
class SignedFile:
    data: bytes
    signer: PublicKey
    payload: bytes  # the exact bytes our code encoded and signed


def flip_signature(data: bytes) -> bytes:
    """``data`` with the last byte of the signature flipped, everything else unchanged."""
    bad = data[:-1] + bytes([data[-1] ^ 0x01])
    good_v, bad_v = cbor2.loads(data).value, cbor2.loads(bad).value
    assert tuple(bad_v[:3]) == tuple(good_v[:3]) and bad_v[3] != good_v[3]
    return bad


def add_device(site: Site, alg: int, tag: str) -> Device:
    """Like ``Site.device()``, with the device key's algorithm chosen; ``tag`` keeps serials apart."""
    site.n += 1
    serial = f"SN-{tag}{site.n:03d}"
    facts = StaticFactsProvider(
        HardwareFacts(model="AS-P", serial=serial, macs=(f"00:80:f4:00:{len(tag):02x}:{site.n:02x}",))
    )
    d = site.root / f"dev{site.n}"
    agent = Agent(d, facts, clock=site.clock)
    agent.init("AS-P", serial, [site.vendor.public], alg=alg)
    return Device(d, site.clock, facts, agent, site.vendor)


def build_files(root: Path, vendor_alg: int, device_alg: int, tag: str) -> dict[Kind, SignedFile]:
    """One file of every kind, produced by the real agent and vendor code."""
    site = Site(Vendor(SigningKey.generate(vendor_alg)), root)
    vendor = site.vendor
    dev = add_device(site, device_alg, tag)
    device_key = dev.agent.state()[0].device_key
    assert device_key.alg == device_alg

    info_bytes, info = dev.agent.info()
    req_bytes = dev.request(Action.ACTIVATE, ["bacnet"])
    resp_bytes = vendor.issue(req_bytes, [Grant("bacnet", 5)], now=site.clock())
    result, _ = dev.agent.apply(resp_bytes)

    now = site.clock()
    lic = License("bacnet", 5)
    lic_info_bytes = vendor.license_info({info.device_id: ([lic], [])}, now=now)
    lic_info = LicenseInfo(entries=(LicenseInfoEntry(info.device_id, (lic,), ()),),
                           issued=now, expires=now + 30 * DAY)
    keys = (TrustKey(vendor.public), TrustKey(SigningKey.generate().public, not_before=now))
    trust_bytes = vendor.trust_update(keys, version=2, now=now)
    trust = TrustUpdate(version=2, keys=keys, issued=now)

    # issue 16: a direct transfer of a transferable license to a second device, and its receipt
    req2 = dev.request(Action.ACTIVATE, ["modbus"])
    dev.agent.apply(vendor.issue(req2, [Grant("modbus", 2, transferable=True)], now=site.clock()))
    dev2 = add_device(site, device_alg, tag + "t")
    to = dev2.agent.state()[0].device_id
    transfer_bytes = dev.agent.transfer_out(["modbus"], to)
    transfer_rc, transfer = dev2.agent.apply_transfer(transfer_bytes)
    transfer_receipt = self_signed_payload(transfer_rc, TransferReceipt)[0]

    return {
        Kind.TRANSFER: SignedFile(transfer_bytes, device_key, transfer.encode()),
        Kind.TRANSFER_RECEIPT: SignedFile(transfer_rc, dev2.agent.state()[0].device_key,
                                          transfer_receipt.encode()),
        Kind.DEVICE_INFO: SignedFile(info_bytes, device_key, info.encode()),
        Kind.REQUEST: SignedFile(req_bytes, device_key, Vendor.read_request(req_bytes).encode()),
        Kind.RESPONSE: SignedFile(resp_bytes, vendor.public, result.response.encode()),
        Kind.RECEIPT: SignedFile(result.receipt, device_key,
                                 verify_receipt(result.receipt, [vendor.public]).encode()),
        Kind.LICENSE_INFO: SignedFile(lic_info_bytes, vendor.public, lic_info.encode()),
        Kind.TRUST_UPDATE: SignedFile(trust_bytes, vendor.public, trust.encode()),
    }

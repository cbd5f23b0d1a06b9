"""Issue 16 item 6 in the emulated server: ``qemu://arm64?tpm=1`` gives the guest a TPM 2.0.

swtpm runs on the host, qemu passes it to the arm64 virt machine as ``tpm-tis-device``,
the guest kernel's ``tpm_tis`` module makes ``/dev/tpmrm0``, and the guest provisions its
store with ``licagent init --key-store tpm:///dev/tpmrm0`` (tpm2-tools in the image). The
store then holds no private key; licenses are activated over the LAN port; the state
disk copied to another server (another TPM) is refused at open, and so is the disk put
back from an older copy on the same server (its TPM's counter is ahead).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

import hw
from agent.cose import SigningKey
from agent.rpc import TransportError
from hw.backends.qemu import QemuClient, QemuGuest
from simulators.licensing_server.vendor import Grant, Vendor
from tests.qemu.conftest import GUEST_STATE, GuestAgent

pytestmark = pytest.mark.skipif(shutil.which("swtpm") is None,
                                reason="swtpm is not installed (make swtpm)")


def activate(client: hw.ServerClient, vendor: Vendor, feature: str, count: int) -> None:
    req = client.request("activate", [feature])
    client.apply(vendor.issue(req, [Grant(feature, count)], now=int(time.time())))


def refusal(guest: QemuGuest) -> list[str]:
    """The guest agent's error lines on the console (licagent's one-line refusals)."""
    return [x for x in guest.lines if x.startswith("licagent: ")]


def test_tpm_guest_activates_and_its_copied_store_is_refused(
        tmp_path: Path, qemu_image: Path) -> None:
    vendor = Vendor(SigningKey.generate())
    trust = tmp_path / "vendor.pub"
    trust.write_bytes(vendor.public.to_pem())
    disk = tmp_path / "as-p.img"
    url = (f"qemu://arm64?state={disk}&trust={trust}&image={qemu_image}&serial=AS-P-TPM-1"
           f"&tpm=1&link=tcp&timeout=60&console={tmp_path / 'console.log'}")
    c = hw.connect(url)
    try:
        assert isinstance(c, QemuClient)
        rc, out = c.guest.run("ls", GUEST_STATE)
        assert rc == 0 and "device.tpm" in out.split() and "device.key" not in out.split(), out
        rc, out = c.guest.run("grep", "-c", "PRIVATE", f"{GUEST_STATE}/device.tpm")
        assert rc == 1 and out.strip() == "0", out  # nothing to sign with in the store
        activate(c, vendor, "bacnet", 3)
        assert c.check("bacnet")["licensed"] is True
        assert GuestAgent(c.guest).check("bacnet").licensed
    finally:
        c.close()
    assert c.guest.proc is None and c.guest.tpm_state.is_dir()

    # the same server boots again: the TPM is its own, the license is there
    same = QemuGuest(disk, qemu_image, tpm=True, console=tmp_path / "console.log")
    same.start()
    try:
        assert GuestAgent(same).check("bacnet").licensed
    finally:
        same.stop()

    # the state disk copied into another server: another TPM, no device key in it
    copy = tmp_path / "other.img"
    shutil.copyfile(disk, copy)
    other = QemuGuest(copy, qemu_image, tpm=True, console=tmp_path / "other-console.log")
    with pytest.raises(TransportError, match="its agent ended"):
        other.start(timeout=120)
    assert other.proc is None
    lines = refusal(other)
    assert len(lines) == 1 and "which this TPM does not hold" in lines[0], lines
    print(lines[0])


def test_tpm_guest_restored_from_an_older_disk_copy_is_refused(
        tmp_path: Path, qemu_image: Path) -> None:
    vendor = Vendor(SigningKey.generate())
    trust = tmp_path / "vendor.pub"
    trust.write_bytes(vendor.public.to_pem())
    disk = tmp_path / "as-p.img"
    guest = QemuGuest(disk, qemu_image, trust=trust, serial="AS-P-TPM-2", tpm=True,
                      console=tmp_path / "console.log")
    guest.start()
    try:
        with hw.connect(f"{guest.tcp_url}?timeout=60") as c:
            activate(c, vendor, "bacnet", 3)
    finally:
        assert guest.stop()
    backup = tmp_path / "backup.img"
    shutil.copyfile(disk, backup)  # the whole disk imaged while the server is off
    guest.start()
    try:
        with hw.connect(f"{guest.tcp_url}?timeout=60") as c:
            req = c.request("reclaim", ["bacnet"])
            c.apply(vendor.issue(req, now=int(time.time())))
            assert c.check("bacnet")["licensed"] is False
    finally:
        assert guest.stop()
    shutil.copyfile(backup, disk)  # the old image put back: bacnet would come back
    with pytest.raises(TransportError, match="its agent ended"):
        guest.start(timeout=120)
    lines = refusal(guest)
    assert len(lines) == 1 and "restored from an older copy" in lines[0], lines
    print(lines[0])

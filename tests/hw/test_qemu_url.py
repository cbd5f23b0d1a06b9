"""qemu:// URL handling without booting a guest: every bad option is a clear usage error.

The guest itself is exercised by tests/qemu (`make test-qemu`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import hw
from agent.errors import UsageError
from hw.backends.qemu import QemuGuest


def fake_image(tmp: Path) -> Path:
    """An image folder whose manifest names existing (empty) files: enough for URL checks."""
    image = tmp / "image"
    image.mkdir()
    files = {k: str(image / k) for k in ("kernel", "initrd", "root")}
    for f in files.values():
        Path(f).write_bytes(b"")
    (image / "image.json").write_text(json.dumps(files))
    return image


@pytest.mark.parametrize(("url", "words"), [
    ("qemu://arm64?bogus=1", ["bogus"]),
    ("qemu://arm32", ["qemu://arm64"]),
    ("qemu://arm64?link=usb", ["serial or tcp", "usb"]),
    ("qemu://arm64?memory=lots", ["memory", "number"]),
    ("qemu://arm64?boot_timeout=0", ["boot_timeout", "at least"]),
    ("qemu://arm64?tpm=yes", ["tpm must be 0 or 1", "'yes'"]),
])
def test_bad_options_are_usage_errors_naming_them(url: str, words: list[str]) -> None:
    with pytest.raises(UsageError) as err:
        hw.connect(url)
    for w in words:
        assert w in str(err.value)


def test_a_missing_image_says_how_to_build_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="make qemu-image"):
        hw.connect(f"qemu://arm64?image={tmp_path}/none")


def test_a_new_state_disk_needs_a_trust_key(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    with pytest.raises(UsageError, match="trust="):
        hw.connect(f"qemu://arm64?image={image}&state={tmp_path}/new.img")
    assert not (tmp_path / "new.img").exists()


@pytest.mark.parametrize(("kw", "word"), [
    ({"model": "AS-X"}, "model"), ({"serial": "SN 1"}, "serial"),
    ({"mac": "52:54:00:zz:00:01"}, "mac"), ({"time": "now; reboot"}, "time"),
])
def test_guest_settings_are_checked(tmp_path: Path, kw: dict[str, str], word: str) -> None:
    with pytest.raises(UsageError, match=word):
        QemuGuest(tmp_path / "s.img", fake_image(tmp_path), **kw)  # type: ignore[arg-type]


def test_the_mac_address_is_stable_per_state_disk(tmp_path: Path) -> None:
    image = fake_image(tmp_path)
    a = QemuGuest(tmp_path / "a.img", image).mac
    assert a == QemuGuest(tmp_path / "a.img", image).mac
    assert a != QemuGuest(tmp_path / "b.img", image).mac
    assert a.startswith("52:54:00:")


def test_qemu_is_not_a_daemon_listener() -> None:
    with pytest.raises(UsageError, match="client-side"):
        hw.listen("qemu://arm64", lambda op, args: None)


def test_a_tpm_guest_gets_the_tpm_device_and_keeps_its_tpm_beside_the_disk(
        tmp_path: Path) -> None:
    """tpm=1: qemu reaches swtpm's control socket as the virt machine's MMIO TPM, and the
    TPM's state is the state disk's (STATE.tpm); without it, no TPM device at all."""
    image = fake_image(tmp_path)
    g = QemuGuest(tmp_path / "as-p.img", image, tpm=True)
    assert g.tpm_state == tmp_path / "as-p.img.tpm"
    cmd = g.command("/tmp/licswtpm-x/ctrl")
    i = cmd.index("-tpmdev")
    assert cmd[i - 2:i + 4] == ["-chardev", "socket,id=chrtpm,path=/tmp/licswtpm-x/ctrl",
                                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
                                "-device", "tpm-tis-device,tpmdev=tpm0"]
    assert "-tpmdev" not in QemuGuest(tmp_path / "b.img", image).command()

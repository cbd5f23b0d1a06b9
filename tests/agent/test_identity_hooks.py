"""Hardware facts overrides and bindings of nothing, staged on real (namespaced) hardware.

Issue 13, items 3 and 4. "Hardware" here is what ``hw.facts.LinuxFactsProvider``
really reads: a network namespace of its own with an ``eth0`` (a real kernel
bridge device with the MAC we give it; sysfs mounted for that namespace) and a
real ``/etc/machine-id`` bind-mounted in a private mount namespace. Server A and
server B differ in both, as two units of one model do; ``licagent`` runs there
as a real subprocess without ``--facts``, exactly as on a controller.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.cose import SigningKey, canonical, strict_loads
from agent.errors import CopiedStoreError, FactsOverrideError, NoIdentityError
from agent.formats import read_device_info
from agent.identity import HardwareFacts
from agent.messages import TrustKey
from agent.protocol import new_state
from agent.service import Agent
from agent.store import SLOTS, Store, decode_slot, encode_slot
from hw.facts import LinuxFactsProvider, StaticFactsProvider
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0, Clock

BIN = Path(sys.executable).parent
#: (MAC of eth0, machine ID) of each simulated unit; None: the unit lacks it
HARDWARE: dict[str, tuple[str | None, str]] = {
    "A": ("00:80:f4:0a:00:01", "a1" * 16),
    "B": ("00:80:f4:0b:00:02", "b2" * 16),
    "nothing": (None, "uninitialized"),
}
#: inside fresh mount and network namespaces: sysfs of the new namespace, one NIC, a machine ID
_ON_HARDWARE = (
    'mount -t sysfs sysfs /sys || exit 97; '
    'if [ -n "$1" ]; then ip link add eth0 address "$1" type bridge || exit 97; fi; '
    'mount --bind "$2" /etc/machine-id || exit 97; shift 2; exec "$@"'
)


def _namespaces_work() -> str | None:
    """Why real namespaced hardware cannot be staged here, or None if it can."""
    if os.geteuid() != 0:
        return "needs root (mount and network namespaces)"
    if not all(shutil.which(t) for t in ("unshare", "ip")) or not Path("/etc/machine-id").is_file():
        return "needs unshare, ip and /etc/machine-id"
    probe = subprocess.run(["unshare", "-m", "-n", "sh", "-c", _ON_HARDWARE, "sh",
                            "02:00:00:00:00:01", "/etc/machine-id", "true"],
                           capture_output=True, text=True, timeout=30, check=False)
    return None if probe.returncode == 0 else f"cannot stage hardware: {probe.stderr.strip()}"


needs_namespaces = pytest.mark.skipif(_namespaces_work() is not None,
                                      reason=str(_namespaces_work()))


class Servers:
    """Run the tools on unit A, unit B or a unit with no identity, in ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {k: v for k, v in os.environ.items() if k != "LICAGENT_FACTS"}
        self.env["LICAGENT_TIME"] = str(T0)
        for name, (_mac, mid) in HARDWARE.items():
            (root / f"machine-id.{name}").write_text(mid + "\n")

    def run(self, where: str | None, tool: str, *args: str, code: int = 0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        argv = [str(BIN / tool), *args]
        if where is not None:
            mac, _mid = HARDWARE[where]
            argv = ["unshare", "-m", "-n", "sh", "-c", _ON_HARDWARE, "sh", mac or "",
                    str(self.root / f"machine-id.{where}"), *argv]
        p = subprocess.run(argv, cwd=self.root, env={**self.env, **(env or {})},
                           capture_output=True, text=True, timeout=60, check=False)
        assert p.returncode == code, (where, args, p.returncode, p.stdout, p.stderr)
        return p


def tree_bytes(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def slot_bytes(d: Path) -> dict[str, bytes]:
    """The license state: both slots and the device key, which a refusal never touches."""
    return {n: b for n, b in tree_bytes(d).items() if n in (*SLOTS, "device.key")}


def refusals(d: Path) -> list[object]:
    """The reasons of the journal's ``refused`` records."""
    return [e.data.get("reason") for e in Store.open(d, None).journal.read().entries
            if e.event == "refused" and isinstance(e.data, dict)]


def one_line(stderr: str, reason: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"licagent: {reason}: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture
def servers(tmp_path: Path) -> Servers:
    s = Servers(tmp_path)
    s.run(None, "licserver", "keygen", "--out", "v")
    return s


# ---------------------------------------------------------------- item 3: facts override


@needs_namespaces
def test_copied_real_store_given_the_first_servers_facts_is_refused(servers: Servers) -> None:
    """The attack: copy a licensed store, replay the facts its own device-information discloses."""
    run = servers.run
    run("A", "licagent", "init", "--state", "A", "--model", "AS-P", "--trust", "v/vendor.pub")
    assert Store.open(servers.root / "A", None).state.simulated is False
    run("A", "licagent", "request", "--state", "A", "activate", "--feature", "bacnet",
        "--out", "r1")
    run(None, "licserver", "issue", "--key", "v/vendor.key", "--request", "r1",
        "--grant", "bacnet=10", "--out", "p1")
    run("A", "licagent", "apply", "--state", "A", "p1")
    run("A", "licagent", "check", "--state", "A", "bacnet")
    run("A", "licagent", "info", "--state", "A", "--out", "a.info")
    # the public device information names A's facts: the attacker's facts file
    hw = read_device_info((servers.root / "a.info").read_bytes()).hardware
    assert hw["macs"] == [HARDWARE["A"][0]] and hw["machine_id"] == HARDWARE["A"][1]
    (servers.root / "stolen.json").write_text(json.dumps(dict(hw)))

    shutil.copytree(servers.root / "A", servers.root / "B")
    # B is other hardware indeed: the copy alone is refused there
    err = run("B", "licagent", "check", "--state", "B", "bacnet", code=5).stderr
    assert "belongs to other hardware" in one_line(err, "copied-store")
    before = slot_bytes(servers.root / "B")
    # ... and with A's facts given in any of the three ways, it is refused too (journaled)
    line = one_line(run("B", "licagent", "check", "--state", "B", "--facts", "stolen.json",
                        "bacnet", code=2).stderr, "facts-override")
    assert "bound to the hardware it was initialised on" in line and "run without it" in line
    run("B", "licagent", "status", "--state", "B", code=2,
        env={"LICAGENT_FACTS": "stolen.json"})
    run("B", "licagent", "apply", "--state", "B", "--facts", "stolen.json", "p1", code=2)
    (servers.root / "licagent.toml").write_text(
        'state = "B"\nfacts = "stolen.json"\nlisten = ["tcp://127.0.0.1:0"]\n')
    daemon = run("B", "licagent", "run", "--config", "licagent.toml", code=2)
    assert "listening" not in daemon.stdout
    one_line(daemon.stderr, "facts-override")
    assert slot_bytes(servers.root / "B") == before
    assert refusals(servers.root / "B") == ["copied-store"] + ["facts-override"] * 4
    # the override is refused on A itself too (it cannot know it is on A); A without it works
    run("A", "licagent", "check", "--state", "A", "--facts", "stolen.json", "bacnet", code=2)
    run("A", "licagent", "check", "--state", "A", "bacnet")


@needs_namespaces
def test_the_real_hardware_mark_cannot_be_flipped_by_editing_the_store(servers: Servers) -> None:
    run = servers.run
    run("A", "licagent", "init", "--state", "A", "--model", "AS-P", "--trust", "v/vendor.pub")
    run("A", "licagent", "info", "--state", "A", "--out", "a.info")
    hw = read_device_info((servers.root / "a.info").read_bytes()).hardware
    (servers.root / "stolen.json").write_text(json.dumps(dict(hw)))
    false_mark = canonical("simulated") + b"\xf4"
    for name in SLOTS:
        p = servers.root / "A" / name
        if p.exists():
            data = p.read_bytes()
            assert data.count(false_mark) == 2  # both copies of the slot
            p.write_bytes(data.replace(false_mark, canonical("simulated") + b"\xf5"))
    err = run("B", "licagent", "status", "--state", "A", "--facts", "stolen.json", code=8).stderr
    assert "integrity" in err and "Traceback" not in err


def test_a_simulated_store_keeps_its_facts_file(tmp_path: Path) -> None:
    (tmp_path / "f.json").write_text(json.dumps({"model": "AS-B", "serial": "SN-SIM-1"}))
    s = Servers(tmp_path)
    s.run(None, "licserver", "keygen", "--out", "v")
    out = s.run(None, "licagent", "init", "--state", "s", "--facts", "f.json", "--model", "AS-B",
                "--trust", "v/vendor.pub").stdout
    assert "simulated" in out and "f.json" in out
    assert Store.open(tmp_path / "s", None).state.simulated is True
    s.run(None, "licagent", "status", "--state", "s", "--facts", "f.json")
    s.run(None, "licagent", "status", "--state", "s", env={"LICAGENT_FACTS": "f.json"})


def test_a_store_from_before_the_mark_counts_as_real_hardware(tmp_path: Path) -> None:
    """Bad day: a store written before ``simulated`` existed is never opened with given facts."""
    facts = StaticFactsProvider(HardwareFacts(model="AS-P", serial="SN-OLD", macs=("00:80:f4:00:00:01",)))
    agent = Agent(tmp_path / "s", facts, clock=Clock())
    store = agent.init("AS-P", None, [Vendor(SigningKey.generate()).public])
    assert store.state.simulated is True
    for name in SLOTS:  # rewrite each slot as the previous version wrote it: no "simulated"
        p = tmp_path / "s" / name
        if p.exists():
            gen, sb, _w = decode_slot(store.mac_key, p.read_bytes())
            m = strict_loads(sb, max_size=1 << 20)
            del m["simulated"]
            p.write_bytes(encode_slot(store.mac_key, gen, canonical(m)))
    before = slot_bytes(tmp_path / "s")
    with pytest.raises(FactsOverrideError, match="accepted only by a store initialised with one"):
        agent.status()
    assert slot_bytes(tmp_path / "s") == before
    assert refusals(tmp_path / "s") == ["facts-override"]


# ---------------------------------------------------------------- item 4: no identifying fact


@needs_namespaces
def test_init_on_hardware_with_no_identity_is_refused(servers: Servers) -> None:
    """No NIC but loopback, machine ID "uninitialized", no DMI: nothing tells this unit apart."""
    p = servers.run("nothing", "licagent", "init", "--state", "s", "--model", "AS-P",
                    "--trust", "v/vendor.pub", code=2)
    line = one_line(p.stderr, "no-identity")
    assert "this machine reports no serial number, no MAC address and no machine ID" in line
    assert not (servers.root / "s").exists()


def test_init_with_a_facts_file_of_nothing_identifying_is_refused(servers: Servers) -> None:
    (servers.root / "f.json").write_text(json.dumps(
        {"model": "AS-P", "board": "AS-P rev C", "firmware": "3.2", "usb": ["0403:6001"]}))
    p = servers.run(None, "licagent", "init", "--state", "s", "--facts", "f.json",
                    "--model", "AS-P", "--serial", "SN-TYPED", "--trust", "v/vendor.pub", code=2)
    assert "hardware facts file f.json reports no serial number" in one_line(p.stderr,
                                                                           "no-identity")
    assert not (servers.root / "s").exists()


def test_linux_facts_of_placeholders_only_are_refused(tmp_path: Path) -> None:
    """What firmware vendors leave behind is no identity: placeholders, zero MACs, virtual NICs."""
    root = tmp_path / "root"
    for rel, text in {
        "sys/class/dmi/id/product_serial": "To be filled by O.E.M.\n",
        "sys/class/dmi/id/board_serial": "Default string\n",
        "sys/class/dmi/id/board_name": "B450M\n",
        "sys/class/dmi/id/product_uuid": "03000200-0400-0500-0006-000700080009\n",
        "etc/machine-id": "uninitialized\n",
        "sys/class/net/eth0/address": "00:00:00:00:00:00\n",
        "sys/class/net/veth9/address": "ae:12:34:56:78:9a\n",
        "sys/class/net/lo/address": "00:00:00:00:00:00\n",
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    agent = Agent(tmp_path / "s", LinuxFactsProvider(root), clock=Clock())
    with pytest.raises(NoIdentityError, match=f"the hardware tree under {root} reports no"):
        agent.init("AS-P", "SN-TYPED", [Vendor(SigningKey.generate()).public])
    assert not (tmp_path / "s").exists()


def test_a_store_bound_to_nothing_is_never_rebound_elsewhere(tmp_path: Path) -> None:
    """Bad day: a store an older init bound to its model only, opened on another unit."""
    vendor = Vendor(SigningKey.generate())
    key = SigningKey.generate()
    d = tmp_path / "s"
    Store.create(d, key, new_state(key.public, "AS-P", "SN-1", ["model=AS-P"],
                                   [TrustKey(vendor.public)], T0, simulated=True))
    before = tree_bytes(d)
    other = StaticFactsProvider(HardwareFacts(model="AS-P", serial="SN-2",
                                              macs=("00:80:f4:00:00:02",)))
    with pytest.raises(CopiedStoreError, match="bound to no serial number, MAC address or"):
        Agent(d, other, clock=Clock()).status()
    after = tree_bytes(d)
    assert {n: after[n] for n in SLOTS if n in after} == {n: before[n] for n in SLOTS if n in before}
    assert Store.open(d, None).state.binding == ("model=AS-P",)  # not re-bound

"""A power cut in the middle of an apply: the guest's store is the old state or the new one.

The response is sent over the forwarded LAN port and qemu is killed (SIGKILL, so
whatever the guest kernel had not written to its virtual disk is lost) a moment
later; the guest then boots again from the same state disk. Its journal must
verify, its state must be sequence 0 (nothing installed) or 1 (the license
installed), and sending the same response again must end at sequence 1.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

import hw
from agent.cose import SigningKey
from agent.rpc import RemoteError, TransportError
from simulators.licensing_server.vendor import Grant, Vendor
from tests.qemu.conftest import GuestAgent


@pytest.mark.parametrize("delay", [0.01, 0.03, 0.045, 0.3])
def test_power_cut_mid_apply_leaves_old_or_new_state(
    delay: float, tmp_path: Path, guest_factory: Any,
) -> None:
    vendor = Vendor(SigningKey.generate())
    guest = guest_factory(vendor)
    with hw.connect(f"{guest.tcp_url}?timeout=15") as c:
        req = c.request("activate", ["bacnet"])
    resp = vendor.issue(req, [Grant("bacnet", 3)], now=int(time.time()))

    outcome: list[object] = []
    c2 = hw.connect(f"{guest.tcp_url}?timeout=5")
    c2.status()  # connected and past hello: the apply starts the moment it is sent

    def send() -> None:
        try:
            outcome.append(c2.apply(resp))
        except (TransportError, RemoteError, OSError) as exc:
            outcome.append(exc)

    t = threading.Thread(target=send)
    t.start()
    time.sleep(delay)  # an apply takes about 50 ms in the guest (tests/bench/qemu.py)
    guest.kill()  # the power cut
    t.join(30)
    c2.close()
    assert not t.is_alive()

    guest.start()  # power back: the same state disk
    agent = GuestAgent(guest)
    assert agent.journal_verifies()
    st = agent.status()
    print(f"power cut {delay} s after sending: answered={isinstance(outcome[0], dict)}, "
          f"sequence after reboot {st['sequence']}")
    assert st["sequence"] in (0, 1)
    licensed = agent.check("bacnet").licensed
    assert licensed == (st["sequence"] == 1)
    if isinstance(outcome[0], dict):  # the apply was answered before the cut
        assert st["sequence"] == 1
    with hw.connect(f"{guest.tcp_url}?timeout=15") as c:
        again = c.apply(resp)
        assert again["sequence"] == 1
        assert again["already_applied"] is (st["sequence"] == 1)
        assert c.check("bacnet")["licensed"] is True
    assert agent.journal_verifies()

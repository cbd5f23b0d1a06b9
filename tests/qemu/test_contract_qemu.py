"""The HAL contract suite (tests/hw/test_contract.py), unchanged, against the agent in a guest.

Each case runs twice: over the guest's virtio console seen on the host as a pty
(``serial:///dev/pts/N`` through pyserial) and over its LAN port forwarded to
loopback (``tcp://127.0.0.1:PORT``). The device behind the link is a real
``licagent run`` in the emulated arm64 server; the checks of the store itself
use the guest's own ``licagent`` and ``sha256sum`` on its service console.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import hw
from hw.link import ServerClient
from tests.conftest import T0, Site
from tests.hw.test_contract import (  # noqa: F401 - collected here against the guest
    test_a_garbage_file_is_refused_with_exit_code_3,
    test_a_response_for_another_device_is_refused_with_exit_code_5,
    test_check_of_an_unknown_feature_is_not_licensed,
    test_device_info_verifies,
    test_hello_and_status_shape,
    test_journal_is_readable,
    test_re_apply_is_idempotent,
    test_request_issue_apply_check,
)
from tests.qemu.conftest import GuestDevice


@pytest.fixture(params=["serial", "tcp"], ids=["qemu-serial", "qemu-tcp"])
def served(request: pytest.FixtureRequest, site: Site,
           guest_factory: Any) -> Iterator[tuple[ServerClient, GuestDevice]]:
    # the guest agent's clock is the tests' fixed clock (LICAGENT_TIME), like the host's
    guest = guest_factory(site.vendor, time=str(T0))
    url = guest.serial_url if request.param == "serial" else guest.tcp_url
    client = hw.connect(f"{url}?timeout=15")
    try:
        yield client, GuestDevice(guest, site.clock, site.vendor)
    finally:
        client.close()

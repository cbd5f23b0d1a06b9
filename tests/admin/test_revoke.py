"""A dead server (issue 16, item 3): ``licserver revoke``, all real processes.

The old server's daemon is killed with SIGKILL (the dead box); the vendor revokes it;
its licenses go back to the entitlement and the replacement is activated with them.
The revocation travels signed in the later vendor files for the site: when the dead
box comes back (its daemon restarted on the same store), ``licadmin`` refuses to send
it responses, the licensing server answers nothing for it, and the agent, given the
site's license information, drops its licenses and says why.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.formats import peek_payload
from agent.messages import LicenseInfo, Response
from tests.admin.test_rehost import ENT, Site, _assigned, _facts
from tests.admin.test_rehost import site as _site  # noqa: F401 - the fixture

REASON = "RMA 4711: board failed"


@pytest.fixture
def site(_site: Site) -> Iterator[Site]:  # noqa: F811
    yield _site


def _kill(site: Site, name: str) -> None:
    p = site.procs[name]
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)


def test_a_dead_server_is_revoked_replaced_and_refused_when_it_comes_back(site: Site) -> None:
    old, new = site.ids["old"], site.ids["new"]
    _kill(site, "old")  # the server died
    p = site.run("licserver", "revoke", "--db", "ledger.db", "--device", old, "--reason", REASON)
    assert p.stdout.splitlines()[0].startswith(f"device {old[:12]}… revoked at ")
    assert f"({REASON}): bacnet-ip=200, trend-log=50 back to {ENT}" in p.stdout
    again = site.run("licserver", "revoke", "--db", "ledger.db", "--device", old, "--reason",
                     REASON, check=False)
    assert again.returncode == 2 and "revoked already" in again.stderr
    rep = site.report()
    assert [r["device_id"] for r in rep["revocations"]] == [old]  # type: ignore[index]
    ent = rep["entitlements"][0]["products"][0]["features"]  # type: ignore[index]
    assert {f["feature"]: f["used"] for f in ent} == {"bacnet-ip": 0, "trend-log": 0}
    text = site.run("licserver", "report", "--db", "ledger.db").stdout
    assert f"device {old[:12]}… at " in text and REASON in text
    # a rehost to the dead server, or an assignment to it, is refused
    refused = site.licadmin("assign", *site.licensing, "--entitlement", ENT, "--device", old,
                            "--feature", "bacnet-ip=1", check=False)
    assert refused.returncode == 4 and "declared dead" in refused.stderr
    # the replacement gets the licenses; its response carries the revocation, signed
    site.licadmin("assign", *site.licensing, "--entitlement", ENT, "--device", new,
                  "--feature", "bacnet-ip=200", "--feature", "trend-log=50")
    site.licadmin("activate", "--server", site.urls["new"], *site.licensing, "--work-dir", "act")
    assert site.holds("new") == {"bacnet-ip": 200, "trend-log": 50}
    resp, _ = peek_payload((site.root / f"act/responses/{new}.resp").read_bytes(), Response)
    assert [(r.device_id, r.reason) for r in resp.revoked] == [(old, REASON)]
    # the dead box comes back on its old store
    site.urls["old"] = site.start("old2", "licagent", "run", "--state", "old", "--facts",
                                  _facts(site.root, "old", "AS-P-1", "00:80:f4:00:00:01"),
                                  "--listen", "tcp://127.0.0.1:0", ready="listening")
    assert site.holds("old") == {"bacnet-ip": 200, "trend-log": 50}  # it does not know yet
    # licadmin sends it nothing: not a response it applies, whatever the folder holds
    bad = site.licadmin("apply", "--server", site.urls["old"], f"act/responses/{new}.resp",
                        check=False)
    assert bad.returncode == 4, bad.stderr
    assert f"device {old[:12]}… was declared dead by the vendor at " in bad.stderr
    assert "nothing is sent to it" in bad.stderr
    bad = site.licadmin("send", "--server", site.urls["old"], "--responses", "act/responses",
                        "--receipts-out", "rc", "--verbose", check=False)
    assert bad.returncode != 0 and "declared dead" in bad.stdout
    # the licensing server answers nothing for it
    (site.root / "zreq").mkdir()
    site.licadmin("request", "--server", site.urls["old"], "reclaim", "--out",
                  f"zreq/{old}.req")
    up = site.licadmin("upload", "--requests", "zreq", "--out-dir", "zresp", *site.licensing,
                       "--verbose", check=False)
    assert up.returncode != 0 and "declared dead" in up.stdout
    # the site's license information carries the revocation; the agent drops its licenses
    site.licadmin("gather", "--server", site.urls["old"], "--server", site.urls["new"],
                  "--out", "site.cbor")
    site.licadmin("license-info", "--site-info", "site.cbor", *site.licensing,
                  "--out", "li.cbor")
    li, _ = peek_payload((site.root / "li.cbor").read_bytes(), LicenseInfo)
    assert [r.device_id for r in li.revoked] == [old]
    assert li.for_device(old).reclaim  # type: ignore[union-attr]
    rq = site.licadmin("requests", "--license-info", "li.cbor", "--server", site.urls["old"],
                       "--out-dir", "reqs", "--verbose", check=False)
    assert rq.returncode != 0 and "was declared dead by the vendor at" in rq.stdout
    assert site.holds("old") == {}
    st = json.loads(site.licadmin("status", "--server", site.urls["old"], "--json").stdout)
    assert any(REASON in w for w in st["warnings"])
    # and it asks for nothing any more; the ledger's accounting did not move
    no = site.licadmin("request", "--server", site.urls["old"], "activate", "--out", "x.req",
                       check=False)
    assert no.returncode == 4 and REASON in no.stderr
    assert _assigned(site) == {new: {"bacnet-ip": 200, "trend-log": 50}}
    _kill(site, "old2")
    j = site.run("licagent", "journal", "--state", "old", "--facts",
                 str(Path(site.root, "old.json")), "--json")
    assert '"revoked"' in j.stdout

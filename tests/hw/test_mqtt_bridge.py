"""Issue 18, item 4 (in part): sites behind their own brokers, bridged over TLS to headquarters.

Real mosquitto processes only: a headquarters broker running the repository's
configuration (contrib/mosquitto/mosquitto.conf: TLS, client certificates, the ACL),
and per site a plain broker on the site's LAN with contrib/mosquitto/bridge.conf
appended (TLS to headquarters with the bridge's own certificate). Devices serve on
their site's broker; ``licadmin`` connects to headquarters only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import hw
from agent.ops import AgentOps
from agent.rpc import TransportError
from hw.backends.mqtt import MqttListener, discover
from simulators.fleet.broker import free_port, plain_config
from tests.conftest import Site
from tests.hw.mosquitto import EXAMPLE, Broker
from tests.hw.test_mqtt import WAIT, eventually

BIN = Path(sys.executable).parent
SITES = ("plant-1", "plant-2")


def bridged_site(root: Path, hq: Broker, site: str) -> Broker:
    """A site broker: anonymous on its LAN (127.0.0.1 here), contrib/mosquitto/bridge.conf
    appended with the site's name, headquarters' address and this bridge's certificate."""
    assert hq.pki is not None
    cert, key = hq.pki.client(f"bridge-{site}")
    text = (EXAMPLE / "bridge.conf").read_text()
    for old, new in (("hq.example.com:8883", f"127.0.0.1:{hq.port}"),
                     ("/etc/mosquitto/lic/hq-ca.pem", str(hq.pki.ca_cert)),
                     ("/etc/mosquitto/lic/bridge.pem", str(cert)),
                     ("/etc/mosquitto/lic/bridge.key", str(key)),
                     ("plant-1", site)):
        assert old in text, f"contrib/mosquitto/bridge.conf must name {old}"
        text = text.replace(old, new)
    port = free_port()
    return Broker(root / site, plain_config(port) + text, port)


class Fabric:
    """Headquarters, the bridged site brokers, and the devices serving on each site."""

    def __init__(self, root: Path, site: Site) -> None:
        self.hq = Broker.secure(root / "hq")
        assert self.hq.pki is not None
        acl = root / "hq" / "acl"
        # the example ACL carries plant-1's bridge block; headquarters adds one per site
        acl.write_text(acl.read_text() + "".join(
            f"\nuser bridge-{s}\ntopic readwrite lic/{s}/#\n" for s in SITES[1:]))
        self.hq.start()
        self.sites = {s: bridged_site(root, self.hq, s) for s in SITES}
        for b in self.sites.values():
            b.start()
        self.devices = {"plant-1": [site.device(), site.device()], "plant-2": [site.device()]}
        self.listeners: list[MqttListener] = []
        for s, devs in self.devices.items():
            for d in devs:
                lst = hw.listen(f"{self.sites[s].url}/{s}", AgentOps(d.agent))
                assert isinstance(lst, MqttListener)
                lst.start()
                self.listeners.append(lst)
        p = self.hq.pki
        self.query = f"?ca={p.ca_cert}&cert={p.client_cert}&key={p.client_key}"

    def hq_url(self, site: str, device: str = "") -> str:
        return f"mqtts://127.0.0.1:{self.hq.port}/{site}" + (f"/{device}" if device else "") \
            + self.query

    def ids(self, site: str) -> list[str]:
        return sorted(str(d.agent.status()["device_id"]) for d in self.devices[site])

    def listed(self, site: str) -> list[str]:
        return sorted(d for d, _m, online in discover(self.hq_url(site)) if online)

    def close(self) -> None:
        for lst in self.listeners:
            lst.stop()
        for b in [*self.sites.values(), self.hq]:
            b.stop()


@pytest.fixture
def fabric(tmp_path: Path, site: Site) -> Iterator[Fabric]:
    f = Fabric(tmp_path, site)
    try:
        yield f
    finally:
        f.close()


def licadmin(cwd: Path, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([str(BIN / "licadmin"), *args], cwd=cwd, capture_output=True, text=True,
                       timeout=120, check=False, env=dict(os.environ))
    assert p.returncode == code, (args, p.returncode, p.stdout, p.stderr)
    return p


def test_licadmin_at_headquarters_lists_and_reaches_every_site(fabric: Fabric,
                                                               tmp_path: Path) -> None:
    for s in SITES:
        eventually(f"{s}'s devices announced at headquarters",
                   lambda s=s: fabric.listed(s) == fabric.ids(s))
    # a whole site through its bridge, with the command line as an operator runs it
    out = licadmin(tmp_path, "gather", "--server", fabric.hq_url("plant-1"), "--out",
                   str(tmp_path / "plant-1.cbor"), "--json")
    summary = json.loads(out.stdout)
    assert sorted(o["device_id"] for o in summary["results"] if o["status"] == "ok") == \
        fabric.ids("plant-1")
    dev = fabric.ids("plant-2")[0]
    status = json.loads(licadmin(tmp_path, "status", "--server", fabric.hq_url("plant-2", dev),
                                 "--json").stdout)
    assert status["device_id"] == dev
    # a site's devices are reached only under their own site: nothing leaks across bridges
    assert fabric.listed("plant-3") == []
    with pytest.raises(TransportError):
        with hw.connect(fabric.hq_url("plant-1", dev) + "&presence_timeout=1") as c:
            c.status()


def test_a_site_broker_restart_and_a_headquarters_restart_are_survived(fabric: Fabric) -> None:
    dev = fabric.ids("plant-1")[0]
    eventually("plant-1 announced", lambda: _listed(fabric, "plant-1") == fabric.ids("plant-1"))
    with hw.connect(fabric.hq_url("plant-1", dev) + f"&presence_timeout={WAIT}") as c:
        assert c.status()["device_id"] == dev
        # the site broker dies and comes back: devices reconnect, the bridge too
        fabric.sites["plant-1"].restart()
        eventually("plant-1 announced again after its broker restarted",
                   lambda: _listed(fabric, "plant-1") == fabric.ids("plant-1"))
        assert eventually("a call through the bridge", lambda: _status(c)) == dev
        # headquarters dies and comes back (every bridge is cut): the same
        fabric.hq.restart()
        for s in SITES:
            eventually(f"{s} announced again after headquarters restarted",
                       lambda s=s: _listed(fabric, s) == fabric.ids(s))
        assert eventually("a call after headquarters restarted", lambda: _status(c)) == dev


def _listed(fabric: Fabric, site: str) -> Any:
    """The site's listing, or None while a restarting broker cuts the listing short (the
    caller is told to try again, and does)."""
    try:
        return fabric.listed(site)
    except TransportError:
        return None


def _status(c: Any) -> str | None:
    try:
        return str(c.status()["device_id"])
    except TransportError:
        return None


def test_the_bridge_licsim_writes_is_the_shipped_one() -> None:
    """licsim's [broker] bridge_to writes the directives of contrib/mosquitto/bridge.conf."""
    from simulators.fleet.broker import bridge_config

    def directives(text: str) -> set[str]:
        return {line.split()[0] for line in text.splitlines()
                if line.strip() and not line.startswith("#")}

    shipped = directives((EXAMPLE / "bridge.conf").read_text())
    here = Path(__file__)
    written = directives(bridge_config("plant-1", f"mqtts://hq:8883?ca={here}&cert={here}"
                                                  f"&key={here}"))
    assert written == shipped
    assert "bridge_cafile" not in bridge_config("plant-1", "mqtt://hq:1883")
    for bad in ("http://hq:1", "mqtt://hq", "mqtt://hq:1/site", "mqtts://hq:1?ca=/x",
                "mqtt://hq:1?ca=x"):
        with pytest.raises(Exception, match="bridge_to"):
            bridge_config("plant-1", bad)


def test_licsim_sites_each_with_its_broker_bridged_to_headquarters(tmp_path: Path) -> None:
    """Two licsim runs, each a site with its own mosquitto bridged over TLS to headquarters
    ([broker] bridge_to); licadmin at headquarters gathers both sites."""
    from tests.simulators.test_licsim import Licsim

    hq = Broker.secure(tmp_path / "hq")
    assert hq.pki is not None
    acl = tmp_path / "hq" / "acl"
    acl.write_text(acl.read_text() + "\nuser bridge-plant-2\ntopic readwrite lic/plant-2/#\n")
    hq.start()
    sims: list[Licsim] = []
    try:
        for name, count in (("plant-1", 3), ("plant-2", 2)):
            cert, key = hq.pki.client(f"bridge-{name}")
            (tmp_path / f"{name}.toml").write_text(
                f'site = "{name}"\n[broker]\nstart = true\n'
                f'bridge_to = "mqtts://127.0.0.1:{hq.port}?ca={hq.pki.ca_cert}&cert={cert}'
                f'&key={key}"\n[[servers]]\nmodel = "Edge-Server"\ncount = {count}\n'
                'links = ["mqtt"]\n')
            sims.append(Licsim(tmp_path, f"{name}.toml"))
        for sim in sims:
            sim.wait_for("ready")
        p = hq.pki
        q = f"?ca={p.ca_cert}&cert={p.client_cert}&key={p.client_key}"
        for name, count in (("plant-1", 3), ("plant-2", 2)):
            url = f"mqtts://127.0.0.1:{hq.port}/{name}{q}"
            eventually(f"{name}'s servers announced at headquarters", lambda url=url, n=count:
                       len([d for d, _m, on in discover(url) if on]) == n)
            out = json.loads(licadmin(tmp_path, "gather", "--server", url, "--out",
                                      str(tmp_path / f"{name}.cbor"), "--json").stdout)
            assert [r["status"] for r in out["results"]] == ["ok"] * count
    finally:
        for sim in sims:
            sim.kill()
        hq.stop()

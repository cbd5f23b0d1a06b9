"""A real mosquitto broker on a free loopback port, for the MQTT tests and benchmarks.

:class:`Broker` is licsim's :class:`simulators.fleet.broker.MosquittoBroker`
(configuration file, ``mosquitto -c`` as a child process, kill and restart on
the same port) plus :meth:`Broker.secure`, which uses the repository's example
configuration, ``contrib/mosquitto/mosquitto.conf`` and its ``acl`` file, with
the listener moved to 127.0.0.1 and the certificate paths pointed at a PKI made
by :func:`tests.support.pki.make_pki`. Nothing ever listens on another address.
"""

from __future__ import annotations

import getpass
import re
import shutil
from pathlib import Path

from simulators.fleet.broker import MosquittoBroker, free_port, mosquitto_path, plain_config
from tests.support.pki import Pki, make_pki

__all__ = ["Broker", "free_port", "mosquitto_path"]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "contrib" / "mosquitto"


class Broker(MosquittoBroker):
    """One mosquitto process; :meth:`kill` and :meth:`start` again keep the port."""

    def __init__(self, directory: Path, config: str, port: int, pki: Pki | None = None) -> None:
        super().__init__(directory, config=config, port=port)
        self.pki = pki

    @classmethod
    def plain(cls, directory: Path) -> Broker:
        """Anonymous MQTT on 127.0.0.1, no persistence."""
        port = free_port()
        return cls(directory, plain_config(port), port)

    @classmethod
    def secure(cls, directory: Path) -> Broker:
        """The repository's example configuration (TLS, certificates, ACL) on 127.0.0.1."""
        directory.mkdir(parents=True, exist_ok=True)
        pki = make_pki(directory / "pki")
        port = free_port()
        text = (EXAMPLE / "mosquitto.conf").read_text()
        text, n = re.subn(r"(?m)^listener \d+ \S+$", f"listener {port} 127.0.0.1", text)
        assert n == 1, "contrib/mosquitto/mosquitto.conf must have one `listener PORT ADDRESS`"
        paths = {"ca.pem": pki.ca_cert, "server.pem": pki.server_cert,
                 "server.key": pki.server_key, "acl": directory / "acl"}
        for name, path in paths.items():
            text, n = re.subn(rf"/etc/mosquitto/lic/{re.escape(name)}\b", str(path), text)
            assert n == 1, f"contrib/mosquitto/mosquitto.conf must name /etc/mosquitto/lic/{name}"
        assert "0.0.0.0" not in text and "::" not in text
        shutil.copyfile(EXAMPLE / "acl", directory / "acl")
        # run as the current user, which can read the key files (mosquitto would
        # otherwise drop to the `mosquitto` user when started as root)
        text += f"\nuser {getpass.getuser()}\n"
        return cls(directory, text, port, pki)

    @property
    def url(self) -> str:
        return f"mqtt{'s' if self.pki else ''}://127.0.0.1:{self.port}"

    def __enter__(self) -> Broker:
        self.start()
        return self

"""Issue 18, item 2: the PostgreSQL storage's own edges (the accounting runs in test_ledger.py
on both backends): refusals that name the database without its password, a database of
another schema, a database restarted under a running ledger."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import psycopg
import pytest

from agent.errors import StorageError
from simulators.licensing_server.ledger import Ledger
from simulators.licensing_server.ledger_postgres import redact
from simulators.licensing_server.vendor import Vendor
from tests.conftest import T0
from tests.simulators.test_licserver_http import BIN
from tests.support.postgres import PostgresServer


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def licserver(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "licserver"), *args], capture_output=True, text=True,
                          timeout=60, check=False)


def test_an_unreachable_database_is_a_storage_error_without_the_password() -> None:
    url = f"postgresql://vendor:s3cret-pw@127.0.0.1:{_closed_port()}/ledger"
    p = licserver("report", "--db", url)
    assert p.returncode == 8, p.stderr
    assert "cannot open the ledger postgresql://vendor:***@127.0.0.1:" in p.stderr
    assert "s3cret-pw" not in p.stderr and len(p.stderr.strip().splitlines()) <= 3
    assert redact("postgresql://a@h/db") == "postgresql://a@h/db"
    assert redact("postgresql://a:b@[::1]:5/db") == "postgresql://a:***@[::1]:5/db"


def test_another_scheme_is_a_usage_error() -> None:
    p = licserver("report", "--db", "mysql://x@127.0.0.1/ledger")
    assert p.returncode == 2 and "mysql://" in p.stderr and "postgresql://" in p.stderr


def test_a_database_of_another_schema_version_is_refused(postgres: PostgresServer,
                                                         vendor: Vendor) -> None:
    url = postgres.database()
    Ledger(url, vendor, clock=lambda: T0).close()  # schema 2 made
    with psycopg.connect(url) as conn:
        conn.execute("UPDATE ledger_schema SET version = 3")
    with pytest.raises(StorageError, match="has schema version 3; this licserver reads 2"):
        Ledger(url, vendor)


def test_the_ledger_goes_on_after_the_database_restarts(vendor: Vendor, tmp_path: Path) -> None:
    """A lost connection is one StorageError (exit 8) while the database is down, then the
    next operation opens a new connection; nothing committed is lost."""
    server = PostgresServer().start()
    try:
        url = server.database()
        led = Ledger(url, vendor, clock=lambda: T0)
        led.entitle("E", "P", {"bacnet": 3})
        server.restart()
        with pytest.raises(StorageError) as exc:
            led.entitle("E", "P", {"bacnet": 1})  # its connection died with the old server
        assert exc.value.exit_code == 8 and "postgresql://postgres@127.0.0.1:" in str(exc.value)
        assert led.entitle("E", "P", {"bacnet": 1})["products"][0]["features"][0]["count"] == 4
        led.close()
    finally:
        server.stop()

"""The test harness's own promises (tests/support): two test runs at the same time on one
machine never share a database, a port or a server."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from support.common import RUN_ID
from support.live import BIN, ROOT, _ports_the_kernel_keeps, flask_run_args, free_port, live_server
from support.served_app import INSTANCE_ENV

#: Configured server URLs, by the environment variable that names them.
SERVERS = ("NACHOCODE_TEST_POSTGRES_URL", "NACHOCODE_TEST_MYSQL_URL")


def run_python(code: str, **env: str) -> subprocess.Popen[str]:
    """Python in a process of its own with the tests' helpers importable, as another
    test run on the machine would be; its stdin stays open until the test closes it."""
    return subprocess.Popen(
        [str(BIN / "python"), "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests"), **env},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_free_ports_are_never_handed_to_two_processes() -> None:
    other = run_python(
        "import sys\nfrom support.live import free_port\n"
        "print(*[free_port() for _ in range(200)], flush=True)\nsys.stdin.read()"
    )
    assert other.stdout is not None
    assert other.stdin is not None
    theirs = {int(port) for port in other.stdout.readline().split()}
    ours = {free_port() for _ in range(200)}
    other.stdin.close()
    other.wait(timeout=30)
    assert len(theirs) == len(ours) == 200
    assert not theirs & ours
    # Never a port the kernel may give to another process's bind to port 0.
    assert all(port in _ports_the_kernel_keeps() for port in theirs | ours)


@pytest.fixture
def stranger() -> Iterator[int]:
    """Another process's HTTP server (here, this one's) on a port of ours."""
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), http.server.SimpleHTTPRequestHandler
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.mark.integration
def test_a_server_is_never_taken_for_another_process_on_its_port(
    stranger: int, tmp_path: Path
) -> None:
    """What emptied a server log once: the readiness check reached another process's
    server on the port, the test ran against it, and its own server never started."""
    args = flask_run_args("tests/support/served_app.py", stranger)
    log = tmp_path / "server.log"
    with (
        pytest.raises(RuntimeError, match="exited|another process"),
        live_server(args, port=stranger, env={INSTANCE_ENV: str(tmp_path)}, log_path=log),
    ):
        pass
    assert b"Address already in use" in log.read_bytes()


@pytest.mark.parametrize("variable", SERVERS)
def test_each_run_has_databases_of_its_own(variable: str) -> None:
    configured = os.environ.get(variable)
    if not configured:
        pytest.skip(f"{variable} is not set")
    constant = "POSTGRES_URL" if "POSTGRES" in variable else "MYSQL_URL"
    reset = "reset_postgres" if "POSTGRES" in variable else "reset_mysql"
    code = (
        f"import sys\nimport sqlalchemy as sa\nfrom support.common import {constant}, {reset}\n"
        f"{reset}({constant})\nengine = sa.create_engine({constant})\n"
        "with engine.begin() as c: c.exec_driver_sql('CREATE TABLE run_mark (id INTEGER)')\n"
        f"engine.dispose()\nprint({constant}, flush=True)\nsys.stdin.read()"
    )
    runs = [run_python(code), run_python(code)]
    urls = [run.stdout.readline().strip() for run in runs if run.stdout is not None]
    names = [sa.engine.make_url(url).database for url in urls]
    started_from = sa.engine.make_url(configured).database
    assert len(set(names)) == 2
    assert all(str(name).startswith(f"{started_from}_run_") for name in names)
    assert RUN_ID not in "".join(urls)  # nor this run's

    def databases() -> set[str]:
        engine = sa.create_engine(configured, poolclass=sa.pool.NullPool)
        listing = "SELECT datname FROM pg_database" if "POSTGRES" in variable else "SHOW DATABASES"
        with engine.connect() as connection:
            found = set(connection.exec_driver_sql(listing).scalars())
            tables = set(sa.inspect(connection).get_table_names())
        engine.dispose()
        assert "run_mark" not in tables  # the configured database is never written
        return found

    assert set(names) <= databases()
    for run in runs:
        assert run.stdin is not None
        run.stdin.close()
        assert run.wait(timeout=60) == 0
    assert not set(names) & databases()  # each run drops its own at the end

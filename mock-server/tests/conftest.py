"""Fixtures: throw-away data folders and a real HTTP server on a loopback port."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from mock_server import create_app
from werkzeug.serving import make_server

CUSTOMERS = [
    {
        "customer_id": f"C{i:02d}",
        "first_name": "Ann",
        "last_name": f"Lee{i}",
        "email": f"ann{i}@example.com",
        "phone": None,
        "address": None,
        "date_of_birth": "1990-01-02",
        "account_balance": 10.5 * i,
        "created_at": "2024-03-05T10:11:12Z",
    }
    for i in range(1, 26)
]
MACHINES = [
    {
        "machine_id": f"M{i}",
        "name": f"Mill {i}",
        "model": "X1",
        "location": "Bay 1",
        "status": "IDLE",
        "created_at": "2024-03-05T10:11:12Z",
    }
    for i in range(1, 4)
]
READINGS = [
    {
        "machine_id": f"M{1 + i % 2}",
        "timestamp": f"2024-06-01T08:{i:02d}:00Z",
        "temperature": 70 + i,
        "speed": 1200,
        "status": "STARTED",
    }
    for i in range(12)
]

DataSpec = list[Any] | str | bytes | None


@pytest.fixture
def customers() -> list[dict[str, Any]]:
    """The 25 customers C01..C25 that make_data_dir writes by default."""
    return CUSTOMERS


@pytest.fixture
def machines() -> list[dict[str, Any]]:
    """The machines M1..M3 that make_data_dir writes by default (M3 has no readings)."""
    return MACHINES


@pytest.fixture
def readings() -> list[dict[str, Any]]:
    """The 12 readings that make_data_dir writes by default, alternating M1 and M2."""
    return READINGS


@pytest.fixture
def make_data_dir(tmp_path: Path) -> Callable[..., Path]:
    """Write a data folder; each file is a list (dumped), raw str/bytes, or None (absent)."""
    counter = iter(range(1_000))

    def make(
        customers: DataSpec = CUSTOMERS,
        machines: DataSpec = MACHINES,
        readings: DataSpec = READINGS,
    ) -> Path:
        folder = tmp_path / f"data{next(counter)}"
        folder.mkdir()
        for name, spec in (
            ("customers", customers),
            ("machines", machines),
            ("readings", readings),
        ):
            path = folder / f"{name}.json"
            if isinstance(spec, bytes):
                path.write_bytes(spec)
            elif isinstance(spec, str):
                path.write_text(spec, encoding="utf-8")
            elif spec is not None:
                path.write_text(json.dumps(spec, indent=2), encoding="utf-8")
        return folder

    return make


@pytest.fixture
def make_app(make_data_dir: Callable[..., Path]) -> Callable[..., Flask]:
    """create_app over a fresh data folder; keyword args go to make_data_dir, config to the app."""

    def make(config: dict[str, Any] | None = None, **data: DataSpec) -> Flask:
        return create_app({"DATA_DIR": make_data_dir(**data), **(config or {})})

    return make


@pytest.fixture
def serve() -> Iterator[Callable[[Flask], str]]:
    """Serve apps with werkzeug's threaded server on 127.0.0.1; yields a start function
    returning the base URL. Every server and its request threads are gone afterwards."""
    before = set(threading.enumerate())
    servers = []

    def start(app: Flask) -> str:
        server = make_server("127.0.0.1", 0, app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_port}"

    yield start

    for server, thread in servers:
        server.shutdown()
        thread.join(timeout=10)
        server.server_close()
    deadline = time.monotonic() + 10
    for thread in set(threading.enumerate()) - before:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leftover, f"threads still running: {leftover}"

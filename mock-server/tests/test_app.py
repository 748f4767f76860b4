"""The HTTP API: pagination, lookups, errors and byte-exact records."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from mock_server import StartupError, create_app
from mock_server.app import default_data_dir

MakeApp = Callable[..., Flask]
Records = list[dict[str, Any]]


def _get(app: Flask, url: str) -> tuple[int, dict]:
    response = app.test_client().get(url)
    assert response.content_type == "application/json"
    return response.status_code, json.loads(response.data)


@pytest.mark.parametrize(
    ("query", "ids", "page", "limit"),
    [
        ("", [f"C{i:02d}" for i in range(1, 11)], 1, 10),
        ("?page=2", [f"C{i:02d}" for i in range(11, 21)], 2, 10),
        ("?page=3", [f"C{i:02d}" for i in range(21, 26)], 3, 10),
        ("?page=4", [], 4, 10),
        ("?page=3&limit=12", ["C25"], 3, 12),
        ("?limit=1", ["C01"], 1, 1),
        ("?page=25&limit=1", ["C25"], 25, 1),
        ("?limit=1000", [f"C{i:02d}" for i in range(1, 26)], 1, 1000),
        ("?page=2&limit=1000", [], 2, 1000),
        ("?page=02&limit=05", [f"C{i:02d}" for i in range(6, 11)], 2, 5),
        ("?page=100000000000000000000000000000", [], 10**29, 10),
    ],
)
def test_pages_follow_file_order(
    make_app: MakeApp, query: str, ids: list[str], page: int, limit: int
) -> None:
    status, body = _get(make_app(), f"/api/customers{query}")
    assert status == 200
    assert [c["customer_id"] for c in body["data"]] == ids
    assert (body["total"], body["page"], body["limit"]) == (25, page, limit)


def test_page_records_equal_the_source_records(
    make_app: MakeApp, customers: Records, machines: Records, readings: Records
) -> None:
    app = make_app()
    assert _get(app, "/api/customers?limit=1000")[1]["data"] == customers
    assert _get(app, "/api/machines")[1]["data"] == machines
    assert _get(app, "/api/readings?limit=1000")[1]["data"] == readings


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("?limit=0", "limit"),
        ("?limit=1001", "limit"),
        ("?limit=-5", "limit"),
        ("?limit=1.5", "limit"),
        ("?limit=", "limit"),
        ("?limit=ten", "limit"),
        ("?limit=%2B5", "limit"),
        ("?page=0", "page"),
        ("?page=-1", "page"),
        ("?page=abc", "page"),
        ("?page=1e3", "page"),
        ("?page=%201", "page"),
        ("?page=" + "9" * 5000, "page"),
    ],
)
@pytest.mark.parametrize(
    "path", ["/api/customers", "/api/machines", "/api/readings", "/api/machines/M1/readings"]
)
def test_bad_page_or_limit_is_a_400_naming_the_parameter(
    make_app: MakeApp, path: str, query: str, parameter: str
) -> None:
    status, body = _get(make_app(), path + query)
    assert status == 400
    assert body["error"].startswith(f"{parameter} must be an integer")


def test_limit_error_states_the_bounds(make_app: MakeApp) -> None:
    _, body = _get(make_app(), "/api/customers?limit=1001")
    assert body == {"error": "limit must be an integer between 1 and 1000, got '1001'"}


def test_record_by_id(make_app: MakeApp, customers: Records, machines: Records) -> None:
    app = make_app()
    assert _get(app, "/api/customers/C07") == (200, customers[6])
    assert _get(app, "/api/machines/M2") == (200, machines[1])


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("/api/customers/C99", "customer_id 'C99' not found"),
        ("/api/machines/M9", "machine_id 'M9' not found"),
        ("/api/machines/M9/readings", "machine_id 'M9' not found"),
    ],
)
def test_unknown_id_is_a_404_json_error(make_app: MakeApp, url: str, message: str) -> None:
    assert _get(make_app(), url) == (404, {"error": message})


@pytest.mark.parametrize("url", ["/api/nothing", "/api/readings/M1", "/api/customers/", "/"])
def test_unknown_url_is_a_404_json_error(make_app: MakeApp, url: str) -> None:
    status, body = _get(make_app(), url)
    assert status == 404
    assert isinstance(body["error"], str)


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
def test_wrong_method_is_a_405_json_error(make_app: MakeApp, method: str) -> None:
    response = getattr(make_app().test_client(), method)("/api/customers")
    assert response.status_code == 405
    assert response.content_type == "application/json"
    assert "GET" in response.headers["Allow"]
    assert isinstance(json.loads(response.data)["error"], str)


def test_machine_readings_are_that_machines_in_file_order(
    make_app: MakeApp, readings: Records
) -> None:
    status, body = _get(make_app(), "/api/machines/M2/readings?limit=4&page=2")
    assert status == 200
    expected = [r for r in readings if r["machine_id"] == "M2"]
    assert (body["total"], body["page"], body["limit"]) == (len(expected), 2, 4)
    assert body["data"] == expected[4:8]


def test_machine_readings_for_a_machine_without_readings_is_an_empty_page(
    make_app: MakeApp,
) -> None:
    assert _get(make_app(), "/api/machines/M3/readings") == (
        200,
        {"data": [], "total": 0, "page": 1, "limit": 10},
    )


def test_machine_readings_for_a_machine_known_only_from_readings(
    make_app: MakeApp, readings: Records
) -> None:
    ghost = {"machine_id": "GHOST", "timestamp": "2024-06-01T09:00:00Z"}
    status, body = _get(make_app(readings=[*readings, ghost]), "/api/machines/GHOST/readings")
    assert (status, body["data"]) == (200, [ghost])


HOSTILE = [
    '{ "customer_id" : "H1", "account_balance" : 1e400 }',
    '{"customer_id":"H2","account_balance":123456789012345678901234567890}',
    '{"customer_id": "H3", "first_name": "\\u0000\\ud83d\\ude00", "last_name": "Zoë 😀 中文"}',
    '{"customer_id": "H4", "account_balance": "lots", "created_at": 12, "email": [1, {}]}',
    "42",
    "null",
    '"just a string"',
    "[1,2,3]",
    '{"no_key": true}',
    '{"customer_id": 17}',
    '{"customer_id": "H1", "account_balance": -0.0}',
]


def test_hostile_records_are_served_byte_for_byte(make_app: MakeApp) -> None:
    client = make_app(customers="[\n  " + ",\n  ".join(HOSTILE) + "\n]\n").test_client()

    page = client.get("/api/customers?limit=1000").data
    expected = (
        b'{"data":['
        + b",".join(h.encode() for h in HOSTILE)
        + b'],"total":11,"page":1,"limit":1000}'
    )
    assert page == expected
    assert len(json.loads(page)["data"]) == 11

    assert client.get("/api/customers/H2").data == HOSTILE[1].encode()
    assert client.get("/api/customers/H3").data == HOSTILE[2].encode()
    assert client.get("/api/customers/H4").data == HOSTILE[3].encode()
    # H1 appears twice: the later record wins.
    assert client.get("/api/customers/H1").data == HOSTILE[-1].encode()
    assert client.get("/api/customers/17").status_code == 404


def test_duplicated_key_serves_the_later_record_but_lists_both(
    make_app: MakeApp, machines: Records
) -> None:
    first = {**machines[0], "status": "IDLE"}
    later = {**machines[0], "status": "ERROR"}
    app = make_app(machines=[first, machines[1], later])
    assert _get(app, "/api/machines/M1") == (200, later)
    assert _get(app, "/api/machines")[1]["data"] == [first, machines[1], later]


def test_empty_files_serve_empty_pages(make_app: MakeApp) -> None:
    app = make_app(customers="[]", machines="[]", readings="[]")
    assert _get(app, "/api/customers") == (200, {"data": [], "total": 0, "page": 1, "limit": 10})
    assert _get(app, "/api/health")[1]["records"] == {"customers": 0, "machines": 0, "readings": 0}


def test_health_reports_record_counts(make_app: MakeApp) -> None:
    assert _get(make_app(), "/api/health") == (
        200,
        {
            "status": "ok",
            "records": {"customers": 25, "machines": 3, "readings": 12},
            "chaos": False,
        },
    )


def test_served_over_real_http(
    make_app: MakeApp, serve: Callable[[Flask], str], readings: Records
) -> None:
    url = serve(make_app())
    response = requests.get(f"{url}/api/readings", params={"page": 2, "limit": 5}, timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"data": readings[5:10], "total": 12, "page": 2, "limit": 5}
    missing = requests.get(f"{url}/api/machines/nope", timeout=10)
    assert (missing.status_code, missing.headers["Content-Type"]) == (404, "application/json")


def test_a_full_page_is_served_in_milliseconds(make_app: MakeApp, readings: Records) -> None:
    many = [{**readings[0], "machine_id": f"M{i % 7}", "speed": i} for i in range(100_000)]
    client = make_app(readings=many).test_client()
    timings = []
    for page in range(1, 41):
        started = time.perf_counter()
        response = client.get(f"/api/readings?page={page}&limit=1000")
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200
    assert json.loads(response.data)["data"][-1]["speed"] == 39_999
    assert statistics.median(timings) < 0.02, timings


def test_config_data_dir_wins_over_the_environment(
    make_data_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_DATA_DIR", str(make_data_dir(customers=[])))
    assert _get(create_app(), "/api/health")[1]["records"]["customers"] == 0
    app = create_app({"DATA_DIR": make_data_dir()})
    assert _get(app, "/api/health")[1]["records"]["customers"] == 25


def test_default_data_dir_prefers_env_then_cwd_then_the_sample_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_DATA_DIR", "/somewhere/else")
    assert default_data_dir() == Path("/somewhere/else")
    monkeypatch.delenv("MOCK_DATA_DIR")
    monkeypatch.chdir(tmp_path)
    sample = Path(__file__).resolve().parents[1] / "data"
    assert default_data_dir() == sample
    (tmp_path / "mock-server" / "data").mkdir(parents=True)
    assert default_data_dir() == Path("mock-server", "data")


def test_missing_data_file_stops_create_app(make_data_dir: Callable[..., Path]) -> None:
    with pytest.raises(StartupError, match=r"readings\.json does not exist"):
        create_app({"DATA_DIR": make_data_dir(readings=None)})


def test_an_unexpected_failure_is_a_500_json_error(
    make_app: MakeApp, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app()

    def explode() -> None:
        raise RuntimeError("boom")

    app.add_url_rule("/api/explode", view_func=explode)
    status, body = _get(app, "/api/explode")
    assert status == 500
    assert "boom" not in body["error"]
    assert "RuntimeError: boom" in caplog.text

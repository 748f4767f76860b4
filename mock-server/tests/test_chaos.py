"""Chaos mode: settings, determinism, and each fault as a real HTTP client sees it."""

from __future__ import annotations

import dataclasses
import http.client
import json
import socket
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import requests
from flask import Flask
from mock_server import StartupError, create_app
from mock_server.chaos import PASS, Chaos, ChaosSettings, Kind

MakeApp = Callable[..., Flask]
Serve = Callable[[Flask], str]


def test_chaos_is_off_by_default() -> None:
    settings = ChaosSettings.from_sources({}, {})
    assert settings == ChaosSettings()
    assert not settings.enabled
    assert all(Chaos(settings).draw() is PASS for _ in range(100))


def test_settings_come_from_the_environment_and_config_overrides_them() -> None:
    environ = {
        "MOCK_CHAOS_SEED": "42",
        "MOCK_CHAOS_ERROR_RATE": "0.25",
        "MOCK_CHAOS_ERROR_CODES": " 503, 500 ",
        "MOCK_CHAOS_LATENCY_MS": "5",
        "MOCK_CHAOS_RATE_LIMIT_RATE": "0.1",
        "MOCK_CHAOS_RETRY_AFTER": "3",
        "MOCK_CHAOS_TRUNCATE_RATE": "0.05",
        "MOCK_CHAOS_RESET_RATE": "",
    }
    settings = ChaosSettings.from_sources({"CHAOS_SEED": 7, "CHAOS_RESET_RATE": 0.2}, environ)
    assert settings == ChaosSettings(
        seed=7,
        error_rate=0.25,
        error_codes=(503, 500),
        latency_ms=5.0,
        rate_limit_rate=0.1,
        retry_after=3,
        truncate_rate=0.05,
        reset_rate=0.2,
    )
    assert settings.enabled
    assert settings.describe().startswith("seed=7, error_rate=0.25, error_codes=(503, 500)")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MOCK_CHAOS_ERROR_RATE", "1.5", "MOCK_CHAOS_ERROR_RATE must be a fraction between 0 and"),
        ("MOCK_CHAOS_RESET_RATE", "-0.1", "MOCK_CHAOS_RESET_RATE must be a fraction between 0"),
        ("MOCK_CHAOS_TRUNCATE_RATE", "abc", "MOCK_CHAOS_TRUNCATE_RATE must be a number"),
        ("MOCK_CHAOS_RATE_LIMIT_RATE", "nan", "MOCK_CHAOS_RATE_LIMIT_RATE must be a finite number"),
        ("MOCK_CHAOS_SEED", "1.5", "MOCK_CHAOS_SEED must be an integer"),
        ("MOCK_CHAOS_LATENCY_MS", "-1", "MOCK_CHAOS_LATENCY_MS must be >= 0"),
        ("MOCK_CHAOS_RETRY_AFTER", "-2", "MOCK_CHAOS_RETRY_AFTER must be >= 0"),
        ("MOCK_CHAOS_ERROR_CODES", "500,abc", "MOCK_CHAOS_ERROR_CODES must be an integer"),
        ("MOCK_CHAOS_ERROR_CODES", "200", "MOCK_CHAOS_ERROR_CODES must be a comma-separated"),
        ("MOCK_CHAOS_ERROR_CODES", ",", "MOCK_CHAOS_ERROR_CODES must be a comma-separated"),
    ],
)
def test_bad_setting_stops_start_up_naming_it(name: str, value: str, message: str) -> None:
    with pytest.raises(StartupError, match=f"^{message}"):
        ChaosSettings.from_sources({}, {name: value})


def test_rates_adding_up_to_more_than_one_stop_start_up() -> None:
    with pytest.raises(StartupError, match="add up to at most 1"):
        ChaosSettings.from_sources({"CHAOS_ERROR_RATE": 0.6, "CHAOS_RESET_RATE": 0.5}, {})


def test_bad_setting_stops_create_app(
    make_data_dir: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOCK_CHAOS_ERROR_RATE", "2")
    with pytest.raises(StartupError, match="MOCK_CHAOS_ERROR_RATE"):
        create_app({"DATA_DIR": make_data_dir()})


MIXED = ChaosSettings(
    seed=3, error_rate=0.2, rate_limit_rate=0.1, truncate_rate=0.1, reset_rate=0.1
)


def test_same_seed_gives_the_same_outcomes() -> None:
    a, b = Chaos(MIXED), Chaos(MIXED)
    first = [a.draw() for _ in range(500)]
    assert first == [b.draw() for _ in range(500)]
    other = Chaos(dataclasses.replace(MIXED, seed=4))
    assert first != [other.draw() for _ in range(500)]


def test_outcomes_follow_the_configured_rates() -> None:
    chaos = Chaos(MIXED)
    outcomes = [chaos.draw() for _ in range(5000)]
    share = {kind: sum(o.kind is kind for o in outcomes) / 5000 for kind in Kind}
    assert share[Kind.ERROR] == pytest.approx(0.2, abs=0.03)
    assert share[Kind.RATE_LIMIT] == pytest.approx(0.1, abs=0.03)
    assert share[Kind.TRUNCATE] == pytest.approx(0.1, abs=0.03)
    assert share[Kind.RESET] == pytest.approx(0.1, abs=0.03)
    assert share[Kind.PASS] == pytest.approx(0.5, abs=0.03)
    assert {o.status for o in outcomes if o.kind is Kind.ERROR} == {500, 502, 503, 504}
    assert {o.status for o in outcomes if o.kind is not Kind.ERROR} == {None}


def test_reseeding_gives_each_worker_its_own_deterministic_stream() -> None:
    def stream(salt: int) -> list[object]:
        chaos = Chaos(MIXED)
        chaos.reseed(salt)
        return [chaos.draw() for _ in range(200)]

    assert stream(1) == stream(1)
    assert stream(1) != stream(2)


def _outcome(url: str) -> str:
    """What a client saw: a status code, or the name of the exception requests raised."""
    try:
        response = requests.get(url, timeout=10)
    except requests.RequestException as e:
        return type(e).__name__
    if response.status_code == 200:
        assert response.json()["total"] == 12
    return str(response.status_code)


def test_same_seed_gives_the_same_sequence_over_http(make_app: MakeApp, serve: Serve) -> None:
    config = {f"CHAOS_{k.upper()}": v for k, v in dataclasses.asdict(MIXED).items()}
    sequences = []
    for _ in range(2):
        url = serve(make_app(config))
        sequences.append([_outcome(f"{url}/api/readings") for _ in range(40)])
    assert sequences[0] == sequences[1]
    assert {"200", "429", "ChunkedEncodingError", "ConnectionError"} <= set(sequences[0])
    assert {"500", "502", "503", "504"} & set(sequences[0])


def test_health_is_never_subject_to_chaos_and_draws_nothing(make_app: MakeApp) -> None:
    config = {"CHAOS_ERROR_RATE": 0.5, "CHAOS_SEED": 9}
    plain = make_app(config).test_client()
    with_health = make_app(config).test_client()
    expected = [plain.get("/api/customers").status_code for _ in range(30)]
    seen = []
    for _ in range(30):
        assert with_health.get("/api/health").status_code == 200
        seen.append(with_health.get("/api/customers").status_code)
    assert seen == expected
    assert set(seen) > {200}


def test_injected_error_is_a_json_error_with_a_configured_code(
    make_app: MakeApp, serve: Serve
) -> None:
    url = serve(make_app({"CHAOS_ERROR_RATE": 1, "CHAOS_ERROR_CODES": "502"}))
    response = requests.get(f"{url}/api/customers/C01", timeout=10)
    assert response.status_code == 502
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {"error": "chaos: injected HTTP 502"}


def test_rate_limit_is_a_429_with_retry_after(make_app: MakeApp, serve: Serve) -> None:
    url = serve(make_app({"CHAOS_RATE_LIMIT_RATE": 1, "CHAOS_RETRY_AFTER": 7}))
    response = requests.get(f"{url}/api/machines", timeout=10)
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert "error" in response.json()
    assert requests.get(f"{url}/api/health", timeout=10).status_code == 200


def _http_get(base_url: str, path: str) -> http.client.HTTPResponse:
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    connection.request("GET", path)
    response = connection.getresponse()
    connection.close()  # the response keeps its own reference to the socket
    return response


def test_truncation_announces_the_full_length_and_sends_part_of_it(
    make_app: MakeApp, serve: Serve
) -> None:
    full = make_app().test_client().get("/api/readings?limit=12").data
    url = serve(make_app({"CHAOS_TRUNCATE_RATE": 1}))

    response = _http_get(url, "/api/readings?limit=12")
    assert response.status == 200
    assert int(response.headers["Content-Length"]) == len(full)
    with pytest.raises(http.client.IncompleteRead) as info:
        response.read()
    response.close()
    assert 0 < len(info.value.partial) < len(full)
    assert full.startswith(info.value.partial)

    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(f"{url}/api/readings?limit=12", timeout=10)


def test_reset_closes_the_connection_without_any_response(make_app: MakeApp, serve: Serve) -> None:
    url = serve(make_app({"CHAOS_RESET_RATE": 1}))
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(b"GET /api/customers HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    assert received == b""

    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"{url}/api/customers", timeout=10)
    assert requests.get(f"{url}/api/health", timeout=10).status_code == 200


def test_reset_without_a_socket_sends_no_body(make_app: MakeApp) -> None:
    response = make_app({"CHAOS_RESET_RATE": 1}).test_client().get("/api/customers")
    assert response.data == b""
    assert int(response.headers["Content-Length"]) > 0


def test_truncation_without_a_socket_sends_half_the_body(make_app: MakeApp) -> None:
    full = make_app().test_client().get("/api/customers").data
    response = make_app({"CHAOS_TRUNCATE_RATE": 1}).test_client().get("/api/customers")
    assert response.data == full[: len(full) // 2]
    assert int(response.headers["Content-Length"]) == len(full)
    with pytest.raises(json.JSONDecodeError):
        json.loads(response.data)


def test_latency_delays_data_requests_only(make_app: MakeApp) -> None:
    client = make_app({"CHAOS_LATENCY_MS": 150}).test_client()
    started = time.perf_counter()
    assert client.get("/api/customers").status_code == 200
    assert time.perf_counter() - started >= 0.15
    started = time.perf_counter()
    assert client.get("/api/health").status_code == 200
    assert time.perf_counter() - started < 0.15

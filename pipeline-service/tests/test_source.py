"""The source client: retries that are bounded and polite, against a misbehaving real server."""

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pipeline_service.config import Settings
from pipeline_service.source import SourceClient, SourceError, TransientSourceError

from conftest import SAMPLE_DATA_DIR, customer, machine, reading


def settings_for(url: str, **overrides) -> Settings:
    return Settings(
        _env_file=None, database_url="postgresql://unused/db", mock_server_url=url, **overrides
    )


def test_a_chaotic_source_still_ends_with_the_database_equal_to_the_source(
    serve_source, make_client, db
):
    customers = [customer(n) for n in range(1, 151)]
    machines = [machine(n) for n in range(1, 6)]
    readings = [reading(m, minute) for m in range(1, 6) for minute in range(60)]
    source = serve_source(
        customers=customers,
        machines=machines,
        readings=readings,
        CHAOS_SEED=7,
        CHAOS_ERROR_RATE=0.15,
        CHAOS_RATE_LIMIT_RATE=0.1,
        CHAOS_RETRY_AFTER=0,
        CHAOS_TRUNCATE_RATE=0.1,
        CHAOS_RESET_RATE=0.1,
    )
    client = make_client(
        source.url, ingest_page_size=10, source_max_attempts=15, source_give_up_seconds=60
    )
    response = client.post("/api/ingest")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["records_processed"] == len(customers) + len(machines) + len(readings)
    assert body["rejected"] == 0
    # The chaos really happened: more requests than pages.
    pages = 15 + 1 + 30
    assert len(source.requests) > pages

    served = client.get("/api/customers?limit=1000").json()["data"]
    assert [c["customer_id"] for c in served] == [c["customer_id"] for c in customers]
    assert [c["email"] for c in served] == [c["email"] for c in customers]
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*), count(DISTINCT (machine_id, timestamp)) FROM machine_readings"
        )
        assert cur.fetchone() == (len(readings), len(readings))


def test_retry_after_is_honoured(serve_source):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    source.fail_with(429, headers={"Retry-After": "1"})
    client = SourceClient(settings_for(source.url, source_max_attempts=3))
    started = time.monotonic()
    with pytest.raises(TransientSourceError):
        client.get_page("/api/customers", 1, 10)
    elapsed = time.monotonic() - started
    assert len(source.requests) == 3
    assert elapsed >= 2.0  # two waits of Retry-After: 1


@pytest.mark.parametrize("retry_after", ["3600", "nan", "inf"])
def test_retry_after_never_outlasts_the_give_up_time(serve_source, retry_after):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    source.fail_with(503, headers={"Retry-After": retry_after})
    client = SourceClient(
        settings_for(source.url, source_max_attempts=3, source_give_up_seconds=1.0)
    )
    started = time.monotonic()
    with pytest.raises(TransientSourceError):
        client.get_page("/api/customers", 1, 10)
    assert time.monotonic() - started < 4


def test_a_transient_failure_heals_on_retry(serve_source):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    source.fail_with(503)
    client = SourceClient(settings_for(source.url, source_max_attempts=5))
    threading.Timer(0.3, source.heal).start()
    page = client.get_page("/api/customers", 1, 5)
    assert len(page.records) == 5 and page.total == 21
    assert len(source.requests) >= 2


def test_give_up_time_bounds_the_retries(serve_source):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    source.fail_with(500)
    client = SourceClient(
        settings_for(source.url, source_max_attempts=20, source_give_up_seconds=1.5)
    )
    started = time.monotonic()
    with pytest.raises(TransientSourceError):
        client.get_page("/api/customers", 1, 10)
    assert time.monotonic() - started < 1.5 + 5.0  # at most one more backoff step


@pytest.mark.parametrize("status", [400, 404, 401])
def test_client_errors_fail_at_once(serve_source, status):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    source.fail_with(status)
    client = SourceClient(settings_for(source.url, source_max_attempts=5))
    with pytest.raises(SourceError) as caught:
        client.get_page("/api/customers", 1, 10)
    assert not isinstance(caught.value, TransientSourceError)
    assert f"HTTP {status}" in str(caught.value)
    assert len(source.requests) == 1


def test_unreachable_source_names_the_url(free_port_url):
    client = SourceClient(
        settings_for(free_port_url, source_max_attempts=2, source_give_up_seconds=2)
    )
    with pytest.raises(SourceError) as caught:
        client.get_page("/api/customers", 1, 10)
    assert caught.value.url.startswith(f"{free_port_url}/api/customers?page=1")


def test_a_page_that_is_not_the_expected_shape_is_a_clear_error(serve_source):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    client = SourceClient(settings_for(source.url))
    with pytest.raises(SourceError, match="no 'data' array"):
        client.get_page("/api/health", 1, 10)


@pytest.fixture
def free_port_url() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_json_extensions_and_huge_integers_stay_text_for_validation_to_reject():
    from pipeline_service.source import parse_json

    body = b'{"data": [{"a": NaN, "b": -Infinity, "c": ' + b"7" * 5000 + b', "d": 1}]}'
    (record,) = parse_json(body)["data"]
    assert record == {"a": "NaN", "b": "-Infinity", "c": "7" * 5000, "d": 1}


@pytest.fixture
def invalid_utf8_source() -> Iterator[str]:
    """A real HTTP server on loopback whose every answer is a page holding a byte that is
    not UTF-8 (the mock server cannot serve one: it reads its data as text)."""
    body = b'{"data":[{"customer_id":"C\xff"}],"total":1}'

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("parse", [True, False])
def test_a_page_that_is_not_utf8_is_broken_json_whether_parsed_or_split(invalid_utf8_source, parse):
    client = SourceClient(
        settings_for(invalid_utf8_source, source_max_attempts=2, source_give_up_seconds=5)
    )
    with pytest.raises(TransientSourceError, match="invalid JSON"):
        client.get_page("/api/customers", 1, 10, parse=parse)


@pytest.fixture
def silent_source() -> Iterator[str]:
    """A loopback port that takes connections (the kernel completes them) but never answers."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_source_that_never_answers_times_out_on_every_attempt(silent_source):
    client = SourceClient(
        settings_for(silent_source, source_max_attempts=2, source_read_timeout=0.3)
    )
    started = time.monotonic()
    with pytest.raises(TransientSourceError, match=r"no answer within 0\.3 s"):
        client.get_page("/api/customers", 1, 10)
    assert 0.6 <= time.monotonic() - started < 5

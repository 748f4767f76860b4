"""The live stream over real HTTP: events committed by this or another pipeline process (or
straight in the database) arrive as Server-Sent Events, and a client that leaves leaves
nothing behind."""

import http.client
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from conftest import (
    SAMPLE_DATA_DIR,
    PipelineProcess,
    ThreadedServer,
    load_sample,
    wait_until,
    write_source_files,
)

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def reading(minute: int, temperature: float = 20.0) -> dict:
    stamp = (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")
    return {"timestamp": stamp, "temperature": temperature, "speed": 900.0, "status": "STARTED"}


class EventStream:
    """A minimal SSE client over http.client, every read bounded by a socket timeout."""

    def __init__(self, base_url: str, path: str, timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        self.conn.request("GET", path, headers={"Accept": "text/event-stream"})
        self.response = self.conn.getresponse()

    def next(self) -> dict | None:
        """The next block as {'comments': [...], 'event', 'data', 'id', 'retry'}; None at
        the end of the stream."""
        block: dict[str, Any] = {"comments": []}
        while True:
            line = self.response.readline()
            if not line:
                return None
            line = line.decode().rstrip("\r\n")
            if not line:
                if block != {"comments": []}:
                    return block
                continue
            if line.startswith(":"):
                block["comments"].append(line[1:].strip())
                continue
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "data":
                block["data"] = block["data"] + "\n" + value if "data" in block else value
            else:
                block[name] = value

    def next_event(self) -> dict:
        """The next block that is an event (keep-alive comments skipped), data parsed."""
        while True:
            block = self.next()
            assert block is not None, "the stream ended"
            if "event" in block:
                block["data"] = json.loads(block["data"])
                return block

    def close(self) -> None:
        self.response.close()
        self.conn.close()


@pytest.fixture
def live(database_url, serve_source) -> Iterator[ThreadedServer]:
    """The pipeline served over real HTTP, with the sample data ingested."""
    from pipeline_service.config import Settings
    from pipeline_service.main import create_app

    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    settings = Settings(
        _env_file=None,
        database_url=database_url,
        mock_server_url=source.url,
        pipeline_api_key=None,
    )
    server = ThreadedServer(create_app(settings))
    try:
        assert requests.post(f"{server.url}/api/ingest", timeout=30).status_code == 200
        yield server
    finally:
        server.stop()


@pytest.fixture
def open_stream(live) -> Iterator[Callable[..., EventStream]]:
    """Open a stream on the live server; it is ready (listening) when this returns."""
    streams: list[EventStream] = []

    def start(machine_id: str = "MCH001", heartbeat: float | None = None) -> EventStream:
        query = f"?heartbeat={heartbeat}" if heartbeat else ""
        stream = EventStream(live.url, f"/api/machines/{machine_id}/stream{query}")
        streams.append(stream)
        assert stream.response.status == 200
        assert stream.response.getheader("content-type").startswith("text/event-stream")
        first = stream.next()
        assert first == {"comments": [f"events of machine {machine_id}"], "retry": "3000"}
        return stream

    yield start
    for stream in streams:
        stream.close()


def listeners(db) -> int:
    with db.cursor() as cur:
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'pipeline-service-stream' AND datname = current_database()"
        )
        return cur.fetchone()[0]


def test_stream_sends_keep_alive_comments_while_idle(open_stream):
    stream = open_stream(heartbeat=1)
    started = time.monotonic()
    assert stream.next() == {"comments": ["keep-alive"]}
    assert stream.next() == {"comments": ["keep-alive"]}
    assert 1.5 < time.monotonic() - started < 5


def test_reading_and_status_change_arrive_with_increasing_ids(live, open_stream):
    stream = open_stream()
    pushed = requests.post(f"{live.url}/api/machines/MCH001/readings", json=reading(0, 77.5))
    assert pushed.status_code == 201
    event = stream.next_event()
    assert (event["event"], event["id"]) == ("reading", "1")
    assert event["data"] == {"machine_id": "MCH001"} | reading(0, 77.5)

    requests.post(f"{live.url}/api/machines/MCH001/status", json={"status": "ERROR"})
    event = stream.next_event()
    assert (event["event"], event["id"]) == ("status", "2")
    data = event["data"]
    assert (data["machine_id"], data["old_status"], data["new_status"], data["source"]) == (
        "MCH001",
        "STARTED",
        "ERROR",
        "api",
    )
    entry = requests.get(f"{live.url}/api/machines/MCH001/status-history").json()["data"][0]
    assert entry == data


def test_other_machines_events_are_not_sent(live, open_stream):
    stream = open_stream()
    requests.post(f"{live.url}/api/machines/MCH002/readings", json=reading(0, 1.0))
    requests.post(f"{live.url}/api/machines/MCH002/status", json={"status": "ERROR"})
    requests.post(f"{live.url}/api/machines/MCH001/readings", json=reading(0, 2.0))
    event = stream.next_event()
    assert event["data"]["machine_id"] == "MCH001" and event["data"]["temperature"] == 2.0


def test_a_batch_too_big_for_one_notification_is_read_back_in_order(live, open_stream):
    stream = open_stream()
    batch = [reading(m, float(m)) for m in range(300)]
    requests.post(f"{live.url}/api/machines/MCH001/readings", json=batch)
    # Rewriting the same readings unchanged announces nothing; one change announces one.
    requests.post(f"{live.url}/api/machines/MCH001/readings", json=batch)
    requests.post(f"{live.url}/api/machines/MCH001/readings", json=reading(5, -5.0))
    received = [stream.next_event() for _ in range(301)]
    assert [e["id"] for e in received] == [str(n) for n in range(1, 302)]
    assert [e["data"]["temperature"] for e in received[:300]] == [float(m) for m in range(300)]
    assert received[300]["data"] == {"machine_id": "MCH001"} | reading(5, -5.0)


def test_readings_written_straight_to_the_database_arrive_too(db, open_stream):
    stream = open_stream()
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO machine_readings (machine_id, timestamp, temperature, speed, status)"
            " VALUES ('MCH001', '2024-01-01T00:00:00Z', 1, 2, 'IDLE'),"
            " ('MCH001', '2024-01-01T00:01:00Z', 3, 4, 'IDLE')"
        )
    assert [stream.next_event()["data"]["temperature"] for _ in range(2)] == [1.0, 3.0]


def test_a_bulk_load_is_one_bulk_readings_event(db, open_stream):
    stream = open_stream()
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO machine_readings (machine_id, timestamp, temperature, speed, status)"
            " SELECT 'MCH001', '2024-01-01T00:00:00Z'::timestamptz + n * interval '1 second',"
            " n, n, 'IDLE' FROM generate_series(0, 1000) AS n"
        )
    event = stream.next_event()
    assert event["event"] == "bulk-readings"
    assert event["data"] == {
        "machine_id": "MCH001",
        "count": 1001,
        "from": "2024-01-01T00:00:00Z",
        "to": "2024-01-01T00:16:40Z",
    }


def test_uncommitted_changes_are_not_sent(live, database_url, open_stream):
    import psycopg2

    stream = open_stream()
    conn = psycopg2.connect(database_url.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with conn.cursor() as cur:
            cur.execute("UPDATE machines SET status = 'IDLE' WHERE machine_id = 'MCH001'")
        conn.rollback()
    finally:
        conn.close()
    requests.post(f"{live.url}/api/machines/MCH001/status", json={"status": "COMPLETED"})
    data = stream.next_event()["data"]
    assert (data["old_status"], data["new_status"]) == ("STARTED", "COMPLETED")


def test_an_ingest_that_changes_a_status_is_sent_with_source_ingest(
    open_stream, serve_source, make_client, tmp_path
):
    stream = open_stream("MCH002")
    machines = [
        m | {"status": "ERROR"} if m["machine_id"] == "MCH002" else m
        for m in load_sample("machines")
    ]
    changed = serve_source(data_dir=write_source_files(tmp_path / "changed", machines=machines))
    assert make_client(changed.url).post("/api/ingest?resource=machines").status_code == 200
    data = stream.next_event()["data"]
    assert (data["old_status"], data["new_status"], data["source"]) == ("IDLE", "ERROR", "ingest")


def test_client_disconnect_leaves_no_listener_and_no_thread(live, db, open_stream):
    threads_before = {t.ident for t in threading.enumerate()}
    stream = open_stream(heartbeat=1)
    assert listeners(db) == 1
    stream.close()
    wait_until(lambda: listeners(db) == 0, timeout=5, what="the listener to close")
    extra = wait_until(
        lambda: {t.ident for t in threading.enumerate()} <= threads_before or None,
        timeout=5,
        what="no extra thread",
    )
    assert extra
    # The server is still healthy and serves a new stream.
    open_stream().close()
    wait_until(lambda: listeners(db) == 0, timeout=5, what="the second listener to close")


def test_server_shutdown_ends_open_streams(db, open_stream):
    from pipeline_service.events import stop_all_listeners

    stream = open_stream(heartbeat=30)
    stop_all_listeners()
    started = time.monotonic()
    while stream.next() is not None:
        pass
    assert time.monotonic() - started < 5
    wait_until(lambda: listeners(db) == 0, timeout=5, what="the listener to close")
    # A stream opened afterwards is not affected.
    stream = open_stream(heartbeat=1)
    assert stream.next() == {"comments": ["keep-alive"]}


def test_bad_heartbeat_is_400(live):
    for value in ("0", "61", "x"):
        response = requests.get(f"{live.url}/api/machines/MCH001/stream?heartbeat={value}")
        assert response.status_code == 400
        assert response.json()["error"].startswith("heartbeat:")


@pytest.mark.slow
def test_reading_pushed_to_a_second_process_arrives(live, database_url, open_stream, tmp_path):
    stream = open_stream()
    other = PipelineProcess(database_url, tmp_path)
    try:
        response = requests.post(
            f"{other.url}/api/machines/MCH001/readings", json=reading(0, 55.5), timeout=10
        )
        assert response.status_code == 201
        event = stream.next_event()
        assert event["event"] == "reading"
        assert event["data"] == {"machine_id": "MCH001"} | reading(0, 55.5)
        requests.post(
            f"{other.url}/api/machines/MCH001/status", json={"status": "IDLE"}, timeout=10
        )
        assert stream.next_event()["data"]["new_status"] == "IDLE"
    finally:
        other.stop()


@pytest.mark.slow
def test_ctrl_c_stops_a_server_with_an_open_stream_promptly(database_url, db, tmp_path):
    server = PipelineProcess(database_url, tmp_path)
    try:
        with db.cursor() as cur:
            cur.execute(
                "INSERT INTO machines (machine_id, name, model, location, status, created_at)"
                " VALUES ('M1', 'n', 'm', 'l', 'IDLE', now())"
            )
        stream = EventStream(server.url, "/api/machines/M1/stream?heartbeat=30")
        assert stream.next()["retry"] == "3000"
        server.process.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert server.process.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert stream.next() is None
        stream.close()
        assert listeners(db) == 0
    finally:
        server.stop()


def test_stream_without_a_database_is_503_json(make_client):
    client = make_client(database_url="postgresql://nobody@127.0.0.1:9/nothing")
    response = client.get("/api/machines/MCH001/stream")
    assert response.status_code == 503
    assert response.json()["error"].startswith("database unavailable")


def test_a_lost_database_connection_ends_the_stream(db, open_stream):
    stream = open_stream(heartbeat=30)
    with db.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'pipeline-service-stream' AND datname = current_database()"
        )
    started = time.monotonic()
    assert stream.next() is None  # ended; an EventSource reconnects after `retry`
    assert time.monotonic() - started < 5

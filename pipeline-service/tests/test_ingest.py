"""The ingest against the real mock server over HTTP and a real PostgreSQL."""

import fcntl
import hashlib
import json
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest
import xxhash
from pipeline_service import ingest
from pipeline_service.config import Settings
from pipeline_service.ingest import INGEST_LOCK_ID, PageWriter, storable_json
from pipeline_service.resources import RESOURCES

from conftest import (
    SAMPLE_DATA_DIR,
    PipelineProcess,
    customer,
    load_sample,
    machine,
    reading,
    wait_until,
    write_source_files,
)

KEY_WIDTH = {"customers": 1, "machines": 1, "machine_readings": 2}


def row_versions(db, table: str) -> dict:
    """Each row's key and the transaction that wrote its current version."""
    with db.cursor() as cur:
        cur.execute(f"SELECT xmin::text, * FROM {table}")
        return {row[1 : 1 + KEY_WIDTH[table]]: row[0] for row in cur.fetchall()}


def count(db, table: str) -> int:
    with db.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table}")
        return cur.fetchone()[0]


def test_sample_ingest_takes_in_every_source_record(serve_source, make_client, db):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    body = client.post("/api/ingest").json()
    sizes = {name: len(load_sample(name)) for name in ("customers", "machines", "readings")}
    assert body["status"] == "success"
    assert body["records_processed"] == sum(sizes.values())
    assert body["rejected"] == 0
    assert {n: c["inserted"] for n, c in body["resources"].items()} == sizes
    assert count(db, "customers") == 21
    assert count(db, "machines") == sizes["machines"]
    assert count(db, "machine_readings") == sizes["readings"]


def test_reingest_of_unchanged_source_writes_nothing(serve_source, make_client, db):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    client.post("/api/ingest")
    before = {t: row_versions(db, t) for t in ("customers", "machines", "machine_readings")}
    body = client.post("/api/ingest").json()
    after = {t: row_versions(db, t) for t in ("customers", "machines", "machine_readings")}
    assert after == before  # no new row versions at all
    for counts in body["resources"].values():
        assert counts["inserted"] == counts["updated"] == 0
        assert counts["unchanged"] == counts["fetched"]


def test_changed_source_record_updates_its_row_only(serve_source, make_client, db, tmp_path):
    records = [customer(n) for n in range(1, 6)]
    first = serve_source(customers=records)
    client = make_client(first.url)
    client.post("/api/ingest?resource=customers")
    versions = row_versions(db, "customers")

    records[2] = records[2] | {"email": "new@example.com", "account_balance": -0.01}
    second = serve_source(customers=records)
    client.app.state.settings.mock_server_url = second.url
    body = client.post("/api/ingest?resource=customers").json()
    counts = body["resources"]["customers"]
    assert (counts["inserted"], counts["updated"], counts["unchanged"]) == (0, 1, 4)
    served = client.get("/api/customers/C00003").json()
    assert served["email"] == "new@example.com" and served["account_balance"] == -0.01
    changed = {k for k, v in row_versions(db, "customers").items() if versions[k] != v}
    assert changed == {("C00003",)}


def test_many_pages_with_a_partial_last_page(serve_source, make_client, db):
    source = serve_source(customers=[customer(n) for n in range(1, 24)])
    client = make_client(source.url, ingest_page_size=5)
    body = client.post("/api/ingest?resource=customers").json()
    assert body["resources"]["customers"]["pages"] == 5
    assert sorted(source.pages_requested("/api/customers")) == [1, 2, 3, 4, 5]
    assert count(db, "customers") == 23


def test_resource_parameter_limits_the_run(serve_source, make_client, db):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    body = client.post("/api/ingest?resource=machines").json()
    assert list(body["resources"]) == ["machines"]
    assert count(db, "machines") > 0
    assert count(db, "customers") == count(db, "machine_readings") == 0
    bad = client.post("/api/ingest?resource=orders")
    assert bad.status_code == 400 and bad.json()["error"].startswith("resource:")


def test_duplicate_keys_later_record_wins_within_and_across_pages(serve_source, make_client):
    records = [
        customer(1, first_name="early"),
        customer(2),
        customer(1, first_name="middle"),  # same page as the first
        customer(3),
        customer(4),
        customer(1, first_name="late"),  # next page (page size 3)
    ]
    client = make_client(serve_source(customers=records).url, ingest_page_size=3)
    body = client.post("/api/ingest?resource=customers").json()
    assert body["status"] == "success"
    assert client.get("/api/customers/C00001").json()["first_name"] == "late"
    assert client.get("/api/customers").json()["total"] == 4


HOSTILE_VALID = [
    customer(1, first_name="Zoë 🚀 ⅓ ﷽", last_name='O\'Brien "Bob"', address="a\\b\tc\nd\r"),
    customer(2, first_name="'; DROP TABLE customers; --", last_name="NULL"),
    customer(3, address="x" * 10_000, email="e" * 243 + "@example.com"),
    customer(4, account_balance=9999999999999.99, date_of_birth="0001-01-01"),
    customer(5, account_balance=-9999999999999.99, date_of_birth="9999-12-31"),
    customer(6, account_balance=0, created_at="1970-01-01T00:00:00+14:00"),
    customer(7, phone="", address=""),
    customer(8, created_at="2024-02-29T23:59:59.999999-07:30", account_balance=-0.01),
    customer(9, first_name="\\N", last_name="\\.", address="\\\\N"),
]

HOSTILE_INVALID = [
    ({"first_name": "no key"}, "customer_id: is required"),
    (customer(20, date_of_birth="1990-02-30"), "date_of_birth"),
    (customer(21, account_balance=1e20), "account_balance"),
    (customer(22, account_balance="100.00"), "account_balance: must be a number"),
    (customer(23, account_balance=1.005), "account_balance"),
    (customer(24, first_name="x" * 101), "first_name"),
    (customer(25, first_name=42), "first_name: must be a string"),
    (customer(26, created_at="2024-03-05 10:11"), "created_at"),
    (customer(27, created_at="2024-03-05T10:11:12"), "created_at"),
    (customer(33, created_at="2024-03-05T10:11:12+16:00"), "created_at"),
    (customer(34, created_at="1700000000"), "created_at"),
    (customer(35, created_at="2024-03-05T10:11:12.9999999Z"), "created_at"),
    (customer(28, email=None), "email"),
    (customer(29, last_name="nul\u0000byte"), "last_name"),
    (customer(30, phone="+1" * 11), "phone"),
    (customer(31, account_balance=True), "account_balance"),
    (customer(32, customer_id="k" * 51), "customer_id"),
    ("not an object", "record"),
    (None, "record"),
    ([1, 2], "record"),
]


def test_hostile_source_file_keeps_valid_records_exactly_and_explains_the_rest(
    serve_source, make_client, db
):
    records = HOSTILE_VALID + [raw for raw, _ in HOSTILE_INVALID]
    client = make_client(serve_source(customers=records).url, ingest_page_size=7)
    body = client.post("/api/ingest?resource=customers").json()
    assert body["status"] == "success"
    assert body["records_processed"] == len(HOSTILE_VALID)
    assert body["rejected"] == len(HOSTILE_INVALID)

    for expected in HOSTILE_VALID:
        served = client.get(f"/api/customers/{expected['customer_id']}").json()
        for field, value in expected.items():
            if field == "created_at":
                assert datetime.fromisoformat(served[field]) == datetime.fromisoformat(value)
            else:
                assert served[field] == value, field

    with db.cursor() as cur:
        cur.execute(
            "SELECT payload, reason, source_page, run_id, record_key FROM rejected_records "
            "ORDER BY id"
        )
        stored = cur.fetchall()
    assert len(stored) == len(HOSTILE_INVALID)
    for (raw, reason_part), (payload, reason, page, run_id, key) in zip(
        HOSTILE_INVALID, stored, strict=True
    ):
        assert reason_part in reason
        assert payload == storable_json(raw)[0]
        assert page >= 1 and run_id == body["run_id"]
        if isinstance(raw, dict) and "customer_id" in raw:
            assert key == raw["customer_id"]


def test_the_same_instant_written_two_ways_is_one_reading_and_the_later_wins(
    serve_source, make_client, db
):
    readings = [
        reading(1, 0, temperature=1.0),
        reading(1, 0, timestamp="2024-06-01T09:00:00+01:00", temperature=2.0),
        reading(1, 1, temperature=3.0),
    ]
    client = make_client(serve_source(machines=[machine(1)], readings=readings).url)
    body = client.post("/api/ingest").json()
    assert body["status"] == "success"
    assert body["resources"]["readings"]["inserted"] == 2
    with db.cursor() as cur:
        cur.execute("SELECT temperature FROM machine_readings ORDER BY timestamp")
        assert [r[0] for r in cur.fetchall()] == [2.0, 3.0]
    # Again, with the earlier spelling changed and the later one as stored: still the later.
    readings[0] = reading(1, 0, temperature=9.0)
    client.app.state.settings.mock_server_url = serve_source(
        machines=[machine(1)], readings=readings
    ).url
    client.post("/api/ingest?resource=readings")
    with db.cursor() as cur:
        cur.execute("SELECT temperature FROM machine_readings ORDER BY timestamp")
        assert [r[0] for r in cur.fetchall()] == [2.0, 3.0]


def test_a_number_too_long_to_parse_rejects_its_record_only(serve_source, make_client, db):
    source = serve_source(customers=[customer(1), customer(2)])
    data = source.data_dir / "customers.json"
    data.write_text(
        data.read_text().replace('"account_balance": 2.5', '"account_balance": ' + "9" * 5000)
    )
    client = make_client(serve_source(data_dir=source.data_dir).url)
    body = client.post("/api/ingest?resource=customers").json()
    assert body["status"] == "success"
    assert body["records_processed"] == 1 and body["rejected"] == 1


def test_reading_of_unknown_machine_is_rejected_not_fatal(serve_source, make_client, db):
    source = serve_source(
        machines=[machine(1)],
        readings=[reading(1, 0), reading(2, 0), reading(1, 1)],
    )
    body = make_client(source.url).post("/api/ingest").json()
    assert body["resources"]["readings"]["inserted"] == 2
    assert body["resources"]["readings"]["rejected"] == 1
    with db.cursor() as cur:
        cur.execute("SELECT resource, record_key, reason FROM rejected_records")
        resource, key, reason = cur.fetchone()
    assert resource == "readings"
    assert key.startswith("M002/")
    assert "no machine 'M002'" in reason


def test_runs_are_listed_newest_first_with_their_counts(serve_source, make_client):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    first = client.post("/api/ingest?resource=customers").json()
    second = client.post("/api/ingest?resource=machines").json()
    listing = client.get("/api/ingest/runs?limit=1").json()
    assert listing["total"] == 2
    assert [r["run_id"] for r in listing["data"]] == [second["run_id"]]
    one = client.get(f"/api/ingest/runs/{first['run_id']}").json()
    assert one["status"] == "succeeded" and one["trigger"] == "api"
    assert one["resources"]["customers"]["inserted"] == 21
    assert one["finished_at"] is not None


def test_a_second_trigger_while_a_run_holds_the_lock_is_409(serve_source, make_client, db):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    with db.cursor() as cur:
        cur.execute("INSERT INTO ingest_runs (trigger, status) VALUES ('test', 'running')")
        cur.execute("SELECT pg_advisory_lock(%s)", (INGEST_LOCK_ID,))
    response = client.post("/api/ingest")
    assert response.status_code == 409
    assert response.json()["running_run_id"] == 1
    assert "ingest run 1 is already running" in response.json()["error"]
    with db.cursor() as cur:
        cur.execute("SELECT pg_advisory_unlock(%s)", (INGEST_LOCK_ID,))
    # The lock is free again: the abandoned 'running' run is marked failed, a new one runs.
    body = client.post("/api/ingest").json()
    assert body["status"] == "success"
    abandoned = client.get("/api/ingest/runs/1").json()
    assert abandoned["status"] == "failed" and "interrupted" in abandoned["error"]


def test_concurrent_triggers_run_once_and_never_duplicate(serve_source, make_client, db):
    source = serve_source(customers=[customer(n) for n in range(1, 41)], CHAOS_LATENCY_MS=100)
    clients = [make_client(source.url, ingest_page_size=5) for _ in range(2)]
    answers: list = [None, None]

    def trigger(i: int) -> None:
        answers[i] = clients[i].post("/api/ingest?resource=customers")

    threads = [threading.Thread(target=trigger, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(a.status_code for a in answers) == [200, 409]
    assert count(db, "customers") == 40
    assert sorted(source.pages_requested("/api/customers")) == list(range(1, 9))


def test_source_down_gives_502_quickly_and_keeps_what_was_stored(serve_source, make_client, db):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    client = make_client(source.url, source_max_attempts=3, source_give_up_seconds=5)
    client.post("/api/ingest?resource=customers")
    source.stop()
    started = time.monotonic()
    response = client.post("/api/ingest")
    elapsed = time.monotonic() - started
    assert response.status_code == 502
    body = response.json()
    assert source.url in body["error"] and body["source_url"].startswith(source.url)
    assert body["status"] == "failed" and f"resume={body['run_id']}" in body["error"]
    assert elapsed < 10
    assert count(db, "customers") == 21


def test_source_404_fails_at_once_without_retrying(serve_source, make_client):
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    source.fail_with(404)
    client = make_client(source.url, source_max_attempts=5)
    response = client.post("/api/ingest?resource=customers")
    assert response.status_code == 502
    assert "HTTP 404" in response.json()["error"]
    assert len(source.requests) == 1


def test_failed_run_resumes_from_its_last_committed_page(serve_source, make_client, db):
    source = serve_source(customers=[customer(n) for n in range(1, 24)])
    client = make_client(
        source.url, ingest_page_size=5, source_max_attempts=2, source_give_up_seconds=2
    )
    source.fail_with(503, after=3)  # pages 1-3 succeed, then the source breaks
    failed = client.post("/api/ingest?resource=customers")
    assert failed.status_code == 502
    run_id = failed.json()["run_id"]
    committed = failed.json()["resources"]["customers"]["pages"]
    assert 1 <= committed <= 3
    assert count(db, "customers") == committed * 5

    source.heal()
    source.requests.clear()
    resumed = client.post(f"/api/ingest?resume={run_id}")
    assert resumed.status_code == 200
    body = resumed.json()
    assert body["run_id"] == run_id and body["status"] == "success"
    assert body["resources"]["customers"]["pages"] == 5
    assert body["resources"]["customers"]["inserted"] == 23
    assert min(source.pages_requested("/api/customers")) == committed + 1
    assert count(db, "customers") == 23
    assert client.get(f"/api/ingest/runs/{run_id}").json()["status"] == "succeeded"


def test_a_page_written_ahead_commits_only_after_the_page_before_it(
    serve_source, make_client, db, monkeypatch
):
    monkeypatch.setattr(ingest, "PAGES_WRITTEN_AT_ONCE", 2)
    records = [customer(n) for n in range(1, 51)]
    client = make_client(serve_source(customers=records).url, ingest_page_size=10)
    fourth_copied = threading.Event()
    real_append = PageWriter.append

    def append_failing_on_page_3(writer, conn, plan):
        real_append(writer, conn, plan)
        if b"C00031" in plan.data:
            fourth_copied.set()
        if b"C00021" in plan.data:
            # Fail only once page 4 is stored in its own, still open, transaction.
            assert fourth_copied.wait(10), "page 4 was not written beside page 3"
            raise RuntimeError("page 3 failed")

    monkeypatch.setattr(PageWriter, "append", append_failing_on_page_3)
    failed = client.post("/api/ingest?resource=customers")
    assert failed.status_code == 500
    assert fourth_copied.is_set()
    with db.cursor() as cur:
        cur.execute("SELECT id, status FROM ingest_runs")
        ((run_id, status),) = cur.fetchall()
        cur.execute("SELECT next_page, pages, inserted FROM ingest_run_resources")
        assert cur.fetchone() == (3, 2, 20)
    assert status == "failed"
    assert count(db, "customers") == 20  # page 4 went with page 3

    monkeypatch.setattr(PageWriter, "append", real_append)
    resumed = client.post(f"/api/ingest?resume={run_id}")
    assert resumed.status_code == 200
    assert resumed.json()["resources"]["customers"]["inserted"] == 50
    with db.cursor() as cur:
        cur.execute("SELECT customer_id, position FROM customers ORDER BY customer_id")
        assert cur.fetchall() == [(r["customer_id"], n) for n, r in enumerate(records, 1)]


def stored_positions(db) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute("SELECT customer_id, position FROM customers ORDER BY position")
        return cur.fetchall()


def test_positions_stay_exact_when_pages_bring_fewer_new_records_than_a_page(
    serve_source, make_client, db
):
    # Workers number a page's records on the guess that each page before it adds a page
    # of new records. A rejected or a repeated record makes the guess wrong for the pages
    # asked before it was stored; the writer renumbers those, whose lines may hold newlines.
    records = [customer(n, address=f"{n} Main Street\nSpringfield") for n in range(1, 61)]
    records[7]["email"] = 7  # page 2 of 12: rejected
    records[23] = customer(22)  # page 5: key C00022 twice (the later wins), C00024 never
    client = make_client(serve_source(customers=records).url, ingest_page_size=5)
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
    assert (counts["inserted"], counts["rejected"]) == (58, 1)

    kept = sorted({r["customer_id"] for i, r in enumerate(records) if i != 7})
    assert stored_positions(db) == [(key, n) for n, key in enumerate(kept, 1)]
    served = client.get("/api/customers?page=7&limit=5").json()["data"]
    assert [(c["customer_id"], c["address"]) for c in served] == [
        (key, f"{int(key[1:])} Main Street\nSpringfield") for key in kept[30:35]
    ]

    # Pages that are not appends (a key between stored ones, changed values) are written
    # record by record from the same lines.
    records[7]["email"] = "fixed@example.com"
    records[40]["address"] = "moved\nelsewhere"
    client.app.state.settings.mock_server_url = serve_source(customers=records).url
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
    assert (counts["inserted"], counts["updated"], counts["unchanged"]) == (1, 1, 57)
    kept = sorted([*kept, "C00008"])
    assert stored_positions(db) == [(key, n) for n, key in enumerate(kept, 1)]
    assert client.get("/api/customers/C00041").json()["address"] == "moved\nelsewhere"


def test_only_a_failed_run_can_be_resumed(serve_source, make_client):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    run_id = client.post("/api/ingest?resource=machines").json()["run_id"]
    assert client.post(f"/api/ingest?resume={run_id}").status_code == 409
    assert client.post("/api/ingest?resume=999").status_code == 404
    both = client.post(f"/api/ingest?resume={run_id}&resource=machines")
    assert both.status_code == 400


@pytest.mark.parametrize(
    ("value", "expected", "altered"),
    [
        ({"a": "x\u0000y"}, {"a": "x\\u0000y"}, True),
        (["\ud800"], ["\\ud800"], True),
        ({"n": float("inf")}, {"n": "inf"}, True),
        ({"ok": [1, "two", None, 3.5]}, {"ok": [1, "two", None, 3.5]}, False),
    ],
)
def test_storable_json_escapes_what_jsonb_cannot_hold(value, expected, altered):
    assert storable_json(value) == (expected, altered)


@pytest.mark.slow
def test_pipeline_killed_mid_ingest_then_resumed_ends_exact(
    serve_source, database_url, db, tmp_path
):
    import contextlib
    import signal
    import threading

    import requests

    records = [customer(n) for n in range(1, 301)]
    source = serve_source(customers=records, CHAOS_LATENCY_MS=60)
    env = {"INGEST_PAGE_SIZE": "10"}
    first = PipelineProcess(database_url, tmp_path, source.url, **env)
    first_url = first.url
    try:

        def trigger() -> None:
            with contextlib.suppress(requests.ConnectionError):  # it will be killed
                requests.post(f"{first_url}/api/ingest?resource=customers", timeout=60)

        threading.Thread(target=trigger, daemon=True).start()
        deadline = time.monotonic() + 30
        while True:
            with db.cursor() as cur:
                cur.execute("SELECT coalesce(max(pages), 0) FROM ingest_run_resources")
                if cur.fetchone()[0] >= 5:
                    break
            assert time.monotonic() < deadline, "the ingest made no progress"
            time.sleep(0.05)
        first.process.send_signal(signal.SIGKILL)
        first.process.wait(timeout=10)
        # Its page workers (worker processes, 30 pages of 10) notice and end by themselves.
        wait_until(lambda: not processes_started_in(tmp_path), 15, "the page workers to end")
    finally:
        first.stop()

    with db.cursor() as cur:
        cur.execute("SELECT status FROM ingest_runs WHERE id = 1")
        assert cur.fetchone()[0] == "running"  # nobody has noticed yet
        cur.execute("SELECT next_page, pages FROM ingest_run_resources WHERE run_id = 1")
        next_page, pages = cur.fetchone()
        assert next_page == pages + 1
        assert count(db, "customers") == pages * 10  # committed pages only, whole
        cur.execute("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
        assert cur.fetchone()[0] == 0  # the dead process's lock went with its connection

    second = PipelineProcess(database_url, tmp_path, source.url, **env)
    second_url = second.url
    try:
        source.requests.clear()
        answer = requests.post(f"{second_url}/api/ingest?resume=1", timeout=120)
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["run_id"] == 1
        assert body["resources"]["customers"]["pages"] == 30
        assert body["resources"]["customers"]["inserted"] == 300
        assert min(source.pages_requested("/api/customers")) == next_page
    finally:
        second.stop()
    with db.cursor() as cur:
        cur.execute("SELECT customer_id, email FROM customers ORDER BY customer_id")
        assert cur.fetchall() == [(r["customer_id"], r["email"]) for r in records]


@pytest.mark.slow
def test_two_pipeline_processes_triggered_together(serve_source, database_url, db, tmp_path):
    import threading

    import requests

    records = [customer(n) for n in range(1, 101)]
    source = serve_source(customers=records, CHAOS_LATENCY_MS=50)
    env = {"INGEST_PAGE_SIZE": "10"}
    pipelines = [PipelineProcess(database_url, tmp_path, source.url, **env) for _ in range(2)]
    answers: dict[int, requests.Response] = {}
    try:
        barrier = threading.Barrier(2)

        def trigger(i: int, url: str) -> None:
            barrier.wait()
            answers[i] = requests.post(f"{url}/api/ingest?resource=customers", timeout=60)

        threads = [
            threading.Thread(target=trigger, args=(i, p.url)) for i, p in enumerate(pipelines)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=90)
    finally:
        for pipeline in pipelines:
            pipeline.stop()
    assert sorted(a.status_code for a in answers.values()) == [200, 409]
    busy = next(a for a in answers.values() if a.status_code == 409).json()
    assert busy["running_run_id"] == 1
    assert count(db, "customers") == 100
    assert sorted(source.pages_requested("/api/customers")) == list(range(1, 11))


def test_a_reingest_skips_stored_records_but_the_later_record_still_wins(
    serve_source, make_client, db
):
    first = [customer(n) for n in range(1, 7)]
    client = make_client(serve_source(customers=first).url, ingest_page_size=3)
    client.post("/api/ingest?resource=customers")

    changed = customer(1, first_name="changed")
    second = [
        changed,  # page 1: C00001 changes ...
        customer(2),
        customer(3),
        customer(1),  # page 2: ... and changes back to what was stored before
        customer(4, first_name="new name"),
        customer(4),  # the later record wins within a page too
        customer(5),
    ]
    client.app.state.settings.mock_server_url = serve_source(customers=second).url
    body = client.post("/api/ingest?resource=customers").json()
    counts = body["resources"]["customers"]
    assert counts["updated"] == 2  # C00001 twice; C00004 ends as it was
    assert counts["unchanged"] == 4 and counts["rejected"] == 0
    assert client.get("/api/customers/C00001").json()["first_name"] == "First1"
    assert client.get("/api/customers/C00004").json()["first_name"] == "First4"


def test_invalid_records_are_rejected_again_on_every_run(serve_source, make_client, db):
    records = [customer(1), customer(2, date_of_birth="1990-02-30")]
    client = make_client(serve_source(customers=records).url)
    for run in (1, 2):
        body = client.post("/api/ingest?resource=customers").json()
        assert body["rejected"] == 1
        assert body["resources"]["customers"]["unchanged"] == (run == 2)
    assert count(db, "rejected_records") == 2


def processes_started_in(directory) -> list[int]:
    """PIDs of live processes whose working directory is ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            here = entry.name.isdigit() and (entry / "cwd").resolve() == Path(directory).resolve()
            if here and "State:\tZ" not in (entry / "status").read_text():  # zombies are gone
                found.append(int(entry.name))
        except (FileNotFoundError, PermissionError, ProcessLookupError):
            continue
    return found


def stored_bytes_hashes(db) -> dict[str, str]:
    with db.cursor() as cur:
        cur.execute("SELECT customer_id, encode(source_bytes_hash, 'hex') FROM customers")
        return dict(cur.fetchall())


def ingested(serve_source, make_client, db, records: list, page_size: int):
    """A client that has ingested ``records`` as customers in pages of ``page_size``, and
    the version of each row it wrote."""
    client = make_client(serve_source(customers=records).url, ingest_page_size=page_size)
    client.post("/api/ingest?resource=customers")
    return client, row_versions(db, "customers")


def test_the_bytes_hash_is_the_xxh3_of_the_record_as_served(serve_source, make_client, db):
    source = serve_source(customers=[customer(n) for n in range(1, 4)])
    make_client(source.url).post("/api/ingest?resource=customers")
    for key, stored in stored_bytes_hashes(db).items():
        served = urllib.request.urlopen(f"{source.url}/api/customers/{key}").read()
        assert stored == xxhash.xxh3_128_hexdigest(served)


def test_pages_parsed_once_store_the_digests_of_records_parsed_in_full(
    serve_source, make_client, db
):
    # Valid pages are parsed once, to their records' field values (worker processes take
    # all but the first of these twelve); rows and digests must be those that the same
    # records parsed in full give. Integers stay integers; left-out fields are null.
    records = [customer(n, account_balance=n if n % 2 else n + 0.5) for n in range(1, 121)]
    for record in records[::3]:
        del record["phone"]
    client = make_client(serve_source(customers=records).url, ingest_page_size=10)
    client.post("/api/ingest?resource=customers")
    rows = PageWriter(RESOURCES["customers"]).csv_rows(records)
    with db.cursor() as cur:
        cur.execute("SELECT customer_id, encode(source_hash, 'hex') FROM customers")
        stored = dict(cur.fetchall())
    keys = [record["customer_id"] for record in records]
    assert stored == dict(zip(keys, map(xxhash.xxh3_128_hexdigest, rows), strict=True))


@pytest.fixture
def raw_pages(monkeypatch) -> list[int]:
    """For each page that reaches the writer unparsed, how many of its records it parses:
    those it did not find stored as they are."""
    parsed: list[int] = []
    real_observe = ingest.PageMode.observe

    def counting_observe(mode, records, unrecognised):
        parsed.append(unrecognised)
        return real_observe(mode, records, unrecognised)

    monkeypatch.setattr(ingest.PageMode, "observe", counting_observe)
    return parsed


def test_a_reingest_parses_only_records_whose_bytes_changed(
    serve_source, make_client, db, raw_pages
):
    records = [customer(n) for n in range(1, 41)]
    client, versions = ingested(serve_source, make_client, db, records, page_size=10)

    second = list(records)
    second[4] = customer(5, first_name="Changed")  # page 1
    second[12] = customer(13, date_of_birth="1990-02-30")  # page 2: now invalid
    second[25] = customer(99)  # page 3: a new key
    second[37] = customer(40, first_name="Earlier")  # page 4: the same key twice,
    # the later (as stored) wins
    client.app.state.settings.mock_server_url = serve_source(customers=second).url
    body = client.post("/api/ingest?resource=customers").json()

    counts = body["resources"]["customers"]
    assert raw_pages == [1, 1, 1, 2]  # every page came raw; only these records were parsed
    assert (counts["inserted"], counts["updated"], counts["rejected"]) == (1, 1, 1)
    assert counts["unchanged"] == 36
    changed = {k for k, v in row_versions(db, "customers").items() if versions.get(k) != v}
    assert changed == {("C00005",), ("C00099",)}
    assert client.get("/api/customers/C00005").json()["first_name"] == "Changed"
    assert client.get("/api/customers/C00040").json()["first_name"] == "First40"
    assert client.get("/api/customers/C00013").json()["date_of_birth"] == "1990-01-31"
    with db.cursor() as cur:
        cur.execute("SELECT record_key, reason FROM rejected_records")
        ((key, reason),) = cur.fetchall()
    assert key == "C00013" and "date_of_birth" in reason


def test_a_page_stored_as_it_is_is_recognised_by_one_digest_of_its_records(
    serve_source, make_client, db, raw_pages, monkeypatch
):
    records = [customer(n) for n in range(1, 41)]
    client, versions = ingested(serve_source, make_client, db, records, page_size=10)
    looked_up = set()  # key ranges whose stored byte digests were read record by record
    read_per_record = PageWriter.stored_digests

    def recording(writer, conn, low, high, records, query):
        if query == writer.read_bytes_digests:
            looked_up.add((low, high))
        return read_per_record(writer, conn, low, high, records, query)

    monkeypatch.setattr(PageWriter, "stored_digests", recording)
    second = list(records)
    second[14] = customer(15, first_name="Changed")  # page 2
    del second[25]  # page 3 (C00021-C00031) lacks C00026, which is stored in its range
    client.app.state.settings.mock_server_url = serve_source(customers=second).url
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]

    assert looked_up == {("C00011", "C00020"), ("C00021", "C00031")}
    assert raw_pages == [0, 1, 0, 0]
    assert (counts["updated"], counts["unchanged"], counts["pages"]) == (1, 38, 4)
    changed = {k for k, v in row_versions(db, "customers").items() if versions[k] != v}
    assert changed == {("C00015",)}


def test_a_reingest_recognises_pages_in_any_key_order_without_rewriting_them(
    serve_source, make_client, db, raw_pages
):
    # The first and last keys of each page do not bound its keys: the rest are looked up too.
    records = [customer(n) for n in (7, 1, 30, 12, 25, 3, 19, 28, 2, 14)]
    records += [customer(n) for n in range(31, 51)]
    client, versions = ingested(serve_source, make_client, db, records, page_size=10)
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
    assert raw_pages == [0, 0, 0]
    assert (counts["inserted"], counts["updated"], counts["unchanged"]) == (0, 0, 30)
    assert row_versions(db, "customers") == versions


def test_a_record_repeated_as_it_is_counts_once_on_every_run(
    serve_source, make_client, db, raw_pages
):
    records = [customer(n) for n in range(1, 9)] + [customer(4)] + [customer(9), customer(10)]
    client, versions = ingested(serve_source, make_client, db, records, page_size=10)
    first = client.get("/api/ingest/runs/1").json()["resources"]["customers"]
    assert (first["fetched"], first["inserted"]) == (11, 10)
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
    assert (counts["fetched"], counts["unchanged"], counts["updated"]) == (11, 10, 0)
    assert raw_pages == [2, 0]  # the repeated key is parsed, so that the later record wins
    assert row_versions(db, "customers") == versions


def stored_rows(db, table: str) -> set[tuple]:
    """Every row of ``table`` but its digests."""
    with db.cursor() as cur:
        cur.execute(f"SELECT * FROM {table}")
        names = [column.name for column in cur.description]
        kept = [i for i, name in enumerate(names) if name not in DIGEST_COLUMNS]
        return {tuple(row[i] for i in kept) for row in cur.fetchall()}


DIGEST_COLUMNS = ("source_hash", "source_bytes_hash")


def test_reformatted_json_of_the_same_records_keeps_them_and_learns_the_new_bytes(
    serve_source, make_client, db, tmp_path, raw_pages
):
    records = [customer(n) for n in range(1, 21)]
    client, _ = ingested(serve_source, make_client, db, records, page_size=5)
    rows = stored_rows(db, "customers")

    # Other bytes, same records: keys in another order, other spacing.
    reformatted = write_source_files(tmp_path / "reformatted")
    text = json.dumps([dict(reversed(r.items())) for r in records], indent=3)
    (reformatted / "customers.json").write_text(text)
    client.app.state.settings.mock_server_url = serve_source(data_dir=reformatted).url

    def reingest() -> None:
        counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
        assert (counts["inserted"], counts["updated"], counts["unchanged"]) == (0, 0, 20)
        assert stored_rows(db, "customers") == rows  # fields and updated_at as they were

    reingest()  # learns the new bytes
    versions = row_versions(db, "customers")
    raw_pages.clear()
    reingest()  # and recognises them: nothing parsed, nothing written
    assert raw_pages == [0, 0, 0, 0]
    assert row_versions(db, "customers") == versions


def test_records_stored_by_an_earlier_version_keep_their_api_status(
    serve_source, make_client, db, raw_pages
):
    """Versions before XXH3 stored md5 digests, of the fields' row and of the bytes."""
    source = serve_source(data_dir=SAMPLE_DATA_DIR)
    client = make_client(source.url)
    client.post("/api/ingest?resource=machines")
    client.post("/api/machines/MCH001/status", json={"status": "ERROR"})
    rows = PageWriter(RESOURCES["machines"]).csv_rows(load_sample("machines"))
    with db.cursor() as cur:
        for row, record in zip(rows, load_sample("machines"), strict=True):
            key = record["machine_id"]
            served = urllib.request.urlopen(f"{source.url}/api/machines/{key}").read()
            cur.execute(
                "UPDATE machines SET source_hash = decode(%s, 'hex'),"
                " source_bytes_hash = decode(%s, 'hex') WHERE machine_id = %s",
                (hashlib.md5(row).hexdigest(), hashlib.md5(served).hexdigest(), key),
            )
    stored = stored_rows(db, "machines")

    def reingest() -> None:
        counts = client.post("/api/ingest?resource=machines").json()["resources"]["machines"]
        assert (counts["updated"], counts["unchanged"]) == (0, len(rows))
        assert stored_rows(db, "machines") == stored

    reingest()  # renews the digests
    raw_pages.clear()
    reingest()  # and recognises the bytes
    assert raw_pages == [0]
    assert client.get("/api/machines/MCH001").json()["status"] == "ERROR"


@pytest.mark.parametrize("place", [8, 4], ids=["last", "amid"])  # where a raw page's
@pytest.mark.parametrize("key", [12345, None, "C\x00NUL"])  # keys are read: worker, writer
def test_a_key_that_cannot_be_stored_is_rejected_on_every_run(
    serve_source, make_client, db, key, place
):
    records = [customer(n) for n in range(1, 9)]
    records.insert(place, customer(9, customer_id=key))
    client = make_client(serve_source(customers=records).url)
    for run in ("first", "again"):
        counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
        assert (counts["inserted"], counts["unchanged"], counts["rejected"]) == (
            (8, 0, 1) if run == "first" else (0, 8, 1)
        )
    assert count(db, "customers") == 8
    with db.cursor() as cur:
        cur.execute("SELECT count(*) FROM rejected_records WHERE reason LIKE 'customer_id%'")
        assert cur.fetchone()[0] == 2


def test_a_source_that_changed_throughout_is_reingested_exactly(
    serve_source, make_client, db, raw_pages
):
    records = [customer(n) for n in range(1, 61)]
    client = make_client(serve_source(customers=records).url, ingest_page_size=10)
    client.post("/api/ingest?resource=customers")
    changed = [customer(n, last_name=f"Moved{n}") for n in range(1, 61)]
    client.app.state.settings.mock_server_url = serve_source(customers=changed).url
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
    assert raw_pages == [10]  # the first page alone came raw; the rest prepared in full
    assert (counts["updated"], counts["unchanged"]) == (60, 0)
    served = client.get("/api/customers?limit=100").json()["data"]
    assert [c["last_name"] for c in served] == [f"Moved{n}" for n in range(1, 61)]


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="pipes resize on Linux")
def test_a_widened_pipe_holds_a_whole_page():
    reader, writer = ingest._worker_context().Pipe(duplex=False)
    try:
        assert ingest.widen_pipe(reader)
        assert fcntl.fcntl(reader.fileno(), fcntl.F_GETPIPE_SZ) >= ingest.RESULT_PIPE_BYTES
    finally:
        reader.close()
        writer.close()


def worker_settings(source_url: str) -> Settings:
    return Settings(
        _env_file=None,
        database_url="postgresql://unused@127.0.0.1/unused",
        mock_server_url=source_url,
        ingest_page_size=10,
        source_max_attempts=1,
    )


def test_page_workers_answer_in_the_order_asked_and_pass_errors_on(serve_source):
    source = serve_source(customers=[customer(n) for n in range(1, 41)])
    workers = ingest.PageWorkers(2, worker_settings(source.url))
    try:
        for page_no in (1, 3, 5):
            workers.ask(page_no % 2, "customers", page_no, False)
        workers.ask(0, "customers", 0, False)  # the source answers 400 to page 0
        assert workers.answer(1).prepared.keys[0] == "C00001"
        assert workers.answer(1).prepared.keys[0] == "C00021"
        assert workers.answer(1).fetched == 0  # page 5 is past the end
        with pytest.raises(ingest.SourceError, match="400"):
            workers.answer(0)
    finally:
        workers.close()
    assert [p.exitcode for p in workers.processes] == [0, 0]


def test_a_page_worker_that_dies_fails_the_wait_for_its_page(serve_source):
    source = serve_source(customers=[customer(n) for n in range(1, 41)])
    workers = ingest.PageWorkers(1, worker_settings(source.url))
    try:
        (process,) = workers.processes
        process.kill()
        process.join(10)
        with pytest.raises(ingest.WorkerStopped, match="stopped unexpectedly"):
            workers.ask(0, "customers", 1, False)
            workers.answer(0)
    finally:
        workers.close()


def test_worker_processes_send_raw_pages_on_a_reingest(serve_source, make_client, db, raw_pages):
    # Twelve pages: all but the first are prepared in worker processes.
    records = [customer(n) for n in range(1, 121)]
    client, versions = ingested(serve_source, make_client, db, records, page_size=10)
    records[64] = customer(65, first_name="Changed")
    client.app.state.settings.mock_server_url = serve_source(customers=records).url
    counts = client.post("/api/ingest?resource=customers").json()["resources"]["customers"]
    assert raw_pages == [0] * 6 + [1] + [0] * 5
    assert (counts["updated"], counts["unchanged"], counts["pages"]) == (1, 119, 12)
    changed = {k for k, v in row_versions(db, "customers").items() if versions[k] != v}
    assert changed == {("C00065",)}

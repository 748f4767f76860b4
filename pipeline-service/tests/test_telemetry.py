"""Machine analytics, status updates and pushed readings over HTTP, on real PostgreSQL."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from conftest import SAMPLE_DATA_DIR, load_sample, write_source_files

MCH001_TIMES = [f"2024-06-01T08:{m:02d}:00Z" for m in range(0, 30, 5)]
T0 = datetime(2024, 1, 1, tzinfo=UTC)


@pytest.fixture
def sample_client(serve_source, make_client):
    """The pipeline with the shipped sample data ingested (MCH001: 100,110,130,80,105,110)."""
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    assert client.post("/api/ingest").status_code == 200
    return client


def add_machine(db, machine_id: str, status: str = "IDLE") -> None:
    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO machines (machine_id, name, model, location, status, created_at)"
            " VALUES (%s, 'Test rig', 'T-1', 'Lab', %s, now())",
            (machine_id, status),
        )


def add_readings(db, machine_id: str, values: list[float], status: str = "STARTED") -> None:
    """One reading a minute from T0, temperature = value, speed = 10 * value."""
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO machine_readings (machine_id, timestamp, temperature, speed, status)"
            " VALUES (%s, %s, %s, %s, %s)",
            [
                (machine_id, T0 + timedelta(minutes=i), v, 10 * v, status)
                for i, v in enumerate(values)
            ],
        )


def reading(minute: int, temperature: float = 20.0, **changes) -> dict:
    stamp = (T0 + timedelta(minutes=minute)).isoformat().replace("+00:00", "Z")
    return {
        "timestamp": stamp,
        "temperature": temperature,
        "speed": 1000.0,
        "status": "STARTED",
    } | changes


# --- stats ---------------------------------------------------------------------------------


def test_stats_of_the_contract_example(sample_client):
    response = sample_client.get("/api/machines/MCH001/stats?metric=temperature")
    assert response.status_code == 200
    assert response.json() == {
        "machine_id": "MCH001",
        "metric": "temperature",
        "count": 6,
        "average": 105.83,
        "max": 130.0,
        "min": 80.0,
        "anomaly_count": 2,
        "anomalies": [
            {
                "timestamp": "2024-06-01T08:10:00Z",
                "value": 130.0,
                "deviation": 24.17,
                "deviation_pct": 22.83,
            },
            {
                "timestamp": "2024-06-01T08:15:00Z",
                "value": 80.0,
                "deviation": 25.83,  # a distance: below the average is positive too
                "deviation_pct": 24.41,
            },
        ],
    }


def test_stats_of_speed_use_the_speed_column(sample_client):
    body = sample_client.get("/api/machines/MCH001/stats?metric=speed&threshold=0.1").json()
    speeds = [r["speed"] for r in load_sample("readings") if r["machine_id"] == "MCH001"]
    assert body["count"] == 6 and body["max"] == max(speeds) and body["min"] == min(speeds)
    assert body["average"] == round(sum(speeds) / 6, 2)
    # 1350 is 131.67 from 1218.33 (beyond 10%), 1100 only 118.33 (within it).
    assert [(a["value"], a["deviation"]) for a in body["anomalies"]] == [(1350.0, 131.67)]


@pytest.mark.parametrize(
    ("threshold", "anomalous"),
    [
        (0.5, []),  # exactly 0.5 * average away is not farther than it
        (0.4999, [50.0, 150.0]),
        (0, [50.0, 150.0]),
        (10, []),
    ],
)
def test_anomaly_threshold_is_strict(db, make_client, threshold, anomalous):
    add_machine(db, "EDGE")
    add_readings(db, "EDGE", [50, 150, 100])
    body = make_client().get(f"/api/machines/EDGE/stats?metric=temperature&threshold={threshold}")
    assert body.status_code == 200
    assert [a["value"] for a in body.json()["anomalies"]] == anomalous


def test_stats_list_the_first_anomalies_and_count_them_all(db, make_client):
    add_machine(db, "NOISY")
    add_readings(db, "NOISY", [0, 100] * 6)  # every reading is 50 from the average of 50
    client = make_client()
    body = client.get("/api/machines/NOISY/stats?metric=temperature&max_anomalies=5").json()
    assert (body["count"], body["anomaly_count"], len(body["anomalies"])) == (12, 12, 5)
    assert [a["timestamp"] for a in body["anomalies"]] == [
        f"2024-01-01T00:0{m}:00Z" for m in range(5)
    ]
    default = client.get("/api/machines/NOISY/stats?metric=temperature").json()
    assert len(default["anomalies"]) == 12
    for bad in ("0", "10001"):
        response = client.get(f"/api/machines/NOISY/stats?metric=speed&max_anomalies={bad}")
        assert response.status_code == 400
        assert response.json()["error"].startswith("max_anomalies:")


def test_threshold_zero_spares_readings_equal_to_the_average(db, make_client):
    add_machine(db, "FLAT")
    add_readings(db, "FLAT", [7, 7, 7])
    body = make_client().get("/api/machines/FLAT/stats?metric=temperature&threshold=0").json()
    assert (body["count"], body["average"], body["anomalies"]) == (3, 7.0, [])


def test_zero_average_gives_null_deviation_pct(db, make_client):
    add_machine(db, "ZERO")
    add_readings(db, "ZERO", [-10, 10])
    body = make_client().get("/api/machines/ZERO/stats?metric=temperature").json()
    assert body["average"] == 0
    assert [(a["value"], a["deviation"], a["deviation_pct"]) for a in body["anomalies"]] == [
        (-10.0, 10.0, None),
        (10.0, 10.0, None),
    ]


@pytest.mark.parametrize(
    ("start", "end", "expected"),
    [
        (MCH001_TIMES[2], MCH001_TIMES[3], [130, 80]),  # both edges inclusive
        (MCH001_TIMES[2], MCH001_TIMES[2], [130]),
        ("2024-06-01T10:10:00+02:00", "2024-06-01T10:15:00+02:00", [130, 80]),  # same instants
        ("2024-06-01T08:10:00", "2024-06-01T08:15:00", [130, 80]),  # no offset: UTC
        ("2024-06-01T08:10:00.000001Z", MCH001_TIMES[3], [80]),
        (MCH001_TIMES[2], "2024-06-01T08:14:59.999999Z", [130]),
        (MCH001_TIMES[4], None, [105, 110]),
        (None, MCH001_TIMES[1], [100, 110]),
    ],
)
def test_stats_time_window_edges(sample_client, start, end, expected):
    params = {"metric": "temperature", "threshold": 0}
    params |= {"from": start} if start else {}
    params |= {"to": end} if end else {}
    body = sample_client.get("/api/machines/MCH001/stats", params=params).json()
    assert body["count"] == len(expected)
    assert body["max"] == max(expected) and body["min"] == min(expected)
    assert body["average"] == round(sum(expected) / len(expected), 2)


def test_stats_of_an_empty_window_is_count_zero_and_nulls(sample_client):
    body = sample_client.get(
        "/api/machines/MCH001/stats", params={"metric": "speed", "from": "2030-01-01T00:00:00Z"}
    )
    assert body.status_code == 200
    assert body.json() == {
        "machine_id": "MCH001",
        "metric": "speed",
        "count": 0,
        "average": None,
        "max": None,
        "min": None,
        "anomaly_count": 0,
        "anomalies": [],
    }


def test_stats_of_a_machine_without_readings(db, make_client):
    add_machine(db, "QUIET")
    body = make_client().get("/api/machines/QUIET/stats?metric=temperature").json()
    assert (body["count"], body["average"], body["anomalies"]) == (0, None, [])


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("metric=pressure", "metric"),
        ("metric=temperature;DROP TABLE machines", "metric"),
        ("", "metric"),
        ("metric=speed&threshold=-0.1", "threshold"),
        ("metric=speed&threshold=abc", "threshold"),
        ("metric=speed&threshold=nan", "threshold"),
        ("metric=speed&threshold=inf", "threshold"),
        ("metric=speed&from=yesterday", "from"),
        ("metric=speed&to=2024-02-30T00:00:00Z", "to"),
        ("metric=speed&from=2024-06-02T00:00:00Z&to=2024-06-01T00:00:00Z", "from"),
    ],
)
def test_bad_stats_parameters_are_400_naming_the_parameter(sample_client, query, parameter):
    response = sample_client.get(f"/api/machines/MCH001/stats?{query}")
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{parameter}:")


def test_stats_of_an_unknown_machine_is_404(sample_client):
    response = sample_client.get("/api/machines/NOPE/stats?metric=temperature")
    assert response.status_code == 404 and "NOPE" in response.json()["error"]


# --- moving average and latest reading ------------------------------------------------------


def test_moving_average_over_the_newest_readings(sample_client):
    body = sample_client.get("/api/machines/MCH001/moving-average?window=5").json()
    assert body == {
        "machine_id": "MCH001",
        "window": 5,
        "count": 5,
        "average_temperature": 107.0,  # 110, 130, 80, 105, 110
        "average_speed": 1222.0,
        "status": "STARTED",
        "as_of": "2024-06-01T08:25:00Z",
    }
    assert sample_client.get("/api/machines/MCH001/moving-average").json() == body


def test_moving_average_with_fewer_readings_than_the_window(sample_client):
    body = sample_client.get("/api/machines/MCH001/moving-average?window=1000").json()
    assert (body["window"], body["count"], body["average_temperature"]) == (1000, 6, 105.83)


def test_moving_average_status_is_the_newest_readings(db, make_client):
    add_machine(db, "M1")
    add_readings(db, "M1", [1, 2, 3])
    with db.cursor() as cur:
        cur.execute(
            "UPDATE machine_readings SET status = 'ERROR' WHERE timestamp = %s",
            (T0 + timedelta(minutes=2),),
        )
    body = make_client().get("/api/machines/M1/moving-average?window=2").json()
    assert (body["status"], body["average_temperature"], body["average_speed"]) == (
        "ERROR",
        2.5,
        25.0,
    )
    assert body["as_of"] == "2024-01-01T00:02:00Z"


def test_moving_average_without_readings_is_count_zero_and_nulls(db, make_client):
    add_machine(db, "QUIET")
    body = make_client().get("/api/machines/QUIET/moving-average?window=3").json()
    assert body == {
        "machine_id": "QUIET",
        "window": 3,
        "count": 0,
        "average_temperature": None,
        "average_speed": None,
        "status": None,
        "as_of": None,
    }


@pytest.mark.parametrize("window", ["0", "1001", "-1", "x", "2.5"])
def test_bad_window_is_400(sample_client, window):
    response = sample_client.get(f"/api/machines/MCH001/moving-average?window={window}")
    assert response.status_code == 400 and response.json()["error"].startswith("window:")


def test_latest_reading(sample_client):
    response = sample_client.get("/api/machines/MCH001/readings/latest")
    assert response.json() == {
        "machine_id": "MCH001",
        "timestamp": "2024-06-01T08:25:00Z",
        "temperature": 110.0,
        "speed": 1230.0,
        "status": "STARTED",
    }


def test_latest_reading_is_404_without_readings_or_machine(db, make_client):
    add_machine(db, "QUIET")
    client = make_client()
    for machine_id in ("QUIET", "NOPE"):
        response = client.get(f"/api/machines/{machine_id}/readings/latest")
        assert response.status_code == 404 and machine_id in response.json()["error"]


def test_unknown_machine_is_404_everywhere(make_client):
    client = make_client()
    for path in ("moving-average", "status-history", "stream"):
        response = client.get(f"/api/machines/NOPE/{path}")
        assert response.status_code == 404, path
        assert response.json() == {"error": "no machine with id 'NOPE'"}
    for path, body in (("status", {"status": "IDLE"}), ("readings", reading(0))):
        response = client.post(f"/api/machines/NOPE/{path}", json=body)
        assert response.status_code == 404, path
        assert response.json() == {"error": "no machine with id 'NOPE'"}


# --- status ----------------------------------------------------------------------------------


def history(client, machine_id: str = "MCH001", **params) -> dict:
    response = client.get(f"/api/machines/{machine_id}/status-history", params=params)
    assert response.status_code == 200
    return response.json()


def test_status_round_trip_and_history_newest_first(sample_client):
    assert history(sample_client) == {
        "data": [],
        "total": 0,
        "page": 1,
        "limit": 10,
        "next": None,
    }
    for status, previous in (("ERROR", "STARTED"), ("IDLE", "ERROR"), ("COMPLETED", "IDLE")):
        response = sample_client.post("/api/machines/MCH001/status", json={"status": status})
        assert response.status_code == 200
        assert response.json() == {
            "message": "Status updated",
            "machine_id": "MCH001",
            "status": status,
            "previous_status": previous,
        }
        assert sample_client.get("/api/machines/MCH001").json()["status"] == status

    entries = history(sample_client)["data"]
    assert [(e["old_status"], e["new_status"], e["source"]) for e in entries] == [
        ("IDLE", "COMPLETED", "api"),
        ("ERROR", "IDLE", "api"),
        ("STARTED", "ERROR", "api"),
    ]
    assert all(e["machine_id"] == "MCH001" and e["changed_at"].endswith("Z") for e in entries)
    page1 = history(sample_client, page=1, limit=2)
    assert page1["next"] == "/api/machines/MCH001/status-history?page=2&limit=2"
    page2 = sample_client.get(page1["next"]).json()
    assert page2["total"] == 3 and [e["new_status"] for e in page2["data"]] == ["ERROR"]
    assert page2["next"] is None
    assert history(sample_client, "MCH002")["total"] == 0


def test_setting_the_same_status_changes_nothing(sample_client):
    response = sample_client.post("/api/machines/MCH001/status", json={"status": "STARTED"})
    assert response.status_code == 200
    assert response.json()["previous_status"] == "STARTED"
    assert history(sample_client)["total"] == 0


@pytest.mark.parametrize(
    ("body", "error"),
    [
        (
            {"status": "RUNNING"},
            "Invalid status. Allowed statuses: STARTED, ERROR, IDLE, COMPLETED",
        ),
        (
            {"status": "started"},
            "Invalid status. Allowed statuses: STARTED, ERROR, IDLE, COMPLETED",
        ),
        ({"status": None}, "Invalid status. Allowed statuses: STARTED, ERROR, IDLE, COMPLETED"),
        ({"status": ["IDLE"]}, "Invalid status. Allowed statuses: STARTED, ERROR, IDLE, COMPLETED"),
        ({}, "Missing 'status' field in request data"),
        ({"state": "IDLE"}, "Missing 'status' field in request data"),
    ],
)
def test_bad_status_bodies_get_the_contract_messages(sample_client, body, error):
    response = sample_client.post("/api/machines/MCH001/status", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": error}
    assert sample_client.get("/api/machines/MCH001").json()["status"] == "STARTED"


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"status=IDLE", b'["IDLE"]', b'"IDLE"', b"null", b'{"status": NaN}', b"\xff\xfe{"],
)
def test_malformed_or_non_object_status_bodies_are_400_json(sample_client, raw):
    response = sample_client.post(
        "/api/machines/MCH001/status",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"].startswith("request body")


def test_deeply_nested_status_body_is_400_not_500(sample_client):
    raw = "[" * 100_000 + "]" * 100_000
    response = sample_client.post("/api/machines/MCH001/status", content=raw)
    assert response.status_code in (400, 413)
    assert "error" in response.json()


def test_oversized_status_body_is_413(sample_client):
    raw = json.dumps({"status": "IDLE", "pad": "x" * 70_000})
    response = sample_client.post("/api/machines/MCH001/status", content=raw)
    assert response.status_code == 413 and "error" in response.json()


def test_writes_need_the_api_key_when_set(serve_source, make_client):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url, pipeline_api_key="s3cret")
    assert client.post("/api/ingest", headers={"Authorization": "Bearer s3cret"}).is_success
    for path, body in (("status", {"status": "IDLE"}), ("readings", reading(0))):
        denied = client.post(f"/api/machines/MCH001/{path}", json=body)
        assert denied.status_code == 401 and "error" in denied.json()
        allowed = client.post(
            f"/api/machines/MCH001/{path}", json=body, headers={"Authorization": "Bearer s3cret"}
        )
        assert allowed.is_success, path


def machines_with(changes: dict[str, dict]) -> list[dict]:
    return [m | changes.get(m["machine_id"], {}) for m in load_sample("machines")]


def test_reingesting_an_unchanged_source_keeps_the_api_status(sample_client):
    sample_client.post("/api/machines/MCH001/status", json={"status": "ERROR"})
    again = sample_client.post("/api/ingest").json()
    assert again["resources"]["machines"]["unchanged"] == len(load_sample("machines"))
    assert sample_client.get("/api/machines/MCH001").json()["status"] == "ERROR"
    assert history(sample_client)["total"] == 1


def test_reingesting_a_changed_source_record_overwrites_the_api_status(
    sample_client, serve_source, make_client, tmp_path
):
    sample_client.post("/api/machines/MCH001/status", json={"status": "ERROR"})
    changed = write_source_files(
        tmp_path / "changed",
        customers=load_sample("customers"),
        machines=machines_with({"MCH001": {"status": "COMPLETED"}}),
        readings=load_sample("readings"),
    )
    client = make_client(serve_source(data_dir=changed).url)
    result = client.post("/api/ingest?resource=machines").json()
    assert result["resources"]["machines"]["updated"] == 1
    assert client.get("/api/machines/MCH001").json()["status"] == "COMPLETED"
    entries = history(client)["data"]
    assert [(e["old_status"], e["new_status"], e["source"]) for e in entries] == [
        ("ERROR", "COMPLETED", "ingest"),
        ("STARTED", "ERROR", "api"),
    ]


def test_a_changed_source_record_wins_even_with_its_old_status(
    sample_client, serve_source, make_client, tmp_path
):
    """The source record changed (its location), not its status: the source still wins."""
    sample_client.post("/api/machines/MCH001/status", json={"status": "ERROR"})
    changed = write_source_files(
        tmp_path / "moved", machines=machines_with({"MCH001": {"location": "Plant B"}})
    )
    client = make_client(serve_source(data_dir=changed).url)
    client.post("/api/ingest?resource=machines")
    machine = client.get("/api/machines/MCH001").json()
    assert (machine["status"], machine["location"]) == ("STARTED", "Plant B")
    assert history(client)["data"][0]["source"] == "ingest"


# --- pushed readings -------------------------------------------------------------------------


def stored(client, machine_id: str = "MCH001") -> list[dict]:
    return client.get(f"/api/machines/{machine_id}/readings?limit=1000").json()["data"]


def rejected_rows(db) -> list[tuple]:
    with db.cursor() as cur:
        cur.execute(
            "SELECT resource, run_id, record_key, reason, payload FROM rejected_records ORDER BY id"
        )
        return cur.fetchall()


def test_push_one_reading(sample_client, db):
    response = sample_client.post("/api/machines/MCH001/readings", json=reading(0, 99.5))
    assert response.status_code == 201
    assert response.json() == {
        "accepted": 1,
        "inserted": 1,
        "updated": 0,
        "unchanged": 0,
        "rejected": [],
    }
    assert stored(sample_client)[0] == {"machine_id": "MCH001"} | reading(0, 99.5)
    assert sample_client.get("/api/machines/MCH001/readings/latest").json()["timestamp"] == (
        "2024-06-01T08:25:00Z"
    )  # 2024-01-01 is older than the sample's readings
    assert rejected_rows(db) == []


def test_push_a_list_then_correct_and_repeat_it(sample_client):
    batch = [reading(m, 20.0 + m) for m in range(3)]
    first = sample_client.post("/api/machines/MCH001/readings", json=batch).json()
    assert (first["accepted"], first["inserted"]) == (3, 3)
    batch[1] = reading(1, 42.0)
    second = sample_client.post("/api/machines/MCH001/readings", json=batch).json()
    assert (second["accepted"], second["updated"], second["unchanged"]) == (3, 1, 2)
    assert [r["temperature"] for r in stored(sample_client)[:3]] == [20.0, 42.0, 22.0]


def test_push_duplicates_in_one_list_later_wins(sample_client):
    body = sample_client.post(
        "/api/machines/MCH001/readings", json=[reading(0, 1.0), reading(0, 2.0)]
    ).json()
    assert (body["accepted"], body["inserted"]) == (2, 1)
    assert stored(sample_client)[0]["temperature"] == 2.0


def test_push_mixed_valid_and_invalid(sample_client, db):
    submitted = [
        reading(0),
        reading(1, temperature="hot"),
        {"machine_id": "MCH002"} | reading(2),
        {"machine_id": "MCH001"} | reading(3),
        42,
        reading(4, status="RUNNING"),
        reading(5) | {"timestamp": "2024-01-01T00:05:00"},  # no offset
    ]
    response = sample_client.post("/api/machines/MCH001/readings", json=submitted)
    assert response.status_code == 201
    body = response.json()
    assert body["accepted"] == 2 and body["inserted"] == 2
    assert [r["index"] for r in body["rejected"]] == [1, 2, 4, 5, 6]
    assert [r["record"] for r in body["rejected"]] == [submitted[i] for i in (1, 2, 4, 5, 6)]
    reasons = [r["reason"] for r in body["rejected"]]
    assert reasons[0].startswith("temperature:")
    assert reasons[1].startswith("machine_id:") and "MCH002" in reasons[1]
    assert reasons[2].startswith("record:")
    assert reasons[3].startswith("status:")
    assert reasons[4].startswith("timestamp:")
    assert [r["timestamp"] for r in stored(sample_client)[:2]] == [
        reading(0)["timestamp"],
        reading(3)["timestamp"],
    ]
    rows = rejected_rows(db)
    assert [(r[0], r[1]) for r in rows] == [("readings", None)] * 5
    assert [r[3] for r in rows] == reasons
    assert rows[1][2] == "MCH002/2024-01-01T00:02:00Z" and rows[1][4] == submitted[2]


def test_push_too_many_readings_is_413_and_stores_nothing(sample_client):
    response = sample_client.post(
        "/api/machines/MCH001/readings", json=[reading(m) for m in range(1001)]
    )
    assert response.status_code == 413
    assert "1000" in response.json()["error"]
    assert len(stored(sample_client)) == 6


def test_push_the_maximum_of_1000(sample_client):
    response = sample_client.post(
        "/api/machines/MCH001/readings", json=[reading(m) for m in range(1000)]
    )
    assert response.status_code == 201 and response.json()["inserted"] == 1000


@pytest.mark.parametrize("raw", [b"", b"[{]", b'"reading"', b"7", b"null", b"true"])
def test_push_malformed_or_wrong_shape_is_400(sample_client, raw):
    response = sample_client.post("/api/machines/MCH001/readings", content=raw)
    assert response.status_code == 400
    assert response.json()["error"].startswith("request body")


def test_push_empty_list_accepts_nothing(sample_client):
    response = sample_client.post("/api/machines/MCH001/readings", json=[])
    assert response.status_code == 201 and response.json()["accepted"] == 0

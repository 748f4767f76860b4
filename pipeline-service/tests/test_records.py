"""Re-serving stored records: pagination, lookups, bad parameters, fidelity to the source."""

import asyncio
import time
from datetime import datetime
from decimal import Decimal

import pytest
from pipeline_service.api.fast_reads import FastReads, plain_paging
from starlette.middleware import Middleware

from conftest import SAMPLE_DATA_DIR, customer, load_sample, machine, reading


@pytest.fixture
def sample_client(serve_source, make_client):
    """The pipeline with the shipped sample data ingested."""
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url)
    assert client.post("/api/ingest").status_code == 200
    return client


@pytest.fixture
def client_with_23(serve_source, make_client):
    """23 customers stored: a total that is not a multiple of common page sizes."""
    source = serve_source(customers=[customer(n) for n in range(23, 0, -1)])
    client = make_client(source.url)
    assert client.post("/api/ingest?resource=customers").json()["records_processed"] == 23
    return client


def same_instant(a: str, b: str) -> bool:
    return datetime.fromisoformat(a) == datetime.fromisoformat(b)


def assert_same_record(served: dict, source: dict) -> None:
    assert served.keys() == source.keys()
    for field, expected in source.items():
        value = served[field]
        if field in ("created_at", "timestamp"):
            assert same_instant(value, expected), field
        elif field == "account_balance" and expected is not None:
            assert isinstance(value, int | float) and not isinstance(value, bool)
            assert Decimal(str(value)) == Decimal(str(expected)), field
        else:
            assert value == expected, field


def test_first_five_sample_customers_are_served_in_key_order(sample_client):
    body = sample_client.get("/api/customers?page=1&limit=5").json()
    assert body["total"] == 21 and body["page"] == 1 and body["limit"] == 5
    assert [c["customer_id"] for c in body["data"]] == [f"CUST{n:03d}" for n in range(1, 6)]


def test_every_served_record_equals_its_source_record(sample_client):
    for resource in ("customers", "machines"):
        source = {r[resource[:-1] + "_id"]: r for r in load_sample(resource)}
        body = sample_client.get(f"/api/{resource}?limit=1000").json()
        assert body["total"] == len(source)
        for served in body["data"]:
            assert_same_record(served, source[served[resource[:-1] + "_id"]])
            single = sample_client.get(f"/api/{resource}/{served[resource[:-1] + '_id']}")
            assert single.json() == served

    readings = load_sample("readings")
    for machine_id in {r["machine_id"] for r in readings}:
        expected = sorted(
            (r for r in readings if r["machine_id"] == machine_id),
            key=lambda r: datetime.fromisoformat(r["timestamp"]),
        )
        body = sample_client.get(f"/api/machines/{machine_id}/readings?limit=1000").json()
        assert body["total"] == len(expected)
        for served, source in zip(body["data"], expected, strict=True):
            assert_same_record(served, source)


def test_dates_timestamps_and_balances_keep_their_form(sample_client):
    body = sample_client.get("/api/customers/CUST001").json()
    assert body["date_of_birth"] == "1985-04-12"
    assert body["created_at"].endswith("Z")
    assert isinstance(body["account_balance"], float)


@pytest.mark.parametrize(
    ("page", "limit", "expected_ids"),
    [
        (1, 10, list(range(1, 11))),
        (3, 10, [21, 22, 23]),  # the last, partial page
        (4, 10, []),  # past the end
        (1, 23, list(range(1, 24))),
        (2, 22, [23]),
        (1, 1000, list(range(1, 24))),
        (23, 1, [23]),
        (24, 1, []),
    ],
)
def test_pages_cover_the_collection_exactly(client_with_23, page, limit, expected_ids):
    body = client_with_23.get(f"/api/customers?page={page}&limit={limit}").json()
    assert body["total"] == 23 and body["page"] == page and body["limit"] == limit
    assert [c["customer_id"] for c in body["data"]] == [f"C{n:05d}" for n in expected_ids]


def test_defaults_are_page_one_of_ten(client_with_23):
    body = client_with_23.get("/api/customers").json()
    assert (body["page"], body["limit"], len(body["data"])) == (1, 10, 10)


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("page=0", "page"),
        ("page=-1", "page"),
        ("page=abc", "page"),
        ("page=1.5", "page"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=", "limit"),
        ("limit=ten", "limit"),
        ("page=99999999999999999999", "page"),
    ],
)
def test_bad_paging_parameters_are_400_naming_the_parameter(make_client, query, parameter):
    client = make_client()
    for path in ("/api/customers", "/api/machines", "/api/ingest/runs"):
        response = client.get(f"{path}?{query}")
        assert response.status_code == 400, path
        assert response.json()["error"].startswith(f"{parameter}:")


def test_unknown_ids_are_404_json(make_client):
    client = make_client()
    for path in (
        "/api/customers/NOPE",
        "/api/machines/NOPE",
        "/api/machines/NOPE/readings",
        "/api/ingest/runs/12345",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "error" in response.json()


def test_unknown_route_and_method_are_json(make_client):
    client = make_client()
    assert client.get("/api/nothing").json() == {"error": "Not Found"}
    response = client.delete("/api/customers")
    assert response.status_code == 405 and "error" in response.json()


def test_ids_with_odd_characters_are_looked_up_exactly(serve_source, make_client):
    ids = ["a b", "ünï", "x'; DROP TABLE customers; --", "50% off"]
    source = serve_source(customers=[customer(0, customer_id=i) for i in ids])
    client = make_client(source.url)
    client.post("/api/ingest?resource=customers")
    from urllib.parse import quote

    for record_id in ids:
        response = client.get(f"/api/customers/{quote(record_id, safe='')}")
        assert response.status_code == 200, record_id
        assert response.json()["customer_id"] == record_id


PLAIN_READS = [
    "/api/customers",
    "/api/customers?page=2&limit=5",
    "/api/customers?limit=4&page=3",
    "/api/customers?limit=1000",
    "/api/customers?page=10000000&limit=1000",
    "/api/machines?page=1&limit=3",
    "/api/customers/a%20b",
    "/api/customers/%C3%BCn%C3%AF",
    "/api/machines/M003",
]
OTHER_READS = [
    "/api/customers?page=01",
    "/api/customers?page=2&page=3",
    "/api/customers?page=2&",
    "/api/customers?page=0",
    "/api/customers?limit=1001",
    "/api/customers?page=10000001",
    "/api/customers?page=%32",
    "/api/customers?page=2&limit=5&color=blue",
    "/api/customers?limit=5&after=WyJDMDAwMDUiXQ",
    "/api/customers/NOPE",
    "/api/customers/a%20b?x=1",
    "/api/customers/",
    "/api/customers/a%2Fb",
]


@pytest.fixture
def fast_lane_source(serve_source):
    customers = [customer(n) for n in range(1, 24)]
    customers += [customer(0, customer_id=i) for i in ("a b", "ünï")]
    return serve_source(customers=customers, machines=[machine(n) for n in range(1, 8)])


def _without_fast_lane(app) -> None:
    app.user_middleware = [m for m in app.user_middleware if m.cls is not FastReads]


def test_the_fast_lane_answers_as_the_routes_do(fast_lane_source, make_client):
    with_lane = make_client(fast_lane_source.url)
    routes_only = make_client(fast_lane_source.url, edit_app=_without_fast_lane)
    assert with_lane.post("/api/ingest?resource=customers").status_code == 200
    assert with_lane.post("/api/ingest?resource=machines").status_code == 200
    for path in PLAIN_READS + OTHER_READS:
        ours, theirs = with_lane.get(path), routes_only.get(path)
        assert ours.status_code == theirs.status_code, path
        assert ours.headers["content-type"] == theirs.headers["content-type"], path
        assert ours.content == theirs.content, path


def test_the_fast_lane_takes_plain_reads_only(fast_lane_source, make_client):
    passed_on: list[str] = []

    class RecordPassedOn:
        """Sits right inside the lane and notes each request the lane passed on."""

        def __init__(self, app) -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            if scope["type"] == "http":
                passed_on.append(scope["path"])
            await self.app(scope, receive, send)

    client = make_client(
        fast_lane_source.url,
        edit_app=lambda app: app.user_middleware.append(Middleware(RecordPassedOn)),
    )
    assert client.post("/api/ingest?resource=customers").status_code == 200
    assert client.post("/api/ingest?resource=machines").status_code == 200
    for path in PLAIN_READS + OTHER_READS:
        before = len(passed_on)
        client.get(path)
        assert (len(passed_on) > before) == (path in OTHER_READS), path


def test_reads_answer_503_once_when_no_connection_comes_free(fast_lane_source, make_client):
    wait = 2.0

    def one_connection(app) -> None:
        app.state.reads.max_size, app.state.reads.acquire_timeout = 1, wait

    client = make_client(fast_lane_source.url, edit_app=one_connection)
    assert client.post("/api/ingest?resource=customers").status_code == 200
    reads = client.app.state.reads

    async def take_it():
        held = reads.connection()
        await held.__aenter__()
        return held

    held = client.portal.call(take_it)
    try:
        # A plain read (the fast lane) and one the route answers.
        for path in ("/api/customers?page=1&limit=5", "/api/customers?page=1&limit=5&x=1"):
            started = time.monotonic()
            response = client.get(path)
            waited = time.monotonic() - started
            assert response.status_code == 503, path
            assert response.json()["error"].startswith("database busy"), path
            assert wait <= waited < 2 * wait, path  # one wait, not the lane's and the route's
    finally:
        client.portal.call(held.__aexit__, None, None, None)
    assert client.get("/api/customers?page=1&limit=5").status_code == 200


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        (b"", (1, 10)),
        (b"page=2&limit=5", (2, 5)),
        (b"limit=1000&page=10000000", (10_000_000, 1000)),
        (b"page=0", None),
        (b"page=01", None),
        (b"page=-1", None),
        (b"page=1&page=1", None),
        (b"page=10000001", None),
        (b"limit=1001", None),
        (b"page=1&", None),
        (b"page", None),
        (b"Page=1", None),
        (b"page=%31", None),
        (b"page=1&after=x", None),
    ],
)
def test_plain_paging_takes_only_plain_numbers_within_bounds(query, expected):
    assert plain_paging(query) == expected


def test_machine_readings_time_window_is_inclusive(sample_client):
    everything = sample_client.get("/api/machines/MCH001/readings?limit=1000").json()["data"]
    first, third = everything[0]["timestamp"], everything[2]["timestamp"]
    window = sample_client.get(
        "/api/machines/MCH001/readings", params={"from": first, "to": third}
    ).json()
    assert [r["timestamp"] for r in window["data"]] == [r["timestamp"] for r in everything[:3]]
    assert window["total"] == 3


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"from": "yesterday"}, "from"),
        ({"to": "2024-13-01T00:00:00Z"}, "to"),
        ({"from": "2024-06-02T00:00:00Z", "to": "2024-06-01T00:00:00Z"}, "from"),
    ],
)
def test_bad_time_window_is_400(sample_client, params, parameter):
    _check_bad_window(sample_client, params, parameter)


def test_a_far_offset_in_a_window_is_read_as_utc(sample_client):
    response = sample_client.get(
        "/api/machines/MCH001/readings", params={"from": "2024-06-01T20:00:00+20:00"}
    )
    assert response.status_code == 200
    assert response.json()["total"] == 6  # 2024-06-01T00:00Z: every reading is later


def _check_bad_window(sample_client, params, parameter):
    response = sample_client.get("/api/machines/MCH001/readings", params=params)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{parameter}:")


def ids(body: dict) -> list[str]:
    return [c["customer_id"] for c in body["data"]]


def test_pages_stay_exact_when_new_keys_land_between_stored_ones(serve_source, make_client, db):
    odd = [customer(n) for n in range(1, 40, 2)]
    client = make_client(serve_source(customers=odd).url, ingest_page_size=7)
    client.post("/api/ingest?resource=customers")
    everything = [customer(n) for n in range(40, 0, -1)]  # the even keys fall in between
    client.app.state.settings.mock_server_url = serve_source(customers=everything).url
    client.post("/api/ingest?resource=customers")

    with db.cursor() as cur:
        cur.execute(
            "SELECT total, positions_exact FROM collection_stats WHERE resource = 'customers'"
        )
        assert cur.fetchone() == (40, True)
        cur.execute("SELECT customer_id FROM customers ORDER BY position")
        assert [r[0] for r in cur.fetchall()] == [f"C{n:05d}" for n in range(1, 41)]
    for page in range(1, 6):
        body = client.get(f"/api/customers?page={page}&limit=9").json()
        assert body["total"] == 40
        assert ids(body) == [f"C{n:05d}" for n in range(page * 9 - 8, min(page * 9, 40) + 1)]


def test_pages_are_exact_while_positions_await_renumbering(serve_source, make_client, db):
    # Mid-ingest, keys that landed between stored ones carry provisional positions: pages
    # must then come from key order, not from those positions.
    client = make_client(serve_source(customers=[customer(n) for n in range(1, 13)]).url)
    client.post("/api/ingest?resource=customers")
    with db.cursor() as cur:
        cur.execute("UPDATE customers SET position = 100 - position")
        cur.execute(
            "UPDATE collection_stats SET positions_exact = false WHERE resource = 'customers'"
        )
    for page in range(1, 4):
        body = client.get(f"/api/customers?page={page}&limit=5").json()
        assert body["total"] == 12
        assert ids(body) == [f"C{n:05d}" for n in range(page * 5 - 4, min(page * 5, 12) + 1)]


def test_keys_are_served_in_byte_order_whatever_the_source_order(serve_source, make_client, db):
    keys = ["b", "B", "é", "e", "😀", "\uff5a", "a1", "a10", "a2", "Z", "z", "É"]
    records = [customer(n, customer_id=key) for n, key in enumerate(keys, 1)]
    ascending = sorted(records, key=lambda r: r["customer_id"])
    # First a source in key order (every page appended), then one in another order.
    client = make_client(serve_source(customers=ascending[::2]).url, ingest_page_size=2)
    client.post("/api/ingest?resource=customers")
    client.app.state.settings.mock_server_url = serve_source(customers=records).url
    client.post("/api/ingest?resource=customers")

    expected = sorted(keys)  # code point order, which is UTF-8 byte order
    body = client.get("/api/customers?limit=100").json()
    assert ids(body) == expected
    assert [ids(client.get(f"/api/customers?page={p}&limit=5").json()) for p in (1, 2, 3)] == [
        expected[:5],
        expected[5:10],
        expected[10:],
    ]
    with db.cursor() as cur:
        cur.execute("SELECT customer_id FROM customers ORDER BY position")
        assert [r[0] for r in cur.fetchall()] == expected


def test_next_links_walk_every_record_once(client_with_23):
    seen, url, hops = [], "/api/customers?limit=5", 0
    while url:
        body = client_with_23.get(url).json()
        seen += ids(body)
        url, hops = body["next"], hops + 1
        assert hops < 10
    assert seen == [f"C{n:05d}" for n in range(1, 24)]


def test_reading_cursor_walks_a_time_window(sample_client):
    window = {"from": "2024-06-01T08:05:00Z"}
    everything = sample_client.get("/api/machines/MCH001/readings", params=window).json()
    first = sample_client.get("/api/machines/MCH001/readings", params=window | {"limit": 2})
    body = first.json()
    walked = [r["timestamp"] for r in body["data"]]
    while body["next"]:
        assert "from=" in body["next"]
        body = sample_client.get(body["next"]).json()
        assert body["page"] is None
        walked += [r["timestamp"] for r in body["data"]]
    assert walked == [r["timestamp"] for r in everything["data"]]


def test_readings_within_one_second_are_served_in_time_order(serve_source, make_client):
    # Rendered as text, '08:00:00.5Z' sorts before '08:00:00Z': order must follow the time.
    stamps = ["2024-06-01T08:00:01Z", "2024-06-01T08:00:00.25Z", "2024-06-01T08:00:00Z"]
    stamps += ["2024-06-01T08:00:00.5Z", "2024-06-01T08:00:00.000001Z"]
    readings = [reading(1, 0, timestamp=stamp) for stamp in stamps]
    client = make_client(serve_source(machines=[machine(1)], readings=readings).url)
    assert client.post("/api/ingest").status_code == 200

    in_time_order = sorted(stamps, key=datetime.fromisoformat)
    url = "/api/machines/M001/readings"
    pages = [client.get(url, params={"page": p, "limit": 2}).json() for p in (1, 2, 3)]
    assert [r["timestamp"] for page in pages for r in page["data"]] == in_time_order
    walked, body = [], client.get(url, params={"limit": 2}).json()
    while True:
        walked += [r["timestamp"] for r in body["data"]]
        if not body["next"]:
            break
        body = client.get(body["next"]).json()
    assert walked == in_time_order


@pytest.mark.parametrize("cursor", ["nonsense!", "W10", "WyJhIiwiYiJd", ""])
def test_a_cursor_not_given_out_is_400(client_with_23, cursor):
    response = client_with_23.get("/api/customers", params={"after": cursor})
    assert response.status_code == 400
    assert response.json()["error"].startswith("after:")


def test_reads_run_generic_plans_that_seek_the_index(make_client, db):
    # The read pool plans each statement once (force_generic_plan): a generic plan knows no
    # parameter values, so it must still seek the index, never scan the whole table.
    from pipeline_service.api.routes.records import QUERIES

    with db.cursor() as cur:
        cur.execute(
            "INSERT INTO customers (customer_id, first_name, last_name, email, created_at, "
            "position) SELECT 'C' || lpad(n::text, 6, '0'), 'F', 'L', 'e@x', now(), n "
            "FROM generate_series(1, 20000) n"
        )
        cur.execute("UPDATE collection_stats SET total = 20000 WHERE resource = 'customers'")
        cur.execute(
            "INSERT INTO machines (machine_id, name, model, location, status, created_at) "
            "VALUES ('M1', 'n', 'm', 'l', 'IDLE', now())"
        )
        cur.execute(
            "INSERT INTO machine_readings (machine_id, timestamp, temperature, speed, status) "
            "SELECT 'M1', now() - n * interval '1 minute', 20, 1, 'IDLE' "
            "FROM generate_series(1, 20000) n"
        )
        cur.execute("ANALYZE")
    customers, readings = QUERIES["customers"], QUERIES["readings"]
    window = ['"machine_id" = $1', '"timestamp" >= $2', '"timestamp" <= $3']
    statements = [  # (the table read, the statement, its arguments)
        ("customers", customers.by_position, "'customers', 9900, 10000"),
        ("customers", customers.one, "'C010000'"),
        (
            "machine_readings",
            readings.page(readings.count(window), window, "timestamp", "LIMIT $4 OFFSET $5"),
            "'M1', now() - interval '2 days', now(), 100, 200",
        ),
    ]
    app = make_client().app

    async def plans() -> tuple[str, list[tuple[str, str]]]:
        await app.state.reads.open()
        try:
            async with app.state.reads.connection() as conn:
                mode = await conn.fetchval("SHOW plan_cache_mode")
                found = []
                for table, statement, args in statements:
                    await conn.execute(f"PREPARE q AS {statement}")
                    rows = await conn.fetch(f"EXPLAIN EXECUTE q({args})")
                    found.append((table, "\n".join(row[0] for row in rows)))
                    await conn.execute("DEALLOCATE q")
                return mode, found
        finally:
            await app.state.reads.close()

    mode, found = asyncio.run(plans())
    assert mode == "force_generic_plan"
    for table, plan in found:  # collection_stats, a few rows, may well be scanned
        assert f"Seq Scan on {table}" not in plan and "Index Scan using" in plan, plan

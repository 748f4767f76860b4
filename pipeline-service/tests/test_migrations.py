"""The Alembic migrations match the models, and go down and up again cleanly."""

from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from pipeline_service.config import Settings
from pipeline_service.models import Base
from sqlalchemy import create_engine, inspect, text

ROOT = Path(__file__).resolve().parents[2]


def alembic_config(url: str) -> Config:
    config = Config(str(ROOT / "alembic.ini"))
    config.attributes.update(database_url=url, configure_logger=False)
    return config


def test_migrated_schema_matches_the_models(database_url):
    engine = create_engine(Settings(_env_file=None, database_url=database_url).database_url)
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert differences == []


def test_downgrade_to_base_and_upgrade_again(database_url):
    config = alembic_config(database_url)
    engine = create_engine(Settings(_env_file=None, database_url=database_url).database_url)
    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    command.upgrade(config, "head")
    tables = set(inspect(engine).get_table_names())
    engine.dispose()
    assert {
        "customers",
        "machines",
        "machine_readings",
        "ingest_runs",
        "rejected_records",
    } <= tables


def test_revisions_form_one_line_with_a_single_head():
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused/db"))
    assert len(script.get_heads()) == 1
    revisions = list(script.walk_revisions())
    assert revisions[-1].down_revision is None
    assert all(r.revision.isdigit() for r in revisions)  # ordered, readable ids: 0001, 0002


def test_digests_keep_their_bytes_when_they_become_bytea(database_url):
    config = alembic_config(database_url)
    engine = create_engine(Settings(_env_file=None, database_url=database_url).database_url)
    fields = "'C1', 'Ada', 'Lovelace', 'ada@example.com', '2024-01-01T00:00:00Z'"
    digest, bytes_digest = "0123456789abcdef0123456789abcdef", "fedcba9876543210fedcba9876543210"
    try:
        command.downgrade(config, "0007")
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO customers (customer_id, first_name, last_name, email, "
                    f"created_at, source_hash, source_bytes_hash) VALUES ({fields}, :h, :b)"
                ),
                {"h": digest, "b": bytes_digest},
            )
        command.upgrade(config, "head")
        with engine.connect() as conn:
            stored = conn.execute(
                text(
                    "SELECT encode(source_hash, 'hex'), encode(source_bytes_hash, 'hex') "
                    "FROM customers"
                )
            ).one()
    finally:
        engine.dispose()
    assert tuple(stored) == (digest, bytes_digest)

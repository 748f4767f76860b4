"""machine status history and change notifications

Adds ``machine_status_history`` and the triggers that feed it and the live stream:

- ``machines``: AFTER UPDATE OF status, per row, only when the status really changes;
  records the change (source 'api' when the writing transaction said so with
  ``set_config('pipeline.change_source', 'api', true)``, else 'ingest') and NOTIFYs it.
- ``machine_readings``: AFTER INSERT and AFTER UPDATE, per statement, over the transition
  table: one NOTIFY per machine per statement, carrying the readings themselves when a
  few, otherwise a notice of how many and which time span. Per statement, so an ingest
  page of 1000 readings costs one small query, not 1000 trigger calls.

NOTIFY is transactional: listeners hear of a change when, and only if, it commits.

Readings need no new index: the primary key (machine_id, timestamp) already serves the
stats range scan and the newest-N scan of the moving average.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHANNEL = "machine_events"  # pipeline_service.events.CHANNEL
INLINE_READINGS = 40  # at most this many readings ride inside one notification

RECORD_STATUS_CHANGE = f"""
CREATE FUNCTION record_machine_status_change() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    change machine_status_history%ROWTYPE;
BEGIN
    INSERT INTO machine_status_history (machine_id, old_status, new_status, source)
    VALUES (
        NEW.machine_id,
        OLD.status,
        NEW.status,
        coalesce(nullif(current_setting('pipeline.change_source', true), ''), 'ingest')
    )
    RETURNING * INTO change;
    PERFORM pg_notify('{CHANNEL}', json_build_object(
        'kind', 'status',
        'id', change.id,
        'machine_id', change.machine_id,
        'old_status', change.old_status,
        'new_status', change.new_status,
        'source', change.source,
        'changed_at', change.changed_at
    )::text);
    RETURN NULL;
END
$$
"""

# The readings themselves go along only when few enough to stay well under NOTIFY's
# 8000-byte payload limit; row_number() keeps a 1000-reading page from building a big
# JSON array only to throw it away.
NOTIFY_READINGS = f"""
CREATE FUNCTION notify_machine_readings() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    batch record;
    payload text;
BEGIN
    FOR batch IN
        SELECT machine_id,
               count(*) AS n,
               min("timestamp") AS first_at,
               max("timestamp") AS last_at,
               jsonb_agg(
                   jsonb_build_object(
                       'timestamp', "timestamp",
                       'temperature', temperature,
                       'speed', speed,
                       'status', status
                   ) ORDER BY "timestamp"
               ) FILTER (WHERE nth <= {INLINE_READINGS}) AS readings
        FROM (
            SELECT *, row_number() OVER (PARTITION BY machine_id ORDER BY "timestamp")
                AS nth
            FROM changed_readings
        ) numbered
        GROUP BY machine_id
    LOOP
        payload := json_build_object(
            'kind', 'readings',
            'machine_id', batch.machine_id,
            'count', batch.n,
            'from', batch.first_at,
            'to', batch.last_at,
            'changed_at', now(),
            'readings', CASE WHEN batch.n <= {INLINE_READINGS} THEN batch.readings END
        )::text;
        IF octet_length(payload) > 7900 THEN
            payload := json_build_object(
                'kind', 'readings',
                'machine_id', batch.machine_id,
                'count', batch.n,
                'from', batch.first_at,
                'to', batch.last_at,
                'changed_at', now()
            )::text;
        END IF;
        PERFORM pg_notify('{CHANNEL}', payload);
    END LOOP;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "machine_status_history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("machine_id", sa.String(length=50), nullable=False),
        sa.Column("old_status", sa.String(length=20), nullable=True),
        sa.Column("new_status", sa.String(length=20), nullable=False),
        sa.Column("source", sa.String(length=20), nullable=False),
        sa.Column(
            "changed_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "source IN ('api', 'ingest')", name=op.f("ck_machine_status_history_source")
        ),
        sa.ForeignKeyConstraint(
            ["machine_id"],
            ["machines.machine_id"],
            name=op.f("fk_machine_status_history_machine_id_machines"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_machine_status_history")),
    )
    op.create_index(
        "ix_machine_status_history_machine_id_changed_at",
        "machine_status_history",
        ["machine_id", "changed_at", "id"],
        unique=False,
    )
    op.execute(RECORD_STATUS_CHANGE)
    op.execute(
        """
        CREATE TRIGGER machines_status_change
        AFTER UPDATE OF status ON machines
        FOR EACH ROW WHEN (OLD.status IS DISTINCT FROM NEW.status)
        EXECUTE FUNCTION record_machine_status_change()
        """
    )
    op.execute(NOTIFY_READINGS)
    # A trigger with a transition table may name one event only, hence two.
    for event in ("INSERT", "UPDATE"):
        op.execute(
            f"""
            CREATE TRIGGER machine_readings_notify_{event.lower()}
            AFTER {event} ON machine_readings
            REFERENCING NEW TABLE AS changed_readings
            FOR EACH STATEMENT EXECUTE FUNCTION notify_machine_readings()
            """
        )


def downgrade() -> None:
    for event in ("insert", "update"):
        op.execute(f"DROP TRIGGER machine_readings_notify_{event} ON machine_readings")
    op.execute("DROP FUNCTION notify_machine_readings()")
    op.execute("DROP TRIGGER machines_status_change ON machines")
    op.execute("DROP FUNCTION record_machine_status_change()")
    op.drop_index(
        "ix_machine_status_history_machine_id_changed_at", table_name="machine_status_history"
    )
    op.drop_table("machine_status_history")

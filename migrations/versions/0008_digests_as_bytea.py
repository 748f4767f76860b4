"""record digests stored as bytea instead of uuid

The same 16 bytes in a column PostgreSQL reads faster: COPY parses a uuid's 32 hex digits
two at a time with strtoul, bytea's ``\\x`` hex form through a table. Of the ingest's COPY
of 1,000 customers with both digests, that was ~0.75 ms of PostgreSQL's ~7 ms (measured).
Stored digests keep their bytes, so rows are recognised as before.

Revision ID: 0008
Revises: 0007
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = {
    "customers": ("source_hash", "source_bytes_hash"),
    "machines": ("source_hash", "source_bytes_hash"),
    "machine_readings": ("source_hash",),
}


def upgrade() -> None:
    for table, columns in COLUMNS.items():
        changes = ", ".join(f"ALTER COLUMN {c} TYPE bytea USING uuid_send({c})" for c in columns)
        op.execute(f"ALTER TABLE {table} {changes}")


def downgrade() -> None:
    for table, columns in COLUMNS.items():
        changes = ", ".join(
            f"ALTER COLUMN {c} TYPE uuid USING encode({c}, 'hex')::uuid" for c in columns
        )
        op.execute(f"ALTER TABLE {table} {changes}")

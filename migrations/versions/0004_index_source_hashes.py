"""index source hashes

A re-ingest finds the records that are stored exactly as they are by their source hash,
before validating anything, so the hash needs an index in each record table.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("customers", "machines", "machine_readings")


def upgrade() -> None:
    for table in TABLES:
        op.create_index(op.f(f"ix_{table}_source_hash"), table, ["source_hash"], unique=False)


def downgrade() -> None:
    for table in TABLES:
        op.drop_index(op.f(f"ix_{table}_source_hash"), table_name=table)

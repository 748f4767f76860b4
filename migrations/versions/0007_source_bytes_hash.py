"""hash of each customer's and machine's source bytes

A re-ingest recognises a customer or machine whose JSON is byte for byte the one stored
last time from this hash alone, without parsing or validating it again. Rows stored before
are found by their fields' hash on the next run, which gives them this one too.

Revision ID: 0007
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("customers", "machines")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(table, sa.Column("source_bytes_hash", sa.Uuid(), nullable=True))


def downgrade() -> None:
    for table in TABLES:
        op.drop_column(table, "source_bytes_hash")

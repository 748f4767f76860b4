"""find stored customers and machines by key

A re-ingest finds the stored customers and machines by their one-column key, whose primary
key index exists anyway. Their source hash indexes go: every appended row paid for an
insert at a random place in them.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("customers", "machines")


def upgrade() -> None:
    for table in TABLES:
        op.drop_index(op.f(f"ix_{table}_source_hash"), table_name=table)


def downgrade() -> None:
    for table in TABLES:
        op.create_index(op.f(f"ix_{table}_source_hash"), table, ["source_hash"], unique=False)

"""collection positions and totals

Serving page P of customers or machines becomes a range seek on ``position`` (the rank in
key order) and ``total`` a single-row read, both kept exact by the ingest.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLLECTIONS = {"customers": "customer_id", "machines": "machine_id"}


def upgrade() -> None:
    op.create_table(
        "collection_stats",
        sa.Column("resource", sa.String(length=50), nullable=False),
        sa.Column("total", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("positions_exact", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.PrimaryKeyConstraint("resource", name=op.f("pk_collection_stats")),
    )
    for table, key in COLLECTIONS.items():
        op.add_column(table, sa.Column("position", sa.BigInteger(), nullable=True))
        op.create_index(op.f(f"ix_{table}_position"), table, ["position"], unique=False)
        # Rows already stored get their rank now.
        op.execute(
            f"UPDATE {table} t SET position = r.rn FROM "
            f"(SELECT {key}, row_number() OVER (ORDER BY {key}) AS rn FROM {table}) r "
            f"WHERE t.{key} = r.{key}"
        )
        op.execute(
            f"INSERT INTO collection_stats (resource, total) "
            f"SELECT '{table}', count(*) FROM {table}"
        )


def downgrade() -> None:
    for table in COLLECTIONS:
        op.drop_index(op.f(f"ix_{table}_position"), table_name=table)
        op.drop_column(table, "position")
    op.drop_table("collection_stats")

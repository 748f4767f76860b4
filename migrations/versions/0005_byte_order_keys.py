"""byte-order keys

Record keys compare in the "C" collation (byte order, which is also Unicode code point
order) whatever the database's default locale. The ingest can then tell in Python, without
asking the database, that every key of a page sorts after the stored ones and append the
page with COPY, numbering its positions itself. Positions are renumbered in the new order.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

KEY_COLUMNS = (
    ("customers", "customer_id"),
    ("machines", "machine_id"),
    ("machine_readings", "machine_id"),
    ("machine_status_history", "machine_id"),
)
POSITIONED = (("customers", "customer_id"), ("machines", "machine_id"))


def _set_collation(collation: str | None) -> None:
    for table, column in KEY_COLUMNS:
        op.alter_column(
            table,
            column,
            type_=sa.String(50, collation=collation),
            existing_type=sa.String(50),
            existing_nullable=False,
        )
    for table, key in POSITIONED:
        op.execute(
            f"UPDATE {table} t SET position = r.rn FROM "
            f"(SELECT {key}, row_number() OVER (ORDER BY {key}) AS rn FROM {table}) r "
            f"WHERE t.{key} = r.{key} AND t.position IS DISTINCT FROM r.rn"
        )


def upgrade() -> None:
    _set_collation("C")


def downgrade() -> None:
    _set_collation(None)

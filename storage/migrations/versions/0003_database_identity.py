"""The database's own row: an id made once, which names its artifact folder, and the
last run id given, so ids of removed runs are never given again.

Revision ID: 0003
Revises: 0002
"""

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        "database_identity",
        sa.Column("id", sa.Text(), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_run_id", sa.Integer(), nullable=False),
    )
    highest = op.get_bind().execute(sa.text("SELECT coalesce(max(id), 0) FROM runs")).scalar()
    row = {"id": uuid.uuid4().hex, "created_at": datetime.now(UTC), "last_run_id": highest}
    op.bulk_insert(table, [row])


def downgrade() -> None:
    op.drop_table("database_identity")

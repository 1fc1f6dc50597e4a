"""Text without a length limit and 64-bit counts, on databases that enforce types.

PostgreSQL enforced the first schema's VARCHAR(n) lengths (a long model path was
refused) and 32-bit INTEGER (a 7B model's parameter count, a seed above 2**31).
SQLite never enforced either, so nothing changes there.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# table -> {column: its VARCHAR length in 0001}
TEXT = {
    "models": {"name": 200, "revision": 200, "family": 50},
    "runs": {
        "analysis": 200,
        "analysis_version": 50,
        "plugin": 200,
        "model_name": 200,
        "model_revision": 200,
        "status": 20,
        "owner_host": 255,
    },
    "head_scores": {"metric": 100},
    "run_metrics": {"name": 200},
    "artifacts": {"name": 200, "media_type": 100},
}
BIGINT = {"models": ("parameters",), "runs": ("seed",), "artifacts": ("size",)}


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, columns in TEXT.items():
        for column in columns:
            op.alter_column(table, column, type_=sa.Text())
    for table, columns in BIGINT.items():
        for column in columns:
            op.alter_column(table, column, type_=sa.BigInteger())


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for table, columns in TEXT.items():
        for column, length in columns.items():
            op.alter_column(table, column, type_=sa.String(length))
    for table, columns in BIGINT.items():
        for column in columns:
            op.alter_column(table, column, type_=sa.Integer())

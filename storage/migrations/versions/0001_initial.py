"""Initial findings schema: models, runs, head scores, run metrics, artifacts.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("revision", sa.String(200), nullable=False),
        sa.Column("family", sa.String(50)),
        sa.Column("layers", sa.Integer()),
        sa.Column("query_heads", sa.Integer()),
        sa.Column("kv_heads", sa.Integer()),
        sa.Column("head_dim", sa.Integer()),
        sa.Column("max_positions", sa.Integer()),
        sa.Column("parameters", sa.Integer()),
        sa.Column("source", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_models_name_revision", "models", ["name", "revision"], unique=True)
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("analysis", sa.String(200), nullable=False),
        sa.Column("analysis_version", sa.String(50), nullable=False),
        sa.Column("plugin", sa.String(200)),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id")),
        sa.Column("model_name", sa.String(200), nullable=False),
        sa.Column("model_revision", sa.String(200)),
        sa.Column("packages", sa.JSON(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True)),
        sa.Column("finished_at", sa.DateTime(timezone=True)),
        sa.Column("duration_seconds", sa.Float()),
        sa.Column("progress_done", sa.Float()),
        sa.Column("progress_total", sa.Float()),
        sa.Column("progress_message", sa.Text()),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("owner_host", sa.String(255)),
        sa.Column("owner_pid", sa.Integer()),
        sa.Column("summary", sa.JSON()),
    )
    op.create_index("ix_runs_analysis", "runs", ["analysis"])
    op.create_index("ix_runs_model_name", "runs", ["model_name"])
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_table(
        "head_scores",
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("metric", sa.String(100), primary_key=True),
        sa.Column("layer", sa.Integer(), primary_key=True),
        sa.Column("head", sa.Integer(), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
    )
    op.create_index("ix_head_scores_metric_value", "head_scores", ["metric", "value"])
    op.create_table(
        "run_metrics",
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
        ),
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("value", sa.Float(), nullable=False),
    )
    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False
        ),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("media_type", sa.String(100), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("description", sa.Text()),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_artifacts_run_id", "artifacts", ["run_id"])


def downgrade() -> None:
    for table in ("artifacts", "run_metrics", "head_scores", "runs", "models"):
        op.drop_table(table)

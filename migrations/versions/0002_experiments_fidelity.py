"""Experiments, fair share, provenance and honest model selection.

- `experiments`: a grid of jobs (rows x seeds) answering one question;
- `jobs`: `experiment_id` and `row_label` (which experiment row a job is), `priority` (fair share),
  `environment` (what reproducing the run needs), and model selection on a validation split:
  `best_accuracy` (the maximum *test* accuracy: a test-selected figure) is dropped, and
  `best_val_accuracy` / `test_accuracy_at_best` added; `best_epoch` now means the epoch chosen on
  validation, so the old test-selected values are cleared rather than relabelled;
- `epoch_metrics`: `val_loss`, `val_accuracy`.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "experiments",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=True),
        sa.Column("owner_id", sa.Integer(), nullable=True),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("baseline", sa.String(length=128), nullable=True),
        sa.Column("job_count", sa.Integer(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.ForeignKeyConstraint(
            ["owner_id"],
            ["api_tokens.id"],
            name=op.f("fk_experiments_owner_id_api_tokens"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_experiments")),
    )
    op.create_index("ix_experiments_created_at_id", "experiments", ["created_at", "id"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("best_accuracy")
        batch.add_column(sa.Column("best_val_accuracy", sa.Float(), nullable=True))
        batch.add_column(sa.Column("test_accuracy_at_best", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("priority", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
        batch.add_column(sa.Column("experiment_id", sa.String(length=32), nullable=True))
        batch.add_column(sa.Column("row_label", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("environment", JSON, nullable=True))
        batch.create_foreign_key(
            op.f("fk_jobs_experiment_id_experiments"),
            "experiments",
            ["experiment_id"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index("ix_jobs_experiment_id", ["experiment_id"])
    op.execute("UPDATE jobs SET best_epoch = NULL")
    with op.batch_alter_table("epoch_metrics") as batch:
        batch.add_column(sa.Column("val_loss", sa.Float(), nullable=True))
        batch.add_column(sa.Column("val_accuracy", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("epoch_metrics") as batch:
        batch.drop_column("val_accuracy")
        batch.drop_column("val_loss")
    # SQLite rebuilds `jobs` (create, copy, DROP TABLE, rename), and the engine's
    # foreign_keys=ON makes that DROP delete every epoch and checkpoint row (ON DELETE CASCADE):
    # keep copies and put them back once the new `jobs` holds the same ids.
    kept = ("epoch_metrics", "checkpoints") if op.get_bind().dialect.name == "sqlite" else ()
    for table in kept:
        op.execute(f"CREATE TEMPORARY TABLE kept_{table} AS SELECT * FROM {table}")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_experiment_id")
        batch.drop_constraint(op.f("fk_jobs_experiment_id_experiments"), type_="foreignkey")
        batch.drop_column("environment")
        batch.drop_column("row_label")
        batch.drop_column("experiment_id")
        batch.drop_column("priority")
        batch.drop_column("test_accuracy_at_best")
        batch.drop_column("best_val_accuracy")
        batch.add_column(sa.Column("best_accuracy", sa.Float(), nullable=True))
    for table in kept:
        op.execute(f"DELETE FROM {table}")
        op.execute(f"INSERT INTO {table} SELECT * FROM kept_{table}")
        op.execute(f"DROP TABLE kept_{table}")
    op.drop_index("ix_experiments_created_at_id", table_name="experiments")
    op.drop_table("experiments")

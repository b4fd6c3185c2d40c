"""Idempotency keys for the creating POSTs, and the fair-share index.

- `idempotency_keys`: one row per (owner, route, Idempotency-Key) a client sent with a POST that
  creates something (`POST /v1/jobs`, `POST /v1/experiments`): the sha256 of the request (route +
  canonical JSON body), what it created (kind and id) and the answer's status. Written in the
  same transaction as the job or experiment, so a crash leaves both or neither; the unique
  constraint makes two concurrent requests with one key create one resource. `owner_id` is 0 for
  the anonymous owner (a NULL would defeat the unique constraint) and has no foreign key: tokens
  are never deleted, and the row only scopes the key. Rows older than `idempotency_retention` are
  forgotten (`jobstore.idempotency`).
- `jobs (owner_id, started_at)`: the index the fair share's last-start-per-owner MAX reads
  (`jobstore.fairshare.owner_turns`), a seek instead of a scan of the owner's jobs.

Read confinement (`JUMPOUT_READ_SCOPE`) needs no schema: it filters on `owner_id`.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("route", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("resource_kind", sa.String(length=16), nullable=False),
        sa.Column("resource_id", sa.String(length=32), nullable=False),
        sa.Column("response_status", sa.Integer(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idempotency_keys")),
        sa.UniqueConstraint(
            "owner_id", "route", "key", name=op.f("uq_idempotency_keys_owner_id_route_key")
        ),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])
    op.create_index("ix_jobs_owner_id_started_at", "jobs", ["owner_id", "started_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_owner_id_started_at", table_name="jobs")
    op.drop_index("ix_idempotency_keys_created_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
